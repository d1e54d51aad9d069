//! Series as Outlook serves them (graph-delta-notes.md 1.7a): occurrences arrive as bare stubs,
//! masters arrive instead of series data on every occurrence, and an occurrence that stops
//! existing is never reported. Before a page commits, this completes it:
//!
//! - **Hydration.** An occurrence stub whose master is neither in the page nor stored gets its
//!   master fetched, once per series, calendar-scoped (`…/calendars/{c}/events/{id}`: the
//!   mailbox-wide path 404s for shared calendars, OpenWhispr #1835). A 404 means the series is
//!   gone: its stubs are dropped and its stored instances removed.
//! - **Reconciliation.** A master listed in an incremental round means the series changed; its
//!   instances in the window are listed (`/instances`, paged) and the stored occurrences of that
//!   series that are no longer listed leave, in the page's transaction. A full round needs none:
//!   its sweep removes whatever it did not list.
//!
//! Every request goes through the request gate like a delta page, a few at once
//! (`Engine::send_all`: after a failure none starts and those in flight are awaited, so no
//! `Retry-After` goes unread). A failed request fails the page's step, which is retried as a whole (backoff, then the next run): a stub is never
//! committed without its series, and a change is never committed half-reconciled.

use crate::Engine;
use crate::Tuple;
use crate::step_error::StepError;
use calsync_graph::{Connection, ViewWindow};
use calsync_store::{PageChanges, SeriesInstances};
use std::collections::BTreeSet;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Series fetched at once for one page (the gate still holds each mailbox to its limit).
const PARALLEL: usize = 4;

/// Pages of `/instances` one series may take before the list is taken as broken.
const MAX_INSTANCE_PAGES: usize = 1000;

/// The series whose occurrence stubs in `changes` have no master in the page.
pub(crate) fn masters_to_fetch(changes: &PageChanges) -> BTreeSet<String> {
    let listed: BTreeSet<&str> = changes
        .series
        .iter()
        .map(|s| s.master_id.as_str())
        .collect();
    changes
        .full
        .iter()
        .chain(&changes.partial)
        .filter(|r| r.partial && r.details.subject.is_none())
        .filter_map(|r| r.series_master_id.as_deref())
        .filter(|m| !listed.contains(m))
        .map(str::to_owned)
        .collect()
}

/// Drops every row of series `master` from the page and marks the series removed.
fn drop_series(changes: &mut PageChanges, master: &str) {
    let of = |r: &calsync_store::EventRow| r.series_master_id.as_deref() == Some(master);
    changes.full.retain(|r| !of(r));
    changes.partial.retain(|r| !of(r));
    changes.series.retain(|s| s.master_id != master);
    changes.reconcile.retain(|s| s.master_id != master);
    if !changes.removed.iter().any(|id| id == master) {
        changes.removed.push(master.to_owned());
    }
}

impl Engine {
    /// Hydrates the page's occurrence stubs and, in an incremental round, reconciles the series
    /// it lists (see the module docs).
    pub(crate) async fn complete_series(
        &self,
        tuple: &Tuple,
        changes: &mut PageChanges,
        round_is_full: bool,
        cancel: &CancellationToken,
    ) -> Result<(), StepError> {
        let wanted: Vec<String> = masters_to_fetch(changes).into_iter().collect();
        let missing: Vec<String> = if wanted.is_empty() {
            Vec::new()
        } else {
            let known = self
                .store()
                .known_series(tuple.id, &wanted)
                .await
                .map_err(StepError::Store)?;
            wanted.into_iter().filter(|m| !known.contains(m)).collect()
        };
        if !missing.is_empty() {
            debug!(tuple = %tuple.key, series = missing.len(), "fetching series masters for occurrence stubs");
            let fetched: Vec<(String, Option<calsync_graph::EventItem>)> = self
                .send_all(missing, PARALLEL, |master, stood_down| async move {
                    metrics::counter!("calsync_series_requests_total", "kind" => "master")
                        .increment(1);
                    let got = self
                        .send_unless(
                            tuple,
                            cancel,
                            Some(&stood_down),
                            self.graph_for(tuple).get_event(
                                &tuple.user,
                                &tuple.calendar,
                                &master,
                                Connection::Reuse,
                            ),
                        )
                        .await?;
                    Ok((master, got))
                })
                .await?;
            for (master, got) in fetched {
                match got {
                    Some(m) if crate::mapping::is_master(&m) => {
                        changes.series.push(crate::mapping::series_row(m));
                    }
                    // Not a series (any more): its stubs cannot be completed from it.
                    Some(_) | None => drop_series(changes, &master),
                }
            }
        }
        if round_is_full {
            return Ok(());
        }
        let listed: Vec<String> = changes.series.iter().map(|s| s.master_id.clone()).collect();
        // One /instances read per changed series, a few at once like the master fetches (the
        // gate still holds the mailbox to its limits).
        let listings: Vec<(String, Option<Vec<String>>)> = self
            .send_all(listed, PARALLEL, |master, stood_down| async move {
                let live = self
                    .list_instances(tuple, &master, cancel, &stood_down)
                    .await?;
                Ok((master, live))
            })
            .await?;
        for (master, live) in listings {
            match live {
                Some(live) => changes.reconcile.push(SeriesInstances {
                    master_id: master,
                    live,
                }),
                None => drop_series(changes, &master),
            }
        }
        Ok(())
    }

