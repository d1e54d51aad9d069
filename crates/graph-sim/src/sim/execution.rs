//! Execution: what an admitted request does to the tenant (delta pages, reads, writes) and
//! the request log it leaves.
//!
//! Longer than 600 lines because every route's execution is one arm of one dispatch, and the
//! arms share the request's admitted state; a split by route family (delta, directory, writes)
//! is the way to shorten it.

use super::route::*;
use super::*;
use crate::auth::TokenError;
use crate::delta::page_json;
use crate::error::GraphError;
use crate::model::Render;
use crate::writes::EventPatch;
use serde_json::{Value, json};
use std::collections::HashMap;
use tokio::time::Instant;

impl State {
    pub(super) fn calendar_index(&self, user: usize, cal: &CalRef) -> Result<usize, GraphError> {
        match cal {
            CalRef::Default => Ok(0),
            CalRef::Id(id) => self.tenant.users[user].calendar_index(id).ok_or_else(|| {
                GraphError::not_found("The specified object was not found in the store.")
            }),
        }
    }

    /// The zone a read renders times in: `Prefer: outlook.timezone` (UTC without it), any
    /// zone Graph knows; items may keep their own zone (the behaviour switch).
    fn render(&self, req: &SimRequest) -> Result<Render, GraphError> {
        let mut render = Render::utc();
        for (k, v) in preferences(&req.prefer) {
            if k == "outlook.timezone" {
                let name = v.trim_matches('"');
                render.tz = crate::zone::resolve(name).ok_or_else(|| {
                    GraphError::new(
                        400,
                        "TimeZoneNotSupportedException",
                        format!(
                            "A valid TimeZone value must be specified. The following TimeZone value is not supported: '{name}'."
                        ),
                    )
                })?;
                render.label = name.to_owned();
            }
        }
        render.own_zone = self.behaviour.own_time_zone_despite_prefer;
        Ok(render)
    }

