//! What the claim flow asks GitHub: a workflow run and its jobs (REST API), the proof that
//! a claimant runs inside it (a challenge code in a live job log, read through the web
//! UI's "backscroll" endpoints since the REST API serves logs only of finished jobs; or
//! an artifact named after the code), and the run's pull request.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::http::{self, FetchError};
use crate::config::GitHubConfig;

const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;
const MAX_HTML_BYTES: usize = 8 * 1024 * 1024;

/// What one check may still ask GitHub: calls in all, and live log tails. Every call is
/// taken from it before it is sent, and counted in `kiln_oidc_github_calls_total{call}`.
#[derive(Debug)]
pub struct CallBudget {
    calls: AtomicU32,
    log_tails: AtomicU32,
    made: AtomicU32,
}

impl CallBudget {
    pub fn new(calls: u32, log_tails: u32) -> CallBudget {
        CallBudget {
            calls: AtomicU32::new(calls),
            log_tails: AtomicU32::new(log_tails),
            made: AtomicU32::new(0),
        }
    }

    fn take_from(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Takes one call of `kind`, or says the budget is spent.
    fn take(&self, kind: &'static str) -> Result<(), FetchError> {
        if !Self::take_from(&self.calls) {
            return Err(FetchError::BudgetSpent);
        }
        self.made.fetch_add(1, Ordering::SeqCst);
        metrics::counter!("kiln_oidc_github_calls_total", "call" => kind).increment(1);
        Ok(())
    }

    /// Takes one log tail (and its call).
    fn take_log_tail(&self) -> Result<(), FetchError> {
        if !Self::take_from(&self.log_tails) {
            return Err(FetchError::BudgetSpent);
        }
        self.take("log_tail")
    }

    /// Calls made so far.
    pub fn made(&self) -> u32 {
        self.made.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub login: String,
    pub id: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Repository {
    pub id: u64,
    pub full_name: String,
    #[serde(default)]
    pub private: bool,
    #[serde(default)]
    pub visibility: Option<String>,
    pub owner: User,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    pub id: u64,
    #[serde(default)]
    pub name: Option<String>,
    pub event: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub head_branch: Option<String>,
    pub head_sha: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub run_number: u64,
    #[serde(default)]
    pub run_attempt: Option<u64>,
    #[serde(default)]
    pub actor: Option<User>,
    #[serde(default)]
    pub triggering_actor: Option<User>,
    pub repository: Repository,
    #[serde(default)]
    pub head_repository: Option<Repository>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    pub id: u64,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Jobs {
    #[serde(default)]
    jobs: Vec<Job>,
}

#[derive(Debug, Deserialize)]
struct Artifacts {
    #[serde(default)]
    artifacts: Vec<Artifact>,
}

#[derive(Debug, Deserialize)]
struct Artifact {
    name: String,
    #[serde(default)]
    expired: bool,
    workflow_run: Option<ArtifactRun>,
}

#[derive(Debug, Deserialize)]
struct ArtifactRun {
    id: u64,
    #[serde(default)]
    repository_id: Option<u64>,
    #[serde(default)]
    head_repository_id: Option<u64>,
    #[serde(default)]
    head_sha: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PullRequest {
    pub number: u64,
    pub head: PullRef,
    pub base: PullRef,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PullRef {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
}

#[derive(Debug, Deserialize)]
struct Step {
    id: serde_json::Value,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Backscroll {
    #[serde(default)]
    lines: Vec<BackscrollLine>,
}

#[derive(Debug, Deserialize)]
struct BackscrollLine {
    #[serde(default)]
    line: String,
}

pub struct GitHub {
    http: reqwest::Client,
    api: String,
    web: String,
    token: SecretString,
    web_session: SecretString,
    max_job_pages: u32,
}

/// `owner/name` made only of what GitHub allows in names, so it is safe in a URL path.
pub fn is_repository_name(full_name: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 100
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    matches!(full_name.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

impl GitHub {
    pub fn new(config: &GitHubConfig) -> GitHub {
        GitHub {
            http: http::client(Duration::from_secs(config.timeout_seconds)),
            api: config.api_url.trim_end_matches('/').to_string(),
            web: config.web_url.trim_end_matches('/').to_string(),
            token: config.token.clone(),
            web_session: config.web_session.clone(),
            max_job_pages: config.max_job_pages,
        }
    }

    /// Whether live logs can be read (a web session is configured).
    pub fn reads_live_logs(&self) -> bool {
        !self.web_session.expose_secret().is_empty()
    }

    fn api_get(&self, path: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .get(format!("{}{path}", self.api))
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28");
        let token = self.token.expose_secret();
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        request
    }

    fn web_get(&self, path: &str, accept: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.web))
            .header("accept", accept)
            .header(
                "cookie",
                format!("user_session={}", self.web_session.expose_secret()),
            )
    }

    /// A run (of one attempt, if given). `Ok(None)`: GitHub knows no such run.
    pub async fn run(
        &self,
        repository: &str,
        run_id: u64,
        attempt: Option<u32>,
        budget: &CallBudget,
    ) -> Result<Option<Run>, FetchError> {
        budget.take("run")?;
        let path = match attempt {
            Some(n) => format!("/repos/{repository}/actions/runs/{run_id}/attempts/{n}"),
            None => format!("/repos/{repository}/actions/runs/{run_id}"),
        };
        match http::fetch_json(self.api_get(&path), MAX_JSON_BYTES).await {
            Ok(run) => Ok(Some(run)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The run's jobs that are in progress, across pages.
    pub async fn running_jobs(
        &self,
        repository: &str,
        run_id: u64,
        attempt: u64,
        budget: &CallBudget,
    ) -> Result<Vec<Job>, FetchError> {
        let mut running = Vec::new();
        for page in 1..=self.max_job_pages {
            budget.take("jobs")?;
            let path = format!(
                "/repos/{repository}/actions/runs/{run_id}/attempts/{attempt}/jobs?per_page=100&page={page}"
            );
            let jobs: Jobs = http::fetch_json(self.api_get(&path), MAX_JSON_BYTES).await?;
            let full = jobs.jobs.len() == 100;
            running.extend(
                jobs.jobs
                    .into_iter()
                    .filter(|j| j.status.as_deref() == Some("in_progress")),
            );
            if !full {
                break;
            }
        }
        Ok(running)
    }

    /// Whether `code` appears in the live log tail of an in-progress step of `job_id`,
    /// reading as many step tails as `budget` still allows.
    pub async fn log_shows(
        &self,
        repository: &str,
        run_id: u64,
        job_id: u64,
        code: &str,
        budget: &CallBudget,
    ) -> Result<bool, FetchError> {
        budget.take("job_page")?;
        let page = http::fetch(
            self.web_get(
                &format!("/{repository}/actions/runs/{run_id}/job/{job_id}"),
                "text/html",
            ),
            MAX_HTML_BYTES,
        )
        .await?;
        let page = String::from_utf8_lossy(&page);
        let Some(log_job) = backscroll_job_id(&page, run_id) else {
            return Ok(false);
        };
        let base = format!("/{repository}/actions/runs/{run_id}/jobs/{log_job}/steps");
        budget.take("steps")?;
        let body = http::fetch(self.web_get(&base, "application/json"), MAX_JSON_BYTES).await?;
        let steps: Vec<Step> =
            serde_json::from_slice(&body).map_err(|e| FetchError::Malformed(e.to_string()))?;
        let running = steps
            .iter()
            .filter(|s| s.status.as_deref() == Some("in_progress"))
            .filter_map(|s| match &s.id {
                serde_json::Value::String(id) => Some(id.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|id| {
                !id.is_empty()
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        for step in running {
            budget.take_log_tail()?;
            let tail: Backscroll = http::fetch_json(
                self.web_get(&format!("{base}/{step}/backscroll"), "application/json"),
                MAX_JSON_BYTES,
            )
            .await?;
            if tail.lines.iter().rev().any(|l| l.line.contains(code)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the run carries an artifact named `name` that GitHub ties to this very
    /// run, repository, fork and commit.
    pub async fn has_artifact(
        &self,
        run: &Run,
        name: &str,
        budget: &CallBudget,
    ) -> Result<bool, FetchError> {
        budget.take("artifacts")?;
        let path = format!(
            "/repos/{}/actions/runs/{}/artifacts?name={name}&per_page=10",
            run.repository.full_name, run.id
        );
        let listed: Artifacts = http::fetch_json(self.api_get(&path), MAX_JSON_BYTES).await?;
        let head_id = run.head_repository.as_ref().map(|r| r.id);
        Ok(listed.artifacts.iter().any(|a| {
            a.name == name
                && !a.expired
                && a.workflow_run.as_ref().is_some_and(|w| {
                    w.id == run.id
                        && w.repository_id.is_none_or(|id| id == run.repository.id)
                        && w.head_repository_id == head_id
                        && w.head_sha.as_deref() == Some(run.head_sha.as_str())
                })
        }))
    }

    /// The open pull request whose head is the run's fork branch and commit, if GitHub
    /// finds one (a fork run's `pull_requests` is always empty).
    pub async fn pull_request(
        &self,
        run: &Run,
        budget: &CallBudget,
    ) -> Result<Option<PullRequest>, FetchError> {
        let (Some(head), Some(branch)) = (&run.head_repository, &run.head_branch) else {
            return Ok(None);
        };
        budget.take("pull_request")?;
        let request = self
            .api_get(&format!("/repos/{}/pulls", run.repository.full_name))
            .query(&[
                ("state", "open"),
                ("head", &format!("{}:{branch}", head.owner.login)),
                ("per_page", "10"),
            ]);
        let pulls: Vec<PullRequest> = http::fetch_json(request, MAX_JSON_BYTES).await?;
        Ok(pulls.into_iter().find(|p| p.head.sha == run.head_sha))
    }
}

/// The web UI's internal id of a job's log, from the job page's backscroll links
/// (`/actions/runs/<run>/jobs/<id>/steps/…`).
fn backscroll_job_id(page: &str, run_id: u64) -> Option<String> {
    let marker = format!("/actions/runs/{run_id}/jobs/");
    let mut rest = page;
    while let Some(at) = rest.find(&marker) {
        let after = &rest[at + marker.len()..];
        let id: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !id.is_empty() && after[id.len()..].starts_with("/steps") {
            return Some(id);
        }
        rest = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_are_checked() {
        assert!(is_repository_name("octo-org/octo.repo_1"));
        for bad in [
            "octo", "a/b/c", "../x", "a/..", "a b/c", "a/%2e", "/x", "x/",
        ] {
            assert!(!is_repository_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_budget_gives_what_it_holds_and_counts_what_it_gave() {
        let budget = CallBudget::new(3, 1);
        assert!(budget.take("run").is_ok());
        assert!(budget.take_log_tail().is_ok());
        assert!(matches!(
            budget.take_log_tail(),
            Err(FetchError::BudgetSpent)
        ));
        assert!(budget.take("jobs").is_ok());
        assert!(matches!(budget.take("jobs"), Err(FetchError::BudgetSpent)));
        assert_eq!(budget.made(), 3);
    }

    #[test]
    fn the_backscroll_job_id_is_found_in_the_job_page() {
        let page = r#"<a href="/o/r/actions/runs/42/jobs/abc_1/steps/7/backscroll">"#;
        assert_eq!(backscroll_job_id(page, 42), Some("abc_1".into()));
        assert_eq!(backscroll_job_id(page, 43), None);
        assert_eq!(backscroll_job_id("/actions/runs/42/jobs/x", 42), None);
    }
}
