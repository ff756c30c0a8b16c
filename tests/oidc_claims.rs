//! The fork pull request claim flow against a GitHub stand-in: a claim is checked with
//! GitHub, proven by the challenge code in a live job log or by an artifact, and exchanged
//! for exactly one token; ineligible runs and malformed claims are refused with a precise
//! 4xx and leave nothing behind.
mod common;

use std::time::Duration;

use common::github::{GitHub, fork_run};
use common::{Server, TestDb};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

const AUD: &str = "https://depot.dev";

async fn start(db: &TestDb, github: &GitHub, extra: &[(&str, &str)]) -> Server {
    let settings = github.settings();
    let mut env: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("KILN_OIDC__CLAIMS__CHECK_INTERVAL_MS", "200"));
    env.extend_from_slice(extra);
    Server::start(db, &env).await
}

/// Artifact proof only: no GitHub web session is configured.
async fn start_artifact_proof_only(db: &TestDb, github: &GitHub) -> Server {
    Server::start(
        db,
        &[
            ("KILN_OIDC__GITHUB__API_URL", github.url.as_str()),
            ("KILN_OIDC__GITHUB__WEB_URL", github.url.as_str()),
            ("KILN_OIDC__CLAIMS__PROOFS", "[\"artifact\"]"),
            ("KILN_OIDC__CLAIMS__CHECK_INTERVAL_MS", "100"),
        ],
    )
    .await
}

fn claim_body(repo: &str, run_id: u64) -> Value {
    json!({"aud": AUD, "eventName": "pull_request", "repo": repo, "runID": run_id.to_string(), "attempt": "1"})
}

async fn post_claim(server: &Server, body: &Value) -> (u16, Value) {
    post_claim_as(server, None, body).await
}

/// A claim through a reverse proxy that says the client is `forwarded_for`.
async fn post_claim_as(server: &Server, forwarded_for: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(format!("{}/claim", server.url));
    if let Some(client) = forwarded_for {
        request = request.header("x-forwarded-for", client);
    }
    let answer = request.json(body).send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// (status, body text, Retry-After)
async fn exchange(url: &str) -> (u16, String, Option<String>) {
    let answer = reqwest::Client::new()
        .post(url)
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let retry = answer
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, answer.text().await.unwrap(), retry)
}

async fn claim_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM oidc_claims")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn verify_token(server: &Server, token: &str) -> Value {
    let jwks: Value = reqwest::get(format!("{}/.well-known/jwks", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap();
    let decoding =
        DecodingKey::from_rsa_components(key["n"].as_str().unwrap(), key["e"].as_str().unwrap())
            .unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[AUD]);
    validation.set_issuer(&[server.url.as_str()]);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub", "jti"]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &decoding, &validation)
        .unwrap()
        .claims
}

