//! calsync: the binary's library — CLI commands, config, telemetry, the service and the demo.
//! `main.rs` only parses arguments and maps errors to exit codes.

#![warn(missing_docs)]

pub mod commands;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod http;
pub mod notify;
pub mod schedule;
pub mod service;
pub mod shared;
pub mod telemetry;
pub mod upkeep;
pub mod worker;
