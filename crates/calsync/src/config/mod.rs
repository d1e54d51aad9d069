//! calsync's configuration: one typed tree loaded once with figment (defaults → TOML file →
//! `CALSYNC_<SECTION>__<KEY>` environment), then validated into domain types. Every error names
//! the key that is wrong.
//!
//! | module | owns |
//! |---|---|
//! | `file` | the sections as written, with their defaults |
//! | `validate` | the file as written becomes [`Config`], one function per section |
//! | `connect` | the sections of where calsync connects and with what: database, Graph, auth, TLS |
//! | `accounts` | `[accounts]` and `[[calendars]] account`: delegated accounts, their key, `public_client` |
//! | `values` | values several sections share: durations, instants, URLs, secret files |

mod accounts;
mod connect;
mod credentials;
mod file;
mod push;
mod sinks;
mod validate;
mod values;

pub use file::*;

use calsync_engine::{Rebase, SyncSettings, TupleConfig};
use calsync_graph::{AuthConfig, GraphConfig};
use figment::Figment;
use figment::providers::{Env, Serialized};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use std::path::Path;
use std::time::Duration;
use url::Url;
/// A config value that is wrong, and why. Never carries a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("invalid config: {key}: {message}")]
pub struct ConfigError {
    /// The key, e.g. `sync.interval` or `calendars[2].start`.
    pub key: String,
    /// What is wrong with it.
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

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration, split into the slices each component gets.
#[derive(Debug, Clone)]
pub struct Config {
    /// The database slice.
    pub database: DatabaseConfig,
    /// The Graph client slice.
    pub graph: GraphConfig,
    /// Client credentials.
    pub auth: AuthConfig,
    /// The engine's slice.
    pub sync: SyncSettings,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter directive.
    pub log_filter: String,
    /// The HTTP endpoint's address; off when `None`.
    pub http_listen: Option<std::net::SocketAddr>,
    /// The bearer token `POST /reload` requires; reloading over HTTP is off without it.
    pub admin_token: Option<SecretString>,
    /// How `/metrics` labels per-calendar series.
    pub metric_labels: MetricLabels,
    /// What is allowed but unwise (a secret file others can read): logged at start and
    /// printed by `config check`.
    pub warnings: Vec<String>,
    /// How long rounds in flight get at shutdown.
    pub drain_deadline: Duration,
    /// What a reload does to a dropped calendar's rows.
    pub on_remove: OnRemove,
    /// Who this process is among the database's deployments and replicas.
    pub ownership: Ownership,
    /// When rolling windows move (`sync.window_rebase`, `sync.window_rebase_at`).
    pub window_rebase: Rebase,
    /// Directory sources of calendars.
    pub sources: Vec<calsync_engine::Source>,
    /// How often sources are listed again, and when a refused mailbox is asked again.
    pub discovery: DiscoverySettings,
    /// The tracked tuples.
    pub tuples: Vec<TupleConfig>,
    /// The rolling windows' anchor `tuples`' windows were computed at.
    pub anchor: chrono::DateTime<chrono::Utc>,
    /// The digest of the parts that decide the tracked set ([`RawConfig::set_digest`]).
    pub digest: String,
    /// Change notifications; off when `None`.
    pub push: Option<PushConfig>,
    /// The change feed.
    pub changes: ChangesConfig,
    /// Endpoints the change feed is posted to.
    pub sinks: Vec<calsync_sinks::SinkConfig>,
    /// The key that seals delegated accounts' refresh tokens (`accounts.key_file`).
    pub vault: Option<calsync_engine::Vault>,
}

/// `[changes]` as validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangesConfig {
    /// Pages write the change feed.
    pub enabled: bool,
    /// How long changes are kept.
    pub retention: Duration,
    /// Changes carry each row's payload.
    pub payload: bool,
}

/// `[push]` as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PushConfig {
    /// Where Graph posts notifications (`{notification_url}/notifications`).
    pub notification_url: url::Url,
    /// Where Graph posts lifecycle events (`{notification_url}/lifecycle`).
    pub lifecycle_url: url::Url,
    /// The receiver's own address.
    pub listen: std::net::SocketAddr,
    /// How long each subscription is asked to live.
    pub lifetime: Duration,
    /// Renewed when this much of its life is left.
    pub renew_before: Duration,
    /// The polling interval of a calendar whose subscription is healthy.
    pub backstop_interval: Duration,
}

/// `[discovery]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoverySettings {
    /// How often every source is listed again.
    pub every: Duration,
    /// When a mailbox Graph refused is asked again.
    pub refused_recheck: Duration,
    /// A pass that would untrack more than this percentage of a source's calendars (or all
    /// of them) is held until the next pass agrees.
    pub max_untrack_percent: u8,
}

