//! Routing: which documented Graph path a request names, and parsing its query and `Prefer`
//! header. Pure functions of the request line.

use crate::delta::DeltaRequest;
use crate::error::GraphError;
use crate::model::Window;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Value, json};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum UserRef {
    Me,
    Key(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum CalRef {
    Default,
    Id(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Token {
        tenant: String,
    },
    /// `/{tenant}/oauth2/v2.0/devicecode`: a device code for a delegated sign-in.
    DeviceCode {
        tenant: String,
    },
    /// A managed identity endpoint: a VM's IMDS (`/metadata/identity/oauth2/token`) or App
    /// Service's (`/msi/token`).
    ManagedIdentity {
        app_service: bool,
    },
    Delta {
        user: UserRef,
        cal: CalRef,
    },
    Events {
        user: UserRef,
        cal: Option<CalRef>,
    },
    Event {
        user: UserRef,
        cal: Option<CalRef>,
        id: String,
    },
    Instances {
        user: UserRef,
        cal: Option<CalRef>,
        id: String,
    },
    Calendars {
        user: UserRef,
    },
    User {
        user: UserRef,
    },
    /// `GET /users`: the directory's users.
    Users,
    /// `GET /places/microsoft.graph.room`: the tenant's rooms.
    Rooms,
    /// `GET /groups/{id}/transitiveMembers/microsoft.graph.user` (or `members/…`: direct only).
    GroupUsers {
        group: String,
        transitive: bool,
    },
    /// `/subscriptions`: create (`POST`) or list (`GET`) change-notification subscriptions.
    Subscriptions,
    /// `/subscriptions/{id}` (get, renew, delete) or `…/reauthorize`.
    Subscription {
        id: String,
        reauthorize: bool,
    },
}

impl Route {
    /// The mailbox a Graph route addresses (the token endpoint addresses none).
    pub(super) fn user(&self) -> Option<&UserRef> {
        match self {
            Route::Delta { user, .. }
            | Route::Events { user, .. }
            | Route::Event { user, .. }
            | Route::Instances { user, .. }
            | Route::Calendars { user }
            | Route::User { user } => Some(user),
            Route::Token { .. }
            | Route::DeviceCode { .. }
            | Route::ManagedIdentity { .. }
            | Route::Users
            | Route::Rooms
            | Route::GroupUsers { .. }
            | Route::Subscriptions
            | Route::Subscription { .. } => None,
        }
    }

    /// A directory read or a subscription: a token is needed, but no mailbox is addressed.
    pub(super) fn is_directory(&self) -> bool {
        matches!(
            self,
            Route::Users
                | Route::Rooms
                | Route::GroupUsers { .. }
                | Route::Subscriptions
                | Route::Subscription { .. }
        )
    }

    /// Whether the route reads or writes a mailbox (a user without one answers 404
    /// `MailboxNotEnabledForRESTAPI`); `/users/{id}` itself is a directory read.
    pub(super) fn needs_mailbox(&self) -> bool {
        !matches!(self, Route::User { .. }) && self.user().is_some()
    }
}

pub(super) fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Puts `@odata.context` first, as Graph does on single-entity answers.
pub(super) fn with_context(v: Value, context: String) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::with_capacity(m.len() + 1);
            out.insert("@odata.context".into(), json!(context));
            out.extend(m);
            Value::Object(out)
        }
        other => other,
    }
}

