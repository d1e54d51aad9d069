//! The schedule worker: the one owner of this replica's [`Scheduler`] and of the set of
//! calendars it was built from. Everything that changes the set reaches it as a message
//! ([`ToSchedule`]: a reload, a discovery pass's result, a re-base) or a watch (the mailboxes
//! the lease keeper holds), and is applied in order, one at a time. It runs as a supervised
//! worker, so a slow reload (a discovery pass over 10,000 users) never holds up the main loop,
//! `/healthz` or the watchdog.

use crate::commands;
use crate::config::{Config, OnRemove, RawConfig};
use crate::discovery::Plan;
use crate::notify::Note;
use crate::shared::{Shared, ToSchedule};
use crate::worker::WorkerCtx;
use calsync_engine::{Engine, LeaseKeeper, ScheduleChange, Scheduler, Tuple};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The schedule worker's state.
pub struct ScheduleWorker {
    /// The engine its tasks run rounds on.
    pub engine: Engine,
    /// The lease keeper (new mailboxes are taken at once when the set grows).
    pub keeper: Arc<LeaseKeeper>,
    /// The scheduler; its tasks stop when the service's stop token fires.
    pub scheduler: Scheduler,
    /// Every calendar of the deployment's set, one copy each, shared with its task.
    pub all: Vec<Arc<Tuple>>,
    /// The config in force.
    pub current: Config,
    /// Where a reload reads the config from.
    pub config_path: Option<PathBuf>,
    /// The rolling windows' anchor the set was registered at.
    pub anchor: chrono::DateTime<chrono::Utc>,
    /// What it shares with the HTTP handlers and the main loop.
    pub shared: Arc<Shared>,
    /// Notes to systemd (RELOADING, READY).
    pub notes: std::sync::mpsc::Sender<Note>,
    /// What the discovery and re-base workers follow.
    pub plan: watch::Sender<Plan>,
    /// Bumped by the lease keeper when the mailboxes held here change.
    pub owned: watch::Receiver<u64>,
    /// Its messages.
    pub inbox: mpsc::UnboundedReceiver<ToSchedule>,
    /// The generation of the deployment's tracked set `all` is at.
    pub generation: i64,
    /// How long a coordinator role (discovery, re-base) is held without renewal.
    pub role_ttl: std::time::Duration,
    /// Sources whose last pass was held (it would untrack too many), with its answer.
    pub held: std::collections::HashMap<String, u64>,
    /// What the replica's row says about its file, as last written (`None`: not written, or
    /// the write failed or found no row: written again at the next follow).
    pub noted: Option<bool>,
    /// The service's stop.
    pub stop: CancellationToken,
    /// While the file is stale: the deployment's digest and the file's stamp it was last
    /// compared at, so the file is read again only when one of them changes.
    pub compared: Option<(String, FileStamp)>,
    /// The (mailbox, calendar) pairs whose subscription is healthy: they poll at the
    /// backstop interval (issue 24).
    pub pushed: std::collections::HashSet<(String, String)>,
}

/// What tells a config file changed without reading it: its modification time and length.
pub type FileStamp = Option<(std::time::SystemTime, u64)>;

fn file_stamp(path: Option<&std::path::Path>) -> FileStamp {
    let meta = std::fs::metadata(path?).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl std::fmt::Debug for ScheduleWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScheduleWorker")
            .field("tuples", &self.all.len())
            .finish_non_exhaustive()
    }
}

impl ScheduleWorker {
    /// Applies the changes it is told of until the service stops, then waits for the tuple
    /// tasks to end (bounded by the caller's drain deadline). A tuple task that died (a panic
    /// outside a round) ends it with an error: its policy is fatal.
    pub async fn run(mut self, ctx: WorkerCtx) -> anyhow::Result<()> {
        self.owned.borrow_and_update();
        self.scheduler.apply(self.owned_tuples());
        self.counted();
        loop {
            ctx.idle();
            tokio::select! {
                _ = self.stop.cancelled() => break,
                Ok(()) = self.owned.changed() => {
                    ctx.busy();
                    self.owned.borrow_and_update();
                    let change = self.scheduler.apply(self.owned_tuples());
                    info!(mailboxes = self.engine.leases().map_or(0, |l| l.len()), tuples = self.scheduler.len(),
                          started = change.added.len(), stopped = change.removed.len(),
                          "the calendars this replica syncs changed");
                }
                died = self.scheduler.task_died() => {
                    return Err(anyhow::anyhow!("a tuple task ended unexpectedly: {died}"));
                }
                Some(message) = self.inbox.recv() => {
                    ctx.busy();
                    let stop = self.stop.clone();
                    tokio::select! {
                        () = self.handle(message) => {}
                        // A reload or a pass waiting on Graph (a discovery over 10,000 users)
                        // must not hold the drain: it is dropped at shutdown. Registration is
                        // one transaction, so the set is either registered or not; a purge
                        // left undone is done by the next reload or discovery pass.
                        () = stop.cancelled() => break,
                    }
                }
            }
            self.counted();
        }
        self.scheduler.wait().await;
        Ok(())
    }

