//! `calsync-bench`: the numbers in BENCHMARKS.md, measured against the simulator on loopback.
//!
//! The simulator is the real `graph-sim` binary in a child process, so that calsync's CPU time
//! (read from /proc) is calsync's alone, and the simulator's own cost is measured beside it.
//! The idle-memory figure comes from a second child (`calsync-bench idle`) that holds 100,000
//! scheduled tuples and nothing else.
//!
//! Longer than 600 lines because each benchmark with its printed report is one function here
//! (ingest, memory, restart); the larger ones already have their own modules.
//!
//! | module | owns |
//! |---|---|
//! | `scale` | the real daemon keeping many calendars fresh (`calsync-bench scale`) |
//! | `push` | the daemon with push on under a storm of writes (`calsync-bench push`) |
//! | `tenant` | a discovery pass over a tenant and a re-base of every window |
//! | `sim` | the graph-sim binary as a child process, and its admin API |
//!
//! The ingest, memory and restart benchmarks are here in `main.rs`.

use anyhow::{Context, bail};
use calsync::config::Config;
use calsync::demo::config_for_sim;
use calsync_engine::{Engine, Outcome, SyncSettings, Tuple, TupleConfig};
use calsync_graph::{CalendarRef, ViewWindow};
use calsync_store::TupleSpec;
use calsync_testkit::ScratchDatabase;
use chrono::{Duration as ChronoDuration, Utc};
use clap::{Parser, Subcommand};
use std::process::{Command, Stdio};

mod push;
mod scale;
mod tenant;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

mod sim;

use sim::{RequestMix, SimProcess, request_mix, sim_admin, sim_admin_with};

