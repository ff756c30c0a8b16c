//! Kiln's OIDC issuer: discovery, JWKS, signing keys shared by replicas and rotated with
//! overlap. Tokens are checked with an independent JWT implementation (`jsonwebtoken`).
mod common;

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{KEK_B64, Server, TestDb, app_with};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use kiln::app::AppState;
use serde_json::{Map, Value, json};

const ISSUER: &str = "https://issuer.kiln.test/oidc";

fn issuer_app(db: &TestDb, extra: &[(&str, &str)]) -> AppState {
    let mut env = vec![
        ("KILN_SECRETS__KEY_ENCRYPTION_KEY", KEK_B64),
        ("KILN_OIDC__ISSUER_URL", ISSUER),
        ("KILN_OIDC__KEY_ROTATION_DAYS", "1"),
        ("KILN_OIDC__KEY_PREPUBLISH_HOURS", "6"),
    ];
    env.extend_from_slice(extra);
    app_with(db, &env)
}

fn run_claims() -> Map<String, Value> {
    json!({
        "sub": "repo:octo/widget:pull_request",
        "repository": "octo/widget",
        "repository_id": "42",
        "event_name": "pull_request",
    })
    .as_object()
    .unwrap()
    .clone()
}

/// Verifies `token` against `jwks` as a relying party would: key by kid, RS256 pinned,
/// iss and aud checked.
fn verify(token: &str, jwks: &Value, audience: &str) -> jsonwebtoken::errors::Result<Value> {
    let header = jsonwebtoken::decode_header(token)?;
    let kid = header.kid.unwrap_or_default();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .ok_or(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)?;
    let decoding =
        DecodingKey::from_rsa_components(key["n"].as_str().unwrap(), key["e"].as_str().unwrap())?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
    validation.leeway = 5;
    Ok(jsonwebtoken::decode::<Value>(token, &decoding, &validation)?.claims)
}

