use crate::*;

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
    let err = t.raw_delta().await;
    assert!(err.is_err(), "connection reset");
    t.sim.lock().faults = vec![rule(json!({"nth": 1, "action": {"kind": "truncate"}}))];
    let r = t.raw_delta().await.unwrap();
    assert!(r.bytes().await.is_err(), "body cut off");
    t.sim.lock().faults = vec![rule(
        json!({"nth": 1, "action": {"kind": "malformed_json"}}),
    )];
    let r = t.raw_delta().await.unwrap();
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
