//! Reading the read model (`calendar_events`, `calendar_sync_status`): what `status`, the demo
//! and the tests see.

use crate::Store;
use crate::error::{StoreError, db};
use crate::tuples::TupleStatus;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// One row of `calendar_sync_status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StatusRow {
    /// The tuple's name.
    pub tuple_key: String,
    /// Its mailbox.
    pub user_id: String,
    /// Its calendar.
    pub calendar_id: String,
    /// Its window's start.
    pub window_start: DateTime<Utc>,
    /// Its window's end.
    pub window_end: DateTime<Utc>,
    /// Whether the config still names it (rows of untracked tuples are kept, not synced).
    pub tracked: bool,
    /// `initial` while a full round is under way, else `incremental`.
    pub phase: String,
    /// The sync state.
    pub state: TupleStatus,
    /// When a round last reached its deltaLink.
    pub last_success_at: Option<DateTime<Utc>>,
    /// When a full round last reached its deltaLink.
    pub last_full_sync_at: Option<DateTime<Utc>>,
    /// When a page was last tried.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// The last failure's code (Graph's, or calsync's own).
    pub last_error_code: Option<String>,
    /// Failed attempts since the last success.
    pub consecutive_failures: i32,
    /// Rows in the read model.
    pub event_count: i64,
    /// Rows not whole yet: a time that could not be read, or an occurrence stub whose series
    /// is not stored.
    pub incomplete_count: i64,
    /// The deployment the tuple belongs to.
    pub deployment: String,
    /// The replica holding the tuple's mailbox now, if a live one does.
    pub owner: Option<String>,
    /// No round completed within the tuple's bound while its state says nothing is wrong
    /// (`calendar_sync_status.stale`): `status` shows it as `stale`.
    pub stale: bool,
    /// Its subscription's state when push is on (`pending`, `active`, `refused`, `failing`);
    /// `None`: push is off, or not yet looked at.
    pub push: Option<String>,
}

/// A tracked tuple of `sync_tuples t` that is overdue: the same predicate as the `stale` column
/// of `calendar_sync_status` (migration `0007_generations.sql`).
pub const STALE_SQL: &str = "(t.tracked AND t.state IN ('pending', 'ok', 'retrying') \
     AND COALESCE(t.last_success_at, t.created_at) \
         < now() - make_interval(secs => COALESCE((t.settings::jsonb ->> 'stale_after_s')::float8, 900)))";

/// How long since each tracked tuple of a deployment last completed a round, as a Prometheus
/// histogram: bounded whatever the number of tuples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LagHistogram {
    /// Upper bounds in seconds, ascending.
    pub bounds: Vec<f64>,
    /// Tuples with a lag below each bound (cumulative).
    pub cumulative: Vec<u64>,
    /// Tuples that completed a round at least once.
    pub count: u64,
    /// Sum of their lags, in seconds.
    pub sum: f64,
    /// The largest lag, in seconds.
    pub max: Option<f64>,
    /// Tracked tuples that never completed a round.
    pub never: u64,
}

/// Which rows `status` shows, in which order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusQuery {
    /// Only tuples in this state.
    pub state: Option<TupleStatus>,
    /// Only overdue tuples (`stale`), whatever their state.
    pub stale: bool,
    /// Longest since its last success first (never synced first of all), instead of by name.
    pub oldest_first: bool,
    /// At most this many rows.
    pub limit: Option<u64>,
    /// Skip this many rows first.
    pub offset: u64,
}

/// How many of a deployment's tracked tuples are in each state, and the oldest last success.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatusSummary {
    /// Tracked tuples.
    pub tracked: u64,
    /// (state, count), for the states that occur, overdue tuples left out.
    pub by_state: Vec<(TupleStatus, u64)>,
    /// Overdue tuples (counted here instead of under their state).
    pub stale: u64,
    /// Tracked tuples whose mailbox no live replica holds.
    pub unowned: u64,
    /// The longest time since any tracked tuple's last success, in seconds (a never-synced
    /// tuple counts from its registration).
    pub oldest_lag_seconds: Option<f64>,
}

