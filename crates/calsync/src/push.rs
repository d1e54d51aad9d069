//! Push (issue 24): Graph's change notifications wake a calendar's round within seconds; the
//! interval poll stays underneath as the backstop. A notification only ever asks for the
//! normal delta round (through the wake path of issue 23, so the replica holding the mailbox
//! runs it wherever Graph delivered), so nothing a notification says, or fails to say, can
//! make the mirror wrong.
//!
//! - **The receiver** (`push.listen`, a listener of its own): `POST {path}/notifications` and
//!   `POST {path}/lifecycle` (the path of `push.notification_url`), nothing else. It answers Graph's validation handshake, checks each
//!   item's subscription id and `clientState` (against a stored hash, in constant time),
//!   makes the wake-up durable (`round_requests`) and answers 202; a database that cannot take
//!   it answers 503 so Graph redelivers.
//! - **The subscriber** (a worker on every replica): keeps one subscription per tracked
//!   (mailbox, calendar) whose mailbox this replica holds — created when a calendar starts,
//!   renewed `renew_before` its end (expiries spread), created again when Graph lost it,
//!   remembered as refused (polled, asked again daily) when the mailbox cannot be subscribed —
//!   and, on the replica holding the `push` role, deletes the subscriptions of calendars no
//!   longer tracked. It tells the schedule worker which calendars are pushed: those poll at
//!   `backstop_interval`.

use crate::config::PushConfig;
use crate::shared::{Shared, ToSchedule};
use crate::worker::WorkerCtx;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use calsync_graph::{GraphError, NewSubscription};
use calsync_store::push::{PushRow, PushTarget};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use rand::Rng;
use secrecy::SecretString;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The largest notification POST the receiver reads (Graph batches notifications; a batch of
/// hundreds is well under this).
pub const MAX_BODY: usize = 1024 * 1024;

/// Subscriptions created or renewed at once.
const PARALLEL: usize = 8;

/// How often the subscriber looks at its subscriptions.
pub const TICK: Duration = Duration::from_secs(5);

/// A refused mailbox is asked again this much later (issue 24: "retried daily").
const REFUSED_RETRY: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// A failed creation or renewal is tried again after this much (or the `Retry-After`).
const FAILED_RETRY: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Who sweeps the subscriptions of untracked calendars (one replica at a time).
pub const ROLE_PUSH: &str = "push";

/// The receiver's shared state.
#[derive(Clone)]
struct Receiver {
    /// The store on a pool of its own ([`RECEIVER_CONNECTIONS`]): a notification's two
    /// statements never wait for a connection behind the rounds' page writes.
    store: calsync_store::Store,
    subscriber: Arc<tokio::sync::Notify>,
}

/// The receiver's own connections. Each POST makes two statements (read the subscriptions,
/// write the wake-ups); Graph delivers a few POSTs at a time, batching notifications in each.
pub const RECEIVER_CONNECTIONS: u32 = 2;

/// The receiver's two routes, at the paths of the URLs Graph is given (a proxy in front passes
/// the path through), with the body limit.
pub fn receiver(
    shared: Arc<Shared>,
    cfg: &PushConfig,
    subscriber: Arc<tokio::sync::Notify>,
) -> Router {
    Router::new()
        .route(cfg.notification_url.path(), post(notifications))
        .route(cfg.lifecycle_url.path(), post(lifecycle))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Receiver {
            store: shared.engine().store().on_own_pool(RECEIVER_CONNECTIONS),
            subscriber,
        })
}

/// The `validationToken` of Graph's handshake, decoded, if the request is one.
fn validation_token(uri: &axum::http::Uri) -> Option<String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "validationToken")
        .map(|(_, v)| v.into_owned())
}

/// One item of a notification POST (`value[]`), the fields calsync reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    subscription_id: Option<String>,
    client_state: Option<String>,
    lifecycle_event: Option<String>,
}

#[derive(Deserialize)]
struct Batch {
    #[serde(default)]
    value: Vec<Item>,
}

/// Why the receiver did not accept a POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The database could not take it: 503, so Graph delivers again.
    Retry,
    /// Not a notification batch: 400.
    Malformed,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Retry => (StatusCode::SERVICE_UNAVAILABLE, "try again\n").into_response(),
            Refusal::Malformed => {
                (StatusCode::BAD_REQUEST, "not a notification batch\n").into_response()
            }
        }
    }
}

