//! One batch of changes as an HTTP POST to a sink: the JSON body, the signature headers, no
//! redirects (a sink's URL is configured, never learned), and what counts as delivered (a 2xx;
//! anything else is retried).

use crate::sign::signature;
use calsync_store::changes::Change;
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;

/// A `[[sinks]]` endpoint, as validated.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Its name: in metrics, logs and `sink_cursors`.
    pub name: String,
    /// Where batches are posted (HTTPS; `http://` only to a loopback address).
    pub url: url::Url,
    /// The HMAC key of `Calsync-Signature` (from a file; redacted in `Debug`).
    pub secret: SecretString,
    /// At most this many changes per request.
    pub batch: usize,
    /// How long one request may take.
    pub timeout: Duration,
    /// A sink seen for the first time starts at the oldest change kept rather than at the
    /// feed's present (`start = "oldest"`).
    pub from_oldest: bool,
}

/// Why a batch was not delivered. Never carries the secret or the URL (which may hold one).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The endpoint answered, with a status other than 2xx.
    #[error("the endpoint answered HTTP {0}")]
    Status(u16),
    /// No answer: connection refused or reset, a timeout, TLS.
    #[error("the endpoint could not be reached: {0}")]
    Transport(String),
    /// The HTTP client could not be built (TLS roots).
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
}

/// The HTTP client of a sink: no redirects, the sink's timeout.
pub fn client(sink: &SinkConfig) -> Result<reqwest::Client, DeliveryError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(sink.timeout)
        .user_agent(concat!("calsync/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DeliveryError::Client(e.without_url().to_string()))
}

/// The body of a batch: `{"sink": name, "changes": [...]}`, each change with its `id` (its
/// cursor: the same change always has the same id, for a receiver to drop repeats).
pub fn body(sink: &str, changes: &[Change]) -> Vec<u8> {
    /// A change with its `id`: the same change always has the same one.
    #[derive(serde::Serialize)]
    struct WithId<'a> {
        id: &'a str,
        #[serde(flatten)]
        change: &'a Change,
    }
    let changes: Vec<WithId<'_>> = changes
        .iter()
        .map(|c| WithId {
            id: &c.cursor,
            change: c,
        })
        .collect();
    serde_json::json!({ "sink": sink, "changes": changes })
        .to_string()
        .into_bytes()
}

/// Posts `changes` to the sink, signed at `timestamp` (seconds since the epoch). `Ok` only if
/// the endpoint answered 2xx: then every change in it counts as delivered.
pub async fn post(
    client: &reqwest::Client,
    sink: &SinkConfig,
    changes: &[Change],
    timestamp: i64,
) -> Result<(), DeliveryError> {
    let body = body(&sink.name, changes);
    let sig = signature(sink.secret.expose_secret().as_bytes(), timestamp, &body);
    let answer = client
        .post(sink.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Calsync-Timestamp", timestamp.to_string())
        .header("Calsync-Signature", sig)
        .body(body)
        .send()
        .await
        .map_err(|e| DeliveryError::Transport(e.without_url().to_string()))?;
    let status = answer.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Status(status.as_u16()))
    }
}
