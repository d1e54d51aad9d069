//! graph-sim's behaviours, exercised over real HTTP as a Graph client sees them, one module per
//! surface: the shape of payloads, delta rounds, auth, writes, limits and faults, the admin API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod admin;
mod auth;
mod batch;
mod delta;
mod directory;
mod limits;
mod push;
mod series;
mod shape;
mod writes;
mod zones;

use chrono::{DateTime, TimeZone, Utc};
use graph_sim::{Behaviour, FaultRule, Quirks, Sim, SimConfig, SimServer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const START: &str = "2026-01-01T00:00:00Z";
const END: &str = "2026-03-01T00:00:00Z";

/// A running simulator with one tenant and a client holding an app-only token for it.
struct Session {
    sim: Sim,
    server: SimServer,
    http: reqwest::Client,
    token: String,
    user: String,
}

fn clock() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 10, 9, 0, 0).unwrap()
}

/// The token endpoint's answer to a client-credentials request with `secret`.
async fn token_response(http: &reqwest::Client, server: &SimServer, secret: &str) -> Value {
    http.post(server.token_url(graph_sim::DEFAULT_TENANT))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", graph_sim::DEFAULT_CLIENT_ID),
            ("client_secret", secret),
            ("scope", "https://graph.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// An app-only token from the simulator's token endpoint, as calsync gets one.
async fn app_token(http: &reqwest::Client, server: &SimServer) -> String {
    let resp = token_response(http, server, graph_sim::DEFAULT_CLIENT_SECRET).await;
    resp["access_token"].as_str().unwrap().to_owned()
}

async fn start_with(cfg: SimConfig) -> Session {
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
    Session {
        sim,
        server,
        http,
        token,
        user,
    }
}

/// The default profile: Outlook as reported from production.
async fn start() -> Session {
    start_with(SimConfig::default()).await
}

/// The documented profile, for tests of what Microsoft's pages describe.
async fn start_documented() -> Session {
    start_with(SimConfig {
        behaviour: Behaviour::documented(),
        ..SimConfig::default()
    })
    .await
}

impl Session {
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

    /// A raw GET of the delta URL with the app token, for faults that break the answer.
    async fn raw_delta(&self) -> reqwest::Result<reqwest::Response> {
        self.http
            .get(self.delta_url())
            .bearer_auth(&self.token)
            .send()
            .await
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

    /// The event's URL under the user's default calendar.
    fn event_url(&self, id: &str) -> String {
        format!("{}/users/{}/events/{id}", self.base(), self.user)
    }

    async fn patch(&self, id: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::PATCH, &self.event_url(id), Some(body))
            .await
    }

    async fn delete(&self, id: &str) -> StatusCode {
        self.send(reqwest::Method::DELETE, &self.event_url(id), None)
            .await
            .0
    }

    /// A JSON answer from the admin API (`GET` without a body, `POST` with one).
    async fn admin(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.server.admin_url());
        let req = match body {
            Some(b) => self.http.post(url).json(&b),
            None => self.http.get(url),
        };
        let r = req.send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
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
