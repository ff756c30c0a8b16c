//! Claim → token latency of the fork pull request flow against a running `kiln serve`
//! (started by scripts/bench-oidc.sh): POST /claim, then POST <exchangeURL> until 200,
//! with a GitHub stand-in in this process that already shows the challenge code in the
//! job's live log. The stand-in's own handling time is measured per claim and subtracted,
//! so the figure is Kiln's: its GitHub calls' round trips over loopback, the database,
//! signing.
//!
//! Env: BENCH_URL (kiln), BENCH_GITHUB_PORT (where Kiln's oidc.github.api_url points),
//! BENCH_ITERATIONS (default 300).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Default)]
struct Stand {
    /// Challenge code per run id.
    codes: HashMap<u64, String>,
    /// Time spent answering, and calls, per run id.
    spent: HashMap<u64, (Duration, u32)>,
}

type Shared = Arc<Mutex<Stand>>;

fn run(id: u64) -> Value {
    json!({
        "id": id, "name": "CI", "event": "pull_request", "status": "in_progress",
        "head_branch": "feature", "head_sha": "0123456789abcdef0123456789abcdef01234567",
        "run_number": 1, "run_attempt": 1,
        "actor": {"login": "fork-user", "id": 1001}, "triggering_actor": {"login": "fork-user", "id": 1001},
        "repository": {"id": 74, "full_name": "octo-org/octo-repo", "private": false,
                       "visibility": "public", "owner": {"login": "octo-org", "id": 65}},
        "head_repository": {"id": 75, "full_name": "fork-user/octo-repo", "private": false,
                            "owner": {"login": "fork-user", "id": 1001}}
    })
}

async fn github(State(stand): State<Shared>, req: Request) -> Response {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // The run id follows "runs" in every path Kiln asks for.
    let run_id: u64 = parts
        .iter()
        .position(|p| *p == "runs")
        .and_then(|i| parts.get(i + 1))
        .and_then(|id| id.parse().ok())
        .unwrap_or(0);
    let answer = match parts.as_slice() {
        ["repos", _, _, "actions", "runs", _] | ["repos", _, _, "actions", "runs", _, "attempts", _] => {
            axum::Json(run(run_id)).into_response()
        }
        ["repos", _, _, "actions", "runs", _, "attempts", _, "jobs"] => axum::Json(json!({
            "total_count": 1,
            "jobs": [{"id": run_id * 10, "status": "in_progress"}]
        }))
        .into_response(),
        ["repos", _, _, "actions", "runs", _, "artifacts"] => {
            axum::Json(json!({"total_count": 0, "artifacts": []})).into_response()
        }
        ["repos", _, _, "pulls"] => axum::Json(json!([{
            "number": 9, "head": {"ref": "feature", "sha": "0123456789abcdef0123456789abcdef01234567"},
            "base": {"ref": "main", "sha": "f"}
        }]))
        .into_response(),
        [o, r, "actions", "runs", id, "job", job] => format!(
            "<a href=\"/{o}/{r}/actions/runs/{id}/jobs/x{job}/steps/3/backscroll\">"
        )
        .into_response(),
        [_, _, "actions", "runs", _, "jobs", _, "steps"] => {
            axum::Json(json!([{"id": "3", "status": "in_progress"}])).into_response()
        }
        [_, _, "actions", "runs", _, "jobs", _, "steps", _, "backscroll"] => {
            let code = stand.lock().unwrap().codes.get(&run_id).cloned().unwrap_or_default();
            axum::Json(json!({"lines": [{"line": format!("Waiting for OIDC auth challenge {code}")}]}))
                .into_response()
        }
        _ => (axum::http::StatusCode::NOT_FOUND, "{}").into_response(),
    };
    let mut s = stand.lock().unwrap();
    let entry = s.spent.entry(run_id).or_default();
    entry.0 += started.elapsed();
    entry.1 += 1;
    answer
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let url = std::env::var("BENCH_URL").expect("BENCH_URL");
    let port: u16 = std::env::var("BENCH_GITHUB_PORT")
        .expect("BENCH_GITHUB_PORT")
        .parse()
        .unwrap();
    let iterations: u64 = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let stand: Shared = Arc::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let router = axum::Router::new()
        .fallback(github)
        .with_state(stand.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let http = reqwest::Client::new();

    let mut total = Vec::new();
    let mut kiln_only = Vec::new();
    let mut calls = Vec::new();
    let mut polls = 0u64;
    for i in 0..iterations + 20 {
        let run_id = 1_000 + i;
        let started = Instant::now();
        let created: Value = http
            .post(format!("{url}/claim"))
            .json(&json!({"aud": "https://depot.dev", "eventName": "pull_request",
                          "repo": "octo-org/octo-repo", "runID": run_id.to_string(), "attempt": "1"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let code = created["challengeCode"]
            .as_str()
            .unwrap_or_else(|| panic!("{created}"));
        // The claimant prints the code at once; GitHub shows it in the live log.
        stand.lock().unwrap().codes.insert(run_id, code.to_string());
        let exchange = created["exchangeURL"].as_str().unwrap();
        loop {
            polls += 1;
            let answer = http
                .post(exchange)
                .header("content-length", "0")
                .send()
                .await
                .unwrap();
            match answer.status().as_u16() {
                200 => break,
                202 => tokio::time::sleep(Duration::from_millis(10)).await,
                other => panic!(
                    "exchange answered {other}: {}",
                    answer.text().await.unwrap()
                ),
            }
        }
        let elapsed = started.elapsed();
        if i < 20 {
            continue; // warm-up: connections, key load
        }
        let (spent, n) = stand
            .lock()
            .unwrap()
            .spent
            .get(&run_id)
            .copied()
            .unwrap_or_default();
        total.push(elapsed.as_secs_f64() * 1000.0);
        kiln_only.push((elapsed.saturating_sub(spent)).as_secs_f64() * 1000.0);
        calls.push(n);
    }
    for series in [&mut total, &mut kiln_only] {
        series.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let mean_calls = calls.iter().map(|c| *c as f64).sum::<f64>() / calls.len() as f64;
    println!(
        "claim -> token, {iterations} claims, log proof, {:.1} GitHub calls each by run (plus the \
         pull request lookup, not subtracted), {:.2} exchanges each",
        mean_calls,
        polls as f64 / (iterations + 20) as f64
    );
    for (name, s) in [("total", &total), ("excluding GitHub stand-in", &kiln_only)] {
        println!(
            "  {name}: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(s, 0.5),
            percentile(s, 0.9),
            percentile(s, 0.99),
            s[s.len() - 1]
        );
    }
}