/// The read-model columns tests and the demo compare with Graph's truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EventSummary {
    /// Graph's event id.
    pub event_id: String,
    /// `singleInstance`, `occurrence` or `exception`.
    pub event_type: Option<String>,
    /// The subject.
    pub subject: Option<String>,
    /// The start instant.
    pub start_at: Option<DateTime<Utc>>,
    /// The end instant.
    pub end_at: Option<DateTime<Utc>>,
    /// Whether the event is all-day.
    pub is_all_day: Option<bool>,
    /// The series an occurrence or exception belongs to.
    pub series_master_id: Option<String>,
    /// An attendee's copy of a meeting its organizer cancelled.
    pub is_cancelled: bool,
    /// An all-day event's first day.
    pub start_date: Option<chrono::NaiveDate>,
    /// The day after an all-day event's last day.
    pub end_date: Option<chrono::NaiveDate>,
    /// The organizer's address.
    pub organizer_email: Option<String>,
    /// Where.
    pub location: Option<String>,
    /// `free`, `busy`, …
    pub show_as: Option<String>,
}

impl Store {
    /// `calendar_sync_status`, one row per tuple of this store's deployment.
    pub async fn status(&self) -> Result<Vec<StatusRow>, StoreError> {
        self.status_page(&StatusQuery::default()).await
    }

