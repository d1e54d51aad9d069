//! The one-off commands (`sync-once`, `migrate`, `status`, `resync`, `reload`,
//! `healthcheck`) and the wiring they share with `run`: config → store → Graph client → engine.
//!
//! Longer than 600 lines because each command is a short function beside the wiring it shares
//! (`build_replica`, `connect`); the next command (a wake-up through PostgreSQL, issue 23)
//! should bring the split into one file per command.

use crate::config::{Config, DatabaseConfig, RawConfig};
use anyhow::Context;
use calsync_engine::{Engine, Identity, LeaseKeeper, Outcome, Tuple, TupleConfig};
use calsync_graph::GraphClient;
use calsync_store::{ReplicaKind, StatusRow, Store};
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

/// Connects, migrates, builds the engine and registers the configured tuples as the
/// deployment's set, outside any lease (the demo and the benchmarks drive it alone).
pub async fn build(cfg: &Config) -> anyhow::Result<(Engine, Vec<Tuple>)> {
    let b = build_with(cfg, None).await?;
    Ok((b.engine, b.tuples))
}

/// A replica as built: connected, migrated, its set registered or followed.
#[derive(Debug)]
pub struct Built {
    /// The engine.
    pub engine: Engine,
    /// The tuples it serves: a `run` replica's are the deployment's tracked set as stored; a
    /// one-off command's are its config's.
    pub tuples: Vec<Tuple>,
    /// The keeper of its mailbox leases.
    pub keeper: LeaseKeeper,
    /// Whether the config's `[[sources]]` were resolved (always true without sources, or when
    /// the set was followed rather than registered).
    pub sources_resolved: bool,
    /// The deployment's tracked set as this replica found or wrote it.
    pub set: FollowedSet,
    /// A one-off command beside a running daemon: the calendars it was asked for, registered
    /// nothing (their rounds are asked of the replicas that hold their mailboxes).
    pub beside_daemon: Option<Vec<TupleConfig>>,
}

/// Where a replica stands against the deployment's tracked set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowedSet {
    /// The generation it serves.
    pub generation: i64,
    /// That generation's config digest.
    pub digest: String,
    /// Its own config is one the deployment ran and replaced: it follows the database's set
    /// and registers nothing of its own until reloaded with the current file.
    pub stale: bool,
}

/// A replica of the config's deployment: [`build`], with every commit fenced by mailbox
/// leases held as a new incarnation of `service.replica`, and the keeper of those leases.
/// A `run` replica registers its config as the deployment's set unless its file is one the
/// deployment replaced (a stale file: it follows the stored set instead), then serves the
/// stored set; a one-off command registers its calendars only and never untracks the others.
pub async fn build_replica(cfg: &Config, kind: ReplicaKind) -> anyhow::Result<Built> {
    let o = &cfg.ownership;
    let replica = match kind {
        ReplicaKind::Run => o.replica.clone(),
        ReplicaKind::OneOff => format!("{}-sync-once", o.replica),
    };
    let identity = Identity::new(&replica, kind, o.lease_ttl);
    let b = build_with(cfg, Some(identity)).await?;
    Ok(Built {
        keeper: b.keeper.context("the engine was fenced twice")?,
        engine: b.engine,
        tuples: b.tuples,
        sources_resolved: b.sources_resolved,
        set: b.set,
        beside_daemon: b.beside,
    })
}

struct BuiltWith {
    engine: Engine,
    tuples: Vec<Tuple>,
    keeper: Option<LeaseKeeper>,
    sources_resolved: bool,
    set: FollowedSet,
    beside: Option<Vec<TupleConfig>>,
}

