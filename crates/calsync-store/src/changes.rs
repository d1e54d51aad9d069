//! The change feed (issue 25): `calendar_changes`, written in the transaction that changes
//! the view, and read at a cursor that cannot skip (migrations `0009_changes.sql`, `0010_change_feed.sql`).
//!
//! A position is (writing transaction's id, sequence); a reader is answered only rows of
//! transactions older than every transaction still running, so a transaction that commits late
//! is never passed over. Each calendar's changes come in its commit order because every writer
//! of a deployment's feed takes its lock (`calsync_feed_lock`: page transactions shared,
//! registration exclusive) before its first write, and two page transactions of one calendar
//! are ordered by the tuple's row and its `link_version` (the loser writes nothing).
//!
//! Written: by the upsert of events, in its own statement, for the rows it changes
//! (`upsert::with_feed`, rows built by `stored`); `write_page` for the rest of a page's
//! steps' `Touched` (deletes, the window switch, series, quarantine; one statement);
//! `write_tracking` (registration: rows hidden by untracking or re-pointing, shown by tracking again). After a
//! commit that wrote changes, `Feed::written` has `NOTIFY calsync_changes` sent (coalesced,
//! outside the transaction: a NOTIFY inside it would serialize every page's commit on the
//! server's notify queue lock).

use crate::Store;
use crate::error::{StoreError, db};
use crate::steps::Touched;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

/// How `calendar_events` computes each column a change carries (all but [`CALENDAR_COLUMNS`])
/// from an event `e` and its series `s` (the view of `0006_window_switch.sql`). The upsert that
/// writes an event writes its change with these (a statement does not see its own writes, so it
/// cannot read the view); the test `the_view_and_the_upserts_rows_agree` keeps them equal to
/// the view, column for column.
const VIEW_COLUMNS: &[(&str, &str)] = &[
    ("event_id", "e.event_id"),
    ("ical_uid", "e.ical_uid"),
    ("subject", "COALESCE(e.subject, s.subject)"),
    ("start_at", "e.start_at"),
    ("end_at", "e.end_at"),
    ("is_all_day", "COALESCE(e.is_all_day, s.is_all_day)"),
    ("event_type", "e.event_type"),
    ("series_master_id", "e.series_master_id"),
    (
        "last_modified_at",
        "COALESCE(e.last_modified_at, s.last_modified_at)",
    ),
    (
        "payload",
        "CASE WHEN s.payload IS NULL THEN e.payload ELSE (s.payload - 'recurrence' - '@odata.context' \
         - '@odata.etag' - 'changeKey') || e.payload END",
    ),
    (
        "is_cancelled",
        "COALESCE(e.is_cancelled, s.is_cancelled, false)",
    ),
    (
        "start_date",
        "CASE WHEN COALESCE(e.is_all_day, s.is_all_day) THEN e.start_date END",
    ),
    (
        "end_date",
        "CASE WHEN COALESCE(e.is_all_day, s.is_all_day) THEN e.end_date END",
    ),
    (
        "organizer_email",
        "COALESCE(e.organizer_email, s.organizer_email)",
    ),
    ("location", "COALESCE(e.location, s.location)"),
    ("show_as", "COALESCE(e.show_as, s.show_as)"),
    (
        "online_meeting_url",
        "COALESCE(e.online_meeting_url, s.online_meeting_url)",
    ),
    (
        "original_start_time_zone",
        "COALESCE(e.original_start_time_zone, s.original_start_time_zone)",
    ),
    ("time_error", "e.time_error"),
    ("quarantined", "e.quarantined"),
];

/// What a change's row is built from: a stored event `e` and its series `s` (in the upsert
/// that writes the event), or a row `v` of the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Event,
    View,
}

/// How a change's row is written: the column of `calendar_changes` that holds it, its SQL
/// type, and the SQL that builds it from its [`Source`].
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) column: &'static str,
    pub(crate) sql_type: &'static str,
    pub(crate) expr: String,
}

/// How changes store their row: with the payload, as jsonb in `data` (the view's row whole);
/// without (the default), as a `calendar_change_row` in `fields`, which `calsync_changes`
/// turns into the same jsonb when it is read (migration `0011_change_rows.sql`: half the WAL,
/// a third of the CPU).
pub(crate) fn stored(payload: bool, from: Source) -> &'static Stored {
    static STORED: LazyLock<[Stored; 4]> = LazyLock::new(|| {
        [
            build_stored(false, Source::Event),
            build_stored(false, Source::View),
            build_stored(true, Source::Event),
            build_stored(true, Source::View),
        ]
    });
    &STORED[usize::from(payload) * 2 + usize::from(from == Source::View)]
}

