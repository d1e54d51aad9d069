//! `graph-sim`: run the Graph calendar simulator standalone.

use anyhow::Context;
use clap::Parser;
use graph_sim::Scenario;
use std::path::PathBuf;

/// A stateful Microsoft Graph calendar simulator (calendarView delta, writes, auth, faults).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "GRAPH_SIM_LISTEN")]
    listen: String,
    /// A scenario file (TOML); flags below override its generate section and seed.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Users to generate.
    #[arg(long)]
    users: Option<u32>,
    /// Events per generated user (a series counts once).
    #[arg(long)]
    events_per_user: Option<u32>,
    /// Share of generated events that recur (0.0–1.0).
    #[arg(long)]
    recurring: Option<f64>,
    /// Extra calendars per generated user.
    #[arg(long)]
    extra_calendars: Option<u32>,
    /// Seed for ids, tokens, generated data and probabilistic faults.
    #[arg(long)]
    seed: Option<u64>,
    /// Page size when the client sends no `Prefer: odata.maxpagesize`.
    #[arg(long)]
    page_size: Option<usize>,
    /// Access-token lifetime in seconds.
    #[arg(long)]
    token_lifetime: Option<i64>,
    /// Sync states (rounds and delta states) the cache keeps before evicting the oldest with a
    /// 410 (default 200,000): a tenant of 100,000 mailboxes needs more to serve its steady state.
    #[arg(long)]
    cache_capacity: Option<usize>,
    /// How series and bad tokens are served: `outlook` (as reported from production, the
    /// default) or `documented`; a scenario file can change single switches.
    #[arg(long, value_enum)]
    profile: Option<ProfileArg>,
    /// One behaviour switch over the profile, e.g. `--behaviour stub_occurrences=false`
    /// (repeatable; the names are those of `[sim.behaviour]`).
    #[arg(long, value_name = "SWITCH=BOOL")]
    behaviour: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProfileArg {
    Outlook,
    Documented,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let cli = Cli::parse();
    let mut scenario = match &cli.scenario {
        Some(p) => Scenario::from_file(p)?,
        None => Scenario::default(),
    };
    if cli.users.is_some()
        || cli.events_per_user.is_some()
        || cli.recurring.is_some()
        || cli.extra_calendars.is_some()
        || scenario.generate.is_none() && scenario.users.is_empty()
    {
        let mut g = scenario.generate.clone().unwrap_or_default();
        if let Some(v) = cli.users {
            g.users = v;
        }
        if let Some(v) = cli.events_per_user {
            g.events_per_user = v;
        }
        if let Some(v) = cli.recurring {
            anyhow::ensure!(
                (0.0..=1.0).contains(&v),
                "--recurring must be between 0 and 1, got {v}"
            );
            g.recurring = v;
        }
        if let Some(v) = cli.extra_calendars {
            g.extra_calendars = v;
        }
        scenario.generate = Some(g);
    }
    if let Some(n) = cli.cache_capacity {
        scenario.sim.cache_capacity = n;
    }
    if let Some(p) = cli.profile {
        scenario.sim.behaviour = graph_sim::Behaviour::of(match p {
            ProfileArg::Outlook => graph_sim::Profile::Outlook,
            ProfileArg::Documented => graph_sim::Profile::Documented,
        });
    }
    if !cli.behaviour.is_empty() {
        let mut spec = toml::Table::try_from(&scenario.sim.behaviour)
            .context("cannot read the profile's switches")?;
        for switch in &cli.behaviour {
            let (k, v) = switch
                .split_once('=')
                .with_context(|| format!("--behaviour {switch}: expected SWITCH=true|false"))?;
            let v: bool = v.trim().parse().with_context(|| {
                format!("--behaviour {switch}: the value must be true or false")
            })?;
            spec.insert(k.trim().to_owned(), toml::Value::Boolean(v));
        }
        scenario.sim.behaviour = spec
            .try_into()
            .map_err(|e| anyhow::anyhow!("--behaviour: {e}"))?;
    }
    if let Some(s) = cli.seed {
        scenario.sim.seed = s;
    }
    if let Some(p) = cli.page_size {
        scenario.sim.default_page_size = p;
    }
    if let Some(t) = cli.token_lifetime {
        scenario.sim.token_lifetime_secs = t;
    }
    let sim = scenario.build()?;
    let server = sim
        .serve(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let tenant = scenario.sim.tenant.clone();
    println!("graph-sim listening on http://{}", server.addr);
    println!("  graph base_url : {}", server.graph_base_url());
    println!("  token_url      : {}", server.token_url(&tenant));
    for c in &scenario.sim.clients {
        println!(
            "  client         : id={} secret={}",
            c.client_id, c.client_secret
        );
    }
    println!(
        "  identity       : IMDS {0}/metadata/identity/oauth2/token, App Service {0}/msi/token (X-IDENTITY-HEADER: {1})",
        format!("http://{}", server.addr),
        scenario.sim.managed.identity_header
    );
    println!(
        "  admin          : {}/users, /truth, /requests, /violations, /stats, /faults, /push",
        server.admin_url()
    );
    {
        let st = sim.lock();
        let n = st.tenant.users.len();
        let events: usize = st
            .tenant
            .users
            .iter()
            .flat_map(|u| &u.calendars)
            .map(|c| c.events.len())
            .sum();
        println!("  tenant         : {n} users, {events} events");
        for u in st.tenant.users.iter().take(3) {
            println!("    {} ({})", u.upn, u.id);
        }
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    server.stop().await;
    Ok(())
}
