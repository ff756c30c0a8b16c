//! `kiln agent` against a real `kiln serve` (in process) with the local provider:
//! registration, BuildKit served for the project, health reports, drain, revoked tokens,
//! and every kind of bad input, each refused and audited.
mod common;

use std::time::Duration;

use kiln::db::builds::Outcome;
use kiln::proto::kiln::agent::v1 as pb;
use kiln::proto::kiln::agent::v1::machine_agent_service_client::MachineAgentServiceClient;
use tonic::transport::Channel;

use common::{Server, TestDb, free_port, tenant, wait_for};

fn kek() -> [u8; 32] {
    let mut kek = [0u8; 32];
    for (i, b) in kek.iter_mut().enumerate() {
        *b = i as u8;
    }
    kek
}

/// `kiln serve` in this process; local builders run `kiln agent` around the stand-in.
async fn start(db: &TestDb, overrides: &[(&str, &str)]) -> Server {
    let command = common::standin_command();
    let mut env: Vec<(&str, &str)> = vec![
        ("KILN_BUILDERS__LOCAL__COMMAND", &command),
        (
            "KILN_BUILDERS__LOCAL__KILN_BINARY",
            env!("CARGO_BIN_EXE_kiln"),
        ),
        ("KILN_BUILDERS__AGENT_HEALTH_INTERVAL_SECONDS", "1"),
    ];
    env.extend_from_slice(overrides);
    Server::start(db, &env).await
}

