//! The simulator: one tenant's state behind a lock, and the pipeline every HTTP request goes
//! through (route → auth → manners → limits → faults → answer → log).

use crate::auth::{Auth, ClientApp, Subject, TokenError};
use crate::clock::Clock;
use crate::delta::{DeltaRequest, Quirks, SyncCache, page_json};
use crate::error::GraphError;
use crate::faults::{FaultAction, FaultRule, Limits};
use crate::model::{Tenant, Window};
use crate::writes::EventPatch;
use chrono::{DateTime, NaiveDateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// How the simulator is set up; every field has a default that mirrors Microsoft's service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    pub seed: u64,
    /// The tenant id or domain the token endpoint answers for.
    pub tenant: String,
    pub clients: Vec<ClientApp>,
    /// Access-token lifetime in seconds (Azure AD: 3599).
    pub token_lifetime_secs: i64,
    /// Entries (rounds and delta states) the sync-state cache keeps before evicting the oldest.
    pub cache_capacity: usize,
    /// Page size when the client sends no `Prefer: odata.maxpagesize`.
    pub default_page_size: usize,
    /// Freeze the clock at this instant (a test clock); the system clock when absent.
    pub clock_start: Option<DateTime<Utc>>,
    pub quirks: Quirks,
    pub limits: Limits,
    /// Request-log entries kept (oldest dropped first).
    pub log_capacity: usize,
}

pub const DEFAULT_CLIENT_ID: &str = "calsync-sim-client";
pub const DEFAULT_CLIENT_SECRET: &str = "calsync-sim-secret";
pub const DEFAULT_TENANT: &str = "sim-tenant";

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 42,
            tenant: DEFAULT_TENANT.into(),
            clients: vec![ClientApp {
                client_id: DEFAULT_CLIENT_ID.into(),
                client_secret: DEFAULT_CLIENT_SECRET.into(),
            }],
            token_lifetime_secs: 3599,
            cache_capacity: 200_000,
            default_page_size: 10,
            clock_start: None,
            quirks: Quirks::default(),
            limits: Limits::default(),
            log_capacity: 100_000,
        }
    }
}

/// One request as the log keeps it: no headers, no bodies, no tokens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    pub seq: u64,
    /// Seconds since the simulator started (monotonic; follows tokio's paused clock in tests).
    pub at_secs: f64,
    pub mailbox: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Requests in flight to this mailbox when this one arrived, itself included.
    pub in_flight: u32,
    pub fault: Option<String>,
    /// Sent to a mailbox before its announced `Retry-After` had passed.
    pub early: bool,
    /// The TCP connection that carried it (see [`SimRequest::connection`]).
    #[serde(default)]
    pub connection: u64,
}

/// Counters of bad manners, for tests to assert are zero.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Violations {
    /// Requests to a mailbox before its `Retry-After` had passed.
    pub retry_after: u64,
    /// Requests beyond the per-mailbox concurrency limit.
    pub concurrency: u64,
    pub by_mailbox: BTreeMap<String, u64>,
    /// The most requests seen in flight to one mailbox at once.
    pub max_in_flight: u32,
}

/// Counters for tests and benchmarks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub requests: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub tokens_issued: u64,
    pub evictions: u64,
    pub faults_fired: u64,
    pub cache_entries: usize,
}

/// One live instance of the truth: what a perfect mirror of a window must hold.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct TruthItem {
    pub id: String,
    pub event_type: String,
    pub subject: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub is_all_day: bool,
    pub series_master_id: Option<String>,
}

#[derive(Debug, Default)]
struct Mailbox {
    in_flight: u32,
    retry_until: Option<Instant>,
    /// When the last Retry-After was announced.
    announced: Option<Instant>,
    recent: VecDeque<Instant>,
}

/// A request that reaches a mailbox this soon after a Retry-After was announced was already on
/// its way: another task of the client had decided to send it before the answer was read (it
/// may even go out on the very connection that carried the answer, once that is free). It is
/// not counted as early. On loopback such a request arrives well within this.
pub const IN_FLIGHT_ALLOWANCE: Duration = Duration::from_millis(5);

