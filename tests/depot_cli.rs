//! End to end with the unmodified depot CLI (npm @depot/cli-linux-x64 0.0.1-cli.2.102.12,
//! installed by scripts/test.sh), over h2c (`http://`) and TLS (`https://`).
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Kiln, Tenant, TestDb, free_port, tenant};
use kiln::auth::TokenKind;
use prost::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn depot_bin() -> PathBuf {
    PathBuf::from(std::env::var("TEST_DEPOT_CLI").expect(
        "TEST_DEPOT_CLI is not set: run the tests through `bash scripts/test.sh`, which installs the depot CLI",
    ))
}

struct Setup {
    db: TestDb,
    kiln: Kiln,
    tenant: Tenant,
    api_url: String,
    ca_file: Option<PathBuf>,
    home: tempfile::TempDir,
    _certs: Option<tempfile::TempDir>,
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Output {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A CA and a server certificate for localhost/127.0.0.1, written as PEM files.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    certificate_files(dir, "server", &["localhost", "127.0.0.1"])
}

/// A test CA and a certificate for `names` signed by it, written as PEM files:
/// (`<stem>-ca.pem`, `<stem>.pem`, `<stem>.key`).
fn certificate_files(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kiln test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params
        .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    let paths = (
        dir.join(format!("{stem}-ca.pem")),
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

async fn setup(tls: bool) -> Setup {
    setup_with(tls, &[]).await
}

async fn setup_with(tls: bool, extra: &[(String, String)]) -> Setup {
    let db = TestDb::new().await;
    let home = tempfile::tempdir().unwrap();
    let tenant = tenant(&db.pool, "cli").await;
    common::set_password(&db.pool, &tenant.user_id, "correct horse battery").await;
    let port = free_port();
    let mut env = vec![
        ("KILN_DATABASE__URL".to_string(), db.url.clone()),
        // Per-request lines, to check what they leave out.
        (
            "KILN_LOG__FILTER".to_string(),
            "info,tower_http=debug".to_string(),
        ),
        (
            "KILN_SECRETS__KEY_ENCRYPTION_KEY".to_string(),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string(),
        ),
    ];
    let (api_url, ca_file, certs) = if tls {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = tls_files(dir.path());
        env.push((
            "KILN_SERVER__TLS__CERT_PATH".into(),
            cert.display().to_string(),
        ));
        env.push((
            "KILN_SERVER__TLS__KEY_PATH".into(),
            key.display().to_string(),
        ));
        // Local builder agents call this server over TLS and must trust its CA.
        env.push((
            "KILN_BUILDERS__AGENT_API_CA_FILE".into(),
            ca.display().to_string(),
        ));
        (format!("https://localhost:{port}"), Some(ca), Some(dir))
    } else {
        (format!("http://127.0.0.1:{port}"), None, None)
    };
    env.push(("KILN_SERVER__PUBLIC_URL".into(), api_url.clone()));
    env.push((
        "KILN_CACHE__LOCAL__DIR".into(),
        home.path().join("cache").display().to_string(),
    ));
    env.extend_from_slice(extra);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut kiln = Kiln::spawn(&["serve"], &env_refs, port);
    if tls {
        // /readyz over TLS: wait for the log line instead of polling with plain HTTP.
        common::wait_for("kiln to listen", Duration::from_secs(60), || async {
            kiln.logs().contains("database migrated; ready")
        })
        .await;
    } else {
        kiln.wait_ready().await;
    }
    Setup {
        db,
        kiln,
        tenant,
        api_url,
        ca_file,
        home,
        _certs: certs,
    }
}

impl Setup {
    fn command(&self, args: &[&str], token: Option<&str>) -> Command {
        let mut cmd = Command::new(depot_bin());
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.home.path())
            .env("DEPOT_API_URL", &self.api_url)
            .env("DEPOT_NO_UPDATE_NOTIFIER", "1")
            .env("DEPOT_ERROR_TELEMETRY", "0")
            .env("DEPOT_DISABLE_OTEL", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = token {
            cmd.env("DEPOT_TOKEN", token);
        }
        if let Some(ca) = &self.ca_file {
            cmd.env("SSL_CERT_FILE", ca);
        }
        cmd
    }

    async fn depot(&self, args: &[&str], token: Option<&str>) -> Output {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args, token).output())
            .await
            .unwrap_or_else(|_| panic!("depot {args:?} did not finish in 60 s"))
            .unwrap();
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    /// A Connect call made directly, for setup the CLI can't do by itself.
    async fn connect<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        token: &str,
        req: &Req,
    ) -> Resp {
        let mut client = reqwest::Client::builder();
        if let Some(ca) = &self.ca_file {
            client = client.add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
            );
        }
        let res = client
            .build()
            .unwrap()
            .post(format!("{}/{method}", self.api_url))
            .bearer_auth(token)
            .header("content-type", "application/proto")
            .body(req.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{method}: {}", res.text().await.unwrap());
        Resp::decode(res.bytes().await.unwrap()).unwrap()
    }
}

async fn exercise_project_commands(s: &Setup) {
    let token = &s.tenant.user_token;
    let project = &s.tenant.project;

    let out = s.depot(&["projects", "list"], Some(token)).await;
    assert!(out.ok, "{}", out.all());
    assert!(
        out.stdout.contains(&project.id) && out.stdout.contains(&project.name),
        "{}",
        out.all()
    );

    let out = s
        .depot(
            &[
                "projects",
                "create",
                "--organization",
                &s.tenant.org_id,
                "--cache-storage-policy",
                "80",
                "e2e-new",
            ],
            Some(token),
        )
        .await;
    assert!(out.ok, "{}", out.all());
    let created: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|_| panic!("{}", out.all()));
    assert_eq!(created["name"], "e2e-new");
    assert_eq!(created["cache_policy"]["keep_bytes"], 80i64 << 30);
    let stored = kiln::db::projects::find_by_name(&s.db.pool, &s.tenant.org_id, "e2e-new")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.cache_size_gb_amd64, stored.cache_size_gb_arm64),
        (80, 80)
    );

    let out = s
        .depot(&["cache", "reset", "--project", &project.id], Some(token))
        .await;
    assert!(out.ok, "{}", out.all());
    assert!(
        out.stdout
            .contains(&format!("Cache reset for {}", project.name)),
        "{}",
        out.all()
    );
    let generation: i32 = sqlx::query_scalar("SELECT cache_generation FROM projects WHERE id = $1")
        .bind(&project.id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(generation, 1);

    // A build made through the API, finished, then listed by the CLI.
    use kiln::proto::depot::cli::v1 as pb;
    let created: pb::CreateBuildResponse = s
        .connect(
            "depot.cli.v1.BuildService/CreateBuild",
            token,
            &pb::CreateBuildRequest {
                project_id: Some(project.id.clone()),
                options: vec![],
                required_engine: None,
            },
        )
        .await;
    let _: pb::FinishBuildResponse = s
        .connect(
            "depot.cli.v1.BuildService/FinishBuild",
            &created.build_token,
            &pb::FinishBuildRequest {
                build_id: created.build_id.clone(),
                result: Some(pb::finish_build_request::Result::Success(
                    pb::finish_build_request::BuildSuccess {},
                )),
            },
        )
        .await;
    let out = s
        .depot(&["list", "builds", "--project", &project.id], Some(token))
        .await;
    assert!(out.ok, "{}", out.all());
    assert!(
        out.stdout.contains(&created.build_id) && out.stdout.contains("finished"),
        "{}",
        out.all()
    );

    let out = s
        .depot(&["pull-token", "--project", &project.id], Some(token))
        .await;
    assert!(out.ok, "{}", out.all());
    let pull = out.stdout.trim().to_string();
    assert!(pull.starts_with("kiln_pl_"), "{}", out.all());
    let principal = reqwest_me(s, &pull).await;
    assert_eq!(principal["kind"], "pull");
    assert_eq!(principal["project_id"], project.id);

    let out = s
        .depot(&["projects", "list"], Some("kiln_u_not_a_real_token"))
        .await;
    assert!(!out.ok);
    assert!(
        out.all().contains("unauthenticated") && out.all().contains("unknown token"),
        "{}",
        out.all()
    );

    // A project token of another organization sees nothing of this one.
    let other = tenant(&s.db.pool, "other").await;
    let foreign = common::project_token(&s.db.pool, &other.project, TokenKind::Project).await;
    let out = s
        .depot(
            &["cache", "reset", "--project", &project.id],
            Some(&foreign),
        )
        .await;
    assert!(!out.ok);
    assert!(out.all().contains("not_found"), "{}", out.all());
}