async fn key_count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM oidc_signing_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn discovery_and_jwks_come_from_config_not_the_request() {
    let db = TestDb::new().await;
    let server = Server::start(&db, &[("KILN_OIDC__ISSUER_URL", ISSUER)]).await;
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("{}{path}", server.url))
            .header("host", "attacker.example")
            .header("x-forwarded-host", "attacker.example")
            .send()
    };

    let answer = get("/oidc/.well-known/openid-configuration").await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(
        answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert!(answer.headers().contains_key("cache-control"));
    let doc: Value = answer.json().await.unwrap();
    assert_eq!(doc["issuer"], ISSUER);
    assert_eq!(doc["jwks_uri"], format!("{ISSUER}/.well-known/jwks"));
    assert_eq!(
        doc["authorization_endpoint"],
        format!("{ISSUER}/oauth/authorize")
    );
    assert_eq!(doc["token_endpoint"], format!("{ISSUER}/oauth/token"));
    assert_eq!(doc["response_types_supported"], json!(["id_token"]));
    assert_eq!(doc["subject_types_supported"], json!(["public"]));
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    let claims: HashSet<&str> = doc["claims_supported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for claim in [
        "sub",
        "aud",
        "jti",
        "nbf",
        "repository",
        "run_id",
        "head_repository",
        "sha",
    ] {
        assert!(
            claims.contains(claim),
            "{claim} missing from claims_supported"
        );
    }

    // Both JWKS paths; public members only, in RFC 7518's encoding.
    for path in ["/oidc/.well-known/jwks", "/oidc/.well-known/jwks.json"] {
        let answer = get(path).await.unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        assert!(
            answer.headers()["cache-control"]
                .to_str()
                .unwrap()
                .contains("max-age")
        );
        let jwks: Value = answer.json().await.unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1, "{jwks}");
        let key = keys[0].as_object().unwrap();
        let members: HashSet<&str> = key.keys().map(String::as_str).collect();
        assert_eq!(
            members,
            HashSet::from(["kty", "use", "alg", "kid", "n", "e"])
        );
        assert_eq!(
            (key["kty"].as_str(), key["alg"].as_str()),
            (Some("RSA"), Some("RS256"))
        );
        let n = URL_SAFE_NO_PAD.decode(key["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256, "2048-bit");
        assert_ne!(n[0], 0);
        assert_eq!(key["e"], "AQAB");
    }

    // The OAuth endpoints strict discovery names answer an OAuth error, not a 404.
    let answer = http
        .post(format!("{}/oidc/oauth/token", server.url))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let error: Value = answer.json().await.unwrap();
    assert_eq!(error["error"], "unsupported_grant_type");
    assert!(
        error["error_description"]
            .as_str()
            .unwrap()
            .contains("/claim")
    );
    server.stop().await;

    // GitHub's shape on request.
    let relaxed = issuer_app(&db, &[("KILN_OIDC__STRICT_DISCOVERY", "false")]);
    let doc = relaxed.oidc.discovery();
    assert!(doc.get("authorization_endpoint").is_none());
    assert!(doc.get("token_endpoint").is_none());
}

#[tokio::test]
async fn minted_tokens_verify_against_the_published_keys() {
    let db = TestDb::new().await;
    let app = issuer_app(&db, &[]);
    let minted = app.oidc.mint("kiln-ci", run_claims()).await.unwrap();
    let jwks = app.oidc.jwks().await.unwrap();
    let claims = verify(&minted.token, &jwks, "kiln-ci").expect("the token verifies");
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"], "kiln-ci");
    assert_eq!(claims["sub"], "repo:octo/widget:pull_request");
    assert_eq!(claims["repository"], "octo/widget");
    assert_eq!(claims["jti"], minted.jti.as_str());
    let (iat, nbf, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["nbf"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 300, "five minutes");
    assert!(nbf <= iat);
    let header = jsonwebtoken::decode_header(&minted.token).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some(minted.kid.as_str()));

    // Registered claims are Kiln's: a caller cannot set iss, aud, exp or jti.
    let mut forged = run_claims();
    forged.insert("iss".into(), json!("https://elsewhere.example"));
    forged.insert("exp".into(), json!(9_999_999_999i64));
    forged.insert("jti".into(), json!("fixed"));
    let minted_forged = app.oidc.mint("kiln-ci", forged).await.unwrap();
    let claims = verify(&minted_forged.token, &jwks, "kiln-ci").unwrap();
    assert_eq!(claims["iss"], ISSUER);
    assert_ne!(claims["jti"], "fixed");
    assert!(claims["exp"].as_i64().unwrap() < 9_999_999_999);
    assert_ne!(minted_forged.jti, minted.jti);

    // What a relying party must refuse: another audience, a changed payload.
    assert!(verify(&minted.token, &jwks, "someone-else").is_err());
    let parts: Vec<&str> = minted.token.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = json!("repo:octo/other:pull_request");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        parts[2]
    );
    assert!(verify(&tampered, &jwks, "kiln-ci").is_err());
}

#[tokio::test]
async fn keys_are_shared_sealed_and_rotated_once_with_overlap() {
    let db = TestDb::new().await;
    let (a, b) = (issuer_app(&db, &[]), issuer_app(&db, &[]));

    // Two replicas rotating at once create one key; both sign with it.
    let (ra, rb) = tokio::join!(a.oidc.rotate(), b.oidc.rotate());
    let created: Vec<String> = [ra.unwrap(), rb.unwrap()]
        .into_iter()
        .filter_map(|r| r.created)
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(key_count(&db).await, 1);
    let first = a.oidc.mint("aud", run_claims()).await.unwrap();
    assert_eq!(first.kid, created[0]);
    assert_eq!(
        b.oidc.mint("aud", run_claims()).await.unwrap().kid,
        first.kid
    );

    // The private key is sealed: the stored bytes are no PKCS#8 key.
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT private_key_sealed FROM oidc_signing_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(ring::signature::RsaKeyPair::from_pkcs8(&sealed).is_err());

    // Nothing to do while the key has more than the pre-publication window to go.
    assert_eq!(a.oidc.rotate().await.unwrap().created, None);

    // 20 hours later (of a 24-hour key, published 6 hours ahead): the next key is
    // created once and published, but the current one still signs.
    shift_keys(&db, 20 * 60).await;
    let (ra, rb) = tokio::join!(a.oidc.rotate(), b.oidc.rotate());
    let next: Vec<String> = [ra.unwrap(), rb.unwrap()]
        .into_iter()
        .filter_map(|r| r.created)
        .collect();
    assert_eq!(next.len(), 1, "{next:?}");
    let jwks = a.oidc.jwks().await.unwrap();
    let kids: HashSet<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, HashSet::from([first.kid.as_str(), next[0].as_str()]));
    let fresh = issuer_app(&db, &[]);
    let in_flight = fresh.oidc.mint("aud", run_claims()).await.unwrap();
    assert_eq!(
        in_flight.kid, first.kid,
        "the new key does not sign before its time"
    );

    // A minute past the first key's signing window: the next key signs, and tokens the
    // first one signed still verify, since it stays published until they expire.
    shift_keys(&db, 4 * 60 + 1).await;
    let later = issuer_app(&db, &[]);
    let rotated = later.oidc.mint("aud", run_claims()).await.unwrap();
    assert_eq!(rotated.kid, next[0]);
    let jwks = later.oidc.jwks().await.unwrap();
    assert!(verify(&in_flight.token, &jwks, "aud").is_ok());
    assert!(verify(&rotated.token, &jwks, "aud").is_ok());

    // Once the first key's last token has expired, rotation unpublishes it.
    sqlx::query(
        "UPDATE oidc_signing_keys SET expires_at = now() - interval '1 second' WHERE kid = $1",
    )
    .bind(&first.kid)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(later.oidc.rotate().await.unwrap().expired, 1);
    let jwks = later.oidc.jwks().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert!(verify(&in_flight.token, &jwks, "aud").is_err());
}

