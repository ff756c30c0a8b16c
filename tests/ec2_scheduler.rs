//! The `ec2` provider end to end, against moto_server (started by scripts/test.sh) through
//! our fault-injecting proxy: launch from zero, warm-pool adoption, idle reaping, orphans,
//! capacity fall-through, and three `kiln serve` replicas racing 200 builds.
//!
//! moto runs no agents, so the tests play the agent: they read each instance's user data
//! back from moto, register with the one-time token in it and report health, exactly as
//! `kiln agent` would. Nothing relies on moto honouring ClientToken or transitional states.
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kiln::app::AppState;
use kiln::db::builds::{Outcome, Platform};
use kiln::db::jobs::ClaimedJob;
use kiln::proto::depot::cli::v1 as depot;
use kiln::proto::kiln::agent::v1 as pb;
use kiln::proto::kiln::agent::v1::machine_agent_service_client::MachineAgentServiceClient;
use kiln::scheduler::Assignment;
use kiln_ec2::{Arch, Fleet};
use prost::Message;

use common::ec2::{World, agent_comes_up, agent_reports, app_with, machine_of};
use common::fault_proxy::Fault;
use common::{Kiln, TestDb, free_port, project_token, tenant};

async fn new_build(app: &AppState, project_id: &str, org_id: &str) -> String {
    common::new_build(&app.db, project_id, org_id).await
}

async fn claim(app: &AppState, kind: &str) -> ClaimedJob {
    common::claim_job(&app.db, kind).await
}

