//! Shared set-up for end-to-end tests: a seeded simulator on loopback, a fresh database from
//! `#[sqlx::test]`, and an engine wired to both exactly as the daemon wires them; and for the
//! process-level tests, the binary and the server they run it against.

use calsync_engine::{Engine, Outcome, SyncSettings, Tuple, TupleConfig};
use calsync_graph::{AuthConfig, CalendarRef, GraphClient, GraphConfig, ViewWindow};
use calsync_store::Store;
use chrono::{DateTime, Utc};
use graph_sim::{Sim, SimConfig, SimServer};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const USER: &str = "adele@contoso.onmicrosoft.com";

/// The real `calsync` binary, for the process-level tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_calsync");

/// The simulator's settings for calsync's tests: the default `outlook` profile, so every test
/// meets series as production Outlook serves them (stubs, listed masters, silent cancellations).
pub fn sim_config() -> SimConfig {
    SimConfig::default()
}

/// A config file naming the database at `db`, Graph at `graph` and its token endpoint `token`
/// (with the simulator's client credentials), followed by `sections` as written.
pub fn config_file(db: &str, graph: &str, token: &str, sections: &str) -> String {
    format!(
        r#"
[database]
url = "{db}"

[graph]
base_url = "{graph}"

[auth]
token_url = "{token}"
client_id = "{id}"
client_secret = "{secret}"

{sections}"#,
        id = graph_sim::DEFAULT_CLIENT_ID,
        secret = graph_sim::DEFAULT_CLIENT_SECRET,
    )
}

