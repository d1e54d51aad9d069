//! calsync-testkit: what the demo, the end-to-end tests and the benchmarks share, and the
//! daemon never links (`.ci/run` checks that `calsync --no-default-features` does not depend
//! on it).
//!
//! | module | owns |
//! |---|---|
//! | [`localpg`] | a throwaway PostgreSQL cluster (initdb + pg_ctl), stoppable for outage tests |
//! | [`database`] | a scratch database on a given server or on a throwaway cluster |
//! | [`verify`] | comparing the read model with the simulator's truth |
//! | [`sim`] | Graph client settings for a simulator on loopback |
#![warn(missing_docs)]

pub mod database;
pub mod localpg;
pub mod sim;
pub mod verify;

pub use database::ScratchDatabase;
pub use localpg::LocalPostgres;
pub use verify::{Divergence, compare};