#[tokio::test]
async fn ec2_builders_launch_serve_get_adopted_and_are_reaped() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let app = app_with(&db, &world, &[("KILN_BUILDERS__WARM_POOL_AMD64", "1")]);
    let s = &app.scheduler;
    let a = tenant(&db.pool, "a").await;
    let b = tenant(&db.pool, "b").await;

    // Launch from zero: the build waits until the instance's agent reports.
    let build = new_build(&app, &a.project.id, &a.org_id).await;
    assert_eq!(
        s.assign(&build, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    let job = claim(&app, kiln::scheduler::LAUNCH_JOB).await;
    s.launch(&job).await.unwrap();
    // A retried launch job (a crash after RunInstances, say) finds the instance by tag.
    s.launch(&job).await.unwrap();
    let (machine, state) = machine_of(&app, &a.project.id).await;
    assert_eq!(state, "booting");
    let instances = world.instances().await;
    assert_eq!(instances[&machine].len(), 1, "launched exactly once");
    assert_eq!(instances[&machine][0].1, "c6i.large");
    assert_eq!(world.proxy.count("RunInstances"), 1);
    let endpoint: String = sqlx::query_scalar("SELECT endpoint FROM machines WHERE id = $1")
        .bind(&machine)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        endpoint.starts_with("tcp://10.0."),
        "private address: {endpoint}"
    );
    agent_comes_up(&app, &world, &machine).await;
    assert_eq!(
        s.assign(&build, Platform::Amd64).await.unwrap(),
        Assignment::Ready
    );
    assert_eq!(machine_of(&app, &a.project.id).await.1, "assigned");

    // The warm pool: a standby launches with no project and stands by.
    assert_eq!(s.refill_pool().await.unwrap(), 1);
    let job = claim(&app, kiln::scheduler::LAUNCH_JOB).await;
    s.launch(&job).await.unwrap();
    let standby: String = sqlx::query_scalar("SELECT id FROM machines WHERE project_id IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    agent_comes_up(&app, &world, &standby).await;
    let standby_state: (String, bool) =
        sqlx::query_as("SELECT state, serving FROM machines WHERE id = $1")
            .bind(&standby)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(standby_state, ("ready".to_string(), true));
    // Project b adopts it without a launch; its build waits for the agent to serve b.
    let runs = world.proxy.count("RunInstances");
    let build_b = new_build(&app, &b.project.id, &b.org_id).await;
    assert_eq!(
        s.assign(&build_b, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    assert_eq!(machine_of(&app, &b.project.id).await.0, standby);
    assert_eq!(
        world.proxy.count("RunInstances"),
        runs,
        "adoption launches nothing"
    );
    agent_reports(&app, &standby).await;
    assert_eq!(
        s.assign(&build_b, Platform::Amd64).await.unwrap(),
        Assignment::Ready
    );

    // Idle reaping: once a's build is done and the idle timeout passed, its instance is
    // terminated in EC2.
    kiln::db::builds::finish(&db.pool, &build, &Outcome::Success)
        .await
        .unwrap();
    sqlx::query("UPDATE machines SET last_released_at = now() - interval '1 day' WHERE id = $1")
        .bind(&machine)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(s.reap().await.unwrap(), 1);
    let job = claim(&app, kiln::scheduler::TERMINATE_JOB).await;
    s.terminate(&job).await.unwrap();
    assert_eq!(machine_of(&app, &a.project.id).await.1, "terminated");
    assert!(
        !world.instances().await.contains_key(&machine),
        "instance terminated"
    );
    assert!(
        world
            .all_instances()
            .await
            .iter()
            .any(|(_, m, state)| m == &machine && state == "terminated")
    );
}

#[tokio::test]
async fn an_orphan_from_a_crash_between_run_instances_and_the_database_is_terminated() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let app = app_with(&db, &world, &[]);
    let s = &app.scheduler;

    // RunInstances happened, then the process died before writing the machine row: an
    // instance with this cluster's tags and a machine id no row has.
    let fleet = Fleet::new(kiln::scheduler::ec2::Ec2Provider::fleet_config(
        &app.config.builders.ec2,
    ))
    .await;
    let orphan = fleet
        .launch("orphan0000001", Arch::Amd64, "")
        .await
        .unwrap();
    let report = s.reconcile().await.unwrap();
    assert_eq!(report.new_orphans, vec!["orphan0000001".to_string()]);
    assert!(
        world.instances().await.contains_key("orphan0000001"),
        "orphans get a grace period"
    );
    sqlx::query("UPDATE machine_orphans SET first_seen_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await
        .unwrap();
    let report = s.reconcile().await.unwrap();
    assert_eq!(report.terminated_orphans, vec!["orphan0000001".to_string()]);
    assert!(!world.instances().await.contains_key("orphan0000001"));
    assert!(
        world
            .all_instances()
            .await
            .iter()
            .any(|(id, _, state)| id == &orphan.instance_id && state == "terminated")
    );

    // The provider stops and starts machines by id (for stopped standbys).
    let parked = fleet.launch("parked000001", Arch::Amd64, "").await.unwrap();
    s.provider.stop("parked000001").await.unwrap();
    assert_eq!(
        world
            .direct
            .find("parked000001")
            .await
            .unwrap()
            .unwrap()
            .state,
        "stopped"
    );
    s.provider.start("parked000001").await.unwrap();
    assert_eq!(
        world
            .direct
            .find("parked000001")
            .await
            .unwrap()
            .unwrap()
            .state,
        "running"
    );
    world.direct.terminate(&parked.instance_id).await.unwrap();

    // A machine whose instance vanished (terminated outside Kiln) is failed, and its
    // build goes back to the queue.
    let t = tenant(&db.pool, "vanish").await;
    let build = new_build(&app, &t.project.id, &t.org_id).await;
    s.assign(&build, Platform::Amd64).await.unwrap();
    let job = claim(&app, kiln::scheduler::LAUNCH_JOB).await;
    s.launch(&job).await.unwrap();
    let (machine, _) = machine_of(&app, &t.project.id).await;
    agent_comes_up(&app, &world, &machine).await;
    let instance = world.direct.find(&machine).await.unwrap().unwrap();
    world.direct.terminate(&instance.instance_id).await.unwrap();
    sqlx::query("UPDATE machines SET launched_at = now() - interval '2 minutes' WHERE id = $1")
        .bind(&machine)
        .execute(&db.pool)
        .await
        .unwrap();
    let report = s.reconcile().await.unwrap();
    assert_eq!(report.vanished, vec![machine.clone()]);
    let state: String = sqlx::query_scalar("SELECT state FROM build_platforms WHERE build_id = $1")
        .bind(&build)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "pending");
}

#[tokio::test]
async fn without_capacity_for_the_first_type_kiln_launches_the_second() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let app = app_with(&db, &world, &[]);
    let s = &app.scheduler;
    let t = tenant(&db.pool, "ice").await;

    // c6i.large has no capacity in either subnet; the first subnet also lacks c6a.large.
    world.proxy.inject(
        Fault::error("RunInstances", "InsufficientInstanceCapacity", 500)
            .only_if("InstanceType", "c6i.large")
            .always(),
    );
    world.proxy.inject(
        Fault::error("RunInstances", "InsufficientInstanceCapacity", 500)
            .only_if("SubnetId", &world.subnets[0])
            .always(),
    );
    let build = new_build(&app, &t.project.id, &t.org_id).await;
    s.assign(&build, Platform::Amd64).await.unwrap();
    let job = claim(&app, kiln::scheduler::LAUNCH_JOB).await;
    s.launch(&job).await.unwrap();
    let (machine, _) = machine_of(&app, &t.project.id).await;
    let instance = world.direct.find(&machine).await.unwrap().unwrap();
    assert_eq!(instance.instance_type.as_deref(), Some("c6a.large"));
    assert_eq!(
        instance.subnet_id.as_deref(),
        Some(world.subnets[1].as_str())
    );
    // Each refused combination was asked once: SDK retries are off for RunInstances.
    let runs = world.proxy.requests_for("RunInstances");
    let tried: Vec<(String, String)> = runs
        .iter()
        .map(|r| {
            (
                r.instance_type().unwrap_or_default().to_string(),
                r.subnet_id().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(tried.len(), 4, "{tried:?}");
    assert_eq!(
        tried.iter().collect::<HashSet<_>>().len(),
        4,
        "no combination retried: {tried:?}"
    );
}

/// Three `kiln serve` processes on one database, each scheduling against EC2 (moto),
/// race 200 builds of 40 projects through the Connect API. Agents are played over gRPC
/// against random replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_race_200_builds_without_double_launch_or_assignment() {
    const PROJECTS: usize = 40;
    const BUILDS_PER_PROJECT: usize = 5;
    let db = TestDb::new().await;
    let world = World::new().await;

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut env = world.env();
    env.extend([
        ("KILN_DATABASE__URL".to_string(), db.url.clone()),
        ("KILN_BUILDERS__AGENT_API_URL".to_string(), urls[0].clone()),
        (
            "KILN_BUILDERS__MAX_MACHINES_TOTAL".to_string(),
            "500".into(),
        ),
        (
            "KILN_BUILDS__CONNECTION_WAIT_SECONDS".to_string(),
            "2".into(),
        ),
        ("KILN_LOG__FILTER".to_string(), "warn".into()),
    ]);
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut env_i = env.clone();
        env_i.push(("KILN_SERVER__PUBLIC_URL".into(), urls[i].clone()));
        let refs: Vec<(&str, &str)> = env_i
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut kiln = Kiln::spawn(&["serve"], &refs, *port);
        kiln.wait_ready().await;
        replicas.push(kiln);
    }

    let mut projects = Vec::new();
    for i in 0..PROJECTS {
        let t = tenant(&db.pool, &format!("race{i}")).await;
        let token = project_token(&db.pool, &t.project, kiln::auth::TokenKind::Project).await;
        projects.push((t.project.id.clone(), token));
    }

    // Agents: each booting machine registers (with the token from its user data) and
    // reports serving, on a random replica.
    let stop = Arc::new(tokio::sync::Notify::new());
    let agents = {
        let pool = db.pool.clone();
        let urls = urls.clone();
        let world = Arc::new(world);
        let w = world.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut done: HashSet<String> = HashSet::new();
            loop {
                let booting: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM machines WHERE state = 'booting' AND registered_at IS NULL",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                let fresh: Vec<String> =
                    booting.into_iter().filter(|m| !done.contains(m)).collect();
                for machine in fresh {
                    let Some(token) = w.registration_token(&machine).await else {
                        continue;
                    };
                    let url = &urls[rand::random_range(0..urls.len())];
                    let mut client = MachineAgentServiceClient::connect(url.clone())
                        .await
                        .unwrap();
                    let registered = client
                        .register(pb::RegisterRequest {
                            machine_id: machine.clone(),
                            registration_token: token,
                            agent_version: "race".into(),
                            buildkit_address: String::new(),
                            identity: None,
                        })
                        .await
                        .expect("registration succeeds once")
                        .into_inner();
                    let bearer = format!("Bearer {}", registered.machine_token);
                    let mut watch = tonic::Request::new(pb::WatchDirectivesRequest {
                        machine_id: machine.clone(),
                    });
                    watch
                        .metadata_mut()
                        .insert("authorization", bearer.parse().unwrap());
                    let mut stream = client.watch_directives(watch).await.unwrap().into_inner();
                    let directive = stream.message().await.unwrap().unwrap();
                    assert!(matches!(
                        directive.action,
                        Some(pb::directive::Action::Buildkit(_))
                    ));
                    let mut health = tonic::Request::new(pb::ReportHealthRequest {
                        machine_id: machine.clone(),
                        generation: directive.generation,
                        buildkit_up: true,
                        disk_free_bytes: 1,
                        disk_total_bytes: 2,
                    });
                    health
                        .metadata_mut()
                        .insert("authorization", bearer.parse().unwrap());
                    client.report_health(health).await.unwrap();
                    done.insert(machine);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.notified() => return (done, w),
                }
            }
        })
    };

    // 200 builds: CreateBuild, then GetBuildKitConnection until active, each call on a
    // random replica.
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..BUILDS_PER_PROJECT {
        for (project_id, token) in &projects {
            let (http, urls) = (http.clone(), urls.clone());
            let (project_id, token) = (project_id.clone(), token.clone());
            tasks.spawn(async move {
                let created: depot::CreateBuildResponse = call(
                    &http,
                    &urls[rand::random_range(0..urls.len())],
                    "depot.cli.v1.BuildService/CreateBuild",
                    &token,
                    &depot::CreateBuildRequest {
                        project_id: Some(project_id.clone()),
                        options: vec![],
                        required_engine: None,
                    },
                )
                .await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                loop {
                    let answer: depot::GetBuildKitConnectionResponse = call(
                        &http,
                        &urls[rand::random_range(0..urls.len())],
                        "depot.cli.v1.BuildService/GetBuildKitConnection",
                        &created.build_token,
                        &depot::GetBuildKitConnectionRequest {
                            build_id: created.build_id.clone(),
                            platform: depot::BuilderPlatform::Amd64 as i32,
                        },
                    )
                    .await;
                    if let Some(depot::get_build_kit_connection_response::Connection::Active(a)) =
                        answer.connection
                    {
                        return Ok((created.build_id, project_id, a.endpoint));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(created.build_id);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    }
    let mut connected = Vec::new();
    let mut stuck = Vec::new();
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(done) => connected.push(done),
            Err(build) => stuck.push(build),
        }
    }
    if !stuck.is_empty() {
        let machines: Vec<(String, Option<String>, String, Option<String>)> =
            sqlx::query_as("SELECT id, project_id, state, error FROM machines ORDER BY created_at")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let jobs: Vec<(String, String, i32, Option<String>)> =
            sqlx::query_as("SELECT kind, state, attempts, last_error FROM jobs")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        for replica in &replicas {
            eprintln!("=== replica log\n{}", replica.logs());
        }
        panic!(
            "{} builds never got a builder: {stuck:?}\nmachines: {machines:?}\njobs: {jobs:?}",
            stuck.len()
        );
    }
    stop.notify_one();
    let (registered, world) = agents.await.unwrap();
    assert_eq!(connected.len(), PROJECTS * BUILDS_PER_PROJECT);

    // One machine per project, each launched exactly once, none shared.
    let machines: Vec<(String, Option<String>, String)> =
        sqlx::query_as("SELECT id, project_id, state FROM machines")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(machines.len(), PROJECTS, "{machines:?}");
    assert_eq!(registered.len(), PROJECTS, "every machine registered once");
    let projects_of: HashMap<&str, &str> = machines
        .iter()
        .map(|(id, project, _)| (id.as_str(), project.as_deref().unwrap()))
        .collect();
    assert_eq!(
        projects_of.values().collect::<HashSet<_>>().len(),
        PROJECTS,
        "one machine per project"
    );
    let instances = world.all_instances().await;
    assert_eq!(
        instances.len(),
        PROJECTS,
        "no machine launched twice: {instances:?}"
    );
    let launched: HashSet<&str> = instances.iter().map(|(_, m, _)| m.as_str()).collect();
    assert_eq!(launched.len(), PROJECTS);
    assert!(launched.iter().all(|m| projects_of.contains_key(m)));
    // A retried RunInstances (after an ambiguous failure, which moto also produces under
    // load) is fine as long as it reuses the client token: EC2 returns the same instance.
    for (machine, _, _) in &machines {
        let tokens: HashSet<String> = world
            .proxy
            .requests_for("RunInstances")
            .iter()
            .filter(|r| r.params.iter().any(|(_, v)| v == machine))
            .filter_map(|r| {
                r.params
                    .iter()
                    .find(|(k, _)| k == "ClientToken")
                    .map(|(_, v)| v.clone())
            })
            .collect();
        assert_eq!(
            tokens.len(),
            1,
            "machine {machine} launched under one client token: {tokens:?}"
        );
    }
    // Every build ran on its own project's machine.
    let placements: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT bp.build_id, b.project_id, m.project_id FROM build_platforms bp
         JOIN builds b ON b.id = bp.build_id JOIN machines m ON m.id = bp.builder_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(placements.len(), PROJECTS * BUILDS_PER_PROJECT);
    for (build, build_project, machine_project) in &placements {
        assert_eq!(
            build_project, machine_project,
            "build {build} on another project's machine"
        );
    }
    let active: i64 = sqlx::query_scalar("SELECT sum(active_builds) FROM machines")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        active as usize,
        PROJECTS * BUILDS_PER_PROJECT,
        "every build counted once"
    );
    drop(replicas);
}

async fn call<Req: Message, Resp: Message + Default>(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    token: &str,
    request: &Req,
) -> Resp {
    common::connect_call(http, base, method, token, request)
        .await
        .unwrap_or_else(|(status, code)| panic!("{method}: {status} {code}"))
}

/// Signs an identity document with the test stand-in for AWS's key.
fn signed_identity(document: &str) -> kiln::scheduler::agents::InstanceIdentity {
    use base64::Engine;
    let pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ec2-identity/key.pem"
    ))
    .unwrap();
    let der = rustls_pemfile::private_key(&mut pem.as_slice())
        .unwrap()
        .unwrap();
    let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_der()).unwrap();
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        document.as_bytes(),
        &mut signature,
    )
    .unwrap();
    kiln::scheduler::agents::InstanceIdentity {
        document: document.to_string(),
        signature: base64::engine::general_purpose::STANDARD.encode(signature),
    }
}

