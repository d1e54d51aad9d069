//! What stops a step of a round, and what the runner makes of it: retry, resync, degrade, fail
//! or stand down quietly (`class`, `stands_down`), with the code and message a failure records.

use calsync_graph::{ErrorClass, GraphError};
use calsync_store::StoreError;

/// Why a step (a page fetched and applied, a store read, a series completed) did not finish.
#[derive(Debug)]
pub(crate) enum StepError {
    Graph(GraphError),
    Store(StoreError),
    Guard {
        code: &'static str,
        message: String,
    },
    Interrupted,
    /// This process does not hold the tuple's mailbox lease (any more): stand down quietly.
    LeaseLost,
    /// The store names another user, calendar or window for this tuple than the round was
    /// started for (a reload changed it): the round is the old one's, and stands down.
    Superseded,
}

impl StepError {
    pub(crate) fn class(&self) -> Option<ErrorClass> {
        match self {
            StepError::Graph(e) => Some(e.class()),
            StepError::Store(e) if e.is_transient() => Some(ErrorClass::Retry),
            StepError::Store(StoreError::Fenced { .. }) => None,
            StepError::Store(StoreError::Conflict { .. }) => Some(ErrorClass::Degraded),
            StepError::Store(_) => Some(ErrorClass::Permanent),
            StepError::Guard { .. } => Some(ErrorClass::Degraded),
            StepError::Interrupted | StepError::LeaseLost | StepError::Superseded => None,
        }
    }

    /// A round that lost its lease, or was superseded by a new identity: not a failure of
    /// the tuple, and nothing is recorded over whoever owns it now.
    pub(crate) fn stands_down(&self) -> bool {
        matches!(
            self,
            StepError::LeaseLost
                | StepError::Superseded
                | StepError::Store(StoreError::Fenced { .. })
        )
    }

    pub(crate) fn code(&self) -> String {
        match self {
            StepError::Graph(e) => e.code().to_owned(),
            StepError::Store(e) => e.code().into(),
            StepError::Guard { code, .. } => (*code).into(),
            StepError::Interrupted => "Interrupted".into(),
            StepError::LeaseLost => "LeaseLost".into(),
            StepError::Superseded => "Superseded".into(),
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            StepError::Graph(e) => e.to_string(),
            StepError::Store(e) => e.to_string(),
            StepError::Guard { message, .. } => message.clone(),
            StepError::Interrupted => "interrupted by shutdown".into(),
            StepError::LeaseLost => "this process no longer holds the mailbox's lease".into(),
            StepError::Superseded => {
                "the tuple's user, calendar or window changed; the new round takes over".into()
            }
        }
    }
}
