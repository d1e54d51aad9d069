//! Test and benchmark hooks, compiled only with the `testing` feature (which only
//! dev-dependencies, the test kit and the benchmarks switch on): fault points inside the page
//! transaction, a COPY baseline, throwaway databases, and a follower of the change feed
//! (`feed.rs`).

mod feed;

pub use feed::{FeedReplica, RowKey};

use crate::Store;
use crate::error::{StoreError, db, redact_url_error};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

/// Armed faults, shared by the clones of one store.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    fail_after: AtomicU32,
    panic_tuple: AtomicI64,
}

impl Store {
    /// A store on a pool made elsewhere (`#[sqlx::test]` hands each test one).
    pub fn from_pool(pool: PgPool) -> Self {
        Store::wrap(pool)
    }

    /// This store with a deadline of `d` for each call, to test what a hung database does
    /// without waiting out the real one.
    pub fn with_deadline(mut self, d: std::time::Duration) -> Self {
        self.deadline = d;
        self
    }

    /// Makes the next page transaction fail after `n` of its statements ran, before it
    /// commits, as a crash inside the transaction would. 0 disarms it.
    pub fn inject_fault_after_statements(&self, n: u32) {
        self.faults.fail_after.store(n, Ordering::SeqCst);
    }

    /// Makes the next page applied for `tuple_id` panic, as a bug would. 0 disarms it.
    pub fn inject_panic_on_apply(&self, tuple_id: i64) {
        self.faults.panic_tuple.store(tuple_id, Ordering::SeqCst);
    }

    pub(crate) fn fault_point(&self) -> Result<(), StoreError> {
        let f = &self.faults.fail_after;
        let left = f.load(Ordering::SeqCst);
        if left == 0 {
            return Ok(());
        }
        if left == 1 {
            f.store(0, Ordering::SeqCst);
            return Err(StoreError::InjectedFault);
        }
        f.store(left - 1, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn panic_point(&self, tuple_id: i64) {
        let armed = self.faults.panic_tuple.load(Ordering::SeqCst);
        if armed != 0 && armed == tuple_id {
            self.faults.panic_tuple.store(0, Ordering::SeqCst);
            panic!("injected panic while applying a page of tuple {tuple_id}");
        }
    }

    /// Finishes the background work a bulk load leaves (vacuum, statistics, a checkpoint) so
    /// that a measurement does not compete with it: before the steady-state rounds, and before
    /// each timed ingest, whose variants would otherwise each pay for the one before (the
    /// feed's cost measured 8.7% after a quiet start and 20% after the payload variant's
    /// writes, in one run). Best effort.
    pub async fn settle_for_benchmark(&self) {
        for sql in [
            "VACUUM ANALYZE events",
            "VACUUM ANALYZE series",
            "VACUUM ANALYZE sync_tuples",
            "VACUUM ANALYZE calendar_changes",
            "CHECKPOINT",
        ] {
            if let Err(e) = sqlx::query(sql).execute(&self.pool).await {
                tracing::warn!(statement = sql, error = %e, "benchmark settle step failed");
            }
        }
    }
}

impl Store {
    /// Benchmark: each tuple's id by the user it was configured with.
    pub async fn tuple_ids_by_user(&self) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query_as("SELECT user_id, id FROM sync_tuples")
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// Benchmark: which of these tuples hold an event starting at `start` (a push benchmark's
    /// writes, found again). One probe of `events_by_tuple_and_start` per tuple asked about:
    /// cheap enough to ask every 50 ms beside a storm of writes, where a scan of the read model
    /// took 50 ms of the database's CPU each time.
    pub async fn tuples_with_event_at(
        &self,
        tuple_ids: &[i64],
        start: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<i64>, StoreError> {
        sqlx::query_scalar(
            "SELECT DISTINCT tuple_id FROM events WHERE tuple_id = ANY($1) AND start_at = $2",
        )
        .bind(tuple_ids)
        .bind(start)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// Benchmark: for each push request asked since `since` and answered, seconds from the
    /// request to its taking (the wake path) and from its taking to its answer (the round).
    pub async fn push_request_spans(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<(f64, f64)>, StoreError> {
        sqlx::query_as(
            "SELECT extract(epoch FROM taken_at - requested_at)::float8, \
                    extract(epoch FROM done_at - taken_at)::float8 \
             FROM round_requests WHERE requested_by = 'push' AND requested_at >= $1 \
               AND taken_at IS NOT NULL AND done_at IS NOT NULL",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// Benchmark: every statement that writes `events` sleeps `ms` first (a statement-level
    /// trigger), standing in for a database slower than Graph.
    pub async fn slow_down_writes_for_benchmark(&self, ms: u32) -> Result<(), StoreError> {
        let secs = f64::from(ms) / 1000.0;
        for sql in [
            format!(
                "CREATE OR REPLACE FUNCTION calsync_bench_slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN PERFORM pg_sleep({secs}); RETURN NULL; END $$"
            ),
            "DROP TRIGGER IF EXISTS calsync_bench_slow ON events".to_owned(),
            "CREATE TRIGGER calsync_bench_slow BEFORE INSERT OR UPDATE ON events \
             FOR EACH STATEMENT EXECUTE FUNCTION calsync_bench_slow()"
                .to_owned(),
        ] {
            sqlx::query(&sql).execute(&self.pool).await.map_err(db)?;
        }
        Ok(())
    }
}

impl Store {
    /// Test: every statement that writes the change feed is followed by a random pause of up
    /// to `max_ms` before its transaction goes on to commit (a statement-level trigger),
    /// standing in for the round trip to a database across a network, or a slow disk's
    /// flush: the time in which a transaction holds a sequence number it has not committed.
    pub async fn slow_down_feed_commits_for_test(&self, max_ms: u32) -> Result<(), StoreError> {
        let secs = f64::from(max_ms) / 1000.0;
        for sql in [
            format!(
                "CREATE OR REPLACE FUNCTION calsync_test_slow_feed() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN PERFORM pg_sleep(random() * {secs}); RETURN NULL; END $$"
            ),
            "DROP TRIGGER IF EXISTS calsync_test_slow_feed ON calendar_changes".to_owned(),
            "CREATE TRIGGER calsync_test_slow_feed AFTER INSERT ON calendar_changes \
             FOR EACH STATEMENT EXECUTE FUNCTION calsync_test_slow_feed()"
                .to_owned(),
        ] {
            sqlx::query(&sql).execute(&self.pool).await.map_err(db)?;
        }
        Ok(())
    }
}

/// Every column of `events` but `tuple_id`: the baseline copies whole rows, as ingest writes them.
const EVENT_COLUMNS: &str = "event_id, ical_uid, subject, start_at, end_at, is_all_day, event_type, \
     series_master_id, last_modified_at, change_key, payload, seen_round, synced_at, is_cancelled, \
     start_date, end_date, organizer_email, location, show_as, online_meeting_url, \
     original_start_time_zone, time_error";

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
                "COPY (SELECT {to}::bigint, {EVENT_COLUMNS} FROM events WHERE tuple_id = {from}) TO STDOUT"
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
        .copy_in_raw(&format!(
            "COPY events (tuple_id, {EVENT_COLUMNS}) FROM STDIN"
        ))
        .await
        .map_err(db)?;
    copy.send(data).await.map_err(db)?;
    let rows = copy.finish().await.map_err(db)?;
    Ok((started.elapsed(), rows))
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
