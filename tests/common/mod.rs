//! Test support: a fresh PostgreSQL database per test, cloned from a migrated template,
//! and helpers to build the app and seed tenants.
#![allow(dead_code)]

pub mod ci_issuer;
pub mod ec2;
pub mod fault_proxy;
pub mod files;
pub mod github;
pub mod http;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kiln::app::{App, AppState};
use kiln::auth::{Principal, TokenKind};
use kiln::config::Config;
use kiln::db;
use kiln::projects::{Project, ProjectSettings};
use kiln::tokens::NewToken;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};

/// The key-encryption key every test configures (base64 of 32 bytes 0..31).
pub const KEK_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// `builders.local.command` running the BuildKit stand-in built with the tests.
pub fn standin_command() -> String {
    let standin = env!("CARGO_BIN_EXE_buildkitd-standin");
    format!(
        r#"["{standin}", "--listen", "{{listen}}", "--cert", "{{cert}}", "--key", "{{key}}", "--ca", "{{ca}}"]"#
    )
}

/// The admin URL of the test server, started by scripts/test.sh.
pub fn admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL").expect(
        "TEST_PG_ADMIN_URL is not set: run the tests through `bash scripts/test.sh`, which starts PostgreSQL",
    )
}

fn url_for(db: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).expect("TEST_PG_ADMIN_URL is a URL");
    url.set_path(&format!("/{db}"));
    url.to_string()
}

fn random_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        kiln::db::ids::random_alphanumeric(12).to_lowercase()
    )
}

/// A name for the migrated template that changes whenever a migration changes.
fn template_name() -> String {
    let mut hasher = Sha256::new();
    for m in db::MIGRATOR.iter() {
        hasher.update(m.version.to_le_bytes());
        hasher.update(&m.checksum);
    }
    format!("kiln_tpl_{}", &hex::encode(hasher.finalize())[..16])
}

async fn admin() -> PgConnection {
    PgConnection::connect(&admin_url())
        .await
        .expect("connect to the test PostgreSQL")
}

async fn ensure_template() -> String {
    let name = template_name();
    let mut conn = admin().await;
    // Serialize template creation across test processes.
    sqlx::query("SELECT pg_advisory_lock(7200101)")
        .execute(&mut conn)
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    if !exists {
        let building = format!("{name}_build");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {building}"))
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {building}"))
            .execute(&mut conn)
            .await
            .unwrap();
        // One plain connection, closed before the rename: a pool returns connections in
        // the background and may still hold one when the rename runs.
        let mut migrating = PgConnection::connect(&url_for(&building)).await.unwrap();
        db::MIGRATOR.run(&mut migrating).await.unwrap();
        migrating.close().await.unwrap();
        // A closed connection's backend may take a moment to exit.
        let mut attempt = 0;
        loop {
            let renamed = sqlx::query(&format!("ALTER DATABASE {building} RENAME TO {name}"))
                .execute(&mut conn)
                .await;
            match renamed {
                Ok(_) => break,
                Err(err)
                    if attempt < 50
                        && err.to_string().contains("being accessed by other users") =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(err) => panic!("renaming the template database: {err}"),
            }
        }
    }
    sqlx::query("SELECT pg_advisory_unlock(7200101)")
        .execute(&mut conn)
        .await
        .unwrap();
    name
}

/// A fresh, migrated database.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let template = ensure_template().await;
        let name = random_name("t");
        let mut conn = admin().await;
        let mut attempt = 0;
        loop {
            let result = sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .execute(&mut conn)
                .await;
            match result {
                Ok(_) => break,
                // Another test may be copying the template at this instant.
                Err(err)
                    if attempt < 20
                        && err.to_string().contains("being accessed by other users") =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(err) => panic!("creating test database: {err}"),
            }
        }
        let url = url_for(&name);
        let pool = PgPool::connect(&url).await.unwrap();
        TestDb { name, url, pool }
    }

    /// An empty database with no migrations applied.
    pub async fn empty() -> TestDb {
        let name = random_name("e");
        let mut conn = admin().await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = url_for(&name);
        let pool = PgPool::connect(&url).await.unwrap();
        TestDb { name, url, pool }
    }
}

/// Config with defaults, pointed at `db_url`, with the given `KILN_*` overrides.
pub fn config(db_url: &str, overrides: &[(&str, &str)]) -> Config {
    let mut env: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push(("KILN_DATABASE__URL".into(), db_url.into()));
    if !env.iter().any(|(k, _)| k == "KILN_CACHE__LOCAL__DIR") {
        // Local cache volumes of tests stay out of the working tree.
        env.push((
            "KILN_CACHE__LOCAL__DIR".into(),
            test_cache_dir().display().to_string(),
        ));
    }
    let mut config = Config::load_from(None, env).expect("test config is valid");
    config.database.url = SecretString::from(db_url.to_string());
    config
}

