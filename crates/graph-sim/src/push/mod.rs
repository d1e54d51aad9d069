//! Change notifications as Graph serves them for Outlook events (graph-delta-notes.md §5;
//! Microsoft Learn: "Change notifications for Outlook resources", "Create subscription",
//! "Receive change notifications through webhooks", "Reduce missing subscriptions and change
//! notifications"): subscriptions and their rules, which notification a write produces and when
//! it is due, retries, the slow-endpoint rules and lifecycle events. No HTTP here: the simulator
//! runs the validation handshake and the deliveries (`sim::push`).

mod rules;

use rules::invalid;
pub use rules::*;

use crate::error::GraphError;
use crate::model::Tenant;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// How notifications are delivered; every default is Graph's documented or reported behaviour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushSettings {
    /// Least time from a write to its notification's delivery, in ms.
    pub delay_ms: u64,
    /// A random share of this is added to each notification's delay, in ms (Graph gives no
    /// delivery time; notifications arrive seconds after the change).
    pub jitter_ms: u64,
    /// Notifications per POST. Graph batches several, of several subscriptions, in one
    /// `value` array (Learn, "Receive change notifications through webhooks").
    pub max_batch: usize,
    /// Share of notifications silently never sent (0.0–1.0), drawn from the seeded generator:
    /// Graph does not promise delivery, and a client must converge without them.
    pub lose_fraction: f64,
    /// Wait before the first redelivery of a failed POST (non-2xx, or no answer), doubled each
    /// time up to `retry_max_ms`.
    pub retry_first_ms: u64,
    /// The longest wait between redeliveries.
    pub retry_max_ms: u64,
    /// A notification failing for this long is dropped (Graph: retries for up to 4 hours).
    pub give_up_after_ms: u64,
    /// An answer slower than this counts as slow (Graph: about 3 seconds).
    pub slow_after_ms: u64,
    /// Notifications a URL receives before its share of slow answers is judged (Graph: 100).
    pub judge_after: u64,
    /// From this share of slow answers, deliveries to the URL are held `slow_delay_ms`
    /// (Graph: 10% slow, 10 minutes).
    pub delay_share: f64,
    /// How long a slow URL's deliveries are held.
    pub slow_delay_ms: u64,
    /// From this share of slow answers, notifications to the URL are dropped (Graph: 15%).
    pub drop_share: f64,
    /// How long the validation handshake may take (Graph: 10 seconds).
    pub validation_timeout_ms: u64,
    /// The longest subscription lifetime, in minutes (Outlook events without resource data:
    /// 10,080; older docs said 4,230). A longer request is refused.
    pub max_lifetime_minutes: i64,
    /// A shorter requested lifetime is raised to this (Graph: 45 minutes).
    pub min_lifetime_minutes: i64,
    /// Active subscriptions per mailbox, across apps (Outlook: 1,000).
    pub max_per_mailbox: usize,
    /// Accept `http://` notification URLs on loopback addresses (Graph requires HTTPS; tests and
    /// the demo need no certificates).
    pub allow_http_loopback: bool,
    /// Accept `http://` notification URLs to any host: only for a private test rig where the
    /// receiver is another container (the compose demo). Graph never does.
    pub allow_http_anywhere: bool,
    /// `/users/{id}/events` notifies for the default calendar only, as production does
    /// (docs-contrib#51: `me/events` covers the default calendar); `false`: every calendar of
    /// the mailbox, as the resource's name suggests.
    pub user_events_default_calendar_only: bool,
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            delay_ms: 500,
            jitter_ms: 2500,
            max_batch: 50,
            lose_fraction: 0.0,
            retry_first_ms: 1_000,
            retry_max_ms: 5 * 60_000,
            give_up_after_ms: 4 * 3_600_000,
            slow_after_ms: 3_000,
            judge_after: 100,
            delay_share: 0.10,
            slow_delay_ms: 10 * 60_000,
            drop_share: 0.15,
            validation_timeout_ms: 10_000,
            max_lifetime_minutes: 10_080,
            min_lifetime_minutes: 45,
            max_per_mailbox: 1_000,
            allow_http_loopback: true,
            allow_http_anywhere: false,
            user_events_default_calendar_only: true,
        }
    }
}

