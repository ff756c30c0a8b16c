//! `kiln dev`: the whole service on one machine with no setup.

pub mod postgres;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use chrono::{Duration, Utc};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{Principal, Role, TokenKind};
use crate::config::Config;
use crate::db;
use crate::projects::ProjectSettings;
use crate::tokens::NewToken;
use postgres::EmbeddedPostgres;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where to keep the PostgreSQL cluster and generated secrets [default: dev.data_dir]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to serve on [default: server.listen]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

const DEV_ORG: &str = "Kiln Dev";
const DEV_EMAIL: &str = "dev@kiln.localhost";
const DEV_PROJECT: &str = "dev";
const DB_USER: &str = "kiln";
const DB_NAME: &str = "kiln";

/// Secrets generated on first start and reused, kept in a 0600 file of the data dir.
#[derive(Serialize, Deserialize)]
struct DevSecrets {
    postgres_password: String,
    key_encryption_key: String,
    /// Sign-in password of the dev user (approval page of `depot login`).
    #[serde(default)]
    dev_user_password: String,
}

fn load_or_create_secrets(path: &Path) -> anyhow::Result<DevSecrets> {
    if path.is_file() {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
        return toml::from_str(&text).with_context(|| {
            format!("{path:?} is corrupt; delete the dev data dir to start over")
        });
    }
    let mut kek = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut kek);
    let secrets = DevSecrets {
        postgres_password: db::ids::random_alphanumeric(32),
        key_encryption_key: base64::engine::general_purpose::STANDARD.encode(kek),
        dev_user_password: db::ids::random_alphanumeric(16),
    };
    std::fs::write(path, toml::to_string(&secrets)?)
        .with_context(|| format!("writing {path:?}"))?;
    postgres::restrict_permissions(path)?;
    Ok(secrets)
}

/// Where the cluster lives: `<data_dir>/postgres`, unless Kiln runs as root and the
/// `postgres` user cannot traverse that path (a checkout under /root, say). Then a
/// stable directory under /var/tmp, derived from the data dir, so data is reused.
async fn cluster_dir(data_dir: &Path) -> PathBuf {
    let preferred = data_dir.join("postgres");
    if !postgres::is_root() {
        return preferred;
    }
    let reachable = tokio::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(data_dir)
        .status()
        .await
        .is_ok_and(|s| s.success());
    if reachable {
        return preferred;
    }
    let digest = hex::encode(Sha256::digest(data_dir.as_os_str().as_encoded_bytes()));
    let fallback = PathBuf::from(format!("/var/tmp/kiln-dev-{}", &digest[..12]));
    tracing::info!(
        dir = %fallback.display(),
        "the postgres user cannot reach {}; keeping the dev cluster here instead",
        data_dir.display()
    );
    fallback
}

pub async fn run(mut config: Config, args: DevArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(|| config.dev.data_dir.clone());
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {data_dir:?}"))?;
    let data_dir = data_dir.canonicalize()?;
    let secrets = load_or_create_secrets(&data_dir.join("dev-secrets.toml"))?;

    let mut embedded: Option<Arc<EmbeddedPostgres>> = None;
    if !config.database.is_configured() {
        let bin_dir = postgres::find_bin_dir(&config.dev.postgres_bin_dir)?;
        let dir = cluster_dir(&data_dir).await;
        let mut pg =
            EmbeddedPostgres::init(bin_dir, &dir, DB_USER, &secrets.postgres_password).await?;
        pg.start().await?;
        let pg = Arc::new(pg);
        let admin_url = format!(
            "postgres://{DB_USER}:{}@127.0.0.1:{}/postgres",
            secrets.postgres_password, pg.port
        );
        let url = format!(
            "postgres://{DB_USER}:{}@127.0.0.1:{}/{DB_NAME}",
            secrets.postgres_password, pg.port
        );
        embedded = Some(pg);
        if let Err(err) = create_database_if_missing(&admin_url).await {
            stop_embedded(embedded.as_deref()).await;
            return Err(err);
        }
        config.database.url = SecretString::from(url);
    }
    if config.secrets.key_encryption_key.expose_secret().is_empty() {
        config.secrets.key_encryption_key = SecretString::from(secrets.key_encryption_key.clone());
    }
    if config.cache.local.dir.as_os_str().is_empty() {
        // Caches outlive `kiln dev` restarts, like its database.
        config.cache.local.dir = data_dir.join("cache");
    }
    if config.models.local.dir.as_os_str().is_empty() {
        config.models.local.dir = data_dir.join("models");
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
        config.server.public_url = format!("http://{listen}").parse()?;
    }

    // Kiln dev owns its PostgreSQL: if it dies, start it again on the same port.
    let stop_supervising = tokio_util::sync::CancellationToken::new();
    let supervisor = tokio::spawn({
        let pg = embedded.clone();
        let cancel = stop_supervising.clone();
        async move {
            if let Some(pg) = pg {
                pg.supervise(cancel).await;
            }
        }
    });
    let result = async {
        let pool = db::lazy_pool(&config.database)?;
        db::migrate(&pool).await?;
        let seed = seed(
            &crate::app::App::new(config.clone(), pool.clone()),
            &secrets.dev_user_password,
        )
        .await?;
        pool.close().await;
        let scheme = if config.server.tls.enabled() {
            "https"
        } else {
            "http"
        };
        let api_url = format!("{scheme}://{}", config.server.listen);
        println!();
        println!(
            "Kiln dev is starting at {api_url} (organization {}, project {}).",
            seed.org_id, seed.project_id
        );
        let depot = depot_cli(&config.dev.depot_cli);
        println!("Paste this to try it with the depot CLI:");
        println!();
        println!(
            "DEPOT_API_URL={api_url} DEPOT_TOKEN={} DEPOT_PROJECT_ID={} {} projects list",
            seed.token,
            seed.project_id,
            depot
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "depot".into())
        );
        println!();
        if depot.is_none() {
            println!(
                "No depot CLI was found. Get the one the tests use (npm {DEPOT_CLI_PACKAGE}@{DEPOT_CLI_VERSION}):"
            );
            println!();
            println!("    source scripts/lib/depot-cli.sh && ensure_depot_cli");
            println!();
            println!(
                "which puts it at {}, or run `bash scripts/dev.sh`, which does that for you.",
                pinned_depot_cli().display()
            );
            println!();
        }
        println!(
            "Sign-in for the `depot login` approval page: {DEV_EMAIL} / {}",
            secrets.dev_user_password
        );
        println!();
        crate::app::serve(config, crate::app::shutdown_signal()).await
    }
    .await;
    stop_supervising.cancel();
    let _ = supervisor.await;
    stop_embedded(embedded.as_deref()).await;
    result
}

