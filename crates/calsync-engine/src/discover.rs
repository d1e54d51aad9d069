//! Discovery: the calendars a few source lines name, resolved against the directory. A source
//! lists mailboxes (the tenant's users with an optional `$filter`, a group's transitive members,
//! or the rooms), picks calendars of each (the default one, all, or those whose name matches),
//! and gives them a window and a cadence. Its tuples are keyed `source:address/calendar`, so a
//! renamed calendar keeps its tuple and `status` shows where each came from.
//!
//! Graph refuses some mailboxes (404 `MailboxNotEnabledForRESTAPI`: no Exchange Online licence,
//! a guest, on-premises; 403 where an application access policy excludes it). Users the
//! directory gives no mail address are skipped without a request; a mailbox whose calendars
//! Graph refused is remembered and asked again only after `refused_recheck`, never hammered.

use crate::cron::CronSchedule;
use crate::window::WindowSpec;
use crate::{Engine, TupleConfig};
use calsync_graph::{CalendarInfo, CalendarRef, GraphError, Principal};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which mailboxes a source lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// The tenant's users (`/users`), narrowed by an OData `$filter`.
    Users {
        /// e.g. `accountEnabled eq true and department eq 'Sales'`.
        filter: Option<String>,
    },
    /// A group's transitive user members.
    Group(String),
    /// The tenant's rooms (`/places/microsoft.graph.room`).
    Rooms,
}

/// Which calendars of each mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalendarPick {
    /// The default calendar (no request to list them).
    Default,
    /// Every calendar the mailbox has.
    All,
    /// Calendars whose name matches, case-insensitively; `*` matches any run of characters.
    Named(String),
}

impl CalendarPick {
    fn takes(&self, c: &CalendarInfo) -> bool {
        match self {
            CalendarPick::Default => c.is_default,
            CalendarPick::All => true,
            CalendarPick::Named(p) => glob(&p.to_lowercase(), &c.name.to_lowercase()),
        }
    }
}

/// `*`-only glob.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// One `[[sources]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its name: the prefix of its tuples' keys.
    pub name: String,
    /// Which mailboxes.
    pub members: Members,
    /// Which calendars of each.
    pub calendars: CalendarPick,
    /// Mailboxes left out, by address or object id, lower-cased.
    pub exclude: HashSet<String>,
    /// The window of its calendars.
    pub window: WindowSpec,
    /// Their interval, if not `sync.interval`.
    pub interval: Option<Duration>,
    /// Their cron schedule, if any.
    pub schedule: Option<Arc<CronSchedule>>,
}

/// What a discovery pass found.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    /// The tuples, every source's, in key order.
    pub tuples: Vec<TupleConfig>,
    /// Per source: mailboxes listed, left out (excluded, no mail address), refused by Graph.
    pub counts: BTreeMap<String, SourceCounts>,
    /// Mailboxes Graph refused, this pass or remembered.
    pub refused: Vec<Refused>,
    /// Sources whose rolling window is empty at the pass's anchor (a fixed end the rolling
    /// start has passed): they give no tuples, and the caller keeps their last ones.
    pub empty_window: Vec<String>,
}

/// A mailbox whose calendars Graph refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its address, lower-cased.
    pub address: String,
    /// Graph's code (`ErrorAccessDenied`, `MailboxNotEnabledForRESTAPI`, ...).
    pub code: String,
    /// How long it has been refused without an answer between: a mailbox refused once (a
    /// mailbox move, a policy change) is not a mailbox gone.
    pub refused_for: Duration,
}

/// One source's share of a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceCounts {
    /// Mailboxes the source listed.
    pub listed: usize,
    /// Left out: excluded, or no mail address.
    pub skipped: usize,
    /// Refused by Graph (now or remembered).
    pub refused: usize,
    /// Tuples it gives.
    pub tuples: usize,
}

/// Mailboxes Graph refused, each with when it may be asked again.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Address → (asked again after, Graph's code, refused since).
    until: Mutex<HashMap<String, (Instant, String, Instant)>>,
}

