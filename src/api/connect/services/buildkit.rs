//! `depot.buildkit.v1.BuildKitService`: a BuildKit endpoint for a build, for SDK users who
//! drive BuildKit themselves. The same scheduler path as the depot CLI's
//! GetBuildKitConnection (`crate::builds::connection`), streamed.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::api::connect::{Call, ConnectRouter, client_stream, server_stream, unary};
use crate::builds::connection::{self, ActiveBuilder, BuilderConnection};
use crate::db::builds::Platform;
use crate::error::{Error, Result};
use crate::proto::depot::buildkit::v1 as pb;
use pb::get_endpoint_response::{ActiveConnection, Connection, PendingConnection};

pub fn register(router: &mut ConnectRouter) {
    const S: &str = "depot.buildkit.v1.BuildKitService";
    router
        .register(S, "GetEndpoint", server_stream(get_endpoint))
        .register(S, "ReportHealth", client_stream(report_health))
        .register(S, "ReleaseEndpoint", unary(release_endpoint));
}

fn platform(value: i32) -> Result<Platform> {
    match pb::Platform::try_from(value) {
        Ok(pb::Platform::Amd64) => Ok(Platform::Amd64),
        Ok(pb::Platform::Arm64) => Ok(Platform::Arm64),
        _ => Err(Error::invalid(
            "platform",
            "must be PLATFORM_AMD64 or PLATFORM_ARM64",
        )),
    }
}

fn pending() -> pb::GetEndpointResponse {
    pb::GetEndpointResponse {
        connection: Some(Connection::Pending(PendingConnection {})),
    }
}

enum Phase {
    Start,
    Waiting,
    Done,
}

fn active_response(active: ActiveBuilder) -> pb::GetEndpointResponse {
    pb::GetEndpointResponse {
        connection: Some(Connection::Active(ActiveConnection {
            endpoint: active.endpoint,
            server_name: active.server_name,
            cert: Some(pb::CertificatePair {
                cert: Some(pb::PublicCertificate {
                    cert: active.client_cert_pem,
                }),
                key: Some(pb::PrivateKey {
                    key: active.client_key_pem,
                }),
            }),
            ca_cert: Some(pb::PublicCertificate {
                cert: active.ca_cert_pem,
            }),
        })),
    }
}

/// `pending` at once, again each time the builder is still starting after the scheduler's
/// wait, then `active` once it serves; the stream ends after `active`.
async fn get_endpoint(
    call: Call,
    req: pb::GetEndpointRequest,
) -> Result<BoxStream<'static, Result<pb::GetEndpointResponse>>> {
    let principal = call.principal().await?;
    let platform = platform(req.platform)?;
    let app = call.app.clone();
    // Checked before the stream starts, so a wrong build is a plain error.
    app.builds
        .authorize(&principal, &req.build_id, crate::auth::Action::WriteBuild)
        .await?;
    let build_id = req.build_id;
    let stream = futures_util::stream::unfold(Phase::Start, move |phase| {
        let (app, principal, build_id) = (app.clone(), principal.clone(), build_id.clone());
        async move {
            match phase {
                Phase::Start => Some((Ok(pending()), Phase::Waiting)),
                Phase::Done => None,
                Phase::Waiting => {
                    let next = tokio::select! {
                        next = connection::get(
                            &app.builds,
                            &app.scheduler,
                            &app.events,
                            &principal,
                            &build_id,
                            platform,
                        ) => next,
                        () = app.stopping.cancelled() => Err(Error::Unavailable(
                            "the server is shutting down; ask again".into(),
                        )),
                    };
                    Some(match next {
                        Err(err) => (Err(err), Phase::Done),
                        Ok(BuilderConnection::Pending { .. }) => (Ok(pending()), Phase::Waiting),
                        Ok(BuilderConnection::Active(active)) => {
                            (Ok(active_response(active)), Phase::Done)
                        }
                    })
                }
            }
        }
    });
    Ok(stream.boxed())
}

/// Each message is a health report for its build; one stream reports on one build.
async fn report_health(
    call: Call,
    mut messages: BoxStream<'static, Result<pb::ReportHealthRequest>>,
) -> Result<pb::ReportHealthResponse> {
    let principal = call.principal().await?;
    let mut stream_build: Option<String> = None;
    while let Some(message) = messages.next().await {
        let message = message?;
        platform(message.platform)?;
        if let Some(first) = &stream_build
            && *first != message.build_id
        {
            return Err(Error::invalid(
                "build_id",
                "one stream reports on one build",
            ));
        }
        call.app
            .builds
            .report_health(&principal, &message.build_id)
            .await?;
        stream_build = Some(message.build_id);
    }
    Ok(pb::ReportHealthResponse {})
}

async fn release_endpoint(
    call: Call,
    req: pb::ReleaseEndpointRequest,
) -> Result<pb::ReleaseEndpointResponse> {
    let platform = platform(req.platform)?;
    let principal = call.principal().await?;
    connection::release(&call.app.builds, &principal, &req.build_id, platform).await?;
    Ok(pb::ReleaseEndpointResponse {})
}
