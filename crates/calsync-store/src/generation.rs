//! The deployment's tracked set as versioned generations (issue 23, migration
//! `0007_generations.sql`): registration bumps the generation in the transaction that changes
//! tuples and notifies `calsync_tracked`; replicas read what changed since the generation they
//! know and schedule from it. Also the roles one replica holds at a time (the coordinator that
//! runs discovery and re-base), by the database's clock.

use crate::Store;
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Duration;

/// The channel a registration notifies, with the deployment as payload.
pub const CHANNEL: &str = "calsync_tracked";

/// What a registration says about the generation it writes.
#[derive(Debug, Clone, Default)]
pub struct SetWrite {
    /// Why: `start`, `reload`, `discovery`, `rebase`, `sync-once` (shown by `status`).
    pub cause: &'static str,
    /// The digest of the config this set comes from; `None` keeps the current one (a
    /// discovery pass or a re-base writes the set of the config in force).
    pub digest: Option<String>,
    /// `Some(g)`: refuse (`StoreError::Superseded`) unless the deployment is still at
    /// generation `g` — what a discovery pass or a re-base computed its set from.
    pub based_on: Option<i64>,
    /// The rolling windows' anchor the set's windows are at.
    pub anchor: Option<DateTime<Utc>>,
}

/// What a registration wrote.
#[derive(Debug, Clone)]
pub struct Registered {
    /// Each registered tuple's id by its key.
    pub ids: HashMap<String, i64>,
    /// The deployment's generation after it.
    pub generation: i64,
    /// Whether it wrote a new generation (a tuple or the digest changed).
    pub changed: bool,
}

/// A deployment's current generation.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TrackedSet {
    /// The generation (0: none written yet).
    pub generation: i64,
    /// The digest of the config it came from (empty: none yet).
    pub config_digest: String,
    /// The rolling windows' anchor its windows are at, if known.
    pub anchor: Option<DateTime<Utc>>,
    /// Why it was written.
    pub cause: String,
    /// The incarnation that wrote it.
    pub written_by: String,
    /// When.
    pub written_at: DateTime<Utc>,
}

/// A stored tuple as a replica schedules it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredTuple {
    /// Its id.
    pub id: i64,
    /// Its key.
    pub tuple_key: String,
    /// The mailbox as configured.
    pub user_id: String,
    /// The mailbox's lease key.
    pub mailbox: String,
    /// `default` or a calendar id.
    pub calendar_id: String,
    /// The window's start.
    pub window_start: DateTime<Utc>,
    /// The window's end.
    pub window_end: DateTime<Utc>,
    /// Whether it is tracked (an untracked one is dropped from the schedule).
    pub tracked: bool,
    /// Its settings as the engine wrote them (`None`: written by an older release).
    pub settings: Option<String>,
}

/// What changed since a generation.
#[derive(Debug, Clone)]
pub struct SetChanges {
    /// The deployment's generation as of the read.
    pub set: TrackedSet,
    /// Every tuple written after the generation asked about, tracked or not.
    pub tuples: Vec<StoredTuple>,
    /// How many tuples are tracked in all: a reader whose set, with these changes applied,
    /// holds another number missed a change (a purge deletes untracked rows, so a reader
    /// that did not see them untracked never sees them go) and reads the whole set.
    pub tracked: i64,
}

/// Locks the deployment's generation row (creating it at 0) and answers it and its digest.
pub(crate) async fn lock_set(
    tx: &mut sqlx::PgConnection,
    deployment: &str,
) -> Result<(i64, String), StoreError> {
    sqlx::query(
        "INSERT INTO tracked_sets (deployment, generation, config_digest, cause, written_by) \
         VALUES ($1, 0, '', 'none', '') ON CONFLICT DO NOTHING",
    )
    .bind(deployment)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query_as(
        "SELECT generation, config_digest FROM tracked_sets WHERE deployment = $1 FOR UPDATE",
    )
    .bind(deployment)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)
}

/// Writes generation `next` (the tuples carry it already) and notifies the replicas; the
/// notification is delivered at commit.
pub(crate) async fn write_set(
    tx: &mut sqlx::PgConnection,
    deployment: &str,
    next: i64,
    write: &SetWrite,
    by: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE tracked_sets SET generation = $2, config_digest = COALESCE($3, config_digest), \
           anchor = COALESCE($4, anchor), cause = $5, written_by = $6, written_at = now() \
         WHERE deployment = $1",
    )
    .bind(deployment)
    .bind(next)
    .bind(write.digest.as_deref())
    .bind(write.anchor)
    .bind(if write.cause.is_empty() {
        "register"
    } else {
        write.cause
    })
    .bind(by.unwrap_or(""))
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    if let Some(digest) = &write.digest {
        sqlx::query(
            "INSERT INTO tracked_set_digests (deployment, config_digest, generation) VALUES ($1, $2, $3) \
             ON CONFLICT (deployment, config_digest) DO UPDATE SET generation = EXCLUDED.generation",
        )
        .bind(deployment)
        .bind(digest)
        .bind(next)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(deployment)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    Ok(())
}

/// Records the anchor of a set whose windows did not move (a re-base that found nothing to
/// move): the generation stays.
pub(crate) async fn set_anchor(
    tx: &mut sqlx::PgConnection,
    deployment: &str,
    anchor: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE tracked_sets SET anchor = $2 WHERE deployment = $1")
        .bind(deployment)
        .bind(anchor)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    Ok(())
}

const SET_COLUMNS: &str = "generation, config_digest, anchor, cause, written_by, written_at";

