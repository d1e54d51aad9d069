//! `/subscriptions` and the deliveries behind it (see `crate::push` for the rules): creation
//! with the validation handshake against the client's URLs, get/list/renew/delete/reauthorize,
//! and the loop that turns writes into notification POSTs.

use super::route::*;
use super::*;
use crate::auth::Subject;
use crate::error::GraphError;
use crate::push::{
    CreateRequest, LifecycleEvent, Subscription, Watched, check_url, parse_change_types,
    parse_resource,
};
use serde_json::json;

/// How long a notification POST may take before it counts as failed (and is redelivered).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the delivery loop looks for due notifications.
const TICK: Duration = Duration::from_millis(20);

fn not_found(id: &str) -> GraphError {
    GraphError::new(
        404,
        "ResourceNotFound",
        format!("The object '{id}' was not found."),
    )
}

/// What creation checked under the lock, to be validated against the client's URLs.
struct Draft {
    subscription: Subscription,
    app: String,
}

impl State {
    /// The app (client id) or user a token stands for.
    fn subject(&self, req: &SimRequest) -> Result<Subject, GraphError> {
        let now = self.tenant.now();
        self.auth.check(req.authorization.as_deref(), now)
    }

    fn app_of(subject: &Subject) -> String {
        match subject {
            Subject::App(client) => client.clone(),
            Subject::User(_) => crate::sim::DEFAULT_CLIENT_ID.to_owned(),
        }
    }

    /// Checks a creation request as Graph does before its handshake.
    fn draft(&mut self, req: &SimRequest) -> Result<Draft, GraphError> {
        let subject = self.subject(req)?;
        let body: CreateRequest = serde_json::from_slice(&req.body).map_err(|e| {
            GraphError::new(
                400,
                "BadRequest",
                format!("Unable to read JSON request payload: {e}"),
            )
        })?;
        let missing = |name: &str| {
            GraphError::new(
                400,
                "InvalidRequest",
                format!("The parameter '{name}' is required."),
            )
        };
        let change_types = parse_change_types(
            body.change_type
                .as_deref()
                .ok_or_else(|| missing("changeType"))?,
        )?;
        let notification_url = body
            .notification_url
            .ok_or_else(|| missing("notificationUrl"))?;
        let (loopback, anywhere) = (
            self.push.settings.allow_http_loopback,
            self.push.settings.allow_http_anywhere,
        );
        check_url(&notification_url, "notificationUrl", loopback, anywhere)?;
        if let Some(l) = &body.lifecycle_notification_url {
            check_url(l, "lifecycleNotificationUrl", loopback, anywhere)?;
        }
        let resource = body.resource.ok_or_else(|| missing("resource"))?;
        let expiration_raw = body
            .expiration_date_time
            .ok_or_else(|| missing("expirationDateTime"))?;
        if body
            .client_state
            .as_ref()
            .is_some_and(|c| c.chars().count() > 128)
        {
            return Err(GraphError::new(
                400,
                "InvalidRequest",
                "The value of parameter 'ClientState' exceeds the maximum length of 128 characters.",
            ));
        }
        let watched = parse_resource(&resource)?;
        let (user_ref, calendar) = match watched {
            Watched::MyEvents => (UserRef::Me, None),
            Watched::MyCalendarEvents(cal) => (UserRef::Me, Some(cal)),
            Watched::UserEvents(k) => (UserRef::Key(k), None),
            Watched::CalendarEvents(k, cal) => (UserRef::Key(k), Some(cal)),
        };
        let user = self.resolve_user(&user_ref, &subject)?;
        if !self.tenant.users[user].directory.mailbox.serves_calendars() {
            // docs#6869: the mailbox-less answer on subscription creation.
            return Err(GraphError::new(
                404,
                "ExtensionError",
                "Operation: Create; Exception: [Status Code: NotFound; Reason: REST API is not yet supported for this mailbox.]",
            ));
        }
        if self.push.refusing.contains(&user) {
            // msgraph-sdk-javascript#1880; Close's sync-engine polls such mailboxes.
            let id = self.tenant.users[user].id.clone();
            return Err(GraphError::new(
                503,
                "ExtensionError",
                format!(
                    "Operation: Create; Exception: [Status Code: ServiceUnavailable; Reason: Target resource '{id}' hosted on database 'sim' is currently on backend 'Unknown']"
                ),
            ));
        }
        let calendar = match calendar {
            None if matches!(user_ref, UserRef::Me) => Some(0),
            None => None,
            Some(None) => Some(0),
            Some(Some(id)) => Some(
                self.tenant.users[user]
                    .calendar_index(&id)
                    .ok_or_else(|| {
                        GraphError::new(
                            404,
                            "ExtensionError",
                            "Operation: Create; Exception: [Status Code: NotFound; Reason: The specified object was not found in the store.]",
                        )
                    })?,
            ),
        };
        if self.push.on_mailbox(user) >= self.push.settings.max_per_mailbox {
            return Err(GraphError::new(
                403,
                "ExtensionError",
                format!(
                    "Operation: Create; Exception: [Status Code: Forbidden; Reason: The mailbox has reached its limit of {} subscriptions.]",
                    self.push.settings.max_per_mailbox
                ),
            ));
        }
        let now = self.tenant.now();
        let expiration = self.push.expiry(&expiration_raw, now)?;
        let app = Self::app_of(&subject);
        Ok(Draft {
            subscription: Subscription {
                id: self.tenant.ids.guid(),
                resource,
                user,
                calendar,
                change_types,
                notification_url,
                lifecycle_url: body.lifecycle_notification_url,
                client_state: body.client_state,
                expiration,
                application_id: app.clone(),
                needs_reauthorization: false,
            },
            app,
        })
    }