async fn reqwest_me(s: &Setup, token: &str) -> serde_json::Value {
    let mut client = reqwest::Client::builder();
    if let Some(ca) = &s.ca_file {
        client = client.add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
        );
    }
    client
        .build()
        .unwrap()
        .get(format!("{}/api/v1/me", s.api_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn exercise_build_onboarding(s: &Setup) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let context = dir.path().to_str().unwrap();
    let out = s
        .depot(
            &[
                "build",
                "--project",
                "doesnotexist",
                "--progress",
                "plain",
                context,
            ],
            Some(&s.tenant.user_token),
        )
        .await;
    assert!(!out.ok);
    // not_found sends the CLI to ListProjects and its onboarding message.
    assert!(
        out.all().contains("missing project ID") || out.all().contains("Available Projects"),
        "{}",
        out.all()
    );

    let out = s
        .depot(
            &[
                "build",
                "--project",
                &s.tenant.project.id,
                "--progress",
                "plain",
                context,
            ],
            Some("kiln_u_bad"),
        )
        .await;
    assert!(!out.ok);
    assert!(out.all().contains("unauthenticated"), "{}", out.all());

    // `--save` would report an image saved that does not exist: refused up front.
    let builds_before: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let out = s
        .depot(
            &[
                "build",
                "--project",
                &s.tenant.project.id,
                "--save",
                "--progress",
                "plain",
                context,
            ],
            Some(&s.tenant.user_token),
        )
        .await;
    assert!(!out.ok, "{}", out.all());
    assert!(
        out.all().contains("failed_precondition") && out.all().contains("--save"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("depot pull"), "{}", out.all());
    let builds_after: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(builds_after, builds_before, "no build was started");
}

async fn exercise_builds(s: &Setup) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hi\n").unwrap();
    let context = dir.path().to_str().unwrap();
    let project = &s.tenant.project.id;
    for platforms in ["linux/amd64", "linux/amd64,linux/arm64"] {
        let out = s
            .depot(
                &[
                    "build",
                    "--project",
                    project,
                    "--platform",
                    platforms,
                    "--progress",
                    "plain",
                    context,
                ],
                Some(&s.tenant.user_token),
            )
            .await;
        assert!(
            out.ok,
            "depot build --platform {platforms} failed:\n{}\nkiln log:\n{}",
            out.all(),
            s.kiln.logs()
        );
        let build_id: String = sqlx::query_scalar(
            "SELECT id FROM builds WHERE project_id = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(project)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
        assert!(
            out.all().contains(&build_id),
            "the CLI printed another build: {}",
            out.all()
        );
        let state: String = sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
            .bind(&build_id)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
        assert_eq!(state, "success", "FinishBuild recorded success");
        let platforms_used: Vec<String> =
            sqlx::query_scalar("SELECT platform || ':' || state FROM build_platforms WHERE build_id = $1 ORDER BY platform")
                .bind(&build_id)
                .fetch_all(&s.db.pool)
                .await
                .unwrap();
        let expected: Vec<String> = platforms
            .split(',')
            .map(|p| format!("{}:released", p.trim_start_matches("linux/")))
            .collect();
        assert_eq!(platforms_used, expected);
        let steps = kiln::db::builds::steps(&s.db.pool, &build_id)
            .await
            .unwrap();
        assert!(
            steps
                .iter()
                .any(|st| st.name.contains("launching amd64 machine")),
            "steps: {steps:?}"
        );
    }
    // One builder per architecture, reused across builds, idle again afterwards.
    let machines: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT platform, state, active_builds FROM machines WHERE project_id = $1 ORDER BY platform",
    )
    .bind(project)
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        machines,
        vec![
            ("amd64".into(), "ready".into(), 0),
            ("arm64".into(), "ready".into(), 0)
        ]
    );
}

