//! `depot.cli.v1.BuildService`. Translation only: each handler maps the request onto
//! one call of `crate::builds` (or `crate::tokens`) and the answer back.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::api::connect::convert::{
    build_options_json, logs_from_statuses, platform as platform_from_wire, steps_from_statuses,
    timestamp, to_timestamp,
};
use crate::api::connect::{Call, ConnectRouter, client_stream, unary};
use crate::builds::BuildSpec;
use crate::builds::connection::BuilderConnection;
use crate::db::builds::{Build, Outcome, Step};
use crate::error::{Error, Result};
use crate::proto::depot::cli::v1 as pb;
use crate::proto::depot::cli::v1::get_build_kit_connection_response::{self as conn, Connection};

pub fn register(router: &mut ConnectRouter) {
    const S: &str = "depot.cli.v1.BuildService";
    router
        .register(S, "CreateBuild", unary(create_build))
        .register(S, "GetBuild", unary(get_build))
        .register(S, "FinishBuild", unary(finish_build))
        .register(S, "GetBuildKitConnection", unary(get_buildkit_connection))
        .register(S, "ReportBuildHealth", unary(report_build_health))
        .register(S, "ReportTimings", unary(report_timings))
        .register(S, "ReportStatus", unary(report_status))
        .register(S, "ReportStatusStream", client_stream(report_status_stream))
        .register(S, "ReportBuildContext", unary(report_build_context))
        .register(S, "ListBuilds", unary(list_builds))
        .register(S, "GetPullInfo", unary(get_pull_info))
        .register(S, "GetPullToken", unary(get_pull_token));
}

fn build_url(call: &Call, build: &Build) -> String {
    call.app.config.public_link(&format!(
        "/dashboard/projects/{}/builds/{}",
        build.project_id, build.id
    ))
}

/// An optional id: empty means "not given".
fn given(id: Option<&str>) -> Option<&str> {
    id.filter(|s| !s.trim().is_empty())
}

async fn create_build(call: Call, req: pb::CreateBuildRequest) -> Result<pb::CreateBuildResponse> {
    let principal = call.principal().await?;
    if req.options.len() > 100 {
        return Err(Error::invalid("options", "at most 100 targets per build"));
    }
    let command = req
        .options
        .first()
        .and_then(|o| pb::Command::try_from(o.command).ok())
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("COMMAND_")
                .to_ascii_lowercase()
        })
        .filter(|c| c != "unspecified")
        .unwrap_or_else(|| "build".to_string());
    let spec = BuildSpec {
        command,
        options: build_options_json(&req.options),
        save: req
            .options
            .iter()
            .any(|o| o.save || !o.save_tags.is_empty()),
        // The depot CLI has no way to ask; untrusted callers get one by policy (OIDC).
        ephemeral_cache: false,
    };
    let (build, token, project) = call
        .app
        .builds
        .create(&principal, given(req.project_id.as_deref()), spec)
        .await?;
    Ok(pb::CreateBuildResponse {
        build_url: build_url(&call, &build),
        build_id: build.id,
        build_token: token,
        project_id: project.id,
        registry: Some(pb::Registry {
            can_use_local_registry: false,
            proxy_image: String::new(),
            load_using_registry: false,
        }),
        profiler: None,
        additional_credentials: Vec::new(),
        additional_tags: Vec::new(),
    })
}

async fn get_build(call: Call, req: pb::GetBuildRequest) -> Result<pb::GetBuildResponse> {
    let principal = call.principal().await?;
    let build = call.app.builds.get(&principal, &req.build_id).await?;
    Ok(pb::GetBuildResponse {
        build_url: build_url(&call, &build),
        build_id: build.id,
        project_id: build.project_id,
    })
}

