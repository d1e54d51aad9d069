//! The scheduler: one task per tuple, woken on its interval with jitter.
//!
//! Per-task timers rather than tokio-cron-scheduler: tuples need intervals with jitter, not
//! cron expressions, and that crate's repeated jobs can stop firing under load
//! (mvniekerk/tokio-cron-scheduler#113). An idle task holds only its timer; the round's large
//! future is boxed and exists only while it runs.

use crate::outcome::{Health, Outcome};
use crate::round::SoftStop;
use crate::{Engine, SyncSettings, Tuple};
use futures_util::FutureExt;
use rand::Rng;
use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// When a tuple runs next, measured from when its last round started. Pure, so the table of
/// cases is testable.
pub fn next_delay(
    outcome: &Outcome,
    interval: Duration,
    failures: u32,
    s: &SyncSettings,
    jitter: f64,
) -> Duration {
    let jitter = jitter.clamp(-1.0, 1.0);
    match outcome {
        // ±10%: tuples that started together drift apart instead of firing in lockstep.
        Outcome::Synced(_) | Outcome::Interrupted => interval.mul_f64(1.0 + 0.1 * jitter),
        Outcome::Failed(f) => match f.health {
            Health::Retrying => {
                let exp = s
                    .min_backoff
                    .saturating_mul(1u32 << failures.min(16))
                    .min(s.max_backoff.max(s.min_backoff));
                exp.min(interval).mul_f64(0.75 + 0.25 * jitter.abs())
            }
            Health::Failed | Health::Degraded => {
                s.failed_retry_interval.mul_f64(1.0 + 0.1 * jitter)
            }
        },
    }
}

/// Rounds start on slots, not at arbitrary instants: tuples due within one slot start together,
/// so the runtime wakes once for them, their requests go out together, and their link commits
/// share one statement. A slot is a tenth of the interval, at most 250 ms (a 5-minute interval's
/// rounds start up to 250 ms late; its ±10% jitter is 30 s).
pub fn slot(due: Instant, epoch: Instant, interval: Duration) -> Instant {
    let width = (interval / 10).clamp(Duration::from_millis(1), Duration::from_millis(250));
    let since = due.saturating_duration_since(epoch);
    let n = since.as_nanos().div_ceil(width.as_nanos());
    epoch + width * u32::try_from(n).unwrap_or(u32::MAX)
}

/// What a [`Scheduler::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleChange {
    /// Tuples that got a task.
    pub added: Vec<String>,
    /// Tuples whose task ends (untracked, or their mailbox no longer held here): a round in
    /// flight stops at its next page boundary.
    pub removed: Vec<String>,
    /// Same tuple, new interval: takes effect at once for a waiting task, after the round for
    /// one in flight.
    pub retimed: Vec<String>,
    /// User, calendar or window changed: the old task stops at its next page boundary, and the
    /// new one starts once it ended (registration bumped link_version, so the old round can
    /// commit nothing more).
    pub restarted: Vec<String>,
}

impl ScheduleChange {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.retimed.is_empty()
            && self.restarted.is_empty()
    }
}

/// What the scheduler can tell a running task: its interval changed, or it is to stop (which
/// also cancels its round in flight at the next page boundary); and what the task tells back:
/// that it ended. Small on purpose: 100,000 idle tuples each hold one.
#[derive(Debug, Default)]
struct Control {
    interval_ms: AtomicU64,
    stop: AtomicBool,
    changed: Notify,
    ended: AtomicBool,
    ended_notify: Notify,
    /// Round requests (ids in `round_requests`) its next round answers: set by
    /// [`Scheduler::wake`], which also makes that round start now.
    /// A boxed slice: an idle task (100,000 of them) holds 16 bytes, not an empty vector's 24.
    asked: std::sync::Mutex<Option<Box<[i64]>>>,
}

/// Marks its task's control as ended when dropped, however the task ends.
struct EndGuard(Arc<Control>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Release);
        self.0.ended_notify.notify_waiters();
    }
}

/// A running tuple, keyed by its name without a copy of it.
#[derive(Debug, Clone)]
struct ByKey(Arc<Tuple>);

impl Borrow<str> for ByKey {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

impl std::hash::Hash for ByKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.key.hash(h)
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

#[derive(Debug)]
struct Running {
    /// What the task was started for (user, calendar, window), to tell a retime from a change.
    identity: u64,
    interval: Duration,
    control: Arc<Control>,
}

fn identity(t: &Tuple) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // A new schedule restarts the task: it is read where the task computes its next round.
    (
        t.id,
        &t.user,
        &t.calendar,
        t.window,
        &t.schedule,
        &t.mailbox,
    )
        .hash(&mut h);
    h.finish()
}

