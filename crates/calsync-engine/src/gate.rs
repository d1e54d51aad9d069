//! Who may send a Graph request now: a global cap on requests in flight, at most N in flight
//! per mailbox (Outlook allows 4), and no request to a mailbox before its `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

#[derive(Debug)]
struct Mailbox {
    slots: Arc<Semaphore>,
    not_before: Option<Instant>,
}

/// Shared by every tuple task. Held permits are released when dropped.
#[derive(Debug)]
pub struct RequestGate {
    global: Arc<Semaphore>,
    per_mailbox: usize,
    // A std Mutex: held only to look up or update a map entry, never across an await.
    mailboxes: Mutex<HashMap<String, Mailbox>>,
}

/// Permission to send one request.
#[derive(Debug)]
pub struct Permit {
    _global: OwnedSemaphorePermit,
    _mailbox: OwnedSemaphorePermit,
}

impl RequestGate {
    pub fn new(max_in_flight: usize, per_mailbox: usize) -> Self {
        RequestGate {
            global: Arc::new(Semaphore::new(max_in_flight.max(1))),
            per_mailbox: per_mailbox.max(1),
            mailboxes: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mailbox>> {
        self.mailboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(mailbox: &str) -> String {
        mailbox.to_ascii_lowercase()
    }

    /// Waits for the mailbox's `Retry-After` to pass and for a mailbox and a global slot.
    pub async fn acquire(&self, mailbox: &str) -> Permit {
        let key = Self::key(mailbox);
        loop {
            let (slots, not_before) = {
                let mut map = self.lock();
                let mb = map.entry(key.clone()).or_insert_with(|| Mailbox {
                    slots: Arc::new(Semaphore::new(self.per_mailbox)),
                    not_before: None,
                });
                (Arc::clone(&mb.slots), mb.not_before)
            };
            if let Some(t) = not_before {
                if Instant::now() < t {
                    tokio::time::sleep_until(t).await;
                    continue;
                }
            }
            // Mailbox slot first: a task waiting on a busy mailbox must not hold a global slot
            // that other mailboxes could use.
            let Ok(mailbox_permit) = slots.acquire_owned().await else {
                continue;
            };
            let Ok(global_permit) = Arc::clone(&self.global).acquire_owned().await else {
                continue;
            };
            // A Retry-After may have arrived while we waited for the slots.
            let not_before = self.lock().get(&key).and_then(|m| m.not_before);
            if not_before.is_some_and(|t| Instant::now() < t) {
                drop((mailbox_permit, global_permit));
                continue;
            }
            return Permit {
                _global: global_permit,
                _mailbox: mailbox_permit,
            };
        }
    }

    /// Holds every request to `mailbox` until `wait` has passed (a `Retry-After`).
    pub fn defer(&self, mailbox: &str, wait: Duration) {
        let until = Instant::now() + wait;
        let mut map = self.lock();
        let mb = map.entry(Self::key(mailbox)).or_insert_with(|| Mailbox {
            slots: Arc::new(Semaphore::new(self.per_mailbox)),
            not_before: None,
        });
        mb.not_before = Some(mb.not_before.map_or(until, |t| t.max(until)));
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
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_mailbox_limit_in_flight() {
        let gate = Arc::new(RequestGate::new(100, 4));
        let held: Vec<Permit> = futures_now(&gate, 4).await;
        let g = Arc::clone(&gate);
        let fifth = tokio::spawn(async move { g.acquire("m").await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!fifth.is_finished());
        drop(held);
        assert!(fifth.await.is_ok());
    }

    async fn futures_now(gate: &Arc<RequestGate>, n: usize) -> Vec<Permit> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(gate.acquire("m").await);
        }
        v
    }
}
