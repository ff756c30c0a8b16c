//! The public API driven by the official Node SDK (@depot/sdk-node 1.4.0, JSON over h2c,
//! installed by scripts/test.sh) against a real `kiln serve`: the success paths and the
//! errors a user would hit.
mod common;

use common::{Server, TestDb, tenant};
use kiln::auth::TokenKind;
use kiln::auth::token::NewToken;
use serde_json::{Value, json};

/// Runs `calls` through the SDK (tests/fixtures/sdk/drive.mjs); one result per call.
async fn sdk(server: &Server, calls: Value) -> Vec<Value> {
    let dir = std::env::var("TEST_DEPOT_SDK_DIR").expect(
        "TEST_DEPOT_SDK_DIR is not set: run the tests through `bash scripts/test.sh`, which installs @depot/sdk-node",
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sdk/drive.mjs");
    let mut child = tokio::process::Command::new("node")
        .arg(script)
        .current_dir(&dir)
        .env("DEPOT_API_URL", &server.url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(calls.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .expect("the SDK finished")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), calls.as_array().unwrap().len(), "{stdout}");
    results
}

fn ok(result: &Value) -> &Value {
    assert_eq!(result["ok"], true, "{result}");
    &result["response"]
}

fn err(result: &Value, code: &str) -> String {
    assert_eq!(result["ok"], false, "expected {code}: {result}");
    assert_eq!(result["code"], code, "{result}");
    result["message"].as_str().unwrap().to_string()
}

/// An organization token, what the SDK's README says to use.
async fn org_token(db: &TestDb, org_id: &str) -> String {
    let d = common::domain(&db.pool);
    let mut new = NewToken::new(TokenKind::Organization, "sdk");
    new.organization_id = Some(org_id.to_string());
    d.tokens.create(&common::operator(), new).await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_and_organization_services_through_the_official_sdk() {
    let db = TestDb::new().await;
    let server = Server::start(&db, &[]).await;
    let t = tenant(&db.pool, "sdk").await;
    let other = tenant(&db.pool, "other").await;
    let token = org_token(&db, &t.org_id).await;
    let call = |service: &str, method: &str, request: Value| json!({"service": service, "method": method, "request": request, "token": token});
    let ps = "core.v1.ProjectService";
    let r = sdk(
        &server,
        json!([
            call(
                "core.v1.OrganizationService",
                "listOrganizations",
                json!({})
            ),
            call(ps, "listProjects", json!({})),
            call(
                ps,
                "createProject",
                json!({"name": "web", "regionId": "us-east-1",
                "cachePolicy": {"keepGb": 60, "keepDays": 7}, "hardware": 5})
            ),
            call(ps, "getProject", json!({"projectId": t.project.id})),
            call(ps, "getProject", json!({"projectId": other.project.id})),
            call(ps, "getProject", json!({"projectId": "nope"})),
            call(
                ps,
                "createProject",
                json!({"name": "bad", "cachePolicy": {"keepGb": -5}})
            ),
            call(
                ps,
                "createProject",
                json!({"name": "bad", "organizationId": other.org_id})
            ),
        ]),
    )
    .await;
    let orgs = ok(&r[0]);
    assert_eq!(orgs["organizations"][0]["orgId"], t.org_id);
    assert!(
        orgs["organizations"][0]["createdAt"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(ok(&r[1])["projects"].as_array().unwrap().len(), 1);
    let created = &ok(&r[2])["project"];
    assert_eq!(created["name"], "web");
    assert_eq!(created["cachePolicy"]["keepGb"], 60);
    assert_eq!(created["cachePolicy"]["keepDays"], 7);
    assert_eq!(created["hardware"], "HARDWARE_32X64");
    let web = created["projectId"].as_str().unwrap().to_string();
    assert_eq!(ok(&r[3])["project"]["organizationId"], t.org_id);
    // Another organization's project is not found, never forbidden: ids don't leak.
    err(&r[4], "not_found");
    err(&r[5], "not_found");
    assert!(err(&r[6], "invalid_argument").contains("negative"));
    err(&r[7], "not_found");

    let r = sdk(
        &server,
        json!([
            call(ps, "updateProject", json!({"projectId": web, "name": "web2",
                "cachePolicy": {"keepGb": 80, "keepDays": 3}, "hardware": 6})),
            call(ps, "updateProject", json!({"projectId": web, "hardware": 2})),
            call(ps, "resetProject", json!({"projectId": web})),
            call(ps, "addTrustPolicy", json!({"projectId": web,
                "provider": {"case": "github", "value": {"repositoryOwner": "acme", "repository": "api"}}})),
            call(ps, "addTrustPolicy", json!({"projectId": web,
                "provider": {"case": "buildkite", "value": {"organizationSlug": "acme", "pipelineSlug": "web"}}})),
            call(ps, "addTrustPolicy", json!({"projectId": web,
                "provider": {"case": "circleci", "value": {"organizationUuid": "o-1", "projectUuid": "p-1"}}})),
            call(ps, "listTrustPolicies", json!({"projectId": web})),
            call(ps, "createToken", json!({"projectId": web, "description": "ci"})),
            call(ps, "listTokens", json!({"projectId": web})),
        ]),
    )
    .await;
    let updated = &ok(&r[0])["project"];
    assert_eq!(updated["name"], "web2");
    assert_eq!(updated["cachePolicy"]["keepGb"], 80);
    assert_eq!(updated["hardware"], "HARDWARE_64X128");
    assert!(err(&r[1], "invalid_argument").contains("HARDWARE_16X32"));
    ok(&r[2]);
    assert_eq!(ok(&r[3])["trustPolicy"]["github"]["repository"], "api");
    assert_eq!(ok(&r[4])["trustPolicy"]["buildkite"]["pipelineSlug"], "web");
    assert_eq!(ok(&r[5])["trustPolicy"]["circleci"]["projectUuid"], "p-1");
    let policies = ok(&r[6])["trustPolicies"].as_array().unwrap().clone();
    assert_eq!(policies.len(), 3);
    let created = ok(&r[7]).clone();
    let token_id = created["tokenId"].as_str().unwrap().to_string();
    assert!(created["secret"].as_str().unwrap().starts_with("kiln_p_"));
    assert_eq!(ok(&r[8])["tokens"][0]["description"], "ci");

    let policy = policies[0]["trustPolicyId"].as_str().unwrap();
    let stranger = org_token(&db, &other.org_id).await;
    let r = sdk(
        &server,
        json!([
            call(ps, "updateToken", json!({"tokenId": token_id, "description": "deploys"})),
            call(ps, "listTokens", json!({"projectId": web})),
            {"service": ps, "method": "deleteToken", "request": {"tokenId": token_id}, "token": stranger},
            call(ps, "deleteToken", json!({"tokenId": token_id})),
            call(ps, "removeTrustPolicy", json!({"projectId": web, "trustPolicyId": policy})),
            call(ps, "removeTrustPolicy", json!({"projectId": web, "trustPolicyId": policy})),
            call(ps, "deleteProject", json!({"projectId": web})),
            call(ps, "getProject", json!({"projectId": web})),
            {"service": ps, "method": "listProjects", "request": {}, "token": "kiln_o_forged"},
        ]),
    )
    .await;
    ok(&r[0]);
    assert_eq!(ok(&r[1])["tokens"][0]["description"], "deploys");
    err(&r[2], "not_found");
    ok(&r[3]);
    ok(&r[4]);
    err(&r[5], "not_found");
    ok(&r[6]);
    err(&r[7], "not_found");
    err(&r[8], "unauthenticated");
    server.stop().await;
}
