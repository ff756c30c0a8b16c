//! Projects and their build/cache settings.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, PgPool};

use crate::db::ids::new_id;
use crate::error::{ConstraintExt, Error, Result};

pub const DEFAULT_CACHE_SIZE_GB: i32 = 50;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Project {
    pub id: String,
    pub organization_id: String,
    pub name: String,
    pub region: String,
    pub cache_size_gb_amd64: i32,
    pub cache_size_gb_arm64: i32,
    pub cache_retention_days: i32,
    pub build_timeout_minutes: i32,
    pub builder_size: String,
    pub autoscaling_enabled: bool,
    pub autoscaling_builds_per_builder: i32,
    pub autoscaling_max_builders: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Bumped by every settings change (the REST API's ETag).
    pub version: i64,
}

const COLUMNS: &str = "id, organization_id, name, region, cache_size_gb_amd64, cache_size_gb_arm64,
    cache_retention_days, build_timeout_minutes, builder_size, autoscaling_enabled,
    autoscaling_builds_per_builder, autoscaling_max_builders, created_at, updated_at, version";

/// Settings a caller may set on create or change on update. `None` keeps the current
/// value (or the default on create). Validated by the domain (`crate::projects`).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectSettings {
    pub name: Option<String>,
    pub region: Option<String>,
    pub cache_size_gb_amd64: Option<i32>,
    pub cache_size_gb_arm64: Option<i32>,
    pub cache_retention_days: Option<i32>,
    pub build_timeout_minutes: Option<i32>,
    pub builder_size: Option<String>,
    pub autoscaling_enabled: Option<bool>,
    pub autoscaling_builds_per_builder: Option<i32>,
    pub autoscaling_max_builders: Option<i32>,
}

/// Inserts a project; unset settings take their defaults. `settings.name` is required.
pub async fn create<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
    settings: &ProjectSettings,
) -> Result<Project> {
    let name = settings.name.clone().unwrap_or_default();
    let result = sqlx::query_as(&format!(
        "INSERT INTO projects (id, organization_id, name, region, cache_size_gb_amd64, cache_size_gb_arm64,
             cache_retention_days, build_timeout_minutes, builder_size, autoscaling_enabled,
             autoscaling_builds_per_builder, autoscaling_max_builders)
         VALUES ($1, $2, $3, COALESCE($4, 'us-east-1'), COALESCE($5, 50), COALESCE($6, 50), COALESCE($7, 14),
                 COALESCE($8, 60), COALESCE($9, '16x32'), COALESCE($10, false), COALESCE($11, 1), COALESCE($12, 1))
         RETURNING {COLUMNS}"
    ))
    .bind(new_id())
    .bind(organization_id)
    .bind(&name)
    .bind(&settings.region)
    .bind(settings.cache_size_gb_amd64)
    .bind(settings.cache_size_gb_arm64)
    .bind(settings.cache_retention_days)
    .bind(settings.build_timeout_minutes)
    .bind(&settings.builder_size)
    .bind(settings.autoscaling_enabled)
    .bind(settings.autoscaling_builds_per_builder)
    .bind(settings.autoscaling_max_builders)
    .fetch_one(db)
    .await;
    match result {
        Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => Err(Error::invalid(
            "organization_id",
            "the organization does not exist",
        )),
        other => other.on_unique("projects_org_name_key", || {
            format!(
                "a project named {name:?} already exists in this organization; pick another name"
            )
        }),
    }
}

/// Changes the settings that are set; `None` if the project does not exist.
pub async fn update<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    settings: &ProjectSettings,
) -> Result<Option<Project>> {
    let name = settings.name.clone().unwrap_or_default();
    sqlx::query_as(&format!(
        "UPDATE projects SET
             name = COALESCE($2, name), region = COALESCE($3, region),
             cache_size_gb_amd64 = COALESCE($4, cache_size_gb_amd64),
             cache_size_gb_arm64 = COALESCE($5, cache_size_gb_arm64),
             cache_retention_days = COALESCE($6, cache_retention_days),
             build_timeout_minutes = COALESCE($7, build_timeout_minutes),
             builder_size = COALESCE($8, builder_size),
             autoscaling_enabled = COALESCE($9, autoscaling_enabled),
             autoscaling_builds_per_builder = COALESCE($10, autoscaling_builds_per_builder),
             autoscaling_max_builders = COALESCE($11, autoscaling_max_builders),
             updated_at = now(), version = version + 1
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&settings.name)
    .bind(&settings.region)
    .bind(settings.cache_size_gb_amd64)
    .bind(settings.cache_size_gb_arm64)
    .bind(settings.cache_retention_days)
    .bind(settings.build_timeout_minutes)
    .bind(&settings.builder_size)
    .bind(settings.autoscaling_enabled)
    .bind(settings.autoscaling_builds_per_builder)
    .bind(settings.autoscaling_max_builders)
    .fetch_optional(db)
    .await
    .on_unique("projects_org_name_key", || {
        format!("a project named {name:?} already exists in this organization; pick another name")
    })
}

pub async fn get<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<Project>> {
    Ok(
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM projects WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

/// Like [`get`], locking the row until the transaction ends.
pub async fn get_for_update<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<Project>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projects WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?)
}

pub async fn find_by_name(
    pool: &PgPool,
    organization_id: &str,
    name: &str,
) -> Result<Option<Project>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projects WHERE organization_id = $1 AND name = $2"
    ))
    .bind(organization_id)
    .bind(name)
    .fetch_optional(pool)
    .await?)
}

