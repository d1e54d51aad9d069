//! The real `calsync` binary as a user runs it: exit codes, messages, output.

use crate::harness::{BIN, config_file, database_url};
use std::io::Write;
use std::process::{Command, Output};

const SECRET: &str = "s3cr3t-Value-that-must-not-leak";

fn run(args: &[&str], config: &str, env: &[(&str, &str)]) -> Output {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(config.as_bytes()).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--config")
        .arg(f.path())
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn valid(db: &str, graph: &str, token: &str, calendars: &str) -> String {
    config_file(
        db,
        graph,
        token,
        &format!("[sync]\ninterval = \"5m\"\npage_size = 50\n\n{calendars}"),
    )
}

const ONE_CALENDAR: &str = r#"
[[calendars]]
user = "adele@contoso.onmicrosoft.com"
calendar = "default"
start = "2026-01-01T00:00:00Z"
end = "2026-04-01T00:00:00Z"
"#;

fn base_config() -> String {
    valid(
        "postgres://calsync:pw@127.0.0.1:1/none",
        "https://graph.microsoft.com/v1.0",
        "https://login.microsoftonline.com/t/oauth2/v2.0/token",
        ONE_CALENDAR,
    )
}

#[test]
fn invalid_configs_exit_2_and_name_the_key() {
    let base = base_config();
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            base.replace("interval = \"5m\"", "interval = \"5 parsecs\""),
            vec![],
            "sync.interval",
        ),
        (
            base.replace("interval = \"5m\"", "intervall = \"5m\""),
            vec![],
            "intervall",
        ),
        (
            base.replace("page_size = 50", "page_size = 0"),
            vec![],
            "sync.page_size",
        ),
        (
            base.clone(),
            vec![("CALSYNC_SYNC__PAGE_SIZE", "0")],
            "sync.page_size",
        ),
        (
            // Plain http to a host that is not loopback: the client secret would go in clear.
            base.replace(
                "https://login.microsoftonline.com",
                "http://login.microsoftonline.com",
            ),
            vec![],
            "auth.token_url",
        ),
        (
            base.clone(),
            vec![("CALSYNC_SYNC__PER_MAILBOX_CONCURRENCY", "9")],
            "sync.per_mailbox_concurrency",
        ),
        (
            base.replace(
                "start = \"2026-01-01T00:00:00Z\"",
                "start = \"last tuesday\"",
            ),
            vec![],
            "calendars[0].start",
        ),
        (
            base.replace(
                "end = \"2026-04-01T00:00:00Z\"",
                "end = \"2025-04-01T00:00:00Z\"",
            ),
            vec![],
            "calendars[0].end",
        ),
        (format!("{base}{ONE_CALENDAR}"), vec![], "calendars[1].name"),
        (
            base.replace(
                &format!("client_secret = \"{}\"", graph_sim::DEFAULT_CLIENT_SECRET),
                "",
            ),
            vec![],
            "auth.client_secret",
        ),
        (
            base.replace("postgres://calsync:pw@127.0.0.1:1/none", "mysql://x@y/z"),
            vec![],
            "database.url",
        ),
        (
            base.replace("https://graph.microsoft.com/v1.0", "graph.microsoft.com"),
            vec![],
            "graph.base_url",
        ),
        (base.replace(ONE_CALENDAR, ""), vec![], "calendars"),
        (
            base.replace("calendar = \"default\"", "calendar = \"\""),
            vec![],
            "calendars[0].calendar",
        ),
        (
            format!("{base}\n[changes]\nretention = \"5m\"\n"),
            vec![],
            "changes.retention",
        ),
        (
            format!("{base}\n[[sinks]]\nname = \"crm\"\nurl = \"https://crm.example.com/hook\"\n"),
            vec![],
            "sinks[0].secret_file",
        ),
        (
            // The signed changes would travel in clear.
            format!("{base}\n[[sinks]]\nname = \"crm\"\nurl = \"http://crm.example.com/hook\"\n"),
            vec![],
            "sinks[0].url",
        ),
        (
            format!(
                "{base}\n[[sinks]]\nname = \"c r m\"\nurl = \"https://crm.example.com/hook\"\n"
            ),
            vec![],
            "sinks[0].name",
        ),
    ];
    for (cfg, env, key) in cases {
        for cmd in [&["config", "check"][..], &["sync-once"][..], &["run"][..]] {
            let o = run(cmd, &cfg, &env);
            let out = text(&o);
            assert_eq!(o.status.code(), Some(2), "{cmd:?} for {key}: {out}");
            assert!(
                out.contains(key),
                "{cmd:?}: message should name {key}: {out}"
            );
            assert!(!out.contains("panicked"), "{out}");
        }
    }
    let o = Command::new(BIN)
        .args(["config", "check", "--config", "/nonexistent/calsync.toml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("/nonexistent/calsync.toml"));
}

#[tokio::test]
async fn an_invalid_config_writes_nothing_to_the_database() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_cli_invalid")
        .await
        .unwrap();
    let cfg = valid(
        &url,
        "https://graph.microsoft.com/v1.0",
        "https://login.microsoftonline.com/t/oauth2/v2.0/token",
        ONE_CALENDAR,
    )
    .replace("interval = \"5m\"", "interval = \"soon\"");
    let o = run(&["sync-once"], &cfg, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "no migration ran, no row was written");
}

