//! The config file as written: every section and key with its default. Defaults of the
//! engine's and the Graph client's settings are taken from those crates (written once); a
//! test checks `config/calsync.example.toml` against them.

use super::SecretValue;
use calsync_engine::SyncSettings;
use calsync_graph::GraphConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The file as written (`config/calsync.example.toml` documents every key).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// `[database]`.
    pub database: RawDatabase,
    /// `[graph]`.
    pub graph: RawGraph,
    /// `[auth]`.
    pub auth: RawAuth,
    /// `[sync]`.
    pub sync: RawSync,
    /// `[log]`.
    pub log: RawLog,
    /// `[http]`.
    pub http: RawHttp,
    /// `[metrics]`.
    pub metrics: RawMetrics,
    /// `[tls]`.
    pub tls: RawTls,
    /// `[service]`.
    pub service: RawService,
    /// `[discovery]`: how often sources are listed again.
    pub discovery: RawDiscovery,
    /// `[push]`: Graph's change notifications (off unless `notification_url` is set).
    pub push: RawPush,
    /// `[changes]`: the change feed apps follow.
    pub changes: RawChanges,
    /// `[[sinks]]`: HTTP endpoints the change feed is posted to.
    pub sinks: Vec<RawSink>,
    /// `[[sources]]`: calendars found in the directory.
    pub sources: Vec<RawSource>,
    /// `[[calendars]]`: the tracked tuples.
    pub calendars: Vec<RawCalendar>,
    /// `[accounts]`: delegated accounts' sealed tokens.
    pub accounts: RawAccounts,
}

/// `[accounts]`: the key that seals delegated accounts' refresh tokens in the database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAccounts {
    /// A file holding 32 random bytes in base64 (`openssl rand -base64 32`), from
    /// `$CREDENTIALS_DIRECTORY` when relative. Never stored in the database.
    pub key_file: Option<PathBuf>,
    /// Earlier keys, kept while a key rotation goes on: they open the tokens they sealed, and
    /// each account is sealed again with `key_file` at its next token rotation.
    pub previous_key_files: Vec<PathBuf>,
}

/// `[discovery]`: the cadence of `[[sources]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDiscovery {
    /// How often every source is listed again (new users and calendars start, gone ones stop).
    pub every: String,
    /// A mailbox whose calendars Graph refused is asked again after this long.
    pub refused_recheck: String,
    /// A pass that would untrack more than this share of a source's calendars (in percent),
    /// or all of them, is held until the next pass agrees.
    pub max_untrack_percent: u8,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        RawDiscovery {
            every: "1h".into(),
            refused_recheck: "24h".into(),
            max_untrack_percent: 50,
        }
    }
}

/// `[[sources]]`: calendars found in the directory rather than listed one by one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSource {
    /// The source's name: the prefix of its tuples' keys (`name:address/calendar`).
    pub name: String,
    /// `"all"`: the tenant's users (`User.Read.All`).
    pub users: Option<String>,
    /// An OData `$filter` on the users, e.g. `"accountEnabled eq true"`.
    pub filter: Option<String>,
    /// A group's object id: its transitive user members (`GroupMember.Read.All`).
    pub group: Option<String>,
    /// `"all"`: the tenant's rooms (`Place.Read.All`).
    pub rooms: Option<String>,
    /// `"default"` (the default), `"all"`, or a calendar name with `*` wildcards.
    pub calendars: Option<String>,
    /// Mailboxes left out, by address or object id.
    pub exclude: Vec<String>,
    /// Window start: an instant or an offset (`"-90d"`).
    pub start: String,
    /// Window end: an instant or an offset (`"+365d"`).
    pub end: String,
    /// Their interval; `[sync] interval` when absent.
    pub interval: Option<String>,
    /// Cron patterns instead of the interval.
    pub schedule: Option<Patterns>,
    /// The zone of `schedule` (default `UTC`).
    pub schedule_zone: Option<String>,
}

/// `[http]`: the health, metrics and reload endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHttp {
    /// `host:port` for /healthz, /readyz, /metrics and POST /reload; off when empty.
    pub listen: String,
    /// A file holding the bearer token `POST /reload` requires (first line); without it,
    /// reloading over HTTP is off (SIGHUP still works).
    pub admin_token_file: Option<PathBuf>,
}

/// `[changes]`: the change feed (`calendar_changes`), written in each page's transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawChanges {
    /// Write the feed. Off, pages write no change (followers must read a snapshot again).
    pub enabled: bool,
    /// How long changes are kept; a cursor older than that is answered "expired".
    pub retention: String,
    /// Changes carry each row's `payload` (Graph's JSON) too: most of a change's size and of
    /// its cost; off, every other column of the row.
    pub payload: bool,
}

