//! The change feed under load (issue 25): 50 calendars synced concurrently through the engine
//! while Outlook-like churn edits them and registrations untrack and track calendars again,
//! and a follower reads the feed with `calsync_changes` all along. At each checkpoint (edits
//! and rounds paused) the follower's copy, built from the snapshot it started from, must be
//! `calendar_events` exactly. A second follower, reading the same table by its sequence alone
//! (`seq > cursor`, a plain BIGSERIAL outbox), must have missed changes in the same run: the
//! proof that the test would fail with such a cursor. Each write of the feed is followed by up
//! to 3 ms before its commit, as a database across a network has (the round trip of COMMIT).

use crate::harness::{harness, settings, window};
use calsync_engine::{Engine, Outcome, Tuple, TupleConfig};
use calsync_graph::CalendarRef;
use calsync_store::testing::{FeedReplica, RowKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const CALENDARS: usize = 50;
/// At least this many checkpoints, and more (up to `MAX_CHECKPOINTS`) until the sequence
/// follower has skipped a late commit.
const CHECKPOINTS: usize = 3;
const MAX_CHECKPOINTS: usize = 10;
const ROUNDS_PER_PHASE: usize = 6;

fn upn(i: usize) -> String {
    format!("feed{i}@contoso.onmicrosoft.com")
}

fn configs(skip: Option<usize>) -> Vec<TupleConfig> {
    (0..CALENDARS)
        .filter(|i| Some(*i) != skip)
        .map(|i| TupleConfig {
            key: format!("cal{i:02}"),
            user: upn(i),
            account: None,
            calendar: CalendarRef::Default,
            window: window(),
            rolling: None,
            schedule: None,
            interval: Some(Duration::from_secs(1)),
        })
        .collect()
}

/// A follower of the table by its sequence alone, as an outbox read by `id > cursor` is.
#[derive(Default)]
struct BySequence {
    after: i64,
    seen: HashSet<i64>,
    rows: BTreeMap<RowKey, serde_json::Value>,
}

impl BySequence {
    /// How many changes in the table it never read.
    async fn missed(&self, pool: &PgPool) -> usize {
        let all: i64 = sqlx::query_scalar("SELECT count(*) FROM calendar_changes")
            .fetch_one(pool)
            .await
            .unwrap();
        all as usize - self.seen.len()
    }

    async fn follow(&mut self, pool: &PgPool) {
        type Row = (
            i64,
            String,
            String,
            String,
            String,
            Option<serde_json::Value>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, deployment, tuple_key, event_id, op, calsync_change_data(data, fields, event_id) \
             FROM calendar_changes \
             WHERE seq > $1 ORDER BY seq",
        )
        .bind(self.after)
        .fetch_all(pool)
        .await
        .unwrap();
        for (seq, d, t, e, op, data) in rows {
            self.after = seq;
            self.seen.insert(seq);
            match (op.as_str(), data) {
                ("upsert", Some(data)) => {
                    self.rows.insert((d, t, e), data);
                }
                _ => {
                    self.rows.remove(&(d, t, e));
                }
            }
        }
    }
}

#[sqlx::test(migrations = false)]
async fn fifty_calendars_under_churn_replay_from_the_feed_to_exactly_the_view(pool: PgPool) {
    // A pool as large as the daemon's (the test's own has 5 connections): rounds commit
    // side by side as in production.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let h = harness(pool.clone(), 7).await;
    {
        let mut st = h.sim.lock();
        let mut rng = StdRng::seed_from_u64(25);
        let w = graph_sim::Window {
            start: window().start,
            end: window().end,
        };
        for i in 0..CALENDARS {
            let u = st.tenant.add_user(&upn(i), None, &format!("Feed {i}"));
            for _ in 0..4 {
                graph_sim::churn::random_edit(&mut st.tenant, &mut rng, u, 0, &w);
            }
        }
    }
    // Commits as slow as to a database across a network (up to 3 ms after the last write).
    h.store.slow_down_feed_commits_for_test(3).await.unwrap();
    let engine = h.engine(settings());
    // The follower starts from a snapshot of the empty view, before any calendar is known.
    let mut follower = FeedReplica::from_snapshot(&h.store).await.unwrap();
    let mut by_seq = BySequence::default();
    let mut tuples = engine.register(&configs(None)).await.unwrap();

    let mut checkpoint = 0;
    while checkpoint < CHECKPOINTS
        || (checkpoint < MAX_CHECKPOINTS && by_seq.missed(&pool).await == 0)
    {
        let editing = Arc::new(AtomicBool::new(true));
        let editor = std::thread::spawn({
            let (sim, editing) = (h.sim.clone(), Arc::clone(&editing));
            move || {
                let mut rng = StdRng::seed_from_u64(checkpoint as u64);
                let w = graph_sim::Window {
                    start: window().start,
                    end: window().end,
                };
                let mut edits = 0;
                while editing.load(Ordering::Relaxed) {
                    let mut st = sim.lock();
                    let i = rng.gen_range(0..CALENDARS);
                    if let Some(u) = st.tenant.user_index(&upn(i)) {
                        if graph_sim::churn::random_edit(&mut st.tenant, &mut rng, u, 0, &w)
                            .is_some()
                        {
                            edits += 1;
                        }
                    }
                    drop(st);
                    std::thread::sleep(Duration::from_millis(2));
                }
                edits
            }
        });
        let rounds: Vec<_> = tuples
            .iter()
            .cloned()
            .map(|t| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    for _ in 0..ROUNDS_PER_PHASE {
                        crate::harness::sync(&engine, &t).await;
                    }
                })
            })
            .collect();
        // A reload that drops one calendar and brings back the one dropped before, while
        // the rounds commit: registration's deletes and upserts interleave with pages.
        let reload = {
            let engine = engine.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                engine.register(&configs(Some(checkpoint))).await.unwrap();
            })
        };
        let mut reads = 0;
        while !rounds.iter().all(|r| r.is_finished()) {
            reads += follower.follow(&h.store, 37).await.unwrap();
            by_seq.follow(&pool).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        editing.store(false, Ordering::Relaxed);
        let edits = editor.join().unwrap();
        for r in rounds {
            r.await.unwrap();
        }
        reload.await.unwrap();
        reads += follower.catch_up(&h.store).await.unwrap();
        by_seq.follow(&pool).await;
        let view = h.store.view_as_feed_rows().await.unwrap();
        eprintln!(
            "checkpoint {checkpoint}: {edits} edits, {reads} changes read, {} rows shown",
            view.len()
        );
        assert!(reads > 0 && !view.is_empty());
        let differences = follower.differences(&view);
        assert!(
            differences.is_empty(),
            "checkpoint {checkpoint}: the feed replayed onto its snapshot is the view: {differences:?}"
        );
        tuples = engine.register(&configs(Some(checkpoint))).await.unwrap();
        let _ = engine_rounds_for_all(&engine, &tuples).await;
        checkpoint += 1;
    }

    // Every change once, each calendar's in its commit order: what the follower read is the
    // table, in feed order.
    follower.catch_up(&h.store).await.unwrap();
    let all: Vec<(i64, i64)> =
        sqlx::query_as("SELECT txid, seq FROM calendar_changes ORDER BY txid, seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    let read: Vec<(i64, i64)> = follower
        .applied
        .iter()
        .map(|c| {
            let (t, s) = c.cursor.split_once('.').unwrap();
            (t.parse().unwrap(), s.parse().unwrap())
        })
        .collect();
    assert_eq!(read, all, "every change read once, in feed order");
    by_seq.follow(&pool).await;
    let missed = all.len() - by_seq.seen.len();
    eprintln!(
        "{checkpoint} checkpoints, {} changes; a sequence cursor missed {missed}, its copy {} the view",
        all.len(),
        if by_seq.rows == h.store.view_as_feed_rows().await.unwrap() {
            "equals"
        } else {
            "differs from"
        }
    );
    assert!(
        missed > 0,
        "a follower of the sequence alone should have skipped late commits"
    );
}

