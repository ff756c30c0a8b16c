//! Shared application state and the `serve` process: HTTP, database supervision,
//! notifications, and background workers, with graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use tokio::sync::broadcast;

use crate::api::connect::ConnectRouter;
use crate::api::ratelimit::ClientLimiter;
use crate::auth::{Authenticator, INVALIDATION_CHANNEL};
use crate::builds::Builds;
use crate::config::Config;
use crate::db;
use crate::db::notify::Event;
pub use crate::db::notify::Notification;
use crate::jobs::JobRunner;
use crate::orgs::Orgs;
use crate::projects::Projects;
use crate::scheduler::Scheduler;
use crate::tokens::Tokens;

pub struct App {
    pub config: Config,
    pub db: PgPool,
    pub auth: Arc<Authenticator>,
    pub orgs: Orgs,
    pub projects: Projects,
    pub tokens: Tokens,
    pub builds: Builds,
    pub usage: crate::usage::Usage,
    pub scheduler: Arc<Scheduler>,
    pub cache: Arc<crate::cache::Cache>,
    /// The model registry (`/v2/`, `kiln models`).
    pub models: Arc<crate::registry::Models>,
    pub connect: ConnectRouter,
    /// Kiln's OpenID Connect issuer.
    pub oidc: Arc<crate::oidc::Issuer>,
    /// Fork pull request claims, exchanged for the issuer's tokens.
    pub claims: crate::oidc::claims::Claims,
    /// Per-client budgets of claims and of exchange polls.
    pub claim_limiter: ClientLimiter,
    pub exchange_limiter: ClientLimiter,
    /// Every LISTEN/NOTIFY notification, for in-process waiters (logins, connections).
    pub events: broadcast::Sender<Arc<Notification>>,
    pub metrics: PrometheusHandle,
    /// Failed password sign-ins, for throttling guessing.
    pub sign_ins: crate::auth::throttle::SignInThrottle,
    /// The dashboard's open live streams, bounded per session and in total.
    pub live_streams: crate::api::dashboard::live::LiveStreams,
    /// Per-client rate limits on the endpoints that need no token.
    pub limiter: ClientLimiter,
    /// Cancelled when the server starts shutting down; long-lived streams end on it.
    pub stopping: CancellationToken,
    /// Set once the database was reached and is fully migrated.
    migrated: AtomicBool,
}

pub type AppState = Arc<App>;

/// Channels every replica listens on; `App::on_notification` handles each.
pub const CHANNELS: [&str; 6] = [
    INVALIDATION_CHANNEL,
    crate::scheduler::MACHINE_CHANNEL,
    crate::scheduler::SCHEDULER_CHANNEL,
    db::jobs::NOTIFY_CHANNEL,
    crate::builds::BUILD_CHANNEL,
    crate::auth::login::LOGIN_CHANNEL,
];

impl App {
    pub fn new(config: Config, db: PgPool) -> AppState {
        let oidc = Arc::new(crate::oidc::Issuer::new(db.clone(), &config));
        let trusted = Arc::new(crate::oidc::trusted::TrustedIssuers::new(
            oidc.clone(),
            db.clone(),
            &config.oidc,
        ));
        let auth = Arc::new(Authenticator::new(db.clone(), &config.auth).accept_ci_tokens(trusted));
        let builds = Builds::new(db.clone(), auth.clone(), config.builds.clone())
            .with_key_encryption_key(config.secrets.key_encryption_key());
        let cache = Arc::new(crate::cache::Cache::new(db.clone(), &config));
        let scheduler = Arc::new(Scheduler::new(
            db.clone(),
            config.builders.clone(),
            config.secrets.key_encryption_key(),
            config.limits.refusal_audits_per_minute,
            cache.clone(),
        ));
        let (events, _) = broadcast::channel(4096);
        let live_streams = crate::api::dashboard::live::LiveStreams::new(
            config.limits.live_streams_per_session,
            config.limits.live_streams_total,
        );
        let claims = crate::oidc::claims::Claims::new(db.clone(), oidc.clone(), &config.oidc);
        let c = &config.oidc.claims;
        Arc::new(App {
            claim_limiter: ClientLimiter::with_quota(
                c.per_client_per_minute,
                c.per_client_burst,
                &config.limits,
            ),
            exchange_limiter: ClientLimiter::with_quota(
                c.per_client_per_minute.saturating_mul(4),
                c.per_client_burst.saturating_mul(4),
                &config.limits,
            ),
            claims,
            oidc,
            orgs: Orgs::new(db.clone(), auth.clone()),
            projects: Projects::new(db.clone(), auth.clone(), cache.clone())
                .with_policy_issuers(crate::auth::trust::PolicyIssuers::from_config(&config.oidc)),
            tokens: Tokens::new(
                db.clone(),
                auth.clone(),
                Duration::from_secs(config.registry.pull_token_ttl_seconds),
            ),
            usage: crate::usage::Usage::new(db.clone()),
            models: Arc::new(crate::registry::Models::new(db.clone(), &config)),
            limiter: ClientLimiter::new(&config.limits),
            config,
            db,
            auth,
            builds,
            scheduler,
            cache,
            connect: crate::api::connect::services::router(),
            events,
            metrics: crate::telemetry::metrics_handle(),
            sign_ins: Default::default(),
            live_streams,
            stopping: CancellationToken::new(),
            migrated: AtomicBool::new(false),
        })
    }