    /// `GET`, `PATCH`, `DELETE /subscriptions/{id}`, `POST …/reauthorize`, `GET /subscriptions`.
    pub(super) fn execute_subscription(
        &mut self,
        route: &Route,
        req: &SimRequest,
    ) -> Result<SimResponse, GraphError> {
        let subject = self.subject(req)?;
        let app = Self::app_of(&subject);
        let context = format!("{}/v1.0/$metadata#subscriptions", req.origin);
        match (route, req.method.as_str()) {
            (Route::Subscriptions, "GET") => {
                let mine: Vec<Value> = self
                    .push
                    .subscriptions
                    .values()
                    .filter(|s| s.application_id == app)
                    .map(Subscription::to_json)
                    .collect();
                Ok(SimResponse::json(
                    200,
                    &json!({"@odata.context": context, "value": mine}),
                ))
            }
            (Route::Subscription { id, reauthorize }, method) => {
                let found = self
                    .push
                    .subscriptions
                    .get(id)
                    .filter(|s| s.application_id == app)
                    .cloned()
                    .ok_or_else(|| not_found(id))?;
                match (method, reauthorize) {
                    ("GET", false) => Ok(SimResponse::json(
                        200,
                        &with_context(found.to_json(), format!("{context}/$entity")),
                    )),
                    ("DELETE", false) => {
                        self.push.subscriptions.remove(id);
                        self.push.stats.deleted += 1;
                        self.push.sync_journal(&mut self.tenant);
                        Ok(SimResponse::json_bytes(204, Vec::new()))
                    }
                    ("PATCH", false) => {
                        let body: Value = serde_json::from_slice(&req.body).map_err(|e| {
                            GraphError::new(
                                400,
                                "BadRequest",
                                format!("Unable to read JSON request payload: {e}"),
                            )
                        })?;
                        let raw = body
                            .get("expirationDateTime")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                GraphError::new(
                                    400,
                                    "InvalidRequest",
                                    "The parameter 'expirationDateTime' is required.",
                                )
                            })?;
                        let now = self.tenant.now();
                        let at = self.push.expiry(raw, now)?;
                        let Some(s) = self.push.subscriptions.get_mut(id) else {
                            return Err(not_found(id));
                        };
                        s.expiration = at;
                        // A renewal answers a reauthorizationRequired too (Learn, lifecycle
                        // events).
                        s.needs_reauthorization = false;
                        let json = s.to_json();
                        self.push.stats.renewed += 1;
                        Ok(SimResponse::json(
                            200,
                            &with_context(json, format!("{context}/$entity")),
                        ))
                    }
                    ("POST", true) => {
                        if let Some(s) = self.push.subscriptions.get_mut(id) {
                            s.needs_reauthorization = false;
                        }
                        Ok(SimResponse::json_bytes(204, Vec::new()))
                    }
                    _ => Err(GraphError::new(
                        405,
                        "Request_BadRequest",
                        "The HTTP method is not allowed on this resource.",
                    )),
                }
            }
            _ => Err(GraphError::new(
                405,
                "Request_BadRequest",
                "The HTTP method is not allowed on this resource.",
            )),
        }
    }
}

/// A validation token as Graph sends them: text with spaces and colons, so a client that
/// echoes it still URL-encoded fails as it would in production.
fn validation_token(id: &str) -> String {
    format!("Validation: Testing client application reachability for subscription Request-Id: {id}")
}

