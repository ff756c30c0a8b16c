//! The fork pull request claim flow, compatible with the stock depot CLI: `POST /claim`
//! names a workflow run and gets a challenge code and an exchange URL; the claimant shows
//! the code from inside the run (its log, or an artifact); `POST <exchange URL>` then
//! returns a token, once. Depot's issuer trusted the client's word for the event and the
//! repository's spelling, took any audience, burned claims on the first poll and answered
//! every error with a 500; here every fact comes from GitHub, the audience is allow-listed,
//! a claim is pending until proven (202), exchanged at most once (410 after), and every
//! refusal is a precise 4xx.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{Duration as ChronoDuration, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::PgPool;

use super::Issuer;
use super::github::{self, CallBudget, GitHub, Run};
use super::http::FetchError;
use crate::config::{ClaimProof, ClaimsConfig, OidcConfig};
use crate::db::audit::{self, AuditEvent};
use crate::db::ids::new_id;
use crate::db::oidc_claims::{self as rows, ClaimRow, NewClaim};

/// A check of GitHub may hold a claim this long before another replica takes over.
const LEASE_SECONDS: f64 = 60.0;
/// Claim bodies are a few short strings.
pub const MAX_CLAIM_BODY_BYTES: usize = 4 * 1024;
/// The artifact a claimant uploads for artifact proof: this prefix and the code.
pub const ARTIFACT_PREFIX: &str = "oidc-challenge-";

/// Why a claim or exchange was not granted; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// 400: the request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 422: the run may not have a token (not a fork's pull request, private, finished…).
    #[error("{0}")]
    Refused(String),
    /// 404: no claim has this exchange URL.
    #[error("no claim has this exchange URL; start over with POST /claim")]
    UnknownClaim,
    /// 410: the claim was exchanged already, or expired.
    #[error("{0}")]
    Gone(String),
    /// 429: too many claims.
    #[error("{message}")]
    TooMany { message: String, retry_after: u64 },
    /// 503: GitHub could not answer, or claims are not set up.
    #[error("{message}")]
    Unavailable { message: String, retry_after: u64 },
    /// A check used the GitHub calls it may make; the next one goes on. Never reaches a
    /// claimant (a check ends without proof instead).
    #[error("this check's GitHub calls are spent; the next check goes on")]
    BudgetSpent,
    #[error(transparent)]
    Internal(#[from] crate::error::Error),
}

type Result<T> = std::result::Result<T, ClaimError>;

/// The depot CLI's claim: IDs are strings, as GitHub's environment variables give them.
#[derive(Debug, Deserialize)]
pub struct ClaimRequest {
    #[serde(default)]
    pub aud: Option<String>,
    #[serde(rename = "eventName", default)]
    pub event_name: Option<String>,
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(rename = "runID", default)]
    pub run_id: Option<Value>,
    #[serde(default)]
    pub attempt: Option<Value>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NewClaimResponse {
    #[serde(rename = "challengeCode")]
    pub challenge_code: String,
    #[serde(rename = "exchangeURL")]
    pub exchange_url: String,
}

/// What an exchange poll gets.
#[derive(Debug)]
pub enum Exchange {
    Token(String),
    /// Not proven yet: poll again after `retry_after` seconds.
    Pending {
        retry_after: u64,
        detail: String,
    },
}

/// What one check of GitHub found.
enum Check {
    Proven { run: Box<Run>, job_id: Option<u64> },
    NotYet(String),
}

pub struct Claims {
    pool: PgPool,
    issuer: Arc<Issuer>,
    github: GitHub,
    config: ClaimsConfig,
    audiences: Vec<String>,
    exchange_base: String,
}

/// A GitHub failure, as the claimant should see it.
fn upstream(err: FetchError) -> ClaimError {
    if matches!(err, FetchError::BudgetSpent) {
        return ClaimError::BudgetSpent;
    }
    let retry_after = match &err {
        FetchError::Status {
            retry_after: Some(s),
            ..
        } => (*s).clamp(1, 60),
        _ => 2,
    };
    tracing::warn!(error = %err, "GitHub did not answer a claim check");
    let message = match err.status() {
        Some(403 | 429) => "GitHub's rate limit is spent for now; retry shortly",
        _ => "GitHub could not be asked about this run; retry shortly",
    };
    ClaimError::Unavailable {
        message: message.into(),
        retry_after,
    }
}

