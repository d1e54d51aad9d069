//! Background workers of `calsync run`, supervised in one place (after garage's
//! `background/worker.rs`): each job is a named worker with a state (`starting`, `idle`, `busy`,
//! `restarting`, `stopped`) that `/readyz` and `/metrics` read, and ONE policy decides what its end
//! means: a `Fatal` worker that ends stops the process (its supervisor restarts it), a `Restart`
//! worker is started again after a capped, doubling pause. A panic is reported by the worker's
//! name, never swallowed. The main loop only waits for [`Supervisor::next_exit`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::{error, warn};

/// What a worker is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorkerState {
    /// Spawned, not yet reporting.
    Starting,
    /// Waiting for its next piece of work.
    Idle,
    /// Doing a piece of work (a discovery pass, a reload, a re-base).
    Busy,
    /// Ended with an error or a panic; started again after a pause.
    Restarting,
    /// Ended (shutdown, or a fatal end the process stops for).
    Stopped,
}

impl WorkerState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [WorkerState; 5] = [
        WorkerState::Starting,
        WorkerState::Idle,
        WorkerState::Busy,
        WorkerState::Restarting,
        WorkerState::Stopped,
    ];

    /// The spelling in `/readyz` and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Restarting => "restarting",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// What a worker's end means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The process cannot go on without it: its end stops the process, non-zero.
    Fatal,
    /// Started again after a pause (1 s, doubling to 60 s; reset after a minute of running).
    Restart,
}

/// One worker as `/readyz` and `/metrics` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its state.
    pub state: WorkerState,
    /// How its last run ended, if it ended badly.
    pub last_error: Option<String>,
    /// How many times it was started again.
    pub restarts: u64,
}

/// The states of every worker, shared with the HTTP handlers.
#[derive(Debug, Default)]
pub struct Workers {
    states: Mutex<BTreeMap<&'static str, WorkerStatus>>,
}

impl Workers {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<&'static str, WorkerStatus>) -> R) -> R {
        f(&mut self.states.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn set(&self, name: &'static str, state: WorkerState) {
        self.with(|m| {
            if let Some(s) = m.get_mut(name) {
                s.state = state;
            }
        });
    }

    /// Every worker's status, by name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, WorkerStatus> {
        self.with(|m| m.clone())
    }
}

/// What a worker gets: where it reports its state.
#[derive(Debug, Clone)]
pub struct WorkerCtx {
    name: &'static str,
    workers: Arc<Workers>,
}

impl WorkerCtx {
    /// The worker is waiting for work.
    pub fn idle(&self) {
        self.workers.set(self.name, WorkerState::Idle);
    }

    /// The worker is doing a piece of work.
    pub fn busy(&self) {
        self.workers.set(self.name, WorkerState::Busy);
    }
}

type WorkerFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type Factory = Box<dyn FnMut(WorkerCtx) -> WorkerFuture + Send>;

struct Spec {
    policy: Policy,
    factory: Factory,
    pause: Duration,
    started: tokio::time::Instant,
}

/// How a worker ended, as the main loop hears of it.
#[derive(Debug)]
pub enum Exit {
    /// A `Restart` worker ended and was started again.
    Restarted,
    /// A `Fatal` worker ended (or a `Restart` one ended without being asked and could not be
    /// started again): the process stops with this error.
    Fatal(anyhow::Error),
}

