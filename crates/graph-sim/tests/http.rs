//! graph-sim's documented behaviours, exercised over real HTTP as a Graph client sees them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use chrono::{DateTime, TimeZone, Utc};
use graph_sim::{FaultRule, Quirks, Sim, SimConfig, SimServer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const START: &str = "2026-01-01T00:00:00Z";
const END: &str = "2026-03-01T00:00:00Z";

struct T {
    sim: Sim,
    server: SimServer,
    http: reqwest::Client,
    token: String,
    user: String,
}

fn clock() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 10, 9, 0, 0).unwrap()
}

/// An app-only token from the simulator's token endpoint, as calsync gets one.
async fn app_token(http: &reqwest::Client, server: &SimServer) -> String {
    let resp: Value = http
        .post(server.token_url(graph_sim::DEFAULT_TENANT))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", graph_sim::DEFAULT_CLIENT_ID),
            ("client_secret", graph_sim::DEFAULT_CLIENT_SECRET),
            ("scope", "https://graph.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["access_token"].as_str().unwrap().to_owned()
}

async fn start_with(cfg: SimConfig) -> T {
    let sim = Sim::new(&SimConfig {
        clock_start: Some(clock()),
        ..cfg
    });
    let user = {
        let mut st = sim.lock();
        let u = st.tenant.add_user(
            "adele@contoso.onmicrosoft.com",
            Some("11111111-1111-1111-1111-111111111111".into()),
            "Adele Vance",
        );
        st.tenant.add_calendar(u, "Work");
        st.tenant
            .add_user("alex@contoso.onmicrosoft.com", None, "Alex Wilber");
        "adele@contoso.onmicrosoft.com".to_owned()
    };
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let http = reqwest::Client::new();
    let token = app_token(&http, &server).await;
    T {
        sim,
        server,
        http,
        token,
        user,
    }
}

async fn start() -> T {
    start_with(SimConfig::default()).await
}

impl T {
    fn base(&self) -> String {
        self.server.graph_base_url()
    }

    fn delta_url(&self) -> String {
        format!(
            "{}/users/{}/calendarView/delta?startDateTime={}&endDateTime={}",
            self.base(),
            self.user,
            START.replace(':', "%3A"),
            END.replace(':', "%3A")
        )
    }

    async fn get(
        &self,
        url: &str,
        page_size: Option<usize>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.get(url).bearer_auth(&self.token);
        if let Some(n) = page_size {
            req = req.header("Prefer", format!("odata.maxpagesize={n}"));
        }
        let r = req.send().await.unwrap();
        let (s, h) = (r.status(), r.headers().clone());
        let body = r.bytes().await.unwrap();
        (s, h, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let s = r.status();
        let bytes = r.bytes().await.unwrap();
        (s, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn create(&self, body: Value) -> Value {
        let (s, v) = self
            .send(
                reqwest::Method::POST,
                &format!("{}/users/{}/events", self.base(), self.user),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// Follows nextLinks to the deltaLink; returns the items, the deltaLink and the page count.
    async fn round(&self, first: &str, page_size: Option<usize>) -> (Vec<Value>, String, usize) {
        let mut url = first.to_owned();
        let mut items = Vec::new();
        let mut pages = 0;
        loop {
            let (s, _, body) = self.get(&url, page_size).await;
            assert_eq!(s, StatusCode::OK, "{body}");
            pages += 1;
            items.extend(body["value"].as_array().unwrap().iter().cloned());
            if let Some(d) = body["@odata.deltaLink"].as_str() {
                return (items, d.to_owned(), pages);
            }
            url = body["@odata.nextLink"]
                .as_str()
                .expect("a page has a nextLink or a deltaLink")
                .to_owned();
            assert!(pages < 10_000);
        }
    }
}

fn ev(subject: &str, start: &str, end: &str) -> Value {
    json!({"subject": subject, "start": {"dateTime": start, "timeZone": "UTC"}, "end": {"dateTime": end, "timeZone": "UTC"}})
}

fn weekly(subject: &str, start: &str, end: &str, count: u32) -> Value {
    let mut v = ev(subject, start, end);
    v["recurrence"] = json!({"pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"]},
        "range": {"type": "numbered", "startDate": &start[..10], "numberOfOccurrences": count}});
    v
}

fn ids(items: &[Value]) -> BTreeSet<String> {
    items
        .iter()
        .filter(|i| i.get("@removed").is_none())
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

fn removed(items: &[Value]) -> BTreeSet<String> {
    items
        .iter()
        .filter(|i| i.get("@removed").is_some())
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every property the fixture has, the simulator's object has too, with the same JSON type
/// (null in the fixture accepts anything, since Graph nulls optional values).
fn assert_same_shape(sim: &Value, doc: &Value, path: &str) {
    let (Some(s), Some(d)) = (sim.as_object(), doc.as_object()) else {
        return;
    };
    for (k, dv) in d {
        let sv = s.get(k).unwrap_or_else(|| {
            panic!("{path}.{k} is in Microsoft's payload but not the simulator's")
        });
        if dv.is_null() {
            continue;
        }
        assert_eq!(kind(sv), kind(dv), "{path}.{k} has another JSON type");
        if dv.is_object() {
            assert_same_shape(sv, dv, &format!("{path}.{k}"));
        }
    }
}

#[tokio::test]
async fn delta_pages_and_events_have_the_shape_of_microsofts_payloads() {
    let t = start().await;
    t.create(ev(
        "Plan shopping list",
        "2026-01-09T20:30:00.0000000",
        "2026-01-09T22:00:00",
    ))
    .await;
    let mut series = weekly(
        "Review strategy",
        "2026-01-05T20:30:00",
        "2026-01-05T21:00:00",
        4,
    );
    series["location"] = json!({"displayName": "Harry's Bar"});
    t.create(series).await;
    let (s, _, page) = t.get(&t.delta_url(), Some(2)).await;
    assert_eq!(s, StatusCode::OK);
    let doc_page = fixture("v1-calendarview-delta-initial-page-with-nextlink.json");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&page),
        keys(&doc_page),
        "page property names and order"
    );
    for item in page["value"].as_array().unwrap() {
        assert_same_shape(item, &doc_page["value"][0], "event");
        let beta = fixture("beta-calendarview-delta-page-full-event-properties.json");
        let mut full = beta["value"][0].clone();
        // The beta sample carries beta-only and PascalCase properties; v1.0 events have iCalUId.
        for k in [
            "uid",
            "IsRoomRequested",
            "AutoRoomBookingStatus",
            "OccurrenceId",
            "AutoRoomBookingOptions",
        ] {
            full.as_object_mut().unwrap().remove(k);
        }
        assert_same_shape(item, &full, "event");
        let dt = item["start"]["dateTime"].as_str().unwrap();
        assert_eq!(
            dt.len(),
            "2016-12-09T20:30:00.0000000".len(),
            "seven fraction digits, no offset: {dt}"
        );
        assert_eq!(item["start"]["timeZone"], "UTC");
    }
    let (items, delta, _) = t.round(&t.delta_url(), Some(2)).await;
    let occurrence = items.iter().find(|i| i["type"] == "occurrence").unwrap();
    let doc_instances = fixture("v1-event-instances-occurrences-and-exception.json");
    assert_same_shape(occurrence, &doc_instances["value"][1], "occurrence");
    // A master fetched with GET has the shape of the documented seriesMaster.
    let master_id = occurrence["seriesMasterId"].as_str().unwrap();
    let (s, master) = t
        .send(
            reqwest::Method::GET,
            &format!("{}/users/{}/events/{master_id}", t.base(), t.user),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_same_shape(
        &master,
        &fixture("v1-event-seriesmaster-with-recurrence.json"),
        "seriesMaster",
    );
    // Deleting yields a next round shaped like the documented one.
    let single = items
        .iter()
        .find(|i| i["type"] == "singleInstance")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    t.send(
        reqwest::Method::DELETE,
        &format!("{}/users/{}/events/{single}", t.base(), t.user),
        None,
    )
    .await;
    let (s, _, next) = t.get(&delta, None).await;
    assert_eq!(s, StatusCode::OK);
    let doc_next = fixture("v1-calendarview-delta-next-round-with-removed-item.json");
    assert_eq!(keys(&next), keys(&doc_next));
    assert_eq!(
        next["value"][0],
        json!({"@odata.type": "#microsoft.graph.event", "id": single, "@removed": {"reason": "deleted"}})
    );
    assert_eq!(keys(&next["value"][0]), keys(&doc_next["value"][0]));
}

#[tokio::test]
async fn error_bodies_have_graphs_shape() {
    let t = start().await;
    let (s, h, body) = t
        .get(
            &format!(
                "{}/users/{}/calendarView/delta?$deltatoken=forged",
                t.base(),
                t.user
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::GONE);
    assert_same_shape(
        &body,
        &fixture("error-410-syncstatenotfound-observed.json"),
        "410",
    );
    assert!(h.get("request-id").is_some());
    t.sim.lock().faults.push(serde_json::from_value(json!({"action": {"kind": "status", "status": 429, "code": "TooManyRequests", "message": "Please retry again later.", "retry_after": 2.128}})).unwrap());
    let (s, h, body) = t.get(&t.delta_url(), None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h["retry-after"], "2.128");
    let doc = fixture("error-429-too-many-requests-docs-sample.json");
    assert_eq!(body["error"]["code"], doc["error"]["code"]);
    assert_eq!(kind(&body["error"]["innerError"]), "object");
}

#[tokio::test]
async fn a_window_is_required_and_must_be_valid() {
    let t = start().await;
    let (s, _, b) = t
        .get(
            &format!("{}/users/{}/calendarView/delta", t.base(), t.user),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], "ErrorInvalidParameter");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("StartDateTime and EndDateTime")
    );
    // An unescaped '+' in the offset arrives as a space, as it does at Graph.
    let (s, _, b) = t.get(&format!("{}/users/{}/calendarView/delta?startDateTime=2026-01-01T00:00:00+05:30&endDateTime=2026-02-01T00:00:00Z", t.base(), t.user), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        b["error"]["message"],
        "The value of parameter 'StartDateTime' is invalid."
    );
    let (s, _, _) = t.get(&format!("{}/users/{}/calendarView/delta?startDateTime=2026-01-01T00:00:00%2B05:30&endDateTime=2026-02-01T00:00:00Z", t.base(), t.user), None).await;
    assert_eq!(s, StatusCode::OK);
    // Lower-case parameter names (as in Microsoft's sample) work too.
    let (s, _, _) = t.get(&format!("{}/users/{}/calendarview/delta?startdatetime=2026-01-01T00:00:00Z&enddatetime=2026-02-01T00:00:00Z", t.base(), t.user), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, b) = t
        .get(
            &format!(
                "{}/users/nobody@x/calendarView/delta?startDateTime={START}&endDateTime={END}",
                t.base()
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "ErrorInvalidUser");
}

#[tokio::test]
async fn a_full_round_lists_every_instance_in_the_window_and_no_series_master() {
    let t = start().await;
    let a = t
        .create(ev("inside", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    t.create(ev("outside", "2026-05-15T10:00:00", "2026-05-15T11:00:00"))
        .await;
    let edge = t
        .create(ev(
            "overlaps the start",
            "2025-12-31T23:00:00",
            "2026-01-01T01:00:00",
        ))
        .await;
    let series = t
        .create(weekly(
            "weekly",
            "2025-12-15T09:00:00",
            "2025-12-15T09:30:00",
            10,
        ))
        .await;
    let allday = t.create(json!({"subject": "all day", "isAllDay": true,
        "start": {"dateTime": "2026-02-02T00:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2026-02-04T00:00:00", "timeZone": "UTC"}})).await;
    for page_size in [1, 3, 100] {
        let (items, _, pages) = t.round(&t.delta_url(), Some(page_size)).await;
        let got = ids(&items);
        assert!(got.contains(a["id"].as_str().unwrap()));
        assert!(got.contains(edge["id"].as_str().unwrap()));
        assert!(got.contains(allday["id"].as_str().unwrap()));
        assert!(
            !got.contains(series["id"].as_str().unwrap()),
            "never the series master"
        );
        // Weekly from 2025-12-15: 10 Mondays; those from 2026-01-05 to 2026-02-16 are inside.
        let occ: Vec<&Value> = items.iter().filter(|i| i["type"] == "occurrence").collect();
        assert_eq!(occ.len(), 7);
        assert!(occ.iter().all(|o| o["seriesMasterId"] == series["id"]));
        assert_eq!(got.len(), 10);
        assert_eq!(pages, 10usize.div_ceil(page_size).max(1));
        let truth = t
            .sim
            .lock()
            .truth(
                &t.user,
                "default",
                graph_sim::Window {
                    start: START.parse().unwrap(),
                    end: END.parse().unwrap(),
                },
            )
            .unwrap();
        assert_eq!(
            truth.iter().map(|i| i.id.clone()).collect::<BTreeSet<_>>(),
            got
        );
    }
    let (_, h, _) = t.get(&t.delta_url(), Some(3)).await;
    assert!(
        h["preference-applied"]
            .to_str()
            .unwrap()
            .contains("odata.maxpagesize=3")
    );
}

#[tokio::test]
async fn incremental_rounds_report_changes_and_removals() {
    let t = start().await;
    let keep = t
        .create(ev("keep", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    let edit = t
        .create(ev("edit me", "2026-01-16T10:00:00", "2026-01-16T11:00:00"))
        .await;
    let delete = t
        .create(ev(
            "delete me",
            "2026-01-17T10:00:00",
            "2026-01-17T11:00:00",
        ))
        .await;
    let leave = t
        .create(ev(
            "move me out",
            "2026-01-18T10:00:00",
            "2026-01-18T11:00:00",
        ))
        .await;
    let enter = t
        .create(ev(
            "move me in",
            "2026-06-18T10:00:00",
            "2026-06-18T11:00:00",
        ))
        .await;
    let series = t
        .create(weekly(
            "weekly",
            "2026-01-05T09:00:00",
            "2026-01-05T09:30:00",
            6,
        ))
        .await;
    let (items, delta, _) = t.round(&t.delta_url(), None).await;
    assert_eq!(ids(&items).len(), 4 + 6);

    // Nothing changed: an empty page and a new deltaLink.
    let (items, delta, pages) = t.round(&delta, None).await;
    assert!(items.is_empty());
    assert_eq!(pages, 1);

    let url = |id: &Value| {
        format!(
            "{}/users/{}/events/{}",
            t.base(),
            t.user,
            id.as_str().unwrap()
        )
    };
    let created = t
        .create(ev("new", "2026-01-20T10:00:00", "2026-01-20T11:00:00"))
        .await;
    t.send(
        reqwest::Method::PATCH,
        &url(&edit["id"]),
        Some(json!({"subject": "edited"})),
    )
    .await;
    t.send(reqwest::Method::DELETE, &url(&delete["id"]), None)
        .await;
    t.send(reqwest::Method::PATCH, &url(&leave["id"]), Some(json!({"start": {"dateTime": "2026-07-01T10:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2026-07-01T11:00:00", "timeZone": "UTC"}}))).await;
    t.send(reqwest::Method::PATCH, &url(&enter["id"]), Some(json!({"start": {"dateTime": "2026-01-21T10:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2026-01-21T11:00:00", "timeZone": "UTC"}}))).await;
    let outside = t
        .create(ev(
            "created outside",
            "2026-09-01T10:00:00",
            "2026-09-01T11:00:00",
        ))
        .await;
    // One occurrence edited, one cancelled.
    let (_, _, page) = t.get(&t.delta_url(), Some(100)).await;
    let occ: Vec<String> = page["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "occurrence")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    let (s, exc) = t
        .send(
            reqwest::Method::PATCH,
            &format!("{}/users/{}/events/{}", t.base(), t.user, occ[1]),
            Some(json!({"subject": "this week only"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(exc["type"], "exception");
    let (s, _) = t
        .send(
            reqwest::Method::DELETE,
            &format!("{}/users/{}/events/{}", t.base(), t.user, occ[2]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let (items, delta, _) = t.round(&delta, None).await;
    let changed = ids(&items);
    let gone = removed(&items);
    let s = |v: &Value| v["id"].as_str().unwrap().to_owned();
    assert!(
        changed.contains(&s(&created))
            && changed.contains(&s(&edit))
            && changed.contains(&s(&enter))
    );
    assert!(
        changed.contains(&occ[1]),
        "the edited occurrence comes back as an exception"
    );
    assert!(!changed.contains(&s(&keep)));
    assert!(gone.contains(&s(&delete)) && gone.contains(&s(&leave)) && gone.contains(&occ[2]));
    assert!(
        gone.contains(&s(&outside)),
        "a change outside the window arrives as @removed (documented)"
    );
    assert!(items.iter().find(|i| i["id"] == occ[1]).unwrap()["type"] == "exception");

    // The whole series changed: every instance comes again.
    t.send(
        reqwest::Method::PATCH,
        &url(&series["id"]),
        Some(json!({"subject": "renamed series"})),
    )
    .await;
    let (items, _, _) = t.round(&delta, None).await;
    let renamed: Vec<&Value> = items
        .iter()
        .filter(|i| i["subject"] == "renamed series")
        .collect();
    assert_eq!(
        renamed.len(),
        4,
        "6 occurrences less one cancelled, less the exception that kept its own subject"
    );
    assert!(
        items
            .iter()
            .any(|i| i["id"] == occ[1] && i["subject"] == "this week only")
            || !ids(&items).contains(&occ[1])
    );
}

#[tokio::test]
async fn tokens_are_opaque_tamper_evident_bound_to_their_window_and_evictable() {
    let t = start_with(SimConfig {
        cache_capacity: 6,
        ..SimConfig::default()
    })
    .await;
    for d in 10..15 {
        t.create(ev(
            "e",
            &format!("2026-01-{d}T10:00:00"),
            &format!("2026-01-{d}T11:00:00"),
        ))
        .await;
    }
    let (_, delta, _) = t.round(&t.delta_url(), Some(2)).await;
    // Tampered: one character changed.
    let mut bad = delta.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    let (s, _, b) = t.get(&bad, None).await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(b["error"]["code"], "SyncStateInvalid");
    // Bound to the window.
    let (s, _, _) = t
        .get(
            &format!("{delta}&startDateTime=2026-01-02T00:00:00Z&endDateTime={END}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Another user's path.
    let other = delta.replace(
        "adele@contoso.onmicrosoft.com",
        "alex@contoso.onmicrosoft.com",
    );
    let (s, _, _) = t.get(&other, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Evicted oldest-first once the cache is full: a few more rounds push it out.
    for _ in 0..4 {
        t.round(&t.delta_url(), Some(100)).await;
    }
    let (s, _, b) = t.get(&delta, None).await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(b["error"]["code"], "SyncStateNotFound");
    // Evicted on command.
    let (_, fresh, _) = t.round(&t.delta_url(), Some(100)).await;
    let r = t
        .http
        .post(format!("{}/evict?user={}", t.server.admin_url(), t.user))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (s, _, _) = t.get(&fresh, None).await;
    assert_eq!(s, StatusCode::GONE);
}

#[tokio::test]
async fn a_stale_next_link_fails_once_its_round_has_moved_on() {
    let t = start().await;
    for d in 10..16 {
        t.create(ev(
            "e",
            &format!("2026-01-{d}T10:00:00"),
            &format!("2026-01-{d}T11:00:00"),
        ))
        .await;
    }
    let (_, _, p1) = t.get(&t.delta_url(), Some(2)).await;
    let n1 = p1["@odata.nextLink"].as_str().unwrap().to_owned();
    let (s, _, p2) = t.get(&n1, Some(2)).await;
    assert_eq!(s, StatusCode::OK);
    // The latest link may be requested again.
    let (s, _, p2b) = t.get(&n1, Some(2)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(p2["value"], p2b["value"]);
    let n2 = p2["@odata.nextLink"].as_str().unwrap().to_owned();
    t.get(&n2, Some(2)).await;
    let (s, _, b) = t.get(&n1, Some(2)).await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(b["error"]["code"], "SyncStateNotFound");
    assert!(b["error"]["message"].as_str().unwrap().contains("highest="));
}

#[tokio::test]
async fn the_token_endpoint_and_bearer_checks_answer_like_azure_ad_and_graph() {
    let t = start_with(SimConfig {
        token_lifetime_secs: 60,
        ..SimConfig::default()
    })
    .await;
    let bad: Value = t
        .http
        .post(t.server.token_url(graph_sim::DEFAULT_TENANT))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", graph_sim::DEFAULT_CLIENT_ID),
            ("client_secret", "nope"),
            ("scope", "https://graph.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bad["error"], "invalid_client");
    let r = t.http.get(t.delta_url()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("www-authenticate").is_some());
    let (s, _, _) = t.get(&t.delta_url(), None).await;
    assert_eq!(s, StatusCode::OK);
    t.sim.clock().advance(chrono::Duration::seconds(61));
    let (s, _, b) = t.get(&t.delta_url(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(b["error"]["code"], "InvalidAuthenticationToken");
    assert_eq!(
        b["error"]["message"],
        "Access token has expired or is not yet valid."
    );
}

#[tokio::test]
async fn me_needs_a_delegated_token() {
    let t = start().await;
    let (s, _, b) = t
        .get(
            &format!(
                "{}/me/calendarView/delta?startDateTime={START}&endDateTime={END}",
                t.base()
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delegated")
    );
    let tok: Value = t
        .http
        .post(format!(
            "{}/delegated-token?user={}",
            t.server.admin_url(),
            t.user
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = t
        .http
        .get(format!(
            "{}/me/calendar/calendarView/delta?startDateTime={START}&endDateTime={END}",
            t.base()
        ))
        .bearer_auth(tok["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn writes_under_a_named_calendar_stay_in_that_calendar() {
    let t = start().await;
    let cal = t.sim.lock().tenant.users[0].calendars[1].id.clone();
    let (s, created) = t
        .send(
            reqwest::Method::POST,
            &format!("{}/users/{}/calendars/{cal}/events", t.base(), t.user),
            Some(ev("work", "2026-01-15T10:00:00", "2026-01-15T11:00:00")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (items, _, _) = t.round(&format!("{}/users/{}/calendars/{cal}/calendarView/delta?startDateTime={START}&endDateTime={END}", t.base(), t.user), None).await;
    assert_eq!(
        ids(&items),
        BTreeSet::from([created["id"].as_str().unwrap().to_owned()])
    );
    let (items, _, _) = t.round(&t.delta_url(), None).await;
    assert!(items.is_empty());
    let (s, _) = t
        .send(
            reqwest::Method::PATCH,
            &format!(
                "{}/users/{}/calendars/{cal}/events/{}",
                t.base(),
                t.user,
                created["id"].as_str().unwrap()
            ),
            Some(json!({"subject": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t
        .send(
            reqwest::Method::POST,
            &format!("{}/users/{}/events", t.base(), t.user),
            Some(json!({"subject": "x", "bogus": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn scripted_faults_fire_on_the_chosen_requests() {
    let t = start().await;
    let rule = |v: Value| -> FaultRule { serde_json::from_value(v).unwrap() };
    t.sim.lock().faults.push(rule(json!({"nth": 2, "path_contains": "calendarView", "action": {"kind": "status", "status": 503, "code": "UnknownError", "retry_after": 1, "retry_after_as_date": true}})));
    let (s, _, _) = t.get(&t.delta_url(), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, h, b) = t.get(&t.delta_url(), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b["error"]["code"], "UnknownError");
    assert!(httpdate::parse_http_date(h["retry-after"].to_str().unwrap()).is_ok());
    // Asking again before the Retry-After date is bad manners, and counted (past the 5 ms
    // allowed for requests that were already on their way: sim::IN_FLIGHT_ALLOWANCE).
    tokio::time::sleep(graph_sim::sim::IN_FLIGHT_ALLOWANCE * 2).await;
    t.get(&t.delta_url(), None).await;
    assert_eq!(t.sim.lock().violations().retry_after, 1);

    t.sim.lock().faults = vec![rule(json!({"nth": 1, "action": {"kind": "reset"}}))];
    let err = t.http.get(t.delta_url()).bearer_auth(&t.token).send().await;
    assert!(err.is_err(), "connection reset");
    t.sim.lock().faults = vec![rule(json!({"nth": 1, "action": {"kind": "truncate"}}))];
    let r = t
        .http
        .get(t.delta_url())
        .bearer_auth(&t.token)
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.is_err(), "body cut off");
    t.sim.lock().faults = vec![rule(
        json!({"nth": 1, "action": {"kind": "malformed_json"}}),
    )];
    let r = t
        .http
        .get(t.delta_url())
        .bearer_auth(&t.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).is_err());
    t.sim.lock().faults = vec![rule(
        json!({"nth": 1, "action": {"kind": "delay", "ms": 300}}),
    )];
    let started = std::time::Instant::now();
    let (s, _, _) = t.get(&t.delta_url(), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let log = t.sim.lock().requests();
    assert!(log.iter().any(|r| r.fault.as_deref() == Some("reset")));
    assert!(
        log.iter().all(|r| !r.path.contains("token=")),
        "the log keeps paths, never tokens in queries"
    );
}

#[tokio::test]
async fn more_than_four_concurrent_requests_to_a_mailbox_get_429_application_throttled() {
    let t = start().await;
    t.sim
        .lock()
        .faults
        .push(serde_json::from_value(json!({"action": {"kind": "delay", "ms": 400}})).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (http, url, tok) = (t.http.clone(), t.delta_url(), t.token.clone());
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).bearer_auth(tok).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }));
    }
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for task in tasks {
        let (s, body) = task.await.unwrap();
        *by_status.entry(s.as_u16()).or_default() += 1;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(body.contains("ApplicationThrottled") && body.contains("MailboxConcurrency"));
        }
    }
    assert_eq!(by_status, BTreeMap::from([(200, 4), (429, 2)]));
    let v = t.sim.lock().violations();
    assert_eq!(v.concurrency, 2);
    assert_eq!(v.max_in_flight, 4);
}

#[tokio::test]
async fn an_app_wide_budget_throttles_every_mailbox() {
    let mut cfg = SimConfig::default();
    cfg.limits.app_requests = Some(3);
    cfg.limits.app_window_secs = 60.0;
    let t = start_with(cfg).await;
    for _ in 0..3 {
        assert_eq!(t.get(&t.delta_url(), None).await.0, StatusCode::OK);
    }
    let (s, h, b) = t.get(&t.delta_url(), None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(b["error"]["code"], "TooManyRequests");
    assert!(h["retry-after"].to_str().unwrap().parse::<f64>().unwrap() > 50.0);
}

#[tokio::test]
async fn quirks_reproduce_reported_service_behaviour() {
    let t = start().await;
    t.create(weekly(
        "long series",
        "2026-01-05T09:00:00",
        "2026-01-05T09:30:00",
        8,
    ))
    .await;
    t.create(ev("single", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    t.sim.lock().cache.quirks = Quirks {
        empty_pages: 2,
        ..Quirks::default()
    };
    let (_, _, p) = t.get(&t.delta_url(), Some(3)).await;
    assert!(
        p["value"].as_array().unwrap().is_empty() && p["@odata.nextLink"].is_string(),
        "an empty page with a nextLink"
    );
    let (items, _, pages) = t.round(&t.delta_url(), Some(3)).await;
    assert_eq!(ids(&items).len(), 9);
    assert_eq!(pages, 2 + 3);

    t.sim.lock().cache.quirks = Quirks {
        duplicate_across_pages: true,
        ..Quirks::default()
    };
    let (items, _, _) = t.round(&t.delta_url(), Some(3)).await;
    assert!(items.len() > ids(&items).len(), "the same id on two pages");

    t.sim.lock().cache.quirks = Quirks {
        oversize_series_pages: true,
        ..Quirks::default()
    };
    let (_, _, p) = t.get(&t.delta_url(), Some(3)).await;
    assert_eq!(
        p["value"].as_array().unwrap().len(),
        8,
        "a series is not split: the page exceeds maxpagesize"
    );

    t.sim.lock().cache.quirks = Quirks {
        oversize_series_pages: true,
        endless_next_link: true,
        ..Quirks::default()
    };
    let (_, _, mut p) = t.get(&t.delta_url(), Some(3)).await;
    let first = p["value"].clone();
    let mut links = BTreeSet::new();
    for _ in 0..20 {
        let next = p["@odata.nextLink"]
            .as_str()
            .expect("never a deltaLink")
            .to_owned();
        assert!(links.insert(next.clone()), "each skiptoken is new");
        p = t.get(&next, Some(3)).await.2;
        assert_eq!(p["value"], first, "the same items forever");
    }
}

#[tokio::test]
async fn the_same_seed_and_requests_give_the_same_bytes() {
    async fn run() -> Vec<String> {
        let scenario = graph_sim::Scenario {
            sim: SimConfig {
                seed: 7,
                clock_start: Some(clock()),
                ..SimConfig::default()
            },
            generate: Some(graph_sim::GenerateSpec {
                users: 2,
                events_per_user: 30,
                recurring: 0.3,
                extra_calendars: 0,
            }),
            ..Default::default()
        };
        let sim = scenario.build().unwrap();
        let server = sim.serve("127.0.0.1:0").await.unwrap();
        let http = reqwest::Client::new();
        let tok = app_token(&http, &server).await;
        let mut url = format!(
            "{}/users/user0000@contoso.onmicrosoft.com/calendarView/delta?startDateTime=2025-10-01T00:00:00Z&endDateTime=2026-06-01T00:00:00Z",
            server.graph_base_url()
        );
        let mut bodies = Vec::new();
        loop {
            let body = http
                .get(&url)
                .bearer_auth(&tok)
                .header("Prefer", "odata.maxpagesize=7")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let v: Value = serde_json::from_str(&body).unwrap();
            // Links carry the port, which differs between runs; compare everything else.
            bodies.push(body.replace(&server.addr.to_string(), "HOST"));
            match v["@odata.nextLink"].as_str() {
                Some(n) => url = n.to_owned(),
                None => break,
            }
        }
        server.stop().await;
        bodies
    }
    let (a, b) = (run().await, run().await);
    assert!(a.len() > 3);
    assert_eq!(a, b);
}

#[tokio::test]
async fn the_admin_endpoint_serves_truth_log_and_counters() {
    let t = start().await;
    t.create(ev("inside", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    let truth: Value = t
        .http
        .get(format!(
            "{}/truth?user={}&start={START}&end={END}",
            t.server.admin_url(),
            t.user
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(truth.as_array().unwrap().len(), 1);
    assert_eq!(truth[0]["subject"], "inside");
    let r: Value = t
        .http
        .post(format!("{}/faults", t.server.admin_url()))
        .json(&json!({"nth": 1, "action": {"kind": "reset"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["ok"], true);
    let reqs: Value = t
        .http
        .get(format!("{}/requests", t.server.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reqs = reqs.as_array().unwrap();
    assert!(reqs.iter().any(|r| r["status"] == 201
        && r["method"] == "POST"
        && r["mailbox"] == "11111111-1111-1111-1111-111111111111"));
    assert!(
        reqs.iter()
            .any(|r| r["path"].as_str().unwrap().ends_with("/oauth2/v2.0/token"))
    );
    let stats: Value = t
        .http
        .get(format!("{}/stats", t.server.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["tokens_issued"], 1);
}

#[tokio::test]
async fn the_documented_scenario_file_loads_and_seeds_the_tenant() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/graph-sim.example.toml"
    ));
    let scenario = graph_sim::Scenario::from_file(path).unwrap();
    let sim = scenario.build().unwrap();
    let st = sim.lock();
    assert_eq!(st.tenant.users.len(), 4);
    let adele = st
        .tenant
        .user_index("adele@contoso.onmicrosoft.com")
        .unwrap();
    assert_eq!(st.tenant.users[adele].calendars[1].name, "Work");
    let work = st.tenant.users[adele].calendars[1].id.clone();
    let truth = st
        .truth(
            "adele@contoso.onmicrosoft.com",
            &work,
            graph_sim::Window {
                start: START.parse().unwrap(),
                end: "2026-07-01T00:00:00Z".parse().unwrap(),
            },
        )
        .unwrap();
    assert_eq!(truth.len(), 26, "weekly from Jan 5 to Jun 29");
    assert_eq!(st.faults.len(), 1);
    let bad =
        graph_sim::Scenario::from_file(std::path::Path::new("/nonexistent.toml")).unwrap_err();
    assert!(bad.to_string().contains("/nonexistent.toml"));
}