/// Everything behind the simulator's one lock.
#[derive(Debug)]
pub struct State {
    pub tenant: Tenant,
    pub cache: SyncCache,
    pub auth: Auth,
    pub faults: Vec<FaultRule>,
    pub limits: Limits,
    mailboxes: HashMap<usize, Mailbox>,
    app_recent: VecDeque<Instant>,
    log: VecDeque<RequestRecord>,
    log_capacity: usize,
    seq: u64,
    violations: Violations,
    stats: Stats,
    rng: StdRng,
    started: Instant,
}

/// A request as the HTTP layer hands it over.
#[derive(Clone, Debug, Default)]
pub struct SimRequest {
    pub method: String,
    /// The path, still percent-encoded, e.g. `/v1.0/users/x/calendarView/delta`.
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub prefer: Vec<String>,
    pub body: Vec<u8>,
    /// `scheme://host:port` the client reached us on; links are built on it.
    pub origin: String,
    /// Which TCP connection carried the request (numbered from 1 by the server; 0 when the
    /// library is called directly), so tests can tell a fresh connection from a reused one.
    pub connection: u64,
}

/// What happens to the connection after the answer is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Normal,
    /// Send half the body, then drop the connection.
    Truncate,
    /// Drop the connection before answering.
    Reset,
}

#[derive(Clone, Debug)]
pub struct SimResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub fate: Fate,
}

impl SimResponse {
    fn json(status: u16, v: &Value) -> Self {
        Self::json_bytes(status, serde_json::to_vec(v).unwrap_or_default())
    }

