//! What runs now and how it went: the round slots, the running set (what a shutdown abandons,
//! what the stuck-round check cancels), liveness for the watchdog, the tally for the summary
//! line, and the metrics every round records (`round_counted`, for the quick lane and the full
//! round alike).

use crate::Engine;
use crate::Tuple;
use crate::outcome::Outcome;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
pub(crate) struct RunningRound {
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

/// A wait for a mailbox's `Retry-After` at least this long is made without the round's slot.
pub(crate) const RELEASE_SLOT_AFTER: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The slot of the round this task runs, where the runner gave one: a round that must wait
    /// out a long `Retry-After` gives it back meanwhile (see [`Engine::wait_out_hold`]).
    static ROUND_SLOT: RoundSlot;
}

/// A round's slot, which the round may give back during a long wait and take again.
#[derive(Debug)]
pub(crate) struct RoundSlot(std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>);

impl RoundSlot {
    fn with<R>(&self, f: impl FnOnce(&mut Option<tokio::sync::OwnedSemaphorePermit>) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Engine {
    /// Runs `round` holding `slot`, which the round gives back during long waits.
    pub(crate) async fn in_slot<T>(
        &self,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        round: impl std::future::Future<Output = T>,
    ) -> T {
        ROUND_SLOT
            .scope(RoundSlot(std::sync::Mutex::new(slot)), round)
            .await
    }

    /// Before a request of `tuple`: when its mailbox is held for [`RELEASE_SLOT_AFTER`] or
    /// more, the wait is made without the round's slot, and the slot taken again after it.
    /// A few hundred mailboxes waiting out `Retry-After: 120` held every slot, and healthy
    /// mailboxes stopped being synced (issue 23, point 6). False: cancelled while waiting.
    pub(crate) async fn wait_out_hold(&self, tuple: &Tuple, cancel: &CancellationToken) -> bool {
        let Some(wait) = self.inner.gate.held_for(&tuple.mailbox) else {
            return true;
        };
        if wait < RELEASE_SLOT_AFTER {
            return true;
        }
        let Ok(released) = ROUND_SLOT.try_with(|s| s.with(|p| p.take().is_some())) else {
            return true;
        };
        if !released {
            return true;
        }
        self.inner.gate.count_throttle_wait(wait);
        let slot = tokio::select! {
            biased;
            _ = cancel.cancelled() => return false,
            slot = async {
                tokio::time::sleep(wait).await;
                self.round_slot().await
            } => slot,
        };
        let _ = ROUND_SLOT.try_with(|s| s.with(|p| *p = slot));
        true
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
}

impl Engine {
    /// Writes how a requested round ended, for whoever asked (bounded; a failure is logged:
    /// the asker gives up at its own deadline).
    pub(crate) async fn answer_asks(&self, asked: &[i64], outcome: &Outcome) {
        let (what, detail) = match outcome {
            Outcome::Synced(_) => ("ok", None),
            Outcome::Failed(f) => ("failed", Some(format!("{}: {}", f.code, f.message))),
            Outcome::Interrupted => ("interrupted", None),
        };
        for id in asked {
            match self
                .store()
                .finish_round_request(*id, what, detail.as_deref())
                .await
            {
                Ok(Some((asker, secs))) if what == "ok" => {
                    // From the request (a push notification's arrival) to its round's commit.
                    let asker = if asker == calsync_store::push::PUSH_ASKER {
                        "push"
                    } else {
                        "command"
                    };
                    metrics::histogram!("calsync_wake_to_round_seconds", "asker" => asker)
                        .record(secs.max(0.0));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(request = id, error = %e, "cannot write a requested round's outcome");
                }
            }
        }
    }
}