    pub(super) fn execute(
        &mut self,
        route: &Route,
        user: Option<usize>,
        req: &SimRequest,
    ) -> Result<SimResponse, GraphError> {
        let now = self.tenant.now();
        let base = format!(
            "{}{}",
            req.origin,
            req.path.split('/').take(2).collect::<Vec<_>>().join("/")
        );
        let context = format!("{base}/$metadata#Collection(event)");
        let u = user.unwrap_or(0);
        let entity = format!(
            "{base}/$metadata#users('{}')/events/$entity",
            self.tenant.users.get(u).map_or("", |x| x.id.as_str())
        );
        let body_json = || -> Result<Value, GraphError> {
            serde_json::from_slice(&req.body).map_err(|e| {
                GraphError::new(
                    400,
                    "BadRequest",
                    format!("Unable to read JSON request payload: {e}"),
                )
            })
        };
        match (route, req.method.as_str()) {
            (Route::Subscriptions | Route::Subscription { .. }, _) => {
                self.execute_subscription(route, req)
            }
            (Route::Token { tenant }, "POST") => {
                let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
                    .into_owned()
                    .collect();
                let endpoint = format!("{}{}", req.origin, req.path);
                match self
                    .auth
                    .token_request(tenant, &form, &endpoint, now, &mut self.rng)
                {
                    Ok(v) => {
                        self.stats.tokens_issued = self.auth.issued;
                        Ok(SimResponse::json(200, &v))
                    }
                    Err(TokenError { status, body }) => Ok(SimResponse::json(status, &body)),
                }
            }
            (Route::DeviceCode { tenant }, "POST") => {
                let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
                    .into_owned()
                    .collect();
                let (status, body) =
                    self.auth
                        .device_code_request(tenant, &form, now, &mut self.rng);
                Ok(SimResponse::json(status, &body))
            }
            (Route::ManagedIdentity { app_service }, "GET") => {
                let query: HashMap<String, String> =
                    url::form_urlencoded::parse(req.query.as_bytes())
                        .into_owned()
                        .collect();
                let (status, body) = self.auth.managed_token(
                    *app_service,
                    &query,
                    &req.identity_headers,
                    now,
                    &mut self.rng,
                );
                self.stats.tokens_issued = self.auth.issued;
                Ok(SimResponse::json(status, &body))
            }
            (Route::Delta { cal, .. }, "GET") => {
                let ci = self.calendar_index(u, cal)?;
                let mut dreq = parse_delta_query(&req.query)?;
                dreq.render = self.render(req)?;
                // Graph announces change tracking on every delta answer (its response headers in
                // docs-contrib #7790 read `preference-applied: odata.track-changes`).
                let mut applied = vec!["odata.track-changes".to_owned()];
                for (k, v) in preferences(&req.prefer) {
                    if k == "odata.maxpagesize" {
                        let n: usize = v.parse().map_err(|_| {
                            GraphError::invalid_parameter(
                                "odata.maxpagesize must be a positive number",
                            )
                        })?;
                        dreq.max_page_size = Some(n.max(1));
                        applied.push(format!("odata.maxpagesize={}", n.max(1)));
                    }
                }
                let link_base = format!("{}{}", req.origin, req.path);
                let page =
                    self.cache
                        .serve(&self.tenant, &self.behaviour, u, ci, &dreq, &link_base)?;
                let mut r = SimResponse::json_bytes(200, page_json(page, &context));
                r.headers
                    .push(("preference-applied".into(), applied.join(", ")));
                Ok(r)
            }
            (Route::Events { cal, .. }, "POST") => {
                let ci = match cal {
                    Some(c) => self.calendar_index(u, c)?,
                    None => 0,
                };
                let patch = EventPatch::from_json(&body_json()?)?;
                let v = self.tenant.create_event(u, ci, &patch)?;
                Ok(SimResponse::json(201, &with_context(v, entity)))
            }
            (Route::Event { cal, id, .. }, method) => {
                let ci = match cal {
                    Some(c) => Some(self.calendar_index(u, c)?),
                    None => None,
                };
                match method {
                    "GET" => {
                        let q = parse_list_query(&req.query)?;
                        let render = self.render(req)?;
                        let v = select(
                            self.tenant.get_event(u, ci, id, &render)?,
                            q.select.as_deref(),
                        );
                        Ok(SimResponse::json(200, &with_context(v, entity)))
                    }
                    "PATCH" => {
                        let patch = EventPatch::from_json(&body_json()?)?;
                        Ok(SimResponse::json(
                            200,
                            &with_context(self.tenant.update_event(u, ci, id, &patch)?, entity),
                        ))
                    }
                    "DELETE" => {
                        self.tenant.delete_event(u, ci, id)?;
                        Ok(SimResponse {
                            status: 204,
                            headers: vec![],
                            body: vec![],
                            fate: Fate::Normal,
                        })
                    }
                    _ => Err(GraphError::new(
                        405,
                        "Request_BadRequest",
                        "Method not allowed.",
                    )),
                }
            }
            (Route::Instances { cal, id, .. }, "GET") => {
                let ci = match cal {
                    Some(c) => Some(self.calendar_index(u, c)?),
                    None => None,
                };
                let q = parse_list_query(&req.query)?;
                let window = q.window.ok_or_else(|| {
                    GraphError::invalid_parameter(
                        "This request requires a time window specified by the query string \
                         parameters StartDateTime and EndDateTime.",
                    )
                })?;
                let render = self.render(req)?;
                let all = self.tenant.instances_of(u, ci, id, &window, &render)?;
                // Paged like any list: `odata.maxpagesize` or `$top` (default 10), `$skip`
                // in the nextLink.
                let mut size = q.top.unwrap_or(10);
                for (k, v) in preferences(&req.prefer) {
                    if k == "odata.maxpagesize" {
                        size = v.parse::<usize>().unwrap_or(size).max(1);
                    }
                }
                let from = q.skip.min(all.len());
                let to = (from + size).min(all.len());
                let value: Vec<Value> = all[from..to]
                    .iter()
                    .map(|v| select(v.clone(), q.select.as_deref()))
                    .collect();
                let mut body = serde_json::Map::new();
                body.insert("@odata.context".into(), json!(context));
                body.insert("value".into(), Value::Array(value));
                if to < all.len() {
                    body.insert(
                        "@odata.nextLink".into(),
                        json!(next_link(req, "$skip", &to.to_string())),
                    );
                }
                Ok(SimResponse::json(200, &Value::Object(body)))
            }
            (Route::Calendars { .. }, "GET") => {
                let user = &self.tenant.users[u];
                let value: Vec<Value> = user
                    .calendars
                    .iter()
                    .filter(|c| !c.deleted)
                    .map(|c| {
                        json!({
                            "id": c.id, "name": c.name, "isDefaultCalendar": c.is_default,
                            "owner": {"name": user.display_name, "address": user.upn}
                        })
                    })
                    .collect();
                Ok(SimResponse::json(
                    200,
                    &json!({"@odata.context": format!("{base}/$metadata#users('{}')/calendars", user.id), "value": value}),
                ))
            }
            (Route::Users, "GET") => {
                let q = directory_query(&req.query)?;
                let filter = q.filter.as_deref().map(UserFilter::parse).transpose()?;
                // `ne` is an advanced query: only with `ConsistencyLevel: eventual` and
                // `$count=true` (Microsoft Learn, "Advanced query capabilities on Microsoft Entra
                // ID objects": `accountEnabled ne true` without them is refused).
                let advanced = req
                    .consistency_level
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case("eventual"))
                    && q.count;
                if filter.as_ref().is_some_and(UserFilter::is_advanced) && !advanced {
                    return Err(GraphError::new(
                        400,
                        "Request_UnsupportedQuery",
                        "Operator 'NotEqualsMatch' is not supported because the 'ConsistencyLevel:eventual' header is missing. Refer to https://aka.ms/graph-docs/advanced-queries for more information",
                    ));
                }
                let all: Vec<Value> = self
                    .tenant
                    .users
                    .iter()
                    .filter(|u| !u.directory.deleted)
                    .map(user_json)
                    .filter(|v| filter.as_ref().is_none_or(|f| f.matches(v)))
                    .collect();
                directory_page(req, &q, all, &format!("{base}/$metadata#users"))
            }
            (Route::GroupUsers { group, transitive }, "GET") => {
                let g = self.tenant.group_index(group).ok_or_else(|| {
                    GraphError::new(
                        404,
                        "Request_ResourceNotFound",
                        format!("Resource '{group}' does not exist or one of its queried reference-property objects are not present."),
                    )
                })?;
                let q = directory_query(&req.query)?;
                let members = if *transitive {
                    self.tenant.transitive_users(g)
                } else {
                    self.tenant.groups[g]
                        .users
                        .iter()
                        .copied()
                        .filter(|u| !self.tenant.users[*u].directory.deleted)
                        .collect()
                };
                let all: Vec<Value> = members
                    .into_iter()
                    .map(|u| {
                        let mut v = user_json(&self.tenant.users[u]);
                        if let Value::Object(m) = &mut v {
                            m.insert("@odata.type".into(), json!("#microsoft.graph.user"));
                        }
                        v
                    })
                    .collect();
                directory_page(req, &q, all, &format!("{base}/$metadata#users"))
            }
            (Route::Rooms, "GET") => {
                let q = directory_query(&req.query)?;
                let all: Vec<Value> = self
                    .tenant
                    .users
                    .iter()
                    .filter(|u| {
                        !u.directory.deleted
                            && u.directory.mailbox == crate::model::MailboxKind::Room
                    })
                    .map(|u| {
                        json!({"@odata.type": "#microsoft.graph.room", "id": u.id,
                               "emailAddress": u.upn, "displayName": u.display_name,
                               "capacity": null, "bookingType": "standard"})
                    })
                    .collect();
                directory_page(
                    req,
                    &q,
                    all,
                    &format!("{base}/$metadata#places/microsoft.graph.room"),
                )
            }
            (Route::User { .. }, "GET") => {
                let user = &self.tenant.users[u];
                Ok(SimResponse::json(
                    200,
                    &json!({"id": user.id, "userPrincipalName": user.upn, "displayName": user.display_name,
                            "mail": if user.directory.mailbox == crate::model::MailboxKind::None { Value::Null } else { json!(user.upn) }}),
                ))
            }
            _ => Err(GraphError::new(
                405,
                "Request_BadRequest",
                "Method not allowed.",
            )),
        }
    }

    pub(super) fn record(
        &mut self,
        user: Option<usize>,
        req: &SimRequest,
        status: u16,
        in_flight: u32,
        fault: Option<String>,
        early: bool,
    ) {
        self.stats.requests += 1;
        *self.stats.by_status.entry(status).or_default() += 1;
        if status == 200 && req.path.contains("calendarView") {
            self.stats.delta_pages += 1;
        }
        let seq = self.stats.requests;
        let rec = RequestRecord {
            seq,
            at_secs: Instant::now().duration_since(self.started).as_secs_f64(),
            mailbox: self.user_key(user),
            method: req.method.clone(),
            path: req.path.clone(),
            status,
            in_flight,
            fault,
            early,
            connection: req.connection,
            bytes: 0,
        };
        if self.log.len() >= self.log_capacity {
            self.log.pop_front();
        }
        self.log.push_back(rec);
    }
}

