//! Builder machines with the `local` provider (the BuildKit stand-in as builder):
//! launch, reuse, idle reaping, lifetime draining, and caps. Job handlers are driven
//! directly so each step is observed.
mod common;

use std::time::Duration;

use kiln::app::AppState;
use kiln::db::builds::{Outcome, Platform};
use kiln::db::jobs::ClaimedJob;
use kiln::error::Error;
use kiln::scheduler::Assignment;

use common::{TestDb, tenant};

fn app_with(db: &TestDb, overrides: &[(&str, &str)]) -> AppState {
    let command = common::standin_command();
    let mut env: Vec<(&str, &str)> = vec![
        ("KILN_BUILDERS__LOCAL__COMMAND", command.as_str()),
        // Machine handlers are driven directly here; agents are covered in tests/agent.rs.
        ("KILN_BUILDERS__LOCAL__AGENT", "false"),
        ("KILN_SECRETS__KEY_ENCRYPTION_KEY", common::KEK_B64),
    ];
    env.extend_from_slice(overrides);
    let app = kiln::app::App::new(common::config(&db.url, &env), db.pool.clone());
    app.mark_migrated();
    app
}

async fn new_build(app: &AppState, project_id: &str) -> String {
    let project = kiln::db::projects::get(&app.db, project_id)
        .await
        .unwrap()
        .unwrap();
    common::new_build(&app.db, project_id, &project.organization_id).await
}

async fn claim(app: &AppState, kind: &str) -> ClaimedJob {
    common::claim_job(&app.db, kind).await
}

