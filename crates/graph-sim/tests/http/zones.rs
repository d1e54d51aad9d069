//! Time zones as Graph serves them (graph-delta-notes.md 1.8): writes in Windows or IANA zones,
//! series expanded in their own zone with daylight saving time, responses rendered in the zone
//! `Prefer: outlook.timezone` names, all-day events as floating dates, and items that come back
//! in their own zone anyway.

use crate::*;

/// A full delta round over January to March with `Prefer: outlook.timezone="{zone}"`.
async fn round_in(t: &Session, zone: &str) -> Vec<Value> {
    let mut url = format!(
        "{}/users/{}/calendarView/delta?startDateTime={START}&endDateTime=2026-04-01T00:00:00Z",
        t.base(),
        t.user
    );
    let mut items = Vec::new();
    loop {
        let body: Value = t
            .http
            .get(&url)
            .bearer_auth(&t.token)
            .header("Prefer", format!("outlook.timezone=\"{zone}\""))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        items.extend(body["value"].as_array().unwrap().iter().cloned());
        match body["@odata.nextLink"].as_str() {
            Some(n) => url = n.to_owned(),
            None => return items,
        }
    }
}

/// The truth API over January to March.
fn truth_to_april(t: &Session) -> Vec<graph_sim::TruthItem> {
    t.sim
        .lock()
        .truth(
            &t.user,
            "default",
            graph_sim::Window {
                start: START.parse().unwrap(),
                end: "2026-04-01T00:00:00Z".parse().unwrap(),
            },
        )
        .unwrap()
}

fn in_zone(dt: &str, zone: &str) -> Value {
    json!({"dateTime": dt, "timeZone": zone})
}

fn start_of(items: &[Value], id: &str) -> (String, String) {
    let i = items.iter().find(|i| i["id"] == id).unwrap();
    (
        i["start"]["dateTime"].as_str().unwrap().to_owned(),
        i["start"]["timeZone"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_weekly_pacific_series_keeps_its_local_time_across_daylight_saving() {
    let t = start().await;
    let series = t
        .create(json!({
            "subject": "West coast sync",
            "start": in_zone("2026-02-23T09:00:00", "Pacific Standard Time"),
            "end": in_zone("2026-02-23T09:30:00", "Pacific Standard Time"),
            "recurrence": {"pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"]},
                           "range": {"type": "numbered", "startDate": "2026-02-23", "numberOfOccurrences": 2}}
        }))
        .await;
    assert_eq!(series["originalStartTimeZone"], "Pacific Standard Time");
    let truth = truth_to_april(&t);
    let mut starts: Vec<String> = truth.iter().map(|i| i.start.to_rfc3339()).collect();
    starts.sort();
    // US daylight saving time begins on 8 March 2026.
    assert_eq!(
        starts,
        ["2026-02-23T17:00:00+00:00", "2026-03-02T17:00:00+00:00"]
    );
    let t2 = start().await;
    let dst = t2
        .create(json!({
            "subject": "Across the change",
            "start": in_zone("2026-03-02T09:00:00", "America/Los_Angeles"),
            "end": in_zone("2026-03-02T09:30:00", "America/Los_Angeles"),
            "recurrence": {"pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"]},
                           "range": {"type": "numbered", "startDate": "2026-03-02", "numberOfOccurrences": 2}}
        }))
        .await;
    let master = dst["id"].as_str().unwrap();
    let utc = round_in(&t2, "UTC").await;
    let mut occ: Vec<(String, String)> = utc
        .iter()
        .filter(|i| i["type"] == "occurrence" && i["seriesMasterId"] == master)
        .map(|i| {
            (
                i["start"]["dateTime"].as_str().unwrap().to_owned(),
                i["start"]["timeZone"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    occ.sort();
    assert_eq!(
        occ,
        [
            ("2026-03-02T17:00:00.0000000".to_owned(), "UTC".to_owned()),
            ("2026-03-09T16:00:00.0000000".to_owned(), "UTC".to_owned()),
        ],
        "17:00Z in winter, 16:00Z in summer"
    );
    let pacific = round_in(&t2, "Pacific Standard Time").await;
    for o in pacific.iter().filter(|i| i["type"] == "occurrence") {
        assert!(
            o["start"]["dateTime"]
                .as_str()
                .unwrap()
                .ends_with("T09:00:00.0000000"),
            "{o}"
        );
        assert_eq!(o["start"]["timeZone"], "Pacific Standard Time");
    }
}

#[tokio::test]
async fn all_day_events_are_floating_dates_and_window_membership_uses_the_owners_zone() {
    let t = start().await;
    // Window membership is decided on the owner's real midnights (Q&A 970643).
    // The window ends at 2026-04-01T00:00Z; Tokyo's 1 April began at 15:00Z on 31 March.
    let tokyo = t
        .create(json!({"subject": "Fiscal year (Tokyo)", "isAllDay": true,
            "start": in_zone("2026-04-01T00:00:00", "Tokyo Standard Time"),
            "end": in_zone("2026-04-02T00:00:00", "Tokyo Standard Time")}))
        .await;
    for zone in ["UTC", "Pacific Standard Time"] {
        let items = round_in(&t, zone).await;
        let got = items.iter().find(|i| i["id"] == tokyo["id"]);
        let got = got.expect("in the window by the owner's midnight");
        assert_eq!(
            got["start"],
            json!({"dateTime": "2026-04-01T00:00:00.0000000", "timeZone": zone}),
            "midnight to midnight in whatever zone the response is in (docs#1802)"
        );
        assert_eq!(got["end"]["dateTime"], "2026-04-02T00:00:00.0000000");
    }
    let truth = truth_to_april(&t);
    assert_eq!(
        truth[0].start_date,
        Some(chrono::NaiveDate::from_ymd_opt(2026, 4, 1).unwrap())
    );
    // A UTC all-day event on 1 April is not in that window: its day begins at its end.
    let utc_day = t
        .create(json!({"subject": "UTC day", "isAllDay": true,
            "start": in_zone("2026-04-01T00:00:00", "UTC"),
            "end": in_zone("2026-04-02T00:00:00", "UTC")}))
        .await;
    let items = round_in(&t, "UTC").await;
    assert!(items.iter().all(|i| i["id"] != utc_day["id"]));
}

#[tokio::test]
async fn an_item_written_in_another_zone_comes_back_in_it_despite_prefer_q_and_a_1382503() {
    let t = start().await;
    let ev = t
        .create(json!({"subject": "Berlin review",
            "start": in_zone("2026-01-20T10:00:00", "W. Europe Standard Time"),
            "end": in_zone("2026-01-20T11:00:00", "W. Europe Standard Time")}))
        .await;
    let id = ev["id"].as_str().unwrap();
    let items = round_in(&t, "UTC").await;
    assert_eq!(
        start_of(&items, id),
        (
            "2026-01-20T10:00:00.0000000".to_owned(),
            "W. Europe Standard Time".to_owned()
        )
    );
    t.sim.lock().behaviour = Behaviour::documented();
    let items = round_in(&t, "UTC").await;
    assert_eq!(
        start_of(&items, id),
        ("2026-01-20T09:00:00.0000000".to_owned(), "UTC".to_owned())
    );
    let items = round_in(&t, "Europe/Berlin").await;
    assert_eq!(
        start_of(&items, id),
        (
            "2026-01-20T10:00:00.0000000".to_owned(),
            "Europe/Berlin".to_owned()
        )
    );
    let r = t
        .http
        .get(t.delta_url())
        .bearer_auth(&t.token)
        .header("Prefer", "outlook.timezone=\"Mars Standard Time\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}
