//! End-to-end tests, one binary: calsync against graph-sim and real PostgreSQL, in-process
//! (the engine and the service) and as child processes (the real `calsync` binary).
//!
//! | module | what it proves |
//! |---|---|
//! | `sync` | sync semantics: full and incremental rounds, removals, resyncs, crash safety |
//! | `database` | database trouble short of an outage: read-only, locks, timeouts, refused values |
//! | `faults` | every fault of RELIABILITY.md: throttling, broken transfers, auth, bad input |
//! | `outage` | a private PostgreSQL cluster stopped and started under the engine |
//! | `series` | recurring series as Outlook serves them: stubs, masters, silent cancellations |
//! | `feed` | the change feed under churn: 50 calendars, a follower replays it to exactly the view; a sequence cursor skips |
//! | `model` | seeded random edits, faults, 410s and crashes converge to the truth |
//! | `service` | `calsync run`: systemd notes, probes, metrics, reload, drain |
//! | `converge` | one deployment, one truth: a reload sent to one replica reaches all, stale files never revert the set, re-keyed tuples keep syncing |
//! | `replicas` | many processes, one database: deployments, sync-once beside run, leases, fencing, failover |
//! | `accounts` | delegated accounts: device code sign-in, `/me` mirrored, refresh tokens rotated and sealed, revoked with the login hint |
//! | `cli` | the binary as a user runs it: exit codes, messages, secrets |
//! | `discovery` | a tenant from source lines: users, groups, rooms, calendars, refusals; `calsync discover` |
//! | `windows` | moving a window: the old one served whole until the new one's round ends |
//! | `workers` | the supervised workers: a stalled reload keeps health, the watchdog and rounds going |
//! | `soak` | the real daemon for minutes under faults (`CALSYNC_SOAK_MINUTES`, off by default) |
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod accounts;
mod batch;
mod cli;
mod converge;
mod credentials;
mod database;
mod discovery;
mod faults;
mod feed;
mod harness;
mod model;
mod outage;
mod push;
mod replicas;
mod series;
mod service;
mod soak;
mod sync;
mod windows;
mod workers;
