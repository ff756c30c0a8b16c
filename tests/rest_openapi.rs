//! The REST API against its own OpenAPI 3.1 document (`/api/v1/openapi.json`, generated
//! from the handlers): schemathesis (PyPI, installed by scripts/test.sh) sends generated
//! valid and invalid requests to every operation with a valid token, and no answer may be
//! a 5xx or stray from the document's schemas.
mod common;

use common::{Server, TestDb, tenant};

#[test]
fn the_document_is_openapi_3_1_and_covers_every_operation() {
    let doc = serde_json::to_value(kiln::api::rest::openapi()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/projects/{id}", &["get", "patch", "delete"][..]),
        ("/projects/{id}/builds", &["get", "post"]),
        ("/builds/{id}/steps/{digest}/logs", &["get"]),
        ("/builds/{id}/share", &["post", "delete"]),
        ("/usage", &["get"]),
        ("/organizations/{id}/audit-events", &["get"]),
        ("/machines", &["get"]),
        ("/builds/{id}/endpoint", &["get"]),
        ("/tokens/{id}", &["patch", "delete"]),
    ] {
        for method in methods {
            let op = &paths[path][method];
            assert!(op.is_object(), "{method} {path} is documented");
            assert!(
                op["responses"]["4XX"]["content"]["application/json"].is_object(),
                "{method} {path} documents its errors"
            );
        }
    }
    let patch = &paths["/projects/{id}"]["patch"];
    assert!(
        patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "If-Match")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_responses_outside_the_schema() {
    let st = std::env::var("TEST_SCHEMATHESIS").expect(
        "TEST_SCHEMATHESIS is not set: run the tests through `bash scripts/test.sh`, which installs schemathesis",
    );
    let db = TestDb::new().await;
    // GetEndpoint answers `pending` at once instead of holding each request 20 s.
    let server = Server::start(&db, &[("KILN_BUILDS__CONNECTION_WAIT_SECONDS", "0")]).await;
    let t = tenant(&db.pool, "fuzz").await;
    let served: serde_json::Value = reqwest::get(format!("{}/api/v1/openapi.json", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        served,
        serde_json::to_value(kiln::api::rest::openapi()).unwrap()
    );

    // Real ids for the path parameters, so generated requests reach the handlers' logic
    // instead of stopping at 404 (deleting the project is left to random ids).
    let http = reqwest::Client::new();
    let build: serde_json::Value = http
        .post(format!(
            "{}/api/v1/projects/{}/builds",
            server.url, t.project.id
        ))
        .bearer_auth(&t.user_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let build_id = build["build"]["id"].as_str().unwrap();
    let victim = common::domain(&db.pool)
        .projects
        .create(
            &common::operator(),
            Some(&t.org_id),
            kiln::projects::ProjectSettings {
                name: Some("victim".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[operations]]
include-path-regex = "^/projects/\\{{id\\}}"
exclude-method = "DELETE"
parameters = {{ "path.id" = "{project}" }}

[[operations]]
include-path = "/projects/{{id}}"
include-method = "DELETE"
parameters = {{ "path.id" = "{victim}" }}

[[operations]]
include-path-regex = "^/builds/\\{{id\\}}"
parameters = {{ "path.id" = "{build_id}" }}

[[operations]]
include-path-regex = "^/organizations/\\{{id\\}}"
parameters = {{ "path.id" = "{org}" }}
"#,
            project = t.project.id,
            org = t.org_id,
            victim = victim.id,
        ),
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = tokio::process::Command::new(st)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", server.url))
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", t.user_token),
        ])
        .args(["--max-examples", "25", "--seed", "20261202"])
        .args(["--phases", "examples,coverage,fuzzing"])
        // One worker: hypothesis parses lambdas' source with `ast` from each worker thread,
        // and CPython 3.11's parser is not thread-safe ("AST constructor recursion depth
        // mismatch" on a random operation, seen once under the full suite's load).
        .args(["--workers", "1", "--no-color"])
        .arg("--report-dir")
        .arg(&reports)
        .args(["--generation-database", "none"])
        // Its caches and reports stay out of the checkout.
        .current_dir(dir.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(600), out)
        .await
        .expect("schemathesis finished within 10 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The generated requests reached the handlers' logic with the real ids.
    let updates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'project.update' AND target_id = $1",
    )
    .bind(&t.project.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        updates > 0,
        "no generated PATCH changed the project:\n{stdout}"
    );
    let state: String = sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
        .bind(build_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_ne!(
        state, "queued",
        "no generated request finished or canceled the build"
    );
    let victim_left: i64 = sqlx::query_scalar("SELECT count(*) FROM projects WHERE id = $1")
        .bind(&victim.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        victim_left, 0,
        "the generated DELETE reached a real project"
    );
    server.stop().await;
}
