//! The control side of `kiln agent`: one-time registration, the directive each machine
//! should follow, health reports and shutdown. Transport-free; `api::agent` serves it
//! over gRPC.
//!
//! Registration tokens are HMAC-SHA256(key-encryption key, machine id ‖ nonce). Only the
//! nonce is stored; registering clears it in a conditional UPDATE, so a token works
//! exactly once, on one replica, and a replayed or forged one is refused and audited.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Scheduler;
use crate::auth::Principal;
use crate::auth::authz::{Action, Target, authorize};
use crate::auth::token::TokenKind;
use crate::auth::token::{NewToken, issue};
use crate::cache::MachineVolume;
use crate::db::audit::{self, AuditEvent};
use crate::error::{Error, Result};

const REGISTRATION_PURPOSE: &[u8] = b"kiln/agent-registration/v1";
const MAX_FIELD_LEN: usize = 512;
/// An instance identity document is about half a kilobyte.
const MAX_IDENTITY_LEN: usize = 8 * 1024;

/// The signed EC2 instance identity document an agent read from IMDS.
#[derive(Debug, Clone, Default)]
pub struct InstanceIdentity {
    pub document: String,
    /// Base64 RSA-SHA256 signature (IMDS `dynamic/instance-identity/signature`).
    pub signature: String,
}

