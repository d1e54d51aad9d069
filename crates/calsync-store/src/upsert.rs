//! The page transaction's writing steps: events upserted in statements of bounded size, each
//! returning the ids it changed; a value PostgreSQL refuses isolated under savepoints and its row
//! kept as quarantined; series masters upserted.

use crate::changes::Stored;
use crate::columns::{DETAIL_COLUMNS, DetailColumns, detail_params, detail_updates};
use crate::error::{StoreError, db};
use crate::page::{EventRow, SeriesRow};
use calsync_details::COLUMNS;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{Postgres, Transaction};

/// What an upsert of events wrote: the ids whose rows were inserted or updated (a row whose
/// `changeKey` did not move in the same round is not), of those the ones whose change it wrote
/// to the feed (`fed`: shown, and differing from the row they replaced), and those kept as
/// quarantined.
#[derive(Debug, Default)]
pub(crate) struct Upserted {
    pub(crate) written: Vec<String>,
    pub(crate) fed: Vec<String>,
    pub(crate) quarantined: Vec<String>,
}

/// The columns of a stored row that are round bookkeeping, not content: a full round rewrites
/// them on every row it lists, and a row that differs only in them did not change.
const BOOKKEEPING: &str = "'{seen_round,synced_at}'::text[]";

/// `insert` (an `INSERT … RETURNING {table}.*` of rows keyed by `key`) as the CTE `up`, with
/// `same`: the keys of the rows it rewrote without a change, those that existed and differ
/// from the row they replaced (read in the same statement, so before the write) in no more
/// than [`BOOKKEEPING`]. Only rows the insert updated are read back: `xmax = 0` in `RETURNING`
/// marks a row the insert created (an updated row carries the lock its update took).
/// PostgreSQL does not document this, but it has held since `ON CONFLICT` came in 9.5 (Laurenz
/// Albe on Stack Overflow, "Differentiate inserted and updated rows in UPSERT using system
/// columns"). Should it ever not hold, an inserted row would be read back and found absent
/// (changed, as it is), an updated one would count as changed though it is not: the tests of
/// rounds that change nothing would fail. A page of new rows (an initial sync) reads nothing
/// back (BENCHMARKS.md, issue 25).
fn rewritten(insert: &str, table: &str, key: &str) -> String {
    format!(
        "WITH up AS ({insert}, (xmax = 0) AS fresh), \
              same AS MATERIALIZED (SELECT o.{key} FROM {table} o JOIN up ON up.{key} = o.{key} AND NOT up.fresh \
                                    WHERE o.tuple_id = $1 AND o.{key} = ANY(ARRAY(SELECT {key} FROM up WHERE NOT fresh)) \
                                      AND to_jsonb(o) - {BOOKKEEPING} = to_jsonb(up) - {BOOKKEEPING} - 'fresh')"
    )
}

/// `insert` (an `INSERT … RETURNING {table}.*` of rows keyed by `key`) wrapped so that it
/// returns `(key, changed)`: with `diff`, whether the row is not one it rewrote unchanged
/// ([`rewritten`]); without, every row counts as changed and nothing more is read.
fn with_diff(insert: &str, table: &str, key: &str, diff: bool) -> String {
    if !diff {
        return format!("WITH up AS ({insert}) SELECT {key}, true FROM up");
    }
    format!(
        "{} SELECT up.{key}, NOT EXISTS (SELECT 1 FROM same WHERE same.{key} = up.{key}) FROM up",
        rewritten(insert, table, key)
    )
}

/// `insert` (an `INSERT INTO events … RETURNING events.*`) wrapped so that it also writes the
/// change feed's upserts of the rows it changed ([`rewritten`]) that the view shows (not
/// `pending`), each as `row` builds it from the event `e` and its series `s` into its column
/// (`changes::stored`); returns `(event_id, fed)`. Writing them here, from what the insert
/// returns, spares the feed a second read of every row it wrote; the calendar's row and the
/// page's series are read once, not joined per row (BENCHMARKS.md, issue 25). Within the
/// statement, changes are written in the order the insert returns its rows.
fn with_feed(insert: &str, row: &Stored) -> String {
    let Stored { column, expr, .. } = row;
    let changed = "NOT EXISTS (SELECT 1 FROM same WHERE same.event_id = e.event_id)";
    format!(
        "{}, \
              fed AS (INSERT INTO calendar_changes (deployment, tuple_key, user_id, calendar_id, event_id, op, cause, {column}) \
                      SELECT t.deployment, t.tuple_key, t.user_id, t.calendar_id, e.event_id, 'upsert', 'delta', {expr} \
                      FROM (SELECT deployment, tuple_key, user_id, calendar_id FROM sync_tuples WHERE id = $1 AND tracked) t \
                      CROSS JOIN up e \
                      LEFT JOIN (SELECT * FROM series WHERE tuple_id = $1 AND master_id = ANY(ARRAY( \
                                   SELECT DISTINCT series_master_id FROM up WHERE series_master_id IS NOT NULL))) s \
                             ON s.master_id = e.series_master_id \
                      WHERE NOT e.pending AND {changed}) \
         SELECT e.event_id, NOT e.pending AND {changed} FROM up e",
        rewritten(insert, "events", "event_id")
    )
}

