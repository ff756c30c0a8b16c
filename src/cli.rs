//! The `kiln` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a self-hostable, Depot-compatible remote Docker build backend",
    long_about = "Kiln serves the unmodified depot CLI, a JSON API and a dashboard, schedules \
                  BuildKit builders, and allocates layer caches, all on one PostgreSQL database.\n\n\
                  Configuration: config/default.toml (built in) < --config FILE < KILN_* environment \
                  variables (nested with __, e.g. KILN_DATABASE__URL)."
)]
pub struct Cli {
    /// TOML file overriding the built-in defaults (see config/default.toml)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every component in one process: HTTP API, background jobs, and (with later
    /// releases) the scheduler and cache allocator. Stops gracefully on SIGTERM/SIGINT.
    Serve,
    /// Apply pending database migrations, then exit. Safe to run while replicas serve.
    Migrate,
    /// Run Kiln on this machine with no setup: starts a throwaway PostgreSQL under
    /// ./.kiln, migrates, creates a dev organization, project and token, then serves.
    Dev(crate::dev::DevArgs),
    /// Supervise BuildKit on a builder machine: register with Kiln, follow its
    /// directives, report health. Started by the machine's launch (user data).
    Agent(crate::agent::AgentArgs),
    /// Create and list organizations, users, memberships, projects and tokens.
    Admin(crate::admin::AdminArgs),
    /// The model registry: import models (served as OCI images at /v2/) and list them.
    Models(crate::admin::models::ModelsArgs),
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // The agent runs on builder machines and takes only its own flags (KILN_AGENT_*).
    if let Command::Agent(args) = cli.command {
        crate::telemetry::init_tracing(&crate::config::LogConfig {
            format: crate::config::LogFormat::Text,
            filter: "info".into(),
        });
        return crate::agent::run(args).await;
    }
    let config = Config::load(cli.config.as_deref())?;
    crate::telemetry::init_tracing(&config.log);
    match cli.command {
        Command::Serve => crate::app::serve(config, crate::app::shutdown_signal()).await,
        Command::Migrate => {
            let pool = crate::db::lazy_pool(&config.database)?;
            crate::db::migrate(&pool).await?;
            let latest = crate::db::MIGRATOR
                .iter()
                .map(|m| m.version)
                .max()
                .unwrap_or(0);
            println!("database migrated to version {latest}");
            Ok(())
        }
        Command::Dev(args) => crate::dev::run(config, args).await,
        Command::Admin(args) => crate::admin::run(config, args).await,
        Command::Models(args) => crate::admin::models::run(config, args).await,
        Command::Agent(_) => unreachable!("handled above"),
    }
}