/// Measure ingest, no-change rounds and idle memory against graph-sim (BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(name = "calsync-bench")]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Debug, Subcommand)]
enum Child {
    /// Register and schedule N tuples, idle, report resident memory (run by the benchmark).
    #[command(hide = true)]
    Idle(IdleArgs),
    /// Peak memory of a full sync of many mailboxes with large pages against a slowed
    /// database, with and without the page memory budget (BENCHMARKS.md).
    Memory(MemoryArgs),
    /// One measured sync for `memory` (run by it).
    #[command(hide = true)]
    MeasuredSync(MemoryChildArgs),
    /// The real daemon (one or more replicas) keeping many calendars fresh: start to READY,
    /// CPU per round, lag, RSS, log volume (BENCHMARKS.md, "Scale").
    Scale(scale::ScaleArgs),
    /// A whole tenant's extra costs: a discovery pass over its users, and re-basing every
    /// rolling window by a day (BENCHMARKS.md, "Rolling windows and discovery").
    Tenant(tenant::TenantArgs),
    /// The daemon with push on: write -> row latency under a storm of writes, the receiver's
    /// answer times, Graph requests per day against polling (BENCHMARKS.md, "Push").
    Push(push::PushArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct MemoryArgs {
    /// Mailboxes (one tracked calendar each).
    #[arg(long, default_value_t = 2000)]
    pub tuples: u32,
    #[arg(long, default_value_t = 12)]
    pub events_per_user: u32,
    /// The budget measured (bytes); the same sync also runs with the budget off.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub budget: u64,
    /// Each page's database statement sleeps this long (a trigger with pg_sleep).
    #[arg(long, default_value_t = 20)]
    pub slow_ms: u32,
    /// Skip the run with the budget off (it needs gigabytes with many large pages).
    #[arg(long)]
    pub only_budgeted: bool,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long)]
    pub graph_sim: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct MemoryChildArgs {
    #[arg(long)]
    pub tuples: u32,
    #[arg(long)]
    pub budget: u64,
    #[arg(long)]
    pub prefix: String,
    #[arg(long)]
    pub database_url: String,
    #[arg(long)]
    pub graph_base_url: String,
}

#[derive(Debug, Clone, clap::Args)]
struct BenchArgs {
    /// Mailboxes in the simulated tenant (one tracked calendar each).
    #[arg(long, default_value_t = 40)]
    pub users: u32,
    #[arg(long, default_value_t = 400)]
    pub events_per_user: u32,
    #[arg(long, default_value_t = 0.3)]
    pub recurring: f64,
    /// `Prefer: odata.maxpagesize` for the ingest runs.
    #[arg(long, default_value_t = 200)]
    pub page_size: u32,
    /// Repetitions of the ingest and COPY measurements (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Batches of no-change rounds; each batch runs `noop_rounds` rounds of every tuple.
    #[arg(long, default_value_t = 15)]
    pub noop_batches: u32,
    #[arg(long, default_value_t = 10)]
    pub noop_rounds: u32,
    /// Churn rounds measured (random edits, then one incremental round of every tuple).
    #[arg(long, default_value_t = 3)]
    pub churn_batches: u32,
    /// Random edits per churn round, spread over the mailboxes.
    #[arg(long, default_value_t = 400)]
    pub churn_edits: u32,
    /// Tuples registered and scheduled for the idle-memory measurement.
    #[arg(long, default_value_t = 100_000)]
    pub idle_tuples: u32,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// The graph-sim binary; by default the one beside this binary (`cargo build --release
    /// -p graph-sim -p calsync-bench` puts both in target/release).
    #[arg(long)]
    pub graph_sim: Option<std::path::PathBuf>,
}

impl BenchArgs {
    /// A generated tenant of `users` mailboxes with `events` singles each, served by the
    /// graph-sim binary at `graph_sim`.
    pub(crate) fn for_tenant(users: u32, events: u32, graph_sim: std::path::PathBuf) -> Self {
        BenchArgs {
            users,
            events_per_user: events,
            recurring: 0.0,
            page_size: 200,
            reps: 1,
            noop_batches: 0,
            noop_rounds: 0,
            churn_batches: 0,
            churn_edits: 0,
            idle_tuples: 0,
            database_url: None,
            graph_sim: Some(graph_sim),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct IdleArgs {
    #[arg(long)]
    pub tuples: u32,
    #[arg(long)]
    pub database_url: String,
    #[arg(long)]
    pub graph_base_url: String,
}

/// CPU seconds a process has used, summed over its threads from `/proc/<pid>/task/*/schedstat`
/// (nanosecond precision, unlike the 10 ms ticks of `/proc/<pid>/stat`).
pub(crate) fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let dir =
        std::fs::read_dir(format!("/proc/{pid}/task")).context("cannot read /proc (Linux only)")?;
    let mut ns: u128 = 0;
    for task in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u128>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e9)
}

fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One measured churn round: wall seconds, calsync CPU seconds, rows changed, requests.
struct ChurnRound {
    wall: f64,
    cpu: f64,
    changed: u64,
    mix: RequestMix,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn window() -> ViewWindow {
    let today = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    ViewWindow {
        start: today - ChronoDuration::days(120),
        end: today + ChronoDuration::days(240),
    }
}

fn tuple_configs(users: u32, prefix: &str) -> Vec<TupleConfig> {
    (0..users)
        .map(|i| TupleConfig {
            key: format!("{prefix}{i:04}"),
            user: format!("user{i:04}@contoso.onmicrosoft.com"),
            account: None,
            calendar: CalendarRef::Default,
            window: window(),
            rolling: None,
            schedule: None,
            interval: None,
        })
        .collect()
}

async fn register_all(engine: &Engine, configs: &[TupleConfig]) -> anyhow::Result<Vec<Tuple>> {
    Ok(engine.register(configs).await?)
}

fn count(outcomes: &[(Tuple, Outcome)]) -> anyhow::Result<u64> {
    let mut n = 0;
    for (t, o) in outcomes {
        match o {
            Outcome::Synced(r) => n += r.upserted,
            other => bail!("tuple {} did not sync: {other:?}", t.key),
        }
    }
    Ok(n)
}

/// The change feed as an ingest run writes it (issue 25).
#[derive(Debug, Clone, Copy)]
enum Feed {
    /// On, as by default: rows without their payload.
    On,
    /// Off (`changes.enabled = false`).
    Off,
    /// On with `changes.payload = true`.
    WithPayload,
}

impl Feed {
    fn suffix(self) -> &'static str {
        match self {
            Feed::On => "",
            Feed::Off => "off",
            Feed::WithPayload => "payload",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Feed::On => "on",
            Feed::Off => "off",
            Feed::WithPayload => "with payload",
        }
    }
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let me = std::process::id().to_string();
    let sim = SimProcess::start(&args)?;
    let sim_base = sim.base.clone();
    let db = ScratchDatabase::open(args.database_url.as_deref(), "calsync_bench").await?;
    println!(
        "calsync bench — {} mailboxes × {} events ({}% recurring), page size {}, simulator pid {}",
        args.users,
        args.events_per_user,
        (args.recurring * 100.0) as u32,
        args.page_size,
        sim.pid()
    );
    println!(
        "database: {}{}\n",
        calsync::config::redact_url(&db.url),
        if db.is_local() {
            " (throwaway local cluster)"
        } else {
            ""
        }
    );