fn build_stored(payload: bool, from: Source) -> Stored {
    let expr = |(name, expr): &(&str, &str)| match from {
        Source::Event => (*expr).to_owned(),
        Source::View => format!("v.{name}"),
    };
    if payload {
        let pairs: Vec<String> = VIEW_COLUMNS
            .iter()
            .map(|c| format!("'{}', {}", c.0, expr(c)))
            .collect();
        return Stored {
            column: "data",
            sql_type: "jsonb",
            expr: format!("jsonb_build_object({})", pairs.join(", ")),
        };
    }
    let fields: Vec<String> = VIEW_COLUMNS
        .iter()
        .filter(|(name, _)| !["event_id", "payload"].contains(name))
        .map(expr)
        .collect();
    Stored {
        column: "fields",
        sql_type: "calendar_change_row",
        expr: format!("ROW({})::calendar_change_row", fields.join(", ")),
    }
}

/// Whether a store writes the change feed, and its wake-ups for readers.
#[derive(Debug)]
pub(crate) struct Feed {
    /// Write the feed (`changes.enabled`).
    pub(crate) on: bool,
    /// How long changes are kept (`changes.retention`).
    pub(crate) retention: Duration,
    /// Changes carry the row's payload (`changes.payload`).
    pub(crate) payload: bool,
    wake: Arc<tokio::sync::Notify>,
    notifier: OnceLock<()>,
}

impl Feed {
    pub(crate) fn new(on: bool, retention: Duration, payload: bool) -> Feed {
        Feed {
            on,
            retention,
            payload,
            wake: Default::default(),
            notifier: OnceLock::new(),
        }
    }

    /// A transaction that wrote changes committed: readers are woken by `NOTIFY
    /// calsync_changes` (payload: the deployment) at once, and a burst of commits shares one
    /// notification per 25 ms; sent by a task of this store.
    pub(crate) fn written(&self, pool: &PgPool, deployment: &str) {
        self.wake.notify_one();
        self.notifier.get_or_init(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let task =
                    notify_readers(Arc::downgrade(&self.wake), pool.clone(), deployment.into());
                runtime.spawn(task);
            }
        });
    }
}

impl Default for Feed {
    fn default() -> Feed {
        Feed::new(true, DEFAULT_RETENTION, false)
    }
}