/// A notification waiting to be delivered (or redelivered).
#[derive(Clone, Debug)]
pub struct Pending {
    /// The URL it goes to.
    pub url: String,
    /// The subscription it is for.
    pub subscription: String,
    /// One item of the `value` array.
    pub item: Value,
    /// When it may go.
    pub due: Instant,
    /// Failed deliveries so far.
    pub attempts: u32,
    /// When it was first due (retries stop `give_up_after_ms` later).
    pub first_due: Instant,
}

/// Counters for tests and the admin API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PushStats {
    /// Subscriptions created.
    pub created: u64,
    /// Renewals accepted.
    pub renewed: u64,
    /// Subscriptions deleted by their app.
    pub deleted: u64,
    /// Subscriptions that reached their expiry.
    pub expired: u64,
    /// Creations refused because the handshake failed or timed out.
    pub validation_failures: u64,
    /// Notification items delivered (a 2xx answer).
    pub delivered: u64,
    /// POSTs that failed (to be retried).
    pub failed_posts: u64,
    /// Items silently lost (`lose_fraction`).
    pub lost: u64,
    /// Items dropped: retried past `give_up_after_ms`, held back for reauthorization, or sent
    /// to an endpoint slow enough to be dropped.
    pub dropped: u64,
    /// Lifecycle items delivered.
    pub lifecycle_delivered: u64,
    /// POSTs that took longer than `slow_after_ms`.
    pub slow_posts: u64,
}

/// What a notification URL's answers looked like.
#[derive(Clone, Debug, Default)]
struct Endpoint {
    answered: u64,
    slow: u64,
    held_until: Option<Instant>,
}

/// Every subscription of the tenant and the notifications on their way.
#[derive(Debug, Default)]
pub struct Push {
    /// How notifications are delivered.
    pub settings: PushSettings,
    /// Active subscriptions by id.
    pub subscriptions: BTreeMap<String, Subscription>,
    /// Mailboxes that refuse subscriptions (hybrid or on-premises backends: Graph answers
    /// `ExtensionError` "... is currently on backend 'Unknown'", msgraph-sdk-javascript#1880).
    pub refusing: BTreeSet<usize>,
    /// Notifications on their way.
    pub pending: Vec<Pending>,
    /// Counters.
    pub stats: PushStats,
    endpoints: HashMap<String, Endpoint>,
    /// How long the client's receiver took to answer each POST, in ms (the last 100,000).
    answers_ms: std::collections::VecDeque<f64>,
}

impl Push {
    /// No subscriptions yet, delivering as `settings` say.
    pub fn new(settings: PushSettings) -> Self {
        Push {
            settings,
            ..Default::default()
        }
    }

