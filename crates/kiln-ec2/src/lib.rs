//! Leases EC2 instances for Kiln's builder scheduler.
//!
//! A [`Fleet`] launches one instance per Kiln machine id from a per-architecture launch
//! template, finds and lists the instances this cluster owns, and terminates them.
//!
//! Ownership is by tag, set atomically at launch through RunInstances `TagSpecifications`:
//! `kiln:cluster` (the cluster id), `kiln:machine-id`, `kiln:arch` and `Name`. Every lookup
//! filters on `kiln:cluster`, and [`Fleet::terminate`] refuses instances without it.
//!
//! [`Fleet::launch`] is idempotent per machine id: it looks the machine up by tag before
//! launching, and passes a `ClientToken` derived from (cluster, machine id, instance type,
//! subnet) so that a repeated call for the same combination is answered with the same
//! instance by EC2. Machine ids are meant to be used once: EC2 remembers a token for a
//! while, even after the instance terminated.
//!
//! Capacity errors fall through to the next (instance type, subnet) combination, and a
//! combination that failed is skipped for [`FleetConfig::capacity_cooldown`]. Throttling is
//! retried with backoff on the same combination. A failure that leaves it unknown whether
//! an instance was launched (timeout, transport error, unknown 5xx) never falls through:
//! the machine is looked up by tag again, and the error is returned if nothing is found,
//! so that the caller retries later (first with the same combination, hence the same
//! token).

mod error;

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{
    Filter, Instance, InstanceType, LaunchTemplateSpecification, ResourceType, Tag,
    TagSpecification,
};
use base64::Engine as _;
use sha2::{Digest, Sha256};

pub use aws_sdk_ec2;
pub use error::Ec2Error;

use error::{Class, classify, map_sdk};

/// Tag holding the cluster id; it marks an instance as owned by this cluster.
pub const TAG_CLUSTER: &str = "kiln:cluster";
/// Tag holding the Kiln machine id.
pub const TAG_MACHINE_ID: &str = "kiln:machine-id";
/// Tag holding the architecture, `amd64` or `arm64`.
pub const TAG_ARCH: &str = "kiln:arch";

/// States of an instance that still exists (everything but `terminated`).
const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped", "shutting-down"];

/// How long a machine remembers the combination of an ambiguous RunInstances failure, so
/// that its next launch retries that combination first, with the same ClientToken.
const AMBIGUOUS_MEMORY: Duration = Duration::from_secs(30 * 60);

/// Upper bound for one throttling backoff sleep.
const MAX_THROTTLE_DELAY: Duration = Duration::from_secs(20);

/// CPU architecture of a builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// `amd64` or `arm64`, as in the `kiln:arch` tag.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Parses `amd64` or `arm64`.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "amd64" => Some(Arch::Amd64),
            "arm64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to launch builders of one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchTemplate {
    /// Launch template name; version `$Latest` is used.
    pub launch_template: String,
    /// AMI that overrides the template's, if set.
    pub image_id: Option<String>,
    /// Instance types in fallback order; the first is preferred. Must not be empty.
    pub instance_types: Vec<String>,
}

/// Configuration of a [`Fleet`].
#[derive(Clone)]
pub struct FleetConfig {
    /// AWS region, e.g. `us-east-1`.
    pub region: String,
    /// Endpoint override (moto or a proxy in tests); `None` = AWS.
    pub endpoint_url: Option<String>,
    /// Access key id and secret; `None` = aws-config's default credential chain.
    pub static_credentials: Option<(String, String)>,
    /// Value of the `kiln:cluster` ownership tag.
    pub cluster_id: String,
    pub amd64: Option<ArchTemplate>,
    pub arm64: Option<ArchTemplate>,
    /// Subnets in fallback order; empty = the launch template's. When set, the templates
    /// must not define network interfaces.
    pub subnets: Vec<String>,
    /// Security groups that replace the template's; empty = the template's.
    pub security_group_ids: Vec<String>,
    /// RunInstances retries after RequestLimitExceeded before giving up with
    /// [`Ec2Error::Throttled`].
    pub throttle_max_retries: u32,
    /// First throttling backoff. Retry n sleeps a random time in
    /// [base·2ⁿ, base·2ⁿ⁺¹] (capped at 20 s).
    pub throttle_base_delay: Duration,
    /// How long an (instance type, subnet) that failed with a capacity error is skipped.
    pub capacity_cooldown: Duration,
    /// Timeout of one HTTP attempt (and of connecting).
    pub call_timeout: Duration,
    /// Page size of DescribeInstances in [`Fleet::list`] (5 to 1000).
    pub describe_page_size: i32,
}

