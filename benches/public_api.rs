//! Public API benchmarks, server-side: requests go through Kiln's whole HTTP router in
//! process (Connect decoding, authentication, authorization, the domain call, the
//! queries, encoding), so the figures exclude only the network.
//!
//! - ListBuilds (`depot.core.v1.BuildService`) on a project with 100,000 builds, page
//!   size 50: the first page and pages deep into the listing, each fetched with the
//!   previous page's token (keyset pages must cost the same everywhere).
//! - GetBuildSteps (`depot.build.v1.BuildService`) of a build with 1,000 steps, page size
//!   50, first and last pages, in the same project.
//! - GetUsage (`depot.core.v1.UsageService`) over a month holding 1,000,000 finished
//!   builds in 50 projects, read from the hourly aggregate; beside it, the same figures
//!   computed by scanning the builds, in the same run.
//! - FinishBuild's cost of keeping the aggregates (step counts, time saved, hourly usage)
//!   for builds of 20 steps, in that database.
//!
//! Env: BENCH_DATABASE_URL (an empty database), BENCH_ITERATIONS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use kiln::auth::TokenKind;
use kiln::auth::token::NewToken;
use kiln::config::Config;
use kiln::proto::depot::build::v1 as build;
use kiln::proto::depot::core::v1 as core;
use prost::Message;
use tower::ServiceExt;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(label: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.50);
    let p99 = percentile(samples, 0.99);
    let max = percentile(samples, 1.0);
    println!(
        "{label:<58} n={:<5} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        samples.len(),
        ms(p50),
        ms(p99),
        ms(max)
    );
}

struct Client {
    router: axum::Router,
    token: String,
}

impl Client {
    async fn call<Req: Message, Resp: Message + Default>(&self, method: &str, req: &Req) -> Resp {
        let request = axum::http::Request::builder()
            .method("POST")
            .uri(format!("/{method}"))
            .header("content-type", "application/proto")
            .header("authorization", format!("Bearer {}", self.token))
            .body(Body::from(req.encode_to_vec()))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            status.is_success(),
            "{method}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        Resp::decode(body).unwrap()
    }
}