/// The address a daemon bound for `http.listen = "127.0.0.1:0"`: the last one its log names
/// (a log appended across restarts names each).
pub fn bound_addr(log: &str) -> Option<std::net::SocketAddr> {
    log.lines()
        .rev()
        .find(|l| l.contains("http endpoint listening"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
}

/// Writes `calsync.toml` in `dir` for the database at `db` and the simulator `server`, with
/// `sections` after the connection sections; returns its path.
pub fn write_config(
    dir: &std::path::Path,
    db: &str,
    server: &SimServer,
    sections: &str,
) -> std::path::PathBuf {
    let path = dir.join("calsync.toml");
    let text = config_file(
        db,
        &server.graph_base_url(),
        &server.token_url(graph_sim::DEFAULT_TENANT),
        sections,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `calsync run --config <config>` as a child process logging (at info) to `log`, killed by
/// its pid when the returned guard drops, however the test ends.
pub fn run_daemon(config: &std::path::Path, log: &std::path::Path) -> Daemon {
    let logfile = std::fs::File::create(log).unwrap();
    Daemon(
        std::process::Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .unwrap(),
    )
}

/// A daemon [`run_daemon`] started; killed on drop.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The PostgreSQL server the process-level tests create their databases on.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a PostgreSQL server for these tests")
}

pub fn window() -> ViewWindow {
    ViewWindow {
        start: "2026-01-01T00:00:00Z".parse().unwrap(),
        end: "2026-04-01T00:00:00Z".parse().unwrap(),
    }
}

pub fn settings() -> SyncSettings {
    SyncSettings {
        min_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        ..SyncSettings::default()
    }
}

pub struct Harness {
    pub sim: Sim,
    pub server: SimServer,
    pub store: Store,
    pub page_size: u32,
}

pub async fn harness(pool: PgPool, page_size: u32) -> Harness {
    harness_with(pool, page_size, sim_config()).await
}

pub async fn harness_with(pool: PgPool, page_size: u32, cfg: SimConfig) -> Harness {
    harness_full(Store::from_pool(pool), page_size, cfg).await
}

/// A harness on a store connected elsewhere (a private cluster the test stops and starts).
pub async fn harness_on(store: Store, page_size: u32) -> Harness {
    harness_full(store, page_size, sim_config()).await
}

async fn harness_full(store: Store, page_size: u32, cfg: SimConfig) -> Harness {
    let sim = Sim::new(&cfg);
    {
        let mut st = sim.lock();
        let u = st.tenant.add_user(USER, None, "Adele Vance");
        st.tenant.add_calendar(u, "Work");
        st.tenant
            .add_user("alex@contoso.onmicrosoft.com", None, "Alex Wilber");
    }
    let server = sim.serve("127.0.0.1:0").await.unwrap();
    store.migrate().await.unwrap();
    Harness {
        sim,
        server,
        store,
        page_size,
    }
}

impl Harness {
    pub fn graph_config(&self) -> GraphConfig {
        let mut g = GraphConfig::new(self.server.graph_base_url().parse().unwrap());
        g.page_size = Some(self.page_size);
        g.request_timeout = Duration::from_secs(10);
        g
    }

    pub fn auth(&self) -> AuthConfig {
        sim_auth(&self.server)
    }

    pub fn graph(&self) -> GraphClient {
        GraphClient::new(self.graph_config(), self.auth()).unwrap()
    }

    /// A fresh engine, as after a process restart: new client, new gate, same database.
    pub fn engine(&self, settings: SyncSettings) -> Engine {
        Engine::new(self.graph(), self.store.clone(), settings)
    }

    pub async fn tuples(&self, engine: &Engine, specs: &[(&str, &str, &str)]) -> Vec<Tuple> {
        let cfgs: Vec<TupleConfig> = specs
            .iter()
            .map(|(key, user, cal)| TupleConfig {
                key: key.to_string(),
                user: user.to_string(),
                account: None,
                calendar: if *cal == "default" {
                    CalendarRef::Default
                } else {
                    CalendarRef::Id(cal.to_string())
                },
                window: window(),
                rolling: None,
                schedule: None,
                interval: Some(Duration::from_secs(1)),
            })
            .collect();
        engine.register(&cfgs).await.unwrap()
    }

    pub async fn default_tuple(&self, engine: &Engine) -> Tuple {
        self.tuples(engine, &[("adele", USER, "default")])
            .await
            .remove(0)
    }

    pub fn create(&self, body: Value) -> String {
        let mut st = self.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        let patch = graph_sim::writes::EventPatch::from_json(&body).unwrap();
        st.tenant.create_event(u, 0, &patch).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn update(&self, id: &str, body: Value) {
        let mut st = self.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        let patch = graph_sim::writes::EventPatch::from_json(&body).unwrap();
        st.tenant.update_event(u, None, id, &patch).unwrap();
    }

    pub fn delete(&self, id: &str) {
        let mut st = self.sim.lock();
        let u = st.tenant.user_index(USER).unwrap();
        st.tenant.delete_event(u, None, id).unwrap();
    }

    /// Asserts the read model equals the simulator's truth for every tuple given.
    pub async fn assert_mirrors(&self, tuples: &[Tuple]) {
        let d = calsync_testkit::compare(&self.store, &self.sim, tuples)
            .await
            .unwrap();
        for x in &d {
            assert!(
                x.is_empty(),
                "{} diverges: missing {:?}, extra {:?}, different {:?}",
                x.tuple,
                x.missing,
                x.extra,
                x.different
            );
        }
    }

    pub fn instances(&self, tuple: &Tuple) -> Vec<graph_sim::TruthItem> {
        let w = tuple.window;
        self.sim
            .lock()
            .truth(
                &tuple.user,
                tuple.calendar_name(),
                graph_sim::Window {
                    start: w.start,
                    end: w.end,
                },
            )
            .unwrap()
    }
}

/// Client credentials for the simulator's default app.
pub fn sim_auth(server: &SimServer) -> AuthConfig {
    calsync_testkit::sim::auth(&format!("http://{}", server.addr)).unwrap()
}

pub fn at(s: &str) -> Value {
    json!({"dateTime": s, "timeZone": "UTC"})
}

pub fn single(subject: &str, start: &str, end: &str) -> Value {
    json!({"subject": subject, "start": at(start), "end": at(end)})
}

pub fn weekly(subject: &str, start: &str, end: &str, count: u32) -> Value {
    json!({"subject": subject, "start": at(start), "end": at(end),
        "recurrence": {"pattern": {"type": "weekly", "interval": 1, "daysOfWeek": ["monday"]},
                       "range": {"type": "numbered", "startDate": &start[..10], "numberOfOccurrences": count}}})
}

/// Some singles and a weekly series inside the window, one event outside.
pub fn seed(h: &Harness, singles: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..singles {
        let day = 2 + i % 80;
        let start: DateTime<Utc> = window().start
            + chrono::Duration::days(day as i64)
            + chrono::Duration::hours(9 + (i % 8) as i64);
        let s = start.format("%Y-%m-%dT%H:%M:%S").to_string();
        let e = (start + chrono::Duration::minutes(30))
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string();
        ids.push(h.create(single(&format!("meeting {i} — café ☕"), &s, &e)));
    }
    ids.push(h.create(weekly(
        "weekly sync",
        "2026-01-05T08:00:00",
        "2026-01-05T08:30:00",
        10,
    )));
    h.create(single(
        "far away",
        "2026-09-01T10:00:00",
        "2026-09-01T11:00:00",
    ));
    ids
}

/// A simulator fault rule from its JSON form.
pub fn rule(v: Value) -> graph_sim::FaultRule {
    serde_json::from_value(v).unwrap()
}

/// Asserts the simulator saw no request before a `Retry-After` and never more than 4 in
/// flight to one mailbox.
pub fn assert_good_manners(h: &Harness) {
    let v = h.sim.lock().violations();
    if v.retry_after > 0 || v.concurrency > 0 {
        // What came when, to tell a client's bad manners from a loaded machine.
        for r in h.sim.lock().requests() {
            eprintln!(
                "#{} {:.4}s {} {} -> {} in_flight={} early={} conn={} fault={:?}",
                r.seq,
                r.at_secs,
                r.method,
                r.path,
                r.status,
                r.in_flight,
                r.early,
                r.connection,
                r.fault
            );
        }
    }
    assert_eq!(v.retry_after, 0, "requests before Retry-After: {v:?}");
    assert_eq!(v.concurrency, 0, "over 4 in flight: {v:?}");
    assert!(v.max_in_flight <= 4, "{v:?}");
}

pub async fn sync(engine: &Engine, t: &Tuple) -> Outcome {
    engine.run_round(t, &CancellationToken::new(), None).await
}

pub fn report(o: Outcome) -> calsync_engine::RoundReport {
    match o {
        Outcome::Synced(r) => r,
        other => panic!("expected a synced round, got {other:?}"),
    }
}

/// Polls `f` every 100 ms until it holds; fails the test after `limit`.
pub async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut f: F) {
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A systemd notify socket drained as systemd would, by a thread of its own: what a child
/// started with `NOTIFY_SOCKET` set to [`NotifySocket::path`] sends lands in [`NotifySocket::take`].
pub struct NotifySocket {
    path: std::path::PathBuf,
    notes: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    drainer: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    /// Binds `path` and starts draining it.
    pub fn bind(path: &std::path::Path) -> Self {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let notes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drainer = {
            let notes = std::sync::Arc::clone(&notes);
            let done = std::sync::Arc::clone(&done);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let note = String::from_utf8_lossy(&buf[..n]).into_owned();
                        notes.lock().unwrap().push(note);
                    }
                }
            })
        };
        NotifySocket {
            path: path.to_path_buf(),
            notes,
            done,
            drainer: Some(drainer),
        }
    }

    /// Where children send their notes.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The notes received since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap())
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(d) = self.drainer.take() {
            let _ = d.join();
        }
    }
}

