//! Applying one page: its rows, its removals, any sweep and the link after it commit in one
//! transaction, guarded by the tuple's `link_version`.

use crate::Store;
use crate::error::{StoreError, db};
use crate::page::{EventRow, PageChanges};
use crate::tuples::{LinkKind, LinkStamp};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Postgres, Transaction};

/// Which round a page begins, if it is the first page of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundStart {
    /// A full round (initial sync or resync): rows not seen in it are swept at its end.
    Full,
    /// An incremental round from a deltaLink.
    Delta,
}

/// One page's effect, applied atomically with the link that follows it.
#[derive(Debug)]
pub struct PageWrite<'a> {
    /// The tuple the page belongs to.
    pub tuple_id: i64,
    /// The `link_version` the writer read; the write fails with `Conflict` if it moved.
    pub expected_version: i64,
    /// Set on the first page of a round.
    pub round_start: Option<RoundStart>,
    /// The page's writes, reduced to at most one per id.
    pub changes: &'a PageChanges,
    /// The link that follows the page.
    pub link: &'a str,
    /// Whether `link` is a nextLink or the round's deltaLink.
    pub link_kind: LinkKind,
    /// What `link` was made for.
    pub stamp: &'a LinkStamp,
}

/// What applying a page did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PageApplied {
    /// The tuple's `link_version` after the commit.
    pub version: i64,
    /// Rows inserted or changed.
    pub upserted: u64,
    /// Rows deleted by `@removed`.
    pub removed: u64,
    /// Rows deleted by the sweep at the end of a full round.
    pub swept: u64,
}

impl Store {
    /// Applies one page and saves the link after it, in one transaction: a crash at any
    /// instant leaves either the page and its link, or neither.
    pub async fn apply_page(&self, w: &PageWrite<'_>) -> Result<PageApplied, StoreError> {
        self.panic_point(w.tuple_id);
        let c = w.changes;
        let may_sweep = w.link_kind == LinkKind::Delta && w.round_start != Some(RoundStart::Delta);
        if c.full.is_empty() && c.partial.is_empty() && c.removed.is_empty() && !may_sweep {
            // Only the link moves: one UPDATE is already atomic, no transaction needed. This
            // is every no-change incremental round.
            self.fault_point()?;
            let (version, _, _) = claim(&self.pool, w).await?;
            return Ok(PageApplied {
                version,
                ..PageApplied::default()
            });
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        let applied = self.apply_in(&mut tx, w).await?;
        self.fault_point()?;
        tx.commit().await.map_err(db)?;
        Ok(applied)
    }

    async fn apply_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        w: &PageWrite<'_>,
    ) -> Result<PageApplied, StoreError> {
        let (version, full_round, round_is_full) = claim(&mut **tx, w).await?;
        self.fault_point()?;
        let mut applied = PageApplied {
            version,
            ..PageApplied::default()
        };
        let c = w.changes;
        if !c.removed.is_empty() {
            let r = sqlx::query(
                "DELETE FROM events WHERE tuple_id = $1 AND event_id = ANY($2::text[])",
            )
            .bind(w.tuple_id)
            .bind(&c.removed)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            applied.removed = r.rows_affected();
            self.fault_point()?;
        }
        if !c.full.is_empty() {
            applied.upserted += upsert(tx, w.tuple_id, full_round, &c.full, false).await?;
            self.fault_point()?;
        }
        if !c.partial.is_empty() {
            applied.upserted += upsert(tx, w.tuple_id, full_round, &c.partial, true).await?;
            self.fault_point()?;
        }
        if w.link_kind == LinkKind::Delta && round_is_full {
            // The full round reached its deltaLink: whatever it did not list is gone.
            let r = sqlx::query("DELETE FROM events WHERE tuple_id = $1 AND seen_round < $2")
                .bind(w.tuple_id)
                .bind(full_round)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            applied.swept = r.rows_affected();
            self.fault_point()?;
        }
        Ok(applied)
    }
}

