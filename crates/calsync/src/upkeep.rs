//! Two small periodic workers: `upkeep` (every second: cancel stuck rounds, forget idle
//! mailboxes' gate state, the metrics recorder's upkeep; every minute the summary line and the
//! change feed's retention) and
//! `rebase` (asks the schedule worker to move the rolling windows when their anchor moves).

use crate::discovery::Plan;
use crate::shared::{Shared, ToSchedule};
use crate::worker::WorkerCtx;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

/// How often the summary line is logged at info.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// The upkeep worker; never ends by itself.
pub async fn upkeep(ctx: WorkerCtx, shared: Arc<Shared>) -> anyhow::Result<()> {
    let engine = shared.engine().clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At info a no-change round logs nothing; this line says the quiet is work being done.
    let mut last_summary = Instant::now();
    let mut reported = std::collections::HashSet::new();
    // The change feed's retention runs beside this loop, never in it: a backlog of expired
    // changes (a first start after the retention was shortened) takes many batches, and the
    // stuck-round check above must keep its second.
    let trimming = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        ctx.idle();
        tick.tick().await;
        ctx.busy();
        engine.cancel_stuck_rounds(engine.settings().stuck_round_after);
        engine.forget_idle_mailboxes();
        if let Some(m) = shared.metrics() {
            m.run_upkeep();
        }
        if last_summary.elapsed() >= SUMMARY_EVERY {
            let t = engine.take_tally();
            let (configured, scheduled) = shared.counts();
            info!(
                rounds = t.synced,
                changed = t.changed,
                failed = t.failed,
                scheduled,
                configured,
                leases = engine.leases().map_or(0, |l| l.len()),
                period_secs = SUMMARY_EVERY.as_secs(),
                "summary"
            );
            last_summary = Instant::now();
            report_stale(&engine, &mut reported).await;
            if !trimming.swap(true, std::sync::atomic::Ordering::AcqRel) {
                let (engine, trimming) = (engine.clone(), Arc::clone(&trimming));
                tokio::spawn(async move {
                    trim_changes(&engine).await;
                    trimming.store(false, std::sync::atomic::Ordering::Release);
                });
            }
        }
    }
}

/// Deletes the change feed's changes older than `changes.retention`, from one replica of the
/// deployment at a time (the `changes` role), once a minute in batches: a backlog (a first
/// start after the retention was shortened) goes in short transactions, never one long one.
async fn trim_changes(engine: &calsync_engine::Engine) {
    let store = engine.store();
    if !store
        .hold_role("changes", SUMMARY_EVERY * 2)
        .await
        .unwrap_or(false)
    {
        return;
    }
    match store.trim_expired_changes().await {
        Ok(t) if t.deleted > 0 => {
            info!(deleted = t.deleted, "change feed: expired changes deleted")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "change feed: deleting expired changes failed; next minute again")
        }
    }
}

/// Logs each tuple once when it becomes overdue (issue 23: never silently stale), from one
/// replica of the deployment at a time (the `report` role), with the reason `status` gives.
async fn report_stale(
    engine: &calsync_engine::Engine,
    reported: &mut std::collections::HashSet<String>,
) {
    let store = engine.store();
    if !store
        .hold_role("report", SUMMARY_EVERY * 2)
        .await
        .unwrap_or(false)
    {
        reported.clear();
        return;
    }
    // The same replica keeps the round requests table small.
    if let Err(e) = store.prune_round_requests().await {
        tracing::debug!(error = %e, "cannot prune answered round requests");
    }
    let q = calsync_store::StatusQuery {
        stale: true,
        limit: Some(1000),
        ..Default::default()
    };
    let Ok(rows) = store.status_page(&q).await else {
        return;
    };
    let now: std::collections::HashSet<String> = rows.iter().map(|r| r.tuple_key.clone()).collect();
    for r in rows.iter().filter(|r| !reported.contains(&r.tuple_key)) {
        tracing::warn!(
            tuple = %r.tuple_key,
            last_success = ?r.last_success_at,
            state = %r.state,
            reason = %crate::commands::stale_reason(r),
            "a calendar is overdue: no round completed within its bound"
        );
    }
    *reported = now;
}