/// A user as `/users` lists it: every property this simulator keeps, filtered by `$select`
/// later. The default set (without `$select`) is Graph's: no `accountEnabled`, no
/// `department` (user-list docs, "Properties returned by default").
fn user_json(u: &crate::model::User) -> Value {
    let has_mailbox = u.directory.mailbox != crate::model::MailboxKind::None;
    json!({
        "id": u.id, "userPrincipalName": u.upn, "displayName": u.display_name,
        "mail": if has_mailbox { json!(u.upn) } else { Value::Null },
        "businessPhones": [], "givenName": null, "surname": null, "jobTitle": null,
        "mobilePhone": null, "officeLocation": null, "preferredLanguage": null,
        "department": u.directory.department, "accountEnabled": u.directory.account_enabled,
        "userType": "Member",
    })
}

const DEFAULT_USER_FIELDS: [&str; 11] = [
    "businessphones",
    "displayname",
    "givenname",
    "jobtitle",
    "mail",
    "mobilephone",
    "officelocation",
    "preferredlanguage",
    "surname",
    "userprincipalname",
    "id",
];

struct DirectoryQuery {
    top: usize,
    offset: usize,
    /// `$count=true`.
    count: bool,
    select: Option<Vec<String>>,
    filter: Option<String>,
}

/// `$top` (1–999, default 100: "Invalid page size specified: '1000'. Must be between 1 and 999
/// inclusive." as Microsoft Q&A 1129204 quotes it), `$skiptoken`, `$select`, `$filter`.
fn directory_query(query: &str) -> Result<DirectoryQuery, GraphError> {
    let mut q = DirectoryQuery {
        top: 100,
        offset: 0,
        count: false,
        select: None,
        filter: None,
    };
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.to_ascii_lowercase().as_str() {
            "$top" => {
                q.top = v.parse::<usize>().ok().filter(|n| (1..=999).contains(n)).ok_or_else(|| {
                    GraphError::new(
                        400,
                        "Request_BadRequest",
                        format!("Invalid page size specified: '{v}'. Must be between 1 and 999 inclusive."),
                    )
                })?
            }
            "$skiptoken" => {
                q.offset = v
                    .strip_prefix("RFNwdAIAAQAAA")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| {
                        GraphError::new(400, "Request_BadRequest", "Invalid $skiptoken.")
                    })?
            }
            "$select" => q.select = Some(select_fields(&v)),
            "$filter" => q.filter = Some(v.into_owned()),
            "$count" => q.count = v.eq_ignore_ascii_case("true"),
            _ => {}
        }
    }
    Ok(q)
}