impl Sim {
    /// `POST /subscriptions`: checks, the validation handshake against the notification URL
    /// and the lifecycle URL (each must answer 200 with the decoded token as plain text
    /// within the timeout), then 201.
    pub(super) async fn create_subscription(&self, req: &SimRequest) -> SimResponse {
        let client = req.client_request_id.as_deref();
        let drafted = self.lock().draft(req);
        let draft = match drafted {
            Ok(d) => d,
            Err(e) => {
                let mut st = self.lock();
                let r = st.error_response(&e, client);
                st.record(None, req, r.status, 0, None, false);
                return r;
            }
        };
        let timeout = Duration::from_millis(self.lock().push.settings.validation_timeout_ms);
        let mut urls = vec![draft.subscription.notification_url.clone()];
        urls.extend(draft.subscription.lifecycle_url.clone());
        for url in urls {
            if let Err(e) = self.handshake(&url, timeout).await {
                let mut st = self.lock();
                st.push.stats.validation_failures += 1;
                let r = st.error_response(&e, client);
                st.record(None, req, r.status, 0, None, false);
                return r;
            }
        }
        let mut st = self.lock();
        let user = draft.subscription.user;
        if st.push.on_mailbox(user) >= st.push.settings.max_per_mailbox {
            let e = GraphError::new(
                403,
                "ExtensionError",
                "Operation: Create; Exception: [Status Code: Forbidden; Reason: The mailbox has reached its limit of subscriptions.]",
            );
            let r = st.error_response(&e, client);
            st.record(Some(user), req, r.status, 0, None, false);
            return r;
        }
        let json = with_context(
            draft.subscription.to_json(),
            format!("{}/v1.0/$metadata#subscriptions/$entity", req.origin),
        );
        let _ = draft.app;
        st.push
            .subscriptions
            .insert(draft.subscription.id.clone(), draft.subscription);
        st.push.stats.created += 1;
        let State { push, tenant, .. } = &mut *st;
        push.sync_journal(tenant);
        let mut r = SimResponse::json(201, &json);
        st.stamp_ids(&mut r, client);
        st.record(Some(user), req, 201, 0, None, false);
        r
    }

    /// Graph's validation request: `POST {url}?validationToken=…` (query string kept), an
    /// empty `text/plain` body; the answer must be 200 with the token, decoded, as its body.
    async fn handshake(&self, url: &str, timeout: Duration) -> Result<(), GraphError> {
        let id = self.lock().tenant.ids.guid();
        let token = validation_token(&id);
        let mut target = url::Url::parse(url).map_err(|_| {
            GraphError::new(400, "InvalidRequest", "The notification URL is invalid.")
        })?;
        target
            .query_pairs_mut()
            .append_pair("validationToken", &token);
        let failed = || {
            GraphError::new(
                400,
                "InvalidRequest",
                "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.",
            )
        };
        let sent = self
            .http
            .post(target)
            .header("content-type", "text/plain; charset=utf-8")
            .timeout(timeout)
            .send()
            .await;
        let answer = match sent {
            Ok(a) => a,
            Err(e) if e.is_timeout() => {
                return Err(GraphError::new(
                    400,
                    "InvalidRequest",
                    "Subscription validation request timed out.",
                ));
            }
            Err(_) => return Err(failed()),
        };
        if answer.status().as_u16() != 200 {
            return Err(failed());
        }
        match answer.text().await {
            Ok(body) if body == token => Ok(()),
            _ => Err(failed()),
        }
    }

    /// Sends a lifecycle event for subscription `id` now (the admin API's). `false`: no such
    /// subscription.
    pub fn lifecycle_event(&self, id: &str, event: LifecycleEvent) -> bool {
        self.lock().push.lifecycle(id, event, Instant::now())
    }

    /// Delivers notifications until the task is dropped: every tick, expired subscriptions
    /// go, recorded writes become notifications, and what is due is POSTed, one task per
    /// batch, its outcome reported back (redelivery, slow-endpoint rules).
    pub async fn deliver_notifications(self) {
        loop {
            tokio::time::sleep(TICK).await;
            let batches = {
                let mut st = self.lock();
                let now = st.tenant.now();
                let State {
                    push, tenant, rng, ..
                } = &mut *st;
                push.expire(now);
                push.ingest(tenant, rng, Instant::now());
                push.sync_journal(tenant);
                push.take_due(Instant::now())
            };
            for (url, batch) in batches {
                let sim = self.clone();
                tokio::spawn(async move {
                    let body =
                        json!({"value": batch.iter().map(|p| p.item.clone()).collect::<Vec<_>>()});
                    let started = Instant::now();
                    let sent = sim
                        .http
                        .post(&url)
                        .json(&body)
                        .timeout(DELIVERY_TIMEOUT)
                        .send()
                        .await;
                    let took = started.elapsed();
                    let ok = matches!(&sent, Ok(a) if a.status().is_success());
                    sim.lock()
                        .push
                        .delivered(&url, batch, ok.then_some(took), Instant::now());
                });
            }
        }
    }

