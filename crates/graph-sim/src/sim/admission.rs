//! Admission: the manners Graph enforces before a request runs — authentication, per-mailbox
//! concurrency, `Retry-After`, request budgets, tenant-wide limits and injected faults — and
//! how a throttled request is answered.

use super::route::*;
use super::*;
use crate::auth::Subject;
use crate::error::GraphError;
use crate::faults::FaultAction;
use rand::Rng;
use serde_json::json;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

pub(super) fn retry_after_header(secs: f64, as_date: bool) -> (String, Duration) {
    let secs = secs.max(0.0);
    if as_date {
        // HTTP dates have whole seconds. Name the first whole second at least `secs` away,
        // and hold the mailbox until exactly that instant: what the header says is what
        // counts, so a client that honours the date is never early.
        let now = std::time::SystemTime::now();
        let since_epoch = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let at_secs = (since_epoch.as_secs_f64() + secs).ceil() as u64;
        let at = std::time::UNIX_EPOCH + Duration::from_secs(at_secs);
        let wait = at.duration_since(now).unwrap_or_default();
        (httpdate::fmt_http_date(at), wait)
    } else {
        let text = if secs.fract() == 0.0 {
            format!("{}", secs as u64)
        } else {
            format!("{secs:.3}")
        };
        (text, Duration::from_secs_f64(secs))
    }
}

/// A sliding-window request budget: forgets requests older than `window`; if `limit` are
/// still inside it, returns how long until the oldest leaves (the Retry-After), otherwise
/// counts this request and returns None.
pub(super) fn over_budget(
    recent: &mut VecDeque<Instant>,
    window: Duration,
    limit: usize,
    now: Instant,
) -> Option<f64> {
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        recent.pop_front();
    }
    if recent.len() >= limit {
        return Some(
            recent
                .front()
                .map_or(1.0, |t| (window - now.duration_since(*t)).as_secs_f64()),
        );
    }
    recent.push_back(now);
    None
}

/// A request that passed auth, limits and faults, with what the pipeline decided for it.
pub(super) struct Admitted {
    pub(super) route: Route,
    pub(super) user: Option<usize>,
    pub(super) delay: Option<Duration>,
    pub(super) fate: Fate,
    pub(super) malformed: bool,
    pub(super) fault: Option<String>,
    pub(super) in_flight: u32,
    pub(super) early: bool,
}

pub(super) enum Admission {
    /// Answered without running the route; `user` is the mailbox it was for, when known.
    Answer {
        response: SimResponse,
        fault: Option<String>,
        user: Option<usize>,
        /// It came before the mailbox's Retry-After had passed.
        early: bool,
    },
    /// A scripted error answered after `delay` (see `FaultAction::Status`); in flight
    /// meanwhile.
    Later {
        delay: Duration,
        action: FaultAction,
        route: Route,
        fault: Option<String>,
        user: Option<usize>,
        in_flight: u32,
        early: bool,
    },
    Proceed(Admitted),
}

impl State {
    #[allow(clippy::too_many_arguments)] // one answer's every part, all from the caller's rule
    pub(super) fn throttle(
        &mut self,
        client: Option<&str>,
        mailbox: Option<usize>,
        status: u16,
        code: &str,
        message: &str,
        secs: f64,
        as_date: bool,
    ) -> SimResponse {
        let (header, wait) = retry_after_header(secs, as_date);
        if let Some(m) = mailbox {
            let now = Instant::now();
            let until = now + wait;
            let mb = self.mailboxes.entry(m).or_default();
            mb.retry_until = Some(mb.retry_until.map_or(until, |u| u.max(until)));
            mb.announced = Some(now);
        }
        let e = GraphError::new(status, code, message).with_retry_after(header);
        self.error_response(&e, client)
    }

    /// The answer a scripted `Status` fault gives `req`.
    pub(super) fn scripted_answer(
        &mut self,
        req: &SimRequest,
        route: &Route,
        user: Option<usize>,
        action: &FaultAction,
    ) -> SimResponse {
        let FaultAction::Status {
            status,
            code,
            message,
            retry_after,
            retry_after_as_date,
        } = action
        else {
            return self.error_response(
                &GraphError::new(500, "InternalServerError", "not a scripted answer"),
                req.client_request_id.as_deref(),
            );
        };
        match retry_after {
            Some(secs) => self.throttle(
                req.client_request_id.as_deref(),
                user,
                *status,
                code,
                message,
                *secs,
                *retry_after_as_date,
            ),
            // Azure AD's error shape on the token endpoint, Graph's elsewhere.
            None if matches!(
                route,
                Route::Token { .. } | Route::DeviceCode { .. } | Route::ManagedIdentity { .. }
            ) =>
            {
                SimResponse::json(
                    *status,
                    &json!({"error": code, "error_description": message}),
                )
            }
            None => self.error_response(
                &GraphError::new(*status, code, message.clone()),
                req.client_request_id.as_deref(),
            ),
        }
    }

