//! Machine rows for operators (the scheduler's own queries live in `crate::scheduler`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::error::Result;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct MachineInfo {
    pub id: String,
    pub provider: String,
    pub platform: String,
    pub project_id: Option<String>,
    pub state: String,
    pub active_builds: i32,
    pub endpoint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub last_released_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// Machines in `state`, or every live one.
pub async fn list(pool: &PgPool, state: Option<&str>) -> Result<Vec<MachineInfo>> {
    Ok(sqlx::query_as(
        "SELECT id, provider, platform, project_id, state, active_builds, endpoint, created_at, ready_at,
                last_released_at, error
         FROM machines
         WHERE ($1::text IS NULL AND state NOT IN ('terminated', 'failed')) OR state = $1
         ORDER BY created_at DESC LIMIT 1000",
    )
    .bind(state)
    .fetch_all(pool)
    .await?)
}

/// Machines serving the projects of one organization: in `state`, or every live one.
pub async fn list_for_organization(
    pool: &PgPool,
    organization_id: &str,
    state: Option<&str>,
) -> Result<Vec<MachineInfo>> {
    Ok(sqlx::query_as(
        "SELECT m.id, m.provider, m.platform, m.project_id, m.state, m.active_builds, m.endpoint,
                m.created_at, m.ready_at, m.last_released_at, m.error
         FROM machines m JOIN projects p ON p.id = m.project_id
         WHERE p.organization_id = $1
           AND (($2::text IS NULL AND m.state NOT IN ('terminated', 'failed')) OR m.state = $2)
         ORDER BY m.created_at DESC LIMIT 1000",
    )
    .bind(organization_id)
    .bind(state)
    .fetch_all(pool)
    .await?)
}

/// The project a machine serves and that project's organization (`None` for an unknown
/// machine; empty for one in the warm pool).
pub async fn serving(pool: &PgPool, id: &str) -> Result<Option<(Option<String>, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT m.project_id, p.organization_id
         FROM machines m LEFT JOIN projects p ON p.id = m.project_id WHERE m.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Drains a ready or assigned machine still serving `project_id`: it takes no new builds
/// and the reaper terminates it once its builds finish. False if it was in no state to
/// drain (or now serves another project).
pub async fn drain<'e>(
    db: impl sqlx::PgExecutor<'e>,
    id: &str,
    project_id: Option<&str>,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE machines SET state = 'draining'
         WHERE id = $1 AND state IN ('ready', 'assigned') AND project_id IS NOT DISTINCT FROM $2",
    )
    .bind(id)
    .bind(project_id)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Tells a machine's agent that its directive changed for a reason its row does not show
/// (its volume became ready or grew): bumps the generation and wakes its stream.
pub async fn bump_directive<'e>(db: impl sqlx::PgExecutor<'e>, id: &str) -> Result<()> {
    sqlx::query(
        "WITH bumped AS (UPDATE machines SET directive_generation = directive_generation + 1
                         WHERE id = $1 AND managed_by_agent RETURNING id)
         SELECT pg_notify('kiln_machines', id) FROM bumped",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}
