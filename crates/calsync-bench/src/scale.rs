//! `calsync-bench scale`: the real daemon (`calsync run`, one or more replicas as child
//! processes) keeping many calendars fresh against the real graph-sim binary, mostly no-change
//! rounds with a share of calendars changing each interval. Prints start-to-READY, the initial
//! sync, CPU per round (the daemons' utime+stime over the steady span divided by the delta pages
//! the simulator served), lag quantiles, RSS, and log lines per second at info.

use crate::BenchArgs;
use crate::sim::{SimProcess, sim_admin, sim_admin_with};
use anyhow::{Context, bail};
use calsync_store::Store;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Calendars (one mailbox each).
    #[arg(long, default_value_t = 100_000)]
    pub tuples: u32,
    /// `sync.interval` of every calendar.
    #[arg(long, default_value = "5m")]
    pub interval: humantime::Duration,
    /// Replicas of `calsync run` sharing the calendars.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Share of calendars edited per interval, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub change_percent: f64,
    /// Steady state measured after the initial sync (default: one interval).
    #[arg(long)]
    pub measure: Option<humantime::Duration>,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// The graph-sim and calsync binaries' directory (default: this binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

pub(crate) struct Daemon {
    child: Child,
    notify: UnixDatagram,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    pub(crate) fn start(
        bin: &Path,
        config: &Path,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<Daemon> {
        let sock = dir.join(format!("{name}.notify"));
        let _ = std::fs::remove_file(&sock);
        let notify = UnixDatagram::bind(&sock)?;
        notify.set_nonblocking(true)?;
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("DATABASE_URL")
            .env("CALSYNC_SERVICE__REPLICA", name)
            .env("NOTIFY_SOCKET", &sock)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Daemon { child, notify, log })
    }

    /// Waits for READY=1; returns how long it took from `since`.
    pub(crate) fn ready(&mut self, since: Instant, limit: Duration) -> anyhow::Result<Duration> {
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                    return Ok(since.elapsed());
                }
            }
            if let Some(s) = self.child.try_wait()? {
                bail!(
                    "calsync exited with {s} before READY; see {}",
                    self.log.display()
                );
            }
            if since.elapsed() > limit {
                bail!("no READY=1 within {limit:?}; see {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads the notify socket from now on, as systemd does (a socket nobody reads would
    /// block the daemon's notifier).
    pub(crate) fn drain_notes(&self) -> anyhow::Result<()> {
        let sock = self.notify.try_clone()?;
        sock.set_nonblocking(false)?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while sock.recv(&mut buf).is_ok() {}
        });
        Ok(())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let started = Instant::now();
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("calsync did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// utime + stime of a process in clock ticks, its exited threads included (`/proc/<pid>/stat`).
fn clock_ticks_of(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    Ok(n(11) + n(12))
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0)
}

fn rss_mib_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) fn config(
    db: &str,
    graph: &str,
    interval: Duration,
    tuples: u32,
    window: (&str, &str),
) -> String {
    let mut s = format!(
        r#"[database]
url = "{db}"
max_connections = 8

[graph]
base_url = "{graph}/v1.0"

[auth]
token_url = "{graph}/sim-tenant/oauth2/v2.0/token"
client_id = "calsync-sim-client"
client_secret = "calsync-sim-secret"

[sync]
interval = "{}s"
startup_spread = "30s"

[log]
filter = "info"

[service]
lease_ttl = "20s"
"#,
        interval.as_secs()
    );
    for i in 0..tuples {
        s.push_str(&format!(
            "[[calendars]]\nname = \"t{i}\"\nuser = \"user{i:04}@contoso.onmicrosoft.com\"\ncalendar = \"default\"\nstart = \"{}\"\nend = \"{}\"\n",
            window.0, window.1
        ));
    }
    s
}

/// Delta pages served and `$batch` requests answered, so far.
async fn delta_pages(base: &str) -> anyhow::Result<(u64, u64)> {
    let s = sim_admin(base, "GET", "stats").await?;
    Ok((
        s["delta_pages"].as_u64().unwrap_or(0),
        s["batches"].as_u64().unwrap_or(0),
    ))
}

