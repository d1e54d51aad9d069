//! Reading the read model (`calendar_events`, `calendar_sync_status`): what `status`, the demo
//! and the tests see.

use crate::Store;
use crate::error::{StoreError, db};
use crate::tuples::TupleStatus;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// One row of `calendar_sync_status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StatusRow {
    /// The tuple's name.
    pub tuple_key: String,
    /// Its mailbox.
    pub user_id: String,
    /// Its calendar.
    pub calendar_id: String,
    /// Its window's start.
    pub window_start: DateTime<Utc>,
    /// Its window's end.
    pub window_end: DateTime<Utc>,
    /// Whether the config still names it (rows of untracked tuples are kept, not synced).
    pub tracked: bool,
    /// `initial` while a full round is under way, else `incremental`.
    pub phase: String,
    /// The sync state.
    pub state: TupleStatus,
    /// When a round last reached its deltaLink.
    pub last_success_at: Option<DateTime<Utc>>,
    /// When a full round last reached its deltaLink.
    pub last_full_sync_at: Option<DateTime<Utc>>,
    /// When a page was last tried.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// The last failure's code (Graph's, or calsync's own).
    pub last_error_code: Option<String>,
    /// Failed attempts since the last success.
    pub consecutive_failures: i32,
    /// Rows in the read model.
    pub event_count: i64,
    /// Rows not whole yet: a time that could not be read, or an occurrence stub whose series
    /// is not stored.
    pub incomplete_count: i64,
}

/// The read-model columns tests and the demo compare with Graph's truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EventSummary {
    /// Graph's event id.
    pub event_id: String,
    /// `singleInstance`, `occurrence` or `exception`.
    pub event_type: Option<String>,
    /// The subject.
    pub subject: Option<String>,
    /// The start instant.
    pub start_at: Option<DateTime<Utc>>,
    /// The end instant.
    pub end_at: Option<DateTime<Utc>>,
    /// Whether the event is all-day.
    pub is_all_day: Option<bool>,
    /// The series an occurrence or exception belongs to.
    pub series_master_id: Option<String>,
    /// An attendee's copy of a meeting its organizer cancelled.
    pub is_cancelled: bool,
    /// An all-day event's first day.
    pub start_date: Option<chrono::NaiveDate>,
    /// The day after an all-day event's last day.
    pub end_date: Option<chrono::NaiveDate>,
    /// The organizer's address.
    pub organizer_email: Option<String>,
    /// Where.
    pub location: Option<String>,
    /// `free`, `busy`, …
    pub show_as: Option<String>,
}

impl Store {
    /// `calendar_sync_status`, one row per tuple.
    pub async fn status(&self) -> Result<Vec<StatusRow>, StoreError> {
        sqlx::query_as("SELECT * FROM calendar_sync_status ORDER BY tuple_key")
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// Event ids of a tuple, sorted (for tests and the demo's check).
    pub async fn event_ids(&self, tuple_key: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT event_id FROM calendar_events WHERE tuple_key = $1 ORDER BY event_id COLLATE \"C\"")
            .bind(tuple_key)
            .fetch_all(&self.pool)
            .await
            .map_err(db)
    }

    /// Ids of the series masters a tuple keeps, sorted.
    pub async fn series_ids(&self, tuple_key: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT s.master_id FROM series s JOIN sync_tuples t ON t.id = s.tuple_id \
             WHERE t.tuple_key = $1 ORDER BY s.master_id COLLATE \"C\"",
        )
        .bind(tuple_key)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// The indexed columns of a tuple's rows as the read model shows them, sorted by id.
    pub async fn event_summaries(&self, tuple_key: &str) -> Result<Vec<EventSummary>, StoreError> {
        sqlx::query_as(
            "SELECT event_id, event_type, subject, start_at, end_at, is_all_day, series_master_id, \
               is_cancelled, start_date, end_date, organizer_email, location, show_as \
             FROM calendar_events WHERE tuple_key = $1 ORDER BY event_id COLLATE \"C\"",
        )
        .bind(tuple_key)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }
}
