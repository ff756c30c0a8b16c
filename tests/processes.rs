//! The real binary: replicas migrating together, an unreachable database, bad config,
//! `kiln dev`, `kiln admin`, and SIGTERM.
mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{Kiln, TestDb, free_port, kiln_bin, wait_for};

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(kiln_bin())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn two_replicas_migrating_one_empty_database_both_come_up() {
    let db = TestDb::empty().await;
    let env = [("KILN_DATABASE__URL", db.url.as_str())];
    let mut a = Kiln::spawn(&["serve"], &env, free_port());
    let mut b = Kiln::spawn(&["serve"], &env, free_port());
    a.wait_ready().await;
    b.wait_ready().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, kiln::db::MIGRATOR.iter().count());
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

#[tokio::test]
async fn an_unreachable_database_is_retried_quietly_without_crashing() {
    let dead = format!("postgres://kiln:secretpw@127.0.0.1:{}/kiln", free_port());
    let env = [
        ("KILN_DATABASE__URL", dead.as_str()),
        ("KILN_DATABASE__RECONNECT_MAX_BACKOFF_SECONDS", "1"),
        ("KILN_DATABASE__ACQUIRE_TIMEOUT_SECONDS", "1"),
        ("KILN_LOG__FILTER", "info,kiln=debug"),
    ];
    let mut kiln = Kiln::spawn(&["serve"], &env, free_port());
    wait_for("/healthz", Duration::from_secs(30), || async {
        kiln.status("/healthz").await == Some(200)
    })
    .await;
    assert_eq!(kiln.status("/readyz").await, Some(503));
    // Several backoff rounds later: still up, still one warning, password never logged.
    wait_for("three quiet retries", Duration::from_secs(30), || async {
        kiln.logs().matches("database still unreachable").count() >= 3
    })
    .await;
    assert!(
        kiln.child.try_wait().unwrap().is_none(),
        "kiln exited:\n{}",
        kiln.logs()
    );
    let logs = kiln.logs();
    assert_eq!(logs.matches("database unreachable").count(), 1, "{logs}");
    assert!(!logs.contains("secretpw"), "{logs}");
    assert!(kiln.terminate().success());
}

#[tokio::test]
async fn malformed_config_fails_fast_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kiln.toml");
    std::fs::write(&bad, "[database]\nmax_connections = \"many\"\n").unwrap();
    let (ok, _, stderr) = run(&["--config", bad.to_str().unwrap(), "migrate"], &[]);
    assert!(!ok);
    assert!(
        stderr.contains("database.max_connections") && stderr.contains("many"),
        "{stderr}"
    );

    let (ok, _, stderr) = run(&["serve"], &[("KILN_SERVER__LISTEN", "nope")]);
    assert!(!ok);
    assert!(stderr.contains("server.listen"), "{stderr}");

    let (ok, _, stderr) = run(&["serve"], &[]);
    assert!(!ok, "serve without a database URL must fail");
    assert!(stderr.contains("database.url is not set"), "{stderr}");
}

#[tokio::test]
async fn version_and_help_describe_the_commands() {
    let (ok, stdout, _) = run(&["--version"], &[]);
    assert!(ok);
    assert_eq!(stdout.trim(), format!("kiln {}", env!("CARGO_PKG_VERSION")));
    let (ok, stdout, _) = run(&["--help"], &[]);
    assert!(ok);
    for cmd in ["serve", "migrate", "dev", "admin"] {
        assert!(stdout.contains(cmd), "{stdout}");
    }
    let (ok, stdout, _) = run(&["admin", "token", "create", "--help"], &[]);
    assert!(ok && stdout.contains("--expires-in-days"), "{stdout}");
}

#[tokio::test]
async fn admin_commands_manage_tenants_and_tokens() {
    let db = TestDb::new().await;
    let env = [("KILN_DATABASE__URL", db.url.as_str())];
    let json_line = |out: &str| -> serde_json::Value {
        serde_json::from_str(out.lines().next().unwrap()).unwrap()
    };

    let (ok, out, err) = run(
        &[
            "admin",
            "--json",
            "org",
            "create",
            "--name",
            "Acme",
            "--owner-email",
            "ada@acme.test",
        ],
        &env,
    );
    assert!(ok, "{err}");
    let org = json_line(&out)["id"].as_str().unwrap().to_string();
    let (ok, out, err) = run(
        &[
            "admin",
            "--json",
            "project",
            "create",
            "--org",
            &org,
            "--name",
            "api",
            "--cache-size-gb",
            "120",
        ],
        &env,
    );
    assert!(ok, "{err}");
    let project = json_line(&out);
    assert_eq!(project["cache_size_gb_amd64"], 120);
    let project_id = project["id"].as_str().unwrap().to_string();

    let (ok, token, err) = run(
        &[
            "admin",
            "token",
            "create",
            "--kind",
            "project",
            "--project",
            &project_id,
            "--name",
            "ci",
        ],
        &env,
    );
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.starts_with("kiln_p_"), "{token}");

    let (ok, listing, _) = run(&["admin", "token", "list", "--project", &project_id], &env);
    assert!(ok);
    assert!(!listing.contains(&token), "listing shows the secret");
    assert!(
        listing.contains(&token[..13]),
        "listing shows the prefix: {listing}"
    );

    let (ok, _, err) = run(
        &[
            "admin",
            "token",
            "create",
            "--kind",
            "build",
            "--project",
            &project_id,
        ],
        &env,
    );
    assert!(!ok && err.contains("minted by Kiln itself"), "{err}");

    let (ok, _, err) = run(
        &["admin", "project", "create", "--org", &org, "--name", "api"],
        &env,
    );
    assert!(!ok && err.contains("already exists"), "{err}");

    let (ok, out, _) = run(&["admin", "--json", "audit", "list", "--org", &org], &env);
    assert!(ok);
    let actions: Vec<String> = out
        .lines()
        .map(|l| json_line(l)["action"].as_str().unwrap().to_string())
        .collect();
    assert!(
        actions.contains(&"project.create".to_string())
            && actions.contains(&"token.create".to_string()),
        "{actions:?}"
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let db = TestDb::new().await;
    let mut kiln = Kiln::spawn(
        &["serve"],
        &[("KILN_DATABASE__URL", db.url.as_str())],
        free_port(),
    );
    kiln.wait_ready().await;
    let status = kiln.terminate();
    assert!(status.success(), "exit {status}:\n{}", kiln.logs());
    let logs = kiln.logs();
    assert!(
        logs.contains("shutdown signal received") && logs.contains("kiln stopped"),
        "{logs}"
    );
}

