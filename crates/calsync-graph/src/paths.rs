//! The URLs of a mailbox's calendar: a full round's first delta link, an event, a series'
//! instances; under `/users/{user}` with the app's token, under `/me` for an account's client.

use crate::{CalendarRef, GraphClient, ViewWindow};
use chrono::SecondsFormat;
use url::Url;

impl GraphClient {
    /// The mailbox's path segments: `users/{user}`, or `me` for an account's client (Graph
    /// answers `/me` only to delegated tokens, and an account reads its own mailbox).
    pub(crate) fn push_mailbox(&self, segs: &mut url::PathSegmentsMut<'_>, user: &str) {
        if self.account.is_some() {
            segs.push("me");
        } else {
            segs.push("users").push(user);
        }
    }

    /// The first link of a full round: `{base}/users/{user}/calendarView/delta` (or
    /// `/calendars/{id}/calendarView/delta`) with percent-encoded UTC window bounds.
    pub fn initial_link(&self, user: &str, calendar: &CalendarRef, window: &ViewWindow) -> String {
        let mut url = self.inner.cfg.base_url.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty();
            self.push_mailbox(&mut segs, user);
            if let CalendarRef::Id(id) = calendar {
                segs.push("calendars").push(id);
            }
            segs.push("calendarView").push("delta");
        }
        with_window(&mut url, window);
        url.into()
    }

    /// The calendar-scoped URL of one event: `…/users/{u}/calendar/events/{id}` or
    /// `…/calendars/{c}/events/{id}`. The mailbox-wide `/events/{id}` 404s for events of shared
    /// calendars (OpenWhispr #1835), so reads always name the calendar.
    pub fn event_url(&self, user: &str, calendar: &CalendarRef, id: &str) -> Url {
        let mut url = self.inner.cfg.base_url.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty();
            self.push_mailbox(&mut segs, user);
            match calendar {
                CalendarRef::Default => segs.push("calendar"),
                CalendarRef::Id(c) => segs.push("calendars").push(c),
            };
            segs.push("events").push(id);
        }
        url
    }

    /// The first page of a series' instances in `window`
    /// (`…/events/{id}/instances?startDateTime=&endDateTime=&$select=…`), ids and times only.
    pub fn instances_link(
        &self,
        user: &str,
        calendar: &CalendarRef,
        master_id: &str,
        window: &ViewWindow,
    ) -> String {
        let mut url = self.event_url(user, calendar, master_id);
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.push("instances");
        }
        with_window(&mut url, window);
        url.query_pairs_mut()
            .append_pair("$select", "id,type,seriesMasterId,start,end");
        url.into()
    }
}

/// `startDateTime` and `endDateTime`: the window's bounds as UTC instants to the second.
fn with_window(url: &mut Url, window: &ViewWindow) {
    url.query_pairs_mut()
        .append_pair(
            "startDateTime",
            &window.start.to_rfc3339_opts(SecondsFormat::Secs, true),
        )
        .append_pair(
            "endDateTime",
            &window.end.to_rfc3339_opts(SecondsFormat::Secs, true),
        );
}
