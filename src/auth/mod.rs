//! Authentication: bearer tokens resolved to [`Principal`]s, with a short-lived cache
//! that every replica invalidates on revocation (LISTEN/NOTIFY on `kiln_auth`).
//! Authorization lives in [`authz`].

pub mod authz;
pub mod ci;
pub mod login;
pub mod principal;
pub mod throttle;
pub mod token;
pub mod trust;
pub mod web;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use authz::{Action, Target, Visible, authorize};
pub use principal::{CiGrant, CiTrust, Membership, Principal, PrincipalKind, Role, TrustedProject};
pub use token::{Scope, Scopes, TokenKind};

use crate::config::AuthConfig;
use crate::error::{Error, Result};

/// The NOTIFY channel on which revocations and membership changes are announced.
pub const INVALIDATION_CHANNEL: &str = "kiln_auth";
/// Payload that clears every cached principal.
pub const INVALIDATE_ALL: &str = "*";

struct CachedPrincipal {
    principal: Arc<Principal>,
    loaded_at: Instant,
    /// Seconds since the authenticator started at which last_used was last queued.
    last_touch: AtomicU64,
}

pub struct Authenticator {
    pool: PgPool,
    cache: quick_cache::sync::Cache<[u8; 32], Arc<CachedPrincipal>>,
    ttl: Duration,
    flush_every: Duration,
    epoch: Instant,
    pending_touches: Mutex<HashSet<String>>,
    /// Verifies CI providers' OIDC tokens; without it they are refused.
    ci_tokens: Option<Arc<crate::oidc::trusted::TrustedIssuers>>,
}

/// Extracts the token from an `Authorization` header value. A missing header and
/// `Bearer ` with an empty token are the same case (the depot CLI sends the latter).
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str> {
    const MISSING: &str = "missing bearer token; send `Authorization: Bearer <token>` (for the depot CLI, set DEPOT_TOKEN)";
    let Some(raw) = header else {
        return Err(Error::Unauthenticated(MISSING.into()));
    };
    let malformed = || {
        Error::Unauthenticated(
            "malformed Authorization header; expected `Bearer <token>` with a single token".into(),
        )
    };
    if raw.len() > token::MAX_TOKEN_LEN {
        return Err(Error::Unauthenticated(format!(
            "the Authorization header is {} bytes long; no valid token is over {} bytes",
            raw.len(),
            token::MAX_TOKEN_LEN
        )));
    }
    let text = std::str::from_utf8(raw).map_err(|_| malformed())?;
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(if text.trim().is_empty() {
            Error::Unauthenticated(MISSING.into())
        } else {
            malformed()
        });
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(Error::Unauthenticated(MISSING.into()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed());
    }
    Ok(token)
}

impl Authenticator {
    pub fn new(pool: PgPool, config: &AuthConfig) -> Self {
        Authenticator {
            pool,
            cache: quick_cache::sync::Cache::new(config.token_cache_capacity.max(16)),
            ttl: Duration::from_secs(config.token_cache_ttl_seconds),
            flush_every: Duration::from_secs(config.last_used_flush_seconds),
            epoch: Instant::now(),
            pending_touches: Mutex::new(HashSet::new()),
            ci_tokens: None,
        }
    }

    /// Accepts OIDC tokens from these issuers as CI principals.
    pub fn accept_ci_tokens(mut self, issuers: Arc<crate::oidc::trusted::TrustedIssuers>) -> Self {
        self.ci_tokens = Some(issuers);
        self
    }

