//! The layer-cache allocator: one volume per project and architecture, sized from the
//! project's settings, on a [`VolumeProvider`] (Ceph RBD in production, directories for
//! `kiln dev`).
//!
//! Volume rows (`crate::db::volumes`) carry a state machine: creating → available ⇄
//! attached, resizing while a grow is carried out, resetting once a reset retired the
//! volume (until its builder lets go), deleting → deleted, or failed. Every transition is
//! a conditional UPDATE; the storage work runs as idempotent jobs (`lifecycle`). The
//! operations callers reach (reset, a size change, listing) each run in one transaction
//! with their audit entry, like every domain operation.

pub mod ceph;
mod lifecycle;
pub mod local;
pub mod names;
pub mod provider;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::auth::Principal;
use crate::auth::authz::{self, Action, Target};
use crate::config::{CacheConfig, CacheCreateOn, CacheProviderKind, Config};
use crate::db::audit;
use crate::db::builds::Platform;
use crate::db::ids::new_id;
use crate::db::jobs::{self, NewJob};
use crate::db::projects::Project;
use crate::db::volumes::{self as rows, NewVolume, Volume};
use crate::error::{Error, Result};

pub use lifecycle::register_jobs;
pub use provider::{Attachment, Grant, ImageRef, VolumeProvider};

pub const RESET_JOB: &str = "cache.reset";
pub const CREATE_JOB: &str = "volumes.create";
pub const RESIZE_JOB: &str = "volumes.resize";
pub const DELETE_JOB: &str = "volumes.delete";
/// Enqueued by a trigger when a machine ends (migration 0008).
pub const RELEASE_JOB: &str = "volumes.release";
pub const METER_JOB: &str = "volumes.meter";
pub const SWEEP_JOB: &str = "volumes.sweep";
pub const RECONCILE_JOB: &str = "volumes.reconcile";

pub const GIB: i64 = 1 << 30;

const PLATFORMS: [Platform; 2] = [Platform::Amd64, Platform::Arm64];

/// What a reset did.
#[derive(Debug, Clone)]
pub struct CacheReset {
    pub project: Project,
    pub organization_name: String,
    /// The project's cache generation from now on.
    pub generation: i32,
    /// False when the cache was not used since the last reset (a reset racing another
    /// one, say): nothing changed.
    pub took_effect: bool,
    /// Volumes retired by this reset (deleted once their builders let go).
    pub retired: Vec<String>,
}

/// A volume as callers see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VolumeView {
    #[serde(flatten)]
    pub volume: Volume,
    /// What is pending, in words (a grow being carried out, a shrink waiting for reset).
    pub pending: Option<String>,
}

impl From<Volume> for VolumeView {
    fn from(volume: Volume) -> Self {
        let pending = if volume.target_size_bytes > volume.size_bytes {
            Some(format!("growing to {} GiB", volume.target_size_bytes / GIB))
        } else if volume.target_size_bytes < volume.size_bytes {
            Some(format!(
                "shrinks to {} GiB at the next cache reset",
                volume.target_size_bytes / GIB
            ))
        } else {
            None
        };
        VolumeView { volume, pending }
    }
}

/// What a machine's directive says about its volume.
#[derive(Debug, Clone, PartialEq)]
pub enum MachineVolume {
    /// The machine serves without a volume of Kiln's (providers that bring their own).
    None,
    /// Being created: the machine waits before starting BuildKit.
    Waiting,
    /// It could not be created: the machine cannot serve.
    Failed(String),
    Ready {
        volume_id: String,
        size_bytes: u64,
        /// BuildKit's GC keepBytes: the size minus the configured margin.
        gc_keep_bytes: u64,
        attachment: Attachment,
    },
}

pub struct Cache {
    pool: PgPool,
    provider: Arc<dyn VolumeProvider>,
    config: CacheConfig,
    /// The backing store's raw size, once known (0: not yet asked; u64::MAX: unbounded).
    raw_capacity: AtomicU64,
}

