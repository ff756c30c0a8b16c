//! PostgreSQL access: the pool, migrations, ids, and one module of queries per aggregate.

pub mod audit;
pub mod builds;
pub mod ids;
pub mod jobs;
pub mod machines;
pub mod models;
pub mod notify;
pub mod oidc_claims;
pub mod oidc_keys;
pub mod orgs;
pub mod projects;
pub mod tokens;
pub mod trust_policies;
pub mod usage;
pub mod volumes;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::DatabaseConfig;

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Builds a pool that connects lazily, so `serve` can come up (and answer `/healthz`)
/// while the database is still unreachable.
pub fn lazy_pool(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let options = connect_options(config)?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .acquire_timeout(config.acquire_timeout())
        .idle_timeout(Duration::from_secs(600))
        .connect_lazy_with(options))
}

pub fn connect_options(config: &DatabaseConfig) -> anyhow::Result<PgConnectOptions> {
    anyhow::ensure!(
        config.is_configured(),
        "database.url is not set; set KILN_DATABASE__URL=postgres://user:password@host/db, or use `kiln dev`"
    );
    let options = PgConnectOptions::from_str(config.url.expose_secret())
        .context("database.url is not a valid PostgreSQL URL")?
        .application_name("kiln");
    // Statements are logged at debug, never at info: they would flood production logs.
    Ok(options.log_statements(log::LevelFilter::Debug))
}

/// Where the database lives, without credentials: safe for logs.
pub fn describe_target(config: &DatabaseConfig) -> String {
    match url::Url::parse(config.url.expose_secret()) {
        Ok(url) => format!(
            "{}:{}{}",
            url.host_str().unwrap_or("localhost"),
            url.port().unwrap_or(5432),
            url.path()
        ),
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// Applies pending migrations. sqlx holds a Postgres advisory lock while it migrates,
/// so replicas starting together take turns and all come up.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("applying database migrations")
}

/// True when every migration compiled into this binary has been applied.
pub async fn is_migrated(pool: &PgPool) -> sqlx::Result<bool> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let table_exists: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?;
    if !table_exists {
        return Ok(latest == 0);
    }
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    Ok(applied.unwrap_or(0) >= latest)
}
