//! The rules of a subscription as Graph states them: what may be subscribed, with which URLs,
//! for how long, and how a subscription and a lifecycle event look (notes §5; Learn's "Create
//! subscription", docs#13548).

use crate::error::GraphError;
use crate::model::{Change, ChangeKind};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A lifecycle event (Learn, "Reduce missing subscriptions and change notifications").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LifecycleEvent {
    /// Reauthorize (`POST /subscriptions/{id}/reauthorize`) or renew, or notifications stop.
    ReauthorizationRequired,
    /// The subscription is gone: create it again, then catch up with delta.
    SubscriptionRemoved,
    /// Notifications were lost: catch up with delta.
    Missed,
}

impl LifecycleEvent {
    /// Graph's spelling in `lifecycleEvent`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::ReauthorizationRequired => "reauthorizationRequired",
            LifecycleEvent::SubscriptionRemoved => "subscriptionRemoved",
            LifecycleEvent::Missed => "missed",
        }
    }
}

/// An active subscription.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subscription {
    /// Its id (a GUID).
    pub id: String,
    /// The resource as the client wrote it.
    pub resource: String,
    /// The mailbox.
    pub user: usize,
    /// The calendar it covers; `None`: every calendar of the mailbox.
    pub calendar: Option<usize>,
    /// The change types it reports.
    pub change_types: Vec<ChangeKind>,
    /// Where notifications go.
    pub notification_url: String,
    /// Where lifecycle events go (none are sent without it).
    pub lifecycle_url: Option<String>,
    /// Echoed in every notification.
    pub client_state: Option<String>,
    /// When it ends.
    pub expiration: DateTime<Utc>,
    /// The app that created it.
    pub application_id: String,
    /// A `reauthorizationRequired` was sent and not yet answered: its notifications are held
    /// back (Graph stops sending them until the app reauthorizes).
    pub needs_reauthorization: bool,
}

impl Subscription {
    /// As Graph answers it.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.application_id,
            "changeType": self.change_types.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(","),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": self.expiration.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "creatorId": self.application_id,
            "includeResourceData": false,
            "latestSupportedTlsVersion": "v1_2",
            "encryptionCertificate": null,
            "encryptionCertificateId": null,
            "notificationQueryOptions": null,
            "notificationUrlAppId": null,
        })
    }

    pub(super) fn covers(&self, c: &Change, default_only: bool) -> bool {
        self.user == c.user
            && match self.calendar {
                Some(cal) => cal == c.calendar,
                None => !default_only || c.calendar == 0,
            }
            && self.change_types.contains(&c.kind)
    }
}

/// A subscription request's body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRequest {
    /// `created,updated,deleted` or a part of it.
    pub change_type: Option<String>,
    /// Where notifications go.
    pub notification_url: Option<String>,
    /// Where lifecycle events go.
    pub lifecycle_notification_url: Option<String>,
    /// What to watch.
    pub resource: Option<String>,
    /// When it should end.
    pub expiration_date_time: Option<String>,
    /// Echoed in notifications.
    pub client_state: Option<String>,
}

pub(super) fn invalid(message: impl Into<String>) -> GraphError {
    GraphError::new(400, "InvalidRequest", message)
}

/// Whether `url` may receive notifications: HTTPS, or HTTP on loopback when allowed.
pub fn check_url(
    url: &str,
    name: &str,
    allow_http_loopback: bool,
    allow_http_anywhere: bool,
) -> Result<(), GraphError> {
    let parsed = url::Url::parse(url)
        .map_err(|_| invalid(format!("The value of parameter '{name}' is invalid.")))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allow_http_anywhere => Ok(()),
        "http" if allow_http_loopback && is_loopback(&parsed) => Ok(()),
        _ => Err(invalid(format!(
            "Subscription validation request failed. The {name} must be an HTTPS URL."
        ))),
    }
}

fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// What a subscription's resource names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watched {
    /// `me/events` (the caller's own mailbox: delegated tokens only).
    MyEvents,
    /// `me/calendar/events` (`None`) or `me/calendars/{id}/events`: a calendar of the
    /// caller's own mailbox (Microsoft Learn, "subscription resource type": Outlook events
    /// of `me/calendars/{id}/events`).
    MyCalendarEvents(Option<String>),
    /// `users/{key}/events`.
    UserEvents(String),
    /// `users/{key}/calendar/events` (`None`) or `users/{key}/calendars/{id}/events`.
    CalendarEvents(String, Option<String>),
}

/// Reads a subscription's `resource`. `calendarView` and single events cannot be subscribed:
/// Graph refuses them naming the resource (docs#13548).
pub fn parse_resource(resource: &str) -> Result<Watched, GraphError> {
    // Segments as in a path: percent-escapes decoded (a calendar id may hold a `/`).
    let decoded: Vec<String> = resource
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let refused = || {
        invalid(format!(
            "The value '{resource}' of parameter 'Resource' is not supported."
        ))
    };
    match l.as_slice() {
        ["me", "events"] => Ok(Watched::MyEvents),
        ["me", "calendar", "events"] => Ok(Watched::MyCalendarEvents(None)),
        ["me", "calendars", _, "events"] => Ok(Watched::MyCalendarEvents(Some(segs[2].to_owned()))),
        ["users", _, "events"] => Ok(Watched::UserEvents(segs[1].to_owned())),
        ["users", _, "calendar", "events"] => Ok(Watched::CalendarEvents(segs[1].to_owned(), None)),
        ["users", _, "calendars", _, "events"] => Ok(Watched::CalendarEvents(
            segs[1].to_owned(),
            Some(segs[3].to_owned()),
        )),
        _ => Err(refused()),
    }
}

/// The change types a subscription asks for.
pub fn parse_change_types(raw: &str) -> Result<Vec<ChangeKind>, GraphError> {
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim) {
        let kind = match part.to_ascii_lowercase().as_str() {
            "created" => ChangeKind::Created,
            "updated" => ChangeKind::Updated,
            "deleted" => ChangeKind::Deleted,
            _ => {
                return Err(invalid(format!(
                    "The value '{raw}' of parameter 'ChangeType' is invalid."
                )));
            }
        };
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    Ok(out)
}