impl FleetConfig {
    /// A configuration with no templates and default timings: 5 throttling retries from
    /// 250 ms, a 5-minute capacity cooldown, 30 s call timeout, pages of 200.
    pub fn new(region: impl Into<String>, cluster_id: impl Into<String>) -> FleetConfig {
        FleetConfig {
            region: region.into(),
            endpoint_url: None,
            static_credentials: None,
            cluster_id: cluster_id.into(),
            amd64: None,
            arm64: None,
            subnets: Vec::new(),
            security_group_ids: Vec::new(),
            throttle_max_retries: 5,
            throttle_base_delay: Duration::from_millis(250),
            capacity_cooldown: Duration::from_secs(300),
            call_timeout: Duration::from_secs(30),
            describe_page_size: 200,
        }
    }

    fn template(&self, arch: Arch) -> Option<&ArchTemplate> {
        match arch {
            Arch::Amd64 => self.amd64.as_ref(),
            Arch::Arm64 => self.arm64.as_ref(),
        }
    }
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field(
                "static_credentials",
                &self
                    .static_credentials
                    .as_ref()
                    .map(|(id, _)| (id, "<redacted>")),
            )
            .field("cluster_id", &self.cluster_id)
            .field("amd64", &self.amd64)
            .field("arm64", &self.arm64)
            .field("subnets", &self.subnets)
            .field("security_group_ids", &self.security_group_ids)
            .field("throttle_max_retries", &self.throttle_max_retries)
            .field("throttle_base_delay", &self.throttle_base_delay)
            .field("capacity_cooldown", &self.capacity_cooldown)
            .field("call_timeout", &self.call_timeout)
            .field("describe_page_size", &self.describe_page_size)
            .finish()
    }
}

/// Result of [`Fleet::launch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchedInstance {
    pub instance_id: String,
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub private_ip: Option<String>,
    /// State as last seen (`pending` right after RunInstances).
    pub state: String,
    /// True if the instance was found by its tags rather than returned by RunInstances:
    /// an earlier call (or an ambiguous failure of this one) launched it.
    pub reused: bool,
}

/// An instance owned by this cluster, as DescribeInstances shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedInstance {
    pub instance_id: String,
    /// The `kiln:machine-id` tag.
    pub machine_id: Option<String>,
    /// The `kiln:arch` tag.
    pub arch: Option<Arch>,
    /// `pending`, `running`, `stopping`, `stopped` or `shutting-down`.
    pub state: String,
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub private_ip: Option<String>,
    pub launched_at: Option<SystemTime>,
}

/// One (instance type, subnet) to launch in; `subnet == None` = the template's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Combo {
    instance_type: String,
    subnet: Option<String>,
}

impl fmt::Display for Combo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subnet {
            Some(subnet) => write!(f, "{}/{}", self.instance_type, subnet),
            None => f.write_str(&self.instance_type),
        }
    }
}

/// Launches, finds, lists and terminates this cluster's builder instances.
pub struct Fleet {
    client: Client,
    cfg: FleetConfig,
    /// Combinations that failed with a capacity error, and when.
    cooling: Mutex<HashMap<Combo, Instant>>,
    /// Machine id -> the combination of its last ambiguous RunInstances failure.
    ambiguous: Mutex<HashMap<String, (Combo, Instant)>>,
}

