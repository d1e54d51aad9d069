//! The `calsync` command.

use calsync::config::{ConfigError, RawConfig};
use calsync::{app, bench, demo, service, telemetry};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Mirror Microsoft 365 calendars into PostgreSQL with Graph calendarView delta.
#[derive(Debug, Parser)]
#[command(name = "calsync", version)]
struct Cli {
    /// Config file (TOML); every key can be overridden with CALSYNC_<SECTION>__<KEY>.
    #[arg(long, short, global = true, env = "CALSYNC_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sync daemon until SIGTERM or SIGINT.
    Run,
    /// Run one complete round for every configured calendar, then exit (non-zero if any failed).
    SyncOnce,
    /// Apply database migrations.
    Migrate,
    /// Show each tracked calendar's sync state.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make a tuple's next round a full resync (initial sync + sweep).
    Resync {
        /// The tuple's name, as `calsync status` shows it.
        tuple: String,
    },
    /// Ask the running daemon to re-read its config (POST /reload on http.listen).
    Reload,
    /// Exit 0 if the running daemon answers /healthz (for container health checks).
    Healthcheck,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run the whole product against the built-in Graph simulator and a throwaway database.
    Demo(demo::DemoArgs),
    /// Measure ingest, no-change rounds and idle memory against the simulator (BENCHMARKS.md).
    Bench(bench::BenchArgs),
    #[command(name = "__sim", hide = true)]
    Sim(bench::SimArgs),
    #[command(name = "__bench-idle", hide = true)]
    BenchIdle(bench::IdleArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config and print it with secrets redacted (exit 2 on errors).
    Check,
}

fn exit_for(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

async fn main_inner(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Demo(args) => {
            telemetry::init(calsync::config::LogFormat::Text, "error");
            demo::run(args).await
        }
        Command::Bench(args) => {
            telemetry::init(calsync::config::LogFormat::Text, "error");
            bench::run(args).await.map(|_| true)
        }
        Command::Sim(args) => bench::serve_sim(args).await.map(|_| true),
        Command::BenchIdle(args) => {
            telemetry::init(calsync::config::LogFormat::Text, "error");
            bench::idle(args).await.map(|_| true)
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            raw.validate()?;
            print!("{}", raw.redacted_toml());
            eprintln!("config ok");
            Ok(true)
        }
        Command::Migrate => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            telemetry::init(calsync::config::LogFormat::Text, &raw.log.filter);
            app::migrate(&raw).await.map(|_| true)
        }
        Command::Status { json } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            app::status(&raw, json).await.map(|_| true)
        }
        Command::Run => {
            let cfg = RawConfig::load(cli.config.as_deref())?.validate()?;
            telemetry::init(cfg.log_format, &cfg.log_filter);
            service::run(cfg, cli.config.clone()).await.map(|_| true)
        }
        Command::Resync { tuple } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            app::resync(&raw, &tuple).await.map(|_| true)
        }
        Command::Reload => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            app::reload(&raw).await
        }
        Command::Healthcheck => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            app::healthcheck(&raw).await
        }
        Command::SyncOnce => {
            let cfg = RawConfig::load(cli.config.as_deref())?.validate()?;
            telemetry::init(cfg.log_format, &cfg.log_filter);
            app::sync_once(cfg).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(main_inner(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_for(&e)
        }
    }
}