/// Moves every key's times `minutes` into the past, as if that much time went by.
async fn shift_keys(db: &TestDb, minutes: i32) {
    sqlx::query(
        "UPDATE oidc_signing_keys SET created_at = created_at - make_interval(mins => $1),
             sign_from = sign_from - make_interval(mins => $1),
             sign_until = sign_until - make_interval(mins => $1),
             expires_at = expires_at - make_interval(mins => $1)",
    )
    .bind(minutes)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn without_a_key_encryption_key_the_issuer_says_what_is_missing() {
    let db = TestDb::new().await;
    let app = app_with(&db, &[("KILN_SECRETS__KEY_ENCRYPTION_KEY", "")]);
    let err = app.oidc.jwks().await.unwrap_err();
    assert!(
        err.to_string().contains("secrets.key_encryption_key"),
        "{err}"
    );
    assert!(app.oidc.mint("aud", run_claims()).await.is_err());
    assert_eq!(key_count(&db).await, 0);
}

/// Runs a verifier script with `request` on stdin and returns its JSON verdicts.
fn run_verifier(program: &str, args: &[&str], cwd: &str, request: &Value) -> Value {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{program} printed {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// PyJWT (with PyJWKClient) and npm `jose` verify Kiln's tokens from the discovery
/// document alone and refuse the forgeries; authlib finds the strict document valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_verifiers_accept_kilns_tokens_and_refuse_forgeries() {
    let (Ok(python), Ok(jose_dir)) = (
        std::env::var("TEST_OIDC_PYTHON"),
        std::env::var("TEST_JOSE_DIR"),
    ) else {
        panic!(
            "TEST_OIDC_PYTHON / TEST_JOSE_DIR are not set: run the tests through `bash scripts/test.sh`, which installs PyJWT and jose"
        );
    };
    let db = TestDb::new().await;
    let server = Server::start(&db, &[]).await;
    let issuer = server.url.clone();
    let app = app_with(
        &db,
        &[
            ("KILN_SECRETS__KEY_ENCRYPTION_KEY", KEK_B64),
            ("KILN_OIDC__ISSUER_URL", &issuer),
        ],
    );
    let good = app.oidc.mint("kiln-test", run_claims()).await.unwrap();
    let other_audience = app.oidc.mint("someone-else", run_claims()).await.unwrap();
    let parts: Vec<&str> = good.token.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let encode = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = json!("repo:octo/other:pull_request");
    let tampered = format!("{}.{}.{}", parts[0], encode(&payload), parts[2]);
    let none = format!(
        "{}.{}.",
        encode(&json!({"alg": "none", "typ": "JWT", "kid": header["kid"]})),
        parts[1]
    );
    // HS256 "signed" with the public key, the classic algorithm confusion.
    let jwks = app.oidc.jwks().await.unwrap();
    let public_n = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["n"].as_str().unwrap())
        .unwrap();
    let hs_input = format!(
        "{}.{}",
        encode(&json!({"alg": "HS256", "typ": "JWT", "kid": header["kid"]})),
        parts[1]
    );
    let hs_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public_n);
    let hs256 = format!(
        "{hs_input}.{}",
        URL_SAFE_NO_PAD.encode(ring::hmac::sign(&hs_key, hs_input.as_bytes()))
    );
    let unknown_kid = format!(
        "{}.{}.{}",
        encode(&json!({"alg": "RS256", "typ": "JWT", "kid": "no-such-key"})),
        parts[1],
        parts[2]
    );
    let strict = issuer_app(&db, &[]).oidc.discovery();
    let relaxed = issuer_app(&db, &[("KILN_OIDC__STRICT_DISCOVERY", "false")])
        .oidc
        .discovery();
    let request = json!({
        "issuer": issuer,
        "audience": "kiln-test",
        "tokens": {
            "good": good.token,
            "wrong_audience": other_audience.token,
            "tampered": tampered,
            "alg_none": none,
            "hs256_with_public_key": hs256,
            "unknown_kid": unknown_kid,
        },
        "strict_documents": { "strict": strict, "github_shape": relaxed },
    });

    let script = |name: &str| format!("{}/tests/fixtures/oidc/{name}", env!("CARGO_MANIFEST_DIR"));
    // The verifiers call back into this process's server: run them off the runtime.
    let (py_request, py_script) = (request.clone(), script("verify_pyjwt.py"));
    let pyjwt =
        tokio::task::spawn_blocking(move || run_verifier(&python, &[&py_script], ".", &py_request))
            .await
            .unwrap();
    // Node resolves `jose` from the working directory's node_modules.
    let jose_script = std::fs::read_to_string(script("verify_jose.mjs")).unwrap();
    let jose_request = request.clone();
    let jose = tokio::task::spawn_blocking(move || {
        run_verifier(
            "node",
            &["--input-type=module", "-e", &jose_script],
            &jose_dir,
            &jose_request,
        )
    })
    .await
    .unwrap();
    for (verifier, verdicts) in [("PyJWT", &pyjwt), ("jose", &jose)] {
        assert_eq!(verdicts["discovery_issuer"], issuer.as_str(), "{verifier}");
        assert_eq!(
            verdicts["good"], "ok:repo:octo/widget:pull_request",
            "{verifier}: {verdicts}"
        );
        for case in [
            "wrong_audience",
            "tampered",
            "alg_none",
            "hs256_with_public_key",
            "unknown_kid",
        ] {
            assert!(
                verdicts[case].as_str().unwrap().starts_with("rejected:"),
                "{verifier} accepted {case}: {verdicts}"
            );
        }
    }
    assert_eq!(pyjwt["strict"], "valid", "{pyjwt}");
    assert!(
        pyjwt["github_shape"]
            .as_str()
            .unwrap()
            .contains("authorization_endpoint"),
        "{pyjwt}"
    );
    server.stop().await;
}

