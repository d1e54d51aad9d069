//! One tuple's sync round and the runner around it: the one place that owns retries, backoff,
//! resyncs and the status a tuple is left in.

use crate::Engine;
use crate::Tuple;
use crate::guard::LoopGuard;
use crate::mapping::page_changes;
use crate::outcome::{Failure, Health, Outcome, RoundReport, panic_message};
use crate::quick::Prefetched;
use backon::{ExponentialBuilder, Retryable};
use calsync_graph::{Connection, ErrorClass, GraphError, PageLink};
use calsync_store::{LinkKind, PageWrite, RoundStart, StoreError, TupleStatus};
use futures_util::FutureExt;
use rand::Rng;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

#[derive(Debug)]
pub(crate) enum StepError {
    Graph(GraphError),
    Store(StoreError),
    Guard {
        code: &'static str,
        message: String,
    },
    Interrupted,
    /// This process does not hold the tuple's mailbox lease (any more): stand down quietly.
    LeaseLost,
    /// The store names another user, calendar or window for this tuple than the round was
    /// started for (a reload changed it): the round is the old one's, and stands down.
    Superseded,
}

impl StepError {
    fn class(&self) -> Option<ErrorClass> {
        match self {
            StepError::Graph(e) => Some(e.class()),
            StepError::Store(e) if e.is_transient() => Some(ErrorClass::Retry),
            StepError::Store(StoreError::Fenced { .. }) => None,
            StepError::Store(StoreError::Conflict { .. }) => Some(ErrorClass::Degraded),
            StepError::Store(_) => Some(ErrorClass::Permanent),
            StepError::Guard { .. } => Some(ErrorClass::Degraded),
            StepError::Interrupted | StepError::LeaseLost | StepError::Superseded => None,
        }
    }

    /// A round that lost its lease, or was superseded by a new identity: not a failure of
    /// the tuple, and nothing is recorded over whoever owns it now.
    fn stands_down(&self) -> bool {
        matches!(
            self,
            StepError::LeaseLost
                | StepError::Superseded
                | StepError::Store(StoreError::Fenced { .. })
        )
    }

    fn code(&self) -> String {
        match self {
            StepError::Graph(e) => e.code().to_owned(),
            StepError::Store(e) => e.code().into(),
            StepError::Guard { code, .. } => (*code).into(),
            StepError::Interrupted => "Interrupted".into(),
            StepError::LeaseLost => "LeaseLost".into(),
            StepError::Superseded => "Superseded".into(),
        }
    }

    fn message(&self) -> String {
        match self {
            StepError::Graph(e) => e.to_string(),
            StepError::Store(e) => e.to_string(),
            StepError::Guard { message, .. } => message.clone(),
            StepError::Interrupted => "interrupted by shutdown".into(),
            StepError::LeaseLost => "this process no longer holds the mailbox's lease".into(),
            StepError::Superseded => {
                "the tuple's user, calendar or window changed; the new round takes over".into()
            }
        }
    }
}

/// Runs in a row that end on a malformed page before the tuple is marked degraded.
pub(crate) const MALFORMED_RUNS_BEFORE_DEGRADED: u32 = 5;

/// Full jitter: a uniformly random wait up to the exponential step (AWS's "full jitter").
fn full_jitter(d: Duration) -> Duration {
    if d.is_zero() {
        return d;
    }
    Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=d.as_secs_f64()))
}

/// A tuple's position as of its last committed page.
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    link: Option<String>,
    kind: Option<LinkKind>,
    /// Hash of the stamp the link was made for.
    stamp: u64,
    version: i64,
    round_is_full: bool,
    last_full_sync_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn stamp_hash(s: &calsync_store::LinkStamp) -> u64 {
    stamp_hash_of(&s.user_id, &s.calendar_id, s.window_start, s.window_end)
}

/// [`stamp_hash`] of `tuple.stamp()`, without building the stamp.
fn tuple_stamp_hash(t: &Tuple) -> u64 {
    stamp_hash_of(&t.user, t.calendar_name(), t.window.start, t.window.end)
}

fn stamp_hash_of(
    user: &str,
    calendar: &str,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (user, calendar, start, end).hash(&mut h);
    h.finish()
}

