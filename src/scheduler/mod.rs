//! Builder scheduling: assigns each build platform to its project's builder for that
//! architecture, launching one when the slot is empty.
//!
//! Machine states: requested → launching → booting → ready ⇄ assigned, then draining →
//! terminated, or failed. Every transition is one conditional UPDATE; a unique index on
//! live machines per (project, platform) makes a second launch for a slot impossible,
//! whichever replica asks. Launches run as deduplicated jobs keyed by machine id.

pub mod agents;
pub mod ec2;
pub mod local;
pub mod provider;
pub mod sim;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::config::{BuildersConfig, ProviderKind};
use crate::db::builds::Platform;
use crate::db::ids::new_id;
use crate::db::jobs::{self, ClaimedJob, NewJob};
use crate::error::{Error, Result};
use crate::pki::Pki;
use provider::{AgentBootstrap, ComputeProvider, LaunchSpec};

pub const SCHEDULER_CHANNEL: &str = "kiln_scheduler";
/// Payload: a machine id whose directive changed (sent by a trigger, see migration 0006).
pub const MACHINE_CHANNEL: &str = "kiln_machines";
pub const LAUNCH_JOB: &str = "machines.launch";
pub const REAP_JOB: &str = "machines.reap";
pub const TERMINATE_JOB: &str = "machines.terminate";
pub const POOL_JOB: &str = "machines.pool";
pub const RECONCILE_JOB: &str = "machines.reconcile";

const LIVE_STATES: &str = "('requested', 'launching', 'booting', 'ready', 'assigned', 'draining')";

/// Within this many machines of `builders.max_machines_total`, new machines are counted
/// under a global lock (more than the requests that can be in flight at once).
const TOTAL_CAP_MARGIN: i64 = 64;

/// What one reconciler pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Machines whose instance vanished: failed, their builds requeued.
    pub vanished: Vec<String>,
    /// Machines stuck booting past the deadline: terminated, failed, builds requeued.
    pub stuck: Vec<String>,
    /// Orphan instances seen for the first time (kept through the grace period).
    pub new_orphans: Vec<String>,
    /// Orphan instances terminated after the grace period.
    pub terminated_orphans: Vec<String>,
    /// Machines whose agent stopped reporting: failed, builds requeued, terminated.
    pub silent: Vec<String>,
    /// Machines whose launch ended without an instance (the job gave up): failed, builds
    /// requeued.
    pub stalled: Vec<String>,
}

pub struct Scheduler {
    pool: PgPool,
    pub provider: Arc<dyn ComputeProvider>,
    /// Layer-cache volumes for the machines that take a project's slot.
    cache: Arc<crate::cache::Cache>,
    config: BuildersConfig,
    kek: Option<[u8; 32]>,
    pki: OnceCell<Arc<Pki>>,
    wake: Arc<Notify>,
    /// Where agents call; set by `serve` once it knows its address.
    agent_api_url: std::sync::OnceLock<String>,
    /// Bounds the audit rows refused agent calls write (see `agents::record_refusal`).
    refusal_audits: governor::DefaultDirectRateLimiter,
}

/// Where a platform stands after an assignment attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Its builder is ready.
    Ready,
    /// Its builder is starting.
    Waiting,
    /// Nothing to do: already released, or locked by another replica right now.
    Skipped,
    /// Every builder of the project's slot is at its autoscaling cap, and the slot has
    /// its most builders: the platform stays pending until a build finishes.
    Queued,
}

/// A live builder of a project's slot, as assignment sees it.
#[derive(Debug, sqlx::FromRow)]
struct SlotMachine {
    id: String,
    state: String,
    serving: bool,
    stale: bool,
    role: String,
    active_builds: i32,
}

impl SlotMachine {
    fn ready(&self) -> bool {
        (self.state == "ready" || self.state == "assigned") && self.serving
    }
}

impl Scheduler {
    pub fn new(
        pool: PgPool,
        config: BuildersConfig,
        kek: Option<[u8; 32]>,
        refusal_audits_per_minute: u32,
        cache: Arc<crate::cache::Cache>,
    ) -> Self {
        let provider: Arc<dyn ComputeProvider> = match config.provider {
            ProviderKind::Local => Arc::new(local::LocalProvider::new(&config.local)),
            ProviderKind::Ec2 => Arc::new(ec2::Ec2Provider::new(&config.ec2)),
            ProviderKind::Sim => Arc::new(sim::SimProvider::default()),
        };
        Scheduler {
            pool,
            provider,
            cache,
            config,
            kek,
            pki: OnceCell::new(),
            wake: Arc::new(Notify::new()),
            agent_api_url: std::sync::OnceLock::new(),
            refusal_audits: governor::RateLimiter::direct(governor::Quota::per_minute(
                std::num::NonZeroU32::new(refusal_audits_per_minute)
                    .unwrap_or(std::num::NonZeroU32::MIN),
            )),
        }
    }

    /// The URL agents use: `builders.agent_api_url`, else what `serve` reported (the
    /// address it listens on for the local provider, its public URL otherwise).
    pub fn set_agent_api_url(&self, url: String) {
        let _ = self.agent_api_url.set(url);
    }

    fn agent_api_ca_pem(&self) -> Result<Option<String>> {
        let path = &self.config.agent_api_ca_file;
        if path.as_os_str().is_empty() {
            return Ok(None);
        }
        std::fs::read_to_string(path).map(Some).map_err(|e| {
            Error::FailedPrecondition(format!(
                "cannot read builders.agent_api_ca_file {}: {e}",
                path.display()
            ))
        })
    }

    fn agent_api_url(&self) -> Result<String> {
        if !self.config.agent_api_url.is_empty() {
            return Ok(self.config.agent_api_url.clone());
        }
        self.agent_api_url.get().cloned().ok_or_else(|| {
            Error::FailedPrecondition(
                "builder agents need an API URL: set builders.agent_api_url or run kiln serve"
                    .into(),
            )
        })
    }

