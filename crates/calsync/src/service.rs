//! `calsync run` as a service: the scheduler, systemd notification and watchdog, SIGHUP
//! reloads, the HTTP endpoint (/healthz, /readyz, /metrics, POST /reload) and the drain on
//! shutdown. `main` builds an [`App`] and runs it with the signal future.

use crate::commands;
use crate::config::{Config, OnRemove, RawConfig};
use anyhow::Context;
use calsync_engine::{Engine, LeaseKeeper, ScheduleChange, Scheduler, Tuple};
use calsync_store::ReplicaKind;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sd_notify::NotifyState;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// A round in flight that has made no progress (no request slot, no answer) for this long is
/// stuck, even while other rounds progress: the watchdog stops being fed and systemd restarts
/// the service. Every database call and Graph request has its own deadline, so only a bug or a
/// wait longer than any Retry-After or request budget can get here.
pub const STALL_LIMIT: Duration = Duration::from_secs(15 * 60);

/// How often `run` logs its one-line summary at info.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

type ReloadReply = oneshot::Sender<Result<ScheduleChange, String>>;

/// What the HTTP handlers and the main loop share.
pub struct Shared {
    engine: Engine,
    metrics: Option<PrometheusHandle>,
    started: Instant,
    /// Milliseconds since `started` of the main loop's last tick.
    tick_ms: AtomicU64,
    scheduler_running: AtomicBool,
    reload: mpsc::Sender<ReloadReply>,
    /// The bearer token `POST /reload` requires; `None`: reloading over HTTP is off.
    admin_token: Option<secrecy::SecretString>,
    /// How `/metrics` labels per-calendar series.
    metric_labels: crate::config::MetricLabels,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn tick(&self) {
        self.tick_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The main loop ticked within the last 10 s.
    pub fn alive(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.tick_ms.load(Ordering::Relaxed)) < 10_000
    }

    /// Alive, and no round stuck.
    fn making_progress(&self) -> bool {
        let l = self.engine.liveness();
        self.alive()
            && (l.rounds_in_flight == 0
                || (l.since_activity < STALL_LIMIT && l.longest_round_stall < STALL_LIMIT))
    }
}

/// A message for systemd, sent in order by one thread: the send blocks when the notify
/// socket's queue is full, and the main loop must never wait on systemd.
#[derive(Debug, Clone)]
enum Note {
    Ready(String),
    Reloading,
    Status(String),
    Watchdog,
    Stopping,
}

fn notifier() -> (std::sync::mpsc::Sender<Note>, oneshot::Receiver<()>) {
    let (tx, rx) = std::sync::mpsc::channel::<Note>();
    // Fires when every queued note was sent (the channel closed and drained).
    let (done_tx, done_rx) = oneshot::channel::<()>();
    // Outside systemd NOTIFY_SOCKET is unset and sending is a no-op.
    let spawned = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || {
            for note in rx {
                let r = match &note {
                    Note::Ready(status) => {
                        sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)])
                    }
                    Note::Reloading => sd_notify::notify(&[NotifyState::Reloading]),
                    Note::Status(status) => sd_notify::notify(&[NotifyState::Status(status)]),
                    Note::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
                    Note::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
                };
                if let Err(e) = r {
                    warn!(error = %e, "cannot notify systemd");
                }
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the systemd notifier thread");
    }
    (tx, done_rx)
}

fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let seconds = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("calsync_round_duration_seconds".into()),
            &seconds,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("calsync_throttle_wait_seconds".into()),
                &seconds,
            )
        })
        .context("cannot configure metrics")?
        .install_recorder()
        .context("cannot install the metrics recorder")
}

static METRICS: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// The process-wide Prometheus recorder, installed by the first [`App::build`] that wants one
/// (a recorder is global: later apps in the same process share it).
fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = METRICS.get() {
        return Ok(h.clone());
    }
    let h = install_metrics()?;
    Ok(METRICS.get_or_init(|| h).clone())
}

