//! Validation: the file as written becomes the typed [`Config`], one function per section.
//! Every error names the key that is wrong.
//!
//! Longer than 600 lines because it is one function per section in the order of the file,
//! each short and independent; the tests of `config/mod.rs` hold every key's errors. A split
//! into one file per section is due when a section grows (`[push]`, `[auth]` kinds).

use super::{
    Config, ConfigError, DatabaseConfig, DiscoverySettings, LogFormat, MetricLabels, OnRemove,
    Patterns, RawAuth, RawCalendar, RawConfig, RawDatabase, RawDiscovery, RawGraph, RawHttp,
    RawLog, RawMetrics, RawService, RawSource, RawSync, RawTls, bad,
};
use calsync_engine::{
    Budget, CalendarPick, CronSchedule, CronScheduleError, Edge, Members, Rebase, Source,
    SyncSettings, TupleConfig, WindowSpec,
};
use calsync_graph::{AuthConfig, CalendarRef, GraphConfig};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

impl RawConfig {
    /// Checks every value and builds the typed config.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_at(Utc::now())
    }

    /// [`RawConfig::validate`] with the clock at `now` (rolling windows are fixed at the
    /// re-base anchor in force then).
    pub fn validate_at(&self, now: DateTime<Utc>) -> Result<Config, ConfigError> {
        // In file order, so the first error reported is the first one in the file.
        let mut database = database(&self.database)?;
        let mut graph = graph(&self.graph, self.sync.page_size)?;
        let roots = tls(&self.tls)?;
        database.extra_root_pem = roots.clone();
        database.native_roots = self.tls.native_roots;
        graph.extra_roots_pem = roots;
        graph.native_roots = self.tls.native_roots;
        let auth = auth(&self.auth, &graph.base_url, self.graph.allow_insecure_http)?;
        let sync = sync(&self.sync)?;
        let window_rebase = rebase(&self.sync)?;
        let (log_format, log_filter) = log(&self.log)?;
        let anchor = window_rebase.anchor(now);
        let sources = sources(&self.sources)?;
        let tuples = calendars(&self.calendars, anchor, !sources.is_empty())?;
        let discovery = discovery(&self.discovery)?;
        let (http_listen, drain_deadline, on_remove) = service(&self.http, &self.service)?;
        let admin_token = admin_token(&self.http)?;
        let metric_labels = metrics(&self.metrics)?;
        let ownership = ownership(&self.service)?;
        Ok(Config {
            database,
            graph,
            auth,
            sync,
            log_format,
            log_filter,
            http_listen,
            admin_token,
            metric_labels,
            warnings: self.secret_file_warnings(),
            drain_deadline,
            on_remove,
            ownership,
            window_rebase,
            sources,
            discovery,
            tuples,
        })
    }

    /// A secret file readable by its group or by others (the client secret, the database
    /// URL with its password, the admin token): allowed, but warned about.
    fn secret_file_warnings(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        [
            ("auth.client_secret_file", &self.auth.client_secret_file),
            ("database.url_file", &self.database.url_file),
            ("http.admin_token_file", &self.http.admin_token_file),
        ]
        .into_iter()
        .filter_map(|(key, p)| {
            let p = resolve_credential(p.as_ref()?);
            let mode = std::fs::metadata(&p).ok()?.permissions().mode();
            (mode & 0o077 != 0).then(|| {
                format!(
                    "{key}: {} is readable by {} (mode {:o}); chmod 600 it",
                    p.display(),
                    if mode & 0o007 != 0 {
                        "others"
                    } else {
                        "its group"
                    },
                    mode & 0o777
                )
            })
        })
        .collect()
    }

    /// Only `service.deployment`, `service.replica` and `service.lease_ttl`.
    pub fn ownership(&self) -> Result<super::Ownership, ConfigError> {
        ownership(&self.service)
    }

    /// Only the `[database]` section (and `tls.ca_file`), for commands that need nothing else.
    pub fn database_config(&self) -> Result<DatabaseConfig, ConfigError> {
        let mut d = database(&self.database)?;
        d.extra_root_pem = tls(&self.tls)?;
        d.native_roots = self.tls.native_roots;
        Ok(d)
    }
}

