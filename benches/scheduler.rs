//! Scheduler at scale, in process, with the `sim` provider (machines in memory) against a
//! real PostgreSQL: 10,000 projects and 2,000 concurrent builds.
//!
//! Phases: cold (every build's slot is empty: request + launch), warm (each project's
//! builder is idle: hand it out), warm pool (fresh projects adopt standbys). Reports
//! decisions per second, assignment latency, and statements per assignment (from
//! pg_stat_statements when the server has it). Run through scripts/bench-scheduler.sh.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::app::{App, AppState};
use kiln::db::builds::Platform;
use kiln::scheduler::Assignment;
use sqlx::PgPool;

const PROJECTS: i64 = 10_000;
const BUILDS: i64 = 2_000;
const WORKERS: usize = 16;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

async fn statements(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT sum(calls)::bigint FROM pg_stat_statements")
        .fetch_one(pool)
        .await
        .ok()
        .flatten()
}

async fn make_builds(pool: &PgPool, tag: &str, first_project: i64, count: i64) -> Vec<String> {
    sqlx::query_scalar(
        "WITH b AS (
             INSERT INTO builds (id, project_id, organization_id, cancels_at)
             SELECT $1 || '-' || n, 'p' || ($2 + n), 'o' || (($2 + n) % 100), now() + interval '1 hour'
             FROM generate_series(0, $3 - 1) AS n
             RETURNING id)
         INSERT INTO build_platforms (build_id, platform) SELECT id, 'amd64' FROM b RETURNING build_id",
    )
    .bind(tag)
    .bind(first_project)
    .bind(count)
    .fetch_all(pool)
    .await
    .expect("creating builds")
}

/// Assigns every build with `WORKERS` concurrent tasks; returns per-call latencies.
async fn assign_all(
    app: &AppState,
    builds: Vec<String>,
    expect: Assignment,
) -> (Duration, Vec<Duration>) {
    assign_with(app, builds, expect, WORKERS).await
}

/// Assigns every build with `workers` concurrent tasks; returns per-call latencies.
async fn assign_with(
    app: &AppState,
    builds: Vec<String>,
    expect: Assignment,
    workers: usize,
) -> (Duration, Vec<Duration>) {
    let queue = Arc::new(tokio::sync::Mutex::new(builds));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let app = app.clone();
        let queue = queue.clone();
        let expect = expect.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(build) = queue.lock().await.pop() else {
                    return latencies;
                };
                let t = Instant::now();
                let got = app
                    .scheduler
                    .assign(&build, Platform::Amd64)
                    .await
                    .expect("assign");
                latencies.push(t.elapsed());
                assert_eq!(got, expect, "build {build}");
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (started.elapsed(), all)
}

async fn launch_all(app: &AppState) -> (usize, Duration) {
    let started = Instant::now();
    let mut launched = 0;
    loop {
        let jobs =
            kiln::db::jobs::claim(&app.db, "default", "bench", Duration::from_secs(600), 500)
                .await
                .unwrap();
        if jobs.is_empty() {
            return (launched, started.elapsed());
        }
        let mut tasks = Vec::new();
        for job in jobs {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                if job.kind == kiln::scheduler::LAUNCH_JOB {
                    app.scheduler.launch(&job).await.expect("launch");
                    kiln::db::jobs::complete(&app.db, job.id, "bench")
                        .await
                        .unwrap();
                    1
                } else {
                    kiln::db::jobs::complete(&app.db, job.id, "bench")
                        .await
                        .unwrap();
                    0
                }
            }));
        }
        for t in tasks {
            launched += t.await.unwrap();
        }
    }
}

fn report(label: &str, elapsed: Duration, mut latencies: Vec<Duration>, statements: Option<i64>) {
    latencies.sort();
    let n = latencies.len();
    let pct =
        |p: f64| latencies[((p / 100.0) * (n - 1) as f64).round() as usize].as_secs_f64() * 1000.0;
    let per = statements
        .map(|s| format!("{:.1}", s as f64 / n as f64))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "{label}: {n} decisions in {:.2}s = {:.0}/s; latency p50 {:.2} ms p99 {:.2} ms; statements per decision {per}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        pct(50.0),
        pct(99.0),
    );
}