    let server_like = SimEndpoints {
        base: sim_base.clone(),
    };
    let cfg: Config = config_for_sim_endpoints(&server_like, &db.url, args.page_size)?;
    let (engine, _) = calsync::commands::build(&cfg).await?;
    let cancel = CancellationToken::new();

    // 1. Initial-sync ingest versus COPY of the same rows into the same table, with the change
    //    feed on (the default) and off, alternated rep by rep (issue 25: the feed's cost).
    let mut off_cfg = cfg.clone();
    off_cfg.changes.enabled = false;
    let (engine_off, _) = calsync::commands::build(&off_cfg).await?;
    let mut payload_cfg = cfg.clone();
    payload_cfg.changes.payload = true;
    let (engine_payload, _) = calsync::commands::build(&payload_cfg).await?;
    let mut ingest_payload_rates = Vec::new();
    let mut all_configs: Vec<TupleConfig> = Vec::new();
    let mut ingest_rates = Vec::new();
    let mut ingest_off_rates = Vec::new();
    let mut copy_rates = Vec::new();
    let mut cpu_per_100k = Vec::new();
    let mut cpu_off_per_100k = Vec::new();
    let mut sim_per_100k = Vec::new();
    let mut last_tuples = Vec::new();
    for rep in 0..args.reps {
        // The feed on (default: rows without their payload), off, and on with the payload,
        // in an order that rotates rep by rep.
        let mut order = [Feed::On, Feed::Off, Feed::WithPayload];
        order.rotate_left(rep as usize % 3);
        let mut on_tuples = Vec::new();
        for variant in order {
            let prefix = format!("ingest{rep}{}-", variant.suffix());
            let configs = tuple_configs(args.users, &prefix);
            all_configs.extend(configs.iter().cloned());
            let engine = match variant {
                Feed::On => &engine,
                Feed::Off => &engine_off,
                Feed::WithPayload => &engine_payload,
            };
            let tuples: Vec<Tuple> = register_all(engine, &all_configs)
                .await?
                .into_iter()
                .filter(|t| t.key.starts_with(&prefix))
                .collect();
            engine.store().settle_for_benchmark().await;
            let mark = request_mix(&sim_base, 0).await?.last_seq;
            let (cpu0, sim0, t0) = (cpu_seconds(&me)?, cpu_seconds(&sim.pid())?, Instant::now());
            let outcomes = engine.sync_all_once(&tuples, &cancel).await;
            let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(&me)? - cpu0);
            let sim_cpu = cpu_seconds(&sim.pid())? - sim0;
            let mix = request_mix(&sim_base, mark).await?;
            let events = count(&outcomes)?;
            let ingest = events as f64 / wall;
            println!(
                "  ingest rep {} feed {:<12}: {events} events in {wall:.2}s = {ingest:.0} events/s (calsync CPU {cpu:.2}s); requests: {} delta pages, {} master GETs, {} /instances",
                rep + 1,
                variant.label(),
                mix.delta,
                mix.masters,
                mix.instances
            );
            match variant {
                Feed::On => {
                    ingest_rates.push(ingest);
                    cpu_per_100k.push(cpu / events as f64 * 100_000.0);
                    sim_per_100k.push(sim_cpu / events as f64 * 100_000.0);
                    on_tuples = tuples;
                }
                Feed::Off => {
                    ingest_off_rates.push(ingest);
                    cpu_off_per_100k.push(cpu / events as f64 * 100_000.0);
                }
                Feed::WithPayload => ingest_payload_rates.push(ingest),
            }
        }
        let tuples = on_tuples;
        // COPY the same rows into fresh tuples of the same table.
        let copy_keys: Vec<TupleSpec> = tuples
            .iter()
            .map(|t| TupleSpec {
                key: format!("copy{rep}-{}", t.key),
                user_id: t.user.clone(),
                mailbox: t.user.clone(),
                calendar_id: "default".into(),
                window_start: t.window.start,
                window_end: t.window.end,
                settings: None,
            })
            .collect();
        let mut specs: Vec<TupleSpec> = all_configs
            .iter()
            .map(|c| TupleSpec {
                key: c.key.clone(),
                user_id: c.user.clone(),
                mailbox: c.user.clone(),
                calendar_id: "default".into(),
                window_start: c.window.start,
                window_end: c.window.end,
                settings: None,
            })
            .collect();
        specs.extend(copy_keys.iter().cloned());
        let states = engine_off.store().register_tuples(&specs).await?;
        let pairs: Vec<(i64, i64)> = tuples
            .iter()
            .filter_map(|t| {
                let to = states
                    .iter()
                    .find(|s| s.tuple_key == format!("copy{rep}-{}", t.key))?
                    .id;
                Some((t.id, to))
            })
            .collect();
        engine.store().settle_for_benchmark().await;
        let (copy_time, copied) =
            calsync_store::copy_rows_for_benchmark(engine.store(), &pairs).await?;
        let copy = copied as f64 / copy_time.as_secs_f64();
        println!(
            "  COPY rep {}: {copied} rows in {:.2}s = {copy:.0} rows/s",
            rep + 1,
            copy_time.as_secs_f64(),
        );
        copy_rates.push(copy);
        last_tuples = tuples;
    }

