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
    match_key: &str,
) -> Result<TrustPolicyRow> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO trust_policies (id, project_id, provider, claims, match_key)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(project_id)
    .bind(provider)
    .bind(claims)
    .bind(match_key)
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

/// A policy of `provider` stored under `match_key`, with its project's organization.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CandidateRow {
    pub project_id: String,
    pub organization_id: String,
    pub provider: String,
    pub claims: serde_json::Value,
}

/// The policies stored for one identity key (at most 1,000; a key names one repository,
/// pipeline or project).
pub async fn candidates(
    pool: &PgPool,
    provider: &str,
    match_key: &str,
) -> Result<Vec<CandidateRow>> {
    Ok(sqlx::query_as(
        "SELECT t.project_id, p.organization_id, t.provider, t.claims
         FROM trust_policies t JOIN projects p ON p.id = t.project_id
         WHERE t.provider = $1 AND t.match_key = $2
         ORDER BY t.project_id LIMIT 1000",
    )
    .bind(provider)
    .bind(match_key)
    .fetch_all(pool)
    .await?)
}
