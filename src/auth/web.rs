//! Dashboard sessions. A session is a user token (kind `user`, named "dashboard session",
//! expiring after `ttl`), its secret kept only in the browser's HttpOnly cookie: it is
//! hashed at rest, revocable on every replica, and authenticated by the same cache as any
//! other token. Forms carry a CSRF token derived from the session secret, which a
//! cross-site page cannot read.

use chrono::Utc;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::auth::TokenKind;
use crate::auth::token::{NewToken, issue};
use crate::db::audit::{self, AuditEvent};
use crate::db::orgs::User;
use crate::error::Result;

/// The name dashboard sessions' tokens carry.
pub const SESSION_TOKEN_NAME: &str = "dashboard session";

/// Starts a session for a user who just signed in: returns the session secret.
pub async fn start_session(pool: &PgPool, user: &User, ttl: chrono::Duration) -> Result<String> {
    let mut tx = pool.begin().await?;
    let mut token = NewToken::new(TokenKind::User, SESSION_TOKEN_NAME);
    token.user_id = Some(user.id.clone());
    token.created_by = Some(user.id.clone());
    token.expires_at = Some(Utc::now() + ttl);
    let (info, minted) = issue(&mut *tx, token).await?;
    audit::record(
        &mut *tx,
        AuditEvent::new("session.start", ("user", Some(user.id.clone())))
            .target("token", &info.id)
            .details(json!({ "prefix": info.display_prefix })),
    )
    .await?;
    tx.commit().await?;
    Ok(minted.secret)
}

/// The CSRF token of a session: a hash of its secret, so it needs no storage and no page
/// of another site can compute it.
pub fn csrf_token(session_secret: &str) -> String {
    use base64::Engine;
    let digest = Sha256::new()
        .chain_update(b"kiln dashboard csrf\0")
        .chain_update(session_secret.as_bytes())
        .finalize();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..24])
}

/// Whether a submitted CSRF token is the session's (constant time).
pub fn csrf_matches(session_secret: &str, submitted: &str) -> bool {
    let expected = csrf_token(session_secret);
    expected.len() == submitted.len()
        && expected
            .bytes()
            .zip(submitted.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let a = csrf_token("kiln_u_a");
        assert_eq!(a, csrf_token("kiln_u_a"));
        assert_ne!(a, csrf_token("kiln_u_b"));
        assert!(csrf_matches("kiln_u_a", &a));
        assert!(!csrf_matches("kiln_u_b", &a));
        assert!(!csrf_matches("kiln_u_a", ""));
    }
}
