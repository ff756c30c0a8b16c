//! What a request with a CI provider's OIDC token pays to find which projects trust it,
//! against PostgreSQL (scripts/bench-ci-trust.sh starts one): building the principal
//! (`auth::ci::principal`: the trusting projects for listings and the default project)
//! and confirming the project the request names (`auth::ci::confirm`), with other
//! organizations' policies naming the same repository (0, 1,000 and 100,000 of them) on
//! top of 10,000 unrelated ones.
//!
//! Env: BENCH_DB_URL (an empty database), BENCH_ITERATIONS (default 2,000), BENCH_TASKS
//! (concurrent requests, default 4).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::auth::ci;
use kiln::config::TrustedProvider;
use kiln::oidc::trusted::CiToken;
use kiln::oidc::verify::Verified;
use serde_json::json;
use sqlx::PgPool;

const ISSUER: &str = "https://token.actions.githubusercontent.com";

fn token(n: usize) -> CiToken {
    let claims = json!({
        "sub": "repo:octo-org/octo-repo:ref:refs/heads/main",
        "repository": "octo-org/octo-repo", "repository_id": "74",
        "repository_owner": "octo-org", "ref": "refs/heads/main",
    });
    CiToken {
        issuer: ISSUER.into(),
        policy_issuer: ISSUER.into(),
        provider: TrustedProvider::Github,
        verified: Verified {
            kid: "k".into(),
            jti: format!("jti-{n}"),
            expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
            accepted_until: chrono::Utc::now() + chrono::Duration::minutes(6),
            claims: claims.as_object().unwrap().clone(),
        },
        replayed: false,
    }
}

/// Inserts `projects` projects of a new organization, each with `per_project` policies
/// (GitHub, `repository` under ids "", "1", "2", ...). Returns the project ids.
async fn seed(
    pool: &PgPool,
    label: &str,
    projects: usize,
    per_project: usize,
    repository: &str,
) -> Vec<String> {
    let org = kiln::db::ids::new_id();
    sqlx::query("INSERT INTO organizations (id, name) VALUES ($1, $2)")
        .bind(&org)
        .bind(label)
        .execute(pool)
        .await
        .unwrap();
    let ids: Vec<String> = (0..projects).map(|_| kiln::db::ids::new_id()).collect();
    sqlx::query(
        "INSERT INTO projects (id, organization_id, name)
         SELECT id, $2, $3 || ord FROM unnest($1::text[]) WITH ORDINALITY AS p(id, ord)",
    )
    .bind(&ids)
    .bind(&org)
    .bind(format!("{label}-"))
    .execute(pool)
    .await
    .unwrap();
    let (owner, name) = repository.split_once('/').unwrap();
    sqlx::query(
        "INSERT INTO trust_policies (id, project_id, provider, issuer, claims, match_key)
         SELECT md5(random()::text), p.id, 'github', $2,
                jsonb_build_object('repository_owner', $3::text, 'repository', $4::text,
                                   'repository_id', CASE WHEN n = 0 THEN '' ELSE n::text END),
                lower($3 || '/' || $4)
         FROM unnest($1::text[]) AS p(id), generate_series(0, $5 - 1) AS n",
    )
    .bind(&ids)
    .bind(ISSUER)
    .bind(owner)
    .bind(name)
    .bind(per_project as i32)
    .execute(pool)
    .await
    .unwrap();
    ids
}

async fn measure(
    pool: &PgPool,
    victim: &str,
    iterations: usize,
    tasks: usize,
) -> (Duration, Duration, f64) {
    let pool = Arc::new(pool.clone());
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let pool = pool.clone();
            let victim = victim.to_string();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(iterations / tasks);
                for i in 0..iterations / tasks {
                    let at = Instant::now();
                    let principal = ci::principal(&pool, token(t * iterations + i))
                        .await
                        .unwrap();
                    let mut conn = pool.acquire().await.unwrap();
                    ci::confirm(&mut conn, &principal, &victim).await.unwrap();
                    assert!(principal.ci.as_ref().unwrap().trusts(&victim));
                    times.push(at.elapsed());
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (p(0.5), p(0.99), all.len() as f64 / elapsed.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let url = std::env::var("BENCH_DB_URL").expect("BENCH_DB_URL");
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let tasks: usize = std::env::var("BENCH_TASKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(tasks as u32 + 2)
        .connect(&url)
        .await
        .unwrap();
    kiln::db::MIGRATOR.run(&pool).await.unwrap();
    // 10,000 policies of other repositories, and the victim's one project.
    seed(&pool, "others", 100, 100, "other-org/other-repo").await;
    let victim = seed(&pool, "victim", 1, 1, "octo-org/octo-repo")
        .await
        .remove(0);
    println!(
        "| foreign policies naming the repository | p50 | p99 | requests/s ({tasks} at once) |"
    );
    println!("|---|---|---|---|");
    let mut foreign = 0;
    for target in [0usize, 1_000, 100_000] {
        if target > foreign {
            seed(
                &pool,
                &format!("flood{target}"),
                (target - foreign) / 100,
                100,
                "octo-org/octo-repo",
            )
            .await;
            foreign = target;
        }
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
        let (p50, p99, rate) = measure(&pool, &victim, iterations, tasks).await;
        println!(
            "| {target} | {:.2} ms | {:.2} ms | {rate:.0} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
}