    /// A body that is already serialized JSON.
    fn json_bytes(status: u16, body: Vec<u8>) -> Self {
        SimResponse {
            status,
            headers: vec![("content-type".into(), "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8".into())],
            body,
            fate: Fate::Normal,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum UserRef {
    Me,
    Key(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CalRef {
    Default,
    Id(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Token {
        tenant: String,
    },
    Delta {
        user: UserRef,
        cal: CalRef,
    },
    Events {
        user: UserRef,
        cal: Option<CalRef>,
    },
    Event {
        user: UserRef,
        cal: Option<CalRef>,
        id: String,
    },
    Calendars {
        user: UserRef,
    },
    User {
        user: UserRef,
    },
}

impl Route {
    /// The mailbox a Graph route addresses (the token endpoint addresses none).
    fn user(&self) -> Option<&UserRef> {
        match self {
            Route::Delta { user, .. }
            | Route::Events { user, .. }
            | Route::Event { user, .. }
            | Route::Calendars { user }
            | Route::User { user } => Some(user),
            Route::Token { .. } => None,
        }
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Puts `@odata.context` first, as Graph does on single-entity answers.
fn with_context(v: Value, context: String) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::with_capacity(m.len() + 1);
            out.insert("@odata.context".into(), json!(context));
            out.extend(m);
            Value::Object(out)
        }
        other => other,
    }
}

fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<String> = path.trim_matches('/').split('/').map(decode).collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    if let [_, "oauth2", "v2.0", "token"] = l.as_slice() {
        return Some(Route::Token {
            tenant: segs[0].clone(),
        });
    }
    let rest = match l.first() {
        Some(&"v1.0") | Some(&"beta") => 1,
        _ => return None,
    };
    let (user, at) = match l.get(rest) {
        Some(&"me") => (UserRef::Me, rest + 1),
        Some(&"users") => (UserRef::Key(segs.get(rest + 1)?.clone()), rest + 2),
        _ => return None,
    };
    let s = &segs[at..];
    match &l[at..] {
        [] => Some(Route::User { user }),
        ["calendarview", "delta"] | ["calendar", "calendarview", "delta"] => Some(Route::Delta {
            user,
            cal: CalRef::Default,
        }),
        ["calendars", _, "calendarview", "delta"] => Some(Route::Delta {
            user,
            cal: CalRef::Id(s[1].clone()),
        }),
        ["calendars"] => Some(Route::Calendars { user }),
        ["events"] => Some(Route::Events { user, cal: None }),
        ["calendar", "events"] => Some(Route::Events {
            user,
            cal: Some(CalRef::Default),
        }),
        ["calendars", _, "events"] => Some(Route::Events {
            user,
            cal: Some(CalRef::Id(s[1].clone())),
        }),
        ["events", _] => Some(Route::Event {
            user,
            cal: None,
            id: s[1].clone(),
        }),
        ["calendar", "events", _] => Some(Route::Event {
            user,
            cal: Some(CalRef::Default),
            id: s[2].clone(),
        }),
        ["calendars", _, "events", _] => Some(Route::Event {
            user,
            cal: Some(CalRef::Id(s[1].clone())),
            id: s[3].clone(),
        }),
        _ => None,
    }
}

/// Reads `startDateTime`/`endDateTime` as Graph does: an offset decides the zone, none means UTC.
fn parse_instant(raw: &str, name: &str) -> Result<DateTime<Utc>, GraphError> {
    let bad =
        || GraphError::invalid_parameter(format!("The value of parameter '{name}' is invalid."));
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S"))
        .map(|n| n.and_utc())
        .map_err(|_| bad())
}

fn parse_delta_query(query: &str) -> Result<DeltaRequest, GraphError> {
    let mut req = DeltaRequest::default();
    let (mut start, mut end) = (None, None);
    // form_urlencoded turns an unescaped '+' into a space, as Graph's own parser does.
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.to_ascii_lowercase().as_str() {
            "startdatetime" => start = Some(parse_instant(&v, "StartDateTime")?),
            "enddatetime" => end = Some(parse_instant(&v, "EndDateTime")?),
            "$skiptoken" => req.skip_token = Some(v.into_owned()),
            "$deltatoken" => req.delta_token = Some(v.into_owned()),
            "$select" | "$expand" | "$filter" | "$orderby" | "$search" | "$top" => {
                return Err(GraphError::new(
                    400,
                    "ErrorInvalidUrlQuery",
                    format!("The query parameter '{k}' is not supported with calendarView delta."),
                ));
            }
            _ => {}
        }
    }
    match (start, end) {
        (Some(s), Some(e)) if e <= s => {
            return Err(GraphError::invalid_parameter(
                "The value of parameter 'EndDateTime' is invalid.",
            ));
        }
        (Some(s), Some(e)) => req.window = Some(Window { start: s, end: e }),
        (None, None) => {}
        _ if req.skip_token.is_some() || req.delta_token.is_some() => {}
        _ => {
            return Err(GraphError::invalid_parameter(
                "This request requires a time window specified by the query string parameters \
                 StartDateTime and EndDateTime.",
            ));
        }
    }
    Ok(req)
}

/// `Prefer` values, comma-separated or repeated (RFC 7240).
fn preferences(prefer: &[String]) -> Vec<(String, String)> {
    prefer
        .iter()
        .flat_map(|h| h.split(','))
        .filter_map(|p| {
            let p = p.trim();
            if p.is_empty() {
                return None;
            }
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_owned(),
            ))
        })
        .collect()
}

fn retry_after_header(secs: f64, as_date: bool) -> (String, Duration) {
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
fn over_budget(
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
struct Admitted {
    route: Route,
    user: Option<usize>,
    delay: Option<Duration>,
    fate: Fate,
    malformed: bool,
    fault: Option<String>,
    in_flight: u32,
    early: bool,
}

enum Admission {
    /// Answered without running the route; `user` is the mailbox it was for, when known.
    Answer {
        response: SimResponse,
        fault: Option<String>,
        user: Option<usize>,
        /// It came before the mailbox's Retry-After had passed.
        early: bool,
    },
    Proceed(Admitted),
}

impl State {
    fn new(cfg: &SimConfig, clock: Clock) -> Self {
        let mut cache = SyncCache::new(cfg.seed, cfg.cache_capacity, cfg.default_page_size);
        cache.quirks = cfg.quirks.clone();
        State {
            tenant: Tenant::new(cfg.seed, clock),
            cache,
            auth: Auth::new(
                cfg.tenant.clone(),
                cfg.clients.clone(),
                chrono::Duration::seconds(cfg.token_lifetime_secs),
            ),
            faults: Vec::new(),
            limits: cfg.limits.clone(),
            mailboxes: HashMap::new(),
            app_recent: VecDeque::new(),
            log: VecDeque::new(),
            log_capacity: cfg.log_capacity,

            seq: 0,
            violations: Violations::default(),
            stats: Stats::default(),
            rng: StdRng::seed_from_u64(cfg.seed.wrapping_add(1)),
            started: Instant::now(),
        }
    }

    fn error_response(&mut self, e: &GraphError) -> SimResponse {
        let now = self.tenant.now();
        self.seq += 1;
        let rid = format!("{:08x}-0000-4000-8000-{:012x}", self.seq, self.seq);
        let mut r = SimResponse::json(
            e.status,
            &e.body(&rid, &now.format("%Y-%m-%dT%H:%M:%S").to_string()),
        );
        r.headers.push(("request-id".into(), rid.clone()));
        r.headers.push(("client-request-id".into(), rid));
        if e.status == 401 {
            r.headers.push((
                "www-authenticate".into(),
                "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"".into(),
            ));
        }
        if let Some(ra) = &e.retry_after {
            r.headers.push(("retry-after".into(), ra.clone()));
        }
        r
    }

    fn throttle(
        &mut self,
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
        self.error_response(&e)
    }

    fn user_key(&self, user: Option<usize>) -> Option<String> {
        user.and_then(|u| self.tenant.users.get(u))
            .map(|u| u.id.clone())
    }

    fn resolve_user(&self, r: &UserRef, subject: &Subject) -> Result<usize, GraphError> {
        match (r, subject) {
            (UserRef::Me, Subject::User(u)) => Ok(*u),
            (UserRef::Me, Subject::App(_)) => Err(GraphError::new(
                400,
                "BadRequest",
                "/me request is only valid with delegated authentication flow.",
            )),
            (UserRef::Key(k), _) => self.tenant.user_index(k).ok_or_else(|| {
                GraphError::new(
                    404,
                    "ErrorInvalidUser",
                    format!("The requested user '{k}' is invalid."),
                )
            }),
        }
    }

    fn admit(&mut self, req: &SimRequest) -> Admission {
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
            let response = self.error_response(&e);
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
                        let response = self.error_response(&e);
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
        if let (Some(budget), false) = (limits.app_requests, matches!(route, Route::Token { .. })) {
            let window = Duration::from_secs_f64(limits.app_window_secs.max(0.001));
            if let Some(wait) = over_budget(&mut self.app_recent, window, budget as usize, now_i) {
                let r = self.throttle(
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
                FaultAction::Status {
                    status,
                    code,
                    message,
                    retry_after,
                    retry_after_as_date,
                } => {
                    let r = match retry_after {
                        Some(secs) => {
                            self.throttle(user, status, &code, &message, secs, retry_after_as_date)
                        }
                        // Azure AD's error shape on the token endpoint, Graph's elsewhere.
                        None if matches!(route, Route::Token { .. }) => SimResponse::json(
                            status,
                            &json!({"error": code, "error_description": message}),
                        ),
                        None => self.error_response(&GraphError::new(status, &code, message)),
                    };
                    return Admission::Answer {
                        response: r,
                        fault: Some(format!("status:{status}")),
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

    fn calendar_index(&self, user: usize, cal: &CalRef) -> Result<usize, GraphError> {
        match cal {
            CalRef::Default => Ok(0),
            CalRef::Id(id) => self.tenant.users[user].calendar_index(id).ok_or_else(|| {
                GraphError::not_found("The specified object was not found in the store.")
            }),
        }
    }

    fn execute(
        &mut self,
        route: &Route,
        user: Option<usize>,
        req: &SimRequest,
    ) -> Result<SimResponse, GraphError> {
        let now = self.tenant.now();
        let base = format!(
            "{}{}",
            req.origin,
            req.path.split('/').take(2).collect::<Vec<_>>().join("/")
        );
        let context = format!("{base}/$metadata#Collection(event)");
        let u = user.unwrap_or(0);
        let entity = format!(
            "{base}/$metadata#users('{}')/events/$entity",
            self.tenant.users.get(u).map_or("", |x| x.id.as_str())
        );
        let body_json = || -> Result<Value, GraphError> {
            serde_json::from_slice(&req.body).map_err(|e| {
                GraphError::new(
                    400,
                    "BadRequest",
                    format!("Unable to read JSON request payload: {e}"),
                )
            })
        };
        match (route, req.method.as_str()) {
            (Route::Token { tenant }, "POST") => {
                let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
                    .into_owned()
                    .collect();
                match self.auth.token_request(tenant, &form, now, &mut self.rng) {
                    Ok(v) => {
                        self.stats.tokens_issued = self.auth.issued;
                        Ok(SimResponse::json(200, &v))
                    }
                    Err(TokenError { status, body }) => Ok(SimResponse::json(status, &body)),
                }
            }
            (Route::Delta { cal, .. }, "GET") => {
                let ci = self.calendar_index(u, cal)?;
                let mut dreq = parse_delta_query(&req.query)?;
                let mut applied = vec!["odata.track-changes".to_owned()];
                for (k, v) in preferences(&req.prefer) {
                    match k.as_str() {
                        "odata.maxpagesize" => {
                            let n: usize = v.parse().map_err(|_| {
                                GraphError::invalid_parameter(
                                    "odata.maxpagesize must be a positive number",
                                )
                            })?;
                            dreq.max_page_size = Some(n.max(1));
                            applied.push(format!("odata.maxpagesize={}", n.max(1)));
                        }
                        "outlook.timezone"
                            if !matches!(
                                v.as_str(),
                                "UTC" | "Etc/UTC" | "Coordinated Universal Time"
                            ) =>
                        {
                            return Err(GraphError::new(
                                400,
                                "TimeZoneNotSupportedException",
                                format!(
                                    "graph-sim renders times in UTC only; time zone '{v}' is not supported"
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
                let link_base = format!("{}{}", req.origin, req.path);
                let page = self.cache.serve(&self.tenant, u, ci, &dreq, &link_base)?;
                let mut r = SimResponse::json_bytes(200, page_json(page, &context));
                r.headers
                    .push(("preference-applied".into(), applied.join(", ")));
                Ok(r)
            }
            (Route::Events { cal, .. }, "POST") => {
                let ci = match cal {
                    Some(c) => self.calendar_index(u, c)?,
                    None => 0,
                };
                let patch = EventPatch::from_json(&body_json()?)?;
                let v = self.tenant.create_event(u, ci, &patch)?;
                Ok(SimResponse::json(201, &with_context(v, entity)))
            }
            (Route::Event { cal, id, .. }, method) => {
                let ci = match cal {
                    Some(c) => Some(self.calendar_index(u, c)?),
                    None => None,
                };
                match method {
                    "GET" => Ok(SimResponse::json(
                        200,
                        &with_context(self.tenant.get_event(u, ci, id)?, entity),
                    )),
                    "PATCH" => {
                        let patch = EventPatch::from_json(&body_json()?)?;
                        Ok(SimResponse::json(
                            200,
                            &with_context(self.tenant.update_event(u, ci, id, &patch)?, entity),
                        ))
                    }
                    "DELETE" => {
                        self.tenant.delete_event(u, ci, id)?;
                        Ok(SimResponse {
                            status: 204,
                            headers: vec![],
                            body: vec![],
                            fate: Fate::Normal,
                        })
                    }
                    _ => Err(GraphError::new(
                        405,
                        "Request_BadRequest",
                        "Method not allowed.",
                    )),
                }
            }
            (Route::Calendars { .. }, "GET") => {
                let user = &self.tenant.users[u];
                let value: Vec<Value> = user
                    .calendars
                    .iter()
                    .map(|c| {
                        json!({
                            "id": c.id, "name": c.name, "isDefaultCalendar": c.is_default,
                            "owner": {"name": user.display_name, "address": user.upn}
                        })
                    })
                    .collect();
                Ok(SimResponse::json(
                    200,
                    &json!({"@odata.context": format!("{base}/$metadata#users('{}')/calendars", user.id), "value": value}),
                ))
            }
            (Route::User { .. }, "GET") => {
                let user = &self.tenant.users[u];
                Ok(SimResponse::json(
                    200,
                    &json!({"id": user.id, "userPrincipalName": user.upn, "displayName": user.display_name, "mail": user.upn}),
                ))
            }
            _ => Err(GraphError::new(
                405,
                "Request_BadRequest",
                "Method not allowed.",
            )),
        }
    }

    fn record(
        &mut self,
        user: Option<usize>,
        req: &SimRequest,
        status: u16,
        in_flight: u32,
        fault: Option<String>,
        early: bool,
    ) {
        self.stats.requests += 1;
        *self.stats.by_status.entry(status).or_default() += 1;
        let seq = self.stats.requests;
        let rec = RequestRecord {
            seq,
            at_secs: Instant::now().duration_since(self.started).as_secs_f64(),
            mailbox: self.user_key(user),
            method: req.method.clone(),
            path: req.path.clone(),
            status,
            in_flight,
            fault,
            early,
            connection: req.connection,
        };
        if self.log.len() >= self.log_capacity {
            self.log.pop_front();
        }
        self.log.push_back(rec);
    }

    /// The live instances of a window: what a correct mirror holds, sorted by id.
    pub fn truth(&self, user: &str, calendar: &str, window: Window) -> Option<Vec<TruthItem>> {
        let u = self.tenant.user_index(user)?;
        let user = &self.tenant.users[u];
        let cal = if calendar.eq_ignore_ascii_case("default") {
            user.calendars.first()?
        } else {
            user.calendars.iter().find(|c| c.id == calendar)?
        };
        let mut out: Vec<TruthItem> = cal
            .instances(&window)
            .into_iter()
            .map(|i| TruthItem {
                id: i.id.clone(),
                event_type: i.kind.graph_name().to_owned(),
                subject: i.props.subject.clone(),
                start: i.start.and_utc(),
                end: i.end.and_utc(),
                is_all_day: i.props.is_all_day,
                series_master_id: i.series_master_id().map(str::to_owned),
            })
            .collect();
        out.sort();
        Some(out)
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.log.iter().cloned().collect()
    }

    pub fn violations(&self) -> Violations {
        self.violations.clone()
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.tokens_issued = self.auth.issued;
        s.evictions = self.cache.evictions;
        s.cache_entries = self.cache.len();
        s
    }

    pub fn clear_log(&mut self) {
        self.log.clear();
        self.violations = Violations::default();
    }

    /// A delegated token for `user` (id or UPN), for `/me` requests.
    pub fn delegated_token(&mut self, user: &str) -> Option<String> {
        let u = self.tenant.user_index(user)?;
        let now = self.tenant.now();
        Some(self.auth.delegated_token(u, now, &mut self.rng))
    }
}

/// A running simulator: cheap to clone, shared by the HTTP server and tests.
#[derive(Clone, Debug)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    clock: Clock,
}

struct InFlight {
    sim: Sim,
    user: Option<usize>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(u) = self.user {
            let mut st = self.sim.lock();
            if let Some(mb) = st.mailboxes.get_mut(&u) {
                mb.in_flight = mb.in_flight.saturating_sub(1);
            }
        }
    }
}

impl Sim {
    pub fn new(cfg: &SimConfig) -> Self {
        let clock = match cfg.clock_start {
            Some(t) => Clock::manual(t),
            None => Clock::System,
        };
        Sim {
            state: Arc::new(Mutex::new(State::new(cfg, clock.clone()))),
            clock,
        }
    }

    /// The state, locked. Hold it briefly: every request waits on it.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Runs one request through the whole pipeline.
    pub async fn handle(&self, req: SimRequest) -> SimResponse {
        let admission = self.lock().admit(&req);
        let a = match admission {
            Admission::Answer {
                response,
                fault,
                user,
                early,
            } => {
                self.lock()
                    .record(user, &req, response.status, 0, fault, early);
                return response;
            }
            Admission::Proceed(a) => a,
        };
        let (user, fault) = (a.user, a.fault);
        let guard = InFlight {
            sim: self.clone(),
            user,
        };
        if let Some(d) = a.delay {
            tokio::time::sleep(d).await;
        }
        let mut st = self.lock();
        let mut resp = match st.execute(&a.route, user, &req) {
            Ok(r) => r,
            Err(e) => st.error_response(&e),
        };
        st.record(user, &req, resp.status, a.in_flight, fault, a.early);
        drop(st);
        drop(guard);
        if a.malformed {
            resp.status = 200;
            let cut = resp.body.len() / 2;
            resp.body.truncate(cut.max(1));
            resp.body.extend_from_slice(b"\"@odata.nextLink\": ,]}");
        }
        resp.fate = a.fate;
        resp
    }
}