/// Where and how a page's events are written: the tuple, its full round, whether the rows
/// are partial (merged into what is stored), written hidden (`pending`, while a moved
/// window's round runs), and, with the change feed on, how its rows are built (`feed`, see
/// [`with_feed`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub(crate) tuple_id: i64,
    pub(crate) round: i64,
    pub(crate) partial: bool,
    pub(crate) pending: bool,
    pub(crate) feed: Option<&'static Stored>,
}

async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    t: Target,
    rows: &[EventRow],
) -> Result<Vec<(String, bool)>, StoreError> {
    let Target {
        tuple_id,
        round,
        partial,
        pending,
        feed,
    } = t;
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
    let insert = format!(
        "INSERT INTO events (tuple_id, event_id, start_at, end_at, start_date, end_date, time_error, event_type, \
           series_master_id, payload, {}, seen_round, pending) \
         SELECT $1, u.*, $2, ${} FROM UNNEST($3::text[], $4::timestamptz[], $5::timestamptz[], $6::date[], $7::date[], \
           $8::text[], $9::text[], $10::text[], $11::jsonb[], {}) AS u \
         ON CONFLICT (tuple_id, event_id) DO UPDATE SET {on_conflict} \
         RETURNING events.*",
        *DETAIL_COLUMNS,
        12 + COLUMNS.len(),
        detail_params(12)
    );
    let sql = match feed {
        Some(row) => with_feed(&insert, row),
        None => format!("WITH up AS ({insert}) SELECT event_id, false FROM up"),
    };
    let q = sqlx::query_as(&sql)
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
    details
        .bind(q)
        .bind(pending)
        .fetch_all(&mut **tx)
        .await
        .map_err(db)
}

/// The most payload one statement carries. sqlx keeps each connection's buffers at the size of
/// the largest message it has sent, so one 20 MB page written as one statement would leave
/// 20 MB or more behind on every pooled connection, outside the page memory budget (measured:
/// 560 MiB peak with a 64 MiB budget before this, BENCHMARKS.md).
const STATEMENT_BYTES: usize = 2 * 1024 * 1024;

/// `rows` in consecutive chunks of about `limit` bytes of payload each (a row larger than the
/// limit is a chunk of its own).
fn by_size(rows: &[EventRow], limit: usize) -> Vec<&[EventRow]> {
    crate::chunks::runs(rows, limit, |r| approx_json_len(&r.payload))
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

/// How a page's events are upserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// In statements of bounded size, with no savepoint: a value PostgreSQL refuses aborts the
    /// page's transaction ([`StoreError::Refused`]), and the page is applied again `OneByOne`.
    /// Nearly every page is stored this way; a savepoint for the rare refusal cost every page
    /// a round trip (issue 24: a push storm commits a thousand small pages a second).
    Together,
    /// Each row on its own under a savepoint; a refused one is kept as a quarantined row (id,
    /// type, series, the reason), so the rest of the page commits.
    OneByOne,
}

