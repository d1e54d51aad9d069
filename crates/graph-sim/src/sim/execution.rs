//! Execution: what an admitted request does to the tenant (delta pages, reads, writes) and
//! the request log it leaves.

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
            (Route::Token { tenant }, "POST") => {
                let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
                    .into_owned()
                    .collect();
                match self.auth.token_request(tenant, &form, now, &mut self.rng) {
                    Ok(v) => {
                        self.stats.tokens_issued = self.auth.issued;
                        Ok(SimResponse::json(200, &v))
                    }
                    Err(TokenError { status, body }) => Ok(SimResponse::json(status, &body)),
                }
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
                    let kept: Vec<(String, String)> =
                        url::form_urlencoded::parse(req.query.as_bytes())
                            .filter(|(k, _)| !k.eq_ignore_ascii_case("$skip"))
                            .map(|(k, v)| (k.into_owned(), v.into_owned()))
                            .collect();
                    let query = url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(kept)
                        .append_pair("$skip", &to.to_string())
                        .finish();
                    body.insert(
                        "@odata.nextLink".into(),
                        json!(format!("{}{}?{query}", req.origin, req.path)),
                    );
                }
                Ok(SimResponse::json(200, &Value::Object(body)))
            }
            (Route::Calendars { .. }, "GET") => {
                let user = &self.tenant.users[u];
                let value: Vec<Value> = user
                    .calendars
                    .iter()
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
            (Route::User { .. }, "GET") => {
                let user = &self.tenant.users[u];
                Ok(SimResponse::json(
                    200,
                    &json!({"id": user.id, "userPrincipalName": user.upn, "displayName": user.display_name, "mail": user.upn}),
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
