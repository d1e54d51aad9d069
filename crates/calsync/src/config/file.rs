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
    pub database: RawDatabase,
    pub graph: RawGraph,
    pub auth: RawAuth,
    pub sync: RawSync,
    pub log: RawLog,
    pub http: RawHttp,
    pub service: RawService,
    pub calendars: Vec<RawCalendar>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHttp {
    /// `host:port` for /healthz, /readyz, /metrics and POST /reload; off when empty.
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawService {
    /// After SIGTERM, how long rounds in flight get to reach a safe point (below systemd's
    /// and Docker's 10 s default stop timeout).
    pub drain_deadline: String,
    /// When a reload drops a calendar: "keep" its rows (untracked) or "purge" them.
    pub on_remove: String,
}

impl Default for RawService {
    fn default() -> Self {
        RawService {
            drain_deadline: "8s".into(),
            on_remove: "keep".into(),
        }
    }
}

/// The config file's sections: what `CALSYNC_<SECTION>__<KEY>` may override.
pub(super) const SECTIONS: [&str; 7] = [
    "database", "graph", "auth", "sync", "log", "http", "service",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDatabase {
    /// `postgres://user:password@host:port/db`; falls back to `DATABASE_URL`.
    pub url: SecretValue,
    pub url_file: Option<PathBuf>,
    pub max_connections: u32,
    pub connect_timeout: String,
    /// How long `run` keeps retrying an unreachable database at start before it exits
    /// non-zero; "0s" exits at once.
    pub wait_at_start: String,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: SecretValue(None),
            url_file: None,
            max_connections: 10,
            connect_timeout: "10s".into(),
            wait_at_start: "60s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGraph {
    pub base_url: String,
    pub connect_timeout: String,
    pub request_timeout: String,
    pub max_page_bytes: u64,
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
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuth {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretValue,
    pub client_secret_file: Option<PathBuf>,
    pub scope: String,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            token_url: String::new(),
            client_id: String::new(),
            client_secret: SecretValue(None),
            client_secret_file: None,
            scope: "https://graph.microsoft.com/.default".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSync {
    pub interval: String,
    pub page_size: u32,
    /// A duration, or "off".
    pub full_resync_every: String,
    pub max_pages_per_round: u32,
    pub max_stale_pages: u32,
    pub max_attempts: u32,
    pub min_backoff: String,
    pub max_backoff: String,
    pub failed_retry_interval: String,
    pub max_in_flight: u32,
    /// The floor the adaptive global limit never drops below.
    pub min_in_flight: u32,
    pub per_mailbox_concurrency: u32,
    /// Requests per mailbox per `mailbox_budget_window`; 0 turns the budget off.
    pub mailbox_request_budget: u32,
    pub mailbox_budget_window: String,
    pub startup_spread: String,
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
            max_in_flight: d.max_in_flight as u32,
            min_in_flight: d.min_in_flight as u32,
            per_mailbox_concurrency: d.per_mailbox_concurrency as u32,
            mailbox_request_budget: budget.map_or(0, |b| b.requests),
            mailbox_budget_window: text(budget.map_or(Duration::from_secs(600), |b| b.per)),
            startup_spread: text(d.startup_spread),
        }
    }
}

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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCalendar {
    /// Stable name of the tuple; defaults to `user/calendar`.
    pub name: Option<String>,
    pub user: String,
    pub calendar: String,
    pub start: String,
    pub end: String,
    pub interval: Option<String>,
}
