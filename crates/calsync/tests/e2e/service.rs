//! `calsync run` as a service, the real binary as a child process: systemd notifications and
//! watchdog, /healthz, /readyz, /metrics, SIGHUP and `calsync reload`, `calsync resync`, and
//! SIGTERM.

use crate::harness::{BIN, NotifySocket, bound_addr, config_file, database_url, wait_for};
use calsync::commands::{local_request, local_request_with};

/// The admin token the daemon under test is configured with (`http.admin_token_file`).
const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
use serde_json::{Value, json};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADELE: &str = "adele@contoso.onmicrosoft.com";
const ALEX: &str = "alex@contoso.onmicrosoft.com";
const MEGAN: &str = "megan@contoso.onmicrosoft.com";

fn calendar(name: &str, user: &str, interval: &str) -> String {
    format!(
        "\n[[calendars]]\nname = \"{name}\"\nuser = \"{user}\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\ninterval = \"{interval}\"\n"
    )
}

struct Daemon {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    /// Filled by a thread that drains the notify socket as systemd would.
    notes: NotifySocket,
    http: SocketAddr,
    base: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn write_config(&self, calendars: &str) {
        write_config(&self.config, &self.base, calendars);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Notifications received since the last call.
    fn notifications(&self) -> Vec<String> {
        self.notes.take()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    async fn get(&self, path: &str) -> (u16, String) {
        local_request(self.http, "GET", path).await.unwrap()
    }

    async fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics").await;
        assert_eq!(code, 200);
        body
    }
}

impl Drop for Daemon {
    /// A failed assertion must not leave the daemon running: kill our own child by its pid.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn write_config(path: &Path, base: &str, calendars: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(format!("{base}{calendars}").as_bytes())
        .unwrap();
}

/// A metric's value from the text format, by its full series name.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn status_of(
    db: &sqlx::PgPool,
) -> Vec<(
    String,
    bool,
    String,
    Option<chrono::DateTime<chrono::Utc>>,
    i64,
)> {
    sqlx::query_as(
        "SELECT tuple_key, tracked, state, last_full_sync_at, event_count FROM calendar_sync_status ORDER BY tuple_key",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_notifies_serves_probes_and_metrics_reloads_resyncs_and_stops() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_service")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let sim = graph_sim::Sim::new(&crate::harness::sim_config());
    {
        let mut st = sim.lock();
        for (upn, n) in [(ADELE, 12), (ALEX, 5), (MEGAN, 7)] {
            let u = st.tenant.add_user(upn, None, upn);
            for d in 0..n {
                let p = graph_sim::writes::EventPatch::from_json(&json!({"subject": format!("{upn} {d}"),
                    "start": {"dateTime": format!("2026-02-{:02}T10:00:00", d + 1), "timeZone": "UTC"},
                    "end": {"dateTime": format!("2026-02-{:02}T11:00:00", d + 1), "timeZone": "UTC"}}))
                .unwrap();
                st.tenant.create_event(u, 0, &p).unwrap();
            }
        }
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let base = config_file(
        &url,
        &server.graph_base_url(),
        &server.token_url(graph_sim::DEFAULT_TENANT),
        &format!(
            r#"
[sync]
interval = "1s"
page_size = 5
startup_spread = "100ms"

[http]
listen = "127.0.0.1:0"
admin_token_file = "{}"

[service]
drain_deadline = "3s"
replica = "svc-test"
"#,
            token_file.display()
        ),
    );
    let config = dir.path().join("calsync.toml");
    let log = dir.path().join("calsync.log");
    write_config(
        &config,
        &base,
        &(calendar("adele", ADELE, "1s") + &calendar("alex", ALEX, "1s")),
    );
    let notes = NotifySocket::bind(&dir.path().join("notify.sock"));
    let logfile = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", notes.path())
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::from(logfile.try_clone().unwrap()))
        .stderr(Stdio::from(logfile))
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        config,
        log,
        notes,
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        base,
        _dir: dir,
    };

    // READY=1 once migrations ran and the scheduler runs, with a STATUS line.
    let mut seen = Vec::new();
    wait_for("READY=1", Duration::from_secs(30), async || {
        seen.extend(d.notifications());
        seen.iter().any(|m| m.contains("READY=1"))
    })
    .await;
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    // Port 0: the daemon picked a free port and logged it before READY.
    d.http = bound_addr(&d.log()).unwrap_or_else(|| panic!("no bound address in:\n{}", d.log()));
    assert!(ready.contains("STATUS=2 calendars configured"), "{ready}");

    // Probes.
    assert_eq!(d.get("/healthz").await, (200, "ok\n".into()));
    let (code, body) = d.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        json!({"ready": true, "database": "ok", "migrations": "current", "scheduler": "running",
               "config": "current", "generation": 1})
    );

    // Both calendars synced; metrics agree with what happened.
    wait_for(
        "both calendars synced",
        Duration::from_secs(20),
        async || {
            let s = status_of(&db).await;
            s.len() == 2 && s.iter().all(|r| r.2 == "ok")
        },
    )
    .await;
    // Every line of a round names its tuple, user, calendar and window (span fields).
    let span = format!(
        "tuple{{tuple=adele user={ADELE} calendar=default window=2026-01-01T00:00:00Z/2026-04-01T00:00:00Z}}"
    );
    // (The line follows the commit that made the state `ok`: wait for it, do not race it.)
    wait_for(
        "adele's round in the log",
        Duration::from_secs(5),
        async || {
            d.log()
                .lines()
                .any(|l| l.contains(&span) && l.contains("round complete"))
        },
    )
    .await;
    // Rounds that change nothing (every second here) stay below INFO.
    assert!(!d.log().contains("nothing changed"), "{}", d.log());
    let m = d.metrics().await;
    assert!(
        metric(&m, "calsync_rounds_total{outcome=\"synced\"}").unwrap() >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "calsync_events_applied_total{kind=\"upsert\"}"),
        Some(17.0),
        "{m}"
    );
    assert!(
        metric(&m, "calsync_pages_total{outcome=\"applied\"}").unwrap() >= 4.0,
        "{m}"
    );
    assert!(
        m.contains("calsync_graph_responses_total{status=\"200\",code=\"\"}"),
        "{m}"
    );
    assert!(
        m.contains("calsync_round_duration_seconds_bucket{le=\"0.5\"}"),
        "{m}"
    );
    assert_eq!(metric(&m, "calsync_tuples{state=\"ok\"}"), Some(2.0));
    assert_eq!(metric(&m, "calsync_tuples{state=\"failed\"}"), Some(0.0));
    assert_eq!(metric(&m, "calsync_token_renewals_total"), Some(1.0));
    // Bounded by default: a lag histogram and the oldest lag, no series per calendar.
    assert_eq!(
        metric(&m, "calsync_sync_lag_seconds_count"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "calsync_sync_lag_seconds_bucket{le=\"15\"}"),
        Some(2.0)
    );
    let lag = metric(&m, "calsync_sync_lag_max_seconds").unwrap();
    assert!((0.0..10.0).contains(&lag), "{lag}");
    assert!(!m.contains("calsync_tuple_sync_lag_seconds{"), "{m}");
    assert!(!m.contains(ADELE), "no mailbox address in /metrics");
    // This replica holds both mailboxes and says so.
    assert_eq!(
        metric(&m, "calsync_leases_held{replica=\"svc-test\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(metric(&m, "calsync_tuples_unowned"), Some(0.0));

    // The watchdog is fed while the scheduler makes progress.
    let mut pings = 0;
    wait_for("WATCHDOG=1", Duration::from_secs(5), async || {
        pings += d
            .notifications()
            .iter()
            .filter(|m| m.contains("WATCHDOG=1"))
            .count();
        pings >= 2
    })
    .await;

    // SIGHUP: alex removed, megan added, adele retimed.
    d.write_config(&(calendar("adele", ADELE, "2s") + &calendar("megan", MEGAN, "1s")));
    d.signal("HUP");
    wait_for("the reload", Duration::from_secs(10), async || {
        d.log().contains("config reloaded")
    })
    .await;
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("config reloaded"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("added=[\"megan\"]")
            && line.contains("removed=[\"alex\"]")
            && line.contains("retimed=[\"adele\"]"),
        "{line}"
    );
    wait_for("megan synced", Duration::from_secs(20), async || {
        status_of(&db)
            .await
            .iter()
            .any(|r| r.0 == "megan" && r.2 == "ok" && r.4 == 7)
    })
    .await;
    let s = status_of(&db).await;
    let alex = s.iter().find(|r| r.0 == "alex").unwrap();
    assert!(
        !alex.1 && alex.4 == 5,
        "alex untracked, rows kept: {alex:?}"
    );
    let alex_id = {
        let st = sim.lock();
        st.tenant.users[st.tenant.user_index(ALEX).unwrap()]
            .id
            .clone()
    };
    let asked = |sim: &graph_sim::Sim, id: &str| {
        sim.lock()
            .requests()
            .iter()
            .filter(|r| r.mailbox.as_deref() == Some(id))
            .count()
    };
    let before = asked(&sim, &alex_id);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        asked(&sim, &alex_id),
        before,
        "a removed calendar is no longer synced"
    );

    // A bad config is refused, over SIGHUP and over POST /reload; the running one stays.
    d.write_config(&(calendar("adele", ADELE, "2s") + "\n[[calendars]]\nuser = \"\"\n"));
    d.signal("HUP");
    wait_for("the refusal", Duration::from_secs(10), async || {
        d.log().contains("config reload refused")
    })
    .await;
    let out = Command::new(BIN)
        .args(["reload", "--config"])
        .arg(&d.config)
        .env("CALSYNC_HTTP__LISTEN", d.http.to_string())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "reload's own config check refuses it first"
    );
    // POST /reload wants the admin token: none, or a wrong one, is refused before anything.
    let (code, body) = local_request(d.http, "POST", "/reload").await.unwrap();
    assert_eq!(code, 401, "{body}");
    let wrong = secrecy::SecretString::from("x".repeat(ADMIN_TOKEN.len()));
    let (code, _) = local_request_with(d.http, "POST", "/reload", Some(&wrong))
        .await
        .unwrap();
    assert_eq!(code, 401);
    let token = secrecy::SecretString::from(ADMIN_TOKEN);
    let (code, body) = local_request_with(d.http, "POST", "/reload", Some(&token))
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("calendars[1].user"), "{body}");
    assert_eq!(d.get("/healthz").await.0, 200);
    let megan_id = {
        let st = sim.lock();
        st.tenant.users[st.tenant.user_index(MEGAN).unwrap()]
            .id
            .clone()
    };
    let before = asked(&sim, &megan_id);
    wait_for("megan still synced", Duration::from_secs(10), async || {
        asked(&sim, &megan_id) > before + 1
    })
    .await;

    // `calsync reload` with a good config: megan's interval changes.
    d.write_config(&(calendar("adele", ADELE, "2s") + &calendar("megan", MEGAN, "3s")));
    let out = Command::new(BIN)
        .args(["reload", "--config"])
        .arg(&d.config)
        .env("CALSYNC_HTTP__LISTEN", d.http.to_string())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let v: Value = serde_json::from_str(&said).unwrap();
    assert_eq!(v["retimed"], json!(["megan"]));

    // `calsync resync adele`: its next round is a full one.
    let full_before = status_of(&db)
        .await
        .into_iter()
        .find(|r| r.0 == "adele")
        .unwrap()
        .3
        .unwrap();
    let out = Command::new(BIN)
        .args(["resync", "adele", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("adele's full round", Duration::from_secs(15), async || {
        let s = status_of(&db).await;
        let a = s.iter().find(|r| r.0 == "adele").unwrap();
        a.3.is_some_and(|t| t > full_before) && a.2 == "ok"
    })
    .await;
    let out = Command::new(BIN)
        .args(["resync", "nobody", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tracked tuple is named 'nobody'"));

    // SIGTERM: STOPPING=1, a clean exit.
    d.notifications();
    d.signal("TERM");
    let log_path = d.log.clone();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.notifications().iter().any(|m| m.contains("STOPPING=1")));
    server.stop().await;
}