/// `calsync run`, built but not yet running: connected, migrated, tuples registered, the HTTP
/// endpoint bound. Tests build one in-process and read [`App::local_addr`].
pub struct App {
    cfg: Config,
    config_path: Option<PathBuf>,
    engine: Engine,
    tuples: Vec<calsync_engine::Tuple>,
    keeper: Arc<LeaseKeeper>,
    listener: Option<tokio::net::TcpListener>,
    metrics: Option<PrometheusHandle>,
    /// Whether `[[sources]]` were resolved at start (else a pass is tried again soon).
    sources_resolved: bool,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("tuples", &self.tuples.len())
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Connects (patiently), migrates, registers the configured calendars and binds
    /// `http.listen` (port 0 picks a free port: see [`App::local_addr`]).
    pub async fn build(cfg: Config, config_path: Option<PathBuf>) -> anyhow::Result<App> {
        // The recorder first, so the first rounds are counted.
        let metrics = match cfg.http_listen {
            Some(_) => Some(metrics_handle()?),
            None => None,
        };
        let (engine, tuples, keeper, sources_resolved) =
            commands::build_replica(&cfg, ReplicaKind::Run).await?;
        let keeper = Arc::new(keeper);
        let listener = match cfg.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on http.listen = {addr}"))?,
            ),
            None => None,
        };
        Ok(App {
            cfg,
            config_path,
            engine,
            tuples,
            keeper,
            listener,
            metrics,
            sources_resolved,
        })
    }

    /// Where the HTTP endpoint listens, if it is on.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until `shutdown` resolves, then drains. Every task it spawns is supervised: an
    /// HTTP endpoint or a tuple task that ends unexpectedly is an error, so the process exits
    /// non-zero and its supervisor restarts it.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let App {
            cfg,
            config_path,
            engine,
            tuples,
            keeper,
            listener,
            metrics,
            sources_resolved,
        } = self;
        let stop = CancellationToken::new();
        let mut scheduler = Scheduler::new(engine.clone(), stop.clone());
        let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadReply>(4);
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            metrics,
            started: Instant::now(),
            tick_ms: AtomicU64::new(0),
            scheduler_running: AtomicBool::new(false),
            reload: reload_tx,
            admin_token: cfg.admin_token.clone(),
            metric_labels: cfg.metric_labels,
        });
        let mut server = match listener {
            Some(listener) => {
                let addr = listener
                    .local_addr()
                    .context("cannot read the bound address")?;
                info!(%addr, "http endpoint listening");
                let app = crate::http::router(Arc::clone(&shared));
                let stop = stop.clone();
                Some(tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                }))
            }
            None => None,
        };

        // Leases are taken by the keeper's first heartbeat, at once and after READY: taking
        // 100,000 of them is a statement of seconds, and the scheduler starts each calendar as
        // soon as its mailbox is held.
        let (owned_tx, mut owned_rx) = tokio::sync::watch::channel(0u64);
        let stop_keeper = CancellationToken::new();
        let mut keeper_task = tokio::spawn({
            let keeper = Arc::clone(&keeper);
            let stop = stop_keeper.clone();
            async move { keeper.run(stop, owned_tx).await }
        });
        // One copy of each calendar, shared by this list and its task.
        let mut all_tuples = shared_tuples(tuples);
        owned_rx.borrow_and_update();
        scheduler.apply(owned_tuples(&engine, &all_tuples));
        shared.scheduler_running.store(true, Ordering::Relaxed);
        shared.tick();
        let mut current = cfg;
        // Registered: the config's own list of calendars is not read again (a reload brings
        // its own), and at 100,000 calendars it is megabytes. With sources it is kept: each
        // discovery pass registers it beside what the sources resolve to.
        if current.sources.is_empty() {
            drop(std::mem::take(&mut current.tuples));
        }
        // The next discovery pass: after `discovery.every`, or soon if the start's failed.
        let mut next_discovery = Instant::now()
            + if sources_resolved {
                current.discovery.every
            } else {
                DISCOVERY_RETRY
            };
        let mut discovering: Option<
            tokio::task::JoinHandle<Result<calsync_engine::Discovered, String>>,
        > = None;
        info!(
            tuples = scheduler.len(),
            configured = all_tuples.len(),
            "calsync running"
        );
        let (notes, notifier_done) = notifier();
        let notify = |n: Note| {
            let _ = notes.send(n);
        };
        notify(Note::Ready(status_line(
            &engine,
            all_tuples.len(),
            scheduler.len(),
        )));

        // Rolling windows were fixed at this anchor when the config was read; when it moves,
        // they are re-based (checked on every tick: one clock read).
        let mut anchor = current.window_rebase.anchor(chrono::Utc::now());
        let watchdog = sd_notify::watchdog_enabled();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ping = Instant::now();
        let mut last_status = Instant::now();
        // At info a no-change round logs nothing; this line says the quiet is work being done.
        let mut last_summary = Instant::now();
        let mut hup = hangup()?;
        tokio::pin!(shutdown);
        let mut fatal: Option<anyhow::Error> = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                // The endpoint ends only when `stop` fires; before that, its end is fatal.
                ended = async {
                    match server.as_mut() {
                        Some(s) => s.await,
                        None => std::future::pending().await,
                    }
                } => {
                    server = None;
                    let why = match ended {
                        Ok(Ok(())) => "stopped without being asked".to_owned(),
                        Ok(Err(e)) => format!("failed: {e}"),
                        Err(e) => format!("task ended abnormally: {e}"),
                    };
                    error!(reason = %why, "the http endpoint ended; stopping");
                    fatal = Some(anyhow::anyhow!("the http endpoint {why}"));
                    break;
                }
                ended = &mut keeper_task => {
                    error!(result = ?ended, "the lease keeper ended unexpectedly; stopping");
                    fatal = Some(anyhow::anyhow!("the lease keeper ended unexpectedly"));
                    break;
                }
                Ok(()) = owned_rx.changed() => {
                    owned_rx.borrow_and_update();
                    let change = scheduler.apply(owned_tuples(&engine, &all_tuples));
                    info!(mailboxes = engine.leases().map_or(0, |l| l.len()), tuples = scheduler.len(), started = change.added.len(),
                          stopped = change.removed.len(), "the calendars this replica syncs changed");
                }
                died = scheduler.task_died() => {
                    error!(reason = %died, "a tuple task ended unexpectedly; stopping");
                    fatal = Some(anyhow::anyhow!("a tuple task ended unexpectedly: {died}"));
                    break;
                }
                // SIGHUP and POST /reload do the same; only the HTTP caller waits for the answer.
                reply = async {
                    tokio::select! {
                        _ = hup.recv() => { info!("SIGHUP: reloading the config"); None }
                        Some(reply) = reload_rx.recv() => Some(reply),
                    }
                } => {
                    notify(Note::Reloading);
                    // A pass of the old sources must not land after the new config.
                    if let Some(pass) = discovering.take() {
                        pass.abort();
                    }
                    let r = reload(&mut scheduler, &engine, &keeper, &mut current, config_path.as_deref()).await;
                    let r = r.map(|(change, tuples)| {
                        all_tuples = tuples;
                        anchor = current.window_rebase.anchor(chrono::Utc::now());
                        // The reload resolved the sources.
                        next_discovery = Instant::now() + current.discovery.every;
                        change
                    });
                    notify(Note::Ready(status_line(&engine, all_tuples.len(), scheduler.len())));
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                found = async {
                    match discovering.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                } => {
                    discovering = None;
                    let found = found.map_err(|e| e.to_string()).and_then(|r| r);
                    match found {
                        Ok(found) => {
                            commands::log_discovered(&found);
                            // Each its interval explicitly: sync.interval may have been reloaded.
                            let every = current.sync.interval;
                            let found = found.tuples.into_iter().map(|t| calsync_engine::TupleConfig {
                                interval: Some(t.interval.unwrap_or(every)),
                                ..t
                            });
                            let mut configs = commands::merge_discovered(&current.tuples, found.collect());
                            // The pass (and the config) may predate the last re-base.
                            calsync_engine::at_anchor(&mut configs, anchor);
                            match register_and_apply(&mut scheduler, &engine, &keeper, &configs).await {
                                Ok((change, tuples)) => {
                                    all_tuples = tuples;
                                    if !(change.added.is_empty() && change.removed.is_empty() && change.restarted.is_empty()) {
                                        info!(added = ?change.added, removed = ?change.removed, restarted = ?change.restarted,
                                              "discovered calendars applied");
                                    }
                                    if current.on_remove == OnRemove::Purge {
                                        purge(&engine).await;
                                    }
                                    next_discovery = Instant::now() + current.discovery.every;
                                }
                                Err(e) => {
                                    warn!(error = %e, "cannot register the discovered calendars; trying again");
                                    next_discovery = Instant::now() + DISCOVERY_RETRY;
                                }
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot resolve [[sources]]; the calendars found before stay, trying again");
                            next_discovery = Instant::now() + DISCOVERY_RETRY;
                        }
                    }
                }
                _ = tick.tick() => {
                    shared.tick();
                    if !current.sources.is_empty() && discovering.is_none() && Instant::now() >= next_discovery {
                        let engine = engine.clone();
                        let sources = current.sources.clone();
                        let anchor = current.window_rebase.anchor(chrono::Utc::now());
                        let recheck = current.discovery.refused_recheck;
                        discovering = Some(tokio::spawn(async move {
                            engine.discover(&sources, anchor, recheck).await.map_err(|e| e.to_string())
                        }));
                    }
                    let now = current.window_rebase.anchor(chrono::Utc::now());
                    if now != anchor {
                        // Not moved if the database refuses: tried again at the next tick.
                        match rebase_windows(&mut scheduler, &engine, &all_tuples, now).await {
                            Ok(moved) => {
                                if let Some(tuples) = moved {
                                    all_tuples = tuples;
                                }
                                anchor = now;
                            }
                            Err(e) => warn!(error = %e, "cannot re-base the rolling windows; trying again"),
                        }
                    }
                    engine.cancel_stuck_rounds(engine.settings().stuck_round_after);
                    engine.forget_idle_mailboxes();
                    if let Some(m) = &shared.metrics {
                        m.run_upkeep();
                    }
                    if let Some(period) = watchdog {
                        if last_ping.elapsed() >= period / 2 {
                            if shared.making_progress() {
                                notify(Note::Watchdog);
                                last_ping = Instant::now();
                            } else {
                                warn!("a round made no progress for {}s; not feeding the watchdog", STALL_LIMIT.as_secs());
                            }
                        }
                    }
                    if last_summary.elapsed() >= SUMMARY_EVERY {
                        let t = engine.take_tally();
                        info!(rounds = t.synced, changed = t.changed, failed = t.failed,
                              scheduled = scheduler.len(), configured = all_tuples.len(),
                              leases = engine.leases().map_or(0, |l| l.len()),
                              period_secs = SUMMARY_EVERY.as_secs(), "summary");
                        last_summary = Instant::now();
                    }
                    if last_status.elapsed() >= Duration::from_secs(10) {
                        notify(Note::Status(status_line(&engine, all_tuples.len(), scheduler.len())));
                        last_status = Instant::now();
                    }
                }
            }
        }

        info!("shutdown requested; no new rounds start");
        notify(Note::Stopping);
        shared.scheduler_running.store(false, Ordering::Relaxed);
        stop.cancel();
        let deadline = current.drain_deadline;
        match tokio::time::timeout(deadline, scheduler.wait()).await {
            Ok(()) => info!("stopped cleanly"),
            Err(_) => {
                let abandoned = engine.rounds_running();
                warn!(
                    deadline_ms = deadline.as_millis() as u64,
                    abandoned = ?abandoned,
                    "drain deadline passed; abandoning rounds in flight (their last committed page stands)"
                );
            }
        }
        // Leases go last, once no round of ours can commit: the other replicas take the
        // mailboxes at their next heartbeat instead of after service.lease_ttl.
        stop_keeper.cancel();
        keeper_task.abort();
        match keeper.retire().await {
            Ok(()) => info!("mailbox leases released"),
            Err(e) => {
                warn!(error = %e, "cannot release the mailbox leases; other replicas take them after service.lease_ttl")
            }
        }
        if let Some(s) = server {
            match tokio::time::timeout(Duration::from_secs(1), s).await {
                Ok(Ok(Err(e))) => warn!(error = %e, "the http endpoint failed while stopping"),
                Ok(Err(e)) => warn!(error = %e, "the http endpoint task ended abnormally"),
                _ => {}
            }
        }
        // STOPPING=1 and anything queued reach systemd before the process exits (bounded: a
        // notify socket that stopped reading must not hold the exit).
        drop(notes);
        // Never a blocking join: a notify socket nobody reads would hold the exit forever.
        let _ = tokio::time::timeout(Duration::from_secs(1), notifier_done).await;
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn status_line(engine: &Engine, configured: usize, scheduled: usize) -> String {
    let l = engine.liveness();
    let g = engine.gate_stats();
    let leases = engine.leases().map_or(0, |l| l.len());
    format!(
        "{configured} calendars configured, {scheduled} synced here ({leases} mailbox leases), {} rounds running, request limit {}, {} throttle waits",
        l.rounds_in_flight, g.global_limit, g.throttle_waits
    )
}

