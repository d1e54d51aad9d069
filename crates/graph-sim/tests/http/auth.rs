use crate::*;

#[tokio::test]
async fn the_token_endpoint_and_bearer_checks_answer_like_azure_ad_and_graph() {
    let t = start_with(SimConfig {
        token_lifetime_secs: 60,
        ..SimConfig::default()
    })
    .await;
    let bad = token_response(&t.http, &t.server, "nope").await;
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
    let tok = t
        .admin(
            &format!("/delegated-token?user={}", t.user),
            Some(json!({})),
        )
        .await;
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
