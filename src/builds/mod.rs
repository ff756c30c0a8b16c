//! The build lifecycle behind the depot CLI: create (with a build-scoped token), per
//! platform builder requests, health and cancellation, insights, and finish.
//!
//! States: build `queued → running → {success | failed | canceled | timed_out}`;
//! platform `pending → assigned → ready → released` (or `failed`). Every transition is a
//! conditional UPDATE in `db::builds`.

pub mod connection;
pub mod health;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;

use crate::auth::{Action, Principal, Target, TokenKind, authorize, guard};
use crate::config::BuildsConfig;
use crate::db::builds::{self, Build, NewBuild, Outcome, Platform, Step};
use crate::db::ids::{is_well_formed, new_id};
use crate::db::projects::Project;
use crate::db::tokens::{self, NewToken};
use crate::error::{Error, Result};

/// NOTIFY channel announcing that a build changed (payload: build id), so every replica
/// drops its cached view of it and wakes connection waiters.
pub const BUILD_CHANNEL: &str = "kiln_builds";

/// What the hot paths need to know about a build, cached per replica.
#[derive(Debug, Clone)]
pub struct BuildRef {
    pub id: String,
    pub project_id: String,
    pub organization_id: String,
    pub cancels_at: DateTime<Utc>,
    pub finished: bool,
}

impl From<&Build> for BuildRef {
    fn from(b: &Build) -> Self {
        BuildRef {
            id: b.id.clone(),
            project_id: b.project_id.clone(),
            organization_id: b.organization_id.clone(),
            cancels_at: b.cancels_at,
            finished: b.is_finished(),
        }
    }
}

pub struct Builds {
    pool: PgPool,
    auth: Arc<crate::auth::Authenticator>,
    pub config: BuildsConfig,
    refs: quick_cache::sync::Cache<String, (Arc<BuildRef>, Instant)>,
    pub health: Arc<health::HealthTracker>,
}

const REF_TTL: Duration = Duration::from_secs(60);

impl Builds {
    pub fn new(pool: PgPool, auth: Arc<crate::auth::Authenticator>, config: BuildsConfig) -> Self {
        // Recording liveness ten times per health timeout is plenty for the reaper.
        let write_every = Duration::from_secs((config.health_timeout_seconds / 10).max(1));
        let health = Arc::new(health::HealthTracker::new(
            pool.clone(),
            Duration::from_millis(config.health_flush_millis),
            write_every,
        ));
        Builds {
            pool,
            auth,
            config,
            refs: quick_cache::sync::Cache::new(100_000),
            health,
        }
    }

    /// Resolves which project a CreateBuild is for. An empty id uses the token's own
    /// project; otherwise `not_found` sends the CLI down its onboarding path.
    pub async fn resolve_project(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
    ) -> Result<Project> {
        let requested = project_id.map(str::trim).filter(|s| !s.is_empty());
        let id = match (requested, &principal.project_id) {
            (Some(id), _) => id.to_string(),
            (None, Some(own)) => own.clone(),
            (None, None) => {
                return Err(Error::NotFound(
                    "missing project ID; pass --project <id> or set DEPOT_PROJECT_ID (see `depot projects list`)".into(),
                ));
            }
        };
        guard::project(&self.pool, principal, &id, Action::CreateBuild).await
    }

