//! What a whole tenant costs beyond its delta rounds: one discovery pass over its users (with
//! and without listing every mailbox's calendars), and re-basing every rolling window by a day
//! (one full round of each new window) against the steady polling it adds to (BENCHMARKS.md,
//! "Rolling windows and discovery").

use crate::sim::{SimProcess, request_mix};
use crate::{BenchArgs, cpu_seconds, window};
use anyhow::bail;
use calsync_engine::{CalendarPick, Members, Outcome, Source, Tuple, TupleConfig};
use chrono::Duration as ChronoDuration;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TenantArgs {
    /// Mailboxes in the tenant.
    #[arg(long, default_value_t = 10_000)]
    pub users: u32,
    /// Events per mailbox in the window (30% of them recurring series, whose instances count).
    #[arg(long, default_value_t = 20)]
    pub events_per_user: u32,
    /// `Prefer: odata.maxpagesize`.
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// The interval the steady polling is compared at.
    #[arg(long, default_value = "5m")]
    pub interval: humantime::Duration,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long)]
    pub graph_sim: Option<std::path::PathBuf>,
}

struct Measured {
    wall: f64,
    cpu: f64,
    requests: u64,
    pages: u64,
    rows: u64,
}

async fn measure<F: std::future::Future<Output = anyhow::Result<(u64, u64)>>>(
    base: &str,
    me: &str,
    f: F,
) -> anyhow::Result<Measured> {
    let mark = request_mix(base, 0).await?.last_seq;
    let (cpu0, t0) = (cpu_seconds(me)?, Instant::now());
    let (pages, rows) = f.await?;
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds(me)? - cpu0);
    let requests = request_mix(base, mark).await?.last_seq - mark;
    Ok(Measured {
        wall,
        cpu,
        requests,
        pages,
        rows,
    })
}

fn synced(outcomes: &[(Tuple, Outcome)]) -> anyhow::Result<(u64, u64)> {
    let (mut pages, mut rows) = (0, 0);
    for (t, o) in outcomes {
        match o {
            Outcome::Synced(r) => {
                pages += u64::from(r.pages);
                rows += r.upserted + r.removed + r.swept;
            }
            other => bail!("tuple {} did not sync: {other:?}", t.key),
        }
    }
    Ok((pages, rows))
}

fn source(calendars: CalendarPick) -> Source {
    let w = window();
    Source {
        name: "staff".into(),
        members: Members::Users {
            filter: Some("accountEnabled eq true".into()),
        },
        calendars,
        exclude: Default::default(),
        window: calsync_engine::WindowSpec::fixed(w),
        interval: None,
        schedule: None,
    }
}

pub(crate) async fn tenant(args: TenantArgs) -> anyhow::Result<()> {
    let me = std::process::id().to_string();
    let sim_args = BenchArgs {
        users: args.users,
        events_per_user: args.events_per_user,
        recurring: 0.3,
        page_size: args.page_size,
        graph_sim: args.graph_sim.clone(),
        database_url: args.database_url.clone(),
        ..BenchArgs::for_tenant(args.users, args.events_per_user, Default::default())
    };
    let sim = SimProcess::start(&sim_args)?;
    let base = sim.base.clone();
    let db = calsync_testkit::ScratchDatabase::open(
        args.database_url.as_deref(),
        "calsync_bench_tenant",
    )
    .await?;
    let cfg = crate::config_for_sim_endpoints(
        &crate::SimEndpoints { base: base.clone() },
        &db.url,
        args.page_size,
    )?;
    let (engine, _) = calsync::commands::build(&cfg).await?;
    println!(
        "calsync bench tenant — {} mailboxes, {} events each (30% recurring), page size {}\n",
        args.users, args.events_per_user, args.page_size
    );

    // 1. Discovery passes.
    let recheck = Duration::from_secs(86_400);
    let anchor = chrono::Utc::now();
    let mut found = Vec::new();
    for (label, pick) in [
        (
            "default calendars (no request per mailbox)",
            CalendarPick::Default,
        ),
        (
            "every calendar (one listing per mailbox)",
            CalendarPick::All,
        ),
    ] {
        let sources = [source(pick)];
        let m = measure(&base, &me, async {
            let d = engine.discover(&sources, anchor, recheck).await?;
            let n = d.tuples.len() as u64;
            found = d.tuples;
            Ok((0, n))
        })
        .await?;
        println!(
            "discovery pass, {label}: {} calendars in {:.2} s, {} requests, calsync CPU {:.2} s",
            m.rows, m.wall, m.requests, m.cpu
        );
    }

    // 2. The windows: initial rounds, one steady no-change round, then a re-base by a day.
    let cancel = CancellationToken::new();
    let tuples = engine.register(&found).await?;
    let initial = measure(&base, &me, async {
        synced(&engine.sync_all_once(&tuples, &cancel).await)
    })
    .await?;
    let steady = measure(&base, &me, async {
        synced(&engine.sync_all_once(&tuples, &cancel).await)
    })
    .await?;
    let moved: Vec<TupleConfig> = tuples
        .iter()
        .map(|t| {
            let mut c = t.config();
            c.window.start += ChronoDuration::days(1);
            c.window.end += ChronoDuration::days(1);
            c
        })
        .collect();
    let moved = engine.register(&moved).await?;
    let rebase = measure(&base, &me, async {
        synced(&engine.sync_all_once(&moved, &cancel).await)
    })
    .await?;
    let n = tuples.len() as f64;
    for (label, m) in [
        ("initial rounds", &initial),
        ("no-change rounds", &steady),
        ("re-base by a day", &rebase),
    ] {
        println!(
            "{label}: {} pages, {} requests, {} rows written, {:.1} s, calsync CPU {:.2} s ({:.0} us per calendar)",
            m.pages,
            m.requests,
            m.rows,
            m.wall,
            m.cpu,
            m.cpu / n * 1e6
        );
    }
    let interval: Duration = args.interval.into();
    let polls = 86_400.0 / interval.as_secs_f64();
    let per_day = steady.requests as f64 * polls;
    println!(
        "\nper day for these {} calendars at a {} interval: {:.0} delta requests; one re-base adds {} requests ({:.2}%) and {:.1} s of calsync CPU ({:.1} s for the polling)",
        tuples.len(),
        humantime::format_duration(interval),
        per_day,
        rebase.requests,
        rebase.requests as f64 / per_day * 100.0,
        rebase.cpu,
        steady.cpu * polls
    );
    println!(
        "fixed monthly segments instead (a 12-month window is 13 segments, each polled): {:.0} delta requests per day ({:.1}x), each re-base a small initial round of one segment",
        per_day * 13.0,
        13.0
    );
    Ok(())
}
