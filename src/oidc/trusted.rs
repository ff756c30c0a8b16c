//! The issuers whose tokens Kiln accepts as credentials: its own (fork pull requests) and
//! the CI providers configured in `oidc.trusted_issuers`. A remote issuer's keys come from
//! its discovery document, are cached, and are refetched when a token names an unknown
//! kid, at most once per `oidc.jwks_refresh_min_seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Mutex;

use super::Issuer;
use super::http::{self, FetchError};
use super::verify::{self, PublicKey, Verified};
use crate::config::{OidcConfig, TrustedIssuerConfig, TrustedProvider};
use crate::error::{Error, Result};

/// Discovery documents and key sets larger than this are refused.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Keys beyond this many in one set are ignored.
const MAX_KEYS: usize = 64;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
const LEEWAY_SECONDS: i64 = 60;

/// A verified CI token, and how far its issuer is trusted.
#[derive(Debug, Clone)]
pub struct CiToken {
    pub issuer: String,
    pub provider: TrustedProvider,
    pub verified: Verified,
    /// Its issuer's tokens are single use and this one was used before: refuse it (the
    /// caller says why, after looking at who it was).
    pub replayed: bool,
}

struct KeyCache {
    keys: Arc<Vec<PublicKey>>,
    loaded_at: Option<Instant>,
}

struct RemoteIssuer {
    config: TrustedIssuerConfig,
    audiences: Vec<String>,
    cache: Mutex<KeyCache>,
}

pub struct TrustedIssuers {
    own: Arc<Issuer>,
    own_audiences: Vec<String>,
    remote: Vec<RemoteIssuer>,
    http: reqwest::Client,
    pool: PgPool,
    cache_for: Duration,
    refresh_min: Duration,
}

fn refuse(reason: impl Into<String>) -> Error {
    Error::Unauthenticated(format!("invalid OIDC token: {}", reason.into()))
}

impl TrustedIssuers {
    pub fn new(own: Arc<Issuer>, pool: PgPool, config: &OidcConfig) -> TrustedIssuers {
        let remote = config
            .trusted_issuers
            .iter()
            .map(|c| RemoteIssuer {
                audiences: if c.audiences.is_empty() {
                    config.audiences.clone()
                } else {
                    c.audiences.clone()
                },
                config: c.clone(),
                cache: Mutex::new(KeyCache {
                    keys: Arc::new(Vec::new()),
                    loaded_at: None,
                }),
            })
            .collect();
        TrustedIssuers {
            own,
            own_audiences: config.audiences.clone(),
            remote,
            http: http::client(Duration::from_secs(10)),
            pool,
            cache_for: Duration::from_secs(config.jwks_cache_seconds),
            refresh_min: Duration::from_secs(config.jwks_refresh_min_seconds),
        }
    }

    /// Verifies a token from any trusted issuer. A single-use issuer's token is accepted
    /// once, across replicas.
    pub async fn verify(&self, token: &str) -> Result<CiToken> {
        let issuer = verify::claimed_issuer(token)
            .ok_or_else(|| refuse("it has no readable issuer (iss) claim"))?;
        if issuer == self.own.issuer() {
            let verified = self
                .own
                .verify_signature(token, &self.own_audiences)
                .await?;
            let replayed = !self.spend(&issuer, &verified).await?;
            return Ok(CiToken {
                issuer,
                provider: TrustedProvider::GithubFork,
                verified,
                replayed,
            });
        }
        let Some(remote) = self.remote.iter().find(|r| r.config.issuer == issuer) else {
            return Err(refuse(format!(
                "tokens from {issuer:?} are not accepted here; the operator can add that issuer \
                 to oidc.trusted_issuers"
            )));
        };
        let policy = |keys_now: chrono::DateTime<Utc>| verify::Policy {
            issuer: &remote.config.issuer,
            audiences: &remote.audiences,
            leeway_seconds: LEEWAY_SECONDS,
            now: keys_now,
            require_jti: remote.config.single_use,
        };
        let mut keys = self.keys(remote, false).await?;
        if verify::unknown_kid(token, &keys) {
            keys = self.keys(remote, true).await?;
        }
        let verified = verify::verify(token, &keys, &policy(Utc::now()))?;
        let replayed = remote.config.single_use && !self.spend(&issuer, &verified).await?;
        Ok(CiToken {
            issuer,
            provider: remote.config.provider,
            verified,
            replayed,
        })
    }

