//! A stand-in CI provider's OIDC issuer (GitHub Actions, GitLab, …): discovery, a JWK Set
//! that can rotate, tokens signed with RS256, and GitHub's runner endpoint that hands a
//! job its token (`ACTIONS_ID_TOKEN_REQUEST_URL`).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

pub const REQUEST_TOKEN: &str = "runner-request-token";

struct Key {
    kid: String,
    encoding: EncodingKey,
    n: String,
    e: String,
}

struct Stand {
    url: String,
    keys: Vec<Key>,
    /// Claims of the tokens the runner endpoint hands out.
    job_claims: Value,
    jwks_fetches: AtomicU64,
    token_requests: AtomicU64,
}

#[derive(Clone)]
pub struct CiIssuer {
    pub url: String,
    stand: Arc<Mutex<Stand>>,
    fetches: Arc<AtomicU64>,
}

fn new_key() -> Key {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let der = key.to_pkcs1_der().unwrap();
    let mut kid = [0u8; 8];
    rand_bytes(&mut kid);
    Key {
        kid: hex_string(&kid),
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        n: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        e: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    }
}

fn rand_bytes(out: &mut [u8]) {
    use rsa::rand_core::RngCore;
    rsa::rand_core::OsRng.fill_bytes(out);
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl CiIssuer {
    pub async fn start() -> CiIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fetches = Arc::new(AtomicU64::new(0));
        let stand = Arc::new(Mutex::new(Stand {
            url: url.clone(),
            keys: vec![new_key()],
            job_claims: json!({}),
            jwks_fetches: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
        }));
        let router = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/actions/token", get(runner_token))
            .with_state((stand.clone(), fetches.clone()));
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        CiIssuer {
            url,
            stand,
            fetches,
        }
    }

    /// `KILN_OIDC__TRUSTED_ISSUERS` naming this issuer as `provider`.
    pub fn trusted_as(&self, provider: &str, single_use: bool) -> String {
        format!(
            "[{{provider=\"{provider}\", issuer=\"{}\", single_use={single_use}}}]",
            self.url
        )
    }

    /// A token with `claims` on top of fresh registered claims (iss, aud, iat, nbf, exp,
    /// jti), signed by the newest key.
    pub fn token(&self, claims: Value) -> String {
        let stand = self.stand.lock().unwrap();
        let key = stand.keys.last().unwrap();
        let mut jti = [0u8; 16];
        rand_bytes(&mut jti);
        let mut payload = json!({
            "iss": stand.url, "aud": "https://depot.dev", "iat": now(), "nbf": now() - 5,
            "exp": now() + 300, "jti": hex_string(&jti),
        });
        for (k, v) in claims.as_object().unwrap() {
            if v.is_null() {
                payload.as_object_mut().unwrap().remove(k);
            } else {
                payload[k] = v.clone();
            }
        }
        let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &payload, &key.encoding).unwrap()
    }

    /// The public key set's first RSA modulus, as an HS256 secret would be misused.
    pub fn public_n(&self) -> String {
        self.stand.lock().unwrap().keys.last().unwrap().n.clone()
    }

    /// A new signing key, published next to the old ones.
    pub fn rotate(&self) {
        self.stand.lock().unwrap().keys.push(new_key());
    }

    /// What GitHub's runner endpoint puts into the job's tokens.
    pub fn set_job_claims(&self, claims: Value) {
        self.stand.lock().unwrap().job_claims = claims;
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }

    pub fn token_requests(&self) -> u64 {
        self.stand
            .lock()
            .unwrap()
            .token_requests
            .load(Ordering::SeqCst)
    }
}

type St = (Arc<Mutex<Stand>>, Arc<AtomicU64>);

async fn discovery(State((stand, _)): State<St>) -> Response {
    let url = stand.lock().unwrap().url.clone();
    axum::Json(json!({
        "issuer": url, "jwks_uri": format!("{url}/jwks"),
        "subject_types_supported": ["public"], "response_types_supported": ["id_token"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
    .into_response()
}

async fn jwks(State((stand, fetches)): State<St>) -> Response {
    fetches.fetch_add(1, Ordering::SeqCst);
    let keys: Vec<Value> = stand
        .lock()
        .unwrap()
        .keys
        .iter()
        .map(|k| json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": k.kid, "n": k.n, "e": k.e}))
        .collect();
    axum::Json(json!({ "keys": keys })).into_response()
}

/// GitHub's runner: `GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=…` with the request token.
async fn runner_token(
    State((stand, fetches)): State<St>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !auth.eq_ignore_ascii_case(&format!("bearer {REQUEST_TOKEN}")) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let (claims, url) = {
        let s = stand.lock().unwrap();
        s.token_requests.fetch_add(1, Ordering::SeqCst);
        (s.job_claims.clone(), s.url.clone())
    };
    let issuer = CiIssuer {
        url,
        stand,
        fetches,
    };
    let mut claims = claims;
    if let Some(aud) = query.get("audience") {
        claims["aud"] = json!(aud);
    }
    axum::Json(json!({ "value": issuer.token(claims) })).into_response()
}
