//! The tuple registry: which (user, calendar, window) tuples are tracked, their saved link and
//! their sync state.

use crate::Store;
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// What identifies a tracked tuple, as the config says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleSpec {
    /// The tuple's stable name (`sync_tuples.tuple_key`).
    pub key: String,
    /// The mailbox: a user id or userPrincipalName.
    pub user_id: String,
    /// The mailbox's lease key: its directory object id when resolved, else `user_id`.
    pub mailbox: String,
    /// `default` or a calendar id.
    pub calendar_id: String,
    /// The calendarView window's start.
    pub window_start: DateTime<Utc>,
    /// The calendarView window's end.
    pub window_end: DateTime<Utc>,
    /// What a replica needs to schedule it beside its identity (interval, cron schedule,
    /// rolling window), as the engine writes it (JSON); `None`: the engine's defaults.
    pub settings: Option<String>,
}

/// What a saved link was made for. A link is only replayed for the same stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStamp {
    /// The mailbox the link was made for.
    pub user_id: String,
    /// The calendar the link was made for.
    pub calendar_id: String,
    /// The window start the link was made for.
    pub window_start: DateTime<Utc>,
    /// The window end the link was made for.
    pub window_end: DateTime<Utc>,
}

/// What a saved link continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// An `@odata.nextLink`: the round in progress resumes there.
    Next,
    /// An `@odata.deltaLink`: the next incremental round starts there.
    Delta,
}

impl LinkKind {
    /// The spelling in `sync_tuples.link_kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Next => "next",
            LinkKind::Delta => "delta",
        }
    }
}

/// A tuple's sync state: one spelling for the SQL `CHECK`, the engine, `status` and
/// `/metrics` (a test checks the constraint lists exactly [`TupleStatus::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TupleStatus {
    /// Registered, no round has completed yet.
    Pending,
    /// The last round reached its deltaLink.
    Ok,
    /// A retryable problem outlasted a round's attempts; tried again soon.
    Retrying,
    /// A guard abandoned the round (page loop, oversized page, foreign link).
    Degraded,
    /// Graph says this tuple cannot sync; tried again at the slow cadence.
    Failed,
}

impl TupleStatus {
    /// Every state, in the order `status` and `/metrics` list them.
    pub const ALL: [TupleStatus; 5] = [
        TupleStatus::Pending,
        TupleStatus::Ok,
        TupleStatus::Retrying,
        TupleStatus::Degraded,
        TupleStatus::Failed,
    ];

    /// The spelling in `sync_tuples.state`, `status` and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TupleStatus::Pending => "pending",
            TupleStatus::Ok => "ok",
            TupleStatus::Retrying => "retrying",
            TupleStatus::Degraded => "degraded",
            TupleStatus::Failed => "failed",
        }
    }

    /// The state spelled `s`, if it is one.
    pub fn parse(s: &str) -> Option<TupleStatus> {
        TupleStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for TupleStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl sqlx::Type<sqlx::Postgres> for TupleStatus {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for TupleStatus {
    fn decode(v: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(v)?;
        TupleStatus::parse(s).ok_or_else(|| format!("unknown tuple state '{s}'").into())
    }
}

/// A tuple's identity and sync state as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TupleState {
    /// The store's id of the tuple.
    pub id: i64,
    /// The tuple's name.
    pub tuple_key: String,
    /// The mailbox as configured.
    pub user_id: String,
    /// The calendar as configured.
    pub calendar_id: String,
    /// The window's start as configured.
    pub window_start: DateTime<Utc>,
    /// The window's end as configured.
    pub window_end: DateTime<Utc>,
    /// The saved nextLink or deltaLink, if any.
    pub link: Option<String>,
    /// `next` or `delta`.
    pub link_kind: Option<String>,
    /// The mailbox the saved link was made for.
    pub link_user_id: Option<String>,
    /// The calendar the saved link was made for.
    pub link_calendar_id: Option<String>,
    /// The window start the saved link was made for.
    pub link_window_start: Option<DateTime<Utc>>,
    /// The window end the saved link was made for.
    pub link_window_end: Option<DateTime<Utc>>,
    /// Bumped on every commit; a writer that read an older one gets `Conflict`.
    pub link_version: i64,
    /// Number of the current (or last) full round; rows not seen in it are swept at its end.
    pub full_round: i64,
    /// Whether the round in progress is a full one.
    pub round_is_full: bool,
    /// When a round last reached its deltaLink.
    pub last_success_at: Option<DateTime<Utc>>,
    /// When a full round last reached its deltaLink.
    pub last_full_sync_at: Option<DateTime<Utc>>,
    /// The sync state.
    pub state: TupleStatus,
    /// Failed attempts since the last success.
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
        let kind = [LinkKind::Next, LinkKind::Delta]
            .into_iter()
            .find(|k| Some(k.as_str()) == self.link_kind.as_deref())?;
        Some((kind, self.link.as_deref()?))
    }
}

