//! calsync-store: PostgreSQL — migrations, applying a page, sync state, the read model.
//! The only crate that depends on sqlx; callers never see a sqlx type or error.
//!
//! | module | owns |
//! |---|---|
//! | [`accounts`] | delegated accounts: who signed in, their refresh token sealed by the caller |
//! | [`error`] | [`StoreError`] and the mapping from sqlx errors |
//! | [`tuples`] | the tuple registry: saved links, sync state ([`TupleStatus`]) |
//! | [`generation`] | the tracked set in generations ([`SetWrite`], [`TrackedSet`]), its notifications, roles one replica holds at a time |
//! | `register` | registration: the stored tuples made to match a config, writing only what changed |
//! | [`write`](mod@write) | what a page write is ([`PageWrite`]) and what it did ([`PageApplied`]) |
//! | [`apply`] | applying a page with its link in one transaction, as named steps |
//! | `steps` | the transaction's steps that delete or show rows, returning their ids |
//! | `upsert` | the transaction's upserts (events, series), returning their ids; quarantine |
//! | `columns` | the read model's detail columns as bound to a write |
//! | `chunks` | work cut into statements of bounded size (a page by payload bytes, untracked calendars by rows) |
//! | [`migrate`] | applying migrations beside a newer or older release: unknown ones left alone, lock waits bounded and retried |
//! | `link` | the link statement: a tuple's link and round state, version- and fence-checked |
//! | `batch` | link-only commits gathered into one statement |
//! | [`page`] | `reduce`: a page's items become at most one write per id (pure) |
//! | [`leases`] | replica heartbeats and mailbox leases, fencing tokens |
//! | [`read_model`] | reading `calendar_events` and `calendar_sync_status` |
//! | [`wake`] | round requests: "run this tuple's round now" reaching the replica that holds its mailbox |
//! | [`push`] | push subscriptions, and the wake-ups notifications make durable |
//! | [`changes`] | the change feed: written by a page's steps and registration, read at a cursor that cannot skip a late commit; snapshot, retention, NOTIFY |
//! | [`sinks`] | where each `[[sinks]]` endpoint stands in the feed, and how it is failing |
//! | `testing` | fault points and benchmark helpers (feature `testing` only) |
#![warn(missing_docs)]

pub mod accounts;
pub mod apply;
mod batch;
pub mod changes;
mod chunks;
mod columns;
pub mod error;
pub mod generation;
pub mod leases;
mod link;
pub mod migrate;
pub mod page;
pub mod push;
pub mod read_model;
mod register;
pub mod sinks;
mod steps;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tuples;
mod upsert;
pub mod wake;
pub mod write;

pub use batch::LinkInbox;
pub use error::{SqlClass, StoreError, sql_class};
pub use generation::{Registered, SetChanges, SetListener, SetWrite, StoredTuple, TrackedSet};
pub use leases::{Heartbeat, LeaseOwner, ReplicaKind};
pub use migrate::Migrated;
pub use page::{
    Details, EventRow, PageChanges, PageOp, SeriesInstances, SeriesRow, reduce, strip_nul,
};
pub use read_model::{EventSummary, LagHistogram, StatusQuery, StatusRow, StatusSummary};
#[cfg(any(test, feature = "testing"))]
pub use testing::{copy_rows_for_benchmark, recreate_database};
pub use tuples::{LinkKind, LinkStamp, TupleHealth, TupleSpec, TupleState, TupleStatus};
pub use wake::RoundRequest;
pub use write::{PageApplied, PageWrite, RoundStart};

use error::{db, redact_url_error};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// The oldest PostgreSQL calsync runs on.
pub const MIN_SERVER_VERSION: i32 = 120_000;

/// The PostgreSQL store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// The deployment whose tuples this store registers, lists and purges (`service.deployment`).
    deployment: std::sync::Arc<str>,
    /// Coalesces link-only commits (shared by clones: one per pool).
    batcher: std::sync::Arc<batch::LinkBatcher>,
    /// Whether pages write the change feed, and its readers' wake-ups (one per pool).
    feed: std::sync::Arc<changes::Feed>,
    /// The replica incarnation this process runs as, recorded on each commit (`committed_by`).
    incarnation: Option<std::sync::Arc<str>>,
    /// The longest any one store call may take before it is abandoned as `Unavailable`: a
    /// connection that stopped answering (a blackholed network) must not hang a round.
    deadline: Duration,
    #[cfg(any(test, feature = "testing"))]
    faults: std::sync::Arc<testing::Faults>,
}

