use crate::*;

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
