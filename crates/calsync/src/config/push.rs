//! `[push]` validated: off without a notification URL; with one, every key it needs, each
//! error naming its key (issue 24).

use super::values::{duration, http_url};
use super::{ConfigError, PushConfig, RawPush, bad};
use calsync_engine::SyncSettings;
use std::time::Duration;

/// `[push]`: off without a notification URL; with one, everything it needs, checked.
pub(super) fn push(
    p: &RawPush,
    sync: &SyncSettings,
    allow_insecure_http: bool,
) -> Result<Option<PushConfig>, ConfigError> {
    let url = p.notification_url.trim();
    if url.is_empty() {
        if !p.listen.trim().is_empty() {
            return Err(bad(
                "push.notification_url",
                "push.listen is set but push.notification_url is empty: set the public HTTPS URL Graph posts to (push stays off without it)",
            ));
        }
        return Ok(None);
    }
    let base = http_url("push.notification_url", url)?;
    super::connect::refuse_clear_text("push.notification_url", &base, allow_insecure_http)?;
    if base.query().is_some() || base.fragment().is_some() {
        return Err(bad(
            "push.notification_url",
            format!(
                "'{url}' must be a base URL without query or fragment: calsync appends /notifications and /lifecycle"
            ),
        ));
    }
    let route = |name: &str| {
        let mut u = base.clone();
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.pop_if_empty().push(name);
        }
        u
    };
    let listen = match p.listen.trim() {
        "" => {
            return Err(bad(
                "push.listen",
                "push is on (push.notification_url is set) but push.listen is empty: set the receiver's host:port (e.g. 0.0.0.0:9188)",
            ));
        }
        v => v.parse::<std::net::SocketAddr>().map_err(|_| {
            bad(
                "push.listen",
                format!("'{v}' is not host:port with an IP address (e.g. 0.0.0.0:9188)"),
            )
        })?,
    };
    let lifetime = duration("push.lifetime", &p.lifetime)?;
    // Outlook events without resource data: 45 minutes to 10,080 (notes §5).
    if lifetime < Duration::from_secs(45 * 60) || lifetime > Duration::from_secs(10_080 * 60) {
        return Err(bad(
            "push.lifetime",
            format!(
                "'{}' is outside Graph's limits for events: 45m to 7d (10,080 minutes)",
                p.lifetime
            ),
        ));
    }
    let renew_before = duration("push.renew_before", &p.renew_before)?;
    if renew_before.is_zero() || renew_before >= lifetime {
        return Err(bad(
            "push.renew_before",
            format!(
                "'{}' must be shorter than push.lifetime ('{}') and not zero",
                p.renew_before, p.lifetime
            ),
        ));
    }
    let backstop_interval = duration("push.backstop_interval", &p.backstop_interval)?;
    if backstop_interval < sync.interval {
        return Err(bad(
            "push.backstop_interval",
            format!(
                "'{}' is shorter than sync.interval: the backstop polls less often than the interval, never more",
                p.backstop_interval
            ),
        ));
    }
    Ok(Some(PushConfig {
        notification_url: route("notifications"),
        lifecycle_url: route("lifecycle"),
        listen,
        lifetime,
        renew_before,
        backstop_interval,
    }))
}