/// The operating system's root certificates as one PEM bundle (certificates that cannot be
/// read are skipped, as a TLS client skips them).
fn native_roots_pem() -> Vec<u8> {
    use base64::Engine as _;
    let mut out = Vec::new();
    for der in rustls_native_certs::load_native_certs().certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    out
}

/// How [`Store::connect`] connects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Pool size.
    pub max_connections: u32,
    /// Time allowed to open a connection or wait for a pooled one.
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` for calsync's sessions.
    pub statement_timeout: Duration,
    /// Extra trusted root certificates (PEM) for TLS to PostgreSQL (`tls.ca_file`).
    pub extra_root_pem: Option<Vec<u8>>,
    /// Also trust the operating system's root store (`tls.native_roots`).
    pub native_roots: bool,
}

impl ConnectOptions {
    /// `max_connections` connections, 10 s to connect, 30 s statement timeout, no extra roots.
    pub fn new(max_connections: u32) -> Self {
        ConnectOptions {
            max_connections,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            extra_root_pem: None,
            native_roots: false,
        }
    }
}

/// The deadline of a store built from a bare pool (tests): the default statement timeout, 30 s,
/// plus 5 s.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(35);

/// The deployment a store works for unless told otherwise.
pub const DEFAULT_DEPLOYMENT: &str = "default";

impl Store {
    /// This store, working for `deployment`: the tuples it registers, lists, untracks and
    /// purges are that deployment's alone.
    pub fn for_deployment(mut self, deployment: &str) -> Store {
        self.deployment = deployment.into();
        self
    }

    /// This store, recording `incarnation` as the writer of each page it commits.
    pub fn as_incarnation(mut self, incarnation: &str) -> Store {
        self.incarnation = Some(incarnation.into());
        self
    }

    /// This store on a pool of its own of `max_connections`, to the same database with the
    /// same session settings, deployment, incarnation and deadline. For a caller whose few
    /// statements must not queue behind the rounds' page writes for a connection: the push
    /// receiver, which Graph times (an answer slower than ~3 s counts as slow). Connections
    /// open as needed.
    pub fn on_own_pool(&self, max_connections: u32) -> Store {
        let options = self.pool.options();
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(options.get_acquire_timeout())
            .test_before_acquire(false)
            .connect_lazy_with((*self.pool.connect_options()).clone());
        Store {
            pool,
            batcher: Default::default(),
            feed: std::sync::Arc::new(changes::Feed::new(
                self.feed.on,
                self.feed.retention,
                self.feed.payload,
            )),
            ..self.clone()
        }
    }

    /// This store, writing the change feed (`calendar_changes`) in each page's transaction or
    /// not (`changes.enabled`; on by default). With it off, pages write no changes and take
    /// no feed lock; followers miss what happens meanwhile and must read a snapshot again.
    pub fn with_feed(mut self, on: bool) -> Store {
        self.feed = std::sync::Arc::new(changes::Feed::new(
            on,
            self.feed.retention,
            self.feed.payload,
        ));
        self
    }

    /// This store, keeping changes for `retention` (`changes.retention`; 14 days unless
    /// told): [`Store::trim_expired_changes`] deletes older ones.
    pub fn with_feed_retention(mut self, retention: std::time::Duration) -> Store {
        self.feed = std::sync::Arc::new(changes::Feed::new(
            self.feed.on,
            retention,
            self.feed.payload,
        ));
        self
    }

    /// This store, its changes carrying each row's `payload` (Graph's JSON, the series
    /// master's laid under an occurrence's) or not (`changes.payload`; off unless told: it is
    /// most of a change's size and of its cost, BENCHMARKS.md).
    pub fn with_feed_payload(mut self, payload: bool) -> Store {
        self.feed = std::sync::Arc::new(changes::Feed::new(
            self.feed.on,
            self.feed.retention,
            payload,
        ));
        self
    }

    pub(crate) fn incarnation(&self) -> Option<&str> {
        self.incarnation.as_deref()
    }

    /// The deployment this store works for.
    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// Runs one store call under the deadline (see [`within`]); past it the call is dropped (a transaction in
    /// it rolls back) and the caller gets `Unavailable`.
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        within(self.deadline, what, call).await
    }

    /// Connects lazily-checked: the pool opens connections as needed, and `connect` fails
    /// only if the first one cannot be made.
    /// Every session gets `statement_timeout` (and twice that as
    /// `idle_in_transaction_session_timeout`), so the server cancels what hangs on its side;
    /// each store call is also bounded by `statement_timeout` plus 5 s on calsync's side.
    pub async fn connect(url: &str, o: &ConnectOptions) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| {
            StoreError::Query(format!(
                "invalid database url: {}",
                redact_url_error(&e.to_string())
            ))
        })?;
        let ms = o.statement_timeout.as_millis().max(1);
        let mut opts = opts.application_name("calsync").options([
            ("statement_timeout", format!("{ms}ms")),
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", ms * 2),
            ),
        ]);
        let mut roots = o.extra_root_pem.clone().unwrap_or_default();
        if o.native_roots {
            roots.extend(native_roots_pem());
        }
        if !roots.is_empty() {
            // Trusted beside the compiled-in roots (`sslrootcert` in the URL works too).
            opts = opts.ssl_root_cert_from_pem(roots);
        }
        let (max_connections, acquire_timeout) = (o.max_connections, o.acquire_timeout);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            // No ping before every checkout (an extra round trip per query): a dead
            // connection fails its query as Unavailable, and the runner retries.
            .test_before_acquire(false)
            // Waiting for a connection is normal while many rounds commit at once (an initial
            // sync of thousands of calendars); warn only when it is a real stall.
            .acquire_slow_threshold(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(db)?;
        let mut store = Store::wrap(pool);
        store.deadline = o.statement_timeout + Duration::from_secs(5);
        store.check_version().await?;
        Ok(store)
    }

    fn wrap(pool: PgPool) -> Self {
        Store {
            pool,
            deployment: DEFAULT_DEPLOYMENT.into(),
            batcher: Default::default(),
            feed: Default::default(),
            incarnation: None,
            deadline: DEFAULT_DEADLINE,
            #[cfg(any(test, feature = "testing"))]
            faults: Default::default(),
        }
    }

    async fn check_version(&self) -> Result<(), StoreError> {
        let v: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        let found = v.trim().parse::<i32>().unwrap_or(0);
        if found < MIN_SERVER_VERSION {
            return Err(StoreError::TooOld { found });
        }
        Ok(())
    }

    /// Whether every embedded migration has been applied.
    pub async fn migrations_current(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        Ok(sqlx::migrate!("../../migrations")
            .iter()
            .all(|m| applied.contains(&m.version)))
    }

    /// One round trip to the database (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Connections the pool holds now.
    pub fn pool_size(&self) -> u32 {
        self.pool.size()
    }

    #[cfg(not(any(test, feature = "testing")))]
    #[inline(always)]
    pub(crate) fn fault_point(&self) -> Result<(), StoreError> {
        Ok(())
    }

    #[cfg(not(any(test, feature = "testing")))]
    #[inline(always)]
    pub(crate) fn panic_point(&self, _tuple_id: i64) {}
}

/// Runs `call` for at most `deadline`; past it the call is dropped and the answer is
/// `Unavailable`, naming `what`.
pub(crate) async fn within<T>(
    deadline: std::time::Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable(format!(
            "{what} did not finish within {} s",
            deadline.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[sqlx::test(migrations = false)]
    async fn the_state_check_constraint_lists_exactly_the_tuple_states(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let def: String = sqlx::query_scalar(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c \
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) \
             WHERE c.conrelid = 'sync_tuples'::regclass AND c.contype = 'c' AND a.attname = 'state'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let quoted: Vec<&str> = def.split('\'').skip(1).step_by(2).collect();
        let mut in_sql: Vec<&str> = quoted.clone();
        in_sql.sort();
        let mut ours: Vec<&str> = TupleStatus::ALL.iter().map(|s| s.as_str()).collect();
        ours.sort();
        assert_eq!(in_sql, ours, "CHECK is {def}");
    }

    #[sqlx::test(migrations = false)]
    async fn registration_answers_every_tuple_id_whether_written_or_unchanged(pool: PgPool) {
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let start = "2026-01-01T00:00:00Z".parse().unwrap();
        let spec = |key: &str, days: i64| TupleSpec {
            key: key.into(),
            user_id: format!("{key}@x"),
            mailbox: format!("{key}@x"),
            calendar_id: "default".into(),
            window_start: start,
            window_end: start + chrono::Duration::days(days),
            settings: None,
        };
        let first = store
            .register_tuple_ids(&[spec("a", 30), spec("b", 30)])
            .await
            .unwrap();
        // b unchanged, a's window moved, c new: three ids, a and b keep theirs.
        let second = store
            .register_tuple_ids(&[spec("a", 60), spec("b", 30), spec("c", 30)])
            .await
            .unwrap();
        assert_eq!(second.len(), 3, "{second:?}");
        assert_eq!((second["a"], second["b"]), (first["a"], first["b"]));
        let states = store.add_tuples(&[spec("b", 30)]).await.unwrap();
        assert_eq!(
            states
                .iter()
                .map(|s| (s.tuple_key.as_str(), s.id))
                .collect::<Vec<_>>(),
            vec![("b", first["b"])],
            "an unchanged tuple's state is read back by its id"
        );
        let (ids, keys): (Vec<i64>, Vec<String>) = sqlx::query_as::<_, (i64, String)>(
            "SELECT id, tuple_key FROM sync_tuples WHERE tracked ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .unzip();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(ids, [second["a"], second["b"], second["c"]]);
    }

    #[sqlx::test(migrations = false)]
    async fn a_value_postgresql_refuses_quarantines_its_item_and_the_page_commits(pool: PgPool) {
        use crate::page::{Details, EventRow, PageOp, reduce};
        let store = Store::from_pool(pool.clone());
        store.migrate().await.unwrap();
        let start = "2026-01-01T00:00:00Z".parse().unwrap();
        let end = "2026-04-01T00:00:00Z".parse().unwrap();
        let spec = TupleSpec {
            key: "t".into(),
            user_id: "u".into(),
            mailbox: "u".into(),
            calendar_id: "default".into(),
            window_start: start,
            window_end: end,
            settings: None,
        };
        let state = store.register_tuples(&[spec]).await.unwrap().remove(0);
        let row = |id: &str| EventRow {
            event_id: id.into(),
            start_at: Some(start),
            end_at: Some(end),
            start_date: None,
            end_date: None,
            time_error: None,
            event_type: Some("singleInstance".into()),
            series_master_id: None,
            details: Details {
                subject: Some(format!("subject {id}")),
                change_key: Some(id.into()),
                ..Details::default()
            },
            partial: false,
            payload: serde_json::Map::from_iter([("id".to_owned(), serde_json::json!(id))]),
        };
        // A date PostgreSQL cannot hold (before 4713 BC): SQLSTATE 22008.
        let mut bad = row("bad");
        bad.start_date = Some(chrono::NaiveDate::MIN);
        let changes = reduce(vec![
            PageOp::Upsert(row("a")),
            PageOp::Upsert(bad),
            PageOp::Upsert(row("b")),
        ]);
        let stamp = LinkStamp {
            user_id: "u".into(),
            calendar_id: "default".into(),
            window_start: start,
            window_end: end,
        };
        let applied = store
            .apply_page(&crate::PageWrite {
                tuple_id: state.id,
                expected_version: state.link_version,
                round_start: Some(crate::RoundStart::Full),
                changes: &changes,
                link: "https://graph.example/delta?$deltatoken=x",
                link_kind: LinkKind::Delta,
                stamp: &stamp,
                fence: None,
            })
            .await
            .unwrap();
        assert_eq!((applied.upserted, applied.quarantined), (2, 1));
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT event_id, subject, quarantined FROM calendar_events ORDER BY event_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1.as_deref(), Some("subject a"));
        assert_eq!(rows[1].0, "b");
        assert_eq!(rows[2].0, "bad");
        assert!(
            rows[2].2.as_deref().is_some_and(|q| q.contains("22008")),
            "{rows:?}"
        );
        let status = store.status().await.unwrap();
        assert_eq!((status[0].event_count, status[0].incomplete_count), (3, 1));
    }

    #[test]
    fn the_os_root_store_becomes_one_pem_bundle() {
        let n = rustls_native_certs::load_native_certs().certs.len();
        let pem = String::from_utf8(native_roots_pem()).unwrap();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), n);
        assert_eq!(pem.matches("-----END CERTIFICATE-----").count(), n);
        assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
    }
}