async fn timed<F, Fut, T>(iterations: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    // Warm the statement cache and the connection pool first.
    for _ in 0..iterations.min(20) {
        f().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        std::hint::black_box(f().await);
        samples.push(start.elapsed());
    }
    samples
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("BENCH_DATABASE_URL").expect("BENCH_DATABASE_URL");
    let iterations: usize = env("BENCH_ITERATIONS", "500").parse().unwrap();
    let config = Config::load_from(
        None,
        vec![
            ("KILN_DATABASE__URL".to_string(), url.clone()),
            ("KILN_LOG__FILTER".to_string(), "warn".to_string()),
        ],
    )
    .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    kiln::db::MIGRATOR.run(&pool).await.unwrap();
    let app = kiln::app::App::new(config, pool.clone());
    app.mark_migrated();
    let operator = kiln::auth::Principal::operator("bench");

    let (org, owner) = app
        .orgs
        .create(&operator, "bench", Some("bench@kiln.test"))
        .await
        .unwrap();
    let mut new = NewToken::new(TokenKind::User, "bench");
    new.user_id = Some(owner.unwrap().id);
    let token = app.tokens.create(&operator, new).await.unwrap().1;
    let mut projects = Vec::new();
    for i in 0..50 {
        let settings = kiln::projects::ProjectSettings {
            name: Some(format!("project-{i:02}")),
            ..Default::default()
        };
        projects.push(
            app.projects
                .create(&operator, Some(&org.id), settings)
                .await
                .unwrap()
                .id,
        );
    }
    let big = projects[0].clone();

    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().unwrap(),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next().map(str::to_string))
            .unwrap_or_default()
    );
    let seeding = Instant::now();
    // 1,000,000 finished builds over the last 30 days in 50 projects; the first project
    // holds 100,000 of them. Seeded in bulk, with the hourly aggregate built from them as
    // finishing each build would have (FinishBuild's cost is measured below).
    sqlx::query(
        "INSERT INTO builds (id, project_id, organization_id, state, created_at, started_at,
                             finished_at, cancels_at, total_steps, cached_steps, saved_seconds)
         SELECT 'bench' || n, p.ids[CASE WHEN n <= 100000 THEN 1 ELSE 2 + n % 49 END], $2, 'success',
                now() - make_interval(secs => n * 2.592) - interval '5 minutes',
                now() - make_interval(secs => n * 2.592) - interval '4 minutes',
                now() - make_interval(secs => n * 2.592) - interval '1 minute',
                now() + interval '1 hour', 20, 8, 45
         FROM generate_series(1, 1000000) n, (SELECT $1::text[] AS ids) p",
    )
    .bind(&projects)
    .bind(&org.id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_hourly (project_id, organization_id, hour, build_count, build_seconds, saved_seconds)
         SELECT project_id, organization_id, date_trunc('hour', finished_at, 'UTC'), count(*),
                sum(EXTRACT(EPOCH FROM finished_at - started_at))::bigint, sum(saved_seconds)
         FROM builds GROUP BY 1, 2, 3",
    )
    .execute(&pool)
    .await
    .unwrap();
    // A build of the big project with 1,000 steps.
    sqlx::query(
        "INSERT INTO build_steps (build_id, digest, name, cached, started_at, completed_at)
         SELECT 'bench1', 'sha256:' || lpad(n::text, 64, '0'), '[' || n || '/1000] RUN make part-' || n,
                n % 3 = 0, now() - interval '4 minutes', now() - interval '3 minutes'
         FROM generate_series(1, 1000) n ORDER BY n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    println!(
        "seeded 1,000,000 builds (100,000 in one project) in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );

    let client = Arc::new(Client {
        router: kiln::api::router(app.clone()),
        token,
    });

    // ListBuilds: walk to pages 1, 10, 100, 1,000 and 2,000 (the last), keeping each
    // page's token, then time fetching exactly that page.
    let mut tokens = vec![(1usize, None::<String>)];
    let mut next: Option<String> = None;
    for page in 1..=2000usize {
        let reply: core::ListBuildsResponse = client
            .call(
                "depot.core.v1.BuildService/ListBuilds",
                &core::ListBuildsRequest {
                    project_id: big.clone(),
                    page_size: Some(50),
                    page_token: next.clone(),
                },
            )
            .await;
        assert_eq!(reply.builds.len(), 50, "page {page}");
        if [9, 99, 999, 1999].contains(&page) {
            tokens.push((page + 1, Some(reply.next_page_token.clone())));
        }
        next = Some(reply.next_page_token);
    }
    for (page, token) in &tokens {
        let mut samples = timed(iterations, || {
            let client = client.clone();
            let request = core::ListBuildsRequest {
                project_id: big.clone(),
                page_size: Some(50),
                page_token: token.clone(),
            };
            async move {
                let reply: core::ListBuildsResponse = client
                    .call("depot.core.v1.BuildService/ListBuilds", &request)
                    .await;
                reply.builds.len()
            }
        })
        .await;
        report(
            &format!("ListBuilds, 100,000 builds, page size 50, page {page}"),
            &mut samples,
        );
    }

    // GetBuildSteps: first and last of 20 pages.
    let mut step_token = None;
    let mut last_token = None;
    for _ in 0..19 {
        let reply: build::GetBuildStepsResponse = client
            .call(
                "depot.build.v1.BuildService/GetBuildSteps",
                &build::GetBuildStepsRequest {
                    project_id: big.clone(),
                    build_id: "bench1".into(),
                    page_size: Some(50),
                    page_token: step_token.clone(),
                },
            )
            .await;
        step_token = reply.next_page_token;
        last_token = step_token.clone();
    }
    for (page, token) in [(1, None), (20, last_token)] {
        let mut samples = timed(iterations, || {
            let client = client.clone();
            let request = build::GetBuildStepsRequest {
                project_id: big.clone(),
                build_id: "bench1".into(),
                page_size: Some(50),
                page_token: token.clone(),
            };
            async move {
                let reply: build::GetBuildStepsResponse = client
                    .call("depot.build.v1.BuildService/GetBuildSteps", &request)
                    .await;
                assert_eq!(reply.build_steps.len(), 50);
            }
        })
        .await;
        report(
            &format!("GetBuildSteps, 1,000 steps, page size 50, page {page}"),
            &mut samples,
        );
    }

    // GetUsage over the month, from the aggregate; and the same by scanning builds.
    let now = chrono::Utc::now();
    let start = now - chrono::Duration::days(31);
    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let request = core::GetUsageRequest {
        start_at: Some(ts(start)),
        end_at: Some(ts(now)),
    };
    let reply: core::GetUsageResponse = client
        .call("depot.core.v1.UsageService/GetUsage", &request)
        .await;
    let counted: i64 = reply
        .container_build
        .iter()
        .map(|p| i64::from(p.build_count))
        .sum();
    assert_eq!(
        counted, 1_000_000,
        "GetUsage counts every build of the month"
    );
    let mut samples = timed(iterations.min(200), || {
        let client = client.clone();
        async move {
            let reply: core::GetUsageResponse = client
                .call("depot.core.v1.UsageService/GetUsage", &request)
                .await;
            reply.container_build.len()
        }
    })
    .await;
    report(
        "GetUsage, a month of 1,000,000 builds (hourly aggregate)",
        &mut samples,
    );
    let mut samples = timed(10, || {
        let pool = pool.clone();
        let org_id = org.id.clone();
        async move {
            let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT project_id, count(*),
                        sum(EXTRACT(EPOCH FROM finished_at - started_at))::bigint
                 FROM builds WHERE organization_id = $1 AND finished_at >= $2 AND finished_at < $3
                 GROUP BY project_id",
            )
            .bind(&org_id)
            .bind(start)
            .bind(now)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.len()
        }
    })
    .await;
    report(
        "  the same figures by scanning the builds (SQL only)",
        &mut samples,
    );

    // FinishBuild's upkeep of the aggregates: builds of 20 steps, finished one by one.
    let mut samples = Vec::new();
    for i in 0..200 {
        let id = format!("fin{i}");
        sqlx::query(
            "INSERT INTO builds (id, project_id, organization_id, state, started_at, cancels_at)
             VALUES ($1, $2, $3, 'running', now() - interval '2 minutes', now() + interval '1 hour')",
        )
        .bind(&id)
        .bind(&projects[1])
        .bind(&org.id)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO build_steps (build_id, digest, name, cached, started_at, completed_at)
             SELECT $1, 'sha256:' || ($2 * 100 + n % 30), 'step ' || n, n % 2 = 0,
                    now() - interval '90 seconds', now() - interval '60 seconds'
             FROM generate_series(1, 20) n",
        )
        .bind(&id)
        .bind(i % 5)
        .execute(&pool)
        .await
        .unwrap();
        let start = Instant::now();
        kiln::db::builds::finish(&pool, &id, &kiln::db::builds::Outcome::Success)
            .await
            .unwrap();
        samples.push(start.elapsed());
    }
    report(
        "FinishBuild's database transaction, 20 steps, with aggregates",
        &mut samples,
    );
}