async fn exercise_login(s: &Setup) {
    let mut child = s
        .command(&["login"], None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let approve_url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.split_whitespace().find(|w| w.contains("/login/")) {
                return url.to_string();
            }
        }
        panic!("depot login printed no approval URL");
    })
    .await
    .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let mut client = reqwest::Client::builder();
    if let Some(ca) = &s.ca_file {
        client = client.add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
        );
    }
    let client = client.build().unwrap();
    // The URL carries a short user code, shown on the page for comparison; the claim
    // secret the CLI holds is never in it.
    let code = approve_url.rsplit('/').next().unwrap().to_string();
    assert_eq!(
        kiln::auth::login::normalize_user_code(&code).as_deref(),
        Some(code.as_str()),
        "{approve_url}"
    );
    let page = client.get(&approve_url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let text = page.text().await.unwrap();
    assert!(text.contains("Approve") && text.contains(&code), "{text}");

    let email: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(&s.tenant.user_id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let wrong = client
        .post(&approve_url)
        .form(&[
            ("email", email.as_str()),
            ("password", "nope nope"),
            ("decision", "approve"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let approved = client
        .post(&approve_url)
        .form(&[
            ("email", email.as_str()),
            ("password", "correct horse battery"),
            ("decision", "approve"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);

    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("depot login finished")
        .unwrap();
    assert!(status.success());
    let config = std::fs::read_to_string(s.home.path().join(".config/depot/depot.yaml")).unwrap();
    assert!(config.contains("api_token: kiln_u_"), "{config}");
    assert!(config.contains(&s.tenant.org_id), "{config}");

    // Request logging is on (debug), yet the code never reaches the log.
    let logs = s.kiln.logs();
    assert!(
        logs.contains("/login/<redacted>"),
        "request paths are logged"
    );
    assert!(!logs.contains(&code), "the user code was logged");

    // The stored token works for the org commands, which only use the config token.
    let out = s.depot(&["org", "list"], None).await;
    assert!(
        out.ok && out.stdout.contains(&s.tenant.org_id),
        "{}",
        out.all()
    );
}

#[tokio::test]
async fn depot_cli_over_h2c() {
    let s = setup(false).await;
    exercise_project_commands(&s).await;
    exercise_build_onboarding(&s).await;
    exercise_builds(&s).await;
    exercise_login(&s).await;
    drop(s.kiln);
}

#[tokio::test]
async fn depot_cli_over_tls() {
    let s = setup(true).await;
    exercise_project_commands(&s).await;
    exercise_build_onboarding(&s).await;
    exercise_builds(&s).await;
    exercise_login(&s).await;
    drop(s.kiln);
}

#[tokio::test]
async fn depot_cli_with_a_path_prefix() {
    let mut s = setup(false).await;
    s.api_url = format!("{}/some/prefix", s.api_url);
    let out = s
        .depot(&["projects", "list"], Some(&s.tenant.user_token))
        .await;
    assert!(out.ok, "{}", out.all());
    assert!(out.stdout.contains(&s.tenant.project.id));
}

/// A context the CLI builds (one COPY), for build tests.
fn build_context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hi\n").unwrap();
    dir
}

/// The machine serving `project`'s amd64 builds, once one serves.
async fn serving_machine(s: &Setup, project: &str) -> String {
    sqlx::query_scalar(
        "SELECT id FROM machines WHERE project_id = $1 AND platform = 'amd64'
         AND state IN ('ready', 'assigned') ORDER BY created_at DESC LIMIT 1",
    )
    .bind(project)
    .fetch_one(&s.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn depot_build_keeps_its_cache_on_a_ceph_volume_across_builders() {
    let Ok(conf) = std::env::var("TEST_CEPH_CONF") else {
        panic!(
            "TEST_CEPH_CONF is not set: run the tests through `bash scripts/test.sh`, which starts Ceph"
        );
    };
    let pool = std::env::var("TEST_CEPH_POOL").unwrap_or_else(|_| "kiln-cache".into());
    let builders = tempfile::tempdir().unwrap();
    let standin = env!("CARGO_BIN_EXE_buildkitd-standin");
    let command = format!(
        r#"["{standin}", "--listen", "{{listen}}", "--cert", "{{cert}}", "--key", "{{key}}", "--ca", "{{ca}}", "--root", "{{root}}"]"#
    );
    let extra: Vec<(String, String)> = [
        (
            "KILN_BUILDERS__LOCAL__STATE_DIR",
            builders.path().to_str().unwrap(),
        ),
        ("KILN_BUILDERS__LOCAL__COMMAND", command.as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([
        ("KILN_CACHE__PROVIDER".to_string(), "ceph".to_string()),
        ("KILN_CACHE__CEPH__CONF_PATH".to_string(), conf.clone()),
        ("KILN_CACHE__CEPH__POOL".to_string(), pool.clone()),
        ("KILN_CACHE__CAPACITY_GB".to_string(), "1000".to_string()),
    ])
    .collect();
    let s = setup_with(false, &extra).await;
    let project = s.tenant.project.id.clone();
    let token = s.tenant.user_token.clone();
    let context = build_context();
    let context = context.path().to_str().unwrap();
    let build = |label: &'static str| {
        let s = &s;
        let project = project.clone();
        let token = token.clone();
        async move {
            let out = s
                .depot(
                    &[
                        "build",
                        "--project",
                        &project,
                        "--platform",
                        "linux/amd64",
                        "--progress",
                        "plain",
                        context,
                    ],
                    Some(&token),
                )
                .await;
            assert!(
                out.ok,
                "{label} build failed:\n{}\nkiln log:\n{}",
                out.all(),
                s.kiln.logs()
            );
        }
    };

    build("first").await;
    let first = serving_machine(&s, &project).await;
    let (volume_id, namespace, image, state): (String, String, String, String) = sqlx::query_as(
        "SELECT v.id, v.namespace, v.image, v.state FROM volumes v
         JOIN machines m ON m.volume_id = v.id WHERE m.id = $1",
    )
    .bind(&first)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(state, "attached");
    assert_eq!(namespace, format!("proj-{project}"));
    let log_of = |machine: &str| {
        builders
            .path()
            .join(machine)
            .join("volume/buildkit/solves.log")
    };
    let solves = std::fs::read_to_string(log_of(&first)).unwrap();
    assert_eq!(solves.lines().count(), 1, "{solves}");
    // BuildKit's root is the mounted Ceph volume.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mount = builders.path().join(&first).join("volume");
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == mount.to_str()),
        "the volume is mounted at {}",
        mount.display()
    );

    // The builder is reaped: the agent drains, unmounts and lets go of the volume.
    sqlx::query("UPDATE machines SET state = 'draining' WHERE id = $1")
        .bind(&first)
        .execute(&s.db.pool)
        .await
        .unwrap();
    common::wait_for(
        "the builder to be reaped and the volume released",
        Duration::from_secs(60),
        || async {
            let (machine_state, volume_state): (String, String) = sqlx::query_as(
                "SELECT m.state, v.state FROM machines m, volumes v WHERE m.id = $1 AND v.id = $2",
            )
            .bind(&first)
            .bind(&volume_id)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
            machine_state == "terminated" && volume_state == "available"
        },
    )
    .await;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(builders.path().join(&first).to_str().unwrap()),
        "unmounted"
    );

    // The next build gets a new builder with the same volume: the first build's files
    // are there.
    build("second").await;
    let second = serving_machine(&s, &project).await;
    assert_ne!(second, first);
    let solves = std::fs::read_to_string(log_of(&second)).unwrap();
    assert_eq!(
        solves.lines().count(),
        2,
        "the first build's record survived: {solves}"
    );
    let (ok, du, err) = {
        let out = std::process::Command::new("rbd")
            .args([
                "du",
                "--format",
                "json",
                &format!("{pool}/{namespace}/{image}"),
            ])
            .env("CEPH_CONF", &conf)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert!(ok, "{err}");
    let du: serde_json::Value = serde_json::from_str(&du).unwrap();
    assert!(du["images"][0]["used_size"].as_i64().unwrap() > 0, "{du}");

    // BuildKit's GC keeps the volume's size less the margin (10%); raising the cache
    // size grows the volume and its filesystem, and the GC limit follows, once BuildKit
    // is idle (the CLI has gone).
    let keep_bytes = |machine: &str| -> u64 {
        let toml = std::fs::read_to_string(builders.path().join(machine).join("buildkitd.toml"))
            .unwrap_or_default();
        toml.lines()
            .find_map(|l| l.strip_prefix("keepBytes = "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    const GIB: u64 = 1 << 30;
    assert_eq!(keep_bytes(&second), 50 * GIB / 100 * 90);
    common::domain(&s.db.pool)
        .projects
        .update(
            &common::operator(),
            Some(&project),
            kiln::projects::ProjectSettings {
                cache_size_gb_amd64: Some(60),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mounted = builders.path().join(&second).join("volume");
    let filesystem_size = || -> u64 {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=size"])
            .arg(&mounted)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    };
    common::wait_for(
        "the volume, its filesystem and the GC limit to grow",
        Duration::from_secs(90),
        || async { keep_bytes(&second) == 60 * GIB / 100 * 90 && filesystem_size() > 55 * GIB },
    )
    .await;
    assert_eq!(rbd_size_of(&conf, &pool, &namespace, &image), 60 * GIB);
    build("after the grow").await;
    assert_eq!(serving_machine(&s, &project).await, second, "same builder");
    let solves = std::fs::read_to_string(log_of(&second)).unwrap();
    assert_eq!(
        solves.lines().count(),
        3,
        "the cache survived the grow: {solves}"
    );

    // A project whose cache does not fit what remains: the build is refused with the
    // reason, and no builder or volume is left behind.
    let big = common::domain(&s.db.pool)
        .projects
        .create(
            &common::operator(),
            Some(&s.tenant.org_id),
            kiln::projects::ProjectSettings {
                name: Some("huge cache".into()),
                cache_size_gb_amd64: Some(5000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let out = s
        .depot(
            &[
                "build",
                "--project",
                &big.id,
                "--platform",
                "linux/amd64",
                "--progress",
                "plain",
                context,
            ],
            Some(&token),
        )
        .await;
    assert!(!out.ok, "{}", out.all());
    assert!(
        out.all().contains("resource_exhausted")
            && out.all().contains("not enough build-cache capacity"),
        "{}",
        out.all()
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM machines WHERE project_id = $1) + (SELECT count(*) FROM volumes WHERE project_id = $1)",
    )
    .bind(&big.id)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    drop(s.kiln);
}

fn rbd_size_of(conf: &str, pool: &str, namespace: &str, image: &str) -> u64 {
    let out = std::process::Command::new("rbd")
        .args([
            "info",
            "--format",
            "json",
            &format!("{pool}/{namespace}/{image}"),
        ])
        .env("CEPH_CONF", conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["size"].as_u64().unwrap()
}

async fn add_github_trust(s: &Setup, owner: &str, repository: &str) {
    use kiln::proto::depot::core::v1 as core;
    let _: core::AddTrustPolicyResponse = s
        .connect(
            "depot.core.v1.ProjectService/AddTrustPolicy",
            &s.tenant.user_token,
            &core::AddTrustPolicyRequest {
                project_id: s.tenant.project.id.clone(),
                provider: Some(core::add_trust_policy_request::Provider::Github(
                    core::trust_policy::GitHub {
                        repository_owner: owner.into(),
                        repository: repository.into(),
                        repository_id: String::new(),
                        ..Default::default()
                    },
                )),
            },
        )
        .await;
}

async fn latest_build(s: &Setup) -> Option<(String, bool, Option<String>, String)> {
    sqlx::query_as(
        "SELECT id, ephemeral_cache, created_by, state FROM builds WHERE project_id = $1
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(&s.tenant.project.id)
    .fetch_optional(&s.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn depot_build_with_a_github_actions_oidc_token_and_no_depot_token() {
    use common::ci_issuer::{CiIssuer, REQUEST_TOKEN};
    let issuer = CiIssuer::start().await;
    let s = setup_with(
        false,
        &[(
            "KILN_OIDC__TRUSTED_ISSUERS".into(),
            issuer.trusted_as("github", true),
        )],
    )
    .await;
    add_github_trust(&s, "octo-org", "octo-repo").await;
    let context = build_context();
    let build = |repository: &str| {
        issuer.set_job_claims(serde_json::json!({
            "sub": format!("repo:{repository}:ref:refs/heads/main"),
            "repository": repository, "repository_id": "74",
            "repository_owner": repository.split('/').next().unwrap(),
        }));
        let mut cmd = s.command(
            &[
                "build",
                "--project",
                &s.tenant.project.id,
                "--progress",
                "plain",
                context.path().to_str().unwrap(),
            ],
            None,
        );
        // What GitHub's runner gives a job with `permissions: id-token: write`.
        cmd.env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("{}/actions/token?api-version=2.0", issuer.url),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN)
        .env("GITHUB_ACTIONS", "true")
        .env("CI", "true")
        .env("DEPOT_DEBUG_OIDC", "1");
        cmd
    };
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        build("octo-org/octo-repo").output(),
    )
    .await
    .unwrap()
    .unwrap();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "depot build failed:\n{all}\nkiln log:\n{}",
        s.kiln.logs()
    );
    assert!(
        issuer.token_requests() >= 1,
        "the CLI asked the runner for a token"
    );
    let (id, ephemeral, created_by, state) = latest_build(&s).await.unwrap();
    assert!(all.contains(&id), "{all}");
    assert_eq!(state, "success");
    assert!(
        !ephemeral,
        "a trusted repository builds with the project's cache"
    );
    assert!(created_by.unwrap().starts_with("oidc:"));

    // A repository the project does not trust is refused, and nothing is built.
    let out = tokio::time::timeout(Duration::from_secs(60), build("evil/octo-repo").output())
        .await
        .unwrap()
        .unwrap();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("trust relationship for GitHub repository evil/octo-repo"),
        "{all}"
    );
    assert_eq!(latest_build(&s).await.unwrap().0, id, "no new build");
}

#[tokio::test]
async fn depot_build_from_a_fork_pull_request_runs_isolated_through_kilns_issuer() {
    use common::github::{GitHub, fork_run};
    let github = GitHub::start().await;
    github.add_run(fork_run(4242));
    let certs = tempfile::tempdir().unwrap();
    // The CLI's hard-coded issuer name, served by Kiln's claim listener with a test CA.
    let (ca, cert, key) =
        certificate_files(certs.path(), "issuer", &["actions-public-oidc.depot.dev"]);
    let ip = format!(
        "127.{}.{}.{}",
        100 + rand_byte() % 100,
        1 + rand_byte() % 250,
        1 + rand_byte() % 250
    );
    let hosts = certs.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{ip} actions-public-oidc.depot.dev\n"),
    )
    .unwrap();
    let mut extra: Vec<(String, String)> = github
        .settings()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    extra.extend([
        ("KILN_OIDC__CLAIMS__LISTEN".to_string(), format!("{ip}:443")),
        (
            "KILN_OIDC__CLAIMS__TLS_CERT_PATH".into(),
            cert.display().to_string(),
        ),
        (
            "KILN_OIDC__CLAIMS__TLS_KEY_PATH".into(),
            key.display().to_string(),
        ),
        ("KILN_OIDC__CLAIMS__CHECK_INTERVAL_MS".into(), "200".into()),
    ]);
    let s = setup_with(false, &extra).await;
    add_github_trust(&s, "octo-org", "octo-repo").await;
    common::wait_for("the claim listener", Duration::from_secs(30), || async {
        s.kiln.logs().contains("OIDC claim listener up")
    })
    .await;

    let event = certs.path().join("event.json");
    std::fs::write(
        &event,
        serde_json::json!({
            "action": "synchronize", "number": 9,
            "repository": {"full_name": "octo-org/octo-repo", "private": false},
            "pull_request": {"number": 9, "head": {"repo": {"full_name": "fork-user/octo-repo"}}},
        })
        .to_string(),
    )
    .unwrap();
    let context = build_context();
    let depot = depot_bin();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ])
    .arg(&hosts)
    .arg(&depot)
    .args([
        "build",
        "--project",
        &s.tenant.project.id,
        "--progress",
        "plain",
        context.path().to_str().unwrap(),
    ])
    .env_clear()
    .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
    .env("HOME", s.home.path())
    .env("DEPOT_API_URL", &s.api_url)
    .env("DEPOT_NO_UPDATE_NOTIFIER", "1")
    .env("DEPOT_ERROR_TELEMETRY", "0")
    .env("DEPOT_DISABLE_OTEL", "1")
    .env("DEPOT_DEBUG_OIDC", "1")
    .env("SSL_CERT_FILE", &ca)
    .env("CI", "true")
    .env("GITHUB_ACTIONS", "true")
    .env("GITHUB_RUN_ID", "4242")
    .env("GITHUB_RUN_ATTEMPT", "1")
    .env("GITHUB_EVENT_NAME", "pull_request")
    .env("GITHUB_EVENT_PATH", &event)
    .env("GITHUB_REPOSITORY", "octo-org/octo-repo")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    // The job's log is the CLI's output: what it prints, GitHub shows in the live log.
    let log = {
        let github = github.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut all = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                github.log(42420, &line, Duration::ZERO);
                all.push_str(&line);
                all.push('\n');
            }
            all
        })
    };
    let out = tokio::spawn(async move {
        let mut text = String::new();
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let status = tokio::time::timeout(Duration::from_secs(150), child.wait())
        .await
        .expect("depot build finished")
        .unwrap();
    let all = format!("{}\n{}", out.await.unwrap(), log.await.unwrap());
    assert!(
        status.success(),
        "depot build from a fork failed:\n{all}\nkiln log:\n{}",
        s.kiln.logs()
    );
    assert!(all.contains("Waiting for OIDC auth challenge"), "{all}");

    // The build ran as the fork: an ephemeral builder with an ephemeral volume of its
    // own, and the project's cache was never attached or even created.
    let (id, ephemeral, created_by, state) = latest_build(&s).await.unwrap();
    assert_eq!(state, "success");
    assert!(ephemeral);
    assert!(created_by.unwrap().starts_with("oidc:"));
    let roles: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT m.role FROM build_platforms bp JOIN machines m ON m.id = bp.builder_id WHERE bp.build_id = $1")
            .bind(&id)
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(roles, vec!["ephemeral".to_string()]);
    let volumes: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT kind, build_id FROM volumes WHERE project_id = $1 ORDER BY created_at",
    )
    .bind(&s.tenant.project.id)
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert!(!volumes.is_empty(), "the build had a volume");
    assert!(
        volumes
            .iter()
            .all(|(kind, build)| kind == "ephemeral" && build.as_deref() == Some(id.as_str())),
        "only the build's own ephemeral volume: {volumes:?}"
    );
    let issued: i64 = sqlx::query_scalar("SELECT count(*) FROM oidc_claims WHERE state = 'issued'")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(issued, 1);
}

fn rand_byte() -> u8 {
    use rand::RngCore;
    let mut b = [0u8; 1];
    rand::rng().fill_bytes(&mut b);
    b[0]
}