#[test]
fn config_check_prints_the_effective_config_without_secrets() {
    let cfg = base_config()
        .replace(graph_sim::DEFAULT_CLIENT_SECRET, SECRET)
        .replace("calsync:pw@", &format!("calsync:{SECRET}@"));
    let o = run(
        &["config", "check"],
        &cfg,
        &[("CALSYNC_SYNC__INTERVAL", "90s")],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains(SECRET), "{out}");
    assert!(out.contains("<redacted>"));
    assert!(
        out.contains("interval = \"90s\""),
        "env overrides show in the effective config: {out}"
    );
    // A numeric secret from the environment is taken as text and never echoed in an error.
    let o = run(
        &["config", "check"],
        &base_config().replace(
            &format!("client_secret = \"{}\"", graph_sim::DEFAULT_CLIENT_SECRET),
            "",
        ),
        &[("CALSYNC_AUTH__CLIENT_SECRET", "1234567890")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("1234567890"));
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["sync-once", "--help"],
        &["migrate", "--help"],
        &["status", "--help"],
        &["changes", "--help"],
        &["config", "--help"],
        &["config", "check", "--help"],
        &["demo", "--help"],
    ] {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_once_exits_non_zero_when_a_tuple_fails_and_status_shows_why() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_cli_sync_once")
        .await
        .unwrap();
    let sim = graph_sim::Sim::new(&crate::harness::sim_config());
    {
        let mut st = sim.lock();
        let u = st
            .tenant
            .add_user("adele@contoso.onmicrosoft.com", None, "Adele");
        let p = graph_sim::writes::EventPatch::from_json(&serde_json::json!({"subject": "x",
            "start": {"dateTime": "2026-01-10T10:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2026-01-10T11:00:00", "timeZone": "UTC"}})).unwrap();
        st.tenant.create_event(u, 0, &p).unwrap();
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let graph = server.graph_base_url();
    let token = server.token_url(graph_sim::DEFAULT_TENANT);
    let good = valid(&url, &graph, &token, ONE_CALENDAR);
    let url2 = url.clone();
    let o = tokio::task::spawn_blocking(move || run(&["sync-once"], &good, &[]))
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("adele@contoso.onmicrosoft.com/default"));

    let with_ghost = valid(
        &url2,
        &graph,
        &token,
        &format!(
            "{ONE_CALENDAR}\n[[calendars]]\nuser = \"ghost@contoso.onmicrosoft.com\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n"
        ),
    );
    let cfg = with_ghost.clone();
    let o = tokio::task::spawn_blocking(move || run(&["sync-once"], &cfg, &[]))
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("ErrorInvalidUser"));

    let cfg = with_ghost.clone();
    let o = tokio::task::spawn_blocking(move || run(&["status"], &cfg, &[]))
        .await
        .unwrap();
    let table = text(&o);
    assert_eq!(o.status.code(), Some(0), "{table}");
    assert!(
        table.contains("TUPLE") && table.contains("failed") && table.contains("ErrorInvalidUser"),
        "{table}"
    );
    let cfg = with_ghost;
    let o = tokio::task::spawn_blocking(move || run(&["status", "--json"], &cfg, &[]))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|r| r["state"] == "ok" && r["event_count"] == 1)
    );
    server.stop().await;
}

