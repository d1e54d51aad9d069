//! The subscriber: one subscription per tracked (mailbox, calendar) held here (see the
//! module docs of [`crate::push`]).

use super::{ROLE_PUSH, resource, state_hash};
use crate::config::PushConfig;
use crate::shared::{Shared, ToSchedule};
use crate::worker::WorkerCtx;
use calsync_graph::{GraphError, NewSubscription};
use calsync_store::push::PushRow;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use rand::Rng;
use secrecy::SecretString;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Subscriptions created or renewed at once.
const PARALLEL: usize = 8;

/// How often the subscriber looks at its subscriptions.
pub const TICK: Duration = Duration::from_secs(5);

/// A refused mailbox is asked again this much later (issue 24: "retried daily").
const REFUSED_RETRY: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// A failed creation or renewal is tried again after this much (or the `Retry-After`).
const FAILED_RETRY: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// A fresh `clientState`: 32 random bytes, base64url (43 characters; Graph allows 128).
fn client_state() -> SecretString {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    SecretString::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// An expiry `lifetime` from `now`, less up to a tenth of it at random: subscriptions made at
/// once (a start with 10,000 calendars) come due for renewal spread out.
fn spread_expiry(now: DateTime<Utc>, lifetime: Duration) -> DateTime<Utc> {
    let spread = lifetime.as_secs_f64() / 10.0;
    let less = rand::thread_rng().gen_range(0.0..=spread);
    now + chrono::TimeDelta::from_std(lifetime.mul_f64(1.0) - Duration::from_secs_f64(less))
        .unwrap_or(chrono::TimeDelta::hours(24))
}

/// What a failed creation means: a mailbox that cannot be subscribed (`ExtensionError`:
/// hybrid or on-premises backends, msgraph-sdk-javascript#1880) is refused for a day; anything
/// else is tried again after the `Retry-After` or a few minutes.
fn after_failure(e: &GraphError, now: DateTime<Utc>) -> (&'static str, DateTime<Utc>) {
    // The code is kept as such on a 4xx, and leads the message of a 5xx.
    if e.code().eq_ignore_ascii_case("ExtensionError") || e.to_string().contains("ExtensionError") {
        return ("refused", now + REFUSED_RETRY);
    }
    let wait = e
        .retry_after()
        .and_then(|d| chrono::TimeDelta::from_std(d).ok())
        .unwrap_or(FAILED_RETRY)
        .max(chrono::TimeDelta::seconds(1));
    ("failing", now + wait)
}

/// The subscriber reads all its subscriptions at least this often (a safety net: every
/// change it knows of makes it read them all at once).
const FULL_READ_EVERY: Duration = Duration::from_secs(600);

/// How often the subscriptions are counted by state (`/metrics`) and untracked calendars'
/// subscriptions swept.
const COUNT_EVERY: Duration = Duration::from_secs(60);

/// The subscriber worker (see the module docs). It reads all the subscriptions it keeps when
/// what it keeps may have changed (at its start, when this replica's mailboxes change, when
/// the tracked set moves to a new generation, when the receiver had a lifecycle event, and
/// every `FULL_READ_EVERY`); in between, every [`TICK`], only those due for action
/// ([`Store::push_mine_due`](calsync_store::Store::push_mine_due)). At 10,000 calendars a
/// full read took ~240 ms of PostgreSQL's time; every 5 s at 100,000 that was half a core.
pub async fn subscriber(
    ctx: WorkerCtx,
    shared: Arc<Shared>,
    cfg: PushConfig,
    poke: Arc<tokio::sync::Notify>,
    mut owned: tokio::sync::watch::Receiver<u64>,
    schedule: mpsc::UnboundedSender<ToSchedule>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut active: HashSet<(String, String)> = HashSet::new();
    let mut told: Option<HashSet<(String, String)>> = None;
    // When the last full read was, and the generation it saw; `None`: one is due.
    let mut full: Option<(tokio::time::Instant, i64)> = None;
    let mut count_at = tokio::time::Instant::now();
    loop {
        ctx.idle();
        tokio::select! {
            _ = tick.tick() => {}
            _ = poke.notified() => full = None,
            Ok(()) = owned.changed() => full = None,
        }
        owned.borrow_and_update();
        ctx.busy();
        let generation = shared.followed().generation;
        let whole = match full {
            Some((at, g)) => g != generation || at.elapsed() >= FULL_READ_EVERY,
            None => true,
        };
        let store = shared.engine().store();
        let read = if whole {
            store.push_mine().await
        } else {
            store.push_mine_due(cfg.renew_before).await
        };
        let rows = match read {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "cannot read this replica's subscriptions; trying again");
                continue;
            }
        };
        // A few at once: 10,000 calendars starting are 10,000 creations, each waiting for
        // Graph's handshake with the receiver.
        let kept: Vec<((String, String), bool)> =
            futures_util::stream::iter(rows.into_iter().map(|row| {
                let (shared, cfg) = (Arc::clone(&shared), Arc::clone(&cfg));
                async move {
                    let healthy = keep(&shared, &cfg, &row).await;
                    ((row.mailbox, row.calendar_id), healthy)
                }
            }))
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        if whole {
            active.clear();
            full = Some((tokio::time::Instant::now(), generation));
        }
        for (key, healthy) in kept {
            if healthy {
                active.insert(key);
            } else {
                active.remove(&key);
            }
        }
        if told.as_ref() != Some(&active) {
            if schedule.send(ToSchedule::Pushed(active.clone())).is_err() {
                return Ok(());
            }
            told = Some(active.clone());
        }
        if whole || tokio::time::Instant::now() >= count_at {
            count_states(&shared).await;
        }
        if tokio::time::Instant::now() >= count_at {
            count_at = tokio::time::Instant::now() + COUNT_EVERY;
            sweep(&shared).await;
        }
    }
}

