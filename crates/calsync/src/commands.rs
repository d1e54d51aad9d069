//! The one-off commands (`sync-once`, `migrate`, `status`, `resync`, `reload`,
//! `healthcheck`) and the wiring they share with `run`: config → store → Graph client → engine.

use crate::config::{Config, DatabaseConfig, RawConfig};
use anyhow::Context;
use calsync_engine::{Engine, Outcome, Tuple};
use calsync_graph::GraphClient;
use calsync_store::{StatusRow, Store};
use chrono::Utc;
use secrecy::ExposeSecret;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Connects once; the error names the database (password redacted).
pub async fn connect_store(db: &DatabaseConfig) -> anyhow::Result<Store> {
    Store::connect(
        db.url.expose_secret(),
        &calsync_store::ConnectOptions {
            max_connections: db.max_connections,
            acquire_timeout: db.connect_timeout,
            statement_timeout: db.statement_timeout,
            extra_root_pem: db.extra_root_pem.clone(),
            native_roots: db.native_roots,
        },
    )
    .await
    .with_context(|| {
        format!(
            "cannot connect to the database at {}",
            crate::config::redact_url(db.url.expose_secret())
        )
    })
}

/// Connects, retrying with backoff for up to `wait_at_start` while the database is
/// unreachable (it may be starting alongside us); then gives up with the last error.
pub async fn connect_store_patiently(db: &DatabaseConfig) -> anyhow::Result<Store> {
    use backon::{ExponentialBuilder, Retryable};
    let deadline = tokio::time::Instant::now() + db.wait_at_start;
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    (|| connect_store(db))
        .retry(backoff)
        .when(|_| tokio::time::Instant::now() < deadline)
        .notify(|e, wait| {
            warn!(
                error = format!("{e:#}"),
                retry_in_ms = wait.as_millis() as u64,
                "database unreachable; retrying"
            );
        })
        .await
}

/// Connects, migrates, builds the engine and registers the configured tuples.
pub async fn build(cfg: &Config) -> anyhow::Result<(Engine, Vec<Tuple>)> {
    build_with(cfg, true).await
}

/// [`build`], but registering the configured calendars only, never untracking the others:
/// one-off commands share the database with the daemon and must leave its calendars alone.
pub async fn build_for_one_off(cfg: &Config) -> anyhow::Result<(Engine, Vec<Tuple>)> {
    build_with(cfg, false).await
}

async fn build_with(cfg: &Config, reconcile: bool) -> anyhow::Result<(Engine, Vec<Tuple>)> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    for key in cfg.clear_text_endpoints() {
        warn!(
            key,
            "graph.allow_insecure_http: this URL is plain http to a host that is not loopback; the client secret and access tokens travel in clear"
        );
    }
    let store = connect_store_patiently(&cfg.database).await?;
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    let graph = GraphClient::new(cfg.graph.clone(), cfg.auth.clone())
        .context("cannot build the Graph client")?;
    let engine = Engine::new(graph, store, cfg.sync.clone());
    let registered = if reconcile {
        engine.register(&cfg.tuples).await
    } else {
        engine.register_only(&cfg.tuples).await
    };
    let tuples = registered.context("cannot register the configured calendars")?;
    Ok((engine, tuples))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `calsync sync-once`: one complete round per tuple. Returns whether all succeeded.
pub async fn sync_once(cfg: Config) -> anyhow::Result<bool> {
    let (engine, tuples) = build_for_one_off(&cfg).await?;
    let cancel = CancellationToken::new();
    let outcomes = tokio::select! {
        o = engine.sync_all_once(&tuples, &cancel) => o,
        _ = shutdown_signal() => { cancel.cancel(); anyhow::bail!("interrupted") }
    };
    let (text, ok) = outcome_report(&outcomes);
    print!("{text}");
    Ok(ok)
}

