//! Kiln's OpenID Connect issuer: RS256 signing keys shared by every replica (sealed in
//! Postgres, rotated on a schedule with overlap), the discovery document and JWKS, and
//! the minting of tokens.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio::sync::RwLock;

use crate::config::{Config, OidcConfig};
use crate::db::oidc_keys::{self as rows, NewSigningKey, SigningKeyRow};
use crate::error::{Error, Result};
use crate::pki::seal;

pub mod claims;
pub mod github;
pub mod http;
pub mod trusted;
pub mod verify;

/// The periodic job that creates the next signing key and removes expired ones.
pub const ROTATE_JOB: &str = "oidc.rotate";
const SEAL_PURPOSE: &str = "oidc-signing-key";
const RSA_BITS: usize = 2048;
/// Published keys outlive their last token by this much, for verifiers' clock skew.
const EXPIRY_MARGIN_SECONDS: i64 = 300;
/// `nbf` is this far before `iat`, for verifiers whose clocks run behind.
const NOT_BEFORE_SKEW_SECONDS: i64 = 30;
/// Clock skew tolerated when checking `exp`, `nbf` and `iat`.
const VERIFY_LEEWAY_SECONDS: i64 = 30;

/// Claims every token Kiln issues carries; the run claims come on top.
pub const REGISTERED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

/// Claims of a fork pull request's run, modelled on GitHub's (some only when known: `ref`
/// and `base_ref` need the pull request, `job_id` a log proof).
pub const RUN_CLAIMS: [&str; 22] = [
    "repository",
    "repository_id",
    "repository_owner",
    "repository_owner_id",
    "repository_visibility",
    "run_id",
    "run_number",
    "run_attempt",
    "actor",
    "actor_id",
    "triggering_actor",
    "workflow",
    "head_repository",
    "head_repository_id",
    "head_repository_owner",
    "head_ref",
    "head_sha",
    "sha",
    "event_name",
    "ref",
    "base_ref",
    "job_id",
];

struct Signer {
    kid: String,
    key: Arc<RsaKeyPair>,
    sign_until: DateTime<Utc>,
}

pub struct Issuer {
    pool: PgPool,
    kek: Option<[u8; 32]>,
    issuer: String,
    config: OidcConfig,
    signer: RwLock<Option<Signer>>,
    /// Published keys, as of when they were loaded.
    verification_keys: RwLock<Option<(std::time::Instant, Arc<Vec<verify::PublicKey>>)>>,
}

/// What one rotation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    pub created: Option<String>,
    pub expired: u64,
}

/// A token Kiln issued.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub kid: String,
    pub jti: String,
    pub expires_at: DateTime<Utc>,
}

impl Issuer {
    pub fn new(pool: PgPool, config: &Config) -> Issuer {
        Issuer {
            pool,
            kek: config.secrets.key_encryption_key(),
            issuer: config.oidc_issuer(),
            config: config.oidc.clone(),
            signer: RwLock::new(None),
            verification_keys: RwLock::new(None),
        }
    }

    /// The issuer URL (`iss`), without a trailing slash.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The path the issuer's URL has (empty or `/prefix`): its endpoints live under it.
    pub fn path_prefix(&self) -> String {
        url::Url::parse(&self.issuer)
            .map(|u| u.path().trim_end_matches('/').to_string())
            .unwrap_or_default()
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/.well-known/jwks", self.issuer)
    }

    /// The OpenID Connect Discovery 1.0 document.
    pub fn discovery(&self) -> Value {
        let mut claims: Vec<&str> = REGISTERED_CLAIMS.to_vec();
        claims.extend(RUN_CLAIMS);
        let mut doc = Map::new();
        doc.insert("issuer".into(), json!(self.issuer));
        if self.config.strict_discovery {
            doc.insert(
                "authorization_endpoint".into(),
                json!(format!("{}/oauth/authorize", self.issuer)),
            );
            doc.insert(
                "token_endpoint".into(),
                json!(format!("{}/oauth/token", self.issuer)),
            );
        }
        doc.insert("jwks_uri".into(), json!(self.jwks_uri()));
        doc.insert("response_types_supported".into(), json!(["id_token"]));
        doc.insert("subject_types_supported".into(), json!(["public"]));
        doc.insert(
            "id_token_signing_alg_values_supported".into(),
            json!(["RS256"]),
        );
        doc.insert("scopes_supported".into(), json!(["openid"]));
        doc.insert("claims_supported".into(), json!(claims));
        Value::Object(doc)
    }

    fn kek(&self) -> Result<&[u8; 32]> {
        self.kek.as_ref().ok_or_else(|| {
            Error::Unavailable(
                "Kiln's OIDC issuer is not set up: the operator must set secrets.key_encryption_key"
                    .into(),
            )
        })
    }