pub(super) fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<String> = path.trim_matches('/').split('/').map(decode).collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    match l.as_slice() {
        ["metadata", "identity", "oauth2", "token"] => {
            return Some(Route::ManagedIdentity { app_service: false });
        }
        ["msi", "token"] => return Some(Route::ManagedIdentity { app_service: true }),
        _ => {}
    }
    if let [_, "oauth2", "v2.0", "devicecode"] = l.as_slice() {
        return Some(Route::DeviceCode {
            tenant: segs[0].clone(),
        });
    }
    if let [_, "oauth2", "v2.0", "token"] = l.as_slice() {
        return Some(Route::Token {
            tenant: segs[0].clone(),
        });
    }
    let rest = match l.first() {
        Some(&"v1.0") | Some(&"beta") => 1,
        _ => return None,
    };
    match &l[rest..] {
        ["users"] => return Some(Route::Users),
        ["subscriptions"] => return Some(Route::Subscriptions),
        ["subscriptions", _] => {
            return Some(Route::Subscription {
                id: segs[rest + 1].clone(),
                reauthorize: false,
            });
        }
        ["subscriptions", _, "reauthorize"] => {
            return Some(Route::Subscription {
                id: segs[rest + 1].clone(),
                reauthorize: true,
            });
        }
        ["places", "microsoft.graph.room"] => return Some(Route::Rooms),
        ["groups", _, "transitivemembers", "microsoft.graph.user"] => {
            return Some(Route::GroupUsers {
                group: segs[rest + 1].clone(),
                transitive: true,
            });
        }
        ["groups", _, "members", "microsoft.graph.user"] => {
            return Some(Route::GroupUsers {
                group: segs[rest + 1].clone(),
                transitive: false,
            });
        }
        _ => {}
    }
    let (user, at) = match l.get(rest) {
        Some(&"me") => (UserRef::Me, rest + 1),
        Some(&"users") => (UserRef::Key(segs.get(rest + 1)?.clone()), rest + 2),
        _ => return None,
    };
    let s = &segs[at..];
    // Graph accepts a function call in all its OData spellings; every Kiota SDK (the official
    // Python one included) asks for `delta()`.
    let mut l: Vec<&str> = l[at..].to_vec();
    if let Some(last) = l.last_mut() {
        if matches!(
            *last,
            "delta()" | "microsoft.graph.delta" | "microsoft.graph.delta()"
        ) {
            *last = "delta";
        }
    }
    match l.as_slice() {
        [] => Some(Route::User { user }),
        ["calendarview", "delta"] | ["calendar", "calendarview", "delta"] => Some(Route::Delta {
            user,
            cal: CalRef::Default,
        }),
        ["calendars", _, "calendarview", "delta"] => Some(Route::Delta {
            user,
            cal: CalRef::Id(s[1].clone()),
        }),
        ["calendars"] => Some(Route::Calendars { user }),
        ["events"] => Some(Route::Events { user, cal: None }),
        ["calendar", "events"] => Some(Route::Events {
            user,
            cal: Some(CalRef::Default),
        }),
        ["calendars", _, "events"] => Some(Route::Events {
            user,
            cal: Some(CalRef::Id(s[1].clone())),
        }),
        ["events", _] => Some(Route::Event {
            user,
            cal: None,
            id: s[1].clone(),
        }),
        ["calendar", "events", _] => Some(Route::Event {
            user,
            cal: Some(CalRef::Default),
            id: s[2].clone(),
        }),
        ["calendars", _, "events", _] => Some(Route::Event {
            user,
            cal: Some(CalRef::Id(s[1].clone())),
            id: s[3].clone(),
        }),
        ["events", _, "instances"] => Some(Route::Instances {
            user,
            cal: None,
            id: s[1].clone(),
        }),
        ["calendar", "events", _, "instances"] => Some(Route::Instances {
            user,
            cal: Some(CalRef::Default),
            id: s[2].clone(),
        }),
        ["calendars", _, "events", _, "instances"] => Some(Route::Instances {
            user,
            cal: Some(CalRef::Id(s[1].clone())),
            id: s[3].clone(),
        }),
        _ => None,
    }
}

/// Reads `startDateTime`/`endDateTime` as Graph does: an offset decides the zone, none means UTC.
pub(super) fn parse_instant(raw: &str, name: &str) -> Result<DateTime<Utc>, GraphError> {
    let bad =
        || GraphError::invalid_parameter(format!("The value of parameter '{name}' is invalid."));
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S"))
        .map(|n| n.and_utc())
        .map_err(|_| bad())
}