    /// The BuildKit CA, loaded (or created) on first use.
    pub async fn pki(&self) -> Result<Arc<Pki>> {
        let kek = self.kek.ok_or_else(|| {
            Error::FailedPrecondition(
                "builds need secrets.key_encryption_key to issue BuildKit certificates; ask the operator to set it".into(),
            )
        })?;
        self.pki
            .get_or_try_init(|| Pki::load_or_create(&self.pool, &kek))
            .await
            .cloned()
    }

    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Assigns one build platform, inline (GetBuildKitConnection calls this so an idle
    /// builder is handed out without a round trip through the scheduler loop).
    pub async fn assign(&self, build_id: &str, platform: Platform) -> Result<Assignment> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT bp.state, b.project_id FROM build_platforms bp JOIN builds b ON b.id = bp.build_id
             WHERE bp.build_id = $1 AND bp.platform = $2 AND b.state IN ('queued', 'running')
             FOR UPDATE OF bp SKIP LOCKED",
        )
        .bind(build_id)
        .bind(platform.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match row {
            Some((state, project_id)) if state == "pending" => {
                self.assign_locked(&mut tx, build_id, platform, &project_id)
                    .await?
            }
            Some((state, _)) if state == "ready" => Assignment::Ready,
            Some((state, _)) if state == "assigned" => Assignment::Waiting,
            _ => Assignment::Skipped,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Assigns a locked pending platform to a builder of its project and architecture,
    /// requesting one if needed: the slot's primary builder, or with autoscaling the
    /// least busy builder under `autoscaling_builds_per_builder`, adding extra builders
    /// up to `autoscaling_max_builders`. Builds asking for an ephemeral cache get a
    /// builder of their own.
    async fn assign_locked(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        build_id: &str,
        platform: Platform,
        project_id: &str,
    ) -> Result<Assignment> {
        let (ephemeral, autoscaling, per_builder, max_builders): (bool, bool, i32, i32) =
            sqlx::query_as(
                "SELECT b.ephemeral_cache, p.autoscaling_enabled, p.autoscaling_builds_per_builder,
                        p.autoscaling_max_builders
                 FROM builds b JOIN projects p ON p.id = b.project_id WHERE b.id = $1",
            )
            .bind(build_id)
            .fetch_one(&mut **tx)
            .await?;
        if ephemeral {
            return self
                .assign_ephemeral(tx, build_id, platform, project_id)
                .await;
        }
        // A reset from now on has something to clear (see `cache::Cache::reset`).
        sqlx::query("UPDATE projects SET cache_used = true WHERE id = $1 AND NOT cache_used")
            .bind(project_id)
            .execute(&mut **tx)
            .await?;
        let mut slot_locked = false;
        for _ in 0..8 {
            let machines: Vec<SlotMachine> = sqlx::query_as(
                "SELECT m.id, m.state, m.serving, m.cache_generation < p.cache_generation AS stale,
                        m.role, m.active_builds
                 FROM machines m JOIN projects p ON p.id = m.project_id
                 WHERE m.project_id = $1 AND m.platform = $2 AND m.role IN ('primary', 'extra')
                   AND m.state IN ('requested', 'launching', 'booting', 'ready', 'assigned')
                 ORDER BY m.role = 'primary' DESC, m.created_at
                 FOR UPDATE OF m",
            )
            .bind(project_id)
            .bind(platform.as_str())
            .fetch_all(&mut **tx)
            .await?;
            if let Some(stale) = machines.iter().find(|m| m.stale) {
                // Started before the project's cache was reset: it must not serve
                // another build of the project. The slot frees for a fresh builder.
                retire(tx, &stale.id, &stale.state).await?;
                continue;
            }
            let chosen = if autoscaling {
                machines
                    .iter()
                    .filter(|m| m.active_builds < per_builder)
                    .min_by_key(|m| (!m.ready(), m.active_builds, m.role != "primary"))
            } else {
                machines.iter().find(|m| m.role == "primary")
            };
            if let Some(machine) = chosen {
                let ready = machine.ready();
                sqlx::query(
                    "UPDATE machines SET active_builds = active_builds + 1, last_assigned_at = now(),
                         state = CASE WHEN state = 'ready' THEN 'assigned' ELSE state END
                     WHERE id = $1",
                )
                .bind(&machine.id)
                .execute(&mut **tx)
                .await?;
                attach_platform(tx, build_id, platform, &machine.id, ready).await?;
                if ready {
                    metrics::counter!("kiln_builder_assignments_total", "source" => "idle")
                        .increment(1);
                    return Ok(Assignment::Ready);
                }
                return Ok(Assignment::Waiting);
            }
            // Serialize changes to this slot, then look again: another replica may have
            // filled it meanwhile.
            if !slot_locked {
                sqlx::query(
                    "SELECT pg_advisory_xact_lock(hashtext('kiln:slot:' || $1 || ':' || $2))",
                )
                .bind(project_id)
                .bind(platform.as_str())
                .execute(&mut **tx)
                .await?;
                slot_locked = true;
                continue;
            }
            if machines.iter().any(|m| m.role == "primary") {
                // Autoscaling, and every builder is at its cap.
                if machines.len() as i64 >= i64::from(max_builders) {
                    metrics::counter!("kiln_autoscaling_queued_total").increment(1);
                    return Ok(Assignment::Queued);
                }
                self.check_org_cap(tx, project_id).await?;
                self.check_total_cap(tx).await?;
                let machine_id = new_id();
                self.request_machine(tx, &machine_id, platform, project_id, "extra", None)
                    .await?;
                if self.provider.uses_agent() {
                    self.cache
                        .clone_for_machine(tx, project_id, platform, &machine_id)
                        .await?;
                }
                metrics::counter!("kiln_autoscaling_builders_added_total").increment(1);
                tracing::info!(
                    machine_id,
                    project_id,
                    builders = machines.len() + 1,
                    "autoscaling: adding a builder"
                );
                continue;
            }
            // The slot is empty. The project gains a machine either way: its
            // organization's cap applies.
            self.check_org_cap(tx, project_id).await?;
            // A warm standby of this architecture joins the project's slot (milliseconds).
            if let Some((adopted, serving)) = self
                .adopt_warm(tx, project_id, platform, "primary", None)
                .await?
            {
                tracing::debug!(machine_id = %adopted, project_id, "adopted a warm builder");
                self.give_volume(tx, project_id, platform, &adopted).await?;
                attach_platform(tx, build_id, platform, &adopted, serving).await?;
                // An agent first receives the project (certificates, cache) and starts
                // BuildKit for it; the build waits for its health report.
                return Ok(if serving {
                    Assignment::Ready
                } else {
                    Assignment::Waiting
                });
            }
            // Otherwise request a new machine, within the total cap too.
            self.check_total_cap(tx).await?;
            let machine_id = new_id();
            if self
                .request_machine(tx, &machine_id, platform, project_id, "primary", None)
                .await?
            {
                self.give_volume(tx, project_id, platform, &machine_id)
                    .await?;
            }
        }
        Err(Error::Unavailable(
            "could not settle a builder for this project; retry shortly".into(),
        ))
    }

    /// A build with an ephemeral cache gets a builder of its own (a warm standby, or a
    /// new machine) with a new, empty volume; both go when the build ends.
    async fn assign_ephemeral(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        build_id: &str,
        platform: Platform,
        project_id: &str,
    ) -> Result<Assignment> {
        let existing: Option<(String, String, bool)> = sqlx::query_as(
            "SELECT id, state, serving FROM machines
             WHERE build_id = $1 AND platform = $2 AND role = 'ephemeral'
               AND state IN ('requested', 'launching', 'booting', 'ready', 'assigned')
             FOR UPDATE",
        )
        .bind(build_id)
        .bind(platform.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let (machine_id, ready) = match existing {
            Some((id, state, serving)) => {
                let ready = (state == "ready" || state == "assigned") && serving;
                sqlx::query(
                    "UPDATE machines SET active_builds = active_builds + 1, last_assigned_at = now(),
                         state = CASE WHEN state = 'ready' THEN 'assigned' ELSE state END
                     WHERE id = $1",
                )
                .bind(&id)
                .execute(&mut **tx)
                .await?;
                (id, ready)
            }
            None => {
                self.check_org_cap(tx, project_id).await?;
                let (id, ready) = match self
                    .adopt_warm(tx, project_id, platform, "ephemeral", Some(build_id))
                    .await?
                {
                    // An agent first attaches the new volume, so it is not ready yet.
                    Some(adopted) => adopted,
                    None => {
                        self.check_total_cap(tx).await?;
                        let id = new_id();
                        self.request_machine(
                            tx,
                            &id,
                            platform,
                            project_id,
                            "ephemeral",
                            Some(build_id),
                        )
                        .await?;
                        sqlx::query("UPDATE machines SET active_builds = 1, last_assigned_at = now() WHERE id = $1")
                            .bind(&id)
                            .execute(&mut **tx)
                            .await?;
                        (id, false)
                    }
                };
                if self.provider.uses_agent() {
                    self.cache
                        .ephemeral_for_machine(tx, project_id, build_id, platform, &id)
                        .await?;
                }
                (id, ready)
            }
        };
        attach_platform(tx, build_id, platform, &machine_id, ready).await?;
        Ok(if ready {
            Assignment::Ready
        } else {
            Assignment::Waiting
        })
    }

    /// Inserts a machine row and queues its launch. False when a primary for the slot
    /// exists already (another replica won).
    async fn request_machine(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        machine_id: &str,
        platform: Platform,
        project_id: &str,
        role: &str,
        build_id: Option<&str>,
    ) -> Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO machines (id, provider, platform, project_id, managed_by_agent, cache_generation, role, build_id)
             VALUES ($1, $2, $3, $4, $5, (SELECT cache_generation FROM projects WHERE id = $4), $6, $7)
             ON CONFLICT (project_id, platform)
                 WHERE role = 'primary' AND state IN ('requested', 'launching', 'booting', 'ready', 'assigned')
             DO NOTHING",
        )
        .bind(machine_id)
        .bind(self.provider.name())
        .bind(platform.as_str())
        .bind(project_id)
        .bind(self.provider.uses_agent())
        .bind(role)
        .bind(build_id)
        .execute(&mut **tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            jobs::enqueue(
                &mut **tx,
                NewJob::new(LAUNCH_JOB, json!({ "machine_id": machine_id }))
                    .dedupe(machine_id.to_string())
                    .max_attempts(self.config.launch_max_attempts),
            )
            .await?;
            metrics::counter!("kiln_machines_requested_total", "role" => role.to_string())
                .increment(1);
        }
        Ok(inserted)
    }

    /// Gives the machine taking a slot the slot's cache volume (created if need be).
    /// Only agents attach volumes; other providers keep BuildKit's state themselves.
    async fn give_volume(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project_id: &str,
        platform: Platform,
        machine_id: &str,
    ) -> Result<()> {
        if self.provider.uses_agent() {
            self.cache
                .volume_for_slot(tx, project_id, platform, machine_id)
                .await?;
        }
        Ok(())
    }

    /// Refuses a machine for the project beyond its organization's
    /// `builders.max_machines_per_organization`. Exact: requests of one organization
    /// serialize on its own advisory lock, so organizations don't wait for each other.
    async fn check_org_cap(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project_id: &str,
    ) -> Result<()> {
        let org: String = sqlx::query_scalar(
            "SELECT p.organization_id FROM projects p
             CROSS JOIN LATERAL (SELECT pg_advisory_xact_lock(hashtext('kiln:org-machines:' || p.organization_id))) AS lock
             WHERE p.id = $1",
        )
        .bind(project_id)
        .fetch_one(&mut **tx)
        .await?;
        let in_org: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM machines m JOIN projects p ON p.id = m.project_id
             WHERE p.organization_id = $1 AND m.state IN {LIVE_STATES}"
        ))
        .bind(&org)
        .fetch_one(&mut **tx)
        .await?;
        if in_org >= self.config.max_machines_per_organization {
            metrics::counter!("kiln_machine_cap_refusals_total", "cap" => "organization")
                .increment(1);
            return Err(Error::ResourceExhausted(format!(
                "organization {org} already runs {in_org} builder machines, its limit \
                 (builders.max_machines_per_organization); wait for builds to finish or ask the operator to raise it"
            )));
        }
        Ok(())
    }

    /// Refuses a new machine beyond `builders.max_machines_total`. Counted without a global
    /// lock while far from the cap, and under one within `TOTAL_CAP_MARGIN` of it, so it is
    /// exact where it matters and free elsewhere.
    async fn check_total_cap(&self, tx: &mut Transaction<'_, Postgres>) -> Result<()> {
        let count_total = format!("SELECT count(*) FROM machines WHERE state IN {LIVE_STATES}");
        let mut total: i64 = sqlx::query_scalar(&count_total)
            .fetch_one(&mut **tx)
            .await?;
        if total >= self.config.max_machines_total - TOTAL_CAP_MARGIN {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kiln:machine-caps'))")
                .execute(&mut **tx)
                .await?;
            total = sqlx::query_scalar(&count_total)
                .fetch_one(&mut **tx)
                .await?;
        }
        if total >= self.config.max_machines_total {
            metrics::counter!("kiln_machine_cap_refusals_total", "cap" => "total").increment(1);
            return Err(Error::ResourceExhausted(format!(
                "this Kiln already runs {total} builder machines, its limit (builders.max_machines_total); \
                 retry when builds finish or ask the operator to raise it"
            )));
        }
        Ok(())
    }

    /// Moves the oldest ready warm standby of `platform` into the project's slot and
    /// assigns it, in one statement. The caller holds the slot's lock and checked the
    /// organization's cap; the total is unchanged.
    async fn adopt_warm(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        project_id: &str,
        platform: Platform,
        role: &str,
        build_id: Option<&str>,
    ) -> Result<Option<(String, bool)>> {
        let adopted: Option<(String, bool)> = sqlx::query_as(
            "UPDATE machines SET project_id = $2, state = 'assigned', active_builds = 1, last_assigned_at = now(),
                 serving = NOT managed_by_agent, role = $3, build_id = $4,
                 cache_generation = (SELECT cache_generation FROM projects WHERE id = $2)
             WHERE id = (SELECT id FROM machines
                         WHERE project_id IS NULL AND platform = $1 AND state = 'ready'
                         ORDER BY ready_at LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id, serving",
        )
        .bind(platform.as_str())
        .bind(project_id)
        .bind(role)
        .bind(build_id)
        .fetch_optional(&mut **tx)
        .await?;
        if adopted.is_some() {
            // Refill the pool soon, not at the next periodic pass.
            jobs::enqueue(&mut **tx, NewJob::new(POOL_JOB, json!({})).dedupe("refill")).await?;
            metrics::counter!("kiln_builder_assignments_total", "source" => "warm_pool")
                .increment(1);
        }
        Ok(adopted)
    }

    /// Keeps `builders.warm_pool_amd64` / `warm_pool_arm64` standbys (no project yet)
    /// requested, booting or ready, within the total cap. Returns how many it requested.
    pub async fn refill_pool(&self) -> Result<usize> {
        let mut requested = 0;
        for (platform, target) in [
            (Platform::Amd64, self.config.warm_pool_amd64),
            (Platform::Arm64, self.config.warm_pool_arm64),
        ] {
            if target == 0 {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('kiln:machine-caps'))")
                .execute(&mut *tx)
                .await?;
            let (warm, total): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE project_id IS NULL AND platform = $1
                                          AND state IN ('requested', 'launching', 'booting', 'ready')),
                        count(*) FILTER (WHERE state IN ('requested', 'launching', 'booting', 'ready', 'assigned', 'draining'))
                 FROM machines",
            )
            .bind(platform.as_str())
            .fetch_one(&mut *tx)
            .await?;
            let missing = (i64::from(target) - warm)
                .max(0)
                .min((self.config.max_machines_total - total).max(0));
            for _ in 0..missing {
                let machine_id = new_id();
                sqlx::query("INSERT INTO machines (id, provider, platform, managed_by_agent) VALUES ($1, $2, $3, $4)")
                    .bind(&machine_id)
                    .bind(self.provider.name())
                    .bind(platform.as_str())
                    .bind(self.provider.uses_agent())
                    .execute(&mut *tx)
                    .await?;
                jobs::enqueue(
                    &mut *tx,
                    NewJob::new(LAUNCH_JOB, json!({ "machine_id": machine_id }))
                        .dedupe(machine_id.clone())
                        .max_attempts(self.config.launch_max_attempts),
                )
                .await?;
                requested += 1;
            }
            tx.commit().await?;
        }
        if requested > 0 {
            tracing::info!(requested, "refilling the warm builder pool");
        }
        Ok(requested)
    }

    /// Drains builders idle past `builders.idle_timeout_seconds` or older than
    /// `builders.max_lifetime_hours` (those stop taking builds; the slot frees for a new
    /// machine), and queues termination of drained builders with no build left.
    pub async fn reap(&self) -> Result<usize> {
        let drained: Vec<String> = sqlx::query_scalar(
            "UPDATE machines SET state = 'draining'
             WHERE (state = 'ready' AND active_builds = 0 AND project_id IS NOT NULL
                    AND COALESCE(last_released_at, ready_at, created_at) < now() - make_interval(secs => $1))
                OR (state IN ('ready', 'assigned') AND launched_at < now() - make_interval(secs => $2 * 3600))
             RETURNING id",
        )
        .bind(self.config.idle_timeout_seconds as f64)
        .bind(self.config.max_lifetime_hours as f64)
        .fetch_all(&self.pool)
        .await?;
        for id in &drained {
            tracing::info!(machine_id = %id, "draining builder (idle or past its lifetime)");
        }
        let done: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM machines WHERE state = 'draining' AND active_builds = 0",
        )
        .fetch_all(&self.pool)
        .await?;
        for id in &done {
            jobs::enqueue(
                &self.pool,
                NewJob::new(TERMINATE_JOB, json!({ "machine_id": id })).dedupe(id.clone()),
            )
            .await?;
        }
        metrics::counter!("kiln_machines_drained_total").increment(drained.len() as u64);
        Ok(drained.len())
    }

    /// Terminate job: stop the drained machine at the provider, then record it.
    /// Idempotent: providers succeed on machines already gone.
    pub async fn terminate(&self, job: &ClaimedJob) -> anyhow::Result<()> {
        let machine_id = job.payload["machine_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM machines WHERE id = $1")
            .bind(&machine_id)
            .fetch_optional(&self.pool)
            .await?;
        match state.as_deref() {
            Some("draining") => {}
            // Finished some other way (an agent shut down, a failed boot): make sure the
            // instance is gone too. Providers succeed on instances already gone.
            Some("failed" | "terminated") => {
                self.provider.terminate(&machine_id).await?;
                return Ok(());
            }
            _ => return Ok(()),
        }
        self.provider.terminate(&machine_id).await?;
        let done = sqlx::query(
            "UPDATE machines SET state = 'terminated', terminated_at = now()
             WHERE id = $1 AND state = 'draining' AND active_builds = 0",
        )
        .bind(&machine_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if done == 1 {
            metrics::counter!("kiln_machines_terminated_total").increment(1);
            tracing::info!(machine_id, "builder terminated");
        }
        Ok(())
    }

    /// Carries out a cache reset: every builder of `project_id` started for an older
    /// cache generation leaves its slot, and the idle ones are terminated now, so no
    /// cache of the old generation survives. Idempotent. Returns how many it retired.
    pub async fn retire_cache_generation(
        &self,
        project_id: &str,
        generation: i32,
    ) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let stale: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, state FROM machines
             WHERE project_id = $1 AND cache_generation < $2
               AND state IN ('requested', 'launching', 'booting', 'ready', 'assigned')
             FOR UPDATE",
        )
        .bind(project_id)
        .bind(generation)
        .fetch_all(&mut *tx)
        .await?;
        for (id, state) in &stale {
            retire(&mut tx, id, state).await?;
        }
        tx.commit().await?;
        let idle: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM machines
             WHERE project_id = $1 AND cache_generation < $2 AND state = 'draining' AND active_builds = 0",
        )
        .bind(project_id)
        .bind(generation)
        .fetch_all(&self.pool)
        .await?;
        for id in &idle {
            self.provider.terminate(id).await?;
            let done = sqlx::query(
                "UPDATE machines SET state = 'terminated', terminated_at = now()
                 WHERE id = $1 AND state = 'draining' AND active_builds = 0",
            )
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if done == 1 {
                metrics::counter!("kiln_machines_terminated_total").increment(1);
                tracing::info!(machine_id = %id, "terminated a builder holding a reset cache");
            }
        }
        Ok(stale.len())
    }

    /// Builder machines in `state`, or every live one (operators).
    pub async fn machines(
        &self,
        principal: &crate::auth::Principal,
        state: Option<&str>,
    ) -> Result<Vec<crate::db::machines::MachineInfo>> {
        crate::auth::authorize(
            principal,
            crate::auth::Action::Operate,
            crate::auth::Target::Instance,
        )?;
        crate::db::machines::list(&self.pool, state).await
    }

    /// Builder machines serving an organization's projects, in `state` or every live one
    /// (its owners, and operators).
    pub async fn organization_machines(
        &self,
        principal: &crate::auth::Principal,
        organization_id: &str,
        state: Option<&str>,
    ) -> Result<Vec<crate::db::machines::MachineInfo>> {
        crate::auth::authorize(
            principal,
            crate::auth::Action::ManageMachines,
            crate::auth::Target::Organization {
                id: organization_id,
            },
        )?;
        crate::db::machines::list_for_organization(&self.pool, organization_id, state).await
    }

    /// Stops giving builds to a machine; it is terminated once its builds finish.
    /// Operators may drain any machine, organization owners those serving their
    /// projects. False if it was not ready or assigned.
    pub async fn drain(
        &self,
        principal: &crate::auth::Principal,
        machine_id: &str,
    ) -> Result<bool> {
        let (project_id, organization_id) = crate::db::machines::serving(&self.pool, machine_id)
            .await?
            .unwrap_or_default();
        crate::auth::authorize(
            principal,
            crate::auth::Action::ManageMachines,
            crate::auth::Target::Machine {
                id: machine_id,
                organization_id: organization_id.as_deref(),
            },
        )?;
        let mut tx = self.pool.begin().await?;
        if !crate::db::machines::drain(&mut *tx, machine_id, project_id.as_deref()).await? {
            return Ok(false);
        }
        crate::db::audit::record(
            &mut *tx,
            principal
                .audit("machine.drain")
                .org_of(organization_id.as_deref())
                .target("machine", machine_id),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Assigns every pending platform it can lock. Returns how many it handled.
    pub async fn assign_pending(&self) -> Result<usize> {
        let pending: Vec<(String, String)> = sqlx::query_as(
            "SELECT bp.build_id, bp.platform FROM build_platforms bp JOIN builds b ON b.id = bp.build_id
             WHERE bp.state = 'pending' AND b.state IN ('queued', 'running')
             ORDER BY bp.requested_at LIMIT 200",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut handled = 0;
        for (build_id, platform) in pending {
            let Some(platform) = Platform::parse(&platform) else {
                continue;
            };
            match self.assign(&build_id, platform).await? {
                Assignment::Skipped | Assignment::Queued => {}
                Assignment::Ready => {
                    handled += 1;
                    notify_build(&self.pool, &build_id).await;
                }
                Assignment::Waiting => handled += 1,
            }
        }
        Ok(handled)
    }

    /// The scheduler loop: woken by NOTIFY kiln_scheduler, with a slow poll as fallback.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        self.forget_dead_local_machines().await;
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Err(err) = self.assign_pending().await {
                tracing::debug!(error = %err, "scheduler pass failed; will retry");
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(self.config.scheduler_poll_seconds)) => {}
                _ = cancel.cancelled() => break,
            }
        }
        self.shutdown_local().await;
    }

    /// Launch job: start the machine, wait until its endpoint accepts connections, mark it
    /// ready and hand it to the platforms waiting for it. Safe to run again after a crash.
    pub async fn launch(&self, job: &ClaimedJob) -> anyhow::Result<()> {
        let machine_id = job.payload["machine_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let row: Option<(String, String)> = sqlx::query_as(
            "UPDATE machines SET state = 'launching', launched_at = COALESCE(launched_at, now())
             WHERE id = $1 AND state IN ('requested', 'launching', 'booting') RETURNING platform, state",
        )
        .bind(&machine_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((platform, _)) = row else {
            return Ok(()); // Already ready, terminated or failed: nothing to do.
        };
        self.boot(&machine_id, &platform).await
    }

    /// A launch job gave up (its last attempt failed or timed out): the machine is
    /// failed, which frees its slot, and the builds waiting for it are requeued.
    pub async fn launch_gave_up(&self, job: &ClaimedJob, error: &str) -> Result<()> {
        let machine_id = job.payload["machine_id"].as_str().unwrap_or_default();
        // The instance may have started after all; never leave it running.
        if let Err(err) = self.provider.terminate(machine_id).await {
            tracing::warn!(machine_id, error = %err, "could not terminate a machine whose launch gave up; the reconciler will");
        }
        self.fail_machine(machine_id, error).await?;
        notify_scheduler(&self.pool).await;
        Ok(())
    }

    async fn boot(&self, machine_id: &str, platform: &str) -> anyhow::Result<()> {
        let pki = self.pki().await?;
        let server_name = server_name_for(machine_id);
        let lifetime = time::Duration::hours(self.config.server_cert_hours as i64);
        let agent = if self.provider.uses_agent() {
            Some(AgentBootstrap {
                api_url: self.agent_api_url()?,
                registration_token: self.registration_token_for(machine_id).await?,
                api_ca_pem: self.agent_api_ca_pem()?,
            })
        } else {
            None
        };
        let spec = LaunchSpec {
            machine_id: machine_id.to_string(),
            platform: Platform::parse(platform).unwrap_or(Platform::Amd64),
            server_cert: pki.server_certificate(&server_name, lifetime)?,
            server_name: server_name.clone(),
            ca_pem: pki.ca_pem.clone(),
            agent,
        };
        let launched = self.provider.launch(spec).await?;
        sqlx::query(
            "UPDATE machines SET state = 'booting', endpoint = $2, server_name = $3, provider_ref = $4
             WHERE id = $1 AND state = 'launching'",
        )
        .bind(machine_id)
        .bind(&launched.endpoint)
        .bind(&server_name)
        .bind(&launched.provider_ref)
        .execute(&self.pool)
        .await?;
        if self.provider.uses_agent() {
            // The agent registers and reports; the reconciler fails it past the deadline.
            return Ok(());
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.config.boot_timeout_seconds);
        if let Err(err) = self
            .provider
            .wait_ready(machine_id, &launched, deadline)
            .await
        {
            let _ = self.provider.terminate(machine_id).await;
            return Err(err.into());
        }
        self.mark_ready(machine_id).await?;
        Ok(())
    }

    /// booting → ready (or assigned, when builds already wait for it); their platforms
    /// become ready and their GetBuildKitConnection waiters wake.
    pub async fn mark_ready(&self, machine_id: &str) -> Result<()> {
        self.mark_serving(machine_id, None).await
    }

    /// BuildKit serves the machine's directive (`generation`, when an agent says so):
    /// a booting machine becomes ready (or assigned, when builds wait for it), and the
    /// platforms assigned to it become ready and their GetBuildKitConnection waiters wake.
    pub async fn mark_serving(&self, machine_id: &str, generation: Option<i64>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE machines SET serving = true, ready_at = COALESCE(ready_at, now()),
                 state = CASE WHEN state <> 'booting' THEN state
                              WHEN active_builds > 0 THEN 'assigned' ELSE 'ready' END
             WHERE id = $1 AND NOT serving AND state IN ('booting', 'ready', 'assigned')
               AND ($2::bigint IS NULL OR directive_generation = $2)",
        )
        .bind(machine_id)
        .bind(generation)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let builds: Vec<String> = if updated == 1 {
            sqlx::query_scalar(
                "UPDATE build_platforms SET state = 'ready', ready_at = now()
                 WHERE builder_id = $1 AND state = 'assigned' RETURNING build_id",
            )
            .bind(machine_id)
            .fetch_all(&mut *tx)
            .await?
        } else {
            Vec::new()
        };
        for build in &builds {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(crate::builds::BUILD_CHANNEL)
                .bind(build)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if updated == 1 {
            metrics::counter!("kiln_machines_ready_total").increment(1);
            tracing::info!(machine_id, waiting_builds = builds.len(), "builder ready");
        }
        Ok(())
    }

    /// A machine that could not start: its waiting platforms go back to pending, so the
    /// next pass requests a fresh machine.
    async fn fail_machine(&self, machine_id: &str, error: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let failed = sqlx::query(
            "UPDATE machines SET state = 'failed', error = $2, active_builds = 0, terminated_at = now()
             WHERE id = $1 AND state IN ('requested', 'launching', 'booting')",
        )
        .bind(machine_id)
        .bind(error.chars().take(2000).collect::<String>())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        sqlx::query(
            "UPDATE build_platforms SET state = 'pending', builder_id = NULL, assigned_at = NULL
             WHERE builder_id = $1 AND state = 'assigned'",
        )
        .bind(machine_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if failed {
            metrics::counter!("kiln_machines_failed_total").increment(1);
            tracing::error!(machine_id, error, "builder failed to launch");
        }
        Ok(())
    }

    /// One reconciler pass: compare the provider's instances with the database. Runs as
    /// the periodic `machines.reconcile` job, so one replica at a time does it.
    pub async fn reconcile(&self) -> Result<Reconciled> {
        let mut report = Reconciled::default();
        let instances = self.provider.list().await?;
        let running: std::collections::HashSet<&str> = instances
            .iter()
            .filter(|i| i.running)
            .map(|i| i.machine_id.as_str())
            .collect();
        // EC2's DescribeInstances is eventually consistent: an instance launched moments
        // ago may not be listed yet, so young machines are never taken for vanished.
        let rows: Vec<(String, String, Option<String>, bool, bool)> = sqlx::query_as(
            "SELECT id, state, provider_ref,
                    state = 'booting' AND launched_at < now() - make_interval(secs => $2) AS stuck,
                    COALESCE(launched_at > now() - interval '60 seconds', true) AS young
             FROM machines WHERE provider = $1 AND state IN ('launching', 'booting', 'ready', 'assigned', 'draining')",
        )
        .bind(self.provider.name())
        .bind(self.config.boot_timeout_seconds as f64 * 2.0)
        .fetch_all(&self.pool)
        .await?;
        let live: std::collections::HashSet<&str> =
            rows.iter().map(|(id, ..)| id.as_str()).collect();

        for (id, state, reference, stuck, young) in &rows {
            let visible = reference.as_deref().is_some_and(|r| self.provider.owns(r));
            if *stuck {
                let _ = self.provider.terminate(id).await;
                if self
                    .fail_and_requeue(id, "did not finish booting before the deadline")
                    .await?
                {
                    report.stuck.push(id.clone());
                }
            } else if visible
                && state != "launching"
                && !young
                && !running.contains(id.as_str())
                && self.fail_and_requeue(id, "its instance vanished").await?
            {
                report.vanished.push(id.clone());
            }
        }

        // Launches that ended without a machine: the launch job is gone (it gave up, or
        // its give-up could not be recorded) but the row still holds the slot.
        let stalled: Vec<String> = sqlx::query_scalar(
            "SELECT m.id FROM machines m
             WHERE m.provider = $1 AND m.state IN ('requested', 'launching')
               AND COALESCE(m.launched_at, m.created_at) < now() - make_interval(secs => $2)
               AND NOT EXISTS (SELECT 1 FROM jobs j
                               WHERE j.kind = $3 AND j.dedupe_key = m.id AND j.state IN ('pending', 'running'))",
        )
        .bind(self.provider.name())
        .bind(self.config.boot_timeout_seconds as f64)
        .bind(LAUNCH_JOB)
        .fetch_all(&self.pool)
        .await?;
        for id in stalled {
            let _ = self.provider.terminate(&id).await;
            if self
                .fail_and_requeue(&id, "its launch never completed")
                .await?
            {
                report.stalled.push(id);
            }
        }

        // Agents that stopped reporting: their BuildKit can no longer be trusted to serve.
        let silent: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM machines
             WHERE managed_by_agent AND state IN ('ready', 'assigned', 'draining') AND provider = $1
               AND last_health_at < now() - make_interval(secs => $2)",
        )
        .bind(self.provider.name())
        .bind(self.config.agent_health_timeout_seconds as f64)
        .fetch_all(&self.pool)
        .await?;
        for id in silent {
            if self
                .fail_and_requeue(&id, "its agent stopped reporting health")
                .await?
            {
                queue_termination(&self.pool, &id).await?;
                report.silent.push(id);
            }
        }

        // Instances no live row claims: orphans, terminated after a grace period.
        let orphans: Vec<&str> = running
            .iter()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        sqlx::query(
            "DELETE FROM machine_orphans WHERE provider = $1 AND NOT (machine_id = ANY($2))",
        )
        .bind(self.provider.name())
        .bind(&orphans)
        .execute(&self.pool)
        .await?;
        for id in orphans {
            let seen: (bool, bool) = sqlx::query_as(
                "WITH ins AS (INSERT INTO machine_orphans (machine_id, provider) VALUES ($1, $2)
                              ON CONFLICT DO NOTHING RETURNING first_seen_at)
                 SELECT EXISTS (SELECT 1 FROM ins),
                        COALESCE((SELECT first_seen_at < now() - make_interval(secs => $3)
                                  FROM machine_orphans WHERE machine_id = $1), false)",
            )
            .bind(id)
            .bind(self.provider.name())
            .bind(self.config.orphan_grace_seconds as f64)
            .fetch_one(&self.pool)
            .await?;
            match seen {
                (true, _) => {
                    tracing::warn!(
                        machine_id = id,
                        "found an instance with no machine row; terminating it after the grace period"
                    );
                    report.new_orphans.push(id.to_string());
                }
                (false, true) => {
                    self.provider.terminate(id).await?;
                    sqlx::query("DELETE FROM machine_orphans WHERE machine_id = $1")
                        .bind(id)
                        .execute(&self.pool)
                        .await?;
                    tracing::warn!(machine_id = id, "terminated an orphan instance");
                    metrics::counter!("kiln_orphans_terminated_total").increment(1);
                    report.terminated_orphans.push(id.to_string());
                }
                (false, false) => {}
            }
        }
        if !report.vanished.is_empty()
            || !report.stuck.is_empty()
            || !report.silent.is_empty()
            || !report.stalled.is_empty()
        {
            notify_scheduler(&self.pool).await;
        }
        Ok(report)
    }

    /// Marks a machine failed and puts the platforms it served back to pending, so the
    /// scheduler finds them a new builder. False if another pass got there first.
    pub(crate) async fn fail_and_requeue(&self, machine_id: &str, reason: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let failed = sqlx::query(
            "UPDATE machines SET state = 'failed', error = $2, active_builds = 0, terminated_at = now()
             WHERE id = $1 AND state IN ('requested', 'launching', 'booting', 'ready', 'assigned', 'draining')",
        )
        .bind(machine_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if failed {
            sqlx::query(
                "UPDATE build_platforms SET state = 'pending', builder_id = NULL, assigned_at = NULL, ready_at = NULL
                 WHERE builder_id = $1 AND state IN ('assigned', 'ready')",
            )
            .bind(machine_id)
            .execute(&mut *tx)
            .await?;
            tracing::warn!(
                machine_id,
                reason,
                "builder failed; its builds go back to the queue"
            );
            metrics::counter!("kiln_machines_failed_total").increment(1);
        }
        tx.commit().await?;
        Ok(failed)
    }

    /// Local builders die with the process that started them; forget the rows of
    /// processes that no longer exist (a previous `kiln dev`, say).
    async fn forget_dead_local_machines(&self) {
        if self.provider.name() != "local" {
            return;
        }
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, provider_ref FROM machines WHERE provider = 'local' AND state NOT IN ('terminated', 'failed')",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        for (id, reference) in rows {
            let alive = reference
                .as_deref()
                .is_some_and(local::LocalProvider::owner_alive);
            if !alive {
                let _ = terminate_row(&self.pool, &id).await;
            }
        }
    }

    /// On shutdown, stop the local builders this process started.
    async fn shutdown_local(&self) {
        if self.provider.name() != "local" {
            return;
        }
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM machines WHERE provider = 'local' AND state NOT IN ('terminated', 'failed')",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        for id in ids {
            if self.provider.is_alive(&id).await.unwrap_or(false) {
                let _ = self.provider.terminate(&id).await;
                let _ = terminate_row(&self.pool, &id).await;
            }
        }
    }
}