    /// The JWK Set: every key not yet expired, public members only.
    pub async fn jwks(&self) -> Result<Value> {
        self.kek()?;
        let mut keys = rows::published(&self.pool).await?;
        if keys.is_empty() {
            self.rotate().await?;
            keys = rows::published(&self.pool).await?;
        }
        let keys: Vec<Value> = keys
            .iter()
            .map(|k| json!({ "kty": "RSA", "use": "sig", "alg": "RS256", "kid": k.kid, "n": k.n, "e": k.e }))
            .collect();
        Ok(json!({ "keys": keys }))
    }

    /// Makes sure the next key exists in time to be published before it signs, and
    /// removes keys whose last token has expired. Safe on every replica at once: the
    /// decision is taken again under a lock.
    pub async fn rotate(&self) -> Result<Rotation> {
        let kek = *self.kek()?;
        let mut rotation = Rotation {
            expired: rows::delete_expired(&self.pool).await?,
            created: None,
        };
        rows::forget_expired_jtis(&self.pool).await?;
        if !self.needs_key(rows::latest(&self.pool).await?.as_ref()) {
            return Ok(rotation);
        }
        // Generating a key takes a while; do it before taking the lock.
        let generated = tokio::task::spawn_blocking(generate_key)
            .await
            .map_err(Error::internal)??;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kiln:oidc-rotate'))")
            .execute(&mut *tx)
            .await?;
        let latest = rows::latest(&mut *tx).await?;
        if !self.needs_key(latest.as_ref()) {
            return Ok(rotation);
        }
        let now = Utc::now();
        let sign_from = latest.map_or(now, |l| l.sign_until.max(now));
        let sign_until = sign_from + ChronoDuration::days(self.config.key_rotation_days as i64);
        let expires_at = sign_until
            + ChronoDuration::seconds(
                self.config.token_lifetime_seconds as i64 + EXPIRY_MARGIN_SECONDS,
            );
        let sealed = seal::seal(&kek, SEAL_PURPOSE, &generated.pkcs8)?;
        rows::insert(
            &mut *tx,
            &NewSigningKey {
                kid: &generated.kid,
                n: &generated.n,
                e: &generated.e,
                private_key_sealed: &sealed,
                sign_from,
                sign_until,
                expires_at,
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(kid = %generated.kid, %sign_from, %sign_until, "created an OIDC signing key");
        rotation.created = Some(generated.kid);
        Ok(rotation)
    }

    /// Whether a key must be created now: none exists, or the last one stops signing
    /// within the pre-publication window.
    fn needs_key(&self, latest: Option<&SigningKeyRow>) -> bool {
        let window = ChronoDuration::hours(self.config.key_prepublish_hours as i64);
        latest.is_none_or(|l| l.sign_until - Utc::now() <= window)
    }

    async fn signer(&self) -> Result<(String, Arc<RsaKeyPair>)> {
        if let Some(s) = self.signer.read().await.as_ref()
            && Utc::now() < s.sign_until
        {
            return Ok((s.kid.clone(), s.key.clone()));
        }
        let mut slot = self.signer.write().await;
        let row = match rows::signing(&self.pool).await? {
            Some(row) => row,
            None => {
                self.rotate().await?;
                rows::signing(&self.pool).await?.ok_or_else(|| {
                    Error::internal(anyhow::anyhow!("no OIDC signing key after rotation"))
                })?
            }
        };
        let der = seal::open(self.kek()?, SEAL_PURPOSE, &row.private_key_sealed)?;
        let key = Arc::new(RsaKeyPair::from_pkcs8(&der).map_err(|e| {
            Error::internal(anyhow::anyhow!(
                "stored OIDC key {} is unusable: {e}",
                row.kid
            ))
        })?);
        *slot = Some(Signer {
            kid: row.kid.clone(),
            key: key.clone(),
            sign_until: row.sign_until,
        });
        Ok((row.kid, key))
    }

    /// Signs a token for `audience` with `claims` (the subject and run claims) on top of
    /// the registered ones, which Kiln sets.
    pub async fn mint(&self, audience: &str, claims: Map<String, Value>) -> Result<Minted> {
        let (kid, key) = self.signer().await?;
        let now = Utc::now();
        let iat = now.timestamp();
        let expires_at = now + ChronoDuration::seconds(self.config.token_lifetime_seconds as i64);
        let jti = random_uuid();
        let mut payload = Map::new();
        payload.insert("iss".into(), json!(self.issuer));
        payload.insert("aud".into(), json!(audience));
        payload.insert("jti".into(), json!(jti));
        payload.insert("iat".into(), json!(iat));
        payload.insert("nbf".into(), json!(iat - NOT_BEFORE_SKEW_SECONDS));
        payload.insert("exp".into(), json!(expires_at.timestamp()));
        for (name, value) in claims {
            if !REGISTERED_CLAIMS.contains(&name.as_str()) || name == "sub" {
                payload.insert(name, value);
            }
        }
        let header = json!({ "alg": "RS256", "typ": "JWT", "kid": kid });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(payload).to_string())
        );
        let mut signature = vec![0u8; key.public().modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut signature,
        )
        .map_err(|_| Error::internal(anyhow::anyhow!("RS256 signing failed")))?;
        metrics::counter!("kiln_oidc_tokens_issued_total").increment(1);
        Ok(Minted {
            token: format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)),
            kid,
            jti,
            expires_at,
        })
    }
}

