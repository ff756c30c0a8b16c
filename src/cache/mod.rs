//! The layer cache of each project and architecture.
//!
//! A reset bumps the project's `cache_generation` in the same transaction as its audit
//! entry and a `cache.reset` job (deduplicated per generation, so a reset is carried out
//! once however often the job is retried). Builders attach the volume of the current
//! generation, so a reset takes effect for the next build at once; the job deletes the
//! old generation's volumes once the volume allocator exists.

use serde_json::json;
use sqlx::PgPool;

use crate::auth::Principal;
use crate::db::audit::{self, AuditEvent};
use crate::db::jobs::{self, NewJob};
use crate::db::projects::Project;
use crate::error::Result;
use crate::jobs::JobRunner;

pub const RESET_JOB: &str = "cache.reset";

/// Resets a project's cache (every architecture). Returns the new generation.
pub async fn reset(pool: &PgPool, principal: &Principal, project: &Project) -> Result<i32> {
    let mut tx = pool.begin().await?;
    let generation: i32 = sqlx::query_scalar(
        "UPDATE projects SET cache_generation = cache_generation + 1, cache_reset_at = now()
         WHERE id = $1 RETURNING cache_generation",
    )
    .bind(&project.id)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        AuditEvent::by("cache.reset", principal)
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
    Ok(generation)
}

pub fn register_jobs(runner: &mut JobRunner) {
    runner.register(RESET_JOB, |job| async move {
        // No volumes are allocated yet, so there is nothing older to delete. The volume
        // allocator hooks in here: delete volumes of generations < this one.
        tracing::info!(payload = %job.payload, "cache reset recorded");
        Ok(())
    });
}
