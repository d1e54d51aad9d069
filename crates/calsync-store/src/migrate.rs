//! Applying the schema's migrations so that two releases can share a database during a rolling
//! update (issue 23, point 5):
//! - **An older binary starts** against a database a newer one migrated: migrations it does not
//!   know are left alone and named in a warning (sqlx refused to start: "migration N was
//!   previously applied but is missing"). That is safe because migrations are additive for one
//!   release (`migrations/README.md`).
//! - **A migration never queues the read model for long.** Each statement waits at most
//!   [`LOCK_TIMEOUT`] for a lock: an `ALTER TABLE` behind an app's long read on
//!   `calendar_events` would otherwise block every commit and every later read until it got its
//!   lock. An attempt that gives up is retried (a new session, the failed migration rolled back)
//!   with a doubling pause, for [`RETRY_FOR`] in all.

use crate::Store;
use crate::error::{StoreError, db};
use std::time::{Duration, Instant};
use tracing::warn;

/// How long one statement of a migration waits for a lock before its attempt gives up.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a start keeps retrying migrations that wait on locks before it fails.
pub const RETRY_FOR: Duration = Duration::from_secs(300);

/// What [`Store::migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// The versions applied by this call.
    pub applied: Vec<i64>,
    /// Migrations the database has that this binary does not know (a newer release's), as
    /// version and description: left alone.
    pub unknown: Vec<(i64, String)>,
    /// Attempts that gave up waiting for a lock before one went through.
    pub lock_retries: u32,
}

impl Store {
    /// Applies the embedded migrations (append-only files in `migrations/`), each statement
    /// waiting at most [`LOCK_TIMEOUT`] for a lock and the whole retried for [`RETRY_FOR`];
    /// migrations of a newer release found in the database are left alone (see the module).
    pub async fn migrate(&self) -> Result<Migrated, StoreError> {
        self.migrate_with(LOCK_TIMEOUT, RETRY_FOR).await
    }

    /// [`Store::migrate`] with its lock timeout and retry span given.
    pub async fn migrate_with(
        &self,
        lock_timeout: Duration,
        retry_for: Duration,
    ) -> Result<Migrated, StoreError> {
        let mut migrator = sqlx::migrate!("../../migrations");
        migrator.set_ignore_missing(true);
        let before = self.applied_migrations().await?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(250);
        let mut lock_retries = 0;
        loop {
            let mut conn = self.pool.acquire().await.map_err(db)?;
            // A session of its own, closed after the attempt: a failed one may still hold
            // sqlx's advisory migration lock, which goes with the session.
            conn.close_on_drop();
            sqlx::query(&format!(
                "SET lock_timeout = '{}ms'",
                lock_timeout.as_millis().max(1)
            ))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            match migrator.run(&mut *conn).await {
                Ok(()) => break,
                Err(e) if waited_for_a_lock(&e) && started.elapsed() < retry_for => {
                    lock_retries += 1;
                    warn!(
                        attempt = lock_retries,
                        wait_ms = pause.as_millis() as u64,
                        "a migration waited {} ms for a lock (a long read or another replica migrating); trying again",
                        lock_timeout.as_millis()
                    );
                    drop(conn);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(StoreError::Migration(e.to_string())),
            }
        }
        let after = self.applied_migrations().await?;
        let applied = after
            .iter()
            .map(|(v, _)| *v)
            .filter(|v| migrator.version_exists(*v) && !before.iter().any(|(b, _)| b == v))
            .collect();
        let unknown: Vec<(i64, String)> = after
            .into_iter()
            .filter(|(v, _)| !migrator.version_exists(*v))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().map(|(v, d)| format!("{v} {d}")).collect();
            warn!(
                migrations = %names.join(", "),
                "the database has migrations this binary does not know (a newer calsync applied them); they are additive by rule, so this one runs beside them"
            );
        }
        Ok(Migrated {
            applied,
            unknown,
            lock_retries,
        })
    }

    /// The migrations recorded as applied, as version and description (none before the first).
    async fn applied_migrations(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        if !exists {
            return Ok(Vec::new());
        }
        sqlx::query_as(
            "SELECT version, description FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }
}

/// An attempt that gave up waiting for a lock (SQLSTATE 55P03, `lock_not_available`).
fn waited_for_a_lock(e: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let inner = match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => e,
        _ => return false,
    };
    inner
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "55P03")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::PgPool;

    /// An old binary starts against a database a newer one migrated (before: "migration 9999
    /// was previously applied but is missing in the resolved migrations").
    #[sqlx::test(migrations = false)]
    async fn a_binary_starts_beside_migrations_of_a_newer_release(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        let first = store.migrate().await.unwrap();
        assert!(!first.applied.is_empty());
        assert!(first.unknown.is_empty());
        // A newer release added a column and recorded its migration.
        sqlx::query("ALTER TABLE events ADD COLUMN web_link text")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'web link', true, '\\x00'::bytea, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let again = store.migrate().await.unwrap();
        assert_eq!(again.applied, Vec::<i64>::new());
        assert_eq!(again.unknown, vec![(9999, "web link".to_owned())]);
        assert!(store.migrations_current().await.unwrap());
    }

    /// A database from before the last migration that restates a view of the read model (a
    /// migration that must wait for an app's read), and an app's long read of the read model
    /// holding its locks; returns the versions still to apply.
    async fn before_a_view_change_with_a_reader(
        pool: &PgPool,
    ) -> (Vec<i64>, sqlx::Transaction<'static, sqlx::Postgres>) {
        let mut older = sqlx::migrate!("../../migrations");
        let from = older
            .iter()
            .filter(|m| m.sql.contains("CREATE OR REPLACE VIEW"))
            .map(|m| m.version)
            .max()
            .unwrap();
        let pending: Vec<i64> = older
            .iter()
            .map(|m| m.version)
            .filter(|v| *v >= from)
            .collect();
        older.migrations = older
            .migrations
            .iter()
            .filter(|m| m.version < from)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        older.run(pool).await.unwrap();
        let mut reader = pool.begin().await.unwrap();
        // Both views of the read model, as a dashboard's read does: whichever a migration
        // restates (or the tables under them), it waits on this reader's locks.
        sqlx::query("SELECT (SELECT count(*) FROM calendar_events), (SELECT count(*) FROM calendar_sync_status)")
            .execute(&mut *reader)
            .await
            .unwrap();
        (pending, reader)
    }

    /// A migration behind a long read (an app's transaction on `events`) gives up within its
    /// lock timeout, leaves the read alone, and goes through once the read ends.
    #[sqlx::test(migrations = false)]
    async fn a_migration_waiting_on_a_lock_gives_up_fast_and_retries(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        let (pending, reader) = before_a_view_change_with_a_reader(&pool).await;
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            reader.commit().await.unwrap();
        });
        let began = Instant::now();
        let m = store
            .migrate_with(Duration::from_millis(200), Duration::from_secs(30))
            .await
            .unwrap();
        release.await.unwrap();
        assert_eq!(m.applied, pending);
        assert!(m.lock_retries >= 1, "{m:?}");
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
    }

    /// Past the retry span, the start fails and names the wait.
    #[sqlx::test(migrations = false)]
    async fn a_lock_held_past_the_retry_span_fails_the_start(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        let (_, reader) = before_a_view_change_with_a_reader(&pool).await;
        let e = store
            .migrate_with(Duration::from_millis(100), Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("lock timeout"), "{e}");
        reader.rollback().await.unwrap();
    }
}
