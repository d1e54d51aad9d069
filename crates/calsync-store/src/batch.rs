//! Link-only commits, coalesced: a page that changes no row (every no-change round) moves only
//! its tuple's link, and the links of rounds that finish together are saved by one `UPDATE …
//! FROM UNNEST` statement instead of one round trip each. Each write keeps its own checks
//! (`link_version`, fencing token) and gets its own answer; the statement is atomic per row,
//! which is all a link-only commit needs.

use crate::error::StoreError;
use crate::link::{LinkSave, save_links};
use crate::write::PageWrite;
use sqlx::PgPool;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long the first write of a batch waits for company.
const GATHER: Duration = Duration::from_millis(2);
/// The most writes one statement carries.
const MAX_BATCH: usize = 512;

/// A link save waiting in the batcher, with where its answer goes.
pub(crate) struct LinkWrite {
    save: LinkSave,
    reply: oneshot::Sender<Result<Option<i64>, StoreError>>,
}

/// The receiving end of the link batcher: whoever holds it runs the loop
/// ([`Store::run_link_batcher`](crate::Store::run_link_batcher)).
#[derive(Debug)]
pub struct LinkInbox(mpsc::UnboundedReceiver<LinkWrite>);

/// The batcher of one pool, fed through a channel. Its loop runs where the inbox went: in a
/// worker of the caller's ([`Store::take_link_inbox`](crate::Store::take_link_inbox): `calsync
/// run` supervises it by name), or else in a task the first commit starts.
#[derive(Debug)]
pub(crate) struct LinkBatcher {
    tx: mpsc::UnboundedSender<LinkWrite>,
    inbox: Mutex<Option<LinkInbox>>,
    /// The inbox was taken, by a caller or by the first commit: commits only send.
    taken: AtomicBool,
}

impl Default for LinkBatcher {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        LinkBatcher {
            tx,
            inbox: Mutex::new(Some(LinkInbox(rx))),
            taken: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for LinkWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWrite")
            .field("tuple_id", &self.save.tuple_id)
            .finish_non_exhaustive()
    }
}

impl LinkBatcher {
    /// The inbox, unless it was taken already.
    pub(crate) fn take_inbox(&self) -> Option<LinkInbox> {
        self.taken.store(true, Ordering::Release);
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Saves `w`'s link (its changes are empty) with the writes that arrive at about the same
    /// time. `Ok(None)`: the version or fence check refused it (nothing written).
    pub(crate) async fn commit(
        &self,
        pool: &PgPool,
        deadline: Duration,
        w: &PageWrite<'_>,
        committed_by: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        if !self.taken.load(Ordering::Acquire) {
            // Nobody runs the loop (a one-shot sync, a test): this process does, from now on.
            if let Some(mut inbox) = self.take_inbox() {
                let pool = pool.clone();
                tokio::spawn(async move { run(&pool, deadline, &mut inbox).await });
            }
        }
        let (reply, answer) = oneshot::channel();
        let write = LinkWrite {
            save: LinkSave::of(w, committed_by),
            reply,
        };
        // The loop never drops the inbox while this batcher lives, but a panic inside it
        // drops the answers of the writes it held.
        let stopped = || StoreError::Unavailable("the link batcher stopped".into());
        self.tx.send(write).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes writes from `inbox` and saves them in batches, forever (the batcher holds the
/// sending end). Cancel-safe between batches: a batch in flight when the future is dropped
/// answers its writes "stopped", the writes still queued stay in the inbox.
pub(crate) async fn run(pool: &PgPool, deadline: Duration, inbox: &mut LinkInbox) {
    let rx = &mut inbox.0;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let gather = tokio::time::sleep(GATHER);
        tokio::pin!(gather);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                biased;
                w = rx.recv() => match w {
                    Some(w) => batch.push(w),
                    None => break,
                },
                _ = &mut gather => break,
            }
        }
        // One statement at a time: a batch never waits on another for row locks.
        let saves: Vec<&LinkSave> = batch.iter().map(|w| &w.save).collect();
        // Bounded here, once per statement, rather than around each write that waits for it.
        let result = crate::within(deadline, "saving links", save_links(pool, &saves, None)).await;
        for w in batch {
            let answer = match &result {
                Ok(saved) => Ok(saved.iter().find(|r| r.0 == w.save.tuple_id).map(|r| r.1)),
                Err(e) => Err(same_error(e)),
            };
            let _ = w.reply.send(answer);
        }
    }
}

impl crate::Store {
    /// The link batcher's inbox, for a caller that runs its loop as a supervised worker
    /// ([`Store::run_link_batcher`](crate::Store::run_link_batcher)); taken before the first commit, or commits
    /// start a loop of their own. `None` once taken.
    pub fn take_link_inbox(&self) -> Option<LinkInbox> {
        self.batcher.take_inbox()
    }

