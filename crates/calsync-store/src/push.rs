//! Push (issue 24): the deployment's change-notification subscriptions, one per tracked
//! (mailbox, calendar), and the wake-ups a notification makes durable. A notification only ever
//! asks for a round (`round_requests`, the wake path of issue 23): nothing it says reaches the
//! read model.

use crate::Store;
use crate::error::{StoreError, db};
use crate::wake::ROUNDS_CHANNEL;
use chrono::{DateTime, Utc};

/// Who asks for the rounds notifications wake (`round_requests.requested_by`); open requests
/// of this asker coalesce, one per tuple.
pub const PUSH_ASKER: &str = "push";

/// A subscription's state as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PushRow {
    /// The mailbox (its lease key).
    pub mailbox: String,
    /// The calendar (`default` or an id).
    pub calendar_id: String,
    /// Graph's id, once created.
    pub subscription_id: Option<String>,
    /// When Graph ends it.
    pub expires_at: Option<DateTime<Utc>>,
    /// `pending`, `active`, `refused` or `failing`.
    pub state: String,
    /// Why it is refused or failing.
    pub detail: Option<String>,
    /// When a refused or failing one is tried again.
    pub retry_at: Option<DateTime<Utc>>,
    /// Whose it is: the delegated account that made it (`me/...`), `None` for the app. Only
    /// its maker may renew or delete it.
    pub account: Option<String>,
    /// The account the calendar is read through now (its tracked tuple's settings), `None`
    /// for the app's token or an untracked calendar. When it differs from `account`, the
    /// subscription is made again by the new reader.
    pub reader: Option<String>,
}

/// A subscription a notification names, as the receiver checks it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PushTarget {
    /// Graph's id.
    pub subscription_id: String,
    /// SHA-256 of its `clientState`.
    pub client_state_hash: Option<Vec<u8>>,
    /// The mailbox.
    pub mailbox: String,
    /// The calendar.
    pub calendar_id: String,
}

const COLUMNS: &str = "p.mailbox, p.calendar_id, p.subscription_id, p.expires_at, p.state, \
     p.detail, p.retry_at, p.account, \
     (SELECT t.settings::jsonb->>'account' FROM sync_tuples t WHERE t.deployment = p.deployment \
       AND t.mailbox = p.mailbox AND t.calendar_id = p.calendar_id AND t.tracked \
       ORDER BY t.tuple_key LIMIT 1) AS reader";

