//! calsync-engine: per-tuple sync rounds, the runner that owns retries and status, the
//! scheduler, and request limits. It drives calsync-graph and calsync-store through their
//! narrow APIs and knows neither SQL nor HTTP.

#![warn(missing_docs)]

pub mod cron;
pub mod discover;
pub mod gate;
mod guard;
pub mod lease;
pub mod mapping;
pub mod outcome;
mod quick;
pub mod round;
pub mod schedule;
mod series;
pub mod window;

pub use cron::{CronSchedule, CronScheduleError};
pub use discover::{CalendarPick, Directory, Discovered, Members, Refusals, Source, SourceCounts};
pub use gate::{Budget, GateStats, RequestGate};
pub use lease::{Identity, LeaseKeeper, Leases};
pub use outcome::{Failure, Health, Outcome, RoundReport};
pub use schedule::{ScheduleChange, Scheduler};
pub use window::{Edge, Rebase, WindowSpec, at_anchor};

use calsync_graph::{CalendarRef, GraphClient, ViewWindow};
use calsync_store::{LinkStamp, Store, StoreError, TupleSpec};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The engine's knobs; the binary fills them from the `[sync]` config section.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Default time between rounds of a tuple.
    pub interval: Duration,
    /// Every so often a tuple runs a full round with sweep even if its deltaLink works.
    pub full_resync_every: Option<Duration>,
    /// Pages one round may take before it is abandoned as degraded.
    pub max_pages_per_round: u32,
    /// Consecutive pages that bring no new id before a round is abandoned as degraded.
    pub max_stale_pages: u32,
    /// Attempts per page on retryable errors before the round gives up until next time.
    pub max_attempts: usize,
    /// The first retry's backoff step; it doubles per attempt (with full jitter).
    pub min_backoff: Duration,
    /// The largest backoff step.
    pub max_backoff: Duration,
    /// How soon a failed or degraded tuple is tried again.
    pub failed_retry_interval: Duration,
    /// A round that makes no progress for this long is cancelled and tried again later.
    pub stuck_round_after: Duration,
    /// Graph requests in flight across all mailboxes: the ceiling of the adaptive limit.
    pub max_in_flight: usize,
    /// The floor the adaptive limit never drops below when the tenant is throttled.
    pub min_in_flight: usize,
    /// Graph requests in flight per mailbox (Outlook's limit is 4).
    pub per_mailbox_concurrency: usize,
    /// Requests per mailbox per window (Graph allows 10,000 per 10 minutes); `None`: no cap.
    pub mailbox_budget: Option<Budget>,
    /// First rounds after start are spread over this long (or the interval, if shorter).
    pub startup_spread: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            interval: Duration::from_secs(300),
            full_resync_every: Some(Duration::from_secs(7 * 24 * 3600)),
            max_pages_per_round: 10_000,
            max_stale_pages: 50,
            max_attempts: 6,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            failed_retry_interval: Duration::from_secs(3600),
            stuck_round_after: Duration::from_secs(600),
            max_in_flight: 64,
            min_in_flight: 4,
            per_mailbox_concurrency: 4,
            mailbox_budget: Some(Budget {
                requests: 5000,
                per: Duration::from_secs(600),
            }),
            startup_spread: Duration::from_secs(30),
        }
    }
}

/// A tracked (user, calendar, window) tuple as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleConfig {
    /// Stable name of the tuple; rows and sync state hang off it.
    pub key: String,
    /// The mailbox, by UPN or object id.
    pub user: String,
    /// Which of the mailbox's calendars.
    pub calendar: CalendarRef,
    /// The calendarView window.
    pub window: ViewWindow,
    /// What `window` is computed from when an edge is an offset from now: the window is
    /// re-based as time passes ([`Rebase`]). `None`: a fixed window.
    pub rolling: Option<WindowSpec>,
    /// Its own interval; `None` uses [`SyncSettings::interval`].
    pub interval: Option<Duration>,
    /// Synced at these cron fire times instead of every `interval` (which then only spreads
    /// the first round and paces retries).
    pub schedule: Option<Arc<CronSchedule>>,
}