    /// Creates a build and its build-scoped token, in one transaction.
    pub async fn create(
        &self,
        principal: &Principal,
        project: &Project,
        command: &str,
        options: serde_json::Value,
    ) -> Result<(Build, String)> {
        let id = new_id();
        let mut tx = self.pool.begin().await?;
        let build = builds::insert(
            &mut *tx,
            NewBuild {
                id: &id,
                project_id: &project.id,
                organization_id: &project.organization_id,
                command,
                options,
                created_by: Some(&principal.token_id),
                timeout_minutes: project.build_timeout_minutes,
            },
        )
        .await?;
        let mut token = NewToken::new(TokenKind::Build, format!("build {id}"));
        token.organization_id = Some(project.organization_id.clone());
        token.project_id = Some(project.id.clone());
        token.build_id = Some(id.clone());
        // Outlives the build's deadline so FinishBuild still authenticates after a cancel.
        token.expires_at = Some(build.cancels_at + chrono::Duration::hours(1));
        token.created_by = principal.user_id.clone();
        let (info, minted) = tokens::create(&mut *tx, token).await?;
        tx.commit().await?;
        self.auth.prime(
            minted.hash,
            Principal {
                token_id: info.id,
                kind: TokenKind::Build,
                user_id: None,
                organization_id: Some(project.organization_id.clone()),
                project_id: Some(project.id.clone()),
                build_id: Some(id.clone()),
                machine_id: None,
                scopes: TokenKind::Build.default_scopes(),
                memberships: Vec::new(),
                expires_at: info.expires_at,
            },
        );
        self.refs
            .insert(id, (Arc::new(BuildRef::from(&build)), Instant::now()));
        metrics::counter!("kiln_builds_created_total").increment(1);
        Ok((build, minted.secret))
    }

    /// A build's cached reference, loaded on a miss. `None` if it does not exist.
    pub async fn lookup(&self, build_id: &str) -> Result<Option<Arc<BuildRef>>> {
        if let Some((r, at)) = self.refs.get(build_id)
            && at.elapsed() < REF_TTL
        {
            return Ok(Some(r));
        }
        if !is_well_formed(build_id) {
            return Ok(None);
        }
        let Some(build) = builds::get(&self.pool, build_id).await? else {
            return Ok(None);
        };
        let r = Arc::new(BuildRef::from(&build));
        self.refs
            .insert(build_id.to_string(), (r.clone(), Instant::now()));
        Ok(Some(r))
    }

    pub fn forget(&self, build_id: &str) {
        self.refs.remove(build_id);
    }

    /// Loads a build and authorizes `action` on it. Unknown and unreachable builds are
    /// both `not_found`; a build token for another build is `permission_denied`.
    pub async fn authorize(
        &self,
        principal: &Principal,
        build_id: &str,
        action: Action,
    ) -> Result<Arc<BuildRef>> {
        if build_id.is_empty() {
            return Err(Error::invalid("build_id", "is required"));
        }
        let build = self
            .lookup(build_id)
            .await?
            .ok_or_else(|| Error::not_found("build", build_id))?;
        authorize(
            principal,
            action,
            Target::Build {
                id: &build.id,
                project_id: &build.project_id,
                organization_id: &build.organization_id,
            },
        )?;
        Ok(build)
    }

    pub async fn get(&self, principal: &Principal, build_id: &str) -> Result<Build> {
        self.authorize(principal, build_id, Action::ViewBuild)
            .await?;
        builds::get(&self.pool, build_id)
            .await?
            .ok_or_else(|| Error::not_found("build", build_id))
    }

    /// Records the CLI's outcome; the first outcome wins. Releases the build's builders.
    pub async fn finish(
        &self,
        principal: &Principal,
        build_id: &str,
        outcome: Outcome,
    ) -> Result<()> {
        self.authorize(principal, build_id, Action::WriteBuild)
            .await?;
        if builds::finish(&self.pool, build_id, &outcome).await? {
            metrics::counter!("kiln_builds_finished_total", "outcome" => outcome.state())
                .increment(1);
        }
        self.announce(build_id).await;
        Ok(())
    }

    /// Tells every replica that a build changed.
    pub async fn announce(&self, build_id: &str) {
        self.forget(build_id);
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(BUILD_CHANNEL)
            .bind(build_id)
            .execute(&self.pool)
            .await;
        if let Err(err) = sent {
            tracing::warn!(error = %err, build_id, "could not announce a build change");
        }
    }

