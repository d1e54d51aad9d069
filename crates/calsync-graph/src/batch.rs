//! JSON batching of delta-link replays: the rounds due together ask Graph in one
//! `POST /$batch` of up to 20 GETs (notes §6, Microsoft Learn "Combine multiple HTTP requests
//! using JSON batching").
//!
//! A round that finds nothing new is one GET that answers an empty page and a new deltaLink.
//! At 100,000 calendars that is hundreds of requests a second, each paying a whole HTTP
//! exchange (against the real service, TLS too), while rounds already start together on
//! scheduler slots. So the first request of an incremental round (the replay of a saved
//! deltaLink) goes to one collector task: it waits up to [`GraphConfig::batch_linger`](crate::GraphConfig::batch_linger) for
//! others, up to [`GraphConfig::batch_size`](crate::GraphConfig::batch_size), and sends them as one batch; every round gets
//! its own inner answer back and reads it as it would have read a direct one.
//!
//! What keeps this honest with Graph's manners:
//! - Graph evaluates each inner request against its limits as if it came alone (4 in flight
//!   per mailbox, the request budgets) and answers a throttled one with its own 429 and
//!   `Retry-After` (notes §6, "Throttling and batching"). Each round still takes its mailbox's
//!   slot in the request gate before its request joins a batch, and reads its own inner status
//!   and `Retry-After`, so the gate sees exactly what it would have seen.
//! - The outer status is not relied on: a batch answered with anything but 200 gives every
//!   request in it that answer; a batch the network lost fails every request as transient, and
//!   its retry goes out alone on a fresh connection.
//! - Inner URLs are relative to the version root (the known issue with absolute URLs,
//!   microsoft-graph-docs#6535); the links inside the answers are absolute, as always.
//! - Only replays are batched: pages of a full round can be large and follow each other, so
//!   they stay direct. That Graph serves delta links inside a batch is not documented either
//!   way (notes §6): if a batched replay is refused and the same request sent alone is not,
//!   batching stops for this process (a warning says so) and every replay goes direct.

use crate::error::GraphError;
use crate::{Answer, GraphClient, Inner, parse_retry_after};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// Graph's limit of requests in one batch (notes §6).
pub const MAX_REQUESTS: usize = 20;

/// The collector's receiving end: whoever holds it runs the collector
/// ([`GraphClient::run_batch_collector`]).
#[derive(Debug)]
pub struct BatchInbox(mpsc::UnboundedReceiver<Job>);

/// Where replays go to be batched. The collector runs where the inbox went: in a worker of the
/// caller's ([`GraphClient::take_batch_inbox`]: `calsync run` supervises it by name), or else
/// in a task the first replay starts, which ends when the client is dropped.
#[derive(Debug)]
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    inbox: Mutex<Option<BatchInbox>>,
    /// The inbox was taken, by a caller or by the first replay: replays only send.
    taken: AtomicBool,
}

impl Default for Batcher {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Batcher {
            tx,
            inbox: Mutex::new(Some(BatchInbox(rx))),
            taken: AtomicBool::new(false),
        }
    }
}

impl Batcher {
    fn take_inbox(&self) -> Option<BatchInbox> {
        self.taken.store(true, Ordering::Release);
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What a batched request knows of its mailbox's manners (the caller's request gate): a
/// replay waits up to the linger in the collector after it passed the gate, and a
/// `Retry-After` for its mailbox may arrive meanwhile (the soak saw requests reach a mailbox
/// 15–21 ms after its 429, issue 23). So the collector asks again when it sends the batch, and
/// holds the mailbox itself when an inner answer brings a `Retry-After`, before any round
/// hears of it.
pub trait MailboxHold: Send + Sync {
    /// Whether a `Retry-After` holds the mailbox now.
    fn held(&self) -> bool;
    /// Holds the mailbox for `wait` (Graph's `Retry-After`).
    fn hold_for(&self, wait: Duration);
}

pub(crate) struct Job {
    /// The request's URL relative to the version root: `/users/…/calendarView/delta?…`.
    url: String,
    reply: oneshot::Sender<Result<Answer, GraphError>>,
    /// Its mailbox's manners, if the caller keeps them.
    hold: Option<Arc<dyn MailboxHold>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

/// Gathers jobs into batches of at most `size`, the first waiting at most `linger`, and sends
/// each batch on its own task; ends when the client is gone. A job taken from the inbox is
/// answered by its batch's task: only the gathering batch is lost if this future is dropped.
async fn collect(inner: Weak<Inner>, inbox: &mut BatchInbox, size: usize, linger: Duration) {
    let rx = &mut inbox.0;
    while let Some(first) = rx.recv().await {
        let mut jobs = Vec::with_capacity(size);
        jobs.push(first);
        let deadline = tokio::time::Instant::now() + linger;
        while jobs.len() < size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => jobs.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let client = GraphClient {
            inner,
            account: None,
        };
        tokio::spawn(async move { client.send_batch(jobs).await });
    }
}

impl GraphClient {
    /// The collector's inbox, for a caller that runs the collector as a supervised worker
    /// ([`GraphClient::run_batch_collector`]); taken before the first replay, or replays
    /// start a collector of their own. `None` once taken.
    pub fn take_batch_inbox(&self) -> Option<BatchInbox> {
        self.inner.batcher.take_inbox()
    }

