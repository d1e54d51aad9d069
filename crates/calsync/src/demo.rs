//! `calsync demo`: the whole product on one machine. Starts the Graph simulator with a seeded
//! tenant, a database (`DATABASE_URL`, or a throwaway local cluster), syncs every calendar,
//! then plays rounds of edits and deletions — and one lost delta token — checking after each
//! round that the read model equals the simulator's truth; last, runs the daemon with push on and
//! times how fast an edit reaches the read model.

use crate::config::{Config, DatabaseConfig, LogFormat};
use anyhow::Context;
use calsync_engine::{Engine, Outcome, SyncSettings, Tuple, TupleConfig};
use calsync_graph::{CalendarRef, ViewWindow};
use calsync_testkit::{ScratchDatabase, verify};
use chrono::{Duration as ChronoDuration, Utc};
use graph_sim::churn::random_edit;
use graph_sim::{GenerateSpec, Scenario, SimConfig, Window};
use rand::SeedableRng;
use rand::rngs::StdRng;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `calsync demo`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Users in the simulated tenant.
    #[arg(long, default_value_t = 6)]
    pub users: u32,
    /// Events per user (a recurring series counts once).
    #[arg(long, default_value_t = 80)]
    pub events_per_user: u32,
    /// Rounds of edits after the initial sync.
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    /// Random edits per calendar per round.
    #[arg(long, default_value_t = 4)]
    pub edits: u32,
    /// Seed for the tenant and the edits.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// PostgreSQL server to use (a database `calsync_demo` is created on it). Without it, a
    /// throwaway cluster is started from the PostgreSQL binaries on PATH.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
}

/// A calsync config pointing at a simulator at `origin` (`http://127.0.0.1:port`): one tuple
/// per calendar listed.
pub fn config_for_sim(
    origin: &str,
    db_url: &str,
    calendars: &[(String, String, String)],
    window: ViewWindow,
    sync: SyncSettings,
    page_size: u32,
) -> anyhow::Result<Config> {
    let graph = calsync_testkit::sim::graph(origin, page_size)?;
    let auth = calsync_testkit::sim::auth(origin)?;
    let tuples: Vec<TupleConfig> = calendars
        .iter()
        .map(|(key, user, cal)| TupleConfig {
            key: key.clone(),
            user: user.clone(),
            account: None,
            calendar: if cal == "default" {
                CalendarRef::Default
            } else {
                CalendarRef::Id(cal.clone())
            },
            window,
            rolling: None,
            schedule: None,
            interval: None,
        })
        .collect();
    Ok(Config {
        database: DatabaseConfig {
            url: SecretString::from(db_url.to_owned()),
            max_connections: 8,
            connect_timeout: Duration::from_secs(10),
            wait_at_start: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            extra_root_pem: None,
            native_roots: false,
        },
        graph,
        auth,
        sync,
        log_format: LogFormat::Text,
        log_filter: "warn".into(),
        admin_token: None,
        metric_labels: crate::config::MetricLabels::Name,
        warnings: Vec::new(),
        http_listen: None,
        drain_deadline: Duration::from_secs(8),
        on_remove: crate::config::OnRemove::Keep,
        ownership: crate::config::Ownership {
            deployment: calsync_store::DEFAULT_DEPLOYMENT.into(),
            replica: "demo".into(),
            lease_ttl: Duration::from_secs(20),
        },
        window_rebase: calsync_engine::Rebase::default(),
        sources: Vec::new(),
        discovery: crate::config::DiscoverySettings {
            every: Duration::from_secs(3600),
            refused_recheck: Duration::from_secs(86_400),
            max_untrack_percent: 50,
        },
        digest: format!("demo-{}", tuples.len()),
        push: None,
        changes: crate::config::ChangesConfig {
            enabled: true,
            retention: calsync_store::changes::DEFAULT_RETENTION,
            payload: false,
        },
        sinks: Vec::new(),
        vault: None,
        anchor: chrono::Utc::now(),
        tuples,
    })
}

fn summarize(outcomes: &[(Tuple, Outcome)]) -> (u32, u64, u64, u64, usize, usize) {
    let (mut pages, mut up, mut rm, mut sw, mut full, mut failed) = (0, 0, 0, 0, 0, 0);
    for (_, o) in outcomes {
        match o {
            Outcome::Synced(r) => {
                pages += r.pages;
                up += r.upserted;
                rm += r.removed;
                sw += r.swept;
                full += usize::from(r.full);
            }
            _ => failed += 1,
        }
    }
    (pages, up, rm, sw, full, failed)
}

