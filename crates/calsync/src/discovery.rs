//! The discovery worker: resolves the config's `[[sources]]` every `discovery.every` (sooner
//! after a failed pass) and hands what it found to the schedule worker. A reload replaces its
//! plan, which drops a pass of the old sources under way and restarts the cadence. One
//! replica of a deployment runs the passes at a time (the `discovery` role in PostgreSQL),
//! and only one whose config is the deployment's: the others follow the generation it writes.

use crate::config::{Config, DiscoverySettings};
use crate::shared::ToSchedule;
use crate::worker::WorkerCtx;
use calsync_engine::{Engine, Rebase, Source};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

/// How soon a failed discovery pass is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

/// What the discovery and re-base workers follow: the config's sources and rolling-window
/// cadence, replaced by each reload.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The `[[sources]]` to resolve (none: no discovery).
    pub sources: Vec<Source>,
    /// `[discovery]`.
    pub discovery: DiscoverySettings,
    /// When rolling windows move.
    pub window_rebase: Rebase,
    /// When the next discovery pass is due.
    pub next_pass: tokio::time::Instant,
    /// The digest of the config the sources come from: a pass runs only while it is the
    /// deployment's.
    pub digest: String,
}

impl Plan {
    /// The plan of `cfg`, whose sources were resolved (or, `false`, not) just now.
    pub fn of(cfg: &Config, resolved: bool) -> Self {
        Plan {
            sources: cfg.sources.clone(),
            discovery: cfg.discovery,
            window_rebase: cfg.window_rebase,
            next_pass: tokio::time::Instant::now()
                + if resolved { cfg.discovery.every } else { RETRY },
            digest: cfg.digest.clone(),
        }
    }
}

/// Runs discovery passes until the plan's sender is gone (the service stopped).
pub async fn run(
    ctx: WorkerCtx,
    engine: Engine,
    mut plan: watch::Receiver<Plan>,
    schedule: mpsc::UnboundedSender<ToSchedule>,
    role_ttl: Duration,
) -> anyhow::Result<()> {
    let mut next_pass = plan.borrow_and_update().next_pass;
    let store = engine.store();
    // The holder keeps the role between passes, so the cadence is the deployment's, not each
    // replica's: another replica takes it only when this one is gone (or stale).
    let mut holding = false;
    let mut keep = tokio::time::interval(role_ttl / 4);
    keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ctx.idle();
        let current = plan.borrow().clone();
        let wait = async {
            if current.sources.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until(next_pass).await;
        };
        tokio::select! {
            _ = wait => {}
            changed = plan.changed() => {
                if changed.is_err() {
                    if holding {
                        let _ = store.release_role(crate::shared::ROLE_DISCOVERY).await;
                    }
                    return Ok(())
                }
                next_pass = plan.borrow_and_update().next_pass;
                continue;
            }
            _ = keep.tick(), if holding => {
                holding = store.hold_role(crate::shared::ROLE_DISCOVERY, role_ttl).await.unwrap_or(false);
                continue;
            }
        }
        ctx.busy();
        let based_on = match coordinate(store, &current, role_ttl).await {
            Some(g) => g,
            None => {
                holding = false;
                next_pass = tokio::time::Instant::now() + RETRY;
                continue;
            }
        };
        holding = true;
        let anchor = current.window_rebase.anchor(chrono::Utc::now());
        let pass = engine.discover(&current.sources, anchor, current.discovery.refused_recheck);
        tokio::pin!(pass);
        // The role is renewed while the pass runs (10,000 users take minutes); a replica that
        // loses it (a pause past its ttl) drops the pass: another one runs it.
        let mut renew = tokio::time::interval(role_ttl / 4);
        renew.tick().await;
        let found = loop {
            tokio::select! {
                found = &mut pass => break Some(found),
                // A reload replaced the sources: this pass's answer is for the old ones.
                changed = plan.changed() => {
                    if changed.is_err() { return Ok(()) }
                    next_pass = plan.borrow_and_update().next_pass;
                    break None;
                }
                _ = renew.tick() => {
                    if !store.hold_role(crate::shared::ROLE_DISCOVERY, role_ttl).await.unwrap_or(false) {
                        warn!("lost the discovery role during a pass; another replica runs it");
                        next_pass = tokio::time::Instant::now() + RETRY;
                        break None;
                    }
                }
            }
        };
        let Some(found) = found else { continue };
        let registered = match found {
            Ok(found) => {
                let (tx, rx) = oneshot::channel();
                if schedule
                    .send(ToSchedule::Discovered(found, based_on, tx))
                    .is_err()
                {
                    return Ok(());
                }
                rx.await.unwrap_or(false)
            }
            Err(e) => {
                warn!(error = %e, "cannot resolve [[sources]]; the calendars found before stay, trying again");
                false
            }
        };
        next_pass = tokio::time::Instant::now()
            + if registered {
                current.discovery.every
            } else {
                RETRY
            };
    }
}

