//! Mailbox leases: which replica of a deployment syncs which mailbox.
//!
//! A replica registers an *incarnation* (one per process start) in `replicas` with an expiry in
//! database time; one heartbeat renews it, and with it every lease the incarnation owns. A lease
//! (`mailbox_leases`) is current while its owner's row is unexpired. Each acquisition draws a new
//! fencing token from one sequence, and every page commit names the token it holds
//! ([`crate::PageWrite::fence`]): a process whose lease lapsed or moved writes nothing.
//! All times are the database's, so replicas' clocks never matter.

use crate::Store;
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// What a replica is, for the fair share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaKind {
    /// `calsync run`: shares the deployment's mailboxes with the other `run` replicas.
    Run,
    /// A one-off command (`sync-once`): holds only the leases it takes, counts towards no share.
    OneOff,
}

impl ReplicaKind {
    fn as_str(self) -> &'static str {
        match self {
            ReplicaKind::Run => "run",
            ReplicaKind::OneOff => "one-off",
        }
    }
}

/// What one heartbeat learned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// Whether this incarnation's row had expired (or was gone) before this renewal: its
    /// leases may have been taken meanwhile.
    pub lapsed: bool,
    /// The live `run` incarnations of the deployment, sorted (this one included if it is one).
    pub live: Vec<String>,
    /// Mailboxes of the deployment (lease rows).
    pub mailboxes: u64,
    /// Leases this incarnation owns now.
    pub owned: u64,
}

/// Who holds a mailbox, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct LeaseOwner {
    /// The mailbox's lease key.
    pub mailbox: String,
    /// The replica holding it (as configured), if any live one does.
    pub replica: Option<String>,
    /// Until when (database time) the holder's heartbeat keeps it.
    pub expires_at: Option<DateTime<Utc>>,
}