/// One tracked tuple's state, for metrics.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TupleHealth {
    /// The tuple's name.
    pub tuple_key: String,
    /// Its mailbox.
    pub user_id: String,
    /// Its calendar.
    pub calendar_id: String,
    /// Its sync state.
    pub state: TupleStatus,
    /// When a round last reached its deltaLink.
    pub last_success_at: Option<DateTime<Utc>>,
}

/// The condition that the lease named by bind parameter `$3` (a fencing token, or NULL for a
/// writer outside leases) is current for the row's mailbox.
const LEASE_CURRENT: &str = "($3::bigint IS NULL OR EXISTS (SELECT 1 FROM mailbox_leases l JOIN replicas r ON r.deployment = l.deployment AND r.incarnation = l.owner \
     WHERE l.deployment = sync_tuples.deployment AND l.mailbox = sync_tuples.mailbox \
       AND l.fence = $3 AND r.expires_at > now()))";

pub(crate) const TUPLE_COLUMNS: &str = "id, tuple_key, user_id, calendar_id, window_start, window_end, link, link_kind, \
    link_user_id, link_calendar_id, link_window_start, link_window_end, link_version, full_round, \
    round_is_full, last_success_at, last_full_sync_at, state, consecutive_failures";

impl Store {
    /// The stored state of one tuple.
    pub async fn load(&self, tuple_id: i64) -> Result<TupleState, StoreError> {
        let sql = format!("SELECT {TUPLE_COLUMNS} FROM sync_tuples WHERE id = $1");
        let query = async {
            sqlx::query_as(&sql)
                .bind(tuple_id)
                .fetch_one(&self.pool)
                .await
                .map_err(db)
        };
        self.bounded("loading a tuple", query).await
    }

    /// Makes the tuple's next round a full one (initial sync + sweep), whatever link it holds:
    /// `calsync resync`. Bumps `link_version`, so a running daemon's cached position is
    /// refused and re-read. `false` if no tuple has that key.
    pub async fn request_resync(&self, tuple_key: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE sync_tuples SET link = NULL, link_kind = NULL, link_version = link_version + 1, \
             round_is_full = true, last_full_sync_at = NULL, updated_at = now() WHERE deployment = $1 AND tuple_key = $2",
        )
        .bind(&*self.deployment)
        .bind(tuple_key)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(n > 0)
    }

    /// Deletes this deployment's untracked tuples (removed from its config) and their rows.
    /// Returns (tuples, events) deleted.
    pub async fn purge_untracked(&self) -> Result<(u64, u64), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let events = sqlx::query(
            "DELETE FROM events WHERE tuple_id IN (SELECT id FROM sync_tuples WHERE deployment = $1 AND NOT tracked)",
        )
        .bind(&*self.deployment)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        let tuples = sqlx::query("DELETE FROM sync_tuples WHERE deployment = $1 AND NOT tracked")
            .bind(&*self.deployment)
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
            "SELECT tuple_key, user_id, calendar_id, state, last_success_at FROM sync_tuples \
             WHERE deployment = $1 AND tracked ORDER BY tuple_key",
        )
        .bind(&*self.deployment)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// Forgets the saved link (the delta state is gone); rows stay until the next full round
    /// sweeps them. Returns the new `link_version`. With a `fence`, only while that mailbox
    /// lease is current (else `Conflict`: nothing changes).
    pub async fn forget_link(
        &self,
        tuple_id: i64,
        expected_version: i64,
        fence: Option<i64>,
    ) -> Result<i64, StoreError> {
        let sql = format!(
            "UPDATE sync_tuples SET link = NULL, link_kind = NULL, link_version = link_version + 1, \
             round_is_full = true, updated_at = now() WHERE id = $1 AND link_version = $2 AND {LEASE_CURRENT} \
             RETURNING link_version"
        );
        let query = sqlx::query_scalar(&sql)
            .bind(tuple_id)
            .bind(expected_version)
            .bind(fence)
            .fetch_optional(&self.pool);
        // Under the deadline like every call a round makes (issue 23: this one had none).
        let v: Option<i64> = self
            .bounded("forgetting a link", async { query.await.map_err(db) })
            .await?;
        v.ok_or(StoreError::Conflict { tuple_id })
    }

    /// Records a failed attempt with Graph's error code and message. With a `fence`, only
    /// while that mailbox lease is current: a process that lost it records nothing over the
    /// new owner's status.
    pub async fn record_failure(
        &self,
        tuple_id: i64,
        state: TupleStatus,
        code: &str,
        message: &str,
        fence: Option<i64>,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE sync_tuples SET state = $2, last_error_code = $3, last_error = $4, \
             consecutive_failures = consecutive_failures + 1, last_attempt_at = now(), updated_at = now() \
             WHERE id = $1 AND {}",
            LEASE_CURRENT.replace("$3", "$5")
        );
        let query = async {
            sqlx::query(&sql)
                .bind(tuple_id)
                .bind(state.as_str())
                .bind(code)
                .bind(message)
                .bind(fence)
                .execute(&self.pool)
                .await
                .map_err(db)
        };
        self.bounded("recording a failure", query).await?;
        Ok(())
    }

    /// The object ids already resolved for these configured mailbox names.
    pub async fn mailbox_ids(
        &self,
        user_keys: &[String],
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let query = async {
            sqlx::query_as::<_, (String, String)>(
                "SELECT user_key, object_id FROM mailboxes WHERE user_key = ANY($1::text[])",
            )
            .bind(user_keys)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        };
        Ok(self
            .bounded("reading mailbox ids", query)
            .await?
            .into_iter()
            .collect())
    }

    /// Remembers that the mailbox configured as `user_key` is `object_id`.
    pub async fn save_mailbox_id(&self, user_key: &str, object_id: &str) -> Result<(), StoreError> {
        let query = async {
            sqlx::query(
                "INSERT INTO mailboxes (user_key, object_id) VALUES ($1, $2) \
                 ON CONFLICT (user_key) DO UPDATE SET object_id = EXCLUDED.object_id, resolved_at = now()",
            )
            .bind(user_key)
            .bind(object_id)
            .execute(&self.pool)
            .await
            .map_err(db)
        };
        self.bounded("saving a mailbox id", query).await?;
        Ok(())
    }
}

