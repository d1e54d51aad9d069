//! Database trouble that is not an outage: a server turned read-only (a failover), a lock held
//! by someone else, a statement cancelled by its timeout, a value PostgreSQL refuses. Each is
//! caused for real on the test's own database; none may leave a tuple `failed` or a page stuck.

use crate::harness::*;
use calsync_engine::{Health, Outcome, SyncSettings};
use calsync_store::TupleStatus;
use serde_json::json;
use sqlx::{Connection, Executor, PgPool};

/// Ends every other session on this database, so the pool reconnects and new sessions pick up
/// database-level settings.
async fn reconnect_everyone(admin: &mut sqlx::PgConnection) {
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
}

/// A session of its own on the test's database, outside the pool under test.
async fn admin_session(pool: &PgPool) -> sqlx::PgConnection {
    let opts = pool.connect_options().as_ref().clone();
    sqlx::PgConnection::connect_with(&opts).await.unwrap()
}

fn quick() -> SyncSettings {
    SyncSettings {
        max_attempts: 2,
        ..settings()
    }
}

fn retrying(o: &Outcome) -> bool {
    matches!(o, Outcome::Failed(f) if f.health == Health::Retrying && f.code == "DatabaseUnavailable")
}

#[sqlx::test(migrations = false)]
async fn a_database_turned_read_only_is_waited_out_not_failed(pool: PgPool) {
    let h = harness(pool.clone(), 20).await;
    seed(&h, 10);
    let engine = h.engine(quick());
    let t = h.default_tuple(&engine).await;
    let mut admin = admin_session(&pool).await;
    // A failover: the server this URL reaches is now a standby (SQLSTATE 25006 on writes).
    admin
        .execute("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_read_only = on', current_database()); END $$")
        .await
        .unwrap();
    reconnect_everyone(&mut admin).await;
    let o = sync(&engine, &t).await;
    assert!(retrying(&o), "retried as unavailable, not failed: {o:?}");
    admin
        .execute("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I RESET default_transaction_read_only', current_database()); END $$")
        .await
        .unwrap();
    reconnect_everyone(&mut admin).await;
    // The pool's old connections are gone; the next round reconnects and completes.
    let r = sync(&engine, &t).await;
    let r = if retrying(&r) {
        sync(&engine, &t).await
    } else {
        r
    };
    report(r);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert_eq!(h.store.status().await.unwrap()[0].state, TupleStatus::Ok);
}

#[sqlx::test(migrations = false)]
async fn a_lock_held_past_the_statement_timeout_is_retried_not_failed(pool: PgPool) {
    let h = harness(pool.clone(), 20).await;
    seed(&h, 10);
    let engine = h.engine(quick());
    let t = h.default_tuple(&engine).await;
    let mut admin = admin_session(&pool).await;
    // calsync's sessions carry a statement_timeout; here a short one, set for the database.
    admin
        .execute("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET statement_timeout = ''300ms''', current_database()); END $$")
        .await
        .unwrap();
    reconnect_everyone(&mut admin).await;
    // Someone holds the tuples table: every write of calsync's waits, then is cancelled (57014).
    let mut locker = admin_session(&pool).await;
    locker.execute("BEGIN").await.unwrap();
    locker
        .execute("LOCK TABLE sync_tuples IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let o = sync(&engine, &t).await;
    assert!(retrying(&o), "retried as unavailable, not failed: {o:?}");
    locker.execute("ROLLBACK").await.unwrap();
    report(sync(&engine, &t).await);
    h.assert_mirrors(std::slice::from_ref(&t)).await;
    assert_eq!(h.store.status().await.unwrap()[0].state, TupleStatus::Ok);
}

#[sqlx::test(migrations = false)]
async fn an_event_with_nul_characters_is_stored_without_them_and_its_page_commits(pool: PgPool) {
    let h = harness(pool, 50).await;
    seed(&h, 5);
    // PostgreSQL refuses U+0000 in text and jsonb; bodies pasted from other systems carry it.
    let nul = h.create(json!({
        "subject": "Budget\u{0} review",
        "body": {"contentType": "html", "content": "<p>from a fax\u{0}gateway</p>"},
        "start": at("2026-01-20T10:00:00"), "end": at("2026-01-20T11:00:00")
    }));
    let engine = h.engine(settings());
    let t = h.default_tuple(&engine).await;
    report(sync(&engine, &t).await);
    let rows = h.store.event_summaries(&t.key).await.unwrap();
    let truth: Vec<String> = h.instances(&t).into_iter().map(|i| i.id).collect();
    let mut stored: Vec<String> = rows.iter().map(|r| r.event_id.clone()).collect();
    let mut want = truth.clone();
    stored.sort();
    want.sort();
    assert_eq!(stored, want, "every item of the page committed");
    let row = rows.iter().find(|r| r.event_id == nul).unwrap();
    assert_eq!(row.subject.as_deref(), Some("Budget review"));
    assert_eq!(h.store.status().await.unwrap()[0].state, TupleStatus::Ok);
}
