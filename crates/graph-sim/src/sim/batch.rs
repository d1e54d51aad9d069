//! `POST /$batch`: JSON batching as Graph serves it (notes §6; Microsoft Learn, "Combine
//! multiple HTTP requests using JSON batching" and "Outlook service limits for JSON batching").
//!
//! - Up to 20 requests, each with a unique `id`, a `method` and a URL relative to the version
//!   root; more is refused with 400 "Number of requests inside batch exceeds the limit."
//!   (microsoftgraph-postman-collections#9). An absolute URL is answered 400 inside the batch
//!   (known issue, microsoft-graph-docs#6535).
//! - Headers of the batch are not applied to the requests in it: each carries its own
//!   (`Prefer`, `ConsistencyLevel`); only the batch's `Authorization` is.
//! - Every inner request runs through the same pipeline as a direct one: it is authenticated,
//!   counted against the mailbox's concurrency (4) and `Retry-After`, the request budgets and
//!   the faults, and logged. A throttled one is answered 429 with its own `Retry-After` inside
//!   a batch that is itself 200 ("Throttling and batching"). That is also what production
//!   reports describe: batches of 20 to one mailbox lose 4–6 requests to 429s
//!   (microsoft-graph-docs#2886, #7257).
//! - Graph sends at most 4 requests of a batch at a time to Outlook, in any order, and the
//!   answers come back in the order they finished; with `dependsOn` it sends them one at a
//!   time, and a request whose dependency failed is answered 424.
//! - A request whose answer the service could not deliver (a reset or cut connection injected
//!   by a fault) is answered 504 inside the batch; a body that is not JSON is sent base64
//!   encoded, as Graph does for non-JSON content.

use super::*;
use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::json;

/// Graph's limit of requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 20;

/// Requests of one batch Graph runs against Outlook at a time.
const OUTLOOK_BATCH_CONCURRENCY: usize = 4;

#[derive(Deserialize)]
struct BatchRequest {
    requests: Vec<InnerRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InnerRequest {
    id: String,
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    depends_on: Vec<String>,
}

/// Whether `path` (still percent-encoded) is a version root's `$batch`.
pub(super) fn is_batch(path: &str) -> bool {
    let mut segs = path.trim_start_matches('/').splitn(2, '/');
    matches!(segs.next(), Some("v1.0" | "beta"))
        && matches!(
            segs.next(),
            Some("$batch" | "%24batch" | "$batch/" | "%24batch/")
        )
}

impl Sim {
    /// Answers a `POST /{version}/$batch`.
    pub(super) async fn batch(&self, req: SimRequest) -> SimResponse {
        let client = req.client_request_id.as_deref();
        let version = req
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("v1.0")
            .to_owned();
        {
            let mut st = self.lock();
            let now = st.tenant.now();
            if let Err(e) = st.auth.check(req.authorization.as_deref(), now) {
                return st.error_response(&e, client);
            }
        }
        let bad = |message: &str| {
            self.lock().error_response(
                &GraphError::new(400, "BadRequest", message.to_owned()),
                client,
            )
        };
        let Ok(batch) = serde_json::from_slice::<BatchRequest>(&req.body) else {
            return bad("Invalid batch payload format.");
        };
        if batch.requests.is_empty() {
            return bad("Invalid batch payload format.");
        }
        if batch.requests.len() > MAX_BATCH_REQUESTS {
            return bad("Number of requests inside batch exceeds the limit.");
        }
        let mut ids = std::collections::HashSet::new();
        if !batch.requests.iter().all(|r| ids.insert(r.id.as_str())) {
            return bad("Request Id must be unique within a batch.");
        }
        if batch
            .requests
            .iter()
            .flat_map(|r| &r.depends_on)
            .any(|d| !ids.contains(d.as_str()))
        {
            return bad("Dependency Id is not found in the batch.");
        }
        self.lock().stats.batches += 1;
        let sequential = batch.requests.iter().any(|r| !r.depends_on.is_empty());
        let mut answers: Vec<Value> = Vec::with_capacity(batch.requests.len());
        if sequential {
            let mut failed = std::collections::HashSet::new();
            for inner in &batch.requests {
                let answer = if inner.depends_on.iter().any(|d| failed.contains(d)) {
                    self.dependency_failed(inner)
                } else {
                    self.run_inner(&req, &version, inner).await
                };
                if answer["status"].as_u64().is_none_or(|s| s >= 400) {
                    failed.insert(inner.id.clone());
                }
                answers.push(answer);
            }
        } else {
            let mut waiting = batch.requests.iter();
            let mut running = futures_util::stream::FuturesUnordered::new();
            for inner in waiting.by_ref().take(OUTLOOK_BATCH_CONCURRENCY) {
                running.push(self.run_inner(&req, &version, inner));
            }
            while let Some(answer) = running.next().await {
                answers.push(answer);
                if let Some(inner) = waiting.next() {
                    running.push(self.run_inner(&req, &version, inner));
                }
            }
        }
        let mut r = SimResponse::json(200, &json!({ "responses": answers }));
        self.lock().stamp_ids(&mut r, client);
        r
    }