/// `[database]`: the URL (inline, from a file, or `DATABASE_URL`) and the pool.
fn database(d: &RawDatabase) -> Result<DatabaseConfig, ConfigError> {
    let db_url = match (&d.url.0, &d.url_file) {
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
    if d.max_connections == 0 {
        return Err(bad("database.max_connections", "must be at least 1"));
    }
    Ok(DatabaseConfig {
        url: db_url,
        max_connections: d.max_connections,
        connect_timeout: duration("database.connect_timeout", &d.connect_timeout)?,
        wait_at_start: duration("database.wait_at_start", &d.wait_at_start)?,
        extra_root_pem: None,
        native_roots: false,
        statement_timeout: match duration("database.statement_timeout", &d.statement_timeout)? {
            t if t < std::time::Duration::from_secs(1) => {
                return Err(bad("database.statement_timeout", "must be at least 1s"));
            }
            t => t,
        },
    })
}

/// `[graph]` (and `sync.page_size`, which is sent to Graph as `Prefer: odata.maxpagesize`).
fn graph(g: &RawGraph, page_size: u32) -> Result<GraphConfig, ConfigError> {
    let base_url = http_url("graph.base_url", &g.base_url)?;
    refuse_clear_text("graph.base_url", &base_url, g.allow_insecure_http)?;
    let mut graph = GraphConfig::new(base_url);
    graph.connect_timeout = duration("graph.connect_timeout", &g.connect_timeout)?;
    graph.request_timeout = duration("graph.request_timeout", &g.request_timeout)?;
    if g.max_page_bytes < 1024 {
        return Err(bad("graph.max_page_bytes", "must be at least 1024"));
    }
    graph.max_page_bytes = g.max_page_bytes as usize;
    graph.page_memory_budget = usize::try_from(g.page_memory_budget).map_err(|_| {
        bad(
            "graph.page_memory_budget",
            "is larger than this machine can address",
        )
    })?;
    if graph.page_memory_budget != 0 && graph.page_memory_budget < 1024 * 1024 {
        return Err(bad(
            "graph.page_memory_budget",
            "must be 0 (off) or at least 1048576 (1 MiB)",
        ));
    }
    if !(1..=calsync_graph::batch::MAX_REQUESTS as u32).contains(&g.batch_size) {
        return Err(bad(
            "graph.batch_size",
            format!(
                "{} is out of range 1..={} (Graph's limit; 1 sends every request alone)",
                g.batch_size,
                calsync_graph::batch::MAX_REQUESTS
            ),
        ));
    }
    graph.batch_size = g.batch_size as usize;
    graph.batch_linger = duration("graph.batch_linger", &g.batch_linger)?;
    if graph.batch_linger > Duration::from_secs(1) {
        return Err(bad(
            "graph.batch_linger",
            "must be at most 1s: every replay waits for it",
        ));
    }
    if !(1..=10_000).contains(&page_size) {
        return Err(bad(
            "sync.page_size",
            format!("{} is out of range 1..=10000", page_size),
        ));
    }
    graph.page_size = Some(page_size);
    Ok(graph)
}

/// `[auth]`: the client-credentials app. Its token endpoint and Graph must be of one cloud.
fn auth(
    a: &RawAuth,
    graph_base: &Url,
    allow_insecure_http: bool,
) -> Result<AuthConfig, ConfigError> {
    if a.token_url.trim().is_empty() {
        return Err(bad(
            "auth.token_url",
            "missing: e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token",
        ));
    }
    let token_url = http_url("auth.token_url", &a.token_url)?;
    refuse_clear_text("auth.token_url", &token_url, allow_insecure_http)?;
    if let (Some(token_cloud), Some(graph_cloud)) = (
        cloud_of_token_host(token_url.host_str().unwrap_or("")),
        cloud_of_graph_host(graph_base.host_str().unwrap_or("")),
    ) {
        if token_cloud != graph_cloud {
            return Err(bad(
                "auth.token_url",
                format!(
                    "{} is the token endpoint of {token_cloud}, but graph.base_url is {graph_cloud}'s Graph; the pairs are: {}",
                    token_url.host_str().unwrap_or(""),
                    CLOUDS
                        .iter()
                        .map(|c| format!("{} ({} + {})", c.name, c.login, c.graph))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    if a.client_id.trim().is_empty() {
        return Err(bad("auth.client_id", "missing"));
    }
    let client_secret = match (&a.client_secret.0, &a.client_secret_file) {
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
    // The `.default` scope of the Graph calsync talks to: https://graph.microsoft.com/.default
    // asks a US Government or China tenant for a token Graph there does not accept.
    let scope = match a.scope.trim() {
        "" => default_scope(graph_base),
        s => s.to_owned(),
    };
    Ok(AuthConfig {
        token_url,
        client_id: a.client_id.trim().to_owned(),
        client_secret,
        scope,
    })
}

/// A Microsoft cloud: its token endpoint host and its Graph hosts.
struct Cloud {
    name: &'static str,
    login: &'static str,
    graph: &'static str,
}

/// The national clouds and their pairs (Microsoft's "national cloud deployments" page).
const CLOUDS: [Cloud; 4] = [
    Cloud {
        name: "the global service",
        login: "login.microsoftonline.com",
        graph: "graph.microsoft.com",
    },
    Cloud {
        name: "US Government L4",
        login: "login.microsoftonline.us",
        graph: "graph.microsoft.us",
    },
    Cloud {
        name: "US Government L5 (DOD)",
        login: "login.microsoftonline.us",
        graph: "dod-graph.microsoft.us",
    },
    Cloud {
        name: "China (21Vianet)",
        login: "login.chinacloudapi.cn",
        graph: "microsoftgraph.chinacloudapi.cn",
    },
];

/// Which cloud a token endpoint host belongs to (L4 and L5 share one).
fn cloud_of_token_host(host: &str) -> Option<&'static str> {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "login.microsoftonline.com" | "login.windows.net" => Some("the global service"),
        "login.microsoftonline.us" => Some("US Government"),
        "login.chinacloudapi.cn" | "login.partner.microsoftonline.cn" => Some("China (21Vianet)"),
        _ => None,
    }
}

/// Which cloud a Graph host belongs to, named as [`cloud_of_token_host`] names it.
fn cloud_of_graph_host(host: &str) -> Option<&'static str> {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "graph.microsoft.com" => Some("the global service"),
        "graph.microsoft.us" | "dod-graph.microsoft.us" => Some("US Government"),
        "microsoftgraph.chinacloudapi.cn" => Some("China (21Vianet)"),
        _ => None,
    }
}

/// `https://<graph host>/.default` for a known cloud's Graph; the global one otherwise (a
/// simulator or proxy that does not check it).
fn default_scope(graph_base: &Url) -> String {
    match graph_base.host_str() {
        Some(h) if cloud_of_graph_host(h).is_some() => format!("https://{h}/.default"),
        _ => "https://graph.microsoft.com/.default".to_owned(),
    }
}

/// `http://` sends the client secret or bearer tokens in clear: refused unless the host is a
/// loopback address or `graph.allow_insecure_http` says so.
fn refuse_clear_text(key: &str, u: &Url, allowed: bool) -> Result<(), ConfigError> {
    if u.scheme() == "https" || allowed || is_loopback(u) {
        return Ok(());
    }
    Err(bad(
        key,
        format!(
            "'{u}' is http:// to a host that is not a loopback address: tokens and the client secret would travel in clear; use https, or set graph.allow_insecure_http = true for a test rig"
        ),
    ))
}

/// Whether the URL's host is a loopback address (127.0.0.0/8, ::1) or `localhost`.
pub(super) fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// `[sync]`: the engine's cadence, retries and request limits.
fn sync(s: &RawSync) -> Result<SyncSettings, ConfigError> {
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
    Ok(SyncSettings {
        interval,
        full_resync_every,
        max_pages_per_round: s.max_pages_per_round,
        max_stale_pages: s.max_stale_pages,
        max_attempts: s.max_attempts as usize,
        min_backoff,
        max_backoff,
        failed_retry_interval: duration("sync.failed_retry_interval", &s.failed_retry_interval)?,
        stuck_round_after: match duration("sync.stuck_round_after", &s.stuck_round_after)? {
            t if t < Duration::from_secs(60) => {
                return Err(bad("sync.stuck_round_after", "must be at least 1m"));
            }
            t => t,
        },
        max_in_flight: s.max_in_flight as usize,
        min_in_flight: s.min_in_flight as usize,
        per_mailbox_concurrency: s.per_mailbox_concurrency as usize,
        mailbox_budget,
        startup_spread: duration("sync.startup_spread", &s.startup_spread)?,
    })
}

/// `[log]`: the format and the filter.
fn log(l: &RawLog) -> Result<(LogFormat, String), ConfigError> {
    let log_format = match l.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(bad(
                "log.format",
                format!("'{other}' is not one of text, json"),
            ));
        }
    };
    tracing_subscriber::EnvFilter::try_new(&l.filter)
        .map_err(|e| bad("log.filter", e.to_string()))?;
    Ok((log_format, l.filter.clone()))
}

/// `sync.window_rebase` and `sync.window_rebase_at`.
fn rebase(s: &RawSync) -> Result<Rebase, ConfigError> {
    let every = duration("sync.window_rebase", &s.window_rebase)?;
    if every < Duration::from_secs(1) {
        return Err(bad("sync.window_rebase", "must be at least 1s"));
    }
    let at = s.window_rebase_at.trim();
    let time = chrono::NaiveTime::parse_from_str(at, "%H:%M")
        .or_else(|_| chrono::NaiveTime::parse_from_str(at, "%H:%M:%S"))
        .map_err(|_| {
            bad(
                "sync.window_rebase_at",
                format!("'{at}' is not a time of day; use e.g. \"03:00\" (UTC)"),
            )
        })?;
    let at = time - chrono::NaiveTime::MIN;
    Ok(Rebase {
        every,
        at: at.to_std().unwrap_or_default(),
    })
}

/// A window edge: an RFC 3339 instant, or an offset from now with its sign (`-90d`, `+365d`,
/// `+12 months`; humantime's units, where a month is 30.44 days and a year 365.25).
fn edge(key: &str, v: &str) -> Result<Edge, ConfigError> {
    let t = v.trim();
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'-') => (-1, &t[1..]),
        Some(b'+') => (1, &t[1..]),
        _ => return instant(key, v).map(Edge::At),
    };
    let d = humantime::parse_duration(rest.trim()).map_err(|e| {
        bad(
            key,
            format!("'{v}' is not an offset ({e}); use e.g. \"-90d\" or \"+365d\""),
        )
    })?;
    let d = chrono::TimeDelta::from_std(d)
        .ok()
        .filter(|d| *d <= chrono::TimeDelta::days(100 * 366))
        .ok_or_else(|| bad(key, format!("'{v}' is more than a century")))?;
    Ok(Edge::Offset(d * sign))
}

