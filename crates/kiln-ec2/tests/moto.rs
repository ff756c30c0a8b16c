//! kiln-ec2 against moto_server (TEST_MOTO_URL), through the fault-injecting proxy.
//!
//! Tests run in parallel against one moto server, so none resets it: each test has its
//! own cluster id, VPC, subnets, AMIs and launch templates. moto ignores ClientToken and
//! makes instances `running` (and `terminated`) at once; nothing here relies on either.
//! moto's DescribeInstances filters every instance of a region in Python, so tests are
//! spread over several regions to keep each one small.

#[path = "../../../tests/common/fault_proxy.rs"]
mod fault_proxy;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    Filter, Instance, InstanceAttributeName, InstanceType, RequestLaunchTemplateData,
};
use fault_proxy::{Fault, FaultProxy};
use kiln_ec2::{Arch, ArchTemplate, Ec2Error, Fleet, FleetConfig, aws_sdk_ec2};

/// Regions whose moto instance-type offerings include every type used here.
const REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-northeast-1",
];
const BASE_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRIES: u32 = 3;

fn moto_url() -> String {
    match std::env::var("TEST_MOTO_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "TEST_MOTO_URL is not set: these tests need a running moto_server. \
             Run `bash scripts/test.sh`, or `source scripts/lib/moto.sh && ensure_moto && \
             start_moto` and keep TEST_MOTO_URL in the environment."
        ),
    }
}

