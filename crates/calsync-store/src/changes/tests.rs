//! The cursor's proofs: a late commit is never skipped, each calendar reads in commit order.

use super::*;
use sqlx::{Acquire, PgPool};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

async fn write_change(
    conn: &mut sqlx::PgConnection,
    tuple: &str,
    event: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO calendar_changes (deployment, tuple_key, user_id, calendar_id, event_id, op, cause) \
         VALUES ('default', $1, 'u', 'default', $2, 'upsert', 'delta') RETURNING seq",
    )
    .bind(tuple)
    .bind(event)
    .fetch_one(conn)
    .await
}

/// A reader that follows the sequence alone, as an outbox read by `id > cursor` does.
async fn by_sequence(pool: &PgPool, after: i64) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT seq, event_id FROM calendar_changes WHERE seq > $1 ORDER BY seq")
        .bind(after)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Issue 25: the trap of a bigserial position (event-driven.io, "ordering in a Postgres
/// outbox"): a transaction that inserted first and commits last is passed over by a
/// reader following `seq > cursor`; the feed's cursor waits for it and reads it.
#[sqlx::test(migrations = false)]
async fn a_transaction_committing_late_is_read_where_a_sequence_cursor_skips_it(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let mut late = pool.acquire().await.unwrap();
    let mut late_tx = late.begin().await.unwrap();
    write_change(&mut late_tx, "a", "first-inserted")
        .await
        .unwrap();
    let mut early = pool.begin().await.unwrap();
    write_change(&mut early, "b", "first-committed")
        .await
        .unwrap();
    early.commit().await.unwrap();

    // While the late writer is open, the feed answers nothing after it; the sequence
    // reader sees the second row and moves past the first.
    assert_eq!(store.changes_after(None, 100).await.unwrap(), []);
    let seen = by_sequence(&pool, 0).await;
    assert_eq!(seen.len(), 1);
    let sequence_cursor = seen[0].0;

    late_tx.commit().await.unwrap();
    // Read once every transaction older than the late one ended: other tests' too (the
    // horizon is the cluster's), hence the wait.
    let began = std::time::Instant::now();
    let feed: Vec<String> = loop {
        let feed = store.changes_after(None, 100).await.unwrap();
        if feed.len() >= 2 || began.elapsed() > Duration::from_secs(30) {
            break feed.into_iter().map(|c| c.event_id).collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(feed, ["first-inserted", "first-committed"]);
    assert_eq!(
        by_sequence(&pool, sequence_cursor).await,
        [],
        "the sequence reader skipped the late commit"
    );
}

/// Issue 25: writers on five calendars (contended) commit concurrently, each holding its calendar's
/// advisory lock from before its first write (without it, a writer that wrote elsewhere
/// first holds an older transaction id than the writer of the same calendar it then waits
/// for, and its change sorts before that one), committing after a varying delay, while
/// a reader follows the feed page by page: it reads every change exactly once, and each
/// calendar's changes in the order they were made. A reader following the sequence alone
/// loses some (the same run, so the test would fail with a bigserial cursor).
#[sqlx::test(migrations = false)]
async fn a_follower_reads_every_change_once_in_each_calendars_commit_order(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    for ddl in [
        "CREATE TABLE feed_test_counters (tuple_key text PRIMARY KEY, n int NOT NULL)",
        "CREATE TABLE feed_test_log (tuple_key text NOT NULL)",
    ] {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    const TUPLES: u64 = 5;
    const WRITERS: u64 = 6;
    const WRITES: u64 = 60;
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..WRITES {
                // A fixed scramble instead of a generator: which calendar, how long to wait.
                let x = (w * 7919 + i * 104_729) % 1_000_003;
                let tuple = format!("t{}", x % TUPLES);
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(&tuple)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                // A write before the calendar's own, as a registration writes its
                // generation before its tuples: it takes the transaction id early.
                sqlx::query("INSERT INTO feed_test_log VALUES ($1)")
                    .bind(&tuple)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(x % 3)).await;
                let n: i32 = sqlx::query_scalar(
                    "INSERT INTO feed_test_counters VALUES ($1, 1) ON CONFLICT (tuple_key) \
                     DO UPDATE SET n = feed_test_counters.n + 1 RETURNING n",
                )
                .bind(&tuple)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                write_change(&mut tx, &tuple, &format!("{tuple}-{n}"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(x % 15)).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    let follower = {
        let (store, pool, done) = (store.clone(), pool.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut cursor: Option<String> = None;
            let mut feed: Vec<Change> = Vec::new();
            let (mut seq_cursor, mut by_seq) = (0i64, 0usize);
            let mut finished_at: Option<std::time::Instant> = None;
            loop {
                if finished_at.is_none() && done.load(Ordering::Acquire) {
                    finished_at = Some(std::time::Instant::now());
                }
                let page = store.changes_after(cursor.as_deref(), 37).await.unwrap();
                let more = by_sequence(&pool, seq_cursor).await;
                if let Some(last) = more.last() {
                    seq_cursor = last.0;
                }
                by_seq += more.len();
                if let Some(last) = page.last() {
                    cursor = Some(last.cursor.clone());
                }
                feed.extend(page);
                // Every change is read once the writers are done, unless a transaction
                // elsewhere in the cluster (another test's) holds the horizon back: the
                // feed then waits for it, bounded here.
                let total = (WRITERS * WRITES) as usize;
                if finished_at
                    .is_some_and(|t| feed.len() >= total || t.elapsed() > Duration::from_secs(60))
                {
                    return (feed, by_seq);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Release);
    let (feed, by_seq) = follower.await.unwrap();

    let total = (WRITERS * WRITES) as usize;
    assert_eq!(feed.len(), total, "every change read, none twice");
    let mut last: HashMap<&str, u32> = HashMap::new();
    for c in &feed {
        let n: u32 = c.event_id.rsplit('-').next().unwrap().parse().unwrap();
        let before = last.insert(&c.tuple_key, n).unwrap_or(0);
        assert_eq!(n, before + 1, "{}: commit order", c.tuple_key);
    }
    assert!(
        by_seq < total,
        "the sequence reader should have skipped late commits ({by_seq} of {total} read)"
    );
}
