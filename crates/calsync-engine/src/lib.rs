//! calsync-engine: per-tuple sync rounds, the runner that owns retries and status, the
//! scheduler, and request limits. It drives calsync-graph and calsync-store through their
//! narrow APIs and knows neither SQL nor HTTP.
//!
//! | module | owns |
//! |---|---|
//! | [`account`] | delegated accounts: refresh tokens sealed (AES-256-GCM), kept in the store, one `/me` client per account |
//! | [`round`] | `Engine::run_round`, the one runner: quick lane first, then the full round |
//! | `quick` | the quick lane: a replay that finds nothing, one request and one commit |
//! | `step_error` | what stops a step and what the runner makes of it |
//! | `cursor` | the cursor cache: where each tuple stands after its last commit |
//! | `send` | requests through the gate; steps retried with backoff (backon) |
//! | `failure` | stand-downs, failures recorded under the fence, panics, malformed runs |
//! | `running` | the running set, round slots, liveness, the tally, round metrics |
//! | `guard` | the page-loop guard (endless nextLinks, repeated pages) |
//! | `series` | series completed before a page commits: masters, reconciliation |
//! | [`mapping`] | what a Graph page means for the store (pure) |
//! | [`outcome`] | what a round leaves behind: `Outcome`, `Failure`, `Health` |
//! | [`schedule`] | the scheduler: one task per tuple, slots, `next_delay` |
//! | [`gate`] | the request gate: per-mailbox limits, Retry-After, budgets, AIMD |
//! | [`lease`] | mailbox leases: the keeper, fair share, fencing tokens |
//! | `register` | registration: tuples recorded with ids and mailbox keys |
//! | `tuple` | `TupleConfig` and `Tuple` |
//! | [`discover`] | `[[sources]]` resolved against the directory |
//! | [`window`] | rolling windows and their re-base anchor |
//! | [`cron`] | cron schedules per calendar |

#![warn(missing_docs)]

pub mod account;
pub mod cron;
mod cursor;
pub mod discover;
mod failure;
pub mod gate;
mod guard;
pub mod lease;
pub mod mapping;
pub mod outcome;
mod quick;
mod register;
pub mod round;
mod running;
pub mod schedule;
mod send;
mod series;
mod step_error;
mod tuple;
pub mod window;

pub use account::{AccountSettings, StoredAccount, Vault, VaultError};
pub use cron::{CronSchedule, CronScheduleError};
pub use discover::{
    CalendarPick, Directory, Discovered, Members, Refusals, Refused, Source, SourceCounts,
};
pub use gate::{Budget, GateStats, RequestGate};
pub use lease::{Identity, LeaseKeeper, Leases};
pub use outcome::{Failure, Health, Outcome, RoundReport};
pub use round::SoftStop;
pub use running::{Liveness, Tally};
pub use schedule::{ScheduleChange, Scheduler};
pub use tuple::{Tuple, TupleConfig};
pub use window::{Edge, Rebase, WindowSpec, at_anchor};

use calsync_graph::GraphClient;
use calsync_store::Store;
use std::sync::Arc;
use std::time::Duration;

/// The engine's knobs; the binary fills them from the `[sync]` config section.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Default time between rounds of a tuple.
    pub interval: Duration,
    /// Every so often a tuple runs a full round with sweep even if its deltaLink works.
    pub full_resync_every: Option<Duration>,
    /// Pages one round may take before it is abandoned as degraded.
    pub max_pages_per_round: u32,
    /// Consecutive pages that bring no new id before a round is abandoned as degraded.
    pub max_stale_pages: u32,
    /// Attempts per page on retryable errors before the round gives up until next time.
    pub max_attempts: usize,
    /// The first retry's backoff step; it doubles per attempt (with full jitter).
    pub min_backoff: Duration,
    /// The largest backoff step.
    pub max_backoff: Duration,
    /// How soon a failed or degraded tuple is tried again.
    pub failed_retry_interval: Duration,
    /// A round that makes no progress for this long is cancelled and tried again later.
    pub stuck_round_after: Duration,
    /// Graph requests in flight across all mailboxes: the ceiling of the adaptive limit.
    pub max_in_flight: usize,
    /// The floor the adaptive limit never drops below when the tenant is throttled.
    pub min_in_flight: usize,
    /// Graph requests in flight per mailbox (Outlook's limit is 4).
    pub per_mailbox_concurrency: usize,
    /// Requests per mailbox per window (Graph allows 10,000 per 10 minutes); `None`: no cap.
    pub mailbox_budget: Option<Budget>,
    /// First rounds after start are spread over this long (or the interval, if shorter).
    pub startup_spread: Duration,
    /// With push on, how often a calendar whose subscription is healthy polls
    /// (`push.backstop_interval`): its overdue bound is computed from it (issue 24).
    pub backstop: Option<Duration>,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            interval: Duration::from_secs(300),
            full_resync_every: Some(Duration::from_secs(7 * 24 * 3600)),
            max_pages_per_round: 10_000,
            max_stale_pages: 50,
            max_attempts: 6,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            failed_retry_interval: Duration::from_secs(3600),
            stuck_round_after: Duration::from_secs(600),
            max_in_flight: 64,
            min_in_flight: 4,
            per_mailbox_concurrency: 4,
            mailbox_budget: Some(Budget {
                requests: 5000,
                per: Duration::from_secs(600),
            }),
            startup_spread: Duration::from_secs(30),
            backstop: None,
        }
    }
}

