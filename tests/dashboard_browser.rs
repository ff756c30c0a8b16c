//! The dashboard end to end in Debian's chromium, driven by playwright-core (both
//! installed by scripts/test.sh), against a real `kiln serve` with local builders: sign
//! in, create a project, change its cache size (read back through the official SDK),
//! reset the cache after confirming, watch a `depot build` appear and finish live, open
//! its chart, make and revoke a token, and check escaping and forged requests
//! (tests/fixtures/browser/dashboard.mjs). Screenshots land in target/screenshots/.
mod common;

use std::time::Duration;

use common::{Kiln, TestDb, free_port, tenant};

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through `bash scripts/test.sh`, which installs it")
    })
}

#[tokio::test]
async fn a_user_runs_a_project_from_the_dashboard_in_chromium() {
    let (chromium, playwright, sdk, depot_cli) = (
        required("TEST_CHROMIUM"),
        required("TEST_PLAYWRIGHT_DIR"),
        required("TEST_DEPOT_SDK_DIR"),
        required("TEST_DEPOT_CLI"),
    );
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "browser").await;
    let xss_name = "<img src=x onerror=alert(1)>";
    common::project(&db.pool, &t.org_id, xss_name).await;
    common::set_password(&db.pool, &t.user_id, "correct horse battery").await;
    let email: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(&t.user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /\n",
    )
    .unwrap();
    std::fs::write(context.path().join("hello.txt"), "hi\n").unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let cache_dir = home.path().join("cache").display().to_string();
    let mut kiln = Kiln::spawn(
        &["serve"],
        &[
            ("KILN_DATABASE__URL", db.url.as_str()),
            (
                "KILN_SECRETS__KEY_ENCRYPTION_KEY",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            ),
            ("KILN_SERVER__PUBLIC_URL", url.as_str()),
            ("KILN_CACHE__LOCAL__DIR", cache_dir.as_str()),
        ],
        port,
    );
    kiln.wait_ready().await;

    let screenshots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/browser/dashboard.mjs"
    );
    let run = tokio::process::Command::new("node")
        .arg(script)
        .env("KILN_URL", &url)
        .env("DEPOT_API_URL", &url)
        .env("EMAIL", &email)
        .env("PASSWORD", "correct horse battery")
        .env("XSS_NAME", xss_name)
        .env("SCREENSHOTS", screenshots)
        .env("TEST_CHROMIUM", chromium)
        .env("TEST_PLAYWRIGHT_DIR", playwright)
        .env("TEST_DEPOT_SDK_DIR", sdk)
        .env("DEPOT_CLI", depot_cli)
        .env("DEPOT_HOME", home.path())
        .env("BUILD_CONTEXT", context.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the browser session finished within 5 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser session failed:\n{stdout}\n{}\nkiln log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        kiln.logs()
    );
    println!("{stdout}");
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let project_id = result["project_id"].as_str().unwrap();
    let build_id = result["build_id"].as_str().unwrap();

    // What the browser did, as the database recorded it.
    let (size, name): (i32, String) =
        sqlx::query_as("SELECT cache_size_gb_amd64, name FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((size, name.as_str()), (75, "made in the browser"));
    let (state, project): (String, String) =
        sqlx::query_as("SELECT state, project_id FROM builds WHERE id = $1")
            .bind(build_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), project.as_str()), ("success", project_id));
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_events WHERE target_id = $1 OR details->>'project_id' = $1
         ORDER BY id",
    )
    .bind(project_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for expected in ["project.create", "project.update", "cache.reset"] {
        assert!(
            actions.iter().any(|a| a == expected),
            "{expected} in {actions:?}"
        );
    }
    let live_tokens: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tokens
         WHERE project_id = $1 AND name = 'browser' AND revoked_at IS NULL",
    )
    .bind(project_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(live_tokens, 0, "the token made in the browser was revoked");
    for shot in [
        "01-sign-in",
        "02-projects",
        "05-project",
        "06-builds",
        "07-build",
        "09-operations",
    ] {
        let path = format!("{screenshots}/{shot}.png");
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 1000),
            "{path}"
        );
    }
}
