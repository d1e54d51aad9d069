//! The receiver: Graph's validation handshake, change notifications and lifecycle events,
//! on a listener of its own (see the module docs of [`crate::push`]).

use crate::config::PushConfig;
use crate::shared::Shared;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use calsync_store::push::PushTarget;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tracing::{debug, info, warn};

/// The largest notification POST the receiver reads (Graph batches notifications; a batch of
/// hundreds is well under this).
pub const MAX_BODY: usize = 1024 * 1024;

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

/// What both routes do first: answer Graph's handshake, or parse the batch and check each
/// item's subscription and `clientState`. `Err`: the answer to give at once.
async fn admitted(
    r: &Receiver,
    uri: &axum::http::Uri,
    body: &[u8],
) -> Result<(Vec<Item>, Vec<(PushTarget, usize)>), Response> {
    if let Some(token) = validation_token(uri) {
        return Err(handshake(token));
    }
    let items = parse(body).map_err(IntoResponse::into_response)?;
    let targets = verified(r, &items)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok((items, targets))
}

/// `POST /notifications`: the handshake, or a batch of change notifications.
async fn notifications(
    State(r): State<Receiver>,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> Response {
    let (_, targets) = match admitted(&r, &uri, &body).await {
        Ok(admitted) => admitted,
        Err(answer) => return answer,
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
    let (items, targets) = match admitted(&r, &uri, &body).await {
        Ok(admitted) => admitted,
        Err(answer) => return answer,
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