/// Creates, renews or recreates one subscription as its row says; answers whether it is
/// healthy (active, not about to lapse) afterwards.
async fn keep(shared: &Shared, cfg: &PushConfig, row: &PushRow) -> bool {
    let store = shared.engine().store();
    let now = Utc::now();
    // A subscription is renewed and deleted by its maker: the app, or the delegated account
    // that made it on `/me`. One whose calendar is now read by another is deleted by its maker
    // and made again by the reader at the next look.
    if let (Some(id), true) = (&row.subscription_id, row.account != row.reader) {
        if let Err(e) = maker(shared, row.account.as_deref(), &row.mailbox)
            .delete_subscription(id)
            .await
        {
            debug!(mailbox = %row.mailbox, error = %e, "cannot delete a subscription whose calendar changed reader; it lapses");
        }
        let _ = store.push_gone(id).await;
        return false;
    }
    let graph = maker(shared, row.account.as_deref(), &row.mailbox);

    let renew_before =
        chrono::TimeDelta::from_std(cfg.renew_before).unwrap_or(chrono::TimeDelta::hours(12));
    let waiting = row.retry_at.is_some_and(|t| t > now);
    let live = row.subscription_id.is_some() && row.expires_at.is_some_and(|e| e > now);
    match (row.state.as_str(), &row.subscription_id) {
        ("active", Some(id)) if live => {
            let due = row.expires_at.is_some_and(|e| e - now <= renew_before);
            if !due || waiting {
                return true;
            }
            let expires = spread_expiry(now, cfg.lifetime);
            match graph.renew_subscription(id, expires).await {
                Ok(Some(s)) => {
                    metrics::counter!("calsync_push_renewals_total", "result" => "ok").increment(1);
                    let _ = store.push_renewed(id, s.expires).await;
                    true
                }
                Ok(None) => {
                    // Graph lost it: created again at the next tick.
                    metrics::counter!("calsync_push_renewals_total", "result" => "gone")
                        .increment(1);
                    info!(mailbox = %row.mailbox, calendar = %row.calendar_id, "subscription gone at renewal; creating it again");
                    let _ = store.push_gone(id).await;
                    false
                }
                Err(e) => {
                    metrics::counter!("calsync_push_renewals_total", "result" => "failed")
                        .increment(1);
                    warn!(mailbox = %row.mailbox, calendar = %row.calendar_id, error = %e, "cannot renew a subscription; polling covers it");
                    let (_, at) = after_failure(&e, now);
                    let _ = store
                        .push_retry_at(&row.mailbox, &row.calendar_id, &e.to_string(), at)
                        .await;
                    // Still valid until it ends.
                    true
                }
            }
        }
        _ if waiting => false,
        _ => {
            let secret = client_state();
            let expires = spread_expiry(now, cfg.lifetime);
            let resource = resource(&row.mailbox, &row.calendar_id, row.reader.is_some());
            let graph = maker(shared, row.reader.as_deref(), &row.mailbox);
            let wanted = NewSubscription {
                resource: &resource,
                notification_url: cfg.notification_url.as_str(),
                lifecycle_url: cfg.lifecycle_url.as_str(),
                expires,
                client_state: &secret,
            };
            match graph.create_subscription(&wanted).await {
                Ok(s) => {
                    use secrecy::ExposeSecret;
                    let hash = state_hash(secret.expose_secret());
                    metrics::counter!("calsync_push_subscribe_total", "result" => "ok")
                        .increment(1);
                    let _ = store
                        .push_created(
                            &row.mailbox,
                            &row.calendar_id,
                            &s.id,
                            &hash,
                            s.expires,
                            row.reader.as_deref(),
                        )
                        .await;
                    // Whatever changed before it existed is caught up by a round.
                    let _ = store
                        .push_wake(&[(row.mailbox.clone(), row.calendar_id.clone())])
                        .await;
                    true
                }
                Err(e) => {
                    let (state, at) = after_failure(&e, now);
                    metrics::counter!("calsync_push_subscribe_total", "result" => state)
                        .increment(1);
                    warn!(mailbox = %row.mailbox, calendar = %row.calendar_id, error = %e, state, retry_at = %at, "cannot subscribe; the calendar is polled at its interval");
                    let _ = store
                        .push_unhealthy(
                            &row.mailbox,
                            &row.calendar_id,
                            state,
                            &e.to_string(),
                            at,
                            true,
                        )
                        .await;
                    false
                }
            }
        }
    }
}

