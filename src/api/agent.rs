//! The machine-agent gRPC API (`kiln.agent.v1.MachineAgentService`), served on the main
//! port by path, or on `server.agent_listen`. Transport only: the decisions are in
//! `scheduler::agents`.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::app::AppState;
use crate::proto::kiln::agent::v1 as pb;
use crate::proto::kiln::agent::v1::machine_agent_service_server::{
    MachineAgentService, MachineAgentServiceServer,
};
use crate::scheduler::agents::{Directive, DirectiveAction, HealthReport};

/// Largest agent message accepted (a registration with an identity document).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Directives are re-read this often even without a notification (missed NOTIFY).
const RESYNC_EVERY: Duration = Duration::from_secs(30);

pub fn service(app: AppState) -> MachineAgentServiceServer<AgentApi> {
    MachineAgentServiceServer::new(AgentApi { app }).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// A router serving only the agent API: every request goes to the gRPC service (which
/// answers unknown paths `unimplemented`). The second port serves it as is; the main port
/// sends it the requests that carry a gRPC content type.
pub fn routes(app: AppState) -> axum::Router {
    axum::Router::new()
        .fallback_service(service(app.clone()))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            audit_malformed,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app,
            crate::api::ratelimit::limit_unauthenticated,
        ))
}

/// gRPC requests (`content-type: application/grpc…`): the agent API. Nothing else on the
/// main port speaks gRPC (the depot CLI uses Connect).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Middleware for the main router: routes gRPC requests by content type.
pub async fn dispatch(
    axum::extract::State(agent): axum::extract::State<axum::Router>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if is_grpc(req.headers()) {
        use tower::ServiceExt;
        return match agent.oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
    }
    next.run(req).await
}

/// Requests tonic rejects before our handlers see them (undecodable or oversized
/// messages, unknown methods) are audited like every other refused agent call.
async fn audit_malformed(
    axum::extract::State(app): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = req.uri().path().to_owned();
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string());
    let response = next.run(req).await;
    // tonic answers these itself, trailers-only: the status is in the headers.
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let message = status.message();
    let reason = match status.code() {
        tonic::Code::Unimplemented => Some("unknown method"),
        tonic::Code::Internal if message.contains("decode") => Some("undecodable message"),
        tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
            if message.contains("too large") =>
        {
            Some("message too large")
        }
        _ => None,
    };
    if let Some(reason) = reason {
        let event = crate::db::audit::AuditEvent::new("machine.malformed_request", ("agent", None))
            .details(serde_json::json!({
                "reason": reason,
                "path": path.chars().take(200).collect::<String>(),
                "peer": peer,
                "detail": message.chars().take(200).collect::<String>(),
            }));
        app.scheduler
            .record_refusal("malformed", reason, event)
            .await;
    }
    response
}

pub struct AgentApi {
    app: AppState,
}

impl AgentApi {
    /// The caller's principal, which must be this machine's agent.
    async fn machine<T>(&self, request: &Request<T>, machine_id: &str) -> Result<(), Status> {
        let headers = request.metadata().clone().into_headers();
        let principal = self.app.auth.authenticate_headers(&headers).await?;
        self.app
            .scheduler
            .authorize_agent(&principal, machine_id)
            .await?;
        Ok(())
    }
}

fn to_proto(directive: Directive) -> pb::Directive {
    let action = match directive.action {
        DirectiveAction::Standby => pb::directive::Action::Standby(pb::Standby {}),
        DirectiveAction::Drain { reason } => pb::directive::Action::Drain(pb::Drain { reason }),
        DirectiveAction::Serve(task) => pb::directive::Action::Buildkit(pb::BuildKitTask {
            project_id: task.project_id,
            platform: task.platform,
            server_name: task.server_name,
            server_cert_pem: task.server_cert_pem,
            server_key_pem: task.server_key_pem,
            ca_cert_pem: task.ca_cert_pem,
            cache: Some(match task.cache {
                Some(cache) => pb::CacheVolume {
                    kind: cache.attachment.kind.into(),
                    source: cache.attachment.source,
                    mount_path: String::new(),
                    options: cache.attachment.options.into_iter().collect(),
                    volume_id: cache.volume_id,
                    size_bytes: cache.size_bytes,
                },
                None => pb::CacheVolume {
                    kind: "none".into(),
                    ..Default::default()
                },
            }),
            gc_keep_bytes: task.gc_keep_bytes,
            max_parallelism: task.max_parallelism,
        }),
    };
    pb::Directive {
        generation: directive.generation,
        action: Some(action),
    }
}