    // 1a. The feed's reader: every change kept, read in pages of 1,000 by calsync_changes.
    engine.store().feed_settled().await?;
    let (t0, mut read, mut cursor) = (Instant::now(), 0usize, None::<String>);
    loop {
        let page = engine
            .store()
            .changes_after(cursor.as_deref(), 1000)
            .await?;
        read += page.len();
        match page.last() {
            Some(last) => cursor = Some(last.cursor.clone()),
            None => break,
        }
    }
    let reader_rate = read as f64 / t0.elapsed().as_secs_f64();
    println!(
        "  feed reader: {read} changes in {:.2}s = {reader_rate:.0} changes/s",
        t0.elapsed().as_secs_f64()
    );

    // 1b. The same full round when Outlook lists no series masters at all (the harshest reading
    //     of the reports): every series' master is fetched before its stubs commit.
    sim_admin_with(
        &sim_base,
        "PUT",
        "behaviour",
        r#"{"profile": "outlook", "list_series_masters": false}"#,
    )
    .await?;
    let configs = tuple_configs(args.users, "hydrate-");
    all_configs.extend(configs.iter().cloned());
    let hydrating: Vec<Tuple> = register_all(&engine, &all_configs)
        .await?
        .into_iter()
        .filter(|t| t.key.starts_with("hydrate-"))
        .collect();
    let mark = request_mix(&sim_base, 0).await?.last_seq;
    let (cpu0, t0) = (cpu_seconds(&me)?, Instant::now());
    let outcomes = engine.sync_all_once(&hydrating, &cancel).await;
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(&me)? - cpu0);
    let events = count(&outcomes)?;
    let hydrate_mix = request_mix(&sim_base, mark).await?;
    let hydrate_rate = events as f64 / wall;
    println!(
        "  ingest without listed masters: {events} events in {wall:.2}s = {hydrate_rate:.0} events/s (calsync CPU {cpu:.2}s); requests: {} delta pages, {} master GETs, {} /instances",
        hydrate_mix.delta, hydrate_mix.masters, hydrate_mix.instances
    );
    sim_admin_with(&sim_base, "PUT", "behaviour", r#"{"profile": "outlook"}"#).await?;

    // 2. No-change incremental rounds, on a database that has finished digesting the bulk load
    //    (the daemon's steady state).
    engine.store().settle_for_benchmark().await;
    println!("  (database settled: VACUUM ANALYZE, CHECKPOINT)");
    let mut client_us = Vec::new();
    let mut sim_us = Vec::new();
    let tuples = last_tuples;
    engine.sync_all_once(&tuples, &cancel).await;
    for _ in 0..args.noop_batches {
        let (c0, s0) = (cpu_seconds(&me)?, cpu_seconds(&sim.pid())?);
        for _ in 0..args.noop_rounds {
            let outcomes = engine.sync_all_once(&tuples, &cancel).await;
            for (t, o) in &outcomes {
                match o {
                    Outcome::Synced(r) if r.upserted == 0 && r.removed == 0 && r.pages == 1 => {}
                    other => bail!("{}: expected a no-change round, got {other:?}", t.key),
                }
            }
        }
        let (c1, s1) = (cpu_seconds(&me)?, cpu_seconds(&sim.pid())?);
        let rounds = (tuples.len() as u32 * args.noop_rounds) as f64;
        client_us.push((c1 - c0) / rounds * 1e6);
        sim_us.push((s1 - s0) / rounds * 1e6);
    }
    let noop_client = median(client_us.clone());
    let noop_sim = median(sim_us.clone());

    // 3. A churn round: random realistic edits (series edits, cancelled occurrences, retimed
    //    and deleted series…) across every mailbox, then one incremental round of each tuple,
    //    with the extra requests Outlook's series call for (master GETs, /instances).
    let w = window();
    let mut churn = Vec::new();
    for batch in 0..args.churn_batches {
        let mark = request_mix(&sim_base, 0).await?.last_seq;
        let edits = sim_admin(
            &sim_base,
            "POST",
            &format!(
                "churn?edits={}&seed={}&start={}&end={}",
                args.churn_edits,
                batch + 1,
                w.start.format("%Y-%m-%dT%H:%M:%SZ"),
                w.end.format("%Y-%m-%dT%H:%M:%SZ")
            ),
        )
        .await?;
        let (cpu0, t0) = (cpu_seconds(&me)?, Instant::now());
        let outcomes = engine.sync_all_once(&tuples, &cancel).await;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(&me)? - cpu0);
        let mut changed = 0;
        for (t, o) in &outcomes {
            match o {
                Outcome::Synced(r) if !r.full => changed += r.upserted + r.removed,
                other => bail!("{}: expected an incremental round, got {other:?}", t.key),
            }
        }
        let mix = request_mix(&sim_base, mark).await?;
        println!(
            "  churn batch {}: {edits} → {changed} rows changed in {wall:.2}s (calsync CPU {cpu:.2}s); requests: {} delta pages, {} master GETs, {} /instances",
            batch + 1,
            mix.delta,
            mix.masters,
            mix.instances
        );
        churn.push(ChurnRound {
            wall,
            cpu,
            changed,
            mix,
        });
    }

