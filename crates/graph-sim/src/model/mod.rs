//! Tenant state: users, calendars, events and series, and how they expand into the instances
//! a calendarView shows.

mod event;

use event::SINGLE_PREFIX;

pub use event::{
    Attendee, Exception, Instance, InstanceKind, Props, Render, StoredEvent, graph_date_time,
    graph_instant, occurrence_id, parse_occurrence_id,
};

use crate::clock::Clock;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

/// A half-open time window `[start, end)` as given by `startDateTime`/`endDateTime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// Inclusive start.
    pub start: DateTime<Utc>,
    /// Exclusive end.
    pub end: DateTime<Utc>,
}

impl Window {
    /// calendarView semantics: an instance is in the window when it overlaps it; a zero-length
    /// instance counts when it starts inside.
    pub fn overlaps(&self, start: NaiveDateTime, end: NaiveDateTime) -> bool {
        let (ws, we) = (self.start.naive_utc(), self.end.naive_utc());
        if start == end {
            start >= ws && start < we
        } else {
            start < we && end > ws
        }
    }
}

/// A calendar of a mailbox and the events in it.
#[derive(Clone, Debug)]
pub struct Calendar {
    /// Graph id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The mailbox's default calendar (`/users/{u}/calendarView`).
    pub is_default: bool,
    /// Events by id.
    pub events: BTreeMap<String, StoredEvent>,
    /// Bumped on every change in this calendar; a delta token remembers the value it saw.
    pub seq: u64,
    /// `(seq, event id)` for every change, so a round can tell which events moved.
    pub change_log: Vec<(u64, String)>,
    /// Deleted: no longer listed or reachable by its id. (Kept in place, so the indexes of
    /// the others, which delta tokens are bound to, do not move.)
    pub deleted: bool,
}

impl Calendar {
    /// The instances of the calendarView over `window`, ordered by start.
    pub fn instances<'a>(&'a self, window: &Window) -> Vec<Instance<'a>> {
        let mut out = Vec::new();
        for ev in self.events.values() {
            ev.instances_in(window, &mut out);
        }
        out
    }

    /// Records a change to `event_id` in the change log.
    pub fn touch(&mut self, event_id: &str) {
        self.seq += 1;
        self.change_log.push((self.seq, event_id.to_owned()));
    }

    /// Event ids changed after `seq`, oldest first, without repeats; `None` when the log no
    /// longer reaches back that far.
    pub fn changed_since(&self, seq: u64) -> Option<Vec<&str>> {
        let first = self.change_log.first().map_or(self.seq + 1, |(s, _)| *s);
        if seq + 1 < first && seq < self.seq {
            return None;
        }
        let from = self.change_log.partition_point(|(s, _)| *s <= seq);
        let mut seen = BTreeSet::new();
        Some(
            self.change_log[from..]
                .iter()
                .filter(|(_, id)| seen.insert(id.as_str()))
                .map(|(_, id)| id.as_str())
                .collect(),
        )
    }
}

/// A mailbox.
#[derive(Clone, Debug)]
pub struct User {
    /// Object id (a GUID).
    pub id: String,
    /// User principal name.
    pub upn: String,
    /// Display name.
    pub display_name: String,
    /// The first calendar is the default one.
    pub calendars: Vec<Calendar>,
    /// Directory properties `/users` filters on.
    pub directory: Directory,
}

/// What kind of mailbox a directory user has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailboxKind {
    /// A person's mailbox.
    #[default]
    User,
    /// A room (listed by `/places/microsoft.graph.room`; its account is disabled, as Exchange
    /// creates room accounts).
    Room,
    /// No Exchange Online mailbox (unlicensed, a guest): no mail address in the directory,
    /// and every calendar request answers 404 `MailboxNotEnabledForRESTAPI` (notes §errors,
    /// docs#8520).
    None,
    /// A mailbox hosted on-premises (or soft-deleted): the directory gives it a mail address,
    /// yet every calendar request answers 404 `MailboxNotEnabledForRESTAPI`.
    OnPremises,
}

impl MailboxKind {
    /// Whether Graph serves this mailbox's calendars.
    pub fn serves_calendars(self) -> bool {
        matches!(self, MailboxKind::User | MailboxKind::Room)
    }
}

/// A user's directory properties (the ones `/users` can filter on here).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Directory {
    /// `department`.
    pub department: Option<String>,
    /// `accountEnabled`.
    pub account_enabled: bool,
    /// What mailbox the user has.
    pub mailbox: MailboxKind,
    /// Deleted from the directory: no longer listed, its mailbox gone.
    pub deleted: bool,
}

/// A security or Microsoft 365 group: users and nested groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Object id.
    pub id: String,
    /// Display name.
    pub display_name: String,
    /// Direct members: user indexes.
    pub users: Vec<usize>,
    /// Direct members: nested groups' indexes.
    pub groups: Vec<usize>,
}

