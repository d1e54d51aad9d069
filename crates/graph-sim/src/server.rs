//! The HTTP face of the simulator: a hyper server whose connections can be reset or cut off
//! on purpose, plus the `/_sim` admin endpoints.

use crate::behaviour::Behaviour;
use crate::delta::Quirks;
use crate::faults::FaultRule;
use crate::model::Window;
use crate::sim::{Fate, Sim, SimRequest};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

type Body = BoxBody<Bytes, io::Error>;

/// A TCP stream that fails every read and write once killed, so hyper drops the connection;
/// with `SO_LINGER` 0 the peer sees a reset, not a clean close.
struct KillableStream {
    inner: TcpStream,
    killed: Arc<AtomicBool>,
    lingered: bool,
}

impl KillableStream {
    fn check(&mut self) -> io::Result<()> {
        if self.killed.load(Ordering::Relaxed) {
            if !self.lingered {
                self.lingered = true;
                let _ = socket_zero_linger(&self.inner);
            }
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "graph-sim reset",
            ));
        }
        Ok(())
    }
}

#[allow(deprecated)]
fn socket_zero_linger(s: &TcpStream) -> io::Result<()> {
    s.set_linger(Some(std::time::Duration::ZERO))
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A simulator listening on a socket. Dropping it does not stop it; call [`SimServer::stop`].
#[derive(Debug)]
pub struct SimServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SimServer {
    /// `http://127.0.0.1:port/v1.0`: what calsync's `graph.base_url` should be.
    pub fn graph_base_url(&self) -> String {
        format!("http://{}/v1.0", self.addr)
    }

    /// The token endpoint for `tenant`.
    pub fn token_url(&self, tenant: &str) -> String {
        format!("http://{}/{tenant}/oauth2/v2.0/token", self.addr)
    }

    /// The admin API's root: `http://addr/_sim`.
    pub fn admin_url(&self) -> String {
        format!("http://{}/_sim", self.addr)
    }

    /// Stops accepting connections and ends the server task; open connections are dropped.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Aborts a task when dropped (the delivery loop ends with the server task).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `sim` on `listener` until stopped.
pub fn serve(sim: Sim, listener: TcpListener) -> io::Result<SimServer> {
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let origin = format!("http://{addr}");
    // Change notifications go out for as long as the server runs.
    let deliveries = tokio::spawn(sim.clone().deliver_notifications());
    let task = tokio::spawn(async move {
        let _deliveries = AbortOnDrop(deliveries);
        let mut conns = tokio::task::JoinSet::new();
        let mut next_connection = 0u64;
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    next_connection += 1;
                    let connection = next_connection;
                    let _ = stream.set_nodelay(true);
                    let killed = Arc::new(AtomicBool::new(false));
                    let io = TokioIo::new(KillableStream { inner: stream, killed: Arc::clone(&killed), lingered: false });
                    let sim = sim.clone();
                    let origin = origin.clone();
                    conns.spawn(async move {
                        let svc = service_fn(move |req| {
                            let sim = sim.clone();
                            let killed = Arc::clone(&killed);
                            let origin = origin.clone();
                            async move { Ok::<_, io::Error>(handle(sim, req, killed, origin, connection).await) }
                        });
                        let _ = http1::Builder::new().keep_alive(true).serve_connection(io, svc).await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.abort_all();
    });
    Ok(SimServer { addr, stop, task })
}

fn full(status: u16, headers: &[(String, String)], body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::try_from(k.as_str()),
            hyper::header::HeaderValue::try_from(v.as_str()),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    r
}

fn admin_json(status: u16, v: &Value) -> Response<Body> {
    full(
        status,
        &[("content-type".into(), "application/json".into())],
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

async fn handle(
    sim: Sim,
    req: Request<Incoming>,
    killed: Arc<AtomicBool>,
    origin: String,
    connection: u64,
) -> Response<Body> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let header = |name: &str| -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    };
    let authorization = header("authorization").into_iter().next();
    let prefer = header("prefer");
    let client_request_id = header("client-request-id").into_iter().next();
    let consistency_level = header("consistencylevel").into_iter().next();
    let identity_headers = (
        header("metadata").into_iter().next(),
        header("x-identity-header").into_iter().next(),
    );
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => {
            return admin_json(
                413,
                &json!({"error": {"code": "RequestEntityTooLarge", "message": "request body too large"}}),
            );
        }
    };
    if let Some(rest) = path.strip_prefix("/_sim/") {
        return admin(&sim, &method, rest, &query, &body);
    }
    // Run apart from the connection: a client that hangs up does not stop Graph working on
    // what it sent, and the answer's Retry-After holds the mailbox all the same.
    let request = SimRequest {
        method,
        path,
        query,
        authorization,
        prefer,
        body,
        origin,
        client_request_id,
        consistency_level,
        identity_headers,
        connection,
    };
    let running = tokio::spawn(async move { sim.handle(request).await });
    let Ok(resp) = running.await else {
        return admin_json(
            500,
            &json!({"error": {"code": "InternalServerError", "message": "graph-sim failed on this request"}}),
        );
    };
    match resp.fate {
        Fate::Normal => full(resp.status, &resp.headers, resp.body),
        Fate::Reset => {
            killed.store(true, Ordering::Relaxed);
            full(500, &[], Vec::new())
        }
        Fate::Truncate => {
            let total = resp.body.len();
            let half = Bytes::from(resp.body[..total / 2].to_vec());
            // Half the body, a pause so it reaches the client, then the connection drops.
            let frames = futures_util::stream::unfold(Some(half), |state| async move {
                match state {
                    Some(half) => Some((Ok(Frame::data(half)), None)),
                    None => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let e: Result<Frame<Bytes>, io::Error> = Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "graph-sim truncated the body",
                        ));
                        Some((e, None))
                    }
                }
            });
            let frames = futures_util::StreamExt::take(frames, 2);
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            *r.status_mut() = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK);
            for (k, v) in &resp.headers {
                if let (Ok(k), Ok(v)) = (
                    hyper::header::HeaderName::try_from(k.as_str()),
                    hyper::header::HeaderValue::try_from(v.as_str()),
                ) {
                    r.headers_mut().append(k, v);
                }
            }
            if let Ok(v) = hyper::header::HeaderValue::try_from(total.to_string()) {
                r.headers_mut().insert(hyper::header::CONTENT_LENGTH, v);
            }
            r
        }
    }
}

