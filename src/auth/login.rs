//! `depot login`: a device flow in the manner of RFC 8628.
//!
//! StartLogin creates a request with two values: a long **claim secret**, returned to the
//! CLI only (as the `id` it later sends to FinishLogin), of which only the SHA-256 is
//! stored; and a short **user code** (`WDJB-MJHT`), which is the last segment of the
//! approval URL the CLI prints. The approval page shows the code so the user can check it
//! against their terminal; knowing it lets a signed-in user approve or deny, never claim
//! the token. FinishLogin, woken by `NOTIFY kiln_login` (payload: the request's internal
//! id, never either secret), claims the approval once and mints a user token in the same
//! transaction. Neither value is logged: request paths under `/login/` are redacted.

use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::auth::TokenKind;
use crate::auth::token::{NewToken, issue};
use crate::db::audit::{self, AuditEvent};
use crate::db::ids::{new_id, random_alphanumeric};
use crate::db::notify;
use crate::db::orgs::User;
use crate::error::{Error, Result};

pub const LOGIN_CHANNEL: &str = "kiln_login";

/// RFC 8628's user-code alphabet: consonants only, so codes spell no words and don't mix
/// up 0/O or 1/I. Eight of them carry about 34 bits.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
const USER_CODE_LEN: usize = 8;
const CLAIM_SECRET_LEN: usize = 43;
/// The longest email accepted anywhere (RFC 5321: 64 + 1 + 255).
pub const MAX_EMAIL_BYTES: usize = 320;
/// The longest password accepted anywhere.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Hashes a password (argon2id, off the async threads).
pub async fn hash_password(password: &str) -> Result<String> {
    if password.chars().count() < 8 {
        return Err(Error::invalid("password", "must be at least 8 characters"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::invalid("password", "must be at most 1024 bytes"));
    }
    let password = password.to_string();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::internal(anyhow::anyhow!("hashing password: {e}")))
    })
    .await
    .map_err(Error::internal)?
}

/// A valid argon2 hash of a random password, verified against for unknown emails so they
/// take as long as known ones.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(random_alphanumeric(32).as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// An email as users type it: trimmed, at most 320 bytes (RFC 5321's bound), one `@`
/// with something on each side, no spaces or control characters.
pub fn validate_email(email: &str) -> Result<String> {
    let email = email.trim();
    let valid = email.len() <= MAX_EMAIL_BYTES
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && local.len() <= 64 && !domain.is_empty() && !domain.contains('@')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email.to_string())
    } else {
        Err(Error::invalid("email", "must look like name@example.com"))
    }
}

/// Checks an email and password; the same error, after the same work, for an unknown
/// user and a wrong password. Callers validate the email and throttle the attempt
/// (`throttle::SignInThrottle`) first.
pub async fn sign_in(pool: &PgPool, email: &str, password: &str) -> Result<User> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: User,
        password_hash: Option<String>,
    }
    let denied = || Error::Unauthenticated("wrong email or password".into());
    if email.len() > MAX_EMAIL_BYTES || password.len() > MAX_PASSWORD_BYTES {
        return Err(denied());
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, email, name, created_at, password_hash FROM users WHERE lower(email) = lower($1)",
    )
    .bind(email.trim())
    .fetch_optional(pool)
    .await?;
    let (user, hash) = match row {
        Some(Row {
            user,
            password_hash: Some(hash),
        }) => (Some(user), hash),
        _ => (None, decoy_hash().to_string()),
    };
    let password = password.to_string();
    let verified = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    })
    .await
    .map_err(Error::internal)?;
    match user {
        Some(user) if verified => Ok(user),
        _ => Err(denied()),
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoginRequest {
    /// Internal id: safe to log and to send in notifications.
    pub id: String,
    pub user_code: String,
    pub expires_at: DateTime<Utc>,
    pub approved_by: Option<String>,
    pub denied_at: Option<DateTime<Utc>>,
    pub consumed_at: Option<DateTime<Utc>>,
}

impl LoginRequest {
    pub fn is_open(&self) -> bool {
        self.approved_by.is_none() && self.denied_at.is_none() && self.expires_at > Utc::now()
    }
}

const COLUMNS: &str = "id, user_code, expires_at, approved_by, denied_at, consumed_at";

/// What StartLogin hands the CLI. Both values are secrets of a sort: never log them.
pub struct StartedLogin {
    /// The claim secret, sent back by FinishLogin.
    pub claim_secret: String,
    /// `XXXX-XXXX`, the last segment of the approval URL.
    pub user_code: String,
}

fn new_user_code() -> String {
    let mut rng = rand::rng();
    let chars: String = (0..USER_CODE_LEN)
        .map(|_| USER_CODE_ALPHABET[rng.random_range(0..USER_CODE_ALPHABET.len())] as char)
        .collect();
    format!("{}-{}", &chars[..4], &chars[4..])
}

/// A user code as typed or pasted: case and dashes don't matter. `None` if it cannot be
/// one (checked before any database access).
pub fn normalize_user_code(text: &str) -> Option<String> {
    let chars: String = text
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (chars.len() == USER_CODE_LEN && chars.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)))
        .then(|| format!("{}-{}", &chars[..4], &chars[4..]))
}

