//! The Postgres job queue: enqueue, claim (`FOR UPDATE SKIP LOCKED` under a lease),
//! complete, and fail with backoff. The runner lives in `crate::jobs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

pub const NOTIFY_CHANNEL: &str = "kiln_jobs";
pub const DEFAULT_QUEUE: &str = "default";

#[derive(Debug, Clone)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub payload: serde_json::Value,
    /// At most one pending or running job per (kind, dedupe_key).
    pub dedupe_key: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: Option<i32>,
}

impl NewJob {
    pub fn new(kind: &str, payload: serde_json::Value) -> Self {
        NewJob {
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.to_string(),
            payload,
            dedupe_key: None,
            run_at: None,
            max_attempts: None,
        }
    }

    pub fn dedupe(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }

    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = queue.to_string();
        self
    }

    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}

/// Enqueues a job; returns `None` when an identical (kind, dedupe_key) job is already
/// pending or running. Inside a transaction the job appears (and workers wake) on commit.
pub async fn enqueue<'e>(db: impl PgExecutor<'e>, job: NewJob) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO jobs (queue, kind, payload, dedupe_key, run_at, max_attempts)
         VALUES ($1, $2, $3, $4, COALESCE($5, now()), COALESCE($6, 20))
         ON CONFLICT (kind, dedupe_key) WHERE dedupe_key IS NOT NULL AND state IN ('pending', 'running')
         DO NOTHING
         RETURNING id",
    )
    .bind(&job.queue)
    .bind(&job.kind)
    .bind(&job.payload)
    .bind(&job.dedupe_key)
    .bind(job.run_at)
    .bind(job.max_attempts)
    .fetch_optional(db)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub id: i64,
    pub kind: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub max_attempts: i32,
}

/// Extends the lease of a job `worker` still holds; false when it no longer does.
pub async fn renew_lease(pool: &PgPool, id: i64, worker: &str, lease: Duration) -> Result<bool> {
    let renewed = sqlx::query(
        "UPDATE jobs SET locked_until = now() + make_interval(secs => $3), updated_at = now()
         WHERE id = $1 AND locked_by = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// Claims up to `limit` due jobs for `worker`. Jobs whose lease lapsed (their worker
/// died) are due again. Concurrent claimers never get the same job.
pub async fn claim(
    pool: &PgPool,
    queue: &str,
    worker: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<ClaimedJob>> {
    Ok(sqlx::query_as(
        "UPDATE jobs SET state = 'running', attempts = attempts + 1, locked_by = $2,
                locked_until = now() + make_interval(secs => $3), updated_at = now()
         WHERE id IN (
             SELECT id FROM jobs
             WHERE queue = $1
               AND ((state = 'pending' AND run_at <= now())
                    OR (state = 'running' AND locked_until < now()))
             ORDER BY run_at, id
             LIMIT $4
             FOR UPDATE SKIP LOCKED)
         RETURNING id, kind, payload, attempts, max_attempts",
    )
    .bind(queue)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Deletes a finished job, if `worker` still holds it.
pub async fn complete(pool: &PgPool, id: i64, worker: &str) -> Result<bool> {
    Ok(
        sqlx::query("DELETE FROM jobs WHERE id = $1 AND locked_by = $2 AND state = 'running'")
            .bind(id)
            .bind(worker)
            .execute(pool)
            .await?
            .rows_affected()
            > 0,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    WillRetry,
    GaveUp,
    LostLease,
}

/// Records a failure: the job is retried after `retry_in`, or marked failed once it
/// has used all its attempts.
pub async fn fail(
    pool: &PgPool,
    id: i64,
    worker: &str,
    error: &str,
    retry_in: Duration,
) -> Result<FailOutcome> {
    let error: String = error.chars().take(4000).collect();
    let state: Option<String> = sqlx::query_scalar(
        "UPDATE jobs SET
             state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
             run_at = now() + make_interval(secs => $4),
             locked_by = NULL, locked_until = NULL, last_error = $3, updated_at = now()
         WHERE id = $1 AND locked_by = $2 AND state = 'running'
         RETURNING state",
    )
    .bind(id)
    .bind(worker)
    .bind(&error)
    .bind(retry_in.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(match state.as_deref() {
        Some("failed") => FailOutcome::GaveUp,
        Some(_) => FailOutcome::WillRetry,
        None => FailOutcome::LostLease,
    })
}

/// Claims the next period of a periodic job: true for exactly one caller per period.
pub async fn claim_schedule(pool: &PgPool, kind: &str, every: Duration) -> Result<bool> {
    sqlx::query("INSERT INTO job_schedules (kind) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(kind)
        .execute(pool)
        .await?;
    let won = sqlx::query(
        "UPDATE job_schedules SET next_run_at = now() + make_interval(secs => $2)
         WHERE kind = $1 AND next_run_at <= now()",
    )
    .bind(kind)
    .bind(every.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected()
        > 0;
    Ok(won)
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobInfo {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

pub async fn list(pool: &PgPool, state: Option<&str>) -> Result<Vec<JobInfo>> {
    Ok(sqlx::query_as(
        "SELECT id, queue, kind, state, attempts, max_attempts, run_at, last_error FROM jobs
         WHERE ($1::text IS NULL OR state = $1) ORDER BY run_at, id LIMIT 1000",
    )
    .bind(state)
    .fetch_all(pool)
    .await?)
}

pub async fn purge_failed(pool: &PgPool, older_than_days: i32) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM jobs WHERE state = 'failed' AND updated_at < now() - make_interval(days => $1)")
        .bind(older_than_days)
        .execute(pool)
        .await?
        .rows_affected())
}
