//! `calsync-bench push`: the real daemon with push on against the real graph-sim binary
//! delivering change notifications (issue 24). Many calendars subscribed, a storm of writes
//! applied by graph-sim at a known instant each, and the time until each write's row is in the
//! read model; the receiver's answer times as graph-sim saw them; and Graph requests per day
//! while quiet, against what polling every calendar at `--poll` costs.

use crate::BenchArgs;
use crate::scale::{Daemon, config};
use crate::sim::{SimProcess, sim_admin, sim_admin_with};
use anyhow::{Context, bail};
use calsync_store::Store;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PushArgs {
    /// Calendars (one mailbox each), all subscribed.
    #[arg(long, default_value_t = 10_000)]
    pub tuples: u32,
    /// Writes per second in the storm.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// How long the storm lasts.
    #[arg(long, default_value = "10s")]
    pub storm: humantime::Duration,
    /// The quiet span over which Graph requests are counted afterwards.
    #[arg(long, default_value = "120s")]
    pub quiet: humantime::Duration,
    /// `push.backstop_interval`.
    #[arg(long, default_value = "30m")]
    pub backstop: humantime::Duration,
    /// The polling interval push is compared with (`sync.interval` without push).
    #[arg(long, default_value = "5m")]
    pub poll: humantime::Duration,
    /// `database.max_connections` of the daemon.
    #[arg(long, default_value_t = 8)]
    pub connections: u32,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// The graph-sim and calsync binaries' directory (default: this binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// The machine's CPU time so far, from `/proc/stat`'s first line, in seconds: (busy, steal).
fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    Some((busy / 100.0, f.get(7)? / 100.0))
}

/// The CPU seconds of the daemon, graph-sim and the whole machine since `from`.
struct CpuMark {
    calsync: f64,
    sim: f64,
    machine: Option<(f64, f64)>,
}