fn claim_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Opens a login request, unless `max_open` are open already (exactly: requests count
/// and insert under one advisory lock, across replicas).
pub async fn start(pool: &PgPool, ttl: Duration, max_open: i64) -> Result<StartedLogin> {
    for _ in 0..5 {
        let claim_secret = random_alphanumeric(CLAIM_SECRET_LEN);
        let user_code = new_user_code();
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kiln:login-requests'))")
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO login_requests (id, claim_hash, user_code, expires_at)
             SELECT $1, $2, $3, now() + make_interval(secs => $4)
             WHERE (SELECT count(*) FROM login_requests
                    WHERE expires_at > now() AND consumed_at IS NULL AND denied_at IS NULL) < $5
             ON CONFLICT (user_code) DO NOTHING",
        )
        .bind(new_id())
        .bind(claim_hash(&claim_secret))
        .bind(&user_code)
        .bind(ttl.as_secs_f64())
        .bind(max_open)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if inserted == 1 {
            metrics::counter!("kiln_login_requests_total", "outcome" => "started").increment(1);
            return Ok(StartedLogin {
                claim_secret,
                user_code,
            });
        }
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM login_requests
             WHERE expires_at > now() AND consumed_at IS NULL AND denied_at IS NULL",
        )
        .fetch_one(pool)
        .await?;
        if open >= max_open {
            metrics::counter!("kiln_login_requests_total", "outcome" => "refused").increment(1);
            return Err(Error::ResourceExhausted(
                "too many `depot login` requests are open right now; retry in a few minutes".into(),
            ));
        }
        // A user code collided with another request's: draw again.
    }
    Err(Error::Unavailable(
        "could not allocate a login code; retry".into(),
    ))
}

/// The request a user code names (approval page).
pub async fn by_user_code(pool: &PgPool, code: &str) -> Result<Option<LoginRequest>> {
    let Some(code) = normalize_user_code(code) else {
        return Ok(None);
    };
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM login_requests WHERE user_code = $1"
    ))
    .bind(code)
    .fetch_optional(pool)
    .await?)
}

/// The request a claim secret belongs to (FinishLogin).
pub async fn by_claim_secret(pool: &PgPool, secret: &str) -> Result<Option<LoginRequest>> {
    if secret.is_empty() || secret.len() > 256 {
        return Ok(None);
    }
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM login_requests WHERE claim_hash = $1"
    ))
    .bind(claim_hash(secret))
    .fetch_optional(pool)
    .await?)
}

/// Approves (or denies) a pending, unexpired request for `user`, with its audit entry,
/// in one transaction.
pub async fn decide(pool: &PgPool, request_id: &str, user: &User, approve: bool) -> Result<()> {
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
    .bind(request_id)
    .bind(&user.id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(Error::FailedPrecondition(
            "this login request is unknown, expired or already decided; run `depot login` again"
                .into(),
        ));
    }
    audit::record(
        &mut *tx,
        AuditEvent::new(
            if approve {
                "login.approve"
            } else {
                "login.deny"
            },
            ("user", Some(user.id.clone())),
        )
        .target("login_request", request_id),
    )
    .await?;
    notify::send(&mut *tx, LOGIN_CHANNEL, request_id).await?;
    tx.commit().await?;
    Ok(())
}

pub enum Claim {
    Token(String),
    /// Not decided yet: wait for a notification about this request id.
    Pending {
        request_id: String,
    },
}

/// Claims an approved request exactly once and mints the user's token.
pub async fn claim(pool: &PgPool, claim_secret: &str) -> Result<Claim> {
    let Some(request) = by_claim_secret(pool, claim_secret).await? else {
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
        return Ok(Claim::Pending {
            request_id: request.id,
        });
    }
    let mut tx = pool.begin().await?;
    let user: Option<String> = sqlx::query_scalar(
        "UPDATE login_requests SET consumed_at = now()
         WHERE id = $1 AND approved_by IS NOT NULL AND consumed_at IS NULL RETURNING approved_by",
    )
    .bind(&request.id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(user_id) = user else {
        return Err(Error::FailedPrecondition(
            "this login request was already used; run `depot login` again".into(),
        ));
    };
    let mut token = NewToken::new(TokenKind::User, "depot login");
    token.user_id = Some(user_id.clone());
    token.created_by = Some(user_id.clone());
    let (info, minted) = issue(&mut *tx, token).await?;
    audit::record(
        &mut *tx,
        AuditEvent::new("token.create", ("user", Some(user_id)))
            .target("token", &info.id)
            .details(
                json!({ "kind": "user", "via": "depot login", "prefix": info.display_prefix }),
            ),
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("kiln_login_requests_total", "outcome" => "claimed").increment(1);
    Ok(Claim::Token(minted.secret))
}

/// Deletes requests closed (used, denied or expired) more than `older_than_hours` ago.
pub async fn purge_closed(pool: &PgPool, older_than_hours: i32) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM login_requests
         WHERE LEAST(COALESCE(consumed_at, 'infinity'), COALESCE(denied_at, 'infinity'), expires_at)
               < now() - make_interval(hours => $1)",
    )
    .bind(older_than_hours)
    .execute(pool)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_well_formed_and_normalize() {
        for _ in 0..100 {
            let code = new_user_code();
            assert_eq!(code.len(), 9);
            assert_eq!(normalize_user_code(&code), Some(code.clone()));
            assert_eq!(
                normalize_user_code(&code.to_lowercase().replace('-', "")),
                Some(code)
            );
        }
        assert_eq!(
            normalize_user_code("AAAA-AAAA"),
            None,
            "vowels never appear"
        );
        assert_eq!(normalize_user_code("BCDF"), None);
        assert_eq!(normalize_user_code("../../etc"), None);
    }
}
