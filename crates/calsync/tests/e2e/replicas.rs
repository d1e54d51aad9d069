//! Many processes, one database: deployments, one-off commands beside a daemon, replicas that
//! split the mailboxes, fencing of a paused process, failover, and a reload that moves a window
//! while its old round is in flight. The real binary as child processes, graph-sim on loopback,
//! real PostgreSQL.

use crate::harness::{BIN, config_file, database_url, rule, wait_for};
use calsync_engine::Tuple;
use calsync_graph::{CalendarRef, ViewWindow};
use calsync_store::Store;
use graph_sim::{Sim, SimServer};
use serde_json::json;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const START: &str = "2026-01-01T00:00:00Z";
const END: &str = "2026-04-01T00:00:00Z";

pub(crate) fn upn(i: usize) -> String {
    format!("person{i:03}@contoso.onmicrosoft.com")
}

/// Adds a one-hour single event starting at `start` (UTC wall time, `2026-02-01T10:00:00`) to
/// calendar `cal` of mailbox `user` (by index).
pub(crate) fn add_event(
    t: &mut graph_sim::model::Tenant,
    user: usize,
    cal: usize,
    subject: &str,
    start: &str,
) {
    let begin: chrono::NaiveDateTime = start.parse().unwrap();
    let end = (begin + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    let p = graph_sim::writes::EventPatch::from_json(&crate::harness::single(subject, start, &end))
        .unwrap();
    t.create_event(user, cal, &p).unwrap();
}

/// A simulator with `users` mailboxes of `events` singles each (inside the tests' window).
pub(crate) async fn sim_with(users: usize, events: usize) -> (Sim, SimServer) {
    let sim = Sim::new(&crate::harness::sim_config());
    {
        let mut st = sim.lock();
        for i in 0..users {
            let u = st.tenant.add_user(&upn(i), None, &upn(i));
            for d in 0..events {
                let start = format!("2026-02-{:02}T10:00:00", d % 28 + 1);
                add_event(&mut st.tenant, u, 0, &format!("{i} {d}"), &start);
            }
        }
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    (sim, server)
}

pub(crate) fn calendar(key: &str, user: &str) -> String {
    format!(
        "\n[[calendars]]\nname = \"{key}\"\nuser = \"{user}\"\ncalendar = \"default\"\nstart = \"{START}\"\nend = \"{END}\"\n"
    )
}

pub(crate) fn tuple(key: &str, user: &str) -> Tuple {
    Tuple {
        id: 0,
        key: key.into(),
        user: user.into(),
        account: None,
        calendar: CalendarRef::Default,
        window: ViewWindow {
            start: START.parse().unwrap(),
            end: END.parse().unwrap(),
        },
        rolling: None,
        schedule: None,
        interval: Duration::from_secs(1),
        mailbox: user.into(),
    }
}

/// A config file for one deployment/replica (the sections after `[database]`, `[graph]`,
/// `[auth]`), written to `dir`.
pub(crate) fn write_config(
    dir: &Path,
    file: &str,
    url: &str,
    server: &SimServer,
    service: &str,
    sync: &str,
    calendars: &str,
) -> PathBuf {
    let text = config_file(
        url,
        &server.graph_base_url(),
        &server.token_url(graph_sim::DEFAULT_TENANT),
        &format!("[sync]\n{sync}\n\n[service]\n{service}\n{calendars}"),
    );
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// A `calsync run` child process, killed on drop if still running.
pub(crate) struct Node {
    child: Child,
    log: PathBuf,
}

impl Node {
    pub(crate) fn start(config: &Path, log: PathBuf) -> Node {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        Node { child, log }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub(crate) fn wait(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(started.elapsed() < limit, "did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then a clean exit within 10 s.
    pub(crate) fn stop(&mut self) {
        self.signal("TERM");
        let s = self.wait(Duration::from_secs(10));
        assert_eq!(s.code(), Some(0), "{}", self.log());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows the end of each daemon's log.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- {} (last 40 lines) ---\n{tail}", self.log.display());
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// (key, state) of every tracked tuple of `deployment` (none before the first migration).
pub(crate) async fn states(db: &PgPool, deployment: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT tuple_key, state FROM sync_tuples WHERE deployment = $1 AND tracked ORDER BY tuple_key",
    )
    .bind(deployment)
    .fetch_all(db)
    .await
    .unwrap_or_default()
}

pub(crate) async fn all_ok(db: &PgPool, deployment: &str, n: usize) -> bool {
    let s = states(db, deployment).await;
    s.len() == n && s.iter().all(|(_, st)| st == "ok")
}

pub(crate) async fn bad_states(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sync_tuples WHERE state IN ('degraded', 'failed')")
        .fetch_one(db)
        .await
        .unwrap()
}

pub(crate) async fn diverging(store: &Store, sim: &Sim, tuples: &[Tuple]) -> Vec<String> {
    calsync_testkit::compare(store, sim, tuples)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_empty())
        .map(|d| {
            format!(
                "{}: missing {:?} extra {:?} different {:?}",
                d.tuple, d.missing, d.extra, d.different
            )
        })
        .collect()
}

pub(crate) async fn mirrors(store: &Store, sim: &Sim, tuples: &[Tuple], limit: Duration) {
    let started = Instant::now();
    loop {
        let d = diverging(store, sim, tuples).await;
        if d.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{} diverge: {:?}",
            d.len(),
            &d[..d.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn store_for(url: &str, deployment: &str) -> Store {
    Store::connect(url, &calsync_store::ConnectOptions::new(4))
        .await
        .unwrap()
        .for_deployment(deployment)
}

pub(crate) fn sync_once(config: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["sync-once", "--config"])
        .arg(config)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_off_command_and_a_second_deployment_leave_a_daemons_calendars_alone() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_deployments")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (sim, server) = sim_with(5, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let sync = "interval = \"1s\"\nstartup_spread = \"100ms\"";
    let alpha_cals = calendar("c0", &upn(0)) + &calendar("c1", &upn(1)) + &calendar("c2", &upn(2));
    let alpha_service =
        "deployment = \"alpha\"\nreplica = \"alpha-1\"\nlease_ttl = \"3s\"\non_remove = \"purge\"";
    let alpha_cfg = write_config(
        dir.path(),
        "alpha.toml",
        &url,
        &server,
        alpha_service,
        sync,
        &alpha_cals,
    );
    let mut alpha = Node::start(&alpha_cfg, dir.path().join("alpha.log"));
    wait_for("alpha synced", Duration::from_secs(20), async || {
        all_ok(&db, "alpha", 3).await
    })
    .await;
    let counts = |db: PgPool| async move {
        sqlx::query_as::<_, (String, String, i64)>(
            "SELECT deployment, tuple_key, count(*) FROM calendar_events GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .fetch_all(&db)
        .await
        .unwrap()
    };
    let before = counts(db.clone()).await;
    assert_eq!(before.len(), 3, "{before:?}");

    // sync-once with a one-calendar config of the same deployment: its calendar syncs, and
    // not one of the daemon's leaves the read model.
    let one = write_config(
        dir.path(),
        "one.toml",
        &url,
        &server,
        "deployment = \"alpha\"\nlease_ttl = \"3s\"",
        sync,
        &calendar("c3", &upn(3)),
    );
    let (code, out) = sync_once(&one);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok      c3"), "{out}");
    let after = counts(db.clone()).await;
    assert_eq!(
        &after[..3],
        &before[..],
        "the daemon's calendars are untouched"
    );
    assert_eq!(after.len(), 4, "{after:?}");
    // A calendar the daemon serves is not rewritten: its round is asked of the replica
    // holding its mailbox, and sync-once exits by that round (issue 23: it exited 1 for
    // calendars another replica holds, although nothing failed).
    let held = write_config(
        dir.path(),
        "held.toml",
        &url,
        &server,
        "deployment = \"alpha\"\nlease_ttl = \"3s\"",
        sync,
        &calendar("c0", &upn(0)),
    );
    let asked_at = chrono::Utc::now();
    let (code, out) = sync_once(&held);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok      c0") && out.contains("round run by replica alpha-1"),
        "{out}"
    );
    let ran: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT last_success_at FROM sync_tuples WHERE deployment = 'alpha' AND tuple_key = 'c0'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(
        ran.unwrap() > asked_at,
        "the holder's round ran after the ask"
    );
    // The same name with another window is the daemon's, and is not rewritten.
    let other = write_config(
        dir.path(),
        "other.toml",
        &url,
        &server,
        "deployment = \"alpha\"\nlease_ttl = \"3s\"",
        sync,
        &calendar("c0", &upn(0)).replace(END, "2026-05-01T00:00:00Z"),
    );
    let (code, out) = sync_once(&other);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("skipped c0") && out.contains("not rewritten"),
        "{out}"
    );
    let end: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT window_end FROM sync_tuples WHERE deployment = 'alpha' AND tuple_key = 'c0'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(end, END.parse::<chrono::DateTime<chrono::Utc>>().unwrap());
    assert_eq!(states(&db, "alpha").await.len(), 4);

    // A second deployment with its own config, one tuple named like alpha's, one mailbox shared.
    let beta_cals = calendar("c1", &upn(1)) + &calendar("c4", &upn(4));
    let beta_service =
        "deployment = \"beta\"\nreplica = \"beta-1\"\nlease_ttl = \"3s\"\non_remove = \"purge\"";
    let beta_cfg = write_config(
        dir.path(),
        "beta.toml",
        &url,
        &server,
        beta_service,
        sync,
        &beta_cals,
    );
    let mut beta = Node::start(&beta_cfg, dir.path().join("beta.log"));
    wait_for("beta synced", Duration::from_secs(20), async || {
        all_ok(&db, "beta", 2).await
    })
    .await;
    // An edit in the shared mailbox reaches both deployments.
    {
        let mut st = sim.lock();
        let u = st.tenant.user_index(&upn(1)).unwrap();
        add_event(&mut st.tenant, u, 0, "shared news", "2026-03-03T09:00:00");
    }
    let alpha_store = store_for(&url, "alpha").await;
    let beta_store = store_for(&url, "beta").await;
    let alpha_tuples = vec![
        tuple("c0", &upn(0)),
        tuple("c1", &upn(1)),
        tuple("c2", &upn(2)),
    ];
    let beta_tuples = vec![tuple("c1", &upn(1)), tuple("c4", &upn(4))];
    mirrors(&alpha_store, &sim, &alpha_tuples, Duration::from_secs(15)).await;
    mirrors(&beta_store, &sim, &beta_tuples, Duration::from_secs(15)).await;

    // alpha drops c2 and purges: its own untracked tuples go (c2, and c3 that sync-once
    // added), beta's rows stay, tracked.
    std::fs::write(
        &alpha_cfg,
        std::fs::read_to_string(&alpha_cfg)
            .unwrap()
            .replace(&calendar("c2", &upn(2)), ""),
    )
    .unwrap();
    alpha.signal("HUP");
    // The reload untracks (one transaction), then purges (another): wait for the purge.
    wait_for("alpha's purge", Duration::from_secs(10), async || {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sync_tuples WHERE deployment = 'alpha'")
                .fetch_one(&db)
                .await
                .unwrap();
        states(&db, "alpha").await.len() == 2 && rows == 2
    })
    .await;
    let left: Vec<(String, String)> =
        sqlx::query_as("SELECT deployment, tuple_key FROM sync_tuples ORDER BY 1, 2")
            .fetch_all(&db)
            .await
            .unwrap();
    let want: Vec<(String, String)> = [
        ("alpha", "c0"),
        ("alpha", "c1"),
        ("beta", "c1"),
        ("beta", "c4"),
    ]
    .iter()
    .map(|(d, k)| (d.to_string(), k.to_string()))
    .collect();
    assert_eq!(left, want);
    mirrors(&beta_store, &sim, &beta_tuples, Duration::from_secs(5)).await;
    assert_eq!(bad_states(&db).await, 0);
    alpha.stop();
    beta.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_with_one_config_split_the_mailboxes_and_commit_each_page_once() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_two_daemons")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (sim, server) = sim_with(8, 6).await;
    // Throttling in the mix: neither process may send before a mailbox's Retry-After.
    sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "probability": 0.1,
        "action": {"kind": "status", "status": 429, "code": "TooManyRequests", "retry_after": 0.5}}),
    )];
    let dir = tempfile::tempdir().unwrap();
    let cals: String = (0..8)
        .map(|i| calendar(&format!("c{i}"), &upn(i)))
        .collect();
    let sync = "interval = \"1s\"\nstartup_spread = \"200ms\"\npage_size = 2";
    let cfg = |replica: &str, sync: &str| {
        write_config(
            dir.path(),
            &format!("{replica}.toml"),
            &url,
            &server,
            &format!("replica = \"{replica}\"\nlease_ttl = \"3s\""),
            sync,
            &cals,
        )
    };
    let (c1, c2) = (cfg("r1", sync), cfg("r2", sync));
    let mut r1 = Node::start(&c1, dir.path().join("r1.log"));
    let mut r2 = Node::start(&c2, dir.path().join("r2.log"));
    wait_for("all synced", Duration::from_secs(30), async || {
        all_ok(&db, "default", 8).await
    })
    .await;
    // Edits for a while, watching that nobody's work degrades or fails a tuple.
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        {
            let mut st = sim.lock();
            let u = st.tenant.user_index(&upn(n % 8)).unwrap();
            let start = format!("2026-03-{:02}T09:00:00", n % 28 + 1);
            add_event(&mut st.tenant, u, 0, &format!("edit {n}"), &start);
        }
        n += 1;
        assert_eq!(bad_states(&db).await, 0, "a tuple degraded or failed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Both replicas did work, each on its own mailboxes.
    let writers: Vec<(String, i64)> = sqlx::query_as(
        "SELECT split_part(committed_by, '#', 1), count(DISTINCT mailbox) FROM sync_tuples GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        writers,
        vec![("r1".to_owned(), 4), ("r2".to_owned(), 4)],
        "fair split by count"
    );
    let tuples: Vec<Tuple> = (0..8).map(|i| tuple(&format!("c{i}"), &upn(i))).collect();
    let store = store_for(&url, "default").await;
    mirrors(&store, &sim, &tuples, Duration::from_secs(15)).await;
    // Quiesce (an hour's interval) so that no page is in flight, then count: every delta page
    // Graph served was committed exactly once (a page fetched by a process that could not
    // commit it would show as a surplus).
    let slow = "interval = \"1h\"\nstartup_spread = \"200ms\"\npage_size = 2";
    cfg("r1", slow);
    cfg("r2", slow);
    r1.signal("HUP");
    r2.signal("HUP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let served = sim
        .lock()
        .requests()
        .iter()
        .filter(|r| r.status == 200 && r.path.contains("calendarView"))
        .count() as i64;
    let committed: i64 = sqlx::query_scalar("SELECT sum(link_version)::bigint FROM sync_tuples")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(served, committed, "every page committed once");
    mirrors(&store, &sim, &tuples, Duration::from_secs(1)).await;
    let v = sim.lock().violations();
    assert_eq!((v.retry_after, v.concurrency), (0, 0), "{v:?}");
    assert!(v.max_in_flight <= 4, "{v:?}");
    for node in [&r1, &r2] {
        let log = node.log();
        assert!(
            !log.contains("stands down") && !log.contains("another writer"),
            "{log}"
        );
    }
    r1.stop();
    r2.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_process_whose_lease_was_taken_writes_nothing_when_it_resumes() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_fencing")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (sim, server) = sim_with(3, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let cals: String = (0..3)
        .map(|i| calendar(&format!("c{i}"), &upn(i)))
        .collect();
    let cfg = write_config(
        dir.path(),
        "a.toml",
        &url,
        &server,
        "replica = \"a\"\nlease_ttl = \"2s\"",
        "interval = \"1s\"\nstartup_spread = \"100ms\"",
        &cals,
    );
    let mut a = Node::start(&cfg, dir.path().join("a.log"));
    wait_for("synced", Duration::from_secs(20), async || {
        all_ok(&db, "default", 3).await
    })
    .await;
    // From now on every delta page takes 1.5 s: a round is in flight whenever it is paused.
    sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "action": {"kind": "delay", "ms": 1500}}),
    )];
    wait_for("a page in flight", Duration::from_secs(5), async || {
        sim.lock().requests_in_flight() > 0
    })
    .await;
    a.signal("STOP");
    // Its heartbeat lapses; another replica takes every lease, with new fencing tokens.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sqlx::query("INSERT INTO replicas (deployment, incarnation, replica, expires_at) VALUES ('default', 'thief#1', 'thief', now() + interval '1 hour')")
        .execute(&db)
        .await
        .unwrap();
    let taken = sqlx::query("UPDATE mailbox_leases SET owner = 'thief#1', fence = nextval('lease_fence') WHERE deployment = 'default'")
        .execute(&db)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(taken, 3);
    let snapshot = |db: PgPool| async move {
        sqlx::query_as::<_, (String, i64, String, Option<String>)>(
            "SELECT tuple_key, link_version, state, last_error_code FROM sync_tuples ORDER BY tuple_key",
        )
        .fetch_all(&db)
        .await
        .unwrap()
    };
    let before = snapshot(db.clone()).await;
    a.signal("CONT");
    // The pages in flight arrive; their commits are refused, and nothing else is written.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        snapshot(db.clone()).await,
        before,
        "the fenced process wrote"
    );
    let log = a.log();
    assert!(
        log.contains("stands down") && log.contains("LeaseLost"),
        "{log}"
    );
    // The thief goes away without syncing: `a` takes the mailboxes back and syncs again.
    sim.lock().faults.clear();
    sqlx::query("DELETE FROM replicas WHERE incarnation = 'thief#1'")
        .execute(&db)
        .await
        .unwrap();
    wait_for("a syncs again", Duration::from_secs(15), async || {
        let now = snapshot(db.clone()).await;
        now.iter().zip(&before).all(|(n, b)| n.1 > b.1) && now.iter().all(|n| n.2 == "ok")
    })
    .await;
    a.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_moves_a_window_mid_round_converges_on_the_new_window() {
    let url = calsync_store::recreate_database(&database_url(), "calsync_window_move")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    // Events in February (old window) and in May (only the new one).
    let (sim, server) = sim_with(1, 12).await;
    {
        let mut st = sim.lock();
        for d in 1..=12 {
            let start = format!("2026-05-{d:02}T10:00:00");
            add_event(&mut st.tenant, 0, 0, &format!("may {d}"), &start);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let cal = |start: &str, end: &str| {
        format!(
            "\n[[calendars]]\nname = \"c\"\nuser = \"{}\"\ncalendar = \"default\"\nstart = \"{start}\"\nend = \"{end}\"\n",
            upn(0)
        )
    };
    let sync = "interval = \"2s\"\nstartup_spread = \"100ms\"\npage_size = 2";
    let service = "replica = \"w\"\nlease_ttl = \"3s\"";
    let cfg = write_config(
        dir.path(),
        "w.toml",
        &url,
        &server,
        service,
        sync,
        &cal(START, END),
    );
    let mut w = Node::start(&cfg, dir.path().join("w.log"));
    wait_for("synced", Duration::from_secs(20), async || {
        all_ok(&db, "default", 1).await
    })
    .await;
    // Pages become slow, so the next round is in flight (several pages of 2) when the
    // window moves to March–June.
    sim.lock().faults = vec![rule(
        json!({"path_contains": "calendarView", "action": {"kind": "delay", "ms": 400}}),
    )];
    wait_for("a round in flight", Duration::from_secs(5), async || {
        sim.lock()
            .requests()
            .last()
            .is_some_and(|r| r.path.contains("calendarView") && r.fault.is_some())
    })
    .await;
    let moved = write_config(
        dir.path(),
        "w.toml",
        &url,
        &server,
        service,
        sync,
        &cal("2026-03-15T00:00:00Z", "2026-06-15T00:00:00Z"),
    );
    assert_eq!(moved, cfg);
    w.signal("HUP");
    let new = Tuple {
        window: ViewWindow {
            start: "2026-03-15T00:00:00Z".parse().unwrap(),
            end: "2026-06-15T00:00:00Z".parse().unwrap(),
        },
        ..tuple("c", &upn(0))
    };
    let store = store_for(&url, "default").await;
    // Never degraded or failed on the way; the new window converges within its interval plus
    // the round itself (12 events in pages of 2 at 400 ms).
    let started = Instant::now();
    loop {
        assert_eq!(bad_states(&db).await, 0, "{}", w.log());
        if diverging(&store, &sim, std::slice::from_ref(&new))
            .await
            .is_empty()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{:?}",
            diverging(&store, &sim, std::slice::from_ref(&new)).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it stays so: nothing of the new window is swept by the old round.
    sim.lock().faults.clear();
    for _ in 0..20 {
        assert!(
            diverging(&store, &sim, std::slice::from_ref(&new))
                .await
                .is_empty()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let state: (String, i64) =
        sqlx::query_as("SELECT state, (SELECT count(*) FROM events) FROM sync_tuples")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(state.0, "ok");
    assert_eq!(state.1, 12, "May's 12 events, none of February's");
    w.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_survive_kill_9_a_joiner_and_sigterm_and_keep_every_calendar_fresh() {
    use rand::{Rng, SeedableRng};
    const USERS: usize = 600;
    const CALENDARS: usize = 5;
    let url = calsync_store::recreate_database(&database_url(), "calsync_three_replicas")
        .await
        .unwrap();
    let db = PgPool::connect(&url).await.unwrap();
    let (sim, server) = sim_with(USERS, 1).await;
    // Five calendars per mailbox: 3,000 tuples over 600 mailboxes.
    let mut tuples = Vec::new();
    let mut cals = String::new();
    {
        let mut st = sim.lock();
        for u in 0..USERS {
            for c in 1..CALENDARS {
                let id = st.tenant.add_calendar(u, &format!("Calendar {c}"));
                let start = format!("2026-02-{:02}T10:00:00", c + 1);
                add_event(&mut st.tenant, u, c, &format!("{u}/{c}"), &start);
                let key = format!("u{u}-c{c}");
                cals.push_str(&format!(
                    "\n[[calendars]]\nname = \"{key}\"\nuser = \"{}\"\ncalendar = \"{id}\"\nstart = \"{START}\"\nend = \"{END}\"\n",
                    upn(u)
                ));
                tuples.push(Tuple {
                    calendar: CalendarRef::Id(id),
                    ..tuple(&key, &upn(u))
                });
            }
            let key = format!("u{u}-c0");
            cals.push_str(&calendar(&key, &upn(u)));
            tuples.push(tuple(&key, &upn(u)));
        }
    }
    assert_eq!(tuples.len(), USERS * CALENDARS);
    let interval = Duration::from_secs(10);
    let ttl = Duration::from_secs(4);
    let dir = tempfile::tempdir().unwrap();
    let sync = "interval = \"10s\"\nstartup_spread = \"3s\"\nmax_in_flight = 32";
    let node = |name: &str| {
        let cfg = write_config(
            dir.path(),
            &format!("{name}.toml"),
            &url,
            &server,
            &format!("replica = \"{name}\"\nlease_ttl = \"4s\"\ndrain_deadline = \"5s\""),
            sync,
            &cals,
        );
        Node::start(&cfg, dir.path().join(format!("{name}.log")))
    };
    let mut r1 = node("r1");
    let mut r2 = node("r2");
    let mut r3 = node("r3");
    wait_for("the initial sync", Duration::from_secs(90), async || {
        all_ok(&db, "default", tuples.len()).await
    })
    .await;
    // Random edits all along, from a thread of their own.
    let editing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let editor = std::thread::spawn({
        let sim = sim.clone();
        let editing = std::sync::Arc::clone(&editing);
        move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(12);
            let w = graph_sim::Window {
                start: START.parse().unwrap(),
                end: END.parse().unwrap(),
            };
            let mut edits = 0;
            while editing.load(std::sync::atomic::Ordering::Relaxed) {
                let (u, c) = (rng.gen_range(0..USERS), rng.gen_range(0..CALENDARS));
                if graph_sim::churn::random_edit(&mut sim.lock().tenant, &mut rng, u, c, &w)
                    .is_some()
                {
                    edits += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            edits
        }
    });
    // Every calendar stays within 2 × interval + lease TTL of its last success throughout.
    let bound = (interval * 2 + ttl).as_secs_f64();
    let worst = |db: PgPool| async move {
        sqlx::query_scalar::<_, f64>(
            "SELECT COALESCE(max(EXTRACT(EPOCH FROM now() - last_success_at)), 0)::float8 FROM sync_tuples WHERE tracked",
        )
        .fetch_one(&db)
        .await
        .unwrap()
    };
    let mut seen_worst: f64 = 0.0;
    let watch = async |secs: u64, seen_worst: &mut f64| {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let w = worst(db.clone()).await;
            *seen_worst = seen_worst.max(w);
            assert!(
                w <= bound,
                "a calendar went {w:.1} s without a sync (bound {bound} s)"
            );
            assert_eq!(bad_states(&db).await, 0);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    watch(10, &mut seen_worst).await;
    r2.child.kill().unwrap(); // kill -9
    r2.child.wait().unwrap();
    watch(15, &mut seen_worst).await;
    let mut r4 = node("r4");
    watch(15, &mut seen_worst).await;
    r1.stop();
    watch(15, &mut seen_worst).await;
    editing.store(false, std::sync::atomic::Ordering::Relaxed);
    let edits = editor.join().unwrap();
    assert!(edits > 100, "{edits} edits");
    // The survivors split the mailboxes, and the view equals the truth.
    let owners: Vec<(String, i64)> = sqlx::query_as(
        "SELECT r.replica, count(*) FROM mailbox_leases l JOIN replicas r ON r.incarnation = l.owner \
         WHERE r.expires_at > now() GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        owners,
        vec![("r3".to_owned(), 300), ("r4".to_owned(), 300)],
        "{owners:?}"
    );
    let store = store_for(&url, "default").await;
    mirrors(&store, &sim, &tuples, interval * 3).await;
    let v = sim.lock().violations();
    assert_eq!((v.retry_after, v.concurrency), (0, 0), "{v:?}");
    eprintln!(
        "3 replicas, {} tuples, {edits} edits: worst lag {seen_worst:.1} s (bound {bound} s)",
        tuples.len()
    );
    r3.stop();
    r4.stop();
}
