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

impl TrackedSet {
    /// A deployment before its first registration: generation 0, no digest.
    fn none() -> Self {
        TrackedSet {
            generation: 0,
            config_digest: String::new(),
            anchor: None,
            cause: "none".into(),
            written_by: String::new(),
            written_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }
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
            Ok(found.unwrap_or_else(TrackedSet::none))
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
            let set = set.unwrap_or_else(TrackedSet::none);
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

    /// The deployment's random salt for hashed metric labels, made on first use (32 bytes from
    /// `fresh` if none is stored yet): the same for every replica and across restarts.
    pub async fn label_salt(&self, fresh: [u8; 32]) -> Result<Vec<u8>, StoreError> {
        self.bounded("reading the label salt", async {
            sqlx::query(
                "INSERT INTO deployment_salts (deployment, label_salt) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(&*self.deployment)
            .bind(&fresh[..])
            .execute(&self.pool)
            .await
            .map_err(db)?;
            sqlx::query_scalar("SELECT label_salt FROM deployment_salts WHERE deployment = $1")
                .bind(&*self.deployment)
                .fetch_one(&self.pool)
                .await
                .map_err(db)
        })
        .await
    }

    /// Records whether this replica's config file is the deployment's (for `status`).
    pub async fn note_config_stale(&self, stale: bool) -> Result<bool, StoreError> {
        let me = self.incarnation().unwrap_or("").to_owned();
        self.bounded("recording the config state", async {
            let done = sqlx::query(
                "UPDATE replicas SET config_stale = $3 WHERE deployment = $1 AND incarnation = $2",
            )
            .bind(&*self.deployment)
            .bind(&me)
            .bind(stale)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// The live `run` replicas whose config file is not the deployment's, by name.
    pub async fn stale_replicas(&self) -> Result<Vec<String>, StoreError> {
        self.bounded("reading stale replicas", async {
            sqlx::query_scalar(
                "SELECT replica FROM replicas WHERE deployment = $1 AND kind = 'run' \
                 AND expires_at > now() AND config_stale ORDER BY replica",
            )
            .bind(&*self.deployment)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// A connection listening for new generations of this deployment's set.
    pub async fn listen_sets(&self) -> Result<SetListener, StoreError> {
        self.listen(CHANNEL).await
    }

    /// A connection listening for round requests of this deployment.
    pub async fn listen_rounds(&self) -> Result<SetListener, StoreError> {
        self.listen(crate::wake::ROUNDS_CHANNEL).await
    }

    pub(crate) async fn listen(&self, channel: &str) -> Result<SetListener, StoreError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(db)?;
        l.listen(channel).await.map_err(db)?;
        Ok(SetListener {
            inner: l,
            deployment: self.deployment.to_string(),
        })
    }
}

/// Notifications on one channel (new generations, round requests) for this store's
/// deployment.
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

    /// Takes the notifications already waiting, without waiting for more: a burst (a storm
    /// of push notifications) wakes its reader once, not once per notification.
    pub async fn drain(&mut self) {
        while let Ok(Ok(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(1), self.inner.recv()).await
        {
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuples::test_spec as spec;
    use sqlx::PgPool;

    fn write(cause: &'static str, digest: Option<&str>, based_on: Option<i64>) -> SetWrite {
        SetWrite {
            cause,
            digest: digest.map(str::to_owned),
            based_on,
            anchor: None,
        }
    }

    #[sqlx::test(migrations = false)]
    async fn a_registration_moves_the_generation_only_when_the_set_changes(pool: PgPool) {
        let store = Store::from_pool(pool.clone()).as_incarnation("r1#a");
        store.migrate().await.unwrap();
        assert_eq!(store.tracked_set().await.unwrap().generation, 0);
        let mut listener = store.listen_sets().await.unwrap();
        let r = store
            .register_set(
                &[spec("a", "{}"), spec("b", "{}")],
                true,
                &write("start", Some("d1"), None),
            )
            .await
            .unwrap();
        assert_eq!((r.generation, r.changed), (1, true));
        tokio::time::timeout(Duration::from_secs(5), listener.next())
            .await
            .expect("a new generation is notified")
            .unwrap();
        // The same set again: nothing written, the generation stays.
        let r = store
            .register_set(
                &[spec("a", "{}"), spec("b", "{}")],
                true,
                &write("start", Some("d1"), None),
            )
            .await
            .unwrap();
        assert_eq!((r.generation, r.changed), (1, false));
        // A changed setting (an interval) is a change; an untracked tuple is one.
        let r = store
            .register_set(
                &[spec("a", "{\"interval_ms\":1}")],
                true,
                &write("reload", Some("d2"), None),
            )
            .await
            .unwrap();
        assert_eq!(r.generation, 2);
        let since = store.tracked_since(1).await.unwrap();
        let mut changed: Vec<(String, bool)> = since
            .tuples
            .iter()
            .map(|t| (t.tuple_key.clone(), t.tracked))
            .collect();
        changed.sort();
        assert_eq!(changed, [("a".into(), true), ("b".into(), false)]);
        assert_eq!((since.set.generation, since.tracked), (2, 1));
        assert_eq!(since.set.config_digest, "d2");
        assert_eq!(since.set.written_by, "r1#a");
        // The whole set: tracked tuples only.
        assert_eq!(store.tracked_since(-1).await.unwrap().tuples.len(), 1);
        // d1 ran and was replaced: a replica starting with it has a stale file.
        assert!(store.config_superseded("d1").await.unwrap());
        assert!(!store.config_superseded("d2").await.unwrap());
        assert!(!store.config_superseded("never-ran").await.unwrap());
    }

    #[sqlx::test(migrations = false)]
    async fn a_change_computed_from_an_older_generation_is_refused_whole(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        store
            .register_set(&[spec("a", "{}")], true, &write("start", Some("d1"), None))
            .await
            .unwrap();
        // A discovery pass starts at generation 1; a reload writes generation 2 meanwhile.
        store
            .register_set(&[spec("b", "{}")], true, &write("reload", Some("d2"), None))
            .await
            .unwrap();
        let err = store
            .register_set(&[spec("a", "{}")], true, &write("discovery", None, Some(1)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Superseded {
                    based_on: 1,
                    current: 2
                }
            ),
            "{err}"
        );
        let tracked: Vec<String> =
            sqlx::query_scalar("SELECT tuple_key FROM sync_tuples WHERE tracked")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(tracked, ["b"], "nothing of the refused change was written");
    }

    #[sqlx::test(migrations = false)]
    async fn a_role_is_held_by_one_incarnation_until_it_lapses_or_is_released(pool: PgPool) {
        let a = Store::from_pool(pool.clone()).as_incarnation("r1#a");
        let b = Store::from_pool(pool.clone()).as_incarnation("r2#b");
        a.migrate().await.unwrap();
        let ttl = Duration::from_secs(60);
        assert!(a.hold_role("discovery", ttl).await.unwrap());
        assert!(!b.hold_role("discovery", ttl).await.unwrap());
        assert!(
            a.hold_role("discovery", ttl).await.unwrap(),
            "renewed by its holder"
        );
        assert!(
            b.hold_role("rebase", ttl).await.unwrap(),
            "roles are separate"
        );
        assert_eq!(
            b.role_holder("discovery").await.unwrap().as_deref(),
            Some("r1#a")
        );
        a.release_role("discovery").await.unwrap();
        assert!(b.hold_role("discovery", ttl).await.unwrap());
        // Lapsed by the database's clock (a holder suspended past its ttl): taken over.
        sqlx::query("UPDATE deployment_roles SET expires_at = now() - interval '1 second'")
            .execute(&pool)
            .await
            .unwrap();
        assert!(a.hold_role("discovery", ttl).await.unwrap());
    }

    /// Issue 23: a tuple whose state says `ok` while no round completes (a stand-down loop,
    /// no owner) is shown as stale by the view, `status` and `/metrics`' counts.
    #[sqlx::test(migrations = false)]
    async fn a_tuple_overdue_past_its_bound_is_stale_whatever_its_state_claims(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        store
            .register_set(
                &[
                    spec("fresh", "{\"stale_after_s\": 900}"),
                    spec("overdue", "{\"stale_after_s\": 900}"),
                    spec("failed", "{\"stale_after_s\": 900}"),
                    spec("hourly", "{\"stale_after_s\": 10800}"),
                ],
                true,
                &write("start", Some("d"), None),
            )
            .await
            .unwrap();
        for (key, state, ago) in [
            ("fresh", "ok", 60),
            ("overdue", "ok", 1800),
            ("failed", "failed", 1800),
            ("hourly", "ok", 1800),
        ] {
            sqlx::query(
                "UPDATE sync_tuples SET state = $2, last_success_at = now() - make_interval(secs => $3) WHERE tuple_key = $1",
            )
            .bind(key)
            .bind(state)
            .bind(ago as f64)
            .execute(&pool)
            .await
            .unwrap();
        }
        let stale: Vec<String> = store
            .status_page(&crate::StatusQuery {
                stale: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.tuple_key)
            .collect();
        assert_eq!(
            stale,
            ["overdue"],
            "failed says so itself; hourly is within 3 h"
        );
        let s = store.status_summary().await.unwrap();
        assert_eq!((s.stale, s.tracked), (1, 4));
        let ok = s
            .by_state
            .iter()
            .find(|(st, _)| *st == crate::TupleStatus::Ok)
            .unwrap()
            .1;
        assert_eq!(ok, 2, "a stale tuple is counted once, as stale");
    }
}
