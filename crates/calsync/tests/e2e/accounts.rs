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

/// A key rotation (accounts.previous_key_files): with the new key current and the old one
/// kept, the token sealed with the old key opens, and the next token rotation seals it with
/// the new one; from then on the old key is not needed, and the old key alone no longer opens
/// it (the error names both keys).
#[sqlx::test(migrations = false)]
async fn a_key_rotation_reseals_each_account_at_its_next_token_rotation(pool: PgPool) {
    let h = harness_with(pool, 10, public_app_config(600)).await;
    seed(&h, 3);
    let auth = public_auth(&h);
    let old = Vault::from_file_content("old.key", KEY.as_bytes(), "default").unwrap();
    login(&h, &auth, &old, "adele", USER).await;
    let new_key = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let rotated = Vault::from_file_content("new.key", new_key.as_bytes(), "default")
        .unwrap()
        .with_previous("old.key", KEY.as_bytes())
        .unwrap();
    let engine = engine_for(&h, &auth, &rotated);
    let t = account_tuple(&engine, "adele", USER).await;
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    let a = h.store.account("adele").await.unwrap().unwrap();
    assert_eq!(
        a.token.key_id,
        rotated.key_id(),
        "sealed again with the new key"
    );
    let only_new = Vault::from_file_content("new.key", new_key.as_bytes(), "default").unwrap();
    h.sim.clock().advance(chrono::Duration::minutes(11));
    report(sync(&engine_for(&h, &auth, &only_new), &t).await);
    let stale = match sync(&engine_for(&h, &auth, &old), &t).await {
        Outcome::Failed(f) => f.message,
        other => panic!("{other:?}"),
    };
    assert!(
        stale.contains(only_new.key_id()) && stale.contains(old.key_id()),
        "{stale}"
    );
}

/// An account reads only its own mailbox: signed in as another user than its calendar names,
/// the calendar fails naming both, before any Graph read. One that never signed in fails with
/// the login hint. A `/me` link is never replayed with the app's token: the calendar's round
/// starts afresh; the app's `/users` link of the user's own mailbox serves the account.
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

    // The same calendar read through the account, then with the app's token: the saved /me
    // link cannot serve the app (Graph refuses /me to an app-only token), so its round starts
    // afresh; given back to the account, the /users link is replayed with the delegated
    // token (Graph serves the user's own mailbox either way).
    login(&h, &auth, &vault, "adele", USER).await;
    let engine = engine_for(&h, &auth, &vault);
    let t = account_tuple(&engine, "adele", USER).await;
    report(sync(&engine, &t).await);
    let link = |t: &Tuple| {
        let store = h.store.clone();
        let id = t.id;
        async move { store.load(id).await.unwrap().link.unwrap() }
    };
    assert!(link(&t).await.contains("/me/"));
    let app = h.engine(settings());
    let by_app = app
        .register(&[TupleConfig {
            account: None,
            ..t.config()
        }])
        .await
        .unwrap()
        .remove(0);
    let r = report(sync(&app, &by_app).await);
    assert!(r.full, "a /me link is not replayed with the app's token");
    h.assert_mirrors(std::slice::from_ref(&by_app)).await;
    assert!(link(&by_app).await.contains("/users/"));
    let engine = engine_for(&h, &auth, &vault);
    let again = engine
        .register(&[TupleConfig {
            account: Some("adele".into()),
            ..by_app.config()
        }])
        .await
        .unwrap()
        .remove(0);
    let r = report(sync(&engine, &again).await);
    assert!(!r.full, "the user's own /users link serves the account");
    h.assert_mirrors(std::slice::from_ref(&again)).await;
}