/// A `schedule` with its `schedule_zone`, keys named by `k`.
fn schedule(
    k: &dyn Fn(&str) -> String,
    patterns: Option<&Patterns>,
    zone: Option<&str>,
) -> Result<Option<Arc<CronSchedule>>, ConfigError> {
    match (patterns, zone) {
        (Some(p), zone) => Ok(Some(Arc::new(
            CronSchedule::new(&p.to_vec(), zone.unwrap_or("UTC")).map_err(|e| {
                let key = if matches!(e, CronScheduleError::Zone(_)) {
                    "schedule_zone"
                } else {
                    "schedule"
                };
                bad(k(key), e.to_string())
            })?,
        ))),
        (None, Some(_)) => Err(bad(
            k("schedule_zone"),
            "is set but there is no schedule to read in it",
        )),
        (None, None) => Ok(None),
    }
}

/// A calendar's or a source's own interval, if given: at least a second.
fn interval(key: &str, v: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    let d = v.map(|v| duration(key, v)).transpose()?;
    if d.is_some_and(|d| d < Duration::from_secs(1)) {
        return Err(bad(key, "must be at least 1s"));
    }
    Ok(d)
}

/// `[discovery]`.
fn discovery(d: &RawDiscovery) -> Result<DiscoverySettings, ConfigError> {
    let every = duration("discovery.every", &d.every)?;
    if every < Duration::from_secs(1) {
        return Err(bad("discovery.every", "must be at least 1s"));
    }
    Ok(DiscoverySettings {
        every,
        refused_recheck: duration("discovery.refused_recheck", &d.refused_recheck)?,
    })
}