async fn build_with(cfg: &Config, identity: Option<Identity>) -> anyhow::Result<BuiltWith> {
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
    let mut store = store
        .for_deployment(&cfg.ownership.deployment)
        .with_feed(cfg.changes.enabled)
        .with_feed_retention(cfg.changes.retention)
        .with_feed_payload(cfg.changes.payload);
    if let Some(id) = &identity {
        store = store.as_incarnation(&id.incarnation);
    }
    let graph = GraphClient::new(cfg.graph.clone(), cfg.auth.clone())
        .context("cannot build the Graph client")?;
    let engine = Engine::new(graph, store, cfg.sync.clone());
    engine.with_accounts(calsync_engine::AccountSettings {
        auth: cfg.auth.clone(),
        vault: cfg.vault.clone(),
    });
    let one_off = identity
        .as_ref()
        .is_some_and(|i| i.kind == ReplicaKind::OneOff);
    let keeper_of =
        |engine: &Engine, identity: Option<Identity>| identity.and_then(|id| engine.fence_with(id));
    if one_off {
        let (configs, _) = with_discovered(&engine, cfg).await;
        // Beside a running daemon, a one-off command rewrites nothing the daemon serves: it
        // asks the replica holding each mailbox for the round (issue 23).
        if engine
            .store()
            .daemon_alive()
            .await
            .context("cannot read the deployment's replicas")?
        {
            let keeper = keeper_of(&engine, identity);
            return Ok(BuiltWith {
                engine,
                tuples: Vec::new(),
                keeper,
                sources_resolved: true,
                set: FollowedSet {
                    generation: 0,
                    digest: cfg.digest.clone(),
                    stale: false,
                },
                beside: Some(configs),
            });
        }
        let write = calsync_store::SetWrite {
            cause: "sync-once",
            ..Default::default()
        };
        let (tuples, generation) = engine
            .register_set(&configs, false, &write)
            .await
            .context("cannot register the configured calendars")?;
        let keeper = keeper_of(&engine, identity);
        let set = FollowedSet {
            generation,
            digest: cfg.digest.clone(),
            stale: false,
        };
        return Ok(BuiltWith {
            engine,
            tuples,
            keeper,
            sources_resolved: true,
            set,
            beside: None,
        });
    }
    let found = engine
        .store()
        .tracked_set()
        .await
        .context("cannot read the deployment's tracked set")?;
    // A file the deployment ran and replaced is stale: registering it would revert the set
    // another replica's reload wrote (issue 23). Any other file is the operator's intent: the
    // deployment's first config, the one in force, or a new one (a rollout).
    let stale = found.generation > 0
        && found.config_digest != cfg.digest
        && engine
            .store()
            .config_superseded(&cfg.digest)
            .await
            .context("cannot read the deployment's config history")?;
    let mut sources_resolved = true;
    if stale {
        warn!(
            generation = found.generation,
            deployment_digest = %found.config_digest,
            file_digest = %cfg.digest,
            "this replica's config file is one the deployment replaced: it serves the deployment's current set and registers nothing; reload it once its file is current"
        );
    } else {
        // With sources, the set is whole only once they are resolved: until then nothing is
        // untracked (what an earlier pass found stays in the read model).
        let (configs, whole) = with_discovered(&engine, cfg).await;
        sources_resolved = whole;
        let write = calsync_store::SetWrite {
            cause: "start",
            digest: Some(cfg.digest.clone()),
            based_on: None,
            anchor: Some(cfg.anchor),
        };
        let (registered, generation) = engine
            .register_set(&configs, whole, &write)
            .await
            .context("cannot register the configured calendars")?;
        if whole {
            // Registered whole: the stored set is exactly these (reading 100,000 rows back
            // would cost a second at start and their transient copies stay in RSS). A
            // registration by another replica meanwhile is caught up by the first follow.
            let keeper = keeper_of(&engine, identity);
            return Ok(BuiltWith {
                engine,
                tuples: registered,
                keeper,
                sources_resolved,
                set: FollowedSet {
                    generation,
                    digest: cfg.digest.clone(),
                    stale: false,
                },
                beside: None,
            });
        }
    }
    let (set, stored, _) = engine
        .tracked_since(-1)
        .await
        .context("cannot read the deployment's tracked set")?;
    let tuples: Vec<Tuple> = stored.into_iter().filter_map(|(_, t)| t).collect();
    let keeper = keeper_of(&engine, identity);
    Ok(BuiltWith {
        engine,
        tuples,
        keeper,
        sources_resolved,
        set: FollowedSet {
            generation: set.generation,
            stale: set.config_digest != cfg.digest,
            digest: set.config_digest,
        },
        beside: None,
    })
}

/// How long a discovery pass at start may take before the daemon starts without it (and
/// tries again on its own cadence).
const DISCOVERY_AT_START: std::time::Duration = std::time::Duration::from_secs(120);