fn unique(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{name}-{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's world: a proxy in front of moto, and its own VPC, subnets, AMIs and launch
/// templates, created directly in moto (not through the proxy).
struct Env {
    region: &'static str,
    proxy: FaultProxy,
    setup: Fleet,
    cluster: String,
    subnet_a: String,
    subnet_b: String,
    ami_amd64: String,
    ami_arm64: String,
    lt_amd64: String,
    lt_arm64: String,
}

impl Env {
    async fn new(name: &str) -> Env {
        let moto = moto_url();
        let proxy = FaultProxy::start(&moto).await;
        let id = unique(name);
        // The same region for a test every time (nextest runs each in its own process).
        let region = REGIONS[name.bytes().map(usize::from).sum::<usize>() % REGIONS.len()];
        let setup = Fleet::new(config(region, &moto, &format!("setup-{id}"))).await;
        let ec2 = setup.client();

        let mut amis = Vec::new();
        for arch in ["x86_64", "arm64"] {
            let image = ec2
                .register_image()
                .name(format!("kiln-builder-{arch}-{id}"))
                .architecture(arch.into())
                .send()
                .await
                .expect("RegisterImage");
            amis.push(image.image_id().unwrap().to_string());
        }
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .expect("CreateVpc");
        let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
        let zones = ec2
            .describe_availability_zones()
            .send()
            .await
            .expect("DescribeAvailabilityZones");
        let zones: Vec<&str> = zones
            .availability_zones()
            .iter()
            .filter_map(|z| z.zone_name())
            .collect();
        let mut subnets = Vec::new();
        for (cidr, az) in [("10.0.1.0/24", zones[0]), ("10.0.2.0/24", zones[1])] {
            let subnet = ec2
                .create_subnet()
                .vpc_id(&vpc_id)
                .cidr_block(cidr)
                .availability_zone(az)
                .send()
                .await
                .expect("CreateSubnet");
            subnets.push(subnet.subnet().unwrap().subnet_id().unwrap().to_string());
        }
        // The arm64 template deliberately names the x86 AMI: the fleet overrides it.
        let mut templates = Vec::new();
        for (arch, ami, itype) in [
            ("amd64", &amis[0], "c6i.large"),
            ("arm64", &amis[0], "c7g.large"),
        ] {
            let name = format!("kiln-{arch}-{id}");
            ec2.create_launch_template()
                .launch_template_name(&name)
                .launch_template_data(
                    RequestLaunchTemplateData::builder()
                        .image_id(ami)
                        .instance_type(InstanceType::from(itype))
                        .build(),
                )
                .send()
                .await
                .expect("CreateLaunchTemplate");
            templates.push(name);
        }
        Env {
            region,
            proxy,
            setup,
            cluster: format!("cluster-{id}"),
            subnet_a: subnets[0].clone(),
            subnet_b: subnets[1].clone(),
            ami_amd64: amis[0].clone(),
            ami_arm64: amis[1].clone(),
            lt_amd64: templates[0].clone(),
            lt_arm64: templates[1].clone(),
        }
    }

    /// The configuration of the fleet under test: through the proxy, both architectures,
    /// two instance types and two subnets each.
    fn config(&self) -> FleetConfig {
        let mut cfg = config(self.region, &self.proxy.url, &self.cluster);
        cfg.amd64 = Some(ArchTemplate {
            launch_template: self.lt_amd64.clone(),
            image_id: None,
            instance_types: vec!["c6i.large".into(), "c6a.large".into()],
        });
        cfg.arm64 = Some(ArchTemplate {
            launch_template: self.lt_arm64.clone(),
            image_id: Some(self.ami_arm64.clone()),
            instance_types: vec!["c7g.large".into(), "c6g.large".into()],
        });
        cfg.subnets = vec![self.subnet_a.clone(), self.subnet_b.clone()];
        cfg
    }

    async fn fleet(&self) -> Fleet {
        Fleet::new(self.config()).await
    }

    /// The instance as moto has it, read directly (not through the proxy).
    async fn instance(&self, instance_id: &str) -> Instance {
        let out = self
            .setup
            .client()
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .expect("DescribeInstances");
        out.reservations()[0].instances()[0].clone()
    }

    /// Every instance (any state) tagged with this machine id in this test's cluster.
    async fn instances_of(&self, machine_id: &str) -> Vec<Instance> {
        let out = self
            .setup
            .client()
            .describe_instances()
            .filters(filter("tag:kiln:cluster", &self.cluster))
            .filters(filter("tag:kiln:machine-id", machine_id))
            .send()
            .await
            .expect("DescribeInstances");
        out.reservations()
            .iter()
            .flat_map(|r| r.instances().to_vec())
            .collect()
    }

    /// The RunInstances requests the proxy saw, as (type, subnet, token, injected code).
    fn runs(&self) -> Vec<(String, String, String, Option<String>)> {
        self.proxy
            .requests_for("RunInstances")
            .into_iter()
            .map(|r| {
                (
                    r.instance_type().unwrap_or_default().to_string(),
                    r.subnet_id().unwrap_or_default().to_string(),
                    r.client_token().unwrap_or_default().to_string(),
                    r.injected.clone(),
                )
            })
            .collect()
    }
}

fn config(region: &str, endpoint: &str, cluster: &str) -> FleetConfig {
    let mut cfg = FleetConfig::new(region, cluster);
    cfg.endpoint_url = Some(endpoint.to_string());
    cfg.static_credentials = Some(("testing".into(), "testing".into()));
    cfg.throttle_max_retries = MAX_RETRIES;
    cfg.throttle_base_delay = BASE_DELAY;
    cfg.capacity_cooldown = Duration::from_secs(120);
    cfg.call_timeout = Duration::from_secs(10);
    cfg
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
    instance.state().unwrap().name().unwrap().as_str()
}

#[tokio::test]
async fn launches_each_arch_from_its_template_with_ownership_tags() {
    let env = Env::new("arch").await;
    let fleet = env.fleet().await;

    let amd = fleet
        .launch("m-amd", Arch::Amd64, "#!/bin/sh\necho token=s3cret-amd\n")
        .await
        .unwrap();
    let arm = fleet
        .launch("m-arm", Arch::Arm64, "token=s3cret-arm")
        .await
        .unwrap();
    assert!(!amd.reused && !arm.reused);
    assert_eq!(amd.instance_type, "c6i.large");
    assert_eq!(arm.instance_type, "c7g.large");
    assert_eq!(amd.subnet_id.as_deref(), Some(env.subnet_a.as_str()));
    assert_eq!(arm.subnet_id.as_deref(), Some(env.subnet_a.as_str()));
    assert!(amd.private_ip.is_some());

    for (launched, machine, arch, ami) in [
        (&amd, "m-amd", "amd64", &env.ami_amd64),
        (&arm, "m-arm", "arm64", &env.ami_arm64),
    ] {
        let instance = env.instance(&launched.instance_id).await;
        assert_eq!(tag(&instance, "kiln:cluster"), Some(env.cluster.as_str()));
        assert_eq!(tag(&instance, "kiln:machine-id"), Some(machine));
        assert_eq!(tag(&instance, "kiln:arch"), Some(arch));
        assert_eq!(
            tag(&instance, "Name").map(str::to_string),
            Some(format!("kiln-builder-{machine}"))
        );
        assert_eq!(
            instance.instance_type().map(|t| t.as_str()),
            Some(launched.instance_type.as_str())
        );
        assert_eq!(instance.subnet_id(), Some(env.subnet_a.as_str()));
        assert_eq!(instance.image_id(), Some(ami.as_str()));

        // The root volume carries the ownership tags too.
        let volumes = env
            .setup
            .client()
            .describe_volumes()
            .filters(filter("tag:kiln:machine-id", machine))
            .filters(filter("tag:kiln:cluster", &env.cluster))
            .send()
            .await
            .unwrap();
        assert_eq!(volumes.volumes().len(), 1, "volumes of {machine}");
    }

    // User data arrives base64-encoded once, as EC2 expects.
    let attr = env
        .setup
        .client()
        .describe_instance_attribute()
        .instance_id(&amd.instance_id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = attr.user_data().unwrap().value().unwrap();
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(decoded, b"#!/bin/sh\necho token=s3cret-amd\n");

    // Request shape: template by name at $Latest, one instance, tags at launch.
    let runs = env.proxy.requests_for("RunInstances");
    assert_eq!(runs.len(), 2);
    assert_eq!(
        runs[0].param("LaunchTemplate.LaunchTemplateName"),
        Some(env.lt_amd64.as_str())
    );
    assert_eq!(runs[0].param("LaunchTemplate.Version"), Some("$Latest"));
    assert_eq!(runs[0].param("MinCount"), Some("1"));
    assert_eq!(runs[0].param("MaxCount"), Some("1"));
    assert_eq!(runs[0].param("ImageId"), None);
    assert_eq!(runs[1].param("ImageId"), Some(env.ami_arm64.as_str()));
    assert_eq!(env.proxy.count("CreateTags"), 0);

    // Another cluster in the same account and region.
    let other = Fleet::new(FleetConfig {
        cluster_id: format!("{}-other", env.cluster),
        ..env.config()
    })
    .await;
    let foreign = other.launch("m-other", Arch::Amd64, "x").await.unwrap();

    let mut listed = fleet.list().await.unwrap();
    listed.sort_by(|a, b| a.machine_id.cmp(&b.machine_id));
    let summary: Vec<_> = listed
        .iter()
        .map(|i| (i.instance_id.as_str(), i.machine_id.as_deref(), i.arch))
        .collect();
    assert_eq!(
        summary,
        [
            (amd.instance_id.as_str(), Some("m-amd"), Some(Arch::Amd64)),
            (arm.instance_id.as_str(), Some("m-arm"), Some(Arch::Arm64)),
        ]
    );
    assert!(
        listed
            .iter()
            .all(|i| i.state == "running" || i.state == "pending")
    );
    assert!(listed.iter().all(|i| i.launched_at.is_some()));
    let other_listed = other.list().await.unwrap();
    assert_eq!(other_listed.len(), 1);
    assert_eq!(other_listed[0].instance_id, foreign.instance_id);

    let found = fleet.find("m-arm").await.unwrap().unwrap();
    assert_eq!(found.instance_id, arm.instance_id);
    assert_eq!(found.instance_type.as_deref(), Some("c7g.large"));
    assert!(fleet.find("m-other").await.unwrap().is_none());
    assert!(fleet.find("m-none").await.unwrap().is_none());
}

#[tokio::test]
async fn launching_a_machine_twice_reuses_its_instance() {
    let env = Env::new("idem").await;
    let fleet = env.fleet().await;

    let first = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    let second = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    assert!(!first.reused);
    assert!(second.reused);
    assert_eq!(first.instance_id, second.instance_id);
    assert_eq!(env.proxy.count("RunInstances"), 1);
    assert_eq!(env.instances_of("m1").await.len(), 1);

    let token = env.runs()[0].2.clone();
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()));

    // A retried identical combination (here after throttling) sends the same token; a
    // different machine gets a different one.
    env.proxy
        .inject(Fault::error("RunInstances", "RequestLimitExceeded", 503));
    fleet.launch("m2", Arch::Amd64, "x").await.unwrap();
    let runs = env.runs();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[1].3.as_deref(), Some("RequestLimitExceeded"));
    assert_eq!(runs[1].2, runs[2].2);
    assert_eq!(
        (runs[1].0.as_str(), runs[1].1.as_str()),
        (runs[2].0.as_str(), runs[2].1.as_str())
    );
    assert_ne!(runs[1].2, token);
    assert_eq!(env.instances_of("m2").await.len(), 1);
}