impl User {
    /// The index of the calendar with Graph id `id`.
    pub fn calendar_index(&self, id: &str) -> Option<usize> {
        self.calendars.iter().position(|c| c.id == id && !c.deleted)
    }

    /// Where an event (single, master, or an occurrence's master) lives: calendar index,
    /// master id and, for an occurrence, its original date. An occurrence id made for another
    /// time of day than the series' current one names nothing (the series was retimed).
    pub fn locate(&self, id: &str) -> Option<(usize, String, Option<NaiveDate>)> {
        let (master, original) = match parse_occurrence_id(id) {
            Some((m, s)) => (m, Some(s)),
            None => (id.to_owned(), None),
        };
        let ci = self
            .calendars
            .iter()
            .position(|c| c.events.contains_key(&master))?;
        if let Some(s) = original {
            if self.calendars[ci].events[&master].props.start.time() != s.time() {
                return None;
            }
        }
        Some((ci, master, original.map(|s| s.date())))
    }
}

/// Deterministic ids, change keys and iCalUIds from the simulator seed.
#[derive(Debug)]
pub struct IdGen {
    rng: StdRng,
}

impl IdGen {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        IdGen {
            rng: StdRng::seed_from_u64(seed ^ 0x6772_6170_6873_696d),
        }
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        self.rng.fill(&mut b[..]);
        b
    }

    /// A new event id, shaped like Outlook's.
    pub fn event_id(&mut self) -> String {
        format!(
            "{SINGLE_PREFIX}{}=",
            URL_SAFE_NO_PAD.encode(self.bytes::<24>())
        )
    }

    /// A new `changeKey`.
    pub fn change_key(&mut self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.bytes::<15>())
    }

    /// A new `iCalUId`.
    pub fn ical_uid(&mut self) -> String {
        let hex: String = self
            .bytes::<16>()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        format!("040000008200E00074C5B7101A82E00800000000{hex}")
    }

    /// A new GUID.
    pub fn guid(&mut self) -> String {
        let b = self.bytes::<16>();
        let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// The seeded random generator, for callers that need more randomness.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

/// All users of the simulated tenant.
#[derive(Debug)]
pub struct Tenant {
    /// The tenant's mailboxes.
    pub users: Vec<User>,
    /// The tenant's groups.
    pub groups: Vec<Group>,
    by_key: HashMap<String, usize>,
    /// Where ids, change keys and uids come from.
    pub ids: IdGen,
    /// The simulator's clock.
    pub clock: Clock,
    /// Every write to an event since the change-notification machinery last drained it;
    /// `None` while nothing subscribes (so nothing piles up).
    pub journal: Option<Vec<Change>>,
}

/// What a change notification reports of a write (`changeType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// A new event.
    Created,
    /// A changed event; also a series master whose occurrence was edited, cancelled or
    /// deleted (Outlook reports those on the master: docs#5520).
    Updated,
    /// A removed event or series.
    Deleted,
}

impl ChangeKind {
    /// Graph's spelling in `changeType`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Updated => "updated",
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// One write to an event, as the change-notification machinery sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The mailbox.
    pub user: usize,
    /// The calendar's index in the mailbox.
    pub calendar: usize,
    /// The event (a series' master for anything done to its occurrences).
    pub event_id: String,
    /// What happened to it.
    pub kind: ChangeKind,
}

impl Tenant {
    /// Records a write for change notifications, if anything subscribes.
    pub fn journal_change(
        &mut self,
        user: usize,
        calendar: usize,
        event_id: &str,
        kind: ChangeKind,
    ) {
        if let Some(j) = &mut self.journal {
            j.push(Change {
                user,
                calendar,
                event_id: event_id.to_owned(),
                kind,
            });
        }
    }

    /// An empty tenant.
    pub fn new(seed: u64, clock: Clock) -> Self {
        Tenant {
            users: Vec::new(),
            groups: Vec::new(),
            by_key: HashMap::new(),
            ids: IdGen::new(seed),
            clock,
            journal: None,
        }
    }

    /// Adds a user with a default calendar named "Calendar"; returns its index.
    pub fn add_user(&mut self, upn: &str, id: Option<String>, display_name: &str) -> usize {
        let id = id.unwrap_or_else(|| self.ids.guid());
        let cal_id = self.calendar_id();
        let idx = self.users.len();
        self.by_key.insert(id.to_lowercase(), idx);
        self.by_key.insert(upn.to_lowercase(), idx);
        self.users.push(User {
            id,
            upn: upn.to_owned(),
            display_name: display_name.to_owned(),
            calendars: vec![Calendar {
                id: cal_id,
                name: "Calendar".into(),
                is_default: true,
                events: BTreeMap::new(),
                seq: 0,
                change_log: Vec::new(),
                deleted: false,
            }],
            directory: Directory {
                account_enabled: true,
                ..Directory::default()
            },
        });
        idx
    }