type DirectiveStream = Pin<Box<dyn Stream<Item = Result<pb::Directive, Status>> + Send>>;

#[tonic::async_trait]
impl MachineAgentService for AgentApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let identity = req
            .identity
            .map(|i| crate::scheduler::agents::InstanceIdentity {
                document: i.document,
                signature: i.signature,
            });
        let token = self
            .app
            .scheduler
            .register_agent(
                &req.machine_id,
                &req.registration_token,
                &req.agent_version,
                &req.buildkit_address,
                identity.as_ref(),
            )
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            machine_token: token,
            health_interval_seconds: self.app.config.builders.agent_health_interval_seconds,
        }))
    }

    type WatchDirectivesStream = DirectiveStream;

    async fn watch_directives(
        &self,
        request: Request<pb::WatchDirectivesRequest>,
    ) -> Result<Response<Self::WatchDirectivesStream>, Status> {
        let machine_id = request.get_ref().machine_id.clone();
        self.machine(&request, &machine_id).await?;
        // Subscribe before the first read, so a change in between is not missed.
        let mut events = self.app.events.subscribe();
        let first = self.app.scheduler.directive(&machine_id).await?;
        let (tx, rx) = mpsc::channel(4);
        let app = self.app.clone();
        tokio::spawn(async move {
            let mut sent = first.generation;
            if tx.send(Ok(to_proto(first))).await.is_err() {
                return;
            }
            loop {
                let wake = tokio::select! {
                    event = events.recv() => match event {
                        Ok(n) => n.channel == crate::scheduler::MACHINE_CHANNEL && n.payload == machine_id,
                        // Lagged: we may have missed ours.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(RESYNC_EVERY) => true,
                    _ = tx.closed() => return,
                    _ = app.stopping.cancelled() => return,
                };
                if !wake {
                    continue;
                }
                match app.scheduler.directive_generation(&machine_id).await {
                    Ok(generation) if generation == sent => continue,
                    Ok(_) => {}
                    Err(err) => {
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                }
                match app.scheduler.directive(&machine_id).await {
                    Ok(directive) if directive.generation != sent => {
                        sent = directive.generation;
                        let last = matches!(directive.action, DirectiveAction::Drain { .. });
                        if tx.send(Ok(to_proto(directive))).await.is_err() || last {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_health(
        &self,
        request: Request<pb::ReportHealthRequest>,
    ) -> Result<Response<pb::ReportHealthResponse>, Status> {
        let machine_id = request.get_ref().machine_id.clone();
        self.machine(&request, &machine_id).await?;
        let req = request.into_inner();
        let answer = self
            .app
            .scheduler
            .report_health(
                &machine_id,
                &HealthReport {
                    generation: req.generation,
                    buildkit_up: req.buildkit_up,
                    disk_free_bytes: req.disk_free_bytes,
                    disk_total_bytes: req.disk_total_bytes,
                },
            )
            .await?;
        Ok(Response::new(pb::ReportHealthResponse {
            should_terminate: answer.should_terminate,
            generation: answer.generation,
        }))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let machine_id = request.get_ref().machine_id.clone();
        self.machine(&request, &machine_id).await?;
        self.app
            .scheduler
            .agent_shutdown(&machine_id, &request.get_ref().reason)
            .await?;
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
