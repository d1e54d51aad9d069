//! Applying one page: its rows, its removals, any sweep and the link after it commit in one
//! transaction, guarded by the tuple's `link_version`. The transaction is a list of named
//! steps (`steps.rs`, `upsert.rs`), each returning the ids it touched; a page that
//! moves only its link is saved with others by `batch.rs`.

use crate::Store;
use crate::error::{StoreError, db};
use crate::link::claim;
use crate::steps::{self, Touched};
use crate::tuples::LinkKind;
use crate::upsert::{Rows, Target, upsert_events, upsert_series};
use crate::write::{PageApplied, PageWrite, RoundStart};
use sqlx::{Postgres, Transaction};

impl Store {
    /// Applies one page and saves the link after it, in one transaction: a crash at any
    /// instant leaves either the page and its link, or neither.
    pub async fn apply_page(&self, w: &PageWrite<'_>) -> Result<PageApplied, StoreError> {
        self.panic_point(w.tuple_id);
        let c = w.changes;
        let may_sweep = w.link_kind == LinkKind::Delta && w.round_start != Some(RoundStart::Delta);
        let result = if c.is_empty() && !may_sweep {
            // Only the link moves (every no-change incremental round): one UPDATE is already
            // atomic, no transaction needed, and it is saved together with the links of the
            // rounds that finish at about the same time, each statement under the deadline.
            self.commit_link(w).await
        } else {
            self.bounded("applying a page", self.apply_page_now(w))
                .await
        };
        match (result, w.fence) {
            (Err(StoreError::Conflict { tuple_id }), Some(fence)) => {
                // Which check refused the write: told apart here, off the hot path.
                if self.holds_lease(tuple_id, fence).await? {
                    Err(StoreError::Conflict { tuple_id })
                } else {
                    Err(StoreError::Fenced { tuple_id })
                }
            }
            (result, _) => result,
        }
    }

