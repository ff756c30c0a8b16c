//! The issuers whose tokens Kiln accepts as credentials: its own (fork pull requests) and
//! the CI providers configured in `oidc.trusted_issuers`. A remote issuer's keys come from
//! its discovery document, are cached, and are refetched when a token names an unknown
//! kid, at most once per `oidc.jwks_refresh_min_seconds`.
//!
//! Anyone can send a token naming a trusted issuer, so fetches are bounded per issuer: one
//! at a time (concurrent callers wait for it, and no lock is held while it runs), and
//! after a failure none for `oidc.jwks_failure_retry_seconds`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use serde_json::Value;
use sqlx::PgPool;

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
    /// The issuer trust policies must name to trust it: its own, except a fork pull
    /// request issuer's, whose tokens count for the GitHub it vouches for.
    pub policy_issuer: String,
    pub provider: TrustedProvider,
    pub verified: Verified,
    /// Its issuer's tokens are single use and this one was used before: refuse it (the
    /// caller says why, after looking at who it was).
    pub replayed: bool,
}

type KeyLoad = Shared<BoxFuture<'static, std::result::Result<Arc<Vec<PublicKey>>, String>>>;

#[derive(Default)]
struct KeyCache {
    keys: Arc<Vec<PublicKey>>,
    loaded_at: Option<Instant>,
    /// When the last load failed, and why.
    failed: Option<(Instant, String)>,
    /// The load in progress, which every caller that needs keys waits for.
    loading: Option<KeyLoad>,
}

struct RemoteIssuer {
    config: TrustedIssuerConfig,
    audiences: Vec<String>,
    cache: Arc<Mutex<KeyCache>>,
}

pub struct TrustedIssuers {
    own: Arc<Issuer>,
    /// The GitHub issuer fork pull request tokens count for.
    own_policy_issuer: String,
    own_audiences: Vec<String>,
    remote: Vec<RemoteIssuer>,
    http: reqwest::Client,
    pool: PgPool,
    cache_for: Duration,
    refresh_min: Duration,
    failure_retry: Duration,
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
                cache: Arc::default(),
            })
            .collect();
        TrustedIssuers {
            own,
            own_policy_issuer: crate::auth::trust::PolicyIssuers::from_config(config)
                .fork_github_issuer(),
            own_audiences: config.audiences.clone(),
            remote,
            http: http::client(Duration::from_secs(10)),
            pool,
            cache_for: Duration::from_secs(config.jwks_cache_seconds),
            refresh_min: Duration::from_secs(config.jwks_refresh_min_seconds),
            failure_retry: Duration::from_secs(config.jwks_failure_retry_seconds),
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
                policy_issuer: self.own_policy_issuer.clone(),
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
        let policy_issuer = match remote.config.provider {
            TrustedProvider::GithubFork => self.own_policy_issuer.clone(),
            _ => issuer.clone(),
        };
        Ok(CiToken {
            issuer,
            policy_issuer,
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
    /// the last load is older than the refresh minimum. One load runs at a time per
    /// issuer and the cache's lock is never held across it; for a while after a failed
    /// load, the keys held (or the failure) are answered without another.
    async fn keys(&self, remote: &RemoteIssuer, unknown_kid: bool) -> Result<Arc<Vec<PublicKey>>> {
        let load = {
            let mut cache = remote.cache.lock().unwrap_or_else(|e| e.into_inner());
            let fresh_enough = match cache.loaded_at {
                None => false,
                Some(at) if unknown_kid => at.elapsed() < self.refresh_min,
                Some(at) => at.elapsed() < self.cache_for,
            };
            if fresh_enough {
                return Ok(cache.keys.clone());
            }
            if let Some((at, reason)) = &cache.failed
                && at.elapsed() < self.failure_retry
            {
                metrics::counter!("kiln_oidc_jwks_fetches_total", "result" => "skipped")
                    .increment(1);
                if !cache.keys.is_empty() {
                    return Ok(cache.keys.clone());
                }
                return Err(unavailable(&remote.config.issuer, reason));
            }
            let load = match &cache.loading {
                Some(load) => load.clone(),
                None => {
                    let load = self.start_load(remote);
                    cache.loading = Some(load.clone());
                    load
                }
            };
            // Merely stale keys still verify while the load runs; a token naming an
            // unknown key waits for it.
            if !unknown_kid && !cache.keys.is_empty() {
                return Ok(cache.keys.clone());
            }
            load
        };
        match load.await {
            Ok(keys) => Ok(keys),
            Err(reason) => {
                let cache = remote.cache.lock().unwrap_or_else(|e| e.into_inner());
                // Keep serving the keys we had until the issuer answers again.
                if !cache.keys.is_empty() {
                    return Ok(cache.keys.clone());
                }
                Err(unavailable(&remote.config.issuer, &reason))
            }
        }
    }

    /// Starts loading `remote`'s keys in a task of its own (a caller that gives up does
    /// not abandon it), which stores the outcome in the cache when it ends.
    fn start_load(&self, remote: &RemoteIssuer) -> KeyLoad {
        let http = self.http.clone();
        let config = remote.config.clone();
        let cache = remote.cache.clone();
        let task = tokio::spawn(async move {
            let outcome = load_keys(&http, &config).await.map(Arc::new);
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.loading = None;
            match &outcome {
                Ok(keys) => {
                    metrics::counter!("kiln_oidc_jwks_fetches_total", "result" => "ok")
                        .increment(1);
                    cache.keys = keys.clone();
                    cache.loaded_at = Some(Instant::now());
                    cache.failed = None;
                }
                Err(err) => {
                    metrics::counter!("kiln_oidc_jwks_fetches_total", "result" => "error")
                        .increment(1);
                    tracing::warn!(issuer = %config.issuer, error = %err, "could not load an issuer's keys");
                    cache.failed = Some((Instant::now(), err.clone()));
                }
            }
            outcome
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the key load stopped: {e}")))
        }
        .boxed()
        .shared()
    }
}

fn unavailable(issuer: &str, reason: &str) -> Error {
    tracing::debug!(
        issuer,
        reason,
        "refusing a token: the issuer's keys are unavailable"
    );
    Error::Unavailable(format!(
        "the keys of OIDC issuer {issuer} could not be loaded; retry shortly"
    ))
}

/// Fetches an issuer's key set, through its discovery document unless `jwks_uri` is set.
async fn load_keys(
    http: &reqwest::Client,
    config: &TrustedIssuerConfig,
) -> std::result::Result<Vec<PublicKey>, String> {
    let jwks_uri = if config.jwks_uri.is_empty() {
        let url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let doc: Value = http::fetch_json(http.get(&url), MAX_DOCUMENT_BYTES)
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
    let set: Value = http::fetch_json(http.get(&jwks_uri), MAX_DOCUMENT_BYTES)
        .await
        .map_err(|e| format!("key set {jwks_uri}: {e}"))?;
    Ok(parse_key_set(&set, &config.algorithm))
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