    /// Resolves a request's `Authorization` header (exactly one) to a principal.
    pub async fn authenticate_headers(&self, headers: &http::HeaderMap) -> Result<Arc<Principal>> {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(Error::Unauthenticated(
                "more than one Authorization header; send exactly one `Bearer <token>`".into(),
            ));
        }
        self.authenticate(first.map(|v| v.as_bytes())).await
    }

    /// Resolves an `Authorization` header value to a principal, or a 401 that says why.
    pub async fn authenticate(&self, header: Option<&[u8]>) -> Result<Arc<Principal>> {
        let token = bearer_token(header)?;
        self.verify(token).await
    }

    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>> {
        if crate::oidc::verify::looks_like_jwt(token) {
            // Never cached: a single-use token must be refused on its second use.
            let Some(issuers) = &self.ci_tokens else {
                return Err(Error::Unauthenticated(
                    "this server does not accept OIDC tokens; use a Kiln token".into(),
                ));
            };
            let verified = issuers.verify(token).await?;
            metrics::counter!("kiln_ci_token_sign_ins_total", "provider" => format!("{:?}", verified.provider).to_lowercase()).increment(1);
            return Ok(Arc::new(ci::principal(&self.pool, verified).await?));
        }
        let hash = token::hash(token);
        if let Some(entry) = self.cache.get(&hash) {
            if entry.loaded_at.elapsed() < self.ttl {
                check_expiry(entry.principal.expires_at)?;
                self.touch(&entry);
                return Ok(entry.principal.clone());
            }
            self.cache.remove(&hash);
        }
        let principal = Arc::new(self.load(&hash).await?);
        let entry = Arc::new(CachedPrincipal {
            principal: principal.clone(),
            loaded_at: Instant::now(),
            last_touch: AtomicU64::new(u64::MAX),
        });
        self.touch(&entry);
        if !self.ttl.is_zero() {
            self.cache.insert(hash, entry);
        }
        Ok(principal)
    }

    async fn load(&self, hash: &[u8; 32]) -> Result<Principal> {
        let row = crate::db::tokens::find_by_hash(&self.pool, hash).await?;
        let Some(row) = row else {
            return Err(Error::Unauthenticated(
                "unknown token; check that it was copied whole, or create a new one".into(),
            ));
        };
        if row.revoked_at.is_some() {
            return Err(Error::Unauthenticated(
                "this token has been revoked; create a new one".into(),
            ));
        }
        check_expiry(row.expires_at)?;
        principal_of(row)
    }

    /// Queues a last_used_at write at most once per flush interval per token.
    fn touch(&self, entry: &CachedPrincipal) {
        let now = self.epoch.elapsed().as_secs();
        let last = entry.last_touch.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < self.flush_every.as_secs() {
            return;
        }
        if entry
            .last_touch
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && let Ok(mut pending) = self.pending_touches.lock()
        {
            pending.insert(entry.principal.token_id.clone());
        }
    }

    /// Caches a token this replica just minted and committed, so its first use skips the
    /// database (a build token is used within milliseconds of CreateBuild).
    pub fn prime(&self, hash: [u8; 32], principal: Principal) {
        if self.ttl.is_zero() {
            return;
        }
        let entry = Arc::new(CachedPrincipal {
            principal: Arc::new(principal),
            loaded_at: Instant::now(),
            last_touch: AtomicU64::new(u64::MAX),
        });
        self.cache.insert(hash, entry);
    }

    /// Drops one cached token (by hash) or, with `None`, all of them.
    pub fn invalidate(&self, hash: Option<&[u8; 32]>) {
        match hash {
            Some(h) => {
                self.cache.remove(h);
            }
            None => self.cache.clear(),
        }
    }

    /// Applies a `kiln_auth` notification payload: a hex token hash or `*`.
    pub fn apply_invalidation(&self, payload: &str) {
        let mut hash = [0u8; 32];
        match hex::decode_to_slice(payload, &mut hash) {
            Ok(()) => self.invalidate(Some(&hash)),
            Err(_) => self.invalidate(None),
        }
    }

    /// Writes queued last_used_at updates in one statement.
    pub async fn flush_last_used(&self) -> Result<usize> {
        let ids: Vec<String> = match self.pending_touches.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return Ok(0),
        };
        if ids.is_empty() {
            return Ok(0);
        }
        crate::db::tokens::touch_last_used(&self.pool, &ids).await?;
        Ok(ids.len())
    }

    /// Runs the last-used flusher until `cancel` fires, then flushes once more.
    pub async fn run_flusher(self: Arc<Self>, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(self.flush_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = cancel.cancelled() => break,
            }
            if let Err(err) = self.flush_last_used().await {
                tracing::debug!(error = %err, "could not record token last use; will retry");
            }
        }
        let _ = self.flush_last_used().await;
    }
}

/// The principal a stored token stands for.
fn principal_of(row: crate::db::tokens::TokenAuthRow) -> Result<Principal> {
    let kind: TokenKind = row
        .kind
        .parse()
        .map_err(|e: String| Error::internal(anyhow::anyhow!("stored token {}: {e}", row.id)))?;
    let memberships = row
        .memberships
        .iter()
        .filter_map(|pair| {
            let (org, role) = pair.rsplit_once(':')?;
            Some(Membership {
                organization_id: org.to_string(),
                role: Role::parse(role)?,
            })
        })
        .collect();
    Ok(Principal {
        token_id: row.id,
        kind: PrincipalKind::Token(kind),
        user_id: row.user_id,
        organization_id: row.organization_id,
        project_id: row.project_id,
        build_id: row.build_id,
        machine_id: row.machine_id,
        scopes: Scopes::from_stored(&row.scopes),
        memberships,
        // Only a user's own token (a dashboard session, say) carries the user's standing.
        server_admin: row.server_admin && kind == TokenKind::User,
        expires_at: row.expires_at,
        ci: None,
    })
}

fn check_expiry(expires_at: Option<DateTime<Utc>>) -> Result<()> {
    match expires_at {
        Some(at) if at <= Utc::now() => Err(Error::Unauthenticated(format!(
            "this token expired at {}; create a new one",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_bearer_are_the_same() {
        let a = bearer_token(None).unwrap_err().to_string();
        let b = bearer_token(Some(b"Bearer ")).unwrap_err().to_string();
        let c = bearer_token(Some(b"Bearer    ")).unwrap_err().to_string();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(a.contains("missing bearer token"));
    }

    #[test]
    fn malformed_headers_are_rejected() {
        for bad in [
            &b"Basic abc"[..],
            b"Bearer a b",
            b"Bearer \xff\xfe",
            b"Token abc",
            b"Bearerabc",
        ] {
            let err = bearer_token(Some(bad)).unwrap_err();
            assert!(matches!(err, Error::Unauthenticated(_)), "{bad:?}");
        }
        let long = format!("Bearer {}", "a".repeat(9000));
        assert!(bearer_token(Some(long.as_bytes())).is_err());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(Some(b"bearer kiln_u_x")).unwrap(), "kiln_u_x");
        assert_eq!(bearer_token(Some(b"BEARER kiln_u_x ")).unwrap(), "kiln_u_x");
    }
}