/// An in-process app on the test database with `KILN_*` overrides, marked migrated.
pub fn app_with(db: &TestDb, overrides: &[(&str, &str)]) -> AppState {
    let app = App::new(config(&db.url, overrides), db.pool.clone());
    app.mark_migrated();
    app
}

/// An in-process app on the test database, marked migrated.
pub fn app(db: &TestDb) -> AppState {
    let app = App::new(
        config(&db.url, &[("KILN_SECRETS__KEY_ENCRYPTION_KEY", KEK_B64)]),
        db.pool.clone(),
    );
    app.mark_migrated();
    app
}

pub struct Tenant {
    pub org_id: String,
    pub user_id: String,
    pub project: Project,
    /// A user token of the organization's owner.
    pub user_token: String,
}

/// The domain services on `pool`, for seeding through the same functions the APIs use.
pub struct Domain {
    pub orgs: kiln::orgs::Orgs,
    pub projects: kiln::projects::Projects,
    pub tokens: kiln::tokens::Tokens,
}

pub fn domain(pool: &PgPool) -> Domain {
    let config = Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
    let auth = Arc::new(kiln::auth::Authenticator::new(pool.clone(), &config.auth));
    Domain {
        orgs: kiln::orgs::Orgs::new(pool.clone(), auth.clone()),
        projects: kiln::projects::Projects::new(
            pool.clone(),
            auth.clone(),
            Arc::new(kiln::cache::Cache::new(pool.clone(), &config)),
        ),
        tokens: kiln::tokens::Tokens::new(pool.clone(), auth, Duration::from_secs(3600)),
    }
}

/// The operator principal tests seed with.
pub fn operator() -> Principal {
    Principal::operator("test")
}

/// An organization with an owner, one project, and a user token for the owner.
pub async fn tenant(pool: &PgPool, label: &str) -> Tenant {
    let d = domain(pool);
    let me = operator();
    let email = format!("{}@{label}.test", random_name("u"));
    let (org, owner) = d
        .orgs
        .create(&me, &format!("org {label}"), Some(&email))
        .await
        .unwrap();
    let user = owner.unwrap();
    let settings = ProjectSettings {
        name: Some(format!("project {label}")),
        ..Default::default()
    };
    let project = d
        .projects
        .create(&me, Some(&org.id), settings)
        .await
        .unwrap();
    let user_token = user_token(pool, &user.id).await;
    Tenant {
        org_id: org.id,
        user_id: user.id,
        project,
        user_token,
    }
}

/// A new user token for `user_id`.
pub async fn user_token(pool: &PgPool, user_id: &str) -> String {
    let mut new = NewToken::new(TokenKind::User, "test");
    new.user_id = Some(user_id.to_string());
    domain(pool)
        .tokens
        .create(&operator(), new)
        .await
        .unwrap()
        .1
}

/// Another project in `org_id`.
pub async fn project(pool: &PgPool, org_id: &str, name: &str) -> Project {
    let settings = ProjectSettings {
        name: Some(name.to_string()),
        ..Default::default()
    };
    domain(pool)
        .projects
        .create(&operator(), Some(org_id), settings)
        .await
        .unwrap()
}

pub async fn project_token(pool: &PgPool, project: &Project, kind: TokenKind) -> String {
    let mut new = NewToken::new(kind, "test");
    new.organization_id = Some(project.organization_id.clone());
    new.project_id = Some(project.id.clone());
    domain(pool)
        .tokens
        .create(&operator(), new)
        .await
        .unwrap()
        .1
}

pub async fn set_password(pool: &PgPool, user_id: &str, password: &str) {
    domain(pool)
        .orgs
        .set_password(&operator(), user_id, password)
        .await
        .unwrap();
}

/// Waits for `condition` to hold, polling, or panics after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The local cache provider's directory for this test process: its own, so no other
/// test's sweep sees its volumes as orphans. Replicas a test spawns share it, as
/// replicas on one host would.
pub fn test_cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-test-cache-{}", std::process::id()))
}

pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub type Shared<T> = Arc<T>;

/// A `kiln` process with its stderr captured to a file.
pub struct Kiln {
    pub child: Child,
    pub port: u16,
    pub log: tempfile::NamedTempFile,
}

