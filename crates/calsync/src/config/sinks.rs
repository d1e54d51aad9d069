//! `[[sinks]]` validated: a unique name, an HTTPS URL (or `http://` to loopback), a secret
//! from a file, a sane batch and timeout; each error names its key (issue 25).

use super::values::{duration, http_url, read_secret_file, resolve_credential};
use super::{ConfigError, RawSink, bad};
use calsync_sinks::SinkConfig;
use secrecy::ExposeSecret;
use std::collections::HashSet;
use std::time::Duration;

/// Every `[[sinks]]` entry, checked.
pub(super) fn sinks(
    raw: &[RawSink],
    allow_insecure_http: bool,
) -> Result<Vec<SinkConfig>, ConfigError> {
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let k = |f: &str| format!("sinks[{i}].{f}");
        let name = super::validate::plain_name(&k("name"), &r.name)?;
        if !names.insert(name.clone()) {
            return Err(bad(k("name"), format!("'{name}' names two sinks")));
        }
        let url = http_url(&k("url"), &r.url)?;
        super::connect::refuse_clear_text(&k("url"), &url, allow_insecure_http)?;
        let Some(file) = &r.secret_file else {
            return Err(bad(
                k("secret_file"),
                "a sink needs the file of its signing secret (HMAC-SHA256 key, at least 16 characters)",
            ));
        };
        let secret = read_secret_file(&k("secret_file"), &resolve_credential(file))?;
        if secret.expose_secret().chars().count() < 16 {
            return Err(bad(
                k("secret_file"),
                "the secret must be at least 16 characters",
            ));
        }
        if r.batch == 0 || r.batch > 1000 {
            return Err(bad(k("batch"), format!("{} must be 1 to 1000", r.batch)));
        }
        let timeout = duration(&k("timeout"), &r.timeout)?;
        if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(300) {
            return Err(bad(
                k("timeout"),
                format!("'{}' must be 100ms to 5m", r.timeout),
            ));
        }
        let from_oldest = match r.start.trim() {
            "now" => false,
            "oldest" => true,
            other => {
                return Err(bad(
                    k("start"),
                    format!("'{other}' is neither \"now\" nor \"oldest\""),
                ));
            }
        };
        out.push(SinkConfig {
            name,
            url,
            secret,
            batch: r.batch,
            timeout,
            from_oldest,
        });
    }
    Ok(out)
}