    /// The expiry a requested one becomes: refused past the maximum, raised to the minimum.
    pub fn expiry(&self, raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, GraphError> {
        let at = DateTime::parse_from_rfc3339(raw)
            .map_err(|_| invalid("The value of parameter 'ExpirationDateTime' is invalid."))?
            .with_timezone(&Utc);
        if at <= now {
            return Err(invalid("Subscription expiration must be in the future."));
        }
        let max = self.settings.max_lifetime_minutes;
        if at > now + TimeDelta::minutes(max) {
            return Err(invalid(format!(
                "Subscription expiration can only be {max} minutes in the future."
            )));
        }
        Ok(at.max(now + TimeDelta::minutes(self.settings.min_lifetime_minutes)))
    }

    /// Active subscriptions on `user`'s mailbox.
    pub fn on_mailbox(&self, user: usize) -> usize {
        self.subscriptions
            .values()
            .filter(|s| s.user == user)
            .count()
    }

    /// Starts (or stops) recording writes as the subscriptions come and go.
    pub fn sync_journal(&self, tenant: &mut Tenant) {
        match (self.subscriptions.is_empty(), tenant.journal.is_some()) {
            (false, false) => tenant.journal = Some(Vec::new()),
            (true, true) => tenant.journal = None,
            _ => {}
        }
    }

    /// Removes the subscriptions whose expiry passed; answers how many.
    pub fn expire(&mut self, now: DateTime<Utc>) -> usize {
        let before = self.subscriptions.len();
        self.subscriptions.retain(|_, s| s.expiration > now);
        let gone = before - self.subscriptions.len();
        self.stats.expired += gone as u64;
        gone
    }

    /// Turns the writes recorded since the last call into notifications, each due after the
    /// configured delay and jitter; a share may be lost on purpose.
    pub fn ingest(&mut self, tenant: &mut Tenant, rng: &mut StdRng, now: Instant) {
        let Some(journal) = tenant.journal.as_mut() else {
            return;
        };
        let changes = std::mem::take(journal);
        let tenant_id = "sim-tenant";
        let default_only = self.settings.user_events_default_calendar_only;
        for c in &changes {
            let Some(user) = tenant.users.get(c.user) else {
                continue;
            };
            let etag = user
                .calendars
                .get(c.calendar)
                .and_then(|cal| cal.events.get(&c.event_id))
                .map(|e| format!("W/\"{}\"", e.props.change_key));
            for s in self.subscriptions.values() {
                if !s.covers(c, default_only) {
                    continue;
                }
                if self.settings.lose_fraction > 0.0
                    && rng.r#gen::<f64>() < self.settings.lose_fraction
                {
                    self.stats.lost += 1;
                    continue;
                }
                // Graph names the mailbox by id and the event with these casings, whatever
                // the subscription's resource said (Learn's notification example).
                let resource = format!("Users/{}/Events/{}", user.id, c.event_id);
                let item = json!({
                    "subscriptionId": s.id,
                    "subscriptionExpirationDateTime": s.expiration.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "changeType": c.kind.as_str(),
                    "resource": resource,
                    "resourceData": {
                        "@odata.type": "#Microsoft.Graph.Event",
                        "@odata.id": resource,
                        "@odata.etag": etag,
                        "id": c.event_id,
                    },
                    "clientState": s.client_state,
                    "tenantId": tenant_id,
                });
                let jitter = if self.settings.jitter_ms > 0 {
                    rng.gen_range(0..=self.settings.jitter_ms)
                } else {
                    0
                };
                let due = now + Duration::from_millis(self.settings.delay_ms + jitter);
                self.pending.push(Pending {
                    url: s.notification_url.clone(),
                    subscription: s.id.clone(),
                    item,
                    due,
                    attempts: 0,
                    first_due: due,
                });
            }
        }
    }

    /// A lifecycle event for subscription `id`, queued for its lifecycle URL (due now). A
    /// `subscriptionRemoved` also removes the subscription; a `reauthorizationRequired` holds
    /// its notifications back until it is reauthorized or renewed. `false`: no such
    /// subscription.
    pub fn lifecycle(&mut self, id: &str, event: LifecycleEvent, now: Instant) -> bool {
        let Some(s) = self.subscriptions.get_mut(id) else {
            return false;
        };
        let item = json!({
            "subscriptionId": s.id,
            "subscriptionExpirationDateTime": s.expiration.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "tenantId": "sim-tenant",
            "clientState": s.client_state,
            "lifecycleEvent": event.as_str(),
        });
        let url = s.lifecycle_url.clone();
        match event {
            LifecycleEvent::ReauthorizationRequired => s.needs_reauthorization = true,
            LifecycleEvent::SubscriptionRemoved => {
                self.subscriptions.remove(id);
            }
            LifecycleEvent::Missed => {}
        }
        if let Some(url) = url {
            self.pending.push(Pending {
                url,
                subscription: id.to_owned(),
                item,
                due: now,
                attempts: 0,
                first_due: now,
            });
        }
        true
    }

    /// The notifications due now, grouped into POSTs by URL (at most `max_batch` each). Held
    /// back: a slow endpoint's (until its hold ends) and a subscription's that awaits
    /// reauthorization (dropped).
    pub fn take_due(&mut self, now: Instant) -> Vec<(String, Vec<Pending>)> {
        let mut due: Vec<Pending> = Vec::new();
        let mut keep = Vec::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            let held = self
                .endpoints
                .get(&p.url)
                .and_then(|e| e.held_until)
                .is_some_and(|t| now < t);
            if p.due > now || held {
                keep.push(p);
                continue;
            }
            let is_lifecycle = p.item.get("lifecycleEvent").is_some();
            let awaiting = !is_lifecycle
                && self
                    .subscriptions
                    .get(&p.subscription)
                    .is_some_and(|s| s.needs_reauthorization);
            if awaiting {
                self.stats.dropped += 1;
                continue;
            }
            due.push(p);
        }
        self.pending = keep;
        let mut by_url: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
        for p in due {
            by_url.entry(p.url.clone()).or_default().push(p);
        }
        let max = self.settings.max_batch.max(1);
        let mut out = Vec::new();
        for (url, items) in by_url {
            let mut items = items.into_iter().peekable();
            while items.peek().is_some() {
                let batch: Vec<Pending> = items.by_ref().take(max).collect();
                out.push((url.clone(), batch));
            }
        }
        out
    }