    /// The ids of a series' instances in the tuple's window; `None` if the series is gone.
    async fn list_instances(
        &self,
        tuple: &Tuple,
        master: &str,
        cancel: &CancellationToken,
        stood_down: &CancellationToken,
    ) -> Result<Option<Vec<String>>, StepError> {
        let graph = self.graph_for(tuple);
        let window: &ViewWindow = &tuple.window;
        let mut link = graph.instances_link(&tuple.user, &tuple.calendar, master, window);
        let mut live = Vec::new();
        for _ in 0..MAX_INSTANCE_PAGES {
            metrics::counter!("calsync_series_requests_total", "kind" => "instances").increment(1);
            let page = self
                .send_unless(
                    tuple,
                    cancel,
                    Some(stood_down),
                    graph.fetch_list(&link, Connection::Reuse),
                )
                .await?;
            let Some(page) = page else {
                return Ok(None);
            };
            live.extend(page.items.into_iter().map(|i| i.id));
            match page.next {
                Some(next) => link = next,
                None => return Ok(Some(live)),
            }
        }
        Err(StepError::Guard {
            code: "InstancePageBudgetExceeded",
            message: format!(
                "the instances of series {master} took more than {MAX_INSTANCE_PAGES} pages"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::page_changes;
    use calsync_graph::parse_page;

    #[test]
    fn only_stubs_whose_master_is_not_in_the_page_need_one() {
        let page = parse_page(br#"{"@odata.deltaLink":"d","value":[
            {"id":"m1","type":"seriesMaster","subject":"listed"},
            {"id":"o1","type":"occurrence","seriesMasterId":"m1","start":{"dateTime":"2026-01-05T09:00:00.0000000","timeZone":"UTC"}},
            {"id":"o2","type":"occurrence","seriesMasterId":"m2","start":{"dateTime":"2026-01-05T09:00:00.0000000","timeZone":"UTC"}},
            {"id":"o3","type":"occurrence","seriesMasterId":"m2"},
            {"id":"x1","type":"exception","seriesMasterId":"m3","subject":"in full"},
            {"id":"o4","type":"occurrence","seriesMasterId":"m4","subject":"documented: in full"}
        ]}"#).unwrap();
        let mut c = page_changes(page.items);
        assert_eq!(masters_to_fetch(&c), BTreeSet::from(["m2".to_owned()]));
        drop_series(&mut c, "m2");
        assert!(masters_to_fetch(&c).is_empty());
        assert_eq!(c.removed, vec!["m2"]);
        let left: Vec<&str> = c
            .full
            .iter()
            .chain(&c.partial)
            .map(|r| r.event_id.as_str())
            .collect();
        assert!(!left.contains(&"o2") && !left.contains(&"o3"));
        assert!(left.contains(&"o1") && left.contains(&"x1") && left.contains(&"o4"));
    }
}
