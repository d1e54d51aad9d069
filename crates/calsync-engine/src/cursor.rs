//! The cursor cache: where each tuple stands after its last committed page (link, version, the
//! stamp it was made for), so a round, and above all a no-change replay, need not read it back.
//! Only a hint: the store's `link_version` check refuses anything stale, and a refused commit
//! drops the cursor so the next round starts from the store.

use crate::{Engine, Tuple};
use calsync_store::{LinkKind, LinkStamp, TupleState};

/// A tuple's position as of its last committed page.
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    pub(crate) link: Option<String>,
    pub(crate) kind: Option<LinkKind>,
    /// Hash of the stamp the link was made for.
    pub(crate) stamp: u64,
    pub(crate) version: i64,
    pub(crate) round_is_full: bool,
    pub(crate) last_full_sync_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub(crate) fn stamp_hash(s: &LinkStamp) -> u64 {
    stamp_hash_of(&s.user_id, &s.calendar_id, s.window_start, s.window_end)
}

/// [`stamp_hash`] of `tuple.stamp()`, without building the stamp.
fn tuple_stamp_hash(t: &Tuple) -> u64 {
    stamp_hash_of(&t.user, t.calendar_name(), t.window.start, t.window.end)
}

fn stamp_hash_of(
    user: &str,
    calendar: &str,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (user, calendar, start, end).hash(&mut h);
    h.finish()
}

impl Cursor {
    /// Where the store says the tuple stands, for a round made for `stamp`.
    pub(crate) fn from_state(state: &TupleState, stamp: &LinkStamp) -> Self {
        let (kind, link) = match state.link_for(stamp) {
            Some((k, l)) => (Some(k), Some(l.to_owned())),
            None => (None, None),
        };
        Cursor {
            link,
            kind,
            stamp: stamp_hash(stamp),
            version: state.link_version,
            round_is_full: state.round_is_full,
            last_full_sync_at: state.last_full_sync_at,
        }
    }
}

impl Engine {
    fn cursors(&self) -> std::sync::MutexGuard<'_, crate::FastMap<i64, Cursor>> {
        self.inner.cursors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached cursor of `tuple_id`, if it was made for `stamp`.
    pub(crate) fn cursor(&self, tuple_id: i64, stamp: &LinkStamp) -> Option<Cursor> {
        self.cursors()
            .get(&tuple_id)
            .filter(|c| c.stamp == stamp_hash(stamp))
            .cloned()
    }

    /// Remembers where `tuple_id` stands after a committed page.
    pub(crate) fn keep_cursor(&self, tuple_id: i64, cursor: Cursor) {
        self.cursors().insert(tuple_id, cursor);
    }

    pub(crate) fn drop_cursor(&self, tuple_id: i64) {
        self.cursors().remove(&tuple_id);
    }

    /// The delta link to replay and the version it was saved at, when `tuple`'s last round
    /// ended here with a delta link for its current user, calendar and window, and no full
    /// resync is due: what the quick lane needs.
    pub(crate) fn replayable(&self, tuple: &Tuple) -> Option<(String, i64)> {
        let cursors = self.cursors();
        let c = cursors.get(&tuple.id)?;
        if c.kind != Some(LinkKind::Delta) || c.stamp != tuple_stamp_hash(tuple) {
            return None;
        }
        if self.resync_due(c.last_full_sync_at) {
            return None;
        }
        let link = c.link.clone()?;
        self.graph_for(tuple)
            .link_fits(&link)
            .then_some((link, c.version))
    }

    /// Whether the periodic full resync (`sync.full_resync_every`) is due.
    pub(crate) fn resync_due(
        &self,
        last_full_sync_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> bool {
        self.settings().full_resync_every.is_some_and(|every| {
            last_full_sync_at.is_none_or(|at| {
                chrono::Utc::now()
                    .signed_duration_since(at)
                    .to_std()
                    .unwrap_or_default()
                    >= every
            })
        })
    }

    /// Records the link a quick round committed, as a full round's last page would.
    pub(crate) fn replayed(&self, tuple: &Tuple, link: &str, version: i64) {
        if let Some(c) = self.cursors().get_mut(&tuple.id) {
            c.link = Some(link.to_owned());
            c.kind = Some(LinkKind::Delta);
            c.version = version;
            c.round_is_full = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calsync_graph::{CalendarRef, ViewWindow};
    use std::time::Duration;

    /// The quick lane finds a tuple's cursor by this hash without building its stamp.
    #[test]
    fn a_tuples_stamp_hash_is_its_stamps() {
        let mut t = Tuple {
            id: 1,
            key: "k".into(),
            user: "adele@contoso.onmicrosoft.com".into(),
            account: None,
            calendar: CalendarRef::Default,
            window: ViewWindow {
                start: "2026-01-01T00:00:00Z".parse().unwrap(),
                end: "2027-01-01T00:00:00Z".parse().unwrap(),
            },
            rolling: None,
            interval: Duration::from_secs(300),
            schedule: None,
            mailbox: "adele@contoso.onmicrosoft.com".into(),
        };
        let default = tuple_stamp_hash(&t);
        assert_eq!(default, stamp_hash(&t.stamp()));
        t.calendar = CalendarRef::Id("AAMk".into());
        assert_eq!(tuple_stamp_hash(&t), stamp_hash(&t.stamp()));
        assert_ne!(tuple_stamp_hash(&t), default);
    }
}
