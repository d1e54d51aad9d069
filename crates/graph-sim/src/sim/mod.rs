//! The simulator: one tenant's state behind a lock, and the pipeline every HTTP request goes
//! through (route → auth → manners → limits → faults → answer → log).
//!
//! | module | owns |
//! |---|---|
//! | `route` | which documented path a request names; query and `Prefer` parsing |
//! | `admission` | auth, concurrency, `Retry-After`, budgets, limits, faults: may it run? |
//! | `execution` | what an admitted request does, and the request log |
//! | here | the configuration, the shared state, the truth API and the pipeline itself |

use crate::auth::{Auth, ClientApp};
use crate::behaviour::Behaviour;
use crate::clock::Clock;
use crate::delta::{Quirks, SyncCache};
use crate::error::GraphError;
use crate::faults::{FaultRule, Limits};
use crate::model::{Tenant, Window};
use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// How the simulator is set up; every field has a default that mirrors Microsoft's service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Seed of every random choice (ids, tokens, probabilistic faults).
    pub seed: u64,
    /// The tenant id or domain the token endpoint answers for.
    pub tenant: String,
    /// Apps that may get tokens.
    pub clients: Vec<ClientApp>,
    /// Access-token lifetime in seconds (Azure AD: 3599).
    pub token_lifetime_secs: i64,
    /// Entries (rounds and delta states) the sync-state cache keeps before evicting the oldest.
    pub cache_capacity: usize,
    /// Page size when the client sends no `Prefer: odata.maxpagesize`.
    pub default_page_size: usize,
    /// Freeze the clock at this instant (a test clock); the system clock when absent.
    pub clock_start: Option<DateTime<Utc>>,
    /// Reported service misbehaviour to reproduce.
    pub quirks: Quirks,
    /// How series and bad tokens are served: as production Outlook does (default) or as
    /// documented.
    pub behaviour: Behaviour,
    /// Throttling limits.
    pub limits: Limits,
    /// Request-log entries kept (oldest dropped first).
    pub log_capacity: usize,
    /// How change notifications are delivered.
    pub push: crate::push::PushSettings,
    /// The host's managed identities, as its IMDS and App Service endpoints answer for them.
    pub managed: crate::auth::ManagedIdentities,
}

/// The client id the default config registers.
pub const DEFAULT_CLIENT_ID: &str = "calsync-sim-client";
/// The client secret the default config registers (a test value).
pub const DEFAULT_CLIENT_SECRET: &str = "calsync-sim-secret";
/// The tenant the default token endpoint answers for.
pub const DEFAULT_TENANT: &str = "sim-tenant";

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 42,
            tenant: DEFAULT_TENANT.into(),
            clients: vec![ClientApp::with_secret(
                DEFAULT_CLIENT_ID,
                DEFAULT_CLIENT_SECRET,
            )],
            token_lifetime_secs: 3599,
            cache_capacity: 200_000,
            default_page_size: 10,
            clock_start: None,
            quirks: Quirks::default(),
            behaviour: Behaviour::default(),
            limits: Limits::default(),
            log_capacity: 100_000,
            push: crate::push::PushSettings::default(),
            managed: Default::default(),
        }
    }
}

/// One request as the log keeps it: no headers, no bodies, no tokens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Seconds since the simulator started (monotonic; follows tokio's paused clock in tests).
    pub at_secs: f64,
    /// The mailbox's object id, when the request named one.
    pub mailbox: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Status answered (0 for a reset).
    pub status: u16,
    /// Requests in flight to this mailbox when this one arrived, itself included.
    pub in_flight: u32,
    /// The fault that fired on it, by kind.
    pub fault: Option<String>,
    /// Sent to a mailbox before its announced `Retry-After` had passed.
    pub early: bool,
    /// The TCP connection that carried it (see [`SimRequest::connection`]).
    #[serde(default)]
    pub connection: u64,
    /// Bytes of the answer's body.
    #[serde(default)]
    pub bytes: u64,
}

/// Counters of bad manners, for tests to assert are zero.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Violations {
    /// Requests to a mailbox before its `Retry-After` had passed.
    pub retry_after: u64,
    /// Requests beyond the per-mailbox concurrency limit.
    pub concurrency: u64,
    /// Violations of either kind, per mailbox.
    pub by_mailbox: BTreeMap<String, u64>,
    /// The most requests seen in flight to one mailbox at once.
    pub max_in_flight: u32,
}

