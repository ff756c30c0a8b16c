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

/// Drains a ready or assigned machine: it takes no new builds and the reaper terminates
/// it once its builds finish. False if it was in no state to drain.
pub async fn drain<'e>(db: impl sqlx::PgExecutor<'e>, id: &str) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE machines SET state = 'draining' WHERE id = $1 AND state IN ('ready', 'assigned')",
    )
    .bind(id)
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
