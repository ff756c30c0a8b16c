//! A stand-in for the parts of GitHub that Kiln's fork pull request issuer reads: workflow
//! runs, their jobs, artifacts and pull requests (REST), and the web UI's live job log
//! ("backscroll"), which needs a session cookie. Responses follow GitHub's schemas for the
//! fields Kiln reads.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const WEB_SESSION: &str = "stand-in-session-cookie";

#[derive(Default)]
struct Stand {
    /// By (lowercase owner/name, run id).
    runs: HashMap<(String, u64), Value>,
    jobs: HashMap<u64, Vec<Value>>,
    /// Per job: lines with the time they become visible.
    logs: HashMap<u64, Vec<(Instant, String)>>,
    artifacts: HashMap<u64, Vec<Value>>,
    pulls: HashMap<String, Vec<Value>>,
    /// Answer every REST call with this status (GitHub down or rate limited).
    failing: Option<u16>,
    requests: u64,
    /// The jobs whose web page was read, in order.
    job_pages: Vec<u64>,
}

#[derive(Clone)]
pub struct GitHub {
    pub url: String,
    stand: Arc<Mutex<Stand>>,
    _server: Arc<tokio::task::JoinHandle<()>>,
}

/// A fork pull request run of `octo-org/octo-repo` from `fork-user/octo-repo`, in progress,
/// with one running job (`run_id * 10`).
pub fn fork_run(run_id: u64) -> Value {
    json!({
        "id": run_id, "name": "CI", "event": "pull_request", "status": "in_progress",
        "conclusion": null, "head_branch": "feature",
        "head_sha": "0123456789abcdef0123456789abcdef01234567",
        "path": ".github/workflows/ci.yml", "run_number": 17, "run_attempt": 1,
        "workflow_id": 99, "pull_requests": [],
        "actor": {"login": "fork-user", "id": 1001, "type": "User"},
        "triggering_actor": {"login": "fork-user", "id": 1001, "type": "User"},
        "repository": {"id": 74, "name": "octo-repo", "full_name": "octo-org/octo-repo",
            "private": false, "visibility": "public", "fork": false,
            "owner": {"login": "octo-org", "id": 65, "type": "Organization"}},
        "head_repository": {"id": 75, "name": "octo-repo", "full_name": "fork-user/octo-repo",
            "private": false, "fork": true,
            "owner": {"login": "fork-user", "id": 1001, "type": "User"}},
        "head_repository_id": 75
    })
}

impl GitHub {
    pub async fn start() -> GitHub {
        let stand = Arc::new(Mutex::new(Stand::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .fallback(answer)
            .with_state(stand.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        GitHub {
            url,
            stand,
            _server: Arc::new(server),
        }
    }

    /// Kiln's settings that point at this stand-in, log and artifact proofs on.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KILN_OIDC__GITHUB__API_URL", self.url.clone()),
            ("KILN_OIDC__GITHUB__WEB_URL", self.url.clone()),
            ("KILN_OIDC__GITHUB__WEB_SESSION", WEB_SESSION.to_string()),
        ]
    }

    /// Adds a run with one in-progress job `run.id * 10` (whose step 3 is running), and an
    /// open pull request #9 for its head.
    pub fn add_run(&self, run: Value) {
        let id = run["id"].as_u64().unwrap();
        let full = run["repository"]["full_name"]
            .as_str()
            .unwrap()
            .to_lowercase();
        let mut s = self.stand.lock().unwrap();
        s.jobs.insert(
            id,
            vec![json!({
                "id": id * 10, "run_id": id, "run_attempt": run["run_attempt"],
                "head_sha": run["head_sha"], "status": "in_progress", "conclusion": null,
                "name": "build", "workflow_name": "CI",
                "steps": [{"name": "Build", "status": "in_progress", "conclusion": null, "number": 3}]
            })],
        );
        s.pulls.entry(full.clone()).or_default().push(json!({
            "number": 9, "state": "open",
            "head": {"ref": run["head_branch"], "sha": run["head_sha"],
                     "repo": run["head_repository"]},
            "base": {"ref": "main", "sha": "fedcba9876543210fedcba9876543210fedcba98",
                     "repo": run["repository"]},
        }));
        s.runs.insert((full, id), run);
    }

    /// Adds `n` more in-progress jobs to run `run_id` (ids `run_id * 10 + 1 ..= + n`), each
    /// with a running step.
    pub fn add_running_jobs(&self, run_id: u64, n: u64) {
        let mut s = self.stand.lock().unwrap();
        let jobs = s.jobs.entry(run_id).or_default();
        for k in 1..=n {
            jobs.push(json!({
                "id": run_id * 10 + k, "run_id": run_id, "run_attempt": 1,
                "status": "in_progress", "conclusion": null, "name": format!("matrix {k}"),
                "steps": [{"name": "Test", "status": "in_progress", "conclusion": null, "number": 3}]
            }));
        }
    }

    /// The jobs whose live log pages were read, in order.
    pub fn job_pages_read(&self) -> Vec<u64> {
        self.stand.lock().unwrap().job_pages.clone()
    }

    /// Changes a stored run.
    pub fn update_run(&self, repository: &str, id: u64, change: impl FnOnce(&mut Value)) {
        let mut s = self.stand.lock().unwrap();
        change(s.runs.get_mut(&(repository.to_lowercase(), id)).unwrap());
    }

    /// Adds a line to job `job_id`'s live log, visible after `after`.
    pub fn log(&self, job_id: u64, line: &str, after: Duration) {
        self.stand
            .lock()
            .unwrap()
            .logs
            .entry(job_id)
            .or_default()
            .push((Instant::now() + after, line.to_string()));
    }

    /// Lists an artifact on run `run_id`, tied to `workflow_run` as GitHub reports it.
    pub fn artifact(&self, run_id: u64, name: &str, workflow_run: Value) {
        self.stand
            .lock()
            .unwrap()
            .artifacts
            .entry(run_id)
            .or_default()
            .push(json!({
                "id": 1, "name": name, "size_in_bytes": 0, "expired": false,
                "digest": "sha256:0", "workflow_run": workflow_run
            }));
    }

    pub fn fail_with(&self, status: Option<u16>) {
        self.stand.lock().unwrap().failing = status;
    }

    pub fn requests(&self) -> u64 {
        self.stand.lock().unwrap().requests
    }
}

fn json_response(value: Value) -> Response {
    axum::Json(value).into_response()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"message": "Not Found", "status": "404"})),
    )
        .into_response()
}