/// `[[sources]]`: directory sources, each naming exactly one kind of members.
fn sources(raw: &[RawSource]) -> Result<Vec<Source>, ConfigError> {
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let k = |f: &str| format!("sources[{i}].{f}");
        let name = plain_name(&k("name"), r.name.trim())?;
        if !names.insert(name.clone()) {
            return Err(bad(k("name"), format!("'{name}' names another source too")));
        }
        let all = |key: &str, v: &str| {
            if v.trim().eq_ignore_ascii_case("all") {
                Ok(())
            } else {
                Err(bad(k(key), format!("'{v}' is not \"all\"")))
            }
        };
        let members = match (&r.users, &r.group, &r.rooms) {
            (Some(u), None, None) => {
                all("users", u)?;
                Members::Users {
                    filter: r.filter.clone().filter(|f| !f.trim().is_empty()),
                }
            }
            (None, Some(g), None) if !g.trim().is_empty() => Members::Group(g.trim().to_owned()),
            (None, None, Some(v)) => {
                all("rooms", v)?;
                Members::Rooms
            }
            _ => {
                return Err(bad(
                    k("users"),
                    "name exactly one of users = \"all\", group = \"<object id>\", rooms = \"all\"",
                ));
            }
        };
        if r.filter.is_some() && !matches!(members, Members::Users { .. }) {
            return Err(bad(k("filter"), "filters users = \"all\" only"));
        }
        let calendars = match r.calendars.as_deref().map(str::trim) {
            None | Some("default") => CalendarPick::Default,
            Some("all") => CalendarPick::All,
            Some("") => return Err(bad(k("calendars"), "is empty")),
            Some(name) => CalendarPick::Named(name.to_owned()),
        };
        let window = WindowSpec {
            start: edge(&k("start"), &r.start)?,
            end: edge(&k("end"), &r.end)?,
        };
        if window.at(Utc::now()).is_none() && !window.is_rolling() {
            return Err(bad(k("end"), "must be after start"));
        }
        let interval = interval(&k("interval"), r.interval.as_deref())?;
        out.push(Source {
            name,
            members,
            calendars,
            exclude: r.exclude.iter().map(|e| e.trim().to_lowercase()).collect(),
            window,
            interval,
            schedule: schedule(&k, r.schedule.as_ref(), r.schedule_zone.as_deref())?,
        });
    }
    Ok(out)
}

