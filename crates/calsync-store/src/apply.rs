//! Applying one page: its rows, its removals, any sweep and the link after it commit in one
//! transaction, guarded by the tuple's `link_version`.

use crate::Store;
use crate::batch::{LinkSave, save_links};
use crate::error::{StoreError, db};
use crate::page::{Details, EventRow, PageChanges, SeriesRow};
use crate::tuples::{LinkKind, LinkStamp};
use chrono::{DateTime, NaiveDate, Utc};
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
    /// The fencing token of the mailbox lease the writer holds; the write fails with
    /// `Fenced` unless that lease is current. `None` only for a writer outside any lease (a
    /// test or benchmark driving the engine directly).
    pub fence: Option<i64>,
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
    /// Items PostgreSQL refused even after repair, kept as quarantined rows.
    pub quarantined: u64,
}

impl Store {
    /// Applies one page and saves the link after it, in one transaction: a crash at any
    /// instant leaves either the page and its link, or neither.
    pub async fn apply_page(&self, w: &PageWrite<'_>) -> Result<PageApplied, StoreError> {
        self.panic_point(w.tuple_id);
        let c = w.changes;
        let may_sweep = w.link_kind == LinkKind::Delta && w.round_start != Some(RoundStart::Delta);
        let result = if c.is_empty() && !may_sweep {
            // Only the link moves (every no-change incremental round): one UPDATE is already
            // atomic, no transaction needed, and it is saved together with the links of the
            // rounds that finish at about the same time, each statement under the deadline.
            self.commit_link(w).await
        } else {
            self.bounded("applying a page", self.apply_page_now(w))
                .await
        };
        match (result, w.fence) {
            (Err(StoreError::Conflict { tuple_id }), Some(fence)) => {
                // Which check refused the write: told apart here, off the hot path.
                if self.holds_lease(tuple_id, fence).await? {
                    Err(StoreError::Conflict { tuple_id })
                } else {
                    Err(StoreError::Fenced { tuple_id })
                }
            }
            (result, _) => result,
        }
    }

    /// Whether the lease of `tuple_id`'s mailbox is current with fencing token `fence`.
    pub async fn holds_lease(&self, tuple_id: i64, fence: i64) -> Result<bool, StoreError> {
        let query = async {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM sync_tuples t \
                   JOIN mailbox_leases l ON l.deployment = t.deployment AND l.mailbox = t.mailbox \
                   JOIN replicas r ON r.deployment = l.deployment AND r.incarnation = l.owner \
                 WHERE t.id = $1 AND l.fence = $2 AND r.expires_at > now())",
            )
            .bind(tuple_id)
            .bind(fence)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
        };
        self.bounded("checking a lease", query).await
    }

    async fn commit_link(&self, w: &PageWrite<'_>) -> Result<PageApplied, StoreError> {
        self.fault_point()?;
        let version = self
            .batcher
            .commit(&self.pool, self.deadline, w, self.incarnation())
            .await?
            .ok_or(StoreError::Conflict {
                tuple_id: w.tuple_id,
            })?;
        Ok(PageApplied {
            version,
            ..PageApplied::default()
        })
    }

    async fn apply_page_now(&self, w: &PageWrite<'_>) -> Result<PageApplied, StoreError> {
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
        let (version, full_round, round_is_full, rebasing) =
            claim(&mut **tx, w, self.incarnation()).await?;
        self.fault_point()?;
        let mut applied = PageApplied {
            version,
            ..PageApplied::default()
        };
        let c = w.changes;
        if !c.removed.is_empty() {
            // An id may be a series master's: the series goes, and every instance of it.
            let r = sqlx::query(
                "DELETE FROM events WHERE tuple_id = $1 \
                   AND (event_id = ANY($2::text[]) OR series_master_id = ANY($2::text[]))",
            )
            .bind(w.tuple_id)
            .bind(&c.removed)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            applied.removed = r.rows_affected();
            sqlx::query("DELETE FROM series WHERE tuple_id = $1 AND master_id = ANY($2::text[])")
                .bind(w.tuple_id)
                .bind(&c.removed)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            self.fault_point()?;
        }
        if !c.series.is_empty() {
            upsert_series(tx, w.tuple_id, full_round, &c.series).await?;
            self.fault_point()?;
        }
        for (rows, partial) in [(&c.full, false), (&c.partial, true)] {
            if rows.is_empty() {
                continue;
            }
            let (upserted, quarantined) =
                upsert_isolating(tx, w.tuple_id, full_round, rows, partial, rebasing).await?;
            applied.upserted += upserted;
            applied.quarantined += quarantined;
            self.fault_point()?;
        }
        // While a moved window's full round runs, the old window's occurrences stay until its
        // last page; that page's sweep removes whatever the new window's round did not list.
        for s in c.reconcile.iter().filter(|_| !rebasing) {
            // Occurrences Outlook dropped without a word (cancelled, retimed): what the
            // series' /instances no longer lists, and this page did not just write, is gone.
            let written: Vec<&str> = c
                .full
                .iter()
                .chain(&c.partial)
                .filter(|r| r.series_master_id.as_deref() == Some(s.master_id.as_str()))
                .map(|r| r.event_id.as_str())
                .collect();
            let r = sqlx::query(
                "DELETE FROM events WHERE tuple_id = $1 AND series_master_id = $2 \
                   AND NOT (event_id = ANY($3::text[])) AND NOT (event_id = ANY($4::text[]))",
            )
            .bind(w.tuple_id)
            .bind(&s.master_id)
            .bind(&s.live)
            .bind(&written)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            applied.removed += r.rows_affected();
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
            // Series neither listed in the round nor holding an instance are gone too.
            sqlx::query(
                "DELETE FROM series s WHERE s.tuple_id = $1 AND s.seen_round < $2 \
                   AND NOT EXISTS (SELECT 1 FROM events e \
                                    WHERE e.tuple_id = s.tuple_id AND e.series_master_id = s.master_id)",
            )
            .bind(w.tuple_id)
            .bind(full_round)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
            // The switch: what this round added while the old window was served shows now,
            // with the sweep of what left, in this transaction.
            sqlx::query("UPDATE events SET pending = false WHERE tuple_id = $1 AND pending")
                .bind(w.tuple_id)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            self.fault_point()?;
        }
        Ok(applied)
    }
}

