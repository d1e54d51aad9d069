//! calsync-store: PostgreSQL — migrations, applying a page, sync state, the read model.
//! The only crate that depends on sqlx; callers never see a sqlx type or error.

pub mod page;

pub use page::{EventRow, PageChanges, PageOp, reduce};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The oldest PostgreSQL calsync runs on.
pub const MIN_SERVER_VERSION: i32 = 120_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or went away: retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Another writer advanced this tuple's link first; the page was not applied.
    #[error("tuple {tuple_id} was changed by another writer")]
    Conflict { tuple_id: i64 },
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("database server is PostgreSQL {found}, calsync needs 12 or newer")]
    TooOld { found: i32 },
    /// A fault injected by a test at a chosen point inside a page transaction.
    #[error("injected fault inside the page transaction")]
    InjectedFault,
    #[error("database error: {0}")]
    Query(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::InjectedFault)
    }
}

fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(d) => {
            // Class 08 (connection exception) and 57P0x (admin shutdown, crash) are transient.
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            if code.starts_with("08") || code.starts_with("57P") {
                StoreError::Unavailable(d.to_string())
            } else {
                StoreError::Query(d.to_string())
            }
        }
        other => StoreError::Query(other.to_string()),
    }
}

/// What identifies a tracked tuple, as the config says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleSpec {
    pub key: String,
    pub user_id: String,
    pub calendar_id: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
}

/// What a saved link was made for. A link is only replayed for the same stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStamp {
    pub user_id: String,
    pub calendar_id: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Next,
    Delta,
}

/// A tuple's identity and sync state as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TupleState {
    pub id: i64,
    pub tuple_key: String,
    pub user_id: String,
    pub calendar_id: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub link: Option<String>,
    pub link_kind: Option<String>,
    pub link_user_id: Option<String>,
    pub link_calendar_id: Option<String>,
    pub link_window_start: Option<DateTime<Utc>>,
    pub link_window_end: Option<DateTime<Utc>>,
    pub link_version: i64,
    pub full_round: i64,
    pub round_is_full: bool,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_full_sync_at: Option<DateTime<Utc>>,
    pub state: String,
    pub consecutive_failures: i32,
}

impl TupleState {
    /// The saved link and its kind, if it was made for `stamp`.
    pub fn link_for(&self, stamp: &LinkStamp) -> Option<(LinkKind, &str)> {
        let made_for = LinkStamp {
            user_id: self.link_user_id.clone()?,
            calendar_id: self.link_calendar_id.clone()?,
            window_start: self.link_window_start?,
            window_end: self.link_window_end?,
        };
        if &made_for != stamp {
            return None;
        }
        let kind = match self.link_kind.as_deref()? {
            "next" => LinkKind::Next,
            "delta" => LinkKind::Delta,
            _ => return None,
        };
        Some((kind, self.link.as_deref()?))
    }
}

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
    pub tuple_id: i64,
    /// The `link_version` the writer read; the write fails with `Conflict` if it moved.
    pub expected_version: i64,
    pub round_start: Option<RoundStart>,
    pub changes: &'a PageChanges,
    pub link: &'a str,
    pub link_kind: LinkKind,
    pub stamp: &'a LinkStamp,
}

/// What applying a page did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub version: i64,
    pub upserted: u64,
    pub removed: u64,
    pub swept: u64,
}

/// One tracked tuple's state, for metrics.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TupleHealth {
    pub tuple_key: String,
    pub user_id: String,
    pub calendar_id: String,
    pub state: String,
    pub last_success_at: Option<DateTime<Utc>>,
}

/// One row of `calendar_sync_status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StatusRow {
    pub tuple_key: String,
    pub user_id: String,
    pub calendar_id: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub tracked: bool,
    pub phase: String,
    pub state: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_full_sync_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_code: Option<String>,
    pub consecutive_failures: i32,
    pub event_count: i64,
}

/// The read-model columns tests and the demo compare with Graph's truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EventSummary {
    pub event_id: String,
    pub event_type: Option<String>,
    pub subject: Option<String>,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    pub is_all_day: Option<bool>,
    pub series_master_id: Option<String>,
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    fail_after: Arc<AtomicU32>,
}