    /// Records the token's `jti` for as long as the token verifies (`exp` plus the
    /// leeway): false if it was recorded before, on any replica.
    async fn spend(&self, issuer: &str, verified: &Verified) -> Result<bool> {
        crate::db::oidc_keys::remember_jti(
            &self.pool,
            issuer,
            &verified.jti,
            verified.accepted_until,
        )
        .await
    }

    /// The remote issuer's keys: cached, reloaded when stale, or on `unknown_kid` when
    /// the last load is older than the refresh minimum.
    async fn keys(&self, remote: &RemoteIssuer, unknown_kid: bool) -> Result<Arc<Vec<PublicKey>>> {
        let mut cache = remote.cache.lock().await;
        let fresh_enough = match cache.loaded_at {
            None => false,
            Some(at) if unknown_kid => at.elapsed() < self.refresh_min,
            Some(at) => at.elapsed() < self.cache_for,
        };
        if fresh_enough {
            return Ok(cache.keys.clone());
        }
        match self.load_keys(&remote.config).await {
            Ok(keys) => {
                cache.keys = Arc::new(keys);
                cache.loaded_at = Some(Instant::now());
                metrics::counter!("kiln_oidc_jwks_fetches_total", "result" => "ok").increment(1);
                Ok(cache.keys.clone())
            }
            Err(err) => {
                metrics::counter!("kiln_oidc_jwks_fetches_total", "result" => "error").increment(1);
                tracing::warn!(issuer = %remote.config.issuer, error = %err, "could not load an issuer's keys");
                // Keep serving the keys we had; try again after the refresh minimum.
                if !cache.keys.is_empty() {
                    cache.loaded_at = Instant::now()
                        .checked_sub(self.cache_for.saturating_sub(self.refresh_min))
                        .or(cache.loaded_at);
                    return Ok(cache.keys.clone());
                }
                Err(Error::Unavailable(format!(
                    "the keys of OIDC issuer {} could not be loaded; retry shortly",
                    remote.config.issuer
                )))
            }
        }
    }

    async fn load_keys(
        &self,
        config: &TrustedIssuerConfig,
    ) -> std::result::Result<Vec<PublicKey>, String> {
        let jwks_uri = if config.jwks_uri.is_empty() {
            let url = format!(
                "{}/.well-known/openid-configuration",
                config.issuer.trim_end_matches('/')
            );
            let doc: Value = http::fetch_json(self.http.get(&url), MAX_DOCUMENT_BYTES)
                .await
                .map_err(|e: FetchError| format!("discovery document {url}: {e}"))?;
            if doc.get("issuer").and_then(Value::as_str) != Some(config.issuer.as_str()) {
                return Err(format!(
                    "discovery document {url} names another issuer: {:?}",
                    doc.get("issuer")
                ));
            }
            doc.get("jwks_uri")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("discovery document {url} has no jwks_uri"))?
                .to_string()
        } else {
            config.jwks_uri.clone()
        };
        let set: Value = http::fetch_json(self.http.get(&jwks_uri), MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| format!("key set {jwks_uri}: {e}"))?;
        Ok(parse_key_set(&set, &config.algorithm))
    }
}

/// The RSA signing keys of a JWK Set usable with `algorithm`; others are skipped.
pub fn parse_key_set(set: &Value, algorithm: &str) -> Vec<PublicKey> {
    let Some(keys) = set.get("keys").and_then(Value::as_array) else {
        return Vec::new();
    };
    keys.iter()
        .filter(|k| k.get("kty").and_then(Value::as_str) == Some("RSA"))
        .filter(|k| {
            k.get("use")
                .and_then(Value::as_str)
                .is_none_or(|u| u == "sig")
        })
        .filter(|k| {
            k.get("alg")
                .and_then(Value::as_str)
                .is_none_or(|a| a == algorithm)
        })
        .filter_map(|k| {
            Some(PublicKey {
                kid: k.get("kid")?.as_str()?.to_string(),
                n: URL_SAFE_NO_PAD.decode(k.get("n")?.as_str()?).ok()?,
                e: URL_SAFE_NO_PAD.decode(k.get("e")?.as_str()?).ok()?,
            })
        })
        .take(MAX_KEYS)
        .collect()
}
