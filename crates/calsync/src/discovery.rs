//! The discovery worker: resolves the config's `[[sources]]` every `discovery.every` (sooner
//! after a failed pass) and hands what it found to the schedule worker. A reload replaces its
//! plan, which drops a pass of the old sources under way and restarts the cadence.

use crate::schedule::Plan;
use crate::shared::ToSchedule;
use crate::worker::WorkerCtx;
use calsync_engine::Engine;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

/// How soon a failed discovery pass is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

/// Runs discovery passes until the plan's sender is gone (the service stopped).
pub async fn run(
    ctx: WorkerCtx,
    engine: Engine,
    mut plan: watch::Receiver<Plan>,
    schedule: mpsc::Sender<ToSchedule>,
) -> anyhow::Result<()> {
    let mut next_pass = plan.borrow_and_update().next_pass;
    loop {
        ctx.idle();
        let current = plan.borrow().clone();
        let wait = async {
            if current.sources.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until(next_pass).await;
        };
        tokio::select! {
            _ = wait => {}
            changed = plan.changed() => {
                if changed.is_err() { return Ok(()) }
                next_pass = plan.borrow_and_update().next_pass;
                continue;
            }
        }
        ctx.busy();
        let anchor = current.window_rebase.anchor(chrono::Utc::now());
        let pass = engine.discover(&current.sources, anchor, current.discovery.refused_recheck);
        let found = tokio::select! {
            found = pass => found,
            // A reload replaced the sources: this pass's answer is for the old ones.
            changed = plan.changed() => {
                if changed.is_err() { return Ok(()) }
                next_pass = plan.borrow_and_update().next_pass;
                continue;
            }
        };
        let registered = match found {
            Ok(found) => {
                let (tx, rx) = oneshot::channel();
                if schedule
                    .send(ToSchedule::Discovered(found, tx))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                rx.await.unwrap_or(false)
            }
            Err(e) => {
                warn!(error = %e, "cannot resolve [[sources]]; the calendars found before stay, trying again");
                false
            }
        };
        next_pass = tokio::time::Instant::now()
            + if registered {
                current.discovery.every
            } else {
                RETRY
            };
    }
}
