//! The discovery worker: resolves the config's `[[sources]]` every `discovery.every` (sooner
//! after a failed pass) and hands what it found to the schedule worker. A reload replaces its
//! plan, which drops a pass of the old sources under way and restarts the cadence.

use crate::config::{Config, DiscoverySettings};
use crate::shared::ToSchedule;
use crate::worker::WorkerCtx;
use calsync_engine::{Engine, Rebase, Source};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

/// How soon a failed discovery pass is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

/// What the discovery and re-base workers follow: the config's sources and rolling-window
/// cadence, replaced by each reload.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The `[[sources]]` to resolve (none: no discovery).
    pub sources: Vec<Source>,
    /// `[discovery]`.
    pub discovery: DiscoverySettings,
    /// When rolling windows move.
    pub window_rebase: Rebase,
    /// When the next discovery pass is due.
    pub next_pass: tokio::time::Instant,
}

impl Plan {
    /// The plan of `cfg`, whose sources were resolved (or, `false`, not) just now.
    pub fn of(cfg: &Config, resolved: bool) -> Self {
        Plan {
            sources: cfg.sources.clone(),
            discovery: cfg.discovery,
            window_rebase: cfg.window_rebase,
            next_pass: tokio::time::Instant::now()
                + if resolved { cfg.discovery.every } else { RETRY },
        }
    }
}

/// Runs discovery passes until the plan's sender is gone (the service stopped).
pub async fn run(
    ctx: WorkerCtx,
    engine: Engine,
    mut plan: watch::Receiver<Plan>,
    schedule: mpsc::UnboundedSender<ToSchedule>,
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
                if schedule.send(ToSchedule::Discovered(found, tx)).is_err() {
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
