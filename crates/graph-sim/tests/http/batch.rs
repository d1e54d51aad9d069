//! `POST /$batch` as Microsoft Learn's "JSON batching" and Outlook's batch limits describe it.

use crate::*;

impl Session {
    async fn batch(&self, body: Value) -> (StatusCode, Value) {
        self.send(
            reqwest::Method::POST,
            &format!("{}/$batch", self.base()),
            Some(body),
        )
        .await
    }

    /// The delta URL relative to the version root, as a request of a batch names it.
    fn relative_delta(&self) -> String {
        self.delta_url()
            .strip_prefix(&self.base())
            .unwrap()
            .to_owned()
    }
}

fn by_id(answer: &Value) -> BTreeMap<String, Value> {
    answer["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

#[tokio::test]
async fn a_batch_answers_each_request_on_its_own_with_its_own_headers_json_batching_docs() {
    let t = start().await;
    for i in 0..5 {
        t.create(ev(
            &format!("e{i}"),
            "2026-01-12T09:00:00",
            "2026-01-12T10:00:00",
        ))
        .await;
    }
    let (s, answer) = t
        .batch(json!({"requests": [
            {"id": "a", "method": "GET", "url": t.relative_delta(),
             "headers": {"Prefer": "odata.maxpagesize=2"}},
            {"id": "b", "method": "GET", "url": "/users/nobody@contoso.onmicrosoft.com/calendarView/delta?startDateTime=2026-01-01T00:00:00Z&endDateTime=2026-03-01T00:00:00Z"},
            {"id": "c", "method": "GET", "url": t.delta_url()},
        ]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let r = by_id(&answer);
    assert_eq!(r.len(), 3);
    // The request's own Prefer is honoured; its links are absolute, on the origin asked.
    assert_eq!(r["a"]["status"], 200);
    assert_eq!(r["a"]["body"]["value"].as_array().unwrap().len(), 2);
    let next = r["a"]["body"]["@odata.nextLink"].as_str().unwrap();
    assert!(next.starts_with(&t.base()), "{next}");
    assert!(r["a"]["headers"]["Content-Type"].is_string());
    assert_eq!(r["b"]["status"], 404);
    assert_eq!(r["b"]["body"]["error"]["code"], "ErrorInvalidUser");
    // Absolute URLs are refused inside a batch (known issue; microsoft-graph-docs#6535).
    assert_eq!(r["c"]["status"], 400);
    // The requests inside count as requests, each logged with its mailbox; the batch does not.
    let log: Vec<_> = t
        .sim
        .lock()
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("calendarView"))
        .collect();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log.iter().any(|l| l.mailbox.is_some() && l.status == 200));
    assert_eq!(t.sim.lock().stats().batches, 1);
    // The nextLink of a batched page is followed like any other.
    let (items, _, _) = t.round(next, Some(2)).await;
    assert_eq!(items.len(), 3);
}

#[tokio::test]
async fn a_batch_of_more_than_20_or_with_repeated_ids_or_without_a_token_is_refused() {
    let t = start().await;
    let get = |id: usize| json!({"id": id.to_string(), "method": "GET", "url": t.relative_delta()});
    let (s, body) = t
        .batch(json!({"requests": (1..=21).map(get).collect::<Vec<_>>()}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // The message production reports (microsoftgraph-postman-collections#9).
    assert_eq!(
        body["error"]["message"],
        "Number of requests inside batch exceeds the limit."
    );
    let (s, _) = t.batch(json!({"requests": [get(1), get(1)]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t.batch(json!({"requests": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let r = t
        .http
        .post(format!("{}/$batch", t.base()))
        .json(&json!({"requests": [get(1)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        t.sim
            .lock()
            .requests()
            .iter()
            .all(|r| !r.path.contains("calendarView")),
        "nothing ran"
    );
    let (s, answer) = t
        .batch(json!({"requests": (1..=20).map(get).collect::<Vec<_>>()}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(by_id(&answer).len(), 20);
}

/// Graph sends at most 4 requests of a batch at a time to Outlook (Outlook service limits for
/// JSON batching), so a batch alone stays within a mailbox's 4; but requests of a batch count
/// against the mailbox like any other, and those over the limit come back 429 with their own
/// Retry-After inside a 200 batch (json-batching "Throttling"; docs#2886 saw 4–6 of 20 fail).
#[tokio::test]
async fn outlook_runs_four_of_a_batch_at_a_time_and_throttles_each_request_on_its_own() {
    let t = start().await;
    t.sim
        .lock()
        .faults
        .push(serde_json::from_value(json!({"action": {"kind": "delay", "ms": 150}})).unwrap());
    let get = |id: usize| json!({"id": id.to_string(), "method": "GET", "url": t.relative_delta()});
    let started = std::time::Instant::now();
    let (s, answer) = t
        .batch(json!({"requests": (1..=8).map(get).collect::<Vec<_>>()}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(by_id(&answer).values().all(|r| r["status"] == 200));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "two waves of four"
    );
    let v = t.sim.lock().violations();
    assert_eq!((v.max_in_flight, v.concurrency), (4, 0));

    // Two requests of someone else are already in flight to the mailbox.
    let mut direct = Vec::new();
    for _ in 0..2 {
        let (http, url, tok) = (t.http.clone(), t.delta_url(), t.token.clone());
        direct.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(tok)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (s, answer) = t
        .batch(json!({"requests": (1..=4).map(get).collect::<Vec<_>>()}))
        .await;
    assert_eq!(s, StatusCode::OK, "the batch itself is fine");
    let throttled: Vec<Value> = by_id(&answer)
        .into_values()
        .filter(|r| r["status"] == 429)
        .collect();
    assert_eq!(throttled.len(), 2, "{answer}");
    for r in &throttled {
        assert_eq!(r["body"]["error"]["code"], "ApplicationThrottled");
        assert!(r["headers"]["Retry-After"].is_string(), "{r}");
    }
    for d in direct {
        assert_eq!(d.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn depends_on_runs_requests_one_at_a_time_and_a_failed_dependency_answers_424() {
    let t = start().await;
    let (s, answer) = t
        .batch(json!({"requests": [
            {"id": "1", "method": "POST", "url": format!("/users/{}/events", t.user),
             "headers": {"Content-Type": "application/json"},
             "body": ev("made in a batch", "2026-01-13T09:00:00", "2026-01-13T10:00:00")},
            {"id": "2", "method": "GET", "url": "/users/nobody@contoso.onmicrosoft.com/events/x", "dependsOn": ["1"]},
            {"id": "3", "method": "GET", "url": t.relative_delta(), "dependsOn": ["2"]},
        ]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let r = by_id(&answer);
    assert_eq!(r["1"]["status"], 201);
    assert_eq!(r["2"]["status"], 404);
    assert_eq!(r["3"]["status"], 424);
    let (items, _, _) = t.round(&t.delta_url(), None).await;
    assert!(items.iter().any(|i| i["subject"] == "made in a batch"));
    let (s, _) = t
        .batch(json!({"requests": [{"id": "1", "method": "GET", "url": t.relative_delta(), "dependsOn": ["9"]}]}))
        .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "a dependency must be in the batch"
    );
}