const TUPLE_COLUMNS: &str = "id, tuple_key, user_id, calendar_id, window_start, window_end, link, link_kind, \
    link_user_id, link_calendar_id, link_window_start, link_window_end, link_version, full_round, \
    round_is_full, last_success_at, last_full_sync_at, state, consecutive_failures";

impl Store {
    /// Connects lazily-checked: the pool opens connections as needed, and `connect` fails
    /// only if the first one cannot be made.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| {
            StoreError::Query(format!(
                "invalid database url: {}",
                redact_url_error(&e.to_string())
            ))
        })?;
        let opts = opts.application_name("calsync");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            // No ping before every checkout (an extra round trip per query): a dead
            // connection fails its query as Unavailable, and the runner retries.
            .test_before_acquire(false)
            .connect_with(opts)
            .await
            .map_err(db)?;
        let store = Store::from_pool(pool);
        store.check_version().await?;
        Ok(store)
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Store {
            pool,
            fail_after: Arc::new(AtomicU32::new(0)),
        }
    }

    async fn check_version(&self) -> Result<(), StoreError> {
        let v: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let found = v.trim().parse::<i32>().unwrap_or(0);
        if found < MIN_SERVER_VERSION {
            return Err(StoreError::TooOld { found });
        }
        Ok(())
    }

    /// Applies the embedded migrations (append-only files in `migrations/`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../../migrations")
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))
    }

    /// Whether every embedded migration has been applied.
    pub async fn migrations_current(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        Ok(sqlx::migrate!("../../migrations")
            .iter()
            .all(|m| applied.contains(&m.version)))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Test hook: make the next page transaction fail after `n` of its statements ran, before
    /// it commits, as a crash inside the transaction would. 0 disarms it.
    #[doc(hidden)]
    pub fn inject_fault_after_statements(&self, n: u32) {
        self.fail_after.store(n, Ordering::SeqCst);
    }

    fn fault_point(&self) -> Result<(), StoreError> {
        let left = self.fail_after.load(Ordering::SeqCst);
        if left == 0 {
            return Ok(());
        }
        if left == 1 {
            self.fail_after.store(0, Ordering::SeqCst);
            return Err(StoreError::InjectedFault);
        }
        self.fail_after.store(left - 1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes the stored tuples match the config: inserts new ones, updates identity fields,
    /// and marks tuples no longer configured as untracked (their rows are kept).
    pub async fn register_tuples(
        &self,
        specs: &[TupleSpec],
    ) -> Result<Vec<TupleState>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let keys: Vec<&str> = specs.iter().map(|s| s.key.as_str()).collect();
        let users: Vec<&str> = specs.iter().map(|s| s.user_id.as_str()).collect();
        let cals: Vec<&str> = specs.iter().map(|s| s.calendar_id.as_str()).collect();
        let starts: Vec<DateTime<Utc>> = specs.iter().map(|s| s.window_start).collect();
        let ends: Vec<DateTime<Utc>> = specs.iter().map(|s| s.window_end).collect();
        sqlx::query(
            "INSERT INTO sync_tuples (tuple_key, user_id, calendar_id, window_start, window_end, tracked) \
             SELECT k, u, c, s, e, true FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[]) AS t(k, u, c, s, e) \
             ON CONFLICT (tuple_key) DO UPDATE SET user_id = EXCLUDED.user_id, calendar_id = EXCLUDED.calendar_id, \
               window_start = EXCLUDED.window_start, window_end = EXCLUDED.window_end, tracked = true, updated_at = now() \
             WHERE (sync_tuples.user_id, sync_tuples.calendar_id, sync_tuples.window_start, sync_tuples.window_end, sync_tuples.tracked) \
               IS DISTINCT FROM (EXCLUDED.user_id, EXCLUDED.calendar_id, EXCLUDED.window_start, EXCLUDED.window_end, true)",
        )
        .bind(&keys)
        .bind(&users)
        .bind(&cals)
        .bind(&starts)
        .bind(&ends)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("UPDATE sync_tuples SET tracked = false, updated_at = now() WHERE tracked AND tuple_key <> ALL($1::text[])")
            .bind(&keys)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let rows: Vec<TupleState> = sqlx::query_as(&format!(
            "SELECT {TUPLE_COLUMNS} FROM sync_tuples WHERE tuple_key = ANY($1::text[]) ORDER BY id"
        ))
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(rows)
    }

    pub async fn load(&self, tuple_id: i64) -> Result<TupleState, StoreError> {
        sqlx::query_as(&format!(
            "SELECT {TUPLE_COLUMNS} FROM sync_tuples WHERE id = $1"
        ))
        .bind(tuple_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    /// Forgets the saved link (the delta state is gone); rows stay until the next full round
    /// sweeps them.
    /// Makes the tuple's next round a full one (initial sync + sweep), whatever link it holds:
    /// `calsync resync`. Bumps `link_version`, so a running daemon's cached position is
    /// refused and re-read. `false` if no tuple has that key.
    pub async fn request_resync(&self, tuple_key: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE sync_tuples SET link = NULL, link_kind = NULL, link_version = link_version + 1, \
             round_is_full = true, last_full_sync_at = NULL, updated_at = now() WHERE tuple_key = $1",
        )
        .bind(tuple_key)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(n > 0)
    }

    /// Deletes untracked tuples (removed from the config) and their rows. Returns
    /// (tuples, events) deleted.
    pub async fn purge_untracked(&self) -> Result<(u64, u64), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let events = sqlx::query(
            "DELETE FROM events WHERE tuple_id IN (SELECT id FROM sync_tuples WHERE NOT tracked)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        let tuples = sqlx::query("DELETE FROM sync_tuples WHERE NOT tracked")
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        tx.commit().await.map_err(db)?;
        Ok((tuples, events))
    }

    /// State and last success of every tracked tuple: cheap enough for each metrics scrape
    /// (no event counts).
    pub async fn tuple_health(&self) -> Result<Vec<TupleHealth>, StoreError> {
        sqlx::query_as(
            "SELECT tuple_key, user_id, calendar_id, state, last_success_at FROM sync_tuples WHERE tracked ORDER BY tuple_key",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    pub async fn forget_link(
        &self,
        tuple_id: i64,
        expected_version: i64,
    ) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar(
            "UPDATE sync_tuples SET link = NULL, link_kind = NULL, link_version = link_version + 1, \
             round_is_full = true, updated_at = now() WHERE id = $1 AND link_version = $2 RETURNING link_version",
        )
        .bind(tuple_id)
        .bind(expected_version)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        v.ok_or(StoreError::Conflict { tuple_id })
    }

    /// Applies one page and saves the link after it, in one transaction: a crash at any
    /// instant leaves either the page and its link, or neither.
    pub async fn apply_page(&self, w: &PageWrite<'_>) -> Result<Applied, StoreError> {
        let c = w.changes;
        let may_sweep = w.link_kind == LinkKind::Delta && w.round_start != Some(RoundStart::Delta);
        if c.full.is_empty() && c.partial.is_empty() && c.removed.is_empty() && !may_sweep {
            // Only the link moves: one UPDATE is already atomic, no transaction needed. This
            // is every no-change incremental round.
            self.fault_point()?;
            let (version, _, _) = claim(&self.pool, w).await?;
            return Ok(Applied {
                version,
                ..Applied::default()
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
    ) -> Result<Applied, StoreError> {
        let (version, full_round, round_is_full) = claim(&mut **tx, w).await?;
        self.fault_point()?;
        let mut applied = Applied {
            version,
            ..Applied::default()
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

    /// Records a failed attempt with Graph's error code and message.
    pub async fn record_failure(
        &self,
        tuple_id: i64,
        state: &str,
        code: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sync_tuples SET state = $2, last_error_code = $3, last_error = $4, \
             consecutive_failures = consecutive_failures + 1, last_attempt_at = now(), updated_at = now() WHERE id = $1",
        )
        .bind(tuple_id)
        .bind(state)
        .bind(code)
        .bind(message)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// `calendar_sync_status`, one row per tuple.
    pub async fn status(&self) -> Result<Vec<StatusRow>, StoreError> {
        sqlx::query_as("SELECT * FROM calendar_sync_status ORDER BY tuple_key")
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// Event ids of a tuple, sorted (for tests and the demo's check).
    pub async fn event_ids(&self, tuple_key: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT event_id FROM calendar_events WHERE tuple_key = $1 ORDER BY event_id COLLATE \"C\"")
            .bind(tuple_key)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// The indexed columns of a tuple's rows as the read model shows them, sorted by id.
    pub async fn event_summaries(&self, tuple_key: &str) -> Result<Vec<EventSummary>, StoreError> {
        sqlx::query_as(
            "SELECT event_id, event_type, subject, start_at, end_at, is_all_day, series_master_id \
             FROM calendar_events WHERE tuple_key = $1 ORDER BY event_id COLLATE \"C\"",
        )
        .bind(tuple_key)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    pub fn pool_size(&self) -> u32 {
        self.pool.size()
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
    let kind = match w.link_kind {
        LinkKind::Next => "next",
        LinkKind::Delta => "delta",
    };
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

/// Benchmark baseline: `COPY` the rows of `from` tuples into `to` tuples (same table, same
/// indexes), returning how long the `COPY ... FROM STDIN` alone took and how many rows it wrote.
/// The rows are exported first, untimed.
pub async fn copy_rows_for_benchmark(
    store: &Store,
    pairs: &[(i64, i64)],
) -> Result<(Duration, u64), StoreError> {
    let mut conn = store.pool.acquire().await.map_err(db)?;
    let mut data = Vec::new();
    for (from, to) in pairs {
        let mut out = conn
            .copy_out_raw(&format!(
                "COPY (SELECT {to}::bigint, event_id, ical_uid, subject, start_at, end_at, is_all_day, event_type, \
                 series_master_id, last_modified_at, change_key, payload, seen_round, synced_at FROM events WHERE tuple_id = {from}) TO STDOUT"
            ))
            .await
            .map_err(db)?;
        use futures_util::StreamExt;
        while let Some(chunk) = out.next().await {
            data.extend_from_slice(&chunk.map_err(db)?);
        }
    }
    let started = std::time::Instant::now();
    let mut copy = conn
        .copy_in_raw("COPY events (tuple_id, event_id, ical_uid, subject, start_at, end_at, is_all_day, event_type, \
            series_master_id, last_modified_at, change_key, payload, seen_round, synced_at) FROM STDIN")
        .await
        .map_err(db)?;
    copy.send(data).await.map_err(db)?;
    let rows = copy.finish().await.map_err(db)?;
    Ok((started.elapsed(), rows))
}

/// Benchmark step: finish the background work a bulk load leaves (vacuum, statistics, a
/// checkpoint) so that steady-state measurements do not compete with it. Best effort.
pub async fn settle_for_benchmark(store: &Store) {
    for sql in [
        "VACUUM ANALYZE events",
        "VACUUM ANALYZE sync_tuples",
        "CHECKPOINT",
    ] {
        if let Err(e) = sqlx::query(sql).execute(&store.pool).await {
            tracing::warn!(statement = sql, error = %e, "benchmark settle step failed");
        }
    }
}

/// Drops and creates database `name` on the server `admin_url` points at, and returns a URL
/// for it. For the demo and benchmarks, which must not touch a user's own database.
pub async fn recreate_database(admin_url: &str, name: &str) -> Result<String, StoreError> {
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::Query(format!(
            "'{name}' is not a plain database name"
        )));
    }
    let opts = PgConnectOptions::from_str(admin_url).map_err(|e| {
        StoreError::Query(format!(
            "invalid database url: {}",
            redact_url_error(&e.to_string())
        ))
    })?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await
        .map_err(db)?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&pool)
        .await
        .map_err(db)?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .map_err(db)?;
    pool.close().await;
    let mut url = url_with_database(admin_url, name);
    if url.is_empty() {
        url = admin_url.to_owned();
    }
    Ok(url)
}

fn url_with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some(scheme_end) = base.find("://") else {
        return String::new();
    };
    let rest = &base[scheme_end + 3..];
    let host_end = rest.find('/').map_or(base.len(), |i| scheme_end + 3 + i);
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// sqlx's URL parse errors can echo the URL; keep only the reason.
fn redact_url_error(msg: &str) -> String {
    match msg.find("://") {
        Some(_) => "the url could not be parsed".into(),
        None => msg.to_owned(),
    }
}
