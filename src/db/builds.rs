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

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Build {
    pub id: String,
    pub project_id: String,
    pub organization_id: String,
    pub state: String,
    pub command: String,
    /// The targets' options as the client sent them.
    #[schema(value_type = Vec<Object>)]
    pub options: serde_json::Value,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancels_at: DateTime<Utc>,
    pub last_health_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub shared: bool,
    pub share_generation: i32,
    pub total_steps: Option<i32>,
    pub cached_steps: Option<i32>,
    pub saved_seconds: Option<i32>,
}

impl Build {
    pub fn is_finished(&self) -> bool {
        !matches!(self.state.as_str(), "queued" | "running")
    }
}

const COLUMNS: &str =
    "id, project_id, organization_id, state, command, options, created_by, created_at,
    started_at, finished_at, cancels_at, last_health_at, error, shared, share_generation,
    total_steps, cached_steps, saved_seconds";

pub struct NewBuild<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub organization_id: &'a str,
    pub command: &'a str,
    pub options: serde_json::Value,
    pub created_by: Option<&'a str>,
    /// The CI identity that started it (`CiGrant::history_key`), if a CI job did.
    pub ci_identity: Option<&'a str>,
    pub timeout_minutes: i32,
    /// Build on an ephemeral builder with a cache volume of its own, never the
    /// project's (untrusted builds such as fork pull requests).
    pub ephemeral_cache: bool,
}

pub async fn insert<'e>(db: impl PgExecutor<'e>, new: NewBuild<'_>) -> Result<Build> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO builds (id, project_id, organization_id, command, options, created_by, cancels_at,
                             ephemeral_cache, ci_identity)
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(mins => $7), $8, $9)
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
    .bind(new.ci_identity)
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
/// asks for a connection repeatedly), or files it again if its builder was released
/// (`ReleaseEndpoint`) while the build is still live. Returns true when this call filed it.
pub async fn request_platform<'e>(
    db: impl PgExecutor<'e>,
    build_id: &str,
    platform: Platform,
) -> Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO build_platforms (build_id, platform) VALUES ($1, $2)
         ON CONFLICT (build_id, platform) DO UPDATE SET
             state = 'pending', builder_id = NULL, requested_at = now(),
             assigned_at = NULL, ready_at = NULL, released_at = NULL
         WHERE build_platforms.state = 'released'
           AND EXISTS (SELECT 1 FROM builds WHERE id = $1 AND state IN ('queued', 'running'))",
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

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
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

/// The platforms each of `build_ids` asked for: (build id, platform), in platform order.
pub async fn platforms_of(pool: &PgPool, build_ids: &[String]) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT build_id, platform FROM build_platforms WHERE build_id = ANY($1)
         ORDER BY build_id, platform",
    )
    .bind(build_ids)
    .fetch_all(pool)
    .await?)
}

/// Who the tokens `ids` stand for: (token id, token name, kind, the user's email).
pub async fn starters(
    pool: &PgPool,
    ids: &[String],
) -> Result<Vec<(String, String, String, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT t.id, t.name, t.kind, u.email FROM tokens t LEFT JOIN users u ON u.id = t.user_id
         WHERE t.id = ANY($1)",
    )
    .bind(ids)
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
        release_platforms(&mut tx, id, None).await?;
        sqlx::query(
            "SELECT pg_notify('kiln_scheduler', '')
             WHERE EXISTS (SELECT 1 FROM build_platforms WHERE state = 'pending')",
        )
        .execute(&mut *tx)
        .await?;
        record_statistics(&mut tx, id).await?;
    }
    tx.commit().await?;
    Ok(finished)
}

/// Releases a build's platforms (all, or one) and gives their builders back: a builder
/// with no builds left goes from assigned to ready (idle), an ephemeral one to draining
/// (it served this build only). Returns how many platforms were released.
async fn release_platforms(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    build_id: &str,
    platform: Option<Platform>,
) -> Result<u64> {
    let released = sqlx::query(
        "WITH released AS (
             UPDATE build_platforms SET state = 'released', released_at = now()
             WHERE build_id = $1 AND ($2::text IS NULL OR platform = $2)
               AND state IN ('pending', 'assigned', 'ready')
             RETURNING builder_id),
         counts AS (SELECT builder_id, count(*)::int AS n FROM released WHERE builder_id IS NOT NULL GROUP BY builder_id),
         machines_done AS (
             UPDATE machines m SET
                 active_builds = GREATEST(m.active_builds - counts.n, 0),
                 last_released_at = now(),
                 state = CASE WHEN m.role = 'ephemeral' AND m.state IN ('requested', 'launching', 'booting', 'ready', 'assigned')
                                   AND m.active_builds - counts.n <= 0 THEN 'draining'
                              WHEN m.state = 'assigned' AND m.active_builds - counts.n <= 0 THEN 'ready'
                              ELSE m.state END
             FROM counts WHERE m.id = counts.builder_id)
         SELECT count(*) FROM released",
    )
    .bind(build_id)
    .bind(platform.map(|p| p.as_str()))
    .fetch_one(&mut **tx)
    .await?;
    Ok(sqlx::Row::get::<i64, _>(&released, 0) as u64)
}