impl Store {
    /// The subscriptions this replica keeps: one per tracked (mailbox, calendar) whose
    /// mailbox it holds, new ones recorded `pending`.
    pub async fn push_mine(&self) -> Result<Vec<PushRow>, StoreError> {
        let me = self.incarnation().unwrap_or("").to_owned();
        self.bounded("reading this replica's subscriptions", async {
            sqlx::query(
                "INSERT INTO push_subscriptions (deployment, mailbox, calendar_id) \
                 SELECT DISTINCT t.deployment, t.mailbox, t.calendar_id FROM sync_tuples t \
                 JOIN mailbox_leases l ON l.deployment = t.deployment AND l.mailbox = t.mailbox \
                 WHERE t.deployment = $1 AND t.tracked AND l.owner = $2 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&*self.deployment)
            .bind(&me)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM push_subscriptions p \
                 JOIN mailbox_leases l ON l.deployment = p.deployment AND l.mailbox = p.mailbox \
                 WHERE p.deployment = $1 AND l.owner = $2 \
                 AND EXISTS (SELECT 1 FROM sync_tuples t WHERE t.deployment = p.deployment \
                   AND t.mailbox = p.mailbox AND t.calendar_id = p.calendar_id AND t.tracked) \
                 ORDER BY p.mailbox, p.calendar_id"
            ))
            .bind(&*self.deployment)
            .bind(&me)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Of the subscriptions this replica keeps, those whose state may change now: all but the
    /// healthy ones not due for renewal within `renew_before` and the unhealthy ones waiting
    /// for their `retry_at`. What the subscriber looks at between its full reads
    /// ([`Store::push_mine`]): at 100,000 calendars, a handful of rows instead of all.
    pub async fn push_mine_due(
        &self,
        renew_before: std::time::Duration,
    ) -> Result<Vec<PushRow>, StoreError> {
        let me = self.incarnation().unwrap_or("").to_owned();
        let secs = renew_before.as_secs_f64();
        self.bounded("reading this replica's due subscriptions", async {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM push_subscriptions p \
                 JOIN mailbox_leases l ON l.deployment = p.deployment AND l.mailbox = p.mailbox \
                 WHERE p.deployment = $1 AND l.owner = $2 \
                 AND NOT COALESCE(p.state = 'active' AND p.subscription_id IS NOT NULL \
                          AND p.expires_at > now() + make_interval(secs => $3), false) \
                 AND NOT COALESCE(p.state <> 'active' AND p.retry_at > now(), false) \
                 AND EXISTS (SELECT 1 FROM sync_tuples t WHERE t.deployment = p.deployment \
                   AND t.mailbox = p.mailbox AND t.calendar_id = p.calendar_id AND t.tracked) \
                 ORDER BY p.mailbox, p.calendar_id"
            ))
            .bind(&*self.deployment)
            .bind(&me)
            .bind(secs)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Graph asked for reauthorization: the subscription is renewed at the next look (a
    /// renewal reauthorizes).
    pub async fn push_renew_now(&self, subscription_id: &str) -> Result<(), StoreError> {
        self.bounded("asking for a renewal", async {
            sqlx::query(
                "UPDATE push_subscriptions SET expires_at = LEAST(expires_at, now() + interval '1 minute'), \
                 retry_at = NULL, updated_at = now() WHERE deployment = $1 AND subscription_id = $2",
            )
            .bind(&*self.deployment)
            .bind(subscription_id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// A renewal failed (the subscription stands until it ends): why, and when to try again.
    pub async fn push_retry_at(
        &self,
        mailbox: &str,
        calendar_id: &str,
        detail: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.bounded("recording a renewal failure", async {
            sqlx::query(
                "UPDATE push_subscriptions SET detail = $4, retry_at = $5, updated_at = now() \
                 WHERE deployment = $1 AND mailbox = $2 AND calendar_id = $3",
            )
            .bind(&*self.deployment)
            .bind(mailbox)
            .bind(calendar_id)
            .bind(detail)
            .bind(retry_at)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// How many of the deployment's subscriptions are in each state.
    pub async fn push_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.bounded("counting subscriptions", async {
            sqlx::query_as(
                "SELECT state, count(*) FROM push_subscriptions WHERE deployment = $1 GROUP BY state",
            )
            .bind(&*self.deployment)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Subscriptions whose (mailbox, calendar) no tracked tuple of the deployment names any
    /// more: to be deleted at Graph, then forgotten.
    pub async fn push_orphans(&self) -> Result<Vec<PushRow>, StoreError> {
        self.bounded("reading untracked subscriptions", async {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM push_subscriptions p WHERE p.deployment = $1 \
                 AND NOT EXISTS (SELECT 1 FROM sync_tuples t WHERE t.deployment = p.deployment \
                   AND t.mailbox = p.mailbox AND t.calendar_id = p.calendar_id AND t.tracked) \
                 ORDER BY p.mailbox, p.calendar_id"
            ))
            .bind(&*self.deployment)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Graph created the subscription: its id, the hash of its secret, its expiry and whose it
    /// is (`account`: `None` for the app).
    pub async fn push_created(
        &self,
        mailbox: &str,
        calendar_id: &str,
        subscription_id: &str,
        client_state_hash: &[u8],
        expires_at: DateTime<Utc>,
        account: Option<&str>,
    ) -> Result<(), StoreError> {
        self.bounded("recording a subscription", async {
            sqlx::query(
                "UPDATE push_subscriptions SET subscription_id = $4, client_state_hash = $5, \
                 expires_at = $6, account = $7, state = 'active', detail = NULL, retry_at = NULL, \
                 renewed_at = now(), updated_at = now() \
                 WHERE deployment = $1 AND mailbox = $2 AND calendar_id = $3",
            )
            .bind(&*self.deployment)
            .bind(mailbox)
            .bind(calendar_id)
            .bind(subscription_id)
            .bind(client_state_hash)
            .bind(expires_at)
            .bind(account)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// Graph renewed subscription `subscription_id` until `expires_at`.
    pub async fn push_renewed(
        &self,
        subscription_id: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.bounded("recording a renewal", async {
            sqlx::query(
                "UPDATE push_subscriptions SET expires_at = $3, state = 'active', detail = NULL, \
                 retry_at = NULL, renewed_at = now(), updated_at = now() \
                 WHERE deployment = $1 AND subscription_id = $2",
            )
            .bind(&*self.deployment)
            .bind(subscription_id)
            .bind(expires_at)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// The (mailbox, calendar) is not subscribed (`refused` or `failing`, with why), and is
    /// tried again at `retry_at`; a subscription id it had is forgotten when `gone`.
    pub async fn push_unhealthy(
        &self,
        mailbox: &str,
        calendar_id: &str,
        state: &str,
        detail: &str,
        retry_at: DateTime<Utc>,
        gone: bool,
    ) -> Result<(), StoreError> {
        self.bounded("recording a subscription failure", async {
            sqlx::query(
                "UPDATE push_subscriptions SET state = $4, detail = $5, retry_at = $6, \
                 subscription_id = CASE WHEN $7 THEN NULL ELSE subscription_id END, \
                 client_state_hash = CASE WHEN $7 THEN NULL ELSE client_state_hash END, \
                 expires_at = CASE WHEN $7 THEN NULL ELSE expires_at END, updated_at = now() \
                 WHERE deployment = $1 AND mailbox = $2 AND calendar_id = $3",
            )
            .bind(&*self.deployment)
            .bind(mailbox)
            .bind(calendar_id)
            .bind(state)
            .bind(detail)
            .bind(retry_at)
            .bind(gone)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// Graph removed subscription `subscription_id` (`subscriptionRemoved`, or 404 on
    /// renewal): it is to be created again. `false`: not one of this deployment's.
    pub async fn push_gone(&self, subscription_id: &str) -> Result<bool, StoreError> {
        self.bounded("recording a removed subscription", async {
            let done = sqlx::query(
                "UPDATE push_subscriptions SET state = 'pending', subscription_id = NULL, \
                 client_state_hash = NULL, expires_at = NULL, retry_at = NULL, \
                 detail = 'removed by Graph', updated_at = now() \
                 WHERE deployment = $1 AND subscription_id = $2",
            )
            .bind(&*self.deployment)
            .bind(subscription_id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(done.rows_affected() > 0)
        })
        .await
    }

    /// Forgets the subscription of (mailbox, calendar) (deleted at Graph, or never created).
    pub async fn push_forget(&self, mailbox: &str, calendar_id: &str) -> Result<(), StoreError> {
        self.bounded("forgetting a subscription", async {
            sqlx::query(
                "DELETE FROM push_subscriptions \
                 WHERE deployment = $1 AND mailbox = $2 AND calendar_id = $3",
            )
            .bind(&*self.deployment)
            .bind(mailbox)
            .bind(calendar_id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// The subscriptions these ids name (unknown ids are left out).
    pub async fn push_targets(&self, ids: &[String]) -> Result<Vec<PushTarget>, StoreError> {
        self.bounded("reading notified subscriptions", async {
            sqlx::query_as(
                "SELECT subscription_id, client_state_hash, mailbox, calendar_id \
                 FROM push_subscriptions WHERE deployment = $1 AND subscription_id = ANY($2)",
            )
            .bind(&*self.deployment)
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Asks for a round of every tracked tuple of these (mailbox, calendar) pairs, durably,
    /// and wakes the replicas: one open request per tuple at most, so a burst of notifications
    /// makes at most one more round. Answers how many requests were added.
    ///
    /// One statement, committed on its own (the receiver answers Graph after it, so it is
    /// waited onto disk): the requests, the `NOTIFY` when any was added, and each
    /// subscription's `notified_at`, written at most once a minute (a storm of notifications
    /// would otherwise rewrite a row per notification).
    pub async fn push_wake(&self, targets: &[(String, String)]) -> Result<u64, StoreError> {
        let mailboxes: Vec<&str> = targets.iter().map(|(m, _)| m.as_str()).collect();
        let calendars: Vec<&str> = targets.iter().map(|(_, c)| c.as_str()).collect();
        self.bounded("waking notified calendars", async {
            let (added, _): (i64, Option<String>) = sqlx::query_as(
                "WITH w AS (SELECT * FROM UNNEST($2::text[], $3::text[]) AS w(m, c)), \
                 seen AS ( \
                   UPDATE push_subscriptions p SET notified_at = now() FROM w \
                   WHERE p.deployment = $1 AND p.mailbox = w.m AND p.calendar_id = w.c \
                     AND (p.notified_at IS NULL OR p.notified_at < now() - interval '1 minute')), \
                 added AS ( \
                   INSERT INTO round_requests (deployment, tuple_key, requested_by) \
                   SELECT t.deployment, t.tuple_key, $4 FROM sync_tuples t \
                   JOIN w ON t.mailbox = w.m AND t.calendar_id = w.c \
                   WHERE t.deployment = $1 AND t.tracked \
                   ON CONFLICT (deployment, tuple_key) WHERE requested_by = 'push' AND taken_by IS NULL \
                   DO NOTHING RETURNING 1) \
                 SELECT n, CASE WHEN n > 0 THEN pg_notify($5, $1)::text END \
                 FROM (SELECT count(*) AS n FROM added) a",
            )
            .bind(&*self.deployment)
            .bind(&mailboxes)
            .bind(&calendars)
            .bind(PUSH_ASKER)
            .bind(ROUNDS_CHANNEL)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
            Ok(added.max(0) as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::SetWrite;
    use crate::tuples::{TupleSpec, test_spec};
    use sqlx::PgPool;
    use std::time::Duration;

    async fn open_requests(pool: &PgPool) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT tuple_key FROM round_requests WHERE taken_by IS NULL ORDER BY tuple_key",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    }

    async fn notified_at(pool: &PgPool, mailbox: &str) -> Option<DateTime<Utc>> {
        sqlx::query_scalar("SELECT notified_at FROM push_subscriptions WHERE mailbox = $1")
            .bind(mailbox)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// Issue 26: a calendar read through a delegated account is subscribed by that account:
    /// each row says who reads the calendar now (`reader`) and, once made, whose the
    /// subscription is (`account`); a calendar moved to another reader shows the two apart.
    #[sqlx::test(migrations = false)]
    async fn each_subscription_says_who_reads_its_calendar_and_whose_it_is(pool: PgPool) {
        let store = Store::from_pool(pool.clone()).as_incarnation("r1#a");
        store.migrate().await.unwrap();
        let set = |digest: &str| SetWrite {
            cause: "start",
            digest: Some(digest.into()),
            based_on: None,
            anchor: None,
        };
        let by_account = r#"{"interval_ms":1000,"account":"adele"}"#;
        store
            .register_set(
                &[test_spec("app", "{}"), test_spec("own", by_account)],
                true,
                &set("d1"),
            )
            .await
            .unwrap();
        store
            .heartbeat(
                "r1#a",
                "r1",
                crate::ReplicaKind::Run,
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        assert_eq!(
            store.acquire_leases("r1#a", 10, None).await.unwrap().len(),
            2
        );
        let readers = |rows: Vec<PushRow>| {
            rows.into_iter()
                .map(|r| (r.mailbox, r.account, r.reader))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            readers(store.push_mine().await.unwrap()),
            [
                ("app@x".to_owned(), None, None),
                ("own@x".to_owned(), None, Some("adele".to_owned()))
            ]
        );
        store
            .push_created("own@x", "default", "s1", b"h", Utc::now(), Some("adele"))
            .await
            .unwrap();
        // The app's calendar moves to the account, the account's to the app.
        store
            .register_set(
                &[test_spec("app", by_account), test_spec("own", "{}")],
                true,
                &set("d2"),
            )
            .await
            .unwrap();
        assert_eq!(
            readers(store.push_mine().await.unwrap()),
            [
                ("app@x".to_owned(), None, Some("adele".to_owned())),
                ("own@x".to_owned(), Some("adele".to_owned()), None)
            ]
        );
    }

    /// Issue 24: a notification's wake-up is one durable request per tracked tuple, a burst
    /// coalesces into one open request, unknown pairs wake nothing, the replicas are told only
    /// when something was added, and `notified_at` is rewritten at most once a minute.
    #[sqlx::test(migrations = false)]
    async fn a_burst_of_notifications_leaves_one_open_request_per_calendar(pool: PgPool) {
        let store = Store::from_pool(pool.clone()).as_incarnation("r1#a");
        store.migrate().await.unwrap();
        let set = SetWrite {
            cause: "start",
            digest: Some("d1".into()),
            based_on: None,
            anchor: None,
        };
        store
            .register_set(&[test_spec("a", "{}"), test_spec("b", "{}")], true, &set)
            .await
            .unwrap();
        for m in ["a@x", "b@x"] {
            sqlx::query(
                "INSERT INTO push_subscriptions (deployment, mailbox, calendar_id) VALUES ($1, $2, 'default')",
            )
            .bind(store.deployment())
            .bind(m)
            .execute(&pool)
            .await
            .unwrap();
        }
        let mut listener = store.listen_rounds().await.unwrap();
        let pair = |m: &str| (m.to_owned(), "default".to_owned());

        let added = store
            .push_wake(&[pair("a@x"), pair("a@x"), pair("b@x"), pair("nobody@x")])
            .await
            .unwrap();
        assert_eq!(added, 2);
        assert_eq!(open_requests(&pool).await, ["a", "b"]);
        tokio::time::timeout(Duration::from_secs(5), listener.next())
            .await
            .expect("the replicas are told")
            .unwrap();
        let first = notified_at(&pool, "a@x")
            .await
            .expect("notified_at written");

        // More notifications while the requests are open: nothing more, nobody told.
        assert_eq!(store.push_wake(&[pair("a@x")]).await.unwrap(), 0);
        assert_eq!(open_requests(&pool).await, ["a", "b"]);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), listener.next())
                .await
                .is_err(),
            "nothing added, nobody woken"
        );
        assert_eq!(
            notified_at(&pool, "a@x").await,
            Some(first),
            "once a minute"
        );

        // Once a's request is taken (its round runs), a notification asks for one more.
        sqlx::query(
            "UPDATE round_requests SET taken_by = 'r1#a', taken_at = now() WHERE tuple_key = 'a'",
        )
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(
            store.push_wake(&[pair("a@x"), pair("a@x")]).await.unwrap(),
            1
        );
        assert_eq!(open_requests(&pool).await, ["a", "b"]);

        // Its answer, written without waiting for the disk, is visible at once; the setting
        // that spared the wait ends with its statement (one connection: the same session).
        let single = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap();
        let one = Store::from_pool(single.clone());
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM round_requests WHERE tuple_key = 'b' AND done_at IS NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let (asker, secs) = one
            .finish_round_request(id, "ok", None)
            .await
            .unwrap()
            .expect("the request exists");
        assert_eq!(asker, PUSH_ASKER);
        assert!(secs >= 0.0);
        let outcome: Option<String> =
            sqlx::query_scalar("SELECT outcome FROM round_requests WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(outcome.as_deref(), Some("ok"));
        let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&single)
            .await
            .unwrap();
        assert_eq!(sync, "on", "the answer's setting ends with its transaction");
    }

    /// Issue 24: between full reads the subscriber looks only at what may need action; a
    /// healthy subscription far from its renewal, and an unhealthy one waiting for its retry,
    /// are left out, and so are other replicas' and untracked calendars'.
    #[sqlx::test(migrations = false)]
    async fn only_subscriptions_due_for_action_are_read_between_full_reads(pool: PgPool) {
        let store = Store::from_pool(pool.clone()).as_incarnation("r1#a");
        store.migrate().await.unwrap();
        let keys = [
            "healthy", "renew", "pending", "waiting", "retry", "theirs", "lapsed",
        ];
        let specs: Vec<TupleSpec> = keys.iter().map(|k| test_spec(k, "{}")).collect();
        let set = SetWrite {
            cause: "start",
            digest: Some("d1".into()),
            based_on: None,
            anchor: None,
        };
        store.register_set(&specs, true, &set).await.unwrap();
        for k in keys {
            let owner = if k == "theirs" { "r2#b" } else { "r1#a" };
            sqlx::query(
                "INSERT INTO mailbox_leases (deployment, mailbox, owner) VALUES ($1, $2, $3) \
                 ON CONFLICT (deployment, mailbox) DO UPDATE SET owner = EXCLUDED.owner",
            )
            .bind(store.deployment())
            .bind(format!("{k}@x"))
            .bind(owner)
            .execute(&pool)
            .await
            .unwrap();
        }
        // (key, state, subscription, expires in, retry in), hours from now.
        let rows = [
            ("healthy", "active", Some("s1"), Some(100), None),
            ("renew", "active", Some("s2"), Some(6), None),
            ("pending", "pending", None, None, None),
            ("waiting", "refused", None, None, Some(20)),
            ("retry", "failing", None, None, Some(-1)),
            ("theirs", "pending", None, None, None),
            ("lapsed", "active", Some("s3"), Some(-1), Some(1)),
        ];
        for (k, state, id, expires, retry) in rows {
            sqlx::query(
                "INSERT INTO push_subscriptions (deployment, mailbox, calendar_id, state, \
                   subscription_id, expires_at, retry_at) \
                 VALUES ($1, $2, 'default', $3, $4, now() + make_interval(hours => $5), \
                   now() + make_interval(hours => $6))",
            )
            .bind(store.deployment())
            .bind(format!("{k}@x"))
            .bind(state)
            .bind(id)
            .bind(expires)
            .bind(retry)
            .execute(&pool)
            .await
            .unwrap();
        }
        let due: Vec<String> = store
            .push_mine_due(std::time::Duration::from_secs(12 * 3600))
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.mailbox)
            .collect();
        assert_eq!(due, ["lapsed@x", "pending@x", "renew@x", "retry@x"]);
        // The full read has them all (this replica's).
        assert_eq!(store.push_mine().await.unwrap().len(), 6);
    }
}
