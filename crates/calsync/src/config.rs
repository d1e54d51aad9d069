//! calsync's configuration: one typed tree loaded once with figment (defaults → TOML file →
//! `CALSYNC_<SECTION>__<KEY>` environment), then validated into domain types. Every error names
//! the key that is wrong.

use calsync_engine::{Budget, SyncSettings, TupleConfig};
use calsync_graph::{AuthConfig, CalendarRef, GraphConfig, ViewWindow};
use chrono::{DateTime, Utc};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// A config value that is wrong, and why. Never carries a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("invalid config: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn bad(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// A secret as it arrives from TOML or the environment. Numbers are accepted as text so that a
/// type error can never echo the secret.
#[derive(Clone, Default)]
pub struct SecretValue(Option<SecretString>);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "\"<redacted>\""
        } else {
            "None"
        })
    }
}

impl Serialize for SecretValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(_) => s.serialize_some("<redacted>"),
            None => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'a> serde::de::Visitor<'a> for V {
            type Value = SecretValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretValue, E> {
                Ok(SecretValue(Some(SecretString::from(v.to_owned()))))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SecretValue, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SecretValue, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SecretValue, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<SecretValue, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<SecretValue, E> {
                Ok(SecretValue(None))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<SecretValue, E> {
                Ok(SecretValue(None))
            }
            fn visit_some<D2: Deserializer<'a>>(self, d: D2) -> Result<SecretValue, D2::Error> {
                d.deserialize_any(V)
            }
        }
        d.deserialize_any(V)
    }
}

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
const SECTIONS: [&str; 7] = [
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

impl Default for RawGraph {
    fn default() -> Self {
        RawGraph {
            base_url: "https://graph.microsoft.com/v1.0".into(),
            connect_timeout: "10s".into(),
            request_timeout: "60s".into(),
            max_page_bytes: 64 * 1024 * 1024,
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
        RawSync {
            interval: "5m".into(),
            page_size: 100,
            full_resync_every: "7d".into(),
            max_pages_per_round: 10_000,
            max_stale_pages: 50,
            max_attempts: 6,
            min_backoff: "500ms".into(),
            max_backoff: "60s".into(),
            failed_retry_interval: "1h".into(),
            max_in_flight: 64,
            min_in_flight: 4,
            per_mailbox_concurrency: 4,
            // Half of Graph's 10,000 per 10 minutes per mailbox: room for other apps.
            mailbox_request_budget: 5000,
            mailbox_budget_window: "10m".into(),
            startup_spread: "30s".into(),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration, split into the slices each component gets.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub graph: GraphConfig,
    pub auth: AuthConfig,
    pub sync: SyncSettings,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub http_listen: Option<std::net::SocketAddr>,
    pub drain_deadline: Duration,
    pub on_remove: OnRemove,
    pub tuples: Vec<TupleConfig>,
}

impl Config {
    /// The sections whose change a reload cannot apply (they are wired into the database
    /// pool, the Graph client, the engine or the logger at start).
    pub fn needs_restart_for(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        let db = |c: &Config| {
            (
                c.database.url.expose_secret().to_owned(),
                c.database.max_connections,
                c.database.connect_timeout,
            )
        };
        if db(self) != db(new) {
            out.push("database");
        }
        if format!("{:?}", self.graph) != format!("{:?}", new.graph) {
            out.push("graph");
        }
        let auth = |c: &Config| {
            (
                c.auth.token_url.clone(),
                c.auth.client_id.clone(),
                c.auth.client_secret.expose_secret().to_owned(),
                c.auth.scope.clone(),
            )
        };
        if auth(self) != auth(new) {
            out.push("auth");
        }
        // The default interval is applied on reload; the rest of [sync] is not.
        let sync = |c: &Config| {
            format!(
                "{:?}",
                SyncSettings {
                    interval: Duration::ZERO,
                    ..c.sync.clone()
                }
            )
        };
        if sync(self) != sync(new) {
            out.push("sync");
        }
        if (self.log_format, &self.log_filter) != (new.log_format, &new.log_filter) {
            out.push("log");
        }
        if self.http_listen != new.http_listen {
            out.push("http");
        }
        if self.drain_deadline != new.drain_deadline {
            out.push("service.drain_deadline");
        }
        out
    }
}

/// What happens to a calendar's rows when a reload removes it from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRemove {
    /// Kept, marked untracked (`calendar_sync_status.tracked = false`).
    Keep,
    /// Deleted with the tuple.
    Purge,
}

#[derive(Clone)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub max_connections: u32,
    pub connect_timeout: Duration,
    pub wait_at_start: Duration,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_at_start", &self.wait_at_start)
            .finish()
    }
}

/// A database URL with its password replaced, for printing.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("<redacted>"));
            }
            let q: Vec<(String, String)> = u.query_pairs().into_owned().collect();
            if q.iter().any(|(k, _)| k.eq_ignore_ascii_case("password")) {
                let mut u2 = u.clone();
                u2.query_pairs_mut().clear();
                for (k, v) in &q {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "<redacted>"
                    } else {
                        v
                    };
                    u2.query_pairs_mut().append_pair(k, v);
                }
                return u2.to_string();
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

