//! The `ec2` provider: builders are EC2 instances running `kiln agent`. Leasing itself
//! (tags, idempotent launches, capacity fall-through, throttling backoff) lives in the
//! `kiln-ec2` crate; this maps it onto the scheduler's provider trait.

use std::time::Duration;

use futures_util::future::BoxFuture;
use kiln_ec2::{Arch, ArchTemplate, Ec2Error, Fleet, FleetConfig};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use super::provider::{AgentBootstrap, ComputeProvider, Instance, LaunchSpec, Launched};
use crate::config::Ec2BuildersConfig;
use crate::db::builds::Platform;
use crate::error::{Error, Result};

pub struct Ec2Provider {
    config: Ec2BuildersConfig,
    fleet: OnceCell<Fleet>,
}

const REF_PREFIX: &str = "ec2:";

impl Ec2Provider {
    pub fn new(config: &Ec2BuildersConfig) -> Self {
        Ec2Provider {
            config: config.clone(),
            fleet: OnceCell::new(),
        }
    }

    pub fn fleet_config(config: &Ec2BuildersConfig) -> FleetConfig {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let template = |name: &str, image: &str, types: &[String]| {
            non_empty(name).map(|launch_template| ArchTemplate {
                launch_template,
                image_id: non_empty(image),
                instance_types: types.to_vec(),
            })
        };
        let mut fleet = FleetConfig::new(config.region.clone(), config.cluster_id.clone());
        fleet.endpoint_url = non_empty(&config.endpoint_url);
        fleet.static_credentials = non_empty(&config.access_key_id)
            .map(|id| (id, config.secret_access_key.expose_secret().to_string()));
        fleet.amd64 = template(
            &config.amd64_launch_template,
            &config.amd64_image_id,
            &config.amd64_instance_types,
        );
        fleet.arm64 = template(
            &config.arm64_launch_template,
            &config.arm64_image_id,
            &config.arm64_instance_types,
        );
        fleet.subnets = config.subnets.clone();
        fleet.security_group_ids = config.security_group_ids.clone();
        fleet.throttle_max_retries = config.throttle_max_retries;
        fleet.throttle_base_delay = Duration::from_millis(config.throttle_base_delay_millis);
        fleet.capacity_cooldown = Duration::from_secs(config.capacity_cooldown_seconds);
        fleet.call_timeout = Duration::from_secs(config.call_timeout_seconds.max(1));
        fleet
    }

    async fn fleet(&self) -> &Fleet {
        self.fleet
            .get_or_init(|| Fleet::new(Self::fleet_config(&self.config)))
            .await
    }

    /// The instance id of a machine, found by its tag.
    async fn instance_of(&self, machine_id: &str) -> Result<String> {
        self.fleet()
            .await
            .find(machine_id)
            .await
            .map_err(map_error)?
            .map(|i| i.instance_id)
            .ok_or_else(|| Error::not_found("instance of machine", machine_id))
    }

    /// The instance's user data: writes the agent's environment (0600, the registration
    /// token is a secret) and starts it.
    fn user_data(&self, machine_id: &str, bootstrap: &AgentBootstrap) -> String {
        let mut env = format!(
            "KILN_AGENT_API_URL={}\nKILN_AGENT_MACHINE_ID={machine_id}\nKILN_AGENT_REGISTRATION_TOKEN={}\nKILN_AGENT_BUILDKIT_LISTEN=0.0.0.0:{}\n",
            bootstrap.api_url, bootstrap.registration_token, self.config.buildkit_port
        );
        if !self.config.identity_certificate_file.as_os_str().is_empty() {
            env.push_str("KILN_AGENT_EC2_IDENTITY=true\n");
        }
        let mut script = String::from(
            "#!/bin/sh\n# Written by Kiln. Contains a one-time secret; readable by root only.\nset -eu\numask 077\ninstall -d -m 0700 /etc/kiln\n",
        );
        if let Some(ca) = &bootstrap.api_ca_pem {
            script.push_str(&format!(
                "cat > /etc/kiln/api-ca.pem <<'KILN_CA'\n{}\nKILN_CA\n",
                ca.trim()
            ));
            env.push_str("KILN_AGENT_API_CA_FILE=/etc/kiln/api-ca.pem\n");
        }
        script.push_str(&format!(
            "cat > /etc/kiln/agent.env <<'KILN_ENV'\n{env}KILN_ENV\n{}\n",
            self.config.agent_command
        ));
        script
    }
}