/// The running set of tuple tasks. Tuples can be added, removed and retimed while it runs
/// (a config reload). A removed tuple's round in flight finishes; then its task ends.
#[derive(Debug)]
pub struct Scheduler {
    engine: Engine,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    running: HashMap<ByKey, Running>,
    /// Tasks told to stop that may not have ended yet: a new task of the same tuple waits for
    /// its predecessor, so two rounds of one tuple never overlap in this process.
    ending: HashMap<String, Arc<Control>>,
    /// The origin of the slots rounds start on ([`slot`]).
    epoch: Instant,
    /// A tuple task that ended other than by being told to says why here.
    died_tx: tokio::sync::mpsc::UnboundedSender<String>,
    died_rx: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Scheduler {
    /// A scheduler whose tasks all stop when `shutdown` fires.
    pub fn new(engine: Engine, shutdown: CancellationToken) -> Self {
        let (died_tx, died_rx) = tokio::sync::mpsc::unbounded_channel();
        Scheduler {
            engine,
            shutdown,
            tracker: TaskTracker::new(),
            running: HashMap::new(),
            ending: HashMap::new(),
            epoch: Instant::now(),
            died_tx,
            died_rx,
        }
    }

    /// Resolves when a tuple task ended unexpectedly (a panic outside a round, which
    /// `run_round` cannot catch), with what it said. The service treats it as fatal.
    pub async fn task_died(&mut self) -> String {
        match self.died_rx.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Tuples scheduled now.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// No tuple is scheduled.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Makes the running set equal `tuples`. Tasks of tuples no longer in it are stopped:
    /// a round in flight stops at its next page boundary (its committed pages stand). A tuple
    /// whose user, calendar or window changed gets a new task that starts once the old one ended.
    pub fn apply(&mut self, tuples: Vec<Arc<Tuple>>) -> ScheduleChange {
        self.ending.retain(|_, c| !c.ended.load(Ordering::Acquire));
        let mut change = ScheduleChange::default();
        let wanted: HashSet<&str> = tuples.iter().map(|t| t.key.as_str()).collect();
        let gone: Vec<ByKey> = self
            .running
            .keys()
            .filter(|k| !wanted.contains(k.0.key.as_str()))
            .cloned()
            .collect();
        for key in gone {
            if let Some(r) = self.running.remove(&key) {
                r.control.stop();
                self.ending.insert(key.0.key.clone(), r.control);
                change.removed.push(key.0.key.clone());
            }
        }
        for t in tuples {
            match self.running.get_mut(t.key.as_str()) {
                Some(r) if r.identity == identity(&t) => {
                    if r.interval != t.interval {
                        r.interval = t.interval;
                        r.control.retime(t.interval);
                        change.retimed.push(t.key.clone());
                    }
                }
                Some(_) => {
                    if let Some(old) = self.running.remove(t.key.as_str()) {
                        old.control.stop();
                        self.ending.insert(t.key.clone(), old.control);
                    }
                    change.restarted.push(t.key.clone());
                    self.spawn(t);
                }
                None => {
                    change.added.push(t.key.clone());
                    self.spawn(t);
                }
            }
        }
        for v in [
            &mut change.added,
            &mut change.removed,
            &mut change.retimed,
            &mut change.restarted,
        ] {
            v.sort();
        }
        metrics::gauge!("calsync_tuples_scheduled").set(self.running.len() as f64);
        change
    }

    fn spawn(&mut self, tuple: Arc<Tuple>) {
        let control = Arc::new(Control::default());
        control
            .interval_ms
            .store(tuple.interval.as_millis() as u64, Ordering::Relaxed);
        self.running.insert(
            ByKey(Arc::clone(&tuple)),
            Running {
                identity: identity(&tuple),
                interval: tuple.interval,
                control: Arc::clone(&control),
            },
        );
        let predecessor = self.ending.remove(&*tuple.key);
        let died = self.died_tx.clone();
        let who = Arc::clone(&tuple);
        // No async block around the loop: its captures would be kept beside the loop's own
        // copies for the task's whole life. An idle task is what 100,000 calendars cost.
        let task = std::panic::AssertUnwindSafe(self.engine.clone().tuple_loop(
            tuple,
            control,
            predecessor,
            self.shutdown.clone(),
            self.epoch,
        ))
        .catch_unwind()
        .map(move |ended| {
            if let Err(panic) = ended {
                let what = crate::outcome::panic_message(panic.as_ref());
                let _ = died.send(format!("tuple {}: {what}", who.key));
            }
        });
        self.tracker.spawn(task);
    }

    /// Runs `key`'s round now, through its own task (so it never overlaps its scheduled
    /// round), and has that round answer request `request` in the store. `false` if no task of
    /// that tuple runs here.
    pub fn wake(&self, key: &str, request: i64) -> bool {
        let Some(r) = self.running.get(key) else {
            return false;
        };
        let mut asked = r.control.asked.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<i64> = asked.take().map(Vec::from).unwrap_or_default();
        ids.push(request);
        *asked = Some(ids.into_boxed_slice());
        drop(asked);
        r.control.changed.notify_one();
        true
    }

    /// Waits until every task has stopped (after `shutdown` fired).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl SoftStop for Control {
    fn stop_requested(&self) -> bool {
        self.stopped()
    }
}

impl Control {
    fn stop(&self) {
        // A round in flight reads it at its next page boundary ([`SoftStop`]).
        self.stop.store(true, Ordering::Relaxed);
        self.changed.notify_one();
    }

    async fn wait_ended(&self) {
        loop {
            let notified = self.ended_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Returns once the task was told to stop (a retime meanwhile is read after the round).
    async fn stop_requested(&self) {
        while !self.stopped() {
            self.changed.notified().await;
        }
    }

    fn retime(&self, interval: Duration) {
        self.interval_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn has_asks(&self) -> bool {
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn take_asks(&self) -> Vec<i64> {
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map_or_else(Vec::new, Vec::from)
    }
}

impl Engine {
    /// Runs every tuple on its interval until `cancel` fires, then waits for rounds in flight
    /// to reach a safe point.
    pub async fn run(&self, tuples: Vec<Tuple>, cancel: CancellationToken) {
        let mut scheduler = Scheduler::new(self.clone(), cancel);
        scheduler.apply(tuples.into_iter().map(Arc::new).collect());
        scheduler.wait().await;
    }

    /// The bytes one tracked tuple's task holds while it waits for its next round (its
    /// future, allocated once per task): 100,000 idle tasks hold 100,000 of these, so a
    /// test and the idle benchmark keep it small.
    pub fn idle_task_size(&self, tuple: &Tuple) -> usize {
        let control = Arc::new(Control::default());
        let task = self.clone().tuple_loop(
            Arc::new(tuple.clone()),
            control,
            None,
            CancellationToken::new(),
            Instant::now(),
        );
        std::mem::size_of_val(&task)
    }

    async fn tuple_loop(
        self,
        tuple: Arc<Tuple>,
        control: Arc<Control>,
        predecessor: Option<Arc<Control>>,
        cancel: CancellationToken,
        epoch: Instant,
    ) {
        let _ended = EndGuard(Arc::clone(&control));
        if let Some(old) = predecessor {
            tokio::select! {
                _ = old.wait_ended() => {}
                _ = cancel.cancelled() => return,
            }
        }
        let spread = tuple.interval.min(self.settings().startup_spread);
        let first =
            Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=spread.as_secs_f64()));
        let mut started = Instant::now();
        let mut due = slot(started + first, epoch, tuple.interval);
        // The last round's health (`None`: synced) and the failures in a row: all a retime
        // needs of it, kept small because every idle task holds it.
        let mut last: Option<(Option<Health>, u32)> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
                _ = control.changed.notified() => {
                    if control.stopped() {
                        return;
                    }
                    if control.has_asks() {
                        // Asked for a round now (a wake-up through the database).
                        due = Instant::now();
                        continue;
                    }
                    // A new interval: the wait restarts from the last round's start.
                    if let Some((health, failures)) = last {
                        let outcome = match health {
                            None => Outcome::Synced(Default::default()),
                            Some(health) => Outcome::Failed(crate::outcome::Failure {
                                health,
                                code: String::new(),
                                message: String::new(),
                            }),
                        };
                        let jitter = rand::thread_rng().gen_range(-1.0..=1.0);
                        let delay =
                            next_delay(&outcome, control.interval(), failures, self.settings(), jitter);
                        due = (started + delay).max(Instant::now() + Duration::from_millis(10));
                    }
                    continue;
                }
            }
            started = Instant::now();
            let round_slot = tokio::select! {
                slot = self.round_slot() => slot,
                _ = cancel.cancelled() => return,
                _ = control.stop_requested() => return,
            };
            if control.stopped() {
                return;
            }
            // Stopping the task (a reload, a lease handed over) stops its round at the next page
            // boundary: the page in hand is committed first. Boxed: an idle task holds no room
            // for a round (at 100,000 calendars that room would be hundreds of megabytes). The
            // round holds the slot, and gives it back while it waits out a long Retry-After.
            let asked = control.take_asks();
            let outcome = Box::pin(
                self.in_slot(round_slot, self.run_round(&tuple, &cancel, Some(&*control))),
            )
            .await;
            if !asked.is_empty() {
                // Boxed like the round: inline, its database calls made every idle task
                // (100,000 of them) ~1 KiB larger (issue 23's memory regression).
                Box::pin(self.answer_asks(&asked, &outcome)).await;
            }
            if outcome == Outcome::Interrupted || control.stopped() {
                return;
            }
            let failures = match (&outcome, &last) {
                (Outcome::Failed(_), Some((_, n))) => n + 1,
                (Outcome::Failed(_), None) => 1,
                _ => 0,
            };
            let jitter = rand::thread_rng().gen_range(-1.0..=1.0);
            let delay = next_delay(
                &outcome,
                control.interval(),
                failures,
                self.settings(),
                jitter,
            );
            let at = match (&tuple.schedule, &outcome) {
                // On a schedule, a round that ended well waits for the next fire time; a failed
                // one keeps the retry cadence above.
                (Some(s), Outcome::Synced(_)) => {
                    let wait = s.delay(chrono::Utc::now(), jitter.abs());
                    Instant::now() + wait.unwrap_or(control.interval())
                }
                _ => started + delay,
            };
            due = slot(
                at.max(Instant::now() + Duration::from_millis(10)),
                epoch,
                control.interval(),
            );
            let health = match &outcome {
                Outcome::Failed(f) => Some(f.health),
                Outcome::Synced(_) | Outcome::Interrupted => None,
            };
            last = Some((health, failures));
        }
    }

    /// One complete round for every tuple, concurrently within the request limits.
    pub async fn sync_all_once(
        &self,
        tuples: &[Tuple],
        cancel: &CancellationToken,
    ) -> Vec<(Tuple, Outcome)> {
        let mut set = tokio::task::JoinSet::new();
        let mut by_task = HashMap::with_capacity(tuples.len());
        for t in tuples.iter().cloned() {
            let engine = self.clone();
            let cancel = cancel.clone();
            // Spawned only once it may run: a round's state is kilobytes (see `round_slots`).
            let slot = self.round_slot().await;
            let task = set.spawn({
                let t = t.clone();
                async move {
                    engine
                        .in_slot(slot, engine.run_round(&t, &cancel, None))
                        .await
                }
            });
            by_task.insert(task.id(), t);
        }
        let mut out = Vec::with_capacity(tuples.len());
        while let Some(r) = set.join_next_with_id().await {
            // `run_round` turns a panicking round into a failure itself; a task that still
            // ended abnormally is reported as failed, never dropped from the outcome.
            let (id, outcome) = match r {
                Ok((id, o)) => (id, o),
                Err(e) => (
                    e.id(),
                    Outcome::Failed(crate::outcome::Failure::panic(format!(
                        "round task ended abnormally: {e}"
                    ))),
                ),
            };
            if let Some(t) = by_task.remove(&id) {
                out.push((t, outcome));
            }
        }
        out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Failure, RoundReport};

    #[test]
    fn rounds_start_on_slots_of_a_tenth_of_the_interval_at_most_250_ms() {
        let epoch = Instant::now();
        let five_min = Duration::from_secs(300);
        let at = |ms: u64| epoch + Duration::from_millis(ms);
        assert_eq!(slot(at(0), epoch, five_min), at(0));
        assert_eq!(slot(at(1), epoch, five_min), at(250));
        assert_eq!(slot(at(250), epoch, five_min), at(250));
        assert_eq!(slot(at(251), epoch, five_min), at(500));
        let one_s = Duration::from_secs(1);
        assert_eq!(slot(at(101), epoch, one_s), at(200));
        assert_eq!(slot(at(5), epoch, Duration::from_millis(5)), at(5));
    }

    #[test]
    fn next_run_follows_the_outcome() {
        let s = SyncSettings::default();
        let iv = Duration::from_secs(300);
        let ok = Outcome::Synced(RoundReport::default());
        assert_eq!(next_delay(&ok, iv, 0, &s, 0.0), iv);
        assert_eq!(next_delay(&ok, iv, 0, &s, 1.0), Duration::from_secs(330));
        assert_eq!(next_delay(&ok, iv, 0, &s, -1.0), Duration::from_secs(270));
        let retry = Outcome::Failed(Failure {
            health: Health::Retrying,
            code: "x".into(),
            message: String::new(),
        });
        assert_eq!(
            next_delay(&retry, iv, 1, &s, 0.0),
            Duration::from_millis(750)
        );
        assert_eq!(next_delay(&retry, iv, 30, &s, 1.0), Duration::from_secs(60));
        assert!(next_delay(&retry, Duration::from_secs(5), 30, &s, 1.0) <= Duration::from_secs(5));
        let failed = Outcome::Failed(Failure {
            health: Health::Failed,
            code: "x".into(),
            message: String::new(),
        });
        assert_eq!(
            next_delay(&failed, iv, 1, &s, 0.0),
            Duration::from_secs(3600)
        );
    }
}