impl Cursor {
    fn from_state(state: &calsync_store::TupleState, stamp: &calsync_store::LinkStamp) -> Self {
        let (kind, link) = match state.link_for(stamp) {
            Some((k, l)) => (Some(k), Some(l.to_owned())),
            None => (None, None),
        };
        Cursor {
            link,
            kind,
            stamp: stamp_hash(stamp),
            version: state.link_version,
            round_is_full: state.round_is_full,
            last_full_sync_at: state.last_full_sync_at,
        }
    }
}

struct StepOut {
    next: PageLink,
    ids: Vec<String>,
    version: i64,
    upserted: u64,
    removed: u64,
    swept: u64,
}

impl Engine {
    /// Runs one complete round for `tuple` (resuming a round in progress if one was saved),
    /// retrying what is retryable and restarting with a full round when Graph dropped the
    /// delta state. Leaves the tuple's status in the store. Every log line inside carries the
    /// tuple's key, user, calendar and window.
    pub async fn sync_tuple(&self, tuple: &Tuple, cancel: &CancellationToken) -> Outcome {
        self.sync_tuple_until(tuple, cancel, None).await
    }

    /// [`Engine::sync_tuple`], also stopping at the next page boundary once `soft` fires: the
    /// page in hand is fetched and committed, no further one is started (a reload that moved
    /// the tuple, a lease being handed over). `cancel` stops at once (shutdown).
    pub async fn sync_tuple_until(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&CancellationToken>,
    ) -> Outcome {
        self.sync_tuple_from(tuple, cancel, soft, None).await
    }

    /// [`Engine::sync_tuple_until`], going on from the first answer of a replay that the
    /// quick lane fetched ([`crate::quick`]).
    pub(crate) async fn sync_tuple_from(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&CancellationToken>,
        prefetched: Option<Prefetched>,
    ) -> Outcome {
        let span = info_span!(
            "tuple",
            tuple = %tuple.key,
            user = %tuple.user,
            calendar = %tuple.calendar_name(),
            window = %tuple.window,
        );
        let started = std::time::Instant::now();
        // The round's own token: shutdown cancels it through `cancel`, and so does the stuck-round
        // check (`Engine::cancel_stuck_rounds`), for this round alone.
        let round_cancel = cancel.child_token();
        self.round_started(tuple, Some(round_cancel.clone()));
        // A panic is a bug, but it must not take the tuple's task (or `sync-once`'s report)
        // down with it: it becomes a failed round with its message, recorded like any other.
        let mut outcome = match std::panic::AssertUnwindSafe(
            self.sync_tuple_in_span(tuple, &round_cancel, soft, prefetched)
                .instrument(span.clone()),
        )
        .catch_unwind()
        .await
        {
            Ok(outcome) => outcome,
            Err(panic) => self.panicked(tuple, panic).instrument(span.clone()).await,
        };
        if outcome == Outcome::Interrupted && round_cancel.is_cancelled() && !cancel.is_cancelled()
        {
            // Not a shutdown: this round alone was cancelled as stuck. Its committed pages
            // stand; the tuple runs again at the fast cadence.
            let failure = Failure {
                health: Health::Retrying,
                code: "StuckRound".into(),
                message: "the round made no progress for sync.stuck_round_after and was cancelled"
                    .into(),
            };
            self.record(
                tuple,
                TupleStatus::Retrying,
                &failure.code,
                &failure.message,
            )
            .await;
            outcome = Outcome::Failed(failure);
        }
        self.round_ended(&tuple.key);
        self.round_counted(&outcome, started);
        outcome
    }

    /// Counts a round that ended (the service's tally, the round metrics), in the full round
    /// and the quick lane alike.
    pub(crate) fn round_counted(&self, outcome: &Outcome, started: std::time::Instant) {
        self.count_round(outcome);
        let label = match outcome {
            Outcome::Synced(_) => "synced",
            Outcome::Failed(f) => f.health.as_str(),
            Outcome::Interrupted => "interrupted",
        };
        let hot = self.hot_metrics();
        if let Outcome::Synced(r) = outcome {
            hot.rounds_synced.increment(1);
            hot.upserted.increment(r.upserted);
            hot.removed.increment(r.removed);
            hot.swept.increment(r.swept);
            hot.resyncs.increment(r.resyncs.into());
        } else {
            metrics::counter!("calsync_rounds_total", "outcome" => label).increment(1);
        }
        hot.round_duration.record(started.elapsed().as_secs_f64());
    }