fn duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim()).map_err(|e| {
        bad(
            key,
            format!("'{v}' is not a duration ({e}); use e.g. \"30s\", \"5m\", \"7d\""),
        )
    })
}

fn instant(key: &str, v: &str) -> Result<DateTime<Utc>, ConfigError> {
    DateTime::parse_from_rfc3339(v.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            bad(
                key,
                format!(
                    "'{v}' is not an RFC 3339 instant ({e}); use e.g. \"2026-01-01T00:00:00Z\""
                ),
            )
        })
}

fn read_secret_file(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))?;
    let trimmed = text.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(bad(key, format!("{} is empty", path.display())));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

fn http_url(key: &str, v: &str) -> Result<Url, ConfigError> {
    let u = Url::parse(v.trim()).map_err(|e| bad(key, format!("'{v}' is not a URL ({e})")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(bad(
            key,
            format!("'{v}' must be an http(s) URL with a host"),
        ));
    }
    Ok(u)
}

impl RawConfig {
    /// Loads defaults, then the TOML file (if any), then `CALSYNC_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(bad(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        fig = fig.merge(
            // Only CALSYNC_<SECTION>__<KEY>: other CALSYNC_* variables (CALSYNC_CONFIG, a
            // test's or a wrapper script's own) are not config keys.
            Env::prefixed("CALSYNC_")
                .filter(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    SECTIONS
                        .iter()
                        .any(|s| k.strip_prefix(s).is_some_and(|rest| rest.starts_with("__")))
                })
                .split("__"),
        );
        fig.extract().map_err(|e| {
            let key = if e.path.is_empty() {
                "config".to_owned()
            } else {
                e.path.join(".")
            };
            bad(key, e.kind.to_string())
        })
    }

    /// Checks every value and builds the typed config.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let database = self.database_config()?;

        let base_url = http_url("graph.base_url", &self.graph.base_url)?;
        let mut graph = GraphConfig::new(base_url);
        graph.connect_timeout = duration("graph.connect_timeout", &self.graph.connect_timeout)?;
        graph.request_timeout = duration("graph.request_timeout", &self.graph.request_timeout)?;
        if self.graph.max_page_bytes < 1024 {
            return Err(bad("graph.max_page_bytes", "must be at least 1024"));
        }
        graph.max_page_bytes = self.graph.max_page_bytes as usize;
        if !(1..=10_000).contains(&self.sync.page_size) {
            return Err(bad(
                "sync.page_size",
                format!("{} is out of range 1..=10000", self.sync.page_size),
            ));
        }
        graph.page_size = Some(self.sync.page_size);

        if self.auth.token_url.trim().is_empty() {
            return Err(bad(
                "auth.token_url",
                "missing: e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token",
            ));
        }
        let token_url = http_url("auth.token_url", &self.auth.token_url)?;
        if self.auth.client_id.trim().is_empty() {
            return Err(bad("auth.client_id", "missing"));
        }
        let client_secret = match (&self.auth.client_secret.0, &self.auth.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "auth.client_secret_file",
                    "set auth.client_secret or auth.client_secret_file, not both",
                ));
            }
            (Some(s), None) if !s.expose_secret().is_empty() => s.clone(),
            (Some(_), None) => return Err(bad("auth.client_secret", "is empty")),
            (None, Some(p)) => read_secret_file("auth.client_secret_file", &resolve_credential(p))?,
            (None, None) => {
                return Err(bad(
                    "auth.client_secret",
                    "missing: set auth.client_secret or auth.client_secret_file",
                ));
            }
        };
        if self.auth.scope.trim().is_empty() {
            return Err(bad("auth.scope", "is empty"));
        }
        let auth = AuthConfig {
            token_url,
            client_id: self.auth.client_id.trim().to_owned(),
            client_secret,
            scope: self.auth.scope.trim().to_owned(),
        };

        let s = &self.sync;
        let interval = duration("sync.interval", &s.interval)?;
        if interval < Duration::from_secs(1) {
            return Err(bad("sync.interval", "must be at least 1s"));
        }
        let full_resync_every = match s.full_resync_every.trim() {
            "off" | "never" | "" => None,
            v => Some(duration("sync.full_resync_every", v)?),
        };
        if !(1..=4).contains(&s.per_mailbox_concurrency) {
            return Err(bad(
                "sync.per_mailbox_concurrency",
                "must be between 1 and 4 (Outlook allows 4 concurrent requests per mailbox)",
            ));
        }
        if s.max_in_flight == 0 {
            return Err(bad("sync.max_in_flight", "must be at least 1"));
        }
        if s.min_in_flight == 0 || s.min_in_flight > s.max_in_flight {
            return Err(bad(
                "sync.min_in_flight",
                "must be between 1 and sync.max_in_flight",
            ));
        }
        let budget_window = duration("sync.mailbox_budget_window", &s.mailbox_budget_window)?;
        if budget_window.is_zero() {
            return Err(bad("sync.mailbox_budget_window", "must be longer than 0s"));
        }
        let mailbox_budget = (s.mailbox_request_budget > 0).then_some(Budget {
            requests: s.mailbox_request_budget,
            per: budget_window,
        });
        if s.max_attempts == 0 {
            return Err(bad("sync.max_attempts", "must be at least 1"));
        }
        if s.max_pages_per_round == 0 {
            return Err(bad("sync.max_pages_per_round", "must be at least 1"));
        }
        let min_backoff = duration("sync.min_backoff", &s.min_backoff)?;
        let max_backoff = duration("sync.max_backoff", &s.max_backoff)?;
        if max_backoff < min_backoff {
            return Err(bad(
                "sync.max_backoff",
                "must not be below sync.min_backoff",
            ));
        }
        let sync = SyncSettings {
            interval,
            full_resync_every,
            max_pages_per_round: s.max_pages_per_round,
            max_stale_pages: s.max_stale_pages,
            max_attempts: s.max_attempts as usize,
            min_backoff,
            max_backoff,
            failed_retry_interval: duration(
                "sync.failed_retry_interval",
                &s.failed_retry_interval,
            )?,
            max_in_flight: s.max_in_flight as usize,
            min_in_flight: s.min_in_flight as usize,
            per_mailbox_concurrency: s.per_mailbox_concurrency as usize,
            mailbox_budget,
            startup_spread: duration("sync.startup_spread", &s.startup_spread)?,
        };

        let log_format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(bad(
                    "log.format",
                    format!("'{other}' is not one of text, json"),
                ));
            }
        };
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| bad("log.filter", e.to_string()))?;

        if self.calendars.is_empty() {
            return Err(bad(
                "calendars",
                "no [[calendars]] entry: calsync has nothing to sync",
            ));
        }
        let mut names = HashSet::new();
        let mut tuples = Vec::with_capacity(self.calendars.len());
        for (i, c) in self.calendars.iter().enumerate() {
            let k = |f: &str| format!("calendars[{i}].{f}");
            let user = c.user.trim();
            if user.is_empty() {
                return Err(bad(k("user"), "missing: a user id or userPrincipalName"));
            }
            let cal = c.calendar.trim();
            let calendar = match cal {
                "" => return Err(bad(k("calendar"), "missing: \"default\" or a calendar id")),
                "default" => CalendarRef::Default,
                id => CalendarRef::Id(id.to_owned()),
            };
            let start = instant(&k("start"), &c.start)?;
            let end = instant(&k("end"), &c.end)?;
            if end <= start {
                return Err(bad(k("end"), "must be after start"));
            }
            let interval = c
                .interval
                .as_deref()
                .map(|v| duration(&k("interval"), v))
                .transpose()?;
            if interval.is_some_and(|d| d < Duration::from_secs(1)) {
                return Err(bad(k("interval"), "must be at least 1s"));
            }
            let name = c.name.clone().unwrap_or_else(|| format!("{user}/{cal}"));
            if name.trim().is_empty() {
                return Err(bad(k("name"), "is empty"));
            }
            if !names.insert(name.clone()) {
                return Err(bad(
                    k("name"),
                    format!(
                        "'{name}' is used by another [[calendars]] entry; give each a distinct name"
                    ),
                ));
            }
            tuples.push(TupleConfig {
                key: name,
                user: user.to_owned(),
                calendar,
                window: ViewWindow { start, end },
                interval,
            });
        }
        let http_listen = match self.http.listen.trim() {
            "" => None,
            v => Some(v.parse::<std::net::SocketAddr>().map_err(|_| {
                bad(
                    "http.listen",
                    format!("'{v}' is not host:port with an IP address (e.g. 127.0.0.1:9187)"),
                )
            })?),
        };
        let drain_deadline = duration("service.drain_deadline", &self.service.drain_deadline)?;
        let on_remove = match self.service.on_remove.trim() {
            "keep" => OnRemove::Keep,
            "purge" => OnRemove::Purge,
            other => {
                return Err(bad(
                    "service.on_remove",
                    format!("'{other}' is not one of keep, purge"),
                ));
            }
        };
        Ok(Config {
            database,
            graph,
            auth,
            sync,
            log_format,
            log_filter: self.log.filter.clone(),
            http_listen,
            drain_deadline,
            on_remove,
            tuples,
        })
    }
}