/// A registered tuple: its config plus its store id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple {
    /// The store's id of the tuple.
    pub id: i64,
    /// Stable name of the tuple, as configured.
    pub key: String,
    /// The mailbox, by UPN or object id.
    pub user: String,
    /// Which of the mailbox's calendars.
    pub calendar: CalendarRef,
    /// The calendarView window.
    pub window: ViewWindow,
    /// What `window` is computed from when it rolls; `None`: a fixed window.
    pub rolling: Option<WindowSpec>,
    /// Time between its rounds.
    pub interval: Duration,
    /// Its cron schedule, if it has one instead of `interval`.
    pub schedule: Option<Arc<CronSchedule>>,
    /// The mailbox's directory object id when it is known (else `user` as configured): the key
    /// of its request limits, so a UPN and an id naming one mailbox share them.
    pub mailbox: String,
}

impl Tuple {
    /// The tuple as configured (its interval explicit).
    pub fn config(&self) -> TupleConfig {
        TupleConfig {
            key: self.key.clone(),
            user: self.user.clone(),
            calendar: self.calendar.clone(),
            window: self.window,
            rolling: self.rolling,
            interval: Some(self.interval),
            schedule: self.schedule.clone(),
        }
    }

    /// The calendar's id, or `default`, for logs and status.
    pub fn calendar_name(&self) -> &str {
        match &self.calendar {
            CalendarRef::Default => "default",
            CalendarRef::Id(id) => id,
        }
    }

    /// What a saved link must have been made for to be replayed for this tuple.
    pub fn stamp(&self) -> LinkStamp {
        LinkStamp {
            user_id: self.user.clone(),
            calendar_id: self.calendar_name().to_owned(),
            window_start: self.window.start,
            window_end: self.window.end,
        }
    }
}

/// Whether a configured mailbox is a directory object id (a GUID) rather than a UPN.
fn is_object_id(user: &str) -> bool {
    let b = user.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The sync engine. Cheap to clone; clones share the gate.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A map keyed by tuple id or mailbox, read on every round: foldhash instead of SipHash (the keys
/// come from the config and the store, not from Graph).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Inner {
    graph: GraphClient,
    store: Store,
    gate: RequestGate,
    settings: SyncSettings,
    /// Where each tuple stands after its last committed page, so a round need not read it
    /// back. Only a hint: the store's link_version check refuses anything stale.
    cursors: std::sync::Mutex<FastMap<i64, round::Cursor>>,
    /// Consecutive runs per tuple that ended on a malformed page.
    malformed_runs: std::sync::Mutex<FastMap<i64, u32>>,
    /// When the engine last did something (a page fetched or failed, a round ended), in ms
    /// since `born`; and how many rounds are running. The watchdog reads both.
    born: std::time::Instant,
    activity_ms: std::sync::atomic::AtomicU64,
    rounds_in_flight: std::sync::atomic::AtomicUsize,
    /// The tuples whose round is running (to say what a shutdown abandoned), each with when it
    /// last made progress (got a request slot, an answer, or started) and the token that
    /// cancels that round alone.
    running: std::sync::Mutex<std::collections::BTreeMap<String, RunningRound>>,
    /// The mailbox leases this process holds, once it runs fenced ([`Engine::fence_with`]):
    /// then no page commits without the current fencing token of its mailbox.
    leases: std::sync::OnceLock<Arc<Leases>>,
    /// Rounds since the last [`Engine::take_tally`]: for the service's periodic summary.
    tally: [std::sync::atomic::AtomicU64; 3],
    /// Rounds allowed under way at once ([`ROUNDS_PER_REQUEST`] × `max_in_flight`). A round's
    /// state is several kilobytes; when 100,000 calendars fall due together (the start, a
    /// restart) the others wait here, for a few bytes each, instead of as started rounds queued
    /// on the gate and the pool (that backlog took the daemon to 950 MiB at 100,000).
    round_slots: Arc<tokio::sync::Semaphore>,
    /// The metrics every round records, registered once (at the first round, when the
    /// service's recorder is in place): a `counter!` with labels looks its series up by hashing
    /// the labels each time, and a no-change round recorded nine of them.
    hot: std::sync::OnceLock<HotMetrics>,
    /// Mailboxes whose calendars Graph refused in a discovery pass, until they are asked again.
    refusals: discover::Refusals,
}

/// Handles to the series a round records on its common path.
#[derive(Debug)]
pub(crate) struct HotMetrics {
    pub(crate) rounds_synced: metrics::Counter,
    pub(crate) round_duration: metrics::Histogram,
    pub(crate) upserted: metrics::Counter,
    pub(crate) removed: metrics::Counter,
    pub(crate) swept: metrics::Counter,
    pub(crate) resyncs: metrics::Counter,
    pub(crate) pages_applied: metrics::Counter,
    pub(crate) responses_ok: metrics::Counter,
}

impl HotMetrics {
    fn register() -> Self {
        HotMetrics {
            rounds_synced: metrics::counter!("calsync_rounds_total", "outcome" => "synced"),
            round_duration: metrics::histogram!("calsync_round_duration_seconds"),
            upserted: metrics::counter!("calsync_events_applied_total", "kind" => "upsert"),
            removed: metrics::counter!("calsync_events_applied_total", "kind" => "remove"),
            swept: metrics::counter!("calsync_events_applied_total", "kind" => "swept"),
            resyncs: metrics::counter!("calsync_resyncs_total"),
            pages_applied: metrics::counter!("calsync_pages_total", "outcome" => "applied"),
            responses_ok: metrics::counter!("calsync_graph_responses_total", "status" => "200", "code" => ""),
        }
    }
}

/// Rounds under way per request slot (`max_in_flight`): enough to keep every slot busy while
/// other rounds are between requests (committing a page, parsing one, waiting for a mailbox).
pub const ROUNDS_PER_REQUEST: usize = 4;

/// Rounds ended since the last [`Engine::take_tally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Rounds that reached their deltaLink.
    pub synced: u64,
    /// Of those, rounds that wrote or deleted something.
    pub changed: u64,
    /// Rounds that failed (retrying, degraded or failed).
    pub failed: u64,
}

