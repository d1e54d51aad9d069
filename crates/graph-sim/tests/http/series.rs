//! Recurring series as production Outlook serves them (the default `outlook` profile), each
//! test named for the report it reproduces (graph-delta-notes.md §1.7a), and the surfaces a
//! client needs to cope: `/instances`, calendar-scoped reads with `$select`, request ids.

use crate::*;

const STUB_KEYS: [&str; 7] = [
    "@odata.type",
    "@odata.etag",
    "id",
    "seriesMasterId",
    "type",
    "start",
    "end",
];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn of_type<'a>(items: &'a [Value], kind: &str) -> Vec<&'a Value> {
    items.iter().filter(|i| i["type"] == kind).collect()
}

/// Ids of the occurrences among `items`.
fn occurrence_ids(items: &[Value]) -> BTreeSet<String> {
    of_type(items, "occurrence")
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A weekly Monday 09:00 series of `count` in the window and a full round over it: the master's
/// id, the round's items and its deltaLink.
async fn weekly_series(t: &Session, count: u32) -> (String, Vec<Value>, String) {
    let series = t
        .create(weekly(
            "Weekly",
            "2026-01-05T09:00:00",
            "2026-01-05T09:30:00",
            count,
        ))
        .await;
    let (items, delta, _) = t.round(&t.delta_url(), None).await;
    (series["id"].as_str().unwrap().to_owned(), items, delta)
}

/// A weekly series in the window with one exception; returns (master id, occurrence ids).
async fn series_with_exception(t: &Session) -> (String, Vec<String>) {
    let series = t
        .create(weekly(
            "Standup",
            "2026-01-05T09:00:00",
            "2026-01-05T09:15:00",
            6,
        ))
        .await;
    let master = series["id"].as_str().unwrap().to_owned();
    let (items, _, _) = t.round(&t.delta_url(), None).await;
    let occ: Vec<String> = items
        .iter()
        .filter(|i| i["seriesMasterId"] == master.as_str())
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    let (s, _) = t
        .patch(&occ[1], json!({"subject": "Standup (moved room)"}))
        .await;
    assert_eq!(s, StatusCode::OK);
    (master, occ)
}

#[tokio::test]
async fn occurrences_are_bare_stubs_and_masters_are_listed_with_their_first_occurrence_times_keeper_409()
 {
    let t = start().await;
    // A yearly-style old series: weekly since 2019, still running in the window.
    let old = t
        .create(weekly(
            "Since 2019",
            "2019-01-07T08:00:00",
            "2019-01-07T08:30:00",
            1000,
        ))
        .await;
    let single = t
        .create(ev("single", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    let (master, _) = series_with_exception(&t).await;
    let (items, _, _) = t.round(&t.delta_url(), Some(3)).await;

    let masters = of_type(&items, "seriesMaster");
    let master_ids: BTreeSet<&str> = masters.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        master_ids,
        BTreeSet::from([old["id"].as_str().unwrap(), master.as_str()]),
        "each series with an instance in the window is listed once"
    );
    assert_eq!(masters.len(), 2);
    let old_master = masters.iter().find(|m| m["id"] == old["id"]).unwrap();
    assert_eq!(
        old_master["start"]["dateTime"], "2019-01-07T08:00:00.0000000",
        "a master carries its first occurrence's start, years before the window"
    );
    assert_eq!(old_master["subject"], "Since 2019");
    assert!(old_master["recurrence"].is_object());

    let occurrences = of_type(&items, "occurrence");
    assert!(occurrences.len() > 10);
    for o in &occurrences {
        let want: BTreeSet<String> = STUB_KEYS.iter().map(|k| (*k).to_owned()).collect();
        assert_eq!(keys(o), want, "an occurrence is a stub: {o}");
    }
    let exceptions = of_type(&items, "exception");
    assert_eq!(exceptions.len(), 1);
    let exception = exceptions[0];
    assert_eq!(
        exception["subject"], "Standup (moved room)",
        "exceptions come in full"
    );
    let this_master = masters.iter().find(|m| m["id"] == master.as_str()).unwrap();
    assert_eq!(
        exception["@odata.etag"], this_master["@odata.etag"],
        "an exception shows its master's change key, as in Microsoft's /instances example"
    );
    assert!(exception["originalStart"].is_string());
    let singles = of_type(&items, "singleInstance");
    assert_eq!(singles.len(), 1);
    assert_eq!(singles[0]["id"], single["id"]);
    assert_eq!(singles[0]["subject"], "single");
}

#[tokio::test]
async fn a_cancelled_occurrence_gets_no_removed_only_its_master_changes_pr_4501() {
    let t = start().await;
    let (master, items, delta) = weekly_series(&t, 6).await;
    let occ: Vec<String> = occurrence_ids(&items).into_iter().collect();
    assert_eq!(occ.len(), 6);
    assert_eq!(t.delete(&occ[2]).await, StatusCode::NO_CONTENT);

    let (items, _, _) = t.round(&delta, None).await;
    assert!(removed(&items).is_empty(), "silence: {items:?}");
    let masters = of_type(&items, "seriesMaster");
    assert_eq!(masters.len(), 1, "the master is listed as changed");
    assert_eq!(masters[0]["id"], master.as_str());
    assert!(!ids(&items).contains(&occ[2]));

    // The documented profile reports the occurrence instead, and lists no master.
    let t = start_documented().await;
    let (_, items, delta) = weekly_series(&t, 6).await;
    assert!(of_type(&items, "seriesMaster").is_empty());
    assert_eq!(items[0]["subject"], "Weekly", "documented: in full");
    let third = occurrence_ids(&items).into_iter().nth(2).unwrap();
    t.delete(&third).await;
    let (items, _, _) = t.round(&delta, None).await;
    assert_eq!(removed(&items), BTreeSet::from([third]));
}

#[tokio::test]
async fn a_retimed_series_gets_new_occurrence_ids_and_the_old_ones_vanish_silently() {
    let t = start().await;
    let (master, items, delta) = weekly_series(&t, 6).await;
    let before = occurrence_ids(&items);
    let (s, _) = t
        .patch(
            &master,
            json!({"start": {"dateTime": "2026-01-05T14:00:00", "timeZone": "UTC"},
                   "end": {"dateTime": "2026-01-05T14:30:00", "timeZone": "UTC"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (items, _, _) = t.round(&delta, None).await;
    let after = occurrence_ids(&items);
    assert_eq!(after.len(), 6);
    assert!(before.is_disjoint(&after), "new ids for the new times");
    assert!(
        removed(&items).is_empty(),
        "the old ids vanish without @removed"
    );
    assert_eq!(of_type(&items, "seriesMaster").len(), 1);
    let old = before.iter().next().unwrap();
    let (s, _, b) = t.get(&t.event_url(old), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
}

#[tokio::test]
async fn a_deleted_series_reports_its_master_removed_and_its_occurrences_only_when_switched_on() {
    for lists_occurrences in [false, true] {
        let t = start_with(SimConfig {
            behaviour: Behaviour {
                removed_series_lists_occurrences: lists_occurrences,
                ..Behaviour::outlook()
            },
            ..SimConfig::default()
        })
        .await;
        let (master, items, delta) = weekly_series(&t, 4).await;
        let occ = occurrence_ids(&items);
        assert_eq!(t.delete(&master).await, StatusCode::NO_CONTENT);
        let (items, _, _) = t.round(&delta, None).await;
        let mut want = BTreeSet::from([master.clone()]);
        if lists_occurrences {
            want.extend(occ);
        }
        assert_eq!(removed(&items), want);
    }
}

#[tokio::test]
async fn instances_are_listed_in_full_paged_and_selected_and_404_once_the_series_is_gone() {
    let t = start().await;
    let cal = t.sim.lock().tenant.users[0].calendars[1].id.clone();
    let (s, series) = t
        .send(
            reqwest::Method::POST,
            &format!("{}/users/{}/calendars/{cal}/events", t.base(), t.user),
            Some(weekly(
                "Shared planning",
                "2026-01-05T09:00:00",
                "2026-01-05T10:00:00",
                7,
            )),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let master = series["id"].as_str().unwrap();
    let scoped = format!(
        "{}/users/{}/calendars/{cal}/events/{master}",
        t.base(),
        t.user
    );
    let list = format!("{scoped}/instances?startDateTime={START}&endDateTime={END}");
    let (items, _) = instances(&t, &list, 3).await;
    assert_eq!(items.len(), 7);
    assert!(items.iter().all(|i| i["subject"] == "Shared planning"));
    assert!(items.iter().all(|i| i["originalStart"].is_string()));
    assert_eq!(
        t.delete(items[3]["id"].as_str().unwrap()).await,
        StatusCode::NO_CONTENT
    );
    let (items, pages) = instances(&t, &list, 3).await;
    assert_eq!(items.len(), 6, "a cancelled occurrence is not an instance");
    assert_eq!(pages, 2);
    let (s, _, one) = t.get(&format!("{list}&$select=subject,start"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        keys(&one["value"][0]),
        ["@odata.etag", "id", "start", "subject"]
            .iter()
            .map(|k| (*k).to_owned())
            .collect()
    );
    // The calendar-scoped read of the master, with $select, as a hydrating client sends it.
    let (s, _, m) = t
        .get(&format!("{scoped}?$select=subject,organizer,type"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m["type"], "seriesMaster");
    assert_eq!(m["subject"], "Shared planning");
    assert!(m.get("body").is_none());
    assert_eq!(t.delete(master).await, StatusCode::NO_CONTENT);
    let (s, _, b) = t.get(&list, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "ErrorItemNotFound");
    let (s, _, _) = t.get(&scoped, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// Follows an `/instances` list to its end; returns the items and the page count.
async fn instances(t: &Session, first: &str, page_size: usize) -> (Vec<Value>, usize) {
    let (mut url, mut items, mut pages) = (first.to_owned(), Vec::new(), 0);
    loop {
        let (s, _, body) = t.get(&url, Some(page_size)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        pages += 1;
        items.extend(body["value"].as_array().unwrap().iter().cloned());
        match body["@odata.nextLink"].as_str() {
            Some(next) => url = next.to_owned(),
            None => return (items, pages),
        }
        assert!(pages < 100);
    }
}

#[tokio::test]
async fn every_odata_spelling_of_the_delta_function_is_routed_as_kiota_sdks_send_it() {
    let t = start().await;
    for spelling in [
        "delta",
        "delta()",
        "microsoft.graph.delta",
        "microsoft.graph.delta()",
    ] {
        let url = format!(
            "{}/users/{}/calendarView/{spelling}?startDateTime={START}&endDateTime={END}",
            t.base(),
            t.user
        );
        let (s, _, b) = t.get(&url, None).await;
        assert_eq!(s, StatusCode::OK, "{spelling}: {b}");
    }
}

#[tokio::test]
async fn an_unreadable_token_is_400_invalid_delta_token_as_reported_docs_6599() {
    let t = start().await;
    let (s, _, b) = t
        .get(
            &format!(
                "{}/users/{}/calendarView/delta?$deltatoken=forged",
                t.base(),
                t.user
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], "InvalidDeltaToken");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'$deltaToken'")
    );
}

#[tokio::test]
async fn answers_carry_request_ids_and_echo_the_clients_own() {
    let t = start().await;
    let r = t
        .http
        .get(t.delta_url())
        .bearer_auth(&t.token)
        .header("client-request-id", "5a9f466f-57ce-40a9-b6ee-2bd9ffc0a31e")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["client-request-id"],
        "5a9f466f-57ce-40a9-b6ee-2bd9ffc0a31e"
    );
    assert!(r.headers().get("request-id").is_some());
    let r = t
        .http
        .get(format!("{}/users/nobody@x/calendarView/delta", t.base()))
        .bearer_auth(&t.token)
        .header("client-request-id", "11111111-2222-3333-4444-555555555555")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    assert_eq!(
        r.headers()["client-request-id"],
        "11111111-2222-3333-4444-555555555555"
    );
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        b["error"]["innerError"]["client-request-id"],
        "11111111-2222-3333-4444-555555555555"
    );
}
