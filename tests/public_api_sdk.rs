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

/// Reports two steps with log lines for a build, the way the depot CLI does
/// (depot.cli.v1.BuildService/ReportStatus, binary). `cached_run` marks the RUN step
/// cached; otherwise it took `run_seconds`.
async fn report_steps(server: &Server, build_token: &str, build_id: &str, cached_run: bool) {
    use kiln::proto::depot::cli::v1 as cli;
    use kiln::proto::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog};
    let at = |offset: i64| prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() - 60 + offset,
        nanos: 0,
    };
    let vertex = |digest: &str, name: &str, cached: bool, took: i64| Vertex {
        digest: digest.into(),
        name: name.into(),
        cached,
        started: Some(at(0)),
        completed: Some(at(took)),
        ..Default::default()
    };
    let log = |msg: &str| VertexLog {
        vertex: "sha256:run".into(),
        timestamp: Some(at(1)),
        stream: 1,
        msg: msg.as_bytes().to_vec(),
    };
    let request = cli::ReportStatusRequest {
        build_id: build_id.into(),
        statuses: vec![
            StatusResponse {
                vertexes: vec![
                    vertex(
                        "sha256:from",
                        "[1/2] FROM docker.io/library/alpine",
                        true,
                        0,
                    ),
                    vertex("sha256:run", "[2/2] RUN make <all>", cached_run, 3),
                ],
                ..Default::default()
            },
            StatusResponse {
                logs: if cached_run {
                    Vec::new()
                } else {
                    vec![log("compiling\nlinking\n"), log("done\n")]
                },
                ..Default::default()
            },
        ],
        stable_digests: Default::default(),
    };
    let _: cli::ReportStatusResponse = common::connect_call(
        &reqwest::Client::new(),
        &server.url,
        "depot.cli.v1.BuildService/ReportStatus",
        build_token,
        &request,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_buildkit_and_usage_services_through_the_official_sdk() {
    let db = TestDb::new().await;
    let command = common::standin_command();
    let server = Server::start(
        &db,
        &[
            ("KILN_BUILDERS__LOCAL__COMMAND", &command),
            (
                "KILN_BUILDERS__LOCAL__KILN_BINARY",
                env!("CARGO_BIN_EXE_kiln"),
            ),
        ],
    )
    .await;
    let t = tenant(&db.pool, "sdk").await;
    let other = tenant(&db.pool, "other").await;
    let token = org_token(&db, &t.org_id).await;
    let stranger = org_token(&db, &other.org_id).await;
    let project = t.project.id.clone();
    let call = |service: &str, method: &str, request: Value| json!({"service": service, "method": method, "request": request, "token": token});
    let bs = "build.v1.BuildService";
    let cbs = "core.v1.BuildService";
    let bks = "buildkit.v1.BuildKitService";

    // A build with no CLI attached; a BuildKit endpoint for it through the SDK's stream.
    let r = sdk(
        &server,
        json!([
            call(bs, "createBuild", json!({"projectId": project})),
            call(bs, "createBuild", json!({"projectId": other.project.id})),
        ]),
    )
    .await;
    let created = ok(&r[0]).clone();
    let build = created["buildId"].as_str().unwrap().to_string();
    let build_token = created["buildToken"].as_str().unwrap().to_string();
    err(&r[1], "not_found");
    let as_build = |service: &str, method: &str, request: Value| json!({"service": service, "method": method, "request": request, "token": build_token});
    let r = sdk(
        &server,
        json!([
            {"service": bks, "method": "getEndpoint", "request": {"buildId": build, "platform": 1}, "token": build_token, "take": 100},
            {"service": bks, "method": "reportHealth", "stream": [{"buildId": build, "platform": 1}, {"buildId": build, "platform": 1}], "token": build_token},
            {"service": bks, "method": "getEndpoint", "request": {"buildId": build, "platform": 0}, "token": build_token, "take": 1},
        ]),
    )
    .await;
    let messages = ok(&r[0]).as_array().unwrap().clone();
    assert!(messages[0].get("pending").is_some(), "{messages:?}");
    let active = &messages.last().unwrap()["active"];
    assert!(
        active["endpoint"].as_str().unwrap().starts_with("tcp://"),
        "{messages:?}"
    );
    assert!(!active["serverName"].as_str().unwrap().is_empty());
    assert!(
        active["cert"]["cert"]["cert"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        active["cert"]["key"]["key"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert!(
        active["caCert"]["cert"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    ok(&r[1]);
    assert!(err(&r[2], "invalid_argument").contains("PLATFORM_AMD64"));

    report_steps(&server, &build_token, &build, false).await;
    let r = sdk(
        &server,
        json!([
            as_build(bks, "releaseEndpoint", json!({"buildId": build, "platform": 1})),
            as_build(bs, "finishBuild", json!({"buildId": build})),
            as_build(bs, "finishBuild", json!({"buildId": build, "result": {"case": "success", "value": {}}})),
            call(bs, "getBuildSteps", json!({"projectId": project, "buildId": build, "pageSize": 1})),
            call(bs, "getBuildStepLogs", json!({"projectId": project, "buildId": build,
                "buildStepDigest": "sha256:run", "pageSize": 2})),
            call(cbs, "getBuild", json!({"buildId": build})),
            call(bs, "getBuildSteps", json!({"projectId": other.project.id, "buildId": build})),
            {"service": bs, "method": "getBuildSteps", "request": {"projectId": project, "buildId": build}, "token": stranger},
        ]),
    )
    .await;
    ok(&r[0]);
    assert!(err(&r[1], "invalid_argument").contains("success"));
    ok(&r[2]);
    let steps = ok(&r[3]).clone();
    assert_eq!(steps["buildSteps"].as_array().unwrap().len(), 1);
    assert_eq!(
        steps["buildSteps"][0]["name"],
        "[1/2] FROM docker.io/library/alpine"
    );
    assert_eq!(steps["buildSteps"][0]["cacheState"], "CACHE_STATE_CACHED");
    let next = steps["nextPageToken"].as_str().unwrap().to_string();
    let logs = ok(&r[4]).clone();
    let lines: Vec<&str> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["compiling", "linking"]);
    let next_logs = logs["nextPageToken"].as_str().unwrap().to_string();
    let got = &ok(&r[5])["build"];
    assert_eq!(got["status"], "STATUS_SUCCESS");
    assert_eq!(got["totalSteps"], 2);
    assert_eq!(got["cachedSteps"], 1);
    assert!(got["buildDurationSeconds"].is_number(), "{got}");
    // A build of another project, or another organization's build: not found.
    err(&r[6], "not_found");
    err(&r[7], "not_found");

    // The next pages; a build token used for another build; bad pages.
    let second = sdk(
        &server,
        json!([call(bs, "createBuild", json!({"projectId": project}))]),
    )
    .await;
    let second = ok(&second[0]).clone();
    let second_build = second["buildId"].as_str().unwrap().to_string();
    let r = sdk(
        &server,
        json!([
            call(
                bs,
                "getBuildSteps",
                json!({"projectId": project, "buildId": build, "pageToken": next})
            ),
            call(
                bs,
                "getBuildStepLogs",
                json!({"projectId": project, "buildId": build,
                "buildStepDigest": "sha256:run", "pageToken": next_logs})
            ),
            as_build(
                bs,
                "getBuildSteps",
                json!({"projectId": project, "buildId": second_build})
            ),
            call(
                cbs,
                "listBuilds",
                json!({"projectId": project, "pageSize": -1})
            ),
            call(
                cbs,
                "listBuilds",
                json!({"projectId": project, "pageToken": "forged"})
            ),
            call(
                cbs,
                "listBuilds",
                json!({"projectId": project, "pageToken": next})
            ),
            call(
                cbs,
                "listBuilds",
                json!({"projectId": project, "pageSize": 1})
            ),
            call(
                "build.v1.RegistryService",
                "listImages",
                json!({"projectId": project})
            ),
            call(
                "build.v1.RegistryService",
                "deleteImage",
                json!({"projectId": project, "imageTags": ["latest"]})
            ),
        ]),
    )
    .await;
    let rest = ok(&r[0]);
    assert_eq!(rest["buildSteps"][0]["name"], "[2/2] RUN make <all>");
    assert_eq!(rest["buildSteps"][0]["hasLogs"], true);
    assert_eq!(rest["buildSteps"][0]["cacheState"], "CACHE_STATE_UNCACHED");
    assert!(rest.get("nextPageToken").is_none(), "{rest}");
    assert_eq!(ok(&r[1])["logs"][0]["message"], "done");
    assert!(ok(&r[1]).get("nextPageToken").is_none());
    err(&r[2], "permission_denied");
    assert!(err(&r[3], "invalid_argument").contains("negative"));
    assert!(err(&r[4], "invalid_argument").contains("page_token"));
    // A token of another listing is refused too.
    assert!(err(&r[5], "invalid_argument").contains("page_token"));
    let page = ok(&r[6]);
    assert_eq!(page["builds"][0]["buildId"], second_build);
    assert!(!page["nextPageToken"].as_str().unwrap().is_empty());
    assert!(err(&r[7], "unimplemented").contains("registry"));
    assert!(err(&r[8], "unimplemented").contains("registry"));

    // Sharing: the link renders without signing in until sharing stops.
    let r = sdk(
        &server,
        json!([
            call(cbs, "shareBuild", json!({"buildId": build})),
            call(cbs, "shareBuild", json!({"buildId": build})),
            as_build(cbs, "shareBuild", json!({"buildId": build})),
            {"service": cbs, "method": "shareBuild", "request": {"buildId": build}, "token": stranger},
        ]),
    )
    .await;
    let url = ok(&r[0])["shareUrl"].as_str().unwrap().to_string();
    assert_eq!(ok(&r[1])["shareUrl"], url.as_str());
    err(&r[2], "permission_denied");
    err(&r[3], "not_found");
    assert!(url.starts_with(&format!("{}/shared/builds/{build}/", server.url)));
    let page = reqwest::get(&url).await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("RUN make &lt;all&gt;"), "{html}");
    assert!(html.contains("success"));
    assert_eq!(reqwest::get(format!("{url}x")).await.unwrap().status(), 404);
    let r = sdk(
        &server,
        json!([
            call(cbs, "stopSharingBuild", json!({"buildId": build})),
            call(cbs, "shareBuild", json!({"buildId": build})),
        ]),
    )
    .await;
    ok(&r[0]);
    let again = ok(&r[1])["shareUrl"].as_str().unwrap().to_string();
    assert_ne!(again, url, "a stopped link never works again");
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 404);
    assert_eq!(reqwest::get(&again).await.unwrap().status(), 200);

    // A second build whose RUN step hits the cache saves what the first one took.
    let second_token = second["buildToken"].as_str().unwrap().to_string();
    report_steps(&server, &second_token, &second_build, true).await;
    let start = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let end = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let range = json!({"startAt": {"$timestamp": start}, "endAt": {"$timestamp": end}});
    let us = "core.v1.UsageService";
    let mut project_usage = range.clone();
    project_usage["projectId"] = json!(project);
    let mut page_one = range.clone();
    page_one["pageSize"] = json!(1);
    let r = sdk(
        &server,
        json!([
            {"service": bs, "method": "finishBuild", "request": {"buildId": second_build,
                "result": {"case": "error", "value": {"error": "exit code 2"}}}, "token": second_token},
            call(cbs, "getBuild", json!({"buildId": second_build})),
            call(us, "getUsage", range),
            call(us, "getProjectUsage", project_usage),
            call(us, "listProjectUsage", page_one),
            call(us, "getUsage", json!({"startAt": {"$timestamp": end}, "endAt": {"$timestamp": start}})),
            call(us, "getProjectUsage", json!({"projectId": other.project.id})),
            {"service": us, "method": "getUsage", "request": {}, "token": stranger},
        ]),
    )
    .await;
    ok(&r[0]);
    let got = &ok(&r[1])["build"];
    assert_eq!(got["status"], "STATUS_FAILED");
    assert_eq!(got["savedDurationSeconds"], 3);
    assert_eq!(got["cachedSteps"], 2);
    let usage = ok(&r[2]);
    let builds = &usage["containerBuild"][0];
    assert_eq!(builds["projectName"], t.project.name.as_str());
    assert_eq!(builds["buildCount"], 2);
    assert!((builds["minutesSaved"].as_f64().unwrap() - 0.05).abs() < 1e-3);
    assert_eq!(usage["storage"][0]["storageType"], "cache");
    assert_eq!(usage["periodStart"].as_str().unwrap()[..16], start[..16]);
    let project_usage = &ok(&r[3])["usage"];
    assert_eq!(project_usage["projectId"], project.as_str());
    assert_eq!(project_usage["buildCount"], 2);
    assert_eq!(ok(&r[4])["usage"].as_array().unwrap().len(), 1);
    assert!(err(&r[5], "invalid_argument").contains("before"));
    err(&r[6], "not_found");
    // Another organization sees none of this one's usage.
    assert!(
        ok(&r[7])
            .get("containerBuild")
            .is_none_or(|b| b.as_array().unwrap().is_empty())
    );
    server.stop().await;
}