#[test]
fn the_example_config_is_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/calsync.example.toml"
    );
    let o = Command::new(BIN)
        .args(["config", "check", "--config", path])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains("change-me"), "secrets are redacted: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_stops_cleanly_on_sigterm_and_leaves_a_resumable_state() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_cli_sigterm")
        .await
        .unwrap();
    let scenario = graph_sim::Scenario {
        sim: crate::harness::sim_config(),
        generate: Some(graph_sim::GenerateSpec {
            users: 1,
            events_per_user: 60,
            recurring: 0.3,
            extra_calendars: 0,
        }),
        ..Default::default()
    };
    let sim = scenario.build().unwrap();
    // Slow pages, so the signal arrives while rounds are in flight.
    sim.lock().faults.push(
        serde_json::from_value(serde_json::json!({"action": {"kind": "delay", "ms": 40}})).unwrap(),
    );
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let cal = "[[calendars]]\nuser = \"user0000@contoso.onmicrosoft.com\"\ncalendar = \"default\"\nstart = \"2025-01-01T00:00:00Z\"\nend = \"2028-01-01T00:00:00Z\"\ninterval = \"1s\"\n";
    let cfg = valid(
        &url,
        &server.graph_base_url(),
        &server.token_url(graph_sim::DEFAULT_TENANT),
        cal,
    )
    .replace("page_size = 50", "page_size = 5\nstartup_spread = \"10ms\"");
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(cfg.as_bytes()).unwrap();
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(f.path())
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(9),
        "exits within the drain deadline"
    );
    assert!(String::from_utf8_lossy(&status.stderr).contains("shutdown requested"));
    // Whatever was committed is a consistent place to resume from: one more round converges.
    sim.lock().faults.clear();
    let cfg2 = cfg.clone();
    let o = tokio::task::spawn_blocking(move || run(&["sync-once"], &cfg2, &[]))
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM calendar_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let truth = sim
        .lock()
        .truth(
            "user0000@contoso.onmicrosoft.com",
            "default",
            graph_sim::Window {
                start: "2025-01-01T00:00:00Z".parse().unwrap(),
                end: "2028-01-01T00:00:00Z".parse().unwrap(),
            },
        )
        .unwrap();
    assert_eq!(rows as usize, truth.len());
    server.stop().await;
}

#[test]
fn an_unreachable_database_at_start_is_retried_then_a_clear_error() {
    let config = base_config().replace(
        "[database]\n",
        "[database]\nwait_at_start = \"1500ms\"\nconnect_timeout = \"1s\"\n",
    );
    let started = std::time::Instant::now();
    let out = run(&["run"], &config, &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1500),
        "it retried for wait_at_start"
    );
    assert!(all.contains("database unreachable; retrying"), "{all}");
    assert!(
        all.contains(
            "cannot connect to the database at postgres://calsync:%3Credacted%3E@127.0.0.1:1/none"
        ),
        "{all}"
    );
    assert!(!all.contains("pw@") && !all.contains("panicked"), "{all}");

    // "0s": exit after the first attempt (which itself gives up after connect_timeout).
    let now = base_config().replace(
        "[database]\n",
        "[database]\nwait_at_start = \"0s\"\nconnect_timeout = \"1s\"\n",
    );
    let started = std::time::Instant::now();
    let out = run(&["run"], &now, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// Runs the real binary at trace level through a full sync, a token renewal, a refused
/// secret and every read-only command, and looks for each secret in everything it printed.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_any_output_even_at_trace_level() {
    const DB_PASSWORD: &str = "Pg-Passw0rd-never-in-logs";
    let url = calsync_store::recreate_database(&database_url(), "calsync_cli_secrets")
        .await
        .unwrap();
    // Trust auth ignores the password, so it can be anything: it must only never be printed.
    let url = url.replacen("://postgres@", &format!("://postgres:{DB_PASSWORD}@"), 1);
    assert!(
        url.contains(DB_PASSWORD),
        "the test URL carries a password: {url}"
    );
    let sim = graph_sim::Sim::new(&graph_sim::SimConfig {
        clients: vec![graph_sim::auth::ClientApp::with_secret(
            graph_sim::DEFAULT_CLIENT_ID,
            SECRET,
        )],
        ..crate::harness::sim_config()
    });
    {
        let mut st = sim.lock();
        let u = st
            .tenant
            .add_user("adele@contoso.onmicrosoft.com", None, "Adele");
        for d in 10..30 {
            let p = graph_sim::writes::EventPatch::from_json(
                &serde_json::json!({"subject": format!("e{d}"),
                "start": {"dateTime": format!("2026-01-{d}T10:00:00"), "timeZone": "UTC"},
                "end": {"dateTime": format!("2026-01-{d}T11:00:00"), "timeZone": "UTC"}}),
            )
            .unwrap();
            st.tenant.create_event(u, 0, &p).unwrap();
        }
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let config = valid(
        &url,
        &server.graph_base_url(),
        &server.token_url(graph_sim::DEFAULT_TENANT),
        ONE_CALENDAR,
    )
    .replace(graph_sim::DEFAULT_CLIENT_SECRET, SECRET)
    .replace("page_size = 50", "page_size = 3");
    assert!(config.contains(SECRET));
    let trace = [("RUST_LOG", "trace")];
    let mut printed = String::new();
    let mut go = |args: &'static [&'static str]| {
        let cfg = config.clone();
        let o = run(args, &cfg, &trace);
        printed.push_str(&text(&o));
        o
    };
    assert_eq!(go(&["sync-once"]).status.code(), Some(0));
    // Graph refuses the token mid-life: a 401, a renewal, the retried request.
    {
        let mut st = sim.lock();
        let now = st.tenant.now();
        st.auth.expire_all(now);
    }
    assert_eq!(go(&["sync-once"]).status.code(), Some(0));
    // Azure AD refuses the secret: the error is printed, the secret is not.
    sim.lock().faults = vec![
        serde_json::from_value(serde_json::json!({
            "path_contains": "oauth2",
            "action": {"kind": "status", "status": 401, "code": "invalid_client",
                       "message": "AADSTS7000215: Invalid client secret provided."}
        }))
        .unwrap(),
    ];
    let refused = go(&["sync-once"]);
    assert_eq!(refused.status.code(), Some(1));
    for args in [&["status"][..], &["status", "--json"], &["config", "check"]] {
        let o = run(args, &config, &trace);
        printed.push_str(&text(&o));
    }
    assert!(
        printed.contains("invalid_client"),
        "the refusal is reported"
    );
    assert!(
        printed.contains("TRACE") || printed.contains("trace"),
        "trace level was on"
    );
    let tokens = sim.lock().auth.minted_tokens();
    assert!(tokens.len() >= 2, "a renewal happened: {}", tokens.len());
    let mut secrets: Vec<String> = vec![SECRET.into(), DB_PASSWORD.into()];
    for t in &tokens {
        secrets.push(t.clone());
        // The random part alone too, in case a log line splits the token at its dot.
        secrets.push(t.rsplit('.').next().unwrap().to_owned());
    }
    crate::harness::assert_not_printed(&printed, &secrets);
    server.stop().await;
}

