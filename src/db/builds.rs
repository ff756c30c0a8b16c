//! Build rows: the build, its per-platform builder requests, steps and Dockerfiles.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Amd64,
    Arm64,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Amd64 => "amd64",
            Platform::Arm64 => "arm64",
        }
    }

    pub fn parse(s: &str) -> Option<Platform> {
        match s {
            "amd64" => Some(Platform::Amd64),
            "arm64" => Some(Platform::Arm64),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Build {
    pub id: String,
    pub project_id: String,
    pub organization_id: String,
    pub state: String,
    pub command: String,
    pub options: serde_json::Value,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancels_at: DateTime<Utc>,
    pub last_health_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

impl Build {
    pub fn is_finished(&self) -> bool {
        !matches!(self.state.as_str(), "queued" | "running")
    }
}

const COLUMNS: &str =
    "id, project_id, organization_id, state, command, options, created_by, created_at,
    started_at, finished_at, cancels_at, last_health_at, error";

pub struct NewBuild<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub organization_id: &'a str,
    pub command: &'a str,
    pub options: serde_json::Value,
    pub created_by: Option<&'a str>,
    pub timeout_minutes: i32,
    /// Build on an ephemeral builder with a cache volume of its own, never the
    /// project's (untrusted builds such as fork pull requests).
    pub ephemeral_cache: bool,
}

pub async fn insert<'e>(db: impl PgExecutor<'e>, new: NewBuild<'_>) -> Result<Build> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO builds (id, project_id, organization_id, command, options, created_by, cancels_at,
                             ephemeral_cache)
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(mins => $7), $8)
         RETURNING {COLUMNS}"
    ))
    .bind(new.id)
    .bind(new.project_id)
    .bind(new.organization_id)
    .bind(new.command)
    .bind(new.options)
    .bind(new.created_by)
    .bind(new.timeout_minutes)
    .bind(new.ephemeral_cache)
    .fetch_one(db)
    .await?)
}

pub async fn get<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<Build>> {
    Ok(
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM builds WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

/// Creates the platform's builder request if it does not exist yet (idempotent: the CLI
/// asks for a connection repeatedly). Returns true when this call created it.
pub async fn request_platform<'e>(
    db: impl PgExecutor<'e>,
    build_id: &str,
    platform: Platform,
) -> Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO build_platforms (build_id, platform) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(build_id)
    .bind(platform.as_str())
    .execute(db)
    .await?
    .rows_affected()
        > 0)
}

/// The endpoint and server name of the builder serving a ready platform.
pub async fn ready_endpoint(
    pool: &PgPool,
    build_id: &str,
    platform: Platform,
) -> Result<Option<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT m.endpoint, m.server_name FROM build_platforms bp JOIN machines m ON m.id = bp.builder_id
         WHERE bp.build_id = $1 AND bp.platform = $2 AND bp.state = 'ready'
           AND m.endpoint IS NOT NULL AND m.server_name IS NOT NULL",
    )
    .bind(build_id)
    .bind(platform.as_str())
    .fetch_optional(pool)
    .await?)
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct BuildPlatform {
    pub build_id: String,
    pub platform: String,
    pub state: String,
    pub builder_id: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub ready_at: Option<DateTime<Utc>>,
    pub released_at: Option<DateTime<Utc>>,
}

pub async fn platforms(pool: &PgPool, build_id: &str) -> Result<Vec<BuildPlatform>> {
    Ok(sqlx::query_as(
        "SELECT build_id, platform, state, builder_id, requested_at, assigned_at, ready_at, released_at
         FROM build_platforms WHERE build_id = $1 ORDER BY platform",
    )
    .bind(build_id)
    .fetch_all(pool)
    .await?)
}

/// The outcome the CLI reports with FinishBuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failed(String),
    Canceled,
    TimedOut,
}

impl Outcome {
    pub fn state(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed(_) => "failed",
            Outcome::Canceled => "canceled",
            Outcome::TimedOut => "timed_out",
        }
    }
}

/// Finishes a live build and releases its platforms, in one transaction. Returns false
/// if the build had already finished (FinishBuild is retried, reapers race): the first
/// outcome wins.
pub async fn finish(pool: &PgPool, id: &str, outcome: &Outcome) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let error = match outcome {
        Outcome::Failed(e) => Some(e.chars().take(10_000).collect::<String>()),
        Outcome::TimedOut => Some("the build exceeded its project's build timeout".to_string()),
        _ => None,
    };
    let finished = sqlx::query(
        "UPDATE builds SET state = $2, finished_at = now(), error = $3
         WHERE id = $1 AND state IN ('queued', 'running')",
    )
    .bind(id)
    .bind(outcome.state())
    .bind(error)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    if finished {
        // Release the platforms and give their builders back: a builder with no builds
        // left goes from assigned to ready (idle), an ephemeral one to draining (it served
        // this build only). Builds waiting for a builder at its autoscaling cap wake.
        sqlx::query(
            "WITH released AS (
                 UPDATE build_platforms SET state = 'released', released_at = now()
                 WHERE build_id = $1 AND state IN ('pending', 'assigned', 'ready')
                 RETURNING builder_id),
             counts AS (SELECT builder_id, count(*)::int AS n FROM released WHERE builder_id IS NOT NULL GROUP BY builder_id)
             UPDATE machines m SET
                 active_builds = GREATEST(m.active_builds - counts.n, 0),
                 last_released_at = now(),
                 state = CASE WHEN m.role = 'ephemeral' AND m.state IN ('requested', 'launching', 'booting', 'ready', 'assigned')
                                   AND m.active_builds - counts.n <= 0 THEN 'draining'
                              WHEN m.state = 'assigned' AND m.active_builds - counts.n <= 0 THEN 'ready'
                              ELSE m.state END
             FROM counts WHERE m.id = counts.builder_id",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "SELECT pg_notify('kiln_scheduler', '')
             WHERE EXISTS (SELECT 1 FROM build_platforms WHERE state = 'pending')",
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(finished)
}

