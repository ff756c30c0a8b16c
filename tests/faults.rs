//! The fault-injection suite: replicas killed in the middle of work, PostgreSQL
//! restarted under running builds, a provider call that hangs past its job's lease, the
//! LISTEN connection cut, and floods of unauthenticated requests. Each test checks what
//! survived and that nothing ran twice. docs/FAULTS.md lists them with their results.
mod common;

use std::time::Duration;

use kiln::auth::TokenKind;
use kiln::proto::depot::cli::v1 as cli;
use kiln::proto::depot::cli::v1::get_build_kit_connection_response::Connection;
use kiln::proto::depot::cli::v1beta1 as cli_beta;

use common::ec2::{World, play_agent};
use common::fault_proxy::Fault;
use common::{Kiln, Server, TestDb, connect_call, free_port, project_token, tenant, wait_for};

/// Job leases short enough that a dead replica's work is taken over within seconds.
const FAST_JOBS: [(&str, &str); 3] = [
    ("KILN_JOBS__LEASE_SECONDS", "5"),
    ("KILN_JOBS__POLL_INTERVAL_SECONDS", "1"),
    ("KILN_BUILDS__CONNECTION_WAIT_SECONDS", "1"),
];

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A `kiln serve` process on the EC2 world, ready.
async fn replica(db: &TestDb, world: &World, extra: &[(&str, &str)]) -> Kiln {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut env = world.env();
    env.extend([
        ("KILN_DATABASE__URL".to_string(), db.url.clone()),
        ("KILN_SERVER__PUBLIC_URL".to_string(), url.clone()),
        ("KILN_BUILDERS__AGENT_API_URL".to_string(), url),
        ("KILN_LOG__FILTER".to_string(), "info".to_string()),
    ]);
    for (k, v) in FAST_JOBS.iter().chain(extra) {
        env.push((k.to_string(), v.to_string()));
    }
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut kiln = Kiln::spawn(&["serve"], &refs, port);
    kiln.wait_ready().await;
    kiln
}

/// SIGKILL: no drain, no cleanup, leases left to lapse.
fn kill(kiln: &mut Kiln) {
    kiln.child.kill().unwrap();
    kiln.child.wait().unwrap();
}

async fn create_build(base: &str, token: &str, project_id: &str) -> cli::CreateBuildResponse {
    connect_call(
        &http(),
        base,
        "depot.cli.v1.BuildService/CreateBuild",
        token,
        &cli::CreateBuildRequest {
            project_id: Some(project_id.to_string()),
            options: vec![],
            required_engine: None,
        },
    )
    .await
    .expect("CreateBuild")
}

/// One GetBuildKitConnection: true when active.
async fn connection_active(base: &str, build: &cli::CreateBuildResponse) -> bool {
    let reply: Result<cli::GetBuildKitConnectionResponse, _> = connect_call(
        &http(),
        base,
        "depot.cli.v1.BuildService/GetBuildKitConnection",
        &build.build_token,
        &cli::GetBuildKitConnectionRequest {
            build_id: build.build_id.clone(),
            platform: cli::BuilderPlatform::Amd64 as i32,
        },
    )
    .await;
    matches!(
        reply,
        Ok(cli::GetBuildKitConnectionResponse {
            connection: Some(Connection::Active(_))
        })
    )
}

async fn finish(base: &str, build: &cli::CreateBuildResponse) -> Result<(), (u16, String)> {
    connect_call::<_, cli::FinishBuildResponse>(
        &http(),
        base,
        "depot.cli.v1.BuildService/FinishBuild",
        &build.build_token,
        &cli::FinishBuildRequest {
            build_id: build.build_id.clone(),
            result: Some(cli::finish_build_request::Result::Success(
                cli::finish_build_request::BuildSuccess {},
            )),
        },
    )
    .await
    .map(drop)
}

