//! The one round runner: [`Engine::run_round`] is how every round starts (the scheduler,
//! `sync_all_once`, and a wake-up). It tries the quick lane first (`quick.rs`: a replay
//! that finds nothing is one request and one link commit) and goes on in the full round from
//! the answer in hand. The full round is the one place that owns retries, resyncs, loop guards
//! and the status a tuple is left in.

use crate::cursor::Cursor;
use crate::guard::LoopGuard;
use crate::mapping::page_changes;
use crate::outcome::{Failure, Health, Outcome, RoundReport};
use crate::quick::{Prefetched, Quick};
use crate::step_error::StepError;
use crate::{Engine, Tuple};
use calsync_graph::{Connection, ErrorClass, GraphError, PageLink};
use calsync_store::{LinkKind, PageWrite, RoundStart, StoreError, TupleStatus};
use futures_util::FutureExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// Asks a round to stop at its next page boundary (the page in hand is fetched and committed,
/// no further one is started): a reload moved the tuple, its lease is being handed over. The
/// scheduler's per-task control answers it without a token per round.
pub trait SoftStop: Send + Sync {
    /// Whether the round should stop at its next page boundary.
    fn stop_requested(&self) -> bool;
}

impl SoftStop for CancellationToken {
    fn stop_requested(&self) -> bool {
        self.is_cancelled()
    }
}

struct StepOut {
    next: PageLink,
    ids: Vec<String>,
    version: i64,
    upserted: u64,
    removed: u64,
    swept: u64,
}

impl Engine {
    /// Runs one complete round for `tuple`: a replay that finds nothing ends in the quick lane;
    /// anything else (a change, a saved nextLink to resume, no link, an error) goes on in the
    /// full round, retrying what is retryable and restarting with a full round when Graph
    /// dropped the delta state. Leaves the tuple's status in the store. `cancel` stops at once
    /// (shutdown); `soft` at the next page boundary. Every log line of a full round carries
    /// the tuple's key, user, calendar and window.
    pub async fn run_round(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&dyn SoftStop>,
    ) -> Outcome {
        match self.quick_round(tuple, cancel).await {
            Quick::Done(outcome) => outcome,
            Quick::Interrupted => Outcome::Interrupted,
            Quick::Slow(prefetched) => self.boxed_full_round(tuple, cancel, soft, prefetched).await,
        }
    }

