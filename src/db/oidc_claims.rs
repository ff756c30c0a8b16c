//! Rows of `oidc_claims`: fork pull request claims and their check leases.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimRow {
    pub id: String,
    pub challenge_code: String,
    pub repository: String,
    pub repository_id: i64,
    pub run_id: i64,
    pub run_attempt: Option<i32>,
    pub audience: String,
    pub state: String,
    pub failure: Option<String>,
    pub checks: i32,
    /// GitHub calls its checks have made so far.
    pub github_calls: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, challenge_code, repository, repository_id, run_id, run_attempt, audience, \
                       state, failure, checks, github_calls, created_at, expires_at";

pub struct NewClaim<'a> {
    pub id: &'a str,
    pub secret_hash: &'a [u8],
    pub challenge_code: &'a str,
    pub repository: &'a str,
    pub repository_id: i64,
    pub run_id: i64,
    pub run_attempt: Option<i32>,
    pub audience: &'a str,
    pub client_ip: &'a str,
    pub expires_at: DateTime<Utc>,
}

/// Inserts a claim; the call that looked up its run is its first GitHub call.
pub async fn insert<'e>(db: impl PgExecutor<'e>, claim: &NewClaim<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO oidc_claims (id, secret_hash, challenge_code, repository, repository_id,
                                  run_id, run_attempt, audience, client_ip, expires_at,
                                  github_calls)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1)",
    )
    .bind(claim.id)
    .bind(claim.secret_hash)
    .bind(claim.challenge_code)
    .bind(claim.repository)
    .bind(claim.repository_id)
    .bind(claim.run_id)
    .bind(claim.run_attempt)
    .bind(claim.audience)
    .bind(claim.client_ip)
    .bind(claim.expires_at)
    .execute(db)
    .await?;
    Ok(())
}

/// Unexchanged, unexpired claims.
pub struct Pending {
    pub for_repository: i64,
    /// For the repository, from this client address.
    pub for_claimant: i64,
    pub total: i64,
}

pub async fn count_pending<'e>(
    db: impl PgExecutor<'e>,
    repository: &str,
    client_ip: &str,
) -> Result<Pending> {
    let (for_repository, for_claimant, total) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE repository = $1),
                count(*) FILTER (WHERE repository = $1 AND client_ip = $2),
                count(*)
         FROM oidc_claims WHERE state = 'pending' AND expires_at > now()",
    )
    .bind(repository)
    .bind(client_ip)
    .fetch_one(db)
    .await?;
    Ok(Pending {
        for_repository,
        for_claimant,
        total,
    })
}

pub async fn by_secret(pool: &PgPool, secret_hash: &[u8]) -> Result<Option<ClaimRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM oidc_claims WHERE secret_hash = $1"
    ))
    .bind(secret_hash)
    .fetch_optional(pool)
    .await?)
}

/// Takes the right to check a pending claim for `lease_seconds`, unless another check
/// holds it or the last one ended too recently. Counts the check.
pub async fn lease(
    pool: &PgPool,
    id: &str,
    lease_id: &str,
    lease_seconds: f64,
) -> Result<Option<ClaimRow>> {
    Ok(sqlx::query_as(&format!(
        "UPDATE oidc_claims
         SET lease_id = $2, lease_until = now() + make_interval(secs => $3), checks = checks + 1
         WHERE id = $1 AND state = 'pending' AND expires_at > now()
           AND (lease_until IS NULL OR lease_until <= now())
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(lease_id)
    .bind(lease_seconds)
    .fetch_optional(pool)
    .await?)
}

/// Ends a check that found no proof yet, adding the GitHub calls it made: the next may
/// start after `wait_seconds`.
pub async fn release(
    pool: &PgPool,
    id: &str,
    lease_id: &str,
    wait_seconds: f64,
    calls: i32,
) -> Result<()> {
    sqlx::query(
        "UPDATE oidc_claims SET lease_until = now() + make_interval(secs => $3),
                                github_calls = github_calls + $4
         WHERE id = $1 AND lease_id = $2 AND state = 'pending'",
    )
    .bind(id)
    .bind(lease_id)
    .bind(wait_seconds)
    .bind(calls)
    .execute(pool)
    .await?;
    Ok(())
}

/// Refuses a claim for good, if this check still holds it, adding the calls it made.
pub async fn fail(
    pool: &PgPool,
    id: &str,
    lease_id: &str,
    reason: &str,
    calls: i32,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE oidc_claims SET state = 'failed', failure = $3, lease_until = NULL,
                                github_calls = github_calls + $4
         WHERE id = $1 AND lease_id = $2 AND state = 'pending'",
    )
    .bind(id)
    .bind(lease_id)
    .bind(reason)
    .bind(calls)
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

/// Marks a claim exchanged, if this check still holds it: at most one token per claim.
pub async fn issue<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    lease_id: &str,
    jti: &str,
    calls: i32,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE oidc_claims SET state = 'issued', issued_jti = $3, lease_until = NULL,
                                github_calls = github_calls + $4
         WHERE id = $1 AND lease_id = $2 AND state = 'pending' AND expires_at > now()",
    )
    .bind(id)
    .bind(lease_id)
    .bind(jti)
    .bind(calls)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Deletes claims that expired more than `older_than_hours` ago.
pub async fn purge(pool: &PgPool, older_than_hours: i32) -> Result<u64> {
    Ok(
        sqlx::query(
            "DELETE FROM oidc_claims WHERE expires_at < now() - make_interval(hours => $1)",
        )
        .bind(older_than_hours)
        .execute(pool)
        .await?
        .rows_affected(),
    )
}
