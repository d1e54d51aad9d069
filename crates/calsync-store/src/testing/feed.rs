//! A follower of the change feed for tests: a copy of the view built from a snapshot and the
//! changes after it, compared with the view itself.

use crate::Store;
use crate::changes::Change;
use crate::error::{StoreError, db};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A row's place in the view: (deployment, calendar, event id).
pub type RowKey = (String, String, String);

/// The view as a follower of the feed rebuilds it.
#[derive(Debug, Clone, Default)]
pub struct FeedReplica {
    /// Where it follows from.
    pub cursor: String,
    /// The rows, as the feed carries them.
    pub rows: BTreeMap<RowKey, serde_json::Value>,
    /// Every change applied, in order.
    pub applied: Vec<Change>,
}

impl FeedReplica {
    /// A replica of every deployment's rows, from a snapshot.
    pub async fn from_snapshot(store: &Store) -> Result<FeedReplica, StoreError> {
        let snap = store.changes_snapshot(true).await?;
        let rows = snap
            .rows
            .into_iter()
            .map(|r| ((r.deployment, r.tuple_key, r.event_id), r.data))
            .collect();
        Ok(FeedReplica {
            cursor: snap.cursor,
            rows,
            applied: Vec::new(),
        })
    }

    /// Applies one change: an upsert sets the row whole, a delete removes it.
    pub fn apply(&mut self, c: Change) {
        let key = (
            c.deployment.clone(),
            c.tuple_key.clone(),
            c.event_id.clone(),
        );
        match (c.op.as_str(), &c.data) {
            ("upsert", Some(data)) => {
                self.rows.insert(key, data.clone());
            }
            _ => {
                self.rows.remove(&key);
            }
        }
        self.cursor = c.cursor.clone();
        self.applied.push(c);
    }

    /// Reads and applies what the feed answers now, in pages of `page`; returns how many.
    pub async fn follow(&mut self, store: &Store, page: i32) -> Result<usize, StoreError> {
        let mut n = 0;
        loop {
            let changes = store.changes_after(Some(&self.cursor), page).await?;
            let got = changes.len();
            for c in changes {
                self.apply(c);
            }
            n += got;
            if got < page as usize {
                return Ok(n);
            }
        }
    }

    /// Follows until every transaction that committed before this call is readable (the
    /// horizon passed it; a transaction elsewhere in the cluster can hold it back, waited for
    /// up to two minutes), then reads the rest.
    pub async fn catch_up(&mut self, store: &Store) -> Result<usize, StoreError> {
        let mut n = self.follow(store, 500).await?;
        store.feed_settled().await?;
        n += self.follow(store, 500).await?;
        Ok(n)
    }

    /// How the copy differs from `view` (rows missing, extra, different), in short: empty if
    /// they are the same.
    pub fn differences(&self, view: &BTreeMap<RowKey, serde_json::Value>) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in view {
            match self.rows.get(k) {
                None => out.push(format!("missing {k:?}")),
                Some(mine) if mine != v => out.push(format!("different {k:?}")),
                Some(_) => {}
            }
        }
        for k in self.rows.keys().filter(|k| !view.contains_key(*k)) {
            out.push(format!("extra {k:?}"));
        }
        out
    }

    /// The changes applied, as `op cause tuple/event` lines (for assertions and failures).
    pub fn applied_lines(&self) -> Vec<String> {
        self.applied
            .iter()
            .map(|c| format!("{} {} {}/{}", c.op, c.cause, c.tuple_key, c.event_id))
            .collect()
    }
}

impl Store {
    /// The view's rows as this store's feed carries them (every deployment's; with or
    /// without the payload, as the store writes them), as `calsync_snapshot` answers them:
    /// the view's own row, whatever the feed's writers build.
    pub async fn view_as_feed_rows(
        &self,
    ) -> Result<BTreeMap<RowKey, serde_json::Value>, StoreError> {
        let rows: Vec<(String, String, String, serde_json::Value)> = sqlx::query_as(
            "SELECT deployment, tuple_key, event_id, data FROM calsync_snapshot(NULL, $1) \
             WHERE event_id IS NOT NULL",
        )
        .bind(self.feed.payload)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|(d, t, e, data)| ((d, t, e), data))
            .collect())
    }

    /// Returns once every transaction that committed before the call is below the feed's
    /// horizon; `Unavailable` if another transaction (in the cluster: another test's) holds it
    /// back for two minutes.
    pub async fn feed_settled(&self) -> Result<(), StoreError> {
        let mine: i64 = sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let began = Instant::now();
        while began.elapsed() < Duration::from_secs(120) {
            let horizon: i64 =
                sqlx::query_scalar("SELECT txid_snapshot_xmin(txid_current_snapshot())")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db)?;
            if horizon > mine {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Err(StoreError::Unavailable(
            "the change feed's horizon did not pass for two minutes (a transaction stays open)"
                .into(),
        ))
    }
}
