//! Registration: making the stored tuples match a config (start, reload, discovery pass,
//! re-base, `sync-once`), in one transaction that writes only what changed.

use crate::Store;
use crate::changes;
use crate::error::{StoreError, db};
use crate::generation::{Registered, SetWrite};
use crate::tuples::{TUPLE_COLUMNS, TupleSpec, TupleState};
use chrono::{DateTime, Utc};
use std::collections::HashMap;

impl Store {
    /// Makes the stored tuples match the config: inserts new ones, updates identity fields,
    /// and marks tuples no longer configured as untracked (their rows are kept).
    pub async fn register_tuples(
        &self,
        specs: &[TupleSpec],
    ) -> Result<Vec<TupleState>, StoreError> {
        let ids = self.register(specs, true, &SetWrite::default()).await?.ids;
        self.states_of(ids).await
    }

    /// Records these tuples (new ones added, changed ones updated) and leaves every other tuple
    /// as it is: what a one-off command (`sync-once`) does, which must never untrack the
    /// daemon's calendars.
    pub async fn add_tuples(&self, specs: &[TupleSpec]) -> Result<Vec<TupleState>, StoreError> {
        let ids = self.register(specs, false, &SetWrite::default()).await?.ids;
        self.states_of(ids).await
    }

    /// [`Store::register_tuples`], answering only each tuple's id by its key: what a start
    /// needs, without reading back 100,000 rows and their links.
    pub async fn register_tuple_ids(
        &self,
        specs: &[TupleSpec],
    ) -> Result<HashMap<String, i64>, StoreError> {
        Ok(self.register(specs, true, &SetWrite::default()).await?.ids)
    }

    /// [`Store::add_tuples`], answering only each tuple's id by its key.
    pub async fn add_tuple_ids(
        &self,
        specs: &[TupleSpec],
    ) -> Result<HashMap<String, i64>, StoreError> {
        Ok(self.register(specs, false, &SetWrite::default()).await?.ids)
    }

    /// Registers `specs` as a new generation of the deployment's tracked set (see
    /// [`SetWrite`]): the whole set (`untrack_others`, other tuples untracked) or these tuples
    /// beside the rest. The generation moves only if a tuple or the digest changed.
    pub async fn register_set(
        &self,
        specs: &[TupleSpec],
        untrack_others: bool,
        write: &SetWrite,
    ) -> Result<Registered, StoreError> {
        self.register(specs, untrack_others, write).await
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
        write: &SetWrite,
    ) -> Result<Registered, StoreError> {
        crate::within(
            self.deadline.saturating_mul(4),
            "registering calendars",
            async {
                // A registration that hides or shows rows writes the change feed, and must
                // hold the feed's lock from its start (before its transaction has an id): the
                // first attempt finds out whether it does without holding it, so the common
                // registration (nothing untracked, re-pointed or tracked again) never stops
                // the deployment's page commits.
                match self
                    .register_now(specs, untrack_others, write, false)
                    .await?
                {
                    Some(done) => Ok(done),
                    None => self
                        .register_now(specs, untrack_others, write, true)
                        .await?
                        .ok_or_else(|| {
                            StoreError::Query("registration asked for the feed's lock twice".into())
                        }),
                }
            },
        )
        .await
    }