/// Claims the tuple and saves the link (the same statement as a batch of link-only commits,
/// with one row): the row lock orders concurrent writers, the version check refuses a writer
/// that read an older link, the fence check one that lost its mailbox's lease.
async fn claim<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    w: &PageWrite<'_>,
    committed_by: Option<&str>,
) -> Result<(i64, i64, bool, bool), StoreError> {
    let save = LinkSave::of(w, committed_by);
    let saved = save_links(exec, &[&save]).await?;
    // Which check refused the write is told apart afterwards, off the hot path.
    saved
        .first()
        .map(|r| (r.1, r.2, r.3, r.4))
        .ok_or(StoreError::Conflict {
            tuple_id: w.tuple_id,
        })
}

/// The per-row arrays of the read model's detail columns, bound as `UNNEST` parameters.
struct DetailColumns<'a> {
    ical_uid: Vec<Option<&'a str>>,
    subject: Vec<Option<&'a str>>,
    is_all_day: Vec<Option<bool>>,
    is_cancelled: Vec<Option<bool>>,
    organizer_email: Vec<Option<&'a str>>,
    location: Vec<Option<&'a str>>,
    show_as: Vec<Option<&'a str>>,
    online_meeting_url: Vec<Option<&'a str>>,
    original_start_time_zone: Vec<Option<&'a str>>,
    last_modified_at: Vec<Option<DateTime<Utc>>>,
    change_key: Vec<Option<&'a str>>,
}

/// The detail columns, in the order [`DetailColumns::bind`] binds them.
const DETAIL_COLUMNS: &str = "ical_uid, subject, is_all_day, is_cancelled, organizer_email, location, \
     show_as, online_meeting_url, original_start_time_zone, last_modified_at, change_key";
const DETAIL_TYPES: [&str; 11] = [
    "text[]",
    "text[]",
    "bool[]",
    "bool[]",
    "text[]",
    "text[]",
    "text[]",
    "text[]",
    "text[]",
    "timestamptz[]",
    "text[]",
];