/// Under systemd, `LoadCredential=` files live in `$CREDENTIALS_DIRECTORY`; a relative
/// `*_file` path is looked up there first.
fn resolve_credential(p: &Path) -> PathBuf {
    if p.is_relative() {
        if let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") {
            let candidate = Path::new(&dir).join(p);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    p.to_path_buf()
}

impl RawConfig {
    /// The effective config as TOML with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        if let Some(u) = &copy.database.url.0 {
            copy.database.url =
                SecretValue(Some(SecretString::from(redact_url(u.expose_secret()))));
        }
        let mut v = match toml::Value::try_from(&copy) {
            Ok(v) => v,
            Err(e) => return format!("# cannot render config: {e}\n"),
        };
        if let (Some(u), Some(db)) = (
            &copy.database.url.0,
            v.get_mut("database").and_then(|d| d.as_table_mut()),
        ) {
            db.insert(
                "url".into(),
                toml::Value::String(u.expose_secret().to_owned()),
            );
        }
        toml::to_string_pretty(&v).unwrap_or_default()
    }
}

impl RawConfig {
    /// Only the `[database]` section, for commands that need nothing else.
    pub fn database_config(&self) -> Result<DatabaseConfig, ConfigError> {
        let db_url = match (&self.database.url.0, &self.database.url_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "database.url_file",
                    "set database.url or database.url_file, not both",
                ));
            }
            (Some(u), None) => u.clone(),
            (None, Some(p)) => read_secret_file("database.url_file", &resolve_credential(p))?,
            (None, None) => match std::env::var("DATABASE_URL") {
                Ok(u) if !u.trim().is_empty() => SecretString::from(u),
                _ => {
                    return Err(bad(
                        "database.url",
                        "missing: set database.url (or CALSYNC_DATABASE__URL, or DATABASE_URL)",
                    ));
                }
            },
        };
        match Url::parse(db_url.expose_secret()) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            _ => {
                return Err(bad(
                    "database.url",
                    "must be a postgres:// or postgresql:// URL",
                ));
            }
        }
        if self.database.max_connections == 0 {
            return Err(bad("database.max_connections", "must be at least 1"));
        }
        Ok(DatabaseConfig {
            url: db_url,
            max_connections: self.database.max_connections,
            connect_timeout: duration("database.connect_timeout", &self.database.connect_timeout)?,
            wait_at_start: duration("database.wait_at_start", &self.database.wait_at_start)?,
        })
    }
}