/// The configs shipped in deploy/ stay valid as the config grows.
#[test]
fn the_deploy_configs_are_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let compose = std::fs::read_to_string(format!("{root}/deploy/compose/calsync.toml")).unwrap();
    let o = run(
        &["config", "check"],
        &compose,
        &[(
            "CALSYNC_DATABASE__URL",
            "postgres://calsync:pw@postgres:5432/calsync",
        )],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // The TOML inside the Kubernetes ConfigMap, with its secret files present.
    let cm = std::fs::read_to_string(format!("{root}/deploy/kubernetes/configmap.yaml")).unwrap();
    let toml: String = cm
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("calsync.toml: |"))
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client-secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("admin-token"), "an-admin-token-of-24-chars").unwrap();
    std::fs::write(
        dir.path().join("database-url"),
        "postgres://calsync:pw@db/calsync",
    )
    .unwrap();
    let toml = toml.replace("/var/run/secrets/calsync", &dir.path().to_string_lossy());
    let o = run(&["config", "check"], &toml, &[]);
    assert_eq!(o.status.code(), Some(0), "{}\n{toml}", text(&o));
    assert!(!text(&o).contains(SECRET));
}

/// Debugging one mailbox with `sync-once` against the production database must not untrack the
/// daemon's other calendars (they would vanish from the read model until its next reload).
#[tokio::test]
async fn sync_once_with_one_calendar_leaves_the_others_tracked() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_cli_one_off")
        .await
        .unwrap();
    let sim = graph_sim::Sim::new(&crate::harness::sim_config());
    {
        let mut st = sim.lock();
        for upn in [
            "adele@contoso.onmicrosoft.com",
            "alex@contoso.onmicrosoft.com",
        ] {
            let u = st.tenant.add_user(upn, None, upn);
            let p = graph_sim::writes::EventPatch::from_json(&serde_json::json!({"subject": upn,
                "start": {"dateTime": "2026-01-10T10:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2026-01-10T11:00:00", "timeZone": "UTC"}})).unwrap();
            st.tenant.create_event(u, 0, &p).unwrap();
        }
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let (graph, token) = (
        server.graph_base_url(),
        server.token_url(graph_sim::DEFAULT_TENANT),
    );
    let both = valid(
        &url,
        &graph,
        &token,
        &format!(
            "{ONE_CALENDAR}\n[[calendars]]\nuser = \"alex@contoso.onmicrosoft.com\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n"
        ),
    );
    let one = valid(&url, &graph, &token, ONE_CALENDAR);
    for cfg in [both, one] {
        let o = tokio::task::spawn_blocking(move || run(&["sync-once"], &cfg, &[]))
            .await
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tracked: Vec<(String, bool, i64)> = sqlx::query_as(
        "SELECT tuple_key, tracked, event_count FROM calendar_sync_status ORDER BY tuple_key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(tracked.len(), 2);
    assert!(
        tracked.iter().all(|(_, t, n)| *t && *n == 1),
        "alex's calendar stays tracked and in the read model: {tracked:?}"
    );
}