/// Upserts `rows` as `how` says (see [`Rows`]).
pub(crate) async fn upsert_events(
    tx: &mut Transaction<'_, Postgres>,
    t: Target,
    rows: &[EventRow],
    how: Rows,
) -> Result<Upserted, StoreError> {
    let mut out = Upserted::default();
    let record = |out: &mut Upserted, rows: Vec<(String, bool)>| {
        for (id, fed) in rows {
            if fed {
                out.fed.push(id.clone());
            }
            out.written.push(id);
        }
    };
    if how == Rows::Together {
        for chunk in by_size(rows, STATEMENT_BYTES) {
            let written = upsert(tx, t, chunk).await?;
            record(&mut out, written);
        }
        return Ok(out);
    }
    for row in rows {
        sqlx::query("SAVEPOINT calsync_row")
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        match upsert(tx, t, std::slice::from_ref(row)).await {
            Ok(ids) => record(&mut out, ids),
            Err(StoreError::Refused { sqlstate, message }) => {
                sqlx::query("ROLLBACK TO SAVEPOINT calsync_row")
                    .execute(&mut **tx)
                    .await
                    .map_err(db)?;
                let reason = format!("PostgreSQL refused a value ({sqlstate}): {message}");
                tracing::warn!(tuple_id = t.tuple_id, event = %row.event_id, %reason, "event quarantined");
                let id = quarantine(tx, t.tuple_id, t.round, row, &reason, t.pending).await?;
                out.quarantined.push(id);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
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
) -> Result<String, StoreError> {
    let clean = |s: &str| s.chars().filter(|c| *c != '\0').collect::<String>();
    let payload =
        serde_json::json!({"id": clean(&row.event_id), "@calsync.quarantined": clean(reason)});
    sqlx::query_scalar(
        "INSERT INTO events (tuple_id, event_id, event_type, series_master_id, payload, seen_round, quarantined, pending) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (tuple_id, event_id) DO UPDATE SET event_type = EXCLUDED.event_type, \
           series_master_id = EXCLUDED.series_master_id, payload = EXCLUDED.payload, \
           seen_round = EXCLUDED.seen_round, quarantined = EXCLUDED.quarantined, synced_at = now() \
         RETURNING event_id",
    )
    .bind(tuple_id)
    .bind(clean(&row.event_id))
    .bind(row.event_type.as_deref().map(clean))
    .bind(row.series_master_id.as_deref().map(clean))
    .bind(sqlx::types::Json(payload))
    .bind(round)
    .bind(clean(reason))
    .bind(pending)
    .fetch_one(&mut **tx)
    .await
    .map_err(db)
}

/// Upserts series masters; returns the master ids written, each with whether its row changed
/// (see [`with_diff`]).
pub(crate) async fn upsert_series(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    round: i64,
    rows: &[SeriesRow],
    diff: bool,
) -> Result<Vec<(String, bool)>, StoreError> {
    let ids: Vec<&str> = rows.iter().map(|r| r.master_id.as_str()).collect();
    let payloads: Vec<sqlx::types::Json<&serde_json::Map<String, serde_json::Value>>> =
        rows.iter().map(|r| sqlx::types::Json(&r.payload)).collect();
    let details = DetailColumns::of(rows.iter().map(|r| &r.details));
    let insert = format!(
        "INSERT INTO series (tuple_id, master_id, payload, {}, seen_round) \
         SELECT $1, u.*, $2 FROM UNNEST($3::text[], $4::jsonb[], {}) AS u \
         ON CONFLICT (tuple_id, master_id) DO UPDATE SET {}, payload = EXCLUDED.payload, \
           seen_round = EXCLUDED.seen_round, synced_at = now() \
         RETURNING series.*",
        *DETAIL_COLUMNS,
        detail_params(5),
        detail_updates("series", false)
    );
    let sql = with_diff(&insert, "series", "master_id", diff);
    let q = sqlx::query_as(&sql)
        .bind(tuple_id)
        .bind(round)
        .bind(&ids)
        .bind(&payloads);
    details.bind(q).fetch_all(&mut **tx).await.map_err(db)
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

    /// What [`rewritten`] relies on, undocumented by PostgreSQL: in an upsert's `RETURNING`,
    /// `xmax = 0` marks the rows it created, not the ones it updated. Should an upgrade change
    /// it, this says so before the feed tests' extra changes do.
    #[sqlx::test(migrations = false)]
    async fn postgres_marks_the_rows_an_upsert_created_with_xmax_zero(pool: sqlx::PgPool) {
        let mut c = pool.acquire().await.unwrap();
        sqlx::query("CREATE TEMP TABLE x (k int PRIMARY KEY, v int)")
            .execute(&mut *c)
            .await
            .unwrap();
        sqlx::query("INSERT INTO x VALUES (1, 1)")
            .execute(&mut *c)
            .await
            .unwrap();
        let fresh: Vec<(i32, bool)> = sqlx::query_as(
            "INSERT INTO x VALUES (1, 2), (2, 2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v \
             RETURNING k, (xmax = 0) AS fresh",
        )
        .fetch_all(&mut *c)
        .await
        .unwrap();
        assert_eq!(fresh, [(1, false), (2, true)]);
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