    pub fn is_migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    pub fn mark_migrated(&self) {
        self.migrated.store(true, Ordering::Release);
    }

    /// Applies one notification: cache invalidation, then fan-out to waiters.
    pub fn on_notification(&self, channel: &str, payload: &str) {
        match channel {
            INVALIDATION_CHANNEL => self.auth.apply_invalidation(payload),
            crate::builds::BUILD_CHANNEL => self.builds.forget(payload),
            crate::scheduler::SCHEDULER_CHANNEL => self.scheduler.waker().notify_waiters(),
            _ => {}
        }
        let _ = self.events.send(Arc::new(Notification {
            channel: channel.to_string(),
            payload: payload.to_string(),
        }));
    }
}

/// Reaches the database with backoff, then migrates (or waits for someone else to).
/// Logs one clear line when the database is unreachable, and one when it comes back.
pub async fn supervise_database(app: AppState, cancel: CancellationToken) {
    let target = db::describe_target(&app.config.database);
    let max_backoff = Duration::from_secs(app.config.database.reconnect_max_backoff_seconds);
    let mut backoff = Duration::from_millis(250);
    let mut reported = false;
    loop {
        let attempt = async {
            if app.config.database.migrate_on_start {
                db::migrate(&app.db).await?;
                Ok(true)
            } else {
                Ok::<bool, anyhow::Error>(db::is_migrated(&app.db).await?)
            }
        };
        match attempt.await {
            Ok(true) => {
                app.mark_migrated();
                if reported {
                    tracing::info!(database = %target, "database reachable and migrated; ready");
                } else {
                    tracing::info!(database = %target, "database migrated; ready");
                }
                return;
            }
            Ok(false) => {
                if !reported {
                    tracing::warn!(database = %target, "database is behind this binary's migrations and database.migrate_on_start is false; run `kiln migrate`");
                    reported = true;
                }
            }
            Err(err) => {
                if !reported {
                    tracing::warn!(database = %target, error = %format!("{err:#}"), "database unreachable; /readyz reports not ready, retrying with backoff up to {}s", max_backoff.as_secs());
                    reported = true;
                } else {
                    tracing::debug!(error = %format!("{err:#}"), "database still unreachable");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// Everything `kiln serve` runs, until `shutdown` resolves. Returns after in-flight
/// requests drained and background tasks stopped.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = db::lazy_pool(&config.database)?;
    let app = App::new(config, pool.clone());
    let cancel = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();

    background.spawn(supervise_database(app.clone(), cancel.clone()));

    let mut runner = JobRunner::new(pool.clone(), app.config.jobs.clone());
    crate::jobs::register_foundation_jobs(&mut runner, pool.clone(), app.config.retention.clone());
    crate::cache::register_jobs(&mut runner, app.cache.clone(), app.scheduler.clone());
    register_build_jobs(&mut runner, &app);
    crate::registry::models::register_jobs(&mut runner, app.models.clone());
    let wake_jobs = runner.waker();
    {
        let app = app.clone();
        let cancel = cancel.clone();
        background.spawn(db::notify::listen(
            pool.clone(),
            CHANNELS.to_vec(),
            cancel,
            move |event| match event {
                Event::Notification { channel, payload } => {
                    if channel == db::jobs::NOTIFY_CHANNEL {
                        wake_jobs.notify_waiters();
                    }
                    app.on_notification(&channel, &payload);
                }
                // Notifications may have been missed: drop cached state, look for jobs.
                Event::Connected => {
                    app.auth.invalidate(None);
                    wake_jobs.notify_waiters();
                }
            },
        ));
    }
    background.spawn(app.auth.clone().run_flusher(cancel.clone()));
    background.spawn(app.models.clone().run_pull_counter(cancel.clone()));
    {
        let app = app.clone();
        let cancel = cancel.clone();
        background.spawn(async move {
            tokio::join!(
                app.limiter.run_pruner(cancel.clone()),
                app.claim_limiter.run_pruner(cancel.clone()),
                app.exchange_limiter.run_pruner(cancel),
            );
        });
    }
    background.spawn(app.builds.health.clone().run(cancel.clone()));
    {
        let app = app.clone();
        let cancel = cancel.clone();
        background.spawn(async move {
            while !app.is_migrated() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            app.scheduler.clone().run(cancel).await
        });
    }
    {
        let app = app.clone();
        let cancel = cancel.clone();
        background.spawn(async move {
            // Workers start once the schema exists, so they don't spin on missing tables.
            while !app.is_migrated() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            runner.run(cancel).await
        });
    }

    let listen = app.config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("cannot listen on {listen} (server.listen); is another process using it?")
        })?;
    let tls = crate::api::server::tls_config(&app.config.server.tls)?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        tls = tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "kiln listening"
    );
    let agent_listener = match app.config.server.agent_listen {
        Some(agent_listen) => {
            let listener = tokio::net::TcpListener::bind(agent_listen).await.with_context(|| {
                format!("cannot listen on {agent_listen} (server.agent_listen); is another process using it?")
            })?;
            tracing::info!(address = %listener.local_addr()?, "machine-agent API listening");
            Some(listener)
        }
        None => None,
    };
    let agent_address = match &agent_listener {
        Some(l) => l.local_addr()?,
        None => address,
    };
    app.scheduler
        .set_agent_api_url(agent_api_url(&app.config, agent_address, tls.is_some()));

    // One shutdown signal for every listener and the long-lived streams.
    let stopping = app.stopping.clone();
    tokio::spawn({
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.cancel();
        }
    });
    let grace = Duration::from_secs(app.config.server.shutdown_grace_seconds);
    let options = crate::api::server::ServeOptions {
        grace,
        h2_max_concurrent_streams: app.config.server.http2_max_concurrent_streams,
    };
    if let Some(agent_listener) = agent_listener {
        let router = crate::api::agent::routes(app.clone());
        let stopping = stopping.clone();
        let tls = tls.clone();
        background.spawn(async move {
            if let Err(err) =
                crate::api::server::serve(agent_listener, router, tls, options, async move {
                    stopping.cancelled().await
                })
                .await
            {
                tracing::error!(error = %format!("{err:#}"), "machine-agent listener failed");
            }
        });
    }
    let claims = &app.config.oidc.claims;
    if claims.enabled && !claims.listen.is_empty() {
        let claim_tls = crate::api::server::tls_config_named(&claims.tls(), "oidc.claims.tls")?;
        let listen = claims.listen.clone();
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {listen} (oidc.claims.listen); is another process using it?"
                )
            })?;
        tracing::info!(address = %listener.local_addr()?, tls = claim_tls.is_some(), "OIDC claim listener up");
        let router = crate::api::oidc::claim_listener_router(app.clone());
        let stopping = stopping.clone();
        background.spawn(async move {
            if let Err(err) =
                crate::api::server::serve(listener, router, claim_tls, options, async move {
                    stopping.cancelled().await
                })
                .await
            {
                tracing::error!(error = %format!("{err:#}"), "OIDC claim listener failed");
            }
        });
    }
    let router = crate::api::router(app.clone());
    let result = crate::api::server::serve(listener, router, tls, options, async move {
        stopping.cancelled().await
    })
    .await;

    cancel.cancel();
    let drain = async { while background.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!("background tasks did not stop within the grace period");
    }
    pool.close().await;
    tracing::info!("kiln stopped");
    result
}