#[tokio::main]
async fn main() {
    let url = env("BENCH_DATABASE_URL", "");
    if url.is_empty() {
        eprintln!("run through scripts/bench-scheduler.sh, which starts PostgreSQL");
        return;
    }
    let overrides = vec![
        ("KILN_DATABASE__URL".to_string(), url.clone()),
        (
            "KILN_DATABASE__MAX_CONNECTIONS".to_string(),
            "40".to_string(),
        ),
        ("KILN_BUILDERS__PROVIDER".to_string(), "sim".to_string()),
        (
            "KILN_BUILDERS__MAX_MACHINES_TOTAL".to_string(),
            "100000".to_string(),
        ),
        (
            "KILN_BUILDERS__MAX_MACHINES_PER_ORGANIZATION".to_string(),
            "100000".to_string(),
        ),
        (
            "KILN_BUILDERS__WARM_POOL_AMD64".to_string(),
            "1000".to_string(),
        ),
        (
            "KILN_SECRETS__KEY_ENCRYPTION_KEY".to_string(),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string(),
        ),
    ];
    let config = kiln::config::Config::load_from(None, overrides).expect("config");
    let pool = kiln::db::lazy_pool(&config.database).unwrap();
    kiln::db::migrate(&pool).await.unwrap();
    sqlx::query("INSERT INTO organizations (id, name) SELECT 'o' || n, 'org ' || n FROM generate_series(0, 99) n")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO projects (id, organization_id, name) SELECT 'p' || n, 'o' || (n % 100), 'project ' || n
         FROM generate_series(0, $1 - 1) n",
    )
    .bind(PROJECTS)
    .execute(&pool)
    .await
    .unwrap();
    let app = App::new(config, pool.clone());
    app.mark_migrated();
    println!(
        "{PROJECTS} projects, {BUILDS} concurrent builds, {WORKERS} scheduler tasks, sim provider"
    );

    // Cold: 2,000 builds on 2,000 projects with empty slots.
    let builds = make_builds(&pool, "cold", 0, BUILDS).await;
    let before = statements(&pool).await;
    let (elapsed, latencies) = assign_all(&app, builds, Assignment::Waiting).await;
    let used = statements(&pool).await.zip(before).map(|(a, b)| a - b);
    report("cold (request a machine)", elapsed, latencies, used);
    let (launched, elapsed) = launch_all(&app).await;
    println!(
        "launch jobs: {launched} machines launched and ready in {:.2}s = {:.0}/s",
        elapsed.as_secs_f64(),
        launched as f64 / elapsed.as_secs_f64()
    );

    // Warm: those builds finish; 2,000 new builds of the same projects find idle builders.
    for id in sqlx::query_scalar::<_, String>("SELECT id FROM builds WHERE id LIKE 'cold-%'")
        .fetch_all(&pool)
        .await
        .unwrap()
    {
        kiln::db::builds::finish(&pool, &id, &kiln::db::builds::Outcome::Success)
            .await
            .unwrap();
    }
    let builds = make_builds(&pool, "warm", 0, BUILDS).await;
    let before = statements(&pool).await;
    let (elapsed, latencies) = assign_all(&app, builds, Assignment::Ready).await;
    let used = statements(&pool).await.zip(before).map(|(a, b)| a - b);
    report(
        "warm (idle builder of the project)",
        elapsed,
        latencies,
        used,
    );

    // Warm pool: 1,000 standbys; 500 builds of fresh projects adopt them, 16 at once.
    let requested = app.scheduler.refill_pool().await.unwrap();
    let (launched, _) = launch_all(&app).await;
    println!("warm pool: {requested} standbys requested, {launched} launched");
    let builds = make_builds(&pool, "pool", 5_000, 500).await;
    let before = statements(&pool).await;
    let (elapsed, latencies) = assign_all(&app, builds, Assignment::Ready).await;
    let used = statements(&pool).await.zip(before).map(|(a, b)| a - b);
    report(
        "warm pool (adopt a standby), 16 at once",
        elapsed,
        latencies,
        used,
    );

    // The same, one assignment at a time: the latency of a single warm-pool assignment.
    // sqlx hands out pooled connections in turn and prepares each statement once per
    // connection, so first a warm-up pass touches every connection (a long-running server
    // is in that steady state); its latencies are reported separately.
    app.scheduler.refill_pool().await.unwrap();
    launch_all(&app).await;
    let warmup = make_builds(&pool, "pool0", 5_500, 100).await;
    let (elapsed, latencies) = assign_with(&app, warmup, Assignment::Ready, 1).await;
    report(
        "warm pool (adopt a standby), one at a time, first 100 (statements being prepared)",
        elapsed,
        latencies,
        None,
    );
    app.scheduler.refill_pool().await.unwrap();
    launch_all(&app).await;
    let builds = make_builds(&pool, "pool1", 6_000, 1_000).await;
    let before = statements(&pool).await;
    let (elapsed, latencies) = assign_with(&app, builds, Assignment::Ready, 1).await;
    let used = statements(&pool).await.zip(before).map(|(a, b)| a - b);
    report(
        "warm pool (adopt a standby), one at a time",
        elapsed,
        latencies,
        used,
    );
    let builds = make_builds(&pool, "warm1", 0, 300).await;
    // Projects 0..300 have idle builders again once the warm phase's builds finish.
    for id in sqlx::query_scalar::<_, String>("SELECT id FROM builds WHERE id LIKE 'warm-%'")
        .fetch_all(&pool)
        .await
        .unwrap()
    {
        kiln::db::builds::finish(&pool, &id, &kiln::db::builds::Outcome::Success)
            .await
            .unwrap();
    }
    let (elapsed, latencies) = assign_with(&app, builds, Assignment::Ready, 1).await;
    report(
        "warm (idle builder), one at a time",
        elapsed,
        latencies,
        None,
    );
}