impl Config {
    /// The config keys whose URL is `http://` to a host that is not a loopback address (only
    /// possible with `graph.allow_insecure_http`): warned about at start.
    pub fn clear_text_endpoints(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (key, u) in [
            ("graph.base_url", &self.graph.base_url),
            ("auth.token_url", &self.auth.token_url),
        ] {
            if u.scheme() == "http" && !connect::is_loopback(u) {
                out.push(key);
            }
        }
        out
    }

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
            let credential = match &c.auth.credential {
                // Compared, never printed.
                calsync_graph::Credential::Secret(s) => s.expose_secret().to_owned(),
                other => format!("{other:?}"),
            };
            (
                c.auth.token_url.clone(),
                c.auth.client_id.clone(),
                credential,
                c.auth.scope.clone(),
            )
        };
        if auth(self) != auth(new) {
            out.push("auth");
        }
        if self.vault.as_ref().map(|v| v.key_ids()) != new.vault.as_ref().map(|v| v.key_ids()) {
            out.push("accounts");
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
        if self.push != new.push {
            out.push("push");
        }
        let token = |c: &Config| c.admin_token.as_ref().map(|t| t.expose_secret().to_owned());
        if self.http_listen != new.http_listen
            || token(self) != token(new)
            || self.metric_labels != new.metric_labels
        {
            out.push("http");
        }
        if self.drain_deadline != new.drain_deadline {
            out.push("service.drain_deadline");
        }
        if self.ownership != new.ownership {
            out.push("service.deployment, service.replica, service.lease_ttl");
        }
        out
    }
}

/// `service.deployment`, `service.replica`, `service.lease_ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The deployment whose calendars this config names.
    pub deployment: String,
    /// This replica's name (the host name unless configured).
    pub replica: String,
    /// How long mailbox leases outlive the last heartbeat.
    pub lease_ttl: Duration,
}

/// How `/metrics` labels per-calendar series (`metrics.mailbox_labels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricLabels {
    /// `tuple="<name>"`.
    Name,
    /// `tuple="<first 12 hex digits of SHA-256(salt, name)>"`, with the deployment's random
    /// salt from the database: stable across scrapes and replicas, and not reversible from a
    /// list of the tenant's addresses.
    Hash,
    /// No per-calendar series at all.
    None,
}