    /// One attempt at a registration; `None` if it would change which rows the view shows and
    /// so must be made again holding the change feed's lock (`feed_locked`).
    async fn register_now(
        &self,
        specs: &[TupleSpec],
        untrack_others: bool,
        write: &SetWrite,
        feed_locked: bool,
    ) -> Result<Option<Registered>, StoreError> {
        // A connection of its own, closed afterwards: the statements below carry every
        // calendar (megabytes at 100,000), and a pooled connection would keep buffers of that
        // size for the life of the process.
        let mut conn = self.pool.acquire().await.map_err(db)?;
        conn.close_on_drop();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db)?;
        if feed_locked {
            sqlx::query("SELECT calsync_feed_lock($1, true)")
                .bind(&*self.deployment)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        // The deployment's generation, locked: registrations of one deployment (replicas
        // reloading at once, a discovery pass beside a re-base) take turns, and one computed
        // from an older generation is refused whole.
        let (current, current_digest) =
            crate::generation::lock_set(&mut tx, &self.deployment).await?;
        if let Some(based_on) = write.based_on {
            if based_on != current {
                return Err(StoreError::Superseded { based_on, current });
            }
        }
        let next = current + 1;
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
            Option<String>,
        );
        let stored: Vec<Stored> = sqlx::query_as(
            "SELECT tuple_key, user_id, mailbox, calendar_id, window_start, window_end, tracked, id, settings \
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
                        // A tuple stored without settings (by an older release, or a caller
                        // that has none) is not rewritten by one that has none either.
                        || (s.settings.is_some() && r.8 != s.settings)
                })
            })
            .collect();
        // Which tuples' rows leave the view (re-pointed at another mailbox or calendar: their
        // rows go; no longer configured: untracked) or come back (tracked again).
        let moved: Vec<&str> = changed
            .iter()
            .filter(|s| {
                stored
                    .get(s.key.as_str())
                    .is_some_and(|r| (&r.1, &r.3) != (&s.user_id, &s.calendar_id))
            })
            .map(|s| s.key.as_str())
            .collect();
        let moved_set: std::collections::HashSet<&str> = moved.iter().copied().collect();
        let retracked: Vec<&str> = changed
            .iter()
            .filter(|s| stored.get(s.key.as_str()).is_some_and(|r| !r.6))
            .map(|s| s.key.as_str())
            .filter(|k| !moved_set.contains(k))
            .collect();
        let gone: Vec<&str> = if untrack_others {
            let wanted: std::collections::HashSet<&str> =
                specs.iter().map(|s| s.key.as_str()).collect();
            stored
                .values()
                .filter(|r| r.6 && !wanted.contains(r.0.as_str()))
                .map(|r| r.0.as_str())
                .collect()
        } else {
            Vec::new()
        };
        let feed = self.feed.on;
        if feed && !feed_locked && !(moved.is_empty() && retracked.is_empty() && gone.is_empty()) {
            return Ok(None);
        }
        let mut feed_rows = 0;
        if feed {
            // Still shown: each leaves the view, under the calendar it was.
            feed_rows += changes::write_tracking(
                &mut tx,
                &self.feed,
                &self.deployment,
                &moved,
                "delete",
                "moved",
            )
            .await?;
            feed_rows += changes::write_tracking(
                &mut tx,
                &self.feed,
                &self.deployment,
                &gone,
                "delete",
                "untrack",
            )
            .await?;
        }
        let keys: Vec<&str> = changed.iter().map(|s| s.key.as_str()).collect();
        let users: Vec<&str> = changed.iter().map(|s| s.user_id.as_str()).collect();
        let mailboxes: Vec<&str> = changed.iter().map(|s| s.mailbox.as_str()).collect();
        let cals: Vec<&str> = changed.iter().map(|s| s.calendar_id.as_str()).collect();
        let starts: Vec<DateTime<Utc>> = changed.iter().map(|s| s.window_start).collect();
        let ends: Vec<DateTime<Utc>> = changed.iter().map(|s| s.window_end).collect();
        let settings: Vec<Option<&str>> = changed.iter().map(|s| s.settings.as_deref()).collect();
        let mut ids: HashMap<String, i64> = HashMap::with_capacity(specs.len());
        if !changed.is_empty() {
            // A changed user, calendar or window bumps link_version: a round of the old
            // identity still in flight (a reload's old task, another process) can then commit
            // nothing.
            let written: Vec<(String, i64)> = sqlx::query_as(
                "INSERT INTO sync_tuples (deployment, tuple_key, user_id, mailbox, calendar_id, window_start, window_end, tracked, settings, generation) \
                 SELECT $1, k, u, m, c, s, e, true, x, $9 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::text[]) AS t(k, u, m, c, s, e, x) \
                 ON CONFLICT (deployment, tuple_key) DO UPDATE SET user_id = EXCLUDED.user_id, mailbox = EXCLUDED.mailbox, \
                   calendar_id = EXCLUDED.calendar_id, window_start = EXCLUDED.window_start, window_end = EXCLUDED.window_end, \
                   tracked = true, updated_at = now(), generation = EXCLUDED.generation, \
                   settings = COALESCE(EXCLUDED.settings, sync_tuples.settings), \
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
            .bind(&settings)
            .bind(next)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            ids.extend(written);
            // A tuple that now names another mailbox or calendar: its rows are of the old
            // one. They go now, with the served window, so the view never shows one
            // calendar's events under another's name until (or, if the new one fails,
            // instead of) the new calendar's first round (issue 23, point 6).
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
        if feed {
            // Shown again, as they are stored.
            feed_rows += changes::write_tracking(
                &mut tx,
                &self.feed,
                &self.deployment,
                &retracked,
                "upsert",
                "track",
            )
            .await?;
        }
        let mut untracked = 0;
        if untrack_others {
            if !gone.is_empty() {
                untracked = sqlx::query(
                    "UPDATE sync_tuples SET tracked = false, updated_at = now(), generation = $3 \
                     WHERE deployment = $1 AND tuple_key = ANY($2::text[])",
                )
                .bind(&*self.deployment)
                .bind(&gone)
                .bind(next)
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
        let moved_on = !changed.is_empty()
            || untracked > 0
            || write.digest.as_deref().is_some_and(|d| d != current_digest);
        let generation = if moved_on {
            crate::generation::write_set(
                &mut tx,
                &self.deployment,
                next,
                write,
                self.incarnation(),
            )
            .await?;
            next
        } else {
            if let Some(anchor) = write.anchor {
                crate::generation::set_anchor(&mut tx, &self.deployment, anchor).await?;
            }
            current
        };
        tx.commit().await.map_err(db)?;
        if feed_rows > 0 {
            self.feed.written(&self.pool, &self.deployment);
        }
        // Unchanged tuples keep the ids read at the start; written ones got theirs back.
        for s in specs {
            if !ids.contains_key(&s.key) {
                if let Some(r) = stored.get(s.key.as_str()) {
                    ids.insert(s.key.clone(), r.7);
                }
            }
        }
        Ok(Some(Registered {
            ids,
            generation,
            changed: moved_on,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::PgPool;

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
