//! Projects and their build/cache settings.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, PgPool};

use crate::auth::ProjectReach;
use crate::db::ids::new_id;
use crate::db::orgs::validate_name;
use crate::error::{ConstraintExt, Error, Result};

pub const DEFAULT_CACHE_SIZE_GB: i32 = 50;
pub const BUILDER_SIZES: [&str; 3] = ["16x32", "32x64", "64x128"];

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
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
}

const COLUMNS: &str = "id, organization_id, name, region, cache_size_gb_amd64, cache_size_gb_arm64,
    cache_retention_days, build_timeout_minutes, builder_size, autoscaling_enabled,
    autoscaling_builds_per_builder, autoscaling_max_builders, created_at, updated_at";

/// Settings a caller may set on create or change on update. `None` keeps the current
/// value (or the default on create).
#[derive(Debug, Clone, Default, Deserialize)]
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

fn in_range(field: &str, value: Option<i32>, min: i32, max: i32) -> Result<()> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(Error::invalid(
            field,
            format!("must be between {min} and {max}, got {v}"),
        )),
        _ => Ok(()),
    }
}

impl ProjectSettings {
    /// Checks every field before anything is written, so bad input changes nothing.
    pub fn validate(&mut self) -> Result<()> {
        if let Some(name) = &self.name {
            self.name = Some(validate_name("name", name)?);
        }
        if let Some(region) = &self.region {
            let ok = !region.is_empty()
                && region.len() <= 32
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(Error::invalid("region", "must look like us-east-1"));
            }
        }
        in_range("cache_size_gb_amd64", self.cache_size_gb_amd64, 1, 10_000)?;
        in_range("cache_size_gb_arm64", self.cache_size_gb_arm64, 1, 10_000)?;
        in_range("cache_retention_days", self.cache_retention_days, 1, 365)?;
        in_range("build_timeout_minutes", self.build_timeout_minutes, 1, 1440)?;
        in_range(
            "autoscaling_builds_per_builder",
            self.autoscaling_builds_per_builder,
            1,
            100,
        )?;
        in_range(
            "autoscaling_max_builders",
            self.autoscaling_max_builders,
            1,
            100,
        )?;
        if let Some(size) = &self.builder_size
            && !BUILDER_SIZES.contains(&size.as_str())
        {
            return Err(Error::invalid(
                "builder_size",
                format!("must be one of {}", BUILDER_SIZES.join(", ")),
            ));
        }
        Ok(())
    }
}

pub async fn create<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
    mut settings: ProjectSettings,
) -> Result<Project> {
    settings.validate()?;
    let Some(name) = settings.name.clone() else {
        return Err(Error::invalid("name", "is required"));
    };
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

pub async fn update(pool: &PgPool, id: &str, mut settings: ProjectSettings) -> Result<Project> {
    settings.validate()?;
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
             updated_at = now()
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
    .fetch_optional(pool)
    .await
    .on_unique("projects_org_name_key", || {
        format!("a project named {name:?} already exists in this organization; pick another name")
    })?
    .ok_or_else(|| Error::not_found("project", id))
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<Project>> {
    Ok(
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM projects WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
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

/// Projects the caller can reach, optionally narrowed to one organization.
pub async fn list(
    pool: &PgPool,
    reach: &ProjectReach,
    organization_id: Option<&str>,
) -> Result<Vec<Project>> {
    let (orgs, project): (Option<&[String]>, Option<&str>) = match reach {
        ProjectReach::Organizations(orgs) => (Some(orgs), None),
        ProjectReach::Project(id) => (None, Some(id)),
        ProjectReach::Nothing => return Ok(Vec::new()),
    };
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM projects
         WHERE ($1::text[] IS NULL OR organization_id = ANY($1))
           AND ($2::text IS NULL OR id = $2)
           AND ($3::text IS NULL OR organization_id = $3)
         ORDER BY organization_id, name LIMIT 10000"
    ))
    .bind(orgs)
    .bind(project)
    .bind(organization_id)
    .fetch_all(pool)
    .await?)
}

pub async fn delete(pool: &PgPool, id: &str) -> Result<bool> {
    Ok(sqlx::query("DELETE FROM projects WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected()
        > 0)
}
