//! calsync-sinks: the change feed pushed out to HTTP endpoints (`[[sinks]]`, issue 25).
//!
//! Each sink is sent this deployment's changes in feed order, in batches of JSON, each signed
//! with HMAC-SHA256 over the timestamp and the body; its cursor (in PostgreSQL) moves only
//! after a 2xx, so every change arrives **at least once** and each calendar's **in order**. A
//! failing endpoint is retried with a doubling pause (1 s … 5 min) for as long as retention
//! keeps its changes, reported (log, metrics, `sink_cursors`), and never holds up syncing:
//! it reads the feed, nothing waits on it. One replica at a time delivers a sink (the role
//! `sink:<name>`).
//!
//! | module | owns |
//! |---|---|
//! | [`sign`] | the signature: `Calsync-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` |
//! | [`deliver`] | one batch as an HTTP POST: the body, the headers, no redirects, what counts as delivered |
//! | [`worker`] | a sink's loop: its role, its cursor, the feed's wake-ups, backoff, lag and failure reports |
#![warn(missing_docs)]

pub mod deliver;
pub mod sign;
pub mod worker;

pub use deliver::{DeliveryError, SinkConfig};
pub use worker::follow;
