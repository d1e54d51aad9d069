//! Delegated accounts (issue 26) against graph-sim's Entra and Graph: a user signed in by
//! device code, whose calendar is mirrored through `/me` with tokens redeemed from a refresh
//! token that rotates at every redemption (each rotation sealed in PostgreSQL first), until
//! Entra revokes the grant: then the calendar fails with the login hint and Entra is not asked
//! again until a new sign-in.

use crate::harness::*;
use calsync_engine::{AccountSettings, Engine, Health, Outcome, Tuple, TupleConfig, Vault};
use calsync_graph::{AuthConfig, CalendarRef, Credential, GraphClient};
use graph_sim::SimConfig;
use graph_sim::auth::ClientApp;
use graph_sim::delegated::Revocation;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use std::time::Duration;

/// The app registration of a consultant mirroring their own calendar: a public client.
pub const PUBLIC_APP: &str = "consultant-app";

/// 32 bytes in base64: the accounts key of these tests.
pub const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// The simulator's default app plus a public client ("Allow public client flows" on), with
/// access tokens living `lifetime_secs`.
pub fn public_app_config(lifetime_secs: i64) -> SimConfig {
    let mut public = ClientApp::with_secret(PUBLIC_APP, "a public client has no secret");
    public.allow_public_client = true;
    let mut cfg = sim_config();
    cfg.clients.push(public);
    cfg.token_lifetime_secs = lifetime_secs;
    // A manual clock, so a test can let tokens expire.
    cfg.clock_start = Some(chrono::Utc::now());
    cfg
}

fn public_auth(h: &Harness) -> AuthConfig {
    AuthConfig {
        client_id: PUBLIC_APP.into(),
        credential: Credential::Public,
        ..h.auth()
    }
}

/// Signs `account` in as `user` the way `calsync login` does: the device code, the user's
/// approval (the admin call a browser stands for), the poll, `/me`; its token sealed.
async fn login(h: &Harness, auth: &AuthConfig, vault: &Vault, account: &str, user: &str) {
    let graph = GraphClient::new(h.graph_config(), auth.clone()).unwrap();
    let device = graph.start_device_login(auth).await.unwrap();
    assert!(device.instructions().contains(device.user_code()));
    assert!(h.sim.lock().approve_device_code(device.user_code(), user));
    let signed = graph.finish_device_login(auth, &device).await.unwrap();
    let sealed = vault.seal(account, &signed.refresh).unwrap();
    h.store
        .save_login(account, &signed.user_id, &signed.user_principal, &sealed)
        .await
        .unwrap();
}

fn engine_for(h: &Harness, auth: &AuthConfig, vault: &Vault) -> Engine {
    let engine = Engine::new(
        GraphClient::new(h.graph_config(), auth.clone()).unwrap(),
        h.store.clone(),
        settings(),
    );
    engine.with_accounts(AccountSettings {
        auth: auth.clone(),
        vault: Some(vault.clone()),
    });
    engine
}

async fn account_tuple(engine: &Engine, account: &str, user: &str) -> Tuple {
    engine
        .register(&[TupleConfig {
            key: format!("{account}-calendar"),
            user: user.into(),
            account: Some(account.into()),
            calendar: CalendarRef::Default,
            window: window(),
            rolling: None,
            schedule: None,
            interval: Some(Duration::from_secs(1)),
        }])
        .await
        .unwrap()
        .remove(0)
}

fn token_requests(h: &Harness) -> usize {
    h.sim
        .lock()
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/oauth2/v2.0/token"))
        .count()
}

