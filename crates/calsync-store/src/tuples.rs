//! The tuple registry: which (user, calendar, window) tuples are tracked, their saved link and
//! their sync state.

use crate::Store;
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;

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
    /// Makes the stored tuples match the config: inserts new ones, updates identity fields,
    /// and marks tuples no longer configured as untracked (their rows are kept).
    pub async fn register_tuples(
        &self,
        specs: &[TupleSpec],
    ) -> Result<Vec<TupleState>, StoreError> {
        let ids = self.register(specs, true).await?;
        self.states_of(ids).await
    }

    /// Records these tuples (new ones added, changed ones updated) and leaves every other tuple
    /// as it is: what a one-off command (`sync-once`) does, which must never untrack the
    /// daemon's calendars.
    pub async fn add_tuples(&self, specs: &[TupleSpec]) -> Result<Vec<TupleState>, StoreError> {
        let ids = self.register(specs, false).await?;
        self.states_of(ids).await
    }

    /// [`Store::register_tuples`], answering only each tuple's id by its key: what a start
    /// needs, without reading back 100,000 rows and their links.
    pub async fn register_tuple_ids(
        &self,
        specs: &[TupleSpec],
    ) -> Result<HashMap<String, i64>, StoreError> {
        self.register(specs, true).await
    }

    /// [`Store::add_tuples`], answering only each tuple's id by its key.
    pub async fn add_tuple_ids(
        &self,
        specs: &[TupleSpec],
    ) -> Result<HashMap<String, i64>, StoreError> {
        self.register(specs, false).await
    }

    async fn states_of(&self, ids: HashMap<String, i64>) -> Result<Vec<TupleState>, StoreError> {
        let ids: Vec<i64> = ids.into_values().collect();
        sqlx::query_as(&format!(
            "SELECT {TUPLE_COLUMNS} FROM sync_tuples WHERE id = ANY($1::bigint[]) ORDER BY id"
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// Registration carries every calendar in a few statements, each under the server's
    /// `statement_timeout`: the whole is allowed four store deadlines before it is abandoned
    /// (issue 23: it had no deadline, so a dead connection hung a reload for good).
    async fn register(
        &self,
        specs: &[TupleSpec],
        untrack_others: bool,
    ) -> Result<HashMap<String, i64>, StoreError> {
        crate::within(
            self.deadline.saturating_mul(4),
            "registering calendars",
            self.register_now(specs, untrack_others),
        )
        .await
    }

    async fn register_now(
        &self,
        specs: &[TupleSpec],
        untrack_others: bool,
    ) -> Result<HashMap<String, i64>, StoreError> {
        // A connection of its own, closed afterwards: the statements below carry every
        // calendar (megabytes at 100,000), and a pooled connection would keep buffers of that
        // size for the life of the process.
        let mut conn = self.pool.acquire().await.map_err(db)?;
        conn.close_on_drop();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db)?;
        // What is stored already: a restart with 100,000 unchanged calendars writes nothing.
        type Stored = (
            String,
            String,
            String,
            String,
            DateTime<Utc>,
            DateTime<Utc>,
            bool,
            i64,
        );
        let stored: Vec<Stored> = sqlx::query_as(
            "SELECT tuple_key, user_id, mailbox, calendar_id, window_start, window_end, tracked, id \
             FROM sync_tuples WHERE deployment = $1",
        )
        .bind(&*self.deployment)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let stored: HashMap<&str, &Stored> = stored.iter().map(|r| (r.0.as_str(), r)).collect();
        let changed: Vec<&TupleSpec> = specs
            .iter()
            .filter(|s| {
                stored.get(s.key.as_str()).is_none_or(|r| {
                    (&r.1, &r.2, &r.3, r.4, r.5, r.6)
                        != (
                            &s.user_id,
                            &s.mailbox,
                            &s.calendar_id,
                            s.window_start,
                            s.window_end,
                            true,
                        )
                })
            })
            .collect();
        let keys: Vec<&str> = changed.iter().map(|s| s.key.as_str()).collect();
        let users: Vec<&str> = changed.iter().map(|s| s.user_id.as_str()).collect();
        let mailboxes: Vec<&str> = changed.iter().map(|s| s.mailbox.as_str()).collect();
        let cals: Vec<&str> = changed.iter().map(|s| s.calendar_id.as_str()).collect();
        let starts: Vec<DateTime<Utc>> = changed.iter().map(|s| s.window_start).collect();
        let ends: Vec<DateTime<Utc>> = changed.iter().map(|s| s.window_end).collect();
        let mut ids: HashMap<String, i64> = HashMap::with_capacity(specs.len());
        if !changed.is_empty() {
            // A changed user, calendar or window bumps link_version: a round of the old
            // identity still in flight (a reload's old task, another process) can then commit
            // nothing.
            let written: Vec<(String, i64)> = sqlx::query_as(
                "INSERT INTO sync_tuples (deployment, tuple_key, user_id, mailbox, calendar_id, window_start, window_end, tracked) \
                 SELECT $1, k, u, m, c, s, e, true FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[]) AS t(k, u, m, c, s, e) \
                 ON CONFLICT (deployment, tuple_key) DO UPDATE SET user_id = EXCLUDED.user_id, mailbox = EXCLUDED.mailbox, \
                   calendar_id = EXCLUDED.calendar_id, window_start = EXCLUDED.window_start, window_end = EXCLUDED.window_end, \
                   tracked = true, updated_at = now(), \
                   link_version = sync_tuples.link_version + CASE WHEN \
                     (sync_tuples.user_id, sync_tuples.calendar_id, sync_tuples.window_start, sync_tuples.window_end) \
                     IS DISTINCT FROM (EXCLUDED.user_id, EXCLUDED.calendar_id, EXCLUDED.window_start, EXCLUDED.window_end) \
                     THEN 1 ELSE 0 END \
                 RETURNING tuple_key, id",
            )
            .bind(&*self.deployment)
            .bind(&keys)
            .bind(&users)
            .bind(&mailboxes)
            .bind(&cals)
            .bind(&starts)
            .bind(&ends)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            ids.extend(written);
            // A tuple that now names another mailbox or calendar: its rows are of the old
            // one. They go now, with the served window, so the view never shows one
            // calendar's events under another's name until (or, if the new one fails,
            // instead of) the new calendar's first round (issue 23, point 6).
            let moved: Vec<&str> = changed
                .iter()
                .filter(|s| {
                    stored
                        .get(s.key.as_str())
                        .is_some_and(|r| (&r.1, &r.3) != (&s.user_id, &s.calendar_id))
                })
                .map(|s| s.key.as_str())
                .collect();
            if !moved.is_empty() {
                for sql in [
                    "DELETE FROM events WHERE tuple_id IN \
                       (SELECT id FROM sync_tuples WHERE deployment = $1 AND tuple_key = ANY($2::text[]))",
                    "DELETE FROM series WHERE tuple_id IN \
                       (SELECT id FROM sync_tuples WHERE deployment = $1 AND tuple_key = ANY($2::text[]))",
                    "UPDATE sync_tuples SET served_start = NULL, served_end = NULL \
                     WHERE deployment = $1 AND tuple_key = ANY($2::text[])",
                ] {
                    sqlx::query(sql)
                        .bind(&*self.deployment)
                        .bind(&moved)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
            }
        }
        let mut untracked = 0;
        if untrack_others {
            let wanted: std::collections::HashSet<&str> =
                specs.iter().map(|s| s.key.as_str()).collect();
            let gone: Vec<&str> = stored
                .values()
                .filter(|r| r.6 && !wanted.contains(r.0.as_str()))
                .map(|r| r.0.as_str())
                .collect();
            if !gone.is_empty() {
                untracked = sqlx::query(
                    "UPDATE sync_tuples SET tracked = false, updated_at = now() \
                     WHERE deployment = $1 AND tuple_key = ANY($2::text[])",
                )
                .bind(&*self.deployment)
                .bind(&gone)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
            }
            if untracked > 0 || !changed.is_empty() {
                // Leases of mailboxes no tracked tuple names any more go (an owner finds its
                // lease gone at its next renewal and stops).
                sqlx::query(
                    "DELETE FROM mailbox_leases l WHERE l.deployment = $1 AND NOT EXISTS \
                       (SELECT 1 FROM sync_tuples t WHERE t.deployment = l.deployment AND t.mailbox = l.mailbox AND t.tracked)",
                )
                .bind(&*self.deployment)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            }
        }
        // Every mailbox named here has a lease row (free until a replica takes it).
        let leased: Vec<String> =
            sqlx::query_scalar("SELECT mailbox FROM mailbox_leases WHERE deployment = $1")
                .bind(&*self.deployment)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
        let leased: std::collections::HashSet<&str> = leased.iter().map(String::as_str).collect();
        let mut unleased: Vec<&str> = specs
            .iter()
            .map(|s| s.mailbox.as_str())
            .filter(|m| !leased.contains(m))
            .collect();
        unleased.sort_unstable();
        unleased.dedup();
        if !unleased.is_empty() {
            sqlx::query(
                "INSERT INTO mailbox_leases (deployment, mailbox) SELECT $1, m FROM UNNEST($2::text[]) AS t(m) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&*self.deployment)
            .bind(&unleased)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        // Unchanged tuples keep the ids read at the start; written ones got theirs back.
        for s in specs {
            if !ids.contains_key(&s.key) {
                if let Some(r) = stored.get(s.key.as_str()) {
                    ids.insert(s.key.clone(), r.7);
                }
            }
        }
        Ok(ids)
    }

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
        let now = store.load(t.id).await.unwrap();
        store
            .forget_link(t.id, now.link_version, None)
            .await
            .unwrap();
        store.register_tuples(&[moved]).await.unwrap();
    }

    /// A tuple whose calendar changed (a config edit keeping its name) drops the old
    /// calendar's rows at once: before, the view showed them labelled with the new calendar
    /// until its first round ended, and for good if that round failed (issue 23, point 6).
    #[sqlx::test(migrations = false)]
    async fn a_tuple_moved_to_another_calendar_shows_none_of_the_old_ones_rows(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let t = store.register_tuples(&[spec("t")]).await.unwrap().remove(0);
        let other = store
            .register_tuples(&[spec("t"), spec("u")])
            .await
            .unwrap();
        let u = other.iter().find(|s| s.tuple_key == "u").unwrap().id;
        for id in [t.id, u] {
            sqlx::query(
                "INSERT INTO events (tuple_id, event_id, payload, seen_round) VALUES ($1, 'e', '{}', 1)",
            )
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "UPDATE sync_tuples SET served_start = window_start, served_end = window_end WHERE id = $1",
        )
        .bind(t.id)
        .execute(&pool)
        .await
        .unwrap();
        let shown = |pool: PgPool, key: &'static str| async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM calendar_events WHERE tuple_key = $1",
            )
            .bind(key)
            .fetch_one(&pool)
            .await
            .unwrap()
        };
        assert_eq!(shown(pool.clone(), "t").await, 1);

        // Only the window moves: the rows stay (the served-window switch handles it).
        let mut wider = spec("t");
        wider.window_end += chrono::Duration::days(1);
        store
            .register_tuples(&[wider.clone(), spec("u")])
            .await
            .unwrap();
        assert_eq!(shown(pool.clone(), "t").await, 1);

        // The calendar changes: the old calendar's row is gone from the view and the table.
        let mut moved = wider;
        moved.calendar_id = "AAMkAGI2TAAA=".into();
        store.register_tuples(&[moved, spec("u")]).await.unwrap();
        assert_eq!(shown(pool.clone(), "t").await, 0);
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tuple_id = $1")
            .bind(t.id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
        assert_eq!(
            shown(pool.clone(), "u").await,
            1,
            "other tuples keep theirs"
        );
    }
}
