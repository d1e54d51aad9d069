//! Who may send a Graph request now. Four rules, all enforced before a request leaves:
//!
//! - at most `per_mailbox` in flight per mailbox (Outlook allows 4);
//! - no request to a mailbox before its `Retry-After` has passed (not only the failed one);
//! - a per-mailbox request budget (GCRA) that keeps calsync under Graph's 10,000 requests per
//!   10 minutes per mailbox;
//! - a global limit on requests in flight that adapts (AIMD): it halves when several mailboxes
//!   are throttled at once — the sign of a tenant- or app-wide limit — and grows back by one
//!   per `limit` successful requests.

use crate::FastMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Throttles from this many different mailboxes within [`TENANT_SIGNAL_WINDOW`] mean the
/// tenant is being throttled, not one mailbox.
pub const TENANT_SIGNAL_MAILBOXES: usize = 3;
/// How far back [`TENANT_SIGNAL_MAILBOXES`] throttled mailboxes are counted.
pub const TENANT_SIGNAL_WINDOW: Duration = Duration::from_secs(10);
/// The global limit is halved at most once per this long, so one burst of 429s (which all
/// report the same overload) counts once.
pub const DECREASE_COOLDOWN: Duration = Duration::from_secs(2);

/// A request budget: at most `requests` in any `per` window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Requests allowed per window.
    pub requests: u32,
    /// The window's length.
    pub per: Duration,
}

impl Budget {
    /// GCRA parameters: `burst` at once, then one per `spacing`. Any window of length `per`
    /// then holds at most `burst + per/spacing = requests`.
    fn gcra(self) -> (Duration, Duration) {
        let requests = self.requests.max(1);
        let burst = (requests / 50).clamp(1, 100);
        let steady = (requests - burst).max(1);
        let spacing = self.per / steady;
        // Tolerance: `burst - 1` requests may run ahead of the steady rate.
        (spacing, spacing * (burst - 1))
    }
}

#[derive(Debug)]
struct Mailbox {
    slots: Arc<Semaphore>,
    not_before: Option<Instant>,
    /// GCRA's theoretical arrival time of the next request.
    tat: Instant,
}

impl Mailbox {
    /// Holds nothing worth keeping: no request in flight or waiting (the map holds the only
    /// reference to its semaphore), no `Retry-After` ahead, no budget owed.
    fn idle(&self, now: Instant) -> bool {
        Arc::strong_count(&self.slots) == 1
            && self.not_before.is_none_or(|t| t <= now)
            && self.tat <= now
    }
}

#[derive(Debug)]
struct Adaptive {
    limit: f64,
    /// What `limit` climbs back to: `max_in_flight`, or this replica's share of it.
    ceiling: f64,
    in_flight: usize,
    last_decrease: Option<Instant>,
    /// Recent throttles: when, and which mailbox.
    throttles: VecDeque<(Instant, String)>,
}

/// What the gate has done so far, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GateStats {
    /// Requests that had to wait for a mailbox's `Retry-After`.
    pub throttle_waits: u64,
    /// Total time spent in those waits.
    pub throttle_wait_seconds: f64,
    /// Requests that waited for the mailbox's request budget.
    pub budget_waits: u64,
    /// The global limit now, and the lowest it has been.
    pub global_limit: usize,
    /// The lowest the global limit has been.
    pub lowest_global_limit: usize,
    /// Times the global limit was halved.
    pub decreases: u64,
}

/// Shared by every tuple task. Held permits are released when dropped.
#[derive(Debug)]
pub struct RequestGate {
    per_mailbox: usize,
    max_in_flight: usize,
    min_in_flight: usize,
    /// (spacing, tolerance) of the per-mailbox GCRA; `None`: no budget.
    budget: Option<(Duration, Duration)>,
    // std Mutexes: held only to read or update state, never across an await.
    mailboxes: Mutex<FastMap<String, Mailbox>>,
    adaptive: Mutex<Adaptive>,
    freed: Notify,
    stats: Mutex<GateStats>,
}

/// Permission to send one request.
#[derive(Debug)]
pub struct Permit<'a> {
    gate: &'a RequestGate,
    key: String,
    mailbox: Option<OwnedSemaphorePermit>,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut a = self.gate.adaptive();
        a.in_flight = a.in_flight.saturating_sub(1);
        drop(a);
        self.gate.freed.notify_one();
        drop(self.mailbox.take());
        self.gate.forget_if_idle(&self.key);
    }
}

fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RequestGate {
    /// A gate allowing `max_in_flight` requests overall and `per_mailbox` per mailbox (both at least 1), with no request budget.
    pub fn new(max_in_flight: usize, per_mailbox: usize) -> Self {
        let max_in_flight = max_in_flight.max(1);
        RequestGate {
            per_mailbox: per_mailbox.max(1),
            max_in_flight,
            min_in_flight: max_in_flight.min(per_mailbox.max(1)),
            budget: None,
            mailboxes: Mutex::new(FastMap::default()),
            adaptive: Mutex::new(Adaptive {
                limit: max_in_flight as f64,
                ceiling: max_in_flight as f64,
                in_flight: 0,
                last_decrease: None,
                throttles: VecDeque::new(),
            }),
            freed: Notify::new(),
            stats: Mutex::new(GateStats {
                global_limit: max_in_flight,
                lowest_global_limit: max_in_flight,
                ..GateStats::default()
            }),
        }
    }

    /// Limits each mailbox to `budget`.
    pub fn with_budget(mut self, budget: Option<Budget>) -> Self {
        self.budget = budget.map(Budget::gcra);
        self
    }

    /// The global limit never drops below this.
    pub fn with_min_in_flight(mut self, min: usize) -> Self {
        self.min_in_flight = min.clamp(1, self.max_in_flight);
        self
    }

    fn mailboxes(&self) -> std::sync::MutexGuard<'_, FastMap<String, Mailbox>> {
        relock(&self.mailboxes)
    }

    fn adaptive(&self) -> std::sync::MutexGuard<'_, Adaptive> {
        relock(&self.adaptive)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> GateStats {
        *relock(&self.stats)
    }

    fn key(mailbox: &str) -> String {
        mailbox.to_ascii_lowercase()
    }

    fn entry<'m>(&self, map: &'m mut FastMap<String, Mailbox>, key: &str) -> &'m mut Mailbox {
        map.entry(key.to_owned()).or_insert_with(|| Mailbox {
            slots: Arc::new(Semaphore::new(self.per_mailbox)),
            not_before: None,
            tat: Instant::now(),
        })
    }

    /// Drops a mailbox's entry once it holds nothing worth keeping: no request in flight or
    /// waiting (only the map holds its semaphore), no `Retry-After` ahead, no budget owed. It is
    /// made again, fresh, by the next request; idle, 100,000 mailboxes would keep 25 MB here.
    fn forget_if_idle(&self, key: &str) {
        let now = Instant::now();
        let mut map = self.mailboxes();
        if map.get(key).is_some_and(|mb| mb.idle(now)) {
            map.remove(key);
        }
    }

    /// Drops every idle mailbox entry (as a release does): with a budget, an entry
    /// owes a little of it just after each request, so it is forgotten by this periodic sweep.
    pub fn forget_idle(&self) {
        let now = Instant::now();
        self.mailboxes().retain(|_, mb| !mb.idle(now));
    }

    /// Mailboxes the gate keeps state for now.
    #[cfg(test)]
    fn mailboxes_tracked(&self) -> usize {
        self.mailboxes().len()
    }

    /// Whether requests to `mailbox` are held for a `Retry-After` now.
    pub fn deferred(&self, mailbox: &str) -> bool {
        let now = Instant::now();
        self.mailboxes()
            .get(&Self::key(mailbox))
            .and_then(|m| m.not_before)
            .is_some_and(|t| now < t)
    }

    /// Counts a wait for a mailbox's `Retry-After` (here, or by a round that waits without its
    /// slot: `Engine::wait_out_hold`).
    pub(crate) fn count_throttle_wait(&self, wait: Duration) {
        {
            let mut s = relock(&self.stats);
            s.throttle_waits += 1;
            s.throttle_wait_seconds += wait.as_secs_f64();
        }
        // A histogram: its _count and _sum are the waits and the seconds waited.
        metrics::histogram!("calsync_throttle_wait_seconds").record(wait.as_secs_f64());
    }

    /// How long the mailbox's `Retry-After` still holds it, if it does.
    pub fn held_for(&self, mailbox: &str) -> Option<Duration> {
        let now = Instant::now();
        self.mailboxes()
            .get(&Self::key(mailbox))
            .and_then(|m| m.not_before)
            .filter(|t| now < *t)
            .map(|t| t - now)
    }

    /// Waits for the mailbox's `Retry-After` and budget, a mailbox slot and a global slot.
    pub async fn acquire(&self, mailbox: &str) -> Permit<'_> {
        let key = Self::key(mailbox);
        loop {
            let (slots, not_before) = {
                let mut map = self.mailboxes();
                let mb = self.entry(&mut map, &key);
                (Arc::clone(&mb.slots), mb.not_before)
            };
            if let Some(t) = not_before {
                let now = Instant::now();
                if now < t {
                    self.count_throttle_wait(t - now);
                    tokio::time::sleep_until(t).await;
                    continue;
                }
            }
            // Mailbox slot first: a task waiting on a busy mailbox must not hold a global slot
            // that other mailboxes could use.
            let Ok(mailbox_permit) = slots.acquire_owned().await else {
                continue;
            };
            // The budget is charged only by requests that will be sent now.
            if let Some(wait) = self.charge_budget(&key) {
                drop(mailbox_permit);
                relock(&self.stats).budget_waits += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            self.acquire_global().await;
            // A Retry-After may have arrived while we waited for the slots.
            let not_before = self.mailboxes().get(&key).and_then(|m| m.not_before);
            let permit = Permit {
                gate: self,
                key: key.clone(),
                mailbox: Some(mailbox_permit),
            };
            if not_before.is_some_and(|t| Instant::now() < t) {
                drop(permit);
                continue;
            }
            return permit;
        }
    }

    /// GCRA: `None` and the request is counted, or how long until it may go.
    fn charge_budget(&self, key: &str) -> Option<Duration> {
        let (spacing, tolerance) = self.budget?;
        let now = Instant::now();
        let mut map = self.mailboxes();
        let mb = self.entry(&mut map, key);
        let tat = mb.tat.max(now);
        let earliest = tat.checked_sub(tolerance).unwrap_or(now);
        if now < earliest {
            return Some(earliest - now);
        }
        mb.tat = tat + spacing;
        None
    }

    async fn acquire_global(&self) {
        loop {
            let freed = self.freed.notified();
            {
                let mut a = self.adaptive();
                if (a.in_flight as f64) < a.limit.floor() {
                    a.in_flight += 1;
                    return;
                }
            }
            freed.await;
        }
    }

    /// Holds every request to `mailbox` until `wait` has passed (a `Retry-After`).
    pub fn defer(&self, mailbox: &str, wait: Duration) {
        let until = Instant::now() + wait;
        let mut map = self.mailboxes();
        let mb = self.entry(&mut map, &Self::key(mailbox));
        mb.not_before = Some(mb.not_before.map_or(until, |t| t.max(until)));
    }

    /// A request to `mailbox` was throttled. Several mailboxes throttled at once halve the
    /// global limit.
    pub fn throttled(&self, mailbox: &str) {
        let now = Instant::now();
        let mut a = self.adaptive();
        while a
            .throttles
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > TENANT_SIGNAL_WINDOW)
        {
            a.throttles.pop_front();
        }
        let key = Self::key(mailbox);
        a.throttles.retain(|(_, m)| *m != key);
        a.throttles.push_back((now, key));
        let cooled = a
            .last_decrease
            .is_none_or(|t| now.duration_since(t) >= DECREASE_COOLDOWN);
        if a.throttles.len() >= TENANT_SIGNAL_MAILBOXES && cooled {
            a.limit = (a.limit / 2.0).max(self.min_in_flight as f64);
            a.last_decrease = Some(now);
            let limit = a.limit.floor() as usize;
            drop(a);
            let mut s = relock(&self.stats);
            s.global_limit = limit;
            s.lowest_global_limit = s.lowest_global_limit.min(limit);
            s.decreases += 1;
            metrics::gauge!("calsync_graph_concurrency_limit").set(limit as f64);
            tracing::warn!(
                limit,
                "several mailboxes throttled at once; lowering the global request limit"
            );
        }
    }

    /// Caps the adaptive global limit at `n` (kept within `[min_in_flight, max_in_flight]`):
    /// N replicas of one app each take their share of the app's limit.
    pub fn set_ceiling(&self, n: usize) {
        let n = n.clamp(self.min_in_flight, self.max_in_flight) as f64;
        let mut a = self.adaptive();
        if a.ceiling == n {
            return;
        }
        // A limit at its old ceiling (nothing throttled) follows the ceiling; one lowered by
        // throttling keeps climbing by AIMD as before.
        if a.limit >= a.ceiling || a.limit > n {
            a.limit = n;
        }
        a.ceiling = n;
        let limit = a.limit.floor() as usize;
        drop(a);
        relock(&self.stats).global_limit = limit;
        metrics::gauge!("calsync_graph_concurrency_limit").set(limit as f64);
        self.freed.notify_waiters();
    }

    /// A request succeeded: the global limit grows by one per `limit` successes.
    pub fn succeeded(&self) {
        let mut a = self.adaptive();
        if a.limit < a.ceiling {
            let before = a.limit.floor();
            a.limit = (a.limit + 1.0 / a.limit).min(a.ceiling);
            if a.limit.floor() > before {
                let limit = a.limit.floor() as usize;
                drop(a);
                relock(&self.stats).global_limit = limit;
                metrics::gauge!("calsync_graph_concurrency_limit").set(limit as f64);
                self.freed.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deferred_mailbox_waits_and_others_do_not() {
        let gate = Arc::new(RequestGate::new(8, 4));
        gate.defer("a@x", Duration::from_secs(5));
        let start = Instant::now();
        let _b = gate.acquire("b@x").await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        let _a = gate.acquire("A@x").await;
        assert!(start.elapsed() >= Duration::from_secs(5));
        assert_eq!(gate.stats().throttle_waits, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_mailboxes_are_forgotten_but_a_retry_after_is_kept() {
        let gate = Arc::new(RequestGate::new(8, 4));
        let a = gate.acquire("a@x").await;
        let a2 = gate.acquire("a@x").await;
        drop(gate.acquire("b@x").await);
        assert_eq!(
            gate.mailboxes_tracked(),
            1,
            "b is idle; a has two in flight"
        );
        drop(a);
        assert_eq!(gate.mailboxes_tracked(), 1, "a still has one in flight");
        gate.defer("a@x", Duration::from_secs(5));
        drop(a2);
        assert_eq!(gate.mailboxes_tracked(), 1, "a's Retry-After is ahead");
        let start = Instant::now();
        drop(gate.acquire("a@x").await);
        assert!(
            start.elapsed() >= Duration::from_secs(5),
            "the wait was kept"
        );
        assert_eq!(gate.mailboxes_tracked(), 0);
        // With a budget, an entry owes its last request's spacing for a moment.
        let gate = RequestGate::new(8, 4).with_budget(Some(Budget {
            requests: 10,
            per: Duration::from_secs(10),
        }));
        drop(gate.acquire("c@x").await);
        gate.forget_idle();
        assert_eq!(gate.mailboxes_tracked(), 1, "one request's spacing is owed");
        tokio::time::sleep(Duration::from_secs(2)).await;
        gate.forget_idle();
        assert_eq!(gate.mailboxes_tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_mailbox_limit_in_flight() {
        let gate = Arc::new(RequestGate::new(100, 4));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(gate.acquire("m").await);
        }
        let g = Arc::clone(&gate);
        let fifth = tokio::spawn(async move {
            let _p = g.acquire("m").await;
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!fifth.is_finished());
        drop(held);
        assert!(fifth.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_in_every_window() {
        // 100 per 10 s: a burst of 2, then one per 10/98 s.
        let budget = Budget {
            requests: 100,
            per: Duration::from_secs(10),
        };
        let gate = RequestGate::new(8, 4).with_budget(Some(budget));
        let start = Instant::now();
        let mut sent = Vec::new();
        for _ in 0..400 {
            drop(gate.acquire("m").await);
            sent.push(start.elapsed());
        }
        for (i, t) in sent.iter().enumerate() {
            let in_window = sent[i..]
                .iter()
                .take_while(|u| **u < *t + budget.per)
                .count();
            assert!(
                in_window <= 100,
                "{in_window} requests within 10 s from {t:?}"
            );
        }
        // And the budget is used, not wasted: 400 requests take about 4 windows.
        assert!(
            start.elapsed() < Duration::from_secs(41),
            "{:?}",
            start.elapsed()
        );
        assert!(gate.stats().budget_waits > 0);
        // Another mailbox has its own budget.
        let t = Instant::now();
        drop(gate.acquire("other").await);
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn throttles_across_mailboxes_halve_the_global_limit_and_successes_restore_it() {
        let gate = RequestGate::new(32, 4).with_min_in_flight(4);
        // One mailbox throttled again and again is that mailbox's problem, not the tenant's.
        for _ in 0..10 {
            gate.throttled("a");
        }
        assert_eq!(gate.stats().global_limit, 32);
        gate.throttled("b");
        gate.throttled("c");
        assert_eq!(gate.stats().global_limit, 16);
        // The same burst does not count twice.
        gate.throttled("d");
        assert_eq!(gate.stats().global_limit, 16);
        tokio::time::advance(DECREASE_COOLDOWN).await;
        gate.throttled("e");
        assert_eq!(gate.stats().global_limit, 8);
        for _ in 0..3 {
            tokio::time::advance(DECREASE_COOLDOWN).await;
            gate.throttled("f");
        }
        assert_eq!(gate.stats().global_limit, 4, "never below the floor");

        // Only 4 may be in flight now.
        let mut held = Vec::new();
        for m in ["p", "q", "r", "s"] {
            held.push(gate.acquire(m).await);
        }
        let blocked = tokio::time::timeout(Duration::from_secs(1), gate.acquire("t")).await;
        assert!(blocked.is_err());
        drop(held);

        // Additive increase: about +1 per `limit` successes (4.25, 4.49, 4.71, 4.92, 5.12).
        for _ in 0..5 {
            gate.succeeded();
        }
        assert_eq!(gate.stats().global_limit, 5);
        for _ in 0..2000 {
            gate.succeeded();
        }
        assert_eq!(gate.stats().global_limit, 32);
        assert_eq!(gate.stats().lowest_global_limit, 4);
    }
}