/// What the agent should be doing now.
#[derive(Debug, Clone, PartialEq)]
pub enum DirectiveAction {
    /// A warm standby: no project yet.
    Standby,
    Serve(Box<BuildKitTask>),
    Drain {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BuildKitTask {
    pub project_id: String,
    pub platform: String,
    pub server_name: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub ca_cert_pem: String,
    /// The layer-cache volume BuildKit keeps its state on; `None`: the machine's disk.
    pub cache: Option<CacheVolumeSpec>,
    pub gc_keep_bytes: u64,
    pub max_parallelism: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheVolumeSpec {
    pub volume_id: String,
    pub size_bytes: u64,
    pub attachment: crate::cache::Attachment,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Directive {
    pub generation: u64,
    pub action: DirectiveAction,
}

#[derive(Debug, Clone, Default)]
pub struct HealthReport {
    pub generation: u64,
    pub buildkit_up: bool,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthAnswer {
    pub should_terminate: bool,
    pub generation: u64,
}

/// state, project, platform, generation, server name, active builds, cache size (GB).
type DirectiveRow = (
    String,
    Option<String>,
    String,
    i64,
    Option<String>,
    i32,
    Option<i32>,
);

/// The registration token for a machine and nonce.
pub fn registration_token(kek: &[u8; 32], machine_id: &str, nonce: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(kek).expect("HMAC accepts any key length");
    mac.update(REGISTRATION_PURPOSE);
    mac.update(machine_id.as_bytes());
    mac.update(b"\0");
    mac.update(nonce.as_bytes());
    format!("kilnreg_{}", hex::encode(mac.finalize().into_bytes()))
}

fn token_matches(kek: &[u8; 32], machine_id: &str, nonce: &str, presented: &str) -> bool {
    let Some(hex_part) = presented.strip_prefix("kilnreg_") else {
        return false;
    };
    let Ok(bytes) = hex::decode(hex_part) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(kek).expect("HMAC accepts any key length");
    mac.update(REGISTRATION_PURPOSE);
    mac.update(machine_id.as_bytes());
    mac.update(b"\0");
    mac.update(nonce.as_bytes());
    mac.verify_slice(&bytes).is_ok()
}

/// A refusal that is recorded (sampled) in the audit log before the caller sees it.
async fn refuse(
    scheduler: &Scheduler,
    action: &str,
    machine_id: &str,
    reason: &str,
    err: Error,
) -> Error {
    let event = AuditEvent::new(action, ("agent", None))
        .target("machine", truncate(machine_id))
        .details(serde_json::json!({ "reason": reason }));
    scheduler.record_refusal(action, reason, event).await;
    err
}

fn truncate(text: &str) -> String {
    text.chars().take(MAX_FIELD_LEN).collect()
}

fn check_len(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_FIELD_LEN {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_FIELD_LEN} bytes"),
        ));
    }
    Ok(())
}

impl Scheduler {
    /// Logs, counts and audits one refused agent call. Callers without a valid token can
    /// cause these, so at most `limits.refusal_audits_per_minute` per replica reach the
    /// audit log; the rest are counted. The audit failing never becomes the caller's error.
    pub async fn record_refusal(&self, metric: &str, reason: &str, event: AuditEvent) {
        tracing::warn!(target_id = ?event.target_id, reason, "refused a machine agent call");
        metrics::counter!("kiln_agent_refusals_total", "action" => metric.to_string()).increment(1);
        if self.refusal_audits.check().is_err() {
            metrics::counter!("kiln_audit_suppressed_total", "action" => event.action.clone())
                .increment(1);
            return;
        }
        if let Err(audit_err) = audit::record(&self.pool, event).await {
            tracing::error!(error = %audit_err, "could not audit a refused agent call");
        }
    }

    fn kek(&self) -> Result<[u8; 32]> {
        self.kek.ok_or_else(|| {
            Error::FailedPrecondition(
                "builder agents need secrets.key_encryption_key; ask the operator to set it".into(),
            )
        })
    }

    /// The machine's registration token, creating its nonce on first use. A retried
    /// launch gets the same token, so an instance launched before a crash can still
    /// register.
    pub(super) async fn registration_token_for(&self, machine_id: &str) -> Result<String> {
        let kek = self.kek()?;
        let fresh = crate::db::ids::random_alphanumeric(32);
        let nonce: Option<String> = sqlx::query_scalar(
            "UPDATE machines SET registration_nonce = COALESCE(registration_nonce, $2),
                 registration_expires_at = COALESCE(registration_expires_at, now() + make_interval(secs => $3))
             WHERE id = $1 AND registered_at IS NULL RETURNING registration_nonce",
        )
        .bind(machine_id)
        .bind(&fresh)
        .bind(self.config.boot_timeout_seconds as f64 * 2.0)
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        let nonce = nonce.ok_or_else(|| {
            Error::FailedPrecondition(format!("machine {machine_id} has already registered"))
        })?;
        Ok(registration_token(&kek, machine_id, &nonce))
    }

    /// Exchanges a registration token for the machine's token. Works once per machine.
    pub async fn register_agent(
        &self,
        machine_id: &str,
        presented: &str,
        agent_version: &str,
        buildkit_address: &str,
        identity: Option<&InstanceIdentity>,
    ) -> Result<String> {
        check_len("machine_id", machine_id)?;
        if let Some(identity) = identity
            && (identity.document.len() > MAX_IDENTITY_LEN
                || identity.signature.len() > MAX_IDENTITY_LEN)
        {
            return Err(Error::invalid(
                "identity",
                format!("document and signature must be at most {MAX_IDENTITY_LEN} bytes"),
            ));
        }
        check_len("registration_token", presented)?;
        check_len("agent_version", agent_version)?;
        check_len("buildkit_address", buildkit_address)?;
        let kek = self.kek()?;
        let refused = || {
            Error::Unauthenticated(
                "the registration token is invalid, expired or already used; relaunch the machine"
                    .into(),
            )
        };
        let row: Option<(Option<String>, bool, String, Option<String>)> = sqlx::query_as(
            "SELECT registration_nonce, registration_expires_at > now(), state, provider_ref
             FROM machines WHERE id = $1 AND managed_by_agent",
        )
        .bind(machine_id)
        .fetch_optional(&self.pool)
        .await?;
        let reason = match &row {
            None => Some("unknown machine"),
            Some((None, ..)) => Some("registration token already used"),
            Some((Some(nonce), ..)) if !token_matches(&kek, machine_id, nonce, presented) => {
                Some("wrong registration token")
            }
            Some((_, false, ..)) => Some("registration token expired"),
            Some((_, _, state, _)) if state != "launching" && state != "booting" => {
                Some("machine is not starting")
            }
            Some((.., provider_ref)) => self.check_identity(provider_ref.as_deref(), identity)?,
        };
        if let Some(reason) = reason {
            return Err(refuse(
                self,
                "machine.registration_refused",
                machine_id,
                reason,
                refused(),
            )
            .await);
        }
        let Some((Some(nonce), ..)) = row else {
            return Err(refused());
        };
        let address = buildkit_address.trim();
        let endpoint = (!address.is_empty()).then(|| {
            if address.contains("://") {
                address.to_string()
            } else {
                format!("tcp://{address}")
            }
        });
        let mut tx = self.pool.begin().await?;
        // The nonce in the WHERE clause makes this the single winner among concurrent
        // or replayed registrations.
        let won = sqlx::query(
            "UPDATE machines SET registration_nonce = NULL, registered_at = now(), agent_version = $3,
                 endpoint = COALESCE($4, endpoint), last_health_at = now()
             WHERE id = $1 AND registration_nonce = $2",
        )
        .bind(machine_id)
        .bind(&nonce)
        .bind(agent_version)
        .bind(&endpoint)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !won {
            drop(tx);
            return Err(refuse(
                self,
                "machine.registration_refused",
                machine_id,
                "registration token already used",
                refused(),
            )
            .await);
        }
        let mut new = NewToken::new(TokenKind::Machine, "builder agent");
        new.machine_id = Some(machine_id.to_string());
        new.expires_at = Some(
            chrono::Utc::now() + chrono::Duration::hours(self.config.max_lifetime_hours as i64 + 1),
        );
        let (info, minted) = issue(&mut *tx, new).await?;
        audit::record(
            &mut *tx,
            AuditEvent::new("machine.registered", ("agent", Some(info.id.clone())))
                .target("machine", machine_id)
                .details(
                    serde_json::json!({ "agent_version": agent_version, "endpoint": endpoint }),
                ),
        )
        .await?;
        tx.commit().await?;
        metrics::counter!("kiln_agents_registered_total").increment(1);
        tracing::info!(machine_id, agent_version, "builder agent registered");
        Ok(minted.secret)
    }

    /// Where `builders.ec2.identity_certificate_file` is set, the agent must prove it runs
    /// on the machine's own instance with a document signed by AWS. Returns the refusal
    /// reason, if any.
    fn check_identity(
        &self,
        provider_ref: Option<&str>,
        identity: Option<&InstanceIdentity>,
    ) -> Result<Option<&'static str>> {
        let Some(certificate) = self.identity_certificate()? else {
            return Ok(None);
        };
        let Some(identity) = identity else {
            return Ok(Some("instance identity document missing"));
        };
        Ok(verify_identity(
            &certificate,
            identity,
            provider_ref.and_then(|r| r.strip_prefix("ec2:")),
            &self.config.ec2.region,
            &self.config.ec2.identity_account_id,
        )
        .err())
    }

    fn identity_certificate(&self) -> Result<Option<Vec<u8>>> {
        let path = &self.config.ec2.identity_certificate_file;
        if path.as_os_str().is_empty() {
            return Ok(None);
        }
        let pem = std::fs::read(path).map_err(|e| {
            Error::FailedPrecondition(format!(
                "cannot read builders.ec2.identity_certificate_file {}: {e}",
                path.display()
            ))
        })?;
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .and_then(|c| c.ok())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "builders.ec2.identity_certificate_file {} holds no PEM certificate",
                    path.display()
                ))
            })?;
        Ok(Some(der.to_vec()))
    }

    /// Checks that an authenticated caller is this machine's agent; anything else is
    /// refused and audited (a stolen or confused token reporting for another machine).
    pub async fn authorize_agent(&self, principal: &Principal, machine_id: &str) -> Result<()> {
        check_len("machine_id", machine_id)?;
        if let Err(err) = authorize(
            principal,
            Action::ActAsMachine,
            Target::Machine {
                id: machine_id,
                organization_id: None,
            },
        ) {
            let reason = if principal.is(TokenKind::Machine) {
                "agent token belongs to another machine"
            } else {
                "not a machine token"
            };
            let event = principal
                .audit("machine.impersonation_refused")
                .target("machine", truncate(machine_id))
                .details(serde_json::json!({ "reason": reason }));
            self.record_refusal("impersonation", reason, event).await;
            return Err(err);
        }
        Ok(())
    }

    /// The machine's current directive generation: cheap to poll, unlike the directive
    /// itself (which issues a certificate).
    pub async fn directive_generation(&self, machine_id: &str) -> Result<u64> {
        let generation: Option<i64> =
            sqlx::query_scalar("SELECT directive_generation FROM machines WHERE id = $1")
                .bind(machine_id)
                .fetch_optional(&self.pool)
                .await?;
        generation
            .map(|g| g.max(0) as u64)
            .ok_or_else(|| Error::not_found("machine", machine_id))
    }

    /// The machine's current directive.
    pub async fn directive(&self, machine_id: &str) -> Result<Directive> {
        let row: Option<DirectiveRow> =
            sqlx::query_as(
                "SELECT m.state, m.project_id, m.platform, m.directive_generation, m.server_name,
                        m.active_builds,
                        CASE m.platform WHEN 'arm64' THEN p.cache_size_gb_arm64 ELSE p.cache_size_gb_amd64 END
                 FROM machines m LEFT JOIN projects p ON p.id = m.project_id WHERE m.id = $1",
            )
            .bind(machine_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some((state, project_id, platform, generation, server_name, active, cache_gb)) = row
        else {
            return Err(Error::not_found("machine", machine_id));
        };
        let generation = generation.max(0) as u64;
        let action = match (state.as_str(), project_id) {
            ("terminated" | "failed", _) => DirectiveAction::Drain {
                reason: format!("the machine is {state}"),
            },
            ("draining", _) if active == 0 => DirectiveAction::Drain {
                reason: "the machine is draining".into(),
            },
            (_, None) => DirectiveAction::Standby,
            (_, Some(project_id)) => {
                let default_keep = cache_gb.unwrap_or(50).max(1) as u64 * 1024 * 1024 * 1024;
                let (cache, gc_keep_bytes) = match self.cache.for_machine(machine_id).await? {
                    MachineVolume::None => (None, default_keep),
                    MachineVolume::Waiting => {
                        // BuildKit starts once its volume exists (the create job bumps
                        // the directive).
                        return Ok(Directive {
                            generation,
                            action: DirectiveAction::Standby,
                        });
                    }
                    MachineVolume::Failed(reason) => {
                        return Ok(Directive {
                            generation,
                            action: DirectiveAction::Drain { reason },
                        });
                    }
                    MachineVolume::Ready {
                        volume_id,
                        size_bytes,
                        gc_keep_bytes,
                        attachment,
                    } => (
                        Some(CacheVolumeSpec {
                            volume_id,
                            size_bytes,
                            attachment,
                        }),
                        gc_keep_bytes,
                    ),
                };
                let pki = self.pki().await?;
                let server_name = server_name.unwrap_or_else(|| super::server_name_for(machine_id));
                let cert = pki.server_certificate(
                    &server_name,
                    time::Duration::hours(self.config.server_cert_hours as i64),
                )?;
                DirectiveAction::Serve(Box::new(BuildKitTask {
                    project_id,
                    platform,
                    server_name,
                    server_cert_pem: cert.cert_pem,
                    server_key_pem: cert.key_pem,
                    ca_cert_pem: pki.ca_pem.clone(),
                    cache,
                    gc_keep_bytes,
                    max_parallelism: self.config.max_parallelism,
                }))
            }
        };
        Ok(Directive { generation, action })
    }

    /// Records a health report. When the agent has applied the current directive and
    /// BuildKit serves it (or it stands by), the machine starts serving and the builds
    /// waiting for it wake.
    pub async fn report_health(
        &self,
        machine_id: &str,
        report: &HealthReport,
    ) -> Result<HealthAnswer> {
        let row: Option<(String, i64, bool, bool, i32)> = sqlx::query_as(
            "UPDATE machines SET last_health_at = now(), buildkit_up = $2, applied_generation = $3,
                 disk_free_bytes = $4, disk_total_bytes = $5
             WHERE id = $1
             RETURNING state, directive_generation, project_id IS NULL, serving, active_builds",
        )
        .bind(machine_id)
        .bind(report.buildkit_up)
        .bind(report.generation.min(i64::MAX as u64) as i64)
        .bind(report.disk_free_bytes.min(i64::MAX as u64) as i64)
        .bind(report.disk_total_bytes.min(i64::MAX as u64) as i64)
        .fetch_optional(&self.pool)
        .await?;
        let Some((state, generation, standby, serving, active)) = row else {
            return Err(Error::not_found("machine", machine_id));
        };
        let applied = report.generation == generation.max(0) as u64;
        let live = matches!(state.as_str(), "booting" | "ready" | "assigned");
        if live && applied && !serving && (report.buildkit_up || standby) {
            self.mark_serving(machine_id, Some(generation)).await?;
        } else if live && applied && serving && !standby && !report.buildkit_up {
            // BuildKit died under a serving machine; the agent restarts it. New builds
            // wait until it serves again.
            sqlx::query(
                "UPDATE machines SET serving = false WHERE id = $1 AND directive_generation = $2",
            )
            .bind(machine_id)
            .bind(generation)
            .execute(&self.pool)
            .await?;
            tracing::warn!(machine_id, "BuildKit is down on a serving builder");
        }
        let should_terminate = matches!(state.as_str(), "terminated" | "failed")
            || (state == "draining" && active == 0);
        Ok(HealthAnswer {
            should_terminate,
            generation: generation.max(0) as u64,
        })
    }

    /// The agent stopped (drained, or its machine is shutting down). The machine is
    /// finished: its builds go back to the queue and the instance is terminated.
    pub async fn agent_shutdown(&self, machine_id: &str, reason: &str) -> Result<()> {
        check_len("reason", reason)?;
        let state: Option<String> = sqlx::query_scalar(
            "UPDATE machines SET agent_stopped_at = now(), buildkit_up = false, serving = false
             WHERE id = $1 RETURNING state",
        )
        .bind(machine_id)
        .fetch_optional(&self.pool)
        .await?;
        if matches!(state.as_deref(), Some("booting" | "ready" | "assigned")) {
            self.fail_and_requeue(
                machine_id,
                &format!("its agent shut down: {}", truncate(reason)),
            )
            .await?;
        }
        super::queue_termination(&self.pool, machine_id).await?;
        tracing::info!(machine_id, reason, "builder agent shut down");
        Ok(())
    }
}