/// Counters for tests and benchmarks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Requests answered.
    pub requests: u64,
    /// Requests by status.
    pub by_status: BTreeMap<u16, u64>,
    /// calendarView delta pages answered 200 (a no-change round is one): what a benchmark
    /// divides a client's CPU by when the request log has wrapped.
    #[serde(default)]
    pub delta_pages: u64,
    /// `$batch` requests answered (the requests inside them count as requests, one each).
    #[serde(default)]
    pub batches: u64,
    /// Access tokens issued.
    pub tokens_issued: u64,
    /// Sync-state cache entries evicted.
    pub evictions: u64,
    /// Faults fired.
    pub faults_fired: u64,
    /// Sync-state cache entries held.
    pub cache_entries: usize,
}

/// One live instance of the truth: what a perfect mirror of a window must hold.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct TruthItem {
    /// Graph id.
    pub id: String,
    /// `singleInstance`, `occurrence` or `exception`.
    pub event_type: String,
    /// Subject.
    pub subject: String,
    /// Start instant (an all-day event's: midnight UTC of its first date).
    pub start: DateTime<Utc>,
    /// End instant (an all-day event's: midnight UTC of the day after its last).
    pub end: DateTime<Utc>,
    /// All-day event.
    pub is_all_day: bool,
    /// The series master, for occurrences and exceptions.
    pub series_master_id: Option<String>,
    /// The organizer's address.
    pub organizer_email: String,
    /// `location.displayName`.
    pub location: String,
    /// `showAs`.
    pub show_as: String,
    /// `iCalUId`.
    pub ical_uid: String,
    /// `isCancelled`: an attendee's copy of a meeting its organizer cancelled.
    pub is_cancelled: bool,
    /// An all-day event's first day (floating).
    pub start_date: Option<chrono::NaiveDate>,
    /// The day after an all-day event's last day.
    pub end_date: Option<chrono::NaiveDate>,
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
    /// The mailboxes and their events.
    pub tenant: Tenant,
    /// Rounds in progress and delta states.
    pub cache: SyncCache,
    /// The token endpoint's state.
    pub auth: Auth,
    /// Scripted faults.
    pub faults: Vec<FaultRule>,
    /// How series and bad tokens are served.
    pub behaviour: Behaviour,
    /// Throttling limits.
    pub limits: Limits,
    /// Change-notification subscriptions and the notifications on their way.
    pub push: crate::push::Push,
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
    /// HTTP method.
    pub method: String,
    /// The path, still percent-encoded, e.g. `/v1.0/users/x/calendarView/delta`.
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// Every `Prefer` header value.
    pub prefer: Vec<String>,
    /// The request body.
    pub body: Vec<u8>,
    /// `scheme://host:port` the client reached us on; links are built on it.
    pub origin: String,
    /// The `client-request-id` header, echoed on the answer.
    pub client_request_id: Option<String>,
    /// The `ConsistencyLevel` header (`eventual` asks for a directory advanced query).
    pub consistency_level: Option<String>,
    /// The `Metadata` header (IMDS wants `true`) and `X-IDENTITY-HEADER` (App Service's
    /// secret), for the managed identity endpoints.
    pub identity_headers: (Option<String>, Option<String>),
    /// Which TCP connection carried the request (numbered from 1 by the server; 0 when the
    /// library is called directly), so tests can tell a fresh connection from a reused one.
    pub connection: u64,
}

/// What happens to the connection after the answer is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Answer and keep the connection.
    Normal,
    /// Send half the body, then drop the connection.
    Truncate,
    /// Drop the connection before answering.
    Reset,
}

/// An answer the HTTP layer sends.
#[derive(Clone, Debug)]
pub struct SimResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// What happens to the connection.
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

mod admission;
mod batch;
mod execution;
mod route;
mod subscriptions;

pub use batch::MAX_BATCH_REQUESTS;