async fn finish_build(call: Call, req: pb::FinishBuildRequest) -> Result<pb::FinishBuildResponse> {
    use pb::finish_build_request::Result as R;
    let principal = call.principal().await?;
    let outcome = match req.result {
        Some(R::Success(_)) => Outcome::Success,
        Some(R::Error(e)) => Outcome::Failed(if e.error.is_empty() {
            "build failed".into()
        } else {
            e.error
        }),
        Some(R::Canceled(_)) => Outcome::Canceled,
        None => {
            return Err(Error::invalid(
                "result",
                "set one of success, error or canceled",
            ));
        }
    };
    call.app
        .builds
        .finish(&principal, &req.build_id, outcome)
        .await?;
    Ok(pb::FinishBuildResponse {})
}

async fn get_buildkit_connection(
    call: Call,
    req: pb::GetBuildKitConnectionRequest,
) -> Result<pb::GetBuildKitConnectionResponse> {
    let principal = call.principal().await?;
    let platform = platform_from_wire(req.platform)?;
    let app = &call.app;
    let connection = crate::builds::connection::get(
        &app.builds,
        &app.scheduler,
        &app.events,
        &principal,
        &req.build_id,
        platform,
    )
    .await?;
    let connection = match connection {
        BuilderConnection::Active(active) => Connection::Active(conn::ActiveConnection {
            endpoint: active.endpoint,
            server_name: active.server_name,
            cert: Some(pb::Cert {
                cert: active.client_cert_pem,
                key: active.client_key_pem,
            }),
            ca_cert: Some(pb::Cert {
                cert: active.ca_cert_pem,
                key: String::new(),
            }),
            compressor: Some(conn::active_connection::Compressor::Identity(
                conn::active_connection::Identity {},
            )),
        }),
        BuilderConnection::Pending { wait_ms } => Connection::Pending(conn::PendingConnection {
            wait_ms: i32::try_from(wait_ms).unwrap_or(i32::MAX),
        }),
    };
    Ok(pb::GetBuildKitConnectionResponse {
        connection: Some(connection),
    })
}

async fn report_build_health(
    call: Call,
    req: pb::ReportBuildHealthRequest,
) -> Result<pb::ReportBuildHealthResponse> {
    // Validated for the client's sake; liveness is tracked per build.
    platform_from_wire(req.platform)?;
    let principal = call.principal().await?;
    let cancels_at = call
        .app
        .builds
        .report_health(&principal, &req.build_id)
        .await?;
    Ok(pb::ReportBuildHealthResponse {
        cancels_at: Some(to_timestamp(cancels_at)),
    })
}

async fn report_status(
    call: Call,
    req: pb::ReportStatusRequest,
) -> Result<pb::ReportStatusResponse> {
    let principal = call.principal().await?;
    let builds = &call.app.builds;
    builds
        .record_steps(
            &principal,
            &req.build_id,
            steps_from_statuses(&req.statuses),
        )
        .await?;
    builds
        .record_logs(&principal, &req.build_id, logs_from_statuses(&req.statuses))
        .await?;
    Ok(pb::ReportStatusResponse {})
}

/// Persists each envelope as it arrives: the CLI resets this stream instead of closing
/// it, so nothing may wait for end of stream.
async fn report_status_stream(
    call: Call,
    mut messages: BoxStream<'static, Result<pb::ReportStatusStreamRequest>>,
) -> Result<pb::ReportStatusStreamResponse> {
    let principal = call.principal().await?;
    let mut stream_build: Option<String> = None;
    while let Some(message) = messages.next().await {
        let message = message?;
        if let Some(first) = &stream_build
            && *first != message.build_id
        {
            return Err(Error::invalid(
                "build_id",
                "one stream reports on one build",
            ));
        }
        let builds = &call.app.builds;
        builds
            .record_steps(
                &principal,
                &message.build_id,
                steps_from_statuses(&message.statuses),
            )
            .await?;
        builds
            .record_logs(
                &principal,
                &message.build_id,
                logs_from_statuses(&message.statuses),
            )
            .await?;
        stream_build = Some(message.build_id);
    }
    Ok(pb::ReportStatusStreamResponse {})
}