impl Issuer {
    /// Verifies a token this issuer signed, for one of `audiences`, and spends its `jti`:
    /// the same token is refused the second time, on any replica.
    pub async fn verify(&self, token: &str, audiences: &[String]) -> Result<verify::Verified> {
        let verified = self.verify_signature(token, audiences).await?;
        if !rows::remember_jti(&self.pool, &self.issuer, &verified.jti, verified.expires_at).await?
        {
            return Err(Error::Unauthenticated(
                "invalid OIDC token: it was already used; request a new one".into(),
            ));
        }
        Ok(verified)
    }

    /// Verifies a token this issuer signed, for one of `audiences`, without spending its
    /// `jti` (the caller does).
    pub async fn verify_signature(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<verify::Verified> {
        if token.len() > verify::MAX_TOKEN_BYTES {
            return verify::verify(token, &[], &self.policy(audiences));
        }
        let mut keys = self.verification_keys(false).await?;
        if verify::unknown_kid(token, &keys) {
            // A key this replica has not seen yet (just rotated in): look once more.
            keys = self.verification_keys(true).await?;
        }
        verify::verify(token, &keys, &self.policy(audiences))
    }

    /// The published keys, cached for a minute; `refresh` reloads them at most once a
    /// second (an unknown kid must not turn every request into a query).
    async fn verification_keys(&self, refresh: bool) -> Result<Arc<Vec<verify::PublicKey>>> {
        let max_age = if refresh {
            std::time::Duration::from_secs(1)
        } else {
            std::time::Duration::from_secs(60)
        };
        if let Some((loaded, keys)) = self.verification_keys.read().await.as_ref()
            && loaded.elapsed() < max_age
        {
            return Ok(keys.clone());
        }
        let keys: Arc<Vec<verify::PublicKey>> = Arc::new(
            rows::published(&self.pool)
                .await?
                .into_iter()
                .filter_map(|k| {
                    Some(verify::PublicKey {
                        n: URL_SAFE_NO_PAD.decode(&k.n).ok()?,
                        e: URL_SAFE_NO_PAD.decode(&k.e).ok()?,
                        kid: k.kid,
                    })
                })
                .collect(),
        );
        *self.verification_keys.write().await = Some((std::time::Instant::now(), keys.clone()));
        Ok(keys)
    }

    fn policy<'a>(&'a self, audiences: &'a [String]) -> verify::Policy<'a> {
        verify::Policy {
            issuer: &self.issuer,
            audiences,
            leeway_seconds: VERIFY_LEEWAY_SECONDS,
            now: Utc::now(),
            require_jti: true,
        }
    }
}

struct GeneratedKey {
    kid: String,
    n: String,
    e: String,
    pkcs8: Vec<u8>,
}

fn generate_key() -> Result<GeneratedKey> {
    use rsa::pkcs8::EncodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
        .map_err(|e| Error::internal(anyhow::anyhow!("generating an RSA key: {e}")))?;
    let pkcs8 = key
        .to_pkcs8_der()
        .map_err(|e| Error::internal(anyhow::anyhow!("encoding an RSA key: {e}")))?;
    let mut kid = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut kid);
    Ok(GeneratedKey {
        kid: URL_SAFE_NO_PAD.encode(kid),
        // BigUint's big-endian bytes have no leading zero octets (RFC 7518 §6.3.1).
        n: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        e: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        pkcs8: pkcs8.as_bytes().to_vec(),
    })
}

/// A random (version 4) UUID, for `jti`.
pub(crate) fn random_uuid() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_minimal_big_endian_members() {
        let key = generate_key().unwrap();
        let n = URL_SAFE_NO_PAD.decode(&key.n).unwrap();
        assert_eq!(n.len(), 256, "2048-bit modulus");
        assert_ne!(n[0], 0, "no leading zero octet");
        assert_eq!(key.e, "AQAB");
        assert!(RsaKeyPair::from_pkcs8(&key.pkcs8).is_ok());
        assert_ne!(generate_key().unwrap().kid, key.kid);
    }

    #[test]
    fn jtis_are_version_4_uuids() {
        let a = random_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, random_uuid());
    }
}