impl CpuMark {
    fn now(calsync: u32, sim: &str) -> Self {
        CpuMark {
            calsync: crate::cpu_seconds(&calsync.to_string()).unwrap_or(f64::NAN),
            sim: crate::cpu_seconds(sim).unwrap_or(f64::NAN),
            machine: machine_cpu(),
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn active(store: &Store) -> anyhow::Result<i64> {
    Ok(store
        .push_counts()
        .await?
        .iter()
        .find(|(s, _)| s == "active")
        .map_or(0, |(_, n)| *n))
}

pub(crate) async fn push(args: PushArgs) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("cannot locate this binary's directory")?
            .to_path_buf(),
    };
    let calsync = bin_dir.join("calsync");
    if !calsync.is_file() {
        bail!(
            "no calsync binary at {}: cargo build --release -p calsync -p graph-sim -p calsync-bench",
            calsync.display()
        );
    }
    let admin = args
        .database_url
        .clone()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = calsync_store::recreate_database(&admin, "calsync_push_bench").await?;
    let sim = SimProcess::start(&BenchArgs::for_tenant(
        args.tuples,
        2,
        bin_dir.join("graph-sim"),
    ))?;
    // Graph delivers half a second to three seconds after a write (issue 24's figure).
    sim_admin_with(
        &sim.base,
        "PUT",
        "push",
        r#"{"delay_ms": 500, "jitter_ms": 2500}"#,
    )
    .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let now = chrono::Utc::now();
    let day = |d: i64| {
        (now + chrono::Duration::days(d))
            .format("%Y-%m-%dT00:00:00Z")
            .to_string()
    };
    let (start, end) = (day(-90), day(365));
    let poll: Duration = args.poll.into();
    let backstop: Duration = args.backstop.into();
    let mut text = config(&db, &sim.base, poll, args.tuples, (&start, &end)).replacen(
        "max_connections = 8",
        &format!("max_connections = {}", args.connections),
        1,
    );
    text = text.replacen(
        "[service]",
        &format!(
            "[push]\nnotification_url = \"http://127.0.0.1:{port}/graph\"\nlisten = \"127.0.0.1:{port}\"\nbackstop_interval = \"{}s\"\n\n[service]",
            backstop.as_secs()
        ),
        1,
    );
    let dir = std::env::temp_dir().join(format!("calsync-push-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg_path = dir.join("calsync.toml");
    std::fs::write(&cfg_path, text)?;
    let store = Store::connect(&db, &calsync_store::ConnectOptions::new(2)).await?;
    let t = Instant::now();
    let mut daemon = Daemon::start(&calsync, &cfg_path, &dir, "r0")?;
    daemon.ready(t, Duration::from_secs(300))?;
    daemon.drain_notes()?;
    loop {
        let n = active(&store).await?;
        if n >= i64::from(args.tuples) {
            break;
        }
        if t.elapsed() > Duration::from_secs(900) {
            bail!(
                "only {n} of {} calendars subscribed after 15 minutes",
                args.tuples
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{} calendars subscribed {:.1} s after start (poll {} s, backstop {} s)",
        args.tuples,
        t.elapsed().as_secs_f64(),
        poll.as_secs(),
        backstop.as_secs()
    );
    // Let the initial rounds settle.
    tokio::time::sleep(Duration::from_secs(20)).await;

    // The storm: `rate` writes a second, in batches of a tenth of a second, each applied by
    // graph-sim under one lock at the instant recorded here (before the call: conservative).
    // Write k goes to mailbox k mod tuples (user{k:04}), an hour starting at a time of its
    // lap (k / tuples) over the mailboxes, so a mailbox written twice is told apart.
    let storm: Duration = args.storm.into();
    let per_tick = (args.rate / 10).max(1) as usize;
    let base = (now + chrono::Duration::days(30))
        .date_naive()
        .and_hms_opt(9, 0, 0)
        .context("09:00 is a time")?
        .and_utc();
    let at_lap = move |lap: usize| base + chrono::Duration::hours(2 * lap as i64);
    let tuple_of: HashMap<String, i64> = store.tuple_ids_by_user().await?.into_iter().collect();
    let tuple_ids: Vec<i64> = (0..args.tuples)
        .map(|i| {
            tuple_of
                .get(&format!("user{i:04}@contoso.onmicrosoft.com"))
                .copied()
                .with_context(|| format!("no tuple for user{i:04}"))
        })
        .collect::<anyhow::Result<_>>()?;
    // Rows are looked for every 50 ms from the storm's start on, beside the writes: for each
    // write sent and not seen yet, one index probe (its tuple, its start). The watcher stops
    // when the storm is over and it saw every write, or after three minutes.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let watcher = {
        let store = store.clone();
        let tuple_ids = tuple_ids.clone();
        let tuples = args.tuples as usize;
        tokio::spawn(async move {
            // lap -> tuple -> (write, sent at)
            let mut pending: HashMap<usize, HashMap<i64, (usize, Instant)>> = HashMap::new();
            let mut seen: Vec<Duration> = Vec::new();
            let mut storm_over = false;
            let started = Instant::now();
            loop {
                loop {
                    match sent_rx.try_recv() {
                        Ok((k, at)) => {
                            pending
                                .entry(k / tuples)
                                .or_default()
                                .insert(tuple_ids[k % tuples], (k, at));
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                            storm_over = true;
                            break;
                        }
                    }
                }
                pending.retain(|_, m| !m.is_empty());
                if (storm_over && pending.is_empty())
                    || started.elapsed() > Duration::from_secs(180)
                {
                    break;
                }
                for (lap, waiting) in &mut pending {
                    let ids: Vec<i64> = waiting.keys().copied().collect();
                    if let Ok(found) = store.tuples_with_event_at(&ids, at_lap(*lap)).await {
                        let now = Instant::now();
                        for id in found {
                            if let Some((_, at)) = waiting.remove(&id) {
                                seen.push(now.saturating_duration_since(at));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };
    let begun = Instant::now();
    let begun_at = chrono::Utc::now();
    let cpu_from = CpuMark::now(daemon.pid(), &sim.pid());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut written = 0usize;
    let tuples = args.tuples as usize;
    while begun.elapsed() < storm {
        tick.tick().await;
        let sent = Instant::now();
        // One call per lap the tick's writes fall in.
        let mut k = written;
        while k < written + per_tick {
            let lap = k / tuples;
            let count = (written + per_tick).min((lap + 1) * tuples) - k;
            sim_admin(
                &sim.base,
                "POST",
                &format!(
                    "push/events?count={count}&offset={}&first={k}&prefix=storm-&at={}",
                    k % tuples,
                    at_lap(lap).format("%Y-%m-%dT%H:%M:%SZ")
                ),
            )
            .await?;
            k += count;
        }
        for k in written..written + per_tick {
            let _ = sent_tx.send((k, sent));
        }
        written += per_tick;
    }
    let storm_s = begun.elapsed().as_secs_f64();
    drop(sent_tx);
    let seen = watcher.await.context("the row watcher failed")?;
    let cpu_to = CpuMark::now(daemon.pid(), &sim.pid());
    let took = begun.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = seen.iter().map(Duration::as_secs_f64).collect();
    lat.sort_by(f64::total_cmp);
    println!(
        "storm: {written} writes in {storm_s:.1} s ({:.0}/s) over {} mailboxes; {} reached the read model",
        written as f64 / storm_s,
        written.min(args.tuples as usize),
        seen.len()
    );
    println!(
        "  write -> row: p50 {:.2} s, p90 {:.2} s, p99 {:.2} s, max {:.2} s (graph-sim delays its notifications 0.5-3 s; targets p50 <= 2 s, p99 <= 10 s)",
        quantile(&lat, 0.5),
        quantile(&lat, 0.9),
        quantile(&lat, 0.99),
        quantile(&lat, 1.0)
    );
    // Where calsync's share goes: each woken round's request, from its writing (the receiver)
    // to its taking (the wake path), and from its taking to its answer (the round's fetch and
    // commit), as the daemon recorded them in `round_requests`.
    let spans = store.push_request_spans(begun_at).await?;
    let mut taking: Vec<f64> = spans.iter().map(|s| s.0).collect();
    let mut round: Vec<f64> = spans.iter().map(|s| s.1).collect();
    taking.sort_by(f64::total_cmp);
    round.sort_by(f64::total_cmp);
    println!(
        "  of which in calsync ({} woken rounds): request -> taken p50 {:.0} ms, p99 {:.0} ms; taken -> round committed p50 {:.0} ms, p99 {:.0} ms",
        spans.len(),
        quantile(&taking, 0.5) * 1e3,
        quantile(&taking, 0.99) * 1e3,
        quantile(&round, 0.5) * 1e3,
        quantile(&round, 0.99) * 1e3
    );
    // The CPU the storm cost, from its start until its last row was seen: the daemon's and
    // graph-sim's own, and the machine's (the rest is mostly PostgreSQL). Wall-clock latency
    // on two shared cores varies from run to run; these vary much less.
    let (daemon_s, sim_s) = (cpu_to.calsync - cpu_from.calsync, cpu_to.sim - cpu_from.sim);
    if let (Some((b0, s0)), Some((b1, s1))) = (cpu_from.machine, cpu_to.machine) {
        let busy = b1 - b0;
        let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        println!(
            "  CPU over those {took:.1} s: machine {busy:.1} s busy of {:.1} ({:.0}%), steal {:.1} s; calsync {daemon_s:.1} s, graph-sim {sim_s:.1} s, the rest (PostgreSQL, this benchmark) {:.1} s; {:.2} ms per write",
            cores * took,
            busy / (cores * took) * 100.0,
            s1 - s0,
            busy - daemon_s - sim_s,
            busy / written as f64 * 1e3
        );
    }
    let p = sim_admin(&sim.base, "GET", "push").await?;
    let ms = |k: &str| p["answer_ms"][k].as_f64().unwrap_or(f64::NAN);
    println!(
        "  receiver answers as graph-sim saw them: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < 100 ms); {} notifications delivered, {} POSTs failed",
        ms("p50"),
        ms("p99"),
        ms("max"),
        p["stats"]["delivered"],
        p["stats"]["failed_posts"]
    );

    // Quiet: Graph requests per day with push (backstop polls, renewals), against polling
    // every calendar every `poll` (one replay per calendar per interval, batched 20 to a POST
    // but each counted by Graph).
    let quiet: Duration = args.quiet.into();
    let r0 = sim_admin(&sim.base, "GET", "stats").await?["requests"]
        .as_u64()
        .unwrap_or(0);
    let quiet_from = CpuMark::now(daemon.pid(), &sim.pid());
    tokio::time::sleep(quiet).await;
    let quiet_to = CpuMark::now(daemon.pid(), &sim.pid());
    let r1 = sim_admin(&sim.base, "GET", "stats").await?["requests"]
        .as_u64()
        .unwrap_or(0);
    let per_day = (r1 - r0) as f64 / quiet.as_secs_f64() * 86_400.0;
    if let (Some((b0, _)), Some((b1, _))) = (quiet_from.machine, quiet_to.machine) {
        println!(
            "  CPU while quiet: calsync {:.1}% of a core, the machine {:.1}% (keeping {} subscriptions, the backstop, leases)",
            (quiet_to.calsync - quiet_from.calsync) / quiet.as_secs_f64() * 100.0,
            (b1 - b0) / quiet.as_secs_f64() * 100.0,
            args.tuples
        );
    }
    // The backstop polls each calendar once per backstop interval; the first ones fall due a
    // backstop after the start, so a short quiet window right after it sees few or none.
    let backstop_day = f64::from(args.tuples) * 86_400.0 / backstop.as_secs_f64();
    let polling = f64::from(args.tuples) * 86_400.0 / poll.as_secs_f64();
    println!(
        "quiet {} s: {} Graph requests (= {:.0}/day; backstop replays fall due a backstop interval after each calendar's last round, so a window shorter than that sees few or none)",
        quiet.as_secs(),
        r1 - r0,
        per_day
    );
    println!(
        "  Graph requests per day with push: {backstop_day:.0} backstop replays (one per calendar every {} s) + one round per notified change; polling every {} s: {polling:.0} ({:.1}x the backstop)",
        backstop.as_secs(),
        poll.as_secs(),
        polling / backstop_day.max(1.0)
    );
    daemon.stop()?;
    if std::env::var_os("CALSYNC_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("kept {}", dir.display());
    }
    Ok(())
}
