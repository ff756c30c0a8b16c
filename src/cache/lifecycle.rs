//! The volume jobs. Each is idempotent: it re-reads the row, does the storage call
//! (which succeeds when already done), then moves the row on with a conditional UPDATE,
//! so a retried, duplicated or timed-out attempt converges on the same state.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::PgPool;

use super::{
    CREATE_JOB, Cache, DELETE_JOB, GIB, ImageRef, METER_JOB, RECONCILE_JOB, RELEASE_JOB, RESET_JOB,
    RESIZE_JOB, SWEEP_JOB,
};
use crate::db::jobs::{self, ClaimedJob, NewJob};
use crate::db::volumes::{self as rows, Volume};
use crate::error::Result;
use crate::jobs::JobRunner;
use crate::scheduler::Scheduler;

/// Volumes measured at once during a metering pass.
const METER_CONCURRENCY: usize = 16;
const METER_BATCH: i64 = 500;

/// What a metering pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterPass {
    pub volumes: usize,
    pub used_bytes: u64,
    pub failures: usize,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Images seen without an owner for the first time.
    pub new_orphans: Vec<ImageRef>,
    /// Images removed after the grace period.
    pub removed: Vec<ImageRef>,
    pub removed_namespaces: Vec<String>,
}

fn volume_id(job: &ClaimedJob) -> String {
    job.payload["volume_id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

impl Cache {
    async fn image_of(&self, volume: &Volume) -> ImageRef {
        ImageRef::new(&volume.namespace, &volume.image)
    }

    /// Create job: makes the image (a clone of its parent for clones), then the volume
    /// is available, or attached if a machine already waits for it.
    pub async fn run_create(&self, volume_id: &str) -> Result<()> {
        let Some(volume) = rows::get(&self.pool, volume_id).await? else {
            return Ok(());
        };
        if volume.state != "creating" {
            return Ok(());
        }
        let image = self.image_of(&volume).await;
        match (&volume.parent_volume_id, &volume.snapshot) {
            (Some(parent_id), Some(snapshot)) => {
                let parent = rows::get(&self.pool, parent_id).await?.ok_or_else(|| {
                    crate::error::Error::FailedPrecondition(format!(
                        "the parent volume {parent_id} of clone {volume_id} is gone"
                    ))
                })?;
                if parent.state == "creating" {
                    return Err(crate::error::Error::Unavailable(format!(
                        "the parent volume {parent_id} of clone {volume_id} is still being created"
                    )));
                }
                let parent = ImageRef::new(&parent.namespace, &parent.image);
                self.provider.clone_image(&parent, snapshot, &image).await?;
            }
            _ => {
                self.provider
                    .create(&image, volume.size_bytes.max(1) as u64)
                    .await?;
            }
        }
        if let Some(holder) = rows::created(&self.pool, volume_id).await? {
            // Its machine waits with BuildKit stopped; its directive now carries the volume.
            crate::db::machines::bump_directive(&self.pool, &holder).await?;
        }
        tracing::info!(volume_id, image = %image, "cache volume created");
        Ok(())
    }

    /// Resize job: grows the image to the volume's target size, then records it and
    /// tells the machine holding it (its agent grows the filesystem).
    pub async fn run_resize(&self, volume_id: &str) -> Result<()> {
        loop {
            let Some(volume) = rows::get(&self.pool, volume_id).await? else {
                return Ok(());
            };
            if !matches!(volume.state.as_str(), "available" | "attached" | "resizing") {
                return Ok(());
            }
            let target = volume.target_size_bytes;
            if target > volume.size_bytes {
                let image = self.image_of(&volume).await;
                self.provider.grow(&image, target as u64).await?;
                tracing::info!(volume_id, image = %image, size_gib = target / GIB, "cache volume grown");
            }
            let (still_resizing, holder) = rows::resized(&self.pool, volume_id, target).await?;
            if let Some(holder) = holder {
                crate::db::machines::bump_directive(&self.pool, &holder).await?;
            }
            if !still_resizing {
                return Ok(());
            }
        }
    }

    /// Delete job: once no live machine holds the volume (and no clone hangs off it),
    /// removes the image, then its namespace if nothing else lives there.
    pub async fn run_delete(&self, volume_id: &str) -> Result<()> {
        let Some(volume) = rows::get(&self.pool, volume_id).await? else {
            return Ok(());
        };
        if !matches!(volume.state.as_str(), "resetting" | "deleting") {
            return Ok(());
        }
        if let Some(holder) = &volume.machine_id
            && super::machine_is_live(&self.pool, holder).await?
        {
            // Its builder drains first; the machine's end queues this job again.
            tracing::debug!(
                volume_id,
                holder,
                "cache volume still held; deleting it later"
            );
            return Ok(());
        }
        if rows::live_children(&self.pool, volume_id).await? > 0 {
            tracing::debug!(
                volume_id,
                "cache volume still has clones; deleting it later"
            );
            return Ok(());
        }
        rows::transition(&self.pool, volume_id, &["resetting"], "deleting").await?;
        let image = self.image_of(&volume).await;
        self.provider.remove(&image).await?;
        if let (Some(parent_id), Some(snapshot)) = (&volume.parent_volume_id, &volume.snapshot)
            && let Some(parent) = rows::get(&self.pool, parent_id).await?
        {
            let parent_image = ImageRef::new(&parent.namespace, &parent.image);
            self.provider
                .remove_snapshot(&parent_image, snapshot)
                .await?;
            if matches!(parent.state.as_str(), "resetting" | "deleting") {
                queue(&self.pool, DELETE_JOB, parent_id).await?;
            }
        }
        rows::transition(&self.pool, volume_id, &["deleting"], "deleted").await?;
        metrics::gauge!("kiln_cache_volume_used_bytes", "volume_id" => volume.id.clone()).set(0.0);
        metrics::counter!("kiln_cache_volumes_deleted_total").increment(1);
        if !rows::namespace_in_use(&self.pool, &volume.namespace).await?
            && let Err(err) = self.provider.remove_namespace(&volume.namespace).await
        {
            tracing::warn!(namespace = %volume.namespace, error = %err, "could not remove an empty cache namespace; the sweep retries");
        }
        tracing::info!(volume_id, image = %image, "cache volume deleted");
        Ok(())
    }

    /// Release job (queued by the database when a machine ends): revokes the machine's
    /// storage access and deletes the volumes it left behind.
    pub async fn run_release(&self, machine_id: &str) -> Result<()> {
        if super::names::machine_client(machine_id).is_ok() {
            self.provider.revoke(machine_id).await?;
        }
        self.queue_unheld_deletes().await?;
        Ok(())
    }

    /// Queues the delete job of every retired volume no live machine holds.
    async fn queue_unheld_deletes(&self) -> Result<usize> {
        let ids = rows::unheld_retired(&self.pool).await?;
        for id in &ids {
            queue(&self.pool, DELETE_JOB, id).await?;
        }
        Ok(ids.len())
    }

    /// Reconcile job: re-queues the work of every volume in a transitional state (a job
    /// whose wake-up was lost, or that gave up before the cause went away).
    pub async fn reconcile(&self) -> Result<usize> {
        let mut queued = self.queue_unheld_deletes().await?;
        for (kind, state) in [(CREATE_JOB, "creating"), (RESIZE_JOB, "resizing")] {
            for id in rows::stale_in_state(&self.pool, state).await? {
                queue(&self.pool, kind, &id).await?;
                queued += 1;
            }
        }
        Ok(queued)
    }

    /// Measures every volume's usage (what `rbd du` reports) and publishes the totals.
    pub async fn meter(&self) -> Result<MeterPass> {
        if let Err(err) = self.refresh_capacity().await {
            tracing::warn!(error = %err, "could not read the cache store's capacity");
        }
        let mut pass = MeterPass::default();
        let mut after = String::new();
        loop {
            let batch = rows::meterable(&self.pool, &after, METER_BATCH).await?;
            let Some(last) = batch.last() else {
                break;
            };
            after = last.id.clone();
            let measured: Vec<(Volume, Result<u64>)> = futures_util::stream::iter(batch)
                .map(|volume| async move {
                    let image = ImageRef::new(&volume.namespace, &volume.image);
                    let used = self.provider.used(&image).await;
                    (volume, used)
                })
                .buffer_unordered(METER_CONCURRENCY)
                .collect()
                .await;
            let mut ids = Vec::with_capacity(measured.len());
            let mut used = Vec::with_capacity(measured.len());
            for (volume, result) in measured {
                match result {
                    Ok(bytes) => {
                        metrics::gauge!("kiln_cache_volume_used_bytes",
                            "volume_id" => volume.id.clone(),
                            "project_id" => volume.project_id.clone().unwrap_or_default(),
                            "platform" => volume.platform.clone())
                        .set(bytes as f64);
                        pass.used_bytes += bytes;
                        ids.push(volume.id);
                        used.push(bytes.min(i64::MAX as u64) as i64);
                    }
                    Err(err) => {
                        pass.failures += 1;
                        tracing::debug!(volume_id = %volume.id, error = %err, "could not measure a cache volume");
                    }
                }
            }
            pass.volumes += ids.len();
            rows::record_usage(&self.pool, &ids, &used).await?;
        }
        let (allocated, used) = rows::totals(&self.pool).await?;
        metrics::gauge!("kiln_cache_allocated_bytes").set(allocated as f64);
        metrics::gauge!("kiln_cache_used_bytes").set(used as f64);
        if let Ok(limit) = self.capacity_limit().await
            && limit < u64::MAX
        {
            metrics::gauge!("kiln_cache_capacity_bytes").set(limit as f64);
        }
        Ok(pass)
    }

    /// Sweep job: removes images no row owns once they stayed unowned for
    /// `cache.sweep_grace_seconds`, and empty namespaces of Kiln's that no row uses.
    pub async fn sweep(&self) -> Result<Sweep> {
        let mut report = Sweep::default();
        let images = self.provider.list().await?;
        let owned: HashSet<(String, String)> =
            rows::owned_images(&self.pool).await?.into_iter().collect();
        let unowned: Vec<&ImageRef> = images
            .iter()
            .filter(|i| !owned.contains(&(i.namespace.clone(), i.image.clone())))
            .collect();
        rows::forget_orphans_except(&self.pool, &unowned).await?;
        for image in unowned {
            match rows::note_orphan(&self.pool, image, self.config.sweep_grace_seconds).await? {
                (true, _) => {
                    tracing::warn!(image = %image, "found a cache image no volume owns; removing it after the grace period");
                    report.new_orphans.push(image.clone());
                }
                (false, true) => {
                    // Owned again meanwhile (a row committed after the listing)? Look once more.
                    if rows::owns(&self.pool, image).await? {
                        continue;
                    }
                    self.provider.remove(image).await?;
                    rows::forget_orphan(&self.pool, image).await?;
                    metrics::counter!("kiln_cache_orphans_removed_total").increment(1);
                    tracing::warn!(image = %image, "removed an orphan cache image");
                    report.removed.push(image.clone());
                }
                (false, false) => {}
            }
        }
        let with_images: HashSet<&str> = images.iter().map(|i| i.namespace.as_str()).collect();
        for namespace in self.provider.namespaces().await? {
            if with_images.contains(namespace.as_str())
                || rows::namespace_in_use(&self.pool, &namespace).await?
            {
                continue;
            }
            self.provider.remove_namespace(&namespace).await?;
            report.removed_namespaces.push(namespace);
        }
        Ok(report)
    }
}

async fn queue(pool: &PgPool, kind: &str, volume_id: &str) -> Result<()> {
    jobs::enqueue(
        pool,
        NewJob::new(kind, serde_json::json!({ "volume_id": volume_id }))
            .dedupe(volume_id.to_string()),
    )
    .await?;
    Ok(())
}

/// The cache's jobs: per-volume create, resize and delete, the release of an ended
/// machine's volumes, a reset's retirement of old builders, and the periodic metering,
/// reconciling and sweep.
pub fn register_jobs(runner: &mut JobRunner, cache: Arc<Cache>, scheduler: Arc<Scheduler>) {
    let usage_every = Duration::from_secs(cache.config.usage_interval_seconds);
    let sweep_every = Duration::from_secs(cache.config.sweep_interval_seconds);
    runner
        .register_with(CREATE_JOB, cache.clone(), |c, job| async move {
            Ok(c.run_create(&volume_id(&job)).await?)
        })
        .on_give_up(
            CREATE_JOB,
            Arc::new((cache.clone(), scheduler.clone())),
            |state, job, error| async move {
                let (cache, scheduler) = &*state;
                let id = volume_id(&job);
                if let Some(holder) = rows::fail(&cache.pool, &id, &error).await? {
                    scheduler
                        .fail_and_requeue(&holder, &format!("its cache volume could not be created: {error}"))
                        .await?;
                }
                tracing::error!(volume_id = %id, error, "gave up creating a cache volume");
                Ok(())
            },
        )
        .register_with(RESIZE_JOB, cache.clone(), |c, job| async move {
            Ok(c.run_resize(&volume_id(&job)).await?)
        })
        .on_give_up(RESIZE_JOB, cache.clone(), |c, job, error| async move {
            let id = volume_id(&job);
            rows::abandon_grow(&c.pool, &id, &error).await?;
            tracing::error!(volume_id = %id, error, "gave up growing a cache volume; it keeps its size");
            Ok(())
        })
        .register_with(DELETE_JOB, cache.clone(), |c, job| async move {
            Ok(c.run_delete(&volume_id(&job)).await?)
        })
        .on_give_up(DELETE_JOB, cache.clone(), |c, job, error| async move {
            let id = volume_id(&job);
            rows::record_error(&c.pool, &id, &error).await?;
            metrics::counter!("kiln_cache_delete_failures_total").increment(1);
            tracing::error!(volume_id = %id, error, "gave up deleting a cache volume; the reconciler retries");
            Ok(())
        })
        .register_with(RELEASE_JOB, cache.clone(), |c, job| async move {
            let machine_id = job.payload["machine_id"].as_str().unwrap_or_default();
            Ok(c.run_release(machine_id).await?)
        })
        .register_with(RESET_JOB, scheduler, |scheduler, job| async move {
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
        })
        .register_with(METER_JOB, cache.clone(), |c, _| async move {
            let pass = c.meter().await?;
            tracing::debug!(volumes = pass.volumes, used = pass.used_bytes, "metered cache volumes");
            Ok(())
        })
        .every(METER_JOB, usage_every)
        .register_with(RECONCILE_JOB, cache.clone(), |c, _| async move {
            c.reconcile().await?;
            Ok(())
        })
        .every(RECONCILE_JOB, Duration::from_secs(30))
        .register_with(SWEEP_JOB, cache, |c, _| async move {
            c.sweep().await?;
            Ok(())
        })
        .every(SWEEP_JOB, sweep_every);
}