async fn answer(State(stand): State<Arc<Mutex<Stand>>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers = req.headers().clone();
    let mut s = stand.lock().unwrap();
    s.requests += 1;
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if parts.first() == Some(&"repos") {
        if headers.get("user-agent").is_none() {
            return (StatusCode::FORBIDDEN, "GitHub needs a User-Agent").into_response();
        }
        if let Some(status) = s.failing {
            return (
                StatusCode::from_u16(status).unwrap(),
                [("retry-after", "1")],
                axum::Json(json!({"message": "unavailable"})),
            )
                .into_response();
        }
        let repo = format!(
            "{}/{}",
            parts.get(1).unwrap_or(&""),
            parts.get(2).unwrap_or(&"")
        )
        .to_lowercase();
        let run = |s: &Stand, id: &str| -> Option<Value> {
            s.runs.get(&(repo.clone(), id.parse().ok()?)).cloned()
        };
        return match &parts[3..] {
            ["actions", "runs", id] => run(&s, id).map_or_else(not_found, json_response),
            ["actions", "runs", id, "attempts", n] => match run(&s, id) {
                Some(r) if r["run_attempt"].as_u64() == n.parse().ok() => json_response(r),
                _ => not_found(),
            },
            ["actions", "runs", id, "attempts", _, "jobs"] => {
                let jobs = id
                    .parse::<u64>()
                    .ok()
                    .and_then(|id| s.jobs.get(&id).cloned())
                    .unwrap_or_default();
                json_response(json!({"total_count": jobs.len(), "jobs": jobs}))
            }
            ["actions", "runs", id, "artifacts"] => {
                let name = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("name="))
                    .unwrap_or("")
                    .to_string();
                let listed: Vec<Value> = id
                    .parse::<u64>()
                    .ok()
                    .and_then(|id| s.artifacts.get(&id).cloned())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|a| name.is_empty() || a["name"] == name.as_str())
                    .collect();
                json_response(json!({"total_count": listed.len(), "artifacts": listed}))
            }
            ["pulls"] => json_response(Value::Array(
                s.pulls.get(&repo).cloned().unwrap_or_default(),
            )),
            _ => not_found(),
        };
    }
    // The web UI: a logged-in session is needed.
    let cookie = headers
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if cookie != format!("user_session={WEB_SESSION}") {
        return (StatusCode::FOUND, [("location", "/login")]).into_response();
    }
    match parts.as_slice() {
        [owner, name, "actions", "runs", run, "job", job] => {
            let known = s
                .jobs
                .get(&run.parse().unwrap_or(0))
                .is_some_and(|jobs| jobs.iter().any(|j| j["id"].as_u64() == job.parse().ok()));
            if !known {
                return not_found();
            }
            if let Ok(job) = job.parse() {
                s.job_pages.push(job);
            }
            // The page links to the step logs by an internal id, not the REST job id.
            let html = format!(
                "<html><body><div data-url=\"/{owner}/{name}/actions/runs/{run}/jobs/x{job}/steps/3/backscroll\"></div></body></html>"
            );
            ([("content-type", "text/html")], html).into_response()
        }
        [_, _, "actions", "runs", _, "jobs", internal, "steps"] => {
            if internal
                .strip_prefix('x')
                .and_then(|j| j.parse::<u64>().ok())
                .is_none()
            {
                return not_found();
            }
            json_response(json!([
                {"id": "1", "status": "completed"},
                {"id": "3", "status": "in_progress"}
            ]))
        }
        [
            _,
            _,
            "actions",
            "runs",
            _,
            "jobs",
            internal,
            "steps",
            "3",
            "backscroll",
        ] => {
            let Some(job) = internal
                .strip_prefix('x')
                .and_then(|j| j.parse::<u64>().ok())
            else {
                return not_found();
            };
            let now = Instant::now();
            let lines: Vec<Value> = s
                .logs
                .get(&job)
                .map(|lines| {
                    lines
                        .iter()
                        .filter(|(at, _)| *at <= now)
                        .map(|(_, line)| json!({"line": line}))
                        .collect()
                })
                .unwrap_or_default();
            json_response(json!({"lines": lines}))
        }
        _ => not_found(),
    }
}