impl<'a> DetailColumns<'a> {
    fn of(details: impl Iterator<Item = &'a Details>) -> Self {
        let mut c = DetailColumns {
            ical_uid: Vec::new(),
            subject: Vec::new(),
            is_all_day: Vec::new(),
            is_cancelled: Vec::new(),
            organizer_email: Vec::new(),
            location: Vec::new(),
            show_as: Vec::new(),
            online_meeting_url: Vec::new(),
            original_start_time_zone: Vec::new(),
            last_modified_at: Vec::new(),
            change_key: Vec::new(),
        };
        for d in details {
            c.ical_uid.push(d.ical_uid.as_deref());
            c.subject.push(d.subject.as_deref());
            c.is_all_day.push(d.is_all_day);
            c.is_cancelled.push(d.is_cancelled);
            c.organizer_email.push(d.organizer_email.as_deref());
            c.location.push(d.location.as_deref());
            c.show_as.push(d.show_as.as_deref());
            c.online_meeting_url.push(d.online_meeting_url.as_deref());
            c.original_start_time_zone
                .push(d.original_start_time_zone.as_deref());
            c.last_modified_at.push(d.last_modified_at);
            c.change_key.push(d.change_key.as_deref());
        }
        c
    }

    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.ical_uid)
            .bind(&self.subject)
            .bind(&self.is_all_day)
            .bind(&self.is_cancelled)
            .bind(&self.organizer_email)
            .bind(&self.location)
            .bind(&self.show_as)
            .bind(&self.online_meeting_url)
            .bind(&self.original_start_time_zone)
            .bind(&self.last_modified_at)
            .bind(&self.change_key)
    }
}

