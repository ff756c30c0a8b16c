//! Verifying a JWT the way a careful relying party does (RFC 8725): a bounded size, the
//! algorithm pinned to RS256 (no `none`, no HS256 made with a public key), the key chosen
//! by `kid` from the issuer's set, `iss` and `aud` checked, and `exp`, `nbf` and `iat`
//! checked with a small leeway. Replays are refused by the caller, with the `jti`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Longer tokens are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a token must satisfy besides its signature.
pub struct Policy<'a> {
    pub issuer: &'a str,
    pub audiences: &'a [String],
    pub leeway_seconds: i64,
    pub now: DateTime<Utc>,
    /// Refuse tokens without a `jti` (needed to refuse replays).
    pub require_jti: bool,
}

/// An RSA public key from a JWK Set.
pub struct PublicKey {
    pub kid: String,
    pub n: Vec<u8>,
    pub e: Vec<u8>,
}

/// A token whose signature and claims checked out.
#[derive(Debug, Clone)]
pub struct Verified {
    pub kid: String,
    pub jti: String,
    pub expires_at: DateTime<Utc>,
    /// The last moment this token verifies: `exp` plus the leeway. A spent `jti` must be
    /// remembered until then, or the token is good again once it is forgotten.
    pub accepted_until: DateTime<Utc>,
    pub claims: Map<String, Value>,
}

fn refuse(reason: impl Into<String>) -> Error {
    Error::Unauthenticated(format!("invalid OIDC token: {}", reason.into()))
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| refuse(format!("its {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(refuse(format!("its {what} is not a JSON object"))),
    }
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<i64> {
    claims
        .get(name)
        .and_then(Value::as_i64)
        .ok_or_else(|| refuse(format!("the {name} claim is missing or not a whole number")))
}

/// The `iss` a token claims, read without verifying anything: it only picks which
/// issuer's keys and policy the token is then verified with.
pub fn claimed_issuer(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    decode_json(payload, "payload")
        .ok()?
        .get("iss")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Whether `token` has the shape of a JWT (as opposed to a Kiln token).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
}

/// Whether `token`'s header names a kid that `keys` lacks (worth reloading the keys for).
pub fn unknown_kid(token: &str, keys: &[PublicKey]) -> bool {
    token
        .split('.')
        .next()
        .and_then(|h| decode_json(h, "header").ok())
        .and_then(|h| h.get("kid").and_then(Value::as_str).map(str::to_string))
        .is_some_and(|kid| !keys.iter().any(|k| k.kid == kid))
}

/// Verifies `token` with the key its `kid` names among `keys`, under `policy`.
pub fn verify(token: &str, keys: &[PublicKey], policy: &Policy<'_>) -> Result<Verified> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(refuse(format!(
            "it is {} bytes long; the limit is {MAX_TOKEN_BYTES}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse("it is not three dot-separated parts"));
    };
    let header_json = decode_json(header, "header")?;
    match header_json.get("alg").and_then(Value::as_str) {
        Some("RS256") => {}
        Some(other) => {
            return Err(refuse(format!(
                "its algorithm is {other:?}; only RS256 is accepted"
            )));
        }
        None => return Err(refuse("its header names no algorithm")),
    }
    if let Some(typ) = header_json.get("typ")
        && !typ.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT"))
    {
        return Err(refuse(format!("its type is {typ}, not JWT")));
    }
    let kid = header_json
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| refuse("its header names no key (kid)"))?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| refuse(format!("no published key has kid {kid:?}")))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| refuse("its signature is not base64url"))?;
    RsaPublicKeyComponents {
        n: &key.n,
        e: &key.e,
    }
    .verify(
        &RSA_PKCS1_2048_8192_SHA256,
        format!("{header}.{payload}").as_bytes(),
        &signature,
    )
    .map_err(|_| refuse("its signature does not verify"))?;

    let claims = decode_json(payload, "payload")?;
    let issuer = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if issuer != policy.issuer {
        return Err(refuse(format!(
            "it was issued by {issuer:?}, not {:?}",
            policy.issuer
        )));
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences
        .iter()
        .any(|a| policy.audiences.iter().any(|allowed| allowed == a))
    {
        return Err(refuse(format!(
            "its audience {audiences:?} is not one this server accepts"
        )));
    }
    let now = policy.now.timestamp();
    let leeway = policy.leeway_seconds;
    let exp = numeric(&claims, "exp")?;
    if exp <= now - leeway {
        return Err(refuse("it has expired"));
    }
    // CircleCI's tokens carry no nbf; every other provider's do.
    if claims.contains_key("nbf") && numeric(&claims, "nbf")? > now + leeway {
        return Err(refuse("it is not valid yet (nbf is in the future)"));
    }
    if numeric(&claims, "iat")? > now + leeway {
        return Err(refuse("it was issued in the future (iat)"));
    }
    let jti = match claims.get("jti").and_then(Value::as_str) {
        Some(j) if !j.is_empty() && j.len() <= 256 => j.to_string(),
        _ if policy.require_jti => return Err(refuse("the jti claim is missing")),
        _ => String::new(),
    };
    let expires_at = DateTime::from_timestamp(exp, 0).unwrap_or(policy.now);
    Ok(Verified {
        kid: kid.to_string(),
        jti,
        expires_at,
        accepted_until: DateTime::from_timestamp(exp.saturating_add(leeway), 0)
            .unwrap_or(expires_at),
        claims,
    })
}
