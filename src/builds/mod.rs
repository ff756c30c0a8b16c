//! The build lifecycle behind the depot CLI: create (with a build-scoped token), per
//! platform builder requests, health and cancellation, insights, and finish.
//!
//! States: build `queued → running → {success | failed | canceled | timed_out}`;
//! platform `pending → assigned → ready → released` (or `failed`). Every transition is a
//! conditional UPDATE in `db::builds`.

pub mod connection;
pub mod health;
pub mod insights;
pub mod sharing;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;

use crate::auth::authz::{self, Action, Target};
use crate::auth::token::{NewToken, issue};
use crate::auth::{Principal, PrincipalKind, TokenKind};
use crate::config::BuildsConfig;
use crate::db::builds::{self, Build, BuildPlatform, NewBuild, Outcome, Step};
use crate::db::ids::{is_well_formed, new_id};
use crate::db::projects::Project;
use crate::db::{audit, notify};
use crate::error::{Error, Result};
use crate::pages;
use crate::tokens::{self, Tokens};

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
    /// Signs share links; derived from the key-encryption key. None: sharing is off.
    share_key: Option<[u8; 32]>,
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
            share_key: None,
        }
    }

    /// Enables share links, signed with a key derived from the key-encryption key.
    pub fn with_key_encryption_key(mut self, kek: Option<[u8; 32]>) -> Self {
        self.share_key = kek.map(|k| sharing::derive_key(&k));
        self
    }

    /// Creates a build of `project_id` (empty: the token's own project; neither:
    /// `not_found`, which starts the depot CLI's onboarding) and its build-scoped token,
    /// in one transaction. Returns the build, its token and its project.
    pub async fn create(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        spec: BuildSpec,
    ) -> Result<(Build, String, Project)> {
        let id = crate::projects::resolve_id(principal, project_id)?;
        let project =
            crate::projects::load_from(&self.pool, principal, &id, Action::CreateBuild).await?;
        spec.validate()?;
        let isolated = spec.ephemeral_cache || authz::isolated_builds(principal);
        let id = new_id();
        let mut tx = self.pool.begin().await?;
        let build = builds::insert(
            &mut *tx,
            NewBuild {
                id: &id,
                project_id: &project.id,
                organization_id: &project.organization_id,
                command: &spec.command,
                options: spec.options,
                created_by: Some(&principal.token_id),
                ci_identity: principal.ci.as_deref().map(|g| g.history_key.as_str()),
                timeout_minutes: project.build_timeout_minutes,
                ephemeral_cache: isolated,
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
        let (info, minted) = issue(&mut *tx, token).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("build.create")
                .org(&project.organization_id)
                .target("build", &id)
                .details(json!({
                    "project_id": project.id,
                    "command": spec.command,
                    "isolated": isolated,
                    "token_prefix": info.display_prefix,
                })),
        )
        .await?;
        // Live build lists on every replica learn of it.
        notify::send(&mut *tx, BUILD_CHANNEL, &id).await?;
        tx.commit().await?;
        self.auth.prime(
            minted.hash,
            Principal {
                token_id: info.id,
                kind: PrincipalKind::Token(TokenKind::Build),
                user_id: None,
                organization_id: Some(project.organization_id.clone()),
                project_id: Some(project.id.clone()),
                build_id: Some(id.clone()),
                machine_id: None,
                scopes: TokenKind::Build.default_scopes(),
                memberships: Vec::new(),
                server_admin: false,
                expires_at: info.expires_at,
                ci: None,
            },
        );
        self.refs
            .insert(id, (Arc::new(BuildRef::from(&build)), Instant::now()));
        metrics::counter!("kiln_builds_created_total").increment(1);
        Ok((build, minted.secret, project))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
        crate::auth::ci::confirm_from(&self.pool, principal, &build.project_id).await?;
        authz::authorize(
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

    /// A build with its platforms and steps: the build insights.
    pub async fn details(&self, principal: &Principal, build_id: &str) -> Result<BuildDetails> {
        let build = self.get(principal, build_id).await?;
        let platforms = builds::platforms(&self.pool, &build.id).await?;
        let steps = builds::steps(&self.pool, &build.id).await?;
        Ok(BuildDetails {
            build,
            platforms,
            steps,
        })
    }

    /// A page of a project's builds, newest first. `page_token` is the previous page's
    /// `next_page_token` (empty: the first page); `page_size` absent or 0 means 100.
    pub async fn list(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        page_token: &str,
        page_size: Option<i64>,
    ) -> Result<BuildPage> {
        let page_size = pages::page_size(page_size, 100)?;
        let after = pages::decode_time_id(BUILDS_LISTING, page_token)?;
        let id = crate::projects::resolve_id(principal, project_id)?;
        let project =
            crate::projects::load_from(&self.pool, principal, &id, Action::ViewBuild).await?;
        let mut list = builds::list(&self.pool, &project.id, after, page_size + 1).await?;
        let next_page_token = if list.len() as i64 > page_size {
            list.truncate(page_size as usize);
            list.last()
                .map(|b| pages::encode_time_id(BUILDS_LISTING, b.created_at, &b.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(BuildPage {
            builds: list,
            next_page_token,
        })
    }

    /// A page of builds like [`Builds::list`], each with the platforms it asked for and
    /// who started it (a user's email, a token's name, or a CI identity).
    pub async fn list_described(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        page_token: &str,
        page_size: Option<i64>,
    ) -> Result<(Vec<DescribedBuild>, String)> {
        let page = self
            .list(principal, project_id, page_token, page_size)
            .await?;
        let ids: Vec<String> = page.builds.iter().map(|b| b.id.clone()).collect();
        let mut starters: Vec<String> = page
            .builds
            .iter()
            .filter_map(|b| b.created_by.clone())
            .collect();
        starters.sort();
        starters.dedup();
        let (platforms, tokens) = tokio::try_join!(
            builds::platforms_of(&self.pool, &ids),
            builds::starters(&self.pool, &starters)
        )?;
        let described = page
            .builds
            .into_iter()
            .map(|build| {
                let platforms = platforms
                    .iter()
                    .filter(|(id, _)| *id == build.id)
                    .map(|(_, p)| p.clone())
                    .collect();
                let started_by = build.created_by.as_deref().map(|by| {
                    match tokens.iter().find(|(id, ..)| id == by) {
                        Some((_, _, kind, Some(email))) if kind == "user" => email.clone(),
                        Some((_, name, kind, _)) => format!("{kind} token “{name}”"),
                        // CI identities are stored as they are (`oidc:<subject>`).
                        None => by.to_string(),
                    }
                });
                DescribedBuild {
                    build,
                    platforms,
                    started_by,
                }
            })
            .collect();
        Ok((described, page.next_page_token))
    }

    /// A build's options and a pull token for its image (`depot pull`).
    pub async fn pull_info(
        &self,
        principal: &Principal,
        tokens: &Tokens,
        build_id: &str,
    ) -> Result<(Build, tokens::PullToken)> {
        self.authorize(principal, build_id, Action::PullImages)
            .await?;
        let token = tokens
            .mint_pull_token(principal, None, Some(build_id))
            .await?;
        let build = builds::get(&self.pool, build_id)
            .await?
            .ok_or_else(|| Error::not_found("build", build_id))?;
        Ok((build, token))
    }

    /// Records that the CLI is alive (in memory, flushed in batches) and returns when the
    /// build must stop: its deadline, or now for a build that already finished.
    pub async fn report_health(
        &self,
        principal: &Principal,
        build_id: &str,
    ) -> Result<DateTime<Utc>> {
        let build = self
            .authorize(principal, build_id, Action::WriteBuild)
            .await?;
        self.health.report(&build.id);
        Ok(if build.finished {
            Utc::now()
        } else {
            build.cancels_at
        })
    }

    /// Stores build steps the CLI reports (BuildKit vertexes from ReportStatus and
    /// ReportStatusStream, or ReportTimings). Later reports of a step fill in its
    /// completion and error.
    pub async fn record_steps(
        &self,
        principal: &Principal,
        build_id: &str,
        steps: Vec<Step>,
    ) -> Result<()> {
        let build = self
            .authorize(principal, build_id, Action::WriteBuild)
            .await?;
        let steps: Vec<Step> = steps.into_iter().take(MAX_STEPS_PER_REPORT).collect();
        builds::upsert_steps(&self.pool, &build.id, &steps).await
    }

    /// Stores the Dockerfiles of a build (ReportBuildContext): (target, file name,
    /// contents), at most 100.
    pub async fn record_context(
        &self,
        principal: &Principal,
        build_id: &str,
        files: Vec<(String, String, String)>,
    ) -> Result<()> {
        let build = self
            .authorize(principal, build_id, Action::WriteBuild)
            .await?;
        if files.len() > 100 {
            return Err(Error::invalid("dockerfiles", "at most 100 per build"));
        }
        let files: Vec<(String, String, String)> = files
            .into_iter()
            .map(|(target, filename, contents)| {
                (
                    target.chars().take(200).collect(),
                    filename.chars().take(1000).collect(),
                    contents,
                )
            })
            .collect();
        builds::upsert_dockerfiles(&self.pool, &build.id, &files).await
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
        if let Err(err) = notify::send(&self.pool, BUILD_CHANNEL, build_id).await {
            tracing::warn!(error = %err, build_id, "could not announce a build change");
        }
    }

    /// Cancels a live build: its cancel deadline becomes now, so the CLI's next health
    /// report (within ~5 s) stops the build. False if it had already finished.
    pub async fn cancel(&self, principal: &Principal, build_id: &str) -> Result<bool> {
        let build = self
            .authorize(principal, build_id, Action::WriteBuild)
            .await?;
        let mut tx = self.pool.begin().await?;
        let canceled = builds::request_cancel(&mut *tx, &build.id).await?;
        if canceled {
            audit::record(
                &mut *tx,
                principal
                    .audit("build.cancel")
                    .org(&build.organization_id)
                    .target("build", &build.id)
                    .details(json!({ "project_id": build.project_id })),
            )
            .await?;
            notify::send(&mut *tx, BUILD_CHANNEL, &build.id).await?;
        }
        tx.commit().await?;
        self.forget(&build.id);
        Ok(canceled)
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

/// The page-token listing name of a project's builds.
const BUILDS_LISTING: &str = "builds";

/// The job kind of the periodic stale-build reaper.
pub const REAP_JOB: &str = "builds.reap_stale";

/// Most steps stored from one report.
const MAX_STEPS_PER_REPORT: usize = 10_000;

/// What a client asks to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// `build` or `bake`.
    pub command: String,
    /// The targets' options as the client sent them (kept for `depot pull`).
    pub options: serde_json::Value,
    /// The client wants the image saved to Kiln's registry (`--save`).
    pub save: bool,
    /// Build on an ephemeral builder with a cache volume of its own, deleted when the
    /// build ends; the project's cache is never read or written.
    pub ephemeral_cache: bool,
}

impl BuildSpec {
    /// A build with no CLI attached (the public API's CreateBuild, REST): the client
    /// drives BuildKit itself, so there are no targets' options to keep.
    pub fn without_cli() -> Self {
        BuildSpec {
            command: "build".into(),
            options: serde_json::json!([]),
            save: false,
            ephemeral_cache: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.save {
            return Err(Error::FailedPrecondition(
                "this Kiln has no image registry yet, so `--save` cannot store the image; \
                 build without --save (use --push to push to your own registry, or --load)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A build with its platforms and steps.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BuildDetails {
    pub build: Build,
    pub platforms: Vec<BuildPlatform>,
    pub steps: Vec<Step>,
}

/// A build with the platforms it asked for and who started it, for listings people read.
#[derive(Debug, Clone)]
pub struct DescribedBuild {
    pub build: Build,
    pub platforms: Vec<String>,
    pub started_by: Option<String>,
}

/// One page of builds and the token of the next page (empty on the last page).
#[derive(Debug, Clone)]
pub struct BuildPage {
    pub builds: Vec<Build>,
    pub next_page_token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saving_is_refused_until_there_is_a_registry() {
        let spec = BuildSpec {
            command: "build".into(),
            options: serde_json::json!([]),
            save: true,
            ephemeral_cache: false,
        };
        assert!(matches!(spec.validate(), Err(Error::FailedPrecondition(_))));
    }
}