fn text(value: &Option<Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn positive(field: &str, value: &str, max: u64) -> Result<u64> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ClaimError::BadRequest(format!(
            "{field} must be a positive number, as in $GITHUB_{}",
            if field == "runID" {
                "RUN_ID"
            } else {
                "RUN_ATTEMPT"
            }
        )));
    }
    match value.parse::<u64>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ => Err(ClaimError::BadRequest(format!(
            "{field} must be between 1 and {max}"
        ))),
    }
}

/// Whether GitHub's account of `run` lets it have a fork pull request token.
fn judge(run: &Run) -> std::result::Result<(), String> {
    if run.event != "pull_request" {
        return Err(format!(
            "run {} was triggered by a {:?} event; Kiln issues tokens only to pull_request runs from forks",
            run.id, run.event
        ));
    }
    let status = run.status.as_deref().unwrap_or("unknown");
    if status != "in_progress" {
        return Err(format!(
            "run {} is {status}, not in progress; claim from a step of a running job",
            run.id
        ));
    }
    let public = !run.repository.private
        && run
            .repository
            .visibility
            .as_deref()
            .is_none_or(|v| v == "public");
    if !public {
        return Err(format!(
            "{} is not a public repository; its workflows can use GitHub's own OIDC tokens",
            run.repository.full_name
        ));
    }
    match &run.head_repository {
        Some(head) if head.id != run.repository.id => Ok(()),
        _ => Err(format!(
            "run {} is not from a fork of {}; pull requests from the repository itself get \
             GitHub's own OIDC tokens (permissions: id-token: write)",
            run.id, run.repository.full_name
        )),
    }
}

/// The token's claims, every one from GitHub's answers (modelled on GitHub's own).
fn token_claims(
    run: &Run,
    pull: Option<&github::PullRequest>,
    job_id: Option<u64>,
) -> Map<String, Value> {
    let repo = &run.repository;
    let mut claims = Map::new();
    let mut put = |name: &str, value: Value| {
        claims.insert(name.to_string(), value);
    };
    put(
        "sub",
        json!(format!("repo:{}:pull_request", repo.full_name)),
    );
    put("repository", json!(repo.full_name));
    put("repository_id", json!(repo.id.to_string()));
    put("repository_owner", json!(repo.owner.login));
    put("repository_owner_id", json!(repo.owner.id.to_string()));
    put("repository_visibility", json!("public"));
    put("run_id", json!(run.id.to_string()));
    put("run_number", json!(run.run_number.to_string()));
    put(
        "run_attempt",
        json!(run.run_attempt.unwrap_or(1).to_string()),
    );
    // GitHub's `actor` is who started the first attempt; a re-run's is `triggering_actor`.
    if let Some(actor) = &run.actor {
        put("actor", json!(actor.login));
        put("actor_id", json!(actor.id.to_string()));
    }
    if let Some(actor) = &run.triggering_actor {
        put("triggering_actor", json!(actor.login));
    }
    if let Some(name) = &run.name {
        put("workflow", json!(name));
    }
    if let Some(head) = &run.head_repository {
        put("head_repository", json!(head.full_name));
        put("head_repository_id", json!(head.id.to_string()));
        put("head_repository_owner", json!(head.owner.login));
    }
    if let Some(branch) = &run.head_branch {
        put("head_ref", json!(branch));
    }
    put("head_sha", json!(run.head_sha));
    put("sha", json!(run.head_sha));
    put("event_name", json!("pull_request"));
    if let Some(pull) = pull {
        put("ref", json!(format!("refs/pull/{}/merge", pull.number)));
        put("base_ref", json!(pull.base.git_ref));
    }
    if let Some(job) = job_id {
        put("job_id", json!(job.to_string()));
    }
    claims
}

/// Seconds until a claim may be checked again after `checks` checks found no proof: the
/// interval at first, then longer, up to five times it. A claimant's code shows within
/// seconds or not at all, and each check costs several calls of the GitHub budget.
fn check_spacing(interval_ms: u64, checks: i32) -> f64 {
    let factor = (1 + checks.max(0) / 3).min(5) as f64;
    interval_ms as f64 / 1000.0 * factor
}

