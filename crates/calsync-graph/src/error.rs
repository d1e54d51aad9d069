//! The one place that decides what a Graph answer means for the caller.

use std::time::{Duration, SystemTime};

/// What went wrong talking to Graph, sized to what the engine must decide on.
/// No variant carries a URL with a token in it, an access token, or a secret.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphError {
    /// 429/509, or 503/504 with `Retry-After`: wait at least `retry_after` before the next
    /// request to this mailbox.
    #[error("throttled by graph ({status} {code}){}", retry_after.map(|d| format!(", retry after {:.3}s", d.as_secs_f64())).unwrap_or_default())]
    Throttled {
        /// The HTTP status.
        status: u16,
        /// Graph's error code.
        code: String,
        /// The parsed `Retry-After`, if one was sent.
        retry_after: Option<Duration>,
    },
    /// The delta state is gone (410, `syncStateNotFound`, `resyncRequired`, `SyncStateInvalid`):
    /// start a fresh full round.
    #[error("graph dropped the delta state ({status} {code}): {message}")]
    ResyncRequired {
        /// The HTTP status.
        status: u16,
        /// Graph's error code.
        code: String,
        /// Graph's error message.
        message: String,
    },
    /// 401 even with a freshly renewed token.
    #[error("graph refused the access token ({code}): {message}")]
    Unauthorized {
        /// Graph's error code.
        code: String,
        /// Graph's error message.
        message: String,
    },
    /// 403: the app may not read this mailbox.
    #[error("graph denied access ({code}): {message}")]
    Forbidden {
        /// Graph's error code.
        code: String,
        /// Graph's error message.
        message: String,
    },
    /// 404: user, mailbox or calendar does not exist (or has no Exchange Online mailbox).
    #[error("graph found no such mailbox or calendar ({code}): {message}")]
    NotFound {
        /// Graph's error code.
        code: String,
        /// Graph's error message.
        message: String,
    },
    /// 400 and other 4xx: the request is wrong and retrying will not help.
    #[error("graph rejected the request ({status} {code}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Graph's error code.
        code: String,
        /// Graph's error message.
        message: String,
    },
    /// 5xx without `Retry-After`, timeouts, resets: retry with backoff.
    #[error("graph is unavailable{}: {message}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Transient {
        /// The HTTP status, when there was an answer at all.
        status: Option<u16>,
        /// The connection should not be reused for the retry (503 guidance).
        fresh_connection: bool,
        /// What happened, without URLs or tokens.
        message: String,
    },
    /// A 200 whose body is not a delta page (cut off, not JSON, no link).
    #[error("graph sent a malformed page: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// A page larger than the configured limit.
    #[error("graph sent a page larger than {limit} bytes")]
    TooLarge {
        /// The configured `graph.max_page_bytes`.
        limit: usize,
    },
    /// A nextLink/deltaLink that points away from the configured Graph origin.
    #[error("refusing a link to {origin}: it is not the configured graph origin {expected}")]
    ForeignLink {
        /// The link's scheme, host and port.
        origin: String,
        /// The configured Graph origin.
        expected: String,
    },
    /// The token endpoint refused our credentials or the request.
    #[error("the token endpoint refused the request ({error}): {description}")]
    AuthRejected {
        /// The OAuth `error` code, e.g. `invalid_client`.
        error: String,
        /// The `error_description`, first line only.
        description: String,
    },
    /// A delegated account cannot get tokens until its user signs in again: it never signed
    /// in, logged out, or Entra refused its refresh token (`invalid_grant`: AADSTS700082
    /// expired, 50173 password changed, 65001 consent revoked).
    #[error("account {account} must sign in again: run `calsync login {account}` ({reason})")]
    SignInRequired {
        /// The account's name.
        account: String,
        /// Why, e.g. Entra's AADSTS code and description.
        reason: String,
    },
    /// The token endpoint could not be reached or answered garbage.
    #[error("the token endpoint is unavailable: {reason}")]
    AuthUnavailable {
        /// What happened, without the secret.
        reason: String,
    },
    /// Not sent: while the request waited to join a JSON batch, a `Retry-After` came for its
    /// mailbox. Retried once the mailbox is free (the request gate waits for it).
    #[error("not sent: its mailbox is waiting out a Retry-After")]
    Held,
}