fn query_map(query: &str) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// `/_sim/…`: observe the truth and the request log, script faults, evict tokens, move time.
fn admin(sim: &Sim, method: &str, rest: &str, query: &str, body: &[u8]) -> Response<Body> {
    let q = query_map(query);
    let bad = |m: String| admin_json(400, &json!({"error": m}));
    match (method, rest.trim_end_matches('/')) {
        ("GET", "truth") => {
            let (Some(user), Some(start), Some(end)) =
                (q.get("user"), q.get("start"), q.get("end"))
            else {
                return bad(
                    "truth needs user, start and end (RFC 3339), and optionally calendar".into(),
                );
            };
            let parse = |s: &String| {
                chrono::DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&chrono::Utc))
            };
            let (Ok(start), Ok(end)) = (parse(start), parse(end)) else {
                return bad("start and end must be RFC 3339 instants".into());
            };
            let cal = q.get("calendar").map_or("default", String::as_str);
            match sim.lock().truth(user, cal, Window { start, end }) {
                Some(items) => admin_json(200, &json!(items)),
                None => admin_json(404, &json!({"error": "no such user or calendar"})),
            }
        }
        ("GET", "users") => {
            let st = sim.lock();
            let users: Vec<Value> = st.tenant.users.iter().map(|u| json!({
                "id": u.id, "userPrincipalName": u.upn, "displayName": u.display_name,
                "calendars": u.calendars.iter().map(|c| json!({"id": c.id, "name": c.name, "isDefaultCalendar": c.is_default, "events": c.events.len()})).collect::<Vec<_>>(),
            })).collect();
            admin_json(200, &json!(users))
        }
        ("GET", "requests") => admin_json(200, &json!(sim.lock().requests())),
        ("GET", "violations") => admin_json(200, &json!(sim.lock().violations())),
        ("GET", "stats") => admin_json(200, &json!(sim.lock().stats())),
        ("POST", "faults") => match serde_json::from_slice::<FaultRule>(body) {
            Ok(rule) => {
                sim.lock().faults.push(rule);
                admin_json(201, &json!({"ok": true}))
            }
            Err(e) => bad(format!("invalid fault rule: {e}")),
        },
        ("GET", "faults") => admin_json(200, &json!(sim.lock().faults)),
        ("DELETE", "faults") => {
            sim.lock().faults.clear();
            admin_json(200, &json!({"ok": true}))
        }
        (m, path)
            if path == "push"
                || path.starts_with("push/")
                || path.starts_with("subscriptions/") =>
        {
            match sim.admin_push(m, path, &q, body) {
                Some((status, v)) => admin_json(status, &v),
                None => admin_json(404, &json!({"error": "no such admin route"})),
            }
        }
        ("GET", "behaviour") => admin_json(200, &json!(sim.lock().behaviour)),
        ("PUT", "behaviour") => match serde_json::from_slice::<Behaviour>(body) {
            Ok(b) => {
                sim.lock().behaviour = b;
                admin_json(200, &json!({"ok": true}))
            }
            Err(e) => bad(format!("invalid behaviour: {e}")),
        },
        ("PUT", "quirks") => match serde_json::from_slice::<Quirks>(body) {
            Ok(quirks) => {
                sim.lock().cache.quirks = quirks;
                admin_json(200, &json!({"ok": true}))
            }
            Err(e) => bad(format!("invalid quirks: {e}")),
        },
        ("POST", "evict") => {
            let mut st = sim.lock();
            let user = match q.get("user") {
                Some(k) => match st.tenant.user_index(k) {
                    Some(u) => Some(u),
                    None => return admin_json(404, &json!({"error": "no such user"})),
                },
                None => None,
            };
            let n = st.cache.evict(user);
            admin_json(200, &json!({"evicted": n}))
        }
        ("POST", "churn") => {
            // Random realistic edits (churn::random_edit) over every mailbox's default
            // calendar, aimed at a window: what a benchmark's churn round replays. The i-th
            // edit goes to mailbox (offset + i) mod users.
            let n = q.get("edits").and_then(|v| v.parse::<usize>().ok());
            let offset = q
                .get("offset")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let seed = q
                .get("seed")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            let parse = |k: &str| {
                q.get(k)
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.with_timezone(&chrono::Utc))
            };
            let (Some(n), Some(start), Some(end)) = (n, parse("start"), parse("end")) else {
                return bad(
                    "churn needs edits=<n>, start and end (RFC 3339), optionally seed".into(),
                );
            };
            let window = Window { start, end };
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
            let mut st = sim.lock();
            let users = st.tenant.users.len();
            let mut done: std::collections::BTreeMap<&'static str, u64> = Default::default();
            for i in 0..n {
                if users == 0 {
                    break;
                }
                if let Some(e) = crate::churn::random_edit(
                    &mut st.tenant,
                    &mut rng,
                    (offset + i) % users,
                    0,
                    &window,
                ) {
                    *done.entry(e.label()).or_default() += 1;
                }
            }
            admin_json(200, &json!(done))
        }
        ("POST", "organizer-cancel") => {
            let mut st = sim.lock();
            let (Some(u), Some(id)) = (
                q.get("user").and_then(|u| st.tenant.user_index(u)),
                q.get("id"),
            ) else {
                return bad("organizer-cancel needs user and id".into());
            };
            match st.tenant.cancel_by_organizer(u, None, id) {
                Ok(()) => admin_json(200, &json!({"ok": true})),
                Err(e) => admin_json(e.status, &json!({"error": e.message})),
            }
        }
        // The directory, as an administrator changes it (discovery tests, the demo).
        ("POST", "users") => {
            let Some(upn) = q.get("upn") else {
                return bad("users needs upn, optionally name, department and mailbox=user|room|none|on_premises".into());
            };
            let kind = match q.get("mailbox").map_or("user", String::as_str) {
                "user" => crate::model::MailboxKind::User,
                "room" => crate::model::MailboxKind::Room,
                "none" => crate::model::MailboxKind::None,
                "on_premises" => crate::model::MailboxKind::OnPremises,
                other => {
                    return bad(format!(
                        "mailbox '{other}' is not one of user, room, none, on_premises"
                    ));
                }
            };
            let mut st = sim.lock();
            if st.tenant.user_index(upn).is_some() {
                return admin_json(409, &json!({"error": "the user exists"}));
            }
            let name = q
                .get("name")
                .map_or(upn.as_str(), String::as_str)
                .to_owned();
            let u = st.tenant.add_directory_user(
                upn,
                &name,
                kind,
                q.get("department").map(String::as_str),
            );
            admin_json(201, &json!({"id": st.tenant.users[u].id}))
        }
        ("DELETE", "users") => {
            let mut st = sim.lock();
            match q.get("user").and_then(|k| st.tenant.user_index(k)) {
                Some(u) => {
                    st.tenant.delete_user(u);
                    admin_json(200, &json!({"ok": true}))
                }
                None => admin_json(404, &json!({"error": "no such user"})),
            }
        }
        ("POST", "groups") => {
            let mut st = sim.lock();
            let mut members = Vec::new();
            for m in q
                .get("members")
                .map(|m| m.split(',').filter(|x| !x.is_empty()).collect::<Vec<_>>())
                .unwrap_or_default()
            {
                match st.tenant.user_index(m) {
                    Some(u) => members.push(u),
                    None => return admin_json(404, &json!({"error": format!("no such user {m}")})),
                }
            }
            let g = st.tenant.add_group(
                q.get("name").map_or("group", String::as_str),
                members,
                Vec::new(),
            );
            admin_json(201, &json!({"id": st.tenant.groups[g].id}))
        }
        (m @ ("POST" | "DELETE"), "groups/members") => {
            let mut st = sim.lock();
            let g = q.get("group").and_then(|g| st.tenant.group_index(g));
            let u = q.get("user").and_then(|u| st.tenant.user_index(u));
            let (Some(g), Some(u)) = (g, u) else {
                return admin_json(
                    404,
                    &json!({"error": "groups/members needs an existing group and user"}),
                );
            };
            let users = &mut st.tenant.groups[g].users;
            if m == "POST" {
                if !users.contains(&u) {
                    users.push(u);
                }
            } else {
                users.retain(|x| *x != u);
            }
            admin_json(200, &json!({"ok": true}))
        }
        (m @ ("POST" | "PATCH" | "DELETE"), "calendars") => {
            let mut st = sim.lock();
            let Some(u) = q.get("user").and_then(|u| st.tenant.user_index(u)) else {
                return admin_json(404, &json!({"error": "no such user"}));
            };
            match (m, q.get("id"), q.get("name")) {
                ("POST", _, Some(name)) => {
                    let id = st.tenant.add_calendar(u, name);
                    admin_json(201, &json!({"id": id}))
                }
                ("PATCH", Some(id), Some(name)) if st.tenant.rename_calendar(u, id, name) => {
                    admin_json(200, &json!({"ok": true}))
                }
                ("DELETE", Some(id), _) if st.tenant.delete_calendar(u, id) => {
                    admin_json(200, &json!({"ok": true}))
                }
                ("POST", _, None) => bad("POST calendars needs user and name".into()),
                _ => admin_json(
                    404,
                    &json!({"error": "no such calendar (or it is the default one)"}),
                ),
            }
        }
        ("POST", "expire-tokens") => {
            let mut st = sim.lock();
            let now = st.tenant.now();
            st.auth.expire_all(now);
            admin_json(200, &json!({"ok": true}))
        }
        ("POST", "clock/advance") => match q.get("seconds").and_then(|s| s.parse::<i64>().ok()) {
            Some(s) => {
                sim.clock().advance(chrono::Duration::seconds(s));
                admin_json(200, &json!({"now": sim.clock().now()}))
            }
            None => bad("clock/advance needs seconds=<integer>".into()),
        },
        ("POST", "delegated-token") => {
            match q.get("user").and_then(|u| sim.lock().delegated_token(u)) {
                Some(t) => admin_json(200, &json!({"access_token": t})),
                None => admin_json(404, &json!({"error": "no such user"})),
            }
        }
        // What the user does in a browser at https://microsoft.com/devicelogin.
        ("POST", "device-code/approve") => {
            let (Some(code), Some(user)) = (q.get("user_code"), q.get("user")) else {
                return bad("device-code/approve needs user_code and user".into());
            };
            if sim.lock().approve_device_code(code, user) {
                admin_json(200, &json!({"approved": code}))
            } else {
                admin_json(404, &json!({"error": "no such pending code or user"}))
            }
        }
        _ => admin_json(
            404,
            &json!({"error": format!("no admin endpoint {method} /_sim/{rest}")}),
        ),
    }
}