impl MetricLabels {
    /// The label value for a tuple named `name` (`salt`: the deployment's, for `Hash`);
    /// `None` when per-calendar series are off.
    pub fn label(self, name: &str, salt: &[u8]) -> Option<String> {
        use sha2::Digest;
        match self {
            MetricLabels::Name => Some(name.to_owned()),
            MetricLabels::Hash => {
                let mut h = sha2::Sha256::new();
                h.update(salt);
                h.update([0u8]);
                h.update(name.as_bytes());
                Some(
                    h.finalize()
                        .iter()
                        .take(6)
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                )
            }
            MetricLabels::None => None,
        }
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

/// Where the database is and how to connect.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// The connection URL; it may carry a password, so it is a secret.
    pub url: SecretString,
    /// Pool size.
    pub max_connections: u32,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// How long the daemon waits for the database at start before giving up.
    pub wait_at_start: Duration,
    /// PostgreSQL's `statement_timeout` for calsync's sessions.
    pub statement_timeout: Duration,
    /// Extra trusted root certificates (PEM), from `tls.ca_file`.
    pub extra_root_pem: Option<Vec<u8>>,
    /// Also trust the operating system's root store (`tls.native_roots`).
    pub native_roots: bool,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_at_start", &self.wait_at_start)
            .field("statement_timeout", &self.statement_timeout)
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

impl RawConfig {
    /// Loads defaults, then the TOML file (if any), then `CALSYNC_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(RawConfig::default()));
        let mut calendars = Vec::new();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(bad(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad("--config", format!("cannot read {}: {e}", path.display())))?;
            // [[calendars]] are read on their own, straight into their type: through figment's
            // value tree, 100,000 of them took seconds of a start, and even a `toml::Table` of
            // them is ~300 MB at its peak. Only a file with an error is read again as a tree, so
            // the message can name the entry (`calendars[3]`).
            let table = match toml::from_str::<Document>(&text) {
                Ok(doc) => {
                    calendars = doc.calendars;
                    doc.rest
                }
                Err(_) => {
                    let mut table: toml::Table = text
                        .parse()
                        .map_err(|e: toml::de::Error| bad("config", e.message().to_owned()))?;
                    if let Some(list) = table.remove("calendars") {
                        calendars = calendar_entries(list)?;
                    }
                    table
                }
            };
            fig = fig.merge(Serialized::defaults(table));
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
        let mut raw: RawConfig = fig.extract().map_err(|e| {
            let key = if e.path.is_empty() {
                "config".to_owned()
            } else {
                e.path.join(".")
            };
            bad(key, e.kind.to_string())
        })?;
        raw.calendars = calendars;
        Ok(raw)
    }
}

/// A config file: its calendars in their type, every other section as a table for figment.
#[derive(serde::Deserialize)]
struct Document {
    #[serde(default)]
    calendars: Vec<RawCalendar>,
    #[serde(flatten)]
    rest: toml::Table,
}

/// `[[calendars]]` as written, each entry read on its own so an error names its index.
fn calendar_entries(list: toml::Value) -> Result<Vec<RawCalendar>, ConfigError> {
    let toml::Value::Array(items) = list else {
        return Err(bad("calendars", "must be a list of [[calendars]] tables"));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.try_into::<RawCalendar>()
                .map_err(|e| bad(format!("calendars[{i}]"), e.message().to_owned()))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    // figment's Jail closures return figment's own (large) error type.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]
    use super::*;
    use figment::Jail;

    const AUTH_AND_ONE_CALENDAR: &str = r#"
[database]
url = "postgres://calsync@127.0.0.1/calsync"
[auth]
token_url = "https://login.microsoftonline.com/t/oauth2/v2.0/token"
client_id = "c"
client_secret = "s"
[[calendars]]
user = "adele@contoso.onmicrosoft.com"
calendar = "default"
start = "2026-01-01T00:00:00Z"
end = "2026-04-01T00:00:00Z"
"#;

    fn load_in(jail: &Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("calsync.toml", toml).unwrap();
        RawConfig::load(Some(Path::new("calsync.toml")))?.validate()
    }

    #[test]
    fn the_example_config_states_the_defaults() {
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/calsync.example.toml"
        ))
        .unwrap();
        Jail::expect_with(|jail| {
            let from_example = load_in(jail, &example).unwrap();
            let from_defaults = load_in(jail, AUTH_AND_ONE_CALENDAR).unwrap();
            assert_eq!(
                format!("{:?}", from_example.sync),
                format!("{:?}", from_defaults.sync)
            );
            let graph = |c: &Config| {
                let g = &c.graph;
                (
                    g.page_size,
                    g.connect_timeout,
                    g.request_timeout,
                    g.max_page_bytes,
                    g.page_memory_budget,
                    g.batch_size,
                    g.batch_linger,
                )
            };
            assert_eq!(graph(&from_example), graph(&from_defaults));
            assert_eq!(from_example.graph.base_url, from_defaults.graph.base_url);
            let db = |c: &Config| {
                let d = &c.database;
                (d.max_connections, d.connect_timeout, d.wait_at_start)
            };
            assert_eq!(db(&from_example), db(&from_defaults));
            assert_eq!(from_example.auth.scope, from_defaults.auth.scope);
            assert_eq!(
                (
                    from_example.log_format,
                    &from_example.log_filter,
                    from_example.http_listen
                ),
                (
                    from_defaults.log_format,
                    &from_defaults.log_filter,
                    from_defaults.http_listen
                )
            );
            assert_eq!(
                (from_example.drain_deadline, from_example.on_remove),
                (from_defaults.drain_deadline, from_defaults.on_remove)
            );
            Ok(())
        });
    }

    /// Issue 26: a calendar read through an account needs the accounts key; an account reads
    /// one mailbox (its own); a public client has no app-only token for calendars without an
    /// account or for sources; a valid one gives each calendar its account.
    #[test]
    fn accounts_need_their_key_one_mailbox_each_and_a_public_client_only_accounts() {
        Jail::expect_with(|jail| {
            let with_account = AUTH_AND_ONE_CALENDAR
                .replace("[[calendars]]\n", "[[calendars]]\naccount = \"adele\"\n");
            let e = load_in(jail, &with_account).unwrap_err();
            assert_eq!(e.key, "accounts.key_file");
            assert!(e.message.contains("calendars[0]") && e.message.contains("adele"));
            jail.create_file("bad.key", "c2hvcnQ=").unwrap();
            let e = load_in(
                jail,
                &format!("{with_account}[accounts]\nkey_file = \"bad.key\"\n"),
            )
            .unwrap_err();
            assert_eq!(e.key, "accounts.key_file");
            assert!(e.message.contains("5 bytes"), "{}", e.message);
            jail.create_file(
                "accounts.key",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n",
            )
            .unwrap();
            let keyed = format!("{with_account}[accounts]\nkey_file = \"accounts.key\"\n");
            let c = load_in(jail, &keyed).unwrap();
            assert_eq!(c.tuples[0].account.as_deref(), Some("adele"));
            assert!(c.vault.is_some());
            // A key rotation keeps the earlier key to open what it sealed.
            let e = load_in(
                jail,
                &keyed.replace(
                    "key_file = \"accounts.key\"\n",
                    "key_file = \"accounts.key\"\nprevious_key_files = [\"bad.key\"]\n",
                ),
            )
            .unwrap_err();
            assert_eq!(e.key, "accounts.previous_key_files[0]");
            jail.create_file("old.key", "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=")
                .unwrap();
            let c = load_in(
                jail,
                &keyed.replace(
                    "key_file = \"accounts.key\"\n",
                    "key_file = \"accounts.key\"\nprevious_key_files = [\"old.key\"]\n",
                ),
            )
            .unwrap();
            assert_eq!(c.vault.map(|v| v.key_ids().len()), Some(2));
            let two = format!(
                "{keyed}[[calendars]]\nname = \"other\"\naccount = \"adele\"\nuser = \"alex@x\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n"
            );
            let e = load_in(jail, &two).unwrap_err();
            assert_eq!(e.key, "calendars[1].user");
            assert!(e.message.contains("own mailbox"), "{}", e.message);

            let public =
                |toml: &str| toml.replace("client_secret = \"s\"", "kind = \"public_client\"");
            let e = load_in(jail, &public(AUTH_AND_ONE_CALENDAR)).unwrap_err();
            assert_eq!(e.key, "calendars[0].account");
            let c = load_in(jail, &public(&keyed)).unwrap();
            assert!(matches!(
                c.auth.credential,
                calsync_graph::Credential::Public
            ));
            // Push with a public client: the accounts make their own subscriptions.
            let pushed = format!(
                "{}[push]\nnotification_url = \"https://calsync.example.com/push\"\nlisten = \"127.0.0.1:9188\"\n",
                public(&keyed)
            );
            assert!(load_in(jail, &pushed).unwrap().push.is_some());
            Ok(())
        });
    }

    #[test]
    fn an_env_override_is_validated_and_its_key_named() {
        Jail::expect_with(|jail| {
            jail.set_env("CALSYNC_SYNC__INTERVAL", "0s");
            let e = load_in(jail, AUTH_AND_ONE_CALENDAR).unwrap_err();
            assert_eq!(e.key, "sync.interval");
            jail.set_env("CALSYNC_SYNC__INTERVAL", "2m");
            let c = load_in(jail, AUTH_AND_ONE_CALENDAR).unwrap();
            assert_eq!(c.sync.interval, Duration::from_secs(120));
            Ok(())
        });
    }

    #[test]
    fn a_bad_calendars_entry_is_named_by_its_index() {
        Jail::expect_with(|jail| {
            let extra = format!(
                "{AUTH_AND_ONE_CALENDAR}\n[[calendars]]\nuser = \"b@x\"\ncolour = \"red\"\n"
            );
            let e = load_in(jail, &extra).unwrap_err();
            assert_eq!(e.key, "calendars[1]");
            assert!(e.message.contains("colour"), "{}", e.message);
            let e = load_in(jail, "calendars = 3\n").unwrap_err();
            assert_eq!(e.key, "calendars");
            Ok(())
        });
    }

    #[test]
    fn the_service_section_names_deployment_replica_and_lease_ttl() {
        Jail::expect_with(|jail| {
            let cfg = format!(
                "{AUTH_AND_ONE_CALENDAR}\n[service]\ndeployment = \"eu-1\"\nreplica = \"pod-7\"\nlease_ttl = \"8s\"\n"
            );
            let c = load_in(jail, &cfg).unwrap();
            assert_eq!(
                (
                    c.ownership.deployment.as_str(),
                    c.ownership.replica.as_str(),
                    c.ownership.lease_ttl
                ),
                ("eu-1", "pod-7", Duration::from_secs(8))
            );
            for (bad, key) in [
                ("deployment = \"a b\"", "service.deployment"),
                ("replica = \"x/y\"", "service.replica"),
                ("lease_ttl = \"1s\"", "service.lease_ttl"),
            ] {
                let cfg = format!("{AUTH_AND_ONE_CALENDAR}\n[service]\n{bad}\n");
                assert_eq!(load_in(jail, &cfg).unwrap_err().key, key, "{bad}");
            }
            Ok(())
        });
    }

    #[test]
    fn calsync_variables_that_name_no_section_are_not_config_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("CALSYNC_SOAK_MINUTES", "10");
            jail.set_env("CALSYNC_CONFIG", "elsewhere.toml");
            assert!(load_in(jail, AUTH_AND_ONE_CALENDAR).is_ok());
            Ok(())
        });
    }

    #[test]
    fn each_section_names_its_own_bad_key() {
        let cases = [
            ("[graph]\nbase_url = \"ftp://x\"\n", "graph.base_url"),
            (
                "[sync]\nper_mailbox_concurrency = 5\n",
                "sync.per_mailbox_concurrency",
            ),
            (
                "[sync]\nmin_backoff = \"2s\"\nmax_backoff = \"1s\"\n",
                "sync.max_backoff",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[http]\nlisten = \"localhost\"\n", "http.listen"),
            (
                "[http]\nadmin_token_file = \"/nonexistent/token\"\n",
                "http.admin_token_file",
            ),
            ("[service]\non_remove = \"drop\"\n", "service.on_remove"),
        ];
        for (section, key) in cases {
            Jail::expect_with(|jail| {
                let e = load_in(jail, &format!("{AUTH_AND_ONE_CALENDAR}\n{section}")).unwrap_err();
                assert_eq!(e.key, key, "{section}");
                Ok(())
            });
        }
        Jail::expect_with(|jail| {
            let twice = format!(
                "{AUTH_AND_ONE_CALENDAR}\n[[calendars]]\nuser = \"adele@contoso.onmicrosoft.com\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-02-01T00:00:00Z\"\n"
            );
            assert_eq!(load_in(jail, &twice).unwrap_err().key, "calendars[1].name");
            Ok(())
        });
    }

    #[test]
    fn batch_settings_outside_graphs_limit_are_refused_naming_the_key() {
        let with = |graph: &str| format!("{AUTH_AND_ONE_CALENDAR}[graph]\n{graph}\n");
        Jail::expect_with(|jail| {
            for (line, key) in [
                ("batch_size = 21", "graph.batch_size"),
                ("batch_size = 0", "graph.batch_size"),
                ("batch_linger = \"2s\"", "graph.batch_linger"),
                ("batch_linger = \"soon\"", "graph.batch_linger"),
            ] {
                let e = load_in(jail, &with(line)).unwrap_err();
                assert_eq!(e.key, key, "{line}");
            }
            let cfg = load_in(jail, &with("batch_size = 1\nbatch_linger = \"5ms\"")).unwrap();
            assert_eq!(cfg.graph.batch_size, 1, "1 sends every replay alone");
            assert_eq!(cfg.graph.batch_linger, Duration::from_millis(5));
            Ok(())
        });
    }

    #[test]
    fn clear_text_and_a_mismatched_cloud_are_refused_and_the_scope_follows_the_cloud() {
        let with = |graph: &str, token: &str| {
            format!(
                "[database]\nurl = \"postgres://calsync@127.0.0.1/calsync\"\n[graph]\nbase_url = \"{graph}\"\n[auth]\ntoken_url = \"{token}\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[[calendars]]\nuser = \"a@b\"\ncalendar = \"default\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n"
            )
        };
        let global_token = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
        let us_token = "https://login.microsoftonline.us/t/oauth2/v2.0/token";
        Jail::expect_with(|jail| {
            // Plain http to a host that is not loopback: refused, naming the key.
            let e =
                load_in(jail, &with("http://graph.example.com/v1.0", global_token)).unwrap_err();
            assert_eq!(e.key, "graph.base_url");
            assert!(e.message.contains("in clear"), "{}", e.message);
            let e = load_in(
                jail,
                &with(
                    "https://graph.microsoft.com/v1.0",
                    "http://login.example.com/t/oauth2/v2.0/token",
                ),
            )
            .unwrap_err();
            assert_eq!(e.key, "auth.token_url");
            // Loopback (graph-sim, a local proxy) is fine, and so is an explicit opt-in.
            load_in(
                jail,
                &with(
                    "http://127.0.0.1:8080/v1.0",
                    "http://127.0.0.1:8080/t/oauth2/v2.0/token",
                ),
            )
            .unwrap();
            let cfg = load_in(
                jail,
                &(with(
                    "http://graph-sim:8080/v1.0",
                    "http://graph-sim:8080/t/oauth2/v2.0/token",
                )
                .replace("[auth]", "allow_insecure_http = true\n[auth]")),
            )
            .unwrap();
            assert_eq!(
                cfg.clear_text_endpoints(),
                ["graph.base_url", "auth.token_url"]
            );
            // National clouds: the scope follows Graph's cloud; a token endpoint of another
            // cloud is refused with the known pairs.
            let cfg = load_in(jail, &with("https://graph.microsoft.us/v1.0", us_token)).unwrap();
            assert_eq!(cfg.auth.scope, "https://graph.microsoft.us/.default");
            let cfg =
                load_in(jail, &with("https://dod-graph.microsoft.us/v1.0", us_token)).unwrap();
            assert_eq!(cfg.auth.scope, "https://dod-graph.microsoft.us/.default");
            let cfg = load_in(
                jail,
                &with("https://graph.microsoft.com/v1.0", global_token),
            )
            .unwrap();
            assert_eq!(cfg.auth.scope, "https://graph.microsoft.com/.default");
            let e =
                load_in(jail, &with("https://graph.microsoft.us/v1.0", global_token)).unwrap_err();
            assert_eq!(e.key, "auth.token_url");
            assert!(e.message.contains("US Government L4"), "{}", e.message);
            let e = load_in(
                jail,
                &with("https://microsoftgraph.chinacloudapi.cn/v1.0", us_token),
            )
            .unwrap_err();
            assert_eq!(e.key, "auth.token_url");
            Ok(())
        });
    }

    #[test]
    fn the_admin_token_is_read_from_its_file_and_must_be_long_enough() {
        Jail::expect_with(|jail| {
            jail.create_file("short-token", "abc\n")?;
            let e = load_in(
                jail,
                &format!("{AUTH_AND_ONE_CALENDAR}\n[http]\nadmin_token_file = \"short-token\"\n"),
            )
            .unwrap_err();
            assert_eq!(e.key, "http.admin_token_file");
            assert!(e.message.contains("16"), "{}", e.message);
            jail.create_file("token", "0123456789abcdef-long-enough\n")?;
            let cfg = load_in(
                jail,
                &format!("{AUTH_AND_ONE_CALENDAR}\n[http]\nadmin_token_file = \"token\"\n"),
            )
            .unwrap();
            assert_eq!(
                cfg.admin_token
                    .as_ref()
                    .map(|t| t.expose_secret().to_owned()),
                Some("0123456789abcdef-long-enough".to_owned())
            );
            assert!(
                !format!("{cfg:?}").contains("long-enough"),
                "the token never reaches Debug"
            );
            // A secret file others can read is allowed, and warned about.
            use std::os::unix::fs::PermissionsExt;
            let token = jail.directory().join("token");
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
            let toml = format!("{AUTH_AND_ONE_CALENDAR}\n[http]\nadmin_token_file = \"token\"\n");
            let cfg = load_in(jail, &toml).unwrap();
            assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
            assert!(cfg.warnings[0].starts_with("http.admin_token_file:"));
            assert!(cfg.warnings[0].contains("chmod 600"));
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(load_in(jail, &toml).unwrap().warnings.is_empty());
            jail.set_env("CALSYNC_DATABASE__STATEMENT_TIMEOUT", "10ms");
            let e = load_in(jail, AUTH_AND_ONE_CALENDAR).unwrap_err();
            assert_eq!(e.key, "database.statement_timeout");
            Ok(())
        });
    }

    #[test]
    fn metric_labels_are_the_name_a_stable_salted_hash_or_nothing() {
        let salt = [7u8; 32];
        assert_eq!(
            MetricLabels::Name.label("adele", &salt),
            Some("adele".to_owned())
        );
        let name = "adele@contoso.onmicrosoft.com/default";
        let h = MetricLabels::Hash.label(name, &salt).unwrap();
        assert_eq!(h.len(), 12);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            MetricLabels::Hash.label(name, &salt),
            Some(h.clone()),
            "stable across scrapes"
        );
        // Issue 23: the unsalted prefix was SHA-256(name), which anyone with the tenant's
        // addresses can compute; with the deployment's salt it is not that, and another
        // deployment's labels differ.
        use sha2::Digest;
        let unsalted: String = sha2::Sha256::digest(name.as_bytes())
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_ne!(h, unsalted);
        assert_ne!(MetricLabels::Hash.label(name, &[8u8; 32]), Some(h));
        assert_eq!(MetricLabels::None.label("adele", &salt), None);
    }

    /// A self-signed CA certificate (`openssl req -x509`, P-256), for the `tls.ca_file` tests.
    const TEST_CA: &str = include_str!("test-ca.pem");

    #[test]
    fn tls_ca_file_is_read_checked_and_trusted_by_both_clients() {
        Jail::expect_with(|jail| {
            let with = |extra: &str| format!("{AUTH_AND_ONE_CALENDAR}\n[tls]\n{extra}\n");
            let e = load_in(jail, &with("ca_file = \"missing.pem\"")).unwrap_err();
            assert_eq!(e.key, "tls.ca_file");
            jail.create_file("not-a-cert.pem", "hello\n")?;
            let e = load_in(jail, &with("ca_file = \"not-a-cert.pem\"")).unwrap_err();
            assert_eq!(e.key, "tls.ca_file");
            assert!(e.message.contains("no PEM certificate"), "{}", e.message);
            jail.create_file("ca.pem", TEST_CA)?;
            let cfg = load_in(jail, &with("ca_file = \"ca.pem\"\nnative_roots = true")).unwrap();
            assert_eq!(
                cfg.graph.extra_roots_pem.as_deref(),
                Some(TEST_CA.as_bytes())
            );
            assert!(cfg.graph.native_roots);
            assert_eq!(
                cfg.database.extra_root_pem.as_deref(),
                Some(TEST_CA.as_bytes())
            );
            // The Graph client accepts it (and the OS root store) as trust anchors.
            calsync_graph::GraphClient::new(cfg.graph.clone(), cfg.auth.clone()).unwrap();
            // A PEM block that is not a certificate is refused when the client is built.
            jail.create_file(
                "broken.pem",
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            )?;
            let cfg = load_in(jail, &with("ca_file = \"broken.pem\"")).unwrap();
            let err = calsync_graph::GraphClient::new(cfg.graph, cfg.auth).unwrap_err();
            assert!(err.to_string().contains("tls.ca_file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_rolling_window_is_fixed_at_the_rebase_anchor_and_bad_offsets_are_named() {
        let rolling = |start: &str, end: &str, sync: &str| {
            AUTH_AND_ONE_CALENDAR
                .replace("2026-01-01T00:00:00Z", start)
                .replace("2026-04-01T00:00:00Z", end)
                .replace("[[calendars]]", &format!("[sync]\n{sync}\n[[calendars]]"))
        };
        let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        let now = at("2026-11-28T07:30:00Z");
        Jail::expect_with(|jail| {
            let read = |toml: &str| {
                jail.create_file("calsync.toml", toml).unwrap();
                RawConfig::load(Some(Path::new("calsync.toml")))?.validate_at(now)
            };
            // Default cadence: daily at midnight UTC.
            let c = read(&rolling("-90d", "+365d", "")).unwrap();
            let t = &c.tuples[0];
            assert_eq!(t.window.start, at("2026-08-30T00:00:00Z"));
            assert_eq!(t.window.end, at("2027-11-28T00:00:00Z"));
            assert!(t.rolling.is_some());
            assert_eq!(c.window_rebase, calsync_engine::Rebase::default());
            // Aligned to 03:00: at 07:30 the anchor is today's 03:00; months are humantime's.
            let c = read(&rolling(
                "- 1 month",
                "+2w",
                "window_rebase = \"1d\"\nwindow_rebase_at = \"03:00\"",
            ))
            .unwrap();
            let w = c.tuples[0].window;
            assert_eq!(w.end, at("2026-12-12T03:00:00Z"));
            assert_eq!(
                w.start,
                at("2026-11-28T03:00:00Z") - chrono::TimeDelta::seconds(2_630_016)
            );
            // One fixed edge and one rolling edge.
            let c = read(&rolling("2026-01-01T00:00:00Z", "+30d", "")).unwrap();
            assert_eq!(c.tuples[0].window.start, at("2026-01-01T00:00:00Z"));
            assert!(c.tuples[0].rolling.is_some());
            // A fixed window does not roll.
            assert!(
                read(AUTH_AND_ONE_CALENDAR).unwrap().tuples[0]
                    .rolling
                    .is_none()
            );
            for (start, end, sync, key, says) in [
                ("-90x", "+1d", "", "calendars[0].start", "not an offset"),
                ("-1d", "tomorrow", "", "calendars[0].end", "RFC 3339"),
                ("+5d", "+1d", "", "calendars[0].end", "empty window"),
                (
                    "-1d",
                    "+1d",
                    "window_rebase = \"0s\"",
                    "sync.window_rebase",
                    "at least 1s",
                ),
                (
                    "-1d",
                    "+1d",
                    "window_rebase_at = \"25:00\"",
                    "sync.window_rebase_at",
                    "time of day",
                ),
                ("-1d", "+999999d", "", "calendars[0].end", "century"),
            ] {
                let e = read(&rolling(start, end, sync)).unwrap_err();
                assert_eq!(e.key, key, "{start} {end} {sync}");
                assert!(e.message.contains(says), "{}", e.message);
            }
            Ok(())
        });
    }

    #[test]
    fn a_schedule_is_one_or_more_cron_patterns_in_a_zone_and_bad_ones_are_named() {
        let with = |lines: &str| format!("{AUTH_AND_ONE_CALENDAR}{lines}\n");
        Jail::expect_with(|jail| {
            let c = load_in(
                jail,
                &with("schedule = [\"* 8-17 * * Mon-Fri\", \"*/30 * * * *\"]\nschedule_zone = \"Europe/Berlin\""),
            )
            .unwrap();
            let s = c.tuples[0].schedule.as_ref().unwrap();
            assert_eq!(s.patterns(), ["* 8-17 * * Mon-Fri", "*/30 * * * *"]);
            assert_eq!(s.zone(), "Europe/Berlin");
            let c = load_in(jail, &with("schedule = \"*/5 * * * *\"")).unwrap();
            assert_eq!(c.tuples[0].schedule.as_ref().unwrap().zone(), "UTC");
            assert!(
                load_in(jail, AUTH_AND_ONE_CALENDAR).unwrap().tuples[0]
                    .schedule
                    .is_none()
            );
            for (lines, key, says) in [
                (
                    "schedule = \"every minute\"",
                    "calendars[0].schedule",
                    "not a cron pattern",
                ),
                (
                    "schedule = \"* * * * *\"\nschedule_zone = \"Berlin\"",
                    "calendars[0].schedule_zone",
                    "IANA",
                ),
                (
                    "schedule_zone = \"UTC\"",
                    "calendars[0].schedule_zone",
                    "no schedule",
                ),
                ("schedule = []", "calendars[0].schedule", "no cron pattern"),
            ] {
                let e = load_in(jail, &with(lines)).unwrap_err();
                assert_eq!(e.key, key, "{lines}");
                assert!(e.message.contains(says), "{}", e.message);
            }
            Ok(())
        });
    }

    #[test]
    fn the_tenant_example_is_a_whole_tenant_in_under_15_lines() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/tenant.example.toml"
        ))
        .unwrap();
        assert!(text.lines().count() < 15, "{}", text.lines().count());
        // The reference shows it too, word for word.
        let reference = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/calsync.example.toml"
        ))
        .unwrap();
        let shown: String = reference
            .lines()
            .filter_map(|l| l.strip_prefix("#   "))
            .take_while(|l| !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        let tenant_lines: Vec<&str> = text.lines().collect();
        let shown_lines: Vec<&str> = shown.lines().collect();
        assert_eq!(
            shown_lines, tenant_lines,
            "calsync.example.toml's tenant block"
        );
        Jail::expect_with(|jail| {
            jail.create_file("client-secret", "s\n")?;
            let text = text.replace("/etc/calsync/client-secret", "client-secret");
            let c = load_in(jail, &text).unwrap();
            assert!(c.tuples.is_empty());
            assert_eq!(c.sources.len(), 1);
            assert!(c.sources[0].window.is_rolling());
            assert_eq!(
                c.sources[0].members,
                calsync_engine::Members::Users {
                    filter: Some("accountEnabled eq true".into())
                }
            );
            Ok(())
        });
    }

    #[test]
    fn a_source_names_one_kind_of_members_and_its_bad_keys() {
        let base = AUTH_AND_ONE_CALENDAR;
        let with = |src: &str| {
            format!("{base}\n[[sources]]\nname = \"s\"\nstart = \"-1d\"\nend = \"+1d\"\n{src}\n")
        };
        Jail::expect_with(|jail| {
            let c = load_in(jail, &with("group = \"g-1\"\ncalendars = \"Team *\"")).unwrap();
            assert_eq!(
                c.sources[0].members,
                calsync_engine::Members::Group("g-1".into())
            );
            assert_eq!(
                c.sources[0].calendars,
                calsync_engine::CalendarPick::Named("Team *".into())
            );
            assert_eq!(
                load_in(jail, &with("rooms = \"all\"")).unwrap().sources[0].members,
                calsync_engine::Members::Rooms
            );
            for (src, key, says) in [
                ("", "sources[0].users", "exactly one"),
                (
                    "users = \"all\"\nrooms = \"all\"",
                    "sources[0].users",
                    "exactly one",
                ),
                ("users = \"some\"", "sources[0].users", "not \"all\""),
                (
                    "rooms = \"all\"\nfilter = \"x eq 1\"",
                    "sources[0].filter",
                    "users",
                ),
                (
                    "users = \"all\"\ncalendars = \"\"",
                    "sources[0].calendars",
                    "empty",
                ),
                ("users = \"all\"\ncolour = \"red\"", "sources", "colour"),
            ] {
                let e = load_in(jail, &with(src)).unwrap_err();
                assert!(e.key.starts_with(key), "{src}: {} {}", e.key, e.message);
                assert!(e.message.contains(says), "{src}: {}", e.message);
            }
            let e = load_in(
                jail,
                &format!("{}\n[discovery]\nevery = \"0s\"\n", with("users = \"all\"")),
            )
            .unwrap_err();
            assert_eq!(e.key, "discovery.every");
            Ok(())
        });
    }
}