/// Starts workers, watches them end, applies their policy.
pub struct Supervisor {
    workers: Arc<Workers>,
    set: JoinSet<anyhow::Result<()>>,
    /// Which worker each task runs (a panicking task is known by its id alone).
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
    specs: BTreeMap<&'static str, Spec>,
    /// Workers that are about to start again: (when, name).
    due: Vec<(tokio::time::Instant, &'static str)>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("workers", &self.specs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(60);

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// A supervisor with no worker.
    pub fn new() -> Self {
        Supervisor {
            workers: Arc::default(),
            set: JoinSet::new(),
            names: Default::default(),
            specs: BTreeMap::new(),
            due: Vec::new(),
        }
    }

    /// The states of its workers, to share with the HTTP handlers.
    pub fn workers(&self) -> Arc<Workers> {
        Arc::clone(&self.workers)
    }

    /// Starts `make(ctx)` as the worker `name`, under `policy`. `make` is called again for
    /// each restart.
    pub fn spawn<F, Fut>(&mut self, name: &'static str, policy: Policy, make: F)
    where
        F: FnMut(WorkerCtx) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut make = make;
        let factory: Factory = Box::new(move |ctx| Box::pin(make(ctx)));
        self.workers.with(|m| {
            m.insert(
                name,
                WorkerStatus {
                    state: WorkerState::Starting,
                    last_error: None,
                    restarts: 0,
                },
            )
        });
        self.specs.insert(
            name,
            Spec {
                policy,
                factory,
                pause: FIRST_PAUSE,
                started: tokio::time::Instant::now(),
            },
        );
        self.start(name);
    }

    fn start(&mut self, name: &'static str) {
        let Some(spec) = self.specs.get_mut(name) else {
            return;
        };
        spec.started = tokio::time::Instant::now();
        self.workers.set(name, WorkerState::Starting);
        let ctx = WorkerCtx {
            name,
            workers: Arc::clone(&self.workers),
        };
        let run = (spec.factory)(ctx);
        let task = self.set.spawn(run);
        self.names.insert(task.id(), name);
    }

    /// Waits for the next worker to end and applies its policy. Pending forever while no
    /// worker runs and none is due to start again.
    pub async fn next_exit(&mut self) -> Exit {
        loop {
            self.due.sort();
            let next_due = self.due.first().map(|(at, _)| *at);
            tokio::select! {
                Some(joined) = self.set.join_next_with_id() => {
                    let (id, ended) = match joined {
                        Ok((id, r)) => (id, Ok(r)),
                        Err(e) if e.is_panic() => {
                            let id = e.id();
                            (id, Err(calsync_engine::outcome::panic_message(e.into_panic().as_ref())))
                        }
                        Err(e) => (e.id(), Err(format!("was cancelled: {e}"))),
                    };
                    let name = self.names.remove(&id).unwrap_or("unknown");
                    return self.ended(name, ended);
                }
                _ = async {
                    match next_due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (_, name) = self.due.remove(0);
                    self.start(name);
                }
            }
        }
    }

    fn ended(&mut self, name: &'static str, ended: Result<anyhow::Result<()>, String>) -> Exit {
        let why = match ended {
            Ok(Ok(())) => "ended without being asked".to_owned(),
            Ok(Err(e)) => format!("failed: {e:#}"),
            Err(panic) => format!("panicked: {panic}"),
        };
        let Some(spec) = self.specs.get_mut(name) else {
            return Exit::Fatal(anyhow::anyhow!("worker {name} {why}"));
        };
        self.workers.with(|m| {
            if let Some(s) = m.get_mut(name) {
                s.last_error = Some(why.clone());
            }
        });
        match spec.policy {
            Policy::Fatal => {
                self.workers.set(name, WorkerState::Stopped);
                error!(worker = name, reason = %why, "a worker the service cannot run without ended; stopping");
                metrics::counter!("calsync_worker_exits_total", "worker" => name, "policy" => "fatal")
                    .increment(1);
                Exit::Fatal(anyhow::anyhow!("worker {name} {why}"))
            }
            Policy::Restart => {
                // A worker that ran a while before failing starts from the first pause again.
                if spec.started.elapsed() >= MAX_PAUSE {
                    spec.pause = FIRST_PAUSE;
                }
                let pause = spec.pause;
                spec.pause = (spec.pause * 2).min(MAX_PAUSE);
                self.workers.set(name, WorkerState::Restarting);
                self.workers.with(|m| {
                    if let Some(s) = m.get_mut(name) {
                        s.restarts += 1;
                    }
                });
                warn!(worker = name, reason = %why, pause_ms = pause.as_millis() as u64, "a worker ended; starting it again");
                metrics::counter!("calsync_worker_exits_total", "worker" => name, "policy" => "restart")
                    .increment(1);
                self.due.push((tokio::time::Instant::now() + pause, name));
                Exit::Restarted
            }
        }
    }

    /// Waits up to `deadline` for `name` to end by itself (it was asked to, through its own
    /// token); `false` if it did not. Other workers ending meanwhile are marked stopped.
    pub async fn wait_for(&mut self, name: &'static str, deadline: Duration) -> bool {
        let ends = async {
            while let Some(joined) = self.set.join_next_with_id().await {
                let id = match &joined {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                let Some(ended) = self.names.remove(&id) else {
                    continue;
                };
                self.workers.set(ended, WorkerState::Stopped);
                if ended == name {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(deadline, ends).await.unwrap_or(false)
    }

    /// Stops every worker still running (after the ones that drain were waited for).
    pub async fn shutdown(&mut self) {
        self.due.clear();
        self.set.abort_all();
        while self.set.join_next().await.is_some() {}
        self.names.clear();
        self.workers.with(|m| {
            for s in m.values_mut() {
                s.state = WorkerState::Stopped;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_panics_is_named_and_started_again() {
        let mut sup = Supervisor::new();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        sup.spawn("flaky", Policy::Restart, move |ctx| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                ctx.busy();
                if n == 0 {
                    panic!("boom in the first run");
                }
                ctx.idle();
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        assert!(matches!(sup.next_exit().await, Exit::Restarted));
        let s = sup.workers().snapshot()["flaky"].clone();
        assert_eq!(s.state, WorkerState::Restarting);
        assert_eq!(s.restarts, 1);
        assert_eq!(
            s.last_error.as_deref(),
            Some("panicked: boom in the first run")
        );
        // Started again after the pause; it runs (idle) from then on.
        let waited = tokio::time::timeout(Duration::from_secs(5), sup.next_exit()).await;
        assert!(waited.is_err(), "a healthy worker does not end");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(sup.workers().snapshot()["flaky"].state, WorkerState::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_worker_that_fails_stops_the_process_by_name() {
        let mut sup = Supervisor::new();
        sup.spawn("keeper", Policy::Fatal, |_| async {
            Err(anyhow::anyhow!("the database went away"))
        });
        let Exit::Fatal(e) = sup.next_exit().await else {
            panic!("a fatal worker's end is fatal");
        };
        assert_eq!(
            e.to_string(),
            "worker keeper failed: the database went away"
        );
        assert_eq!(
            sup.workers().snapshot()["keeper"].state,
            WorkerState::Stopped
        );
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_pause_longer_each_time_up_to_a_minute() {
        let mut sup = Supervisor::new();
        sup.spawn("failing", Policy::Restart, |_| async {
            Err(anyhow::anyhow!("no"))
        });
        let mut at = Vec::new();
        let t0 = tokio::time::Instant::now();
        for _ in 0..9 {
            assert!(matches!(sup.next_exit().await, Exit::Restarted));
            at.push((tokio::time::Instant::now() - t0).as_secs());
        }
        // Ends at 0, then after 1, 2, 4, ... seconds, capped at 60.
        assert_eq!(at, [0, 1, 3, 7, 15, 31, 63, 123, 183]);
    }
}