    /// Cancels a live build: its cancel deadline becomes now, so the CLI's next health
    /// report (within ~5 s) stops the build.
    pub async fn cancel(&self, principal: &Principal, build_id: &str) -> Result<bool> {
        self.authorize(principal, build_id, Action::WriteBuild)
            .await?;
        let canceled = builds::request_cancel(&self.pool, build_id).await?;
        self.announce(build_id).await;
        Ok(canceled)
    }

    /// Stores BuildKit vertexes from ReportStatus(Stream) as build steps.
    pub async fn record_statuses(
        &self,
        build_id: &str,
        statuses: &[crate::proto::moby::buildkit::v1::StatusResponse],
    ) -> Result<()> {
        let mut steps: Vec<Step> = Vec::new();
        for status in statuses {
            for v in &status.vertexes {
                if v.digest.is_empty() || v.digest.len() > 256 {
                    continue;
                }
                steps.push(Step {
                    digest: v.digest.clone(),
                    name: v.name.chars().take(2000).collect(),
                    cached: v.cached,
                    started_at: v.started.as_ref().and_then(timestamp),
                    completed_at: v.completed.as_ref().and_then(timestamp),
                    error: (!v.error.is_empty()).then(|| v.error.chars().take(10_000).collect()),
                });
            }
        }
        // Later entries for the same vertex carry completion; keep the last of each.
        let mut seen = std::collections::HashMap::new();
        for step in steps {
            seen.insert(step.digest.clone(), step);
        }
        let steps: Vec<Step> = seen.into_values().collect();
        builds::upsert_steps(&self.pool, build_id, &steps).await
    }

    /// Fails live builds whose health reports stopped, and times out builds far past
    /// their cancel deadline. Idempotent: run from a periodic job on any replica.
    pub async fn reap_stale(&self) -> Result<usize> {
        let cutoff =
            Utc::now() - chrono::Duration::seconds(self.config.health_timeout_seconds as i64);
        let stale = builds::stale(&self.pool, cutoff, 500).await?;
        let mut reaped = 0;
        for (id, timed_out) in stale {
            let outcome = if timed_out {
                Outcome::TimedOut
            } else {
                Outcome::Failed(format!(
                    "no health report for {} s; the CLI is gone",
                    self.config.health_timeout_seconds
                ))
            };
            if builds::finish(&self.pool, &id, &outcome).await? {
                reaped += 1;
                metrics::counter!("kiln_builds_finished_total", "outcome" => outcome.state())
                    .increment(1);
                tracing::info!(build_id = %id, outcome = outcome.state(), "reaped a build whose CLI stopped reporting");
            }
            self.announce(&id).await;
        }
        Ok(reaped)
    }
}

pub fn timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
}

pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Maps the CLI's platform enum; 0 (unspecified) is a client bug.
pub fn platform_from_wire(value: i32) -> Result<Platform> {
    use crate::proto::depot::cli::v1::BuilderPlatform;
    match BuilderPlatform::try_from(value) {
        Ok(BuilderPlatform::Amd64) => Ok(Platform::Amd64),
        Ok(BuilderPlatform::Arm64) => Ok(Platform::Arm64),
        _ => Err(Error::invalid(
            "platform",
            "must be BUILDER_PLATFORM_AMD64 or BUILDER_PLATFORM_ARM64",
        )),
    }
}

/// The job kind of the periodic stale-build reaper.
pub const REAP_JOB: &str = "builds.reap_stale";

pub fn build_options_json(
    options: &[crate::proto::depot::cli::v1::BuildOptions],
) -> serde_json::Value {
    serde_json::Value::Array(
        options
            .iter()
            .map(|o| {
                json!({
                    "command": o.command,
                    "tags": o.tags,
                    "push": o.push,
                    "load": o.load,
                    "save": o.save,
                    "lint": o.lint,
                    "target": o.target_name,
                    "outputs": o.outputs.iter().map(|out| json!({"kind": out.kind, "attributes": out.attributes})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