    /// Adds a directory user of `kind` in `department`; returns its index.
    pub fn add_directory_user(
        &mut self,
        upn: &str,
        display_name: &str,
        kind: MailboxKind,
        department: Option<&str>,
    ) -> usize {
        let u = self.add_user(upn, None, display_name);
        let d = &mut self.users[u].directory;
        d.mailbox = kind;
        d.department = department.map(str::to_owned);
        d.account_enabled = kind != MailboxKind::Room;
        u
    }

    /// Deletes a user from the directory: no longer listed, and its mailbox unknown. Its
    /// index stays (nothing else moves); its names are freed.
    pub fn delete_user(&mut self, user: usize) -> bool {
        let Some(u) = self.users.get_mut(user) else {
            return false;
        };
        if u.directory.deleted {
            return false;
        }
        u.directory.deleted = true;
        let (id, upn) = (u.id.to_lowercase(), u.upn.to_lowercase());
        self.by_key.remove(&id);
        self.by_key.remove(&upn);
        for g in &mut self.groups {
            g.users.retain(|m| *m != user);
        }
        true
    }

    /// Adds a group with these direct members; returns its index.
    pub fn add_group(
        &mut self,
        display_name: &str,
        users: Vec<usize>,
        groups: Vec<usize>,
    ) -> usize {
        let id = self.ids.guid();
        self.groups.push(Group {
            id,
            display_name: display_name.to_owned(),
            users,
            groups,
        });
        self.groups.len() - 1
    }

    /// The group with object id `id`.
    pub fn group_index(&self, id: &str) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| g.id.eq_ignore_ascii_case(id))
    }

    /// Every user in group `g` or in a group nested in it, each once, in a stable order.
    pub fn transitive_users(&self, g: usize) -> Vec<usize> {
        let mut seen_groups = vec![false; self.groups.len()];
        let mut users = std::collections::BTreeSet::new();
        let mut stack = vec![g];
        while let Some(g) = stack.pop() {
            if std::mem::replace(&mut seen_groups[g], true) {
                continue;
            }
            users.extend(self.groups[g].users.iter().copied());
            stack.extend(
                self.groups[g]
                    .groups
                    .iter()
                    .copied()
                    .filter(|n| *n < self.groups.len()),
            );
        }
        users
            .into_iter()
            .filter(|u| !self.users[*u].directory.deleted)
            .collect()
    }

    /// Renames calendar `id` of `user`.
    pub fn rename_calendar(&mut self, user: usize, id: &str, name: &str) -> bool {
        match self.users.get_mut(user).and_then(|u| {
            let ci = u.calendar_index(id)?;
            u.calendars.get_mut(ci)
        }) {
            Some(c) => {
                c.name = name.to_owned();
                true
            }
            None => false,
        }
    }

    /// Deletes calendar `id` of `user` (never the default one).
    pub fn delete_calendar(&mut self, user: usize, id: &str) -> bool {
        let Some(u) = self.users.get_mut(user) else {
            return false;
        };
        match u.calendar_index(id) {
            Some(ci) if !u.calendars[ci].is_default => {
                let c = &mut u.calendars[ci];
                c.deleted = true;
                c.events.clear();
                true
            }
            _ => false,
        }
    }

    /// Adds a calendar named `name` to the user at index `user`; returns its id.
    pub fn add_calendar(&mut self, user: usize, name: &str) -> String {
        let id = self.calendar_id();
        if let Some(u) = self.users.get_mut(user) {
            u.calendars.push(Calendar {
                id: id.clone(),
                name: name.to_owned(),
                is_default: false,
                events: BTreeMap::new(),
                seq: 0,
                change_log: Vec::new(),
                deleted: false,
            });
        }
        id
    }

    fn calendar_id(&mut self) -> String {
        format!(
            "AAMkAGca{}=",
            URL_SAFE_NO_PAD.encode(self.ids.bytes::<18>())
        )
    }

    /// A user by id or UPN, case-insensitively, as Graph resolves `/users/{id | userPrincipalName}`.
    pub fn user_index(&self, key: &str) -> Option<usize> {
        self.by_key.get(&key.to_lowercase()).copied()
    }

    /// The simulator's current instant.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn window_overlap_is_half_open() {
        let w = Window {
            start: Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2024, 1, 2, 0, 0, 0).unwrap(),
        };
        let t = |h: u32, d: u32| {
            NaiveDate::from_ymd_opt(2024, 1, d)
                .unwrap()
                .and_hms_opt(h, 0, 0)
                .unwrap()
        };
        assert!(w.overlaps(t(23, 31 - 30), t(1, 2)));
        assert!(!w.overlaps(t(0, 2), t(1, 2)));
        assert!(w.overlaps(t(0, 1), t(0, 1)));
        assert!(!w.overlaps(t(0, 2), t(0, 2)));
    }
}