impl Fleet {
    /// Builds the SDK client. SDK retries (standard, 3 attempts) stay on for every call
    /// except RunInstances, which [`Fleet::launch`] retries itself.
    pub async fn new(cfg: FleetConfig) -> Fleet {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.call_timeout)
                    .operation_attempt_timeout(cfg.call_timeout)
                    .build(),
            );
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some((id, secret)) = &cfg.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "kiln-ec2-static",
            ));
        }
        let sdk = loader.load().await;
        Fleet {
            client: Client::new(&sdk),
            cfg,
            cooling: Mutex::new(HashMap::new()),
            ambiguous: Mutex::new(HashMap::new()),
        }
    }

    /// The underlying SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration this fleet was built with.
    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    /// Makes sure an instance exists for `machine_id`, launching one if none is found by
    /// tag. `user_data` is passed base64-encoded and never logged.
    pub async fn launch(
        &self,
        machine_id: &str,
        arch: Arch,
        user_data: &str,
    ) -> Result<LaunchedInstance, Ec2Error> {
        let template = self
            .cfg
            .template(arch)
            .filter(|t| !t.instance_types.is_empty())
            .ok_or_else(|| {
                Ec2Error::NotConfigured(format!("no launch template or instance type for {arch}"))
            })?;

        if let Some(found) = self.find_launched(machine_id).await? {
            tracing::info!(machine_id, instance_id = %found.instance_id, state = %found.state,
                "instance already exists; not launching");
            return Ok(found);
        }

        let user_data = base64::engine::general_purpose::STANDARD.encode(user_data);
        let mut tried = Vec::new();
        for combo in self.plan(machine_id, template) {
            let failure = match self
                .run_with_backoff(machine_id, arch, template, &combo, &user_data)
                .await
            {
                Ok(launched) => {
                    self.ambiguous.lock().unwrap().remove(machine_id);
                    tracing::info!(machine_id, %arch, instance_id = %launched.instance_id,
                        combination = %combo, "launched instance");
                    return Ok(launched);
                }
                Err(failure) => failure,
            };
            match failure.class {
                Class::Capacity => {
                    tracing::warn!(machine_id, combination = %combo, error = %failure.error,
                        "no capacity; trying the next combination");
                    self.cooling
                        .lock()
                        .unwrap()
                        .insert(combo.clone(), Instant::now());
                    tried.push(combo.to_string());
                }
                Class::Ambiguous => {
                    tracing::warn!(machine_id, combination = %combo, error = %failure.error,
                        "RunInstances outcome unknown; looking the machine up by tag");
                    self.ambiguous
                        .lock()
                        .unwrap()
                        .insert(machine_id.to_string(), (combo, Instant::now()));
                    return match self.find_launched(machine_id).await {
                        Ok(Some(found)) => {
                            self.ambiguous.lock().unwrap().remove(machine_id);
                            tracing::info!(machine_id, instance_id = %found.instance_id,
                                "the ambiguous launch did happen");
                            Ok(found)
                        }
                        Ok(None) | Err(_) => Err(failure.error),
                    };
                }
                Class::Quota | Class::Throttle | Class::Definite => {
                    self.ambiguous.lock().unwrap().remove(machine_id);
                    tracing::warn!(machine_id, combination = %combo, error = %failure.error,
                        "launch failed");
                    return Err(failure.error);
                }
            }
        }
        tracing::warn!(machine_id, %arch, tried = ?tried, "no capacity in any combination");
        Err(Ec2Error::NoCapacity { tried })
    }

    /// The non-terminated instance of this cluster tagged with `machine_id`, if any (the
    /// earliest launched if there are several).
    pub async fn find(&self, machine_id: &str) -> Result<Option<OwnedInstance>, Ec2Error> {
        let mut found = self
            .describe(vec![filter(&format!("tag:{TAG_MACHINE_ID}"), machine_id)])
            .await?;
        if found.len() > 1 {
            tracing::warn!(
                machine_id,
                count = found.len(),
                "several instances for one machine"
            );
        }
        found.sort_by_key(|i| i.launched_at);
        Ok(found.into_iter().next())
    }

    /// Every non-terminated instance tagged with this cluster's id.
    pub async fn list(&self) -> Result<Vec<OwnedInstance>, Ec2Error> {
        self.describe(Vec::new()).await
    }

    /// Terminates an instance of this cluster. An instance that is already terminated or
    /// gone is fine; one without this cluster's tag is refused with
    /// [`Ec2Error::NotOwned`] and left alone.
    pub async fn terminate(&self, instance_id: &str) -> Result<(), Ec2Error> {
        let Some(instance) = self.owned_instance(instance_id).await? else {
            tracing::info!(instance_id, "terminate: no such instance");
            return Ok(());
        };
        let instance = &instance;
        if state(instance) == "terminated" {
            return Ok(());
        }
        match self
            .client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(instance_id, machine_id = ?tag(instance, TAG_MACHINE_ID),
                    "terminated instance");
                Ok(())
            }
            Err(err) => match map_sdk(err) {
                Ec2Error::Api { code, .. } if code == "InvalidInstanceID.NotFound" => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Stops a running instance of this cluster (a stopped standby keeps its disk and
    /// costs no compute). Already stopping or stopped is fine; a missing one is an error.
    pub async fn stop(&self, instance_id: &str) -> Result<(), Ec2Error> {
        let instance = self.require_owned(instance_id).await?;
        match state(&instance) {
            "stopping" | "stopped" => return Ok(()),
            "pending" | "running" => {}
            other => {
                return Err(Ec2Error::Api {
                    code: "IncorrectInstanceState".into(),
                    message: format!("instance {instance_id} is {other}; only a running one stops"),
                });
            }
        }
        self.client
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(map_sdk)?;
        tracing::info!(instance_id, "stopped instance");
        Ok(())
    }

    /// Starts a stopped instance of this cluster. Running or starting already is fine. A
    /// terminated one is refused here (moto would even bring it back). No capacity for its
    /// type in its zone is [`Ec2Error::NoCapacity`]: launch a fresh instance instead.
    pub async fn start(&self, instance_id: &str) -> Result<(), Ec2Error> {
        let instance = self.require_owned(instance_id).await?;
        match state(&instance) {
            "pending" | "running" => return Ok(()),
            "stopped" => {}
            other => {
                return Err(Ec2Error::Api {
                    code: "IncorrectInstanceState".into(),
                    message: format!(
                        "instance {instance_id} is {other}; only a stopped one starts"
                    ),
                });
            }
        }
        match self
            .client
            .start_instances()
            .instance_ids(instance_id)
            .customize()
            .config_override(
                aws_sdk_ec2::config::Config::builder()
                    .retry_config(RetryConfig::standard().with_max_attempts(1)),
            )
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(instance_id, "started instance");
                Ok(())
            }
            Err(err) => match map_sdk(err) {
                Ec2Error::Api { code, .. } if error::is_capacity_code(&code) => {
                    Err(Ec2Error::NoCapacity {
                        tried: vec![instance_id.to_string()],
                    })
                }
                other => Err(other),
            },
        }
    }

    /// The instance, if it exists and carries this cluster's tag; another cluster's is
    /// [`Ec2Error::NotOwned`].
    async fn owned_instance(&self, instance_id: &str) -> Result<Option<Instance>, Ec2Error> {
        // A filter rather than InstanceIds, so that an unknown id is an empty answer.
        let out = self
            .client
            .describe_instances()
            .filters(filter("instance-id", instance_id))
            .send()
            .await
            .map_err(map_sdk)?;
        let Some(instance) = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .cloned()
        else {
            return Ok(None);
        };
        if tag(&instance, TAG_CLUSTER) != Some(self.cfg.cluster_id.as_str()) {
            tracing::warn!(instance_id, "not this cluster's instance; left alone");
            return Err(Ec2Error::NotOwned(instance_id.to_string()));
        }
        Ok(Some(instance))
    }

    async fn require_owned(&self, instance_id: &str) -> Result<Instance, Ec2Error> {
        self.owned_instance(instance_id)
            .await?
            .ok_or_else(|| Ec2Error::Api {
                code: "InvalidInstanceID.NotFound".into(),
                message: format!("instance {instance_id} does not exist"),
            })
    }

    /// Like [`Fleet::find`], but ignores instances that are shutting down (a launch
    /// replaces those).
    async fn find_launched(&self, machine_id: &str) -> Result<Option<LaunchedInstance>, Ec2Error> {
        let mut found: Vec<OwnedInstance> = self
            .describe(vec![filter(&format!("tag:{TAG_MACHINE_ID}"), machine_id)])
            .await?
            .into_iter()
            .filter(|i| i.state != "shutting-down")
            .collect();
        found.sort_by_key(|i| i.launched_at);
        Ok(found.into_iter().next().map(|i| LaunchedInstance {
            instance_id: i.instance_id,
            instance_type: i.instance_type.unwrap_or_default(),
            subnet_id: i.subnet_id,
            private_ip: i.private_ip,
            state: i.state,
            reused: true,
        }))
    }

    /// DescribeInstances of this cluster's live instances, with extra filters, all pages.
    async fn describe(&self, extra: Vec<Filter>) -> Result<Vec<OwnedInstance>, Ec2Error> {
        let mut filters = vec![
            filter(&format!("tag:{TAG_CLUSTER}"), &self.cfg.cluster_id),
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(LIVE_STATES.iter().map(|s| s.to_string()).collect()))
                .build(),
        ];
        filters.extend(extra);
        let mut pages = self
            .client
            .describe_instances()
            .set_filters(Some(filters))
            .max_results(self.cfg.describe_page_size.clamp(5, 1000))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(map_sdk)?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                // The filters already did this; a fake EC2 may be lax.
                if tag(instance, TAG_CLUSTER) == Some(self.cfg.cluster_id.as_str())
                    && state(instance) != "terminated"
                {
                    out.push(owned(instance));
                }
            }
        }
        Ok(out)
    }

    /// The combinations to try, in order: types in order, each with the subnets in order,
    /// minus those cooling down after a capacity error (all of them if every one is).
    /// The combination of this machine's last ambiguous failure goes first.
    fn plan(&self, machine_id: &str, template: &ArchTemplate) -> Vec<Combo> {
        let subnets: Vec<Option<String>> = if self.cfg.subnets.is_empty() {
            vec![None]
        } else {
            self.cfg.subnets.iter().cloned().map(Some).collect()
        };
        let all: Vec<Combo> = template
            .instance_types
            .iter()
            .flat_map(|t| {
                subnets.iter().map(move |s| Combo {
                    instance_type: t.clone(),
                    subnet: s.clone(),
                })
            })
            .collect();

        let mut plan = {
            let mut cooling = self.cooling.lock().unwrap();
            let cooldown = self.cfg.capacity_cooldown;
            cooling.retain(|_, at| at.elapsed() < cooldown);
            let warm: Vec<Combo> = all
                .iter()
                .filter(|c| !cooling.contains_key(c))
                .cloned()
                .collect();
            if warm.is_empty() {
                tracing::info!(machine_id, "every combination is cooling down; trying all");
                all.clone()
            } else {
                warm
            }
        };

        let mut ambiguous = self.ambiguous.lock().unwrap();
        ambiguous.retain(|_, (_, at)| at.elapsed() < AMBIGUOUS_MEMORY);
        if let Some((combo, _)) = ambiguous.get(machine_id)
            && all.contains(combo)
        {
            plan.retain(|c| c != combo);
            plan.insert(0, combo.clone());
        }
        plan
    }

    /// RunInstances for one combination, retrying throttling with backoff.
    async fn run_with_backoff(
        &self,
        machine_id: &str,
        arch: Arch,
        template: &ArchTemplate,
        combo: &Combo,
        user_data_b64: &str,
    ) -> Result<LaunchedInstance, error::Failure> {
        let mut retry = 0;
        loop {
            match self
                .run_once(machine_id, arch, template, combo, user_data_b64)
                .await
            {
                Err(failure)
                    if failure.class == Class::Throttle
                        && retry < self.cfg.throttle_max_retries =>
                {
                    let delay = throttle_delay(self.cfg.throttle_base_delay, retry);
                    tracing::info!(machine_id, combination = %combo, retry = retry + 1,
                        delay_ms = delay.as_millis() as u64, "RunInstances throttled; backing off");
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                other => return other,
            }
        }
    }

    async fn run_once(
        &self,
        machine_id: &str,
        arch: Arch,
        template: &ArchTemplate,
        combo: &Combo,
        user_data_b64: &str,
    ) -> Result<LaunchedInstance, error::Failure> {
        let token = client_token(&self.cfg.cluster_id, machine_id, combo);
        tracing::debug!(machine_id, combination = %combo, client_token = %token, "RunInstances");
        let tags = vec![
            Tag::builder()
                .key(TAG_CLUSTER)
                .value(&self.cfg.cluster_id)
                .build(),
            Tag::builder().key(TAG_MACHINE_ID).value(machine_id).build(),
            Tag::builder().key(TAG_ARCH).value(arch.as_str()).build(),
            Tag::builder()
                .key("Name")
                .value(format!("kiln-builder-{machine_id}"))
                .build(),
        ];
        let mut request = self
            .client
            .run_instances()
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(&template.launch_template)
                    .version("$Latest")
                    .build(),
            )
            .instance_type(InstanceType::from(combo.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(token)
            .user_data(user_data_b64)
            .set_security_group_ids(
                (!self.cfg.security_group_ids.is_empty())
                    .then(|| self.cfg.security_group_ids.clone()),
            )
            .set_subnet_id(combo.subnet.clone())
            .set_image_id(template.image_id.clone());
        for resource in [ResourceType::Instance, ResourceType::Volume] {
            request = request.tag_specifications(
                TagSpecification::builder()
                    .resource_type(resource)
                    .set_tags(Some(tags.clone()))
                    .build(),
            );
        }
        // No SDK retries: a capacity error comes back as a 5xx, which the SDK would retry
        // in the same place; throttling is retried by run_with_backoff.
        let output = request
            .customize()
            .config_override(
                aws_sdk_ec2::config::Config::builder()
                    .retry_config(RetryConfig::standard().with_max_attempts(1)),
            )
            .send()
            .await
            .map_err(|err| classify(&err))?;
        let Some(instance) = output.instances().first() else {
            return Err(error::Failure {
                class: Class::Ambiguous,
                error: Ec2Error::Api {
                    code: "EmptyResponse".into(),
                    message: "RunInstances returned no instance".into(),
                },
            });
        };
        Ok(LaunchedInstance {
            instance_id: instance.instance_id().unwrap_or_default().to_string(),
            instance_type: instance
                .instance_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_else(|| combo.instance_type.clone()),
            subnet_id: instance
                .subnet_id()
                .map(str::to_string)
                .or_else(|| combo.subnet.clone()),
            private_ip: instance.private_ip_address().map(str::to_string),
            state: state(instance).to_string(),
            reused: false,
        })
    }
}

/// A ClientToken (64 hex chars, within EC2's 64 ASCII limit) that is the same for every
/// call with the same cluster, machine, instance type and subnet, and differs otherwise,
/// so that falling through to another combination never reuses a token with different
/// parameters (IdempotentParameterMismatch).
fn client_token(cluster_id: &str, machine_id: &str, combo: &Combo) -> String {
    let mut hash = Sha256::new();
    for part in [
        "kiln-ec2/run-instances/v1",
        cluster_id,
        machine_id,
        &combo.instance_type,
        combo.subnet.as_deref().unwrap_or(""),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hex::encode(hash.finalize())
}

/// Backoff before throttling retry `retry` (0-based): uniform in [d, 2d] with
/// d = base·2^retry, capped at [`MAX_THROTTLE_DELAY`].
fn throttle_delay(base: Duration, retry: u32) -> Duration {
    let floor = base
        .saturating_mul(1u32 << retry.min(20))
        .min(MAX_THROTTLE_DELAY / 2);
    let jitter_nanos = rand::random_range(0..=floor.as_nanos() as u64);
    floor + Duration::from_nanos(jitter_nanos)
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn tag<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn state(instance: &Instance) -> &str {
    instance
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str())
        .unwrap_or("unknown")
}

fn owned(instance: &Instance) -> OwnedInstance {
    OwnedInstance {
        instance_id: instance.instance_id().unwrap_or_default().to_string(),
        machine_id: tag(instance, TAG_MACHINE_ID).map(str::to_string),
        arch: tag(instance, TAG_ARCH).and_then(Arch::parse),
        state: state(instance).to_string(),
        instance_type: instance.instance_type().map(|t| t.as_str().to_string()),
        subnet_id: instance.subnet_id().map(str::to_string),
        private_ip: instance.private_ip_address().map(str::to_string),
        launched_at: instance
            .launch_time()
            .and_then(|t| SystemTime::try_from(*t).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn combo(t: &str, s: Option<&str>) -> Combo {
        Combo {
            instance_type: t.into(),
            subnet: s.map(str::to_string),
        }
    }

    #[test]
    fn client_token_is_stable_short_and_distinct() {
        let a = client_token("c1", "m1", &combo("c6i.large", Some("subnet-a")));
        assert_eq!(a.len(), 64);
        assert!(a.is_ascii());
        assert_eq!(
            a,
            client_token("c1", "m1", &combo("c6i.large", Some("subnet-a")))
        );
        for other in [
            client_token("c1", "m1", &combo("c6i.large", Some("subnet-b"))),
            client_token("c1", "m1", &combo("c6a.large", Some("subnet-a"))),
            client_token("c1", "m1", &combo("c6i.large", None)),
            client_token("c1", "m2", &combo("c6i.large", Some("subnet-a"))),
            client_token("c2", "m1", &combo("c6i.large", Some("subnet-a"))),
            // Length-prefixed parts: no ambiguity from moving a boundary.
            client_token("c1m", "1", &combo("c6i.large", Some("subnet-a"))),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn throttle_delay_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for _ in 0..200 {
            let d0 = throttle_delay(base, 0);
            assert!(d0 >= base && d0 <= 2 * base, "{d0:?}");
            let d3 = throttle_delay(base, 3);
            assert!(d3 >= 8 * base && d3 <= 16 * base, "{d3:?}");
            assert!(throttle_delay(base, 40) <= MAX_THROTTLE_DELAY);
        }
    }

    async fn fleet(cfg: FleetConfig) -> Fleet {
        Fleet::new(FleetConfig {
            endpoint_url: Some("http://127.0.0.1:9".into()),
            static_credentials: Some(("AKIDEXAMPLE".into(), "secret".into())),
            ..cfg
        })
        .await
    }

    fn template(types: &[&str]) -> ArchTemplate {
        ArchTemplate {
            launch_template: "lt".into(),
            image_id: None,
            instance_types: types.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn plan_orders_types_then_subnets_and_skips_cooling() {
        let mut cfg = FleetConfig::new("us-east-1", "c1");
        cfg.subnets = vec!["a".into(), "b".into()];
        let fleet = fleet(cfg).await;
        let tpl = template(&["t1", "t2"]);
        let names = |plan: Vec<Combo>| plan.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(fleet.plan("m", &tpl)),
            ["t1/a", "t1/b", "t2/a", "t2/b"]
        );

        let now = Instant::now();
        fleet
            .cooling
            .lock()
            .unwrap()
            .insert(combo("t1", Some("a")), now);
        assert_eq!(names(fleet.plan("m", &tpl)), ["t1/b", "t2/a", "t2/b"]);

        // An ambiguous failure's combination comes first, even while cooling.
        fleet
            .ambiguous
            .lock()
            .unwrap()
            .insert("m".into(), (combo("t1", Some("a")), now));
        assert_eq!(
            names(fleet.plan("m", &tpl)),
            ["t1/a", "t1/b", "t2/a", "t2/b"]
        );
        assert_eq!(names(fleet.plan("other", &tpl)), ["t1/b", "t2/a", "t2/b"]);

        // Everything cooling: try everything rather than nothing.
        for c in ["t1/b", "t2/a", "t2/b"] {
            let (t, s) = c.split_once('/').unwrap();
            fleet.cooling.lock().unwrap().insert(combo(t, Some(s)), now);
        }
        assert_eq!(
            names(fleet.plan("other", &tpl)),
            ["t1/a", "t1/b", "t2/a", "t2/b"]
        );
    }

    #[tokio::test]
    async fn cooldown_expires() {
        let mut cfg = FleetConfig::new("us-east-1", "c1");
        cfg.capacity_cooldown = Duration::from_millis(1);
        let fleet = fleet(cfg).await;
        let tpl = template(&["t1", "t2"]);
        fleet
            .cooling
            .lock()
            .unwrap()
            .insert(combo("t1", None), Instant::now() - Duration::from_millis(5));
        assert_eq!(fleet.plan("m", &tpl).len(), 2);
        assert!(fleet.cooling.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn unconfigured_arch_fails_without_a_call() {
        let mut cfg = FleetConfig::new("us-east-1", "c1");
        cfg.amd64 = Some(template(&[]));
        let fleet = fleet(cfg).await;
        for arch in [Arch::Amd64, Arch::Arm64] {
            // The endpoint (port 9, discard) would fail with a transport error.
            let err = fleet.launch("m", arch, "secret").await.unwrap_err();
            assert!(matches!(err, Ec2Error::NotConfigured(_)), "{err:?}");
        }
    }

    #[test]
    fn arch_round_trips() {
        for arch in [Arch::Amd64, Arch::Arm64] {
            assert_eq!(Arch::parse(arch.as_str()), Some(arch));
        }
        assert_eq!(Arch::parse("x86_64"), None);
    }
}