/// Rounds under way per request slot (`max_in_flight`): enough to keep every slot busy while
/// other rounds are between requests (committing a page, parsing one, waiting for a mailbox).
pub const ROUNDS_PER_REQUEST: usize = 4;

/// The sync engine. Cheap to clone; clones share the gate.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A map keyed by tuple id or mailbox, read on every round: foldhash instead of SipHash (the keys
/// come from the config and the store, not from Graph).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Inner {
    graph: GraphClient,
    store: Store,
    gate: RequestGate,
    settings: SyncSettings,
    /// Where each tuple stands after its last committed page, so a round need not read it
    /// back. Only a hint: the store's link_version check refuses anything stale.
    cursors: std::sync::Mutex<FastMap<i64, cursor::Cursor>>,
    /// Consecutive runs per tuple that ended on a malformed page.
    malformed_runs: std::sync::Mutex<FastMap<i64, u32>>,
    /// When the engine last did something (a page fetched or failed, a round ended), in ms
    /// since `born`; and how many rounds are running. The watchdog reads both.
    born: std::time::Instant,
    activity_ms: std::sync::atomic::AtomicU64,
    rounds_in_flight: std::sync::atomic::AtomicUsize,
    /// The tuples whose round is running (to say what a shutdown abandoned), each with when it
    /// last made progress (got a request slot, an answer, or started) and the token that
    /// cancels that round alone.
    running: std::sync::Mutex<std::collections::BTreeMap<String, running::RunningRound>>,
    /// The mailbox leases this process holds, once it runs fenced ([`Engine::fence_with`]):
    /// then no page commits without the current fencing token of its mailbox.
    leases: std::sync::OnceLock<Arc<Leases>>,
    /// Rounds since the last [`Engine::take_tally`]: for the service's periodic summary.
    tally: [std::sync::atomic::AtomicU64; 3],
    /// Rounds allowed under way at once ([`ROUNDS_PER_REQUEST`] × `max_in_flight`). A round's
    /// state is several kilobytes; when 100,000 calendars fall due together (the start, a
    /// restart) the others wait here, for a few bytes each, instead of as started rounds queued
    /// on the gate and the pool (that backlog took the daemon to 950 MiB at 100,000).
    round_slots: Arc<tokio::sync::Semaphore>,
    /// The metrics every round records, registered once (at the first round, when the
    /// service's recorder is in place): a `counter!` with labels looks its series up by hashing
    /// the labels each time, and a no-change round recorded nine of them.
    hot: std::sync::OnceLock<running::HotMetrics>,
    /// Mailboxes whose calendars Graph refused in a discovery pass, until they are asked again.
    refusals: discover::Refusals,
    /// How delegated accounts get their tokens ([`Engine::with_accounts`]).
    accounts: std::sync::OnceLock<account::AccountSettings>,
    /// One Graph client per (account, mailbox), made at its first round.
    account_clients: std::sync::Mutex<FastMap<(String, String), GraphClient>>,
}

impl Engine {
    /// An engine over one Graph client and one store; the request gate is built from `settings`.
    pub fn new(graph: GraphClient, store: Store, settings: SyncSettings) -> Self {
        let gate = RequestGate::new(settings.max_in_flight, settings.per_mailbox_concurrency)
            .with_min_in_flight(settings.min_in_flight)
            .with_budget(settings.mailbox_budget);
        Engine {
            inner: Arc::new(Inner {
                graph,
                store,
                gate,
                cursors: Default::default(),
                malformed_runs: Default::default(),
                born: std::time::Instant::now(),
                activity_ms: Default::default(),
                rounds_in_flight: Default::default(),
                running: Default::default(),
                leases: Default::default(),
                tally: Default::default(),
                hot: Default::default(),
                refusals: Default::default(),
                accounts: Default::default(),
                account_clients: Default::default(),
                round_slots: Arc::new(tokio::sync::Semaphore::new(
                    ROUNDS_PER_REQUEST * settings.max_in_flight.max(1),
                )),
                settings,
            }),
        }
    }

    /// Makes every commit of this engine fenced by mailbox leases held as `identity`, and
    /// returns the keeper that renews and balances them. Once only: `None` if already fenced.
    pub fn fence_with(&self, identity: Identity) -> Option<LeaseKeeper> {
        let leases = Arc::new(Leases::default());
        self.inner.leases.set(Arc::clone(&leases)).ok()?;
        Some(LeaseKeeper::new(self.clone(), leases, identity))
    }

    /// The leases this engine commits under, when fenced.
    pub fn leases(&self) -> Option<&Arc<Leases>> {
        self.inner.leases.get()
    }

    pub(crate) fn gate(&self) -> &RequestGate {
        &self.inner.gate
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &SyncSettings {
        &self.inner.settings
    }

    /// The Graph client it drives.
    pub fn graph(&self) -> &GraphClient {
        &self.inner.graph
    }

    /// Forgets the request gate's state of mailboxes with nothing in flight, waiting, owed or
    /// deferred; a service calls it periodically.
    pub fn forget_idle_mailboxes(&self) {
        self.inner.gate.forget_idle();
    }

    /// What the request gate has done: throttle waits, the adaptive limit.
    pub fn gate_stats(&self) -> GateStats {
        self.inner.gate.stats()
    }

    /// The store it writes to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}
