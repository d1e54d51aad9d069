//! The discovery worker: resolves the config's `[[sources]]` every `discovery.every` (sooner
//! after a failed pass) and hands what it found to the schedule worker. A reload replaces its
//! plan, which drops a pass of the old sources under way and restarts the cadence. One
//! replica of a deployment runs the passes at a time (the `discovery` role in PostgreSQL),
//! and only one whose config is the deployment's: the others follow the generation it writes.

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
    /// The digest of the config the sources come from: a pass runs only while it is the
    /// deployment's.
    pub digest: String,
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
            digest: cfg.digest.clone(),
        }
    }
}

/// Runs discovery passes until the plan's sender is gone (the service stopped).
pub async fn run(
    ctx: WorkerCtx,
    engine: Engine,
    mut plan: watch::Receiver<Plan>,
    schedule: mpsc::UnboundedSender<ToSchedule>,
    role_ttl: Duration,
) -> anyhow::Result<()> {
    let mut next_pass = plan.borrow_and_update().next_pass;
    let store = engine.store();
    // The holder keeps the role between passes, so the cadence is the deployment's, not each
    // replica's: another replica takes it only when this one is gone (or stale).
    let mut holding = false;
    let mut keep = tokio::time::interval(role_ttl / 4);
    keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                if changed.is_err() {
                    if holding {
                        let _ = store.release_role(crate::schedule::ROLE_DISCOVERY).await;
                    }
                    return Ok(())
                }
                next_pass = plan.borrow_and_update().next_pass;
                continue;
            }
            _ = keep.tick(), if holding => {
                holding = store.hold_role(crate::schedule::ROLE_DISCOVERY, role_ttl).await.unwrap_or(false);
                continue;
            }
        }
        ctx.busy();
        let based_on = match coordinate(store, &current, role_ttl).await {
            Some(g) => g,
            None => {
                holding = false;
                next_pass = tokio::time::Instant::now() + RETRY;
                continue;
            }
        };
        holding = true;
        let anchor = current.window_rebase.anchor(chrono::Utc::now());
        let pass = engine.discover(&current.sources, anchor, current.discovery.refused_recheck);
        tokio::pin!(pass);
        // The role is renewed while the pass runs (10,000 users take minutes); a replica that
        // loses it (a pause past its ttl) drops the pass: another one runs it.
        let mut renew = tokio::time::interval(role_ttl / 4);
        renew.tick().await;
        let found = loop {
            tokio::select! {
                found = &mut pass => break Some(found),
                // A reload replaced the sources: this pass's answer is for the old ones.
                changed = plan.changed() => {
                    if changed.is_err() { return Ok(()) }
                    next_pass = plan.borrow_and_update().next_pass;
                    break None;
                }
                _ = renew.tick() => {
                    if !store.hold_role(crate::schedule::ROLE_DISCOVERY, role_ttl).await.unwrap_or(false) {
                        warn!("lost the discovery role during a pass; another replica runs it");
                        next_pass = tokio::time::Instant::now() + RETRY;
                        break None;
                    }
                }
            }
        };
        let Some(found) = found else { continue };
        let registered = match found {
            Ok(found) => {
                let (tx, rx) = oneshot::channel();
                if schedule
                    .send(ToSchedule::Discovered(found, based_on, tx))
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

/// Takes (or keeps) the deployment's discovery role and answers the generation a pass starts
/// from, if this replica is to run it: it holds the role and its config is the deployment's.
async fn coordinate(store: &calsync_store::Store, plan: &Plan, ttl: Duration) -> Option<i64> {
    let set = match store.tracked_set().await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot read the deployment's tracked set; discovery waits");
            return None;
        }
    };
    if set.config_digest != plan.digest {
        // A stale file's sources are not the deployment's: leave the role to a replica whose
        // config is current.
        let _ = store.release_role(crate::schedule::ROLE_DISCOVERY).await;
        return None;
    }
    match store.hold_role(crate::schedule::ROLE_DISCOVERY, ttl).await {
        Ok(true) => Some(set.generation),
        Ok(false) => None,
        Err(e) => {
            warn!(error = %e, "cannot take the discovery role; trying again");
            None
        }
    }
}
