//! Scriptable faults and service limits: what the simulator does to a request before (or
//! instead of) answering it.

use serde::{Deserialize, Serialize};

/// One scripted fault: which requests it matches, when among them it fires, what it does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRule {
    /// User id or UPN the request is for (case-insensitive); any when absent.
    pub mailbox: Option<String>,
    /// A substring of the request path (e.g. `calendarView/delta`, `oauth2`); any when absent.
    pub path_contains: Option<String>,
    /// `GET`, `POST`, …; any when absent.
    pub method: Option<String>,
    /// Fire only on the n-th matching request (1-based).
    pub nth: Option<u64>,
    /// Fire on every k-th matching request.
    pub every: Option<u64>,
    /// Fire with this probability, drawn from the simulator's seeded generator.
    pub probability: Option<f64>,
    /// Fire at most this many times in all.
    pub times: Option<u64>,
    /// What to do when the rule fires.
    pub action: FaultAction,
    /// Requests the rule matched so far.
    #[serde(skip_deserializing)]
    pub matched: u64,
    /// Times it fired so far.
    #[serde(skip_deserializing)]
    pub fired: u64,
}

/// What a fault does to the request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultAction {
    /// Answer with this status and a Graph error body; after a `Delay` rule that fired
    /// on the same request (listed before it), that much later, its `Retry-After`
    /// counting from then.
    Status {
        /// The HTTP status.
        status: u16,
        /// Graph's error code.
        code: String,
        /// Graph's error message.
        #[serde(default)]
        message: String,
        /// Seconds to put in `Retry-After`, fractional allowed (`2.128`).
        #[serde(default)]
        retry_after: Option<f64>,
        /// Send `Retry-After` as an HTTP date instead of seconds.
        #[serde(default)]
        retry_after_as_date: bool,
    },
    /// Hold the request this long, then answer normally.
    Delay {
        /// Milliseconds to hold it.
        ms: u64,
    },
    /// Drop the connection without answering.
    #[default]
    Reset,
    /// Answer normally but cut the body off half-way and drop the connection.
    Truncate,
    /// Answer 200 with a body that is not valid JSON.
    MalformedJson,
}

impl FaultRule {
    /// Counts a matching request and says whether the rule fires on it. `draw` is consulted
    /// only for probabilistic rules, so other rules leave the random sequence alone.
    /// `mailbox` holds the names the request's mailbox goes by (its id and its UPN).
    pub fn consider(
        &mut self,
        mailbox: &[&str],
        method: &str,
        path: &str,
        draw: &mut impl FnMut() -> f64,
    ) -> bool {
        if let Some(m) = &self.mailbox {
            if !mailbox.iter().any(|x| x.eq_ignore_ascii_case(m)) {
                return false;
            }
        }
        if self
            .method
            .as_ref()
            .is_some_and(|m| !m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        if self
            .path_contains
            .as_ref()
            .is_some_and(|p| !path.to_ascii_lowercase().contains(&p.to_ascii_lowercase()))
        {
            return false;
        }
        if self.times.is_some_and(|t| self.fired >= t) {
            return false;
        }
        self.matched += 1;
        let mut fire = true;
        if let Some(n) = self.nth {
            fire &= self.matched == n;
        }
        if let Some(k) = self.every {
            fire &= k > 0 && self.matched % k == 0;
        }
        if let Some(p) = self.probability {
            fire &= draw() < p;
        }
        if fire {
            self.fired += 1;
        }
        fire
    }
}

/// Service limits the simulator enforces (graph-delta-notes.md §3.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent requests per mailbox before 429 `ApplicationThrottled` (Outlook: 4).
    pub mailbox_concurrency: u32,
    /// Requests per mailbox per `mailbox_window_secs` (Outlook: 10,000 per 600 s).
    pub mailbox_requests: u32,
    /// The window of `mailbox_requests`, in seconds.
    pub mailbox_window_secs: f64,
    /// An app-wide budget of requests per `app_window_secs`; unlimited when absent.
    pub app_requests: Option<u32>,
    /// The window of `app_requests`, in seconds.
    pub app_window_secs: f64,
    /// `Retry-After` seconds sent with a concurrency 429.
    pub concurrency_retry_after: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mailbox_concurrency: 4,
            mailbox_requests: 10_000,
            mailbox_window_secs: 600.0,
            app_requests: None,
            app_window_secs: 10.0,
            concurrency_retry_after: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_every_and_times_select_the_right_requests() {
        let mut r = FaultRule {
            every: Some(2),
            times: Some(2),
            ..Default::default()
        };
        let mut draw = || 0.0;
        let fired: Vec<bool> = (0..8)
            .map(|_| r.consider(&[], "GET", "/v1.0/x", &mut draw))
            .collect();
        assert_eq!(
            fired,
            [false, true, false, true, false, false, false, false]
        );

        let mut r = FaultRule {
            nth: Some(3),
            mailbox: Some("A@x".into()),
            ..Default::default()
        };
        assert!(!r.consider(&["b-id", "b@x"], "GET", "/", &mut draw));
        assert!(!r.consider(&["a-id", "A@x"], "GET", "/", &mut draw));
        assert!(!r.consider(&["a-id", "A@x"], "GET", "/", &mut draw));
        assert!(r.consider(&["a-id", "A@x"], "GET", "/", &mut draw));
    }

    #[test]
    fn fault_rules_read_from_json() {
        let r: FaultRule = serde_json::from_value(serde_json::json!({
            "path_contains": "calendarView/delta",
            "probability": 0.2,
            "action": {"kind": "status", "status": 429, "code": "TooManyRequests", "retry_after": 2.128}
        }))
        .unwrap();
        assert!(matches!(r.action, FaultAction::Status { status: 429, .. }));
    }
}
