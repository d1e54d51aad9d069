//! The scheduler: one task per tuple, woken on its interval with jitter.
//!
//! Per-task timers rather than tokio-cron-scheduler: tuples need intervals with jitter, not
//! cron expressions, and that crate's repeated jobs can stop firing under load
//! (mvniekerk/tokio-cron-scheduler#113). An idle task holds only its timer; the round's large
//! future is boxed and exists only while it runs.

use crate::round::{Health, Outcome};
use crate::{Engine, SyncSettings, Tuple};
use rand::Rng;
use std::time::Duration;
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

impl Engine {
    /// Runs every tuple on its interval until `cancel` fires, then waits for rounds in flight
    /// to reach a safe point.
    pub async fn run(&self, tuples: Vec<Tuple>, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        for t in tuples {
            let engine = self.clone();
            let cancel = cancel.clone();
            tracker.spawn(async move { engine.tuple_loop(t, cancel).await });
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn tuple_loop(self, tuple: Tuple, cancel: CancellationToken) {
        let spread = tuple.interval.min(self.settings().startup_spread);
        let first =
            Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=spread.as_secs_f64()));
        let mut due = Instant::now() + first;
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            let started = Instant::now();
            let outcome = Box::pin(self.sync_tuple(&tuple, &cancel)).await;
            if outcome == Outcome::Interrupted {
                return;
            }
            failures = if matches!(outcome, Outcome::Failed(_)) {
                failures + 1
            } else {
                0
            };
            let jitter = rand::thread_rng().gen_range(-1.0..=1.0);
            let delay = next_delay(&outcome, tuple.interval, failures, self.settings(), jitter);
            due = (started + delay).max(Instant::now() + Duration::from_millis(10));
        }
    }

    /// One complete round for every tuple, concurrently within the request limits.
    pub async fn sync_all_once(
        &self,
        tuples: &[Tuple],
        cancel: &CancellationToken,
    ) -> Vec<(Tuple, Outcome)> {
        let mut set = tokio::task::JoinSet::new();
        for t in tuples.iter().cloned() {
            let engine = self.clone();
            let cancel = cancel.clone();
            set.spawn(async move {
                let o = engine.sync_tuple(&t, &cancel).await;
                (t, o)
            });
        }
        let mut out = Vec::with_capacity(tuples.len());
        while let Some(r) = set.join_next().await {
            if let Ok(pair) = r {
                out.push(pair);
            }
        }
        out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::{Failure, RoundReport};

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