#[tokio::test]
async fn capacity_error_falls_through_to_the_next_instance_type() {
    let env = Env::new("ice-type").await;
    let fleet = env.fleet().await;
    env.proxy.inject(
        Fault::error("RunInstances", "InsufficientInstanceCapacity", 500)
            .always()
            .only_if("InstanceType", "c6i.large"),
    );

    let launched = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    assert_eq!(launched.instance_type, "c6a.large");
    assert_eq!(launched.subnet_id.as_deref(), Some(env.subnet_a.as_str()));
    let instance = env.instance(&launched.instance_id).await;
    assert_eq!(instance.instance_type().unwrap().as_str(), "c6a.large");

    // Each failing combination was called exactly once: no SDK retries of the 500.
    let runs = env.runs();
    let tried: Vec<_> = runs
        .iter()
        .map(|(t, s, _, injected)| (t.as_str(), s.as_str(), injected.is_some()))
        .collect();
    assert_eq!(
        tried,
        [
            ("c6i.large", env.subnet_a.as_str(), true),
            ("c6i.large", env.subnet_b.as_str(), true),
            ("c6a.large", env.subnet_a.as_str(), false),
        ]
    );
    let tokens: HashSet<_> = runs.iter().map(|r| r.2.clone()).collect();
    assert_eq!(tokens.len(), 3, "one token per combination");

    // Both c6i.large combinations are now cooling down: the next launch skips them.
    let next = fleet.launch("m2", Arch::Amd64, "x").await.unwrap();
    assert_eq!(next.instance_type, "c6a.large");
    let runs = env.runs();
    assert_eq!(runs.len(), 4);
    assert_eq!(runs[3].0, "c6a.large");
}

