//! A memory budget for Graph bodies held in memory: fetched, parsed, not yet committed.
//!
//! When PostgreSQL is slower than Graph, every running round would hold a page while it waits,
//! and one page may be tens of MiB. Bytes are reserved from one budget as they arrive (each raw
//! byte counts [`WEIGHT`] times: the body, its parsed tree, the rows and the bind buffers exist
//! at once),
//! and a delta page keeps its reservation ([`PageHold`]) until the engine has applied it. A
//! body that cannot reserve more within [`WAIT`] is dropped, releasing what it held, and the
//! fetch fails as transient: rounds that each hold part of a body can never wait on one another
//! forever. A single body larger than the whole budget may still proceed, alone.

use crate::error::GraphError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many bytes of memory one byte of body stands for while a page is held: the body, its
/// `serde_json` tree (a map and a string per field), the rows made of it and the encoded bind
/// buffers. Measured, not guessed: with 2,000 mailboxes and weight 3, peak RSS grew by about
/// 2 MiB per MiB of budget (BENCHMARKS.md), so each body byte costs about 6.
pub const WEIGHT: usize = 6;

/// The budget's granularity.
const UNIT: usize = 64 * 1024;

/// How long a body waits for more budget before it is dropped and its fetch retried.
pub const WAIT: Duration = Duration::from_secs(5);

/// The budget, shared by every request of a client.
#[derive(Debug, Clone)]
pub struct PageBudget {
    sem: Arc<Semaphore>,
    units: u32,
}

/// What a fetched page holds of the budget until it is dropped (after it is applied).
#[derive(Debug, Clone, Default)]
pub struct PageHold(Option<Arc<OwnedSemaphorePermit>>);

impl PartialEq for PageHold {
    /// Holds are bookkeeping, not content: two pages are equal whatever they hold.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl PageHold {
    /// Bytes of budget held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits() * UNIT)
    }
}

impl PageBudget {
    /// A budget of `bytes`; `None` (no budget) when `bytes` is 0.
    pub fn new(bytes: usize) -> Option<Self> {
        let units = u32::try_from((bytes / UNIT).max(1)).unwrap_or(u32::MAX >> 3);
        (bytes > 0).then(|| PageBudget {
            sem: Arc::new(Semaphore::new(units as usize)),
            units,
        })
    }

    /// Bytes of budget free now.
    pub fn available(&self) -> usize {
        self.sem.available_permits() * UNIT
    }

    /// Makes `held` cover a body of `body_bytes` so far.
    pub(crate) async fn cover(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        body_bytes: usize,
    ) -> Result<(), GraphError> {
        let want = (body_bytes.saturating_mul(WEIGHT).div_ceil(UNIT) as u32).min(self.units);
        let have = held.as_ref().map_or(0, |p| p.num_permits() as u32);
        if want <= have {
            return Ok(());
        }
        let more = Arc::clone(&self.sem).acquire_many_owned(want - have);
        match tokio::time::timeout(WAIT, more).await {
            Ok(Ok(p)) => {
                match held {
                    Some(h) => h.merge(p),
                    None => *held = Some(p),
                }
                Ok(())
            }
            // Closed never happens (the semaphore lives as long as the budget).
            Ok(Err(_)) | Err(_) => Err(GraphError::Transient {
                status: None,
                fresh_connection: false,
                message: "the page memory budget stayed exhausted; the body was dropped".into(),
            }),
        }
    }

    /// Wraps what a body holds, for the page that came of it.
    pub(crate) fn hold(held: Option<OwnedSemaphorePermit>) -> PageHold {
        PageHold(held.map(Arc::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bodies_wait_for_budget_and_give_up_rather_than_wait_on_each_other_forever() {
        let b = PageBudget::new(6 * 1024 * 1024).unwrap(); // 96 units
        // A first body grows to 512 KiB (x6 = 48 units).
        let mut a = None;
        b.cover(&mut a, 512 * 1024).await.unwrap();
        assert_eq!(b.available(), 3 * 1024 * 1024);
        // A second one takes the rest.
        let mut c = None;
        b.cover(&mut c, 512 * 1024).await.unwrap();
        assert_eq!(b.available(), 0);
        // Neither can grow while the other holds: one gives up after WAIT, and its release
        // lets the other go on.
        let grow_a = b.cover(&mut a, 600 * 1024);
        let err = tokio::time::timeout(WAIT * 2, grow_a).await.unwrap();
        assert!(matches!(err, Err(GraphError::Transient { .. })));
        drop(c);
        b.cover(&mut a, 600 * 1024).await.unwrap();
        // A body larger than the whole budget may proceed alone.
        let mut big = a.take();
        b.cover(&mut big, 64 * 1024 * 1024).await.unwrap();
        assert_eq!(b.available(), 0);
        let hold = PageBudget::hold(big);
        assert_eq!(hold.bytes(), 6 * 1024 * 1024);
        drop(hold);
        assert_eq!(b.available(), 6 * 1024 * 1024);
        assert!(PageBudget::new(0).is_none());
    }
}
