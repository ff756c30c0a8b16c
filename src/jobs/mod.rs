//! Background work on the Postgres job queue: workers claim jobs, run the handler
//! registered for the job's kind, and retry failures with exponential backoff and jitter.
//! Handlers must be idempotent: a job may run again after a crash or a lapsed lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::JobsConfig;
use crate::db::jobs::{self, ClaimedJob, DEFAULT_QUEUE, FailOutcome, NewJob};

pub type Handler = Arc<dyn Fn(ClaimedJob) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;
/// Runs once when a job of its kind fails for the last time (error, timeout or a lost
/// worker), with the last error, so the job's subject is not left half-done.
pub type GiveUpHandler =
    Arc<dyn Fn(ClaimedJob, String) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A job kind that the runner enqueues by itself every `every`.
#[derive(Clone)]
pub struct Periodic {
    pub kind: &'static str,
    pub every: Duration,
}

pub struct JobRunner {
    pool: PgPool,
    config: JobsConfig,
    handlers: HashMap<&'static str, Handler>,
    give_up: HashMap<&'static str, GiveUpHandler>,
    /// Kinds that may run longer than the lease, up to this long: their worker renews
    /// the lease while they run, so a dead worker's job is still retried within a lease.
    long_running: HashMap<&'static str, Duration>,
    periodic: Vec<Periodic>,
    wake: Arc<Notify>,
    /// Workers waiting for work (on NOTIFY or the poll).
    idle: Arc<std::sync::atomic::AtomicUsize>,
    worker_prefix: String,
}

impl JobRunner {
    pub fn new(pool: PgPool, config: JobsConfig) -> Self {
        JobRunner {
            pool,
            config,
            handlers: HashMap::new(),
            give_up: HashMap::new(),
            long_running: HashMap::new(),
            periodic: Vec::new(),
            wake: Arc::new(Notify::new()),
            idle: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            worker_prefix: format!("{}-{}", hostname(), std::process::id()),
        }
    }

    pub fn register<F, Fut>(&mut self, kind: &'static str, handler: F) -> &mut Self
    where
        F: Fn(ClaimedJob) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.handlers
            .insert(kind, Arc::new(move |job| Box::pin(handler(job))));
        self
    }

    /// Lets jobs of `kind` run for up to `limit` (longer than the lease), renewing
    /// their lease while they run.
    pub fn long_running(&mut self, kind: &'static str, limit: Duration) -> &mut Self {
        self.long_running.insert(kind, limit);
        self
    }

