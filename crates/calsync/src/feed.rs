//! `calsync changes`: the change feed as lines for scripts, from a cursor or the oldest change
//! kept, once or following (woken by `NOTIFY calsync_changes`, polling each second as well).

use crate::config::RawConfig;
use anyhow::Context;
use calsync_store::changes::Change;
use std::io::Write;
use std::time::Duration;

/// How many changes one read asks for.
const PAGE: i32 = 500;

/// When following, how long to wait for a wake-up before reading anyway, unless told.
pub const POLL: Duration = Duration::from_secs(1);

/// After a wake-up that read nothing new, how soon to read again: a change becomes readable
/// only once every older transaction (anywhere on the server) ended, which no notification
/// announces, so a follower woken a little early keeps reading for one poll interval.
const SOON: Duration = Duration::from_millis(50);

/// `calsync changes`' arguments.
#[derive(Debug, Clone)]
pub struct ChangesArgs {
    /// Start after this cursor; from the oldest change kept without it.
    pub after: Option<String>,
    /// Keep following until stopped.
    pub follow: bool,
    /// NDJSON instead of tab-separated lines.
    pub json: bool,
    /// When following, read at least this often even without a wake-up.
    pub poll: Duration,
}

/// One change as a line: NDJSON (every field, `data` the row as the view shows it) or
/// `cursor  op  cause  calendar  event id  subject`, tab-separated.
pub fn line(c: &Change, json: bool) -> String {
    if json {
        return serde_json::to_string(c).unwrap_or_default();
    }
    let subject = c
        .data
        .as_ref()
        .and_then(|d| d.get("subject"))
        .and_then(|s| s.as_str())
        .unwrap_or("");
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        c.cursor, c.op, c.cause, c.tuple_key, c.event_id, subject
    )
}

/// Prints this deployment's changes after `args.after` until none is left (or, following,
/// until `stop` resolves). A closed stdout (`| head`) ends it quietly.
pub async fn changes(
    raw: &RawConfig,
    args: &ChangesArgs,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let db = raw.database_config()?;
    let deployment = raw.ownership()?.deployment;
    let store = crate::commands::connect_store(&db)
        .await?
        .for_deployment(&deployment);
    let mut listener = if args.follow {
        Some(
            store
                .listen_changes()
                .await
                .context("cannot listen for calsync_changes")?,
        )
    } else {
        None
    };
    let mut cursor = args.after.clone().filter(|c| !c.trim().is_empty());
    let mut out = std::io::stdout().lock();
    tokio::pin!(stop);
    // Until when a wake-up keeps the follower reading every `SOON`.
    let mut woken_until: Option<tokio::time::Instant> = None;
    loop {
        let page = store
            .changes_after(cursor.as_deref(), PAGE)
            .await
            .context("cannot read the change feed (has `calsync migrate` run?)")?;
        let full = page.len() == PAGE as usize;
        for c in &page {
            if c.deployment == deployment && writeln!(out, "{}", line(c, args.json)).is_err() {
                return Ok(());
            }
        }
        if let Some(last) = page.last() {
            cursor = Some(last.cursor.clone());
        }
        if out.flush().is_err() {
            return Ok(());
        }
        if full {
            continue;
        }
        let Some(l) = listener.as_mut() else {
            return Ok(());
        };
        if !page.is_empty() {
            woken_until = None;
        }
        if woken_until.is_some_and(|t| tokio::time::Instant::now() < t) {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(SOON) => continue,
            }
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            woken = tokio::time::timeout(args.poll, l.next()) => {
                if matches!(woken, Ok(Ok(()))) {
                    woken_until = Some(tokio::time::Instant::now() + args.poll);
                }
                if let Ok(Err(e)) = woken {
                    // The listening connection went away: wait a poll, then listen again.
                    tracing::warn!(error = %e, "calsync changes: lost the notification connection");
                    tokio::time::sleep(args.poll).await;
                    listener = Some(store.listen_changes().await.context("cannot listen for calsync_changes")?);
                } else {
                    l.drain().await;
                }
            }
        }
    }
}