/// One page of a directory list: `$select` applied (Graph's default set for users without
/// it), an opaque `$skiptoken` in the nextLink.
fn directory_page(
    req: &SimRequest,
    q: &DirectoryQuery,
    all: Vec<Value>,
    context: &str,
) -> Result<SimResponse, GraphError> {
    let from = q.offset.min(all.len());
    let to = (from + q.top).min(all.len());
    let keep = |v: Value| -> Value {
        let Value::Object(m) = v else { return v };
        let wanted = |k: &str| {
            let k = k.to_ascii_lowercase();
            k == "@odata.type"
                || match &q.select {
                    Some(f) => k == "id" || f.contains(&k),
                    None => {
                        !m.contains_key("userPrincipalName")
                            || DEFAULT_USER_FIELDS.contains(&k.as_str())
                    }
                }
        };
        Value::Object(m.clone().into_iter().filter(|(k, _)| wanted(k)).collect())
    };
    let value: Vec<Value> = all[from..to].iter().cloned().map(keep).collect();
    let mut body = serde_json::Map::new();
    body.insert("@odata.context".into(), json!(context));
    if q.count {
        body.insert("@odata.count".into(), json!(all.len()));
    }
    body.insert("value".into(), Value::Array(value));
    if to < all.len() {
        body.insert(
            "@odata.nextLink".into(),
            json!(next_link(req, "$skiptoken", &format!("RFNwdAIAAQAAA{to}"))),
        );
    }
    Ok(SimResponse::json(200, &Value::Object(body)))
}