    /// Like [`JobRunner::register`], handing the handler a clone of shared `state`.
    pub fn register_with<S, F, Fut>(
        &mut self,
        kind: &'static str,
        state: Arc<S>,
        handler: F,
    ) -> &mut Self
    where
        S: Send + Sync + 'static,
        F: Fn(Arc<S>, ClaimedJob) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.register(kind, move |job| handler(state.clone(), job))
    }

    /// Registers what to do when a job of `kind` gives up. The hook runs outside the
    /// attempt's timeout (with one of its own), so a hung attempt still gets cleaned up;
    /// it must be idempotent.
    pub fn on_give_up<S, F, Fut>(&mut self, kind: &'static str, state: Arc<S>, hook: F) -> &mut Self
    where
        S: Send + Sync + 'static,
        F: Fn(Arc<S>, ClaimedJob, String) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.give_up.insert(
            kind,
            Arc::new(move |job, error| Box::pin(hook(state.clone(), job, error))),
        );
        self
    }

    pub fn every(&mut self, kind: &'static str, every: Duration) -> &mut Self {
        self.periodic.push(Periodic { kind, every });
        self
    }

    /// Wakes idle workers; called when a `kiln_jobs` notification arrives.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// How many workers are waiting for work right now.
    pub fn idle_workers(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.idle.clone()
    }

    /// Retry delay after `attempts` failures: base·2^(n-1), capped, ±25% jitter so that
    /// failures that happened together don't retry together.
    pub fn backoff(config: &JobsConfig, attempts: i32) -> Duration {
        let exp = attempts.saturating_sub(1).clamp(0, 30) as u32;
        let secs = config
            .backoff_base_seconds
            .saturating_mul(1u64 << exp)
            .min(config.backoff_max_seconds) as f64;
        let jitter = rand::rng().random_range(0.75..=1.25);
        Duration::from_secs_f64(secs * jitter)
    }

    /// Runs the workers and the periodic scheduler until `cancel` fires. In-flight jobs
    /// finish (bounded by their lease) before this returns.
    pub async fn run(self, cancel: CancellationToken) {
        let runner = Arc::new(self);
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..runner.config.workers {
            let runner = runner.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move { runner.worker_loop(n, cancel).await });
        }
        if !runner.periodic.is_empty() {
            let runner = runner.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move { runner.schedule_loop(cancel).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn worker_loop(&self, n: usize, cancel: CancellationToken) {
        let worker = format!("{}-w{n}", self.worker_prefix);
        let lease = Duration::from_secs(self.config.lease_seconds);
        let poll = Duration::from_secs(self.config.poll_interval_seconds);
        let mut error_backoff = Duration::from_millis(500);
        while !cancel.is_cancelled() {
            // Register interest before claiming so a notification between an empty
            // claim and the wait is not lost.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match jobs::claim(&self.pool, DEFAULT_QUEUE, &worker, lease, 1).await {
                Ok(claimed) if !claimed.is_empty() => {
                    error_backoff = Duration::from_millis(500);
                    for job in claimed {
                        self.execute(&worker, job, lease).await;
                    }
                    continue;
                }
                Ok(_) => {
                    self.idle.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(poll) => {}
                        _ = cancel.cancelled() => {}
                    }
                    self.idle.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "job claim failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(error_backoff) => {}
                        _ = cancel.cancelled() => {}
                    }
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn execute(&self, worker: &str, job: ClaimedJob, lease: Duration) {
        let span =
            tracing::info_span!("job", id = job.id, kind = %job.kind, attempt = job.attempts);
        self.execute_in_span(worker, job, lease)
            .instrument(span)
            .await
    }

    async fn execute_in_span(&self, worker: &str, job: ClaimedJob, lease: Duration) {
        let id = job.id;
        let kind = job.kind.clone();
        let attempts = job.attempts;
        let last_attempt = job.attempts >= job.max_attempts;
        let subject = last_attempt.then(|| job.clone());
        let started = std::time::Instant::now();
        // Finish well inside the lease so no other worker picks the job up meanwhile,
        // unless the kind renews its lease while it runs.
        let long = self.long_running.get(kind.as_str()).copied();
        let limit = long.unwrap_or(lease.mul_f64(0.9));
        let renewing = long.map(|_| {
            let pool = self.pool.clone();
            let worker = worker.to_string();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match jobs::renew_lease(&pool, id, &worker, lease).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(err) => tracing::warn!(error = %err, "could not renew a job's lease"),
                    }
                }
            })
        });
        let result = match self.handlers.get(kind.as_str()) {
            Some(handler) => match tokio::time::timeout(limit, handler(job)).await {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("timed out after {limit:?}")),
            },
            None => Err(anyhow::anyhow!(
                "no handler is registered for job kind {kind:?}"
            )),
        };
        if let Some(renewing) = renewing {
            renewing.abort();
        }
        let elapsed = started.elapsed();
        metrics::histogram!("kiln_job_duration_seconds", "kind" => kind.clone())
            .record(elapsed.as_secs_f64());
        match result {
            Ok(()) => {
                metrics::counter!("kiln_jobs_total", "kind" => kind.clone(), "outcome" => "ok")
                    .increment(1);
                if let Err(err) = jobs::complete(&self.pool, id, worker).await {
                    // The lease will lapse and the job run again; handlers are idempotent.
                    tracing::warn!(error = %err, "could not mark job done; it will run again");
                }
            }
            Err(err) => {
                let retry_in = Self::backoff(&self.config, attempts);
                let message = format!("{err:#}");
                if let (Some(job), Some(hook)) = (subject, self.give_up.get(kind.as_str())) {
                    // Before the job is marked failed: if this worker dies here, the job
                    // is claimed again and the hook runs again.
                    match tokio::time::timeout(lease.mul_f64(0.9), hook(job, message.clone())).await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(hook_err)) => {
                            tracing::error!(error = %format!("{hook_err:#}"), "cleanup after a job gave up failed");
                        }
                        Err(_) => tracing::error!("cleanup after a job gave up timed out"),
                    }
                }
                let outcome = jobs::fail(&self.pool, id, worker, &message, retry_in).await;
                let label = match outcome {
                    Ok(FailOutcome::GaveUp) => {
                        tracing::error!(error = %message, "job failed for the last time");
                        "gave_up"
                    }
                    Ok(_) => {
                        tracing::warn!(error = %message, retry_in = ?retry_in, "job failed; will retry");
                        "retry"
                    }
                    Err(db_err) => {
                        tracing::warn!(error = %message, db_error = %db_err, "job failed and could not be rescheduled; its lease will lapse");
                        "retry"
                    }
                };
                metrics::counter!("kiln_jobs_total", "kind" => kind, "outcome" => label)
                    .increment(1);
            }
        }
    }

    async fn schedule_loop(&self, cancel: CancellationToken) {
        let tick = self
            .periodic
            .iter()
            .map(|p| p.every)
            .min()
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = cancel.cancelled() => return,
            }
            for periodic in &self.periodic {
                match jobs::claim_schedule(&self.pool, periodic.kind, periodic.every).await {
                    Ok(true) => {
                        let job =
                            NewJob::new(periodic.kind, serde_json::json!({})).dedupe("periodic");
                        if let Err(err) = jobs::enqueue(&self.pool, job).await {
                            tracing::warn!(kind = periodic.kind, error = %err, "could not enqueue periodic job");
                        }
                    }
                    Ok(false) => {}
                    Err(err) => {
                        tracing::debug!(kind = periodic.kind, error = %err, "schedule check failed")
                    }
                }
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kiln".to_string())
}