    async fn sync_tuple_in_span(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&CancellationToken>,
        mut prefetched: Option<Prefetched>,
    ) -> Outcome {
        let mut report = RoundReport::default();
        let mut conflict_retried = false;
        loop {
            let result = self
                .round(tuple, cancel, soft, &mut report, prefetched.take())
                .await;
            if result.is_err() {
                self.drop_cursor(tuple.id);
            }
            match result {
                Ok(()) => {
                    self.malformed_run(tuple, false);
                    // A round that changed nothing is the steady state: at 100,000 calendars it
                    // would be hundreds of INFO lines a second, so it logs at DEBUG.
                    if report.full || report.upserted + report.removed + report.swept > 0 {
                        info!(tuple = %tuple.key, pages = report.pages, upserted = report.upserted,
                              removed = report.removed, swept = report.swept, full = report.full, "round complete");
                    } else {
                        debug!(tuple = %tuple.key, pages = report.pages, "round complete, nothing changed");
                    }
                    return Outcome::Synced(report);
                }
                Err(StepError::Interrupted) => return Outcome::Interrupted,
                Err(e) if e.stands_down() => return self.stood_down(tuple, &e),
                Err(StepError::Store(StoreError::Conflict { .. })) if !conflict_retried => {
                    // Our idea of the tuple was stale (another writer, or a write whose answer
                    // was lost); the cursor is gone, so the round restarts from the store.
                    conflict_retried = true;
                }
                Err(StepError::Store(StoreError::Conflict { .. })) => {
                    // Another writer keeps advancing this tuple (a second process, sync-once
                    // beside run): it is doing the work. Step aside quietly — never forget its
                    // link, never mark the tuple degraded, record nothing over its status.
                    info!(tuple = %tuple.key, "another writer is syncing this tuple; this round stands down");
                    return Outcome::Failed(Failure {
                        health: Health::Retrying,
                        code: "Conflict".into(),
                        message: "another writer advanced this tuple; this round stood down".into(),
                    });
                }
                Err(e) if e.class() == Some(ErrorClass::Resync) && report.resyncs < 2 => {
                    warn!(tuple = %tuple.key, code = %e.code(), "delta state gone; starting a full round");
                    report.resyncs += 1;
                    if let Err(e) = self.forget_link(tuple).await {
                        return self.fail(tuple, &e).await;
                    }
                }
                Err(e) => return self.fail(tuple, &e).await,
            }
        }
    }

