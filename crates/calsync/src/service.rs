//! `calsync run` as a service: [`App::build`] connects, migrates, registers and binds; then
//! [`App::run`] starts the supervised workers (the HTTP endpoint, the link batcher, the batch
//! collector, the lease keeper, the schedule worker, discovery, re-base, upkeep, push and the change
//! feed's sinks) and runs the main loop, which only waits for shutdown,
//! SIGHUP and worker exits, and feeds `/healthz` and the systemd watchdog every second. Nothing
//! slow is awaited in it. On shutdown it drains: rounds first, leases last.

use crate::commands::{self, Hangups};
use crate::config::Config;
use crate::discovery::Plan;
use crate::notify::{Note, notifier};
use crate::schedule::{ScheduleWorker, shared_tuples};
use crate::shared::{Shared, ToSchedule};
use crate::worker::{Exit, Policy, Supervisor};
use anyhow::Context;
use calsync_engine::{Engine, LeaseKeeper, Scheduler};
use calsync_store::ReplicaKind;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::shared::STALL_LIMIT;

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
    /// The push receiver's listener (`push.listen`), when push is on.
    push_listener: Option<tokio::net::TcpListener>,
    metrics: Option<PrometheusHandle>,
    /// Whether `[[sources]]` were resolved at start (else a pass is tried again soon).
    sources_resolved: bool,
    /// Where this replica stands against the deployment's tracked set at start.
    set: commands::FollowedSet,
    /// The link batcher's and the batch collector's inboxes, run as workers by `run`.
    link_inbox: calsync_store::LinkInbox,
    batch_inbox: calsync_graph::BatchInbox,
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
        let commands::Built {
            engine,
            tuples,
            keeper,
            sources_resolved,
            set,
            ..
        } = commands::build_replica(&cfg, ReplicaKind::Run).await?;
        let keeper = Arc::new(keeper);
        // Taken before any round runs, so no commit or replay starts a loop of its own.
        let link_inbox = engine
            .store()
            .take_link_inbox()
            .context("the link batcher was started before the daemon could supervise it")?;
        let batch_inbox = engine
            .graph()
            .take_batch_inbox()
            .context("the batch collector was started before the daemon could supervise it")?;
        let listener = match cfg.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on http.listen = {addr}"))?,
            ),
            None => None,
        };
        let push_listener = match &cfg.push {
            Some(p) => Some(
                tokio::net::TcpListener::bind(p.listen)
                    .await
                    .with_context(|| format!("cannot listen on push.listen = {}", p.listen))?,
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
            push_listener,
            metrics,
            sources_resolved,
            set,
            link_inbox,
            batch_inbox,
        })
    }

    /// Where the HTTP endpoint listens, if it is on.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the push receiver listens, if push is on.
    pub fn push_addr(&self) -> Option<std::net::SocketAddr> {
        self.push_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Runs until `shutdown` resolves, then drains. A SIGHUP (each message of `hangups`)
    /// reloads the config. Every task it starts is a supervised worker: one whose policy is
    /// fatal (the HTTP endpoint, the lease keeper, the schedule worker) ending unexpectedly
    /// is an error, so the process exits non-zero and its supervisor restarts it.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        mut hangups: Hangups,
    ) -> anyhow::Result<()> {
        let App {
            cfg,
            config_path,
            engine,
            tuples,
            keeper,
            listener,
            push_listener,
            metrics,
            sources_resolved,
            set,
            link_inbox,
            batch_inbox,
        } = self;
        let stop = CancellationToken::new();
        let mut supervisor = Supervisor::new();
        let (schedule_tx, schedule_rx) = mpsc::unbounded_channel::<ToSchedule>();
        // Hashed labels are salted per deployment (the salt lives in the database, so every
        // replica and restart labels alike).
        let label_salt = if cfg.metric_labels == crate::config::MetricLabels::Hash {
            let fresh: [u8; 32] = rand::random();
            engine
                .store()
                .label_salt(fresh)
                .await
                .context("cannot read the deployment's metric label salt")?
        } else {
            Vec::new()
        };
        let shared = Arc::new(Shared::new(
            engine.clone(),
            metrics,
            schedule_tx.clone(),
            cfg.admin_token.clone(),
            cfg.metric_labels,
            label_salt,
            supervisor.workers(),
        ));
        if let Some(listener) = listener {
            let addr = listener
                .local_addr()
                .context("cannot read the bound address")?;
            info!(%addr, "http endpoint listening");
            let app = crate::http::router(Arc::clone(&shared));
            let stop = stop.clone();
            let mut listener = Some(listener);
            supervisor.spawn("http", Policy::Fatal, move |ctx| {
                let listener = listener.take();
                let app = app.clone();
                let stop = stop.clone();
                async move {
                    let listener = listener.context("the http endpoint cannot be started twice")?;
                    ctx.idle();
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                        .context("the http endpoint failed")
                }
            });
        }

        // The two loops every round's commit and replay go through. They outlive the drain
        // (rounds finishing commit through them) and stop with the supervisor. A run that
        // ended (a panic) leaves what was queued in its inbox for the next one.
        {
            let inbox = Arc::new(tokio::sync::Mutex::new(link_inbox));
            let store = engine.store().clone();
            supervisor.spawn("link-batcher", Policy::Restart, move |ctx| {
                let (inbox, store) = (Arc::clone(&inbox), store.clone());
                async move {
                    let mut inbox = inbox.lock().await;
                    ctx.idle();
                    store.run_link_batcher(&mut inbox).await;
                    anyhow::bail!("the link batcher's inbox closed")
                }
            });
        }
        {
            let inbox = Arc::new(tokio::sync::Mutex::new(batch_inbox));
            let graph = engine.graph().clone();
            supervisor.spawn("batch-collector", Policy::Restart, move |ctx| {
                let (inbox, graph) = (Arc::clone(&inbox), graph.clone());
                async move {
                    let mut inbox = inbox.lock().await;
                    ctx.idle();
                    graph.run_batch_collector(&mut inbox).await;
                    anyhow::bail!("the batch collector's inbox closed")
                }
            });
        }

        // Leases are taken by the keeper's first heartbeat, at once and after READY: taking
        // 100,000 of them is a statement of seconds, and the scheduler starts each calendar as
        // soon as its mailbox is held. They are released last, after the drain.
        let (owned_tx, owned_rx) = watch::channel(0u64);
        let stop_keeper = CancellationToken::new();
        {
            let keeper = Arc::clone(&keeper);
            let stop = stop_keeper.clone();
            let mut owned_tx = Some(owned_tx);
            supervisor.spawn("lease-keeper", Policy::Fatal, move |ctx| {
                let keeper = Arc::clone(&keeper);
                let stop = stop.clone();
                let owned_tx = owned_tx.take();
                async move {
                    let owned_tx = owned_tx.context("the lease keeper cannot be started twice")?;
                    ctx.idle();
                    keeper.run(stop, owned_tx).await;
                    Ok(())
                }
            });
        }

        let push_cfg = cfg.push.clone();
        let sinks = cfg.sinks.clone();
        let mut current = cfg;
        let all = shared_tuples(tuples);
        let drain_deadline = current.drain_deadline;
        let role_ttl = current.ownership.lease_ttl;
        // The windows are at the anchor the deployment's set was registered at.
        let anchor = current.anchor;
        let generation = set.generation;
        shared.set_followed(set);
        let (plan_tx, plan_rx) = watch::channel(Plan::of(&current, sources_resolved));
        // Registered: the config's own list of calendars is not read again (a reload brings
        // its own), and at 100,000 calendars it is megabytes. With sources it is kept: each
        // discovery pass registers it beside what the sources resolve to.
        if current.sources.is_empty() {
            drop(std::mem::take(&mut current.tuples));
        }
        let configured = all.len();
        // The schedule worker keeps these current from its first step on; READY says them now.
        shared.set_counts(configured, 0);
        let (notes, notifier_done) = notifier();
        {
            let mut worker = Some(ScheduleWorker {
                engine: engine.clone(),
                keeper: Arc::clone(&keeper),
                scheduler: Scheduler::new(engine.clone(), stop.clone()),
                all,
                current,
                config_path,
                anchor,
                shared: Arc::clone(&shared),
                notes: notes.clone(),
                plan: plan_tx,
                owned: owned_rx.clone(),
                inbox: schedule_rx,
                stop: stop.clone(),
                generation,
                role_ttl,
                held: Default::default(),
                noted: None,
                compared: None,
                pushed: Default::default(),
            });
            supervisor.spawn("schedule", Policy::Fatal, move |ctx| {
                let worker = worker.take();
                async move {
                    let worker = worker.context("the schedule worker cannot be started twice")?;
                    worker.run(ctx).await
                }
            });
        }
        {
            let engine = engine.clone();
            let plan = plan_rx.clone();
            let schedule = schedule_tx.clone();
            supervisor.spawn("discovery", Policy::Restart, move |ctx| {
                crate::discovery::run(
                    ctx,
                    engine.clone(),
                    plan.clone(),
                    schedule.clone(),
                    role_ttl,
                )
            });
        }
        {
            let plan = plan_rx.clone();
            let schedule = schedule_tx.clone();
            supervisor.spawn("rebase", Policy::Restart, move |ctx| {
                crate::upkeep::rebase(ctx, plan.clone(), schedule.clone())
            });
        }
        {
            let shared = Arc::clone(&shared);
            supervisor.spawn("follow", Policy::Restart, move |ctx| {
                crate::upkeep::follow(ctx, Arc::clone(&shared))
            });
        }
        {
            let shared = Arc::clone(&shared);
            let schedule = schedule_tx.clone();
            supervisor.spawn("wake", Policy::Restart, move |ctx| {
                crate::upkeep::wake(ctx, Arc::clone(&shared), schedule.clone())
            });
        }
        if let (Some(listener), Some(push)) = (push_listener, push_cfg) {
            let addr = listener
                .local_addr()
                .context("cannot read the push receiver's address")?;
            info!(%addr, url = %push.notification_url, "push receiver listening");
            let poke = Arc::new(tokio::sync::Notify::new());
            let app = crate::push::receiver(Arc::clone(&shared), &push, Arc::clone(&poke));
            let stop_receiver = stop.clone();
            let mut listener = Some(listener);
            supervisor.spawn("push-receiver", Policy::Fatal, move |ctx| {
                let listener = listener.take();
                let app = app.clone();
                let stop = stop_receiver.clone();
                async move {
                    let listener = listener.context("the push receiver cannot be started twice")?;
                    ctx.idle();
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                        .context("the push receiver failed")
                }
            });
            let shared = Arc::clone(&shared);
            let schedule = schedule_tx.clone();
            supervisor.spawn("push", Policy::Restart, move |ctx| {
                crate::push::subscriber(
                    ctx,
                    Arc::clone(&shared),
                    push.clone(),
                    Arc::clone(&poke),
                    owned_rx.clone(),
                    schedule.clone(),
                )
            });
        }
        if !sinks.is_empty() {
            // The change feed posted to each [[sinks]] endpoint; a sink never ends by itself
            // (a failing one is retried and reported), so this worker ends only at shutdown.
            let store = engine.store().clone();
            let stop_sinks = stop.clone();
            info!(sinks = sinks.len(), "change feed sinks configured");
            supervisor.spawn("sinks", Policy::Restart, move |ctx| {
                let (store, sinks, stop) = (store.clone(), sinks.clone(), stop_sinks.clone());
                async move {
                    ctx.idle();
                    let each = sinks
                        .into_iter()
                        .map(|s| calsync_sinks::follow(store.clone(), s, stop.clone()));
                    futures_util::future::join_all(each).await;
                    Ok(())
                }
            });
        }
        {
            let shared = Arc::clone(&shared);
            supervisor.spawn("upkeep", Policy::Restart, move |ctx| {
                crate::upkeep::upkeep(ctx, Arc::clone(&shared))
            });
        }
        drop(schedule_tx);
        shared.set_scheduler_running(true);
        shared.tick();
        info!(configured, "calsync running");
        let notify = |n: Note| {
            let _ = notes.send(n);
        };
        notify(Note::Ready(shared.status_line()));

        let watchdog = sd_notify::watchdog_enabled();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ping = Instant::now();
        let mut last_status = Instant::now();
        tokio::pin!(shutdown);
        let mut fatal: Option<anyhow::Error> = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                exit = supervisor.next_exit() => match exit {
                    Exit::Restarted => {}
                    Exit::Fatal(e) => {
                        fatal = Some(e);
                        break;
                    }
                },
                // SIGHUP and POST /reload do the same; only the HTTP caller waits for the answer.
                Some(()) = hangups.recv() => {
                    if !shared.reload_soon() {
                        info!("SIGHUP: a reload is already queued");
                    }
                }
                _ = tick.tick() => {
                    shared.tick();
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
                    if last_status.elapsed() >= Duration::from_secs(10) {
                        notify(Note::Status(shared.status_line()));
                        last_status = Instant::now();
                    }
                }
            }
        }

        info!("shutdown requested; no new rounds start");
        notify(Note::Stopping);
        shared.set_scheduler_running(false);
        stop.cancel();
        // The schedule worker ends once its tuple tasks did (each at a safe point).
        if supervisor.wait_for("schedule", drain_deadline).await {
            info!("stopped cleanly");
        } else {
            warn!(
                deadline_ms = drain_deadline.as_millis() as u64,
                abandoned = ?engine.rounds_running(),
                "drain deadline passed; abandoning rounds in flight (their last committed page stands)"
            );
        }
        // Leases go last, once no round of ours can commit: the other replicas take the
        // mailboxes at their next heartbeat instead of after service.lease_ttl.
        stop_keeper.cancel();
        // The HTTP endpoint had `stop` and is ending; the rest are stopped here.
        let _ = supervisor.wait_for("http", Duration::from_secs(1)).await;
        supervisor.shutdown().await;
        match keeper.retire().await {
            Ok(()) => info!("mailbox leases released"),
            Err(e) => {
                warn!(error = %e, "cannot release the mailbox leases; other replicas take them after service.lease_ttl")
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