/// The config's calendars plus what its sources resolve to now, and whether the sources were
/// resolved (a failed pass leaves the configured calendars only, and says so).
pub async fn with_discovered(engine: &Engine, cfg: &Config) -> (Vec<TupleConfig>, bool) {
    if cfg.sources.is_empty() {
        return (cfg.tuples.clone(), true);
    }
    let anchor = cfg.window_rebase.anchor(chrono::Utc::now());
    let pass = engine.discover(&cfg.sources, anchor, cfg.discovery.refused_recheck);
    match tokio::time::timeout(DISCOVERY_AT_START, pass).await {
        Ok(Ok(found)) => {
            log_discovered(&found);
            (merge_discovered(&cfg.tuples, found.tuples), true)
        }
        Ok(Err(e)) => {
            warn!(error = %e, "cannot resolve [[sources]]; starting with what was found before, trying again");
            (cfg.tuples.clone(), false)
        }
        Err(_) => {
            warn!(
                "resolving [[sources]] took longer than {}s; starting with what was found before, trying again",
                DISCOVERY_AT_START.as_secs()
            );
            (cfg.tuples.clone(), false)
        }
    }
}

/// Configured calendars first; a discovered tuple with a configured calendar's name is left out.
pub fn merge_discovered(configured: &[TupleConfig], found: Vec<TupleConfig>) -> Vec<TupleConfig> {
    let names: std::collections::HashSet<&str> =
        configured.iter().map(|t| t.key.as_str()).collect();
    let mut all = configured.to_vec();
    all.extend(
        found
            .into_iter()
            .filter(|t| !names.contains(t.key.as_str())),
    );
    all
}

/// One line per source: what it listed, left out, was refused and gives.
pub fn log_discovered(found: &calsync_engine::Discovered) {
    for (source, c) in &found.counts {
        tracing::info!(
            source = %source,
            listed = c.listed,
            skipped = c.skipped,
            refused = c.refused,
            calendars = c.tuples,
            "source resolved"
        );
    }
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

/// SIGHUPs as they arrive, one message each (`main` passes the process's to `calsync run`;
/// a test may pass its own).
pub type Hangups = tokio::sync::mpsc::UnboundedReceiver<()>;

/// SIGHUPs, as `calsync run` takes them: one message each.
pub fn hangups() -> anyhow::Result<Hangups> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use anyhow::Context;
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(tx);
    Ok(rx)
}

/// `calsync sync-once`: one complete round per tuple. Returns whether all succeeded.
///
/// It runs as a one-off replica of the config's deployment: it syncs the calendars of the
/// mailboxes whose lease is free, holding those leases (renewed) until it is done, and leaves
/// a mailbox a running replica holds to that replica, saying so. It never untracks or purges.
pub async fn sync_once(cfg: Config) -> anyhow::Result<bool> {
    let Built {
        engine,
        tuples,
        keeper,
        beside_daemon,
        ..
    } = build_replica(&cfg, ReplicaKind::OneOff).await?;
    let mut tuples = tuples;
    let mut asked_ok = true;
    if let Some(configs) = beside_daemon {
        // Calendars the deployment tracks are asked of their holders; ones it does not track
        // are registered beside its set and synced here, as without a daemon.
        let (asked, new) = ask_the_daemon(&engine, &configs, &cfg.ownership.deployment).await?;
        asked_ok = asked;
        if new.is_empty() {
            return Ok(asked_ok);
        }
        let write = calsync_store::SetWrite {
            cause: "sync-once",
            ..Default::default()
        };
        tuples = engine
            .register_set(&new, false, &write)
            .await
            .context("cannot register the configured calendars")?
            .0;
    }
    let mut mailboxes: Vec<String> = tuples.iter().map(|t| t.mailbox.clone()).collect();
    mailboxes.sort();
    mailboxes.dedup();
    let held = keeper
        .acquire_only(&mailboxes)
        .await
        .context("cannot take the mailboxes' leases")?;
    let (mine, theirs): (Vec<Tuple>, Vec<Tuple>) =
        tuples.into_iter().partition(|t| held.contains(&t.mailbox));
    let cancel = CancellationToken::new();
    let (changed, _) = tokio::sync::watch::channel(0);
    let result = tokio::select! {
        o = engine.sync_all_once(&mine, &cancel) => Ok(o),
        _ = keeper.run(cancel.clone(), changed) => Err(anyhow::anyhow!("the lease keeper stopped")),
        _ = shutdown_signal() => { cancel.cancel(); Err(anyhow::anyhow!("interrupted")) }
    };
    if let Err(e) = keeper.retire().await {
        warn!(error = %e, "cannot release the leases; they lapse after service.lease_ttl");
    }
    let outcomes = result?;
    let (text, mut ok) = outcome_report(&outcomes);
    print!("{text}");
    if !theirs.is_empty() {
        let busy: Vec<String> = theirs.iter().map(|t| t.mailbox.clone()).collect();
        let owners = engine.store().lease_owners(&busy).await.unwrap_or_default();
        for t in &theirs {
            let owner = owners
                .iter()
                .find(|o| o.mailbox == t.mailbox)
                .and_then(|o| o.replica.clone())
                .unwrap_or_else(|| "another process".into());
            println!(
                "skipped {:<40} its mailbox is leased to replica {owner} of deployment '{}', which syncs it",
                t.key, cfg.ownership.deployment
            );
        }
        ok = false;
    }
    Ok(ok && asked_ok)
}

