//! `kiln dev`: the whole service on one machine with no setup.

pub mod postgres;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use chrono::{Duration, Utc};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::auth::{Role, TokenKind};
use crate::config::Config;
use crate::db::projects::ProjectSettings;
use crate::db::tokens::NewToken;
use crate::db::{self, orgs, projects, tokens};
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

    let mut embedded = None;
    if !config.database.is_configured() {
        let bin_dir = postgres::find_bin_dir(&config.dev.postgres_bin_dir)?;
        let dir = cluster_dir(&data_dir).await;
        let mut pg =
            EmbeddedPostgres::init(bin_dir, &dir, DB_USER, &secrets.postgres_password).await?;
        pg.start().await?;
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
            stop_embedded(embedded.as_ref()).await;
            return Err(err);
        }
        config.database.url = SecretString::from(url);
    }
    if config.secrets.key_encryption_key.expose_secret().is_empty() {
        config.secrets.key_encryption_key = SecretString::from(secrets.key_encryption_key.clone());
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
        config.server.public_url = format!("http://{listen}").parse()?;
    }

    let result = async {
        let pool = db::lazy_pool(&config.database)?;
        db::migrate(&pool).await?;
        let seed = seed(&pool, &secrets.dev_user_password).await?;
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
        println!("Paste this to try it with the depot CLI:");
        println!();
        println!(
            "DEPOT_API_URL={api_url} DEPOT_TOKEN={} DEPOT_PROJECT_ID={} depot projects list",
            seed.token, seed.project_id
        );
        println!();
        println!(
            "Sign-in for the `depot login` approval page: {DEV_EMAIL} / {}",
            secrets.dev_user_password
        );
        println!();
        crate::app::serve(config, crate::app::shutdown_signal()).await
    }
    .await;
    stop_embedded(embedded.as_ref()).await;
    result
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

/// The dev organization, user, project and a fresh 30-day user token. Idempotent
/// except for the token, which is new on every start (only hashes are stored).
async fn seed(pool: &PgPool, password: &str) -> anyhow::Result<Seed> {
    let org = match orgs::find_organization_by_name(pool, DEV_ORG).await? {
        Some(org) => org,
        None => orgs::create_organization(pool, DEV_ORG).await?,
    };
    let user = match orgs::find_user_by_email(pool, DEV_EMAIL).await? {
        Some(user) => user,
        None => orgs::create_user(pool, DEV_EMAIL, "Kiln Dev").await?,
    };
    orgs::set_membership(pool, &org.id, &user.id, Role::Owner).await?;
    if !password.is_empty() {
        crate::auth::login::set_password(pool, &user.id, password).await?;
    }
    let project = match projects::find_by_name(pool, &org.id, DEV_PROJECT).await? {
        Some(p) => p,
        None => {
            let settings = ProjectSettings {
                name: Some(DEV_PROJECT.into()),
                ..Default::default()
            };
            projects::create(pool, &org.id, settings).await?
        }
    };
    let mut new = NewToken::new(TokenKind::User, "kiln dev");
    new.user_id = Some(user.id.clone());
    new.expires_at = Some(Utc::now() + Duration::days(30));
    let (_, minted) = tokens::create(pool, new).await?;
    Ok(Seed {
        org_id: org.id,
        project_id: project.id,
        token: minted.secret,
    })
}