/// The broad classes the engine's runner acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Wait (Retry-After or backoff) and retry the same link.
    Retry,
    /// Start a full round.
    Resync,
    /// This tuple cannot sync until someone changes something: slow retry cadence.
    Permanent,
    /// The round cannot go on safely (loop, foreign link): mark degraded, retry later.
    Degraded,
}

impl GraphError {
    /// What the engine should do about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            GraphError::Throttled { .. }
            | GraphError::Transient { .. }
            | GraphError::Malformed { .. }
            | GraphError::AuthUnavailable { .. }
            // The token endpoint refusing us is not about one calendar: every tuple backs off
            // while the token source holds the failure (no storm of token requests).
            | GraphError::AuthRejected { .. }
            | GraphError::Held => ErrorClass::Retry,
            GraphError::ResyncRequired { .. } => ErrorClass::Resync,
            GraphError::Unauthorized { .. }
            | GraphError::Forbidden { .. }
            | GraphError::NotFound { .. }
            | GraphError::Rejected { .. }
            // Only the user can mend it: the tuple fails with the hint and is not retried into
            // Entra (the token source answers from the store until a new login).
            | GraphError::SignInRequired { .. } => ErrorClass::Permanent,
            GraphError::TooLarge { .. } | GraphError::ForeignLink { .. } => ErrorClass::Degraded,
        }
    }

    /// Graph's error code, or a short name of our own for errors Graph did not name.
    pub fn code(&self) -> &str {
        match self {
            GraphError::Throttled { code, .. }
            | GraphError::ResyncRequired { code, .. }
            | GraphError::Unauthorized { code, .. }
            | GraphError::Forbidden { code, .. }
            | GraphError::NotFound { code, .. }
            | GraphError::Rejected { code, .. } => code,
            GraphError::Transient { .. } => "Transient",
            GraphError::Malformed { .. } => "MalformedPage",
            GraphError::TooLarge { .. } => "PageTooLarge",
            GraphError::ForeignLink { .. } => "ForeignLink",
            GraphError::AuthRejected { error, .. } => error,
            GraphError::AuthUnavailable { .. } => "TokenEndpointUnavailable",
            GraphError::SignInRequired { .. } => "SignInRequired",
            GraphError::Held => "HeldForRetryAfter",
        }
    }

    /// The retry should go out on a new connection, not the one that carried this answer
    /// (Graph's guidance for 503; a reset or cut-off connection is gone anyway).
    pub fn wants_fresh_connection(&self) -> bool {
        match self {
            GraphError::Throttled { status, .. } => *status == 503,
            GraphError::Transient {
                fresh_connection, ..
            } => *fresh_connection,
            _ => false,
        }
    }

    /// The HTTP status Graph answered with, if it answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            GraphError::Throttled { status, .. }
            | GraphError::ResyncRequired { status, .. }
            | GraphError::Rejected { status, .. } => Some(*status),
            GraphError::Unauthorized { .. } => Some(401),
            GraphError::Forbidden { .. } => Some(403),
            GraphError::NotFound { .. } => Some(404),
            GraphError::Transient { status, .. } => *status,
            GraphError::Malformed { .. } | GraphError::TooLarge { .. } => Some(200),
            GraphError::ForeignLink { .. }
            | GraphError::AuthRejected { .. }
            | GraphError::AuthUnavailable { .. }
            | GraphError::SignInRequired { .. }
            | GraphError::Held => None,
        }
    }

    /// Graph said slow down (429, 503, 509): a signal for the request gate.
    pub fn is_throttle(&self) -> bool {
        matches!(self, GraphError::Throttled { .. })
            || matches!(
                self,
                GraphError::Transient {
                    status: Some(503),
                    ..
                }
            )
    }

    /// How long Graph asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The longest `Retry-After` calsync honours. Graph's throttling answers ask for seconds to a