async fn report_timings(
    call: Call,
    req: pb::ReportTimingsRequest,
) -> Result<pb::ReportTimingsResponse> {
    let principal = call.principal().await?;
    let steps: Vec<Step> = req
        .build_steps
        .iter()
        .take(10_000)
        .map(|s| {
            let started = s.start_time.as_ref().and_then(timestamp);
            let digest = s
                .stable_digest
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| format!("name:{}", s.name));
            Step {
                digest: digest.chars().take(256).collect(),
                name: s.name.chars().take(2000).collect(),
                cached: s.cached,
                started_at: started,
                completed_at: started
                    .map(|t| t + chrono::Duration::milliseconds(i64::from(s.duration_ms.max(0)))),
                error: s.error.clone().filter(|e| !e.is_empty()),
            }
        })
        .collect();
    call.app
        .builds
        .record_steps(&principal, &req.build_id, steps)
        .await?;
    Ok(pb::ReportTimingsResponse {})
}

async fn report_build_context(
    call: Call,
    req: pb::ReportBuildContextRequest,
) -> Result<pb::ReportBuildContextResponse> {
    let principal = call.principal().await?;
    let files = req
        .dockerfiles
        .into_iter()
        .map(|d| (d.target, d.filename, d.contents))
        .collect();
    call.app
        .builds
        .record_context(&principal, &req.build_id, files)
        .await?;
    Ok(pb::ReportBuildContextResponse {})
}

fn status_of(build: &Build) -> pb::BuildStatus {
    match build.state.as_str() {
        "success" => pb::BuildStatus::Finished,
        "failed" | "timed_out" => pb::BuildStatus::Failed,
        "canceled" => pb::BuildStatus::Canceled,
        _ => pb::BuildStatus::Running,
    }
}

async fn list_builds(call: Call, req: pb::ListBuildsRequest) -> Result<pb::ListBuildsResponse> {
    let principal = call.principal().await?;
    let page = call
        .app
        .builds
        .list(
            &principal,
            given(Some(&req.project_id)),
            &req.page_token,
            Some(i64::from(req.page_size)),
        )
        .await?;
    Ok(pb::ListBuildsResponse {
        builds: page
            .builds
            .iter()
            .map(|b| pb::Build {
                id: b.id.clone(),
                status: status_of(b) as i32,
                created_at: Some(to_timestamp(b.created_at)),
                finished_at: b.finished_at.map(to_timestamp),
            })
            .collect(),
        next_page_token: page.next_page_token,
    })
}

async fn get_pull_token(
    call: Call,
    req: pb::GetPullTokenRequest,
) -> Result<pb::GetPullTokenResponse> {
    let principal = call.principal().await?;
    let token = call
        .app
        .tokens
        .mint_pull_token(
            &principal,
            req.project_id.as_deref(),
            req.build_id.as_deref(),
        )
        .await?;
    Ok(pb::GetPullTokenResponse {
        token: token.secret,
        registry_host: call.app.config.registry_host(),
    })
}

async fn get_pull_info(call: Call, req: pb::GetPullInfoRequest) -> Result<pb::GetPullInfoResponse> {
    let principal = call.principal().await?;
    let (build, token) = call
        .app
        .builds
        .pull_info(&principal, &call.app.tokens, &req.build_id)
        .await?;
    let registry_host = call.app.config.registry_host();
    let options: Vec<pb::BuildOptions> = build
        .options
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| pb::BuildOptions {
            command: o["command"].as_i64().unwrap_or(1) as i32,
            tags: o["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
            push: o["push"].as_bool().unwrap_or(false),
            load: o["load"].as_bool().unwrap_or(false),
            save: o["save"].as_bool().unwrap_or(false),
            lint: o["lint"].as_bool().unwrap_or(false),
            target_name: o["target"].as_str().map(String::from),
            ..Default::default()
        })
        .collect();
    Ok(pb::GetPullInfoResponse {
        reference: format!("{registry_host}/{}:{}", build.project_id, build.id),
        username: "x-token".into(),
        password: token.secret,
        options,
        save_for_load: false,
        registry_host,
    })
}
