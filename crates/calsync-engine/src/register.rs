//! Registration: the configured tuples recorded in the store with their ids, each keyed by its
//! mailbox (the object id when the config names mailboxes both ways, resolved once and
//! remembered), untracking the rest or leaving it alone.

use crate::{Engine, Tuple, TupleConfig};
use calsync_graph::CalendarRef;
use calsync_store::{SetWrite, StoreError, TrackedSet, TupleSpec};

/// Whether a configured mailbox is a directory object id (a GUID) rather than a UPN.
fn is_object_id(user: &str) -> bool {
    let b = user.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Engine {
    /// Records the configured tuples in the store (new ones added, dropped ones untracked)
    /// and returns them with their ids.
    pub async fn register(&self, configs: &[TupleConfig]) -> Result<Vec<Tuple>, StoreError> {
        Ok(self
            .register_set(configs, true, &SetWrite::default())
            .await?
            .0)
    }

    /// Records these tuples and leaves every other one as it is (a one-off command's view of
    /// the database it shares with a daemon), returning them with their ids.
    pub async fn register_only(&self, configs: &[TupleConfig]) -> Result<Vec<Tuple>, StoreError> {
        Ok(self
            .register_set(configs, false, &SetWrite::default())
            .await?
            .0)
    }

    /// Registers `configs` as a generation of the deployment's tracked set (`reconcile`: the
    /// whole set, other tuples untracked; else these beside the rest), returning them with
    /// their ids and the deployment's generation after the write.
    pub async fn register_set(
        &self,
        configs: &[TupleConfig],
        reconcile: bool,
        write: &SetWrite,
    ) -> Result<(Vec<Tuple>, i64), StoreError> {
        // Mailboxes first: each tuple is stored with its lease key (the object id when known).
        let mailboxes = self.resolve_mailboxes(configs).await;
        let mailbox_of = |c: &TupleConfig| {
            mailboxes
                .get(&c.user)
                .cloned()
                .unwrap_or_else(|| c.user.to_ascii_lowercase())
        };
        // A cron schedule's cadence is computed once per schedule (sources share theirs).
        // Keyed by the schedule's address: a held `Arc` keeps it unique while this runs.
        let mut cadences: std::collections::HashMap<usize, std::time::Duration> =
            Default::default();
        let specs: Vec<TupleSpec> = configs
            .iter()
            .map(|c| {
                let interval = c.interval.unwrap_or(self.inner.settings.interval);
                let cadence = match &c.schedule {
                    Some(s) => *cadences
                        .entry(std::sync::Arc::as_ptr(s) as usize)
                        .or_insert_with(|| crate::tuple::settings::cadence(interval, Some(s))),
                    // A pushed calendar may poll only at the backstop: overdue past that.
                    None => interval.max(self.inner.settings.backstop.unwrap_or_default()),
                };
                (c, interval, cadence)
            })
            .map(|(c, interval, cadence)| TupleSpec {
                key: c.key.clone(),
                user_id: c.user.clone(),
                mailbox: mailbox_of(c),
                calendar_id: match &c.calendar {
                    CalendarRef::Default => "default".into(),
                    CalendarRef::Id(id) => id.clone(),
                },
                window_start: c.window.start,
                window_end: c.window.end,
                settings: Some(crate::tuple::settings::encode(interval, c, cadence)),
            })
            .collect();
        let registered = self
            .inner
            .store
            .register_set(&specs, reconcile, write)
            .await?;
        let ids = registered.ids;
        let tuples = configs
            .iter()
            .zip(specs)
            .filter_map(|(c, spec)| {
                let id = *ids.get(c.key.as_str())?;
                Some(Tuple {
                    id,
                    key: c.key.clone(),
                    user: c.user.clone(),
                    account: c.account.clone(),
                    calendar: c.calendar.clone(),
                    window: c.window,
                    rolling: c.rolling,
                    interval: c.interval.unwrap_or(self.inner.settings.interval),
                    schedule: c.schedule.clone(),
                    mailbox: spec.mailbox,
                })
            })
            .collect();
        Ok((tuples, registered.generation))
    }

    /// The deployment's tracked set as stored: what changed after generation `after` (every
    /// tracked tuple for a negative `after`), each tuple by its key with `None` for one no
    /// longer tracked, the generation this brings the reader to and how many tuples are
    /// tracked in all.
    pub async fn tracked_since(
        &self,
        after: i64,
    ) -> Result<(TrackedSet, Vec<(String, Option<Tuple>)>, usize), StoreError> {
        let changes = self.inner.store.tracked_since(after).await?;
        let tracked = usize::try_from(changes.tracked).unwrap_or(0);
        let default = self.inner.settings.interval;
        let tuples = changes
            .tuples
            .into_iter()
            .map(|t| {
                if !t.tracked {
                    return (t.tuple_key, None);
                }
                let (interval, schedule, rolling, problem) =
                    crate::tuple::settings::decode(t.settings.as_deref(), default);
                if let Some(p) = problem {
                    tracing::warn!(tuple = %t.tuple_key, problem = %p, "a stored tuple's settings are unreadable; defaults used");
                }
                let calendar = match t.calendar_id.as_str() {
                    "default" => CalendarRef::Default,
                    id => CalendarRef::Id(id.to_owned()),
                };
                let tuple = Tuple {
                    id: t.id,
                    key: t.tuple_key.clone(),
                    user: t.user_id,
                    account: crate::tuple::settings::account_of(t.settings.as_deref()),
                    calendar,
                    window: calsync_graph::ViewWindow {
                        start: t.window_start,
                        end: t.window_end,
                    },
                    rolling,
                    interval,
                    schedule,
                    mailbox: t.mailbox,
                };
                (t.tuple_key, Some(tuple))
            })
            .collect();
        Ok((changes.set, tuples, tracked))
    }

    /// The directory object id of configured mailbox names, where two names might be one
    /// mailbox: only a config that names mailboxes both ways (object ids *and* UPNs) needs it,
    /// since a UPN is unique per user (compared case-insensitively) and so is an id. Then each
    /// UPN is resolved from the store when already known, else asked of Graph once (through the
    /// request gate, a few at a time) and remembered. A name that cannot be resolved now keeps
    /// its configured spelling as its key; the next registration tries again. A config of one
    /// kind costs no request, so a start with 100,000 calendars is not held up by Graph.
    async fn resolve_mailboxes(
        &self,
        configs: &[TupleConfig],
    ) -> std::collections::HashMap<String, String> {
        use futures_util::StreamExt;
        let mut users: Vec<String> = configs.iter().map(|c| c.user.clone()).collect();
        users.sort();
        users.dedup();
        let (ids, upns): (Vec<String>, Vec<String>) =
            users.into_iter().partition(|u| is_object_id(u));
        if ids.is_empty() || upns.is_empty() {
            return Default::default();
        }
        let mut known = match self.inner.store.mailbox_ids(&upns).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read resolved mailbox ids");
                Default::default()
            }
        };
        let missing: Vec<String> = upns
            .into_iter()
            .filter(|u| !known.contains_key(u))
            .collect();
        // An account's mailbox is asked of `/me` with the account's tokens: the app may have
        // none (a public client) or no right to the directory.
        let accounts: std::collections::HashMap<&str, &str> = configs
            .iter()
            .filter_map(|c| Some((c.user.as_str(), c.account.as_deref()?)))
            .collect();
        let accounts = &accounts;
        let resolved: Vec<(String, Option<String>)> = futures_util::stream::iter(missing)
            .map(|user| async move {
                let permit = self.inner.gate.acquire(&user).await;
                let graph = match accounts.get(user.as_str()) {
                    Some(name) => self.account_client(name, &user),
                    None => self.inner.graph.clone(),
                };
                let got = graph
                    .resolve_user(&user, calsync_graph::Connection::Reuse)
                    .await;
                if let Err(e) = &got {
                    if let Some(wait) = e.retry_after() {
                        self.inner.gate.defer(&user, wait);
                    }
                }
                drop(permit);
                let id = match got {
                    Ok(Some(id)) => {
                        if let Err(e) = self.inner.store.save_mailbox_id(&user, &id).await {
                            tracing::warn!(user = %user, error = %e, "cannot save a mailbox id");
                        }
                        Some(id)
                    }
                    Ok(None) => {
                        tracing::debug!(user = %user, "no such mailbox; its rounds will say so");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(user = %user, error = %e, "cannot resolve a mailbox to its id now; keyed by its name until the next registration");
                        None
                    }
                };
                (user, id)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (user, id) in resolved {
            if let Some(id) = id {
                known.insert(user, id);
            }
        }
        known
            .into_iter()
            .map(|(u, id)| (u, id.to_ascii_lowercase()))
            .collect()
    }
}