#[cfg(unix)]
fn hangup() -> anyhow::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup()).context("cannot listen for SIGHUP")
}

/// Re-reads the config file and applies its calendars to this replica's schedule (the
/// calendars of the mailboxes it holds): new ones start, removed ones stop after
/// any round in flight (rows kept or purged per `service.on_remove`), changed intervals apply.
/// Rounds in flight are not disturbed. A config that does not validate is refused whole.
async fn reload(
    scheduler: &mut Scheduler,
    engine: &Engine,
    keeper: &LeaseKeeper,
    current: &mut Config,
    path: Option<&std::path::Path>,
) -> Result<(ScheduleChange, Vec<Arc<Tuple>>), String> {
    let result = reload_inner(scheduler, engine, keeper, current, path).await;
    match &result {
        Ok((a, _)) => info!(
            added = ?a.added, removed = ?a.removed, retimed = ?a.retimed, restarted = ?a.restarted,
            "config reloaded"
        ),
        Err(e) => error!(error = %e, "config reload refused; the running config stays"),
    }
    result
}

async fn reload_inner(
    scheduler: &mut Scheduler,
    engine: &Engine,
    keeper: &LeaseKeeper,
    current: &mut Config,
    path: Option<&std::path::Path>,
) -> Result<(ScheduleChange, Vec<Arc<Tuple>>), String> {
    let raw = RawConfig::load(path).map_err(|e| e.to_string())?;
    let new = raw.validate().map_err(|e| e.to_string())?;
    let restart_needed = current.needs_restart_for(&new);
    if !restart_needed.is_empty() {
        warn!(
            sections = ?restart_needed,
            "these settings changed and take effect after a restart; calendars and intervals apply now"
        );
    }
    // The engine's default interval is fixed at start: give each tuple its interval
    // explicitly, so a changed sync.interval applies too.
    let with_interval = |t: &calsync_engine::TupleConfig| calsync_engine::TupleConfig {
        interval: Some(t.interval.unwrap_or(new.sync.interval)),
        ..t.clone()
    };
    let mut configs: Vec<calsync_engine::TupleConfig> =
        new.tuples.iter().map(with_interval).collect();
    if !new.sources.is_empty() {
        // A reload with sources resolves them now: a set without them would untrack them.
        let anchor = new.window_rebase.anchor(chrono::Utc::now());
        let found = engine
            .discover(&new.sources, anchor, new.discovery.refused_recheck)
            .await
            .map_err(|e| format!("cannot resolve [[sources]]: {e}"))?;
        commands::log_discovered(&found);
        let found: Vec<_> = found.tuples.iter().map(with_interval).collect();
        configs = commands::merge_discovered(&configs, found);
    }
    let (applied, tuples) = register_and_apply(scheduler, engine, keeper, &configs).await?;
    if new.on_remove == OnRemove::Purge {
        purge(engine).await;
    }
    current.on_remove = new.on_remove;
    current.window_rebase = new.window_rebase;
    current.discovery = new.discovery;
    current.sources = new.sources;
    current.sync.interval = new.sync.interval;
    current.tuples = if current.sources.is_empty() {
        Vec::new()
    } else {
        new.tuples.iter().map(with_interval).collect()
    };
    Ok((applied, tuples))
}