    /// A round that lost its lease or was superseded: said once, counted, nothing recorded
    /// over whoever owns the tuple now.
    pub(crate) fn stood_down(&self, tuple: &Tuple, e: &StepError) -> Outcome {
        info!(tuple = %tuple.key, code = %e.code(), "this round stands down: {}", e.message());
        metrics::counter!("calsync_rounds_stood_down_total", "reason" => if matches!(e, StepError::Superseded) { "superseded" } else { "lease_lost" }).increment(1);
        Outcome::Failed(Failure {
            health: Health::Retrying,
            code: e.code(),
            message: e.message(),
        })
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, crate::FastMap<i64, Cursor>> {
        self.inner.cursors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_cursor(&self, tuple_id: i64) {
        self.cursors().remove(&tuple_id);
    }

    /// The delta link to replay and the version it was saved at, when `tuple`'s last round
    /// ended here with a delta link for its current user, calendar and window, and no full
    /// resync is due: what the quick lane needs.
    pub(crate) fn replayable(&self, tuple: &Tuple) -> Option<(String, i64)> {
        let cursors = self.cursors();
        let c = cursors.get(&tuple.id)?;
        if c.kind != Some(LinkKind::Delta) || c.stamp != tuple_stamp_hash(tuple) {
            return None;
        }
        if self.resync_due(c.last_full_sync_at) {
            return None;
        }
        Some((c.link.clone()?, c.version))
    }

    /// Whether the periodic full resync (`sync.full_resync_every`) is due.
    fn resync_due(&self, last_full_sync_at: Option<chrono::DateTime<chrono::Utc>>) -> bool {
        self.settings().full_resync_every.is_some_and(|every| {
            last_full_sync_at.is_none_or(|at| {
                chrono::Utc::now()
                    .signed_duration_since(at)
                    .to_std()
                    .unwrap_or_default()
                    >= every
            })
        })
    }

    /// Records the link a quick round committed, as a full round's last page would.
    pub(crate) fn replayed(&self, tuple: &Tuple, link: &str, version: i64) {
        if let Some(c) = self.cursors().get_mut(&tuple.id) {
            c.link = Some(link.to_owned());
            c.kind = Some(LinkKind::Delta);
            c.version = version;
            c.round_is_full = false;
        }
    }

    async fn forget_link(&self, tuple: &Tuple) -> Result<(), StepError> {
        self.drop_cursor(tuple.id);
        let fence = self.fence_for(tuple)?;
        let store = self.store();
        let state = store.load(tuple.id).await.map_err(StepError::Store)?;
        store
            .forget_link(tuple.id, state.link_version, fence)
            .await
            .map_err(StepError::Store)?;
        Ok(())
    }

    /// The fencing token to commit `tuple`'s pages with: `None` for an engine outside leases,
    /// `LeaseLost` for a fenced one that does not hold the mailbox now.
    pub(crate) fn fence_for(&self, tuple: &Tuple) -> Result<Option<i64>, StepError> {
        match self.leases() {
            None => Ok(None),
            Some(l) => l
                .fence(&tuple.mailbox)
                .map(Some)
                .ok_or(StepError::LeaseLost),
        }
    }

    /// Records a failure unless this process lost the tuple's lease (then the owner's status
    /// stands).
    async fn record(&self, tuple: &Tuple, status: TupleStatus, code: &str, message: &str) {
        let Ok(fence) = self.fence_for(tuple) else {
            return;
        };
        if let Err(se) = self
            .store()
            .record_failure(tuple.id, status, code, message, fence)
            .await
        {
            warn!(tuple = %tuple.key, error = %se, "could not record the failure");
        }
    }

    async fn panicked(&self, tuple: &Tuple, panic: Box<dyn std::any::Any + Send>) -> Outcome {
        let what = panic_message(panic.as_ref());
        self.drop_cursor(tuple.id);
        let failure = Failure::panic(format!("round of tuple {} panicked: {what}", tuple.key));
        tracing::error!(tuple = %tuple.key, error = %failure.message, "round panicked (a bug: please report it)");
        self.record(tuple, TupleStatus::Failed, &failure.code, &failure.message)
            .await;
        Outcome::Failed(failure)
    }

    /// Counts a run that ended on a malformed page (or clears the count); returns how many in
    /// a row.
    pub(crate) fn malformed_run(&self, tuple: &Tuple, malformed: bool) -> u32 {
        let mut runs = self
            .inner
            .malformed_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if malformed {
            let n = runs.entry(tuple.id).or_default();
            *n += 1;
            *n
        } else {
            runs.remove(&tuple.id);
            0
        }
    }

    async fn fail(&self, tuple: &Tuple, e: &StepError) -> Outcome {
        let mut health = match e.class() {
            Some(ErrorClass::Permanent) => Health::Failed,
            Some(ErrorClass::Degraded) => Health::Degraded,
            _ => Health::Retrying,
        };
        // A page that is malformed every time (a body Graph keeps cutting short, a link that
        // always answers garbage) is not retried at the fast cadence forever: after
        // MALFORMED_RUNS_BEFORE_DEGRADED runs the tuple is degraded and starts afresh later.
        let malformed = matches!(e, StepError::Graph(GraphError::Malformed { .. }));
        if self.malformed_run(tuple, malformed) >= MALFORMED_RUNS_BEFORE_DEGRADED {
            self.malformed_run(tuple, false);
            health = Health::Degraded;
        }
        let failure = Failure {
            health,
            code: e.code(),
            message: e.message(),
        };
        if matches!(e, StepError::Store(StoreError::Bug { .. })) {
            // Our SQL does not fit the database: a bug or a schema changed behind our back.
            tracing::error!(tuple = %tuple.key, code = %failure.code, error = %failure.message, "calsync's SQL was refused by the database (a bug: please report it)");
        } else {
            warn!(tuple = %tuple.key, state = health.as_str(), code = %failure.code, error = %failure.message, "round failed");
        }
        // A degraded round's saved link leads back into the loop, and a link Graph refused
        // for good would be refused again: the next attempt starts a full round instead.
        if health == Health::Degraded
            || (health == Health::Failed && matches!(e, StepError::Graph(_)))
        {
            let _ = self.forget_link(tuple).await;
        }
        self.record(tuple, health.status(), &failure.code, &failure.message)
            .await;
        Outcome::Failed(failure)
    }

    async fn round(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&CancellationToken>,
        report: &mut RoundReport,
        prefetched: Option<Prefetched>,
    ) -> Result<(), StepError> {
        let settings = self.settings();
        // Nothing is fetched for a mailbox this process does not hold.
        self.fence_for(tuple)?;
        let stamp = tuple.stamp();
        let cached = self
            .cursors()
            .get(&tuple.id)
            .filter(|c| c.stamp == stamp_hash(&stamp))
            .cloned();
        let cursor = match cached {
            Some(c) => c,
            None => {
                let state = self
                    .with_retries(cancel, || async {
                        self.store().load(tuple.id).await.map_err(StepError::Store)
                    })
                    .await?;
                if (
                    &state.user_id,
                    &state.calendar_id,
                    state.window_start,
                    state.window_end,
                ) != (
                    &stamp.user_id,
                    &stamp.calendar_id,
                    stamp.window_start,
                    stamp.window_end,
                ) {
                    return Err(StepError::Superseded);
                }
                Cursor::from_state(&state, &stamp)
            }
        };
        let resync_due = self.resync_due(cursor.last_full_sync_at);
        let initial = || {
            self.graph()
                .initial_link(&tuple.user, &tuple.calendar, &tuple.window)
        };
        let (mut link, mut start) = match (cursor.kind, cursor.link.clone()) {
            (Some(LinkKind::Next), Some(l)) => (l, None),
            (Some(LinkKind::Delta), Some(_)) if resync_due => (initial(), Some(RoundStart::Full)),
            (Some(LinkKind::Delta), Some(l)) => (l, Some(RoundStart::Delta)),
            _ => (initial(), Some(RoundStart::Full)),
        };
        report.full = start == Some(RoundStart::Full) || (start.is_none() && cursor.round_is_full);
        let mut round_is_full = report.full;
        let mut last_full_sync_at = cursor.last_full_sync_at;
        debug!(tuple = %tuple.key, resume = start.is_none(), full = report.full, "round starts");
        let mut version = cursor.version;
        // The quick lane's answer stands for the first request if it replayed this link.
        let first = std::sync::Mutex::new(
            prefetched
                .filter(|p| start == Some(RoundStart::Delta) && p.link == link)
                .map(|p| p.page),
        );
        let mut guard = LoopGuard {
            seen: HashSet::new(),
            pages: 0,
            stale: 0,
            max_pages: settings.max_pages_per_round,
            max_stale: settings.max_stale_pages,
        };
        loop {
            // A page boundary: everything before it is committed.
            if cancel.is_cancelled() || soft.is_some_and(|s| s.is_cancelled()) {
                return Err(StepError::Interrupted);
            }
            // After a 503 or a broken connection the retry goes out on a new connection.
            let fresh = AtomicBool::new(false);
            let out = self
                .with_retries(cancel, || async {
                    let connection = if fresh.load(Ordering::Relaxed) {
                        Connection::Fresh
                    } else {
                        Connection::Reuse
                    };
                    let answer = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let r = self
                        .step(
                            tuple,
                            &link,
                            start,
                            round_is_full,
                            version,
                            &stamp,
                            cancel,
                            connection,
                            answer,
                        )
                        .await;
                    if let Err(StepError::Graph(e)) = &r {
                        fresh.store(e.wants_fresh_connection(), Ordering::Relaxed);
                    }
                    match &r {
                        Ok(_) => self.hot_metrics().pages_applied.increment(1),
                        Err(e) => {
                            let outcome = match e {
                                StepError::Interrupted => "interrupted",
                                _ => "failed",
                            };
                            metrics::counter!("calsync_pages_total", "outcome" => outcome)
                                .increment(1)
                        }
                    }
                    r
                })
                .await?;
            report.pages += 1;
            report.upserted += out.upserted;
            report.removed += out.removed;
            report.swept += out.swept;
            version = out.version;
            if start == Some(RoundStart::Delta) {
                round_is_full = false;
            }
            start = None;
            let (kind, saved) = match &out.next {
                PageLink::Next(l) => (LinkKind::Next, l.clone()),
                PageLink::Delta(l) => (LinkKind::Delta, l.clone()),
            };
            if kind == LinkKind::Delta && round_is_full {
                last_full_sync_at = Some(chrono::Utc::now());
            }
            self.cursors().insert(
                tuple.id,
                Cursor {
                    link: Some(saved),
                    kind: Some(kind),
                    stamp: stamp_hash(&stamp),
                    version,
                    round_is_full,
                    last_full_sync_at,
                },
            );
            match out.next {
                PageLink::Delta(_) => return Ok(()),
                PageLink::Next(next) => {
                    guard.record(out.ids.iter().map(String::as_str))?;
                    link = next;
                }
            }
        }
    }

    /// Retries `op` on retryable errors with capped exponential backoff and full jitter;
    /// the request gate separately holds the mailbox for any `Retry-After`.
    async fn with_retries<T, F, Fut>(
        &self,
        cancel: &CancellationToken,
        op: F,
    ) -> Result<T, StepError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>>,
    {
        let s = self.settings();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(s.min_backoff)
            .with_max_delay(s.max_backoff)
            .with_max_times(s.max_attempts.saturating_sub(1));
        let for_sleep = cancel.clone();
        let for_when = cancel.clone();
        let sleeper = move |d: Duration| {
            let cancel = for_sleep.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => {}
                }
            }
        };
        op.retry(backoff)
            .sleep(sleeper)
            .when(move |e: &StepError| e.class() == Some(ErrorClass::Retry) && !for_when.is_cancelled())
            .adjust(|_, d| d.map(full_jitter))
            .notify(|e: &StepError, d: Duration| {
                debug!(code = %e.code(), error = %e.message(), wait_ms = d.as_millis() as u64, "retrying");
            })
            .await
    }

