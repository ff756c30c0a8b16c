//! `kiln agent`: the supervisor on every builder machine.
//!
//! It registers with the one-time token from its user data (or environment), keeps the
//! machine token in its state directory so a restarted agent resumes, holds the
//! directive stream open, and applies each directive: stand by, serve BuildKit for a
//! project (writing certificates and buildkitd.toml, then starting and supervising the
//! BuildKit command), or drain. It reports health every few seconds. It never calls the
//! cloud provider: Kiln terminates the instance after the agent's Shutdown.

mod buildkitd;
mod imds;
pub mod volume;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Mutex;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::proto::kiln::agent::v1 as pb;
use crate::proto::kiln::agent::v1::machine_agent_service_client::MachineAgentServiceClient;
use buildkitd::Supervisor;

const TOKEN_FILE: &str = "agent.token";

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Kiln's agent API, e.g. https://kiln.internal:8443
    #[arg(long, env = "KILN_AGENT_API_URL")]
    pub api_url: String,
    /// This machine's id, from its launch (user data).
    #[arg(long, env = "KILN_AGENT_MACHINE_ID")]
    pub machine_id: String,
    /// Where the agent keeps its token, certificates, buildkitd.toml and BuildKit's state.
    #[arg(
        long,
        env = "KILN_AGENT_STATE_DIR",
        default_value = "/var/lib/kiln-agent"
    )]
    pub state_dir: PathBuf,
    /// Where BuildKit listens (mutual TLS).
    #[arg(
        long,
        env = "KILN_AGENT_BUILDKIT_LISTEN",
        default_value = "0.0.0.0:443"
    )]
    pub buildkit_listen: String,
    /// host:port clients use to reach BuildKit; empty: the address Kiln saw at launch.
    #[arg(long, env = "KILN_AGENT_BUILDKIT_ADDRESS", default_value = "")]
    pub buildkit_address: String,
    /// PEM CA bundle that signs Kiln's TLS certificate; default: SSL_CERT_FILE, else
    /// the public web roots.
    #[arg(long, env = "KILN_AGENT_API_CA_FILE")]
    pub api_ca_file: Option<PathBuf>,
    /// Also present the signed EC2 instance identity document (from IMDSv2) when
    /// registering; Kiln requires it when builders.ec2.identity_certificate_file is set.
    #[arg(long, env = "KILN_AGENT_EC2_IDENTITY")]
    pub ec2_identity: bool,
    /// How often to report health.
    #[arg(long, env = "KILN_AGENT_HEALTH_INTERVAL_SECONDS", default_value_t = 5)]
    pub health_interval_seconds: u64,
    /// BuildKit's command. Placeholders: {config} (buildkitd.toml), {listen}, {cert},
    /// {key}, {ca}, {root}.
    #[arg(last = true, default_values_t = ["buildkitd".to_string(), "--config".to_string(), "{config}".to_string()])]
    pub buildkitd: Vec<String>,
}

/// Adds the machine token to every call.
#[derive(Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = MachineAgentServiceClient<InterceptedService<Channel, Bearer>>;

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {:?}", args.state_dir))?;
    let channel = channel(&args)?;
    let token = registered_token(&args, channel.clone()).await?;
    let bearer: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}")
        .parse()
        .context("the machine token is not a valid header value")?;
    let client: Client = MachineAgentServiceClient::with_interceptor(channel, Bearer(bearer));
    let supervisor = Arc::new(Mutex::new(Supervisor::new(
        args.machine_id.clone(),
        args.state_dir.clone(),
        args.buildkit_listen.clone(),
        args.buildkitd.clone(),
    )));
    let stop = tokio_util::sync::CancellationToken::new();
    let interval = Duration::from_secs(args.health_interval_seconds.max(1));
    let report_now = Arc::new(tokio::sync::Notify::new());

    let health = tokio::spawn(health_loop(
        client.clone(),
        args.machine_id.clone(),
        supervisor.clone(),
        interval,
        report_now.clone(),
        stop.clone(),
    ));
    let watch = tokio::spawn(watch_loop(
        client.clone(),
        args.machine_id.clone(),
        supervisor.clone(),
        report_now,
        stop.clone(),
    ));

    let reason = tokio::select! {
        _ = stop.cancelled() => "drained".to_string(),
        _ = crate::app::shutdown_signal() => "the agent received a termination signal".to_string(),
    };
    stop.cancel();
    health.abort();
    watch.abort();
    supervisor.lock().await.stop().await;
    let mut client = client;
    let shutdown = client.shutdown(pb::ShutdownRequest {
        machine_id: args.machine_id.clone(),
        reason: reason.clone(),
    });
    match tokio::time::timeout(Duration::from_secs(5), shutdown).await {
        Ok(Ok(_)) => tracing::info!(%reason, "agent stopped; told Kiln"),
        Ok(Err(status)) => {
            tracing::warn!(%reason, error = %status.message(), "agent stopped; Kiln refused the shutdown report")
        }
        Err(_) => tracing::warn!(%reason, "agent stopped; Kiln did not answer the shutdown report"),
    }
    Ok(())
}

