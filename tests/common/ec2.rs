//! One test's EC2 world in moto (through the fault proxy), and playing `kiln agent` for
//! machines launched there: moto runs no agents, so tests register with the one-time
//! token read back from each instance's user data and report health, as the agent would.
#![allow(dead_code)]

use std::collections::HashMap;

use base64::Engine;
use kiln::app::AppState;
use kiln::scheduler::agents::HealthReport;
use kiln_ec2::aws_sdk_ec2::types::{Filter, InstanceType, RequestLaunchTemplateData};
use kiln_ec2::{Fleet, FleetConfig};
use secrecy::SecretString;

use super::fault_proxy::FaultProxy;
use super::{KEK_B64, TestDb};

pub fn moto_url() -> String {
    std::env::var("TEST_MOTO_URL").ok().filter(|u| !u.is_empty()).expect(
        "TEST_MOTO_URL is not set: run the tests through `bash scripts/test.sh`, which starts moto_server",
    )
}

/// One test's EC2 world in moto: its own cluster id, AMI, VPC, two subnets and a launch
/// template, and a fault proxy in front of moto.
pub struct World {
    pub proxy: FaultProxy,
    pub direct: Fleet,
    pub cluster: String,
    pub template: String,
    pub subnets: [String; 2],
}

impl World {
    pub async fn new() -> World {
        let moto = moto_url();
        let proxy = FaultProxy::start(&moto).await;
        let id = kiln::db::ids::random_alphanumeric(10).to_lowercase();
        let mut setup = FleetConfig::new("us-east-1", format!("cluster-{id}"));
        setup.endpoint_url = Some(moto.clone());
        setup.static_credentials = Some(("testing".into(), "testing".into()));
        let direct = Fleet::new(setup).await;
        let ec2 = direct.client();
        let ami = ec2
            .register_image()
            .name(format!("kiln-builder-{id}"))
            .architecture("x86_64".into())
            .send()
            .await
            .expect("RegisterImage")
            .image_id()
            .unwrap()
            .to_string();
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .expect("CreateVpc");
        let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
        let mut subnets = Vec::new();
        for (cidr, az) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
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
        let template = format!("kiln-amd64-{id}");
        ec2.create_launch_template()
            .launch_template_name(&template)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(&ami)
                    .instance_type(InstanceType::from("c6i.large"))
                    .build(),
            )
            .send()
            .await
            .expect("CreateLaunchTemplate");
        World {
            proxy,
            direct,
            cluster: format!("cluster-{id}"),
            template,
            subnets: [subnets[0].clone(), subnets[1].clone()],
        }
    }

    /// Kiln's configuration for this world, as environment overrides.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KILN_BUILDERS__PROVIDER".into(), "ec2".into()),
            (
                "KILN_BUILDERS__EC2__ENDPOINT_URL".into(),
                self.proxy.url.clone(),
            ),
            ("KILN_BUILDERS__EC2__ACCESS_KEY_ID".into(), "testing".into()),
            (
                "KILN_BUILDERS__EC2__SECRET_ACCESS_KEY".into(),
                "testing".into(),
            ),
            (
                "KILN_BUILDERS__EC2__CLUSTER_ID".into(),
                self.cluster.clone(),
            ),
            (
                "KILN_BUILDERS__EC2__AMD64_LAUNCH_TEMPLATE".into(),
                self.template.clone(),
            ),
            (
                "KILN_BUILDERS__EC2__AMD64_INSTANCE_TYPES".into(),
                r#"["c6i.large", "c6a.large"]"#.into(),
            ),
            (
                "KILN_BUILDERS__EC2__SUBNETS".into(),
                format!(r#"["{}", "{}"]"#, self.subnets[0], self.subnets[1]),
            ),
            (
                "KILN_BUILDERS__EC2__THROTTLE_BASE_DELAY_MILLIS".into(),
                "20".into(),
            ),
            ("KILN_SECRETS__KEY_ENCRYPTION_KEY".into(), KEK_B64.into()),
        ]
    }

    /// Non-terminated instances of this cluster by machine id, read from moto directly.
    pub async fn instances(&self) -> HashMap<String, Vec<(String, String)>> {
        let mut by_machine: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for instance in self.direct.list().await.unwrap() {
            by_machine
                .entry(instance.machine_id.clone().unwrap_or_default())
                .or_default()
                .push((
                    instance.instance_id.clone(),
                    instance.instance_type.clone().unwrap_or_default(),
                ));
        }
        by_machine
    }

    /// Every instance of the cluster ever launched, terminated ones included.
    pub async fn all_instances(&self) -> Vec<(String, String, String)> {
        let out = self
            .direct
            .client()
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:kiln:cluster")
                    .values(&self.cluster)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                let machine = i
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some("kiln:machine-id"))
                    .and_then(|t| t.value())
                    .unwrap_or_default()
                    .to_string();
                let state = i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default();
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    machine,
                    state,
                )
            })
            .collect()
    }

    /// The registration token in a machine's user data, as the agent would read it.
    pub async fn registration_token(&self, machine_id: &str) -> Option<String> {
        self.user_data(machine_id)
            .await
            .lines()
            .find_map(|l| l.strip_prefix("KILN_AGENT_REGISTRATION_TOKEN="))
            .map(str::to_string)
    }

    /// A machine's user data script, read back from EC2 (moto).
    pub async fn user_data(&self, machine_id: &str) -> String {
        let Some(instance) = self.direct.find(machine_id).await.unwrap() else {
            return String::new();
        };
        let attr = self
            .direct
            .client()
            .describe_instance_attribute()
            .instance_id(&instance.instance_id)
            .attribute("userData".into())
            .send()
            .await
            .unwrap();
        let Some(encoded) = attr.user_data().and_then(|u| u.value()) else {
            return String::new();
        };
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap(),
        )
        .unwrap()
    }
}