    /// Fetches one page and applies it with the link after it.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        tuple: &Tuple,
        link: &str,
        start: Option<RoundStart>,
        round_is_full: bool,
        version: i64,
        stamp: &calsync_store::LinkStamp,
        cancel: &CancellationToken,
        connection: Connection,
        answer: Option<Result<calsync_graph::DeltaPage, GraphError>>,
    ) -> Result<StepOut, StepError> {
        let graph = self.graph();
        // A replayed delta link (most rounds, and most of them change nothing) may share a
        // JSON batch with the other replays due now; its retries go alone.
        let page = if let Some(answer) = answer {
            // Fetched by the quick lane, through the gate, counted there.
            answer.map_err(StepError::Graph)?
        } else if start == Some(RoundStart::Delta) && connection == Connection::Reuse {
            self.send(tuple, cancel, graph.fetch_delta(link)).await?
        } else {
            self.send(tuple, cancel, graph.fetch_page(link, connection))
                .await?
        };
        let (kind, next) = match &page.link {
            PageLink::Next(l) => (LinkKind::Next, l.clone()),
            PageLink::Delta(l) => (LinkKind::Delta, l.clone()),
        };
        // A link we would not follow is never saved either.
        graph.allows_link(&next).map_err(StepError::Graph)?;
        if page.skipped > 0 {
            warn!(tuple = %tuple.key, items = page.skipped, "items without an id were left out of a page");
            metrics::counter!("calsync_items_incomplete_total", "reason" => "no_id")
                .increment(u64::from(page.skipped));
        }
        let ids: Vec<String> = page.items.iter().map(|i| i.id().to_owned()).collect();
        let link_after = page.link;
        let mut changes = page_changes(page.items);
        for r in changes.full.iter().chain(&changes.partial) {
            if let Some(why) = &r.time_error {
                // Kept (times empty, counted in calendar_sync_status), never guessed at, and
                // never a reason to hold back the rest of the page.
                warn!(tuple = %tuple.key, event = %r.event_id, error = %why, "an event's time could not be read");
                metrics::counter!("calsync_items_incomplete_total", "reason" => "time_zone")
                    .increment(1);
            }
        }
        self.complete_series(tuple, &mut changes, round_is_full, cancel)
            .await?;
        let write = PageWrite {
            tuple_id: tuple.id,
            expected_version: version,
            round_start: start,
            changes: &changes,
            link: &next,
            link_kind: kind,
            stamp,
            fence: None,
        };
        // A transient database error is retried with the page already in hand: fetching it
        // again would spend the mailbox's Graph budget on the database's trouble.
        let applied = self
            .with_retries(cancel, || async {
                // The lease is read at each attempt: one lost meanwhile stops the write here.
                let write = PageWrite {
                    fence: self.fence_for(tuple)?,
                    ..write
                };
                self.store()
                    .apply_page(&write)
                    .await
                    .map_err(StepError::Store)
            })
            .await?;
        if applied.quarantined > 0 {
            metrics::counter!("calsync_items_incomplete_total", "reason" => "quarantined")
                .increment(applied.quarantined);
        }
        Ok(StepOut {
            next: link_after,
            ids,
            version: applied.version,
            upserted: applied.upserted,
            removed: applied.removed,
            swept: applied.swept,
        })
    }

    /// Sends one Graph request for `tuple` through the request gate: a mailbox slot, no
    /// request before its `Retry-After`, the adaptive global limit. A throttled answer holds
    /// the mailbox before the slot is released.
    pub(crate) async fn send<T>(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        request: impl std::future::Future<Output = Result<T, GraphError>>,
    ) -> Result<T, StepError> {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(StepError::Interrupted),
            p = self.inner.gate.acquire(&tuple.mailbox) => p,
        };
        self.touch_round(&tuple.key);
        let fetched = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(StepError::Interrupted),
            r = request => r,
        };
        self.touch();
        self.touch_round(&tuple.key);
        match &fetched {
            Ok(_) => self.hot_metrics().responses_ok.increment(1),
            Err(e) => metrics::counter!(
                "calsync_graph_responses_total",
                "status" => e.status().map_or_else(|| "none".to_owned(), |s| s.to_string()),
                "code" => e.code().to_owned()
            )
            .increment(1),
        }
        let gate = &self.inner.gate;
        match fetched {
            Ok(p) => {
                drop(permit);
                gate.succeeded();
                Ok(p)
            }
            Err(e) => {
                // Hold the mailbox before this request's slot is released: a task waiting
                // for the slot must find the Retry-After already in place.
                if let Some(wait) = e.retry_after() {
                    gate.defer(&tuple.mailbox, wait);
                }
                drop(permit);
                if e.is_throttle() {
                    gate.throttled(&tuple.mailbox);
                }
                Err(StepError::Graph(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calsync_graph::{CalendarRef, ViewWindow};

    /// The quick lane finds a tuple's cursor by this hash without building its stamp.
    #[test]
    fn a_tuples_stamp_hash_is_its_stamps() {
        let mut t = Tuple {
            id: 1,
            key: "k".into(),
            user: "adele@contoso.onmicrosoft.com".into(),
            calendar: CalendarRef::Default,
            window: ViewWindow {
                start: "2026-01-01T00:00:00Z".parse().unwrap(),
                end: "2027-01-01T00:00:00Z".parse().unwrap(),
            },
            rolling: None,
            interval: Duration::from_secs(300),
            schedule: None,
            mailbox: "adele@contoso.onmicrosoft.com".into(),
        };
        let default = tuple_stamp_hash(&t);
        assert_eq!(default, stamp_hash(&t.stamp()));
        t.calendar = CalendarRef::Id("AAMk".into());
        assert_eq!(tuple_stamp_hash(&t), stamp_hash(&t.stamp()));
        assert_ne!(tuple_stamp_hash(&t), default);
    }
}
