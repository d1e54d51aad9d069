//! Link-only commits, coalesced: a page that changes no row (every no-change round) moves only
//! its tuple's link, and the links of rounds that finish together are saved by one `UPDATE …
//! FROM UNNEST` statement instead of one round trip each. Each write keeps its own checks
//! (`link_version`, fencing token) and gets its own answer; the statement is atomic per row,
//! which is all a link-only commit needs.

use crate::error::StoreError;
use crate::link::{LinkSave, save_links};
use crate::write::PageWrite;
use sqlx::PgPool;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long the first write of a batch waits for company.
const GATHER: Duration = Duration::from_millis(2);
/// The most writes one statement carries.
const MAX_BATCH: usize = 512;

/// A link save waiting in the batcher, with where its answer goes.
struct LinkWrite {
    save: LinkSave,
    reply: oneshot::Sender<Result<Option<i64>, StoreError>>,
}

/// The batcher of one pool: a task started on first use, fed through a channel.
#[derive(Debug, Default)]
pub(crate) struct LinkBatcher {
    tx: OnceLock<mpsc::UnboundedSender<LinkWrite>>,
}

impl std::fmt::Debug for LinkWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWrite")
            .field("tuple_id", &self.save.tuple_id)
            .finish_non_exhaustive()
    }
}

impl LinkBatcher {
    /// Saves `w`'s link (its changes are empty) with the writes that arrive at about the same
    /// time. `Ok(None)`: the version or fence check refused it (nothing written).
    pub(crate) async fn commit(
        &self,
        pool: &PgPool,
        deadline: Duration,
        w: &PageWrite<'_>,
        committed_by: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(pool.clone(), deadline, rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let write = LinkWrite {
            save: LinkSave::of(w, committed_by),
            reply,
        };
        tx.send(write)
            .map_err(|_| StoreError::Unavailable("the link batcher stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the link batcher stopped".into()))?
    }
}

async fn run(pool: PgPool, deadline: Duration, mut rx: mpsc::UnboundedReceiver<LinkWrite>) {
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
        let result = crate::within(deadline, "saving links", save_links(&pool, &saves)).await;
        for w in batch {
            let answer = match &result {
                Ok(saved) => Ok(saved.iter().find(|r| r.0 == w.save.tuple_id).map(|r| r.1)),
                Err(e) => Err(same_error(e)),
            };
            let _ = w.reply.send(answer);
        }
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
