//! Token rows. The secret is never stored: only its SHA-256 and a display prefix.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::db::ids::new_id;
use crate::error::{Error, Result};

#[derive(Debug, sqlx::FromRow)]
pub struct TokenAuthRow {
    pub id: String,
    pub kind: String,
    pub user_id: Option<String>,
    pub organization_id: Option<String>,
    pub project_id: Option<String>,
    pub build_id: Option<String>,
    pub machine_id: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// "org_id:role" pairs for user tokens.
    pub memberships: Vec<String>,
    /// For user tokens: whether the user is a server admin.
    pub server_admin: bool,
}

/// One round trip: the token and, for user tokens, the user's memberships.
pub async fn find_by_hash(pool: &PgPool, hash: &[u8; 32]) -> sqlx::Result<Option<TokenAuthRow>> {
    sqlx::query_as(
        "SELECT t.id, t.kind, t.user_id, t.organization_id, t.project_id, t.build_id, t.machine_id,
                t.scopes, t.expires_at, t.revoked_at,
                COALESCE((SELECT array_agg(m.organization_id || ':' || m.role)
                          FROM memberships m WHERE m.user_id = t.user_id), '{}') AS memberships,
                COALESCE((SELECT u.server_admin FROM users u WHERE u.id = t.user_id), false)
                    AS server_admin
         FROM tokens t WHERE t.token_hash = $1",
    )
    .bind(&hash[..])
    .fetch_optional(pool)
    .await
}

/// A token row to insert: only the SHA-256 of the secret and a display prefix. Built
/// and validated by `auth::token::issue`.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub kind: &'static str,
    pub name: String,
    pub display_prefix: String,
    pub token_hash: [u8; 32],
    pub user_id: Option<String>,
    pub organization_id: Option<String>,
    pub project_id: Option<String>,
    pub build_id: Option<String>,
    pub machine_id: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub display_prefix: String,
    pub user_id: Option<String>,
    pub organization_id: Option<String>,
    pub project_id: Option<String>,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const INFO_COLUMNS: &str =
    "id, kind, name, display_prefix, user_id, organization_id, project_id, scopes,
    created_at, expires_at, last_used_at, revoked_at";

pub async fn insert<'e>(db: impl PgExecutor<'e>, row: &TokenRow) -> Result<TokenInfo> {
    sqlx::query_as(&format!(
        "INSERT INTO tokens (id, kind, name, display_prefix, token_hash, user_id, organization_id,
                             project_id, build_id, machine_id, scopes, expires_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         RETURNING {INFO_COLUMNS}"
    ))
    .bind(new_id())
    .bind(row.kind)
    .bind(&row.name)
    .bind(&row.display_prefix)
    .bind(&row.token_hash[..])
    .bind(&row.user_id)
    .bind(&row.organization_id)
    .bind(&row.project_id)
    .bind(&row.build_id)
    .bind(&row.machine_id)
    .bind(&row.scopes)
    .bind(row.expires_at)
    .bind(&row.created_by)
    .fetch_one(db)
    .await
    .map_err(|err| match &err {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => Error::invalid(
            "token subject",
            "the user, organization or project does not exist",
        ),
        _ => Error::from(err),
    })
}

#[derive(Debug, Default, Clone)]
pub struct TokenFilter {
    /// A kind's name (`project`, `pull`, …).
    pub kind: Option<String>,
    pub organization_id: Option<String>,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub include_revoked: bool,
}

pub async fn list(pool: &PgPool, filter: &TokenFilter) -> Result<Vec<TokenInfo>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {INFO_COLUMNS} FROM tokens
         WHERE ($1::text IS NULL OR organization_id = $1)
           AND ($2::text IS NULL OR project_id = $2)
           AND ($3::text IS NULL OR user_id = $3)
           AND ($4 OR revoked_at IS NULL)
           AND ($5::text IS NULL OR kind = $5)
           AND kind NOT IN ('build', 'machine')
         ORDER BY created_at DESC, id LIMIT 1000"
    ))
    .bind(&filter.organization_id)
    .bind(&filter.project_id)
    .bind(&filter.user_id)
    .bind(filter.include_revoked)
    .bind(&filter.kind)
    .fetch_all(pool)
    .await?)
}

pub async fn get<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<TokenInfo>> {
    Ok(
        sqlx::query_as(&format!("SELECT {INFO_COLUMNS} FROM tokens WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

/// Revokes a live token. Returns its hash when this call revoked it, `None` when it was
/// unknown or already revoked.
pub async fn revoke<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<[u8; 32]>> {
    let hash: Option<Vec<u8>> = sqlx::query_scalar(
        "UPDATE tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING token_hash",
    )
    .bind(id)
    .fetch_optional(db)
    .await?;
    hash.map(|h| {
        h.try_into()
            .map_err(|_| Error::internal(anyhow::anyhow!("stored token hash has the wrong length")))
    })
    .transpose()
}

/// Renames a token; false if it does not exist.
pub async fn rename<'e>(db: impl PgExecutor<'e>, id: &str, name: &str) -> Result<bool> {
    Ok(sqlx::query("UPDATE tokens SET name = $2 WHERE id = $1")
        .bind(id)
        .bind(name)
        .execute(db)
        .await?
        .rows_affected()
        == 1)
}

pub async fn touch_last_used(pool: &PgPool, ids: &[String]) -> sqlx::Result<()> {
    sqlx::query("UPDATE tokens SET last_used_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes tokens that expired or were revoked more than `older_than_days` ago.
pub async fn purge_dead(pool: &PgPool, older_than_days: i32) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM tokens
         WHERE (expires_at < now() - make_interval(days => $1))
            OR (revoked_at < now() - make_interval(days => $1))",
    )
    .bind(older_than_days)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
