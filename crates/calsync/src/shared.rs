//! What the HTTP handlers, the workers and the main loop share ([`Shared`]): the engine, the
//! metrics handle, the main loop's heartbeat, the workers' states, the counts the summary and
//! STATUS lines show, and the way to the schedule worker ([`ToSchedule`]) that a reload takes.

use crate::worker::Workers;
use calsync_engine::{Engine, ScheduleChange};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A round in flight that has made no progress (no request slot, no answer) for this long is
/// stuck, even while other rounds progress: the watchdog stops being fed and systemd restarts
/// the service. Every database call and Graph request has its own deadline, so only a bug or a
/// wait longer than any Retry-After or request budget can get here.
pub const STALL_LIMIT: Duration = Duration::from_secs(15 * 60);

/// The role of the replica that moves the deployment's rolling windows.
pub const ROLE_REBASE: &str = "rebase";
/// The role of the replica that runs the deployment's discovery passes.
pub const ROLE_DISCOVERY: &str = "discovery";

/// Where a reload's answer goes (only `POST /reload` waits for one).
pub type ReloadReply = oneshot::Sender<Result<ScheduleChange, String>>;

/// What the schedule worker is asked to do; it owns this replica's scheduler and the set of
/// calendars it was built from, so every change of the set reaches it as one of these.
#[derive(Debug)]
pub enum ToSchedule {
    /// Re-read the config file (SIGHUP: no answer; `POST /reload`: the answer).
    Reload(Option<ReloadReply>),
    /// A discovery pass, computed from the given generation of the tracked set, found these
    /// calendars; answers whether they were registered (else the pass is tried again soon).
    Discovered(calsync_engine::Discovered, i64, oneshot::Sender<bool>),
    /// The deployment's tracked set may have a new generation (a notification, or the poll):
    /// catch up with it.
    Follow,
    /// Round requests this replica took (id, tuple key): run each tuple's round now.
    Wake(Vec<(i64, String)>),
    /// The rolling windows' anchor moved here; answers whether the windows moved (else the
    /// re-base is asked again).
    Rebase(chrono::DateTime<chrono::Utc>, oneshot::Sender<bool>),
    /// The (mailbox, calendar) pairs whose subscription is healthy now: their calendars poll
    /// at `push.backstop_interval` (issue 24).
    Pushed(std::collections::HashSet<(String, String)>),
}

/// What the HTTP handlers, the workers and the main loop share.
pub struct Shared {
    engine: Engine,
    metrics: Option<PrometheusHandle>,
    started: Instant,
    /// Milliseconds since `started` of the main loop's last tick.
    tick_ms: AtomicU64,
    scheduler_running: AtomicBool,
    /// Unbounded: each sender has at most one message waiting for its answer (discovery,
    /// re-base, each `POST /reload`), and SIGHUPs coalesce through `reload_pending`.
    schedule: mpsc::UnboundedSender<ToSchedule>,
    /// A SIGHUP's reload is queued and not yet begun.
    reload_pending: AtomicBool,
    /// The bearer token `POST /reload` requires; `None`: reloading over HTTP is off.
    admin_token: Option<secrecy::SecretString>,
    /// How `/metrics` labels per-calendar series.
    metric_labels: crate::config::MetricLabels,
    /// The deployment's salt for hashed labels (empty unless they are hashed).
    label_salt: Vec<u8>,
    workers: Arc<Workers>,
    /// Calendars configured (deployment-wide) and scheduled here, for the summary lines.
    configured: AtomicUsize,
    scheduled: AtomicUsize,
    /// A `Follow` is queued and not yet begun (notifications coalesce).
    follow_pending: AtomicBool,
    /// Where this replica stands against the deployment's tracked set.
    set: std::sync::Mutex<crate::commands::FollowedSet>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// The state of a service about to run.
    pub fn new(
        engine: Engine,
        metrics: Option<PrometheusHandle>,
        schedule: mpsc::UnboundedSender<ToSchedule>,
        admin_token: Option<secrecy::SecretString>,
        metric_labels: crate::config::MetricLabels,
        label_salt: Vec<u8>,
        workers: Arc<Workers>,
    ) -> Self {
        Shared {
            engine,
            metrics,
            started: Instant::now(),
            tick_ms: AtomicU64::new(0),
            scheduler_running: AtomicBool::new(false),
            schedule,
            reload_pending: AtomicBool::new(false),
            admin_token,
            metric_labels,
            label_salt,
            workers,
            configured: AtomicUsize::new(0),
            scheduled: AtomicUsize::new(0),
            follow_pending: AtomicBool::new(false),
            set: std::sync::Mutex::new(crate::commands::FollowedSet {
                generation: 0,
                digest: String::new(),
                stale: false,
            }),
        }
    }