impl Refusals {
    fn held(&self, address: &str, now: Instant) -> Option<(String, Instant)> {
        let map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        map.get(address)
            .filter(|(until, _, _)| now < *until)
            .map(|(_, code, since)| (code.clone(), *since))
    }

    /// Records a refusal; answers since when the mailbox is refused (its first refusal with
    /// no answer between).
    fn record(&self, address: &str, code: &str, until: Instant) -> Instant {
        let mut map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let since = map
            .get(address)
            .map_or_else(Instant::now, |(_, _, since)| *since);
        map.insert(address.to_owned(), (until, code.to_owned(), since));
        since
    }

    fn clear(&self, address: &str) {
        self.until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(address);
    }
}

/// Calendar listings under way at once in a pass (each through the request gate).
const LISTINGS_IN_FLIGHT: usize = 8;

/// Whether Graph's answer means "this mailbox has no calendars for us" (as opposed to a
/// transient error, which fails the pass so nothing is dropped on a bad minute).
fn refusal(e: &GraphError) -> Option<&str> {
    match e {
        GraphError::NotFound { code, .. } | GraphError::Forbidden { code, .. } => Some(code),
        _ => None,
    }
}

impl Engine {
    /// [`Directory::discover`] with this engine's client, gate and remembered refusals.
    pub async fn discover(
        &self,
        sources: &[Source],
        anchor: DateTime<Utc>,
        refused_recheck: Duration,
    ) -> Result<Discovered, GraphError> {
        let d = Directory {
            graph: self.graph(),
            gate: &self.inner.gate,
            backoff: (self.settings().min_backoff, self.settings().max_backoff),
        };
        d.discover(sources, anchor, &self.inner.refusals, refused_recheck)
            .await
    }
}

/// What a discovery pass reads the directory with: the Graph client and the request gate its
/// per-mailbox calendar listings pass (a dry run builds its own; the daemon uses its engine's).
#[derive(Debug, Clone, Copy)]
pub struct Directory<'a> {
    /// The client.
    pub graph: &'a calsync_graph::GraphClient,
    /// The gate.
    pub gate: &'a crate::RequestGate,
    /// Backoff between retries of a listing: (first, largest).
    pub backoff: (Duration, Duration),
}