/// few minutes (notes §3.2); a larger value (a proxy's error, a date in the wrong year) would
/// silence a mailbox for as long as it says, while asking again after the cap costs one
/// request, answered with a fresh `Retry-After` if Graph still means it (issue 23: 1e9 s was
/// accepted).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// `Retry-After` as Graph sends it: whole or fractional seconds (`2.128`), or an HTTP date;
/// at most [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[derive(serde::Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorInner,
}

#[derive(serde::Deserialize, Default)]
struct ErrorInner {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

const RESYNC_CODES: [&str; 3] = ["syncstatenotfound", "resyncrequired", "syncstateinvalid"];

/// A 400-class answer about the delta or skip token itself (`InvalidDeltaToken`,
/// `ErrorInvalidSyncStateData`, "parameter '$deltaToken' is invalid": docs#6599 comments): the
/// saved link can never work again, so it means a full round, as a 410 does.
fn names_the_token(status: u16, code: &str, message: &str) -> bool {
    if !(400..500).contains(&status) || matches!(status, 401 | 403 | 404 | 429) {
        return false;
    }
    let message = message.to_ascii_lowercase();
    ["deltatoken", "skiptoken", "syncstate"]
        .iter()
        .any(|w| code.contains(w) || message.contains(w))
}

/// Classifies a non-success answer from its status, `Retry-After` and body. Pure: the table
/// of cases lives in the tests below.
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> GraphError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let code = parsed.error.code.unwrap_or_else(|| format!("Http{status}"));
    let message: String = parsed
        .error
        .message
        .unwrap_or_default()
        .chars()
        .take(500)
        .collect();
    let lower = code.to_ascii_lowercase();
    if status == 410
        || RESYNC_CODES.contains(&lower.as_str())
        || names_the_token(status, &lower, &message)
    {
        return GraphError::ResyncRequired {
            status,
            code,
            message,
        };
    }
    match status {
        429 | 509 => GraphError::Throttled {
            status,
            code,
            retry_after,
        },
        503 | 504 if retry_after.is_some() => GraphError::Throttled {
            status,
            code,
            retry_after,
        },
        401 => GraphError::Unauthorized { code, message },
        403 => GraphError::Forbidden { code, message },
        404 => GraphError::NotFound { code, message },
        500..=599 => GraphError::Transient {
            status: Some(status),
            fresh_connection: status == 503,
            message: if message.is_empty() {
                code
            } else {
                format!("{code}: {message}")
            },
        },
        _ => GraphError::Rejected {
            status,
            code,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: &str) -> Vec<u8> {
        format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#).into_bytes()
    }

    #[test]
    fn a_400_whose_message_names_the_token_means_a_full_round_docs_6599() {
        let b = br#"{"error":{"code":"BadRequest","message":"The value 'x' of parameter '$deltaToken' is invalid."}}"#;
        assert_eq!(classify(400, None, b).class(), ErrorClass::Resync);
        let b = br#"{"error":{"code":"BadRequest","message":"The value of parameter 'StartDateTime' is invalid."}}"#;
        assert_eq!(classify(400, None, b).class(), ErrorClass::Permanent);
        let b = br#"{"error":{"code":"ErrorAccessDenied","message":"deltatoken"}}"#;
        assert_eq!(classify(403, None, b).class(), ErrorClass::Permanent);
    }

    #[test]
    fn graph_answers_are_classified_as_the_notes_say() {
        let s = Some(Duration::from_secs(2));
        let cases: &[(u16, Option<Duration>, &str, ErrorClass, &str)] = &[
            (
                410,
                None,
                "SyncStateNotFound",
                ErrorClass::Resync,
                "SyncStateNotFound",
            ),
            (410, None, "anything", ErrorClass::Resync, "anything"),
            (
                400,
                None,
                "syncStateNotFound",
                ErrorClass::Resync,
                "syncStateNotFound",
            ),
            (
                400,
                None,
                "RESYNCREQUIRED",
                ErrorClass::Resync,
                "RESYNCREQUIRED",
            ),
            (
                410,
                None,
                "SyncStateInvalid",
                ErrorClass::Resync,
                "SyncStateInvalid",
            ),
            (
                400,
                None,
                "InvalidDeltaToken",
                ErrorClass::Resync,
                "InvalidDeltaToken",
            ),
            (
                400,
                None,
                "ErrorInvalidSyncStateData",
                ErrorClass::Resync,
                "ErrorInvalidSyncStateData",
            ),
            (
                400,
                None,
                "invaliddeltatoken",
                ErrorClass::Resync,
                "invaliddeltatoken",
            ),
            (
                429,
                s,
                "TooManyRequests",
                ErrorClass::Retry,
                "TooManyRequests",
            ),
            (
                429,
                None,
                "ApplicationThrottled",
                ErrorClass::Retry,
                "ApplicationThrottled",
            ),
            (
                509,
                None,
                "BandwidthLimitExceeded",
                ErrorClass::Retry,
                "BandwidthLimitExceeded",
            ),
            (
                503,
                s,
                "serviceNotAvailable",
                ErrorClass::Retry,
                "serviceNotAvailable",
            ),
            (
                503,
                None,
                "serviceNotAvailable",
                ErrorClass::Retry,
                "Transient",
            ),
            (504, None, "UnknownError", ErrorClass::Retry, "Transient"),
            (
                500,
                None,
                "ErrorInternalServerTransientError",
                ErrorClass::Retry,
                "Transient",
            ),
            (
                401,
                None,
                "InvalidAuthenticationToken",
                ErrorClass::Permanent,
                "InvalidAuthenticationToken",
            ),
            (
                403,
                None,
                "ErrorAccessDenied",
                ErrorClass::Permanent,
                "ErrorAccessDenied",
            ),
            (
                404,
                None,
                "MailboxNotEnabledForRESTAPI",
                ErrorClass::Permanent,
                "MailboxNotEnabledForRESTAPI",
            ),
            (
                404,
                None,
                "ErrorInvalidUser",
                ErrorClass::Permanent,
                "ErrorInvalidUser",
            ),
            (
                400,
                None,
                "ErrorInvalidParameter",
                ErrorClass::Permanent,
                "ErrorInvalidParameter",
            ),
        ];
        for (status, ra, code, class, want_code) in cases {
            let e = classify(*status, *ra, &body(code));
            assert_eq!(e.class(), *class, "{status} {code}");
            assert_eq!(e.code(), *want_code, "{status} {code}");
        }
        assert_eq!(classify(429, s, &body("x")).retry_after(), s);
    }

    #[test]
    fn a_body_that_is_not_json_still_classifies_by_status() {
        assert_eq!(
            classify(502, None, b"<html>bad gateway</html>").class(),
            ErrorClass::Retry
        );
        assert_eq!(classify(410, None, b"").class(), ErrorClass::Resync);
    }

    #[test]
    fn retry_after_reads_seconds_fractions_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("2.128", now),
            Some(Duration::from_millis(2128))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
        // Capped: a mailbox is asked again after 15 minutes, whatever the header said.
        for absurd in ["1000000000", "1e300", "999999999.5"] {
            assert_eq!(
                parse_retry_after(absurd, now),
                Some(MAX_RETRY_AFTER),
                "{absurd}"
            );
        }
        let next_year = httpdate::fmt_http_date(now + Duration::from_secs(365 * 86_400));
        assert_eq!(parse_retry_after(&next_year, now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("900", now),
            Some(Duration::from_secs(900))
        );
    }
}