use admission::*;
use route::Route;

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
            )
            .with_managed(cfg.managed.clone()),
            faults: Vec::new(),
            behaviour: cfg.behaviour.clone(),
            limits: cfg.limits.clone(),
            push: crate::push::Push::new(cfg.push.clone()),
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

    /// A fresh `request-id`, as Graph stamps on every answer.
    fn request_id(&mut self) -> String {
        self.seq += 1;
        format!("{:08x}-0000-4000-8000-{:012x}", self.seq, self.seq)
    }

    /// Stamps `request-id` and `client-request-id` on an answer: the client's own id is echoed
    /// when it sent one, otherwise the request id is used for both (as Graph does).
    fn stamp_ids(&mut self, r: &mut SimResponse, client: Option<&str>) -> String {
        let rid = self.request_id();
        let crid = client.map_or_else(|| rid.clone(), str::to_owned);
        r.headers
            .retain(|(k, _)| k != "request-id" && k != "client-request-id");
        r.headers.push(("request-id".into(), rid));
        r.headers.push(("client-request-id".into(), crid.clone()));
        crid
    }

    fn error_response(&mut self, e: &GraphError, client: Option<&str>) -> SimResponse {
        let now = self.tenant.now();
        let mut r = SimResponse::json(200, &Value::Null);
        let crid = self.stamp_ids(&mut r, client);
        let rid = r
            .headers
            .iter()
            .find(|(k, _)| k == "request-id")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        r.status = e.status;
        r.body =
            serde_json::to_vec(&e.body(&rid, &crid, &now.format("%Y-%m-%dT%H:%M:%S").to_string()))
                .unwrap_or_default();
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

    /// The live instances of a window: what a correct mirror holds, sorted by id.
    pub fn truth(&self, user: &str, calendar: &str, window: Window) -> Option<Vec<TruthItem>> {
        let u = self.tenant.user_index(user)?;
        let user = &self.tenant.users[u];
        let cal = if calendar.eq_ignore_ascii_case("default") {
            user.calendars.first()?
        } else {
            user.calendars
                .iter()
                .find(|c| c.id == calendar && !c.deleted)?
        };
        let mut out: Vec<TruthItem> = cal
            .instances(&window)
            .into_iter()
            .map(|i| TruthItem {
                id: i.id.clone(),
                event_type: i.kind.graph_name().to_owned(),
                subject: i.props.subject.clone(),
                // An all-day event is a floating date: its instants are its dates' midnights
                // in UTC, as a client that asked for UTC reads them.
                start: if i.props.is_all_day {
                    i.local_start.and_utc()
                } else {
                    i.start.and_utc()
                },
                end: if i.props.is_all_day {
                    i.local_end.and_utc()
                } else {
                    i.end.and_utc()
                },
                is_all_day: i.props.is_all_day,
                series_master_id: i.series_master_id().map(str::to_owned),
                organizer_email: i.event.organizer.1.clone(),
                location: i.props.location.clone(),
                show_as: i.props.show_as.clone(),
                ical_uid: i.ical_uid(),
                is_cancelled: i.props.is_cancelled,
                start_date: i.props.is_all_day.then(|| i.local_start.date()),
                end_date: i.props.is_all_day.then(|| i.local_end.date()),
            })
            .collect();
        out.sort();
        Some(out)
    }

    /// The request log, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.log.iter().cloned().collect()
    }

    /// Requests being answered now, across all mailboxes (a delayed one counts until its
    /// answer is sent).
    pub fn requests_in_flight(&self) -> u32 {
        self.mailboxes.values().map(|m| m.in_flight).sum()
    }

    /// The counters of bad manners.
    pub fn violations(&self) -> Violations {
        self.violations.clone()
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.tokens_issued = self.auth.issued;
        s.evictions = self.cache.evictions;
        s.cache_entries = self.cache.len();
        s
    }

    /// Empties the request log.
    pub fn clear_log(&mut self) {
        self.log.clear();
        self.violations = Violations::default();
    }
}

/// A running simulator: cheap to clone, shared by the HTTP server and tests.
#[derive(Clone, Debug)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    clock: Clock,
    /// Graph's own client: the validation handshake and notification deliveries.
    http: reqwest::Client,
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
    /// A simulator with an empty tenant built from `cfg`.
    pub fn new(cfg: &SimConfig) -> Self {
        let clock = match cfg.clock_start {
            Some(t) => Clock::manual(t),
            None => Clock::System,
        };
        Sim {
            state: Arc::new(Mutex::new(State::new(cfg, clock.clone()))),
            clock,
            // No redirects: Graph posts to the URL it validated, nowhere else.
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
        }
    }

    /// The state, locked. Hold it briefly: every request waits on it.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The simulator's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Runs one request through the whole pipeline.
    pub async fn handle(&self, req: SimRequest) -> SimResponse {
        if req.method == "POST" && batch::is_batch(&req.path) {
            return self.batch(req).await;
        }
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
            Admission::Later {
                delay,
                action,
                route,
                fault,
                user,
                in_flight,
                early,
            } => {
                let guard = InFlight {
                    sim: self.clone(),
                    user,
                };
                tokio::time::sleep(delay).await;
                let mut st = self.lock();
                let response = st.scripted_answer(&req, &route, user, &action);
                st.record(user, &req, response.status, in_flight, fault, early);
                drop(st);
                drop(guard);
                return response;
            }
            Admission::Proceed(a)
                if matches!(a.route, Route::Subscriptions) && req.method == "POST" =>
            {
                return self.create_subscription(&req).await;
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
        let client = req.client_request_id.as_deref();
        let mut resp = match st.execute(&a.route, user, &req) {
            Ok(mut r) => {
                st.stamp_ids(&mut r, client);
                r
            }
            Err(e) => st.error_response(&e, client),
        };
        st.record(user, &req, resp.status, a.in_flight, fault, a.early);
        if let Some(last) = st.log.back_mut() {
            last.bytes = resp.body.len() as u64;
        }
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