pub(crate) async fn scale(args: ScaleArgs) -> anyhow::Result<()> {
    let interval: Duration = args.interval.into();
    let measure: Duration = args.measure.map_or(interval, Into::into);
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("cannot locate this binary's directory")?
            .to_path_buf(),
    };
    let calsync = bin_dir.join("calsync");
    if !calsync.is_file() {
        bail!(
            "no calsync binary at {}: cargo build --release -p calsync -p graph-sim -p calsync-bench",
            calsync.display()
        );
    }
    let admin = args
        .database_url
        .clone()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = calsync_store::recreate_database(&admin, "calsync_scale").await?;
    let sim_args = BenchArgs::for_tenant(args.tuples, 2, bin_dir.join("graph-sim"));
    let t0 = Instant::now();
    let sim = SimProcess::start(&sim_args)?;
    println!(
        "graph-sim: {} mailboxes, 2 events each, up in {:.1} s",
        args.tuples,
        t0.elapsed().as_secs_f64()
    );
    let now = chrono::Utc::now();
    let start = (now - chrono::Duration::days(90))
        .format("%Y-%m-%dT00:00:00Z")
        .to_string();
    let end = (now + chrono::Duration::days(365))
        .format("%Y-%m-%dT00:00:00Z")
        .to_string();
    let dir = std::env::temp_dir().join(format!("calsync-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg_path = dir.join("calsync.toml");
    std::fs::write(
        &cfg_path,
        config(&db, &sim.base, interval, args.tuples, (&start, &end)),
    )?;
    let store = Store::connect(&db, &calsync_store::ConnectOptions::new(2)).await?;

    // Start to READY: a fresh database (registration of every calendar), then each replica.
    let mut daemons = Vec::new();
    let mut ready = Vec::new();
    for r in 0..args.replicas {
        let t = Instant::now();
        let mut d = Daemon::start(&calsync, &cfg_path, &dir, &format!("r{r}"))?;
        ready.push(d.ready(t, Duration::from_secs(300))?);
        d.drain_notes()?;
        daemons.push(d);
    }
    println!(
        "start to READY (fresh database, {} calendars): {}",
        args.tuples,
        ready
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The initial sync.
    let t = Instant::now();
    loop {
        let s = store.status_summary().await?;
        let ok = s
            .by_state
            .iter()
            .find(|(st, _)| *st == calsync_store::TupleStatus::Ok)
            .map_or(0, |(_, n)| *n);
        if ok >= u64::from(args.tuples) {
            break;
        }
        if t.elapsed() > Duration::from_secs(3600) {
            bail!("the initial sync did not finish within an hour ({ok} ok)");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let initial = t.elapsed();
    println!(
        "initial sync: {} calendars in {:.1} s",
        args.tuples,
        initial.as_secs_f64()
    );
    // Restart one replica: start to READY with every calendar already registered.
    {
        daemons[0].stop()?;
        let t = Instant::now();
        let mut d = Daemon::start(&calsync, &cfg_path, &dir, "r0")?;
        let took = d.ready(t, Duration::from_secs(300))?;
        d.drain_notes()?;
        println!(
            "start to READY (restart, {} calendars registered): {:.2} s",
            args.tuples,
            took.as_secs_f64()
        );
        daemons[0] = d;
    }
    // Let the restarted replica settle for a tenth of the interval before measuring.
    tokio::time::sleep(interval / 10).await;

    // Steady state: edits to change_percent of the calendars per interval, spread evenly.
    let per_interval = (f64::from(args.tuples) * args.change_percent / 100.0).round() as u64;
    let ticks =
        |ds: &[Daemon]| -> anyhow::Result<u64> { ds.iter().map(|d| clock_ticks_of(d.pid())).sum() };
    let lines = |ds: &[Daemon]| ds.iter().map(Daemon::log_lines).sum::<usize>();
    let (c0, p0, l0) = (
        ticks(&daemons)?,
        delta_pages(&sim.base).await?,
        lines(&daemons),
    );
    let t = Instant::now();
    let mut edits = 0u64;
    let mut worst_p99 = 0.0f64;
    let mut worst_max = 0.0f64;
    let mut offset = 0u64;
    while t.elapsed() < measure {
        let due = (per_interval as f64 * t.elapsed().as_secs_f64() / interval.as_secs_f64()) as u64;
        if due > edits {
            let n = due - edits;
            sim_admin_with(
                &sim.base,
                "POST",
                &format!("churn?edits={n}&offset={offset}&seed={offset}&start={start}&end={end}"),
                "",
            )
            .await?;
            // A pseudo-random stride, so edits spread over the tenant.
            offset = (offset + n * 7919) % u64::from(args.tuples);
            edits = due;
        }
        let q = store.lag_quantiles(&[0.99, 1.0]).await?;
        worst_p99 = worst_p99.max(q.first().copied().unwrap_or(0.0));
        worst_max = worst_max.max(q.get(1).copied().unwrap_or(0.0));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let span = t.elapsed().as_secs_f64();
    let (c1, p1, l1) = (
        ticks(&daemons)?,
        delta_pages(&sim.base).await?,
        lines(&daemons),
    );
    let hz = clock_ticks_per_second();
    let cpu = (c1 - c0) as f64 / hz;
    let rounds = p1.0 - p0.0;
    let batches = p1.1 - p0.1;
    let rss: Vec<String> = daemons
        .iter()
        .map(|d| format!("{:.0} MiB", rss_mib_of(d.pid())))
        .collect();
    println!(
        "steady state, {span:.0} s, {} replica(s), interval {}s, {edits} edits ({}% of calendars per interval):",
        args.replicas,
        interval.as_secs(),
        args.change_percent
    );
    println!(
        "  rounds served {rounds} ({:.0}/s); calsync CPU {cpu:.2} s = {:.1} us per round ({:.1}% of one core)",
        rounds as f64 / span,
        cpu / rounds.max(1) as f64 * 1e6,
        cpu / span * 100.0
    );
    println!(
        "  JSON batches: {batches}, {:.1} pages per batch on average (the replays among the pages)",
        rounds as f64 / batches.max(1) as f64
    );
    println!(
        "  time since last success: p99 {worst_p99:.0} s, max {worst_max:.0} s (worst sample; bound 2 x interval = {} s)",
        2 * interval.as_secs()
    );
    println!("  RSS: {}", rss.join(", "));
    let stats = sim_admin(&sim.base, "GET", "stats").await?;
    println!(
        "  graph-sim: {} sync states evicted, {} answers 410 (both should be 0 here)",
        stats["evictions"], stats["by_status"]["410"]
    );
    println!(
        "  log lines at info: {:.2}/s",
        (l1.saturating_sub(l0)) as f64 / span
    );
    for d in &mut daemons {
        d.stop()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