/// The re-base worker: checks the anchor every second (one clock read) and, when it moved,
/// has the schedule worker register the moved windows; asked again until that succeeds.
pub async fn rebase(
    ctx: WorkerCtx,
    mut plan: watch::Receiver<Plan>,
    schedule: mpsc::UnboundedSender<ToSchedule>,
) -> anyhow::Result<()> {
    // The anchor the windows are known to be at: none at first, so a worker (re)started after
    // the anchor moved still asks (the schedule worker finds nothing moved if nothing did).
    plan.borrow_and_update();
    let mut anchor = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ctx.idle();
        tokio::select! {
            _ = tick.tick() => {}
            changed = plan.changed() => {
                if changed.is_err() { return Ok(()) }
                // The reload registered its windows at the anchor of now.
                anchor = Some(plan.borrow_and_update().window_rebase.anchor(chrono::Utc::now()));
                continue;
            }
        }
        let now = plan.borrow().window_rebase.anchor(chrono::Utc::now());
        if anchor == Some(now) {
            continue;
        }
        ctx.busy();
        let (tx, rx) = oneshot::channel();
        if schedule.send(ToSchedule::Rebase(now, tx)).is_err() {
            return Ok(());
        }
        if rx.await.unwrap_or(false) {
            anchor = Some(now);
        }
    }
}

/// How often a replica asks the database for a new generation of the tracked set, beside the
/// notifications (which a dropped connection loses).
pub const FOLLOW_POLL: Duration = Duration::from_secs(5);

/// A notification channel with a poll beside it: [`Signal::next`] resolves at each
/// notification for this deployment and at each tick of the poll (notifications sent while the
/// listening connection is down are lost; the poll catches up). A listener that fails is
/// opened again at the next tick.
struct Signal {
    store: calsync_store::Store,
    rounds: bool,
    listener: Option<calsync_store::SetListener>,
    poll: tokio::time::Interval,
}

impl Signal {
    /// New generations of the tracked set (`rounds`: round requests instead), polled every
    /// `every`.
    fn new(store: calsync_store::Store, rounds: bool, every: Duration) -> Self {
        let mut poll = tokio::time::interval(every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Signal {
            store,
            rounds,
            listener: None,
            poll,
        }
    }

    /// After a wake-up: lets a burst arrive (`settle`), then takes what the listener holds
    /// already, so the next `next` waits for a new one.
    async fn settle(&mut self, settle: Duration) {
        tokio::time::sleep(settle).await;
        if let Some(l) = self.listener.as_mut() {
            l.drain().await;
        }
    }

    async fn next(&mut self) {
        let heard = async {
            match self.listener.as_mut() {
                Some(l) => l.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.poll.tick() => {
                if self.listener.is_none() {
                    let opened = if self.rounds {
                        self.store.listen_rounds().await
                    } else {
                        self.store.listen_sets().await
                    };
                    match opened {
                        Ok(l) => self.listener = Some(l),
                        Err(e) => tracing::debug!(error = %e, "cannot listen for notifications; polling"),
                    }
                }
            }
            r = heard => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "the listening connection ended; polling");
                    self.listener = None;
                }
            }
        }
    }
}

/// The follow worker: wakes the schedule worker to catch up with the deployment's tracked
/// set at each `calsync_tracked` notification for this deployment and every [`FOLLOW_POLL`].
pub async fn follow(ctx: WorkerCtx, shared: Arc<Shared>) -> anyhow::Result<()> {
    let mut signal = Signal::new(shared.engine().store().clone(), false, FOLLOW_POLL);
    loop {
        ctx.idle();
        signal.next().await;
        if !shared.follow_soon() {
            // The schedule worker is gone: the service is stopping.
            return Ok(());
        }
    }
}

/// How often a replica looks for round requests beside the notifications.
pub const WAKE_POLL: Duration = Duration::from_secs(2);

/// The wake worker: takes the round requests for tuples whose mailbox this replica holds (at
/// each `calsync_rounds` notification and every [`WAKE_POLL`]) and has the schedule worker
/// run them now.
pub async fn wake(
    ctx: WorkerCtx,
    shared: Arc<Shared>,
    schedule: mpsc::UnboundedSender<ToSchedule>,
) -> anyhow::Result<()> {
    let store = shared.engine().store().clone();
    let mut signal = Signal::new(store.clone(), true, WAKE_POLL);
    loop {
        ctx.idle();
        signal.next().await;
        ctx.busy();
        // A storm of notifications (1,000 a second) is taken in 20 ms batches, not one query
        // per notification on every replica.
        signal.settle(Duration::from_millis(20)).await;
        match store.take_round_requests().await {
            Ok(asked) if asked.is_empty() => {}
            Ok(asked) => {
                if schedule.send(ToSchedule::Wake(asked)).is_err() {
                    return Ok(());
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot take round requests; trying again"),
        }
    }
}