/// One round of each tuple, so the next phase starts from deltaLinks.
async fn engine_rounds_for_all(engine: &Engine, tuples: &[Tuple]) -> usize {
    let mut n = 0;
    for t in tuples {
        if matches!(crate::harness::sync(engine, t).await, Outcome::Synced(_)) {
            n += 1;
        }
    }
    n
}

/// `calsync changes` as a script runs it: every change from the oldest kept, from a cursor,
/// as NDJSON; a bad cursor is a clear error; `--follow` prints a change committed while it
/// runs, woken by `NOTIFY calsync_changes` (its polling is set to a minute, so only the
/// notification can have woken it in time).
#[tokio::test(flavor = "multi_thread")]
async fn calsync_changes_prints_the_feed_and_follow_wakes_on_notify() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let url =
        calsync_store::recreate_database(&crate::harness::database_url(), "calsync_changes_cli")
            .await
            .unwrap();
    let store = calsync_store::Store::connect(&url, &calsync_store::ConnectOptions::new(4))
        .await
        .unwrap();
    let h = crate::harness::harness_on(store, 50).await;
    let first = h.create(crate::harness::single(
        "Kickoff",
        "2026-01-10T10:00:00",
        "2026-01-10T11:00:00",
    ));
    h.create(crate::harness::single(
        "Review",
        "2026-01-12T10:00:00",
        "2026-01-12T11:00:00",
    ));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    crate::harness::sync(&engine, &t).await;
    h.store.feed_settled().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("calsync.toml");
    std::fs::write(&config, format!("[database]\nurl = \"{url}\"\n")).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(crate::harness::BIN)
            .arg("changes")
            .args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&[]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines.iter().all(|l| l.contains("\tupsert\tdelta\tadele\t")),
        "{out}"
    );
    let (code, out, _) = run(&["--json"]);
    assert_eq!(code, Some(0));
    let json: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let subjects: Vec<&str> = json
        .iter()
        .map(|v| v["data"]["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects.len(), 2);
    assert!(
        subjects.contains(&"Kickoff") && subjects.contains(&"Review"),
        "{out}"
    );
    let first_cursor = json[0]["cursor"].as_str().unwrap().to_owned();
    let last_cursor = json[1]["cursor"].as_str().unwrap().to_owned();
    let (code, out, _) = run(&["--after", &first_cursor]);
    assert_eq!((code, out.lines().count()), (Some(0), 1), "{out}");
    let (code, _, err) = run(&["--after", "yesterday"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a cursor"), "{err}");

    let mut follower = Command::new(crate::harness::BIN)
        .args([
            "changes",
            "--follow",
            "--json",
            "--poll",
            "60s",
            "--after",
            &last_cursor,
        ])
        .arg("--config")
        .arg(&config)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // Let it read to the end and listen before the change commits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.delete(&first);
    crate::harness::sync(&engine, &t).await;
    let line = tokio::task::spawn_blocking(move || lines_rx.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap();
    // Our own child, stopped by its pid.
    let _ = follower.kill();
    let _ = follower.wait();
    let line = line.expect("--follow printed the change well before its 60 s poll");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["op"].as_str(), v["cause"].as_str()),
        (Some("delete"), Some("delta"))
    );
    assert_eq!(v["event_id"], first.as_str());
    h.server.stop().await;
}

/// `calsync run` with a `[[sinks]]` endpoint: the initial sync's changes arrive signed, in
/// batches of the configured size, and `/metrics` shows the sink's lag and deliveries.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_posts_the_feed_to_a_sink_and_reports_it_in_metrics() {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    const SECRET: &str = "sink-secret-0123456789";
    let url =
        calsync_store::recreate_database(&crate::harness::database_url(), "calsync_sink_daemon")
            .await
            .unwrap();
    let sim = graph_sim::Sim::new(&crate::harness::sim_config());
    {
        let mut st = sim.lock();
        let u = st.tenant.add_user(crate::harness::USER, None, "Adele");
        for d in 1..=5 {
            let p = graph_sim::writes::EventPatch::from_json(&crate::harness::single(
                &format!("Meeting {d}"),
                &format!("2026-02-{d:02}T10:00:00"),
                &format!("2026-02-{d:02}T11:00:00"),
            ))
            .unwrap();
            st.tenant.create_event(u, 0, &p).unwrap();
        }
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    // The endpoint: checks each request's signature, keeps the subjects.
    let got: Arc<std::sync::Mutex<Vec<(usize, String)>>> = Default::default();
    let app = {
        let got = Arc::clone(&got);
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |h: HeaderMap, body: Bytes| {
                let got = Arc::clone(&got);
                async move {
                    let ts: i64 = h["calsync-timestamp"].to_str().unwrap().parse().unwrap();
                    let sig = h["calsync-signature"].to_str().unwrap();
                    if !calsync_sinks::sign::verify(SECRET.as_bytes(), ts, &body, sig) {
                        return axum::http::StatusCode::UNAUTHORIZED;
                    }
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let changes = v["changes"].as_array().unwrap();
                    let mut got = got.lock().unwrap();
                    for c in changes {
                        let subject = c["data"]["subject"].as_str().unwrap_or("").to_owned();
                        got.push((changes.len(), subject));
                    }
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sink-secret"), format!("{SECRET}\n")).unwrap();
    let config = crate::harness::write_config(
        dir.path(),
        &url,
        &server,
        &format!(
            "[sync]\ninterval = \"1s\"\nstartup_spread = \"100ms\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n\
             [[sinks]]\nname = \"crm\"\nurl = \"http://{hook}/hook\"\nsecret_file = \"{}\"\nbatch = 2\nstart = \"oldest\"\n\n\
             [[calendars]]\nname = \"adele\"\nuser = \"{}\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n",
            dir.path().join("sink-secret").display(),
            crate::harness::USER
        ),
    );
    let log = dir.path().join("calsync.log");
    let _daemon = crate::harness::run_daemon(&config, &log);
    crate::harness::wait_for(
        "the sink received the initial sync",
        Duration::from_secs(30),
        async || got.lock().unwrap().len() >= 5,
    )
    .await;
    {
        let got = got.lock().unwrap();
        let mut subjects: Vec<&str> = got.iter().map(|g| g.1.as_str()).collect();
        subjects.sort();
        assert_eq!(
            subjects,
            [
                "Meeting 1",
                "Meeting 2",
                "Meeting 3",
                "Meeting 4",
                "Meeting 5"
            ]
        );
        assert!(
            got.iter().all(|g| g.0 <= 2),
            "batches of at most 2: {got:?}"
        );
    }
    let http = crate::harness::bound_addr(&std::fs::read_to_string(&log).unwrap()).unwrap();
    let mut metrics = String::new();
    crate::harness::wait_for("the sink's metrics", Duration::from_secs(10), async || {
        metrics = calsync::commands::local_request(http, "GET", "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metrics.contains("calsync_sink_delivered_total{sink=\"crm\"} 5")
    })
    .await;
    assert!(
        metrics.contains("calsync_sink_lag_seconds{sink=\"crm\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("calsync_sink_failing{sink=\"crm\"} 0"),
        "{metrics}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log_text.contains(SECRET),
        "the sink's secret never reaches the log"
    );
    serving.abort();
    server.stop().await;
}