impl Cache {
    pub fn new(pool: PgPool, config: &Config) -> Self {
        let timeout = Duration::from_secs(config.cache.call_timeout_seconds);
        let provider: Arc<dyn VolumeProvider> = match config.cache.provider {
            CacheProviderKind::Local => {
                Arc::new(local::LocalVolumes::new(config.local_cache_dir()))
            }
            CacheProviderKind::Ceph => {
                Arc::new(ceph::CephVolumes::new(config.cache.ceph.clone(), timeout))
            }
        };
        Self::with_provider(pool, config.cache.clone(), provider)
    }

    pub fn with_provider(
        pool: PgPool,
        config: CacheConfig,
        provider: Arc<dyn VolumeProvider>,
    ) -> Self {
        Cache {
            pool,
            provider,
            config,
            raw_capacity: AtomicU64::new(0),
        }
    }

    pub fn provider(&self) -> &Arc<dyn VolumeProvider> {
        &self.provider
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Bytes the allocator may provision in all: capacity × overcommit ratio
    /// (`u64::MAX` when the provider reserves nothing and no capacity is configured).
    pub async fn capacity_limit(&self) -> Result<u64> {
        let raw = if self.config.capacity_gb > 0 {
            self.config.capacity_gb.saturating_mul(GIB as u64)
        } else {
            match self.raw_capacity.load(Ordering::Relaxed) {
                0 => self.refresh_capacity().await?,
                known => known,
            }
        };
        if raw == u64::MAX {
            return Ok(u64::MAX);
        }
        Ok((raw as f64 * self.config.overcommit_ratio) as u64)
    }

    /// Asks the provider for its raw size again (the metering job does, each pass).
    pub async fn refresh_capacity(&self) -> Result<u64> {
        let raw = self.provider.capacity().await?.unwrap_or(u64::MAX).max(1);
        self.raw_capacity.store(raw, Ordering::Relaxed);
        Ok(raw)
    }

    /// Checks a project's cache size (GiB) against the configured bounds.
    pub fn check_size(&self, field: &str, gb: i32) -> Result<()> {
        let (min, max) = (self.config.min_size_gb, self.config.max_size_gb);
        if !(min..=max).contains(&gb) {
            return Err(Error::invalid(
                field,
                format!("must be a whole number of GB between {min} and {max}, got {gb}"),
            ));
        }
        Ok(())
    }

    /// Makes room for `extra` more provisioned bytes, or refuses with
    /// `resource_exhausted`. Serialized across replicas by an advisory lock held until
    /// the caller's transaction ends, so two allocations never both take the last room.
    async fn reserve(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        extra: i64,
        what: &str,
    ) -> Result<()> {
        if extra <= 0 {
            return Ok(());
        }
        let limit = self.capacity_limit().await?.min(i64::MAX as u64) as i64;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kiln:cache-capacity'))")
            .execute(&mut **tx)
            .await?;
        let (allocated, _) = rows::totals(&mut **tx).await?;
        if limit < i64::MAX && allocated.saturating_add(extra) > limit {
            metrics::counter!("kiln_cache_capacity_refusals_total").increment(1);
            let free = (limit - allocated).max(0);
            return Err(Error::ResourceExhausted(format!(
                "not enough build-cache capacity for {what}: it needs {} GiB, {} GiB of {} GiB \
                 remain (cache capacity x cache.overcommit_ratio). Choose a smaller cache size, \
                 delete caches you no longer need, or ask the operator to add capacity",
                ceil_gib(extra),
                free / GIB,
                limit / GIB
            )));
        }
        Ok(())
    }

    /// A project's configured size for `platform`, in bytes.
    fn configured_size(project: &Project, platform: Platform) -> i64 {
        let gb = match platform {
            Platform::Amd64 => project.cache_size_gb_amd64,
            Platform::Arm64 => project.cache_size_gb_arm64,
        };
        i64::from(gb.max(1)) * GIB
    }

    /// Inserts a project volume (state `creating`) and its create job, within capacity.
    /// Returns `None` if another caller inserted the slot's volume first.
    async fn insert_project_volume(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project: &Project,
        generation: i32,
        platform: Platform,
        reserve: i64,
    ) -> Result<Option<Volume>> {
        let size = Self::configured_size(project, platform);
        self.reserve(
            tx,
            reserve,
            &format!("the {} cache of project {}", platform.as_str(), project.id),
        )
        .await?;
        let id = new_id();
        let namespace = names::project_namespace(&project.id)?;
        let image = format!("{}-{id}", names::project_image(platform, generation));
        let volume = rows::insert(
            &mut **tx,
            &NewVolume {
                id: &id,
                kind: "project",
                project_id: Some(&project.id),
                organization_id: &project.organization_id,
                platform: platform.as_str(),
                generation,
                namespace: &namespace,
                image: &image,
                size_bytes: size,
                parent_volume_id: None,
                snapshot: None,
                build_id: None,
            },
        )
        .await?;
        if let Some(volume) = &volume {
            enqueue(tx, CREATE_JOB, &volume.id).await?;
            metrics::counter!("kiln_cache_volumes_created_total").increment(1);
        }
        Ok(volume)
    }

    /// The volume the machine taking a project's slot serves from: the slot's live
    /// project volume, created (within capacity) if there is none yet. The caller holds
    /// the slot's lock; the volume is attached to `machine_id` in its transaction.
    pub async fn volume_for_slot(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project_id: &str,
        platform: Platform,
        machine_id: &str,
    ) -> Result<Volume> {
        for _ in 0..3 {
            let volume =
                match rows::live_project_volume(&mut **tx, project_id, platform.as_str(), false)
                    .await?
                {
                    Some(volume) => Some(volume),
                    None => {
                        let project = crate::db::projects::get(&mut **tx, project_id)
                            .await?
                            .ok_or_else(|| Error::not_found("project", project_id))?;
                        let generation = project_generation(&mut **tx, project_id).await?;
                        let size = Self::configured_size(&project, platform);
                        self.insert_project_volume(tx, &project, generation, platform, size)
                            .await?
                    }
                };
            if let Some(volume) = volume {
                rows::attach(&mut **tx, &volume.id, machine_id).await?;
                sqlx::query("UPDATE machines SET volume_id = $2 WHERE id = $1")
                    .bind(machine_id)
                    .bind(&volume.id)
                    .execute(&mut **tx)
                    .await?;
                return Ok(volume);
            }
        }
        Err(Error::Unavailable(
            "could not settle this project's cache volume; retry shortly".into(),
        ))
    }

    /// An extra (autoscaled) builder's volume: a copy-on-write clone of the slot's project
    /// volume, in the project's clone namespace, so the builder starts with the project's
    /// layers and nothing it writes reaches the project's image. Deleted with the builder.
    pub async fn clone_for_machine(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project_id: &str,
        platform: Platform,
        machine_id: &str,
    ) -> Result<Volume> {
        let parent = rows::live_project_volume(&mut **tx, project_id, platform.as_str(), false)
            .await?
            .ok_or_else(|| {
                Error::Unavailable(
                    "the project's cache volume is not ready for a second builder yet; retry shortly"
                        .into(),
                )
            })?;
        self.reserve(
            tx,
            parent.size_bytes,
            "a second builder's copy of the cache",
        )
        .await?;
        let id = new_id();
        let volume = rows::insert(
            &mut **tx,
            &NewVolume {
                id: &id,
                kind: "clone",
                project_id: Some(project_id),
                organization_id: &parent.organization_id,
                platform: platform.as_str(),
                generation: parent.generation,
                namespace: &names::clone_namespace(project_id)?,
                image: &names::clone_image(platform, machine_id)?,
                size_bytes: parent.size_bytes,
                parent_volume_id: Some(&parent.id),
                snapshot: Some(&names::clone_snapshot(machine_id)?),
                build_id: None,
            },
        )
        .await?
        .ok_or_else(|| Error::internal(anyhow::anyhow!("clone volume {id} collided")))?;
        self.hand_to(tx, &volume, machine_id).await?;
        Ok(volume)
    }

    /// An ephemeral build's volume: new and empty, in a namespace of the build's own, so
    /// the build never reads or writes the project's cache. Deleted with its builder,
    /// which serves only this build.
    pub async fn ephemeral_for_machine(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project_id: &str,
        build_id: &str,
        platform: Platform,
        machine_id: &str,
    ) -> Result<Volume> {
        let project = crate::db::projects::get(&mut **tx, project_id)
            .await?
            .ok_or_else(|| Error::not_found("project", project_id))?;
        let size = Self::configured_size(&project, platform);
        self.reserve(tx, size, "the build's own cache").await?;
        let id = new_id();
        let volume = rows::insert(
            &mut **tx,
            &NewVolume {
                id: &id,
                kind: "ephemeral",
                project_id: Some(project_id),
                organization_id: &project.organization_id,
                platform: platform.as_str(),
                generation: 0,
                namespace: &names::ephemeral_namespace(build_id)?,
                image: &names::ephemeral_image(platform),
                size_bytes: size,
                parent_volume_id: None,
                snapshot: None,
                build_id: Some(build_id),
            },
        )
        .await?
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "build {build_id} already has an ephemeral {} cache",
                platform.as_str()
            ))
        })?;
        self.hand_to(tx, &volume, machine_id).await?;
        Ok(volume)
    }

    /// Attaches a new volume to its machine and queues its creation.
    async fn hand_to(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        volume: &Volume,
        machine_id: &str,
    ) -> Result<()> {
        rows::attach(&mut **tx, &volume.id, machine_id).await?;
        sqlx::query("UPDATE machines SET volume_id = $2 WHERE id = $1")
            .bind(machine_id)
            .bind(&volume.id)
            .execute(&mut **tx)
            .await?;
        enqueue(tx, CREATE_JOB, &volume.id).await?;
        metrics::counter!("kiln_cache_volumes_created_total").increment(1);
        Ok(())
    }

    /// With `cache.create_on = "project"`, a new project's volumes are created with it.
    pub async fn project_created(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project: &Project,
    ) -> Result<()> {
        if self.config.create_on != CacheCreateOn::Project {
            return Ok(());
        }
        for platform in PLATFORMS {
            let size = Self::configured_size(project, platform);
            self.insert_project_volume(tx, project, 0, platform, size)
                .await?;
        }
        Ok(())
    }

    /// Carries a change of the project's cache sizes to its volumes, in the caller's
    /// transaction: a grow is reserved and queued; a shrink is recorded and applied at the
    /// next reset (shrinking a filesystem in use would corrupt it), refused while builds
    /// of that architecture run. Returns what the caller should be told.
    pub async fn apply_settings(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        before: &Project,
        after: &Project,
    ) -> Result<Vec<String>> {
        let mut notices = Vec::new();
        for platform in PLATFORMS {
            let (old, new) = (
                Self::configured_size(before, platform),
                Self::configured_size(after, platform),
            );
            if old == new {
                continue;
            }
            let Some(volume) =
                rows::live_project_volume(&mut **tx, &after.id, platform.as_str(), true).await?
            else {
                continue;
            };
            if volume.state == "creating" {
                // Not made yet: it is made at the new size.
                self.reserve(
                    tx,
                    new - volume.size_bytes.max(volume.target_size_bytes),
                    "the larger cache",
                )
                .await?;
                rows::set_sizes(&mut **tx, &volume.id, new, new).await?;
                continue;
            }
            if new > volume.size_bytes {
                self.reserve(
                    tx,
                    new - volume.size_bytes.max(volume.target_size_bytes),
                    &format!("growing the {} cache", platform.as_str()),
                )
                .await?;
                rows::request_grow(&mut **tx, &volume.id, new).await?;
                enqueue(tx, RESIZE_JOB, &volume.id).await?;
                notices.push(format!(
                    "The {} cache grows from {} GB to {} GB now, while builders keep using it.",
                    platform.as_str(),
                    volume.size_bytes / GIB,
                    new / GIB
                ));
            } else if new < volume.size_bytes {
                let running = running_builds(tx, &after.id, platform).await?;
                if running > 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot shrink the {} cache while {running} build(s) of this project \
                         use it; wait for them to finish (or cancel them) and try again",
                        platform.as_str()
                    )));
                }
                rows::set_sizes(&mut **tx, &volume.id, volume.size_bytes, new).await?;
                notices.push(format!(
                    "The {} cache stays at {} GB until its next reset, then starts over at {} GB: \
                     shrinking a cache in use would corrupt it. Reset it now with \
                     `depot cache reset` or POST /api/v1/projects/{}/cache/reset.",
                    platform.as_str(),
                    volume.size_bytes / GIB,
                    new / GIB,
                    after.id
                ));
            } else {
                // Back to the current size: nothing pending any more.
                rows::set_sizes(&mut **tx, &volume.id, volume.size_bytes, new).await?;
            }
        }
        Ok(notices)
    }

    /// Resets a project's cache (every architecture). `project_id` empty: the token's own
    /// project. The live volumes are retired and replaced by new, empty ones of the
    /// project's current size (which applies a pending shrink); builders of the old
    /// generation drain, and each retired image is deleted once its builder let go. A
    /// reset of a cache nobody used since the last reset changes nothing, so two resets
    /// racing each other (two replicas, a double click) take effect once.
    pub async fn reset(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
    ) -> Result<CacheReset> {
        let id = crate::projects::resolve_id(principal, project_id)?;
        let mut tx = self.pool.begin().await?;
        let project =
            crate::projects::load_for_update(&mut tx, principal, &id, Action::ResetCache).await?;
        let (used, generation, organization_name): (bool, i32, String) = sqlx::query_as(
            "SELECT p.cache_used, p.cache_generation, o.name FROM projects p
             JOIN organizations o ON o.id = p.organization_id WHERE p.id = $1",
        )
        .bind(&project.id)
        .fetch_one(&mut *tx)
        .await?;
        if !used {
            audit::record(
                &mut *tx,
                principal
                    .audit("cache.reset")
                    .org(&project.organization_id)
                    .target("project", &project.id)
                    .details(json!({ "generation": generation, "took_effect": false,
                                     "reason": "unused since the last reset" })),
            )
            .await?;
            tx.commit().await?;
            return Ok(CacheReset {
                project,
                organization_name,
                generation,
                took_effect: false,
                retired: Vec::new(),
            });
        }
        let generation: i32 = sqlx::query_scalar(
            "UPDATE projects SET cache_generation = cache_generation + 1, cache_reset_at = now(),
                 cache_used = false
             WHERE id = $1 RETURNING cache_generation",
        )
        .bind(&project.id)
        .fetch_one(&mut *tx)
        .await?;
        let mut retired = Vec::new();
        for volume in rows::live_project_volumes_for_update(&mut *tx, &project.id).await? {
            if !rows::transition(
                &mut *tx,
                &volume.id,
                &["creating", "available", "attached", "resizing"],
                "resetting",
            )
            .await?
            {
                continue;
            }
            enqueue(&mut tx, DELETE_JOB, &volume.id).await?;
            let platform = names::platform(&volume.platform)?;
            // The replacement takes the old one's room; only growth beyond it is new.
            let size = Self::configured_size(&project, platform);
            self.insert_project_volume(
                &mut tx,
                &project,
                generation,
                platform,
                size - volume.size_bytes.max(volume.target_size_bytes),
            )
            .await?;
            retired.push(volume.id);
        }
        audit::record(
            &mut *tx,
            principal
                .audit("cache.reset")
                .org(&project.organization_id)
                .target("project", &project.id)
                .details(json!({ "generation": generation, "took_effect": true,
                                 "retired_volumes": retired })),
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
            took_effect: true,
            retired,
        })
    }

    /// The project is being deleted (in the caller's transaction): its volumes go.
    pub async fn project_deleted(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project_id: &str,
    ) -> Result<usize> {
        let ids = rows::mark_project_deleting(&mut **tx, project_id).await?;
        for id in &ids {
            enqueue(tx, DELETE_JOB, id).await?;
        }
        Ok(ids.len())
    }

    /// A project's volumes (every architecture, those still holding an image).
    pub async fn list(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
    ) -> Result<Vec<VolumeView>> {
        let id = crate::projects::resolve_id(principal, project_id)?;
        let project =
            crate::projects::load_from(&self.pool, principal, &id, Action::ViewProject).await?;
        Ok(rows::of_project(&self.pool, &project.id)
            .await?
            .into_iter()
            .map(VolumeView::from)
            .collect())
    }

    /// One volume. Volumes the caller cannot see are `not_found`, like unknown ones.
    pub async fn get(&self, principal: &Principal, volume_id: &str) -> Result<VolumeView> {
        let volume = match crate::db::ids::is_well_formed(volume_id) {
            true => rows::get(&self.pool, volume_id).await?,
            false => None,
        };
        let volume = volume.ok_or_else(|| Error::not_found("volume", volume_id))?;
        let Some(project_id) = volume.project_id.as_deref() else {
            return Err(Error::not_found("volume", volume_id));
        };
        crate::auth::ci::confirm_from(&self.pool, principal, project_id).await?;
        let target = Target::Project {
            id: project_id,
            organization_id: &volume.organization_id,
        };
        authz::authorize(principal, Action::ViewProject, target)
            .map_err(|_| Error::not_found("volume", volume_id))?;
        Ok(volume.into())
    }

    /// What the directive of `machine_id` says about its volume: for a ready one, the
    /// machine's scoped access (created now, revoked when the machine ends) and the
    /// attachment. Locks that machines no longer live still hold are broken first,
    /// which fences them.
    pub async fn for_machine(&self, machine_id: &str) -> Result<MachineVolume> {
        let Some(volume) = rows::of_machine(&self.pool, machine_id).await? else {
            return Ok(MachineVolume::None);
        };
        match volume.state.as_str() {
            "creating" => return Ok(MachineVolume::Waiting),
            "failed" | "deleted" => {
                return Ok(MachineVolume::Failed(format!(
                    "its cache volume is {}{}",
                    volume.state,
                    volume
                        .error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )));
            }
            _ => {}
        }
        let image = ImageRef::new(&volume.namespace, &volume.image);
        let parent_namespace = match &volume.parent_volume_id {
            Some(parent) => rows::get(&self.pool, parent).await?.map(|p| p.namespace),
            None => None,
        };
        let access = self
            .provider
            .grant(Grant {
                machine_id,
                writable: &volume.namespace,
                readable: parent_namespace.as_deref(),
            })
            .await?;
        for holder in self.provider.lockers(&image).await? {
            if holder != machine_id && !machine_is_live(&self.pool, &holder).await? {
                self.provider.break_lock(&image, &holder).await?;
                metrics::counter!("kiln_cache_fenced_total").increment(1);
            }
        }
        let size = volume.size_bytes.max(0) as u64;
        let margin = u64::from(self.config.gc_margin_percent);
        Ok(MachineVolume::Ready {
            volume_id: volume.id,
            size_bytes: size,
            gc_keep_bytes: size / 100 * (100 - margin),
            attachment: self.provider.attachment(&image, access),
        })
    }
}