#[tokio::test]
async fn capacity_error_in_one_subnet_falls_through_to_the_next() {
    let env = Env::new("ice-subnet").await;
    let fleet = env.fleet().await;
    env.proxy.inject(
        Fault::error("RunInstances", "InsufficientInstanceCapacity", 500)
            .always()
            .only_if("SubnetId", &env.subnet_a),
    );

    let launched = fleet.launch("m1", Arch::Arm64, "x").await.unwrap();
    assert_eq!(launched.instance_type, "c7g.large");
    assert_eq!(launched.subnet_id.as_deref(), Some(env.subnet_b.as_str()));
    let instance = env.instance(&launched.instance_id).await;
    assert_eq!(instance.subnet_id(), Some(env.subnet_b.as_str()));

    let runs = env.runs();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (runs[0].0.as_str(), runs[0].1.as_str()),
        ("c7g.large", env.subnet_a.as_str())
    );
    assert_eq!(runs[0].3.as_deref(), Some("InsufficientInstanceCapacity"));
    assert_eq!(
        (runs[1].0.as_str(), runs[1].1.as_str(), runs[1].3.as_deref()),
        ("c7g.large", env.subnet_b.as_str(), None)
    );
}

#[tokio::test]
async fn no_capacity_anywhere_lists_what_was_tried() {
    let env = Env::new("ice-all").await;
    let fleet = env.fleet().await;
    env.proxy
        .inject(Fault::error("RunInstances", "InsufficientInstanceCapacity", 500).always());

    let expected = vec![
        format!("c6i.large/{}", env.subnet_a),
        format!("c6i.large/{}", env.subnet_b),
        format!("c6a.large/{}", env.subnet_a),
        format!("c6a.large/{}", env.subnet_b),
    ];
    let err = fleet.launch("m1", Arch::Amd64, "x").await.unwrap_err();
    assert_eq!(
        err,
        Ec2Error::NoCapacity {
            tried: expected.clone()
        }
    );
    assert_eq!(env.proxy.count("RunInstances"), 4);

    // Everything is cooling down now; a launch still tries every combination once.
    let err = fleet.launch("m1", Arch::Amd64, "x").await.unwrap_err();
    assert_eq!(err, Ec2Error::NoCapacity { tried: expected });
    assert_eq!(env.proxy.count("RunInstances"), 8);
    assert!(env.instances_of("m1").await.is_empty());

    // Capacity comes back.
    env.proxy.clear();
    let launched = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    assert_eq!(launched.instance_type, "c6i.large");
    assert_eq!(env.proxy.count("RunInstances"), 9);
}