/// `[[calendars]]`: one tuple each, with distinct names; rolling windows fixed at `anchor`.
fn calendars(
    calendars: &[RawCalendar],
    anchor: DateTime<Utc>,
    has_sources: bool,
) -> Result<Vec<TupleConfig>, ConfigError> {
    if calendars.is_empty() && !has_sources {
        return Err(bad(
            "calendars",
            "no [[calendars]] or [[sources]] entry: calsync has nothing to sync",
        ));
    }
    let mut names = HashSet::new();
    let mut tuples = Vec::with_capacity(calendars.len());
    for (i, c) in calendars.iter().enumerate() {
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
        let spec = WindowSpec {
            start: edge(&k("start"), &c.start)?,
            end: edge(&k("end"), &c.end)?,
        };
        let Some(window) = spec.at(anchor) else {
            return Err(bad(
                k("end"),
                if spec.is_rolling() {
                    format!("must be after start (at {anchor}, they give an empty window)")
                } else {
                    "must be after start".to_owned()
                },
            ));
        };
        let interval = interval(&k("interval"), c.interval.as_deref())?;
        let schedule = schedule(&k, c.schedule.as_ref(), c.schedule_zone.as_deref())?;
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
            window,
            rolling: spec.is_rolling().then_some(spec),
            schedule,
            interval,
        });
    }
    Ok(tuples)
}

