//! Which mailboxes this process may write: the leases it holds, and the keeper that renews
//! them and takes this replica's fair share.
//!
//! The store holds the truth ([`calsync_store::leases`]); [`Leases`] is this process's view of
//! it, read on every page commit. It is conservative: all leases hang on one heartbeat, and the
//! view expires at 90% of the TTL after the heartbeat *started*, measured on the monotonic clock,
//! so a process that was paused (SIGSTOP, a VM freeze) stops writing before the database would
//! let another replica take over. The database's fencing check is the real guard; this one
//! saves a doomed page's work.

use crate::{Engine, FastMap};
use calsync_store::{ReplicaKind, Store, StoreError};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The leases this process holds: mailbox → fencing token, until a local deadline.
#[derive(Debug)]
pub struct Leases {
    held: RwLock<FastMap<String, i64>>,
    /// Held leases being handed over: their tasks are stopped (at a page boundary) and the
    /// lease is released once no round of theirs runs, so the page in hand still commits.
    releasing: std::sync::Mutex<HashSet<String>>,
    born: Instant,
    /// Milliseconds since `born` until which `held` may be used; 0: never renewed.
    valid_until_ms: AtomicU64,
    /// The same deadline by the wall clock (milliseconds since the Unix epoch). The monotonic
    /// clock stops while the machine is suspended, so a process resumed after its leases
    /// lapsed would go on using them; the wall clock moves on (issue 23). Both must agree.
    valid_until_wall_ms: AtomicU64,
}

/// Milliseconds since the Unix epoch now (0 if the clock is before it).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            held: RwLock::default(),
            releasing: Default::default(),
            born: Instant::now(),
            valid_until_ms: AtomicU64::new(0),
            valid_until_wall_ms: AtomicU64::new(0),
        }
    }
}

impl Leases {
    /// The fencing token for `mailbox`, if this process holds its lease and its last
    /// heartbeat is recent enough.
    pub fn fence(&self, mailbox: &str) -> Option<i64> {
        if self.born.elapsed().as_millis() as u64 >= self.valid_until_ms.load(Ordering::Acquire)
            || wall_ms() >= self.valid_until_wall_ms.load(Ordering::Acquire)
        {
            return None;
        }
        self.read().get(mailbox).copied()
    }

    /// The mailboxes whose calendars this process is to sync: held, and not being handed over.
    pub fn mailboxes(&self) -> HashSet<String> {
        let releasing = self.releasing();
        self.read()
            .keys()
            .filter(|m| !releasing.contains(*m))
            .cloned()
            .collect()
    }

    /// Calls `f` with a test of whether this process is to sync a mailbox (held, not being
    /// handed over), reading the held set in place rather than copying 100,000 names.
    pub fn syncing<R>(&self, f: impl FnOnce(&dyn Fn(&str) -> bool) -> R) -> R {
        let releasing = self.releasing();
        let held = self.read();
        f(&|m: &str| held.contains_key(m) && !releasing.contains(m))
    }

    fn releasing(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.releasing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many leases are held.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// None held.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, FastMap<String, i64>> {
        self.held.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, FastMap<String, i64>> {
        self.held.write().unwrap_or_else(|p| p.into_inner())
    }

    fn renewed(&self, heartbeat_started: Instant, ttl: Duration) {
        let until = heartbeat_started
            .saturating_duration_since(self.born)
            .saturating_add(ttl.mul_f64(0.9));
        self.valid_until_ms
            .store(until.as_millis() as u64, Ordering::Release);
        // By the wall clock, from now minus the time the heartbeat took.
        let took = heartbeat_started.elapsed().as_millis() as u64;
        self.valid_until_wall_ms.store(
            wall_ms()
                .saturating_sub(took)
                .saturating_add(ttl.mul_f64(0.9).as_millis() as u64),
            Ordering::Release,
        );
    }

    /// Forgets every lease at once (shutdown, or a store that cannot be reached).
    pub fn expire(&self) {
        self.valid_until_ms.store(0, Ordering::Release);
        self.valid_until_wall_ms.store(0, Ordering::Release);
    }
}

/// Who this process is among the deployment's replicas, and its lease TTL.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The replica's name as configured (`service.replica`), shown by `status`.
    pub replica: String,
    /// Unique per process start: `<replica>#<random>`. A restarted replica never inherits its
    /// previous incarnation's leases (they lapse after the TTL, or were released).
    pub incarnation: String,
    /// `run` or a one-off command.
    pub kind: ReplicaKind,
    /// How long leases outlive the last heartbeat.
    pub ttl: Duration,
}

impl Identity {
    /// An identity for `replica` with a fresh incarnation.
    pub fn new(replica: &str, kind: ReplicaKind, ttl: Duration) -> Self {
        let tag: u64 = rand::random();
        Identity {
            replica: replica.to_owned(),
            incarnation: format!("{replica}#{:012x}", tag & 0xffff_ffff_ffff),
            kind,
            ttl,
        }
    }

    /// The heartbeat period: a quarter of the TTL, so a dead replica's mailboxes move within
    /// TTL + TTL/4.
    pub fn heartbeat_every(&self) -> Duration {
        self.ttl / 4
    }
}

