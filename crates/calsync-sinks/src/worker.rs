//! A sink's loop: while this replica holds the sink's role, read this deployment's changes
//! after the sink's cursor, post them, and move the cursor once the endpoint acknowledged them;
//! on failure, the same changes again after a doubling pause. Woken by `NOTIFY calsync_changes`,
//! polling each second as well.

use crate::deliver::{DeliveryError, SinkConfig, client, post};
use backon::BackoffBuilder;
use calsync_store::{Store, StoreError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long the sink's role is held without renewal: another replica takes over within it
/// when this one stops.
const ROLE_TTL: Duration = Duration::from_secs(30);

/// How often the feed is read without a wake-up.
const POLL: Duration = Duration::from_secs(1);

/// A failing sink is reported (a warning) when it starts failing, then this often.
const REPORT_EVERY: Duration = Duration::from_secs(300);

/// The pause before a failed batch is sent again: 1 s, doubling to 5 min, with jitter.
fn backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(300))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Waits `d`, or less if `stop` fires; false if it did.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Delivers `sink` until `stop` fires. Never returns an error: a sink that cannot be
/// delivered is reported and retried, and never holds up anything else.
pub async fn follow(store: Store, sink: SinkConfig, stop: CancellationToken) {
    let name = sink.name.clone();
    let http = match client(&sink) {
        Ok(c) => c,
        Err(e) => {
            error!(sink = %name, error = %e, "sink disabled");
            return;
        }
    };
    let role = format!("sink:{name}");
    let mut listener = None;
    let mut cursor: Option<String> = None;
    let mut delays = backoff();
    let mut last_report: Option<tokio::time::Instant> = None;
    let mut role_checked: Option<tokio::time::Instant> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        // The role, renewed well within its TTL; without it, another replica delivers.
        if role_checked.is_none_or(|t| t.elapsed() >= ROLE_TTL / 3) {
            match store.hold_role(&role, ROLE_TTL).await {
                Ok(true) => role_checked = Some(tokio::time::Instant::now()),
                Ok(false) | Err(_) => {
                    (cursor, role_checked) = (None, None);
                    if !pause(ROLE_TTL / 3, &stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        if listener.is_none() {
            listener = store.listen_changes().await.ok();
        }
        let at = match &cursor {
            Some(c) => c.clone(),
            None => match store.sink_cursor(&name, sink.from_oldest).await {
                Ok(c) => {
                    cursor = Some(c.clone());
                    c
                }
                Err(e) => {
                    warn!(sink = %name, error = %e, "cannot read the sink's cursor");
                    if !pause(Duration::from_secs(5), &stop).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let page = match store.changes_after(Some(&at), sink.batch as i32).await {
            Ok(p) => p,
            Err(StoreError::Expired { .. }) => {
                let why = "expired: its cursor is older than changes.retention; delete its row of sink_cursors to start again from now";
                error!(sink = %name, "sink {why}");
                let _ = store.sink_failed(&name, why).await;
                metrics::gauge!("calsync_sink_failing", "sink" => name.clone()).set(1.0);
                if !pause(Duration::from_secs(60), &stop).await {
                    return;
                }
                cursor = None;
                continue;
            }
            Err(e) => {
                warn!(sink = %name, error = %e, "cannot read the change feed");
                if !pause(Duration::from_secs(5), &stop).await {
                    return;
                }
                continue;
            }
        };
        let Some(last) = page.last().map(|c| c.cursor.clone()) else {
            metrics::gauge!("calsync_sink_lag_seconds", "sink" => name.clone()).set(0.0);
            // Caught up: wait for a commit's wake-up, or poll.
            let woken = async {
                match listener.as_mut() {
                    Some(l) => {
                        if l.next().await.is_err() {
                            return false;
                        }
                        l.drain().await;
                        true
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                ok = woken => if !ok { listener = None },
                _ = tokio::time::sleep(POLL) => {}
            }
            continue;
        };
        let mine: Vec<_> = page
            .into_iter()
            .filter(|c| c.deployment == store.deployment())
            .collect();
        if let Some(first) = mine.first() {
            let lag = (chrono::Utc::now() - first.written_at).num_milliseconds() as f64 / 1000.0;
            metrics::gauge!("calsync_sink_lag_seconds", "sink" => name.clone()).set(lag.max(0.0));
            let sent = post(&http, &sink, &mine, chrono::Utc::now().timestamp()).await;
            if let Err(e) = sent {
                failed(&store, &name, &e, &mut last_report).await;
                let wait = delays.next().unwrap_or(Duration::from_secs(300));
                if !pause(wait, &stop).await {
                    return;
                }
                continue;
            }
        }
        match store.sink_delivered(&name, &last, mine.len() as i64).await {
            Ok(()) => {
                if last_report.take().is_some() {
                    info!(sink = %name, "sink delivering again");
                }
                metrics::counter!("calsync_sink_delivered_total", "sink" => name.clone())
                    .increment(mine.len() as u64);
                metrics::gauge!("calsync_sink_failing", "sink" => name.clone()).set(0.0);
                cursor = Some(last);
                delays = backoff();
            }
            Err(e) => {
                // Delivered but not recorded: sent again later (at least once).
                warn!(sink = %name, error = %e, "cannot save the sink's cursor");
                cursor = None;
                if !pause(Duration::from_secs(5), &stop).await {
                    return;
                }
            }
        }
    }
}

/// Records and reports a failed batch: a warning when the sink starts failing and every
/// five minutes while it goes on.
async fn failed(
    store: &Store,
    name: &str,
    e: &DeliveryError,
    last_report: &mut Option<tokio::time::Instant>,
) {
    metrics::counter!("calsync_sink_failures_total", "sink" => name.to_owned()).increment(1);
    metrics::gauge!("calsync_sink_failing", "sink" => name.to_owned()).set(1.0);
    let since = store.sink_failed(name, &e.to_string()).await.ok();
    if last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
        let failing_for = since
            .map(|s| (chrono::Utc::now() - s).num_seconds().max(0))
            .unwrap_or(0);
        warn!(sink = %name, error = %e, failing_for_secs = failing_for, "sink failing; its changes wait, syncing goes on");
        *last_report = Some(tokio::time::Instant::now());
    }
}