/// Releases one platform of a live build (`ReleaseEndpoint`): its builder goes back to
/// the pool, and builds waiting for one wake. False if it held none.
pub async fn release_platform(pool: &PgPool, build_id: &str, platform: Platform) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let released = release_platforms(&mut tx, build_id, Some(platform)).await? > 0;
    if released {
        sqlx::query(
            "SELECT pg_notify('kiln_scheduler', '')
             WHERE EXISTS (SELECT 1 FROM build_platforms WHERE state = 'pending')",
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(released)
}

/// A finished build's step counts and the time its cache hits saved (each cached step
/// is worth what it took when it last ran uncached in the project), then its project's
/// hourly usage and step timings: aggregates kept as builds finish, so listing builds
/// and reading a month's usage never scan steps or builds.
async fn record_statistics(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, id: &str) -> Result<()> {
    sqlx::query(
        "WITH s AS (
             SELECT count(*)::int AS total,
                    (count(*) FILTER (WHERE st.cached))::int AS cached,
                    COALESCE(sum(t.seconds) FILTER (WHERE st.cached), 0)::int AS saved
             FROM build_steps st
             JOIN builds b ON b.id = st.build_id
             LEFT JOIN step_timings t ON t.project_id = b.project_id AND t.digest = st.digest
             WHERE st.build_id = $1),
         b AS (
             UPDATE builds SET total_steps = s.total, cached_steps = s.cached, saved_seconds = s.saved
             FROM s WHERE builds.id = $1
             RETURNING builds.project_id, builds.organization_id, builds.finished_at,
                       GREATEST(EXTRACT(EPOCH FROM builds.finished_at
                                - COALESCE(builds.started_at, builds.created_at)), 0)::bigint AS seconds,
                       builds.saved_seconds)
         INSERT INTO usage_hourly (project_id, organization_id, hour, build_count, build_seconds, saved_seconds)
         SELECT project_id, organization_id, date_trunc('hour', finished_at, 'UTC'), 1, seconds, saved_seconds FROM b
         ON CONFLICT (project_id, hour) DO UPDATE SET
             build_count = usage_hourly.build_count + 1,
             build_seconds = usage_hourly.build_seconds + EXCLUDED.build_seconds,
             saved_seconds = usage_hourly.saved_seconds + EXCLUDED.saved_seconds",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO step_timings (project_id, digest, seconds)
         SELECT b.project_id, st.digest,
                GREATEST(EXTRACT(EPOCH FROM st.completed_at - st.started_at), 0)::int
         FROM build_steps st JOIN builds b ON b.id = st.build_id
         WHERE st.build_id = $1 AND NOT st.cached AND st.error IS NULL
           AND st.started_at IS NOT NULL AND st.completed_at IS NOT NULL
         ON CONFLICT (project_id, digest) DO UPDATE SET seconds = EXCLUDED.seconds, updated_at = now()",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
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
    // Two statements rather than one with `$2 IS NULL OR …`: a generic plan of the OR
    // cannot start the index scan at the cursor, and later pages would cost more.
    Ok(match after {
        None => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM builds WHERE project_id = $1
                 ORDER BY created_at DESC, id DESC LIMIT $2"
            ))
            .bind(project_id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        Some((at, id)) => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM builds WHERE project_id = $1 AND (created_at, id) < ($2, $3)
                 ORDER BY created_at DESC, id DESC LIMIT $4"
            ))
            .bind(project_id)
            .bind(at)
            .bind(id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    })
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
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
         SELECT $1, d, n, c, s, co, e
         FROM UNNEST($2::text[], $3::text[], $4::bool[], $5::timestamptz[], $6::timestamptz[], $7::text[])
              WITH ORDINALITY AS u(d, n, c, s, co, e, ord)
         ORDER BY ord
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