/// What one keeper cycle did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cycle {
    /// Leases held after the cycle.
    pub held: usize,
    /// This replica's fair share.
    pub target: u64,
    /// Live `run` replicas of the deployment.
    pub replicas: usize,
    /// Leases taken in this cycle.
    pub acquired: usize,
    /// Leases given up in this cycle.
    pub released: usize,
    /// Leases whose hand-over began in this cycle (their calendars stop being synced here).
    pub handing_over: usize,
    /// Leases found lost (taken while this process lapsed, or their mailbox deregistered).
    pub lost: usize,
}

impl Cycle {
    /// Whether the set of held mailboxes changed.
    pub fn changed(&self) -> bool {
        self.acquired + self.handing_over + self.lost > 0
    }
}

/// The fair share of replica `rank` of `replicas` among `mailboxes`: split by count, the first
/// `mailboxes % replicas` taking one more. Pure, table-tested.
pub fn fair_share(mailboxes: u64, replicas: usize, rank: usize) -> u64 {
    let n = replicas.max(1) as u64;
    mailboxes / n + u64::from((rank as u64) < mailboxes % n)
}

/// Renews this process's leases and moves them towards its fair share.
#[derive(Debug)]
pub struct LeaseKeeper {
    engine: Engine,
    store: Store,
    leases: Arc<Leases>,
    identity: Identity,
    /// One cycle at a time (the heartbeat task and a reload may both run one).
    cycling: tokio::sync::Mutex<()>,
}

impl LeaseKeeper {
    /// The keeper of `engine`'s leases (see [`Engine::fence_with`]) for `identity`.
    pub(crate) fn new(engine: Engine, leases: Arc<Leases>, identity: Identity) -> Self {
        LeaseKeeper {
            store: engine.store().clone(),
            engine,
            leases,
            identity,
            cycling: tokio::sync::Mutex::new(()),
        }
    }

    /// Who this keeper holds leases as.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// One heartbeat: renew, find what was lost, hand over above the fair share (a quarter of
    /// the share at most per cycle, so a joining replica takes over gradually; a lease is
    /// released once its calendars' rounds stopped at a page boundary) or acquire up to it.
    /// A one-off keeper only renews.
    pub async fn cycle(&self) -> Result<Cycle, StoreError> {
        let _one = self.cycling.lock().await;
        let started = Instant::now();
        let id = &self.identity;
        let hb = self
            .store
            .heartbeat(&id.incarnation, &id.replica, id.kind, id.ttl)
            .await?;
        let mut cycle = Cycle {
            replicas: hb.live.len(),
            ..Cycle::default()
        };
        if hb.lapsed || hb.owned != self.leases.len() as u64 {
            // Leases were taken while this process lapsed, or their mailboxes deregistered:
            // the database's list is the truth.
            let owned: FastMap<String, i64> = self
                .store
                .owned_leases(&id.incarnation)
                .await?
                .into_iter()
                .collect();
            let mut held = self.leases.write();
            self.leases.releasing().retain(|m| owned.contains_key(m));
            cycle.lost = held
                .iter()
                .filter(|(m, f)| owned.get(*m) != Some(f))
                .count();
            cycle.acquired = owned.keys().filter(|m| !held.contains_key(*m)).count();
            *held = owned;
        }
        self.leases.renewed(started, id.ttl);
        if id.kind == ReplicaKind::Run {
            let rank = hb
                .live
                .iter()
                .position(|i| i == &id.incarnation)
                .unwrap_or(hb.live.len());
            cycle.target = fair_share(hb.mailboxes, hb.live.len(), rank);
            // Hand-overs in progress: released once none of their rounds runs.
            let done: Vec<String> = self
                .leases
                .releasing()
                .iter()
                .filter(|m| !self.engine.mailbox_busy(m))
                .cloned()
                .collect();
            if !done.is_empty() {
                {
                    let mut held = self.leases.write();
                    let mut releasing = self.leases.releasing();
                    for m in &done {
                        held.remove(m);
                        releasing.remove(m);
                    }
                }
                self.store
                    .release_leases(&id.incarnation, Some(&done))
                    .await?;
                cycle.released = done.len();
            }
            let keeping = (self.leases.len() - self.leases.releasing().len()) as u64;
            if keeping > cycle.target {
                // A quarter of the share at most per cycle: a joining replica takes over
                // gradually, and no replica drops everything at once.
                let step = cycle.target.div_ceil(4).max(1);
                let excess = (keeping - cycle.target).min(step) as usize;
                let mut mine: Vec<String> = self.leases.mailboxes().into_iter().collect();
                mine.sort_unstable();
                let give = mine.split_off(mine.len() - excess);
                self.leases.releasing().extend(give);
                cycle.handing_over = excess;
            } else if keeping < cycle.target && self.leases.releasing().is_empty() {
                let got = self
                    .store
                    .acquire_leases(&id.incarnation, cycle.target - keeping, None)
                    .await?;
                cycle.acquired += got.len();
                self.leases.write().extend(got);
            }
            // N replicas of one app stay under one app's limit together.
            let max = self.engine.settings().max_in_flight;
            self.engine
                .gate()
                .set_ceiling(max.div_ceil(hb.live.len().max(1)));
        }
        cycle.held = self.leases.len();
        let replica = id.replica.clone();
        metrics::gauge!("calsync_leases_held", "replica" => replica.clone()).set(cycle.held as f64);
        metrics::gauge!("calsync_leases_target", "replica" => replica.clone())
            .set(cycle.target as f64);
        metrics::gauge!("calsync_replicas_live", "replica" => replica).set(cycle.replicas as f64);
        Ok(cycle)
    }