    /// The admin API's push routes (`/_sim/push`, `/_sim/push/refuse`,
    /// `/_sim/subscriptions/{id}/lifecycle`): the status and JSON to answer, `None` for no
    /// such route.
    pub fn admin_push(
        &self,
        method: &str,
        path: &str,
        q: &HashMap<String, String>,
        body: &[u8],
    ) -> Option<(u16, Value)> {
        let bad = |m: String| Some((400, json!({"error": m})));
        match (method, path) {
            ("GET", "push") => {
                let st = self.lock();
                let subs: Vec<Value> = st
                    .push
                    .subscriptions
                    .values()
                    .map(Subscription::to_json)
                    .collect();
                let q = st.push.answer_quantiles(&[0.5, 0.99, 1.0]);
                Some((
                    200,
                    json!({"settings": st.push.settings, "stats": st.push.stats,
                           "subscriptions": subs, "pending": st.push.pending.len(),
                           "answer_ms": {"p50": q.first(), "p99": q.get(1), "max": q.get(2)}}),
                ))
            }
            ("PUT", "push") => match serde_json::from_slice::<crate::push::PushSettings>(body) {
                Ok(settings) => {
                    self.lock().push.settings = settings;
                    Some((200, json!({"ok": true})))
                }
                Err(e) => bad(format!("invalid push settings: {e}")),
            },
            ("POST", "push/events") => {
                // A benchmark's writes it can find again: `count` events, one per mailbox from
                // `offset` on, subjects `{prefix}{n}` from `first` on, one hour at `at`.
                let num = |k: &str| q.get(k).and_then(|v| v.parse::<usize>().ok());
                let (Some(count), Some(at)) = (num("count"), q.get("at")) else {
                    return bad(
                        "push/events needs count, at (RFC 3339), prefix, offset, first".into(),
                    );
                };
                let (offset, first) = (num("offset").unwrap_or(0), num("first").unwrap_or(0));
                let prefix = q.get("prefix").map_or("bench-", String::as_str);
                let Ok(start) = chrono::DateTime::parse_from_rfc3339(at) else {
                    return bad("at must be an RFC 3339 instant".into());
                };
                let start = start.with_timezone(&chrono::Utc);
                let fmt =
                    |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S").to_string();
                let mut st = self.lock();
                let users = st.tenant.users.len();
                let mut made = 0;
                for k in 0..count {
                    if users == 0 {
                        break;
                    }
                    let body = json!({"subject": format!("{prefix}{}", first + k),
                        "start": {"dateTime": fmt(start), "timeZone": "UTC"},
                        "end": {"dateTime": fmt(start + chrono::Duration::hours(1)), "timeZone": "UTC"}});
                    let Ok(patch) = crate::writes::EventPatch::from_json(&body) else {
                        continue;
                    };
                    if st
                        .tenant
                        .create_event((offset + k) % users, 0, &patch)
                        .is_ok()
                    {
                        made += 1;
                    }
                }
                Some((200, json!({"created": made})))
            }
            ("POST", "push/refuse") => {
                let mut st = self.lock();
                let Some(u) = q.get("user").and_then(|u| st.tenant.user_index(u)) else {
                    return Some((404, json!({"error": "no such user"})));
                };
                if q.get("refuse").is_some_and(|v| v == "false") {
                    st.push.refusing.remove(&u);
                } else {
                    st.push.refusing.insert(u);
                }
                Some((200, json!({"ok": true})))
            }
            ("POST", p) if p.starts_with("subscriptions/") && p.ends_with("/lifecycle") => {
                let id = p
                    .trim_start_matches("subscriptions/")
                    .trim_end_matches("/lifecycle");
                let event = match q.get("event").map(String::as_str) {
                    Some("missed") => LifecycleEvent::Missed,
                    Some("subscriptionRemoved") => LifecycleEvent::SubscriptionRemoved,
                    Some("reauthorizationRequired") => LifecycleEvent::ReauthorizationRequired,
                    _ => {
                        return bad(
                            "lifecycle needs event=missed|subscriptionRemoved|reauthorizationRequired"
                                .into(),
                        );
                    }
                };
                if self.lifecycle_event(id, event) {
                    Some((202, json!({"ok": true})))
                } else {
                    Some((404, json!({"error": "no such subscription"})))
                }
            }
            _ => None,
        }
    }
}