async fn agent_client(server: &Server) -> MachineAgentServiceClient<Channel> {
    MachineAgentServiceClient::connect(server.url.clone())
        .await
        .unwrap()
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn new_build(db: &TestDb, project_id: &str, org_id: &str) -> String {
    let id = common::new_build(&db.pool, project_id, org_id).await;
    kiln::scheduler::notify_scheduler(&db.pool).await;
    id
}

async fn platform_state(db: &TestDb, build_id: &str) -> String {
    sqlx::query_scalar("SELECT state FROM build_platforms WHERE build_id = $1")
        .bind(build_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn audit_count(db: &TestDb, action: &str, reason: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = $1 AND details->>'reason' = $2",
    )
    .bind(action)
    .bind(reason)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct AgentRow {
    id: String,
    state: String,
    serving: bool,
    endpoint: Option<String>,
    registered_at: Option<chrono::DateTime<chrono::Utc>>,
    agent_version: Option<String>,
    buildkit_up: bool,
    disk_total_bytes: Option<i64>,
    applied_generation: i64,
    directive_generation: i64,
    agent_stopped_at: Option<chrono::DateTime<chrono::Utc>>,
}

async fn agent_row(db: &TestDb, project_id: &str) -> AgentRow {
    sqlx::query_as(
        "SELECT id, state, serving, endpoint, registered_at, agent_version, buildkit_up, disk_total_bytes,
                applied_generation, directive_generation, agent_stopped_at
         FROM machines WHERE project_id = $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(project_id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// The agent's process id, from the local provider's reference `local:<kiln>:<pid>`.
async fn row_pid(db: &TestDb, machine_id: &str) -> String {
    let reference: String = sqlx::query_scalar("SELECT provider_ref FROM machines WHERE id = $1")
        .bind(machine_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    reference.rsplit(':').next().unwrap().to_string()
}

async fn accepts(endpoint: &str) -> bool {
    tokio::net::TcpStream::connect(endpoint.trim_start_matches("tcp://"))
        .await
        .is_ok()
}

#[tokio::test]
async fn an_agent_registers_serves_its_project_reports_health_and_drains() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "agent").await;
    let server = start(&db, &[]).await;

    let build = new_build(&db, &t.project.id, &t.org_id).await;
    wait_for(
        "the build's builder to serve",
        Duration::from_secs(30),
        || async { platform_state(&db, &build).await == "ready" },
    )
    .await;
    let row = agent_row(&db, &t.project.id).await;
    assert_eq!(row.state, "assigned");
    assert!(row.serving && row.buildkit_up);
    assert!(row.registered_at.is_some());
    assert_eq!(
        row.agent_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(row.applied_generation, row.directive_generation);
    assert!(row.disk_total_bytes.unwrap_or(0) > 0, "disk reported");
    let endpoint = row.endpoint.clone().unwrap();
    assert!(accepts(&endpoint).await, "BuildKit (the stand-in) serves");
    let tokens: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tokens WHERE kind = 'machine' AND machine_id = $1",
    )
    .bind(&row.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tokens, 1, "one machine token, stored hashed");
    let registered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'machine.registered' AND target_id = $1",
    )
    .bind(&row.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(registered, 1);

    // Health keeps coming.
    let first: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT last_health_at FROM machines WHERE id = $1")
            .bind(&row.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    wait_for("another health report", Duration::from_secs(10), || async {
        let at: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT last_health_at FROM machines WHERE id = $1")
                .bind(&row.id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        at > first
    })
    .await;

    // Drain: once its build is done, the agent stops BuildKit, says so, and the machine
    // is terminated.
    kiln::db::builds::finish(&db.pool, &build, &Outcome::Success)
        .await
        .unwrap();
    assert!(
        kiln::db::machines::drain(&db.pool, &row.id, Some(&t.project.id))
            .await
            .unwrap()
    );
    wait_for(
        "the agent to report its shutdown",
        Duration::from_secs(30),
        || async {
            agent_row(&db, &t.project.id)
                .await
                .agent_stopped_at
                .is_some()
        },
    )
    .await;
    wait_for(
        "the machine to be terminated",
        Duration::from_secs(30),
        || async { agent_row(&db, &t.project.id).await.state == "terminated" },
    )
    .await;
    wait_for("BuildKit to stop", Duration::from_secs(15), || async {
        !accepts(&endpoint).await
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_warm_standby_agent_starts_buildkit_when_a_project_adopts_it() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "warm").await;
    let server = start(&db, &[("KILN_BUILDERS__WARM_POOL_AMD64", "1")]).await;

    wait_for("a registered standby", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM machines WHERE project_id IS NULL AND state = 'ready' AND serving
                 AND registered_at IS NOT NULL AND NOT buildkit_up",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        n == 1
    })
    .await;
    let standby: String =
        sqlx::query_scalar("SELECT id FROM machines WHERE project_id IS NULL AND state = 'ready'")
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let build = new_build(&db, &t.project.id, &t.org_id).await;
    wait_for(
        "the adopted standby to serve",
        Duration::from_secs(30),
        || async { platform_state(&db, &build).await == "ready" },
    )
    .await;
    let row = agent_row(&db, &t.project.id).await;
    assert_eq!(
        row.id, standby,
        "the standby was adopted, not a new machine"
    );
    assert!(row.buildkit_up && row.serving);
    assert!(accepts(row.endpoint.as_deref().unwrap()).await);
    server.stop().await;
}

#[tokio::test]
async fn bad_agent_input_is_refused_and_audited() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "bad").await;
    let server = start(&db, &[]).await;
    let mut client = agent_client(&server).await;

    // A machine waiting for its agent, with a known nonce.
    sqlx::query(
        "INSERT INTO machines (id, provider, platform, project_id, state, managed_by_agent, registration_nonce, registration_expires_at)
         VALUES ('machinebad01', 'local', 'amd64', $1, 'booting', true, 'nonce1', now() + interval '10 minutes')",
    )
    .bind(&t.project.id)
    .execute(&db.pool)
    .await
    .unwrap();
    let good = kiln::scheduler::agents::registration_token(&kek(), "machinebad01", "nonce1");
    let register = |token: &str| pb::RegisterRequest {
        machine_id: "machinebad01".into(),
        registration_token: token.into(),
        agent_version: "test".into(),
        buildkit_address: "127.0.0.1:1".into(),
        identity: None,
    };

    // A wrong token.
    let wrong = kiln::scheduler::agents::registration_token(&kek(), "machinebad01", "nonce2");
    let err = client.register(register(&wrong)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().contains("registration token"),
        "{}",
        err.message()
    );
    assert_eq!(
        audit_count(
            &db,
            "machine.registration_refused",
            "wrong registration token"
        )
        .await,
        1
    );

    // The right one works once; a replay is refused.
    let token = client
        .register(register(&good))
        .await
        .unwrap()
        .into_inner()
        .machine_token;
    assert!(token.starts_with("kiln_m_"));
    let err = client.register(register(&good)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        audit_count(
            &db,
            "machine.registration_refused",
            "registration token already used"
        )
        .await,
        1
    );
    let machine_tokens: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tokens WHERE machine_id = 'machinebad01'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(machine_tokens, 1, "the replay minted nothing");

    // The machine's token reporting for another machine.
    sqlx::query(
        "INSERT INTO machines (id, provider, platform, state, managed_by_agent) VALUES ('machinebad02', 'local', 'amd64', 'ready', true)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let health = |machine: &str| pb::ReportHealthRequest {
        machine_id: machine.into(),
        generation: 1,
        buildkit_up: true,
        disk_free_bytes: 1,
        disk_total_bytes: 2,
    };
    let err = client
        .report_health(authed(health("machinebad02"), &token))
        .await
        .unwrap_err();
    // Not found, as for any resource outside a token's reach: existence is not revealed.
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(
        audit_count(
            &db,
            "machine.impersonation_refused",
            "agent token belongs to another machine"
        )
        .await,
        1
    );
    let other: Option<i64> =
        sqlx::query_scalar("SELECT disk_total_bytes FROM machines WHERE id = 'machinebad02'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(other, None, "nothing recorded for the other machine");
    // A project token is no machine token either.
    let err = client
        .watch_directives(authed(
            pb::WatchDirectivesRequest {
                machine_id: "machinebad01".into(),
            },
            &common::project_token(&db.pool, &t.project, kiln::auth::TokenKind::Project).await,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::NotFound | tonic::Code::PermissionDenied
        ),
        "{err:?}"
    );
    assert_eq!(
        audit_count(&db, "machine.impersonation_refused", "not a machine token").await,
        1
    );

    // Its own reports are accepted.
    let answer = client
        .report_health(authed(health("machinebad01"), &token))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.should_terminate);

    // Malformed gRPC: a frame that is not a RegisterRequest, and an unknown method.
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let garbage = vec![0u8, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff];
    for path in ["Register", "Explode"] {
        let response = http
            .post(format!(
                "{}/kiln.agent.v1.MachineAgentService/{path}",
                server.url
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(garbage.clone())
            .send()
            .await
            .unwrap();
        let status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            matches!(status.as_deref(), Some("13" | "12")),
            "{path}: {status:?}"
        );
    }
    assert_eq!(
        audit_count(&db, "machine.malformed_request", "undecodable message").await,
        1
    );
    assert_eq!(
        audit_count(&db, "machine.malformed_request", "unknown method").await,
        1
    );

    // A revoked machine token is refused from then on.
    let token_id: String =
        sqlx::query_scalar("SELECT id FROM tokens WHERE machine_id = 'machinebad01'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    common::domain(&db.pool)
        .tokens
        .revoke(&common::operator(), None, &token_id)
        .await
        .unwrap();
    wait_for(
        "the revocation to apply",
        Duration::from_secs(10),
        || async {
            let mut client = agent_client(&server).await;
            client
                .report_health(authed(health("machinebad01"), &token))
                .await
                .is_err_and(|e| e.code() == tonic::Code::Unauthenticated)
        },
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn an_agent_whose_token_is_revoked_stops_serving() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "revoked").await;
    let server = start(&db, &[]).await;
    let build = new_build(&db, &t.project.id, &t.org_id).await;
    wait_for("the builder to serve", Duration::from_secs(30), || async {
        platform_state(&db, &build).await == "ready"
    })
    .await;
    let row = agent_row(&db, &t.project.id).await;
    let endpoint = row.endpoint.unwrap();
    assert!(accepts(&endpoint).await);

    let token_id: String = sqlx::query_scalar("SELECT id FROM tokens WHERE machine_id = $1")
        .bind(&row.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    common::domain(&db.pool)
        .tokens
        .revoke(&common::operator(), None, &token_id)
        .await
        .unwrap();
    // Its next health report is refused; the agent stops BuildKit and exits.
    wait_for(
        "the refused agent to stop BuildKit",
        Duration::from_secs(30),
        || async { !accepts(&endpoint).await },
    )
    .await;
    // ...and exits: its process is gone (or a zombie awaiting its parent).
    let pid = row_pid(&db, &row.id).await;
    wait_for(
        "the agent process to exit",
        Duration::from_secs(15),
        || async {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| stat.split_whitespace().nth(2) == Some("Z"))
                .unwrap_or(true)
        },
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn agents_can_use_a_listener_of_their_own() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "port").await;
    let agent_port = free_port();
    let agent_listen = format!("127.0.0.1:{agent_port}");
    let server = start(&db, &[("KILN_SERVER__AGENT_LISTEN", &agent_listen)]).await;
    let build = new_build(&db, &t.project.id, &t.org_id).await;
    wait_for("the builder to serve", Duration::from_secs(30), || async {
        platform_state(&db, &build).await == "ready"
    })
    .await;
    // The agent was pointed at the agent listener, not the main port.
    let row = agent_row(&db, &t.project.id).await;
    let pid = row_pid(&db, &row.id).await;
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains(&format!("http://{agent_listen}")),
        "{cmdline:?}"
    );
    // That listener serves the agent API only: anything else is an unknown gRPC method.
    let response = reqwest::get(format!("http://{agent_listen}/healthz"))
        .await
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("12")
    );
    server.stop().await;
}