    /// Runs the link batcher's loop on `inbox` until the future is dropped. A loop that ends
    /// (a panic) leaves the writes still queued in `inbox` for the next run.
    pub async fn run_link_batcher(&self, inbox: &mut LinkInbox) {
        run(&self.pool, self.deadline, inbox).await
    }
}

/// The batch's error, for each of its writes (the error type is not `Clone`).
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Refused { sqlstate, message } => StoreError::Refused {
            sqlstate: sqlstate.clone(),
            message: message.clone(),
        },
        StoreError::Bug { sqlstate, message } => StoreError::Bug {
            sqlstate: sqlstate.clone(),
            message: message.clone(),
        },
        StoreError::Query(m) => StoreError::Query(m.clone()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use crate::{LinkKind, LinkStamp, PageChanges, PageWrite, RoundStart, Store, TupleSpec};
    use sqlx::PgPool;
    use std::time::Duration;

    /// What `calsync run` relies on to supervise the batcher: writes wait in the inbox while no
    /// run is going (a run that ended, a restart's pause) and the next run answers them.
    #[sqlx::test(migrations = false)]
    async fn writes_queued_while_no_run_goes_are_saved_by_the_next_run(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let start = "2026-01-01T00:00:00Z".parse().unwrap();
        let end = "2026-04-01T00:00:00Z".parse().unwrap();
        let t = store
            .register_tuples(&[TupleSpec {
                key: "t".into(),
                user_id: "u".into(),
                mailbox: "m".into(),
                calendar_id: "default".into(),
                window_start: start,
                window_end: end,
                settings: None,
            }])
            .await
            .unwrap()
            .remove(0);
        let stamp = LinkStamp {
            user_id: "u".into(),
            calendar_id: "default".into(),
            window_start: start,
            window_end: end,
        };
        let mut inbox = store
            .take_link_inbox()
            .expect("the inbox is there at first");
        assert!(store.take_link_inbox().is_none(), "taken once");

        // A write sent while no run goes waits; it does not start a loop of its own.
        let commit = tokio::spawn({
            let store = store.clone();
            let stamp = stamp.clone();
            async move {
                let changes = PageChanges::default();
                let w = PageWrite {
                    tuple_id: t.id,
                    expected_version: 0,
                    round_start: Some(RoundStart::Delta),
                    changes: &changes,
                    link: "https://graph.example/delta?$deltatoken=x",
                    link_kind: LinkKind::Delta,
                    stamp: &stamp,
                    fence: None,
                };
                store.apply_page(&w).await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!commit.is_finished(), "answered with no run going");
        assert_eq!(store.load(t.id).await.unwrap().link_version, 0);

        // The next run answers it.
        let run = tokio::spawn(async move { store.run_link_batcher(&mut inbox).await });
        let applied = tokio::time::timeout(Duration::from_secs(10), commit)
            .await
            .expect("the next run answers the queued write")
            .unwrap()
            .unwrap();
        assert_eq!(applied.version, 1);
        run.abort();
    }
}