impl Default for RawChanges {
    fn default() -> Self {
        RawChanges {
            enabled: true,
            retention: "14d".into(),
            payload: false,
        }
    }
}

/// `[[sinks]]`: an HTTP endpoint the change feed is posted to, in signed batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSink {
    /// The sink's name (its metrics label and its row in `sink_cursors`).
    pub name: String,
    /// Where batches are posted (HTTPS; `http://` only to a loopback address).
    pub url: String,
    /// A file holding the HMAC-SHA256 key of `Calsync-Signature` (first line; at least 16
    /// characters); relative to `$CREDENTIALS_DIRECTORY` when set.
    pub secret_file: Option<PathBuf>,
    /// At most this many changes per request.
    pub batch: usize,
    /// How long one request may take.
    pub timeout: String,
    /// Where a new sink starts: `"now"` (what changes from now on) or `"oldest"` (every change
    /// kept).
    pub start: String,
}

impl Default for RawSink {
    fn default() -> Self {
        RawSink {
            name: String::new(),
            url: String::new(),
            secret_file: None,
            batch: 100,
            timeout: "10s".into(),
            start: "now".into(),
        }
    }
}

/// `[push]`: Graph's change notifications wake a calendar's round within seconds; polling
/// stays as the backstop (issue 24). Off unless `notification_url` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawPush {
    /// The public base URL Graph posts to (HTTPS; `http://` only to a loopback address, as
    /// `graph.base_url`): notifications go to `{notification_url}/notifications`, lifecycle
    /// events to `{notification_url}/lifecycle`. Empty: push is off.
    pub notification_url: String,
    /// `host:port` of the receiver, behind whatever terminates TLS for `notification_url`: a
    /// listener of its own that serves only the two notification routes.
    pub listen: String,
    /// How long each subscription is asked to live (Outlook events: at most 10,080 minutes,
    /// at least 45).
    pub lifetime: String,
    /// A subscription is renewed when this much of its life is left.
    pub renew_before: String,
    /// How often a calendar whose subscription is healthy is polled anyway: the backstop for
    /// notifications Graph loses (the configured interval applies otherwise).
    pub backstop_interval: String,
}

impl Default for RawPush {
    fn default() -> Self {
        RawPush {
            notification_url: String::new(),
            listen: String::new(),
            lifetime: "3d".into(),
            renew_before: "12h".into(),
            backstop_interval: "30m".into(),
        }
    }
}

/// `[service]`: how the daemon stops and reloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawService {
    /// After SIGTERM, how long rounds in flight get to reach a safe point (below systemd's
    /// and Docker's 10 s default stop timeout).
    pub drain_deadline: String,
    /// When a reload drops a calendar: "keep" its rows (untracked) or "purge" them.
    pub on_remove: String,
    /// The deployment this config is: its calendars are its own in a shared database, and only
    /// `calsync run` of this deployment untracks or purges them.
    pub deployment: String,
    /// This replica's name, shown by `status` as the owner of its mailboxes; empty: the host
    /// name.
    pub replica: String,
    /// How long a replica's mailbox leases outlive its last heartbeat (it renews every quarter
    /// of it): a replica that dies hands its mailboxes over within lease_ttl + lease_ttl/4.
    pub lease_ttl: String,
}

impl Default for RawService {
    fn default() -> Self {
        RawService {
            drain_deadline: "8s".into(),
            on_remove: "keep".into(),
            deployment: "default".into(),
            replica: String::new(),
            lease_ttl: "20s".into(),
        }
    }
}

/// The config file's sections: what `CALSYNC_<SECTION>__<KEY>` may override.
pub(super) const SECTIONS: [&str; 11] = [
    "database", "graph", "auth", "sync", "log", "http", "metrics", "tls", "service", "push",
    "accounts",
];

/// `[tls]`: whom calsync trusts, for Graph, the token endpoint and PostgreSQL.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTls {
    /// PEM file of extra root certificates (a TLS-inspecting proxy's CA, a private
    /// PostgreSQL CA), trusted beside the compiled-in roots.
    pub ca_file: Option<PathBuf>,
    /// Also trust the operating system's root store (Graph, the token endpoint, PostgreSQL).
    pub native_roots: bool,
}

/// `[metrics]`: what `/metrics` may say about each calendar.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMetrics {
    /// Per-calendar series: `none` (the default: only aggregates, bounded at any number of
    /// calendars), or labelled with the tuple's `name` (the operator's word, not a mailbox
    /// address unless the name is the default `user/calendar`) or a `hash` of it.
    pub mailbox_labels: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            mailbox_labels: "none".into(),
        }
    }
}