    /// The full round as a boxed future, built outside `run_round`'s own state machine, as
    /// `boxed_round` was outside the tuple task's: a full round's future is kilobytes, and a
    /// `Box::pin(..)` written inline may still get room reserved for the unboxed future in the
    /// caller's state, which every no-change round would then allocate and move.
    fn boxed_full_round<'a>(
        &'a self,
        tuple: &'a Tuple,
        cancel: &'a CancellationToken,
        soft: Option<&'a dyn SoftStop>,
        prefetched: Option<Prefetched>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(self.full_round(tuple, cancel, soft, prefetched))
    }

    /// The full round, going on from the quick lane's first answer if it fetched one.
    async fn full_round(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&dyn SoftStop>,
        prefetched: Option<Prefetched>,
    ) -> Outcome {
        let span = info_span!(
            "tuple",
            tuple = %tuple.key,
            user = %tuple.user,
            calendar = %tuple.calendar_name(),
            window = %tuple.window,
        );
        let started = std::time::Instant::now();
        // The round's own token: shutdown cancels it through `cancel`, and so does the stuck-round
        // check (`Engine::cancel_stuck_rounds`), for this round alone.
        let round_cancel = cancel.child_token();
        self.round_started(tuple, Some(round_cancel.clone()));
        // A panic is a bug, but it must not take the tuple's task (or `sync-once`'s report)
        // down with it: it becomes a failed round with its message, recorded like any other.
        let mut outcome = match std::panic::AssertUnwindSafe(
            self.sync_tuple_in_span(tuple, &round_cancel, soft, prefetched)
                .instrument(span.clone()),
        )
        .catch_unwind()
        .await
        {
            Ok(outcome) => outcome,
            Err(panic) => self.panicked(tuple, panic).instrument(span.clone()).await,
        };
        if outcome == Outcome::Interrupted && round_cancel.is_cancelled() && !cancel.is_cancelled()
        {
            // Not a shutdown: this round alone was cancelled as stuck. Its committed pages
            // stand; the tuple runs again at the fast cadence.
            let failure = Failure {
                health: Health::Retrying,
                code: "StuckRound".into(),
                message: "the round made no progress for sync.stuck_round_after and was cancelled"
                    .into(),
            };
            self.record(
                tuple,
                TupleStatus::Retrying,
                &failure.code,
                &failure.message,
            )
            .await;
            outcome = Outcome::Failed(failure);
        }
        self.round_ended(&tuple.key);
        self.round_counted(&outcome, started);
        outcome
    }

    async fn sync_tuple_in_span(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&dyn SoftStop>,
        mut prefetched: Option<Prefetched>,
    ) -> Outcome {
        let mut report = RoundReport::default();
        let mut conflict_retried = false;
        loop {
            let result = self
                .round(tuple, cancel, soft, &mut report, prefetched.take())
                .await;
            if result.is_err() {
                self.drop_cursor(tuple.id);
            }
            match result {
                Ok(()) => {
                    self.malformed_run(tuple, false);
                    // A round that changed nothing is the steady state: at 100,000 calendars it
                    // would be hundreds of INFO lines a second, so it logs at DEBUG.
                    if report.full || report.upserted + report.removed + report.swept > 0 {
                        info!(tuple = %tuple.key, pages = report.pages, upserted = report.upserted,
                              removed = report.removed, swept = report.swept, full = report.full, "round complete");
                    } else {
                        debug!(tuple = %tuple.key, pages = report.pages, "round complete, nothing changed");
                    }
                    return Outcome::Synced(report);
                }
                Err(StepError::Interrupted) => return Outcome::Interrupted,
                Err(e) if e.stands_down() => return self.stood_down(tuple, &e),
                Err(StepError::Store(StoreError::Conflict { .. })) if !conflict_retried => {
                    // Our idea of the tuple was stale (another writer, or a write whose answer
                    // was lost); the cursor is gone, so the round restarts from the store.
                    conflict_retried = true;
                }
                Err(StepError::Store(StoreError::Conflict { .. })) => {
                    // Another writer keeps advancing this tuple (a second process, sync-once
                    // beside run): it is doing the work. Step aside quietly — never forget its
                    // link, never mark the tuple degraded, record nothing over its status.
                    info!(tuple = %tuple.key, "another writer is syncing this tuple; this round stands down");
                    return Outcome::Failed(Failure {
                        health: Health::Retrying,
                        code: "Conflict".into(),
                        message: "another writer advanced this tuple; this round stood down".into(),
                    });
                }
                Err(e) if e.class() == Some(ErrorClass::Resync) && report.resyncs < 2 => {
                    warn!(tuple = %tuple.key, code = %e.code(), "delta state gone; starting a full round");
                    report.resyncs += 1;
                    if let Err(e) = self.forget_link(tuple).await {
                        return self.fail(tuple, &e).await;
                    }
                }
                Err(e) => return self.fail(tuple, &e).await,
            }
        }
    }

    async fn round(
        &self,
        tuple: &Tuple,
        cancel: &CancellationToken,
        soft: Option<&dyn SoftStop>,
        report: &mut RoundReport,
        prefetched: Option<Prefetched>,
    ) -> Result<(), StepError> {
        let settings = self.settings();
        // Nothing is fetched for a mailbox this process does not hold.
        self.fence_for(tuple)?;
        let stamp = tuple.stamp();
        let cached = self.cursor(tuple.id, &stamp);
        let cursor = match cached {
            Some(c) => c,
            None => {
                let state = self
                    .with_retries(cancel, || async {
                        self.store().load(tuple.id).await.map_err(StepError::Store)
                    })
                    .await?;
                if (
                    &state.user_id,
                    &state.calendar_id,
                    state.window_start,
                    state.window_end,
                ) != (
                    &stamp.user_id,
                    &stamp.calendar_id,
                    stamp.window_start,
                    stamp.window_end,
                ) {
                    return Err(StepError::Superseded);
                }
                Cursor::from_state(&state, &stamp)
            }
        };
        let resync_due = self.resync_due(cursor.last_full_sync_at);
        let initial = || {
            self.graph_for(tuple)
                .initial_link(&tuple.user, &tuple.calendar, &tuple.window)
        };
        // A link made for the app's tokens does not serve an account's, nor the reverse.
        let saved = cursor
            .link
            .clone()
            .filter(|l| self.graph_for(tuple).link_fits(l));
        let (mut link, mut start) = match (cursor.kind, saved) {
            (Some(LinkKind::Next), Some(l)) => (l, None),
            (Some(LinkKind::Delta), Some(_)) if resync_due => (initial(), Some(RoundStart::Full)),
            (Some(LinkKind::Delta), Some(l)) => (l, Some(RoundStart::Delta)),
            _ => (initial(), Some(RoundStart::Full)),
        };
        report.full = start == Some(RoundStart::Full) || (start.is_none() && cursor.round_is_full);
        let mut round_is_full = report.full;
        let mut last_full_sync_at = cursor.last_full_sync_at;
        debug!(tuple = %tuple.key, resume = start.is_none(), full = report.full, "round starts");
        let mut version = cursor.version;
        // The quick lane's answer stands for the first request if it replayed this link.
        let first = std::sync::Mutex::new(
            prefetched
                .filter(|p| start == Some(RoundStart::Delta) && p.link == link)
                .map(|p| p.page),
        );
        let mut guard = LoopGuard {
            seen: HashSet::new(),
            pages: 0,
            stale: 0,
            max_pages: settings.max_pages_per_round,
            max_stale: settings.max_stale_pages,
        };
        loop {
            // A page boundary: everything before it is committed.
            if cancel.is_cancelled() || soft.is_some_and(|s| s.stop_requested()) {
                return Err(StepError::Interrupted);
            }
            // After a 503 or a broken connection the retry goes out on a new connection.
            let fresh = AtomicBool::new(false);
            let out = self
                .with_retries(cancel, || async {
                    let connection = if fresh.load(Ordering::Relaxed) {
                        Connection::Fresh
                    } else {
                        Connection::Reuse
                    };
                    let answer = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let r = self
                        .step(
                            tuple,
                            &link,
                            start,
                            round_is_full,
                            version,
                            &stamp,
                            cancel,
                            connection,
                            answer,
                        )
                        .await;
                    if let Err(StepError::Graph(e)) = &r {
                        fresh.store(e.wants_fresh_connection(), Ordering::Relaxed);
                    }
                    match &r {
                        Ok(_) => self.hot_metrics().pages_applied.increment(1),
                        Err(e) => {
                            let outcome = match e {
                                StepError::Interrupted => "interrupted",
                                _ => "failed",
                            };
                            metrics::counter!("calsync_pages_total", "outcome" => outcome)
                                .increment(1)
                        }
                    }
                    r
                })
                .await?;
            report.pages += 1;
            report.upserted += out.upserted;
            report.removed += out.removed;
            report.swept += out.swept;
            version = out.version;
            if start == Some(RoundStart::Delta) {
                round_is_full = false;
            }
            start = None;
            let (kind, saved) = match &out.next {
                PageLink::Next(l) => (LinkKind::Next, l.clone()),
                PageLink::Delta(l) => (LinkKind::Delta, l.clone()),
            };
            if kind == LinkKind::Delta && round_is_full {
                last_full_sync_at = Some(chrono::Utc::now());
            }
            self.keep_cursor(
                tuple.id,
                Cursor {
                    link: Some(saved),
                    kind: Some(kind),
                    stamp: crate::cursor::stamp_hash(&stamp),
                    version,
                    round_is_full,
                    last_full_sync_at,
                },
            );
            match out.next {
                PageLink::Delta(_) => return Ok(()),
                PageLink::Next(next) => {
                    guard.record(out.ids.iter().map(String::as_str))?;
                    link = next;
                }
            }
        }
    }

    /// Fetches one page and applies it with the link after it.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        tuple: &Tuple,
        link: &str,
        start: Option<RoundStart>,
        round_is_full: bool,
        version: i64,
        stamp: &calsync_store::LinkStamp,
        cancel: &CancellationToken,
        connection: Connection,
        answer: Option<Result<calsync_graph::DeltaPage, GraphError>>,
    ) -> Result<StepOut, StepError> {
        let graph = self.graph_for(tuple);
        // A replayed delta link (most rounds, and most of them change nothing) may share a
        // JSON batch with the other replays due now; its retries go alone.
        let page = if let Some(answer) = answer {
            // Fetched by the quick lane, through the gate, counted there.
            answer.map_err(StepError::Graph)?
        } else if start == Some(RoundStart::Delta) && connection == Connection::Reuse {
            self.send(
                tuple,
                cancel,
                graph.fetch_delta(link, self.mailbox_hold(tuple)),
            )
            .await?
        } else {
            self.send(tuple, cancel, graph.fetch_page(link, connection))
                .await?
        };
        let (kind, next) = match &page.link {
            PageLink::Next(l) => (LinkKind::Next, l.clone()),
            PageLink::Delta(l) => (LinkKind::Delta, l.clone()),
        };
        // A link we would not follow is never saved either.
        graph.allows_link(&next).map_err(StepError::Graph)?;
        if page.skipped > 0 {
            warn!(tuple = %tuple.key, items = page.skipped, "items without an id were left out of a page");
            metrics::counter!("calsync_items_incomplete_total", "reason" => "no_id")
                .increment(u64::from(page.skipped));
        }
        let ids: Vec<String> = page.items.iter().map(|i| i.id().to_owned()).collect();
        let link_after = page.link;
        let mut changes = page_changes(page.items);
        for r in changes.full.iter().chain(&changes.partial) {
            if let Some(why) = &r.time_error {
                // Kept (times empty, counted in calendar_sync_status), never guessed at, and
                // never a reason to hold back the rest of the page.
                warn!(tuple = %tuple.key, event = %r.event_id, error = %why, "an event's time could not be read");
                metrics::counter!("calsync_items_incomplete_total", "reason" => "time_zone")
                    .increment(1);
            }
        }
        self.complete_series(tuple, &mut changes, round_is_full, cancel)
            .await?;
        let write = PageWrite {
            tuple_id: tuple.id,
            expected_version: version,
            round_start: start,
            changes: &changes,
            link: &next,
            link_kind: kind,
            stamp,
            fence: None,
        };
        // A transient database error is retried with the page already in hand: fetching it
        // again would spend the mailbox's Graph budget on the database's trouble.
        let applied = self
            .with_retries(cancel, || async {
                // The lease is read at each attempt: one lost meanwhile stops the write here.
                let write = PageWrite {
                    fence: self.fence_for(tuple)?,
                    ..write
                };
                self.store()
                    .apply_page(&write)
                    .await
                    .map_err(StepError::Store)
            })
            .await?;
        if applied.quarantined > 0 {
            metrics::counter!("calsync_items_incomplete_total", "reason" => "quarantined")
                .increment(applied.quarantined);
        }
        Ok(StepOut {
            next: link_after,
            ids,
            version: applied.version,
            upserted: applied.upserted,
            removed: applied.removed,
            swept: applied.swept,
        })
    }
}
