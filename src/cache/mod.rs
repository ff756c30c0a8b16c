//! The layer cache of each project and architecture.
//!
//! A reset bumps the project's `cache_generation` in the same transaction as its audit
//! entry and a `cache.reset` job (deduplicated per generation, so a reset is carried out
//! once however often the job is retried). Each builder remembers the generation it was
//! started for: the scheduler never hands a build to a builder of an older generation,
//! and the job drains such builders and terminates the idle ones, so their caches are
//! gone. The volume allocator will delete the old generation's volumes here too.

use std::sync::Arc;

use serde_json::json;
use sqlx::PgPool;

use crate::auth::{Action, Principal};
use crate::db::audit;
use crate::db::jobs::{self, NewJob};
use crate::db::projects::Project;
use crate::error::Result;
use crate::jobs::JobRunner;
use crate::scheduler::Scheduler;

pub const RESET_JOB: &str = "cache.reset";

/// What a reset did.
#[derive(Debug, Clone)]
pub struct CacheReset {
    pub project: Project,
    pub organization_name: String,
    /// The project's cache generation from now on.
    pub generation: i32,
}

/// Resets a project's cache (every architecture). `project_id` empty: the token's own
/// project.
pub async fn reset(
    pool: &PgPool,
    principal: &Principal,
    project_id: Option<&str>,
) -> Result<CacheReset> {
    let id = crate::projects::resolve_id(principal, project_id)?;
    let mut tx = pool.begin().await?;
    let project =
        crate::projects::load_for_update(&mut *tx, principal, &id, Action::ResetCache).await?;
    let (generation, organization_name): (i32, String) = sqlx::query_as(
        "UPDATE projects p SET cache_generation = cache_generation + 1, cache_reset_at = now()
         FROM organizations o
         WHERE p.id = $1 AND o.id = p.organization_id
         RETURNING p.cache_generation, o.name",
    )
    .bind(&project.id)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        principal
            .audit("cache.reset")
            .org(&project.organization_id)
            .target("project", &project.id)
            .details(json!({ "generation": generation })),
    )
    .await?;
    jobs::enqueue(
        &mut *tx,
        NewJob::new(
            RESET_JOB,
            json!({ "project_id": project.id, "generation": generation }),
        )
        .dedupe(format!("{}:{generation}", project.id)),
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("kiln_cache_resets_total").increment(1);
    Ok(CacheReset {
        project,
        organization_name,
        generation,
    })
}

pub fn register_jobs(runner: &mut JobRunner, scheduler: Arc<Scheduler>) {
    runner.register_with(RESET_JOB, scheduler, |scheduler, job| async move {
        let project_id = job.payload["project_id"].as_str().unwrap_or_default();
        let generation = job.payload["generation"]
            .as_i64()
            .and_then(|g| i32::try_from(g).ok())
            .unwrap_or(0);
        let retired = scheduler
            .retire_cache_generation(project_id, generation)
            .await?;
        tracing::info!(project_id, generation, retired, "cache reset carried out");
        Ok(())
    });
}