impl Directory<'_> {
    /// Resolves `sources` against the directory: their tuples at `anchor`'s windows. A
    /// transient failure (throttled, unreachable) fails the whole pass, so the caller keeps
    /// what it had; a refused mailbox is left out and remembered in `refusals` for
    /// `refused_recheck`.
    pub async fn discover(
        &self,
        sources: &[Source],
        anchor: DateTime<Utc>,
        refusals: &Refusals,
        refused_recheck: Duration,
    ) -> Result<Discovered, GraphError> {
        let mut out = Discovered::default();
        let mut refused_seen = BTreeMap::new();
        for s in sources {
            let graph = self.graph;
            let listed = match &s.members {
                Members::Users { filter } => graph.list_users(filter.as_deref()).await?,
                Members::Group(g) => graph.list_group_users(g).await?,
                Members::Rooms => graph.list_rooms().await?,
            };
            let mut counts = SourceCounts {
                listed: listed.len(),
                ..SourceCounts::default()
            };
            let Some(window) = s.window.at(anchor) else {
                out.empty_window.push(s.name.clone());
                continue;
            };
            let rolling = s.window.is_rolling().then_some(s.window);
            let wanted: Vec<Principal> = listed
                .into_iter()
                .filter(|p| {
                    let keep = p.has_mail
                        && !s.exclude.contains(&p.address.to_lowercase())
                        && !s.exclude.contains(&p.id.to_lowercase());
                    if !keep {
                        counts.skipped += 1;
                    }
                    keep
                })
                .collect();
            let tuple = |p: &Principal, calendar: CalendarRef| {
                let cal = match &calendar {
                    CalendarRef::Default => "default".to_owned(),
                    CalendarRef::Id(id) => id.clone(),
                };
                TupleConfig {
                    key: format!("{}:{}/{cal}", s.name, p.address.to_lowercase()),
                    user: p.address.clone(),
                    account: None,
                    calendar,
                    window,
                    rolling,
                    interval: s.interval,
                    schedule: s.schedule.clone(),
                }
            };
            if s.calendars == CalendarPick::Default {
                for p in &wanted {
                    out.tuples.push(tuple(p, CalendarRef::Default));
                    counts.tuples += 1;
                }
                out.counts.insert(s.name.clone(), counts);
                continue;
            }
            let now = Instant::now();
            let mut asked = Vec::new();
            for p in &wanted {
                let key = p.address.to_lowercase();
                match refusals.held(&key, now) {
                    Some((code, since)) => {
                        counts.refused += 1;
                        refused_seen.insert(key, (code, since));
                    }
                    None => asked.push(p.clone()),
                }
            }
            let listings: Vec<(Principal, Result<Vec<CalendarInfo>, GraphError>)> =
                futures_util::stream::iter(asked)
                    .map(|p| async move {
                        let r = self.directory_request(&p.address).await;
                        (p, r)
                    })
                    .buffered(LISTINGS_IN_FLIGHT)
                    .collect()
                    .await;
            for (p, listing) in listings {
                let key = p.address.to_lowercase();
                match listing {
                    Ok(cals) => {
                        refusals.clear(&key);
                        for c in cals.iter().filter(|c| s.calendars.takes(c)) {
                            let calendar = if c.is_default {
                                CalendarRef::Default
                            } else {
                                CalendarRef::Id(c.id.clone())
                            };
                            out.tuples.push(tuple(&p, calendar));
                            counts.tuples += 1;
                        }
                    }
                    Err(e) => match refusal(&e) {
                        Some(code) => {
                            tracing::info!(mailbox = %p.address, code, recheck_secs = refused_recheck.as_secs(),
                                           "graph refuses this mailbox's calendars; asking again later");
                            let since =
                                refusals.record(&key, code, Instant::now() + refused_recheck);
                            counts.refused += 1;
                            refused_seen.insert(key, (code.to_owned(), since));
                        }
                        None => return Err(e),
                    },
                }
            }
            out.counts.insert(s.name.clone(), counts);
        }
        out.tuples.sort_by(|a, b| a.key.cmp(&b.key));
        out.tuples.dedup_by(|a, b| a.key == b.key);
        out.refused = refused_seen
            .into_iter()
            .map(|(address, (code, since))| Refused {
                address,
                code,
                refused_for: since.elapsed(),
            })
            .collect();
        Ok(out)
    }

    /// Lists a mailbox's calendars through the request gate (its mailbox slots, any
    /// `Retry-After`, the global limit), retrying what is retryable a few times.
    async fn directory_request(&self, address: &str) -> Result<Vec<CalendarInfo>, GraphError> {
        let mailbox = address.to_ascii_lowercase();
        let gate = self.gate;
        let mut attempt = 0u32;
        loop {
            let permit = gate.acquire(&mailbox).await;
            let r = self.graph.list_calendars(address).await;
            match &r {
                Ok(_) => {
                    drop(permit);
                    gate.succeeded();
                    return r;
                }
                Err(e) => {
                    if let Some(wait) = e.retry_after() {
                        gate.defer(&mailbox, wait);
                    }
                    drop(permit);
                    if e.is_throttle() {
                        gate.throttled(&mailbox);
                    }
                    attempt += 1;
                    if e.class() != calsync_graph::ErrorClass::Retry || attempt >= 4 {
                        return r;
                    }
                    let backoff = self.backoff.0 * 2u32.pow(attempt);
                    tokio::time::sleep(backoff.min(self.backoff.1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_names_match_a_star_glob_case_insensitively() {
        for (p, t, want) in [
            ("team", "Team", true),
            ("team*", "Team Berlin", true),
            ("*berlin", "Team Berlin", true),
            ("t*m*n", "Team Berlin", true),
            ("t*x*n", "Team Berlin", false),
            ("*", "", true),
            ("team", "Teams", false),
            ("a*a", "a", false),
        ] {
            let c = CalendarInfo {
                id: "x".into(),
                name: t.into(),
                is_default: false,
            };
            assert_eq!(CalendarPick::Named(p.into()).takes(&c), want, "{p} {t}");
        }
    }
}