/// Issue 26 through the real binary: `calsync login` prints Entra's message with the code and
/// waits; the user approves; `sync-once` mirrors the account's calendar (each process redeems
/// and rotates the refresh token); after a password change `sync-once` fails naming
/// `calsync login adele`, and `accounts` and `status` say so. At trace level, no refresh or
/// access token, nor the accounts key, appears in anything printed, in any text column, or in
/// the clear in any binary column: the refresh token exists only sealed.
#[tokio::test(flavor = "multi_thread")]
async fn login_sync_and_revocation_through_the_binary_leak_no_token_or_key() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_account_secrets")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sim = graph_sim::Sim::new(&public_app_config(3600));
    {
        let mut st = sim.lock();
        let u = st.tenant.add_user(USER, None, "Adele Vance");
        for d in 10..20 {
            let p = graph_sim::writes::EventPatch::from_json(&serde_json::json!({
                "subject": format!("e{d}"),
                "start": {"dateTime": format!("2026-01-{d}T10:00:00"), "timeZone": "UTC"},
                "end": {"dateTime": format!("2026-01-{d}T11:00:00"), "timeZone": "UTC"}}))
            .unwrap();
            st.tenant.create_event(u, 0, &p).unwrap();
        }
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let key_file = dir.path().join("accounts.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let config = format!(
        "[database]\nurl = \"{url}\"\n[graph]\nbase_url = \"{}\"\n[auth]\nkind = \"public_client\"\ntoken_url = \"{}\"\nclient_id = \"{PUBLIC_APP}\"\n[sync]\npage_size = 3\n[accounts]\nkey_file = \"{}\"\n\n[[calendars]]\nname = \"adele-own\"\naccount = \"adele\"\nuser = \"{USER}\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n",
        server.graph_base_url(),
        server.token_url(graph_sim::DEFAULT_TENANT),
        key_file.display()
    );
    let file = dir.path().join("calsync.toml");
    std::fs::write(&file, &config).unwrap();
    let run = |args: &[&str]| run_traced(&file, args);
    let mut printed = String::new();

    // calsync login: the message and code are printed, then it waits for the user.
    printed.push_str(&login_through_binary(&file, &sim).await);

    for _ in 0..3 {
        let (code, out) = run(&["sync-once"]);
        assert_eq!(code, Some(0), "{out}");
        printed.push_str(&out);
    }
    let (_, listed) = run(&["accounts"]);
    assert!(
        listed.contains("adele") && listed.contains(" ok "),
        "{listed}"
    );
    printed.push_str(&listed);
    printed.push_str(&run(&["accounts", "--json"]).1);
    printed.push_str(&run(&["config", "check"]).1);
    assert!(
        printed.contains("accounts: sealed with key"),
        "config check names the key id"
    );

    {
        let mut st = sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        st.auth.delegated.revoke(u, Revocation::PasswordChanged);
    }
    let (code, out) = run(&["sync-once"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("run `calsync login adele`"), "{out}");
    printed.push_str(&out);
    let (_, listed) = run(&["accounts"]);
    assert!(
        listed.contains("revoked") && listed.contains("AADSTS50173"),
        "{listed}"
    );
    printed.push_str(&listed);
    let (_, status) = run(&["status"]);
    assert!(status.contains("calsync login adele"), "{status}");
    printed.push_str(&status);
    assert!(printed.contains("TRACE"), "trace level was on");

    let (refresh, access) = {
        let st = sim.lock();
        (
            st.auth.delegated.issued_refresh_tokens(),
            st.auth.minted_tokens(),
        )
    };
    assert!(
        refresh.len() >= 4,
        "refresh tokens issued: {}",
        refresh.len()
    );
    let mut secrets: Vec<String> = vec![KEY.to_owned()];
    secrets.extend(refresh.iter().cloned());
    secrets.extend(access.iter().cloned());
    assert_not_printed(&printed, &secrets);
    let columns = assert_no_column_holds(&url, &secrets).await;
    assert!(
        columns
            .iter()
            .any(|(t, c)| t == "accounts" && c == "token_sealed")
    );
    let (code, out) = run(&["logout", "adele"]);
    assert_eq!(code, Some(0), "{out}");
    let (_, listed) = run(&["accounts"]);
    assert!(listed.contains("no account has signed in"), "{listed}");
    server.stop().await;
}

/// `calsync login adele` as a child process at trace level: reads the code it prints, approves
/// it as the user would in a browser, and answers everything it printed.
async fn login_through_binary(file: &std::path::Path, sim: &graph_sim::Sim) -> String {
    use std::io::BufRead;
    let mut child = std::process::Command::new(BIN)
        .args(["login", "adele", "--config"])
        .arg(file)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|r| {
        let out = out.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(r).lines() {
                let line = line.unwrap_or_default();
                out.lock().unwrap().push_str(&format!("{line}\n"));
            }
        })
    })
    .collect();
    let code_of = |s: &str| {
        s.split("enter the code ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned)
    };
    wait_for("the login's code", Duration::from_secs(20), async || {
        code_of(&out.lock().unwrap()).is_some()
    })
    .await;
    let code = code_of(&out.lock().unwrap()).unwrap();
    assert!(sim.lock().approve_device_code(&code, USER));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    for r in readers {
        r.join().unwrap();
    }
    let login_out = out.lock().unwrap().clone();
    assert!(status.success(), "{login_out}");
    assert!(
        login_out.contains(&format!("signed in as {USER}")),
        "{login_out}"
    );
    login_out
}