/// Polls the exchange URL as the depot CLI does, until it answers something but 202.
async fn poll(url: &str, within: Duration) -> (u16, String, u32) {
    let deadline = tokio::time::Instant::now() + within;
    let mut pending = 0;
    loop {
        let (status, body, retry) = exchange(url).await;
        if status != 202 {
            return (status, body, pending);
        }
        assert!(retry.is_some(), "202 carries Retry-After");
        pending += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "still pending after {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_pull_request_gets_one_token_once_its_code_is_in_the_live_log() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(4242));
    let server = start(&db, &github, &[]).await;

    // The claimant spells the repository its own way; GitHub's spelling goes in the token.
    let (status, created) = post_claim(&server, &claim_body("OCTO-org/Octo-Repo", 4242)).await;
    assert_eq!(status, 200, "{created}");
    let code = created["challengeCode"].as_str().unwrap().to_string();
    let url = created["exchangeURL"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("{}/exchange/", server.url)),
        "{url}"
    );
    assert_eq!(code.len(), 36);

    // Not in the log yet: pending, and the claim is not burned.
    let (status, body, retry) = exchange(&url).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    // The line shows up in the job's log only after a while, as GitHub streams it.
    github.log(
        42420,
        &format!("Waiting for OIDC auth challenge {code}"),
        Duration::from_secs(2),
    );
    let (status, token, pending) = poll(&url, Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{token}");
    assert!(
        pending >= 1,
        "the token came only once the code was visible"
    );

    let claims = verify_token(&server, &token).await;
    assert_eq!(claims["sub"], "repo:octo-org/octo-repo:pull_request");
    assert_eq!(claims["repository"], "octo-org/octo-repo");
    assert_eq!(claims["repository_id"], "74");
    assert_eq!(claims["repository_owner"], "octo-org");
    assert_eq!(claims["head_repository"], "fork-user/octo-repo");
    assert_eq!(claims["event_name"], "pull_request");
    assert_eq!(claims["run_id"], "4242");
    assert_eq!(claims["run_attempt"], "1");
    assert_eq!(claims["actor"], "fork-user");
    assert_eq!(claims["workflow"], "CI");
    assert_eq!(claims["job_id"], "42420");
    assert_eq!(claims["ref"], "refs/pull/9/merge");
    assert_eq!(claims["sha"], "0123456789abcdef0123456789abcdef01234567");
    let (iat, nbf, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["nbf"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 300);
    assert!(nbf < iat);

    // Exchanged once: every later poll is told so.
    let (status, body, _) = exchange(&url).await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("already"), "{body}");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'oidc.token_issued'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ineligible_runs_and_malformed_claims_are_refused_and_leave_nothing() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    let mut same_repo = fork_run(1);
    same_repo["head_repository"] = same_repo["repository"].clone();
    github.add_run(same_repo);
    let mut private = fork_run(2);
    private["repository"]["private"] = json!(true);
    private["repository"]["visibility"] = json!("private");
    github.add_run(private);
    let mut completed = fork_run(3);
    completed["status"] = json!("completed");
    github.add_run(completed);
    let mut push = fork_run(4);
    push["event"] = json!("push");
    github.add_run(push);
    let mut target = fork_run(5);
    target["event"] = json!("pull_request_target");
    github.add_run(target);
    let mut awaiting = fork_run(6);
    awaiting["status"] = json!("action_required");
    github.add_run(awaiting);
    let server = start(
        &db,
        &github,
        &[("KILN_OIDC__CLAIMS__PER_CLIENT_BURST", "100")],
    )
    .await;

    let refused: Vec<(Value, u16, &str)> = vec![
        (claim_body("octo-org/octo-repo", 1), 422, "not from a fork"),
        (
            claim_body("octo-org/octo-repo", 2),
            422,
            "not a public repository",
        ),
        (claim_body("octo-org/octo-repo", 3), 422, "completed"),
        (claim_body("octo-org/octo-repo", 4), 422, "\"push\" event"),
        (
            claim_body("octo-org/octo-repo", 5),
            422,
            "pull_request_target",
        ),
        (claim_body("octo-org/octo-repo", 6), 422, "action_required"),
        (
            claim_body("octo-org/octo-repo", 999),
            422,
            "knows no run 999",
        ),
        (
            json!({"aud": AUD, "eventName": "push", "repo": "octo-org/octo-repo", "runID": "1"}),
            422,
            "only to pull_request",
        ),
        (
            json!({"aud": "https://evil.example", "eventName": "pull_request", "repo": "octo-org/octo-repo", "runID": "1"}),
            400,
            "not an audience",
        ),
        (
            json!({"eventName": "pull_request", "repo": "octo-org/octo-repo", "runID": "1"}),
            400,
            "not an audience",
        ),
        (
            json!({"aud": AUD, "eventName": "pull_request", "repo": "../../etc", "runID": "1"}),
            400,
            "owner/name",
        ),
        (
            json!({"aud": AUD, "eventName": "pull_request", "repo": "octo-org/octo-repo", "runID": "12a"}),
            400,
            "runID",
        ),
        (
            json!({"aud": AUD, "eventName": "pull_request", "repo": "octo-org/octo-repo", "runID": "0"}),
            400,
            "runID",
        ),
        (
            json!({"aud": AUD, "eventName": "pull_request", "repo": "octo-org/octo-repo", "runID": "1", "attempt": "x"}),
            400,
            "attempt",
        ),
        (json!(["not", "an", "object"]), 400, "JSON object"),
    ];
    for (body, status, says) in refused {
        let (got, answer) = post_claim(&server, &body).await;
        assert_eq!(got, status, "{body} -> {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message:?} lacks {says:?}");
    }
    let http = reqwest::Client::new();
    for raw in ["{not json", ""] {
        let answer = http
            .post(format!("{}/claim", server.url))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "{raw:?}");
        let body: Value = answer.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("JSON"), "{body}");
    }
    let huge = json!({"aud": AUD, "eventName": "pull_request", "repo": "octo-org/octo-repo", "runID": "1", "pad": "x".repeat(10_000)});
    let answer = http
        .post(format!("{}/claim", server.url))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("4096 bytes"),
        "{body}"
    );
    assert_eq!(claim_rows(&db).await, 0, "no refused claim was stored");

    // Exchange URLs nobody was given.
    for bad in ["nope", &"A".repeat(43), "..%2F..%2Fclaim"] {
        let (status, body, _) = exchange(&format!("{}/exchange/{bad}", server.url)).await;
        assert_eq!(status, 404, "{bad}: {body}");
        assert!(body.contains("POST /claim"), "{body}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_proof_needs_an_artifact_tied_to_the_very_run() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(77));
    let server = start_artifact_proof_only(&db, &github).await;
    let (status, created) = post_claim(&server, &claim_body("octo-org/octo-repo", 77)).await;
    assert_eq!(status, 200, "{created}");
    let code = created["challengeCode"].as_str().unwrap();
    let url = created["exchangeURL"].as_str().unwrap();
    let name = format!("oidc-challenge-{code}");
    // The code in a log proves nothing here, nor does an artifact GitHub ties to another
    // run or another commit.
    github.log(770, code, Duration::ZERO);
    github.artifact(
        77,
        &name,
        json!({"id": 78, "repository_id": 74, "head_repository_id": 75,
               "head_sha": "0123456789abcdef0123456789abcdef01234567"}),
    );
    github.artifact(
        77,
        &name,
        json!({"id": 77, "repository_id": 74, "head_repository_id": 75, "head_sha": "ffff"}),
    );
    for _ in 0..3 {
        let (status, body, _) = exchange(url).await;
        assert_eq!(status, 202, "{body}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    github.artifact(
        77,
        &name,
        json!({"id": 77, "repository_id": 74, "head_repository_id": 75,
               "head_sha": "0123456789abcdef0123456789abcdef01234567"}),
    );
    let (status, token, _) = poll(url, Duration::from_secs(10)).await;
    assert_eq!(status, 200, "{token}");
    let claims = verify_token(&server, &token).await;
    assert_eq!(claims["repository"], "octo-org/octo-repo");
    assert!(claims.get("job_id").is_none(), "no job showed the code");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_exchanges_of_one_claim_on_two_replicas_give_exactly_one_token() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(88));
    let server = start(&db, &github, &[]).await;
    // A second replica on the same database races the first.
    let replica = start(&db, &github, &[]).await;
    let (_, created) = post_claim(&server, &claim_body("octo-org/octo-repo", 88)).await;
    let code = created["challengeCode"].as_str().unwrap();
    let url = created["exchangeURL"].as_str().unwrap().to_string();
    let secret = url.rsplit('/').next().unwrap().to_string();
    github.log(880, code, Duration::ZERO);

    let mut tokens = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let base = if i % 2 == 0 {
                    &server.url
                } else {
                    &replica.url
                };
                let url = format!("{base}/exchange/{secret}");
                tokio::spawn(async move { exchange(&url).await })
            })
            .collect();
        let mut statuses = Vec::new();
        for racer in racers {
            let (status, body, _) = racer.await.unwrap();
            assert!(matches!(status, 200 | 202 | 410), "{status}: {body}");
            statuses.push(status);
        }
        tokens += statuses.iter().filter(|s| **s == 200).count();
        if statuses.contains(&410) || tokens > 0 && statuses.iter().all(|s| *s != 202) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never exchanged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, _) = exchange(&url).await;
    assert_eq!(status, 410);
    assert_eq!(tokens, 1, "exactly one token for one claim");
    let issued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM oidc_claims WHERE state = 'issued' AND issued_jti IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(issued, 1);
    replica.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_expire_fail_after_their_checks_and_survive_github_outages() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(91));
    github.add_run(fork_run(92));
    github.add_run(fork_run(93));
    let server = start(&db, &github, &[("KILN_OIDC__CLAIMS__MAX_CHECKS", "3")]).await;

    // Expiry: a claim not exchanged in time is gone.
    let (_, created) = post_claim(&server, &claim_body("octo-org/octo-repo", 91)).await;
    let url = created["exchangeURL"].as_str().unwrap().to_string();
    sqlx::query(
        "UPDATE oidc_claims SET expires_at = now() - interval '1 second' WHERE run_id = 91",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (status, body, _) = exchange(&url).await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("expired"), "{body}");

    // A code that never shows: refused for good after max_checks.
    let (_, created) = post_claim(&server, &claim_body("octo-org/octo-repo", 92)).await;
    let url = created["exchangeURL"].as_str().unwrap().to_string();
    let (status, body, _) = poll(&url, Duration::from_secs(20)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("not seen in 3 checks"), "{body}");
    let (status, _, _) = exchange(&url).await;
    assert_eq!(status, 422, "stays refused");

    // GitHub down: 503 with Retry-After, the claim survives, and proceeds once it is back.
    let (_, created) = post_claim(&server, &claim_body("octo-org/octo-repo", 93)).await;
    let url = created["exchangeURL"].as_str().unwrap().to_string();
    let code = created["challengeCode"].as_str().unwrap().to_string();
    github.fail_with(Some(503));
    let (status, body, retry) = exchange(&url).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some());
    assert!(body.contains("GitHub"), "{body}");
    github.fail_with(Some(429));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body, _) = exchange(&url).await;
    assert!(matches!(status, 503 | 202), "{status}: {body}");
    github.fail_with(None);
    github.log(930, &code, Duration::ZERO);
    let (status, token, _) = poll(&url, Duration::from_secs(20)).await;
    assert_eq!(status, 200, "{token}");

    // A run that finishes while its claim waits is refused.
    let mut run = fork_run(94);
    run["id"] = json!(94);
    github.add_run(run);
    let (_, created) = post_claim(&server, &claim_body("octo-org/octo-repo", 94)).await;
    let url = created["exchangeURL"].as_str().unwrap().to_string();
    github.update_run("octo-org/octo-repo", 94, |r| {
        r["status"] = json!("completed")
    });
    let (status, body, _) = poll(&url, Duration::from_secs(10)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("completed"), "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_limited_per_repository_and_per_client() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(100));
    let server = start(
        &db,
        &github,
        &[
            ("KILN_OIDC__CLAIMS__MAX_PENDING_PER_REPOSITORY", "2"),
            ("KILN_OIDC__CLAIMS__PER_CLIENT_PER_MINUTE", "1"),
            ("KILN_OIDC__CLAIMS__PER_CLIENT_BURST", "4"),
        ],
    )
    .await;
    let body = claim_body("octo-org/octo-repo", 100);
    assert_eq!(post_claim(&server, &body).await.0, 200);
    assert_eq!(post_claim(&server, &body).await.0, 200);
    let (status, answer) = post_claim(&server, &body).await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("waiting to be exchanged")
    );
    assert_eq!(claim_rows(&db).await, 2);
    // The fourth request spends the address's burst; the fifth is turned away before
    // GitHub is asked anything.
    let _ = post_claim(&server, &body).await;
    let asked = github.requests();
    let answer = reqwest::Client::new()
        .post(format!("{}/claim", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 429);
    assert!(answer.headers().get("retry-after").is_some());
    assert_eq!(
        github.requests(),
        asked,
        "a limited client costs no GitHub call"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_a_repositorys_claims_from_another() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(100));
    // Behind a trusted reverse proxy (this host), which says who the clients are.
    let server = start(
        &db,
        &github,
        &[
            ("KILN_OIDC__CLAIMS__MAX_PENDING_PER_REPOSITORY", "4"),
            ("KILN_OIDC__CLAIMS__MAX_PENDING_PER_CLAIMANT", "2"),
            ("KILN_OIDC__CLAIMS__PER_CLIENT_BURST", "100"),
            ("KILN_LIMITS__CLIENT_IP_HEADER", "x-forwarded-for"),
            ("KILN_LIMITS__TRUSTED_PROXIES", "[\"127.0.0.1/32\"]"),
        ],
    )
    .await;
    let body = claim_body("octo-org/octo-repo", 100);
    let flooder = "203.0.113.66";
    for _ in 0..2 {
        assert_eq!(post_claim_as(&server, Some(flooder), &body).await.0, 200);
    }
    let (status, answer) = post_claim_as(&server, Some(flooder), &body).await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("your address has 2 claims"),
        "{answer}"
    );
    // A contributor elsewhere still claims for the same repository.
    let contributor = "198.51.100.7";
    assert_eq!(
        post_claim_as(&server, Some(contributor), &body).await.0,
        200
    );
    // Writing someone else's address on the left of the header changes nothing: the
    // proxy appended the real one.
    let spoofed = format!("{contributor}, {flooder}");
    assert_eq!(post_claim_as(&server, Some(&spoofed), &body).await.0, 429);
    assert_eq!(claim_rows(&db).await, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_poll_asks_github_a_bounded_number_of_times() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(300));
    // A matrix of 30 more running jobs, none of which shows the code.
    github.add_running_jobs(300, 30);
    let server = start(
        &db,
        &github,
        &[
            ("KILN_OIDC__CLAIMS__CHECK_INTERVAL_MS", "10"),
            ("KILN_OIDC__CLAIMS__MAX_GITHUB_CALLS_PER_CLAIM", "60"),
        ],
    )
    .await;
    let (status, created) = post_claim(&server, &claim_body("octo-org/octo-repo", 300)).await;
    assert_eq!(status, 200, "{created}");
    let url = created["exchangeURL"].as_str().unwrap().to_string();
    let mut polls = 0;
    let refused = loop {
        let before = (github.requests(), github.job_pages_read().len());
        let (status, body, _) = exchange(&url).await;
        let asked = github.requests() - before.0;
        let jobs = github.job_pages_read().len() - before.1;
        assert!(asked <= 16, "one poll asked GitHub {asked} times");
        assert!(jobs <= 4, "one poll read {jobs} jobs' logs");
        polls += 1;
        match status {
            202 => tokio::time::sleep(Duration::from_millis(20)).await,
            422 => break body,
            other => panic!("{other}: {body}"),
        }
        assert!(polls < 50, "still pending after {polls} polls");
    };
    assert!(refused.contains("60 GitHub calls"), "{refused}");
    let spent: i32 = sqlx::query_scalar("SELECT github_calls FROM oidc_claims")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!((50..=60).contains(&spent), "{spent}");
    // The jobs were read in turns, not the first four again and again.
    let read: std::collections::HashSet<u64> = github.job_pages_read().into_iter().collect();
    assert!(read.len() >= 12, "{read:?}");
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kiln_oidc_github_calls_total{call=\"log_tail\"}"),
        "{metrics}"
    );
    server.stop().await;
}