/// A round in flight, as the engine watches it.
#[derive(Debug)]
struct RunningRound {
    last_progress: std::time::Instant,
    /// Cancels the round alone; `None` for a quick round (one request and one commit, each
    /// bounded by its own timeout).
    cancel: Option<CancellationToken>,
    mailbox: String,
}

/// Whether the engine is making progress, for a watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Rounds running now.
    pub rounds_in_flight: usize,
    /// Time since a page was fetched or failed, or a round ended.
    pub since_activity: Duration,
    /// The longest any running round has gone without progress: one stuck round shows here
    /// even while the others keep the engine busy.
    pub longest_round_stall: Duration,
}

impl Engine {
    /// The directory object id of configured mailbox names, where two names might be one
    /// mailbox: only a config that names mailboxes both ways (object ids *and* UPNs) needs it,
    /// since a UPN is unique per user (compared case-insensitively) and so is an id. Then each
    /// UPN is resolved from the store when already known, else asked of Graph once (through the
    /// request gate, a few at a time) and remembered. A name that cannot be resolved now keeps
    /// its configured spelling as its key; the next registration tries again. A config of one
    /// kind costs no request, so a start with 100,000 calendars is not held up by Graph.
    async fn resolve_mailboxes(
        &self,
        configs: &[TupleConfig],
    ) -> std::collections::HashMap<String, String> {
        use futures_util::StreamExt;
        let mut users: Vec<String> = configs.iter().map(|c| c.user.clone()).collect();
        users.sort();
        users.dedup();
        let (ids, upns): (Vec<String>, Vec<String>) =
            users.into_iter().partition(|u| is_object_id(u));
        if ids.is_empty() || upns.is_empty() {
            return Default::default();
        }
        let mut known = match self.inner.store.mailbox_ids(&upns).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read resolved mailbox ids");
                Default::default()
            }
        };
        let missing: Vec<String> = upns
            .into_iter()
            .filter(|u| !known.contains_key(u))
            .collect();
        let resolved: Vec<(String, Option<String>)> = futures_util::stream::iter(missing)
            .map(|user| async move {
                let permit = self.inner.gate.acquire(&user).await;
                let got = self
                    .inner
                    .graph
                    .resolve_user(&user, calsync_graph::Connection::Reuse)
                    .await;
                if let Err(e) = &got {
                    if let Some(wait) = e.retry_after() {
                        self.inner.gate.defer(&user, wait);
                    }
                }
                drop(permit);
                let id = match got {
                    Ok(Some(id)) => {
                        if let Err(e) = self.inner.store.save_mailbox_id(&user, &id).await {
                            tracing::warn!(user = %user, error = %e, "cannot save a mailbox id");
                        }
                        Some(id)
                    }
                    Ok(None) => {
                        tracing::debug!(user = %user, "no such mailbox; its rounds will say so");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(user = %user, error = %e, "cannot resolve a mailbox to its id now; keyed by its name until the next registration");
                        None
                    }
                };
                (user, id)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (user, id) in resolved {
            if let Some(id) = id {
                known.insert(user, id);
            }
        }
        known
            .into_iter()
            .map(|(u, id)| (u, id.to_ascii_lowercase()))
            .collect()
    }

    /// An engine over one Graph client and one store; the request gate is built from `settings`.
    pub fn new(graph: GraphClient, store: Store, settings: SyncSettings) -> Self {
        let gate = RequestGate::new(settings.max_in_flight, settings.per_mailbox_concurrency)
            .with_min_in_flight(settings.min_in_flight)
            .with_budget(settings.mailbox_budget);
        Engine {
            inner: Arc::new(Inner {
                graph,
                store,
                gate,
                cursors: Default::default(),
                malformed_runs: Default::default(),
                born: std::time::Instant::now(),
                activity_ms: Default::default(),
                rounds_in_flight: Default::default(),
                running: Default::default(),
                leases: Default::default(),
                tally: Default::default(),
                hot: Default::default(),
                refusals: Default::default(),
                round_slots: Arc::new(tokio::sync::Semaphore::new(
                    ROUNDS_PER_REQUEST * settings.max_in_flight.max(1),
                )),
                settings,
            }),
        }
    }

    /// Waits until this process may start another round; the round holds the permit until it
    /// ends. `None` only if the semaphore were closed, which nothing does.
    pub(crate) async fn round_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.inner.round_slots)
            .acquire_owned()
            .await
            .ok()
    }

    pub(crate) fn hot_metrics(&self) -> &HotMetrics {
        self.inner.hot.get_or_init(HotMetrics::register)
    }

    pub(crate) fn touch(&self) {
        use std::sync::atomic::Ordering;
        let ms = self.inner.born.elapsed().as_millis() as u64;
        self.inner.activity_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub(crate) fn round_started(&self, tuple: &Tuple, cancel: Option<CancellationToken>) {
        use std::sync::atomic::Ordering;
        self.inner.rounds_in_flight.fetch_add(1, Ordering::Relaxed);
        self.running_set().insert(
            tuple.key.clone(),
            RunningRound {
                last_progress: std::time::Instant::now(),
                cancel,
                mailbox: tuple.mailbox.clone(),
            },
        );
    }

    pub(crate) fn count_round(&self, outcome: &Outcome) {
        use std::sync::atomic::Ordering;
        let t = &self.inner.tally;
        match outcome {
            Outcome::Synced(r) => {
                t[0].fetch_add(1, Ordering::Relaxed);
                if r.full || r.upserted + r.removed + r.swept > 0 {
                    t[1].fetch_add(1, Ordering::Relaxed);
                }
            }
            Outcome::Failed(_) => {
                t[2].fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Interrupted => {}
        }
    }

    /// The rounds ended since the last call.
    pub fn take_tally(&self) -> Tally {
        use std::sync::atomic::Ordering;
        let t = &self.inner.tally;
        Tally {
            synced: t[0].swap(0, Ordering::Relaxed),
            changed: t[1].swap(0, Ordering::Relaxed),
            failed: t[2].swap(0, Ordering::Relaxed),
        }
    }

    /// Whether a round of any tuple of `mailbox` is running now.
    pub fn mailbox_busy(&self, mailbox: &str) -> bool {
        self.running_set().values().any(|r| r.mailbox == mailbox)
    }

    /// The round of `key` made progress.
    pub(crate) fn touch_round(&self, key: &str) {
        if let Some(r) = self.running_set().get_mut(key) {
            r.last_progress = std::time::Instant::now();
        }
    }

    /// Cancels every round that has made no progress for `after` (it ends at its next safe
    /// point as a failed `StuckRound`, and its tuple runs again later); returns their keys.
    /// The service calls this on every tick with `sync.stuck_round_after`.
    pub fn cancel_stuck_rounds(&self, after: Duration) -> Vec<String> {
        let running = self.running_set();
        let mut stuck = Vec::new();
        for (key, r) in running.iter() {
            let Some(cancel) = &r.cancel else {
                continue;
            };
            if r.last_progress.elapsed() >= after && !cancel.is_cancelled() {
                cancel.cancel();
                tracing::error!(tuple = %key, stalled_secs = r.last_progress.elapsed().as_secs(), "round made no progress; cancelling it");
                metrics::counter!("calsync_rounds_stuck_total").increment(1);
                stuck.push(key.clone());
            }
        }
        stuck
    }

    pub(crate) fn round_ended(&self, key: &str) {
        use std::sync::atomic::Ordering;
        self.inner.rounds_in_flight.fetch_sub(1, Ordering::Relaxed);
        self.running_set().remove(key);
        self.touch();
    }

    fn running_set(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, RunningRound>> {
        self.inner.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys of the tuples with a round running now.
    pub fn rounds_running(&self) -> Vec<String> {
        self.running_set().keys().cloned().collect()
    }

    /// Rounds in flight and the time since anything happened, for the watchdog.
    pub fn liveness(&self) -> Liveness {
        use std::sync::atomic::Ordering;
        let now = self.inner.born.elapsed().as_millis() as u64;
        let last = self.inner.activity_ms.load(Ordering::Relaxed);
        let longest_round_stall = self
            .running_set()
            .values()
            .map(|r| r.last_progress.elapsed())
            .max()
            .unwrap_or_default();
        Liveness {
            rounds_in_flight: self.inner.rounds_in_flight.load(Ordering::Relaxed),
            since_activity: Duration::from_millis(now.saturating_sub(last)),
            longest_round_stall,
        }
    }

    /// Makes every commit of this engine fenced by mailbox leases held as `identity`, and
    /// returns the keeper that renews and balances them. Once only: `None` if already fenced.
    pub fn fence_with(&self, identity: Identity) -> Option<LeaseKeeper> {
        let leases = Arc::new(Leases::default());
        self.inner.leases.set(Arc::clone(&leases)).ok()?;
        Some(LeaseKeeper::new(self.clone(), leases, identity))
    }

    /// The leases this engine commits under, when fenced.
    pub fn leases(&self) -> Option<&Arc<Leases>> {
        self.inner.leases.get()
    }

    pub(crate) fn gate(&self) -> &RequestGate {
        &self.inner.gate
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &SyncSettings {
        &self.inner.settings
    }

    /// The Graph client it drives.
    pub fn graph(&self) -> &GraphClient {
        &self.inner.graph
    }

    /// Forgets the request gate's state of mailboxes with nothing in flight, waiting, owed or
    /// deferred; a service calls it periodically.
    pub fn forget_idle_mailboxes(&self) {
        self.inner.gate.forget_idle();
    }

    /// What the request gate has done: throttle waits, the adaptive limit.
    pub fn gate_stats(&self) -> GateStats {
        self.inner.gate.stats()
    }

    /// The store it writes to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Records the configured tuples in the store (new ones added, dropped ones untracked)
    /// and returns them with their ids.
    pub async fn register(&self, configs: &[TupleConfig]) -> Result<Vec<Tuple>, StoreError> {
        self.register_with(configs, true).await
    }

    /// Records these tuples and leaves every other one as it is (a one-off command's view of
    /// the database it shares with a daemon), returning them with their ids.
    pub async fn register_only(&self, configs: &[TupleConfig]) -> Result<Vec<Tuple>, StoreError> {
        self.register_with(configs, false).await
    }

    async fn register_with(
        &self,
        configs: &[TupleConfig],
        reconcile: bool,
    ) -> Result<Vec<Tuple>, StoreError> {
        // Mailboxes first: each tuple is stored with its lease key (the object id when known).
        let mailboxes = self.resolve_mailboxes(configs).await;
        let mailbox_of = |c: &TupleConfig| {
            mailboxes
                .get(&c.user)
                .cloned()
                .unwrap_or_else(|| c.user.to_ascii_lowercase())
        };
        let specs: Vec<TupleSpec> = configs
            .iter()
            .map(|c| TupleSpec {
                key: c.key.clone(),
                user_id: c.user.clone(),
                mailbox: mailbox_of(c),
                calendar_id: match &c.calendar {
                    CalendarRef::Default => "default".into(),
                    CalendarRef::Id(id) => id.clone(),
                },
                window_start: c.window.start,
                window_end: c.window.end,
            })
            .collect();
        let ids = if reconcile {
            self.inner.store.register_tuple_ids(&specs).await?
        } else {
            self.inner.store.add_tuple_ids(&specs).await?
        };
        Ok(configs
            .iter()
            .zip(specs)
            .filter_map(|(c, spec)| {
                let id = *ids.get(c.key.as_str())?;
                Some(Tuple {
                    id,
                    key: c.key.clone(),
                    user: c.user.clone(),
                    calendar: c.calendar.clone(),
                    window: c.window,
                    rolling: c.rolling,
                    interval: c.interval.unwrap_or(self.inner.settings.interval),
                    schedule: c.schedule.clone(),
                    mailbox: spec.mailbox,
                })
            })
            .collect())
    }
}