/// The npm package of the pinned depot CLI the tests drive (see scripts/lib/depot-cli.sh).
pub const DEPOT_CLI_PACKAGE: &str = "@depot/cli-linux-x64";
pub const DEPOT_CLI_VERSION: &str = "0.0.1-cli.2.102.12";

/// Where `scripts/lib/depot-cli.sh` installs the pinned CLI.
fn pinned_depot_cli() -> PathBuf {
    let cache = std::env::var_os("DEPOT_CLI_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/kiln-depot-cli"));
    cache
        .join(DEPOT_CLI_VERSION)
        .join("package")
        .join("bin")
        .join("depot")
}

/// The depot CLI to name in the hint: the configured one, `depot` on PATH (`None` means
/// "just `depot`"), or the pinned copy.
fn depot_cli(configured: &Path) -> Option<PathBuf> {
    if !configured.as_os_str().is_empty() && configured.is_file() {
        return Some(configured.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("depot").is_file()));
    if on_path {
        return None;
    }
    let pinned = pinned_depot_cli();
    pinned.is_file().then_some(pinned)
}

async fn stop_embedded(pg: Option<&EmbeddedPostgres>) {
    if let Some(pg) = pg
        && let Err(err) = pg.stop().await
    {
        tracing::error!(error = %format!("{err:#}"), "could not stop the dev PostgreSQL");
    }
}

async fn create_database_if_missing(admin_url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connecting to the dev PostgreSQL")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DB_NAME)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {DB_NAME}"))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    Ok(())
}

struct Seed {
    org_id: String,
    project_id: String,
    token: String,
}

/// The dev organization, user, project and a fresh 30-day user token, made through the
/// same domain functions `kiln admin` uses. Idempotent except for the token, which is new
/// on every start (only hashes are stored).
async fn seed(app: &crate::app::App, password: &str) -> anyhow::Result<Seed> {
    let me = Principal::operator("kiln dev");
    let org = match app.orgs.find_by_name(&me, DEV_ORG).await? {
        Some(org) => org,
        None => app.orgs.create(&me, DEV_ORG, None).await?.0,
    };
    let user = match app.orgs.find_user(&me, DEV_EMAIL).await {
        Ok(user) => user,
        Err(crate::error::Error::NotFound(_)) => {
            app.orgs.create_user(&me, DEV_EMAIL, "Kiln Dev").await?
        }
        Err(err) => return Err(err.into()),
    };
    let is_owner = app
        .orgs
        .members(&me, &org.id)
        .await?
        .iter()
        .any(|m| m.user_id == user.id && m.role == Role::Owner.as_str());
    if !is_owner {
        app.orgs
            .set_member(&me, &org.id, &user.id, Role::Owner)
            .await?;
    }
    if !password.is_empty() {
        app.orgs.set_password(&me, &user.id, password).await?;
    }
    let existing = app
        .projects
        .list(&me, Some(&org.id))
        .await?
        .into_iter()
        .find(|p| p.name == DEV_PROJECT);
    let project = match existing {
        Some(p) => p,
        None => {
            let settings = ProjectSettings {
                name: Some(DEV_PROJECT.into()),
                ..Default::default()
            };
            app.projects.create(&me, Some(&org.id), settings).await?
        }
    };
    let mut new = NewToken::new(TokenKind::User, "kiln dev");
    new.user_id = Some(user.id.clone());
    new.expires_at = Some(Utc::now() + Duration::days(30));
    let (_, secret) = app.tokens.create(&me, new).await?;
    Ok(Seed {
        org_id: org.id,
        project_id: project.id,
        token: secret,
    })
}