/// The SHA-256 of a `clientState`, as stored.
pub fn state_hash(client_state: &str) -> Vec<u8> {
    Sha256::digest(client_state.as_bytes()).to_vec()
}

/// Graph's validation handshake: the token, decoded, as plain text (Learn: within 10 s, 200,
/// `text/plain`).
fn handshake(token: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        token,
    )
        .into_response()
}

fn rejected(reason: &'static str, n: usize) {
    metrics::counter!("calsync_push_notifications_total", "result" => "rejected", "reason" => reason)
        .increment(n as u64);
}

/// Checks each item against the stored subscriptions: answers the targets whose id is known
/// and whose `clientState` hashes to the stored hash (compared in constant time).
async fn verified(r: &Receiver, items: &[Item]) -> Result<Vec<(PushTarget, usize)>, Refusal> {
    let ids: Vec<String> = items
        .iter()
        .filter_map(|i| i.subscription_id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        rejected("malformed", items.len());
        return Ok(Vec::new());
    }
    let store = &r.store;
    let targets = match store.push_targets(&ids).await {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "cannot check notified subscriptions; Graph will deliver again");
            return Err(Refusal::Retry);
        }
    };
    let by_id: HashMap<&str, &PushTarget> = targets
        .iter()
        .map(|t| (t.subscription_id.as_str(), t))
        .collect();
    let mut good: HashMap<String, (PushTarget, usize)> = HashMap::new();
    for item in items {
        let Some(target) = item.subscription_id.as_deref().and_then(|id| by_id.get(id)) else {
            rejected("unknown_subscription", 1);
            continue;
        };
        let presented = state_hash(item.client_state.as_deref().unwrap_or(""));
        let stored = target.client_state_hash.as_deref().unwrap_or(&[]);
        if stored.len() != presented.len() || !bool::from(stored.ct_eq(&presented)) {
            rejected("client_state", 1);
            continue;
        }
        good.entry(target.subscription_id.clone())
            .or_insert_with(|| ((*target).clone(), 0))
            .1 += 1;
    }
    Ok(good.into_values().collect())
}

/// Makes the wake-ups of these targets durable; 503 if the database cannot take them.
async fn wake(r: &Receiver, targets: &[(PushTarget, usize)]) -> Result<(), Refusal> {
    if targets.is_empty() {
        return Ok(());
    }
    let pairs: Vec<(String, String)> = targets
        .iter()
        .map(|(t, _)| (t.mailbox.clone(), t.calendar_id.clone()))
        .collect();
    match r.store.push_wake(&pairs).await {
        Ok(_) => {
            let n: usize = targets.iter().map(|(_, n)| n).sum();
            metrics::counter!("calsync_push_notifications_total", "result" => "accepted", "reason" => "")
                .increment(n as u64);
            Ok(())
        }
        Err(e) => {
            warn!(error = %e, "cannot record a notification's wake-up; Graph will deliver again");
            Err(Refusal::Retry)
        }
    }
}

fn parse(body: &[u8]) -> Result<Vec<Item>, Refusal> {
    serde_json::from_slice::<Batch>(body)
        .map(|b| b.value)
        .map_err(|_| {
            rejected("malformed", 1);
            Refusal::Malformed
        })
}