/// Takes (or keeps) the deployment's discovery role and answers the generation a pass starts
/// from, if this replica is to run it: it holds the role and its config is the deployment's.
async fn coordinate(store: &calsync_store::Store, plan: &Plan, ttl: Duration) -> Option<i64> {
    let set = match store.tracked_set().await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot read the deployment's tracked set; discovery waits");
            return None;
        }
    };
    if set.config_digest != plan.digest {
        // A stale file's sources are not the deployment's: leave the role to a replica whose
        // config is current.
        let _ = store.release_role(crate::shared::ROLE_DISCOVERY).await;
        return None;
    }
    match store.hold_role(crate::shared::ROLE_DISCOVERY, ttl).await {
        Ok(true) => Some(set.generation),
        Ok(false) => None,
        Err(e) => {
            warn!(error = %e, "cannot take the discovery role; trying again");
            None
        }
    }
}

/// What a discovery pass's answer was not believed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doubt {
    /// A mirrored mailbox Graph refused (for less than `refused_recheck`) keeps its calendars.
    KeptRefused {
        /// The mailbox.
        address: String,
        /// Graph's code.
        code: String,
        /// Its calendars kept.
        kept: usize,
    },
    /// A source whose rolling window is empty keeps its last calendars and windows.
    KeptEmptyWindow {
        /// The source.
        source: String,
    },
    /// A source whose pass would untrack too many of its calendars (or all) keeps them until
    /// the next pass agrees.
    Held {
        /// The source.
        source: String,
        /// Its calendars tracked now.
        tracked: usize,
        /// How many the pass would untrack.
        untracked: usize,
    },
    /// Two consecutive passes agreed on a change that was held: it is applied.
    Agreed {
        /// The source.
        source: String,
    },
}

/// A pass's answer, doubted (issue 23): `found` made into the sources' tuples to register
/// beside the set tracked now (`tracked`). A mailbox already mirrored that Graph refused for
/// less than `refused_recheck` keeps its calendars (its rounds fail with Graph's code); a
/// source with an empty rolling window keeps its last calendars; a source that would lose more
/// than `max_untrack_percent` of its calendars, or all of them (Graph answering an empty room
/// list while the Places directory fills), keeps them, and the change is applied when the next
/// pass finds the same (`held` remembers each held source's answer). Pure, so the table of
/// cases is a unit test.
pub fn doubt(
    tracked: &[std::sync::Arc<calsync_engine::Tuple>],
    found: calsync_engine::Discovered,
    sources: &[Source],
    refused_recheck: Duration,
    max_untrack_percent: u8,
    held: &mut std::collections::HashMap<String, u64>,
) -> (Vec<calsync_engine::TupleConfig>, Vec<Doubt>) {
    use std::collections::HashSet;
    let mut doubts = Vec::new();
    let mut out = Vec::with_capacity(found.tuples.len());
    let mut by_source: std::collections::HashMap<&str, Vec<calsync_engine::TupleConfig>> =
        std::collections::HashMap::new();
    let prefix_of = |key: &str| key.split_once(':').map(|(p, _)| p.to_owned());
    for t in found.tuples {
        match prefix_of(&t.key).and_then(|p| sources.iter().position(|s| s.name == p)) {
            Some(i) => by_source.entry(&sources[i].name).or_default().push(t),
            None => out.push(t),
        }
    }
    for s in sources {
        let prefix = format!("{}:", s.name);
        let before: Vec<&calsync_engine::Tuple> = tracked
            .iter()
            .map(|t| &**t)
            .filter(|t| t.key.starts_with(&prefix))
            .collect();
        let mut now = by_source.remove(s.name.as_str()).unwrap_or_default();
        if found.empty_window.contains(&s.name) {
            if !before.is_empty() {
                doubts.push(Doubt::KeptEmptyWindow {
                    source: s.name.clone(),
                });
            }
            out.extend(before.iter().map(|t| t.config()));
            continue;
        }
        let mut keys: HashSet<String> = now.iter().map(|t| t.key.clone()).collect();
        for r in found
            .refused
            .iter()
            .filter(|r| r.refused_for < refused_recheck)
        {
            let mailbox = format!("{prefix}{}/", r.address);
            let kept: Vec<calsync_engine::TupleConfig> = before
                .iter()
                .filter(|t| t.key.starts_with(&mailbox) && !keys.contains(&t.key))
                .map(|t| t.config())
                .collect();
            if !kept.is_empty() {
                doubts.push(Doubt::KeptRefused {
                    address: r.address.clone(),
                    code: r.code.clone(),
                    kept: kept.len(),
                });
                keys.extend(kept.iter().map(|t| t.key.clone()));
                now.extend(kept);
            }
        }
        let untracked = before.iter().filter(|t| !keys.contains(&t.key)).count();
        let too_many = !before.is_empty()
            && (now.is_empty()
                || untracked * 100 > before.len() * usize::from(max_untrack_percent));
        if too_many {
            let answer = {
                use std::hash::{Hash, Hasher};
                let mut sorted: Vec<&String> = keys.iter().collect();
                sorted.sort();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                sorted.hash(&mut h);
                h.finish()
            };
            if held.get(&s.name) == Some(&answer) {
                held.remove(&s.name);
                doubts.push(Doubt::Agreed {
                    source: s.name.clone(),
                });
            } else {
                held.insert(s.name.clone(), answer);
                doubts.push(Doubt::Held {
                    source: s.name.clone(),
                    tracked: before.len(),
                    untracked,
                });
                out.extend(before.iter().map(|t| t.config()));
                continue;
            }
        } else {
            held.remove(&s.name);
        }
        out.extend(now);
    }
    (out, doubts)
}

