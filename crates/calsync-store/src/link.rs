//! The link statement: the one place a tuple's link and round state are written, for a batch
//! of link-only commits ([`crate::batch`]) and, with one row, as the first statement of a page's
//! transaction ([`claim`]). Each row keeps its own `link_version` and fencing checks.

use crate::error::{StoreError, db};
use crate::write::{PageWrite, RoundStart};
use chrono::{DateTime, Utc};

/// A tuple's link after a page, with the checks its write must pass: what [`save_links`]
/// saves, one row of its `UNNEST`.
pub(crate) struct LinkSave {
    pub(crate) tuple_id: i64,
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

/// Saves each row's link in one statement, only where its `link_version` and fencing token
/// (if any) are current: the one place a tuple's link and round state are written. Returns
/// (tuple id, new link_version, full_round, round_is_full, rebasing) for the rows saved; a
/// row refused is absent. `rebasing`: the tuple's rows mirror another window than this link's
/// (the full round of a moved window is under way), so rows it adds wait, hidden, for its last
/// page; a round's last page makes the link's window the served one. Used for a batch of link-only commits and, with one row, inside a page's
/// transaction.
///
/// `feed_lock`: the deployment whose change feed the transaction is to write; the statement
/// first takes that feed's lock, shared (`calsync_feed_lock`, migration `0010_change_feed.sql`),
/// before it writes a row and so before the transaction has an id.
pub(crate) async fn save_links<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    rows: &[&LinkSave],
    feed_lock: Option<&str>,
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
              AS v(id, expected, link, kind, u, c, ws, we, st, fence, by), \
              (SELECT calsync_feed_lock($12, false) AS locked) AS feed \
         WHERE feed.locked AND t.id = v.id AND t.link_version = v.expected AND (v.fence IS NULL OR EXISTS \
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
    .bind(feed_lock)
    .fetch_all(exec)
    .await
    .map_err(db)
}

/// Claims the tuple and saves the link (the same statement as a batch of link-only commits,
/// with one row): the row lock orders concurrent writers, the version check refuses a writer
/// that read an older link, the fence check one that lost its mailbox's lease.
pub(crate) async fn claim<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    w: &PageWrite<'_>,
    committed_by: Option<&str>,
    feed_lock: Option<&str>,
) -> Result<(i64, i64, bool, bool), StoreError> {
    let save = LinkSave::of(w, committed_by);
    let saved = save_links(exec, &[&save], feed_lock).await?;
    // Which check refused the write is told apart afterwards, off the hot path.
    saved
        .first()
        .map(|r| (r.1, r.2, r.3, r.4))
        .ok_or(StoreError::Conflict {
            tuple_id: w.tuple_id,
        })
}
