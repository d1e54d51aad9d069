//! The daemon's supervised workers, the real binary as a child process: a worker stalled on a
//! slow Graph (a reload whose discovery pass waits on a directory listing) leaves `/healthz`
//! green, the systemd watchdog fed and the calendars syncing, and says which worker is busy.

use crate::harness::{BIN, NotifySocket, bound_addr, config_file, database_url, rule, wait_for};
use calsync::commands::local_request;
use graph_sim::MailboxKind;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ADELE: &str = "adele@contoso.onmicrosoft.com";
const ROOM: &str = "room-1@contoso.onmicrosoft.com";

async fn last_success(db: &sqlx::PgPool, key: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT last_success_at FROM sync_tuples WHERE tuple_key = $1")
        .bind(key)
        .fetch_optional(db)
        .await
        .unwrap()
        .flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_with_10000_users_stalled_on_discovery_keeps_health_and_the_watchdog_and_the_rounds_going()
 {
    let url = calsync_store::recreate_database(&database_url(), "calsync_workers")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let sim = graph_sim::Sim::new(&crate::harness::sim_config());
    {
        let mut st = sim.lock();
        let adele = st.tenant.add_user(ADELE, None, ADELE);
        st.tenant
            .add_directory_user(ROOM, "Room 1", MailboxKind::Room, None);
        // Issue 23: a reload with 10,000 users and their listing slow ran in the main loop.
        for i in 0..10_000 {
            let upn = format!("staff{i:05}@contoso.onmicrosoft.com");
            st.tenant
                .add_directory_user(&upn, &upn, MailboxKind::User, None);
        }
        let p = graph_sim::writes::EventPatch::from_json(&json!({"subject": "standup",
            "start": {"dateTime": "2026-02-02T10:00:00", "timeZone": "UTC"},
            "end": {"dateTime": "2026-02-02T11:00:00", "timeZone": "UTC"}}))
        .unwrap();
        st.tenant.create_event(adele, 0, &p).unwrap();
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("calsync.toml");
    std::fs::write(
        &config,
        config_file(
            &url,
            &server.graph_base_url(),
            &server.token_url(graph_sim::DEFAULT_TENANT),
            &format!(
                r#"
[sync]
interval = "1s"
startup_spread = "100ms"

[http]
listen = "127.0.0.1:0"

[service]
drain_deadline = "3s"
replica = "workers-test"

[discovery]
every = "1h"

[[sources]]
name = "rooms"
rooms = "all"
start = "2026-01-01T00:00:00Z"
end = "2026-04-01T00:00:00Z"

[[calendars]]
name = "adele"
user = "{ADELE}"
calendar = "default"
start = "2026-01-01T00:00:00Z"
end = "2026-04-01T00:00:00Z"
"#
            ),
        ),
    )
    .unwrap();

    let notes = NotifySocket::bind(&dir.path().join("notify.sock"));
    let log = dir.path().join("calsync.log");
    let logfile = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(BIN)
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
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    wait_for("READY=1", Duration::from_secs(30), async || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "calsync run exited ({status}) before READY:\n{}",
                read_log()
            );
        }
        notes.take().iter().any(|n| n.contains("READY=1"))
    })
    .await;
    let http = bound_addr(&read_log()).unwrap();
    wait_for(
        "both calendars synced",
        Duration::from_secs(20),
        async || {
            last_success(&db, "adele").await.is_some()
                && last_success(&db, &format!("rooms:{ROOM}/default"))
                    .await
                    .is_some()
        },
    )
    .await;

    // The directory answers nothing for a minute; a reload adds a source of the tenant's
    // 10,000 users and resolves the sources again.
    // The reload lists the 10,000 users first (eleven pages), then waits on the rooms.
    sim.lock().faults = vec![rule(json!({
        "path_contains": "places", "action": {"kind": "delay", "ms": 60000}
    }))];
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "[[sources]]\nname = \"rooms\"",
            "[[sources]]\nname = \"staff\"\nusers = \"all\"\ninterval = \"1h\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n\n[[sources]]\nname = \"rooms\"",
        ),
    )
    .unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    wait_for(
        "the reload's directory request",
        Duration::from_secs(10),
        async || sim.lock().faults[0].fired > 0,
    )
    .await;

    let listed = sim
        .lock()
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/users") && r.status == 200)
        .count();
    assert!(
        listed >= 11,
        "the reload listed the 10,000 users: {listed} pages"
    );
    // Longer than /healthz tolerates a main loop that does not turn (10 s).
    notes.take();
    let stalled = Instant::now();
    let synced_before = last_success(&db, "adele").await.unwrap();
    while stalled.elapsed() < Duration::from_secs(12) {
        let (code, body) = local_request(http, "GET", "/healthz").await.unwrap();
        assert_eq!(code, 200, "{body}\n{}", read_log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // WATCHDOG_USEC = 1 s: pinged every half second.
    let pings = notes
        .take()
        .iter()
        .filter(|n| n.contains("WATCHDOG=1"))
        .count();
    assert!(
        pings >= 12,
        "{pings} watchdog pings in 12 s\n{}",
        read_log()
    );
    // The reload is still waiting on the directory, in its own worker, and says so.
    let (code, metrics) = local_request(http, "GET", "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("calsync_worker_state{worker=\"schedule\",state=\"busy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("calsync_worker_state{worker=\"upkeep\",state=\"stopped\"} 0"),
        "{metrics}"
    );
    assert!(!read_log().contains("config reloaded"), "{}", read_log());
    // The calendars went on syncing meanwhile.
    let synced_after = last_success(&db, "adele").await.unwrap();
    assert!(
        synced_after > synced_before,
        "{synced_before} -> {synced_after}"
    );

    // SIGTERM: the stalled reload does not hold the exit past the drain deadline.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let stopping = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stopping.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon did not stop\n{}", read_log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}\n{}", read_log());
}