fn read_dev_line(child: &mut Child) -> (String, String, String) {
    use std::io::{BufRead, BufReader};
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("DEPOT_API_URL=") {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .unwrap()
                    .to_string()
            };
            let result = (
                field("DEPOT_API_URL"),
                field("DEPOT_TOKEN"),
                field("DEPOT_PROJECT_ID"),
            );
            // The hint names a depot CLI that exists: `depot` on PATH, or the pinned copy
            // scripts/test.sh installed.
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(line.ends_with(" projects list"), "{line}");
            let program = words[words.len() - 3];
            assert!(
                program == "depot" || Path::new(program).is_file(),
                "{program} does not exist: {line}"
            );
            std::thread::spawn(move || for _ in lines {});
            return result;
        }
    }
    panic!("kiln dev printed no DEPOT_API_URL line");
}

fn postgres_running(dir: &Path) -> bool {
    // The cluster lives in <data>/postgres, or a /var/tmp fallback when unreachable.
    dir.join("postgres/data/postmaster.pid").exists()
}

#[tokio::test]
async fn kiln_dev_boots_from_nothing_and_reuses_its_data() {
    let parent = tempfile::Builder::new()
        .prefix("kiln-dev-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    // The postgres user (when we are root) must be able to reach the data dir.
    std::fs::set_permissions(
        parent.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data = parent.path().join("data");
    let data_arg = data.to_str().unwrap().to_string();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "dev",
        "--data-dir",
        data_arg.as_str(),
        "--listen",
        listen.as_str(),
    ];

    let mut first = Kiln::spawn(&args, &[], port);
    let (api_url, token, project) = read_dev_line(&mut first.child);
    assert_eq!(api_url, format!("http://{listen}"));
    first.wait_ready().await;
    assert!(postgres_running(&data));
    let me: serde_json::Value = reqwest::Client::new()
        .get(format!("{api_url}/api/v1/projects/{project}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["project"]["id"], project, "{me}");
    assert!(first.terminate().success(), "{}", first.logs());
    assert!(
        !postgres_running(&data),
        "PostgreSQL left running after exit"
    );
    let secrets = std::fs::metadata(data.join("dev-secrets.toml")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&secrets.permissions()) & 0o777,
        0o600
    );

    let mut second = Kiln::spawn(&args, &[], port);
    let (_, token2, project2) = read_dev_line(&mut second.child);
    second.wait_ready().await;
    assert_eq!(project2, project, "second start reuses the data");
    assert_ne!(token2, token, "each start mints a fresh token");
    let me_status = || async {
        reqwest::Client::new()
            .get(format!("{api_url}/api/v1/me"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status()
    };
    // The first token is still valid: its hash is in the reused database.
    assert_eq!(me_status().await, 200);

    // The postmaster dies: kiln dev starts it again on the same port and says so, and
    // the service answers again without anyone's help.
    let pid_file = data.join("postgres/data/postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: killing the test's own PostgreSQL postmaster.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    common::wait_for(
        "kiln dev to restart PostgreSQL",
        Duration::from_secs(60),
        || async { second.logs().contains("the dev PostgreSQL is back") },
    )
    .await;
    assert!(
        second.logs().contains("stopped unexpectedly"),
        "{}",
        second.logs()
    );
    common::wait_for("readiness again", Duration::from_secs(30), || async {
        second.status("/readyz").await == Some(200)
    })
    .await;
    assert_eq!(me_status().await, 200);
    assert!(second.terminate().success(), "{}", second.logs());
    assert!(!postgres_running(&data));
}

#[tokio::test]
async fn admin_lists_and_drains_machines() {
    let db = TestDb::new().await;
    let t = common::tenant(&db.pool, "a").await;
    sqlx::query("INSERT INTO machines (id, provider, platform, project_id, state) VALUES ('m1', 'local', 'amd64', $1, 'ready')")
        .bind(&t.project.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let env = [("KILN_DATABASE__URL", db.url.as_str())];
    let (ok, out, err) = run(&["admin", "--json", "machines", "list"], &env);
    assert!(ok, "{err}");
    let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (row["id"].as_str(), row["state"].as_str()),
        (Some("m1"), Some("ready"))
    );

    let (ok, _, err) = run(&["admin", "machines", "drain", "m1"], &env);
    assert!(ok, "{err}");
    let state: String = sqlx::query_scalar("SELECT state FROM machines WHERE id = 'm1'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "draining");
    let (ok, _, err) = run(&["admin", "machines", "drain", "m1"], &env);
    assert!(!ok && err.contains("not ready or assigned"), "{err}");
}