/// `$first::text[], …` for the detail columns' parameters.
fn detail_params(first: usize) -> String {
    DETAIL_TYPES
        .iter()
        .enumerate()
        .map(|(i, t)| format!("${}::{t}", first + i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `col = EXCLUDED.col` (or, for a partial row, `COALESCE(EXCLUDED.col, table.col)`).
fn detail_updates(table: &str, partial: bool) -> String {
    DETAIL_COLUMNS
        .split(',')
        .map(str::trim)
        .map(|c| {
            if partial {
                format!("{c} = COALESCE(EXCLUDED.{c}, {table}.{c})")
            } else {
                format!("{c} = EXCLUDED.{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    round: i64,
    rows: &[EventRow],
    partial: bool,
    pending: bool,
) -> Result<u64, StoreError> {
    let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    let starts: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.start_at).collect();
    let ends: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.end_at).collect();
    let start_dates: Vec<Option<NaiveDate>> = rows.iter().map(|r| r.start_date).collect();
    let end_dates: Vec<Option<NaiveDate>> = rows.iter().map(|r| r.end_date).collect();
    let time_errors: Vec<Option<&str>> = rows.iter().map(|r| r.time_error.as_deref()).collect();
    let types: Vec<Option<&str>> = rows.iter().map(|r| r.event_type.as_deref()).collect();
    let masters: Vec<Option<&str>> = rows.iter().map(|r| r.series_master_id.as_deref()).collect();
    let payloads: Vec<sqlx::types::Json<&serde_json::Map<String, serde_json::Value>>> =
        rows.iter().map(|r| sqlx::types::Json(&r.payload)).collect();
    let details = DetailColumns::of(rows.iter().map(|r| &r.details));
    let on_conflict = if partial {
        // A partial item (an occurrence stub) never nulls out what is stored.
        format!(
            "start_at = COALESCE(EXCLUDED.start_at, events.start_at), end_at = COALESCE(EXCLUDED.end_at, events.end_at), \
             start_date = COALESCE(EXCLUDED.start_date, events.start_date), end_date = COALESCE(EXCLUDED.end_date, events.end_date), \
             time_error = CASE WHEN EXCLUDED.start_at IS NOT NULL OR EXCLUDED.time_error IS NOT NULL THEN EXCLUDED.time_error ELSE events.time_error END, \
             event_type = COALESCE(EXCLUDED.event_type, events.event_type), \
             series_master_id = COALESCE(EXCLUDED.series_master_id, events.series_master_id), \
             {}, payload = events.payload || EXCLUDED.payload, seen_round = EXCLUDED.seen_round, synced_at = now()",
            detail_updates("events", true)
        )
    } else {
        format!(
            "start_at = EXCLUDED.start_at, end_at = EXCLUDED.end_at, start_date = EXCLUDED.start_date, \
             end_date = EXCLUDED.end_date, time_error = EXCLUDED.time_error, quarantined = NULL, event_type = EXCLUDED.event_type, \
             series_master_id = EXCLUDED.series_master_id, {}, payload = EXCLUDED.payload, \
             seen_round = EXCLUDED.seen_round, synced_at = now() \
             WHERE events.change_key IS DISTINCT FROM EXCLUDED.change_key OR EXCLUDED.change_key IS NULL \
                OR events.seen_round <> EXCLUDED.seen_round",
            detail_updates("events", false)
        )
    };
    let sql = format!(
        "INSERT INTO events (tuple_id, event_id, start_at, end_at, start_date, end_date, time_error, event_type, \
           series_master_id, payload, {DETAIL_COLUMNS}, seen_round, pending) \
         SELECT $1, u.*, $2, $23 FROM UNNEST($3::text[], $4::timestamptz[], $5::timestamptz[], $6::date[], $7::date[], \
           $8::text[], $9::text[], $10::text[], $11::jsonb[], {}) AS u \
         ON CONFLICT (tuple_id, event_id) DO UPDATE SET {on_conflict}",
        detail_params(12)
    );
    let q = sqlx::query(&sql)
        .bind(tuple_id)
        .bind(round)
        .bind(&ids)
        .bind(&starts)
        .bind(&ends)
        .bind(&start_dates)
        .bind(&end_dates)
        .bind(&time_errors)
        .bind(&types)
        .bind(&masters)
        .bind(&payloads);
    // A row that exists keeps its `pending`: one the old window shows stays shown.
    let r = details
        .bind(q)
        .bind(pending)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    Ok(r.rows_affected())
}

/// The most payload one statement carries. sqlx keeps each connection's buffers at the size of
/// the largest message it has sent, so one 20 MB page written as one statement would leave
/// 20 MB or more behind on every pooled connection, outside the page memory budget (measured:
/// 560 MiB peak with a 64 MiB budget before this, BENCHMARKS.md).
const STATEMENT_BYTES: usize = 2 * 1024 * 1024;

/// `rows` in consecutive chunks of about `limit` bytes of payload each (a row larger than the
/// limit is a chunk of its own).
fn by_size(rows: &[EventRow], limit: usize) -> Vec<&[EventRow]> {
    let mut out = Vec::new();
    let (mut from, mut bytes) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        let n = approx_json_len(&r.payload);
        if i > from && bytes + n > limit {
            out.push(&rows[from..i]);
            (from, bytes) = (i, 0);
        }
        bytes += n;
    }
    if from < rows.len() {
        out.push(&rows[from..]);
    }
    out
}

/// About how many bytes an object takes as JSON: its strings and keys, plus a little per value.
fn approx_json_len(m: &serde_json::Map<String, serde_json::Value>) -> usize {
    fn value(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => s.len() + 2,
            serde_json::Value::Array(a) => a.iter().map(value).sum::<usize>() + 2,
            serde_json::Value::Object(m) => approx_json_len(m),
            _ => 8,
        }
    }
    m.iter().map(|(k, v)| k.len() + 4 + value(v)).sum::<usize>() + 2
}

/// Upserts `rows`; if PostgreSQL refuses a value in them (SQLSTATE class 22, after the repair
/// `reduce` already did), each row is tried on its own under a savepoint and the refused ones are
/// kept as quarantined rows (id, type, series, the reason), so the rest of the page commits.
/// Returns (rows written, rows quarantined).
async fn upsert_isolating(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    round: i64,
    rows: &[EventRow],
    partial: bool,
    pending: bool,
) -> Result<(u64, u64), StoreError> {
    let savepoint = |name: &'static str| format!("SAVEPOINT {name}");
    sqlx::query(&savepoint("calsync_batch"))
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    let mut all = Ok(0);
    for chunk in by_size(rows, STATEMENT_BYTES) {
        match upsert(tx, tuple_id, round, chunk, partial, pending).await {
            Ok(n) => {
                if let Ok(total) = &mut all {
                    *total += n;
                }
            }
            Err(e) => {
                all = Err(e);
                break;
            }
        }
    }
    match all {
        Ok(n) => return Ok((n, 0)),
        Err(StoreError::Refused { .. }) => {}
        Err(e) => return Err(e),
    }
    sqlx::query("ROLLBACK TO SAVEPOINT calsync_batch")
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    let (mut written, mut quarantined) = (0, 0);
    for row in rows {
        sqlx::query(&savepoint("calsync_row"))
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        match upsert(
            tx,
            tuple_id,
            round,
            std::slice::from_ref(row),
            partial,
            pending,
        )
        .await
        {
            Ok(n) => written += n,
            Err(StoreError::Refused { sqlstate, message }) => {
                sqlx::query("ROLLBACK TO SAVEPOINT calsync_row")
                    .execute(&mut **tx)
                    .await
                    .map_err(db)?;
                let reason = format!("PostgreSQL refused a value ({sqlstate}): {message}");
                tracing::warn!(tuple_id, event = %row.event_id, %reason, "event quarantined");
                quarantine(tx, tuple_id, round, row, &reason, pending).await?;
                quarantined += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok((written, quarantined))
}

/// Keeps a row PostgreSQL refused as what can be stored of it: its id, type and series, and
/// why. It leaves as any row does (an `@removed`, a sweep) and is replaced when Graph sends the
/// item again in a form that can be stored.
async fn quarantine(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    round: i64,
    row: &EventRow,
    reason: &str,
    pending: bool,
) -> Result<(), StoreError> {
    let clean = |s: &str| s.chars().filter(|c| *c != '\0').collect::<String>();
    let payload =
        serde_json::json!({"id": clean(&row.event_id), "@calsync.quarantined": clean(reason)});
    sqlx::query(
        "INSERT INTO events (tuple_id, event_id, event_type, series_master_id, payload, seen_round, quarantined, pending) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (tuple_id, event_id) DO UPDATE SET event_type = EXCLUDED.event_type, \
           series_master_id = EXCLUDED.series_master_id, payload = EXCLUDED.payload, \
           seen_round = EXCLUDED.seen_round, quarantined = EXCLUDED.quarantined, synced_at = now()",
    )
    .bind(tuple_id)
    .bind(clean(&row.event_id))
    .bind(row.event_type.as_deref().map(clean))
    .bind(row.series_master_id.as_deref().map(clean))
    .bind(sqlx::types::Json(payload))
    .bind(round)
    .bind(clean(reason))
    .bind(pending)
    .execute(&mut **tx)
    .await
    .map_err(db)?;
    Ok(())
}

async fn upsert_series(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    round: i64,
    rows: &[SeriesRow],
) -> Result<(), StoreError> {
    let ids: Vec<&str> = rows.iter().map(|r| r.master_id.as_str()).collect();
    let payloads: Vec<sqlx::types::Json<&serde_json::Map<String, serde_json::Value>>> =
        rows.iter().map(|r| sqlx::types::Json(&r.payload)).collect();
    let details = DetailColumns::of(rows.iter().map(|r| &r.details));
    let sql = format!(
        "INSERT INTO series (tuple_id, master_id, payload, {DETAIL_COLUMNS}, seen_round) \
         SELECT $1, u.*, $2 FROM UNNEST($3::text[], $4::jsonb[], {}) AS u \
         ON CONFLICT (tuple_id, master_id) DO UPDATE SET {}, payload = EXCLUDED.payload, \
           seen_round = EXCLUDED.seen_round, synced_at = now()",
        detail_params(5),
        detail_updates("series", false)
    );
    let q = sqlx::query(&sql)
        .bind(tuple_id)
        .bind(round)
        .bind(&ids)
        .bind(&payloads);
    details.bind(q).execute(&mut **tx).await.map_err(db)?;
    Ok(())
}

impl Store {
    /// Which of `master_ids` this tuple has stored as series: the others' occurrence stubs
    /// need their master fetched before the page commits.
    pub async fn known_series(
        &self,
        tuple_id: i64,
        master_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if master_ids.is_empty() {
            return Ok(Default::default());
        }
        let query = async {
            sqlx::query_scalar::<_, String>(
                "SELECT master_id FROM series WHERE tuple_id = $1 AND master_id = ANY($2::text[])",
            )
            .bind(tuple_id)
            .bind(master_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        };
        let rows = self.bounded("reading known series", query).await?;
        Ok(rows.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::Details;

    fn row(id: &str, body: usize) -> EventRow {
        let mut payload = serde_json::Map::new();
        payload.insert("id".into(), serde_json::json!(id));
        payload.insert(
            "body".into(),
            serde_json::json!({"content": "x".repeat(body)}),
        );
        EventRow {
            event_id: id.into(),
            start_at: None,
            end_at: None,
            start_date: None,
            end_date: None,
            time_error: None,
            event_type: None,
            series_master_id: None,
            details: Details::default(),
            partial: false,
            payload,
        }
    }

    #[test]
    fn large_pages_are_written_in_statements_of_bounded_size() {
        let rows: Vec<EventRow> = (0..10).map(|i| row(&i.to_string(), 300_000)).collect();
        let chunks = by_size(&rows, 1_000_000);
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        let small: Vec<EventRow> = (0..200).map(|i| row(&i.to_string(), 100)).collect();
        assert_eq!(
            by_size(&small, 1_000_000).len(),
            1,
            "a normal page is one statement"
        );
        let huge = [row("h", 5_000_000)];
        assert_eq!(
            by_size(&huge, 1_000_000).len(),
            1,
            "a row larger than the limit alone"
        );
        assert!(by_size(&[], 1_000_000).is_empty());
    }
}
