//! The wake path (issue 23): "run this tuple's round now" reaches the replica that holds its
//! mailbox through PostgreSQL (`round_requests`, `NOTIFY calsync_rounds`), wherever it was
//! asked; the holder runs the round through the tuple's own task and writes how it ended.

use crate::Store;
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};

/// The channel a round request notifies, with the deployment as payload.
pub const ROUNDS_CHANNEL: &str = "calsync_rounds";

/// A round request as its asker reads it back.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RoundRequest {
    /// Its id.
    pub id: i64,
    /// The tuple.
    pub tuple_key: String,
    /// The incarnation that took it, once one did.
    pub taken_by: Option<String>,
    /// When the round ended.
    pub done_at: Option<DateTime<Utc>>,
    /// `ok`, `failed`, `interrupted` or `not-scheduled`.
    pub outcome: Option<String>,
    /// The failure's code and message, or why it was not run.
    pub detail: Option<String>,
}

impl Store {
    /// Asks for a round of each of these tuples now; answers each request's id by key.
    pub async fn request_rounds(&self, keys: &[String]) -> Result<Vec<(i64, String)>, StoreError> {
        let by = self.incarnation().unwrap_or("").to_owned();
        self.bounded("asking for rounds", async {
            let mut tx = self.pool.begin().await.map_err(db)?;
            let ids: Vec<(i64, String)> = sqlx::query_as(
                "INSERT INTO round_requests (deployment, tuple_key, requested_by) \
                 SELECT $1, k, $3 FROM UNNEST($2::text[]) AS t(k) RETURNING id, tuple_key",
            )
            .bind(&*self.deployment)
            .bind(keys)
            .bind(&by)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(ROUNDS_CHANNEL)
                .bind(&*self.deployment)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(ids)
        })
        .await
    }

    /// Takes the open requests for tuples whose mailbox this incarnation holds now; answers
    /// (id, tuple key) of each.
    pub async fn take_round_requests(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let me = self.incarnation().unwrap_or("").to_owned();
        self.bounded("taking round requests", async {
            sqlx::query_as(
                // The lease is looked up per request (a subquery the planner keeps per row):
                // as a join, with `round_requests` freshly grown and not yet analysed, the
                // planner paired every request with every lease held here, and taking 2,000
                // push wake-ups took 10 s instead of 20 ms (calsync-bench push).
                "UPDATE round_requests r SET taken_by = $2, taken_at = now() \
                 FROM sync_tuples t \
                 WHERE r.deployment = $1 AND r.done_at IS NULL AND r.taken_by IS NULL \
                   AND t.deployment = r.deployment AND t.tuple_key = r.tuple_key AND t.tracked \
                   AND (SELECT l.owner FROM mailbox_leases l \
                        WHERE l.deployment = t.deployment AND l.mailbox = t.mailbox) = $2 \
                 RETURNING r.id, r.tuple_key",
            )
            .bind(&*self.deployment)
            .bind(&me)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Writes how a requested round ended.
    /// Answers who asked and how long ago (seconds from the request to this answer), for the
    /// wake-to-round latency metric; `None` if no such request.
    ///
    /// Committed asynchronously (`synchronous_commit = off` for this statement's transaction
    /// alone): the answer is visible at once but not waited onto disk. A database crash may lose
    /// the last fraction of a second of answers; such a request stays taken and unfinished, its
    /// round's work is committed already, and its asker gives up at its own deadline. Waiting
    /// for the WAL flush here cost a second fsync per woken round: under a storm of push
    /// wake-ups (1,000 rounds a second) the database spent its time in `WALSync` for these
    /// answers (issue 24's benchmark, sampled from `pg_stat_activity`).
    pub async fn finish_round_request(
        &self,
        id: i64,
        outcome: &str,
        detail: Option<&str>,
    ) -> Result<Option<(String, f64)>, StoreError> {
        self.bounded("finishing a round request", async {
            sqlx::query_as(
                "WITH lazy AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 UPDATE round_requests SET done_at = now(), outcome = $2, detail = $3 \
                 FROM lazy WHERE id = $1 \
                 RETURNING requested_by, extract(epoch FROM done_at - requested_at)::float8",
            )
            .bind(id)
            .bind(outcome)
            .bind(detail)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// The requests of these ids as they stand.
    pub async fn round_requests(&self, ids: &[i64]) -> Result<Vec<RoundRequest>, StoreError> {
        self.bounded("reading round requests", async {
            sqlx::query_as(
                "SELECT id, tuple_key, taken_by, done_at, outcome, detail FROM round_requests \
                 WHERE id = ANY($1::bigint[]) ORDER BY id",
            )
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Withdraws requests nobody finished (an asker that gave up): they are done, `abandoned`.
    pub async fn withdraw_round_requests(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.bounded("withdrawing round requests", async {
            sqlx::query(
                "UPDATE round_requests SET done_at = now(), outcome = 'abandoned' \
                 WHERE id = ANY($1::bigint[]) AND done_at IS NULL",
            )
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// Deletes requests answered more than a day ago; answers how many.
    pub async fn prune_round_requests(&self) -> Result<u64, StoreError> {
        self.bounded("pruning round requests", async {
            Ok(sqlx::query(
                "DELETE FROM round_requests WHERE deployment = $1 AND done_at < now() - interval '1 day'",
            )
            .bind(&*self.deployment)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected())
        })
        .await
    }

    /// Whether a `run` replica of this deployment is alive now.
    pub async fn daemon_alive(&self) -> Result<bool, StoreError> {
        self.bounded("reading live replicas", async {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM replicas WHERE deployment = $1 AND kind = 'run' AND expires_at > now())",
            )
            .bind(&*self.deployment)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }
}

impl Store {
    /// Replica names by incarnation, for this deployment (to say who ran a round).
    pub async fn incarnation_replicas(
        &self,
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        self.bounded("reading replicas", async {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT incarnation, replica FROM replicas WHERE deployment = $1")
                    .bind(&*self.deployment)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
            Ok(rows.into_iter().collect())
        })
        .await
    }
}
