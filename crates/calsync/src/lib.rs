//! calsync: the binary's library — CLI commands, config, telemetry, the service and the demo.
//! `main.rs` only parses arguments and maps errors to exit codes.
//!
//! | module | owns |
//! |---|---|
//! | [`accounts`] | `calsync login`, `accounts`, `logout`: delegated accounts by device code |
//! | [`commands`] | the one-off commands: sync-once, migrate, status, resync, reload, discover |
//! | [`feed`] | `calsync changes`: the change feed as lines, once or following |
//! | [`config`] | the config tree: figment loading, validation, `config check` |
//! | `demo` | `calsync demo`: the product against graph-sim (feature `demo`) |
//! | [`service`] | `calsync run`: `App::build`, then the main loop and the drain |
//! | [`worker`] | the supervisor of background workers: names, states, one policy |
//! | [`schedule`] | the schedule worker: the one owner of the scheduler and the tracked set |
//! | [`discovery`] | the discovery worker: `[[sources]]` resolved on their cadence |
//! | [`upkeep`] | the upkeep and re-base workers |
//! | [`push`] | push: the receiver Graph posts notifications to, and the subscriber worker |
//! | [`shared`] | what the HTTP handlers, workers and main loop share |
//! | [`http`] | `/healthz`, `/readyz`, `/metrics`, `POST /reload` |
//! | [`notify`] | notes to systemd (READY, RELOADING, STATUS, WATCHDOG, STOPPING) |
//! | [`telemetry`] | logging: text or JSON, the filter |

#![warn(missing_docs)]

pub mod accounts;
pub mod commands;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod feed;
pub mod http;
pub mod notify;
pub mod push;
pub mod schedule;
pub mod service;
pub mod shared;
pub mod telemetry;
pub mod upkeep;
pub mod worker;