    fn dependency_failed(&self, inner: &InnerRequest) -> Value {
        inner_error(
            inner,
            424,
            "FailedDependency",
            "The request depends on a request that failed.",
        )
    }

    /// Runs one request of a batch through the whole pipeline and writes its answer as the
    /// batch carries it.
    async fn run_inner(&self, outer: &SimRequest, version: &str, inner: &InnerRequest) -> Value {
        if !inner.url.starts_with('/') {
            let message = if inner.url.starts_with("http") {
                "Invalid request URL: a request of a batch names its URL relative to the version root."
            } else {
                "Invalid request URL."
            };
            return inner_error(inner, 400, "BadRequest", message);
        }
        let (path, query) = match inner.url.split_once('?') {
            Some((p, q)) => (p, q),
            None => (inner.url.as_str(), ""),
        };
        if path.ends_with("/delta") && self.lock().cache.quirks.no_delta_in_batch {
            return inner_error(
                inner,
                400,
                "BadRequest",
                "graph-sim (quirk no_delta_in_batch): delta is not served inside a batch.",
            );
        }
        let header = |name: &str| {
            inner
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let resp = Box::pin(
            self.handle(SimRequest {
                method: inner.method.to_ascii_uppercase(),
                path: format!("/{version}{path}"),
                query: query.to_owned(),
                authorization: outer.authorization.clone(),
                prefer: header("prefer").into_iter().collect(),
                body: inner
                    .body
                    .as_ref()
                    .map(|b| serde_json::to_vec(b).unwrap_or_default())
                    .unwrap_or_default(),
                origin: outer.origin.clone(),
                client_request_id: header("client-request-id"),
                consistency_level: header("consistencylevel"),
                identity_headers: (None, None),
                connection: outer.connection,
            }),
        )
        .await;
        if resp.fate != Fate::Normal {
            return inner_error(
                inner,
                504,
                "GatewayTimeout",
                "The service did not answer in time.",
            );
        }
        let headers: serde_json::Map<String, Value> = resp
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("request-id"))
            .map(|(k, v)| (display_case(k), Value::String(v.clone())))
            .collect();
        let mut answer = json!({"id": inner.id, "status": resp.status, "headers": headers});
        if !resp.body.is_empty() {
            answer["body"] = match serde_json::from_slice::<Value>(&resp.body) {
                Ok(v) => v,
                Err(_) => {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&resp.body))
                }
            };
        }
        answer
    }
}

/// A Graph error answered inside a batch, for `inner`.
fn inner_error(inner: &InnerRequest, status: u16, code: &str, message: &str) -> Value {
    json!({
        "id": inner.id, "status": status,
        "headers": {"Content-Type": "application/json"},
        "body": {"error": {"code": code, "message": message}},
    })
}

/// `retry-after` → `Retry-After`, as Graph writes the headers inside a batch answer.
fn display_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next().map_or_else(String::new, |f| {
                f.to_ascii_uppercase().to_string() + c.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}
