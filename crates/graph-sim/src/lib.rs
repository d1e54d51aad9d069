//! graph-sim: a stateful Microsoft Graph calendar simulator.
//!
//! It serves Graph-shaped HTTP — the client-credentials token endpoint, event writes, and
//! calendarView delta with paging, `@removed`, evictable tokens and 410s — built from
//! Microsoft's documented behaviour and reported service quirks (see
//! `shared/graph-delta-notes.md`), never from one client's assumptions. Faults, limits and
//! quirks are scriptable; the truth (the exact live instances of any window), the request log
//! and the counters of bad manners are open to tests through [`Sim`] and `/_sim`.
//!
//! | module | owns |
//! |---|---|
//! | [`assertion`] | certificate client assertions, federated tokens, managed identity endpoints |
//! | [`auth`] | the client-credentials token endpoint and bearer checks |
//! | [`delegated`] | delegated sign-in: the device code flow, refresh tokens rotated and revoked |
//! | [`behaviour`] | switches where production and the documentation disagree |
//! | [`churn`] | random edits a real user would make, seeded |
//! | [`clock`] | the simulator's "now": the system clock or a manual one |
//! | [`delta`] | calendarView delta: sync states, frozen rounds, pages, quirks |
//! | [`error`] | Graph-shaped error answers |
//! | [`faults`] | scriptable faults and service limits |
//! | [`model`] | tenant state: users, calendars, events, series and their instances |
//! | [`push`] | change notifications: subscriptions, deliveries, retries, lifecycle events |
//! | [`recurrence`] | `patternedRecurrence` expanded into occurrence dates |
//! | [`seed`] | seeding a tenant from numbers or a scenario file |
//! | `admin` | the `/_sim` admin API: truth, request log, faults, clock, directory, device login |
//! | [`server`] | the HTTP face: hyper, resettable connections, `/_sim` admin |
//! | [`sim`] | the request pipeline: route, auth, manners, limits, faults, answer, log |
//! | [`token`] | sealed `$skiptoken` / `$deltatoken` values |
//! | [`writes`] | Graph's write endpoints on events |
//! | [`zone`] | time zones as Graph names them |

#![warn(missing_docs)]

mod admin;
pub mod assertion;
pub mod auth;
pub mod behaviour;
pub mod churn;
pub mod clock;
pub mod delegated;
pub mod delta;
pub mod error;
pub mod faults;
pub mod model;
pub mod push;
pub mod recurrence;
pub mod seed;
pub mod server;
pub mod sim;
pub mod token;
pub mod writes;
pub mod zone;

pub use behaviour::{Behaviour, Profile};
pub use delta::Quirks;
pub use faults::{FaultAction, FaultRule, Limits};
pub use model::{Directory, Group, MailboxKind, Window};
pub use seed::{GenerateSpec, Scenario};
pub use server::{SimServer, serve};
pub use sim::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, RequestRecord, Sim, SimConfig, Stats,
    TruthItem, Violations,
};

impl Sim {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves this simulator on it.
    pub async fn serve(&self, addr: &str) -> std::io::Result<SimServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        serve(self.clone(), listener)
    }
}
