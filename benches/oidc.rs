//! Verification throughput of an RS256 token with the key set cached (what every
//! request carrying an OIDC token pays), on all cores. Writes the token and its public
//! JWK to BENCH_OUT so scripts/bench-oidc.sh can time PyJWT on the same token.
//!
//! Env: BENCH_SECONDS (default 5), BENCH_THREADS (default: the cores), BENCH_OUT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kiln::oidc::verify::{Policy, PublicKey, verify};
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::json;

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));

    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let signer =
        ring::signature::RsaKeyPair::from_pkcs8(key.to_pkcs8_der().unwrap().as_bytes()).unwrap();
    let (n, e) = (key.n().to_bytes_be(), key.e().to_bytes_be());
    let now = chrono::Utc::now().timestamp();
    let issuer = "https://issuer.kiln.test";
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "bench"});
    let claims = json!({
        "iss": issuer, "aud": "kiln", "sub": "repo:octo/widget:pull_request",
        "iat": now, "nbf": now, "exp": now + 3600, "jti": "bench-jti",
        "repository": "octo/widget", "run_id": "1234", "event_name": "pull_request",
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0u8; signer.public().modulus_len()];
    signer
        .sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut signature,
        )
        .unwrap();
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
    if let Ok(out) = std::env::var("BENCH_OUT") {
        let jwk = json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bench",
            "n": URL_SAFE_NO_PAD.encode(&n), "e": URL_SAFE_NO_PAD.encode(&e)});
        std::fs::write(
            out,
            json!({"token": token, "jwk": jwk, "issuer": issuer, "audience": "kiln"}).to_string(),
        )
        .unwrap();
    }

    let keys = Arc::new(vec![PublicKey {
        kid: "bench".into(),
        n,
        e,
    }]);
    let audiences = Arc::new(vec!["kiln".to_string()]);
    let token = Arc::new(token);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (keys, audiences, token, stop, count) = (
                keys.clone(),
                audiences.clone(),
                token.clone(),
                stop.clone(),
                count.clone(),
            );
            std::thread::spawn(move || {
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let policy = Policy {
                        issuer,
                        audiences: &audiences,
                        leeway_seconds: 30,
                        now: chrono::Utc::now(),
                        require_jti: true,
                    };
                    verify(&token, &keys, &policy).expect("the token verifies");
                    done += 1;
                }
                count.fetch_add(done, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = count.load(Ordering::Relaxed);
    println!(
        "kiln (ring, {threads} threads): {total} verifications in {elapsed:.1} s = {:.0}/s",
        total as f64 / elapsed
    );
}