    /// How a POST of `batch` to `url` went: `Some(elapsed)` for a 2xx answer, `None` for
    /// anything else (redelivered with backoff, dropped past `give_up_after_ms`).
    pub fn delivered(
        &mut self,
        url: &str,
        batch: Vec<Pending>,
        answered_in: Option<Duration>,
        now: Instant,
    ) {
        let s = self.settings.clone();
        let endpoint = self.endpoints.entry(url.to_owned()).or_default();
        let Some(took) = answered_in else {
            self.stats.failed_posts += 1;
            for mut p in batch {
                p.attempts += 1;
                let wait = s
                    .retry_first_ms
                    .saturating_mul(1u64 << p.attempts.saturating_sub(1).min(20))
                    .min(s.retry_max_ms.max(s.retry_first_ms));
                p.due = now + Duration::from_millis(wait);
                if p.due.duration_since(p.first_due) > Duration::from_millis(s.give_up_after_ms) {
                    self.stats.dropped += 1;
                } else {
                    self.pending.push(p);
                }
            }
            return;
        };
        if self.answers_ms.len() >= 100_000 {
            self.answers_ms.pop_front();
        }
        self.answers_ms.push_back(took.as_secs_f64() * 1e3);
        let slow = took > Duration::from_millis(s.slow_after_ms);
        if slow {
            self.stats.slow_posts += 1;
        }
        let n = batch.len() as u64;
        endpoint.answered += n;
        if slow {
            endpoint.slow += n;
        }
        let share = endpoint.slow as f64 / endpoint.answered.max(1) as f64;
        let judged = endpoint.answered >= s.judge_after;
        if judged && share >= s.drop_share {
            // Graph drops notifications to endpoints this slow: what is still queued for it
            // goes too.
            let before = self.pending.len();
            self.pending.retain(|p| p.url != url);
            self.stats.dropped += (before - self.pending.len()) as u64;
        } else if judged && share >= s.delay_share {
            endpoint.held_until = Some(now + Duration::from_millis(s.slow_delay_ms));
        }
        for p in batch {
            if p.item.get("lifecycleEvent").is_some() {
                self.stats.lifecycle_delivered += 1;
            } else {
                self.stats.delivered += 1;
            }
        }
    }