/// Points a pending platform at its machine: `ready` when the machine serves, else
/// `assigned` until it does; the build is running from its first assignment.
async fn attach_platform(
    tx: &mut Transaction<'_, Postgres>,
    build_id: &str,
    platform: Platform,
    machine_id: &str,
    ready: bool,
) -> Result<()> {
    sqlx::query(
        "UPDATE build_platforms SET builder_id = $3, assigned_at = now(),
             state = CASE WHEN $4 THEN 'ready' ELSE 'assigned' END,
             ready_at = CASE WHEN $4 THEN now() END
         WHERE build_id = $1 AND platform = $2 AND state = 'pending'",
    )
    .bind(build_id)
    .bind(platform.as_str())
    .bind(machine_id)
    .bind(ready)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE builds SET state = 'running', started_at = now() WHERE id = $1 AND state = 'queued'")
        .bind(build_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Takes a machine out of its slot. A serving machine drains (its running builds finish
/// there); one still starting is drained at once and the builds waiting for it go back
/// to the queue. The caller holds the row's lock and read its `state`.
async fn retire(tx: &mut Transaction<'_, Postgres>, machine_id: &str, state: &str) -> Result<()> {
    let starting = matches!(state, "requested" | "launching" | "booting");
    sqlx::query(
        "UPDATE machines SET state = 'draining',
             active_builds = CASE WHEN $2 THEN 0 ELSE active_builds END
         WHERE id = $1",
    )
    .bind(machine_id)
    .bind(starting)
    .execute(&mut **tx)
    .await?;
    if starting {
        sqlx::query(
            "UPDATE build_platforms SET state = 'pending', builder_id = NULL, assigned_at = NULL
             WHERE builder_id = $1 AND state = 'assigned'",
        )
        .bind(machine_id)
        .execute(&mut **tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(SCHEDULER_CHANNEL)
            .execute(&mut **tx)
            .await?;
    }
    tracing::info!(
        machine_id,
        "retiring a builder of an older cache generation"
    );
    Ok(())
}

/// The scheduler's background jobs: per-machine launch and terminate, and the periodic
/// reaper, pool refill and reconciler.
pub fn register_jobs(runner: &mut crate::jobs::JobRunner, scheduler: Arc<Scheduler>) {
    runner
        .register_with(LAUNCH_JOB, scheduler.clone(), |s, job| async move {
            s.launch(&job).await
        })
        .on_give_up(LAUNCH_JOB, scheduler.clone(), |s, job, error| async move {
            s.launch_gave_up(&job, &error).await?;
            Ok(())
        })
        .register_with(TERMINATE_JOB, scheduler.clone(), |s, job| async move {
            s.terminate(&job).await
        })
        .register_with(REAP_JOB, scheduler.clone(), |s, _| async move {
            s.reap().await?;
            Ok(())
        })
        .every(REAP_JOB, Duration::from_secs(15))
        .register_with(POOL_JOB, scheduler.clone(), |s, _| async move {
            s.refill_pool().await?;
            Ok(())
        })
        .every(POOL_JOB, Duration::from_secs(15))
        .register_with(RECONCILE_JOB, scheduler, |s, _| async move {
            s.reconcile().await?;
            Ok(())
        })
        .every(RECONCILE_JOB, Duration::from_secs(5));
}

/// The name in a machine's BuildKit server certificate.
pub fn server_name_for(machine_id: &str) -> String {
    format!("{machine_id}.builders.kiln.internal")
}

/// Queues the terminate job of a machine (deduplicated per machine).
pub(crate) async fn queue_termination(pool: &PgPool, machine_id: &str) -> Result<()> {
    jobs::enqueue(
        pool,
        NewJob::new(TERMINATE_JOB, json!({ "machine_id": machine_id }))
            .dedupe(machine_id.to_string()),
    )
    .await?;
    Ok(())
}

async fn terminate_row(pool: &PgPool, machine_id: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE machines SET state = 'terminated', terminated_at = now(), active_builds = 0 WHERE id = $1 AND state <> 'terminated'")
        .bind(machine_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE build_platforms SET state = 'pending', builder_id = NULL, assigned_at = NULL, ready_at = NULL
         WHERE builder_id = $1 AND state IN ('assigned', 'ready')",
    )
    .bind(machine_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn notify_build(pool: &PgPool, build_id: &str) {
    let _ = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::builds::BUILD_CHANNEL)
        .bind(build_id)
        .execute(pool)
        .await;
}

pub async fn notify_scheduler(pool: &PgPool) {
    let _ = sqlx::query("SELECT pg_notify($1, '')")
        .bind(SCHEDULER_CHANNEL)
        .execute(pool)
        .await;
}