impl Kiln {
    pub fn spawn(args: &[&str], env: &[(&str, &str)], port: u16) -> Kiln {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(kiln_bin());
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env("KILN_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap());
        if !env.iter().any(|(k, _)| *k == "KILN_CACHE__LOCAL__DIR") {
            cmd.env("KILN_CACHE__LOCAL__DIR", test_cache_dir());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Kiln {
            child: cmd.spawn().unwrap(),
            port,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub async fn status(&self, path: &str) -> Option<u16> {
        reqwest::get(self.url(path))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.status("/readyz").await == Some(200) {
                return;
            }
            if let Some(exit) = self.child.try_wait().unwrap() {
                panic!(
                    "kiln exited with {exit} before becoming ready:\n{}",
                    self.logs()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "kiln not ready after 60s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kiln did not exit:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A queued build of `project_id` with an amd64 builder request.
pub async fn new_build(pool: &PgPool, project_id: &str, organization_id: &str) -> String {
    let id = kiln::db::ids::new_id();
    kiln::db::builds::insert(
        pool,
        kiln::db::builds::NewBuild {
            id: &id,
            project_id,
            organization_id,
            command: "build",
            options: serde_json::json!([]),
            created_by: None,
            ci_identity: None,
            timeout_minutes: 60,
            ephemeral_cache: false,
        },
    )
    .await
    .unwrap();
    kiln::db::builds::request_platform(pool, &id, kiln::db::builds::Platform::Amd64)
        .await
        .unwrap();
    id
}

/// Claims the first queued job of `kind`, putting back the others it claimed, so a test
/// drives that one handler by hand.
pub async fn claim_job(pool: &PgPool, kind: &str) -> kiln::db::jobs::ClaimedJob {
    let claimed = kiln::db::jobs::claim(pool, "default", "test", Duration::from_secs(60), 10)
        .await
        .unwrap();
    let mut found = None;
    for job in claimed {
        if job.kind == kind && found.is_none() {
            found = Some(job);
        } else {
            sqlx::query("UPDATE jobs SET state = 'pending', locked_by = NULL WHERE id = $1")
                .bind(job.id)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    found.unwrap_or_else(|| panic!("no {kind} job queued"))
}

/// `kiln serve` in this process on a free port, with the test KEK and `overrides`.
pub struct Server {
    pub url: String,
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub async fn start(db: &TestDb, overrides: &[(&str, &str)]) -> Server {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let url = format!("http://{listen}");
        let mut env: Vec<(&str, &str)> = vec![
            ("KILN_SERVER__LISTEN", &listen),
            ("KILN_SERVER__PUBLIC_URL", &url),
            ("KILN_SECRETS__KEY_ENCRYPTION_KEY", KEK_B64),
        ];
        env.extend_from_slice(overrides);
        let config = config(&db.url, &env);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(kiln::app::serve(config, async move {
            let _ = stopped.await;
        }));
        let server = Server {
            url: url.clone(),
            port,
            stop: Some(stop),
            done,
        };
        wait_for("kiln to serve", Duration::from_secs(30), || async {
            reqwest::get(format!("{url}/readyz"))
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        server
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.done).await;
    }
}

/// A unary Connect call over the network (binary protobuf): the answer, or the error's
/// HTTP status and Connect code.
pub async fn connect_call<Req: prost::Message, Resp: prost::Message + Default>(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    token: &str,
    request: &Req,
) -> Result<Resp, (u16, String)> {
    let response = http
        .post(format!("{base}/{method}"))
        .header("content-type", "application/proto")
        .header("authorization", format!("Bearer {token}"))
        .body(request.encode_to_vec())
        .send()
        .await
        .map_err(|e| (0, format!("transport: {e}")))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| (0, e.to_string()))?;
    if status.is_success() {
        return Resp::decode(body).map_err(|e| (200, e.to_string()));
    }
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err((status.as_u16(), code))
}

/// Another replica's token cache: an authenticator that learns of revocations only by
/// LISTEN/NOTIFY, connected before this returns. Cancel the token to stop listening.
pub async fn listening_authenticator(
    db: &TestDb,
    overrides: &[(&str, &str)],
) -> (
    Arc<kiln::auth::Authenticator>,
    tokio_util::sync::CancellationToken,
) {
    use kiln::db::notify::{Event, listen};
    let config = config(&db.url, overrides);
    let auth = Arc::new(kiln::auth::Authenticator::new(
        db.pool.clone(),
        &config.auth,
    ));
    let cancel = tokio_util::sync::CancellationToken::new();
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel();
    {
        let auth = auth.clone();
        tokio::spawn(listen(
            db.pool.clone(),
            vec![kiln::auth::INVALIDATION_CHANNEL],
            cancel.clone(),
            move |event| match event {
                Event::Notification { payload, .. } => auth.apply_invalidation(&payload),
                Event::Connected => {
                    let _ = connected_tx.send(());
                }
            },
        ));
    }
    tokio::time::timeout(Duration::from_secs(10), connected_rx.recv())
        .await
        .expect("the LISTEN connection");
    (auth, cancel)
}
