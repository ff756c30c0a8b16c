//! Trust-policy rows: which CI identities, of which issuer, may act on a project. The
//! provider-specific match fields are stored as JSON (`claims`); whether a token's
//! identity matches a policy is decided here, in SQL, always for one named project or
//! for one identity's own lookups, so rows of other projects never crowd a result.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrustPolicyRow {
    pub id: String,
    pub project_id: String,
    pub provider: String,
    pub issuer: String,
    pub claims: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, project_id, provider, issuer, claims, created_at";

pub async fn list(pool: &PgPool, project_id: &str) -> Result<Vec<TrustPolicyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM trust_policies WHERE project_id = $1 ORDER BY created_at, id"
    ))
    .bind(project_id)
    .fetch_all(pool)
    .await?)
}

pub struct NewTrustPolicy<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub provider: &'a str,
    pub issuer: &'a str,
    pub claims: &'a serde_json::Value,
    pub match_key: &'a str,
}

/// Inserts a policy; `None` if the project already has one for the same identity.
pub async fn insert<'e>(
    db: impl PgExecutor<'e>,
    new: &NewTrustPolicy<'_>,
) -> Result<Option<TrustPolicyRow>> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO trust_policies (id, project_id, provider, issuer, claims, match_key)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (project_id, provider, issuer, match_key, qualifier) DO NOTHING
         RETURNING {COLUMNS}"
    ))
    .bind(new.id)
    .bind(new.project_id)
    .bind(new.provider)
    .bind(new.issuer)
    .bind(new.claims)
    .bind(new.match_key)
    .fetch_optional(db)
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

/// What a verified CI token's policies are found by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityLookup {
    pub provider: &'static str,
    /// The issuer policies must name (a fork pull request token's is GitHub's).
    pub issuer: String,
    /// The lowercase identity key (GitHub `owner/repo`, GitLab project path, ...).
    pub match_key: String,
    /// GitHub's repository id: policies that pin one match only it.
    pub repository_id: String,
    /// GitLab's ref: policies that name one match it, as a branch or tag name or whole.
    pub git_ref: String,
}

/// The policy rows of `t` stored under the identity's provider, issuer and key ($1..$3).
const KEYED: &str = "t.provider = $1 AND t.issuer = $2 AND t.match_key = $3";

/// Of those, the ones whose pinned repository id ($4) or ref ($5) fits the identity.
const QUALIFIED: &str = "(t.provider <> 'github' OR t.claims->>'repository_id' IN ('', $4))
    AND (t.provider <> 'gitlab'
         OR t.claims->>'ref' IN ('', $5, regexp_replace($5, '^refs/(heads|tags)/', '')))";

/// Policy rows a listing reads at most: anyone can add rows naming any identity, so a
/// listing's cost must not grow with them (whether a project trusts an identity is
/// always looked up for that project alone, and never depends on this).
pub const LISTING_ROWS_READ: i64 = 1_000;

/// The organization of `project_id` if one of its policies trusts the identity.
pub async fn trusting_project<'e>(
    db: impl PgExecutor<'e>,
    lookup: &IdentityLookup,
    project_id: &str,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT p.organization_id FROM trust_policies t JOIN projects p ON p.id = t.project_id
         WHERE {KEYED} AND {QUALIFIED} AND t.project_id = $6
         LIMIT 1"
    ))
    .bind(lookup.provider)
    .bind(&lookup.issuer)
    .bind(&lookup.match_key)
    .bind(&lookup.repository_id)
    .bind(&lookup.git_ref)
    .bind(project_id)
    .fetch_optional(db)
    .await?)
}

/// The project the identity's builds (`builds.ci_identity` = `history_key`) last went
/// to, with its organization, if one of its policies still trusts the identity.
pub async fn last_trusting_project<'e>(
    db: impl PgExecutor<'e>,
    lookup: &IdentityLookup,
    history_key: &str,
) -> Result<Option<(String, String)>> {
    Ok(sqlx::query_as(&format!(
        "SELECT p.id, p.organization_id
         FROM (SELECT project_id FROM builds WHERE ci_identity = $6
               ORDER BY created_at DESC LIMIT 1) b
         JOIN projects p ON p.id = b.project_id
         WHERE EXISTS (SELECT 1 FROM trust_policies t
                       WHERE {KEYED} AND {QUALIFIED} AND t.project_id = b.project_id)"
    ))
    .bind(lookup.provider)
    .bind(&lookup.issuer)
    .bind(&lookup.match_key)
    .bind(&lookup.repository_id)
    .bind(&lookup.git_ref)
    .bind(history_key)
    .fetch_optional(db)
    .await?)
}

/// Up to `limit` projects that trust the identity, with their organizations, among the
/// first `LISTING_ROWS_READ` policy rows of its key (for listings only; each project
/// once, however many of its policies match).
pub async fn trusting_projects<'e>(
    db: impl PgExecutor<'e>,
    lookup: &IdentityLookup,
    limit: i64,
) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(&format!(
        "SELECT DISTINCT t.project_id, p.organization_id
         FROM (SELECT * FROM trust_policies t WHERE {KEYED}
               ORDER BY t.project_id LIMIT {LISTING_ROWS_READ}) t
         JOIN projects p ON p.id = t.project_id
         WHERE {QUALIFIED}
         ORDER BY t.project_id LIMIT $6"
    ))
    .bind(lookup.provider)
    .bind(&lookup.issuer)
    .bind(&lookup.match_key)
    .bind(&lookup.repository_id)
    .bind(&lookup.git_ref)
    .bind(limit)
    .fetch_all(db)
    .await?)
}