    /// The tuples whose mailbox this replica holds, each at the interval it polls at now
    /// (a pushed calendar at the backstop: `push::at_backstop`).
    fn owned_tuples(&self) -> Vec<Arc<Tuple>> {
        let owned = owned_tuples(&self.engine, &self.all);
        match self.current.push.as_ref() {
            Some(p) => crate::push::at_backstop(owned, &self.pushed, p.backstop_interval),
            None => owned,
        }
    }

    fn counted(&self) {
        self.shared.set_counts(self.all.len(), self.scheduler.len());
    }

    async fn handle(&mut self, message: ToSchedule) {
        match message {
            ToSchedule::Reload(reply) => {
                if reply.is_none() {
                    self.shared.reload_begins();
                    info!("SIGHUP: reloading the config");
                }
                let _ = self.notes.send(Note::Reloading);
                let r = self.reload().await;
                match &r {
                    Ok(a) => info!(
                        added = ?a.added, removed = ?a.removed, retimed = ?a.retimed, restarted = ?a.restarted,
                        "config reloaded"
                    ),
                    Err(e) => error!(error = %e, "config reload refused; the running config stays"),
                }
                self.counted();
                let _ = self.notes.send(Note::Ready(self.shared.status_line()));
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            ToSchedule::Discovered(found, based_on, reply) => {
                let _ = reply.send(self.apply_discovered(found, based_on).await);
            }
            ToSchedule::Wake(asked) => {
                for (id, key) in asked {
                    if !self.scheduler.wake(&key, id) {
                        // Its mailbox is held here but its task is not (yet) running: say so
                        // rather than leave the asker waiting.
                        let _ = self
                            .engine
                            .store()
                            .finish_round_request(
                                id,
                                "not-scheduled",
                                Some("the replica holding its mailbox does not schedule it"),
                            )
                            .await;
                    }
                }
            }
            ToSchedule::Pushed(pushed) => {
                self.pushed = pushed;
                self.scheduler.apply(self.owned_tuples());
            }
            ToSchedule::Follow => {
                self.shared.follow_begins();
                if let Err(e) = self.follow().await {
                    warn!(error = %e, "cannot read the deployment's tracked set; trying again");
                }
            }
            ToSchedule::Rebase(anchor, reply) => {
                // Not moved if the database refuses: asked again at the next tick.
                let moved = match self.rebase_windows(anchor).await {
                    Ok(done) => done,
                    Err(e) => {
                        warn!(error = %e, "cannot re-base the rolling windows; trying again");
                        false
                    }
                };
                let _ = reply.send(moved);
            }
        }
    }

    /// Re-reads the config file and registers its calendars as the deployment's new
    /// generation (an operator's reload is intent: it is written even over a newer set); every
    /// replica, this one included, then follows it: new calendars start on the replica that
    /// holds their mailbox, removed ones stop after any round in flight (rows kept or purged
    /// per `service.on_remove`), changed intervals apply. A config that does not validate is
    /// refused whole.
    async fn reload(&mut self) -> Result<ScheduleChange, String> {
        let raw = RawConfig::load(self.config_path.as_deref()).map_err(|e| e.to_string())?;
        let new = raw.validate().map_err(|e| e.to_string())?;
        let restart_needed = self.current.needs_restart_for(&new);
        if !restart_needed.is_empty() {
            warn!(
                sections = ?restart_needed,
                "these settings changed and take effect after a restart; calendars and intervals apply now"
            );
        }
        let mut configs: Vec<calsync_engine::TupleConfig> =
            new.tuples.iter().map(|t| with_interval(t, &new)).collect();
        if !new.sources.is_empty() {
            // A reload with sources resolves them now: a set without them would untrack them.
            let found = self
                .engine
                .discover(&new.sources, new.anchor, new.discovery.refused_recheck)
                .await
                .map_err(|e| format!("cannot resolve [[sources]]: {e}"))?;
            commands::log_discovered(&found);
            let found: Vec<_> = found
                .tuples
                .iter()
                .map(|t| with_interval(t, &new))
                .collect();
            configs = commands::merge_discovered(&configs, found);
        }
        let write = calsync_store::SetWrite {
            cause: "reload",
            digest: Some(new.digest.clone()),
            based_on: None,
            anchor: Some(new.anchor),
        };
        let applied = self.register_and_apply(&configs, &write).await?;
        if new.on_remove == OnRemove::Purge {
            purge(&self.engine).await;
        }
        self.adopt(new);
        // The reload resolved the sources: the next pass is `every` from now, and a pass of
        // the old sources under way is dropped.
        self.plan.send_replace(Plan::of(&self.current, true));
        self.publish(false);
        Ok(applied)
    }

    /// Takes the parts of `new` that decide the set as the config in force (the rest needs a
    /// restart, and was warned about).
    fn adopt(&mut self, new: Config) {
        let current = &mut self.current;
        current.on_remove = new.on_remove;
        current.window_rebase = new.window_rebase;
        current.discovery = new.discovery;
        current.sync.interval = new.sync.interval;
        current.digest = new.digest.clone();
        current.anchor = new.anchor;
        current.tuples = if new.sources.is_empty() {
            Vec::new()
        } else {
            new.tuples.iter().map(|t| with_interval(t, &new)).collect()
        };
        current.sources = new.sources;
    }

    /// Registers what a discovery pass computed from generation `based_on` found beside the
    /// configured calendars; `false` if the database refused or the set moved on meanwhile
    /// (the pass is tried again soon).
    async fn apply_discovered(&mut self, found: calsync_engine::Discovered, based_on: i64) -> bool {
        commands::log_discovered(&found);
        let (found, doubts) = crate::discovery::doubt(
            &self.all,
            found,
            &self.current.sources,
            self.current.discovery.refused_recheck,
            self.current.discovery.max_untrack_percent,
            &mut self.held,
        );
        crate::discovery::report(&doubts);
        let current = &self.current;
        let found = found
            .into_iter()
            .map(|t| with_interval(&t, current))
            .collect();
        let mut configs = commands::merge_discovered(&self.current.tuples, found);
        // The pass (and the config) may predate the last re-base.
        calsync_engine::at_anchor(&mut configs, self.anchor);
        let write = calsync_store::SetWrite {
            cause: "discovery",
            digest: None,
            based_on: Some(based_on),
            anchor: None,
        };
        match self.register_and_apply(&configs, &write).await {
            Ok(change) => {
                if !(change.added.is_empty()
                    && change.removed.is_empty()
                    && change.restarted.is_empty())
                {
                    info!(added = ?change.added, removed = ?change.removed, restarted = ?change.restarted,
                          "discovered calendars applied");
                }
                if self.current.on_remove == OnRemove::Purge {
                    purge(&self.engine).await;
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot register the discovered calendars; trying again");
                false
            }
        }
    }

    /// Registers `configs` (the whole set) as a generation, takes new mailboxes' leases (up
    /// to this replica's share) and applies the new generation to this replica's schedule.
    async fn register_and_apply(
        &mut self,
        configs: &[calsync_engine::TupleConfig],
        write: &calsync_store::SetWrite,
    ) -> Result<ScheduleChange, String> {
        let registered = self.engine.register_set(configs, true, write).await;
        if let Err(calsync_store::StoreError::Superseded { .. }) = &registered {
            // Another replica wrote a newer set meanwhile: serve that one.
            let _ = self.follow().await;
        }
        registered.map_err(|e| format!("cannot register the calendars: {e}"))?;
        // New mailboxes are taken now (up to this replica's share), not at the next heartbeat.
        if let Err(e) = self.keeper.cycle().await {
            warn!(error = %e, "cannot take the new calendars' mailbox leases now; the next heartbeat does");
        }
        self.follow().await
    }

    /// Catches up with the deployment's tracked set: applies what changed since the
    /// generation served here (a task whose tuple changed in any field that matters, its
    /// mailbox key included, restarts with the new tuple), and compares the generation's
    /// config with this replica's, re-reading the file when they differ: a file that now
    /// agrees is adopted quietly, one that does not is reported stale (log, `/readyz`,
    /// `calsync_config_stale`) and never registered.
    async fn follow(&mut self) -> Result<ScheduleChange, String> {
        let store = self.engine.store();
        let head = store.tracked_set().await.map_err(|e| e.to_string())?;
        let mut change = ScheduleChange::default();
        if head.generation != self.generation {
            let (set, tuples, tracked) = self
                .engine
                .tracked_since(self.generation)
                .await
                .map_err(|e| e.to_string())?;
            let mut changed: std::collections::HashMap<String, Option<Arc<Tuple>>> = tuples
                .into_iter()
                .map(|(k, t)| (k, t.map(Arc::new)))
                .collect();
            self.all.retain_mut(|t| match changed.remove(&t.key) {
                None => true,
                Some(None) => false,
                Some(Some(n)) => {
                    *t = n;
                    true
                }
            });
            self.all.extend(changed.into_values().flatten());
            if self.all.len() != tracked {
                // A change was missed (tuples purged before this replica saw them untracked):
                // the whole set is read again.
                let (_, whole, _) = self
                    .engine
                    .tracked_since(-1)
                    .await
                    .map_err(|e| e.to_string())?;
                self.all = whole
                    .into_iter()
                    .filter_map(|(_, t)| t.map(Arc::new))
                    .collect();
            }
            self.all.shrink_to_fit();
            if let Some(anchor) = set.anchor {
                self.anchor = anchor;
            }
            info!(
                generation = set.generation,
                from = self.generation,
                cause = %set.cause,
                by = %set.written_by,
                tuples = self.all.len(),
                "following the deployment's tracked set"
            );
            self.generation = set.generation;
            change = self.scheduler.apply(self.owned_tuples());
        }
        // A re-base that moved no window writes no generation, only its anchor.
        if let Some(anchor) = head.anchor {
            self.anchor = anchor;
        }
        let was_stale = self.shared.followed().stale;
        let mut stale = head.generation > 0 && head.config_digest != self.current.digest;
        let stamp = file_stamp(self.config_path.as_deref());
        let unchanged = self
            .compared
            .as_ref()
            .is_some_and(|(digest, at)| *digest == head.config_digest && *at == stamp);
        if stale && !unchanged {
            // Another replica's reload (or this file's edit): the file may agree by now.
            self.compared = Some((head.config_digest.clone(), stamp));
            if let Ok(new) = RawConfig::load(self.config_path.as_deref())
                .map_err(|e| e.to_string())
                .and_then(|raw| raw.validate().map_err(|e| e.to_string()))
            {
                if new.digest == head.config_digest {
                    info!(
                        generation = head.generation,
                        "this replica's config file agrees with the deployment's new set; adopted"
                    );
                    self.adopt(new);
                    self.plan.send_replace(Plan::of(&self.current, true));
                    stale = false;
                }
            }
        }
        if stale && !was_stale {
            warn!(
                generation = head.generation,
                deployment_digest = %head.config_digest,
                file_digest = %self.current.digest,
                "this replica's config file is not the deployment's: it serves the deployment's set and registers nothing of its own; fix the file or reload a replica with the current one"
            );
        }
        if self.noted != Some(stale) {
            // For `status`, which names the replicas whose file is stale.
            self.noted = match self.engine.store().note_config_stale(stale).await {
                Ok(true) => Some(stale),
                Ok(false) | Err(_) => None,
            };
        }
        self.shared.set_followed(commands::FollowedSet {
            generation: self.generation.max(head.generation),
            digest: head.config_digest,
            stale,
        });
        Ok(change)
    }

    /// Publishes where this replica stands after it wrote the set itself.
    fn publish(&self, stale: bool) {
        self.shared.set_followed(commands::FollowedSet {
            generation: self.generation,
            digest: self.current.digest.clone(),
            stale,
        });
    }

    /// Moves every rolling window to `anchor`, if this replica coordinates re-bases (one at a
    /// time per deployment, by a role in PostgreSQL; the others follow the generation it
    /// writes). The calendars whose window changed are registered with it and restarted: the
    /// next round of each is the full round of its new window, and the read model serves the
    /// old window whole until that round's last page switches it. `Ok(false)`: another replica
    /// coordinates (asked again later).
    async fn rebase_windows(
        &mut self,
        anchor: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, String> {
        if self.anchor == anchor {
            return Ok(true);
        }
        if self.shared.followed().stale {
            // Its cadence is its stale file's: the windows are moved by a replica whose
            // config is the deployment's, and this one follows them.
            return Ok(true);
        }
        let store = self.engine.store();
        if !store
            .hold_role(crate::shared::ROLE_REBASE, self.role_ttl)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(false);
        }
        // The windows are computed from the set as stored, whatever this replica's file says.
        self.follow().await?;
        if self.anchor == anchor {
            return Ok(true);
        }
        let window_at = |t: &Tuple| t.rolling.map(|spec| spec.at(anchor));
        let moved = self
            .all
            .iter()
            .filter(|t| matches!(window_at(t), Some(Some(w)) if w != t.window))
            .count();
        for t in self
            .all
            .iter()
            .filter(|t| matches!(window_at(t), Some(None)))
        {
            // A fixed end the rolling start has passed: the last window stays.
            warn!(tuple = %t.key, %anchor, "the rolling window is empty at this anchor; keeping the last one");
        }
        let configs: Vec<calsync_engine::TupleConfig> = self
            .all
            .iter()
            .filter(|t| matches!(window_at(t), Some(Some(w)) if w != t.window))
            .map(|t| {
                let mut c = t.config();
                if let Some(Some(w)) = window_at(t) {
                    c.window = w;
                }
                c
            })
            .collect();
        // Only the moved windows are written, on the generation they were computed from.
        let write = calsync_store::SetWrite {
            cause: "rebase",
            digest: None,
            based_on: Some(self.generation),
            anchor: Some(anchor),
        };
        let registered = self.engine.register_set(&configs, false, &write).await;
        if let Err(calsync_store::StoreError::Superseded { .. }) = &registered {
            let _ = self.follow().await;
            return Ok(false);
        }
        registered.map_err(|e| format!("cannot register the moved windows: {e}"))?;
        let change = self.follow().await?;
        self.anchor = anchor;
        info!(
            moved,
            restarted = change.restarted.len(),
            %anchor,
            "rolling windows re-based"
        );
        Ok(true)
    }
}

/// `t` with its interval explicit (the engine's default is fixed at start; a reloaded
/// `sync.interval` applies through this).
fn with_interval(t: &calsync_engine::TupleConfig, cfg: &Config) -> calsync_engine::TupleConfig {
    calsync_engine::TupleConfig {
        interval: Some(t.interval.unwrap_or(cfg.sync.interval)),
        ..t.clone()
    }
}

/// Deletes this deployment's untracked tuples and their rows (`service.on_remove = "purge"`).
async fn purge(engine: &Engine) {
    // Only this deployment's untracked tuples: other deployments' rows are theirs.
    match engine.store().purge_untracked().await {
        Ok((0, _)) => {}
        Ok((t, e)) => info!(tuples = t, events = e, "purged removed calendars"),
        Err(e) => {
            warn!(error = %e, "cannot purge removed calendars; their rows stay untracked")
        }
    }
}

/// Each calendar once, shared by the configured list and its task. (Collected in place, the
/// list would keep the buffer of the `Tuple`s, twenty times its size: 16 MB at 100,000.)
pub fn shared_tuples(tuples: Vec<Tuple>) -> Vec<Arc<Tuple>> {
    let mut shared: Vec<Arc<Tuple>> = tuples.into_iter().map(Arc::new).collect();
    shared.shrink_to_fit();
    shared
}

/// The configured tuples whose mailbox this replica holds.
pub fn owned_tuples(engine: &Engine, all: &[Arc<Tuple>]) -> Vec<Arc<Tuple>> {
    let Some(leases) = engine.leases() else {
        return Vec::new();
    };
    leases.syncing(|syncs| {
        all.iter()
            .filter(|t| syncs(&t.mailbox))
            .map(Arc::clone)
            .collect()
    })
}