/// The client that makes, renews and deletes a subscription: the app's, or `account`'s for a
/// calendar of `mailbox` read through it.
fn maker(shared: &Shared, account: Option<&str>, mailbox: &str) -> calsync_graph::GraphClient {
    match account {
        Some(a) => shared.engine().account_client(a, mailbox),
        None => shared.engine().graph().clone(),
    }
}

/// Publishes how many subscriptions are in each state (the deployment's, as stored).
async fn count_states(shared: &Shared) {
    if let Ok(counts) = shared.engine().store().push_counts().await {
        let mut by: HashMap<&str, f64> = ["pending", "active", "refused", "failing"]
            .into_iter()
            .map(|s| (s, 0.0))
            .collect();
        for (state, n) in &counts {
            if let Some(v) = by.get_mut(state.as_str()) {
                *v = *n as f64;
            }
        }
        for (state, n) in by {
            metrics::gauge!("calsync_push_subscriptions", "state" => state).set(n);
        }
    }
}

/// Deletes the subscriptions of calendars no longer tracked (one replica at a time).
async fn sweep(shared: &Shared) {
    let store = shared.engine().store();
    match store.hold_role(ROLE_PUSH, Duration::from_secs(120)).await {
        Ok(true) => {}
        _ => return,
    }
    let Ok(orphans) = store.push_orphans().await else {
        return;
    };
    for row in orphans {
        if let Some(id) = &row.subscription_id {
            if let Err(e) = maker(shared, row.account.as_deref(), &row.mailbox)
                .delete_subscription(id)
                .await
            {
                debug!(error = %e, "cannot delete an untracked calendar's subscription; trying again");
                continue;
            }
        }
        info!(mailbox = %row.mailbox, calendar = %row.calendar_id, "subscription of an untracked calendar deleted");
        let _ = store.push_forget(&row.mailbox, &row.calendar_id).await;
    }
}