/// Marks a build shared (true) or not; stopping bumps the share generation so an earlier
/// share URL never works again. The build after the change.
pub async fn set_shared<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    shared: bool,
) -> Result<Option<Build>> {
    Ok(sqlx::query_as(&format!(
        "UPDATE builds SET shared = $2,
             share_generation = share_generation + CASE WHEN shared AND NOT $2 THEN 1 ELSE 0 END
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(shared)
    .fetch_optional(db)
    .await?)
}

/// Step counts of a build still running (finished builds carry theirs).
pub async fn live_step_counts(pool: &PgPool, id: &str) -> Result<(i32, i32)> {
    Ok(sqlx::query_as(
        "SELECT count(*)::int, (count(*) FILTER (WHERE cached))::int FROM build_steps WHERE build_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// A step with its order and whether it has logs.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StepRow {
    pub position: i64,
    pub digest: String,
    pub name: String,
    pub cached: bool,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub log_lines: i32,
}

/// A page of a build's steps in the order they were first reported, after `after`.
pub async fn steps_page(
    pool: &PgPool,
    build_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<StepRow>> {
    Ok(sqlx::query_as(
        "SELECT position, digest, name, cached, started_at, completed_at, error, log_lines
         FROM build_steps WHERE build_id = $1 AND position > $2 ORDER BY position LIMIT $3",
    )
    .bind(build_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A log line of a step.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct LogLine {
    pub seq: i32,
    pub at: DateTime<Utc>,
    pub message: String,
}

/// A page of a step's log lines, after line `after`.
pub async fn step_logs(
    pool: &PgPool,
    build_id: &str,
    digest: &str,
    after: i32,
    limit: i64,
) -> Result<Vec<LogLine>> {
    Ok(sqlx::query_as(
        "SELECT seq, at, message FROM build_step_logs
         WHERE build_id = $1 AND digest = $2 AND seq > $3 ORDER BY seq LIMIT $4",
    )
    .bind(build_id)
    .bind(digest)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The last `per_step` lines of each step of a build that logged anything, at most
/// `total` lines in all (earliest steps first), each cut to `max_chars` characters.
pub async fn log_tails(
    pool: &PgPool,
    build_id: &str,
    per_step: i64,
    total: i64,
    max_chars: i32,
) -> Result<Vec<(String, LogLine)>> {
    let rows: Vec<(String, i32, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT s.digest, l.seq, l.at, left(l.message, $4)
         FROM build_steps s
         CROSS JOIN LATERAL (
             SELECT seq, at, message FROM build_step_logs
             WHERE build_id = s.build_id AND digest = s.digest
             ORDER BY seq DESC LIMIT $2
         ) l
         WHERE s.build_id = $1 AND s.log_lines > 0
         ORDER BY s.position, l.seq LIMIT $3",
    )
    .bind(build_id)
    .bind(per_step)
    .bind(total)
    .bind(max_chars)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(digest, seq, at, message)| (digest, LogLine { seq, at, message }))
        .collect())
}

/// A log line as the CLI reports it.
#[derive(Debug, Clone)]
pub struct NewLogLine {
    pub digest: String,
    pub at: DateTime<Utc>,
    pub message: String,
}

/// Appends log lines, keeping at most `per_step` lines per step and `per_build` per build
/// (later lines are dropped, and counted). Steps not yet reported get a row so their logs
/// can be read. Returns how many lines were stored.
pub async fn append_logs(
    pool: &PgPool,
    build_id: &str,
    lines: &[NewLogLine],
    per_step: i32,
    per_build: i32,
) -> Result<usize> {
    if lines.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let Some(build_lines): Option<i32> =
        sqlx::query_scalar("SELECT log_lines FROM builds WHERE id = $1 FOR UPDATE")
            .bind(build_id)
            .fetch_optional(&mut *tx)
            .await?
    else {
        return Ok(0);
    };
    let mut digests: Vec<&str> = lines.iter().map(|l| l.digest.as_str()).collect();
    digests.sort_unstable();
    digests.dedup();
    sqlx::query(
        "INSERT INTO build_steps (build_id, digest, name) SELECT $1, d, '' FROM UNNEST($2::text[]) d
         ON CONFLICT (build_id, digest) DO NOTHING",
    )
    .bind(build_id)
    .bind(&digests)
    .execute(&mut *tx)
    .await?;
    let counts: Vec<(String, i32)> = sqlx::query_as(
        "SELECT digest, log_lines FROM build_steps WHERE build_id = $1 AND digest = ANY($2)",
    )
    .bind(build_id)
    .bind(&digests)
    .fetch_all(&mut *tx)
    .await?;
    let mut next: std::collections::HashMap<String, i32> = counts.into_iter().collect();
    let mut room = (per_build - build_lines).max(0);
    let (mut keep_digest, mut keep_seq, mut keep_at, mut keep_msg) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for line in lines {
        let count = next.entry(line.digest.clone()).or_insert(0);
        if room == 0 || *count >= per_step {
            continue;
        }
        *count += 1;
        room -= 1;
        keep_digest.push(line.digest.as_str());
        keep_seq.push(*count);
        keep_at.push(line.at);
        keep_msg.push(line.message.as_str());
    }
    if keep_seq.is_empty() {
        return Ok(0);
    }
    sqlx::query(
        "INSERT INTO build_step_logs (build_id, digest, seq, at, message)
         SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::timestamptz[], $5::text[])
         ON CONFLICT DO NOTHING",
    )
    .bind(build_id)
    .bind(&keep_digest)
    .bind(&keep_seq)
    .bind(&keep_at)
    .bind(&keep_msg)
    .execute(&mut *tx)
    .await?;
    let stepped: Vec<&str> = next.keys().map(String::as_str).collect();
    let totals: Vec<i32> = stepped.iter().map(|d| next[*d]).collect();
    sqlx::query(
        "UPDATE build_steps s SET log_lines = t.n FROM UNNEST($2::text[], $3::int[]) AS t(d, n)
         WHERE s.build_id = $1 AND s.digest = t.d",
    )
    .bind(build_id)
    .bind(&stepped)
    .bind(&totals)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE builds SET log_lines = log_lines + $2 WHERE id = $1")
        .bind(build_id)
        .bind(keep_seq.len() as i32)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(keep_seq.len())
}
