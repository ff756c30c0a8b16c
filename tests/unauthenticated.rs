//! What callers without a token can make a running `kiln serve` keep: nothing beyond
//! bounded counters. Huge fields on every route that needs no token are refused with a
//! 4xx, change nothing, and leave the process's resident memory where it was.
mod common;

use common::{Kiln, TestDb, free_port};

/// The process's resident set, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

const MIB: u64 = 1024 * 1024;

/// The resident set of `pid` must not have grown by 20 MiB since `before`.
fn assert_kept_nothing(pid: u32, before: u64) {
    let after = resident_bytes(pid);
    assert!(
        after.saturating_sub(before) < 20 * MIB,
        "resident memory grew from {} MiB to {} MiB",
        before / MIB,
        after / MIB
    );
    eprintln!(
        "resident memory: {} KiB before, {} KiB after",
        before / 1024,
        after / 1024
    );
}

fn serve(db: &TestDb) -> Kiln {
    Kiln::spawn(
        &["serve"],
        &[
            ("KILN_DATABASE__URL", db.url.as_str()),
            // The per-address rate limit would refuse most of these before any handler;
            // lifted, the handlers themselves must hold.
            ("KILN_LIMITS__UNAUTHENTICATED_PER_MINUTE", "1000000"),
            ("KILN_LIMITS__UNAUTHENTICATED_BURST", "1000000"),
            ("KILN_OIDC__CLAIMS__PER_CLIENT_PER_MINUTE", "1000000"),
            ("KILN_OIDC__CLAIMS__PER_CLIENT_BURST", "1000000"),
            // An idle HTTP/2 connection of the test's client is not a request to wait for.
            ("KILN_SERVER__SHUTDOWN_GRACE_SECONDS", "2"),
        ],
        free_port(),
    )
}

/// HTTP/2 with prior knowledge, as the depot CLI speaks: a refusal sent before the body
/// is read reaches the client instead of a reset connection.
fn h2c() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

fn huge_email() -> String {
    format!("{}@example.com", "a".repeat(4_000_000))
}

fn sign_in_body(email: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs([("email", email), ("password", "a guess")])
        .finish()
}

async fn post_form(client: &reqwest::Client, url: &str, body: String) -> u16 {
    client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn two_hundred_sign_ins_with_4_mb_emails_leave_resident_memory_where_it_was() {
    let db = TestDb::new().await;
    let mut kiln = serve(&db);
    kiln.wait_ready().await;
    let pid = kiln.child.id();
    let client = h2c();
    let url = kiln.url("/dashboard/sign-in");
    // Warm up the allocator and the connection with ordinary failed sign-ins.
    for n in 0..20 {
        let status = post_form(&client, &url, sign_in_body(&format!("u{n}@example.com"))).await;
        assert_eq!(status, 401);
    }
    let before = resident_bytes(pid);
    // Each a different email, as a map keyed by email would keep each one.
    let huge = huge_email();
    let mut statuses = Vec::new();
    for n in 0..200 {
        let body = sign_in_body(&format!("{n}{huge}"));
        statuses.push(post_form(&client, &url, body).await);
    }
    assert_kept_nothing(pid, before);
    // Refused before being read whole, with a page that says what is wrong.
    assert!(statuses.iter().all(|s| *s == 413), "{statuses:?}");
    drop(client);
    assert!(kiln.terminate().success());
}

#[tokio::test]
async fn every_route_that_needs_no_token_refuses_a_4_mb_field_without_keeping_it() {
    let db = TestDb::new().await;
    let mut kiln = serve(&db);
    kiln.wait_ready().await;
    let pid = kiln.child.id();
    let client = h2c();
    let four_mb = "x".repeat(4_000_000);
    // An open `depot login` request, so its approval page reaches its form.
    let request = kiln::auth::login::start(&db.pool, std::time::Duration::from_secs(600), 100)
        .await
        .unwrap();
    let approval = kiln.url(&format!("/login/{}", request.user_code));
    let start_login = kiln.url("/depot.cli.v1beta1.LoginService/StartLogin");
    let count = |table: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before_rows = (count("login_requests").await, count("oidc_claims").await);

    let mut before = 0;
    for round in 0..11 {
        if round == 1 {
            // The first round warms up every path; later rounds must not add anything.
            before = resident_bytes(pid);
        }
        // The dashboard's sign-in form.
        let status = post_form(
            &client,
            &kiln.url("/dashboard/sign-in"),
            sign_in_body(&huge_email()),
        )
        .await;
        assert_eq!(status, 413, "sign-in");
        // The approval page of `depot login`.
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("email", huge_email().as_str()),
                ("password", "a guess"),
                ("decision", "approve"),
            ])
            .finish();
        assert_eq!(post_form(&client, &approval, body).await, 413, "approval");
        // The fork pull request claim.
        let claim = serde_json::json!({
            "aud": "https://depot.dev", "eventName": "pull_request",
            "repo": four_mb, "runID": "1", "attempt": "1",
        });
        let response = client
            .post(kiln.url("/claim"))
            .json(&claim)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 413, "claim");
        let text = response.text().await.unwrap();
        assert!(text.contains("the claim is over"), "{text}");
        // The registry's token endpoint: a 4 MB scope, and a 4 MB credential.
        let status = client
            .get(kiln.url(&format!("/v2/_token?service=kiln&scope={four_mb}")))
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(400..=499)) || status.is_err(),
            "v2 token scope: {status:?}"
        );
        let status = client
            .get(kiln.url("/v2/_token"))
            .basic_auth("user", Some(&four_mb))
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(400..=499)) || status.is_err(),
            "v2 token credential: {status:?}"
        );
        // StartLogin (Connect, binary): an unknown 4 MB field.
        let mut message = vec![0x0a];
        prost::encoding::encode_varint(four_mb.len() as u64, &mut message);
        message.extend_from_slice(four_mb.as_bytes());
        let response = client
            .post(&start_login)
            .header("content-type", "application/proto")
            .body(message)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let error: serde_json::Value = response.json().await.unwrap();
        assert!((400..500).contains(&status), "StartLogin: {status} {error}");
        assert_eq!(error["code"], "resource_exhausted", "{error}");
    }
    assert_kept_nothing(pid, before);
    // Nothing was written: no login request, no claim.
    assert_eq!(
        (count("login_requests").await, count("oidc_claims").await),
        before_rows
    );
    // And the routes still serve ordinary requests.
    let started = client
        .post(&start_login)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(started.status().as_u16(), 200);
    let started: serde_json::Value = started.json().await.unwrap();
    assert!(started["approveUrl"].as_str().is_some(), "{started}");
    drop(client);
    assert!(kiln.terminate().success());
}