/// How soon a failed discovery pass is tried again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(30);

/// Registers `configs` as the deployment's whole set, takes new mailboxes' leases (up to this
/// replica's share) and applies the set to this replica's schedule.
async fn register_and_apply(
    scheduler: &mut Scheduler,
    engine: &Engine,
    keeper: &LeaseKeeper,
    configs: &[calsync_engine::TupleConfig],
) -> Result<(ScheduleChange, Vec<Arc<Tuple>>), String> {
    let tuples = shared_tuples(
        engine
            .register(configs)
            .await
            .map_err(|e| format!("cannot register the calendars: {e}"))?,
    );
    // New mailboxes are taken now (up to this replica's share), not at the next heartbeat.
    if let Err(e) = keeper.cycle().await {
        warn!(error = %e, "cannot take the new calendars' mailbox leases now; the next heartbeat does");
    }
    let applied = scheduler.apply(owned_tuples(engine, &tuples));
    Ok((applied, tuples))
}

/// Deletes this deployment's untracked tuples and their rows (`service.on_remove = "purge"`).
async fn purge(engine: &Engine) {
    // Only this deployment's untracked tuples: other deployments' rows are theirs.
    match engine.store().purge_untracked().await {
        Ok((0, _)) => {}
        Ok((t, e)) => info!(tuples = t, events = e, "purged removed calendars"),
        Err(e) => {
            warn!(error = %e, "cannot purge removed calendars; their rows stay untracked")
        }
    }
}

