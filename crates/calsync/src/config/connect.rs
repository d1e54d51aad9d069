//! The sections that say where calsync connects and with what: `[database]`, `[graph]`,
//! `[auth]` (and the national clouds that tie the token endpoint to a Graph host), `[tls]`.
//! `[auth]`'s credential kinds are in `credentials.rs`.

use super::values::{duration, http_url, read_secret_file, resolve_credential};
use super::{ConfigError, DatabaseConfig, RawDatabase, RawGraph, RawTls, bad};
use calsync_graph::GraphConfig;
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;
use url::Url;

/// `[database]`: the URL (inline, from a file, or `DATABASE_URL`) and the pool.
pub(super) fn database(d: &RawDatabase) -> Result<DatabaseConfig, ConfigError> {
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
pub(super) fn graph(g: &RawGraph, page_size: u32) -> Result<GraphConfig, ConfigError> {
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

/// A token endpoint and Graph of different clouds (a token the Graph will not accept).
pub(super) fn check_clouds(token_url: &Url, graph_base: &Url) -> Result<(), ConfigError> {
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
    Ok(())
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
pub(super) fn default_scope(graph_base: &Url) -> String {
    match graph_base.host_str() {
        Some(h) if cloud_of_graph_host(h).is_some() => format!("https://{h}/.default"),
        _ => "https://graph.microsoft.com/.default".to_owned(),
    }
}

/// `http://` sends the client secret or bearer tokens in clear: refused unless the host is a
/// loopback address or `graph.allow_insecure_http` says so.
pub(super) fn refuse_clear_text(key: &str, u: &Url, allowed: bool) -> Result<(), ConfigError> {
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

/// `[tls]`: the extra roots' PEM, read and checked now so a bad file is named at start.
pub(super) fn tls(t: &RawTls) -> Result<Option<Vec<u8>>, ConfigError> {
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
