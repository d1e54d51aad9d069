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
    // The delegated user's own mailbox by id, yes; another user's unshared calendar, 403
    // ErrorAccessDenied (Microsoft Learn, "Get shared or delegated Outlook calendar events").
    for (user, status) in [
        ("11111111-1111-1111-1111-111111111111", StatusCode::OK),
        ("alex@contoso.onmicrosoft.com", StatusCode::FORBIDDEN),
    ] {
        let r = t
            .http
            .get(format!(
                "{}/users/{user}/calendarView/delta?startDateTime={START}&endDateTime={END}",
                t.base()
            ))
            .bearer_auth(tok["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{user}");
        if status == StatusCode::FORBIDDEN {
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["error"]["code"], "ErrorAccessDenied");
        }
    }
}

/// Issue 26 (Microsoft Learn, device authorization grant; refresh tokens): a public client
/// signs a user in by device code (pending until the user approves it), reads `/me` with the
/// delegated token, rotates its refresh token (the old one still works), and is refused with
/// `invalid_grant` AADSTS50173 once the user's password changed. Without "Allow public client
/// flows" the same grant needs a credential (AADSTS7000218).
#[tokio::test]
async fn a_device_code_sign_in_gives_me_tokens_that_rotate_and_are_revoked() {
    let mut app = graph_sim::auth::ClientApp::with_secret("public-app", "unused");
    app.allow_public_client = true;
    let mut closed = graph_sim::auth::ClientApp::with_secret("confidential-app", "s");
    closed.allow_public_client = false;
    let t = start_with(SimConfig {
        clients: vec![
            graph_sim::auth::ClientApp::with_secret(
                graph_sim::DEFAULT_CLIENT_ID,
                graph_sim::DEFAULT_CLIENT_SECRET,
            ),
            app,
            closed,
        ],
        ..SimConfig::default()
    })
    .await;
    let tenant_url = |what: &str| {
        t.server
            .token_url(graph_sim::DEFAULT_TENANT)
            .replace("/token", &format!("/{what}"))
    };
    let post = |url: String, form: Vec<(&'static str, String)>| {
        let http = t.http.clone();
        async move {
            let r = http.post(url).form(&form).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let scope = "offline_access https://graph.microsoft.com/Calendars.Read".to_owned();
    let (s, code) = post(
        tenant_url("devicecode"),
        vec![("client_id", "public-app".into()), ("scope", scope.clone())],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{code}");
    let device = code["device_code"].as_str().unwrap().to_owned();
    let poll = || {
        post(
            tenant_url("token"),
            vec![
                ("grant_type", graph_sim::delegated::DEVICE_CODE_GRANT.into()),
                ("client_id", "public-app".into()),
                ("device_code", device.clone()),
            ],
        )
    };
    let (s, pending) = poll().await;
    assert_eq!(
        (s, pending["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("authorization_pending"))
    );
    assert!(
        t.sim
            .lock()
            .approve_device_code(code["user_code"].as_str().unwrap(), &t.user)
    );
    let (s, tokens) = poll().await;
    assert_eq!(s, StatusCode::OK, "{tokens}");
    let me = format!(
        "{}/me/calendar/calendarView/delta?startDateTime={START}&endDateTime={END}",
        t.base()
    );
    let read = |token: String| {
        let (http, me) = (t.http.clone(), me.clone());
        async move {
            http.get(me)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        read(tokens["access_token"].as_str().unwrap().into()).await,
        StatusCode::OK
    );

    let refresh = |rt: String| {
        post(
            tenant_url("token"),
            vec![
                ("grant_type", "refresh_token".into()),
                ("client_id", "public-app".into()),
                ("refresh_token", rt),
                ("scope", scope.clone()),
            ],
        )
    };
    let first = tokens["refresh_token"].as_str().unwrap().to_owned();
    let (s, rotated) = refresh(first.clone()).await;
    assert_eq!(s, StatusCode::OK);
    let second = rotated["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second, "rotated on use");
    assert_eq!(
        refresh(first).await.0,
        StatusCode::OK,
        "the previous one still works"
    );
    assert_eq!(
        read(rotated["access_token"].as_str().unwrap().into()).await,
        StatusCode::OK
    );

    // The admin call a standalone user makes for "the user changed their password".
    t.admin(
        &format!("/refresh-tokens/revoke?user={}&why=password", t.user),
        Some(json!({})),
    )
    .await;
    let (s, revoked) = refresh(second).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(revoked["error"], "invalid_grant");
    assert!(
        revoked["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS50173"),
        "{revoked}"
    );

    let (_, code) = post(
        tenant_url("devicecode"),
        vec![
            ("client_id", "confidential-app".into()),
            ("scope", scope.clone()),
        ],
    )
    .await;
    let (s, needs) = post(
        tenant_url("token"),
        vec![
            ("grant_type", graph_sim::delegated::DEVICE_CODE_GRANT.into()),
            ("client_id", "confidential-app".into()),
            ("device_code", code["device_code"].as_str().unwrap().into()),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        needs["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000218"),
        "{needs}"
    );
}