/// Queued, running and failed jobs (operators, `kiln admin jobs list`).
pub async fn list(
    pool: &PgPool,
    principal: &crate::auth::Principal,
    state: Option<&str>,
) -> crate::error::Result<Vec<jobs::JobInfo>> {
    crate::auth::authorize(
        principal,
        crate::auth::Action::Operate,
        crate::auth::Target::Instance,
    )?;
    jobs::list(pool, state).await
}

/// Job kind of the periodic housekeeping pass.
pub const MAINTENANCE_JOB: &str = "maintenance.purge";

/// Audit actions recorded for calls refused before authentication: unauthenticated
/// callers can cause them, so they are kept only `retention.refusal_audit_days`.
pub const REFUSAL_AUDIT_ACTIONS: [&str; 3] = [
    "machine.registration_refused",
    "machine.malformed_request",
    "machine.impersonation_refused",
];

/// Registers the foundation's housekeeping, every 10 minutes: long-dead tokens, failed
/// jobs kept for inspection, closed `depot login` requests and old refusal audits.
pub fn register_foundation_jobs(
    runner: &mut JobRunner,
    pool: PgPool,
    retention: crate::config::RetentionConfig,
) {
    runner
        .register(MAINTENANCE_JOB, move |_job| {
            let pool = pool.clone();
            let retention = retention.clone();
            async move {
                let tokens =
                    crate::db::tokens::purge_dead(&pool, retention.dead_tokens_days).await?;
                let failed = jobs::purge_failed(&pool, retention.failed_jobs_days).await?;
                let logins =
                    crate::auth::login::purge_closed(&pool, retention.login_requests_hours).await?;
                let refusals = crate::db::audit::purge_actions(
                    &pool,
                    &REFUSAL_AUDIT_ACTIONS,
                    retention.refusal_audit_days,
                )
                .await?;
                // Claims are kept a day past expiry, for inspection of abuse.
                let claims = crate::db::oidc_claims::purge(&pool, 24).await?;
                for (table, n) in [
                    ("oidc_claims", claims),
                    ("tokens", tokens),
                    ("jobs", failed),
                    ("login_requests", logins),
                    ("audit_events", refusals),
                ] {
                    metrics::counter!("kiln_retention_deleted_total", "table" => table)
                        .increment(n);
                }
                tracing::info!(
                    tokens,
                    failed_jobs = failed,
                    login_requests = logins,
                    refusal_audits = refusals,
                    oidc_claims = claims,
                    "maintenance purge done"
                );
                Ok(())
            }
        })
        .every(MAINTENANCE_JOB, Duration::from_secs(600));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let config = JobsConfig {
            workers: 1,
            poll_interval_seconds: 1,
            lease_seconds: 60,
            backoff_base_seconds: 2,
            backoff_max_seconds: 60,
            max_attempts: 5,
        };
        let first = JobRunner::backoff(&config, 1).as_secs_f64();
        assert!((1.5..=2.5).contains(&first), "{first}");
        let fourth = JobRunner::backoff(&config, 4).as_secs_f64();
        assert!((12.0..=20.0).contains(&fourth), "{fourth}");
        let huge = JobRunner::backoff(&config, 1000).as_secs_f64();
        assert!(huge <= 75.0, "{huge}");
    }
}