/// Sets a build's cancel deadline to now, so the CLI's next health report cancels it.
pub async fn request_cancel<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE builds SET cancels_at = LEAST(cancels_at, now()) WHERE id = $1 AND state IN ('queued', 'running')",
    )
    .bind(id)
    .execute(db)
    .await?
    .rows_affected()
        > 0)
}

/// Records coalesced health reports: one statement for many builds.
pub async fn record_health(pool: &PgPool, builds: &[String]) -> Result<()> {
    sqlx::query("UPDATE builds SET last_health_at = now() WHERE id = ANY($1) AND state IN ('queued', 'running')")
        .bind(builds)
        .execute(pool)
        .await?;
    Ok(())
}

/// Live builds whose health went quiet before `stale_before`, or whose cancel deadline
/// passed long ago; the reaper finishes them.
pub async fn stale(
    pool: &PgPool,
    stale_before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(String, bool)>> {
    Ok(sqlx::query_as(
        "SELECT id, cancels_at < $1 AS timed_out FROM builds
         WHERE state IN ('queued', 'running')
           AND (COALESCE(last_health_at, created_at) < $1 OR cancels_at < $1)
         ORDER BY created_at LIMIT $2",
    )
    .bind(stale_before)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A page of a project's builds, newest first, after the (created_at, id) cursor.
pub async fn list(
    pool: &PgPool,
    project_id: &str,
    after: Option<(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<Build>> {
    let (at, id) = match after {
        Some((at, id)) => (Some(at), Some(id)),
        None => (None, None),
    };
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM builds
         WHERE project_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
         ORDER BY created_at DESC, id DESC LIMIT $4"
    ))
    .bind(project_id)
    .bind(at)
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Step {
    pub digest: String,
    pub name: String,
    pub cached: bool,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// Upserts steps; later reports fill in completion and errors of earlier ones.
pub async fn upsert_steps(pool: &PgPool, build_id: &str, steps: &[Step]) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let digests: Vec<&str> = steps.iter().map(|s| s.digest.as_str()).collect();
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    let cached: Vec<bool> = steps.iter().map(|s| s.cached).collect();
    let started: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.started_at).collect();
    let completed: Vec<Option<DateTime<Utc>>> = steps.iter().map(|s| s.completed_at).collect();
    let errors: Vec<Option<&str>> = steps.iter().map(|s| s.error.as_deref()).collect();
    sqlx::query(
        "INSERT INTO build_steps (build_id, digest, name, cached, started_at, completed_at, error)
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bool[], $5::timestamptz[], $6::timestamptz[], $7::text[])
         ON CONFLICT (build_id, digest) DO UPDATE SET
             name = CASE WHEN EXCLUDED.name <> '' THEN EXCLUDED.name ELSE build_steps.name END,
             cached = build_steps.cached OR EXCLUDED.cached,
             started_at = COALESCE(build_steps.started_at, EXCLUDED.started_at),
             completed_at = COALESCE(EXCLUDED.completed_at, build_steps.completed_at),
             error = COALESCE(EXCLUDED.error, build_steps.error)",
    )
    .bind(build_id)
    .bind(digests)
    .bind(names)
    .bind(cached)
    .bind(started)
    .bind(completed)
    .bind(errors)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn steps(pool: &PgPool, build_id: &str) -> Result<Vec<Step>> {
    Ok(sqlx::query_as(
        "SELECT digest, name, cached, started_at, completed_at, error FROM build_steps
         WHERE build_id = $1 ORDER BY started_at NULLS LAST, name",
    )
    .bind(build_id)
    .fetch_all(pool)
    .await?)
}

pub async fn upsert_dockerfiles(
    pool: &PgPool,
    build_id: &str,
    files: &[(String, String, String)],
) -> Result<()> {
    for (target, filename, contents) in files {
        sqlx::query(
            "INSERT INTO build_dockerfiles (build_id, target, filename, contents) VALUES ($1, $2, $3, $4)
             ON CONFLICT (build_id, target, filename) DO UPDATE SET contents = EXCLUDED.contents",
        )
        .bind(build_id)
        .bind(target)
        .bind(filename)
        .bind(contents)
        .execute(pool)
        .await?;
    }
    Ok(())
}