/// A name that goes into SQL rows, logs and metric labels: 1–63 characters of letters,
/// digits, `.`, `_` and `-`.
fn plain_name(key: &str, v: &str) -> Result<String, ConfigError> {
    let v = v.trim();
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(bad(
            key,
            format!("'{v}' must be 1 to 63 letters, digits, '.', '_' or '-'"),
        ));
    }
    Ok(v.to_owned())
}

/// The host name, for a replica that is not given a name.
fn host_name() -> String {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_proc = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    from_env
        .into_iter()
        .chain(from_proc)
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .take(63)
                .collect::<String>()
        })
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "calsync".into())
}

/// `service.deployment`, `service.replica`, `service.lease_ttl`.
pub(super) fn ownership(service: &RawService) -> Result<super::Ownership, ConfigError> {
    let deployment = plain_name("service.deployment", &service.deployment)?;
    let replica = match service.replica.trim() {
        "" => host_name(),
        v => plain_name("service.replica", v)?,
    };
    let lease_ttl = duration("service.lease_ttl", &service.lease_ttl)?;
    if lease_ttl < Duration::from_secs(2) || lease_ttl > Duration::from_secs(600) {
        return Err(bad(
            "service.lease_ttl",
            "must be between 2s and 10m (a dead replica's mailboxes move after it)",
        ));
    }
    Ok(super::Ownership {
        deployment,
        replica,
        lease_ttl,
    })
}

/// `http.admin_token_file`: the token `POST /reload` requires, at least 16 characters.
pub(super) fn admin_token(http: &RawHttp) -> Result<Option<SecretString>, ConfigError> {
    let Some(p) = &http.admin_token_file else {
        return Ok(None);
    };
    let token = read_secret_file("http.admin_token_file", &resolve_credential(p))?;
    if token.expose_secret().chars().count() < 16 {
        return Err(bad(
            "http.admin_token_file",
            "the token must be at least 16 characters",
        ));
    }
    Ok(Some(token))
}

/// `[tls]`: the extra roots' PEM, read and checked now so a bad file is named at start.
fn tls(t: &RawTls) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(p) = &t.ca_file else {
        return Ok(None);
    };
    let path = resolve_credential(p);
    let pem = std::fs::read(&path).map_err(|e| {
        bad(
            "tls.ca_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(bad(
            "tls.ca_file",
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(Some(pem))
}

/// `[metrics]`.
fn metrics(m: &RawMetrics) -> Result<MetricLabels, ConfigError> {
    match m.mailbox_labels.trim() {
        "name" => Ok(MetricLabels::Name),
        "hash" => Ok(MetricLabels::Hash),
        "none" => Ok(MetricLabels::None),
        other => Err(bad(
            "metrics.mailbox_labels",
            format!("'{other}' is not one of name, hash, none"),
        )),
    }
}

/// `[http]` and `[service]`.
fn service(
    http: &RawHttp,
    service: &RawService,
) -> Result<(Option<std::net::SocketAddr>, Duration, OnRemove), ConfigError> {
    let http_listen = match http.listen.trim() {
        "" => None,
        v => Some(v.parse::<std::net::SocketAddr>().map_err(|_| {
            bad(
                "http.listen",
                format!("'{v}' is not host:port with an IP address (e.g. 127.0.0.1:9187)"),
            )
        })?),
    };
    let drain_deadline = duration("service.drain_deadline", &service.drain_deadline)?;
    let on_remove = match service.on_remove.trim() {
        "keep" => OnRemove::Keep,
        "purge" => OnRemove::Purge,
        other => {
            return Err(bad(
                "service.on_remove",
                format!("'{other}' is not one of keep, purge"),
            ));
        }
    };
    Ok((http_listen, drain_deadline, on_remove))
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