    /// The receiver's answer times (ms) at these quantiles (0.0–1.0), over the last 100,000
    /// POSTs it answered 2xx; empty before any.
    pub fn answer_quantiles(&self, qs: &[f64]) -> Vec<f64> {
        let mut v: Vec<f64> = self.answers_ms.iter().copied().collect();
        if v.is_empty() {
            return Vec::new();
        }
        v.sort_by(f64::total_cmp);
        qs.iter()
            .map(|q| v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize])
            .collect()
    }

    /// Whether an endpoint is slow enough that notifications to it are dropped.
    pub fn dropping(&self, url: &str) -> bool {
        self.endpoints.get(url).is_some_and(|e| {
            e.answered >= self.settings.judge_after
                && e.slow as f64 / e.answered.max(1) as f64 >= self.settings.drop_share
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::model::ChangeKind;
    use rand::SeedableRng;

    fn sub(id: &str, user: usize, calendar: Option<usize>) -> Subscription {
        Subscription {
            id: id.into(),
            resource: "users/u/events".into(),
            user,
            calendar,
            change_types: vec![
                ChangeKind::Created,
                ChangeKind::Updated,
                ChangeKind::Deleted,
            ],
            notification_url: "http://127.0.0.1:1/n".into(),
            lifecycle_url: Some("http://127.0.0.1:1/l".into()),
            client_state: Some("s".into()),
            expiration: Utc::now() + TimeDelta::hours(1),
            application_id: "app".into(),
            needs_reauthorization: false,
        }
    }

    fn tenant() -> Tenant {
        let mut t = Tenant::new(1, Clock::System);
        t.add_user("a@x", None, "A");
        t.journal = Some(Vec::new());
        t
    }

    #[test]
    fn calendar_view_and_single_events_cannot_be_subscribed_docs_13548() {
        assert!(parse_resource("/users/u/calendarView").is_err());
        assert!(parse_resource("users/u/events/AAMk").is_err());
        let e = parse_resource("/users/u/calendarView").unwrap_err();
        assert!(e.message.contains("'Resource' is not supported"), "{e:?}");
        assert_eq!(
            parse_resource("Users/U/Calendars/C1/Events").unwrap(),
            Watched::CalendarEvents("U".into(), Some("C1".into()))
        );
        assert_eq!(parse_resource("/me/events").unwrap(), Watched::MyEvents);
        assert_eq!(
            parse_resource("me/calendar/events").unwrap(),
            Watched::MyCalendarEvents(None)
        );
        assert_eq!(
            parse_resource("/me/calendars/C%2F1/events").unwrap(),
            Watched::MyCalendarEvents(Some("C/1".into()))
        );
    }

    #[test]
    fn lifetimes_follow_the_outlook_limits_notes_5() {
        let p = Push::default();
        let now = Utc::now();
        let iso = |t: DateTime<Utc>| t.to_rfc3339();
        // Shorter than 45 minutes is raised to 45.
        let at = p.expiry(&iso(now + TimeDelta::minutes(5)), now).unwrap();
        assert_eq!(at, now + TimeDelta::minutes(45));
        // Up to 10,080 minutes is accepted as asked; beyond is refused.
        let week = now + TimeDelta::minutes(10_080);
        assert_eq!(p.expiry(&iso(week), now).unwrap(), week);
        let e = p
            .expiry(&iso(week + TimeDelta::minutes(1)), now)
            .unwrap_err();
        assert!(e.message.contains("10080 minutes"), "{e:?}");
        assert!(p.expiry(&iso(now - TimeDelta::minutes(1)), now).is_err());
    }

    #[test]
    fn http_urls_are_refused_except_on_loopback_when_allowed() {
        let n = "notificationUrl";
        assert!(check_url("https://hooks.example.com/n", n, false, false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/n", n, true, false).is_ok());
        assert!(check_url("http://127.0.0.1:8080/n", n, false, false).is_err());
        assert!(check_url("http://hooks.example.com/n", n, true, false).is_err());
        assert!(
            check_url("http://calsync:9188/n", n, true, true).is_ok(),
            "a compose rig"
        );
    }

    #[test]
    fn a_write_notifies_the_subscriptions_covering_it_and_user_events_mean_the_default_calendar() {
        let mut t = tenant();
        let other = t.add_calendar(0, "Other");
        let other = t.users[0]
            .calendars
            .iter()
            .position(|c| c.id == other)
            .unwrap();
        let mut p = Push::default();
        p.subscriptions
            .insert("mailbox".into(), sub("mailbox", 0, None));
        p.subscriptions
            .insert("other".into(), sub("other", 0, Some(other)));
        t.journal_change(0, 0, "e1", ChangeKind::Created);
        t.journal_change(0, other, "e2", ChangeKind::Updated);
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        p.ingest(&mut t, &mut rng, now);
        let mut got: Vec<(String, String)> = p
            .pending
            .iter()
            .map(|x| {
                (
                    x.subscription.clone(),
                    x.item["resourceData"]["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        got.sort();
        // `users/{id}/events` covers the default calendar only (docs-contrib#51).
        assert_eq!(
            got,
            vec![
                ("mailbox".into(), "e1".into()),
                ("other".into(), "e2".into())
            ]
        );
        let item = &p.pending[0].item;
        assert!(item["resource"].as_str().unwrap().starts_with("Users/"));
        assert_eq!(item["clientState"], "s");
        assert!(t.journal.as_ref().unwrap().is_empty(), "drained");
        p.settings.user_events_default_calendar_only = false;
        t.journal_change(0, other, "e3", ChangeKind::Deleted);
        p.pending.clear();
        p.ingest(&mut t, &mut rng, now);
        assert_eq!(p.pending.len(), 2, "the documented reading: every calendar");
    }

    #[test]
    fn failed_posts_are_retried_with_backoff_and_dropped_after_the_retry_span() {
        let mut p = Push::default();
        p.settings.retry_first_ms = 1_000;
        p.settings.give_up_after_ms = 5_000;
        let now = Instant::now();
        let pending = |at: Instant| Pending {
            url: "u".into(),
            subscription: "s".into(),
            item: json!({}),
            due: at,
            attempts: 0,
            first_due: at,
        };
        p.delivered("u", vec![pending(now)], None, now);
        assert_eq!(p.pending[0].due, now + Duration::from_millis(1_000));
        let again = p.pending.pop().unwrap();
        p.delivered("u", vec![again], None, now + Duration::from_millis(1_000));
        assert_eq!(p.pending[0].due, now + Duration::from_millis(3_000));
        // The next wait (4 s) would end past the 5 s span: dropped.
        let third = p.pending.pop().unwrap();
        p.delivered("u", vec![third], None, now + Duration::from_millis(3_000));
        assert!(p.pending.is_empty());
        assert_eq!(p.stats.dropped, 1);
        assert_eq!(p.stats.failed_posts, 3);
    }

    #[test]
    fn slow_endpoints_are_held_at_ten_percent_and_dropped_at_fifteen() {
        let mut p = Push::default();
        p.settings.judge_after = 100;
        let now = Instant::now();
        let one = || Pending {
            url: "u".into(),
            subscription: "s".into(),
            item: json!({}),
            due: now,
            attempts: 0,
            first_due: now,
        };
        for i in 0..100 {
            let took = if i < 11 { 4_000 } else { 10 };
            p.delivered("u", vec![one()], Some(Duration::from_millis(took)), now);
        }
        assert!(!p.dropping("u"));
        p.pending.push(one());
        assert!(p.take_due(now).is_empty(), "held: 11% slow");
        assert_eq!(p.take_due(now + Duration::from_millis(600_001)).len(), 1);
        for _ in 0..10 {
            p.delivered("u", vec![one()], Some(Duration::from_millis(4_000)), now);
        }
        assert!(p.dropping("u"));
    }

    #[test]
    fn a_removed_subscription_is_gone_and_reauthorization_holds_notifications_back() {
        let mut p = Push::default();
        p.subscriptions.insert("a".into(), sub("a", 0, None));
        p.subscriptions.insert("b".into(), sub("b", 0, None));
        let now = Instant::now();
        assert!(p.lifecycle("a", LifecycleEvent::SubscriptionRemoved, now));
        assert!(!p.subscriptions.contains_key("a"));
        assert!(p.lifecycle("b", LifecycleEvent::ReauthorizationRequired, now));
        p.pending.push(Pending {
            url: "http://127.0.0.1:1/n".into(),
            subscription: "b".into(),
            item: json!({"changeType": "updated"}),
            due: now,
            attempts: 0,
            first_due: now,
        });
        let due = p.take_due(now);
        let items: Vec<&Value> = due
            .iter()
            .flat_map(|(_, b)| b.iter().map(|x| &x.item))
            .collect();
        assert_eq!(items.len(), 2, "the two lifecycle events: {items:?}");
        assert!(items.iter().all(|i| i.get("lifecycleEvent").is_some()));
        assert_eq!(p.stats.dropped, 1, "the held notification");
    }
}