/// `[database]`: the PostgreSQL calsync writes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDatabase {
    /// `postgres://user:password@host:port/db`; falls back to `DATABASE_URL`.
    pub url: SecretValue,
    /// A file holding the URL (first line), instead of `url`.
    pub url_file: Option<PathBuf>,
    /// Pool size.
    pub max_connections: u32,
    /// Time allowed to open a connection (a duration, e.g. `5s`).
    pub connect_timeout: String,
    /// How long `run` keeps retrying an unreachable database at start before it exits
    /// non-zero; "0s" exits at once.
    pub wait_at_start: String,
    /// The server cancels any statement of calsync's that runs longer; calsync abandons any
    /// store call 5 s after it (a connection that stopped answering).
    pub statement_timeout: String,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: SecretValue(None),
            url_file: None,
            max_connections: 10,
            connect_timeout: "10s".into(),
            wait_at_start: "60s".into(),
            statement_timeout: "30s".into(),
        }
    }
}

/// `[graph]`: where Graph is and how it is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGraph {
    /// Graph root, e.g. `https://graph.microsoft.com/v1.0`.
    pub base_url: String,
    /// Time allowed to open a connection.
    pub connect_timeout: String,
    /// Time allowed for a whole request.
    pub request_timeout: String,
    /// Pages larger than this many bytes are refused.
    pub max_page_bytes: u64,
    /// Bytes of memory that Graph bodies fetched and not yet committed may take together;
    /// 0 turns the budget off.
    pub page_memory_budget: u64,
    /// Replays of delta links sent together in one JSON batch, at most (1..=20; 1 sends each
    /// alone).
    pub batch_size: u32,
    /// How long the first replay of a batch waits for others.
    pub batch_linger: String,
    /// Allow `http://` for `graph.base_url` and `auth.token_url` on a host that is not a
    /// loopback address (tokens and the client secret would travel in clear): for a test rig
    /// only. A warning is logged at start.
    pub allow_insecure_http: bool,
}

/// A duration as the config file writes it.
fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

const GRAPH_BASE_URL: &str = "https://graph.microsoft.com/v1.0";

/// The Graph client's own defaults.
#[allow(clippy::expect_used)] // a constant that parses
fn graph_defaults() -> GraphConfig {
    GraphConfig::new(url::Url::parse(GRAPH_BASE_URL).expect("a constant, valid URL"))
}

impl Default for RawGraph {
    fn default() -> Self {
        let base_url = GRAPH_BASE_URL;
        let g = graph_defaults();
        RawGraph {
            base_url: base_url.into(),
            connect_timeout: text(g.connect_timeout),
            request_timeout: text(g.request_timeout),
            max_page_bytes: g.max_page_bytes as u64,
            page_memory_budget: g.page_memory_budget as u64,
            batch_size: g.batch_size as u32,
            batch_linger: text(g.batch_linger),
            allow_insecure_http: false,
        }
    }
}

/// `[auth]`: how calsync gets app-only tokens: the app registration and its credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuth {
    /// The credential kind: `client_secret` (the default), `certificate`,
    /// `workload_identity`, `managed_identity`, or `public_client` (no credential: delegated
    /// accounts only).
    pub kind: String,
    /// The tenant's token endpoint (workload identity: from `AZURE_AUTHORITY_HOST` and
    /// `AZURE_TENANT_ID` when empty; managed identity: unused).
    pub token_url: String,
    /// The app's client id (workload identity: `AZURE_CLIENT_ID` when empty; managed
    /// identity: a user-assigned identity's, or empty for the system-assigned one).
    pub client_id: String,
    /// The client secret (or use `client_secret_file`).
    pub client_secret: SecretValue,
    /// A file holding the client secret (first line).
    pub client_secret_file: Option<PathBuf>,
    /// `certificate`: a PEM file with the certificate (and its key, unless `key_file`).
    pub certificate_file: Option<PathBuf>,
    /// `certificate`: a PEM file with the certificate's unencrypted RSA private key.
    pub key_file: Option<PathBuf>,
    /// `certificate`: `PS256` (with `x5t#S256`, the default) or `RS256` (with `x5t`).
    pub signature: String,
    /// `workload_identity`: the platform's token file (`AZURE_FEDERATED_TOKEN_FILE` when
    /// unset).
    pub token_file: Option<PathBuf>,
    /// `managed_identity`: the endpoint (`IDENTITY_ENDPOINT` when unset, else the VM's
    /// IMDS).
    pub identity_endpoint: String,
    /// `managed_identity`: a file holding the App Service header value (`IDENTITY_HEADER`
    /// when unset); with one, the endpoint is asked as App Service asks it.
    pub identity_header_file: Option<PathBuf>,
    /// The scope asked for; empty (the default) means the `.default` scope of
    /// `graph.base_url`'s cloud, e.g. `https://graph.microsoft.us/.default`.
    pub scope: String,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            kind: "client_secret".into(),
            token_url: String::new(),
            client_id: String::new(),
            client_secret: SecretValue(None),
            client_secret_file: None,
            certificate_file: None,
            key_file: None,
            signature: "PS256".into(),
            token_file: None,
            identity_endpoint: String::new(),
            identity_header_file: None,
            scope: String::new(),
        }
    }
}