async fn scalar<T>(db: &TestDb, sql: &str, bind: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

async fn machine_of(db: &TestDb, project_id: &str) -> Option<(String, String)> {
    sqlx::query_as(
        "SELECT id, state FROM machines WHERE project_id = $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(project_id)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// Instances of `machine_id` EC2 ever started, terminated ones included.
async fn instances_of(world: &World, machine_id: &str) -> Vec<String> {
    world
        .all_instances()
        .await
        .into_iter()
        .filter(|(_, machine, _)| machine == machine_id)
        .map(|(id, _, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_launch_leaves_it_to_another_without_a_second_instance() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let t = tenant(&db.pool, "f1").await;
    let token = project_token(&db.pool, &t.project, TokenKind::Project).await;
    // RunInstances reaches EC2, but replica A never hears back.
    world
        .proxy
        .inject(Fault::hang("RunInstances").after_forward());
    let mut a = replica(&db, &world, &[]).await;
    let build = create_build(&a.url(""), &token, &t.project.id).await;
    assert!(!connection_active(&a.url(""), &build).await);
    wait_for(
        "replica A to call RunInstances",
        Duration::from_secs(30),
        || async { world.proxy.count("RunInstances") == 1 },
    )
    .await;
    kill(&mut a);

    // Replica B takes the launch job over once A's lease lapses, and finds the instance
    // A started instead of starting another.
    let b = replica(&db, &world, &[]).await;
    let (machine, _) = machine_of(&db, &t.project.id).await.unwrap();
    wait_for(
        "B to record the instance",
        Duration::from_secs(60),
        || async { machine_of(&db, &t.project.id).await.unwrap().1 == "booting" },
    )
    .await;
    let b_url = b.url("");
    let _agent = play_agent(&world, &machine, std::slice::from_ref(&b_url)).await;
    wait_for("the build's builder on B", Duration::from_secs(30), || {
        connection_active(&b_url, &build)
    })
    .await;
    finish(&b_url, &build).await.unwrap();

    assert_eq!(world.proxy.count("RunInstances"), 1, "launched once");
    assert_eq!(
        instances_of(&world, &machine).await.len(),
        1,
        "one instance"
    );
    let machines: i64 = scalar(
        &db,
        "SELECT count(*) FROM machines WHERE project_id = $1",
        &t.project.id,
    )
    .await;
    assert_eq!(machines, 1);
    let jobs: i64 = scalar(
        &db,
        "SELECT count(*) FROM jobs WHERE kind = $1",
        "machines.launch",
    )
    .await;
    assert_eq!(jobs, 0, "the launch job completed");
}

/// A project with one idle builder on `a`: one build run to completion.
async fn idle_builder(
    db: &TestDb,
    world: &World,
    base: &str,
    project_id: &str,
    token: &str,
) -> (String, common::ec2::PlayedAgent) {
    let build = create_build(base, token, project_id).await;
    assert!(!connection_active(base, &build).await);
    wait_for("a booting builder", Duration::from_secs(60), || async {
        machine_of(db, project_id)
            .await
            .is_some_and(|(_, state)| state == "booting")
    })
    .await;
    let (machine, _) = machine_of(db, project_id).await.unwrap();
    let agent = play_agent(world, &machine, &[base.to_string()]).await;
    wait_for("the builder", Duration::from_secs(30), || {
        connection_active(base, &build)
    })
    .await;
    finish(base, &build).await.unwrap();
    (machine, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_cache_reset_leaves_it_to_another() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let t = tenant(&db.pool, "f2").await;
    let token = project_token(&db.pool, &t.project, TokenKind::Project).await;
    let mut a = replica(&db, &world, &[]).await;
    let (machine, agent) = idle_builder(&db, &world, &a.url(""), &t.project.id, &token).await;
    drop(agent);

    // The reset commits; its job, on A, hangs while terminating the old builder.
    world.proxy.inject(Fault::hang("TerminateInstances"));
    connect_call::<_, cli_beta::ResetProjectCacheResponse>(
        &http(),
        &a.url(""),
        "depot.cli.v1beta1.ProjectsService/ResetProjectCache",
        &token,
        &cli_beta::ResetProjectCacheRequest {
            project_id: t.project.id.clone(),
        },
    )
    .await
    .unwrap();
    wait_for(
        "A's reset job to terminate the builder",
        Duration::from_secs(30),
        || async { world.proxy.count("TerminateInstances") >= 1 },
    )
    .await;
    kill(&mut a);

    let _b = replica(&db, &world, &[]).await;
    wait_for("B to finish the reset", Duration::from_secs(60), || async {
        let left: i64 = scalar(
            &db,
            "SELECT count(*) FROM jobs WHERE kind = $1",
            "cache.reset",
        )
        .await;
        left == 0
    })
    .await;
    let state: String = scalar(&db, "SELECT state FROM machines WHERE id = $1", &machine).await;
    assert_eq!(state, "terminated", "the old cache's builder is gone");
    let instances = world.all_instances().await;
    assert!(
        instances
            .iter()
            .any(|(_, m, s)| m == &machine && s == "terminated"),
        "{instances:?}"
    );
    let generation: i32 = scalar(
        &db,
        "SELECT cache_generation FROM projects WHERE id = $1",
        &t.project.id,
    )
    .await;
    assert_eq!(generation, 1, "reset once");
    let audits: i64 = scalar(
        &db,
        "SELECT count(*) FROM audit_events WHERE action = 'cache.reset' AND target_id = $1",
        &t.project.id,
    )
    .await;
    assert_eq!(audits, 1);
    assert_eq!(world.proxy.count("RunInstances"), 1, "nothing relaunched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_build_leaves_the_build_to_another_counted_once() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let t = tenant(&db.pool, "f3").await;
    let token = project_token(&db.pool, &t.project, TokenKind::Project).await;
    let mut a = replica(&db, &world, &[]).await;
    let b = replica(&db, &world, &[]).await;
    let urls = [a.url(""), b.url("")];

    let build = create_build(&urls[0], &token, &t.project.id).await;
    assert!(!connection_active(&urls[0], &build).await);
    wait_for("a booting builder", Duration::from_secs(60), || async {
        machine_of(&db, &t.project.id)
            .await
            .is_some_and(|(_, state)| state == "booting")
    })
    .await;
    let (machine, _) = machine_of(&db, &t.project.id).await.unwrap();
    let _agent = play_agent(&world, &machine, &urls).await;
    wait_for("the builder", Duration::from_secs(30), || {
        connection_active(&urls[0], &build)
    })
    .await;
    let health = |base: String| {
        let build = build.clone();
        async move {
            connect_call::<_, cli::ReportBuildHealthResponse>(
                &http(),
                &base,
                "depot.cli.v1.BuildService/ReportBuildHealth",
                &build.build_token,
                &cli::ReportBuildHealthRequest {
                    build_id: build.build_id.clone(),
                    platform: cli::BuilderPlatform::Amd64 as i32,
                },
            )
            .await
        }
    };
    health(urls[0].clone()).await.unwrap();
    kill(&mut a);

    // The CLI's next calls reach B: the build carries on and finishes once, even when the
    // client retries FinishBuild.
    let answer = health(urls[1].clone()).await.unwrap();
    let cancels_at = answer.cancels_at.unwrap().seconds;
    assert!(cancels_at > chrono::Utc::now().timestamp(), "not canceled");
    finish(&urls[1], &build).await.unwrap();
    finish(&urls[1], &build).await.unwrap();

    let (state, finished): (String, bool) =
        sqlx::query_as("SELECT state, finished_at IS NOT NULL FROM builds WHERE id = $1")
            .bind(&build.build_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), finished), ("success", true));
    let builds: i64 = scalar(
        &db,
        "SELECT count(*) FROM builds WHERE project_id = $1",
        &t.project.id,
    )
    .await;
    assert_eq!(builds, 1);
    // Released once: the builder is idle again, not at -1 or still busy.
    let (machine_state, active): (String, i32) =
        sqlx::query_as("SELECT state, active_builds FROM machines WHERE id = $1")
            .bind(&machine)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((machine_state.as_str(), active), ("ready", 0));
    assert_eq!(world.proxy.count("RunInstances"), 1);
    let metrics = reqwest::get(b.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let finished_on_b: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kiln_builds_finished_total"))
        .collect();
    assert_eq!(
        finished_on_b,
        vec!["kiln_builds_finished_total{outcome=\"success\"} 1"],
        "counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_call_hanging_past_the_lease_fails_the_machine_and_requeues_the_build() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let t = tenant(&db.pool, "f5").await;
    let token = project_token(&db.pool, &t.project, TokenKind::Project).await;
    // The first RunInstances never answers; the EC2 client would wait ten minutes.
    world.proxy.inject(Fault::hang("RunInstances"));
    let owned = world.env();
    let mut env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env.extend(FAST_JOBS);
    env.extend([
        ("KILN_BUILDERS__EC2__CALL_TIMEOUT_SECONDS", "600"),
        ("KILN_BUILDERS__LAUNCH_MAX_ATTEMPTS", "1"),
    ]);
    let server = Server::start(&db, &env).await;
    let build = create_build(&server.url, &token, &t.project.id).await;
    assert!(!connection_active(&server.url, &build).await);
    let (first, _) = machine_of(&db, &t.project.id).await.unwrap();

    // The attempt times out inside its lease; giving up fails the machine, which frees
    // the slot, and the build gets a second machine.
    wait_for(
        "the hung launch to be failed",
        Duration::from_secs(30),
        || async {
            let (state, error): (String, Option<String>) =
                sqlx::query_as("SELECT state, error FROM machines WHERE id = $1")
                    .bind(&first)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            state == "failed" && error.is_some_and(|e| e.contains("timed out"))
        },
    )
    .await;
    wait_for(
        "a second machine to boot",
        Duration::from_secs(30),
        || async {
            machine_of(&db, &t.project.id)
                .await
                .is_some_and(|(id, state)| id != first && state == "booting")
        },
    )
    .await;
    let (second, _) = machine_of(&db, &t.project.id).await.unwrap();
    let _agent = play_agent(&world, &second, std::slice::from_ref(&server.url)).await;
    wait_for(
        "the build on the second machine",
        Duration::from_secs(30),
        || connection_active(&server.url, &build),
    )
    .await;
    let builder: String = scalar(
        &db,
        "SELECT builder_id FROM build_platforms WHERE build_id = $1",
        &build.build_id,
    )
    .await;
    assert_eq!(builder, second);
    assert_eq!(world.proxy.count("RunInstances"), 2);
    finish(&server.url, &build).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarting_under_running_builds_is_survived() {
    let dir = tempfile::Builder::new()
        .prefix("kiln-fault-pg")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = kiln::dev::postgres::find_bin_dir(std::path::Path::new("")).unwrap();
    let mut pg = kiln::dev::postgres::EmbeddedPostgres::init(bin, dir.path(), "kiln", "fault-pw")
        .await
        .unwrap();
    pg.start().await.unwrap();
    let url = format!("postgres://kiln:fault-pw@127.0.0.1:{}/postgres", pg.port);
    let port = free_port();
    let mut kiln = Kiln::spawn(
        &["serve"],
        &[
            ("KILN_DATABASE__URL", &url),
            ("KILN_SECRETS__KEY_ENCRYPTION_KEY", common::KEK_B64),
            ("KILN_BUILDERS__PROVIDER", "sim"),
            ("KILN_DATABASE__ACQUIRE_TIMEOUT_SECONDS", "2"),
            ("KILN_DATABASE__RECONNECT_MAX_BACKOFF_SECONDS", "1"),
            ("KILN_BUILDS__CONNECTION_WAIT_SECONDS", "2"),
        ],
        port,
    );
    kiln.wait_ready().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let t = tenant(&pool, "f4").await;
    let token = project_token(&pool, &t.project, TokenKind::Project).await;
    pool.close().await;
    let base = kiln.url("");
    let build = create_build(&base, &token, &t.project.id).await;
    wait_for("a builder", Duration::from_secs(30), || {
        connection_active(&base, &build)
    })
    .await;

    pg.stop().await.unwrap();
    wait_for(
        "/readyz to say not ready",
        Duration::from_secs(15),
        || async { kiln.status("/readyz").await == Some(503) },
    )
    .await;
    // Calls that need the database say `unavailable` (retryable), nothing worse.
    for _ in 0..3 {
        let err = finish(&base, &build).await.unwrap_err();
        assert_eq!(err, (503, "unavailable".to_string()), "FinishBuild");
    }
    let err = connect_call::<_, cli::CreateBuildResponse>(
        &http(),
        &base,
        "depot.cli.v1.BuildService/CreateBuild",
        &token,
        &cli::CreateBuildRequest {
            project_id: Some(t.project.id.clone()),
            options: vec![],
            required_engine: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.0, 503, "{err:?}");
    assert!(err.1 == "unavailable", "{err:?}");

    pg.start_on_port().await.unwrap();
    wait_for("/readyz to recover", Duration::from_secs(30), || async {
        kiln.status("/readyz").await == Some(200)
    })
    .await;
    // The client's retry lands; the build finishes once and a new one runs.
    wait_for(
        "FinishBuild to succeed",
        Duration::from_secs(30),
        || async { finish(&base, &build).await.is_ok() },
    )
    .await;
    let second = create_build(&base, &token, &t.project.id).await;
    wait_for(
        "the second build's builder",
        Duration::from_secs(30),
        || connection_active(&base, &second),
    )
    .await;
    finish(&base, &second).await.unwrap();

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM builds WHERE project_id = $1 ORDER BY created_at")
            .bind(&t.project.id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        states,
        vec!["success", "success"],
        "no build lost or duplicated"
    );
    let machines: i64 = sqlx::query_scalar("SELECT count(*) FROM machines")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(machines, 1, "the builder was reused, not launched again");
    pool.close().await;
    assert!(kiln.terminate().success(), "{}", kiln.logs());
    pg.stop().await.unwrap();
}

async fn listener_pids(db: &TestDb) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_listen_connection_comes_back_and_wakes_everyone_again() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "f6").await;
    let token = project_token(&db.pool, &t.project, TokenKind::Project).await;
    // Workers and the scheduler poll every ten minutes: only notifications wake them.
    let server = Server::start(
        &db,
        &[
            ("KILN_BUILDERS__PROVIDER", "sim"),
            ("KILN_JOBS__POLL_INTERVAL_SECONDS", "600"),
            ("KILN_BUILDERS__SCHEDULER_POLL_SECONDS", "600"),
            ("KILN_BUILDS__CONNECTION_WAIT_SECONDS", "30"),
        ],
    )
    .await;
    wait_for("the LISTEN connection", Duration::from_secs(10), || async {
        listener_pids(&db).await.len() == 1
    })
    .await;
    let before = listener_pids(&db).await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(before[0])
        .execute(&db.pool)
        .await
        .unwrap();
    wait_for(
        "a new LISTEN connection",
        Duration::from_secs(15),
        || async {
            let now = listener_pids(&db).await;
            now.len() == 1 && now != before
        },
    )
    .await;

    // A waiter (GetBuildKitConnection, held up to 30 s) is answered the moment the
    // builder is ready: the launch job is woken by kiln_jobs, the waiter by kiln_builds.
    let started = std::time::Instant::now();
    let build = create_build(&server.url, &token, &t.project.id).await;
    assert!(
        connection_active(&server.url, &build).await,
        "active within one call"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // The scheduler is woken by kiln_scheduler for requeued work.
    let other = common::project(&db.pool, &t.org_id, "other").await;
    let queued = common::new_build(&db.pool, &other.id, &t.org_id).await;
    kiln::scheduler::notify_scheduler(&db.pool).await;
    wait_for(
        "the scheduler to take the queued build",
        Duration::from_secs(10),
        || async {
            let state: String = scalar(
                &db,
                "SELECT state FROM build_platforms WHERE build_id = $1",
                &queued,
            )
            .await;
            state != "pending"
        },
    )
    .await;
    finish(&server.url, &build).await.unwrap();
    server.stop().await;
}

/// Sends `n` requests, `concurrency` at a time; returns how many got each status.
async fn flood<F, Fut>(n: usize, make: F) -> std::collections::BTreeMap<u16, usize>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    use futures_util::StreamExt;
    let mut counts = std::collections::BTreeMap::new();
    let mut statuses = futures_util::stream::iter((0..n).map(make)).buffer_unordered(64);
    while let Some(status) = statuses.next().await {
        *counts.entry(status).or_insert(0) += 1;
    }
    counts
}

/// One request of each unauthenticated kind, by number.
async fn unauthenticated(http: &reqwest::Client, base: &str, kind: &str, i: usize) -> u16 {
    let code = format!("BCDF-{}", ["GHJK", "LMNP", "QRST", "VWXZ"][i % 4]);
    let grpc = |path: &str, body: Vec<u8>| {
        http.post(format!("{base}/kiln.agent.v1.MachineAgentService/{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
    };
    let request = match kind {
        "start_login" => http
            .post(format!("{base}/depot.cli.v1beta1.LoginService/StartLogin"))
            .header("content-type", "application/proto")
            .body(Vec::new()),
        "finish_login" => {
            let message = prost::Message::encode_to_vec(&cli_beta::FinishLoginRequest {
                id: format!("guess-{i}"),
            });
            let mut body = vec![0u8];
            body.extend_from_slice(&(message.len() as u32).to_be_bytes());
            body.extend_from_slice(&message);
            http.post(format!("{base}/depot.cli.v1beta1.LoginService/FinishLogin"))
                .header("content-type", "application/connect+proto")
                .body(body)
        }
        "login_page" => http.get(format!("{base}/login/{code}")),
        "login_post" => http
            .post(format!("{base}/login/{code}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "email=x{i}%40a.test&password=guess&decision=approve"
            )),
        "agent_register" => {
            let message =
                prost::Message::encode_to_vec(&kiln::proto::kiln::agent::v1::RegisterRequest {
                    machine_id: format!("nomachine{i:04}"),
                    registration_token: "kilnreg_00".into(),
                    agent_version: "flood".into(),
                    buildkit_address: String::new(),
                    identity: None,
                });
            let mut body = vec![0u8];
            body.extend_from_slice(&(message.len() as u32).to_be_bytes());
            body.extend_from_slice(&message);
            grpc("Register", body)
        }
        "agent_malformed" => grpc("Explode", vec![0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]),
        other => panic!("unknown kind {other}"),
    };
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            // gRPC and Connect streams answer 200 with the status inside.
            let grpc_status = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response.bytes().await.unwrap_or_default();
            match grpc_status.as_deref() {
                Some("8") => 429,
                Some("0") | None => {
                    if status == 200
                        && String::from_utf8_lossy(&body).contains("resource_exhausted")
                    {
                        429
                    } else {
                        status
                    }
                }
                Some(_) => 400,
            }
        }
        // A flooding client that keeps getting early answers to bodies it is still
        // sending sees h2 reset its connection (rapid-reset protection): refused too.
        Err(_) => 0,
    }
}

const KINDS: [&str; 6] = [
    "start_login",
    "finish_login",
    "login_page",
    "login_post",
    "agent_register",
    "agent_malformed",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_unauthenticated_requests_leave_bounded_rows() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "f7").await;
    let http = http();
    let refusals = "SELECT count(*) FROM audit_events WHERE action LIKE $1";

    // One client address: its per-minute budget bounds what it can write.
    let server = Server::start(&db, &[("KILN_BUILDERS__PROVIDER", "sim")]).await;
    let started = std::time::Instant::now();
    for kind in KINDS {
        let counts = flood(10_000, |i| unauthenticated(&http, &server.url, kind, i)).await;
        eprintln!("one address, 10,000 {kind}: {counts:?}");
        let refused = counts.get(&429).copied().unwrap_or(0) + counts.get(&0).copied().unwrap_or(0);
        if kind != "agent_malformed" {
            assert!(refused >= 9_800, "{kind}: {counts:?}");
        }
        assert!(
            !counts.contains_key(&500),
            "{kind}: server errors {counts:?}"
        );
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let logins: i64 = count(&db, "SELECT count(*) FROM login_requests").await;
    // Burst 40, then 120 a minute.
    let bound = 40 + (120.0 * minutes).ceil() as i64;
    assert!(logins <= bound, "{logins} login requests (bound {bound})");
    let audits: i64 = scalar(&db, refusals, "machine.%").await;
    let bound = 60 + (60.0 * minutes).ceil() as i64;
    assert!(audits <= bound, "{audits} refusal audits (bound {bound})");
    eprintln!(
        "one address, {:.0} s: {logins} login requests, {audits} refusal audits",
        minutes * 60.0
    );
    // Still serving everyone else.
    let (status, _) =
        common::connect_call::<_, kiln::proto::depot::core::v1::ListProjectsResponse>(
            &http,
            &server.url,
            "depot.core.v1.ProjectService/ListProjects",
            &t.user_token,
            &kiln::proto::depot::core::v1::ListProjectsRequest {},
        )
        .await
        .map(|r| (200, r.projects.len()))
        .unwrap();
    assert_eq!(status, 200);
    server.stop().await;

    // Many addresses (the per-address limit out of the way): the global bounds hold.
    sqlx::query("DELETE FROM login_requests")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_events")
        .execute(&db.pool)
        .await
        .unwrap();
    let server = Server::start(
        &db,
        &[
            ("KILN_BUILDERS__PROVIDER", "sim"),
            ("KILN_LIMITS__UNAUTHENTICATED_BURST", "1000000"),
            ("KILN_LIMITS__UNAUTHENTICATED_PER_MINUTE", "1000000"),
            ("KILN_LOGIN__MAX_OPEN_REQUESTS", "500"),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    for kind in ["start_login", "agent_register", "agent_malformed"] {
        let counts = flood(10_000, |i| unauthenticated(&http, &server.url, kind, i)).await;
        eprintln!("no per-address limit, 10,000 {kind}: {counts:?}");
        assert!(
            !counts.contains_key(&500),
            "{kind}: server errors {counts:?}"
        );
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let logins: i64 = count(&db, "SELECT count(*) FROM login_requests").await;
    assert!(logins <= 500, "{logins} login requests (cap 500)");
    let audits: i64 = scalar(&db, refusals, "machine.%").await;
    let bound = 60 + (60.0 * minutes).ceil() as i64;
    assert!(audits <= bound, "{audits} refusal audits (bound {bound})");
    eprintln!(
        "no per-address limit, {:.0} s: {logins} login requests, {audits} refusal audits",
        minutes * 60.0
    );
    server.stop().await;
}