/// The binary with `args` and `--config file` at `RUST_LOG=trace`, without `DATABASE_URL`:
/// its exit code and everything it printed (stdout, then stderr).
pub fn run_traced(file: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let o = std::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(file)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Fails naming the secret and the first lines that print it, if `printed` holds any of
/// `secrets`.
pub fn assert_not_printed(printed: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !printed.contains(s.as_str()),
            "a secret was printed: {s}\n--- output ---\n{}",
            printed
                .lines()
                .filter(|l| l.contains(s.as_str()))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Fails if any text, JSON or binary column of any table of the database at `url` holds one
/// of `secrets` (a binary column read as escaped text: a secret kept in the clear); answers
/// the (table, column) pairs searched.
pub async fn assert_no_column_holds(url: &str, secrets: &[String]) -> Vec<(String, String)> {
    let pool = PgPool::connect(url).await.unwrap();
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text \
         FROM information_schema.columns \
         WHERE table_schema = 'public' \
           AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'bytea') \
           AND table_name IN (SELECT table_name FROM information_schema.tables \
                              WHERE table_schema = 'public' AND table_type = 'BASE TABLE')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(columns.len() > 20, "{columns:?}");
    for (table, column, kind) in &columns {
        let text = if kind == "bytea" {
            format!("encode(\"{column}\", 'escape')")
        } else {
            format!("\"{column}\"::text")
        };
        let found: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT s FROM unnest($1::text[]) s WHERE EXISTS \
               (SELECT 1 FROM \"{table}\" WHERE {text} LIKE '%' || s || '%')"
        ))
        .bind(secrets)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(
            found.is_empty(),
            "{table}.{column} holds a secret: {found:?}"
        );
    }
    pool.close().await;
    columns.into_iter().map(|(t, c, _)| (t, c)).collect()
}