async fn check(engine: &Engine, sim: &graph_sim::Sim, tuples: &[Tuple]) -> anyhow::Result<bool> {
    let divergences = verify::compare(engine.store(), sim, tuples).await?;
    let bad: Vec<_> = divergences.iter().filter(|d| !d.is_empty()).collect();
    let events: usize = {
        let mut n = 0;
        for t in tuples {
            n += engine.store().event_summaries(&t.key).await?.len();
        }
        n
    };
    if bad.is_empty() {
        println!(
            "    ✓ read model equals Graph's truth: {events} instances in {} windows",
            tuples.len()
        );
        Ok(true)
    } else {
        for d in bad {
            println!(
                "    ✗ {}: {} missing, {} extra, {} different",
                d.tuple,
                d.missing.len(),
                d.extra.len(),
                d.different.len()
            );
        }
        Ok(false)
    }
}

/// Runs the demo: a simulated tenant, a throwaway database, the daemon's sync, churn and a truth check after every round. `Ok(false)` when a check failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    println!("calsync demo — mirror Microsoft Graph calendars into PostgreSQL\n");

    let scenario = Scenario {
        sim: SimConfig {
            seed: args.seed,
            default_page_size: 25,
            ..SimConfig::default()
        },
        generate: Some(GenerateSpec {
            users: args.users,
            events_per_user: args.events_per_user,
            recurring: 0.3,
            extra_calendars: 1,
        }),
        ..Scenario::default()
    };
    let sim = scenario.build()?;
    let server = sim
        .serve("127.0.0.1:0")
        .await
        .context("cannot start the Graph simulator")?;
    let event_count = {
        let mut st = sim.lock();
        // What a directory holds beside people: a room, and a guest without a mailbox.
        st.tenant.add_directory_user(
            "room-atlas@contoso.onmicrosoft.com",
            "Atlas (room)",
            graph_sim::MailboxKind::Room,
            None,
        );
        st.tenant.add_directory_user(
            "guest@contoso.onmicrosoft.com",
            "A guest",
            graph_sim::MailboxKind::None,
            None,
        );
        st.tenant
            .users
            .iter()
            .flat_map(|u| &u.calendars)
            .map(|c| c.events.len())
            .sum::<usize>()
    };
    println!(
        "[1/5] Graph simulator on {} — {} users, {} events (30% recurring)",
        server.graph_base_url(),
        args.users,
        event_count
    );

    let db = ScratchDatabase::open(args.database_url.as_deref(), "calsync_demo").await?;
    println!(
        "[2/5] PostgreSQL at {} ({})",
        crate::config::redact_url(&db.url),
        if db.is_local() {
            "throwaway local cluster"
        } else {
            "from DATABASE_URL"
        }
    );

    // A rolling window, as `start = "-120d"`, `end = "+240d"` configures it: fixed at today's
    // anchor (midnight UTC), moved a day at the end of the demo.
    let rebase = calsync_engine::Rebase::default();
    let spec = calsync_engine::WindowSpec {
        start: calsync_engine::Edge::Offset(ChronoDuration::days(-120)),
        end: calsync_engine::Edge::Offset(ChronoDuration::days(240)),
    };
    let today = rebase.anchor(Utc::now());
    let window = spec
        .at(today)
        .ok_or_else(|| anyhow::anyhow!("the demo's window is empty"))?;
    let sync = SyncSettings {
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(2),
        ..SyncSettings::default()
    };
    let mut cfg = config_for_sim(
        &format!("http://{}", server.addr),
        &db.url,
        &[],
        window,
        sync,
        50,
    )?;
    // Two source lines instead of a list of calendars: every calendar of every enabled user,
    // and the rooms.
    let source = |name: &str, members, calendars| calsync_engine::Source {
        name: name.into(),
        members,
        calendars,
        exclude: Default::default(),
        window: spec,
        interval: None,
        schedule: None,
    };
    cfg.sources = vec![
        source(
            "staff",
            calsync_engine::Members::Users {
                filter: Some("accountEnabled eq true".into()),
            },
            calsync_engine::CalendarPick::All,
        ),
        source(
            "rooms",
            calsync_engine::Members::Rooms,
            calsync_engine::CalendarPick::Default,
        ),
    ];
    let (engine, tuples) = crate::commands::build(&cfg).await?;
    println!(
        "      migrated; sources 'staff' (users where accountEnabled eq true, every calendar; the guest has no mailbox) and 'rooms' found {} calendars; rolling window -120d..+240d: {} → {}",
        tuples.len(),
        window.start.date_naive(),
        window.end.date_naive()
    );

    let cancel = CancellationToken::new();
    let started = Instant::now();
    let outcomes = engine.sync_all_once(&tuples, &cancel).await;
    let (pages, up, _, _, _, failed) = summarize(&outcomes);
    println!(
        "[3/5] initial sync: {pages} pages, {up} instances written in {:.2}s{}",
        started.elapsed().as_secs_f64(),
        if failed > 0 {
            format!(", {failed} tuples FAILED")
        } else {
            String::new()
        }
    );
    let mut all_ok = failed == 0 && check(&engine, &sim, &tuples).await?;

    println!(
        "[4/5] {} rounds of edits, each followed by a delta round",
        args.rounds
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    for round in 1..=args.rounds {
        let mut counts: BTreeMap<&'static str, u32> = BTreeMap::new();
        {
            let mut st = sim.lock();
            let w = Window {
                start: window.start,
                end: window.end,
            };
            for t in &tuples {
                let Some(ui) = st.tenant.user_index(&t.user) else {
                    continue;
                };
                let ci = match &t.calendar {
                    CalendarRef::Default => 0,
                    CalendarRef::Id(id) => st.tenant.users[ui].calendar_index(id).unwrap_or(0),
                };
                for _ in 0..args.edits {
                    if let Some(e) = random_edit(&mut st.tenant, &mut rng, ui, ci, &w) {
                        *counts.entry(e.label()).or_default() += 1;
                    }
                }
            }
        }
        let lost = round == 2.min(args.rounds);
        if lost {
            // As Outlook evicts old delta tokens from its cache: the next replay answers 410.
            sim.lock().cache.evict(None);
        }
        let edits: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "  round {round}: {}{}",
            edits.join(", "),
            if lost {
                "; and Graph lost every delta token (410 SyncStateNotFound)"
            } else {
                ""
            }
        );
        let started = Instant::now();
        let outcomes = engine.sync_all_once(&tuples, &cancel).await;
        let (pages, up, rm, sw, full, failed) = summarize(&outcomes);
        println!(
            "    synced in {:.2}s: {pages} pages, {up} upserted, {rm} removed, {sw} swept{}{}",
            started.elapsed().as_secs_f64(),
            if full > 0 {
                format!(", {full} full resyncs")
            } else {
                String::new()
            },
            if failed > 0 {
                format!(", {failed} FAILED")
            } else {
                String::new()
            }
        );
        all_ok &= failed == 0 && check(&engine, &sim, &tuples).await?;
    }

    // The next anchor: what `calsync run` does at midnight. One full round of each new window;
    // the read model serves the old window until that round's last page switches it.
    let tomorrow = rebase.next(Utc::now());
    let moved: Vec<calsync_engine::TupleConfig> = tuples
        .iter()
        .map(|t| {
            let mut c = t.config();
            c.window = spec.at(tomorrow).unwrap_or(c.window);
            c
        })
        .collect();
    let tuples = engine.register(&moved).await?;
    let started = Instant::now();
    let outcomes = engine.sync_all_once(&tuples, &cancel).await;
    let (pages, up, _, sw, _, failed) = summarize(&outcomes);
    println!(
        "  the window rolls a day ({} → {}): {pages} pages, {up} rows written, {sw} swept in {:.2}s{}",
        tuples
            .first()
            .map_or(window.start, |t| t.window.start)
            .date_naive(),
        tuples
            .first()
            .map_or(window.end, |t| t.window.end)
            .date_naive(),
        started.elapsed().as_secs_f64(),
        if failed > 0 {
            format!(", {failed} FAILED")
        } else {
            String::new()
        }
    );
    all_ok &= failed == 0 && check(&engine, &sim, &tuples).await?;

    all_ok &= push(&cfg, &sim, &engine, &tuples).await?;

    let Some(shown) = tuples
        .iter()
        .find(|t| t.key.starts_with("staff:"))
        .or(tuples.first())
    else {
        anyhow::bail!("the demo's sources found no calendar");
    };
    println!("\nThe read model, as an app would query it:");
    println!(
        "  SELECT subject, start_at, end_at, event_type FROM calendar_events WHERE tuple_key = '{}' ORDER BY start_at LIMIT 5;",
        shown.key
    );
    let mut rows = engine.store().event_summaries(&shown.key).await?;
    rows.sort_by_key(|r| r.start_at);
    let now = Utc::now();
    for r in rows
        .iter()
        .filter(|r| r.start_at.is_some_and(|s| s >= now))
        .take(5)
    {
        println!(
            "  {:<34} {}  {:<16}",
            r.subject.as_deref().unwrap_or(""),
            r.start_at
                .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_default(),
            r.event_type.as_deref().unwrap_or("")
        );
    }
    println!("\ncalsync status:");
    print!(
        "{}",
        crate::commands::status_table(&engine.store().status().await?)
    );
    println!(
        "\n{} in {:.1}s",
        if all_ok {
            "demo complete: every round matched Graph's truth"
        } else {
            "demo FAILED: the read model diverged"
        },
        t0.elapsed().as_secs_f64()
    );
    server.stop().await;
    Ok(all_ok)
}

