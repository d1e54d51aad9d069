//! The page transaction's deleting and showing steps, each one statement (or two) that returns
//! the ids it touched: `@removed` items, occurrences a series no longer lists, the sweep at the
//! end of a full round, and the served-window switch. [`crate::apply`] runs them in order with
//! the upserts of [`crate::upsert`].

use crate::error::{StoreError, db};
use sqlx::{Postgres, Transaction};

/// What a page's transaction touched, by id, step by step: the counts a page reports, and what
/// the change feed writes ([`crate::changes::write_page`]).
#[derive(Debug, Default)]
pub(crate) struct Touched {
    /// Events whose change the upsert wrote to the feed itself (shown, and inserted or
    /// differing from the stored row in more than the round bookkeeping); none with the feed off.
    pub(crate) fed: Vec<String>,
    /// Series masters whose stored row changed: each of their occurrences changes in the view.
    pub(crate) series_changed: Vec<String>,
    /// Rows that left the view, in step order, with what removed them (`delta`, `cancelled`,
    /// `sweep`): deleted rows that were shown (not `pending`).
    pub(crate) gone: Vec<(String, &'static str)>,
    /// Events inserted or changed.
    pub(crate) upserted: Vec<String>,
    /// Events kept as quarantined rows (PostgreSQL refused a value).
    pub(crate) quarantined: Vec<String>,
    /// Events deleted by `@removed` (a master's id takes its instances with it).
    pub(crate) removed: Vec<String>,
    /// Occurrences deleted because their series' `/instances` no longer lists them.
    pub(crate) reconciled: Vec<String>,
    /// Events deleted by the sweep at the end of a full round.
    pub(crate) swept: Vec<String>,
    /// Events the window switch made visible (added while another window was served).
    pub(crate) shown: Vec<String>,
    /// Series masters written.
    pub(crate) series_upserted: Vec<String>,
    /// Series masters deleted (by `@removed` or by the sweep).
    pub(crate) series_removed: Vec<String>,
}

/// Deletes the `@removed` ids: an id may be a series master's, and then the series goes with
/// every instance of it.
pub(crate) async fn remove(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    ids: &[String],
    touched: &mut Touched,
) -> Result<(), StoreError> {
    let events = sqlx::query_as(
        "DELETE FROM events WHERE tuple_id = $1 \
           AND (event_id = ANY($2::text[]) OR series_master_id = ANY($2::text[])) \
         RETURNING event_id, pending",
    )
    .bind(tuple_id)
    .bind(ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    touched
        .removed
        .extend(left(events, "delta", &mut touched.gone));
    let series: Vec<String> = sqlx::query_scalar(
        "DELETE FROM series WHERE tuple_id = $1 AND master_id = ANY($2::text[]) RETURNING master_id",
    )
    .bind(tuple_id)
    .bind(ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    touched.series_removed.extend(series);
    Ok(())
}

/// Deletes the occurrences of `master_id` that Outlook dropped without a word (cancelled,
/// retimed): what the series' `/instances` no longer lists (`live`) and this page did not just
/// write (`written`).
pub(crate) async fn reconcile(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    master_id: &str,
    live: &[String],
    written: &[&str],
    touched: &mut Touched,
) -> Result<(), StoreError> {
    let gone = sqlx::query_as(
        "DELETE FROM events WHERE tuple_id = $1 AND series_master_id = $2 \
           AND NOT (event_id = ANY($3::text[])) AND NOT (event_id = ANY($4::text[])) \
         RETURNING event_id, pending",
    )
    .bind(tuple_id)
    .bind(master_id)
    .bind(live)
    .bind(written)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    touched
        .reconciled
        .extend(left(gone, "cancelled", &mut touched.gone));
    Ok(())
}

/// The full round `full_round` reached its deltaLink: whatever it did not list is gone, and so
/// are series neither listed in it nor holding an instance.
pub(crate) async fn sweep(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    full_round: i64,
    touched: &mut Touched,
) -> Result<(), StoreError> {
    let events = sqlx::query_as(
        "DELETE FROM events WHERE tuple_id = $1 AND seen_round < $2 RETURNING event_id, pending",
    )
    .bind(tuple_id)
    .bind(full_round)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    touched
        .swept
        .extend(left(events, "sweep", &mut touched.gone));
    let series: Vec<String> = sqlx::query_scalar(
        "DELETE FROM series s WHERE s.tuple_id = $1 AND s.seen_round < $2 \
           AND NOT EXISTS (SELECT 1 FROM events e \
                            WHERE e.tuple_id = s.tuple_id AND e.series_master_id = s.master_id) \
         RETURNING s.master_id",
    )
    .bind(tuple_id)
    .bind(full_round)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    touched.series_removed.extend(series);
    Ok(())
}

/// The served-window switch: what this round added while the old window was served (hidden
/// as `pending`) shows now, in the transaction of the sweep of what left.
pub(crate) async fn switch_window(
    tx: &mut Transaction<'_, Postgres>,
    tuple_id: i64,
    touched: &mut Touched,
) -> Result<(), StoreError> {
    let shown: Vec<String> = sqlx::query_scalar(
        "UPDATE events SET pending = false WHERE tuple_id = $1 AND pending RETURNING event_id",
    )
    .bind(tuple_id)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    touched.shown.extend(shown);
    Ok(())
}

/// The ids of deleted rows `(id, pending)`; those that were shown are recorded in `gone` with
/// `cause` (a `pending` row was never in the view: its leaving is no change of it).
fn left(
    deleted: Vec<(String, bool)>,
    cause: &'static str,
    gone: &mut Vec<(String, &'static str)>,
) -> Vec<String> {
    deleted
        .into_iter()
        .map(|(id, pending)| {
            if !pending {
                gone.push((id.clone(), cause));
            }
            id
        })
        .collect()
}