/// Logs and counts what a pass was not believed in.
pub fn report(doubts: &[Doubt]) {
    for d in doubts {
        match d {
            Doubt::KeptRefused {
                address,
                code,
                kept,
            } => tracing::warn!(mailbox = %address, code = %code, kept,
                "graph refused a mirrored mailbox's calendars; they stay tracked (failing with the code) until it is refused for discovery.refused_recheck"),
            Doubt::KeptEmptyWindow { source } => tracing::warn!(source = %source,
                "the source's rolling window is empty at this anchor; its last calendars and windows stay"),
            Doubt::Held {
                source,
                tracked,
                untracked,
            } => {
                metrics::counter!("calsync_discovery_held_total", "source" => source.clone())
                    .increment(1);
                tracing::warn!(source = %source, tracked, untracked,
                    "a discovery pass would untrack more of this source's calendars than discovery.max_untrack_percent allows (or all); held until the next pass agrees")
            }
            Doubt::Agreed { source } => tracing::info!(source = %source,
                "two consecutive passes agree on the held change; applied"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calsync_engine::{
        CalendarPick, Discovered, Members, Refused, Tuple, TupleConfig, WindowSpec,
    };
    use calsync_graph::{CalendarRef, ViewWindow};
    use std::collections::HashMap;
    use std::sync::Arc;

    fn window() -> ViewWindow {
        ViewWindow {
            start: "2026-01-01T00:00:00Z".parse().unwrap(),
            end: "2026-04-01T00:00:00Z".parse().unwrap(),
        }
    }

    fn source(name: &str, members: Members) -> Source {
        Source {
            name: name.into(),
            members,
            calendars: CalendarPick::All,
            exclude: Default::default(),
            window: WindowSpec::fixed(window()),
            interval: None,
            schedule: None,
        }
    }

    fn config(key: &str) -> TupleConfig {
        let user = key
            .split_once(':')
            .and_then(|(_, r)| r.split_once('/'))
            .map_or(key, |(u, _)| u);
        TupleConfig {
            key: key.into(),
            user: user.into(),
            account: None,
            calendar: CalendarRef::Default,
            window: window(),
            rolling: None,
            interval: None,
            schedule: None,
        }
    }

    fn tracked(keys: &[&str]) -> Vec<Arc<Tuple>> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let c = config(k);
                Arc::new(Tuple {
                    id: i as i64,
                    key: c.key,
                    user: c.user.clone(),
                    account: None,
                    calendar: c.calendar,
                    window: c.window,
                    rolling: None,
                    interval: Duration::from_secs(300),
                    schedule: None,
                    mailbox: c.user,
                })
            })
            .collect()
    }

    fn found(keys: &[&str]) -> Discovered {
        Discovered {
            tuples: keys.iter().map(|k| config(k)).collect(),
            ..Default::default()
        }
    }

    fn keys(out: &[TupleConfig]) -> Vec<&str> {
        let mut k: Vec<&str> = out.iter().map(|t| t.key.as_str()).collect();
        k.sort();
        k
    }

    const DAY: Duration = Duration::from_secs(86_400);

    /// Issue 23, point 3: a mailbox move or a policy change answers 403 or
    /// MailboxNotEnabledForRESTAPI once; its mirrored calendars must not be untracked (and,
    /// with purge, deleted) for that.
    #[test]
    fn a_mirrored_mailbox_refused_once_keeps_its_calendars_until_refused_for_the_recheck() {
        let staff = [source("staff", Members::Users { filter: None })];
        let now = tracked(&["staff:a@x/default", "staff:a@x/AAM=", "staff:b@x/default"]);
        let mut pass = found(&["staff:b@x/default"]);
        pass.refused = vec![Refused {
            address: "a@x".into(),
            code: "MailboxNotEnabledForRESTAPI".into(),
            refused_for: Duration::ZERO,
        }];
        let mut held = HashMap::new();
        let (out, doubts) = doubt(&now, pass.clone(), &staff, DAY, 100, &mut held);
        assert_eq!(
            keys(&out),
            ["staff:a@x/AAM=", "staff:a@x/default", "staff:b@x/default"]
        );
        assert!(matches!(&doubts[..], [Doubt::KeptRefused { kept: 2, .. }]));
        // Refused for the whole recheck: now it goes.
        pass.refused[0].refused_for = DAY;
        let (out, _) = doubt(&now, pass, &staff, DAY, 100, &mut held);
        assert_eq!(keys(&out), ["staff:b@x/default"]);
    }

    /// Reported while the Places directory is being populated: `/places/microsoft.graph.room`
    /// answers an empty list. Every room must not be untracked for it; two passes that agree
    /// are believed.
    #[test]
    fn an_empty_room_listing_untracks_nothing_until_the_next_pass_agrees() {
        let rooms = [source("rooms", Members::Rooms)];
        let now = tracked(&["rooms:r1@x/default", "rooms:r2@x/default"]);
        let mut held = HashMap::new();
        let (out, doubts) = doubt(&now, found(&[]), &rooms, DAY, 50, &mut held);
        assert_eq!(keys(&out), ["rooms:r1@x/default", "rooms:r2@x/default"]);
        assert!(matches!(
            &doubts[..],
            [Doubt::Held {
                tracked: 2,
                untracked: 2,
                ..
            }]
        ));
        // The directory recovered: nothing held, nothing remembered.
        let (out, doubts) = doubt(
            &now,
            found(&["rooms:r1@x/default", "rooms:r2@x/default"]),
            &rooms,
            DAY,
            50,
            &mut held,
        );
        assert_eq!(out.len(), 2);
        assert!(doubts.is_empty() && held.is_empty());
        // Empty twice in a row: believed.
        let _ = doubt(&now, found(&[]), &rooms, DAY, 50, &mut held);
        let (out, doubts) = doubt(&now, found(&[]), &rooms, DAY, 50, &mut held);
        assert!(out.is_empty());
        assert!(matches!(&doubts[..], [Doubt::Agreed { .. }]));
    }

    #[test]
    fn a_pass_untracking_more_than_the_share_is_held_and_within_it_applied() {
        let staff = [source("staff", Members::Users { filter: None })];
        let now = tracked(&[
            "staff:a@x/default",
            "staff:b@x/default",
            "staff:c@x/default",
            "staff:d@x/default",
        ]);
        let mut held = HashMap::new();
        // Two of four (50%) is within 50%: applied at once, new ones too.
        let (out, doubts) = doubt(
            &now,
            found(&[
                "staff:a@x/default",
                "staff:b@x/default",
                "staff:e@x/default",
            ]),
            &staff,
            DAY,
            50,
            &mut held,
        );
        assert_eq!(
            keys(&out),
            [
                "staff:a@x/default",
                "staff:b@x/default",
                "staff:e@x/default"
            ]
        );
        assert!(doubts.is_empty());
        // Three of four: held (the four stay), and a different answer next is held again.
        let (out, _) = doubt(
            &now,
            found(&["staff:a@x/default"]),
            &staff,
            DAY,
            50,
            &mut held,
        );
        assert_eq!(out.len(), 4);
        let (out, doubts) = doubt(
            &now,
            found(&["staff:b@x/default"]),
            &staff,
            DAY,
            50,
            &mut held,
        );
        assert_eq!(out.len(), 4);
        assert!(matches!(&doubts[..], [Doubt::Held { untracked: 3, .. }]));
        // Configured calendars (no source prefix) pass through untouched.
        let (out, _) = doubt(&now, found(&["plain"]), &staff, DAY, 50, &mut held);
        assert!(keys(&out).contains(&"plain"));
    }

    #[test]
    fn a_source_whose_rolling_window_emptied_keeps_its_last_calendars() {
        let staff = [source("staff", Members::Users { filter: None })];
        let now = tracked(&["staff:a@x/default"]);
        let mut pass = found(&[]);
        pass.empty_window = vec!["staff".into()];
        let (out, doubts) = doubt(&now, pass, &staff, DAY, 100, &mut HashMap::new());
        assert_eq!(keys(&out), ["staff:a@x/default"]);
        assert!(matches!(&doubts[..], [Doubt::KeptEmptyWindow { .. }]));
    }
}
