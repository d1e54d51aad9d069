use crate::*;

#[tokio::test]
async fn delta_pages_and_events_have_the_shape_of_microsofts_payloads() {
    let t = start_documented().await;
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
        // v1.0's physicalAddress has no `type` (the official SDK run saw the beta shape).
        full["location"]["address"]
            .as_object_mut()
            .unwrap()
            .remove("type");
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
    let (s, _, master) = t.get(&t.event_url(master_id), None).await;
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
    assert_eq!(t.delete(&single).await, StatusCode::NO_CONTENT);
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
    let t = start_documented().await;
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