    /// The user `user` (id or UPN) enters `user_code` at the device login page and consents,
    /// as they would in a browser; `false` if no such code is pending or no such user.
    pub fn approve_device_code(&mut self, user_code: &str, user: &str) -> bool {
        let u = self.tenant.user_index(user);
        u.is_some_and(|u| self.auth.delegated.approve(user_code, u))
    }

    /// A delegated token for `user` (id or UPN), for `/me` requests.
    pub fn delegated_token(&mut self, user: &str) -> Option<String> {
        let u = self.tenant.user_index(user)?;
        let now = self.tenant.now();
        Some(self.auth.delegated_token(u, now, &mut self.rng))
    }

    pub(super) fn user_key(&self, user: Option<usize>) -> Option<String> {
        user.and_then(|u| self.tenant.users.get(u))
            .map(|u| u.id.clone())
    }

    pub(super) fn resolve_user(&self, r: &UserRef, subject: &Subject) -> Result<usize, GraphError> {
        match (r, subject) {
            (UserRef::Me, Subject::User(u)) => Ok(*u),
            (UserRef::Me, Subject::App(_)) => Err(GraphError::new(
                400,
                "BadRequest",
                "/me request is only valid with delegated authentication flow.",
            )),
            (UserRef::Key(k), subject) => {
                let u = self.tenant.user_index(k).ok_or_else(|| {
                    GraphError::new(
                        404,
                        "ErrorInvalidUser",
                        format!("The requested user '{k}' is invalid."),
                    )
                })?;
                // A delegated token reads its own user's mailbox by id or UPN too; another
                // user's calendar only if shared, which the simulator does not model: 403
                // ErrorAccessDenied, as Graph answers (Microsoft Learn, "Get shared or
                // delegated Outlook calendar events": Calendars.Read.Shared and a share).
                match subject {
                    Subject::User(own) if *own != u => Err(GraphError::new(
                        403,
                        "ErrorAccessDenied",
                        "Access is denied. Check credentials and try again.",
                    )),
                    _ => Ok(u),
                }
            }
        }
    }