    /// Runs the collector on `inbox` until the future is dropped. A collector that ends (a
    /// panic) leaves the replays still queued in `inbox` for the next run.
    pub async fn run_batch_collector(&self, inbox: &mut BatchInbox) {
        let cfg = &self.inner.cfg;
        let (size, linger) = (cfg.batch_size.min(MAX_REQUESTS), cfg.batch_linger);
        collect(Arc::downgrade(&self.inner), inbox, size, linger).await
    }
}

#[derive(Serialize)]
struct BatchRequest<'a> {
    requests: Vec<InnerRequest<'a>>,
}

#[derive(Serialize)]
struct InnerRequest<'a> {
    id: String,
    method: &'static str,
    url: &'a str,
    headers: InnerHeaders<'a>,
}

/// Headers of the outer request are not applied to the inner ones: each names its own.
#[derive(Serialize)]
struct InnerHeaders<'a> {
    #[serde(rename = "Prefer")]
    prefer: &'a str,
}

#[derive(Deserialize)]
struct BatchAnswer<'a> {
    #[serde(borrow)]
    responses: Vec<InnerAnswer<'a>>,
}

#[derive(Deserialize)]
struct InnerAnswer<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    status: u16,
    #[serde(default)]
    headers: Option<RetryAfterHeader>,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
}

/// The one inner header calsync reads, `Retry-After` (any case), picked out of the headers
/// object without keeping the others.
struct RetryAfterHeader(Option<String>);

impl<'de> Deserialize<'de> for RetryAfterHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IsRetryAfter(bool);
        impl<'de> Deserialize<'de> for IsRetryAfter {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Name;
                impl serde::de::Visitor<'_> for Name {
                    type Value = IsRetryAfter;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a header name")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IsRetryAfter, E> {
                        Ok(IsRetryAfter(v.eq_ignore_ascii_case("retry-after")))
                    }
                }
                d.deserialize_str(Name)
            }
        }
        struct Headers;
        impl<'de> serde::de::Visitor<'de> for Headers {
            type Value = RetryAfterHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of headers")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<RetryAfterHeader, M::Error> {
                let mut found = None;
                while let Some(IsRetryAfter(wanted)) = m.next_key()? {
                    if wanted {
                        found = Some(m.next_value::<String>()?);
                    } else {
                        m.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(RetryAfterHeader(found))
            }
        }
        d.deserialize_map(Headers)
    }
}

/// The request body of a batch of GETs of `urls`, with ids `1`…`n` in order.
fn batch_body(urls: &[&str], prefer: &str) -> Result<Vec<u8>, GraphError> {
    let requests = urls
        .iter()
        .enumerate()
        .map(|(i, url)| InnerRequest {
            id: (i + 1).to_string(),
            method: "GET",
            url,
            headers: InnerHeaders { prefer },
        })
        .collect();
    serde_json::to_vec(&BatchRequest { requests }).map_err(|e| GraphError::Malformed {
        reason: format!("a batch could not be written: {e}"),
    })
}

/// Splits a 200 batch answer into the inner answers of requests `1`…`n`; a request the
/// answer leaves out gets `None`. Every inner answer shares the batch body's memory hold.
fn split_answer(
    body: &[u8],
    n: usize,
    hold: &crate::PageHold,
) -> Result<Vec<Option<Answer>>, GraphError> {
    let answer: BatchAnswer<'_> =
        serde_json::from_slice(body).map_err(|e| GraphError::Malformed {
            reason: format!("a batch answer is not the expected JSON: {e}"),
        })?;
    let mut out: Vec<Option<Answer>> = vec![None; n];
    let now = SystemTime::now();
    for inner in answer.responses {
        let Some(slot) = inner
            .id
            .parse::<usize>()
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| out.get_mut(i))
        else {
            continue;
        };
        let retry_after = inner
            .headers
            .and_then(|h| h.0)
            .and_then(|v| parse_retry_after(&v, now));
        *slot = Some(Answer {
            status: inner.status,
            retry_after,
            body: inner
                .body
                .map(|b| b.get().as_bytes().to_vec())
                .unwrap_or_default(),
            hold: hold.clone(),
        });
    }
    Ok(out)
}

