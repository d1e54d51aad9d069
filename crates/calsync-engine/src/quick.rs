//! The common round, quickly: a replayed delta link that answers an empty page with a new
//! delta link (at 100,000 calendars, 99% of rounds). It needs one request and one link commit,
//! and none of the full round's machinery: no span, no retry loop, no per-round cancellation
//! token, no boxed state machine. Anything else — a page with changes, a nextLink, an error,
//! a commit the store refused — is handed on to the full round (see [`crate::round`], which starts every round here) with the page
//! or error in hand, so nothing is fetched twice and every rule of the full round (retries,
//! Retry-After, resync, conflicts, fencing) applies as before.

use crate::outcome::Outcome;
use crate::step_error::StepError;
use crate::{Engine, Tuple};
use calsync_graph::{DeltaPage, GraphError, PageLink};
use calsync_store::{LinkKind, PageChanges, PageWrite, RoundStart, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// A replay's first answer, fetched by the quick lane, for the full round to go on from.
#[derive(Debug)]
pub(crate) struct Prefetched {
    /// The link that was replayed: the full round uses the answer only for this link.
    pub(crate) link: String,
    /// The page, or the error Graph answered (already counted, its Retry-After already held).
    pub(crate) page: Result<DeltaPage, GraphError>,
}

/// How a quick round ended.
#[derive(Debug)]
pub(crate) enum Quick {
    /// The round ended here: nothing changed and the new link is committed, or the commit
    /// was fenced off (the lease moved on) and the round stood down.
    Done(Outcome),
    /// Shutdown came while it waited.
    Interrupted,
    /// A full round is needed, from this answer if one was fetched.
    Slow(Option<Prefetched>),
}

/// No changes, for a link-only commit.
static NO_CHANGES: std::sync::LazyLock<PageChanges> =
    std::sync::LazyLock::new(PageChanges::default);

impl Engine {
    /// Replays `tuple`'s saved delta link and, if the answer is an empty page ending in a
    /// delta link, commits that link. Only for a tuple whose cursor is known (its last round
    /// ended here), due no full resync, whose mailbox lease is held.
    pub(crate) async fn quick_round(&self, tuple: &Tuple, cancel: &CancellationToken) -> Quick {
        let Ok(fence) = self.fence_for(tuple) else {
            return Quick::Slow(None);
        };
        let Some((link, version)) = self.replayable(tuple) else {
            return Quick::Slow(None);
        };
        // A mailbox held for a Retry-After waits in the full round, where the wait can be
        // cancelled as stuck.
        if self.inner.gate.deferred(&tuple.mailbox) {
            return Quick::Slow(None);
        }
        let started = std::time::Instant::now();
        self.round_started(tuple, None);
        let graph = self.graph_for(tuple);
        let fetched = self
            .send(
                tuple,
                cancel,
                graph.fetch_delta(&link, self.mailbox_hold(tuple)),
            )
            .await;
        let page = match fetched {
            Ok(page) => page,
            Err(StepError::Graph(e)) => {
                self.round_ended(&tuple.key);
                return Quick::Slow(Some(Prefetched { link, page: Err(e) }));
            }
            Err(_) => {
                self.round_ended(&tuple.key);
                return Quick::Interrupted;
            }
        };
        let next = match &page.link {
            PageLink::Delta(next)
                if page.items.is_empty()
                    && page.skipped == 0
                    && graph.allows_link(next).is_ok() =>
            {
                next
            }
            _ => {
                self.round_ended(&tuple.key);
                return Quick::Slow(Some(Prefetched {
                    link,
                    page: Ok(page),
                }));
            }
        };
        let stamp = tuple.stamp();
        let write = PageWrite {
            tuple_id: tuple.id,
            expected_version: version,
            round_start: Some(RoundStart::Delta),
            changes: &NO_CHANGES,
            link: next,
            link_kind: LinkKind::Delta,
            stamp: &stamp,
            fence,
        };
        let applied = self.store().apply_page(&write).await;
        self.round_ended(&tuple.key);
        let applied = match applied {
            Ok(applied) => applied,
            Err(e @ StoreError::Fenced { .. }) => {
                // Another process holds the mailbox now: stand down as the full round does,
                // even if the task is being stopped for the same reason meanwhile. The
                // cursor goes too: the other process moves the link, and a round after the
                // mailbox comes back must start from the database (issue 23).
                self.drop_cursor(tuple.id);
                let outcome = self.stood_down(tuple, &StepError::Store(e));
                self.round_counted(&outcome, started);
                return Quick::Done(outcome);
            }
            Err(_) => {
                // The full round commits the page in hand with its retries, and tells a
                // conflict from a database in trouble.
                return Quick::Slow(Some(Prefetched {
                    link,
                    page: Ok(page),
                }));
            }
        };
        self.replayed(tuple, next, applied.version);
        self.malformed_run(tuple, false);
        self.hot_metrics().pages_applied.increment(1);
        // One page fetched and committed, nothing in it.
        let outcome = Outcome::Synced(crate::outcome::RoundReport {
            pages: 1,
            ..Default::default()
        });
        self.round_counted(&outcome, started);
        debug!(tuple = %tuple.key, pages = 1, "round complete, nothing changed");
        Quick::Done(outcome)
    }
}
