//! Rows of `oidc_signing_keys`.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    pub n: String,
    pub e: String,
    pub private_key_sealed: Vec<u8>,
    pub sign_from: DateTime<Utc>,
    pub sign_until: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

const COLUMNS: &str = "kid, n, e, private_key_sealed, sign_from, sign_until, expires_at";

pub struct NewSigningKey<'a> {
    pub kid: &'a str,
    pub n: &'a str,
    pub e: &'a str,
    pub private_key_sealed: &'a [u8],
    pub sign_from: DateTime<Utc>,
    pub sign_until: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

pub async fn insert<'e>(db: impl PgExecutor<'e>, key: &NewSigningKey<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO oidc_signing_keys (kid, n, e, private_key_sealed, sign_from, sign_until, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(key.kid)
    .bind(key.n)
    .bind(key.e)
    .bind(key.private_key_sealed)
    .bind(key.sign_from)
    .bind(key.sign_until)
    .bind(key.expires_at)
    .execute(db)
    .await?;
    Ok(())
}

/// The key that signs now: the newest whose signing window contains now.
pub async fn signing(pool: &PgPool) -> Result<Option<SigningKeyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM oidc_signing_keys
         WHERE sign_from <= now() AND sign_until > now()
         ORDER BY sign_from DESC LIMIT 1"
    ))
    .fetch_optional(pool)
    .await?)
}

/// The key whose signing window ends last (the one to follow), if any.
pub async fn latest<'e>(db: impl PgExecutor<'e>) -> Result<Option<SigningKeyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM oidc_signing_keys ORDER BY sign_until DESC LIMIT 1"
    ))
    .fetch_optional(db)
    .await?)
}

/// Every key still published (not yet expired), newest first.
pub async fn published(pool: &PgPool) -> Result<Vec<SigningKeyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM oidc_signing_keys WHERE expires_at > now() ORDER BY sign_from DESC"
    ))
    .fetch_all(pool)
    .await?)
}

/// Removes keys whose last token has expired; returns how many.
pub async fn delete_expired<'e>(db: impl PgExecutor<'e>) -> Result<u64> {
    Ok(
        sqlx::query("DELETE FROM oidc_signing_keys WHERE expires_at <= now()")
            .execute(db)
            .await?
            .rows_affected(),
    )
}

/// Records that a token id was accepted; false if it already was (a replay).
pub async fn remember_jti(
    pool: &PgPool,
    issuer: &str,
    jti: &str,
    expires_at: DateTime<Utc>,
) -> Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO oidc_seen_jtis (issuer, jti, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(issuer)
    .bind(jti)
    .bind(expires_at)
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

/// Forgets token ids whose tokens have expired (they can no longer be replayed).
pub async fn forget_expired_jtis(pool: &PgPool) -> Result<u64> {
    Ok(
        sqlx::query("DELETE FROM oidc_seen_jtis WHERE expires_at < now()")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}