fn interval(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Store {
    /// Renews this incarnation (inserting it on the first call) until `ttl` from now, and with
    /// it every lease it owns; reports the live replicas and the deployment's mailbox count.
    pub async fn heartbeat(
        &self,
        incarnation: &str,
        replica: &str,
        kind: ReplicaKind,
        ttl: Duration,
    ) -> Result<Heartbeat, StoreError> {
        let query = async {
            let mut tx = self.pool.begin().await.map_err(db)?;
            let alive: Option<bool> = sqlx::query_scalar(
                "SELECT expires_at > now() FROM replicas WHERE deployment = $1 AND incarnation = $2 FOR UPDATE",
            )
            .bind(&*self.deployment)
            .bind(incarnation)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            sqlx::query(
                "INSERT INTO replicas (deployment, incarnation, replica, kind, expires_at) \
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
                 ON CONFLICT (deployment, incarnation) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at",
            )
            .bind(&*self.deployment)
            .bind(incarnation)
            .bind(replica)
            .bind(kind.as_str())
            .bind(interval(ttl))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            // Rows of replicas long gone are forgotten (their leases are free already).
            sqlx::query(
                "DELETE FROM replicas WHERE deployment = $1 AND expires_at < now() - make_interval(secs => $2)",
            )
            .bind(&*self.deployment)
            .bind(interval(ttl) * 10.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let live: Vec<String> = sqlx::query_scalar(
                "SELECT incarnation FROM replicas WHERE deployment = $1 AND kind = 'run' AND expires_at > now() \
                 ORDER BY incarnation",
            )
            .bind(&*self.deployment)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            let (mailboxes, owned): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE owner = $2) FROM mailbox_leases WHERE deployment = $1",
            )
            .bind(&*self.deployment)
            .bind(incarnation)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(Heartbeat {
                lapsed: alive != Some(true),
                live,
                mailboxes: mailboxes.max(0) as u64,
                owned: owned.max(0) as u64,
            })
        };
        self.bounded("renewing leases", query).await
    }

    /// The leases this incarnation owns: mailbox and fencing token.
    pub async fn owned_leases(&self, incarnation: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let query = async {
            sqlx::query_as(
                "SELECT mailbox, fence FROM mailbox_leases WHERE deployment = $1 AND owner = $2",
            )
            .bind(&*self.deployment)
            .bind(incarnation)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        };
        self.bounded("reading leases", query).await
    }

    /// Takes up to `limit` free leases (no owner, or an owner whose heartbeat expired), each
    /// with a new fencing token; with `only`, just among those mailboxes. Concurrent callers
    /// never take the same lease (`FOR UPDATE SKIP LOCKED`). Returns what it took.
    pub async fn acquire_leases(
        &self,
        incarnation: &str,
        limit: u64,
        only: Option<&[String]>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let query = async {
            sqlx::query_as(
                "UPDATE mailbox_leases l SET owner = $2, fence = nextval('lease_fence') \
                 FROM (SELECT m.mailbox FROM mailbox_leases m \
                        WHERE m.deployment = $1 AND ($4::text[] IS NULL OR m.mailbox = ANY($4::text[])) \
                          AND (m.owner IS NULL OR NOT EXISTS (SELECT 1 FROM replicas r \
                                WHERE r.deployment = m.deployment AND r.incarnation = m.owner AND r.expires_at > now())) \
                          AND EXISTS (SELECT 1 FROM replicas me WHERE me.deployment = $1 AND me.incarnation = $2 \
                                       AND me.expires_at > now()) \
                        ORDER BY m.mailbox LIMIT $3 FOR UPDATE SKIP LOCKED) f \
                 WHERE l.deployment = $1 AND l.mailbox = f.mailbox \
                 RETURNING l.mailbox, l.fence",
            )
            .bind(&*self.deployment)
            .bind(incarnation)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(only)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        };
        self.bounded("acquiring leases", query).await
    }

    /// Gives up these leases (all of them with `None`), so other replicas may take them.
    pub async fn release_leases(
        &self,
        incarnation: &str,
        mailboxes: Option<&[String]>,
    ) -> Result<u64, StoreError> {
        let query = async {
            sqlx::query(
                "UPDATE mailbox_leases SET owner = NULL WHERE deployment = $1 AND owner = $2 \
                   AND ($3::text[] IS NULL OR mailbox = ANY($3::text[]))",
            )
            .bind(&*self.deployment)
            .bind(incarnation)
            .bind(mailboxes)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(db)
        };
        self.bounded("releasing leases", query).await
    }

    /// Ends this incarnation: its leases are released and its row removed (a clean stop).
    pub async fn retire(&self, incarnation: &str) -> Result<(), StoreError> {
        let query = async {
            let mut tx = self.pool.begin().await.map_err(db)?;
            sqlx::query(
                "UPDATE mailbox_leases SET owner = NULL WHERE deployment = $1 AND owner = $2",
            )
            .bind(&*self.deployment)
            .bind(incarnation)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            sqlx::query("DELETE FROM replicas WHERE deployment = $1 AND incarnation = $2")
                .bind(&*self.deployment)
                .bind(incarnation)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)
        };
        self.bounded("retiring a replica", query).await
    }

    /// Who holds each of these mailboxes now (for `sync-once`'s report and `status`).
    pub async fn lease_owners(&self, mailboxes: &[String]) -> Result<Vec<LeaseOwner>, StoreError> {
        let query = async {
            sqlx::query_as(
                "SELECT l.mailbox, r.replica, r.expires_at FROM mailbox_leases l \
                 LEFT JOIN replicas r ON r.deployment = l.deployment AND r.incarnation = l.owner AND r.expires_at > now() \
                 WHERE l.deployment = $1 AND l.mailbox = ANY($2::text[]) ORDER BY l.mailbox",
            )
            .bind(&*self.deployment)
            .bind(mailboxes)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        };
        self.bounded("reading lease owners", query).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PageChanges;
    use crate::{LinkKind, LinkStamp, PageWrite, RoundStart, TupleSpec, TupleStatus};
    use sqlx::PgPool;

    const TTL: Duration = Duration::from_secs(30);

    #[sqlx::test(migrations = false)]
    async fn no_page_commits_without_the_current_fencing_token(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let start = "2026-01-01T00:00:00Z".parse().unwrap();
        let end = "2026-04-01T00:00:00Z".parse().unwrap();
        let t = store
            .register_tuples(&[TupleSpec {
                key: "t".into(),
                user_id: "u".into(),
                mailbox: "m".into(),
                calendar_id: "default".into(),
                window_start: start,
                window_end: end,
                settings: None,
            }])
            .await
            .unwrap()
            .remove(0);
        let stamp = LinkStamp {
            user_id: "u".into(),
            calendar_id: "default".into(),
            window_start: start,
            window_end: end,
        };
        let changes = PageChanges::default();
        let write = |version: i64, fence: Option<i64>| PageWrite {
            tuple_id: t.id,
            expected_version: version,
            round_start: Some(RoundStart::Delta),
            changes: &changes,
            link: "https://graph.example/delta?$deltatoken=x",
            link_kind: LinkKind::Delta,
            stamp: &stamp,
            fence,
        };
        // A takes the lease and commits with its token.
        let hb = store
            .heartbeat("a#1", "a", ReplicaKind::Run, TTL)
            .await
            .unwrap();
        assert_eq!((hb.live.len(), hb.mailboxes, hb.owned), (1, 1, 0));
        let a = store.acquire_leases("a#1", 10, None).await.unwrap();
        assert_eq!(a.len(), 1);
        let fa = a[0].1;
        let v = store.apply_page(&write(0, Some(fa))).await.unwrap().version;
        // B cannot take a lease whose holder is alive.
        store
            .heartbeat("b#1", "b", ReplicaKind::Run, TTL)
            .await
            .unwrap();
        assert!(
            store
                .acquire_leases("b#1", 10, None)
                .await
                .unwrap()
                .is_empty()
        );
        // A's heartbeat lapses (paused); B takes over with a newer token.
        sqlx::query("UPDATE replicas SET expires_at = now() - interval '1 second' WHERE incarnation = 'a#1'")
            .execute(&pool)
            .await
            .unwrap();
        let b = store.acquire_leases("b#1", 10, None).await.unwrap();
        assert_eq!(b.len(), 1);
        let fb = b[0].1;
        assert!(fb > fa, "tokens only grow");
        // A resumes: even renewed, its old token commits nothing, records nothing, forgets
        // nothing. The version it read is current, so only the fence refuses it.
        let hb = store
            .heartbeat("a#1", "a", ReplicaKind::Run, TTL)
            .await
            .unwrap();
        assert!(hb.lapsed);
        assert_eq!(hb.owned, 0);
        let refused = store.apply_page(&write(v, Some(fa))).await.unwrap_err();
        assert!(matches!(refused, StoreError::Fenced { .. }), "{refused:?}");
        store
            .record_failure(t.id, TupleStatus::Failed, "X", "stale", Some(fa))
            .await
            .unwrap();
        assert!(store.forget_link(t.id, v, Some(fa)).await.is_err());
        let now = store.load(t.id).await.unwrap();
        assert_eq!((now.link_version, now.state), (v, TupleStatus::Ok));
        // B's token commits; a stale version with the right token is a plain conflict.
        let v2 = store.apply_page(&write(v, Some(fb))).await.unwrap().version;
        assert_eq!(v2, v + 1);
        let conflict = store.apply_page(&write(v, Some(fb))).await.unwrap_err();
        assert!(
            matches!(conflict, StoreError::Conflict { .. }),
            "{conflict:?}"
        );
        // B stops cleanly: the lease is free at once.
        store.retire("b#1").await.unwrap();
        assert_eq!(
            store.acquire_leases("a#1", 10, None).await.unwrap().len(),
            1
        );
        let owners = store.lease_owners(&["m".into()]).await.unwrap();
        assert_eq!(owners[0].replica.as_deref(), Some("a"));
    }

    #[sqlx::test(migrations = false)]
    async fn deployments_keep_their_own_tuples(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let spec = |key: &str| TupleSpec {
            key: key.into(),
            user_id: "u".into(),
            mailbox: "u".into(),
            calendar_id: "default".into(),
            window_start: "2026-01-01T00:00:00Z".parse().unwrap(),
            window_end: "2026-04-01T00:00:00Z".parse().unwrap(),
            settings: None,
        };
        let a = store.clone().for_deployment("a");
        let b = store.clone().for_deployment("b");
        a.register_tuples(&[spec("x"), spec("y")]).await.unwrap();
        b.register_tuples(&[spec("x")]).await.unwrap();
        // a's reconcile drops y, and purges only its own.
        a.register_tuples(&[spec("x")]).await.unwrap();
        assert_eq!(a.purge_untracked().await.unwrap().0, 1);
        b.add_tuples(&[spec("z")]).await.unwrap();
        let rows: Vec<(String, String, bool)> =
            sqlx::query_as("SELECT deployment, tuple_key, tracked FROM sync_tuples ORDER BY 1, 2")
                .fetch_all(&pool)
                .await
                .unwrap();
        let want = [("a", "x", true), ("b", "x", true), ("b", "z", true)];
        assert_eq!(rows.len(), want.len());
        for (r, w) in rows.iter().zip(want) {
            assert_eq!((r.0.as_str(), r.1.as_str(), r.2), w);
        }
        assert_eq!(a.status().await.unwrap().len(), 1);
        assert_eq!(b.status().await.unwrap().len(), 2);
    }
}