/// One line per tuple, and whether every round succeeded (`sync-once`'s exit code).
pub fn outcome_report(outcomes: &[(Tuple, Outcome)]) -> (String, bool) {
    let mut ok = true;
    let mut out = String::new();
    for (t, o) in outcomes {
        let line = match o {
            Outcome::Synced(r) => format!(
                "ok      {:<40} pages={} upserted={} removed={} swept={}{}",
                t.key,
                r.pages,
                r.upserted,
                r.removed,
                r.swept,
                if r.full { " (full)" } else { "" }
            ),
            Outcome::Failed(f) => {
                ok = false;
                format!(
                    "{:<7} {:<40} {}: {}",
                    f.health.as_str(),
                    t.key,
                    f.code,
                    f.message
                )
            }
            Outcome::Interrupted => {
                ok = false;
                format!("stopped {:<40}", t.key)
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    (out, ok)
}

/// `calsync migrate`: applies the embedded migrations and exits.
pub async fn migrate(raw: &RawConfig) -> anyhow::Result<()> {
    let db = raw.database_config()?;
    let store = connect_store(&db).await?;
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    println!("migrations applied");
    Ok(())
}

/// `calsync resync <tuple>`: the tuple's next round is a full one with sweep.
pub async fn resync(raw: &RawConfig, tuple: &str) -> anyhow::Result<()> {
    let db = raw.database_config()?;
    let store = connect_store(&db).await?;
    let found = store
        .request_resync(tuple)
        .await
        .context("cannot mark the tuple for a full round")?;
    if !found {
        anyhow::bail!("no tracked tuple is named '{tuple}'; `calsync status` lists them");
    }
    println!(
        "{tuple}: its next round is a full resync (a running daemon picks it up at the tuple's next interval)"
    );
    Ok(())
}

/// One HTTP/1.1 request to the daemon's own endpoint on `addr`; returns status and body.
pub async fn local_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    local_request_with(addr, method, path, None).await
}

/// [`local_request`] with a bearer token (`POST /reload` requires the admin token).
pub async fn local_request_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&secrecy::SecretString>,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to {addr}"))?
        .with_context(|| format!("cannot connect to calsync's http endpoint at {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("http handshake failed")?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(token) = bearer {
        let mut value =
            hyper::header::HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .map_err(|_| anyhow::anyhow!("the admin token is not a valid header value"))?;
        value.set_sensitive(true);
        req = req.header(hyper::header::AUTHORIZATION, value);
    }
    let req = req
        .body(Empty::<hyper::body::Bytes>::new())
        .context("cannot build the request")?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 30 s"))?
        .context("request failed")?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("cannot read the answer")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Where the daemon's endpoint is; only `http.listen` is read.
fn http_listen(raw: &RawConfig) -> anyhow::Result<std::net::SocketAddr> {
    let listen = raw.http.listen.trim();
    if listen.is_empty() {
        anyhow::bail!(
            "http.listen is not set, so there is no endpoint to ask; send SIGHUP instead (systemctl reload calsync, or kill -HUP <pid>)"
        );
    }
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        anyhow::anyhow!("http.listen: '{listen}' is not host:port with an IP address")
    })?;
    // A wildcard listen address is reached on loopback.
    Ok(match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    })
}

/// `calsync reload`: checks the config, then POST /reload to the running daemon; prints
/// what changed.
pub async fn reload(raw: &RawConfig) -> anyhow::Result<bool> {
    let cfg = raw.validate()?;
    let addr = http_listen(raw)?;
    let Some(token) = &cfg.admin_token else {
        anyhow::bail!(
            "http.admin_token_file is not set, so POST /reload is off; send SIGHUP instead (systemctl reload calsync, or kill -HUP <pid>)"
        );
    };
    let (status, body) = local_request_with(addr, "POST", "/reload", Some(token)).await?;
    println!("{}", body.trim());
    Ok(status == 200)
}

/// `calsync healthcheck`: GET /healthz (for container HEALTHCHECKs: exit 0 when healthy).
pub async fn healthcheck(raw: &RawConfig) -> anyhow::Result<bool> {
    let addr = http_listen(raw)?;
    let (status, body) = local_request(addr, "GET", "/healthz").await?;
    print!("{body}");
    Ok(status == 200)
}

/// `calsync status`: every tuple's row of `calendar_sync_status`, as a table or JSON.
pub async fn status(raw: &RawConfig, json: bool) -> anyhow::Result<()> {
    let db = raw.database_config()?;
    let store = connect_store(&db).await?;
    let rows = store
        .status()
        .await
        .context("cannot read calendar_sync_status (has `calsync migrate` run?)")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", status_table(&rows));
    }
    Ok(())
}

fn age(t: Option<chrono::DateTime<Utc>>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let secs = (Utc::now() - t).num_seconds().max(0) as u64;
            format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(secs))
            )
        }
    }
}

/// A table a person can scan: one line per tuple.
pub fn status_table(rows: &[StatusRow]) -> String {
    let mut out = format!(
        "{:<36} {:<9} {:<11} {:>7} {:<22} {:>5}  {}\n",
        "TUPLE", "STATE", "PHASE", "EVENTS", "LAST SUCCESS", "FAILS", "LAST ERROR"
    );
    for r in rows {
        let key: String = if r.tuple_key.chars().count() > 36 {
            r.tuple_key.chars().take(35).chain(['…']).collect()
        } else {
            r.tuple_key.clone()
        };
        let state = if r.tracked {
            r.state.to_string()
        } else {
            format!("{} (untracked)", r.state)
        };
        let mut err = match (&r.last_error_code, &r.last_error) {
            (Some(c), Some(m)) => format!("{c}: {}", m.chars().take(80).collect::<String>()),
            _ => String::new(),
        };
        if r.incomplete_count > 0 {
            // Rows kept but not whole (a time in an unknown zone, a stub without its series).
            err = format!("{} incomplete {err}", r.incomplete_count)
                .trim_end()
                .to_owned();
        }
        out.push_str(&format!(
            "{:<36} {:<9} {:<11} {:>7} {:<22} {:>5}  {}\n",
            key,
            state,
            r.phase,
            r.event_count,
            age(r.last_success_at),
            r.consecutive_failures,
            err
        ));
    }
    out
}