/// The `$filter` subset of `/users` this simulator evaluates: clauses joined by `and`, each
/// `prop eq value`, `prop ne value` or `startswith(prop,'text')`, on `accountEnabled`,
/// `department`, `displayName`, `mail`, `userPrincipalName`, `userType` and `id`. Anything else
/// is refused as Graph refuses a clause it cannot evaluate.
struct UserFilter(Vec<Clause>);

enum Clause {
    Eq(String, Value, bool),
    StartsWith(String, String),
}

impl UserFilter {
    fn parse(text: &str) -> Result<Self, GraphError> {
        let unsupported = |what: &str| {
            GraphError::new(
                400,
                "Request_UnsupportedQuery",
                format!(
                    "Unsupported or invalid query filter clause specified for property '{what}' of resource 'User'."
                ),
            )
        };
        const PROPS: [&str; 7] = [
            "accountenabled",
            "department",
            "displayname",
            "mail",
            "userprincipalname",
            "usertype",
            "id",
        ];
        let prop = |p: &str| -> Result<String, GraphError> {
            let l = p.trim().to_ascii_lowercase();
            if PROPS.contains(&l.as_str()) {
                Ok(l)
            } else {
                Err(unsupported(p.trim()))
            }
        };
        let literal = |v: &str| -> Result<Value, GraphError> {
            let v = v.trim();
            match v {
                "true" => Ok(json!(true)),
                "false" => Ok(json!(false)),
                "null" => Ok(Value::Null),
                _ if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') => {
                    Ok(json!(v[1..v.len() - 1].replace("''", "'")))
                }
                _ => Err(GraphError::new(
                    400,
                    "BadRequest",
                    format!("Invalid filter clause: '{v}' is not a literal."),
                )),
            }
        };
        let mut clauses = Vec::new();
        for part in split_and(text) {
            let part = part.trim();
            let lower = part.to_ascii_lowercase();
            if let Some(args) = lower
                .strip_prefix("startswith(")
                .and_then(|_| part.get(11..))
                .and_then(|r| r.strip_suffix(')'))
            {
                let (p, v) = args.split_once(',').ok_or_else(|| unsupported(args))?;
                match literal(v)? {
                    Value::String(s) => clauses.push(Clause::StartsWith(prop(p)?, s)),
                    _ => return Err(unsupported(p)),
                }
                continue;
            }
            let words: Vec<&str> = part.splitn(3, ' ').collect();
            match words.as_slice() {
                [p, op, v] if op.eq_ignore_ascii_case("eq") || op.eq_ignore_ascii_case("ne") => {
                    clauses.push(Clause::Eq(
                        prop(p)?,
                        literal(v)?,
                        op.eq_ignore_ascii_case("eq"),
                    ))
                }
                _ => {
                    return Err(GraphError::new(
                        400,
                        "BadRequest",
                        format!("Invalid filter clause: '{part}'."),
                    ));
                }
            }
        }
        Ok(UserFilter(clauses))
    }

    /// Whether it needs an advanced query (here: any `ne`).
    fn is_advanced(&self) -> bool {
        self.0.iter().any(|c| matches!(c, Clause::Eq(_, _, false)))
    }

    fn matches(&self, user: &Value) -> bool {
        let get = |p: &str| {
            user.as_object()
                .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case(p)))
                .map_or(Value::Null, |(_, v)| v.clone())
        };
        self.0.iter().all(|c| match c {
            Clause::Eq(p, v, eq) => {
                let have = get(p);
                let same = match (&have, v) {
                    (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
                    (a, b) => a == b,
                };
                same == *eq
            }
            Clause::StartsWith(p, prefix) => get(p).as_str().is_some_and(|s| {
                s.to_ascii_lowercase()
                    .starts_with(&prefix.to_ascii_lowercase())
            }),
        })
    }
}

/// Splits a filter on ` and ` outside quotes.
fn split_and(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if !quoted
            && rest
                .get(..5)
                .is_some_and(|w| w.eq_ignore_ascii_case(" and "))
        {
            parts.push(String::new());
            rest = &rest[5..];
            continue;
        }
        if let Some(last) = parts.last_mut() {
            last.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    parts
}

/// The request's own URL with `key` set to `value` (any earlier `key` dropped): a list's
/// nextLink.
fn next_link(req: &SimRequest, key: &str, value: &str) -> String {
    let kept: Vec<(String, String)> = url::form_urlencoded::parse(req.query.as_bytes())
        .filter(|(k, _)| !k.eq_ignore_ascii_case(key))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .append_pair(key, value)
        .finish();
    format!("{}{}?{query}", req.origin, req.path)
}