/// How long `sync-once` beside a daemon waits for the rounds it asked for.
const ASK_DEADLINE: Duration = Duration::from_secs(600);
/// How long it waits for a replica to take a request: the holder takes it within its 2 s poll,
/// and a mailbox nobody holds is taken within a heartbeat or two.
const TAKE_DEADLINE: Duration = Duration::from_secs(60);

/// `sync-once` beside a running daemon: each configured calendar the deployment tracks as
/// configured gets its round from the replica that holds its mailbox, asked through the
/// database; the command waits for each and reports it. A calendar the deployment tracks
/// differently is named and not rewritten. Answers whether all of that went well, and the
/// calendars the deployment does not track (the caller syncs those itself).
async fn ask_the_daemon(
    engine: &Engine,
    configs: &[TupleConfig],
    deployment: &str,
) -> anyhow::Result<(bool, Vec<TupleConfig>)> {
    let (_, stored, _) = engine
        .tracked_since(-1)
        .await
        .context("cannot read the deployment's tracked set")?;
    let stored: std::collections::HashMap<String, Tuple> = stored
        .into_iter()
        .filter_map(|(k, t)| Some((k, t?)))
        .collect();
    let mut ok = true;
    let mut keys = Vec::new();
    let mut new = Vec::new();
    for c in configs {
        match stored.get(&c.key) {
            Some(t) if t.user == c.user && t.calendar == c.calendar && t.window == c.window => {
                keys.push(c.key.clone())
            }
            Some(_) => {
                ok = false;
                println!(
                    "skipped {:<40} the running deployment '{deployment}' tracks it with another mailbox, calendar or window; not rewritten (reload the daemon to change it)",
                    c.key
                );
            }
            None => new.push(c.clone()),
        }
    }
    if keys.is_empty() {
        return Ok((ok, new));
    }
    let store = engine.store();
    let asked = store
        .request_rounds(&keys)
        .await
        .context("cannot ask the daemon for rounds")?;
    let ids: Vec<i64> = asked.iter().map(|(id, _)| *id).collect();
    let asked_at = tokio::time::Instant::now();
    let answered = loop {
        let now = store
            .round_requests(&ids)
            .await
            .context("cannot read the rounds asked for")?;
        let open: Vec<&calsync_store::RoundRequest> =
            now.iter().filter(|r| r.done_at.is_none()).collect();
        let waited = asked_at.elapsed();
        if open.is_empty()
            || waited >= ASK_DEADLINE
            || (waited >= TAKE_DEADLINE && open.iter().all(|r| r.taken_by.is_none()))
        {
            break now;
        }
        let wait = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            _ = wait => {}
            _ = shutdown_signal() => {
                let _ = store.withdraw_round_requests(&ids).await;
                anyhow::bail!("interrupted; the rounds asked for were withdrawn");
            }
        }
    };
    let pending: Vec<i64> = answered
        .iter()
        .filter(|r| r.done_at.is_none())
        .map(|r| r.id)
        .collect();
    if !pending.is_empty() {
        let _ = store.withdraw_round_requests(&pending).await;
    }
    let owners = store.incarnation_replicas().await.unwrap_or_default();
    for r in &answered {
        let by = r
            .taken_by
            .as_ref()
            .map(|i| owners.get(i).cloned().unwrap_or_else(|| i.clone()))
            .unwrap_or_else(|| "no replica".into());
        match (r.done_at, r.outcome.as_deref()) {
            (Some(_), Some("ok")) => {
                println!("ok      {:<40} round run by replica {by}", r.tuple_key)
            }
            (Some(_), outcome) => {
                ok = false;
                println!(
                    "failed  {:<40} round run by replica {by}: {} {}",
                    r.tuple_key,
                    outcome.unwrap_or("-"),
                    r.detail.as_deref().unwrap_or("")
                );
            }
            (None, _) if r.taken_by.is_none() => {
                ok = false;
                println!(
                    "failed  {:<40} no replica took the round within {}s (does one hold its mailbox?)",
                    r.tuple_key,
                    TAKE_DEADLINE.as_secs()
                );
            }
            (None, _) => {
                ok = false;
                println!(
                    "failed  {:<40} not answered within {}s ({by} took it)",
                    r.tuple_key,
                    ASK_DEADLINE.as_secs()
                );
            }
        }
    }
    Ok((ok, new))
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
    let m = store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    match m.applied.as_slice() {
        [] => println!("migrations: the database is current"),
        v => println!(
            "migrations applied: {}",
            v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
    if !m.unknown.is_empty() {
        let names: Vec<String> = m.unknown.iter().map(|(v, d)| format!("{v} {d}")).collect();
        println!(
            "the database also has migrations of a newer calsync, left alone: {}",
            names.join(", ")
        );
    }
    Ok(())
}

/// `calsync resync <tuple>`: the tuple's next round is a full one with sweep.
pub async fn resync(raw: &RawConfig, tuple: &str) -> anyhow::Result<()> {
    let db = raw.database_config()?;
    let deployment = raw.ownership()?.deployment;
    let store = connect_store(&db).await?.for_deployment(&deployment);
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

/// What `calsync status` shows.
#[derive(Debug, Clone, Default)]
pub struct StatusArgs {
    /// JSON instead of a table.
    pub json: bool,
    /// The rows asked for.
    pub query: calsync_store::StatusQuery,
}

/// Rows a table shows unless told otherwise: at 100,000 calendars the whole list helps nobody.
pub const STATUS_TABLE_ROWS: u64 = 100;

/// `calsync status`: counts by state and by owner, then the config's deployment's rows of
/// `calendar_sync_status` (filtered, sorted and paged as asked), as a table or JSON.
pub async fn status(raw: &RawConfig, args: &StatusArgs) -> anyhow::Result<()> {
    let db = raw.database_config()?;
    let deployment = raw.ownership()?.deployment;
    let store = connect_store(&db).await?.for_deployment(&deployment);
    let read = "cannot read calendar_sync_status (has `calsync migrate` run?)";
    let summary = store.status_summary().await.context(read)?;
    let mut query = args.query.clone();
    if !args.json && query.limit.is_none() {
        query.limit = Some(STATUS_TABLE_ROWS);
    }
    let rows = store.status_page(&query).await.context(read)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut states: Vec<String> = summary
        .by_state
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    if summary.stale > 0 {
        states.push(format!("{} stale", summary.stale));
    }
    println!(
        "deployment {deployment}: {} calendars tracked ({}), {} without a live owner, oldest success {}",
        summary.tracked,
        if states.is_empty() {
            "none".into()
        } else {
            states.join(", ")
        },
        summary.unowned,
        summary
            .oldest_lag_seconds
            .map(|s| format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(s.max(0.0) as u64))
            ))
            .unwrap_or_else(|| "-".into()),
    );
    if let Ok(set) = store.tracked_set().await {
        if set.generation > 0 {
            println!(
                "tracked set: generation {} ({} by {} at {})",
                set.generation,
                set.cause,
                set.written_by.split('#').next().unwrap_or("-"),
                set.written_at.format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
    }
    for replica in store.stale_replicas().await.unwrap_or_default() {
        println!(
            "replica {replica}: its config file is not the deployment's; it serves the deployment's set and registers nothing (fix its file, or reload a replica with the current one)"
        );
    }
    print!("{}", status_table(&rows));
    let shown = query.offset + rows.len() as u64;
    let matching = match query.state {
        _ if query.stale => summary.stale,
        Some(st) => summary
            .by_state
            .iter()
            .find(|(s, _)| *s == st)
            .map_or(0, |(_, n)| *n),
        None => summary.tracked,
    };
    if rows.len() as u64 == query.limit.unwrap_or(u64::MAX) && shown < matching {
        println!(
            "… showing {} of {matching}; --limit, --offset, --state and --oldest choose others",
            rows.len()
        );
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

/// Why an overdue tuple is not being synced, as far as the database tells: nobody holds its
/// mailbox, its owner stood down (its lease moved), or is waiting out Graph's throttling, or
/// simply has not completed a round of it.
pub fn stale_reason(r: &StatusRow) -> String {
    match (&r.owner, r.last_error_code.as_deref()) {
        (None, _) => "overdue: no live replica holds its mailbox".into(),
        (Some(o), Some("LeaseLost" | "Superseded")) => {
            format!("overdue: {o} stood down from it (its lease or definition moved)")
        }
        (Some(o), Some("TooManyRequests" | "ServiceUnavailable" | "ApplicationThrottled")) => {
            format!("overdue: {o} is waiting for Graph's Retry-After")
        }
        (Some(o), _) => format!("overdue: {o} has not completed a round of it"),
    }
}

/// A table a person can scan: one line per tuple. The TUPLE column is as wide as the longest
/// name shown: discovered names (`source:user@domain/calendar`) differ at their end, so a cut
/// one made a user's calendars look alike (issue 23).
pub fn status_table(rows: &[StatusRow]) -> String {
    let width = rows
        .iter()
        .map(|r| r.tuple_key.chars().count())
        .max()
        .unwrap_or(0)
        .max("TUPLE".len());
    // The PUSH column (each calendar's subscription) only where push is on.
    let pushed = rows.iter().any(|r| r.push.is_some());
    let push_col = |v: &str| {
        if pushed {
            format!(" {v:<8}")
        } else {
            String::new()
        }
    };
    let mut out = format!(
        "{:<width$} {:<9} {:<11} {:>7} {:<22} {:>5}{} {:<20} {}\n",
        "TUPLE",
        "STATE",
        "PHASE",
        "EVENTS",
        "LAST SUCCESS",
        "FAILS",
        push_col("PUSH"),
        "OWNER",
        "LAST ERROR"
    );
    for r in rows {
        let state = if r.stale {
            "stale".to_owned()
        } else if r.tracked {
            r.state.to_string()
        } else {
            format!("{} (untracked)", r.state)
        };
        let mut err = match (&r.last_error_code, &r.last_error) {
            (Some(c), Some(m)) => format!("{c}: {}", m.chars().take(80).collect::<String>()),
            _ => String::new(),
        };
        if r.stale {
            err = format!("{}; {err}", stale_reason(r))
                .trim_end_matches("; ")
                .to_owned();
        }
        if r.incomplete_count > 0 {
            // Rows kept but not whole (a time in an unknown zone, a stub without its series).
            err = format!("{} incomplete {err}", r.incomplete_count)
                .trim_end()
                .to_owned();
        }
        let line = format!(
            "{:<width$} {:<9} {:<11} {:>7} {:<22} {:>5}{} {:<20} {}",
            r.tuple_key,
            state,
            r.phase,
            r.event_count,
            age(r.last_success_at),
            r.consecutive_failures,
            push_col(r.push.as_deref().unwrap_or("-")),
            r.owner.as_deref().unwrap_or("-"),
            err
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `calsync discover`: the calendars the config's sources resolve to now (and its
/// `[[calendars]]`), printed; nothing is synced and the database is not opened. False if the
/// directory could not be read.
pub async fn discover(cfg: &Config, json: bool) -> anyhow::Result<bool> {
    if cfg.sources.is_empty() {
        anyhow::bail!("the config has no [[sources]] to discover");
    }
    let graph = GraphClient::new(cfg.graph.clone(), cfg.auth.clone())
        .context("cannot build the Graph client")?;
    let gate =
        calsync_engine::RequestGate::new(cfg.sync.max_in_flight, cfg.sync.per_mailbox_concurrency);
    let directory = calsync_engine::Directory {
        graph: &graph,
        gate: &gate,
        backoff: (cfg.sync.min_backoff, cfg.sync.max_backoff),
    };
    let anchor = cfg.window_rebase.anchor(Utc::now());
    let refusals = calsync_engine::Refusals::default();
    let found = directory
        .discover(
            &cfg.sources,
            anchor,
            &refusals,
            cfg.discovery.refused_recheck,
        )
        .await
        .context("cannot resolve [[sources]]")?;
    let calendar = |t: &TupleConfig| match &t.calendar {
        calsync_graph::CalendarRef::Default => "default".to_owned(),
        calsync_graph::CalendarRef::Id(id) => id.clone(),
    };
    if json {
        let tuples: Vec<serde_json::Value> = found
            .tuples
            .iter()
            .map(|t| {
                serde_json::json!({"tuple": t.key, "user": t.user, "calendar": calendar(t),
                    "window": t.window.to_string(), "rolling": t.rolling.is_some()})
            })
            .collect();
        let sources: serde_json::Map<String, serde_json::Value> = found
            .counts
            .iter()
            .map(|(k, c)| {
                (
                    k.clone(),
                    serde_json::json!({"listed": c.listed, "skipped": c.skipped,
                    "refused": c.refused, "calendars": c.tuples}),
                )
            })
            .collect();
        let refused: Vec<serde_json::Value> = found
            .refused
            .iter()
            .map(|r| serde_json::json!({"mailbox": r.address, "code": r.code}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "sources": sources, "calendars": tuples, "refused": refused,
                "configured": cfg.tuples.len(),
            }))?
        );
        return Ok(true);
    }
    for (source, c) in &found.counts {
        println!(
            "source {source}: {} mailboxes listed, {} left out (excluded or no mail address), {} refused by Graph, {} calendars",
            c.listed, c.skipped, c.refused, c.tuples
        );
    }
    println!("{:<60} {:<40} WINDOW", "TUPLE", "CALENDAR");
    for t in &found.tuples {
        println!("{:<60} {:<40} {}", t.key, calendar(t), t.window);
    }
    for r in &found.refused {
        println!("refused: {} ({})", r.address, r.code);
    }
    for source in &found.empty_window {
        println!("source {source}: its window is empty now (a fixed end the rolling start passed)");
    }
    println!(
        "{} calendars from sources, {} configured in [[calendars]]",
        found.tuples.len(),
        cfg.tuples.len()
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use calsync_store::TupleStatus;

    fn row(key: &str) -> StatusRow {
        StatusRow {
            tuple_key: key.into(),
            user_id: "user0000@contoso.onmicrosoft.com".into(),
            calendar_id: "default".into(),
            window_start: Utc::now(),
            window_end: Utc::now(),
            tracked: true,
            phase: "incremental".into(),
            state: TupleStatus::Ok,
            last_success_at: Some(Utc::now()),
            last_full_sync_at: None,
            last_attempt_at: None,
            last_error: None,
            last_error_code: None,
            consecutive_failures: 0,
            event_count: 3,
            incomplete_count: 0,
            deployment: "default".into(),
            owner: None,
            stale: false,
            push: None,
        }
    }

    /// The demo showed `staff:user0000@contoso.onmicrosoft.…` twice: a user's calendars differ
    /// only at the end of their names (issue 23).
    #[test]
    fn status_shows_whole_tuple_names_in_one_aligned_column() {
        let keys = [
            "staff:user0000@contoso.onmicrosoft.com/Calendar",
            "staff:user0000@contoso.onmicrosoft.com/Team planning",
            "short",
        ];
        let table = status_table(&keys.map(row));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        for k in keys {
            assert!(table.contains(k), "{k} cut in:\n{table}");
        }
        // Every STATE column starts where the header's does.
        let at = lines[0].find("STATE").unwrap();
        for l in &lines[1..] {
            assert_eq!(&l[at..at + 2], "ok", "{table}");
        }
    }
}