/// Tests: a tuple `key` whose mailbox is its own (`{key}@x`), a 30-day window from 2026.
#[cfg(test)]
pub(crate) fn test_spec(key: &str, settings: &str) -> TupleSpec {
    let start = "2026-01-01T00:00:00Z".parse().unwrap();
    TupleSpec {
        key: key.into(),
        user_id: format!("{key}@x"),
        mailbox: format!("{key}@x"),
        calendar_id: "default".into(),
        window_start: start,
        window_end: start + chrono::Duration::days(30),
        settings: Some(settings.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::PgPool;
    use std::time::{Duration, Instant};

    fn spec(key: &str) -> TupleSpec {
        let start = "2026-01-01T00:00:00Z".parse().unwrap();
        TupleSpec {
            key: key.into(),
            user_id: "u".into(),
            mailbox: "u".into(),
            calendar_id: "default".into(),
            window_start: start,
            window_end: start + chrono::Duration::days(30),
            settings: None,
        }
    }

    /// A database that stops answering (here: a row locked by another session, on a pool
    /// without `statement_timeout`) makes `forget_link` and registration give up at their
    /// deadline instead of hanging the round or the reload (issue 23, point 6).
    #[sqlx::test(migrations = false)]
    async fn forget_link_and_registration_give_up_at_their_deadline(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let t = store.register_tuples(&[spec("t")]).await.unwrap().remove(0);
        let store = store.with_deadline(Duration::from_millis(300));
        let mut blocker = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM sync_tuples WHERE id = $1 FOR UPDATE")
            .bind(t.id)
            .execute(&mut *blocker)
            .await
            .unwrap();

        let began = Instant::now();
        let e = store
            .forget_link(t.id, t.link_version, None)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );

        let mut moved = spec("t");
        moved.window_end += chrono::Duration::days(1);
        let began = Instant::now();
        let e = store.register_tuples(&[moved.clone()]).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );

        // Once the lock is gone both go through. (The abandoned UPDATE was already with the
        // server and may have run once the lock went: its version check makes that harmless,
        // so the second call reads the version first.)
        blocker.rollback().await.unwrap();
        // The abandoned UPDATE may land after the version is read (under load it did): read
        // again and retry until the version read is the current one.
        let mut forgot = false;
        for _ in 0..20 {
            let now = store.load(t.id).await.unwrap();
            match store.forget_link(t.id, now.link_version, None).await {
                Ok(_) => {
                    forgot = true;
                    break;
                }
                Err(StoreError::Conflict { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(forgot, "forget_link went through once the lock was gone");
        store.register_tuples(&[moved]).await.unwrap();
    }
}