#[tokio::test]
async fn quota_error_stops_without_trying_other_combinations() {
    let env = Env::new("quota").await;
    let fleet = env.fleet().await;
    env.proxy
        .inject(Fault::error("RunInstances", "VcpuLimitExceeded", 400).always());

    let err = fleet.launch("m1", Arch::Amd64, "x").await.unwrap_err();
    match err {
        Ec2Error::Quota { code, .. } => assert_eq!(code, "VcpuLimitExceeded"),
        other => panic!("expected Quota, got {other:?}"),
    }
    assert_eq!(env.proxy.count("RunInstances"), 1);

    env.proxy.clear();
    env.proxy
        .inject(Fault::error("RunInstances", "InstanceLimitExceeded", 400).always());
    let err = fleet.launch("m1", Arch::Amd64, "x").await.unwrap_err();
    assert!(
        matches!(&err, Ec2Error::Quota { code, .. } if code == "InstanceLimitExceeded"),
        "{err:?}"
    );
    assert_eq!(env.proxy.count("RunInstances"), 2);
    assert!(env.instances_of("m1").await.is_empty());
}

#[tokio::test]
async fn throttled_launch_backs_off_and_retries_the_same_combination() {
    let env = Env::new("throttle").await;
    let fleet = env.fleet().await;
    env.proxy
        .inject(Fault::error("RunInstances", "RequestLimitExceeded", 503).times(2));

    let launched = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    assert!(!launched.reused);
    assert_eq!(env.instances_of("m1").await.len(), 1);

    let runs = env.proxy.requests_for("RunInstances");
    assert_eq!(runs.len(), 3);
    let injected: Vec<_> = runs.iter().map(|r| r.injected.as_deref()).collect();
    assert_eq!(
        injected,
        [
            Some("RequestLimitExceeded"),
            Some("RequestLimitExceeded"),
            None
        ]
    );
    for r in &runs[1..] {
        assert_eq!(r.instance_type(), runs[0].instance_type());
        assert_eq!(r.subnet_id(), runs[0].subnet_id());
        assert_eq!(r.client_token(), runs[0].client_token());
    }
    // Retry n waits at least base·2ⁿ.
    let first_gap = runs[1].at - runs[0].at;
    let second_gap = runs[2].at - runs[1].at;
    assert!(first_gap >= BASE_DELAY, "{first_gap:?}");
    assert!(second_gap >= 2 * BASE_DELAY, "{second_gap:?}");
}

#[tokio::test]
async fn persistent_throttling_gives_up() {
    let env = Env::new("throttle-all").await;
    let fleet = env.fleet().await;
    env.proxy
        .inject(Fault::error("RunInstances", "RequestLimitExceeded", 503).always());

    let started = Instant::now();
    let err = fleet.launch("m1", Arch::Amd64, "x").await.unwrap_err();
    assert_eq!(err, Ec2Error::Throttled);
    assert!(started.elapsed() >= BASE_DELAY * (1 + 2 + 4));
    let runs = env.runs();
    assert_eq!(runs.len(), MAX_RETRIES as usize + 1);
    // Throttling never moves to another combination.
    assert!(
        runs.iter()
            .all(|r| r.0 == "c6i.large" && r.1 == env.subnet_a)
    );
}