fn arch_of(platform: Platform) -> Arch {
    match platform {
        Platform::Amd64 => Arch::Amd64,
        Platform::Arm64 => Arch::Arm64,
    }
}

fn map_error(err: Ec2Error) -> Error {
    match err {
        Ec2Error::NotConfigured(what) => Error::FailedPrecondition(format!(
            "the ec2 provider is not configured for this: {what}; set builders.ec2"
        )),
        Ec2Error::Quota { .. } => Error::ResourceExhausted(format!(
            "{err}; raise the EC2 quota or lower builders.max_machines_total"
        )),
        other => Error::Unavailable(other.to_string()),
    }
}

impl ComputeProvider for Ec2Provider {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn uses_agent(&self) -> bool {
        true
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Instance>>> {
        Box::pin(async move {
            let instances = self.fleet().await.list().await.map_err(map_error)?;
            Ok(instances
                .into_iter()
                .filter_map(|i| {
                    let running = matches!(i.state.as_str(), "pending" | "running");
                    i.machine_id.map(|machine_id| Instance {
                        machine_id,
                        running,
                    })
                })
                .collect())
        })
    }

    fn owns(&self, provider_ref: &str) -> bool {
        provider_ref.starts_with(REF_PREFIX)
    }

    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched>> {
        Box::pin(async move {
            let bootstrap = spec.agent.as_ref().ok_or_else(|| {
                Error::internal(anyhow::anyhow!("ec2 machines need an agent bootstrap"))
            })?;
            let user_data = self.user_data(&spec.machine_id, bootstrap);
            let launched = self
                .fleet()
                .await
                .launch(&spec.machine_id, arch_of(spec.platform), &user_data)
                .await
                .map_err(map_error)?;
            let endpoint = launched
                .private_ip
                .as_deref()
                .map(|ip| format!("tcp://{ip}:{}", self.config.buildkit_port))
                .unwrap_or_default();
            tracing::info!(
                machine_id = %spec.machine_id,
                instance_id = %launched.instance_id,
                instance_type = %launched.instance_type,
                subnet = ?launched.subnet_id,
                reused = launched.reused,
                "EC2 builder launched"
            );
            Ok(Launched {
                provider_ref: format!("{REF_PREFIX}{}", launched.instance_id),
                endpoint,
            })
        })
    }

    fn wait_ready<'a>(
        &'a self,
        _machine_id: &'a str,
        _launched: &'a Launched,
        _deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<()>> {
        // The agent reports readiness.
        Box::pin(async { Ok(()) })
    }

    fn is_alive(&self, machine_id: &str) -> BoxFuture<'_, Result<bool>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            let found = self
                .fleet()
                .await
                .find(&machine_id)
                .await
                .map_err(map_error)?;
            Ok(found.is_some_and(|i| matches!(i.state.as_str(), "pending" | "running")))
        })
    }

    fn stop(&self, machine_id: &str) -> BoxFuture<'_, Result<()>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            let instance = self.instance_of(&machine_id).await?;
            self.fleet().await.stop(&instance).await.map_err(map_error)
        })
    }

    fn start(&self, machine_id: &str) -> BoxFuture<'_, Result<()>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            let instance = self.instance_of(&machine_id).await?;
            self.fleet().await.start(&instance).await.map_err(map_error)
        })
    }

    fn terminate(&self, machine_id: &str) -> BoxFuture<'_, Result<()>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            let fleet = self.fleet().await;
            // Every instance tagged with the machine id: a duplicate launch must not leak.
            let instances = fleet.list().await.map_err(map_error)?;
            for instance in instances.iter().filter(|i| {
                i.machine_id.as_deref() == Some(machine_id.as_str()) && i.state != "shutting-down"
            }) {
                fleet
                    .terminate(&instance.instance_id)
                    .await
                    .map_err(map_error)?;
                tracing::info!(machine_id, instance_id = %instance.instance_id, "EC2 instance terminated");
            }
            Ok(())
        })
    }
}