async fn machine(app: &AppState, project_id: &str) -> (String, String, i32) {
    sqlx::query_as("SELECT id, state, active_builds FROM machines WHERE project_id = $1 ORDER BY created_at DESC LIMIT 1")
        .bind(project_id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_builder_launches_is_reused_and_is_reaped_when_idle() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let app = app_with(&db, &[]);
    let s = &app.scheduler;

    let first = new_build(&app, &t.project.id).await;
    assert_eq!(
        s.assign(&first, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    let (machine_id, state, active) = machine(&app, &t.project.id).await;
    assert_eq!((state.as_str(), active), ("requested", 1));

    // Launching twice (a retried job) starts one process.
    let job = claim(&app, kiln::scheduler::LAUNCH_JOB).await;
    s.launch(&job).await.unwrap();
    s.launch(&job).await.unwrap();
    assert_eq!(machine(&app, &t.project.id).await.1, "assigned");
    assert_eq!(
        s.assign(&first, Platform::Amd64).await.unwrap(),
        Assignment::Ready
    );
    assert!(s.provider.is_alive(&machine_id).await.unwrap());

    // A second build of the project shares the running builder at once.
    let second = new_build(&app, &t.project.id).await;
    assert_eq!(
        s.assign(&second, Platform::Amd64).await.unwrap(),
        Assignment::Ready
    );
    assert_eq!(
        machine(&app, &t.project.id).await,
        (machine_id.clone(), "assigned".into(), 2)
    );
    let machines: i64 = sqlx::query_scalar("SELECT count(*) FROM machines")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(machines, 1, "one builder per project and architecture");

    kiln::db::builds::finish(&db.pool, &first, &Outcome::Success)
        .await
        .unwrap();
    assert_eq!(machine(&app, &t.project.id).await.1, "assigned");
    kiln::db::builds::finish(&db.pool, &second, &Outcome::Success)
        .await
        .unwrap();
    assert_eq!(
        machine(&app, &t.project.id).await,
        (machine_id.clone(), "ready".into(), 0)
    );

    // Not idle long enough: kept.
    assert_eq!(s.reap().await.unwrap(), 0);
    // Idle past the timeout: drained, then terminated by its job.
    sqlx::query("UPDATE machines SET last_released_at = now() - interval '11 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(s.reap().await.unwrap(), 1);
    assert_eq!(machine(&app, &t.project.id).await.1, "draining");
    let job = claim(&app, kiln::scheduler::TERMINATE_JOB).await;
    s.terminate(&job).await.unwrap();
    assert_eq!(machine(&app, &t.project.id).await.1, "terminated");
    assert!(
        !s.provider.is_alive(&machine_id).await.unwrap(),
        "the builder process is still running"
    );

    // The next build gets a fresh builder.
    let third = new_build(&app, &t.project.id).await;
    assert_eq!(
        s.assign(&third, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    assert_ne!(machine(&app, &t.project.id).await.0, machine_id);
}

#[tokio::test]
async fn builders_past_their_lifetime_take_no_new_builds_and_stop_when_done() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let app = app_with(&db, &[]);
    let s = &app.scheduler;
    let build = new_build(&app, &t.project.id).await;
    s.assign(&build, Platform::Amd64).await.unwrap();
    s.launch(&claim(&app, kiln::scheduler::LAUNCH_JOB).await)
        .await
        .unwrap();
    let (old, _, _) = machine(&app, &t.project.id).await;

    sqlx::query("UPDATE machines SET launched_at = now() - interval '25 hours'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(s.reap().await.unwrap(), 1);
    assert_eq!(
        machine(&app, &t.project.id).await,
        (old.clone(), "draining".into(), 1)
    );
    // Still busy: not terminated yet.
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = $1")
        .bind(kiln::scheduler::TERMINATE_JOB)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 0);

    // A new build of the project gets a new machine; the old one finishes its build.
    let next = new_build(&app, &t.project.id).await;
    assert_eq!(
        s.assign(&next, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    assert_ne!(machine(&app, &t.project.id).await.0, old);
    kiln::db::builds::finish(&db.pool, &build, &Outcome::Success)
        .await
        .unwrap();
    s.reap().await.unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM machines WHERE id = $1")
        .bind(&old)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "draining");
    let job = claim(&app, kiln::scheduler::TERMINATE_JOB).await;
    s.terminate(&job).await.unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM machines WHERE id = $1")
        .bind(&old)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "terminated");
}

#[tokio::test]
async fn machine_caps_answer_with_a_clear_error() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let app = app_with(
        &db,
        &[("KILN_BUILDERS__MAX_MACHINES_PER_ORGANIZATION", "1")],
    );
    let second_project = common::project(&db.pool, &t.org_id, "second").await;
    let a = new_build(&app, &t.project.id).await;
    assert_eq!(
        app.scheduler.assign(&a, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    let b = new_build(&app, &second_project.id).await;
    let err = app.scheduler.assign(&b, Platform::Amd64).await.unwrap_err();
    assert!(
        matches!(&err, Error::ResourceExhausted(m) if m.contains("max_machines_per_organization")),
        "{err:?}"
    );
    // Nothing changed for the refused build.
    let state: String = sqlx::query_scalar("SELECT state FROM build_platforms WHERE build_id = $1")
        .bind(&b)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "pending");
    let machines: i64 = sqlx::query_scalar("SELECT count(*) FROM machines")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(machines, 1);

    // Another organization is not affected by this one's cap.
    let other = tenant(&db.pool, "b").await;
    let c = new_build(&app, &other.project.id).await;
    assert_eq!(
        app.scheduler.assign(&c, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
}

#[tokio::test]
async fn a_warm_standby_is_handed_to_the_first_project_and_the_pool_refills() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let app = app_with(&db, &[("KILN_BUILDERS__WARM_POOL_AMD64", "1")]);
    let s = &app.scheduler;

    assert_eq!(s.refill_pool().await.unwrap(), 1);
    assert_eq!(
        s.refill_pool().await.unwrap(),
        0,
        "the pool is already full"
    );
    s.launch(&claim(&app, kiln::scheduler::LAUNCH_JOB).await)
        .await
        .unwrap();
    let (warm, state): (String, String) =
        sqlx::query_as("SELECT id, state FROM machines WHERE project_id IS NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state, "ready");
    // Idle standbys are not reaped for idleness: waiting is their job.
    sqlx::query("UPDATE machines SET ready_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(s.reap().await.unwrap(), 0);

    // The first build of a project gets the standby in the same call: no launch.
    let build = new_build(&app, &t.project.id).await;
    assert_eq!(
        s.assign(&build, Platform::Amd64).await.unwrap(),
        Assignment::Ready
    );
    assert_eq!(
        machine(&app, &t.project.id).await,
        (warm.clone(), "assigned".into(), 1)
    );

    // The adoption queued a refill, which requests a new standby.
    let refill = claim(&app, kiln::scheduler::POOL_JOB).await;
    assert_eq!(refill.kind, kiln::scheduler::POOL_JOB);
    assert_eq!(s.refill_pool().await.unwrap(), 1);
    let standbys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM machines WHERE project_id IS NULL AND state = 'requested'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(standbys, 1);
}

#[tokio::test]
async fn replicas_racing_builds_launch_one_machine_per_slot() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let mut project_ids = vec![t.project.id.clone()];
    for i in 0..4 {
        let p = common::project(&db.pool, &t.org_id, &format!("p{i}")).await;
        project_ids.push(p.id);
    }
    // Three "replicas": separate apps, schedulers and pools of connections on one database.
    let replicas: Vec<AppState> = (0..3).map(|_| app_with(&db, &[])).collect();
    let mut builds = Vec::new();
    for i in 0..60 {
        builds.push((
            new_build(&replicas[0], &project_ids[i % project_ids.len()]).await,
            i,
        ));
    }
    let mut tasks = Vec::new();
    for (build, i) in builds.clone() {
        let app = replicas[i % replicas.len()].clone();
        tasks.push(tokio::spawn(async move {
            // Retry while another replica holds the platform row, as the CLI's next call would.
            for _ in 0..50 {
                match app.scheduler.assign(&build, Platform::Amd64).await.unwrap() {
                    Assignment::Skipped => tokio::task::yield_now().await,
                    other => return other,
                }
            }
            panic!("build {build} never assigned");
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Assignment::Waiting);
    }
    let per_slot: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT m.project_id, count(DISTINCT m.id), max(m.active_builds)::bigint FROM machines m GROUP BY m.project_id ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(per_slot.len(), 5);
    for (project, machines, active) in per_slot {
        assert_eq!(machines, 1, "project {project} got {machines} machines");
        assert_eq!(active, 12, "project {project}: every build counted once");
    }
    // Every platform is assigned to its own project's machine.
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM build_platforms bp JOIN builds b ON b.id = bp.build_id JOIN machines m ON m.id = bp.builder_id
         WHERE m.project_id <> b.project_id OR bp.state <> 'assigned'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(mismatched, 0);
    let launches: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = $1")
        .bind(kiln::scheduler::LAUNCH_JOB)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(launches, 5, "one launch per machine");
}

#[tokio::test]
async fn the_reconciler_requeues_builds_of_vanished_builders_and_reaps_orphans() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let app = app_with(&db, &[]);
    let s = &app.scheduler;
    let build = new_build(&app, &t.project.id).await;
    s.assign(&build, Platform::Amd64).await.unwrap();
    s.launch(&claim(&app, kiln::scheduler::LAUNCH_JOB).await)
        .await
        .unwrap();
    assert_eq!(
        s.assign(&build, Platform::Amd64).await.unwrap(),
        Assignment::Ready
    );
    let (machine_id, _, _) = machine(&app, &t.project.id).await;
    assert_eq!(
        s.reconcile().await.unwrap(),
        kiln::scheduler::Reconciled::default(),
        "nothing to do when all is well"
    );

    // The builder dies under a running build. A machine launched moments ago may just
    // not be listed yet (EC2 is eventually consistent): it is left alone at first.
    s.provider.terminate(&machine_id).await.unwrap();
    assert!(s.reconcile().await.unwrap().vanished.is_empty());
    sqlx::query("UPDATE machines SET launched_at = now() - interval '2 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    let report = s.reconcile().await.unwrap();
    assert_eq!(report.vanished, vec![machine_id.clone()]);
    assert_eq!(machine(&app, &t.project.id).await.1, "failed");
    let state: String = sqlx::query_scalar("SELECT state FROM build_platforms WHERE build_id = $1")
        .bind(&build)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "pending", "the build waits for a new builder");
    assert_eq!(
        s.assign(&build, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    assert_ne!(machine(&app, &t.project.id).await.0, machine_id);

    // An instance with no machine row, as after a crash between launch and the DB write.
    let pki = s.pki().await.unwrap();
    let orphan = "orphan0000001".to_string();
    s.provider
        .launch(kiln::scheduler::provider::LaunchSpec {
            machine_id: orphan.clone(),
            platform: Platform::Amd64,
            server_name: "orphan.builders.kiln.internal".into(),
            server_cert: pki
                .server_certificate("orphan.builders.kiln.internal", time::Duration::hours(1))
                .unwrap(),
            ca_pem: pki.ca_pem.clone(),
            agent: None,
        })
        .await
        .unwrap();
    let report = s.reconcile().await.unwrap();
    assert_eq!(report.new_orphans, vec![orphan.clone()]);
    assert!(
        s.provider.is_alive(&orphan).await.unwrap(),
        "orphans get a grace period"
    );
    sqlx::query("UPDATE machine_orphans SET first_seen_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await
        .unwrap();
    let report = s.reconcile().await.unwrap();
    assert_eq!(report.terminated_orphans, vec![orphan.clone()]);
    assert!(!s.provider.is_alive(&orphan).await.unwrap());
}

async fn launching_for_a_minute(db: &TestDb, machine_id: &str) {
    sqlx::query(
        "UPDATE machines SET state = 'launching', launched_at = now() - interval '1 minute'
         WHERE id = $1",
    )
    .bind(machine_id)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_launch_that_ended_without_a_machine_frees_its_slot() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let app = app_with(&db, &[("KILN_BUILDERS__BOOT_TIMEOUT_SECONDS", "10")]);
    let s = &app.scheduler;
    let build = new_build(&app, &t.project.id).await;
    s.assign(&build, Platform::Amd64).await.unwrap();
    let job = claim(&app, kiln::scheduler::LAUNCH_JOB).await;
    let (machine_id, _, _) = machine(&app, &t.project.id).await;
    // The launch job died on its last attempt without cleaning up (the pre-fix bug):
    // the row sits in `launching` holding the slot, and no job will ever run again.
    launching_for_a_minute(&db, &machine_id).await;
    sqlx::query("UPDATE jobs SET state = 'failed' WHERE id = $1")
        .bind(job.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let report = s.reconcile().await.unwrap();
    assert_eq!(report.stalled, vec![machine_id.clone()]);
    assert_eq!(machine(&app, &t.project.id).await.1, "failed");
    // The build gets a new machine: the slot is free again.
    assert_eq!(
        s.assign(&build, Platform::Amd64).await.unwrap(),
        Assignment::Waiting
    );
    assert_ne!(machine(&app, &t.project.id).await.0, machine_id);

    // A launch still being retried is left to its job.
    let (second, _, _) = machine(&app, &t.project.id).await;
    launching_for_a_minute(&db, &second).await;
    assert!(s.reconcile().await.unwrap().stalled.is_empty());
}

#[tokio::test]
async fn the_scheduler_is_woken_by_notify() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let command = common::standin_command();
    // Poll every ten minutes: only a notification can wake the scheduler in time.
    let server = common::Server::start(
        &db,
        &[
            ("KILN_BUILDERS__LOCAL__COMMAND", &command),
            ("KILN_BUILDERS__LOCAL__AGENT", "false"),
            ("KILN_BUILDERS__SCHEDULER_POLL_SECONDS", "600"),
        ],
    )
    .await;
    let platform_state = |build: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM build_platforms WHERE build_id = $1")
                .bind(build)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // A build queued before the scheduler's first pass: proves that pass ran.
    let first = common::new_build(&db.pool, &t.project.id, &t.org_id).await;
    kiln::scheduler::notify_scheduler(&db.pool).await;
    common::wait_for("the first pass", Duration::from_secs(10), || {
        let first = first.clone();
        async move { platform_state(first).await != "pending" }
    })
    .await;
    // Requeued work announced by NOTIFY is picked up at once.
    let other = common::project(&db.pool, &t.org_id, "second").await;
    let second = common::new_build(&db.pool, &other.id, &t.org_id).await;
    kiln::scheduler::notify_scheduler(&db.pool).await;
    common::wait_for(
        "the notified scheduler to assign the build",
        Duration::from_secs(5),
        || {
            let second = second.clone();
            async move { platform_state(second).await != "pending" }
        },
    )
    .await;
    server.stop().await;
}