/// Inner statuses after which the same request is tried alone (unless the answer names the
/// delta token): what a service that does not route delta links inside batches would answer.
fn maybe_refused_in_batch(status: u16) -> bool {
    matches!(status, 400 | 404 | 405 | 501)
}

impl GraphClient {
    /// The URL of `url` relative to the version root, when replays are batched and `url` is
    /// under the root; `None` sends it alone.
    fn batchable(&self, url: &url::Url) -> Option<String> {
        if !self.batching() {
            return None;
        }
        let root = self.inner.cfg.base_url.path().trim_end_matches('/');
        let rest = url.path().strip_prefix(root)?;
        if !rest.starts_with('/') {
            return None;
        }
        Some(match url.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        })
    }

    /// What [`GraphClient::batchable`] makes of `link`, without parsing it, for a link under
    /// the root made only of characters a URL keeps as they are and without dot segments in
    /// its path (what Graph's delta links are); `None` leaves it to the parser.
    fn plain_relative(&self, link: &str) -> Option<String> {
        let rest = link.strip_prefix(&self.inner.root_slash)?;
        let kept = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&()*+,;=:@/?%".contains(&b);
        if !rest.bytes().all(kept) {
            return None;
        }
        let path = rest.split_once('?').map_or(rest, |(p, _)| p);
        let dotted = |p: &str| {
            p.starts_with('.')
                || p.contains("/.")
                || p.as_bytes()
                    .windows(3)
                    .any(|w| w[0] == b'%' && w[1] == b'2' && w[2] | 0x20 == b'e')
        };
        if dotted(path) {
            return None;
        }
        Some(format!("/{rest}"))
    }

    /// GETs the first page of a replayed delta link: in a JSON batch with the other replays
    /// due now when batching is on (see [`crate::batch`]), else alone on a pooled connection.
    /// `hold` is its mailbox's state in the caller's request gate: a replay whose mailbox is
    /// held when its batch goes out is not sent ([`GraphError::Held`]).
    pub async fn fetch_delta(
        &self,
        link: &str,
        hold: Option<Arc<dyn MailboxHold>>,
    ) -> Result<crate::DeltaPage, GraphError> {
        if !self.batching() {
            return self.fetch_page(link, crate::Connection::Reuse).await;
        }
        let relative = match self.plain_relative(link) {
            Some(relative) => relative,
            None => {
                let url = self.check_link(link)?;
                match self.batchable(&url) {
                    Some(relative) => relative,
                    None => return self.fetch_page(link, crate::Connection::Reuse).await,
                }
            }
        };
        let answer = self.batched(relative, hold).await?;
        let limit = self.inner.cfg.max_page_bytes;
        if answer.body.len() > limit {
            return Err(GraphError::TooLarge { limit });
        }
        match answer.status {
            200 => {
                let mut page = crate::parse_page(&answer.body)?;
                page.hold = answer.hold;
                Ok(page)
            }
            // The direct path renews the token and asks once more.
            401 => self.fetch_page(link, crate::Connection::Reuse).await,
            // A 400 that names the delta token is the token's fault, in a batch or not.
            s if maybe_refused_in_batch(s)
                && crate::classify(s, answer.retry_after, &answer.body).class()
                    != crate::ErrorClass::Resync =>
            {
                let page = self.fetch_page(link, crate::Connection::Reuse).await?;
                // Off for a while, not for good: one misleading answer (a proxy, a bad minute
                // of the service) must not cost batching until the next restart (issue 23).
                let hold = self.inner.cfg.batch_refusal_hold;
                let until = self.inner.started.elapsed().saturating_add(hold);
                let until_ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX).max(1);
                let before = self
                    .inner
                    .batch_refused_until_ms
                    .swap(until_ms, Ordering::Relaxed);
                if before == 0 || self.inner.started.elapsed().as_millis() >= u128::from(before) {
                    tracing::warn!(
                        status = s,
                        off_for_secs = hold.as_secs(),
                        "Graph refused a delta link inside a JSON batch that it serves alone; replays are sent one by one for a while, then batched again"
                    );
                }
                Ok(page)
            }
            _ => Err(crate::classify(
                answer.status,
                answer.retry_after,
                &answer.body,
            )),
        }
    }

    /// Whether replays are batched now (not for `graph.batch_refusal_hold` after Graph
    /// refused one; see [`GraphClient::fetch_delta`]).
    pub fn batching(&self) -> bool {
        // A batch goes out with the app's token; an account's replays go alone with its own.
        if self.inner.cfg.batch_size < 2 || self.account.is_some() {
            return false;
        }
        let until = self.inner.batch_refused_until_ms.load(Ordering::Relaxed);
        until == 0 || self.inner.started.elapsed().as_millis() >= u128::from(until)
    }

    /// Hands `url` to the collector and waits for its inner answer.
    async fn batched(
        &self,
        url: String,
        hold: Option<Arc<dyn MailboxHold>>,
    ) -> Result<Answer, GraphError> {
        let batcher = &self.inner.batcher;
        if !batcher.taken.load(Ordering::Acquire) {
            // Nobody runs the collector (a one-shot sync, a test): a task of its own does.
            if let Some(mut inbox) = batcher.take_inbox() {
                let inner = Arc::downgrade(&self.inner);
                let cfg = &self.inner.cfg;
                let (size, linger) = (cfg.batch_size.min(MAX_REQUESTS), cfg.batch_linger);
                tokio::spawn(async move { collect(inner, &mut inbox, size, linger).await });
            }
        }
        let (reply, answer) = oneshot::channel();
        let lost = || GraphError::Transient {
            status: None,
            fresh_connection: true,
            message: "the batch this request was part of was dropped".into(),
        };
        batcher
            .tx
            .send(Job { url, reply, hold })
            .map_err(|_| lost())?;
        answer.await.map_err(|_| lost())?
    }

    /// Sends one batch and hands each job its inner answer.
    async fn send_batch(&self, jobs: Vec<Job>) {
        // A round that stopped waiting (shutdown, a lost lease) needs no request.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        // A mailbox held since its replay joined: the replay goes back to its round, which
        // waits out the Retry-After at the gate and asks again.
        let (held, jobs): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| j.hold.as_ref().is_some_and(|h| h.held()));
        for job in held {
            let _ = job.reply.send(Err(GraphError::Held));
        }
        if jobs.is_empty() {
            return;
        }
        metrics::counter!("calsync_graph_batches_total").increment(1);
        metrics::counter!("calsync_graph_batched_requests_total").increment(jobs.len() as u64);
        match self.post_batch(&jobs).await {
            Ok(mut answers) => {
                // Every Retry-After is in place before any round hears its answer: a replay
                // of the same mailbox gathered meanwhile finds its mailbox held.
                for (job, answer) in jobs.iter().zip(answers.iter()) {
                    let wait = answer
                        .as_ref()
                        .filter(|a| a.status != 200)
                        .and_then(|a| a.retry_after);
                    if let (Some(hold), Some(wait)) = (&job.hold, wait) {
                        hold.hold_for(wait);
                    }
                }
                for (job, answer) in jobs.into_iter().zip(answers.iter_mut()) {
                    let answer = answer.take().ok_or_else(|| GraphError::Malformed {
                        reason: "a batch answer has no response for one of its requests".into(),
                    });
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// `POST {root}/$batch` for `jobs`; on 401 the token is renewed once and the batch sent
    /// again. A batch answered with anything but 200 gives every job that answer.
    async fn post_batch(&self, jobs: &[Job]) -> Result<Vec<Option<Answer>>, GraphError> {
        let inner = &self.inner;
        let urls: Vec<&str> = jobs.iter().map(|j| j.url.as_str()).collect();
        let prefer = inner.prefer.to_str().unwrap_or_default();
        let body = batch_body(&urls, prefer)?;
        let mut endpoint = inner.cfg.base_url.clone();
        if let Ok(mut segs) = endpoint.path_segments_mut() {
            segs.pop_if_empty().push("$batch");
        }
        let send = |token: crate::auth::AccessToken| {
            let request = inner
                .http
                .post(endpoint.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            // Each page in the batch is held to max_page_bytes on its own (fetch_delta), so
            // one large page does not fail the 19 rounds beside it.
            let limit = inner.cfg.max_page_bytes.saturating_mul(jobs.len());
            async move { self.exchange(request, &token, limit).await }
        };
        let token = inner.tokens.token().await?;
        let mut answer = send(token.clone()).await?;
        if answer.status == 401 {
            inner.tokens.invalidate(&token).await;
            answer = send(inner.tokens.token().await?).await?;
        }
        if answer.status != 200 {
            return Ok(vec![Some(answer); jobs.len()]);
        }
        split_answer(&answer.body, jobs.len(), &answer.hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_names_each_request_by_its_place_with_relative_urls_and_its_own_prefer() {
        let body = batch_body(
            &[
                "/users/a/calendarView/delta?$deltatoken=x",
                "/users/b/calendarView/delta?$deltatoken=y",
            ],
            "odata.maxpagesize=100",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"requests": [
                {"id": "1", "method": "GET", "url": "/users/a/calendarView/delta?$deltatoken=x",
                 "headers": {"Prefer": "odata.maxpagesize=100"}},
                {"id": "2", "method": "GET", "url": "/users/b/calendarView/delta?$deltatoken=y",
                 "headers": {"Prefer": "odata.maxpagesize=100"}},
            ]})
        );
    }

    /// The answer of json-batching.md's example: out of order, an inner 429 with its own
    /// Retry-After, bodies as JSON objects; a request left out of the answer gets nothing.
    #[test]
    fn a_batch_answer_is_split_by_id_in_any_order_with_each_inner_retry_after() {
        let body = br#"{"responses": [
            {"id": "2", "status": 429, "headers": {"Retry-After": "7", "Content-Type": "application/json"},
             "body": {"error": {"code": "ApplicationThrottled", "message": "slow down"}}},
            {"id": "1", "status": 200, "headers": {"Content-Type": "application/json"},
             "body": {"value": [], "@odata.deltaLink": "https://graph.microsoft.com/v1.0/users/a/calendarView/delta?$deltatoken=z"}},
            {"id": "9", "status": 200, "body": {}}
        ]}"#;
        let answers = split_answer(body, 3, &Default::default()).unwrap();
        let first = answers[0].as_ref().unwrap();
        assert_eq!(first.status, 200);
        let page = crate::parse_page(&first.body).unwrap();
        assert!(page.items.is_empty());
        let second = answers[1].as_ref().unwrap();
        assert_eq!(second.status, 429);
        assert_eq!(second.retry_after, Some(Duration::from_secs(7)));
        assert!(crate::classify(429, second.retry_after, &second.body).is_throttle());
        assert!(answers[2].is_none());
        assert!(matches!(
            split_answer(b"{\"value\": []}", 1, &Default::default()),
            Err(GraphError::Malformed { .. })
        ));
    }

    /// The relative URL of a replay is made without the parser for plain links; whenever it
    /// is, it is the one the parser makes, and the rest are left to the parser.
    #[test]
    fn plain_links_are_made_relative_as_the_parser_would() {
        for base in [
            "https://graph.microsoft.com/v1.0",
            "http://127.0.0.1:8080/v1.0/",
        ] {
            let root = base.trim_end_matches('/');
            let g = crate::tests::client(base);
            let mut plain = 0;
            for rest in [
                "/users/user0001@contoso.onmicrosoft.com/calendarView/delta?$deltatoken=aB-c_d.e~f%3D",
                "/users/a.b@c.d/calendars/AAMk=/calendarView/delta?$skiptoken=x&$deltatoken=y?z",
                "/users/a/calendarView/delta?",
                "/users/a/./calendarView/delta?$deltatoken=x",
                "/users/a/../b/delta?$deltatoken=x",
                "/users/a/%2E%2e/b/delta?$deltatoken=x",
                "/users/a/.hidden/delta",
                "/users/a/calendarView/delta?$deltatoken=x/../y",
                "/users/a b/delta?$deltatoken='x'",
                "/users/a/delta?$deltatoken=x#frag",
                "/users/\u{e9}/delta",
                "//users/a",
            ] {
                let link = format!("{root}{rest}");
                let parsed = g.check_link(&link).ok().and_then(|u| g.batchable(&u));
                if let Some(quick) = g.plain_relative(&link) {
                    plain += 1;
                    assert_eq!(Some(quick), parsed, "{link}");
                }
            }
            assert_eq!(plain, 5, "the plain links of {base} skip the parser");
            assert_eq!(g.plain_relative("https://elsewhere.example/v1.0/x"), None);
        }
    }
}