/// Up to `max` of `jobs`, starting further along each check, so every running job is
/// read within a few checks however many there are.
fn in_turn(jobs: &[github::Job], checks: i32, max: usize) -> impl Iterator<Item = &github::Job> {
    let start = if jobs.is_empty() {
        0
    } else {
        (checks.max(1) as usize - 1).saturating_mul(max) % jobs.len()
    };
    jobs.iter().cycle().skip(start).take(max.min(jobs.len()))
}

fn not_yet(claim: &ClaimRow) -> String {
    format!(
        "waiting for challenge code {} to appear in run {}",
        claim.challenge_code, claim.run_id
    )
}

fn made(budget: &CallBudget) -> i32 {
    budget.made() as i32
}

fn random_secret() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn secret_hash(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

impl Claims {
    pub fn new(pool: PgPool, issuer: Arc<Issuer>, config: &OidcConfig) -> Claims {
        let base = if config.claims.exchange_base_url.is_empty() {
            issuer.issuer().to_string()
        } else {
            config
                .claims
                .exchange_base_url
                .trim_end_matches('/')
                .to_string()
        };
        Claims {
            pool,
            issuer,
            github: GitHub::new(&config.github),
            config: config.claims.clone(),
            audiences: config.audiences.clone(),
            exchange_base: base,
        }
    }

    /// The proofs this installation can check (log proof needs a GitHub web session).
    fn usable_proofs(&self) -> Vec<ClaimProof> {
        self.config
            .proofs
            .iter()
            .copied()
            .filter(|p| *p != ClaimProof::Log || self.github.reads_live_logs())
            .collect()
    }

    fn check_enabled(&self) -> Result<()> {
        if !self.config.enabled || self.usable_proofs().is_empty() {
            return Err(ClaimError::Unavailable {
                message: "this Kiln does not issue fork pull request tokens: the operator has \
                          not enabled oidc.claims with a usable proof"
                    .into(),
                retry_after: 3600,
            });
        }
        Ok(())
    }

    /// `POST /claim`: checks the run with GitHub and opens a claim for it.
    pub async fn create(&self, client_ip: &str, body: &[u8]) -> Result<NewClaimResponse> {
        self.check_enabled()?;
        if body.len() > MAX_CLAIM_BODY_BYTES {
            return Err(ClaimError::BadRequest(format!(
                "the claim is over {MAX_CLAIM_BODY_BYTES} bytes"
            )));
        }
        let malformed = |why: String| {
            ClaimError::BadRequest(format!(
                "the claim is not the JSON object expected ({{\"aud\", \"eventName\", \"repo\", \"runID\", \"attempt\"}}): {why}"
            ))
        };
        let request: ClaimRequest = match serde_json::from_slice::<Value>(body) {
            Ok(value @ Value::Object(_)) => {
                serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?
            }
            Ok(_) => return Err(malformed("the body is not an object".into())),
            Err(e) => return Err(malformed(e.to_string())),
        };
        let event = request.event_name.as_deref().unwrap_or("");
        if event != "pull_request" {
            return Err(ClaimError::Refused(format!(
                "eventName is {event:?}; Kiln issues tokens only to pull_request runs from forks"
            )));
        }
        let repo = request.repo.as_deref().map(str::trim).unwrap_or("");
        if !github::is_repository_name(repo) {
            return Err(ClaimError::BadRequest(
                "repo must be the repository as owner/name, as in $GITHUB_REPOSITORY".into(),
            ));
        }
        let run_id = positive(
            "runID",
            &text(&request.run_id).unwrap_or_default(),
            i64::MAX as u64,
        )?;
        let attempt = match text(&request.attempt).filter(|a| !a.is_empty()) {
            Some(a) => Some(positive("attempt", &a, i32::MAX as u64)? as u32),
            None => None,
        };
        let audience = request.aud.as_deref().map(str::trim).unwrap_or("");
        if !self.audiences.iter().any(|a| a == audience) {
            return Err(ClaimError::BadRequest(format!(
                "aud {audience:?} is not an audience this issuer serves; use one of {:?}",
                self.audiences
            )));
        }
        let run = self
            .github
            .run(repo, run_id, attempt, &CallBudget::new(1, 0))
            .await
            .map_err(upstream)?
            .ok_or_else(|| {
                ClaimError::Refused(format!("GitHub knows no run {run_id} of {repo}"))
            })?;
        judge(&run).map_err(ClaimError::Refused)?;
        let repository = run.repository.full_name.to_lowercase();

        let secret = random_secret();
        let code = super::random_uuid();
        let id = new_id();
        let expires_at = Utc::now() + ChronoDuration::seconds(self.config.ttl_seconds as i64);
        let mut tx = self.pool.begin().await.map_err(crate::error::Error::from)?;
        // Serializes the per-repository count and insert across replicas.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kiln:oidc-claims'))")
            .execute(&mut *tx)
            .await
            .map_err(crate::error::Error::from)?;
        let pending = rows::count_pending(&mut *tx, &repository, client_ip).await?;
        if pending.for_claimant >= self.config.max_pending_per_claimant {
            metrics::counter!("kiln_oidc_claims_total", "result" => "limited").increment(1);
            return Err(ClaimError::TooMany {
                message: format!(
                    "your address has {} claims for {} waiting to be exchanged; exchange them or \
                     let them expire first",
                    pending.for_claimant, run.repository.full_name
                ),
                retry_after: 10,
            });
        }
        let for_repository = pending.for_repository;
        if for_repository >= self.config.max_pending_per_repository {
            metrics::counter!("kiln_oidc_claims_total", "result" => "limited").increment(1);
            return Err(ClaimError::TooMany {
                message: format!(
                    "{} has {for_repository} claims waiting to be exchanged; retry when they are \
                     exchanged or expire",
                    run.repository.full_name
                ),
                retry_after: 10,
            });
        }
        if pending.total >= self.config.max_pending {
            metrics::counter!("kiln_oidc_claims_total", "result" => "limited").increment(1);
            return Err(ClaimError::TooMany {
                message: "too many claims are waiting to be exchanged; retry shortly".into(),
                retry_after: 10,
            });
        }
        rows::insert(
            &mut *tx,
            &NewClaim {
                id: &id,
                secret_hash: &secret_hash(&secret),
                challenge_code: &code,
                repository: &repository,
                repository_id: run.repository.id as i64,
                run_id: run.id as i64,
                run_attempt: attempt.map(|a| a as i32),
                audience,
                client_ip,
                expires_at,
            },
        )
        .await?;
        tx.commit().await.map_err(crate::error::Error::from)?;
        metrics::counter!("kiln_oidc_claims_total", "result" => "opened").increment(1);
        tracing::info!(claim = %id, repository = %run.repository.full_name, run = run.id, "opened an OIDC claim");
        Ok(NewClaimResponse {
            challenge_code: code,
            exchange_url: format!("{}/exchange/{secret}", self.exchange_base),
        })
    }

    /// `POST /exchange/<secret>`: the token once the claim is proven, else why not.
    pub async fn exchange(&self, secret: &str) -> Result<Exchange> {
        self.check_enabled()?;
        if secret.len() != 43
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ClaimError::UnknownClaim);
        }
        let claim = rows::by_secret(&self.pool, &secret_hash(secret))
            .await?
            .ok_or(ClaimError::UnknownClaim)?;
        match claim.state.as_str() {
            "issued" => {
                return Err(ClaimError::Gone(
                    "this claim was exchanged for a token already; a claim gives one token, so \
                     claim again"
                        .into(),
                ));
            }
            "failed" => {
                return Err(ClaimError::Refused(
                    claim
                        .failure
                        .unwrap_or_else(|| "this claim was refused".into()),
                ));
            }
            _ => {}
        }
        if claim.expires_at <= Utc::now() {
            return Err(ClaimError::Gone(
                "this claim expired before its challenge code was seen; claim again".into(),
            ));
        }
        let lease_id = new_id();
        let Some(claim) = rows::lease(&self.pool, &claim.id, &lease_id, LEASE_SECONDS).await?
        else {
            return Ok(Exchange::Pending {
                retry_after: 1,
                detail: "the claim is being checked".into(),
            });
        };
        let calls_left = self.config.max_github_calls_per_claim - claim.github_calls;
        if claim.checks > self.config.max_checks || calls_left <= 0 {
            let reason = if calls_left <= 0 {
                format!(
                    "the challenge code was not seen within the {} GitHub calls a claim may \
                     cost; claim again and print the code from a step of the run",
                    self.config.max_github_calls_per_claim
                )
            } else {
                format!(
                    "the challenge code was not seen in {} checks; claim again and print the \
                     code from a step of the run",
                    self.config.max_checks
                )
            };
            rows::fail(&self.pool, &claim.id, &lease_id, &reason, 0).await?;
            return Err(ClaimError::Refused(reason));
        }
        let budget = CallBudget::new(
            self.config
                .max_github_calls_per_check
                .min(calls_left as u32),
            self.config.max_log_tails_per_check,
        );
        let wait = check_spacing(self.config.check_interval_ms, claim.checks);
        let checked = self.check(&claim, &budget).await;
        metrics::histogram!("kiln_oidc_github_calls_per_check").record(budget.made() as f64);
        match checked {
            Ok(Check::Proven { run, job_id }) => {
                self.issue(&claim, &lease_id, &run, job_id, &budget).await
            }
            Ok(Check::NotYet(detail)) => {
                rows::release(&self.pool, &claim.id, &lease_id, wait, made(&budget)).await?;
                Ok(Exchange::Pending {
                    retry_after: wait.ceil().max(1.0) as u64,
                    detail,
                })
            }
            Err(ClaimError::Refused(reason)) => {
                rows::fail(&self.pool, &claim.id, &lease_id, &reason, made(&budget)).await?;
                metrics::counter!("kiln_oidc_claims_total", "result" => "refused").increment(1);
                Err(ClaimError::Refused(reason))
            }
            Err(ClaimError::Unavailable {
                message,
                retry_after,
            }) => {
                rows::release(
                    &self.pool,
                    &claim.id,
                    &lease_id,
                    retry_after as f64,
                    made(&budget),
                )
                .await?;
                Err(ClaimError::Unavailable {
                    message,
                    retry_after,
                })
            }
            Err(other) => {
                rows::release(&self.pool, &claim.id, &lease_id, wait, made(&budget)).await?;
                Err(other)
            }
        }
    }

    /// Asks GitHub whether the run is still eligible and whether the code was shown,
    /// within `budget`: when it is spent, the check ends without proof and the next one
    /// goes on (running jobs are read in turns, `max_jobs_per_check` per check).
    async fn check(&self, claim: &ClaimRow, budget: &CallBudget) -> Result<Check> {
        match self.look(claim, budget).await {
            Err(ClaimError::BudgetSpent) => Ok(Check::NotYet(not_yet(claim))),
            other => other,
        }
    }

    async fn look(&self, claim: &ClaimRow, budget: &CallBudget) -> Result<Check> {
        let attempt = claim.run_attempt.map(|a| a as u32);
        let run = self
            .github
            .run(&claim.repository, claim.run_id as u64, attempt, budget)
            .await
            .map_err(upstream)?
            .ok_or_else(|| {
                ClaimError::Refused(format!("GitHub no longer knows run {}", claim.run_id))
            })?;
        judge(&run).map_err(ClaimError::Refused)?;
        if run.repository.id as i64 != claim.repository_id {
            return Err(ClaimError::Refused(format!(
                "{} is no longer the repository this claim was opened for",
                run.repository.full_name
            )));
        }
        let proofs = self.usable_proofs();
        if proofs.contains(&ClaimProof::Artifact)
            && self
                .github
                .has_artifact(
                    &run,
                    &format!("{ARTIFACT_PREFIX}{}", claim.challenge_code),
                    budget,
                )
                .await
                .map_err(upstream)?
        {
            return Ok(Check::Proven {
                run: Box::new(run),
                job_id: None,
            });
        }
        if proofs.contains(&ClaimProof::Log) {
            let jobs = self
                .github
                .running_jobs(
                    &claim.repository,
                    run.id,
                    run.run_attempt.unwrap_or(1),
                    budget,
                )
                .await
                .map_err(upstream)?;
            for job in in_turn(&jobs, claim.checks, self.config.max_jobs_per_check as usize) {
                if self
                    .github
                    .log_shows(
                        &claim.repository,
                        run.id,
                        job.id,
                        &claim.challenge_code,
                        budget,
                    )
                    .await
                    .map_err(upstream)?
                {
                    return Ok(Check::Proven {
                        run: Box::new(run),
                        job_id: Some(job.id),
                    });
                }
            }
        }
        Ok(Check::NotYet(not_yet(claim)))
    }

    async fn issue(
        &self,
        claim: &ClaimRow,
        lease_id: &str,
        run: &Run,
        job_id: Option<u64>,
        budget: &CallBudget,
    ) -> Result<Exchange> {
        // The pull request only adds `ref` and `base_ref`; a failure to find it (or no call
        // left to ask) is no reason to refuse.
        let pull = match self.github.pull_request(run, budget).await {
            Ok(pull) => pull,
            Err(err) => {
                tracing::debug!(error = %err, "could not look up a fork run's pull request");
                None
            }
        };
        let minted = self
            .issuer
            .mint(&claim.audience, token_claims(run, pull.as_ref(), job_id))
            .await?;
        let mut tx = self.pool.begin().await.map_err(crate::error::Error::from)?;
        if !rows::issue(&mut *tx, &claim.id, lease_id, &minted.jti, made(budget)).await? {
            // Another check took over (this one outlived its lease): it hands out the token.
            return Ok(Exchange::Pending {
                retry_after: 1,
                detail: "the claim is being checked".into(),
            });
        }
        audit::record(
            &mut *tx,
            AuditEvent::new("oidc.token_issued", ("claim", Some(claim.id.clone())))
                .target("workflow_run", run.id.to_string())
                .details(json!({
                    "repository": run.repository.full_name,
                    "head_repository": run.head_repository.as_ref().map(|h| h.full_name.clone()),
                    "run_attempt": run.run_attempt,
                    "job_id": job_id,
                    "jti": minted.jti,
                    "audience": claim.audience,
                    "checks": claim.checks,
                    "github_calls": claim.github_calls + made(budget),
                })),
        )
        .await?;
        tx.commit().await.map_err(crate::error::Error::from)?;
        metrics::counter!("kiln_oidc_claims_total", "result" => "issued").increment(1);
        metrics::histogram!("kiln_oidc_claim_seconds")
            .record((Utc::now() - claim.created_at).num_milliseconds() as f64 / 1000.0);
        Ok(Exchange::Token(minted.token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(edit: impl FnOnce(&mut Value)) -> Run {
        let mut v = json!({
            "id": 1, "name": "CI", "event": "pull_request", "status": "in_progress",
            "head_branch": "feature", "head_sha": "abc", "run_number": 3, "run_attempt": 2,
            "actor": {"login": "a", "id": 1}, "triggering_actor": {"login": "b", "id": 2},
            "repository": {"id": 10, "full_name": "o/r", "private": false, "visibility": "public",
                           "owner": {"login": "o", "id": 5}},
            "head_repository": {"id": 11, "full_name": "f/r", "owner": {"login": "f", "id": 6}}
        });
        edit(&mut v);
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_public_fork_pull_requests_in_progress_pass() {
        assert!(judge(&run(|_| {})).is_ok());
        let refusals = [
            run(|v| v["event"] = json!("pull_request_target")),
            run(|v| v["status"] = json!("queued")),
            run(|v| v["repository"]["private"] = json!(true)),
            run(|v| v["repository"]["visibility"] = json!("internal")),
            run(|v| v["head_repository"]["id"] = json!(10)),
            run(|v| v["head_repository"] = Value::Null),
        ];
        for r in refusals {
            assert!(judge(&r).is_err(), "{r:?}");
        }
    }

    #[test]
    fn checks_are_spaced_further_apart_up_to_five_times_the_interval() {
        assert_eq!(check_spacing(1000, 1), 1.0);
        assert_eq!(check_spacing(1000, 3), 2.0);
        assert_eq!(check_spacing(1000, 9), 4.0);
        assert_eq!(check_spacing(1000, 100), 5.0);
        assert_eq!(check_spacing(200, 1), 0.2);
    }

    #[test]
    fn tokens_carry_only_the_advertised_claims() {
        let pull = github::PullRequest {
            number: 9,
            head: github::PullRef {
                git_ref: "feature".into(),
                sha: "abc".into(),
            },
            base: github::PullRef {
                git_ref: "main".into(),
                sha: "def".into(),
            },
        };
        let claims = token_claims(&run(|_| {}), Some(&pull), Some(7));
        for name in claims.keys() {
            assert!(
                name == "sub" || super::super::RUN_CLAIMS.contains(&name.as_str()),
                "{name} is not in claims_supported"
            );
        }
        assert_eq!(claims["sub"], "repo:o/r:pull_request");
        assert_eq!(claims["run_attempt"], "2");
        assert_eq!(claims["ref"], "refs/pull/9/merge");
        assert_eq!(claims["base_ref"], "main");
    }
}
