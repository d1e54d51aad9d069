//! How a round that did not end well is told: a stand-down said and counted but recorded over
//! nobody, a failure recorded under the fence (`retrying`, `degraded`, `failed`), a panic turned
//! into a failure, a malformed page counted towards degrading, and a link forgotten so the next
//! round starts full.

use crate::outcome::{Failure, Health, Outcome, panic_message};
use crate::step_error::StepError;
use crate::{Engine, Tuple};
use calsync_graph::{ErrorClass, GraphError};
use calsync_store::{StoreError, TupleStatus};
use tracing::{info, warn};

/// Runs in a row that end on a malformed page before the tuple is marked degraded.
pub(crate) const MALFORMED_RUNS_BEFORE_DEGRADED: u32 = 5;

impl Engine {
    /// A round that lost its lease or was superseded: said once, counted, nothing recorded
    /// over whoever owns the tuple now.
    pub(crate) fn stood_down(&self, tuple: &Tuple, e: &StepError) -> Outcome {
        info!(tuple = %tuple.key, code = %e.code(), "this round stands down: {}", e.message());
        metrics::counter!("calsync_rounds_stood_down_total", "reason" => if matches!(e, StepError::Superseded) { "superseded" } else { "lease_lost" }).increment(1);
        Outcome::Failed(Failure {
            health: Health::Retrying,
            code: e.code(),
            message: e.message(),
        })
    }

    pub(crate) async fn forget_link(&self, tuple: &Tuple) -> Result<(), StepError> {
        self.drop_cursor(tuple.id);
        let fence = self.fence_for(tuple)?;
        let store = self.store();
        let state = store.load(tuple.id).await.map_err(StepError::Store)?;
        store
            .forget_link(tuple.id, state.link_version, fence)
            .await
            .map_err(StepError::Store)?;
        Ok(())
    }

    /// The fencing token to commit `tuple`'s pages with: `None` for an engine outside leases,
    /// `LeaseLost` for a fenced one that does not hold the mailbox now.
    pub(crate) fn fence_for(&self, tuple: &Tuple) -> Result<Option<i64>, StepError> {
        match self.leases() {
            None => Ok(None),
            Some(l) => l
                .fence(&tuple.mailbox)
                .map(Some)
                .ok_or(StepError::LeaseLost),
        }
    }

    /// Records a failure unless this process lost the tuple's lease (then the owner's status
    /// stands).
    pub(crate) async fn record(
        &self,
        tuple: &Tuple,
        status: TupleStatus,
        code: &str,
        message: &str,
    ) {
        let Ok(fence) = self.fence_for(tuple) else {
            return;
        };
        if let Err(se) = self
            .store()
            .record_failure(tuple.id, status, code, message, fence)
            .await
        {
            warn!(tuple = %tuple.key, error = %se, "could not record the failure");
        }
    }

    pub(crate) async fn panicked(
        &self,
        tuple: &Tuple,
        panic: Box<dyn std::any::Any + Send>,
    ) -> Outcome {
        let what = panic_message(panic.as_ref());
        self.drop_cursor(tuple.id);
        let failure = Failure::panic(format!("round of tuple {} panicked: {what}", tuple.key));
        tracing::error!(tuple = %tuple.key, error = %failure.message, "round panicked (a bug: please report it)");
        self.record(tuple, TupleStatus::Failed, &failure.code, &failure.message)
            .await;
        Outcome::Failed(failure)
    }

    /// Counts a run that ended on a malformed page (or clears the count); returns how many in
    /// a row.
    pub(crate) fn malformed_run(&self, tuple: &Tuple, malformed: bool) -> u32 {
        let mut runs = self
            .inner
            .malformed_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if malformed {
            let n = runs.entry(tuple.id).or_default();
            *n += 1;
            *n
        } else {
            runs.remove(&tuple.id);
            0
        }
    }

    pub(crate) async fn fail(&self, tuple: &Tuple, e: &StepError) -> Outcome {
        let mut health = match e.class() {
            Some(ErrorClass::Permanent) => Health::Failed,
            Some(ErrorClass::Degraded) => Health::Degraded,
            _ => Health::Retrying,
        };
        // A page that is malformed every time (a body Graph keeps cutting short, a link that
        // always answers garbage) is not retried at the fast cadence forever: after
        // MALFORMED_RUNS_BEFORE_DEGRADED runs the tuple is degraded and starts afresh later.
        let malformed = matches!(e, StepError::Graph(GraphError::Malformed { .. }));
        if self.malformed_run(tuple, malformed) >= MALFORMED_RUNS_BEFORE_DEGRADED {
            self.malformed_run(tuple, false);
            health = Health::Degraded;
        }
        let failure = Failure {
            health,
            code: e.code(),
            message: e.message(),
        };
        if matches!(e, StepError::Store(StoreError::Bug { .. })) {
            // Our SQL does not fit the database: a bug or a schema changed behind our back.
            tracing::error!(tuple = %tuple.key, code = %failure.code, error = %failure.message, "calsync's SQL was refused by the database (a bug: please report it)");
        } else {
            warn!(tuple = %tuple.key, state = health.as_str(), code = %failure.code, error = %failure.message, "round failed");
        }
        // A degraded round's saved link leads back into the loop, and a link Graph refused
        // for good would be refused again: the next attempt starts a full round instead.
        if health == Health::Degraded
            || (health == Health::Failed && matches!(e, StepError::Graph(_)))
        {
            let _ = self.forget_link(tuple).await;
        }
        self.record(tuple, health.status(), &failure.code, &failure.message)
            .await;
        Outcome::Failed(failure)
    }
}
