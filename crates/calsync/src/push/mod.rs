//! Push (issue 24): Graph's change notifications wake a calendar's round within seconds; the
//! interval poll stays underneath as the backstop. A notification only ever asks for the
//! normal delta round (through the wake path of issue 23, so the replica holding the mailbox
//! runs it wherever Graph delivered), so nothing a notification says, or fails to say, can
//! make the mirror wrong.
//!
//! - **The receiver** (`push.listen`, a listener of its own): `POST {path}/notifications` and
//!   `POST {path}/lifecycle` (the path of `push.notification_url`), nothing else. It answers Graph's validation handshake, checks each
//!   item's subscription id and `clientState` (against a stored hash, in constant time),
//!   makes the wake-up durable (`round_requests`) and answers 202; a database that cannot take
//!   it answers 503 so Graph redelivers.
//! - **The subscriber** (a worker on every replica): keeps one subscription per tracked
//!   (mailbox, calendar) whose mailbox this replica holds — created when a calendar starts,
//!   renewed `renew_before` its end (expiries spread), created again when Graph lost it,
//!   remembered as refused (polled, asked again daily) when the mailbox cannot be subscribed —
//!   and, on the replica holding the `push` role, deletes the subscriptions of calendars no
//!   longer tracked. It tells the schedule worker which calendars are pushed: those poll at
//!   `backstop_interval`.

//!
//! `receiver.rs` is the receiver, `subscriber.rs` the subscriber.

mod receiver;
mod subscriber;

pub use receiver::{MAX_BODY, RECEIVER_CONNECTIONS, receiver, state_hash};
pub use subscriber::{TICK, subscriber};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Who sweeps the subscriptions of untracked calendars (one replica at a time).
pub const ROLE_PUSH: &str = "push";

/// The resource subscribed for (mailbox, calendar): per calendar, by the mailbox's lease key
/// (its object id when known: Graph's guidance, UPNs with an apostrophe fail).
/// Only what would break the path is escaped (`%`, `/`, `?`, `#`): an address keeps its `@`,
/// as in Graph's examples.
pub fn resource(mailbox: &str, calendar_id: &str, through_account: bool) -> String {
    let segment = |s: &str| {
        s.replace('%', "%25")
            .replace('/', "%2F")
            .replace('?', "%3F")
            .replace('#', "%23")
    };
    // A delegated account's own mailbox is `me` (Graph answers `/me` to its token alone).
    let owner = if through_account {
        "/me".to_owned()
    } else {
        format!("/users/{}", segment(mailbox))
    };
    match calendar_id {
        "default" => format!("{owner}/calendar/events"),
        id => format!("{owner}/calendars/{}/events", segment(id)),
    }
}

/// `owned` with each calendar whose subscription is healthy (`pushed`) polling at `backstop`
/// instead of its interval (never more often than before; a cron schedule keeps its fire
/// times).
pub fn at_backstop(
    owned: Vec<Arc<calsync_engine::Tuple>>,
    pushed: &HashSet<(String, String)>,
    backstop: Duration,
) -> Vec<Arc<calsync_engine::Tuple>> {
    if pushed.is_empty() {
        return owned;
    }
    owned
        .into_iter()
        .map(|t| {
            let calendar = match &t.calendar {
                calsync_graph::CalendarRef::Default => "default",
                calsync_graph::CalendarRef::Id(id) => id.as_str(),
            };
            let slower = t.schedule.is_none()
                && t.interval < backstop
                && pushed.contains(&(t.mailbox.clone(), calendar.to_owned()));
            if slower {
                Arc::new(calsync_engine::Tuple {
                    interval: backstop,
                    ..(*t).clone()
                })
            } else {
                t
            }
        })
        .collect()
}