    // 4. Idle memory with many tuples, in a process that does nothing else.
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([
            "idle",
            "--tuples",
            &args.idle_tuples.to_string(),
            "--database-url",
            &db.url,
            "--graph-base-url",
            &format!("{sim_base}/v1.0"),
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the idle-memory process")?;
    let idle = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        bail!("the idle-memory process failed: {idle}");
    }

    let ingest = median(ingest_rates);
    let ingest_off = median(ingest_off_rates);
    let ingest_payload = median(ingest_payload_rates);
    let copy = median(copy_rates);
    println!(
        "\nresults (medians of {} ingest reps, {} no-change batches of {} rounds):",
        args.reps,
        args.noop_batches,
        tuples.len() as u32 * args.noop_rounds
    );
    println!("  initial-sync ingest          {ingest:>10.0} events/s");
    println!("  plain COPY, same rows/table  {copy:>10.0} rows/s");
    println!(
        "  ingest / COPY                {:>10.2}×   (target ≥ 0.5×)",
        ingest / copy
    );
    println!(
        "  ingest, feed off             {ingest_off:>10.0} events/s   ({:.2}× COPY); the feed costs {:.1}% (goal ≤ 15%)",
        ingest_off / copy,
        (1.0 - ingest / ingest_off) * 100.0
    );
    println!(
        "  ingest, feed with payload    {ingest_payload:>10.0} events/s   ({:.2}× COPY); costs {:.1}% (changes.payload = true)",
        ingest_payload / copy,
        (1.0 - ingest_payload / ingest_off) * 100.0
    );
    let (client_100k, sim_100k) = (median(cpu_per_100k), median(sim_per_100k));
    let client_off_100k = median(cpu_off_per_100k);
    println!(
        "  CPU per 100,000 events       {client_100k:>10.2} s   (feed off {client_off_100k:.2} s)"
    );
    println!("  feed reader                  {reader_rate:>10.0} changes/s");
    println!(
        "  ingest, no masters listed    {hydrate_rate:>10.0} events/s   ({:.2}× COPY; {} master GETs for {} delta pages)",
        hydrate_rate / copy,
        hydrate_mix.masters,
        hydrate_mix.delta
    );
    println!(
        "  simulator CPU, same events   {sim_100k:>10.2} s   ({:.2}× calsync's)",
        sim_100k / client_100k.max(f64::EPSILON)
    );
    println!("  CPU per no-change round      {noop_client:>10.1} µs  (calsync; target ≤ 100 µs)");
    println!(
        "  simulator CPU per same round {noop_sim:>10.1} µs  ({:.2}× calsync's)",
        noop_sim / noop_client.max(f64::EPSILON)
    );
    println!(
        "  idle with {} tuples    {idle}  (target ≤ 256 MB)",
        args.idle_tuples
    );
    if !churn.is_empty() {
        let rounds = tuples.len() as f64;
        let med = |f: &dyn Fn(&ChurnRound) -> f64| median(churn.iter().map(f).collect());
        println!(
            "  churn round ({} edits, {} tuples, medians of {}): {:.2} s wall, {:.2} s calsync CPU, {:.0} rows changed",
            args.churn_edits,
            tuples.len(),
            churn.len(),
            med(&|c| c.wall),
            med(&|c| c.cpu),
            med(&|c| c.changed as f64)
        );
        println!(
            "    requests per tuple-round: {:.2} delta pages + {:.2} master GETs + {:.2} /instances",
            med(&|c| c.mix.delta as f64) / rounds,
            med(&|c| c.mix.masters as f64) / rounds,
            med(&|c| c.mix.instances as f64) / rounds
        );
    }
    Ok(())
}

pub(crate) struct SimEndpoints {
    pub(crate) base: String,
}

pub(crate) fn config_for_sim_endpoints(
    sim: &SimEndpoints,
    db_url: &str,
    page_size: u32,
) -> anyhow::Result<Config> {
    let settings = SyncSettings {
        max_in_flight: 64,
        ..SyncSettings::default()
    };
    let mut cfg = config_for_sim_base(&sim.base, db_url, settings, page_size)?;
    cfg.database.max_connections = 16;
    Ok(cfg)
}

fn config_for_sim_base(
    origin: &str,
    db_url: &str,
    sync: SyncSettings,
    page_size: u32,
) -> anyhow::Result<Config> {
    config_for_sim(origin, db_url, &[], window(), sync, page_size)
}

/// The memory measurement: a tenant whose large series come on single oversized pages
/// (graph-sim's quirk), a database whose every write sleeps, and a full sync of every mailbox at
/// once, in a child process per setting so each peak RSS is its own.
async fn memory(args: MemoryArgs) -> anyhow::Result<()> {
    let sim_args = BenchArgs {
        users: args.tuples,
        events_per_user: args.events_per_user,
        recurring: 0.6,
        page_size: 200,
        reps: 0,
        noop_batches: 0,
        noop_rounds: 0,
        churn_batches: 0,
        churn_edits: 0,
        idle_tuples: 0,
        database_url: None,
        graph_sim: args.graph_sim.clone(),
    };
    // A tenant whose every tenth mailbox has a daily series with a 100 KB body across the whole
    // window: with series never split and occurrences sent in full, each of those comes as one
    // ~20 MB page.
    let dir = std::env::temp_dir().join(format!("calsync-bench-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let scenario = dir.join("scenario.toml");
    std::fs::write(
        &scenario,
        memory_scenario(args.tuples, args.events_per_user),
    )?;
    let sim = SimProcess::start_with(&sim_args, Some(&scenario))?;
    sim_admin_with(
        &sim.base,
        "PUT",
        "quirks",
        r#"{"oversize_series_pages": true}"#,
    )
    .await?;
    // Full occurrences (the documented shape; Outlook's stubs would keep these pages small),
    // so each big series arrives as one page of 200 × 100 KB.
    sim_admin_with(
        &sim.base,
        "PUT",
        "behaviour",
        r#"{"profile": "outlook", "stub_occurrences": false}"#,
    )
    .await?;
    let db = ScratchDatabase::open(args.database_url.as_deref(), "calsync_bench_memory").await?;
    let store = calsync_store::Store::connect(&db.url, &calsync_store::ConnectOptions::new(2))
        .await
        .context("cannot connect to the benchmark database")?;
    store.migrate().await?;
    store
        .slow_down_writes_for_benchmark(args.slow_ms)
        .await
        .context("cannot install the slowing trigger")?;
    println!(
        "calsync memory — {} mailboxes × {} events, every tenth with a daily series carrying a 100 KB body (occurrences in full, series never split across pages), every page write sleeps {} ms",
        args.tuples, args.events_per_user, args.slow_ms
    );
    let exe = std::env::current_exe()?;
    let runs: &[(u64, &str)] = if args.only_budgeted {
        &[(args.budget, "budget-")]
    } else {
        &[(args.budget, "budget-"), (0, "nobudget-")]
    };
    for &(budget, prefix) in runs {
        let out = Command::new(&exe)
            .args([
                "measured-sync",
                "--tuples",
                &args.tuples.to_string(),
                "--budget",
                &budget.to_string(),
                "--prefix",
                prefix,
                "--database-url",
                &db.url,
                "--graph-base-url",
                &format!("{}/v1.0", sim.base),
            ])
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run the measured sync")?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() {
            bail!("the measured sync failed: {said}");
        }
        let what = if budget == 0 {
            "budget off".to_owned()
        } else {
            format!("budget {} MiB", budget / (1024 * 1024))
        };
        println!("  {what:<16} {said}");
    }
    let log = sim_admin(&sim.base, "GET", "requests").await?;
    let mut sizes: Vec<u64> = log
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| {
                    r["path"]
                        .as_str()
                        .is_some_and(|p| p.contains("calendarView"))
                })
                .filter_map(|r| r["bytes"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    sizes.sort_unstable();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    if let (Some(max), false) = (sizes.last(), sizes.is_empty()) {
        println!(
            "  delta pages: {} (largest {:.1} MiB, {} of 10 MiB or more, median {:.2} MiB)",
            sizes.len(),
            mib(*max),
            sizes.iter().filter(|b| **b >= 10 * 1024 * 1024).count(),
            mib(sizes[sizes.len() / 2])
        );
    }
    Ok(())
}

/// The memory benchmark's tenant as a graph-sim scenario: `users` mailboxes with `singles`
/// small events each, and every tenth with a daily series (200 occurrences from 100 days ago)
/// whose 100 KB body every occurrence carries.
fn memory_scenario(users: u32, singles: u32) -> String {
    use std::fmt::Write as _;
    let today = Utc::now().date_naive();
    let start = today - ChronoDuration::days(100);
    let body = "<p>".to_owned() + &"minutes of the weekly review ".repeat(3500) + "</p>";
    let mut out = String::from("[sim]\nseed = 42\n");
    for i in 0..users {
        let _ = write!(
            out,
            "\n[[users]]\nupn = \"user{i:04}@contoso.onmicrosoft.com\"\n"
        );
        for d in 0..singles {
            let day = today + ChronoDuration::days(i64::from(d) * 3 - 20);
            let _ = write!(
                out,
                "\n[[users.events]]\nsubject = \"meeting {d}\"\nstart = {{ dateTime = \"{day}T10:00:00\", timeZone = \"UTC\" }}\nend = {{ dateTime = \"{day}T10:30:00\", timeZone = \"UTC\" }}\n"
            );
        }
        if i % 10 == 0 {
            let _ = write!(
                out,
                "\n[[users.events]]\nsubject = \"daily review\"\nbody = {{ contentType = \"html\", content = \"{body}\" }}\nstart = {{ dateTime = \"{start}T09:00:00\", timeZone = \"UTC\" }}\nend = {{ dateTime = \"{start}T09:30:00\", timeZone = \"UTC\" }}\nrecurrence = {{ pattern = {{ type = \"daily\", interval = 1 }}, range = {{ type = \"numbered\", startDate = \"{start}\", numberOfOccurrences = 200 }} }}\n"
            );
        }
    }
    out
}

async fn memory_child(args: MemoryChildArgs) -> anyhow::Result<()> {
    let base = args.graph_base_url.trim_end_matches("/v1.0").to_owned();
    let mut cfg = config_for_sim_base(&base, &args.database_url, SyncSettings::default(), 200)?;
    cfg.graph.page_memory_budget = args.budget as usize;
    cfg.graph.max_page_bytes = 256 * 1024 * 1024;
    cfg.database.max_connections = 16;
    let (engine, _) = calsync::commands::build(&cfg).await?;
    let configs = tuple_configs(args.tuples, &args.prefix);
    let tuples = engine.register(&configs).await?;
    let before = rss_mib("VmRSS:");
    let t0 = Instant::now();
    let outcomes = engine
        .sync_all_once(&tuples, &CancellationToken::new())
        .await;
    let wall = t0.elapsed().as_secs_f64();
    let events = count(&outcomes)?;
    let hwm = rss_mib("VmHWM:");
    println!(
        "peak RSS {hwm:.1} MiB ({before:.1} MiB before the sync; {events} events in {wall:.1} s)"
    );
    Ok(())
}

async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let base = args.graph_base_url.trim_end_matches("/v1.0").to_owned();
    let settings = SyncSettings {
        interval: Duration::from_secs(3600),
        startup_spread: Duration::from_secs(3600),
        ..SyncSettings::default()
    };
    let cfg = config_for_sim_base(&base, &args.database_url, settings, 100)?;
    let (engine, _) = calsync::commands::build(&cfg).await?;
    let before = rss_mib("VmRSS:");
    let configs = tuple_configs(args.tuples, "idle-");
    let tuples = engine.register(&configs).await?;
    let task_bytes = tuples.first().map_or(0, |t| engine.idle_task_size(t));
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (engine, cancel) = (engine.clone(), cancel.clone());
        async move { engine.run(tuples, cancel).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_mib("VmRSS:");
    let hwm = rss_mib("VmHWM:");
    cancel.cancel();
    let _ = run.await;
    println!(
        "RSS {rss:.1} MiB (peak {hwm:.1} MiB; {before:.1} MiB before registering; {task_bytes} bytes per idle task future)"
    );
    Ok(())
}

/// mimalloc instead of the system allocator: parsing pages into JSON trees and writing them
/// out again is allocation-heavy (a quarter of ingest CPU was in glibc malloc/free), and the
/// image's musl allocator is slower still.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    calsync::telemetry::init(calsync::config::LogFormat::Text, "error");
    let r = rt.block_on(async {
        match cli.child {
            Some(Child::Idle(a)) => idle(a).await,
            Some(Child::Memory(a)) => memory(a).await,
            Some(Child::MeasuredSync(a)) => memory_child(a).await,
            Some(Child::Scale(a)) => scale::scale(a).await,
            Some(Child::Tenant(a)) => tenant::tenant(a).await,
            Some(Child::Push(a)) => push::push(a).await,
            None => run(cli.args).await,
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