fn channel(args: &AgentArgs) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(args.api_url.clone())
        .with_context(|| format!("--api-url {:?} is not a URL", args.api_url))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if args.api_url.starts_with("https://") {
        let ca_file = args
            .api_ca_file
            .clone()
            .or_else(|| std::env::var_os("SSL_CERT_FILE").map(PathBuf::from));
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match ca_file {
            Some(path) => {
                let pem = std::fs::read(&path)
                    .with_context(|| format!("reading the API CA bundle {path:?}"))?;
                tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect_lazy())
}

/// The saved machine token, or a new one from registering.
async fn registered_token(args: &AgentArgs, channel: Channel) -> anyhow::Result<String> {
    let path = args.state_dir.join(TOKEN_FILE);
    if let Ok(saved) = std::fs::read_to_string(&path)
        && !saved.trim().is_empty()
    {
        return Ok(saved.trim().to_string());
    }
    let registration = std::env::var("KILN_AGENT_REGISTRATION_TOKEN")
        .context("KILN_AGENT_REGISTRATION_TOKEN is not set and the agent has not registered")?;
    let identity = if args.ec2_identity {
        Some(
            imds::instance_identity(&imds::endpoint())
                .await
                .context("reading the instance identity document from IMDS")?,
        )
    } else {
        None
    };
    let mut client = MachineAgentServiceClient::new(channel);
    let mut backoff = Duration::from_millis(200);
    let response = loop {
        let request = pb::RegisterRequest {
            machine_id: args.machine_id.clone(),
            registration_token: registration.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            buildkit_address: args.buildkit_address.clone(),
            identity: identity.clone(),
        };
        match client.register(request).await {
            Ok(response) => break response.into_inner(),
            Err(status) if retryable(&status) => {
                tracing::warn!(error = %status.message(), "registration failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(status) => {
                anyhow::bail!("Kiln refused the registration: {}", status.message())
            }
        }
    };
    write_private(&path, &response.machine_token)?;
    tracing::info!(machine_id = %args.machine_id, "registered with Kiln");
    Ok(response.machine_token)
}

/// Worth trying again later: Kiln is unreachable, overloaded, or rate-limiting this
/// address (many builders behind one NAT address register at once).
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
    )
}

pub(crate) fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {path:?}"))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {path:?}"))
}

/// Follows the directive stream, reconnecting with backoff.
async fn watch_loop(
    mut client: Client,
    machine_id: String,
    supervisor: Arc<Mutex<Supervisor>>,
    report_now: Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let request = pb::WatchDirectivesRequest {
            machine_id: machine_id.clone(),
        };
        match client.watch_directives(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(directive)) => {
                            backoff = Duration::from_millis(200);
                            if apply(&supervisor, directive).await {
                                stop.cancel();
                                return;
                            }
                            // Tell Kiln at once, so waiting builds start sooner.
                            report_now.notify_one();
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(error = %status.message(), "directive stream ended");
                            if !retryable(&status) && status.code() != tonic::Code::Cancelled {
                                fatal(&status, &stop);
                                return;
                            }
                            break;
                        }
                    }
                }
            }
            Err(status) if !retryable(&status) => {
                fatal(&status, &stop);
                return;
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot reach Kiln; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Kiln no longer accepts this agent (its token was revoked, say): stop serving.
fn fatal(status: &tonic::Status, stop: &tokio_util::sync::CancellationToken) {
    tracing::error!(code = ?status.code(), error = %status.message(), "Kiln refused this agent; stopping");
    stop.cancel();
}

/// Applies one directive. True when the agent should stop.
async fn apply(supervisor: &Arc<Mutex<Supervisor>>, directive: pb::Directive) -> bool {
    let generation = directive.generation;
    let mut supervisor = supervisor.lock().await;
    match directive.action {
        Some(pb::directive::Action::Buildkit(task)) => {
            tracing::info!(generation, project_id = %task.project_id, "serving BuildKit");
            if let Err(err) = supervisor.serve(generation, task).await {
                tracing::error!(error = %format!("{err:#}"), "could not start BuildKit; will retry");
            }
            false
        }
        Some(pb::directive::Action::Standby(_)) | None => {
            tracing::info!(generation, "standing by");
            supervisor.standby(generation).await;
            false
        }
        Some(pb::directive::Action::Drain(drain)) => {
            tracing::info!(generation, reason = %drain.reason, "draining");
            supervisor.stop().await;
            true
        }
    }
}

/// Reports health every `interval`, restarting BuildKit if it died.
async fn health_loop(
    mut client: Client,
    machine_id: String,
    supervisor: Arc<Mutex<Supervisor>>,
    interval: Duration,
    report_now: Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    // What Kiln last heard: (generation, BuildKit up), and when.
    let mut told: Option<((u64, bool), tokio::time::Instant)> = None;
    loop {
        let report = {
            let mut supervisor = supervisor.lock().await;
            supervisor.keep_alive().await;
            supervisor.report().await
        };
        let state = (report.generation, report.buildkit_up);
        let due = match told {
            None => true,
            Some((last, at)) => last != state || at.elapsed() >= interval,
        };
        if due {
            let request = pb::ReportHealthRequest {
                machine_id: machine_id.clone(),
                generation: report.generation,
                buildkit_up: report.buildkit_up,
                disk_free_bytes: report.disk_free_bytes,
                disk_total_bytes: report.disk_total_bytes,
            };
            match client.report_health(request).await {
                Ok(answer) if answer.get_ref().should_terminate => {
                    tracing::info!("Kiln asked this machine to stop");
                    stop.cancel();
                    return;
                }
                Ok(_) => told = Some((state, tokio::time::Instant::now())),
                Err(status) if !retryable(&status) => {
                    fatal(&status, &stop);
                    return;
                }
                Err(status) => tracing::warn!(error = %status.message(), "health report failed"),
            }
        }
        // While BuildKit starts, look every few milliseconds (locally) and tell Kiln the
        // moment it answers: builds are waiting for it.
        let wait = if report.applied_but_starting {
            Duration::from_millis(5)
        } else if report.waiting {
            Duration::from_millis(250)
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = report_now.notified() => {}
        }
    }
}