/// Sends `NOTIFY calsync_changes` at once after a commit, then at most one more per 25 ms
/// however many commits follow (they share it), until the store is dropped.
async fn notify_readers(
    wake: std::sync::Weak<tokio::sync::Notify>,
    pool: PgPool,
    deployment: String,
) {
    loop {
        let Some(wake) = wake.upgrade() else { return };
        let woken = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        drop(wake);
        if woken.is_err() {
            continue;
        }
        let sent = sqlx::query("SELECT pg_notify('calsync_changes', $1)")
            .bind(&deployment)
            .execute(&pool)
            .await;
        if let Err(e) = sent {
            // Readers also poll; a lost wake-up delays them, it loses nothing.
            tracing::debug!(error = %db(e), "NOTIFY calsync_changes was not sent");
        }
        // Commits within this pause share the next notification. At 5 ms, nearly every page
        // of an initial sync sent one (a page commits every ~7 ms), a query of calsync's CPU
        // each (BENCHMARKS.md, issue 25). 25 ms is still far below what a follower notices.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Writes the feed's rows of a page that its upserts did not write, last in its transaction,
/// from what its steps returned: a delete for each row that left the view, then an upsert, with
/// the row as the view now shows it, for each row quarantined, shown by the window switch (new
/// in it, or hidden until it), or under a series master that changed (each once, with the
/// first of those causes). The upserts wrote the changes of the rows they changed
/// ([`Touched::fed`]): those rows are skipped here, and so are their deletes (an id removed
/// and written again in one page: its upsert sets the row whole). Nothing for an untracked
/// tuple, whose rows the view does not show. Returns the rows written.
pub(crate) async fn write_page(
    tx: &mut Transaction<'_, Postgres>,
    feed: &Feed,
    tuple_id: i64,
    touched: &Touched,
) -> Result<u64, StoreError> {
    if touched.gone.is_empty()
        && touched.quarantined.is_empty()
        && touched.shown.is_empty()
        && touched.series_changed.is_empty()
    {
        return Ok(0);
    }
    let fed: std::collections::HashSet<&str> = touched.fed.iter().map(String::as_str).collect();
    let (gone_ids, gone_causes): (Vec<&str>, Vec<&str>) = touched
        .gone
        .iter()
        .filter(|(id, _)| !fed.contains(id.as_str()))
        .map(|(id, cause)| (id.as_str(), *cause))
        .unzip();
    let mut ids: Vec<&str> = Vec::new();
    let mut causes: Vec<&str> = Vec::new();
    let mut ranks: Vec<i32> = Vec::new();
    for (rank, (list, cause)) in [
        (&touched.quarantined, "quarantine"),
        (&touched.shown, "window"),
    ]
    .into_iter()
    .enumerate()
    {
        for id in list.iter().filter(|id| !fed.contains(id.as_str())) {
            ids.push(id);
            causes.push(cause);
            ranks.push(rank as i32);
        }
    }
    if gone_ids.is_empty() && ids.is_empty() && touched.series_changed.is_empty() {
        return Ok(0);
    }
    let Stored {
        column,
        sql_type,
        expr: row,
    } = stored(feed.payload, Source::View);
    // The calendar's row and each id as parameters of the view's lookup (initplans), so it
    // reads the page's rows by the primary key: joined to a list instead, PostgreSQL read
    // every row of the calendar for each page (measured: 3,639 rows read for 200).
    let sql = format!(
        "WITH t AS (SELECT deployment, tuple_key, user_id, calendar_id FROM sync_tuples \
                    WHERE id = $1 AND tracked), \
              causes AS (SELECT DISTINCT ON (u.id) u.id, u.cause \
                         FROM UNNEST($4::text[], $5::text[], $6::int[]) AS u(id, cause, rank) \
                         ORDER BY u.id, u.rank), \
              x AS (SELECT 0 AS part, d.n, d.id AS event_id, 'delete' AS op, d.cause, NULL::{sql_type} AS data \
                    FROM UNNEST($2::text[], $3::text[]) WITH ORDINALITY AS d(id, cause, n) \
                    UNION ALL \
                    SELECT 1, 0, v.event_id, 'upsert', COALESCE(c.cause, 'series'), {row} \
                    FROM calendar_events v LEFT JOIN causes c ON c.id = v.event_id \
                    WHERE v.deployment = (SELECT deployment FROM t) AND v.tuple_key = (SELECT tuple_key FROM t) \
                      AND v.event_id = ANY(ARRAY( \
                            SELECT unnest($4::text[]) \
                            UNION SELECT e.event_id FROM events e \
                                  WHERE e.tuple_id = $1 AND e.series_master_id = ANY($7::text[]) \
                                    AND NOT (e.event_id = ANY($8::text[]))))) \
         INSERT INTO calendar_changes (deployment, tuple_key, user_id, calendar_id, event_id, op, cause, {column}) \
         SELECT t.deployment, t.tuple_key, t.user_id, t.calendar_id, x.event_id, x.op, x.cause, x.data \
         FROM t, x ORDER BY x.part, x.n, x.event_id"
    );
    let written = sqlx::query(&sql)
        .bind(tuple_id)
        .bind(&gone_ids)
        .bind(&gone_causes)
        .bind(&ids)
        .bind(&causes)
        .bind(&ranks)
        .bind(&touched.series_changed)
        .bind(&touched.fed)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    Ok(written.rows_affected())
}

/// The most rows one statement of [`write_tracking`] writes. A registration that untracks a
/// deployment's calendars wholesale writes a change for every row they showed, and one
/// statement for all of them ran past `statement_timeout` (3.2 million rows in calsync-bench's
/// idle phase after a `--reps 9` run: registration failed, and so would a daemon's start).
const TRACKING_ROWS: usize = 100_000;

/// Writes the feed's rows of tuples whose rows leave the view or come back as a whole (in a
/// registration, which holds the feed's lock exclusive): `op` for each row `calendar_events`
/// shows of `keys` now, with `cause`, in key and event id order, in statements of at most
/// about [`TRACKING_ROWS`] rows (a calendar is never split). Call it before an untracking or
/// re-pointing (the rows are still shown: deletes) and after a re-tracking (they show again:
/// upserts).
pub(crate) async fn write_tracking(
    tx: &mut sqlx::PgConnection,
    feed: &Feed,
    deployment: &str,
    keys: &[&str],
    op: &str,
    cause: &str,
) -> Result<u64, StoreError> {
    if keys.is_empty() {
        return Ok(0);
    }
    // How many rows each calendar holds (an upper bound of what the view shows of it).
    let sizes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT t.tuple_key, (SELECT count(*) FROM events e WHERE e.tuple_id = t.id) \
         FROM sync_tuples t WHERE t.deployment = $1 AND t.tuple_key = ANY($2::text[]) \
         ORDER BY t.tuple_key",
    )
    .bind(deployment)
    .bind(keys)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    let Stored {
        column, expr: row, ..
    } = stored(feed.payload, Source::View);
    let sql = format!(
        "INSERT INTO calendar_changes (deployment, tuple_key, user_id, calendar_id, event_id, op, cause, {column}) \
         SELECT v.deployment, v.tuple_key, v.user_id, v.calendar_id, v.event_id, $3, $4, \
                CASE WHEN $3 = 'upsert' THEN {row} END \
         FROM calendar_events v WHERE v.deployment = $1 AND v.tuple_key = ANY($2::text[]) \
         ORDER BY v.tuple_key, v.event_id"
    );
    let mut written = 0;
    let rows = |(_, n): &(String, i64)| usize::try_from(*n).unwrap_or(0);
    for chunk in crate::chunks::runs(&sizes, TRACKING_ROWS, rows) {
        let chunk: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
        written += sqlx::query(&sql)
            .bind(deployment)
            .bind(&chunk)
            .bind(op)
            .bind(cause)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
    }
    Ok(written)
}

/// One change of the read model, as `calsync_changes` answers it (and, serialized, as
/// `calsync changes --json` prints it and a sink receives it).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct Change {
    /// Where this change stands in the feed: follow from here to read what came after.
    pub cursor: String,
    /// The deployment of the calendar.
    pub deployment: String,
    /// The calendar's `[[calendars]]` name.
    pub tuple_key: String,
    /// As configured.
    pub user_id: String,
    /// `default` or an id.
    pub calendar_id: String,
    /// Graph's instance id.
    pub event_id: String,
    /// `upsert` or `delete`.
    pub op: String,
    /// What made the change (`delta`, `sweep`, `series`, ...).
    pub cause: String,
    /// The row as `calendar_events` shows it, for an upsert.
    pub data: Option<serde_json::Value>,
    /// When the writing transaction began.
    pub written_at: DateTime<Utc>,
}

