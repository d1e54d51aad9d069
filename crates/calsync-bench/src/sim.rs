//! The simulator as the benchmark uses it: the real `graph-sim` binary in a child process, and
//! its admin API (`/_sim/…`) over a plain HTTP/1.1 connection.

use crate::BenchArgs;
use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

pub(crate) struct SimProcess {
    child: std::process::Child,
    pub(crate) base: String,
}

impl SimProcess {
    /// Starts graph-sim with the tenant `args` describe (generated), or with `scenario` (a
    /// scenario file) when given.
    pub(crate) fn start(args: &BenchArgs) -> anyhow::Result<Self> {
        Self::start_with(args, None)
    }

    pub(crate) fn start_with(
        args: &BenchArgs,
        scenario: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let exe = match &args.graph_sim {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("cannot locate this binary's directory")?
                .join("graph-sim"),
        };
        if !exe.is_file() {
            bail!(
                "no graph-sim binary at {}: build it with `cargo build --release -p graph-sim -p calsync-bench`, or pass --graph-sim",
                exe.display()
            );
        }
        let mut command = Command::new(&exe);
        command.args(["--listen", "127.0.0.1:0"]);
        match scenario {
            Some(path) => {
                command.arg("--scenario").arg(path);
            }
            None => {
                command.args([
                    "--users",
                    &args.users.to_string(),
                    "--events-per-user",
                    &args.events_per_user.to_string(),
                    "--recurring",
                    &args.recurring.to_string(),
                    "--extra-calendars",
                    "0",
                    "--seed",
                    "42",
                    // Room for every mailbox's sync states: evictions (410s) are measured by
                    // the fault tests, not by the benchmarks.
                    "--cache-capacity",
                    &(args.users as usize * 20 + 100_000).to_string(),
                ]);
            }
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout from the simulator process")?;
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        lines.read_line(&mut line)?;
        // The simulator prints a few more lines; keep reading so it never writes to a closed pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while lines.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let base = line
            .trim()
            .strip_prefix("graph-sim listening on ")
            .map(str::to_owned);
        match base {
            Some(base) => Ok(SimProcess { child, base }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the simulator process did not start: {line}")
            }
        }
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request to the simulator's admin API (`/_sim/…`) over a plain HTTP/1.1 connection: the
/// benchmark links no HTTP client of its own (only calsync-graph speaks HTTP).
pub(crate) async fn sim_admin(
    base: &str,
    method: &str,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    sim_admin_with(base, method, path, "").await
}

/// [`sim_admin`] with a JSON body.
pub(crate) async fn sim_admin_with(
    base: &str,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the simulator at {addr}"))?;
    let req = format!(
        "{method} /_sim/{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the simulator's answer has no header end")?;
    let head = String::from_utf8_lossy(&buf[..at]);
    if !head.starts_with("HTTP/1.1 200") {
        bail!("/_sim/{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(serde_json::from_slice(&buf[at + 4..])?)
}

/// Graph requests by kind, from the simulator's request log.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RequestMix {
    /// calendarView delta pages.
    pub(crate) delta: u64,
    /// Series masters fetched for occurrence stubs.
    pub(crate) masters: u64,
    /// `/instances` pages read to reconcile changed series.
    pub(crate) instances: u64,
    /// The highest sequence number seen.
    pub(crate) last_seq: u64,
}

/// The Graph requests the simulator answered after `since` (a sequence number).
pub(crate) async fn request_mix(base: &str, since: u64) -> anyhow::Result<RequestMix> {
    let log = sim_admin(base, "GET", "requests").await?;
    let mut mix = RequestMix {
        last_seq: since,
        ..RequestMix::default()
    };
    for r in log.as_array().context("the request log is not a list")? {
        let seq = r["seq"].as_u64().unwrap_or(0);
        if seq <= since {
            continue;
        }
        mix.last_seq = mix.last_seq.max(seq);
        let path = r["path"].as_str().unwrap_or("");
        if path.contains("calendarView") {
            mix.delta += 1;
        } else if path.ends_with("/instances") {
            mix.instances += 1;
        } else if path.contains("/events/") {
            mix.masters += 1;
        }
    }
    Ok(mix)
}