/// `POST /notifications`: the handshake, or a batch of change notifications.
async fn notifications(
    State(r): State<Receiver>,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Response {
    if let Some(token) = validation_token(&uri) {
        return handshake(token);
    }
    let items = match parse(&body) {
        Ok(i) => i,
        Err(refusal) => return refusal.into_response(),
    };
    let targets = match verified(&r, &items).await {
        Ok(t) => t,
        Err(refusal) => return refusal.into_response(),
    };
    match wake(&r, &targets).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// `POST /lifecycle`: the handshake, or lifecycle events (Learn, "Reduce missing
/// subscriptions and change notifications"): `missed` asks for a round;
/// `subscriptionRemoved` has the subscription created again and asks for a round;
/// `reauthorizationRequired` has it renewed now (a renewal reauthorizes).
async fn lifecycle(
    State(r): State<Receiver>,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Response {
    if let Some(token) = validation_token(&uri) {
        return handshake(token);
    }
    let items = match parse(&body) {
        Ok(i) => i,
        Err(refusal) => return refusal.into_response(),
    };
    let targets = match verified(&r, &items).await {
        Ok(t) => t,
        Err(refusal) => return refusal.into_response(),
    };
    let events: HashMap<&str, &str> = items
        .iter()
        .filter_map(|i| Some((i.subscription_id.as_deref()?, i.lifecycle_event.as_deref()?)))
        .collect();
    let store = &r.store;
    let mut catch_up = Vec::new();
    for (t, n) in &targets {
        let event = events
            .get(t.subscription_id.as_str())
            .copied()
            .unwrap_or("");
        metrics::counter!("calsync_push_lifecycle_total", "event" => event.to_owned())
            .increment(*n as u64);
        let done = match event {
            "missed" => Ok(()),
            "subscriptionRemoved" => store.push_gone(&t.subscription_id).await.map(|_| ()),
            "reauthorizationRequired" => store.push_renew_now(&t.subscription_id).await,
            other => {
                debug!(
                    event = other,
                    "an unknown lifecycle event; a round is asked all the same"
                );
                Ok(())
            }
        };
        if let Err(e) = done {
            warn!(error = %e, "cannot record a lifecycle event; Graph will deliver again");
            return Refusal::Retry.into_response();
        }
        info!(subscription = %t.subscription_id, event, "lifecycle event");
        catch_up.push((t.clone(), *n));
    }
    r.subscriber.notify_one();
    match wake(&r, &catch_up).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// A fresh `clientState`: 32 random bytes, base64url (43 characters; Graph allows 128).
fn client_state() -> SecretString {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    SecretString::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The resource subscribed for (mailbox, calendar): per calendar, by the mailbox's lease key
/// (its object id when known: Graph's guidance, UPNs with an apostrophe fail).
/// Only what would break the path is escaped (`%`, `/`, `?`, `#`): an address keeps its `@`,
/// as in Graph's examples.
pub fn resource(mailbox: &str, calendar_id: &str) -> String {
    let segment = |s: &str| {
        s.replace('%', "%25")
            .replace('/', "%2F")
            .replace('?', "%3F")
            .replace('#', "%23")
    };
    match calendar_id {
        "default" => format!("/users/{}/calendar/events", segment(mailbox)),
        id => format!(
            "/users/{}/calendars/{}/events",
            segment(mailbox),
            segment(id)
        ),
    }
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
/// every [`FULL_READ_EVERY`]); in between, every [`TICK`], only those due for action
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
    let graph = shared.engine().graph();
    let now = Utc::now();
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
            let resource = resource(&row.mailbox, &row.calendar_id);
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
                        .push_created(&row.mailbox, &row.calendar_id, &s.id, &hash, s.expires)
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
            if let Err(e) = shared.engine().graph().delete_subscription(id).await {
                debug!(error = %e, "cannot delete an untracked calendar's subscription; trying again");
                continue;
            }
        }
        info!(mailbox = %row.mailbox, calendar = %row.calendar_id, "subscription of an untracked calendar deleted");
        let _ = store.push_forget(&row.mailbox, &row.calendar_id).await;
    }
}

/// `owned` with each calendar whose subscription is healthy (`pushed`) polling at `backstop`
/// instead of its interval (never more often than before; a cron schedule keeps its fire
/// times).
pub fn at_backstop(
    owned: Vec<Arc<calsync_engine::Tuple>>,
    pushed: &HashSet<(String, String)>,
    backstop: Duration,
) -> Vec<Arc<calsync_engine::Tuple>> {
    if pushed.is_empty() {
        return owned;
    }
    owned
        .into_iter()
        .map(|t| {
            let calendar = match &t.calendar {
                calsync_graph::CalendarRef::Default => "default",
                calsync_graph::CalendarRef::Id(id) => id.as_str(),
            };
            let slower = t.schedule.is_none()
                && t.interval < backstop
                && pushed.contains(&(t.mailbox.clone(), calendar.to_owned()));
            if slower {
                Arc::new(calsync_engine::Tuple {
                    interval: backstop,
                    ..(*t).clone()
                })
            } else {
                t
            }
        })
        .collect()
}