#[tokio::test]
async fn unknown_server_error_does_not_fall_through() {
    let env = Env::new("ambiguous").await;
    let fleet = env.fleet().await;
    env.proxy
        .inject(Fault::error("RunInstances", "InternalError", 500));

    let err = fleet.launch("m1", Arch::Amd64, "x").await.unwrap_err();
    assert!(
        matches!(&err, Ec2Error::Api { code, .. } if code == "InternalError"),
        "{err:?}"
    );
    let runs = env.runs();
    assert_eq!(runs.len(), 1, "no other subnet or type was tried");
    assert_eq!(
        (runs[0].0.as_str(), runs[0].1.as_str()),
        ("c6i.large", env.subnet_a.as_str())
    );
    // After the failure the machine was looked up by tag again.
    let last = env.proxy.requests().pop().unwrap();
    assert_eq!(last.action, "DescribeInstances");
    assert!(env.instances_of("m1").await.is_empty());

    // The caller's retry launches in the same place with the same token.
    let launched = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    assert!(!launched.reused);
    let runs = env.runs();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (&runs[1].0, &runs[1].1, &runs[1].2),
        (&runs[0].0, &runs[0].1, &runs[0].2)
    );
}

#[tokio::test]
async fn lost_response_is_recovered_by_tag() {
    let env = Env::new("lost").await;
    let fleet = env.fleet().await;
    // moto launches the instance, but the answer never reaches the fleet.
    env.proxy
        .inject(Fault::error("RunInstances", "InternalError", 500).after_forward());

    let launched = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    assert!(launched.reused);
    assert_eq!(env.proxy.count("RunInstances"), 1);
    let instances = env.instances_of("m1").await;
    assert_eq!(instances.len(), 1);
    assert_eq!(
        instances[0].instance_id(),
        Some(launched.instance_id.as_str())
    );
    assert_eq!(launched.subnet_id.as_deref(), Some(env.subnet_a.as_str()));
}

#[tokio::test]
async fn timeout_is_ambiguous_and_does_not_fall_through() {
    let env = Env::new("timeout").await;
    // Long enough for moto to answer the DescribeInstances calls on a busy machine.
    let fleet = Fleet::new(FleetConfig {
        call_timeout: Duration::from_secs(3),
        ..env.config()
    })
    .await;
    env.proxy.inject(Fault::hang("RunInstances"));

    let started = Instant::now();
    let err = fleet.launch("m1", Arch::Amd64, "x").await.unwrap_err();
    assert_eq!(env.proxy.count("RunInstances"), 1, "{err:?}");
    assert!(matches!(err, Ec2Error::Transport(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let launched = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    let runs = env.runs();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].2, runs[1].2, "same combination, same token");
    assert_eq!(launched.subnet_id.as_deref(), Some(env.subnet_a.as_str()));
}

#[tokio::test]
async fn terminate_is_idempotent_and_only_touches_owned_instances() {
    let env = Env::new("terminate").await;
    let fleet = env.fleet().await;
    let doomed = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();
    let kept = fleet.launch("m2", Arch::Arm64, "x").await.unwrap();

    fleet.terminate(&doomed.instance_id).await.unwrap();
    assert_eq!(
        state(&env.instance(&doomed.instance_id).await),
        "terminated"
    );
    let listed: Vec<_> = fleet
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(listed, std::slice::from_ref(&kept.instance_id));
    assert!(fleet.find("m1").await.unwrap().is_none());
    assert_eq!(env.proxy.count("TerminateInstances"), 1);

    // Again: fine, and no second TerminateInstances for an instance already terminated.
    fleet.terminate(&doomed.instance_id).await.unwrap();
    assert_eq!(env.proxy.count("TerminateInstances"), 1);
    // Unknown id: fine.
    fleet.terminate("i-0123456789abcdef0").await.unwrap();

    // Someone else's instance: refused and left running.
    let other = Fleet::new(FleetConfig {
        cluster_id: format!("{}-other", env.cluster),
        ..env.config()
    })
    .await;
    let foreign = other.launch("m3", Arch::Amd64, "x").await.unwrap();
    let err = fleet.terminate(&foreign.instance_id).await.unwrap_err();
    assert_eq!(err, Ec2Error::NotOwned(foreign.instance_id.clone()));
    assert_eq!(state(&env.instance(&foreign.instance_id).await), "running");
    assert_eq!(state(&env.instance(&kept.instance_id).await), "running");
}

#[tokio::test]
async fn list_follows_pagination() {
    let env = Env::new("pages").await;
    let fleet = Fleet::new(FleetConfig {
        describe_page_size: 5,
        ..env.config()
    })
    .await;
    let mut launched = HashSet::new();
    for n in 0..7 {
        let instance = fleet
            .launch(&format!("m{n}"), Arch::Amd64, "x")
            .await
            .unwrap();
        launched.insert(instance.instance_id);
    }
    let before = env.proxy.count("DescribeInstances");
    let listed: HashSet<_> = fleet
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(listed, launched);
    let pages = &env.proxy.requests_for("DescribeInstances")[before..];
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[0].param("MaxResults"), Some("5"));
    assert!(pages[1].param("NextToken").is_some());
}