/// `[sync]`: the engine's settings (see [`SyncSettings`] for their meaning).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSync {
    /// Default time between rounds of a tuple.
    pub interval: String,
    /// `Prefer: odata.maxpagesize`.
    pub page_size: u32,
    /// A duration, or "off".
    pub full_resync_every: String,
    /// Pages one round may take.
    pub max_pages_per_round: u32,
    /// Consecutive pages without a new id before a round is abandoned.
    pub max_stale_pages: u32,
    /// Attempts per page on retryable errors.
    pub max_attempts: u32,
    /// First backoff step.
    pub min_backoff: String,
    /// Largest backoff step.
    pub max_backoff: String,
    /// How soon a failed or degraded tuple is tried again.
    pub failed_retry_interval: String,
    /// A round that makes no progress (no request slot, no answer) for this long is cancelled
    /// and tried again; past 15 minutes the watchdog stops being fed.
    pub stuck_round_after: String,
    /// Graph requests in flight across all mailboxes (the adaptive limit's ceiling).
    pub max_in_flight: u32,
    /// The floor the adaptive global limit never drops below.
    pub min_in_flight: u32,
    /// Graph requests in flight per mailbox.
    pub per_mailbox_concurrency: u32,
    /// Requests per mailbox per `mailbox_budget_window`; 0 turns the budget off.
    pub mailbox_request_budget: u32,
    /// The window of `mailbox_request_budget`.
    pub mailbox_budget_window: String,
    /// First rounds at start are spread over this long.
    pub startup_spread: String,
    /// How often rolling windows (`start`/`end` written as offsets) move.
    pub window_rebase: String,
    /// The time of day (UTC, `HH:MM`) the re-base cadence is aligned to.
    pub window_rebase_at: String,
}

impl Default for RawSync {
    fn default() -> Self {
        let d = SyncSettings::default();
        let budget = d.mailbox_budget;
        RawSync {
            interval: text(d.interval),
            page_size: graph_defaults().page_size.unwrap_or(100),
            full_resync_every: d.full_resync_every.map_or_else(|| "off".into(), text),
            max_pages_per_round: d.max_pages_per_round,
            max_stale_pages: d.max_stale_pages,
            max_attempts: d.max_attempts as u32,
            min_backoff: text(d.min_backoff),
            max_backoff: text(d.max_backoff),
            failed_retry_interval: text(d.failed_retry_interval),
            stuck_round_after: text(d.stuck_round_after),
            max_in_flight: d.max_in_flight as u32,
            min_in_flight: d.min_in_flight as u32,
            per_mailbox_concurrency: d.per_mailbox_concurrency as u32,
            mailbox_request_budget: budget.map_or(0, |b| b.requests),
            mailbox_budget_window: text(budget.map_or(Duration::from_secs(600), |b| b.per)),
            startup_spread: text(d.startup_spread),
            window_rebase: "1d".into(),
            window_rebase_at: "00:00".into(),
        }
    }
}

/// `[log]`: log format and filter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: String,
    /// A tracing env-filter directive; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            filter: "info".into(),
        }
    }
}

/// `[[calendars]]`: one tracked (user, calendar, window) tuple.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCalendar {
    /// Stable name of the tuple; defaults to `user/calendar`.
    pub name: Option<String>,
    /// The mailbox, by UPN or object id.
    pub user: String,
    /// The delegated account that reads it through `/me` (`calsync login <account>`); the
    /// app's own token when absent.
    pub account: Option<String>,
    /// `default` or a calendar id.
    pub calendar: String,
    /// Window start: an RFC 3339 instant, or an offset from now (`"-90d"`), re-based on
    /// `sync.window_rebase`.
    pub start: String,
    /// Window end: an instant or an offset (`"+365d"`).
    pub end: String,
    /// Its own interval; `[sync] interval` when absent.
    pub interval: Option<String>,
    /// Cron patterns (one, or a list whose fire times are joined) to sync at instead of every
    /// interval, e.g. `["* 8-17 * * Mon-Fri", "*/30 * * * *"]`.
    pub schedule: Option<Patterns>,
    /// The IANA zone `schedule` is read in (default `UTC`).
    pub schedule_zone: Option<String>,
}

/// One cron pattern or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Patterns {
    /// `schedule = "*/5 * * * *"`
    One(String),
    /// `schedule = ["* 8-17 * * Mon-Fri", "*/30 * * * *"]`
    Many(Vec<String>),
}

impl Patterns {
    /// The patterns as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Patterns::One(p) => vec![p.clone()],
            Patterns::Many(v) => v.clone(),
        }
    }
}
