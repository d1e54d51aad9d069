use crate::*;

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
    let t = start_documented().await;
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
    let t = start_documented().await;
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

    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();
    let created = t
        .create(ev("new", "2026-01-20T10:00:00", "2026-01-20T11:00:00"))
        .await;
    t.patch(&id(&edit), json!({"subject": "edited"})).await;
    t.delete(&id(&delete)).await;
    t.patch(&id(&leave), json!({"start": {"dateTime": "2026-07-01T10:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2026-07-01T11:00:00", "timeZone": "UTC"}})).await;
    t.patch(&id(&enter), json!({"start": {"dateTime": "2026-01-21T10:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2026-01-21T11:00:00", "timeZone": "UTC"}})).await;
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
    let (s, exc) = t.patch(&occ[1], json!({"subject": "this week only"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(exc["type"], "exception");
    assert_eq!(t.delete(&occ[2]).await, StatusCode::NO_CONTENT);

    let (items, delta, _) = t.round(&delta, None).await;
    let changed = ids(&items);
    let gone = removed(&items);
    assert!(
        changed.contains(&id(&created))
            && changed.contains(&id(&edit))
            && changed.contains(&id(&enter))
    );
    assert!(
        changed.contains(&occ[1]),
        "the edited occurrence comes back as an exception"
    );
    assert!(!changed.contains(&id(&keep)));
    assert!(gone.contains(&id(&delete)) && gone.contains(&id(&leave)) && gone.contains(&occ[2]));
    assert!(
        gone.contains(&id(&outside)),
        "a change outside the window arrives as @removed (documented)"
    );
    assert!(items.iter().find(|i| i["id"] == occ[1]).unwrap()["type"] == "exception");

    // The whole series changed: every instance comes again.
    t.patch(&id(&series), json!({"subject": "renamed series"}))
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
        behaviour: Behaviour::documented(),
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
    t.admin(&format!("/evict?user={}", t.user), Some(json!({})))
        .await;
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
async fn quirks_reproduce_reported_service_behaviour() {
    let t = start_documented().await;
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