pub fn app_with(db: &TestDb, world: &World, extra: &[(&str, &str)]) -> AppState {
    let owned = world.env();
    let mut env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env.push(("KILN_BUILDERS__AGENT_API_URL", "http://127.0.0.1:1"));
    env.extend_from_slice(extra);
    let mut config = super::config(&db.url, &env);
    config.database.url = SecretString::from(db.url.clone());
    let app = kiln::app::App::new(config, db.pool.clone());
    app.mark_migrated();
    app
}

/// Plays `kiln agent` for a launched machine, in process: registers with the token from
/// its user data and reports BuildKit serving its current directive.
pub async fn agent_comes_up(app: &AppState, world: &World, machine_id: &str) {
    let token = world
        .registration_token(machine_id)
        .await
        .expect("the user data carries a registration token");
    app.scheduler
        .register_agent(machine_id, &token, "test", "127.0.0.1:1", None)
        .await
        .unwrap();
    agent_reports(app, machine_id).await;
}

pub async fn agent_reports(app: &AppState, machine_id: &str) {
    let directive = app.scheduler.directive(machine_id).await.unwrap();
    app.scheduler
        .report_health(
            machine_id,
            &HealthReport {
                generation: directive.generation,
                buildkit_up: true,
                disk_free_bytes: 1 << 30,
                disk_total_bytes: 2 << 30,
            },
        )
        .await
        .unwrap();
}

pub async fn machine_of(app: &AppState, project_id: &str) -> (String, String) {
    sqlx::query_as(
        "SELECT id, state FROM machines WHERE project_id = $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(project_id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// Plays `kiln agent` for one machine over gRPC, as a real agent would against a set of
/// replicas: registers with the token from the machine's user data, then reports
/// BuildKit serving the current directive every 500 ms to the first replica that
/// answers. Stops when dropped.
pub struct PlayedAgent {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PlayedAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn play_agent(world: &World, machine_id: &str, urls: &[String]) -> PlayedAgent {
    use kiln::proto::kiln::agent::v1 as pb;
    use kiln::proto::kiln::agent::v1::machine_agent_service_client::MachineAgentServiceClient;
    let token = world
        .registration_token(machine_id)
        .await
        .expect("the user data carries a registration token");
    let mut machine_token = None;
    for url in urls {
        let Ok(mut client) = MachineAgentServiceClient::connect(url.clone()).await else {
            continue;
        };
        if let Ok(registered) = client
            .register(pb::RegisterRequest {
                machine_id: machine_id.to_string(),
                registration_token: token.clone(),
                agent_version: "test".into(),
                buildkit_address: String::new(),
                identity: None,
            })
            .await
        {
            machine_token = Some(registered.into_inner().machine_token);
            break;
        }
    }
    let bearer = format!(
        "Bearer {}",
        machine_token.expect("a replica registered the agent")
    );
    let (machine_id, urls) = (machine_id.to_string(), urls.to_vec());
    let task = tokio::spawn(async move {
        let mut generation = 0;
        loop {
            for url in &urls {
                let Ok(mut client) = MachineAgentServiceClient::connect(url.clone()).await else {
                    continue;
                };
                let mut health = tonic::Request::new(pb::ReportHealthRequest {
                    machine_id: machine_id.clone(),
                    generation,
                    buildkit_up: true,
                    disk_free_bytes: 1 << 30,
                    disk_total_bytes: 2 << 30,
                });
                health
                    .metadata_mut()
                    .insert("authorization", bearer.parse().unwrap());
                if let Ok(answer) = client.report_health(health).await {
                    let answer = answer.into_inner();
                    if answer.generation != generation {
                        // Report the directive we now serve at once.
                        generation = answer.generation;
                        continue;
                    }
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    PlayedAgent { task }
}