/// One row of the view in a snapshot (`calsync_snapshot`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SnapshotRow {
    /// The deployment of the calendar.
    pub deployment: String,
    /// The calendar's `[[calendars]]` name.
    pub tuple_key: String,
    /// As configured.
    pub user_id: String,
    /// `default` or an id.
    pub calendar_id: String,
    /// Graph's instance id.
    pub event_id: String,
    /// The row as a change carries it.
    pub data: serde_json::Value,
}

/// The view at one instant and where to follow the feed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Follow the feed from here: every change the rows do not hold comes after it.
    pub cursor: String,
    /// The rows, by deployment, calendar and event id.
    pub rows: Vec<SnapshotRow>,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Changes deleted.
    pub deleted: u64,
}

/// How long changes are kept unless told (`changes.retention`): 14 days, as Nylas' sync
/// engine kept its transaction log.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

/// The SQLSTATE `calsync_changes` answers a cursor older than retention kept with.
const EXPIRED: &str = "CS410";

impl Store {
    /// The changes after `after` (`None`: from the oldest kept), at most `limit`, in feed
    /// order. An empty answer means nothing more is committed yet; ask again from the same
    /// cursor. A cursor older than retention kept is [`StoreError::Expired`].
    pub async fn changes_after(
        &self,
        after: Option<&str>,
        limit: i32,
    ) -> Result<Vec<Change>, StoreError> {
        self.bounded("reading the change feed", async {
            sqlx::query_as("SELECT * FROM calsync_changes($1, $2)")
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| {
                    let expired = e
                        .as_database_error()
                        .and_then(|d| d.code())
                        .is_some_and(|c| c == EXPIRED);
                    match (expired, after) {
                        (true, Some(cursor)) => StoreError::Expired {
                            cursor: cursor.to_owned(),
                        },
                        _ => db(e),
                    }
                })
        })
        .await
    }

    /// A connection listening for `NOTIFY calsync_changes` of this deployment: it wakes a
    /// follower a few milliseconds after a commit that wrote changes (a follower polls as
    /// well: a change becomes readable once older transactions end, and a wake-up can be lost
    /// with a connection).
    pub async fn listen_changes(&self) -> Result<crate::SetListener, StoreError> {
        self.listen("calsync_changes").await
    }

    /// The view now (this deployment's rows, or every deployment's with `all`) with the
    /// cursor to follow the feed from.
    pub async fn changes_snapshot(&self, all: bool) -> Result<Snapshot, StoreError> {
        type Row = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<serde_json::Value>,
        );
        let deployment = (!all).then_some(&*self.deployment);
        let rows: Vec<Row> = self
            .bounded("reading a snapshot of the view", async {
                sqlx::query_as("SELECT * FROM calsync_snapshot($1, $2)")
                    .bind(deployment)
                    .bind(self.feed.payload)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)
            })
            .await?;
        let cursor = rows
            .first()
            .map(|r| r.0.clone())
            .ok_or_else(|| StoreError::Query("calsync_snapshot answered no cursor".into()))?;
        let rows = rows
            .into_iter()
            .filter_map(|r| {
                Some(SnapshotRow {
                    deployment: r.1?,
                    tuple_key: r.2?,
                    user_id: r.3?,
                    calendar_id: r.4?,
                    event_id: r.5?,
                    data: r.6?,
                })
            })
            .collect();
        Ok(Snapshot { cursor, rows })
    }

    /// Deletes the changes older than this store's retention (`changes.retention`), in
    /// batches of 10,000; what the retention worker runs.
    pub async fn trim_expired_changes(&self) -> Result<Trimmed, StoreError> {
        let keep = chrono::Duration::from_std(self.feed.retention)
            .unwrap_or_else(|_| chrono::Duration::days(14));
        self.trim_changes(Utc::now() - keep, 10_000).await
    }

    /// Deletes changes written before `before` (every deployment's: the feed is one), at most
    /// `batch` per statement until none is left, and moves retention's mark past them so a
    /// cursor among them is answered "expired". Each batch is its own short transaction.
    pub async fn trim_changes(
        &self,
        before: DateTime<Utc>,
        batch: i64,
    ) -> Result<Trimmed, StoreError> {
        let mut out = Trimmed::default();
        loop {
            let step = async {
                let mut tx = self.pool.begin().await.map_err(db)?;
                // The oldest changes first, by position (the primary key): the mark then
                // moves forward only, past a gap-free prefix.
                let last: Option<(i64, i64, i64)> = sqlx::query_as(
                    "WITH doomed AS (SELECT txid, seq FROM calendar_changes WHERE written_at < $1 \
                                       AND txid < txid_snapshot_xmin(txid_current_snapshot()) \
                                     ORDER BY txid, seq LIMIT $2), \
                          gone AS (DELETE FROM calendar_changes c USING doomed d \
                                   WHERE (c.txid, c.seq) = (d.txid, d.seq) RETURNING c.txid, c.seq) \
                     SELECT txid, seq, (SELECT count(*) FROM gone) FROM gone ORDER BY txid DESC, seq DESC LIMIT 1",
                )
                .bind(before)
                .bind(batch.max(1))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
                let Some((txid, seq, n)) = last else {
                    return Ok(0);
                };
                sqlx::query(
                    "INSERT INTO calendar_changes_trimmed (txid, seq) VALUES ($1, $2) \
                     ON CONFLICT (only_row) DO UPDATE SET txid = EXCLUDED.txid, seq = EXCLUDED.seq, trimmed_at = now() \
                     WHERE (calendar_changes_trimmed.txid, calendar_changes_trimmed.seq) < (EXCLUDED.txid, EXCLUDED.seq)",
                )
                .bind(txid)
                .bind(seq)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok::<u64, StoreError>(n as u64)
            };
            let n = self.bounded("trimming the change feed", step).await?;
            out.deleted += n;
            if n < batch.max(1) as u64 {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod causes;

#[cfg(test)]
mod stored;
