//! `depot login`: a device flow. StartLogin creates a request; a user signs in on the
//! approval page and approves it; FinishLogin, waiting on `NOTIFY kiln_login`, claims the
//! approval once and mints a user token. No token is ever stored in clear.

use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::auth::TokenKind;
use crate::db::ids::random_alphanumeric;
use crate::db::orgs::User;
use crate::db::tokens::{self, NewToken};
use crate::error::{Error, Result};

pub const LOGIN_CHANNEL: &str = "kiln_login";

pub fn hash_password(password: &str) -> Result<String> {
    if password.chars().count() < 8 {
        return Err(Error::invalid("password", "must be at least 8 characters"));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(anyhow::anyhow!("hashing password: {e}")))
}

pub async fn set_password(pool: &PgPool, user_id: &str, password: &str) -> Result<()> {
    let hash = hash_password(password)?;
    sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
        .bind(user_id)
        .bind(hash)
        .execute(pool)
        .await?;
    Ok(())
}

/// Checks an email and password; the same error for an unknown user and a bad password.
pub async fn sign_in(pool: &PgPool, email: &str, password: &str) -> Result<User> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: User,
        password_hash: Option<String>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, email, name, created_at, password_hash FROM users WHERE lower(email) = lower($1)",
    )
    .bind(email.trim())
    .fetch_optional(pool)
    .await?;
    let denied = || Error::Unauthenticated("wrong email or password".into());
    let Some(Row {
        user,
        password_hash: Some(hash),
    }) = row
    else {
        // Spend comparable time so unknown emails are not revealed by timing.
        let _ = hash_password("timing-equaliser");
        return Err(denied());
    };
    let parsed = PasswordHash::new(&hash).map_err(|_| denied())?;
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .map_err(|_| denied())?;
    Ok(user)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoginRequest {
    pub id: String,
    pub expires_at: DateTime<Utc>,
    pub approved_by: Option<String>,
    pub denied_at: Option<DateTime<Utc>>,
    pub consumed_at: Option<DateTime<Utc>>,
}

pub async fn start(pool: &PgPool, ttl: Duration) -> Result<LoginRequest> {
    Ok(sqlx::query_as(
        "INSERT INTO login_requests (id, expires_at) VALUES ($1, now() + make_interval(secs => $2))
         RETURNING id, expires_at, approved_by, denied_at, consumed_at",
    )
    .bind(random_alphanumeric(32))
    .bind(ttl.as_secs_f64())
    .fetch_one(pool)
    .await?)
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<LoginRequest>> {
    if id.len() > 64 {
        return Ok(None);
    }
    Ok(sqlx::query_as("SELECT id, expires_at, approved_by, denied_at, consumed_at FROM login_requests WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// Approves (or denies) a pending, unexpired request for `user_id`.
pub async fn decide(pool: &PgPool, id: &str, user_id: &str, approve: bool) -> Result<()> {
    let mut tx = pool.begin().await?;
    let updated = if approve {
        sqlx::query(
            "UPDATE login_requests SET approved_by = $2, approved_at = now()
             WHERE id = $1 AND approved_at IS NULL AND denied_at IS NULL AND expires_at > now()",
        )
    } else {
        sqlx::query(
            "UPDATE login_requests SET denied_at = now()
             WHERE id = $1 AND approved_at IS NULL AND denied_at IS NULL AND expires_at > now() AND $2 <> ''",
        )
    }
    .bind(id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(Error::FailedPrecondition(
            "this login request is unknown, expired or already decided; run `depot login` again"
                .into(),
        ));
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(LOGIN_CHANNEL)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub enum Claim {
    Token(String),
    Pending,
}

/// Claims an approved request exactly once and mints the user's token.
pub async fn claim(pool: &PgPool, id: &str) -> Result<Claim> {
    let Some(request) = get(pool, id).await? else {
        return Err(Error::NotFound(
            "unknown login request; run `depot login` again".into(),
        ));
    };
    if request.denied_at.is_some() {
        return Err(Error::PermissionDenied(
            "the login request was denied".into(),
        ));
    }
    if request.consumed_at.is_some() {
        return Err(Error::FailedPrecondition(
            "this login request was already used; run `depot login` again".into(),
        ));
    }
    if request.approved_by.is_none() {
        if request.expires_at <= Utc::now() {
            return Err(Error::DeadlineExceeded(
                "the login request expired before it was approved; run `depot login` again".into(),
            ));
        }
        return Ok(Claim::Pending);
    }
    let mut tx = pool.begin().await?;
    let user: Option<String> = sqlx::query_scalar(
        "UPDATE login_requests SET consumed_at = now()
         WHERE id = $1 AND approved_by IS NOT NULL AND consumed_at IS NULL RETURNING approved_by",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(user_id) = user else {
        return Err(Error::FailedPrecondition(
            "this login request was already used; run `depot login` again".into(),
        ));
    };
    let mut token = NewToken::new(TokenKind::User, "depot login");
    token.user_id = Some(user_id.clone());
    token.created_by = Some(user_id);
    let (_, minted) = tokens::create(&mut *tx, token).await?;
    tx.commit().await?;
    Ok(Claim::Token(minted.secret))
}

/// Failed sign-ins allowed per email within `THROTTLE_WINDOW`, per replica.
pub const MAX_FAILED_SIGN_INS: u32 = 10;
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Slows password guessing (and argon2 CPU burn) on the sign-in page: after
/// `MAX_FAILED_SIGN_INS` failures for an email within the window, further attempts are
/// refused without checking the password until the window passes.
#[derive(Default)]
pub struct SignInThrottle {
    failures: std::sync::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>,
}

impl SignInThrottle {
    fn key(email: &str) -> String {
        email.trim().to_ascii_lowercase()
    }

    /// `Err` with the wait left when the email is locked out.
    pub fn check(&self, email: &str) -> std::result::Result<(), Duration> {
        let Ok(mut failures) = self.failures.lock() else {
            return Ok(());
        };
        let key = Self::key(email);
        match failures.get(&key) {
            Some((_, since)) if since.elapsed() >= THROTTLE_WINDOW => {
                failures.remove(&key);
                Ok(())
            }
            Some((count, since)) if *count >= MAX_FAILED_SIGN_INS => {
                Err(THROTTLE_WINDOW.saturating_sub(since.elapsed()))
            }
            _ => Ok(()),
        }
    }

    pub fn failed(&self, email: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            if failures.len() > 100_000 {
                failures.retain(|_, (_, since)| since.elapsed() < THROTTLE_WINDOW);
            }
            let entry = failures
                .entry(Self::key(email))
                .or_insert((0, std::time::Instant::now()));
            entry.0 += 1;
        }
    }

    pub fn succeeded(&self, email: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&Self::key(email));
        }
    }
}
