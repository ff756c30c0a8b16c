//! Dashboard benchmarks, server-side: each page is requested through Kiln's whole HTTP
//! router in process with a signed-in session cookie (session check, authorization, the
//! queries, rendering), so the figures exclude only the network and the browser.
//!
//! The project holds 1,000 builds (mixed states), 20 tokens and 4 trust relationships;
//! its organization has 50 projects. Pages: the project list, the project page, the
//! build list (first page, and filtered by status), a build of 40 steps with logs and a
//! heavy one (300 steps, 60,000 log lines of 2,000 characters), usage and the
//! operations page. Timed as a browser asks (gzip accepted); sizes before and after. Each page's size is reported too, with the stylesheet and
//! script every page loads (served once, cached as immutable).
//!
//! Env: BENCH_DATABASE_URL (an empty database), BENCH_ITERATIONS.

use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use kiln::config::Config;
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

/// One GET with the session cookie: (status, body length, body).
async fn get(router: &axum::Router, path: &str, cookie: &str) -> (u16, usize, String) {
    get_with(router, path, cookie, "identity").await
}

/// One GET as a browser sends it, with `Accept-Encoding`.
async fn get_with(
    router: &axum::Router,
    path: &str,
    cookie: &str,
    encoding: &str,
) -> (u16, usize, String) {
    let request = axum::http::Request::builder()
        .uri(path)
        .header("cookie", cookie)
        .header("accept-encoding", encoding)
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        body.len(),
        String::from_utf8_lossy(&body).into_owned(),
    )
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
            (
                "KILN_SECRETS__KEY_ENCRYPTION_KEY".to_string(),
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string(),
            ),
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
    let user = owner.unwrap();
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
    let project = projects[0].clone();
    for i in 0..20 {
        app.tokens
            .create_project_token(&operator, Some(&project), &format!("ci {i}"), None)
            .await
            .unwrap();
    }
    for repository in ["web", "api", "docs", "infra"] {
        app.projects
            .add_trust_policy(
                &operator,
                Some(&project),
                kiln::auth::trust::TrustProvider::GitHub {
                    repository_owner: "acme".into(),
                    repository: repository.into(),
                    repository_id: String::new(),
                    issuer: String::new(),
                },
            )
            .await
            .unwrap();
    }
    // 1,000 builds over the last 30 days, one in six failed, the newest still running;
    // 10 builds in each other project.
    sqlx::query(
        "INSERT INTO builds (id, project_id, organization_id, state, created_by, created_at,
                             started_at, finished_at, cancels_at, total_steps, cached_steps,
                             saved_seconds, error)
         SELECT 'bench' || n, $1, $2,
                CASE WHEN n = 1 THEN 'running' WHEN n % 6 = 0 THEN 'failed' ELSE 'success' END,
                'tok_' || (n % 20),
                now() - make_interval(secs => n * 2592) - interval '5 minutes',
                now() - make_interval(secs => n * 2592) - interval '4 minutes',
                CASE WHEN n = 1 THEN NULL ELSE now() - make_interval(secs => n * 2592) - interval '1 minute' END,
                now() + interval '1 hour', 40, 25, 90,
                CASE WHEN n % 6 = 0 THEN 'process \"/bin/sh -c make\" did not complete successfully: exit code: 2' END
         FROM generate_series(1, 1000) n",
    )
    .bind(&project)
    .bind(&org.id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO builds (id, project_id, organization_id, state, created_at, started_at,
                             finished_at, cancels_at)
         SELECT 'other' || p || '-' || n, ids[p], $2, 'success', now() - make_interval(mins => n),
                now() - make_interval(mins => n), now(), now() + interval '1 hour'
         FROM generate_series(2, 50) p, generate_series(1, 10) n, (SELECT $1::text[] AS ids) x",
    )
    .bind(&projects)
    .bind(&org.id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_hourly (project_id, organization_id, hour, build_count, build_seconds, saved_seconds)
         SELECT project_id, organization_id, date_trunc('hour', finished_at, 'UTC'), count(*),
                sum(EXTRACT(EPOCH FROM finished_at - started_at))::bigint, COALESCE(sum(saved_seconds), 0)
         FROM builds WHERE finished_at IS NOT NULL GROUP BY 1, 2, 3",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The newest finished build: 40 steps, each with 30 lines of log.
    sqlx::query(
        "INSERT INTO build_steps (build_id, digest, name, cached, started_at, completed_at, log_lines)
         SELECT 'bench2', 'sha256:' || lpad(n::text, 64, '0'), '[' || n || '/40] RUN make part-' || n,
                n % 3 = 0, now() - interval '5 minutes' + make_interval(secs => n * 5),
                now() - interval '5 minutes' + make_interval(secs => n * 5 + 4),
                CASE WHEN n % 3 = 0 THEN 0 ELSE 30 END
         FROM generate_series(1, 40) n ORDER BY n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO build_step_logs (build_id, digest, seq, at, message)
         SELECT 'bench2', 'sha256:' || lpad(n::text, 64, '0'), l, now(),
                'cc -O2 -c src/part' || n || '/file' || l || '.c -o build/part' || n || '/file' || l || '.o'
         FROM generate_series(1, 40) n, generate_series(1, 30) l WHERE n % 3 <> 0",
    )
    .execute(&pool)
    .await
    .unwrap();
    // A heavy build: 300 steps, each logging 200 lines of 2,000 characters.
    sqlx::query(
        "INSERT INTO build_steps (build_id, digest, name, cached, started_at, completed_at, log_lines)
         SELECT 'bench3', 'sha256:' || lpad(n::text, 64, '0'), '[' || n || '/300] RUN ./build.sh stage-' || n,
                false, now() - interval '30 minutes' + make_interval(secs => n * 5),
                now() - interval '30 minutes' + make_interval(secs => n * 5 + 4), 200
         FROM generate_series(1, 300) n ORDER BY n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO build_step_logs (build_id, digest, seq, at, message)
         SELECT 'bench3', 'sha256:' || lpad(n::text, 64, '0'), l, now(), repeat(md5(n::text || l::text), 62)
         FROM generate_series(1, 300) n, generate_series(1, 200) l",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();

    let secret = kiln::auth::web::start_session(&pool, &user, chrono::Duration::hours(1))
        .await
        .unwrap();
    let cookie = format!("kiln_session={secret}");
    let router = kiln::api::router(app.clone());
    println!(
        "machine: {} cores; project with 1,000 builds, 20 tokens, 4 trust relationships; 50 projects",
        std::thread::available_parallelism().unwrap()
    );

    let index = get(&router, "/dashboard", &cookie).await.2;
    let asset = |kind: &str| {
        let start = index.find(&format!("/dashboard/assets/{kind}")).unwrap();
        index[start..start + index[start..].find('"').unwrap()].to_string()
    };
    let css = asset("app.");
    let builds_page = get(
        &router,
        &format!("/dashboard/projects/{project}/builds"),
        &cookie,
    )
    .await
    .2;
    let js = {
        let start = builds_page.find("/dashboard/assets/live.").unwrap();
        builds_page[start..start + builds_page[start..].find('"').unwrap()].to_string()
    };
    let (_, css_bytes, _) = get(&router, &css, &cookie).await;
    let (_, js_bytes, _) = get(&router, &js, &cookie).await;
    println!("stylesheet {css_bytes} B, live-list script {js_bytes} B (each cached as immutable)");

    let pages = [
        ("project list (50 projects)", "/dashboard".to_string()),
        (
            "project page (1,000 builds)",
            format!("/dashboard/projects/{project}"),
        ),
        (
            "build list, first page (1,000 builds)",
            format!("/dashboard/projects/{project}/builds"),
        ),
        (
            "build list, status=failed",
            format!("/dashboard/projects/{project}/builds?status=failed"),
        ),
        (
            "build page (40 steps, 810 log lines)",
            format!("/dashboard/projects/{project}/builds/bench2"),
        ),
        (
            "build page (300 steps, 60,000 long lines)",
            format!("/dashboard/projects/{project}/builds/bench3"),
        ),
        (
            "usage (30 days)",
            format!("/dashboard/projects/{project}/usage"),
        ),
        (
            "operations (audit log)",
            format!("/dashboard/organizations/{}/operations", org.id),
        ),
    ];
    for (label, path) in &pages {
        let (status, bytes, body) = get(&router, path, &cookie).await;
        assert_eq!(status, 200, "{path}: {body}");
        let (_, sent, _) = get_with(&router, path, &cookie, "gzip").await;
        for _ in 0..20 {
            get_with(&router, path, &cookie, "gzip").await;
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let start = Instant::now();
            std::hint::black_box(get_with(&router, path, &cookie, "gzip").await);
            samples.push(start.elapsed());
        }
        let p50 = percentile(&mut samples, 0.50);
        let p99 = percentile(&mut samples, 0.99);
        let max = percentile(&mut samples, 1.0);
        println!(
            "{label:<42} n={:<4} p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms  page {:>6.1} KB, {:>5.1} KB sent",
            samples.len(),
            ms(p50),
            ms(p99),
            ms(max),
            bytes as f64 / 1024.0,
            sent as f64 / 1024.0
        );
    }
}