    /// Takes the leases of these mailboxes that are free (a one-off command's way in); returns
    /// the mailboxes it holds afterwards.
    pub async fn acquire_only(&self, mailboxes: &[String]) -> Result<HashSet<String>, StoreError> {
        let started = Instant::now();
        let id = &self.identity;
        self.store
            .heartbeat(&id.incarnation, &id.replica, id.kind, id.ttl)
            .await?;
        let got = self
            .store
            .acquire_leases(&id.incarnation, mailboxes.len() as u64, Some(mailboxes))
            .await?;
        self.leases.write().extend(got);
        self.leases.renewed(started, id.ttl);
        Ok(self.leases.mailboxes())
    }

    /// Heartbeats every TTL/4 until `cancel` fires; after each cycle that changed the held
    /// set, `changed` counts one more (read the set with [`Leases::syncing`]). A failed
    /// heartbeat is logged and retried at the next tick (the local deadline makes the engine
    /// stop writing meanwhile).
    pub async fn run(&self, cancel: CancellationToken, changed: tokio::sync::watch::Sender<u64>) {
        let mut tick = tokio::time::interval(self.identity.heartbeat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut first = true;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.cycle().await {
                Ok(c) => {
                    if first {
                        tracing::info!(replica = %self.identity.replica, held = c.held, replicas = c.replicas, "mailbox leases taken");
                        first = false;
                        changed.send_modify(|n| *n += 1);
                        continue;
                    }
                    if failing {
                        tracing::info!(held = c.held, "lease heartbeat works again");
                        failing = false;
                    }
                    if c.changed() {
                        tracing::info!(
                            held = c.held,
                            target = c.target,
                            replicas = c.replicas,
                            acquired = c.acquired,
                            handing_over = c.handing_over,
                            lost = c.lost,
                            "mailbox leases changed"
                        );
                        changed.send_modify(|n| *n += 1);
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot renew mailbox leases; rounds stop committing when they lapse");
                        failing = true;
                    }
                }
            }
        }
    }

    /// Releases every lease and removes this incarnation (a clean stop): other replicas take
    /// the mailboxes at their next heartbeat instead of after the TTL.
    pub async fn retire(&self) -> Result<(), StoreError> {
        self.leases.expire();
        self.leases.write().clear();
        self.leases.releasing().clear();
        self.store.retire(&self.identity.incarnation).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fair_share_splits_by_count_and_sums_to_the_whole() {
        assert_eq!(fair_share(600, 3, 0), 200);
        assert_eq!(fair_share(10, 3, 0), 4);
        assert_eq!(fair_share(10, 3, 1), 3);
        assert_eq!(fair_share(10, 3, 2), 3);
        // Not yet among the live (lapsed): the remainder is not its own.
        assert_eq!(fair_share(10, 3, 3), 3);
        assert_eq!(fair_share(5, 0, 0), 5);
        for (m, n) in [(0u64, 1usize), (1, 4), (3000, 7), (100_000, 3)] {
            let sum: u64 = (0..n).map(|r| fair_share(m, n, r)).sum();
            assert_eq!(sum, m);
        }
    }

    #[test]
    fn leases_are_unusable_past_the_local_deadline() {
        let l = Leases::default();
        l.write().insert("m".into(), 7);
        assert_eq!(l.fence("m"), None, "never renewed");
        l.renewed(Instant::now(), Duration::from_secs(60));
        assert_eq!(l.fence("m"), Some(7));
        assert_eq!(l.fence("other"), None);
        l.renewed(Instant::now(), Duration::ZERO);
        assert_eq!(l.fence("m"), None, "expired");
    }

    /// The monotonic clock stops while the machine sleeps: a laptop or a VM suspended past
    /// its leases' ttl must not resume using them (issue 23). A suspension is what the wall
    /// clock sees and the monotonic clock does not: here, the wall deadline already passed.
    #[test]
    fn leases_are_unusable_once_the_wall_clock_passed_their_deadline() {
        let l = Leases::default();
        l.write().insert("m".into(), 7);
        l.renewed(Instant::now(), Duration::from_secs(60));
        assert_eq!(l.fence("m"), Some(7));
        // What a resume after a long suspension looks like: the monotonic deadline is still
        // ahead, the wall-clock one is behind.
        l.valid_until_wall_ms
            .store(wall_ms().saturating_sub(1), Ordering::Release);
        assert_eq!(l.fence("m"), None);
    }
}
