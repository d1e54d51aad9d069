//! Values that several sections share: durations, instants, URLs, and files of secrets
//! (looked up in `$CREDENTIALS_DIRECTORY` under systemd).

use super::{ConfigError, bad};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

pub(super) fn duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim()).map_err(|e| {
        bad(
            key,
            format!("'{v}' is not a duration ({e}); use e.g. \"30s\", \"5m\", \"7d\""),
        )
    })
}

pub(super) fn instant(key: &str, v: &str) -> Result<DateTime<Utc>, ConfigError> {
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

pub(super) fn read_secret_file(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))?;
    let trimmed = text.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(bad(key, format!("{} is empty", path.display())));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

pub(super) fn http_url(key: &str, v: &str) -> Result<Url, ConfigError> {
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
pub(super) fn resolve_credential(p: &Path) -> PathBuf {
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
