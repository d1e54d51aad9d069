//! Validation: the file as written becomes the typed [`Config`], one function per section.
//! Every error names the key that is wrong.
//! The connection sections (`[database]`, `[graph]`, `[tls]`) are in `connect.rs`, `[auth]`'s
//! credential kinds in `credentials.rs`,
//! values several sections share in `values.rs`; the tests of `config/mod.rs` hold every key's
//! errors.

use super::connect::{database, graph, tls};
use super::credentials::auth_from_process_env as auth;
use super::values::{duration, instant, read_secret_file, resolve_credential};
use super::{
    ChangesConfig, Config, ConfigError, DatabaseConfig, DiscoverySettings, LogFormat, MetricLabels,
    OnRemove, Patterns, RawCalendar, RawChanges, RawConfig, RawDiscovery, RawHttp, RawLog,
    RawMetrics, RawService, RawSource, RawSync, bad,
};
use calsync_engine::{
    Budget, CalendarPick, CronSchedule, CronScheduleError, Edge, Members, Rebase, Source,
    SyncSettings, TupleConfig, WindowSpec,
};
use calsync_graph::CalendarRef;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

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
        let mut tuples = calendars(&self.calendars, anchor, !sources.is_empty())?;
        let discovery = discovery(&self.discovery)?;
        let (http_listen, drain_deadline, on_remove) = service(&self.http, &self.service)?;
        let admin_token = admin_token(&self.http)?;
        let metric_labels = metrics(&self.metrics)?;
        let ownership = ownership(&self.service)?;
        let push = super::push::push(&self.push, &sync, self.graph.allow_insecure_http)?;
        let changes = changes(&self.changes)?;
        let sinks = super::sinks::sinks(&self.sinks, self.graph.allow_insecure_http)?;
        let vault = super::accounts::accounts(
            &self.accounts,
            &auth,
            &self.calendars,
            &mut tuples,
            !sources.is_empty(),
            &ownership.deployment,
        )?;
        let mut sync = sync;
        sync.backstop = push.as_ref().map(|p| p.backstop_interval);
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
            warnings: super::credentials::secret_file_warnings(self),
            drain_deadline,
            on_remove,
            ownership,
            window_rebase,
            sources,
            discovery,
            tuples,
            anchor,
            digest: self.set_digest(),
            push,
            changes,
            sinks,
            vault,
        })
    }

    /// The digest of what decides the deployment's tracked set: the calendars, the sources and
    /// their cadence, the default interval, the re-base cadence and `service.on_remove`, as
    /// written (after environment overrides). Replicas compare it with the generation in the
    /// database to tell a config the deployment runs from a stale or a new one.
    pub fn set_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let v = serde_json::json!({
            "calendars": self.calendars,
            "sources": self.sources,
            "discovery": self.discovery,
            "interval": self.sync.interval,
            "window_rebase": self.sync.window_rebase,
            "window_rebase_at": self.sync.window_rebase_at,
            "on_remove": self.service.on_remove,
        });
        Sha256::digest(v.to_string().as_bytes())
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
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
        backstop: None,
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
/// `[changes]`: a retention of at least an hour (a follower must have time to read).
fn changes(c: &RawChanges) -> Result<ChangesConfig, ConfigError> {
    let retention = duration("changes.retention", &c.retention)?;
    if retention < Duration::from_secs(3600) {
        return Err(bad("changes.retention", "must be at least 1h"));
    }
    Ok(ChangesConfig {
        enabled: c.enabled,
        retention,
        payload: c.payload,
    })
}

fn discovery(d: &RawDiscovery) -> Result<DiscoverySettings, ConfigError> {
    let every = duration("discovery.every", &d.every)?;
    if every < Duration::from_secs(1) {
        return Err(bad("discovery.every", "must be at least 1s"));
    }
    if d.max_untrack_percent > 100 {
        return Err(bad(
            "discovery.max_untrack_percent",
            "must be a percentage, 0 to 100",
        ));
    }
    Ok(DiscoverySettings {
        every,
        refused_recheck: duration("discovery.refused_recheck", &d.refused_recheck)?,
        max_untrack_percent: d.max_untrack_percent,
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
            account: None,
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
pub(super) fn plain_name(key: &str, v: &str) -> Result<String, ConfigError> {
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