/// Whole GiB, rounded up (for messages).
fn ceil_gib(bytes: i64) -> i64 {
    (bytes + GIB - 1) / GIB
}

async fn enqueue(tx: &mut Transaction<'_, Postgres>, kind: &str, volume_id: &str) -> Result<()> {
    jobs::enqueue(
        &mut **tx,
        NewJob::new(kind, json!({ "volume_id": volume_id })).dedupe(volume_id.to_string()),
    )
    .await?;
    Ok(())
}

async fn project_generation<'e>(db: impl sqlx::PgExecutor<'e>, project_id: &str) -> Result<i32> {
    Ok(
        sqlx::query_scalar("SELECT cache_generation FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_one(db)
            .await?,
    )
}

async fn running_builds(
    tx: &mut Transaction<'_, Postgres>,
    project_id: &str,
    platform: Platform,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM build_platforms bp JOIN builds b ON b.id = bp.build_id
         WHERE b.project_id = $1 AND bp.platform = $2 AND b.state IN ('queued', 'running')
           AND bp.state IN ('pending', 'assigned', 'ready')",
    )
    .bind(project_id)
    .bind(platform.as_str())
    .fetch_one(&mut **tx)
    .await?)
}

async fn machine_is_live(pool: &PgPool, machine_id: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM machines WHERE id = $1
                        AND state IN ('requested', 'launching', 'booting', 'ready', 'assigned', 'draining'))",
    )
    .bind(machine_id)
    .fetch_one(pool)
    .await?)
}