pub(super) fn parse_delta_query(query: &str) -> Result<DeltaRequest, GraphError> {
    let mut req = DeltaRequest::default();
    let (mut start, mut end) = (None, None);
    // form_urlencoded turns an unescaped '+' into a space, as Graph's own parser does.
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.to_ascii_lowercase().as_str() {
            "startdatetime" => start = Some(parse_instant(&v, "StartDateTime")?),
            "enddatetime" => end = Some(parse_instant(&v, "EndDateTime")?),
            "$skiptoken" => req.skip_token = Some(v.into_owned()),
            "$deltatoken" => req.delta_token = Some(v.into_owned()),
            "$select" | "$expand" | "$filter" | "$orderby" | "$search" | "$top" => {
                return Err(GraphError::new(
                    400,
                    "ErrorInvalidUrlQuery",
                    format!("The query parameter '{k}' is not supported with calendarView delta."),
                ));
            }
            _ => {}
        }
    }
    match (start, end) {
        (Some(s), Some(e)) if e <= s => {
            return Err(GraphError::invalid_parameter(
                "The value of parameter 'EndDateTime' is invalid.",
            ));
        }
        (Some(s), Some(e)) => req.window = Some(Window { start: s, end: e }),
        (None, None) => {}
        _ if req.skip_token.is_some() || req.delta_token.is_some() => {}
        _ => {
            return Err(GraphError::invalid_parameter(
                "This request requires a time window specified by the query string parameters \
                 StartDateTime and EndDateTime.",
            ));
        }
    }
    Ok(req)
}

/// The query of a plain list or read (`/instances`, `GET` of one event).
#[derive(Clone, Debug, Default)]
pub(super) struct ListQuery {
    pub(super) window: Option<Window>,
    /// `$select`, lower-cased.
    pub(super) select: Option<Vec<String>>,
    pub(super) top: Option<usize>,
    pub(super) skip: usize,
}

pub(super) fn parse_list_query(query: &str) -> Result<ListQuery, GraphError> {
    let mut q = ListQuery::default();
    let (mut start, mut end) = (None, None);
    let number = |k: &str, v: &str| {
        v.parse::<usize>().map_err(|_| {
            GraphError::new(
                400,
                "BadRequest",
                format!("Invalid value '{v}' for query option '{k}'."),
            )
        })
    };
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.to_ascii_lowercase().as_str() {
            "startdatetime" => start = Some(parse_instant(&v, "StartDateTime")?),
            "enddatetime" => end = Some(parse_instant(&v, "EndDateTime")?),
            "$select" => q.select = Some(select_fields(&v)),
            "$top" => q.top = Some(number("$top", &v)?.max(1)),
            "$skip" => q.skip = number("$skip", &v)?,
            _ => {}
        }
    }
    if let (Some(s), Some(e)) = (start, end) {
        if e <= s {
            return Err(GraphError::invalid_parameter(
                "The value of parameter 'EndDateTime' is invalid.",
            ));
        }
        q.window = Some(Window { start: s, end: e });
    }
    Ok(q)
}

/// The fields a `$select` names, lower-cased.
pub(super) fn select_fields(v: &str) -> Vec<String> {
    v.split(',')
        .map(|f| f.trim().to_ascii_lowercase())
        .filter(|f| !f.is_empty())
        .collect()
}

/// Keeps what `$select` names (case-insensitively), plus what Graph always sends: `@odata.etag`
/// and `id` (as in Microsoft's `/instances` example with `$select`).
pub(super) fn select(v: Value, fields: Option<&[String]>) -> Value {
    match (v, fields) {
        (Value::Object(m), Some(fields)) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| {
                    k == "@odata.etag" || k == "id" || fields.contains(&k.to_ascii_lowercase())
                })
                .collect(),
        ),
        (v, _) => v,
    }
}

/// `Prefer` values, comma-separated or repeated (RFC 7240).
pub(super) fn preferences(prefer: &[String]) -> Vec<(String, String)> {
    prefer
        .iter()
        .flat_map(|h| h.split(','))
        .filter_map(|p| {
            let p = p.trim();
            if p.is_empty() {
                return None;
            }
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_owned(),
            ))
        })
        .collect()
}
