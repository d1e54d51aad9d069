//! calsync: the binary's library — CLI commands, config, telemetry, the demo and benchmarks.
//! `main.rs` only parses arguments and maps errors to exit codes.

pub mod app;
pub mod bench;
pub mod config;
pub mod demo;
pub mod http;
pub mod localpg;
pub mod service;
pub mod telemetry;
pub mod verify;