impl Store {
    /// The deployment's current generation (generation 0 and an empty digest before the
    /// first registration).
    pub async fn tracked_set(&self) -> Result<TrackedSet, StoreError> {
        self.bounded("reading the generation", async {
            let found: Option<TrackedSet> = sqlx::query_as(&format!(
                "SELECT {SET_COLUMNS} FROM tracked_sets WHERE deployment = $1"
            ))
            .bind(&*self.deployment)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            Ok(found.unwrap_or(TrackedSet {
                generation: 0,
                config_digest: String::new(),
                anchor: None,
                cause: "none".into(),
                written_by: String::new(),
                written_at: DateTime::<Utc>::UNIX_EPOCH,
            }))
        })
        .await
    }

    /// The tuples written after generation `after` (every tuple for a negative `after`), and
    /// the generation they bring the reader to, read in one snapshot.
    pub async fn tracked_since(&self, after: i64) -> Result<SetChanges, StoreError> {
        crate::within(self.deadline.saturating_mul(4), "reading the tracked set", async {
            let mut tx = self.pool.begin().await.map_err(db)?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let set: Option<TrackedSet> = sqlx::query_as(&format!(
                "SELECT {SET_COLUMNS} FROM tracked_sets WHERE deployment = $1"
            ))
            .bind(&*self.deployment)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            let tuples: Vec<StoredTuple> = sqlx::query_as(
                "SELECT id, tuple_key, user_id, mailbox, calendar_id, window_start, window_end, tracked, settings \
                 FROM sync_tuples WHERE deployment = $1 AND generation > $2 AND (tracked OR $2 >= 0) ORDER BY tuple_key",
            )
            .bind(&*self.deployment)
            .bind(after)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            let tracked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sync_tuples WHERE deployment = $1 AND tracked",
            )
            .bind(&*self.deployment)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            let set = set.unwrap_or(TrackedSet {
                generation: 0,
                config_digest: String::new(),
                anchor: None,
                cause: "none".into(),
                written_by: String::new(),
                written_at: DateTime::<Utc>::UNIX_EPOCH,
            });
            Ok(SetChanges {
                set,
                tuples,
                tracked,
            })
        })
        .await
    }

    /// Whether this deployment ran the config of `digest` before and then replaced it: a
    /// replica starting with such a file has a stale file, not a new config.
    pub async fn config_superseded(&self, digest: &str) -> Result<bool, StoreError> {
        self.bounded("reading config digests", async {
            let found: Option<i64> = sqlx::query_scalar(
                "SELECT d.generation FROM tracked_set_digests d JOIN tracked_sets s USING (deployment) \
                 WHERE d.deployment = $1 AND d.config_digest = $2 AND s.config_digest <> $2",
            )
            .bind(&*self.deployment)
            .bind(digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            Ok(found.is_some())
        })
        .await
    }

    /// Takes or keeps `role` for this incarnation for `ttl` (by the database's clock);
    /// `false` if another live holder has it.
    pub async fn hold_role(&self, role: &str, ttl: Duration) -> Result<bool, StoreError> {
        let me = self.incarnation().unwrap_or("");
        self.bounded("taking a role", async {
            let held: Option<String> = sqlx::query_scalar(
                "INSERT INTO deployment_roles (deployment, role, holder, expires_at) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
                 ON CONFLICT (deployment, role) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
                 WHERE deployment_roles.holder = EXCLUDED.holder OR deployment_roles.expires_at < now() \
                 RETURNING holder",
            )
            .bind(&*self.deployment)
            .bind(role)
            .bind(me)
            .bind(ttl.as_secs_f64())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            Ok(held.is_some())
        })
        .await
    }

    /// Gives `role` up if this incarnation holds it (at shutdown: another replica takes it at
    /// its next try instead of after the ttl).
    pub async fn release_role(&self, role: &str) -> Result<(), StoreError> {
        let me = self.incarnation().unwrap_or("");
        self.bounded("releasing a role", async {
            sqlx::query(
                "DELETE FROM deployment_roles WHERE deployment = $1 AND role = $2 AND holder = $3",
            )
            .bind(&*self.deployment)
            .bind(role)
            .bind(me)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// Who holds `role` now, if anyone (for `status`).
    pub async fn role_holder(&self, role: &str) -> Result<Option<String>, StoreError> {
        self.bounded("reading a role", async {
            sqlx::query_scalar(
                "SELECT holder FROM deployment_roles WHERE deployment = $1 AND role = $2 AND expires_at > now()",
            )
            .bind(&*self.deployment)
            .bind(role)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// A connection listening for new generations of any deployment's set.
    pub async fn listen_sets(&self) -> Result<SetListener, StoreError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(db)?;
        l.listen(CHANNEL).await.map_err(db)?;
        Ok(SetListener {
            inner: l,
            deployment: self.deployment.to_string(),
        })
    }
}

/// Notifications of new generations of this store's deployment.
pub struct SetListener {
    inner: sqlx::postgres::PgListener,
    deployment: String,
}

impl std::fmt::Debug for SetListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetListener")
            .field("deployment", &self.deployment)
            .finish_non_exhaustive()
    }
}

impl SetListener {
    /// Resolves at the next notification for this deployment. A lost connection is an error
    /// (notifications sent meanwhile are lost: the caller polls as well); the next call
    /// reconnects.
    pub async fn next(&mut self) -> Result<(), StoreError> {
        loop {
            let n = self.inner.recv().await.map_err(db)?;
            if n.payload() == self.deployment {
                return Ok(());
            }
        }
    }
}