/// The URL agents reach this server at: `builders.agent_api_url`, else for the local
/// provider the address served on, else `server.public_url`.
fn agent_api_url(config: &Config, address: std::net::SocketAddr, tls: bool) -> String {
    if !config.builders.agent_api_url.is_empty() {
        return config.builders.agent_api_url.clone();
    }
    if config.builders.provider == crate::config::ProviderKind::Local {
        let host = if address.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            address.ip()
        };
        let scheme = if tls { "https" } else { "http" };
        return format!(
            "{scheme}://{}",
            std::net::SocketAddr::new(host, address.port())
        );
    }
    config
        .server
        .public_url
        .as_str()
        .trim_end_matches('/')
        .to_string()
}

fn register_build_jobs(runner: &mut JobRunner, app: &AppState) {
    crate::scheduler::register_jobs(runner, app.scheduler.clone());
    runner
        .register_with(crate::builds::REAP_JOB, app.clone(), |app, _| async move {
            app.builds.reap_stale().await?;
            Ok(())
        })
        .every(crate::builds::REAP_JOB, Duration::from_secs(30));
    if app.config.secrets.key_encryption_key().is_some() {
        runner
            .register_with(
                crate::oidc::ROTATE_JOB,
                app.oidc.clone(),
                |oidc, _| async move {
                    oidc.rotate().await?;
                    Ok(())
                },
            )
            .every(crate::oidc::ROTATE_JOB, Duration::from_secs(3600));
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received; draining in-flight requests");
}