    pub(super) fn admit(&mut self, req: &SimRequest) -> Admission {
        let Some(route) = parse_route(&req.path) else {
            let seg = req
                .path
                .trim_matches('/')
                .split('/')
                .next_back()
                .unwrap_or("")
                .to_owned();
            let e = GraphError::new(
                400,
                "BadRequest",
                format!("Resource not found for the segment '{seg}'."),
            );
            let response = self.error_response(&e, req.client_request_id.as_deref());
            return Admission::Answer {
                response,
                fault: None,
                user: None,
                early: false,
            };
        };
        // The mailbox the path names, for the log even when the request is refused.
        let named = match route.user() {
            Some(UserRef::Key(k)) => self.tenant.user_index(k),
            _ => None,
        };
        let now = self.tenant.now();
        let now_i = Instant::now();
        let user = match route.user() {
            None => None,
            Some(user_ref) => {
                let resolved = self
                    .auth
                    .check(req.authorization.as_deref(), now)
                    .and_then(|subject| self.resolve_user(user_ref, &subject));
                match resolved {
                    Ok(u) => Some(u),
                    Err(e) => {
                        let response = self.error_response(&e, req.client_request_id.as_deref());
                        return Admission::Answer {
                            response,
                            fault: None,
                            user: named,
                            early: false,
                        };
                    }
                }
            }
        };
        // A directory read needs a token but addresses no mailbox.
        let refused = if route.is_directory() {
            self.auth.check(req.authorization.as_deref(), now).err()
        } else {
            None
        };
        // A user without an Exchange Online mailbox (unlicensed, a guest, on-premises) has no
        // calendar to read: 404 MailboxNotEnabledForRESTAPI (notes §errors; docs#8520).
        let refused = refused.or_else(|| match user {
            Some(u)
                if route.needs_mailbox()
                    && !self.tenant.users[u].directory.mailbox.serves_calendars() =>
            {
                Some(GraphError::new(
                    404,
                    "MailboxNotEnabledForRESTAPI",
                    "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
                ))
            }
            _ => None,
        });
        if let Some(e) = refused {
            let response = self.error_response(&e, req.client_request_id.as_deref());
            return Admission::Answer {
                response,
                fault: None,
                user,
                early: false,
            };
        }
        let mailbox_key = self.user_key(user);
        let limits = self.limits.clone();
        let mut early = false;
        let mut in_flight = 0;
        if let Some(u) = user {
            let mb = self.mailboxes.entry(u).or_default();
            let in_flight_already = mb
                .announced
                .is_some_and(|at| now_i.duration_since(at) < IN_FLIGHT_ALLOWANCE);
            if mb.retry_until.is_some_and(|t| now_i < t) && !in_flight_already {
                early = true;
            }
            in_flight = mb.in_flight + 1;
            if early {
                self.violations.retry_after += 1;
                if let Some(k) = &mailbox_key {
                    *self.violations.by_mailbox.entry(k.clone()).or_default() += 1;
                }
            }
            if in_flight > limits.mailbox_concurrency {
                self.violations.concurrency += 1;
                let r = self.throttle(
                    req.client_request_id.as_deref(),
                    user,
                    429,
                    "ApplicationThrottled",
                    "Application is over its MailboxConcurrency limit.",
                    limits.concurrency_retry_after,
                    false,
                );
                return Admission::Answer {
                    response: r,
                    fault: Some("mailbox_concurrency".into()),
                    user,
                    early,
                };
            }
            let window = Duration::from_secs_f64(limits.mailbox_window_secs.max(0.001));
            let mb = self.mailboxes.entry(u).or_default();
            if let Some(wait) = over_budget(
                &mut mb.recent,
                window,
                limits.mailbox_requests as usize,
                now_i,
            ) {
                let r = self.throttle(
                    req.client_request_id.as_deref(),
                    user,
                    429,
                    "ApplicationThrottled",
                    "Application is over its MailboxRequests limit.",
                    wait,
                    false,
                );
                return Admission::Answer {
                    response: r,
                    fault: Some("mailbox_rate".into()),
                    user,
                    early,
                };
            }
        }
        // The budget is Graph's; token requests go to Azure AD.
        if let (Some(budget), false) = (
            limits.app_requests,
            matches!(
                route,
                Route::Token { .. } | Route::DeviceCode { .. } | Route::ManagedIdentity { .. }
            ),
        ) {
            let window = Duration::from_secs_f64(limits.app_window_secs.max(0.001));
            if let Some(wait) = over_budget(&mut self.app_recent, window, budget as usize, now_i) {
                let r = self.throttle(
                    req.client_request_id.as_deref(),
                    user,
                    429,
                    "TooManyRequests",
                    "Please retry again later.",
                    wait,
                    false,
                );
                return Admission::Answer {
                    response: r,
                    fault: Some("app_budget".into()),
                    user,
                    early,
                };
            }
        }
        let mut delay = None;
        let mut fate = Fate::Normal;
        let mut malformed = false;
        let mut fault = None;
        let rng = &mut self.rng;
        let mut draw = || rng.r#gen::<f64>();
        let mut fired = Vec::new();
        let names: Vec<&str> = user
            .and_then(|u| self.tenant.users.get(u))
            .map(|u| vec![u.id.as_str(), u.upn.as_str()])
            .unwrap_or_default();
        for (i, rule) in self.faults.iter_mut().enumerate() {
            if rule.consider(&names, &req.method, &req.path, &mut draw) {
                fired.push(i);
                if !matches!(rule.action, FaultAction::Delay { .. }) {
                    break;
                }
            }
        }
        for i in fired {
            self.stats.faults_fired += 1;
            match self.faults[i].action.clone() {
                FaultAction::Status { status, .. } => {
                    let action = self.faults[i].action.clone();
                    let fault = Some(format!("status:{status}"));
                    if let Some(delay) = delay {
                        // A Delay rule fired before it: the error is answered that much later,
                        // and its Retry-After counts from then (a throttled answer that took
                        // its time, as a loaded mailbox's do).
                        if let Some(u) = user {
                            let mb = self.mailboxes.entry(u).or_default();
                            mb.in_flight += 1;
                            self.violations.max_in_flight =
                                self.violations.max_in_flight.max(mb.in_flight);
                        }
                        return Admission::Later {
                            delay,
                            action,
                            route,
                            fault,
                            user,
                            in_flight,
                            early,
                        };
                    }
                    let response = self.scripted_answer(req, &route, user, &action);
                    return Admission::Answer {
                        response,
                        fault,
                        user,
                        early,
                    };
                }
                FaultAction::Delay { ms } => {
                    delay = Some(Duration::from_millis(ms));
                    fault = Some(format!("delay:{ms}"));
                }
                FaultAction::Reset => {
                    fate = Fate::Reset;
                    fault = Some("reset".into());
                }
                FaultAction::Truncate => {
                    fate = Fate::Truncate;
                    fault = Some("truncate".into());
                }
                FaultAction::MalformedJson => {
                    malformed = true;
                    fault = Some("malformed_json".into());
                }
            }
        }
        if let Some(u) = user {
            let mb = self.mailboxes.entry(u).or_default();
            mb.in_flight += 1;
            self.violations.max_in_flight = self.violations.max_in_flight.max(mb.in_flight);
        }
        Admission::Proceed(Admitted {
            route,
            user,
            delay,
            fate,
            malformed,
            fault,
            in_flight,
            early,
        })
    }
}