    /// Asks the schedule worker to catch up with the tracked set, unless it is asked already.
    pub fn follow_soon(&self) -> bool {
        if self.follow_pending.swap(true, Ordering::AcqRel) {
            return true;
        }
        self.schedule.send(ToSchedule::Follow).is_ok()
    }

    /// A `Follow` begins: the next notification queues another.
    pub fn follow_begins(&self) {
        self.follow_pending.store(false, Ordering::Release);
    }

    /// Records where this replica stands against the deployment's set (and says it in
    /// `/metrics`: `calsync_tracked_generation`, `calsync_config_stale`).
    pub fn set_followed(&self, set: crate::commands::FollowedSet) {
        metrics::gauge!("calsync_tracked_generation").set(set.generation as f64);
        metrics::gauge!("calsync_config_stale").set(if set.stale { 1.0 } else { 0.0 });
        if let Ok(mut s) = self.set.lock() {
            *s = set;
        }
    }

    /// Where this replica stands against the deployment's set.
    pub fn followed(&self) -> crate::commands::FollowedSet {
        match self.set.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The main loop turned.
    pub fn tick(&self) {
        self.tick_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The main loop ticked within the last 10 s.
    pub fn alive(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.tick_ms.load(Ordering::Relaxed)) < 10_000
    }

    /// Alive, and no round stuck: what feeds the watchdog.
    pub fn making_progress(&self) -> bool {
        let l = self.engine.liveness();
        self.alive()
            && (l.rounds_in_flight == 0
                || (l.since_activity < STALL_LIMIT && l.longest_round_stall < STALL_LIMIT))
    }

    /// The scheduler runs (or, `false`, is draining).
    pub fn set_scheduler_running(&self, running: bool) {
        self.scheduler_running.store(running, Ordering::Relaxed);
    }

    /// The scheduler is running and the main loop turns.
    pub fn scheduler_running(&self) -> bool {
        self.scheduler_running.load(Ordering::Relaxed) && self.alive()
    }

    /// Records how many calendars are configured and how many this replica schedules.
    pub fn set_counts(&self, configured: usize, scheduled: usize) {
        self.configured.store(configured, Ordering::Relaxed);
        self.scheduled.store(scheduled, Ordering::Relaxed);
    }

    /// (configured, scheduled here).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.configured.load(Ordering::Relaxed),
            self.scheduled.load(Ordering::Relaxed),
        )
    }

    /// The one-line STATUS systemd shows.
    pub fn status_line(&self) -> String {
        let (configured, scheduled) = self.counts();
        let l = self.engine.liveness();
        let g = self.engine.gate_stats();
        let leases = self.engine.leases().map_or(0, |l| l.len());
        format!(
            "{configured} calendars configured, {scheduled} synced here ({leases} mailbox leases), {} rounds running, request limit {}, {} throttle waits",
            l.rounds_in_flight, g.global_limit, g.throttle_waits
        )
    }

    /// Asks the schedule worker to reload and waits for its answer (`POST /reload`).
    pub async fn request_reload(&self) -> Result<ScheduleChange, String> {
        let (tx, rx) = oneshot::channel();
        self.schedule
            .send(ToSchedule::Reload(Some(tx)))
            .map_err(|_| "the service is shutting down".to_owned())?;
        rx.await
            .map_err(|_| "the service is shutting down".to_owned())?
    }

    /// Asks for a reload without waiting (SIGHUP); `false` if one is already queued and not
    /// yet begun (it reads the file as it is then, so one is enough).
    pub fn reload_soon(&self) -> bool {
        if self.reload_pending.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Only fails once the schedule worker is gone (shutting down).
        self.schedule.send(ToSchedule::Reload(None)).is_ok()
    }

    /// A SIGHUP's reload begins: the next SIGHUP queues another.
    pub fn reload_begins(&self) {
        self.reload_pending.store(false, Ordering::Release);
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The Prometheus handle, when metrics are on.
    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.metrics.as_ref()
    }

    /// The background workers' states.
    pub fn workers(&self) -> &Workers {
        &self.workers
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

    /// The deployment's salt for hashed metric labels.
    pub fn label_salt(&self) -> &[u8] {
        &self.label_salt
    }

    /// How `/metrics` labels per-calendar series.
    pub fn metric_labels(&self) -> crate::config::MetricLabels {
        self.metric_labels
    }

    /// Whether an admin token is configured at all.
    pub fn admin_enabled(&self) -> bool {
        self.admin_token.is_some()
    }
}
