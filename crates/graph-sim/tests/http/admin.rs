use crate::*;

#[tokio::test]
async fn the_admin_endpoint_serves_truth_log_and_counters() {
    let t = start().await;
    t.create(ev("inside", "2026-01-15T10:00:00", "2026-01-15T11:00:00"))
        .await;
    let truth = t
        .admin(
            &format!("/truth?user={}&start={START}&end={END}", t.user),
            None,
        )
        .await;
    assert_eq!(truth.as_array().unwrap().len(), 1);
    assert_eq!(truth[0]["subject"], "inside");
    let r = t
        .admin(
            "/faults",
            Some(json!({"nth": 1, "action": {"kind": "reset"}})),
        )
        .await;
    assert_eq!(r["ok"], true);
    let reqs = t.admin("/requests", None).await;
    let reqs = reqs.as_array().unwrap();
    assert!(reqs.iter().any(|r| r["status"] == 201
        && r["method"] == "POST"
        && r["mailbox"] == "11111111-1111-1111-1111-111111111111"));
    assert!(
        reqs.iter()
            .any(|r| r["path"].as_str().unwrap().ends_with("/oauth2/v2.0/token"))
    );
    let r = t
        .http
        .put(format!("{}/behaviour", t.server.admin_url()))
        .json(&json!({"profile": "documented", "bad_token_is_400": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let b = t.admin("/behaviour", None).await;
    assert_eq!(b["profile"], "documented");
    assert_eq!(b["stub_occurrences"], false);
    assert_eq!(b["bad_token_is_400"], true);
    let stats = t.admin("/stats", None).await;
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
    assert_eq!(st.behaviour, graph_sim::Behaviour::outlook());
    let bad =
        graph_sim::Scenario::from_file(std::path::Path::new("/nonexistent.toml")).unwrap_err();
    assert!(bad.to_string().contains("/nonexistent.toml"));
}