/// `actions/claim-token`'s script, driven as the runner would: claim, upload the
/// artifact (here: the stand-in lists it), exchange, and DEPOT_TOKEN lands in $GITHUB_ENV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_token_action_gets_a_token_by_artifact_proof() {
    let db = TestDb::new().await;
    let github = GitHub::start().await;
    github.add_run(fork_run(5150));
    let server = start_artifact_proof_only(&db, &github).await;
    let dir = tempfile::tempdir().unwrap();
    let (outputs, env_file) = (dir.path().join("output"), dir.path().join("env"));
    std::fs::write(&outputs, "").unwrap();
    std::fs::write(&env_file, "").unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/actions/claim-token/claim.sh");
    let run = |step: &str, extra: Vec<(&str, String)>| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(script)
            .arg(step)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("GITHUB_EVENT_NAME", "pull_request")
            .env("GITHUB_REPOSITORY", "octo-org/octo-repo")
            .env("GITHUB_RUN_ID", "5150")
            .env("GITHUB_RUN_ATTEMPT", "1")
            .env("GITHUB_OUTPUT", &outputs)
            .env("GITHUB_ENV", &env_file)
            .env("KILN_URL", &server.url)
            .envs(extra);
        cmd.output()
    };
    let claimed = run("claim", vec![]).await.unwrap();
    let log = String::from_utf8_lossy(&claimed.stdout).to_string();
    assert!(
        claimed.status.success(),
        "{log}{}",
        String::from_utf8_lossy(&claimed.stderr)
    );
    let written = std::fs::read_to_string(&outputs).unwrap();
    let value = |key: &str| {
        written
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_string()
    };
    let (code, url) = (value("challenge-code"), value("exchange-url"));
    assert!(
        log.contains(&format!("::add-mask::{url}")),
        "the exchange URL is masked: {log}"
    );
    assert!(log.contains(&code));
    // What actions/upload-artifact does inside the run.
    github.artifact(
        5150,
        &format!("oidc-challenge-{code}"),
        json!({"id": 5150, "repository_id": 74, "head_repository_id": 75,
               "head_sha": "0123456789abcdef0123456789abcdef01234567"}),
    );
    let exchanged = run(
        "exchange",
        vec![
            ("KILN_EXCHANGE_URL", url),
            ("KILN_TIMEOUT_SECONDS", "20".into()),
        ],
    )
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&exchanged.stdout).to_string();
    assert!(
        exchanged.status.success(),
        "{log}{}",
        String::from_utf8_lossy(&exchanged.stderr)
    );
    let env_written = std::fs::read_to_string(&env_file).unwrap();
    let token = env_written.trim().strip_prefix("DEPOT_TOKEN=").unwrap();
    assert!(log.contains(&format!("::add-mask::{token}")));
    let claims = verify_token(&server, token).await;
    assert_eq!(claims["head_repository"], "fork-user/octo-repo");

    // A push run is refused up front, with Kiln's reason.
    let refused = tokio::process::Command::new("bash")
        .arg(script)
        .arg("claim")
        .env("GITHUB_EVENT_NAME", "push")
        .env("GITHUB_OUTPUT", &outputs)
        .env("KILN_URL", &server.url)
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("only to pull_request"));
    server.stop().await;
}