/// Signs `claims` with the issuer's current key, as only Kiln could (the test opens the
/// sealed key with the test KEK): tokens that are validly signed but wrong otherwise.
async fn sign_as_kiln(db: &TestDb, header: Value, claims: Value) -> String {
    let sealed: Vec<u8> = sqlx::query_scalar(
        "SELECT private_key_sealed FROM oidc_signing_keys ORDER BY sign_from DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let kek: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(KEK_B64)
        .unwrap()
        .try_into()
        .unwrap();
    let der = kiln::pki::seal::open(&kek, "oidc-signing-key", &sealed).unwrap();
    let key = ring::signature::RsaKeyPair::from_pkcs8(&der).unwrap();
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

async fn seen_jtis(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM oidc_seen_jtis")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn verification_refuses_forgeries_and_replays_with_a_clear_reason() {
    let db = TestDb::new().await;
    let (a, b) = (issuer_app(&db, &[]), issuer_app(&db, &[]));
    let audiences = vec!["kiln-ci".to_string()];

    // A good token verifies once; the second use is a replay, on any replica.
    let good = a.oidc.mint("kiln-ci", run_claims()).await.unwrap();
    let verified = a.oidc.verify(&good.token, &audiences).await.unwrap();
    assert_eq!(verified.claims["sub"], "repo:octo/widget:pull_request");
    assert_eq!(verified.jti, good.jti);
    let replay = b.oidc.verify(&good.token, &audiences).await.unwrap_err();
    assert!(replay.to_string().contains("already used"), "{replay}");

    // Two replicas spending one token at once: exactly one accepts it.
    let racing = a.oidc.mint("kiln-ci", run_claims()).await.unwrap();
    let (ra, rb) = tokio::join!(
        a.oidc.verify(&racing.token, &audiences),
        b.oidc.verify(&racing.token, &audiences)
    );
    assert_eq!([ra.is_ok(), rb.is_ok()].iter().filter(|ok| **ok).count(), 1);

    let seen = seen_jtis(&db).await;
    let kid = good.kid.clone();
    let now = chrono::Utc::now().timestamp();
    let claims = |changes: Value| {
        let mut c = json!({
            "iss": ISSUER, "aud": "kiln-ci", "sub": "repo:octo/widget:pull_request",
            "iat": now, "nbf": now, "exp": now + 300, "jti": format!("t-{}", rand::random::<u64>()),
        });
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let rs256 = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    let parts: Vec<String> = good.token.split('.').map(str::to_string).collect();
    let encode = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let jwks = a.oidc.jwks().await.unwrap();
    let public_n = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["n"].as_str().unwrap())
        .unwrap();
    let hs_input = format!(
        "{}.{}",
        encode(&json!({"alg": "HS256", "typ": "JWT", "kid": kid})),
        encode(&claims(json!({})))
    );
    let hs_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public_n);
    let hs256 = format!(
        "{hs_input}.{}",
        URL_SAFE_NO_PAD.encode(ring::hmac::sign(&hs_key, hs_input.as_bytes()))
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                encode(&json!({"alg": "none", "kid": kid})),
                parts[1]
            ),
            "only RS256",
        ),
        ("HS256 made with the public key", hs256, "only RS256"),
        (
            "unknown kid",
            format!(
                "{}.{}.{}",
                encode(&json!({"alg": "RS256", "kid": "nope"})),
                parts[1],
                parts[2]
            ),
            "no published key",
        ),
        (
            "tampered payload",
            format!("{}.{}.{}", parts[0], encode(&claims(json!({}))), parts[2]),
            "signature does not verify",
        ),
        (
            "expired",
            sign_as_kiln(
                &db,
                rs256.clone(),
                claims(json!({"iat": now - 900, "nbf": now - 900, "exp": now - 120})),
            )
            .await,
            "expired",
        ),
        (
            "nbf in the future",
            sign_as_kiln(&db, rs256.clone(), claims(json!({"nbf": now + 600}))).await,
            "not valid yet",
        ),
        (
            "wrong issuer",
            sign_as_kiln(
                &db,
                rs256.clone(),
                claims(json!({"iss": "https://elsewhere.example"})),
            )
            .await,
            "issued by",
        ),
        (
            "wrong audience",
            sign_as_kiln(
                &db,
                rs256.clone(),
                claims(json!({"aud": ["other", "more"]})),
            )
            .await,
            "audience",
        ),
        (
            "no jti",
            sign_as_kiln(&db, rs256.clone(), claims(json!({"jti": ""}))).await,
            "jti",
        ),
        ("oversized", "a".repeat(9 * 1024), "limit"),
        (
            "malformed JSON",
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("{not json"),
                parts[1],
                parts[2]
            ),
            "not a JSON object",
        ),
        (
            "not a JWT",
            "just-a-string".to_string(),
            "three dot-separated parts",
        ),
    ];
    for (case, token, reason) in cases {
        let err = a.oidc.verify(&token, &audiences).await.unwrap_err();
        assert!(
            matches!(err, kiln::error::Error::Unauthenticated(_)),
            "{case}: {err:?}"
        );
        assert!(err.to_string().contains(reason), "{case}: {err}");
    }
    assert_eq!(seen_jtis(&db).await, seen, "refusals record nothing");

    // A validly signed token with an audience list that includes ours is accepted.
    let listed = sign_as_kiln(&db, rs256, claims(json!({"aud": ["other", "kiln-ci"]}))).await;
    assert!(a.oidc.verify(&listed, &audiences).await.is_ok());
}