/// Claims the tuple and saves the link: the row lock orders concurrent writers, the version
/// check refuses a writer that read an older link.
async fn claim<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    w: &PageWrite<'_>,
) -> Result<(i64, i64, bool), StoreError> {
    let start = match w.round_start {
        Some(RoundStart::Full) => "full",
        Some(RoundStart::Delta) => "delta",
        None => "",
    };
    let kind = w.link_kind.as_str();
    let row: Option<(i64, i64, bool)> = sqlx::query_as(
            "UPDATE sync_tuples SET \
               link = $3, link_kind = $4, link_user_id = $5, link_calendar_id = $6, \
               link_window_start = $7, link_window_end = $8, link_version = link_version + 1, \
               full_round = full_round + CASE WHEN $9 = 'full' THEN 1 ELSE 0 END, \
               round_is_full = CASE WHEN $9 = 'full' THEN true WHEN $9 = 'delta' THEN false ELSE round_is_full END, \
               round_pages = CASE WHEN $9 <> '' THEN 1 ELSE round_pages + 1 END, \
               round_started_at = CASE WHEN $9 <> '' THEN now() ELSE round_started_at END, \
               last_attempt_at = now(), updated_at = now(), \
               last_success_at = CASE WHEN $4 = 'delta' THEN now() ELSE last_success_at END, \
               last_full_sync_at = CASE WHEN $4 = 'delta' AND ($9 = 'full' OR ($9 = '' AND round_is_full)) THEN now() ELSE last_full_sync_at END, \
               state = CASE WHEN $4 = 'delta' THEN 'ok' ELSE state END, \
               consecutive_failures = CASE WHEN $4 = 'delta' THEN 0 ELSE consecutive_failures END, \
               last_error = CASE WHEN $4 = 'delta' THEN NULL ELSE last_error END, \
               last_error_code = CASE WHEN $4 = 'delta' THEN NULL ELSE last_error_code END \
             WHERE id = $1 AND link_version = $2 \
             RETURNING link_version, full_round, round_is_full",
        )
        .bind(w.tuple_id)
        .bind(w.expected_version)
        .bind(w.link)
        .bind(kind)
        .bind(&w.stamp.user_id)
        .bind(&w.stamp.calendar_id)
        .bind(w.stamp.window_start)
        .bind(w.stamp.window_end)
        .bind(start)
        .fetch_optional(exec)
        .await
        .map_err(db)?;
    row.ok_or(StoreError::Conflict {
        tuple_id: w.tuple_id,
    })
}

async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    round: i64,
    rows: &[EventRow],
    partial: bool,
) -> Result<u64, StoreError> {
    let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    let icals: Vec<Option<&str>> = rows.iter().map(|r| r.ical_uid.as_deref()).collect();
    let subjects: Vec<Option<&str>> = rows.iter().map(|r| r.subject.as_deref()).collect();
    let starts: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.start_at).collect();
    let ends: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.end_at).collect();
    let all_day: Vec<Option<bool>> = rows.iter().map(|r| r.is_all_day).collect();
    let types: Vec<Option<&str>> = rows.iter().map(|r| r.event_type.as_deref()).collect();
    let masters: Vec<Option<&str>> = rows.iter().map(|r| r.series_master_id.as_deref()).collect();
    let modified: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.last_modified_at).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.change_key.as_deref()).collect();
    let payloads: Vec<sqlx::types::Json<&serde_json::Map<String, serde_json::Value>>> =
        rows.iter().map(|r| sqlx::types::Json(&r.payload)).collect();
    let on_conflict = if partial {
        // A partial item never nulls out what is stored.
        "ical_uid = COALESCE(EXCLUDED.ical_uid, events.ical_uid), subject = COALESCE(EXCLUDED.subject, events.subject), \
         start_at = COALESCE(EXCLUDED.start_at, events.start_at), end_at = COALESCE(EXCLUDED.end_at, events.end_at), \
         is_all_day = COALESCE(EXCLUDED.is_all_day, events.is_all_day), event_type = COALESCE(EXCLUDED.event_type, events.event_type), \
         series_master_id = COALESCE(EXCLUDED.series_master_id, events.series_master_id), \
         last_modified_at = COALESCE(EXCLUDED.last_modified_at, events.last_modified_at), \
         change_key = COALESCE(EXCLUDED.change_key, events.change_key), payload = events.payload || EXCLUDED.payload, \
         seen_round = EXCLUDED.seen_round, synced_at = now()"
    } else {
        "ical_uid = EXCLUDED.ical_uid, subject = EXCLUDED.subject, start_at = EXCLUDED.start_at, end_at = EXCLUDED.end_at, \
         is_all_day = EXCLUDED.is_all_day, event_type = EXCLUDED.event_type, series_master_id = EXCLUDED.series_master_id, \
         last_modified_at = EXCLUDED.last_modified_at, change_key = EXCLUDED.change_key, payload = EXCLUDED.payload, \
         seen_round = EXCLUDED.seen_round, synced_at = now() \
         WHERE events.change_key IS DISTINCT FROM EXCLUDED.change_key OR EXCLUDED.change_key IS NULL \
            OR events.seen_round <> EXCLUDED.seen_round"
    };
    let sql = format!(
        "INSERT INTO events (tuple_id, event_id, ical_uid, subject, start_at, end_at, is_all_day, event_type, \
           series_master_id, last_modified_at, change_key, payload, seen_round) \
         SELECT $1, u.* , $13 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], \
           $7::bool[], $8::text[], $9::text[], $10::timestamptz[], $11::text[], $12::jsonb[]) AS u \
         ON CONFLICT (tuple_id, event_id) DO UPDATE SET {on_conflict}"
    );
    let r = sqlx::query(&sql)
        .bind(tuple_id)
        .bind(&ids)
        .bind(&icals)
        .bind(&subjects)
        .bind(&starts)
        .bind(&ends)
        .bind(&all_day)
        .bind(&types)
        .bind(&masters)
        .bind(&modified)
        .bind(&keys)
        .bind(&payloads)
        .bind(round)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    Ok(r.rows_affected())
}