    /// Whether the lease of `tuple_id`'s mailbox is current with fencing token `fence`.
    pub async fn holds_lease(&self, tuple_id: i64, fence: i64) -> Result<bool, StoreError> {
        let query = async {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM sync_tuples t \
                   JOIN mailbox_leases l ON l.deployment = t.deployment AND l.mailbox = t.mailbox \
                   JOIN replicas r ON r.deployment = l.deployment AND r.incarnation = l.owner \
                 WHERE t.id = $1 AND l.fence = $2 AND r.expires_at > now())",
            )
            .bind(tuple_id)
            .bind(fence)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
        };
        self.bounded("checking a lease", query).await
    }

    async fn commit_link(&self, w: &PageWrite<'_>) -> Result<PageApplied, StoreError> {
        self.fault_point()?;
        let version = self
            .batcher
            .commit(&self.pool, self.deadline, w, self.incarnation())
            .await?
            .ok_or(StoreError::Conflict {
                tuple_id: w.tuple_id,
            })?;
        Ok(PageApplied {
            version,
            ..PageApplied::default()
        })
    }

    /// The page's transaction, its events upserted together; if PostgreSQL refuses a value
    /// in them, the whole page again with each row on its own (the refused kept quarantined).
    async fn apply_page_now(&self, w: &PageWrite<'_>) -> Result<PageApplied, StoreError> {
        match self.apply_page_as(w, Rows::Together).await {
            Err(StoreError::Refused { .. }) => self.apply_page_as(w, Rows::OneByOne).await,
            done => done,
        }
    }

    async fn apply_page_as(&self, w: &PageWrite<'_>, how: Rows) -> Result<PageApplied, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let (applied, feed_rows) = self.apply_in(&mut tx, w, how).await?;
        self.fault_point()?;
        tx.commit().await.map_err(db)?;
        if feed_rows > 0 {
            self.feed.written(&self.pool, &self.deployment);
        }
        Ok(applied)
    }

    /// The page's steps, in order, each a named statement that returns the ids it touched:
    /// claim the tuple (the link, under the version and fence checks, after the change feed's
    /// lock), remove, upsert series, upsert events, reconcile series, on a full round's last
    /// page sweep and switch the served window, and last write the change feed's rows of what
    /// the view now shows differently. Returns what the page did and how many feed rows it
    /// wrote.
    async fn apply_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        w: &PageWrite<'_>,
        how: Rows,
    ) -> Result<(PageApplied, u64), StoreError> {
        let feed = self.feed.on.then_some(&*self.deployment);
        let (version, full_round, round_is_full, rebasing) =
            claim(&mut **tx, w, self.incarnation(), feed).await?;
        self.fault_point()?;
        let mut touched = Touched::default();
        let c = w.changes;
        if !c.removed.is_empty() {
            steps::remove(tx, w.tuple_id, &c.removed, &mut touched).await?;
            self.fault_point()?;
        }
        if !c.series.is_empty() {
            let written =
                upsert_series(tx, w.tuple_id, full_round, &c.series, feed.is_some()).await?;
            for (id, changed) in written {
                if changed {
                    touched.series_changed.push(id.clone());
                }
                touched.series_upserted.push(id);
            }
            self.fault_point()?;
        }
        for (rows, partial) in [(&c.full, false), (&c.partial, true)] {
            if rows.is_empty() {
                continue;
            }
            let target = Target {
                tuple_id: w.tuple_id,
                round: full_round,
                partial,
                pending: rebasing,
                feed: feed.map(|_| {
                    crate::changes::stored(self.feed.payload, crate::changes::Source::Event)
                }),
            };
            let up = upsert_events(tx, target, rows, how).await?;
            touched.upserted.extend(up.written);
            touched.fed.extend(up.fed);
            touched.quarantined.extend(up.quarantined);
            self.fault_point()?;
        }
        // While a moved window's full round runs, the old window's occurrences stay until its
        // last page; that page's sweep removes whatever the new window's round did not list.
        for s in c.reconcile.iter().filter(|_| !rebasing) {
            let written: Vec<&str> = c
                .full
                .iter()
                .chain(&c.partial)
                .filter(|r| r.series_master_id.as_deref() == Some(s.master_id.as_str()))
                .map(|r| r.event_id.as_str())
                .collect();
            steps::reconcile(
                tx,
                w.tuple_id,
                &s.master_id,
                &s.live,
                &written,
                &mut touched,
            )
            .await?;
        }
        if w.link_kind == LinkKind::Delta && round_is_full {
            steps::sweep(tx, w.tuple_id, full_round, &mut touched).await?;
            steps::switch_window(tx, w.tuple_id, &mut touched).await?;
            self.fault_point()?;
        }
        // The upserts wrote the changes of the rows they changed; write_page the rest.
        let feed_rows = match feed {
            Some(_) => {
                touched.fed.len() as u64
                    + crate::changes::write_page(tx, &self.feed, w.tuple_id, &touched).await?
            }
            None => 0,
        };
        let applied = PageApplied {
            version,
            upserted: touched.upserted.len() as u64,
            removed: (touched.removed.len() + touched.reconciled.len()) as u64,
            swept: touched.swept.len() as u64,
            quarantined: touched.quarantined.len() as u64,
        };
        Ok((applied, feed_rows))
    }
}

impl Store {
    /// Which of `master_ids` this tuple has stored as series: the others' occurrence stubs
    /// need their master fetched before the page commits.
    pub async fn known_series(
        &self,
        tuple_id: i64,
        master_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if master_ids.is_empty() {
            return Ok(Default::default());
        }
        let query = async {
            sqlx::query_scalar::<_, String>(
                "SELECT master_id FROM series WHERE tuple_id = $1 AND master_id = ANY($2::text[])",
            )
            .bind(tuple_id)
            .bind(master_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
        };
        let rows = self.bounded("reading known series", query).await?;
        Ok(rows.into_iter().collect())
    }
}
