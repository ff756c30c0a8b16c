//! Usage aggregates: `usage_hourly` (added to as each build finishes, in
//! `db::builds::finish`) and the cache volumes' metered sizes.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::db::projects::ProjectFilter;
use crate::error::Result;

/// A project's usage over a range.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ProjectUsage {
    pub project_id: String,
    pub project_name: String,
    pub organization_id: String,
    pub build_count: i64,
    pub build_seconds: i64,
    pub saved_seconds: i64,
    /// Bytes used by the project's live cache volumes, as last measured.
    pub cache_used_bytes: i64,
}

/// Usage of the filtered projects over [start, end), counted by the hour builds finished
/// in, in pages of projects ordered by id (after `after`). Projects without builds in
/// the range are included when `with_idle`.
pub async fn projects(
    pool: &PgPool,
    filter: &ProjectFilter,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    after: Option<&str>,
    limit: i64,
    with_idle: bool,
) -> Result<Vec<ProjectUsage>> {
    Ok(sqlx::query_as(
        "SELECT p.id AS project_id, p.name AS project_name, p.organization_id,
                COALESCE(u.build_count, 0) AS build_count,
                COALESCE(u.build_seconds, 0) AS build_seconds,
                COALESCE(u.saved_seconds, 0) AS saved_seconds,
                COALESCE((SELECT sum(COALESCE(v.used_bytes, 0)) FROM volumes v
                          WHERE v.project_id = p.id AND v.kind = 'project'
                            AND v.state IN ('creating', 'available', 'attached', 'resizing')), 0)::bigint
                    AS cache_used_bytes
         FROM projects p
         LEFT JOIN LATERAL (
             SELECT sum(build_count)::bigint AS build_count,
                    sum(build_seconds)::bigint AS build_seconds,
                    sum(saved_seconds)::bigint AS saved_seconds
             FROM usage_hourly h
             WHERE h.project_id = p.id AND h.hour >= date_trunc('hour', $4, 'UTC') AND h.hour < $5
         ) u ON true
         WHERE ($1::text[] IS NULL OR p.organization_id = ANY($1))
           AND ($2::text[] IS NULL OR p.id = ANY($2))
           AND ($3::text IS NULL OR p.organization_id = $3)
           AND ($6::text IS NULL OR p.id > $6)
           AND ($8 OR u.build_count > 0)
         ORDER BY p.id LIMIT $7",
    )
    .bind(&filter.organization_ids)
    .bind(&filter.project_ids)
    .bind(&filter.organization_id)
    .bind(start)
    .bind(end)
    .bind(after)
    .bind(limit)
    .bind(with_idle)
    .fetch_all(pool)
    .await?)
}

/// A project's usage per UTC day over [start, end): (day, builds, build seconds, saved
/// seconds), days without builds left out.
pub async fn project_daily(
    pool: &PgPool,
    project_id: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<(chrono::NaiveDate, i64, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT (hour AT TIME ZONE 'UTC')::date AS day, sum(build_count)::bigint,
                sum(build_seconds)::bigint, sum(saved_seconds)::bigint
         FROM usage_hourly WHERE project_id = $1 AND hour >= date_trunc('hour', $2, 'UTC') AND hour < $3
         GROUP BY 1 ORDER BY 1",
    )
    .bind(project_id)
    .bind(start)
    .bind(end)
    .fetch_all(pool)
    .await?)
}

/// Bytes used by the filtered projects' live cache volumes, as last measured.
pub async fn cache_used_bytes(pool: &PgPool, filter: &ProjectFilter) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE(sum(COALESCE(v.used_bytes, 0)), 0)::bigint
         FROM volumes v JOIN projects p ON p.id = v.project_id
         WHERE v.kind = 'project' AND v.state IN ('creating', 'available', 'attached', 'resizing')
           AND ($1::text[] IS NULL OR p.organization_id = ANY($1))
           AND ($2::text[] IS NULL OR p.id = ANY($2))
           AND ($3::text IS NULL OR p.organization_id = $3)",
    )
    .bind(&filter.organization_ids)
    .bind(&filter.project_ids)
    .bind(&filter.organization_id)
    .fetch_one(pool)
    .await?)
}
