//! Where each `[[sinks]]` endpoint stands in the change feed (`sink_cursors`, migration
//! `0010_change_feed.sql`): its cursor, moved only after the endpoint acknowledged a batch, and
//! how it is failing. calsync-sinks delivers; this keeps its place.

use crate::Store;
use crate::error::{StoreError, db};
use chrono::{DateTime, Utc};

/// A sink's place and health, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SinkState {
    /// The sink's name (`[[sinks]] name`).
    pub sink: String,
    /// The last change it acknowledged.
    pub cursor: String,
    /// Changes delivered since it was first configured.
    pub delivered: i64,
    /// Since when every attempt failed; `None` while it is healthy.
    pub failing_since: Option<DateTime<Utc>>,
    /// The last failure, without secrets (an HTTP status or a transport error).
    pub last_error: Option<String>,
}

impl Store {
    /// The sink's cursor. A sink seen for the first time starts at the feed's present (it is
    /// sent what changes from now on: an app fills itself from `calsync_snapshot` first), or
    /// with `from_oldest` at the oldest change kept (`''`).
    pub async fn sink_cursor(&self, sink: &str, from_oldest: bool) -> Result<String, StoreError> {
        self.bounded("reading a sink's cursor", async {
            sqlx::query(
                "INSERT INTO sink_cursors (deployment, sink, cursor) \
                 VALUES ($1, $2, CASE WHEN $3 THEN '' ELSE txid_snapshot_xmin(txid_current_snapshot()) || '.0' END) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&*self.deployment)
            .bind(sink)
            .bind(from_oldest)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            sqlx::query_scalar(
                "SELECT cursor FROM sink_cursors WHERE deployment = $1 AND sink = $2",
            )
            .bind(&*self.deployment)
            .bind(sink)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// The sink acknowledged everything up to `cursor` (`n` changes of this deployment).
    pub async fn sink_delivered(&self, sink: &str, cursor: &str, n: i64) -> Result<(), StoreError> {
        self.bounded("saving a sink's cursor", async {
            sqlx::query(
                "UPDATE sink_cursors SET cursor = $3, delivered = delivered + $4, updated_at = now(), \
                   failing_since = NULL, last_error = NULL WHERE deployment = $1 AND sink = $2",
            )
            .bind(&*self.deployment)
            .bind(sink)
            .bind(cursor)
            .bind(n)
            .execute(&self.pool)
            .await
            .map_err(db)
            .map(|_| ())
        })
        .await
    }

    /// An attempt failed with `error`; returns since when the sink has been failing.
    pub async fn sink_failed(&self, sink: &str, error: &str) -> Result<DateTime<Utc>, StoreError> {
        self.bounded("recording a sink's failure", async {
            sqlx::query_scalar(
                "UPDATE sink_cursors SET failing_since = COALESCE(failing_since, now()), last_error = $3, \
                   updated_at = now() WHERE deployment = $1 AND sink = $2 RETURNING failing_since",
            )
            .bind(&*self.deployment)
            .bind(sink)
            .bind(error)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }

    /// Every sink of this deployment, by name.
    pub async fn sink_states(&self) -> Result<Vec<SinkState>, StoreError> {
        self.bounded("reading the sinks", async {
            sqlx::query_as(
                "SELECT sink, cursor, delivered, failing_since, last_error FROM sink_cursors \
                 WHERE deployment = $1 ORDER BY sink",
            )
            .bind(&*self.deployment)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        })
        .await
    }
}
