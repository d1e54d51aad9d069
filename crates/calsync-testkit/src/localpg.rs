//! A throwaway PostgreSQL cluster for the demo, benchmarks and outage tests:
//! `initdb` into a temporary directory, `pg_ctl start` on a free loopback port, stopped and
//! deleted on drop.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running throwaway cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: tempfile::TempDir,
    initdb: PathBuf,
    pg_ctl: PathBuf,
    run_as: Option<String>,
    port: u16,
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl LocalPostgres {
    /// `initdb` and `pg_ctl start` in a new temporary directory.
    pub fn start() -> anyhow::Result<Self> {
        let (Some(initdb), Some(pg_ctl)) = (find_bin("initdb"), find_bin("pg_ctl")) else {
            bail!(
                "DATABASE_URL is not set and no PostgreSQL server binaries (initdb, pg_ctl) were found on PATH or in /usr/lib/postgresql: set DATABASE_URL=postgres://user@host/db or install PostgreSQL"
            );
        };
        let dir = tempfile::Builder::new()
            .prefix("calsync-pg-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        // initdb refuses to run as root; run the cluster as the postgres user instead.
        let run_as = if is_root() {
            let ok = Command::new("id")
                .arg("-u")
                .arg("postgres")
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                bail!(
                    "running as root, and initdb refuses root; no 'postgres' user to run it as. Set DATABASE_URL instead"
                );
            }
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .context("cannot run chown")?;
            if !status.success() {
                bail!("cannot hand {} to the postgres user", dir.path().display());
            }
            Some("postgres".to_owned())
        } else {
            None
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .context("cannot find a free port")?;
        let pg = LocalPostgres {
            dir,
            initdb,
            pg_ctl,
            run_as,
            port,
        };
        let data = pg.dir.path().join("data");
        pg.run(
            &pg.initdb,
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "calsync",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    /// `pg_ctl start` on the cluster's port; waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log");
        self.run(
            &self.pg_ctl,
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &opts,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// `pg_ctl stop -m fast`: open sessions are cut, the port is closed until
    /// [`LocalPostgres::start_server`].
    pub fn stop_server(&self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        self.run(
            &self.pg_ctl,
            &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
        )
    }

    fn run(&self, exe: &Path, args: &[&str]) -> anyhow::Result<()> {
        let out = match &self.run_as {
            Some(user) => Command::new("runuser")
                .arg("-u")
                .arg(user)
                .arg("--")
                .arg(exe)
                .args(args)
                .output(),
            None => Command::new(exe).args(args).output(),
        }
        .with_context(|| format!("cannot run {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                exe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// A URL for the cluster's `postgres` database, as user `calsync`.
    pub fn url(&self) -> String {
        format!("postgres://calsync@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.stop_server();
    }
}
