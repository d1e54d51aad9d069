//! The `calsync` command.

use calsync::config::{ConfigError, RawConfig};
#[cfg(feature = "demo")]
use calsync::demo;
use calsync::{commands, service, telemetry};
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
    /// Print what the config's [[sources]] resolve to now, without syncing or touching the
    /// database (a dry run of discovery).
    Discover {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply database migrations.
    Migrate,
    /// Show each tracked calendar's sync state.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only calendars in this state: pending, ok, retrying, degraded, failed, or stale
        /// (overdue: no round completed within max(3 x interval, interval + 10 min)).
        #[arg(long, value_parser = parse_state)]
        state: Option<StateArg>,
        /// The N calendars longest without a successful round, oldest first.
        #[arg(long, value_name = "N")]
        oldest: Option<u64>,
        /// At most this many rows (a table shows 100 unless told).
        #[arg(long)]
        limit: Option<u64>,
        /// Skip this many rows first.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Print the change feed: every change of calendar_events after a cursor (or from the
    /// oldest kept), one line each with its cursor; with --follow, keep printing as changes
    /// commit.
    Changes {
        /// Start after this cursor (a line's first field); without it, from the oldest kept.
        #[arg(long)]
        after: Option<String>,
        /// Keep following (woken by NOTIFY calsync_changes) until SIGINT or SIGTERM.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line (NDJSON) with every field and the row as the view shows it.
        #[arg(long)]
        json: bool,
        /// With --follow: read at least this often without a wake-up (e.g. "1s", "5m").
        #[arg(long, default_value = "1s", value_parser = parse_poll)]
        poll: std::time::Duration,
    },
    /// Make a tuple's next round a full resync (initial sync + sweep).
    Resync {
        /// The tuple's name, as `calsync status` shows it.
        tuple: String,
    },
    /// Sign a delegated account in by the device code flow (prints a URL and a code, waits),
    /// and keep its refresh token sealed in the database.
    Login {
        /// The account's name, as `[[calendars]] account` spells it.
        account: String,
    },
    /// List the delegated accounts: who signed in, and which must sign in again.
    Accounts {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a delegated account's refresh token; its calendars stop syncing.
    Logout {
        /// The account's name.
        account: String,
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
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
}

/// `status --state`: a stored state, or `stale` (overdue, whatever the state says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateArg {
    Stored(calsync_store::TupleStatus),
    Stale,
}

fn parse_state(s: &str) -> Result<StateArg, String> {
    if s.trim() == "stale" {
        return Ok(StateArg::Stale);
    }
    calsync_store::TupleStatus::parse(s.trim())
        .map(StateArg::Stored)
        .ok_or_else(|| {
            let all: Vec<&str> = calsync_store::TupleStatus::ALL
                .iter()
                .map(|t| t.as_str())
                .collect();
            format!("'{s}' is not a state; one of {}, stale", all.join(", "))
        })
}

fn parse_poll(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d >= std::time::Duration::from_millis(100) => Ok(d),
        Ok(_) => Err(format!("'{s}' is too short; at least 100ms")),
        Err(e) => Err(format!("'{s}' is not a duration ({e}); e.g. 1s, 5m")),
    }
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
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            telemetry::init(calsync::config::LogFormat::Text, "error");
            demo::run(args).await
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            let cfg = raw.validate()?;
            print!("{}", raw.redacted_toml());
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "credential: {} {:?}",
                cfg.auth.credential.kind(),
                cfg.auth.credential
            );
            let mut accounts: Vec<&str> = cfg
                .tuples
                .iter()
                .filter_map(|t| t.account.as_deref())
                .collect();
            accounts.sort_unstable();
            accounts.dedup();
            if let Some(v) = &cfg.vault {
                eprintln!(
                    "accounts: sealed with key {}; read through: {}",
                    v.key_id(),
                    if accounts.is_empty() {
                        "none".to_owned()
                    } else {
                        accounts.join(", ")
                    }
                );
            }
            eprintln!("config ok");
            Ok(true)
        }
        Command::Migrate => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            telemetry::init(calsync::config::LogFormat::Text, &raw.log.filter);
            commands::migrate(&raw).await.map(|_| true)
        }
        Command::Status {
            json,
            state,
            oldest,
            limit,
            offset,
        } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            let args = commands::StatusArgs {
                json,
                query: calsync_store::StatusQuery {
                    state: match state {
                        Some(StateArg::Stored(s)) => Some(s),
                        _ => None,
                    },
                    stale: state == Some(StateArg::Stale),
                    oldest_first: oldest.is_some(),
                    limit: oldest.or(limit),
                    offset,
                },
            };
            commands::status(&raw, &args).await.map(|_| true)
        }
        Command::Run => {
            let cfg = RawConfig::load(cli.config.as_deref())?.validate()?;
            telemetry::init(cfg.log_format, &cfg.log_filter);
            let app = service::App::build(cfg, cli.config.clone()).await?;
            app.run(commands::shutdown_signal(), commands::hangups()?)
                .await
                .map(|_| true)
        }
        Command::Changes {
            after,
            follow,
            json,
            poll,
        } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            telemetry::init(calsync::config::LogFormat::Text, "warn");
            let args = calsync::feed::ChangesArgs {
                after,
                follow,
                json,
                poll,
            };
            calsync::feed::changes(&raw, &args, commands::shutdown_signal())
                .await
                .map(|_| true)
        }
        Command::Resync { tuple } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            commands::resync(&raw, &tuple).await.map(|_| true)
        }
        Command::Login { account } => {
            let cfg = RawConfig::load(cli.config.as_deref())?.validate()?;
            telemetry::init(cfg.log_format, "warn");
            calsync::accounts::login(&cfg, &account, commands::shutdown_signal())
                .await
                .map(|_| true)
        }
        Command::Accounts { json } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            calsync::accounts::list(&raw, json).await.map(|_| true)
        }
        Command::Logout { account } => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            calsync::accounts::logout(&raw, &account)
                .await
                .map(|_| true)
        }
        Command::Reload => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            commands::reload(&raw).await
        }
        Command::Healthcheck => {
            let raw = RawConfig::load(cli.config.as_deref())?;
            commands::healthcheck(&raw).await
        }
        Command::Discover { json } => {
            let cfg = RawConfig::load(cli.config.as_deref())?.validate()?;
            telemetry::init(cfg.log_format, "warn");
            commands::discover(&cfg, json).await
        }
        Command::SyncOnce => {
            let cfg = RawConfig::load(cli.config.as_deref())?.validate()?;
            telemetry::init(cfg.log_format, &cfg.log_filter);
            commands::sync_once(cfg).await
        }
    }
}

/// mimalloc instead of the system allocator: parsing pages into JSON trees and writing them
/// out again is allocation-heavy (a quarter of ingest CPU was in glibc malloc/free), and the
/// image's musl allocator is slower still.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
