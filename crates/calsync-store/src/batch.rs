//! Link-only commits, coalesced: a page that changes no row (every no-change round) moves only
//! its tuple's link, and the links of rounds that finish together are saved by one `UPDATE …
//! FROM UNNEST` statement instead of one round trip each. Each write keeps its own checks
//! (`link_version`, fencing token) and gets its own answer; the statement is atomic per row,
//! which is all a link-only commit needs.

use crate::apply::{PageWrite, RoundStart};
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long the first write of a batch waits for company.
const GATHER: Duration = Duration::from_millis(2);
/// The most writes one statement carries.
const MAX_BATCH: usize = 512;

/// A tuple's link after a page, with the checks its write must pass: what [`save_links`]
/// saves, one row of its `UNNEST`.
pub(crate) struct LinkSave {
    tuple_id: i64,
    expected: i64,
    link: String,
    kind: &'static str,
    user_id: String,
    calendar_id: String,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    /// `full`, `delta` or `` (not the first page of a round).
    start: &'static str,
    fence: Option<i64>,
    committed_by: Option<String>,
}

impl LinkSave {
    pub(crate) fn of(w: &PageWrite<'_>, committed_by: Option<&str>) -> Self {
        LinkSave {
            tuple_id: w.tuple_id,
            expected: w.expected_version,
            link: w.link.to_owned(),
            kind: w.link_kind.as_str(),
            user_id: w.stamp.user_id.clone(),
            calendar_id: w.stamp.calendar_id.clone(),
            window_start: w.stamp.window_start,
            window_end: w.stamp.window_end,
            start: match w.round_start {
                Some(RoundStart::Full) => "full",
                Some(RoundStart::Delta) => "delta",
                None => "",
            },
            fence: w.fence,
            committed_by: committed_by.map(str::to_owned),
        }
    }
}

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

/// Saves each row's link in one statement, only where its `link_version` and fencing token
/// (if any) are current: the one place a tuple's link and round state are written. Returns
/// (tuple id, new link_version, full_round, round_is_full, rebasing) for the rows saved; a
/// row refused is absent. `rebasing`: the tuple's rows mirror another window than this link's
/// (the full round of a moved window is under way), so rows it adds wait, hidden, for its last
/// page; a round's last page makes the link's window the served one. Used for a batch of link-only commits and, with one row, inside a page's
/// transaction.
pub(crate) async fn save_links<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    rows: &[&LinkSave],
) -> Result<Vec<(i64, i64, i64, bool, bool)>, StoreError> {
    let ids: Vec<i64> = rows.iter().map(|w| w.tuple_id).collect();
    let expected: Vec<i64> = rows.iter().map(|w| w.expected).collect();
    let links: Vec<&str> = rows.iter().map(|w| w.link.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|w| w.kind).collect();
    let users: Vec<&str> = rows.iter().map(|w| w.user_id.as_str()).collect();
    let cals: Vec<&str> = rows.iter().map(|w| w.calendar_id.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = rows.iter().map(|w| w.window_start).collect();
    let ends: Vec<DateTime<Utc>> = rows.iter().map(|w| w.window_end).collect();
    let round_starts: Vec<&str> = rows.iter().map(|w| w.start).collect();
    let fences: Vec<Option<i64>> = rows.iter().map(|w| w.fence).collect();
    let by: Vec<Option<&str>> = rows.iter().map(|w| w.committed_by.as_deref()).collect();
    sqlx::query_as(
        "UPDATE sync_tuples t SET \
           link = v.link, link_kind = v.kind, link_user_id = v.u, link_calendar_id = v.c, \
           link_window_start = v.ws, link_window_end = v.we, link_version = t.link_version + 1, \
           full_round = t.full_round + CASE WHEN v.st = 'full' THEN 1 ELSE 0 END, \
           round_is_full = CASE WHEN v.st = 'full' THEN true WHEN v.st = 'delta' THEN false ELSE t.round_is_full END, \
           round_pages = CASE WHEN v.st <> '' THEN 1 ELSE t.round_pages + 1 END, \
           round_started_at = CASE WHEN v.st <> '' THEN now() ELSE t.round_started_at END, \
           last_attempt_at = now(), updated_at = now(), \
           last_success_at = CASE WHEN v.kind = 'delta' THEN now() ELSE t.last_success_at END, \
           last_full_sync_at = CASE WHEN v.kind = 'delta' AND (v.st = 'full' OR (v.st = '' AND t.round_is_full)) \
                               THEN now() ELSE t.last_full_sync_at END, \
           state = CASE WHEN v.kind = 'delta' THEN 'ok' ELSE t.state END, \
           consecutive_failures = CASE WHEN v.kind = 'delta' THEN 0 ELSE t.consecutive_failures END, \
           last_error = CASE WHEN v.kind = 'delta' THEN NULL ELSE t.last_error END, \
           last_error_code = CASE WHEN v.kind = 'delta' THEN NULL ELSE t.last_error_code END, \
           committed_by = v.by, \
           served_start = CASE WHEN v.kind = 'delta' THEN v.ws ELSE t.served_start END, \
           served_end = CASE WHEN v.kind = 'delta' THEN v.we ELSE t.served_end END \
         FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::timestamptz[], $8::timestamptz[], $9::text[], $10::bigint[], $11::text[]) \
              AS v(id, expected, link, kind, u, c, ws, we, st, fence, by) \
         WHERE t.id = v.id AND t.link_version = v.expected AND (v.fence IS NULL OR EXISTS \
           (SELECT 1 FROM mailbox_leases l JOIN replicas r ON r.deployment = l.deployment AND r.incarnation = l.owner \
             WHERE l.deployment = t.deployment AND l.mailbox = t.mailbox AND l.fence = v.fence AND r.expires_at > now())) \
         RETURNING t.id, t.link_version, t.full_round, t.round_is_full, \
           (t.served_start IS NOT NULL AND (t.served_start, t.served_end) IS DISTINCT FROM (v.ws, v.we))",
    )
    .bind(&ids)
    .bind(&expected)
    .bind(&links)
    .bind(&kinds)
    .bind(&users)
    .bind(&cals)
    .bind(&starts)
    .bind(&ends)
    .bind(&round_starts)
    .bind(&fences)
    .bind(&by)
    .fetch_all(exec)
    .await
    .map_err(db)
}
