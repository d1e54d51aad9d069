//! The page-loop guard: Graph has been seen to serve endless nextLinks and endless empty pages
//! (graph-delta-notes.md, quirks); a round that stops making progress is abandoned as degraded.

use crate::step_error::StepError;
use std::collections::HashSet;

/// Catches the service's infinite-nextLink and endless-empty-page behaviour.
#[derive(Debug)]
pub(crate) struct LoopGuard {
    pub(crate) seen: HashSet<String>,
    pub(crate) pages: u32,
    pub(crate) stale: u32,
    pub(crate) max_pages: u32,
    pub(crate) max_stale: u32,
}

impl LoopGuard {
    pub(crate) fn record<'a>(
        &mut self,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<(), StepError> {
        self.pages += 1;
        let mut fresh = 0;
        for id in ids {
            if !self.seen.contains(id) {
                self.seen.insert(id.to_owned());
                fresh += 1;
            }
        }
        self.stale = if fresh == 0 { self.stale + 1 } else { 0 };
        if self.pages > self.max_pages {
            return Err(StepError::Guard {
                code: "PageBudgetExceeded",
                message: format!(
                    "round abandoned after {} pages without a deltaLink",
                    self.max_pages
                ),
            });
        }
        if self.stale > self.max_stale {
            return Err(StepError::Guard {
                code: "RepeatedPages",
                message: format!(
                    "round abandoned after {} consecutive pages with no new items",
                    self.stale
                ),
            });
        }
        Ok(())
    }
}