/// Which projects a listing returns. Every set field narrows it.
#[derive(Debug, Clone, Default)]
pub struct ProjectFilter {
    pub organization_ids: Option<Vec<String>>,
    pub project_ids: Option<Vec<String>>,
    pub organization_id: Option<String>,
}

pub async fn list(pool: &PgPool, filter: &ProjectFilter) -> Result<Vec<Project>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projects
         WHERE ($1::text[] IS NULL OR organization_id = ANY($1))
           AND ($2::text[] IS NULL OR id = ANY($2))
           AND ($3::text IS NULL OR organization_id = $3)
         ORDER BY organization_id, name LIMIT 10000"
    ))
    .bind(&filter.organization_ids)
    .bind(&filter.project_ids)
    .bind(&filter.organization_id)
    .fetch_all(pool)
    .await?)
}

/// A page of the filtered projects in (name, id) order, after the cursor.
pub async fn list_page(
    pool: &PgPool,
    filter: &ProjectFilter,
    after: Option<(String, String)>,
    limit: i64,
) -> Result<Vec<Project>> {
    let (name, id) = after.unzip();
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projects
         WHERE ($1::text[] IS NULL OR organization_id = ANY($1))
           AND ($2::text[] IS NULL OR id = ANY($2))
           AND ($3::text IS NULL OR organization_id = $3)
           AND ($4::text IS NULL OR (name, id) > ($4, $5))
         ORDER BY name, id LIMIT $6"
    ))
    .bind(&filter.organization_ids)
    .bind(&filter.project_ids)
    .bind(&filter.organization_id)
    .bind(name)
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A project with what the dashboard's project list shows beside it: the cache used on
/// its live volumes (as last metered) and its newest build.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProjectOverview {
    #[sqlx(flatten)]
    pub project: Project,
    pub cache_used_bytes: i64,
    pub last_build_id: Option<String>,
    pub last_build_state: Option<String>,
    pub last_build_at: Option<DateTime<Utc>>,
}

/// One query for the whole list: the newest build through `builds_project_idx`, the
/// cache used through `volumes_live_project`.
pub async fn list_overview(
    pool: &PgPool,
    filter: &ProjectFilter,
    limit: i64,
) -> Result<Vec<ProjectOverview>> {
    let columns = COLUMNS
        .split(',')
        .map(|c| format!("p.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(sqlx::query_as(&format!(
        "SELECT {columns},
                COALESCE((SELECT sum(v.used_bytes) FROM volumes v
                          WHERE v.project_id = p.id AND v.kind = 'project'
                            AND v.state IN ('creating', 'available', 'attached', 'resizing')), 0)::bigint
                    AS cache_used_bytes,
                b.id AS last_build_id, b.state AS last_build_state, b.created_at AS last_build_at
         FROM projects p
         LEFT JOIN LATERAL (
             SELECT id, state, created_at FROM builds
             WHERE project_id = p.id ORDER BY created_at DESC, id DESC LIMIT 1
         ) b ON true
         WHERE ($1::text[] IS NULL OR p.organization_id = ANY($1))
           AND ($2::text[] IS NULL OR p.id = ANY($2))
           AND ($3::text IS NULL OR p.organization_id = $3)
         ORDER BY p.organization_id, p.name LIMIT $4"
    ))
    .bind(&filter.organization_ids)
    .bind(&filter.project_ids)
    .bind(&filter.organization_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A project's name and its organization's, for listings that show both.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ProjectSummary {
    pub id: String,
    pub name: String,
    pub organization_id: String,
    pub organization_name: String,
}

pub async fn list_summaries(pool: &PgPool, filter: &ProjectFilter) -> Result<Vec<ProjectSummary>> {
    Ok(sqlx::query_as(
        "SELECT p.id, p.name, p.organization_id, o.name AS organization_name
         FROM projects p JOIN organizations o ON o.id = p.organization_id
         WHERE ($1::text[] IS NULL OR p.organization_id = ANY($1))
           AND ($2::text[] IS NULL OR p.id = ANY($2))
           AND ($3::text IS NULL OR p.organization_id = $3)
         ORDER BY o.name, p.name LIMIT 10000",
    )
    .bind(&filter.organization_ids)
    .bind(&filter.project_ids)
    .bind(&filter.organization_id)
    .fetch_all(pool)
    .await?)
}

pub async fn delete<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<bool> {
    Ok(sqlx::query("DELETE FROM projects WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?
        .rows_affected()
        > 0)
}
