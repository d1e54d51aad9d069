//! The HTTP face of the simulator: a hyper server whose connections can be reset or cut off
//! on purpose, plus the `/_sim` admin endpoints.

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
        let (status, v) = crate::admin::admin(&sim, &method, rest, &query, &body);
        return admin_json(status, &v);
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