#[tokio::test]
async fn where_required_agents_prove_their_instance_with_a_signed_identity_document() {
    let db = TestDb::new().await;
    let world = World::new().await;
    let cert = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ec2-identity/cert.pem"
    );
    let app = app_with(
        &db,
        &world,
        &[
            ("KILN_BUILDERS__EC2__IDENTITY_CERTIFICATE_FILE", cert),
            ("KILN_BUILDERS__EC2__IDENTITY_ACCOUNT_ID", "123456789012"),
        ],
    );
    let s = &app.scheduler;
    let t = tenant(&db.pool, "identity").await;
    let build = new_build(&app, &t.project.id, &t.org_id).await;
    s.assign(&build, Platform::Amd64).await.unwrap();
    let job = claim(&app, kiln::scheduler::LAUNCH_JOB).await;
    s.launch(&job).await.unwrap();
    let (machine, _) = machine_of(&app, &t.project.id).await;
    let token = world.registration_token(&machine).await.unwrap();
    let instance = world.direct.find(&machine).await.unwrap().unwrap();
    let document = |instance_id: &str, account: &str| {
        format!(
            r#"{{"accountId":"{account}","architecture":"x86_64","instanceId":"{instance_id}","region":"us-east-1","instanceType":"c6i.large"}}"#
        )
    };
    let register = |identity: Option<kiln::scheduler::agents::InstanceIdentity>| {
        let token = token.clone();
        let machine = machine.clone();
        async move {
            s.register_agent(&machine, &token, "test", "", identity.as_ref())
                .await
        }
    };
    let refused = |reason: &'static str| {
        let pool = db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM audit_events WHERE action = 'machine.registration_refused' AND details->>'reason' = $1",
            )
            .bind(reason)
            .fetch_one(&pool)
            .await
            .unwrap();
            n
        }
    };

    assert!(register(None).await.is_err());
    assert_eq!(refused("instance identity document missing").await, 1);
    // Signed, but for another instance, or another account.
    assert!(
        register(Some(signed_identity(&document("i-0other", "123456789012"))))
            .await
            .is_err()
    );
    assert!(
        register(Some(signed_identity(&document(
            &instance.instance_id,
            "999999999999"
        ))))
        .await
        .is_err()
    );
    assert_eq!(refused("instance identity names another instance").await, 2);
    // The right document with a signature that is not AWS's (a tampered document).
    let mut forged = signed_identity(&document(&instance.instance_id, "123456789012"));
    forged.document = forged.document.replace("c6i.large", "c6i.metal");
    assert!(register(Some(forged)).await.is_err());
    assert_eq!(
        refused("instance identity signature does not verify").await,
        1
    );
    // The genuine one is accepted, and the user data told the agent to send it.
    register(Some(signed_identity(&document(
        &instance.instance_id,
        "123456789012",
    ))))
    .await
    .expect("a genuine identity registers");
    let script = world.user_data(&machine).await;
    assert!(script.contains("KILN_AGENT_EC2_IDENTITY=true"));
}