/// Issue 26, done when: "a delegated account logged in by device code whose calendar is
/// mirrored through `/me`, rotated across many refreshes, then revoked (tuple failed with the
/// login hint, no hammering)". Refresh tokens rotate at every redemption (Microsoft Learn,
/// "Refresh tokens in the Microsoft identity platform"); a password change revokes them
/// (AADSTS50173, invalid_grant).
#[sqlx::test(migrations = false)]
async fn an_account_signed_in_by_device_code_mirrors_me_rotates_and_fails_when_revoked(
    pool: PgPool,
) {
    let h = harness_with(pool, 10, public_app_config(600)).await;
    seed(&h, 7);
    let auth = public_auth(&h);
    let vault = Vault::from_file_content("accounts.key", KEY.as_bytes(), "default").unwrap();
    login(&h, &auth, &vault, "adele", USER).await;
    let engine = engine_for(&h, &auth, &vault);
    let t = account_tuple(&engine, "adele", USER).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    // Every Graph request went to /me, none to /users/…, and none was batched.
    let paths: Vec<String> = h
        .sim
        .lock()
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .filter(|p| p.starts_with("/v1.0"))
        .collect();
    assert!(!paths.is_empty());
    assert!(
        paths
            .iter()
            .all(|p| p == "/v1.0/me" || p.starts_with("/v1.0/me/")),
        "{paths:?}"
    );
    let link = h.store.load(t.id).await.unwrap().link.unwrap();
    assert!(link.contains("/me/calendarView/delta"), "{link}");

    // Many refreshes: each access token expires (the simulator's clock moves 11 minutes), so
    // each round redeems the refresh token once, and each rotation is saved before use.
    let first = h.store.account("adele").await.unwrap().unwrap();
    for i in 0..12 {
        h.create(single(
            &format!("after refresh {i}"),
            "2026-01-20T09:00:00Z",
            "2026-01-20T10:00:00Z",
        ));
        h.sim.clock().advance(chrono::Duration::minutes(11));
        report(sync(&engine, &t).await);
        h.assert_mirrors(std::slice::from_ref(&t)).await;
    }
    let rotated = h.store.account("adele").await.unwrap().unwrap();
    assert_eq!(
        rotated.version,
        first.version + 12,
        "one rotation per refresh"
    );
    assert_ne!(rotated.token, first.token);
    let redeemed = h.sim.lock().auth.delegated.refresh_redeemed;
    assert_eq!(
        redeemed, 13,
        "the first round's redemption and one per refresh"
    );
    // The stored token is the newest one Entra issued: it opens to it.
    let newest = h
        .sim
        .lock()
        .auth
        .delegated
        .issued_refresh_tokens()
        .pop()
        .unwrap();
    assert_eq!(
        vault.open("adele", &rotated.token).unwrap().expose_secret(),
        newest
    );

    // The user changes their password: the next refresh is refused (AADSTS50173), the tuple
    // fails with the login hint, the account is marked revoked.
    {
        let mut st = h.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        st.auth.delegated.revoke(u, Revocation::PasswordChanged);
    }
    h.sim.clock().advance(chrono::Duration::minutes(11));
    let failed = match sync(&engine, &t).await {
        Outcome::Failed(f) => f,
        other => panic!("expected the account to fail, got {other:?}"),
    };
    assert_eq!(failed.health, Health::Failed);
    assert_eq!(failed.code, "SignInRequired");
    assert!(
        failed.message.contains("run `calsync login adele`"),
        "{}",
        failed.message
    );
    assert!(failed.message.contains("AADSTS50173"), "{}", failed.message);
    let revoked = h.store.account("adele").await.unwrap().unwrap();
    assert!(revoked.revoked.unwrap().contains("AADSTS50173"));
    // No hammering: rounds of the failed tuple (and a fresh process) ask Entra nothing.
    let asked = token_requests(&h);
    for _ in 0..5 {
        assert!(matches!(sync(&engine, &t).await, Outcome::Failed(_)));
    }
    let restarted = engine_for(&h, &auth, &vault);
    assert!(matches!(sync(&restarted, &t).await, Outcome::Failed(_)));
    assert_eq!(
        token_requests(&h),
        asked,
        "Entra asked again after revocation"
    );

    // A new sign-in mends it, without a restart.
    login(&h, &auth, &vault, "adele", USER).await;
    h.create(single(
        "after the new sign-in",
        "2026-01-21T09:00:00Z",
        "2026-01-21T10:00:00Z",
    ));
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
}

/// An account reads only its own mailbox: signed in as another user than its calendar names,
/// the calendar fails naming both, before any Graph read. One that never signed in fails with
/// the login hint. A link saved for the app's tokens is not replayed with the account's: the
/// calendar's round starts afresh on `/me`.
#[sqlx::test(migrations = false)]
async fn an_account_signed_in_as_someone_else_or_not_at_all_fails_with_what_to_do(pool: PgPool) {
    let h = harness_with(pool, 10, public_app_config(3600)).await;
    seed(&h, 3);
    let auth = public_auth(&h);
    let vault = Vault::from_file_content("accounts.key", KEY.as_bytes(), "default").unwrap();
    let engine = engine_for(&h, &auth, &vault);
    let t = account_tuple(&engine, "adele", USER).await;
    let never = match sync(&engine, &t).await {
        Outcome::Failed(f) => f.message,
        other => panic!("{other:?}"),
    };
    assert!(never.contains("run `calsync login adele`"), "{never}");
    assert!(never.contains("has not signed in"), "{never}");

    login(&h, &auth, &vault, "adele", "alex@contoso.onmicrosoft.com").await;
    let reads = h.sim.lock().requests().len();
    let wrong = match sync(&engine, &t).await {
        Outcome::Failed(f) => f.message,
        other => panic!("{other:?}"),
    };
    assert!(
        wrong.contains("alex@contoso.onmicrosoft.com") && wrong.contains(USER),
        "{wrong}"
    );
    assert_eq!(h.sim.lock().requests().len(), reads, "nothing was read");

    // The same calendar synced first with the app's token, then given the account.
    let app = h.engine(settings());
    let by_app = h.default_tuple(&app).await;
    report(sync(&app, &by_app).await);
    login(&h, &auth, &vault, "adele", USER).await;
    let engine = engine_for(&h, &auth, &vault);
    let t = engine
        .register(&[TupleConfig {
            account: Some("adele".into()),
            ..by_app.config()
        }])
        .await
        .unwrap()
        .remove(0);
    let r = report(sync(&engine, &t).await);
    assert!(
        r.full,
        "a /users link is not replayed with a delegated token"
    );
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert!(
        h.store
            .load(t.id)
            .await
            .unwrap()
            .link
            .unwrap()
            .contains("/me/")
    );
}