    /// The rows of `calendar_sync_status` of this store's deployment that `q` asks for.
    pub async fn status_page(&self, q: &StatusQuery) -> Result<Vec<StatusRow>, StoreError> {
        let order = if q.oldest_first {
            "last_success_at ASC NULLS FIRST, tuple_key"
        } else {
            "tuple_key"
        };
        sqlx::query_as(&format!(
            "SELECT * FROM calendar_sync_status WHERE deployment = $1 AND ($2::text IS NULL OR state = $2) \
             AND (NOT $5 OR stale) ORDER BY {order} LIMIT $3 OFFSET $4"
        ))
        .bind(&*self.deployment)
        .bind(q.state.map(|s| s.as_str()))
        .bind(q.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX)))
        .bind(i64::try_from(q.offset).unwrap_or(i64::MAX))
        .bind(q.stale)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// The lag histogram of this deployment's tracked tuples over `bounds` (seconds, ascending):
    /// one aggregate query, so a scrape costs the same at 100 or 100,000 calendars.
    pub async fn lag_histogram(&self, bounds: &[f64]) -> Result<LagHistogram, StoreError> {
        let query = async {
            let rows: Vec<(Option<i32>, i64, f64, Option<f64>)> = sqlx::query_as(
                "WITH l AS (SELECT EXTRACT(EPOCH FROM now() - last_success_at)::float8 AS lag \
                              FROM sync_tuples WHERE deployment = $1 AND tracked) \
                 SELECT CASE WHEN lag IS NULL THEN NULL ELSE width_bucket(lag, $2::float8[]) END AS b, \
                        count(*), COALESCE(sum(lag), 0)::float8, max(lag) \
                 FROM l GROUP BY b",
            )
            .bind(&*self.deployment)
            .bind(bounds)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
            let mut h = LagHistogram {
                bounds: bounds.to_vec(),
                cumulative: vec![0; bounds.len()],
                ..LagHistogram::default()
            };
            for (bucket, n, sum, max) in rows {
                let n = n.max(0) as u64;
                let Some(b) = bucket else {
                    h.never += n;
                    continue;
                };
                // Bucket b holds bounds[b-1] <= lag < bounds[b]: below every bound from b on.
                for c in h.cumulative.iter_mut().skip(b.max(0) as usize) {
                    *c += n;
                }
                h.count += n;
                h.sum += sum;
                h.max = match (h.max, max) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            Ok(h)
        };
        self.bounded("reading sync lags", query).await
    }

    /// Quantiles (0..=1) of the time since each tracked tuple's last success, in seconds (a
    /// never-synced tuple counts from its registration): for benchmarks and operators.
    pub async fn lag_quantiles(&self, qs: &[f64]) -> Result<Vec<f64>, StoreError> {
        let query = async {
            let v: Option<Vec<f64>> = sqlx::query_scalar(
                "SELECT percentile_cont($2::float8[]) WITHIN GROUP \
                   (ORDER BY EXTRACT(EPOCH FROM now() - COALESCE(last_success_at, created_at))::float8) \
                 FROM sync_tuples WHERE deployment = $1 AND tracked",
            )
            .bind(&*self.deployment)
            .bind(qs)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
            Ok(v.unwrap_or_default())
        };
        self.bounded("reading lag quantiles", query).await
    }

    /// Counts by state of this deployment's tracked tuples, for `status` and `/metrics`: one
    /// cheap query whatever the number of tuples (no per-tuple rows leave the database).
    pub async fn status_summary(&self) -> Result<StatusSummary, StoreError> {
        let query = async {
            let rows: Vec<(TupleStatus, bool, i64)> = sqlx::query_as(&format!(
                "SELECT state, {STALE_SQL} AS stale, count(*) FROM sync_tuples t WHERE t.deployment = $1 AND t.tracked \
                 GROUP BY 1, 2 ORDER BY 1, 2"
            ))
            .bind(&*self.deployment)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
            let (unowned, oldest): (i64, Option<f64>) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM mailbox_leases l JOIN replicas r \
                          ON r.deployment = l.deployment AND r.incarnation = l.owner \
                        WHERE l.deployment = t.deployment AND l.mailbox = t.mailbox AND r.expires_at > now())), \
                        EXTRACT(EPOCH FROM now() - min(COALESCE(t.last_success_at, t.created_at)))::float8 \
                 FROM sync_tuples t WHERE t.deployment = $1 AND t.tracked",
            )
            .bind(&*self.deployment)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
            let stale: u64 = rows.iter().filter(|r| r.1).map(|r| r.2.max(0) as u64).sum();
            let by_state: Vec<(TupleStatus, u64)> = rows
                .into_iter()
                .filter(|r| !r.1)
                .map(|(s, _, n)| (s, n.max(0) as u64))
                .collect();
            Ok(StatusSummary {
                tracked: by_state.iter().map(|(_, n)| n).sum::<u64>() + stale,
                by_state,
                stale,
                unowned: unowned.max(0) as u64,
                oldest_lag_seconds: oldest,
            })
        };
        self.bounded("summarising status", query).await
    }

    /// Event ids of a tuple, sorted (for tests and the demo's check).
    pub async fn event_ids(&self, tuple_key: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT event_id FROM calendar_events WHERE deployment = $1 AND tuple_key = $2 ORDER BY event_id COLLATE \"C\"")
            .bind(&*self.deployment)
            .bind(tuple_key)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// Ids of the series masters a tuple keeps, sorted.
    pub async fn series_ids(&self, tuple_key: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT s.master_id FROM series s JOIN sync_tuples t ON t.id = s.tuple_id \
             WHERE t.deployment = $1 AND t.tuple_key = $2 ORDER BY s.master_id COLLATE \"C\"",
        )
        .bind(&*self.deployment)
        .bind(tuple_key)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// The indexed columns of a tuple's rows as the read model shows them, sorted by id.
    pub async fn event_summaries(&self, tuple_key: &str) -> Result<Vec<EventSummary>, StoreError> {
        sqlx::query_as(
            "SELECT event_id, event_type, subject, start_at, end_at, is_all_day, series_master_id, \
               is_cancelled, start_date, end_date, organizer_email, location, show_as \
             FROM calendar_events WHERE deployment = $1 AND tuple_key = $2 ORDER BY event_id COLLATE \"C\"",
        )
        .bind(&*self.deployment)
        .bind(tuple_key)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }
}