/// Issue 26 with push (the freshness the daemon exists for): a calendar read through a
/// delegated account is subscribed by the account on `/me/calendar/events` (Microsoft Learn,
/// "subscription resource type"), and an edit reaches the read model in seconds although the
/// poll interval is ten minutes; with a public client, which has no app-only token at all.
#[tokio::test(flavor = "multi_thread")]
async fn an_account_calendar_is_pushed_by_the_account_in_seconds() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_account_push")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sim = graph_sim::Sim::new(&public_app_config(3600));
    {
        let mut st = sim.lock();
        let u = st.tenant.add_user(USER, None, "Adele Vance");
        crate::replicas::add_event(&mut st.tenant, u, 0, "before", "2026-02-10T09:00:00");
        st.push.settings.delay_ms = 100;
        st.push.settings.jitter_ms = 200;
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key_file = dir.path().join("accounts.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let file = dir.path().join("calsync.toml");
    std::fs::write(
        &file,
        format!(
            "[database]\nurl = \"{url}\"\n[graph]\nbase_url = \"{}\"\n[auth]\nkind = \"public_client\"\ntoken_url = \"{}\"\nclient_id = \"{PUBLIC_APP}\"\n[sync]\ninterval = \"10m\"\nstartup_spread = \"200ms\"\n[accounts]\nkey_file = \"{}\"\n[push]\nnotification_url = \"http://127.0.0.1:{port}/graph\"\nlisten = \"127.0.0.1:{port}\"\nlifetime = \"45m\"\nrenew_before = \"10m\"\nbackstop_interval = \"30m\"\n\n[[calendars]]\nname = \"adele-own\"\naccount = \"adele\"\nuser = \"{USER}\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n",
            server.graph_base_url(),
            server.token_url(graph_sim::DEFAULT_TENANT),
            key_file.display()
        ),
    )
    .unwrap();
    login_through_binary(&file, &sim).await;
    let mut node = crate::replicas::Node::start(&file, dir.path().join("run.log"));
    wait_for(
        "the account's subscription",
        Duration::from_secs(30),
        async || {
            sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM push_subscriptions WHERE state = 'active' AND account = 'adele'",
        )
        .fetch_one(&db)
        .await
        .unwrap_or(0)
            == 1
        },
    )
    .await;
    wait_for("the first round", Duration::from_secs(20), async || {
        crate::replicas::all_ok(&db, "default", 1).await
    })
    .await;
    let resources: Vec<String> = sim
        .lock()
        .push
        .subscriptions
        .values()
        .map(|s| s.resource.clone())
        .collect();
    assert_eq!(resources, ["/me/calendar/events"]);
    {
        let mut st = sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        crate::replicas::add_event(&mut st.tenant, u, 0, "pushed", "2026-02-20T09:00:00");
    }
    let started = std::time::Instant::now();
    wait_for("the pushed edit", Duration::from_secs(15), async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM calendar_events WHERE subject = 'pushed'",
        )
        .fetch_one(&db)
        .await
        .unwrap_or(0)
            > 0
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    node.stop();
    db.close().await;
    server.stop().await;
}