/// `[5/5]`: the daemon (`calsync run`) with push on, graph-sim delivering its notifications
/// within a second: edits in a few calendars reach the read model in about that, with a poll
/// interval of ten minutes. `Ok(false)` if an edit did not arrive in 20 s.
async fn push(
    cfg: &Config,
    sim: &graph_sim::Sim,
    engine: &Engine,
    tuples: &[Tuple],
) -> anyhow::Result<bool> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port for the push receiver")?
        .port();
    let base = url::Url::parse(&format!("http://127.0.0.1:{port}/graph"))?;
    let mut cfg = cfg.clone();
    cfg.sync.interval = Duration::from_secs(600);
    cfg.push = Some(crate::config::PushConfig {
        notification_url: base.join("graph/notifications")?,
        lifecycle_url: base.join("graph/lifecycle")?,
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        lifetime: Duration::from_secs(24 * 3600),
        renew_before: Duration::from_secs(12 * 3600),
        backstop_interval: Duration::from_secs(1800),
    });
    {
        let mut st = sim.lock();
        st.push.settings.delay_ms = 200;
        st.push.settings.jitter_ms = 800;
    }
    let app = crate::service::App::build(cfg, None).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (_hangup, hangups) = tokio::sync::mpsc::unbounded_channel();
    let daemon = tokio::spawn(app.run(
        async move {
            let _ = stopped.await;
        },
        hangups,
    ));
    let store = engine.store();
    let people: Vec<&Tuple> = tuples
        .iter()
        .filter(|t| t.key.starts_with("staff:") && matches!(t.calendar, CalendarRef::Default))
        .take(5)
        .collect();
    let subscribed = Instant::now();
    let mut active = 0;
    while subscribed.elapsed() < Duration::from_secs(30) {
        active = store
            .push_counts()
            .await?
            .iter()
            .find(|(s, _)| s == "active")
            .map_or(0, |(_, n)| *n);
        if active as usize >= people.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut took = Vec::new();
    for (i, t) in people.iter().enumerate() {
        let subject = format!("Booked through the demo #{i}");
        {
            let mut st = sim.lock();
            let Some(u) = st.tenant.user_index(&t.user) else {
                continue;
            };
            let start = (t.window.start + ChronoDuration::days(130))
                .format("%Y-%m-%dT10:00:00")
                .to_string();
            let end = (t.window.start + ChronoDuration::days(130))
                .format("%Y-%m-%dT11:00:00")
                .to_string();
            let body = serde_json::json!({"subject": subject,
                "start": {"dateTime": start, "timeZone": "UTC"},
                "end": {"dateTime": end, "timeZone": "UTC"}});
            let patch = graph_sim::writes::EventPatch::from_json(&body)
                .map_err(|e| anyhow::anyhow!("the demo's event is not one: {e:?}"))?;
            st.tenant
                .create_event(u, 0, &patch)
                .map_err(|e| anyhow::anyhow!("graph-sim refused the demo's event: {e:?}"))?;
        }
        let written = Instant::now();
        loop {
            let rows = store.event_summaries(&t.key).await?;
            if rows
                .iter()
                .any(|r| r.subject.as_deref() == Some(subject.as_str()))
            {
                took.push(written.elapsed());
                break;
            }
            if written.elapsed() > Duration::from_secs(20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = stop.send(());
    let _ = daemon.await;
    took.sort();
    let arrived = took.len() == people.len() && !people.is_empty();
    let ms = |d: Option<&Duration>| d.map_or(0, |d| d.as_millis());
    println!(
        "[5/5] push: the daemon with [push] on, {active} calendars subscribed; {} of {} edits reached the read model, median {} ms, slowest {} ms (poll interval 10 min)",
        took.len(),
        people.len(),
        ms(took.get(took.len() / 2)),
        ms(took.last())
    );
    Ok(arrived)
}
