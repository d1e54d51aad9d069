//! How a round's requests and writes go out: every Graph request through the request gate
//! (`send`: a mailbox slot, its `Retry-After`, the adaptive limit), and every step retried on
//! retryable errors with capped exponential backoff and full jitter (`with_retries`, backon).

use crate::step_error::StepError;
use crate::{Engine, Tuple};
use backon::{ExponentialBuilder, Retryable};
use calsync_graph::{ErrorClass, GraphError, MailboxHold};
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Full jitter: a uniformly random wait up to the exponential step (AWS's "full jitter").
fn full_jitter(d: Duration) -> Duration {
    if d.is_zero() {
        return d;
    }
    Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=d.as_secs_f64()))
}

/// A replay's mailbox as the request gate sees it, for the batch collector: it asks again
/// when its batch goes out, and holds the mailbox the moment an inner answer brings a
/// `Retry-After` (see `calsync_graph::MailboxHold`).
struct GateHold {
    engine: Engine,
    mailbox: String,
}

impl MailboxHold for GateHold {
    fn held(&self) -> bool {
        self.engine.inner.gate.deferred(&self.mailbox)
    }

    fn hold_for(&self, wait: Duration) {
        self.engine.inner.gate.defer(&self.mailbox, wait);
    }
}

impl Engine {
    /// What a replay of `tuple` hands the batch collector about its mailbox (nothing when
    /// replays are not batched).
    pub(crate) fn mailbox_hold(&self, tuple: &Tuple) -> Option<Arc<dyn MailboxHold>> {
        self.graph_for(tuple).batching().then(|| {
            Arc::new(GateHold {
                engine: self.clone(),
                mailbox: tuple.mailbox.clone(),
            }) as Arc<dyn MailboxHold>
        })
    }

    /// Retries `op` on retryable errors with capped exponential backoff and full jitter;
    /// the request gate separately holds the mailbox for any `Retry-After`.
    pub(crate) async fn with_retries<T, F, Fut>(
        &self,
        cancel: &CancellationToken,
        op: F,
    ) -> Result<T, StepError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>>,
    {
        let s = self.settings();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(s.min_backoff)
            .with_max_delay(s.max_backoff)
            .with_max_times(s.max_attempts.saturating_sub(1));
        let for_sleep = cancel.clone();
        let for_when = cancel.clone();
        let sleeper = move |d: Duration| {
            let cancel = for_sleep.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => {}
                }
            }
        };
        op.retry(backoff)
            .sleep(sleeper)
            .when(move |e: &StepError| e.class() == Some(ErrorClass::Retry) && !for_when.is_cancelled())
            .adjust(|_, d| d.map(full_jitter))
            .notify(|e: &StepError, d: Duration| {
                debug!(code = %e.code(), error = %e.message(), wait_ms = d.as_millis() as u64, "retrying");
            })
            .await
    }

    /// Sends one Graph request for `tuple` through the request gate: a mailbox slot, no
    /// request before its `Retry-After`, the adaptive global limit. A throttled answer holds
    /// the mailbox before the slot is released.
    pub(crate) async fn send<T>(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        request: impl std::future::Future<Output = Result<T, GraphError>>,
    ) -> Result<T, StepError> {
        self.send_unless(tuple, cancel, None, request).await
    }

    /// [`Engine::send`] for one of several requests going out together ([`Engine::send_all`]):
    /// it is not sent once `stood_down` is cancelled (a sibling failed), but once sent it is
    /// awaited whatever happens to its siblings, so its answer (and any `Retry-After` in it)
    /// reaches the gate.
    pub(crate) async fn send_unless<T>(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        stood_down: Option<&CancellationToken>,
        request: impl std::future::Future<Output = Result<T, GraphError>>,
    ) -> Result<T, StepError> {
        let standing_down = || stood_down.is_some_and(CancellationToken::is_cancelled);
        if standing_down() {
            return Err(StepError::Interrupted);
        }
        // Not interrupted by a sibling: waiting out a hold gives up the round's slot, and
        // only this wait gets it back.
        if !self.wait_out_hold(tuple, cancel).await {
            return Err(StepError::Interrupted);
        }
        let sibling_failed = async {
            match stood_down {
                Some(t) => t.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(StepError::Interrupted),
            _ = sibling_failed => return Err(StepError::Interrupted),
            p = self.inner.gate.acquire(&tuple.mailbox) => p,
        };
        if standing_down() {
            return Err(StepError::Interrupted);
        }
        self.touch_round(&tuple.key);
        let fetched = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(StepError::Interrupted),
            r = request => r,
        };
        self.touch();
        self.touch_round(&tuple.key);
        match &fetched {
            Ok(_) => self.hot_metrics().responses_ok.increment(1),
            Err(e) => metrics::counter!(
                "calsync_graph_responses_total",
                "status" => e.status().map_or_else(|| "none".to_owned(), |s| s.to_string()),
                "code" => e.code().to_owned()
            )
            .increment(1),
        }
        let gate = &self.inner.gate;
        match fetched {
            Ok(p) => {
                drop(permit);
                gate.succeeded();
                Ok(p)
            }
            Err(e) => {
                // Hold the mailbox before this request's slot is released: a task waiting
                // for the slot must find the Retry-After already in place.
                if let Some(wait) = e.retry_after() {
                    gate.defer(&tuple.mailbox, wait);
                }
                drop(permit);
                if e.is_throttle() {
                    gate.throttled(&tuple.mailbox);
                }
                Err(StepError::Graph(e))
            }
        }
    }

    /// Sends one request per item for `tuple`, `parallel` at once, as a page's fetches must
    /// go to one mailbox: after the first failure no further request starts, and the ones
    /// already in flight are awaited rather than dropped, so every answer, and every
    /// `Retry-After` in it, reaches the gate before the step fails. (Dropping them lost a
    /// sibling's 429: graph-sim saw the page's retry reach the mailbox 1 ms inside the
    /// `Retry-After` of an answer calsync never read.) `each` sends with
    /// [`Engine::send_unless`] and the token it is given.
    pub(crate) async fn send_all<I, T, F, Fut>(
        &self,
        items: I,
        parallel: usize,
        each: F,
    ) -> Result<Vec<T>, StepError>
    where
        I: IntoIterator,
        F: Fn(I::Item, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>>,
    {
        use futures_util::StreamExt;
        let stood_down = CancellationToken::new();
        let mut running = futures_util::stream::iter(items)
            .map(|item| each(item, stood_down.clone()))
            .buffer_unordered(parallel);
        let mut done = Vec::new();
        let mut failed: Option<StepError> = None;
        while let Some(r) = running.next().await {
            match r {
                Ok(v) => done.push(v),
                Err(e) => {
                    stood_down.cancel();
                    // The first real failure wins over the siblings it stood down.
                    if failed
                        .as_ref()
                        .is_none_or(|f| matches!(f, StepError::Interrupted))
                    {
                        failed = Some(e);
                    }
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }
}
