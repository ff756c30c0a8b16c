//! Trust-policy rows: which CI identities may act on a project. The provider-specific
//! match fields are stored as JSON (`claims`).

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrustPolicyRow {
    pub id: String,
    pub project_id: String,
    pub provider: String,
    pub claims: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, project_id, provider, claims, created_at";

pub async fn list(pool: &PgPool, project_id: &str) -> Result<Vec<TrustPolicyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM trust_policies WHERE project_id = $1 ORDER BY created_at, id"
    ))
    .bind(project_id)
    .fetch_all(pool)
    .await?)
}

pub async fn insert<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    project_id: &str,
    provider: &str,
    claims: &serde_json::Value,
) -> Result<TrustPolicyRow> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO trust_policies (id, project_id, provider, claims) VALUES ($1, $2, $3, $4)
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(project_id)
    .bind(provider)
    .bind(claims)
    .fetch_one(db)
    .await?)
}

/// Deletes one of a project's policies; false if the project has no such policy.
pub async fn delete<'e>(db: impl PgExecutor<'e>, project_id: &str, id: &str) -> Result<bool> {
    Ok(
        sqlx::query("DELETE FROM trust_policies WHERE id = $1 AND project_id = $2")
            .bind(id)
            .bind(project_id)
            .execute(db)
            .await?
            .rows_affected()
            == 1,
    )
}

/// How many policies a project has (bounded per project).
pub async fn count<'e>(db: impl PgExecutor<'e>, project_id: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM trust_policies WHERE project_id = $1")
            .bind(project_id)
            .fetch_one(db)
            .await?,
    )
}
