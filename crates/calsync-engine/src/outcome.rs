//! What a run leaves behind: a tuple's health, a failure's code and message, a round's report.

use calsync_store::TupleStatus;

/// How a tuple is left after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// A retryable problem outlasted this run's attempts; tried again soon.
    Retrying,
    /// Graph says this tuple cannot sync (access denied, no mailbox, bad request); tried
    /// again at the slow cadence.
    Failed,
    /// The round was abandoned by a guard (page loop, oversized page, foreign link).
    Degraded,
}

impl Health {
    /// The state the store records for it.
    pub fn status(self) -> TupleStatus {
        match self {
            Health::Retrying => TupleStatus::Retrying,
            Health::Failed => TupleStatus::Failed,
            Health::Degraded => TupleStatus::Degraded,
        }
    }

    /// Its spelling in logs, `status` and metrics.
    pub fn as_str(self) -> &'static str {
        self.status().as_str()
    }
}

/// Why a run did not complete a round, and what it leaves the tuple as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What the tuple is left as.
    pub health: Health,
    /// A short machine-readable code (Graph's error code, or ours such as `Panic`).
    pub code: String,
    /// The human-readable message, free of tokens and secrets.
    pub message: String,
}

impl Failure {
    /// A bug: a panic, or a task that ended abnormally. Tried again at the slow cadence.
    pub(crate) fn panic(message: String) -> Failure {
        Failure {
            health: Health::Failed,
            code: "Panic".into(),
            message,
        }
    }
}

/// What one complete round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Pages fetched and committed.
    pub pages: u32,
    /// Event rows inserted or updated.
    pub upserted: u64,
    /// Event rows removed by `@removed` items.
    pub removed: u64,
    /// Event rows swept at the end of a full round (not seen in it).
    pub swept: u64,
    /// The round was a full one (initial sync or resync).
    pub full: bool,
    /// Times the delta state was found gone and a full round started instead.
    pub resyncs: u32,
}

/// How one run of a tuple ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A round completed.
    Synced(RoundReport),
    /// No round completed; the tuple's status says why.
    Failed(Failure),
    /// Shutdown arrived; the committed pages stand and the next run resumes after them.
    Interrupted,
}

/// What a caught panic said.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