/// The proxy decodes EC2's form-encoded Query bodies (it matches faults on them).
#[test]
fn fault_proxy_decodes_form_bodies() {
    let params =
        fault_proxy::parse_form(b"Action=RunInstances&UserData=a%2Bb%3D&Name=x+y&Bad=%zz&Tail=%4");
    assert_eq!(fault_proxy::param(&params, "Action"), Some("RunInstances"));
    assert_eq!(fault_proxy::param(&params, "UserData"), Some("a+b="));
    assert_eq!(fault_proxy::param(&params, "Name"), Some("x y"));
    assert_eq!(fault_proxy::param(&params, "Bad"), Some("%zz"));
    assert_eq!(fault_proxy::param(&params, "Tail"), Some("%4"));
}

#[tokio::test]
async fn stop_and_start_guard_states_and_ownership() {
    let env = Env::new("stopstart").await;
    let fleet = env.fleet().await;
    let standby = fleet.launch("m1", Arch::Amd64, "x").await.unwrap();

    fleet.stop(&standby.instance_id).await.unwrap();
    assert_eq!(state(&env.instance(&standby.instance_id).await), "stopped");
    let listed = fleet.find("m1").await.unwrap().unwrap();
    assert_eq!(listed.state, "stopped", "a stopped standby is still ours");
    // Stopping again is a no-op (no second StopInstances).
    fleet.stop(&standby.instance_id).await.unwrap();
    assert_eq!(env.proxy.count("StopInstances"), 1);

    // No capacity to start it again in its zone: said plainly, one call only.
    env.proxy.inject(Fault::error(
        "StartInstances",
        "InsufficientInstanceCapacity",
        500,
    ));
    let err = fleet.start(&standby.instance_id).await.unwrap_err();
    assert!(matches!(err, Ec2Error::NoCapacity { .. }), "{err:?}");
    assert_eq!(env.proxy.count("StartInstances"), 1);
    fleet.start(&standby.instance_id).await.unwrap();
    assert_eq!(state(&env.instance(&standby.instance_id).await), "running");
    fleet.start(&standby.instance_id).await.unwrap();
    assert_eq!(
        env.proxy.count("StartInstances"),
        2,
        "already running: no call"
    );

    // A terminated instance is never started (moto would resurrect it).
    fleet.terminate(&standby.instance_id).await.unwrap();
    let err = fleet.start(&standby.instance_id).await.unwrap_err();
    assert!(
        matches!(&err, Ec2Error::Api { code, .. } if code == "IncorrectInstanceState"),
        "{err:?}"
    );
    assert_eq!(
        state(&env.instance(&standby.instance_id).await),
        "terminated"
    );

    // Someone else's instance is left alone.
    let other = Fleet::new(FleetConfig {
        cluster_id: format!("{}-other", env.cluster),
        ..env.config()
    })
    .await;
    let foreign = other.launch("m2", Arch::Amd64, "x").await.unwrap();
    assert_eq!(
        fleet.stop(&foreign.instance_id).await.unwrap_err(),
        Ec2Error::NotOwned(foreign.instance_id.clone())
    );
    assert_eq!(state(&env.instance(&foreign.instance_id).await), "running");
}