/// Moves every rolling window to `anchor`. The calendars whose window changed are registered
/// with it and restarted: the next round of each is the full round of its new window, and the
/// read model serves the old window whole until that round's last page switches it. `None`:
/// no window moved.
async fn rebase_windows(
    scheduler: &mut Scheduler,
    engine: &Engine,
    all: &[Arc<Tuple>],
    anchor: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Vec<Arc<Tuple>>>, String> {
    let mut moved = 0usize;
    let configs: Vec<calsync_engine::TupleConfig> = all
        .iter()
        .map(|t| {
            let mut c = t.config();
            match t.rolling.map(|spec| spec.at(anchor)) {
                Some(Some(w)) if w != c.window => {
                    c.window = w;
                    moved += 1;
                }
                // A fixed end the rolling start has passed: the last window stays.
                Some(None) => {
                    warn!(tuple = %t.key, %anchor, "the rolling window is empty at this anchor; keeping the last one")
                }
                _ => {}
            }
            c
        })
        .collect();
    if moved == 0 {
        return Ok(None);
    }
    // Only windows move: nothing is untracked here (another replica's set may be newer).
    let tuples = shared_tuples(
        engine
            .register_only(&configs)
            .await
            .map_err(|e| format!("cannot register the moved windows: {e}"))?,
    );
    let change = scheduler.apply(owned_tuples(engine, &tuples));
    info!(
        moved,
        restarted = change.restarted.len(),
        %anchor,
        "rolling windows re-based"
    );
    Ok(Some(tuples))
}

/// Each calendar once, shared by the configured list and its task. (Collected in place, the
/// list would keep the buffer of the `Tuple`s, twenty times its size: 16 MB at 100,000.)
fn shared_tuples(tuples: Vec<Tuple>) -> Vec<Arc<Tuple>> {
    let mut shared: Vec<Arc<Tuple>> = tuples.into_iter().map(Arc::new).collect();
    shared.shrink_to_fit();
    shared
}

/// The configured tuples whose mailbox this replica holds.
fn owned_tuples(engine: &Engine, all: &[Arc<Tuple>]) -> Vec<Arc<Tuple>> {
    let Some(leases) = engine.leases() else {
        return Vec::new();
    };
    leases.syncing(|syncs| {
        all.iter()
            .filter(|t| syncs(&t.mailbox))
            .map(Arc::clone)
            .collect()
    })
}

/// Asks the main loop to reload; for POST /reload.
pub async fn request_reload(shared: &Shared) -> Result<ScheduleChange, String> {
    let (tx, rx) = oneshot::channel();
    shared
        .reload
        .send(tx)
        .await
        .map_err(|_| "the service is shutting down".to_owned())?;
    rx.await
        .map_err(|_| "the service is shutting down".to_owned())?
}

impl Shared {
    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The Prometheus handle, when metrics are on.
    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.metrics.as_ref()
    }

    /// Whether `presented` (an `Authorization` header's value) carries the admin token. Off
    /// (always `false`) when no token is configured. Compared in constant time.
    pub fn admin_authorized(&self, presented: Option<&str>) -> bool {
        use secrecy::ExposeSecret;
        let (Some(want), Some(got)) = (&self.admin_token, presented) else {
            return false;
        };
        let Some(got) = got.strip_prefix("Bearer ") else {
            return false;
        };
        let want = want.expose_secret().as_bytes();
        let got = got.trim().as_bytes();
        want.len() == got.len() && want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// How `/metrics` labels per-calendar series.
    pub fn metric_labels(&self) -> crate::config::MetricLabels {
        self.metric_labels
    }

    /// Whether an admin token is configured at all.
    pub fn admin_enabled(&self) -> bool {
        self.admin_token.is_some()
    }

    /// The scheduler is running and no supervised task has died.
    pub fn scheduler_running(&self) -> bool {
        self.scheduler_running.load(Ordering::Relaxed) && self.alive()
    }
}