/// Verifies the document's RSA-SHA256 signature under `certificate` (DER), then that it
/// names `instance_id`, `region` and, if not empty, `account_id`.
pub fn verify_identity(
    certificate: &[u8],
    identity: &InstanceIdentity,
    instance_id: Option<&str>,
    region: &str,
    account_id: &str,
) -> std::result::Result<(), &'static str> {
    use base64::Engine;
    let signature: String = identity.signature.split_whitespace().collect();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| "instance identity signature is not base64")?;
    let der = rustls::pki_types::CertificateDer::from(certificate);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|_| "the configured identity certificate is unusable")?;
    cert.verify_signature(
        webpki::ring::RSA_PKCS1_2048_8192_SHA256,
        identity.document.as_bytes(),
        &signature,
    )
    .map_err(|_| "instance identity signature does not verify")?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Document {
        instance_id: String,
        region: String,
        account_id: String,
    }
    let document: Document = serde_json::from_str(&identity.document)
        .map_err(|_| "instance identity document is malformed")?;
    if Some(document.instance_id.as_str()) != instance_id
        || document.region != region
        || (!account_id.is_empty() && document.account_id != account_id)
    {
        return Err("instance identity names another instance");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_tokens_bind_machine_and_nonce() {
        let kek = [7u8; 32];
        let token = registration_token(&kek, "m1", "n1");
        assert!(token_matches(&kek, "m1", "n1", &token));
        assert!(!token_matches(&kek, "m2", "n1", &token));
        assert!(!token_matches(&kek, "m1", "n2", &token));
        assert!(!token_matches(&[8u8; 32], "m1", "n1", &token));
        assert!(!token_matches(&kek, "m1", "n1", "kilnreg_zz"));
        assert!(!token_matches(&kek, "m1", "n1", ""));
    }
}
