//! `depot.cli.v1.BuildService`.

use base64::Engine;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::api::connect::{Call, ConnectRouter, client_stream, unary};
use crate::auth::{Action, Principal, TokenKind, guard};
use crate::builds::{build_options_json, platform_from_wire, timestamp, to_timestamp};
use crate::db::builds::{self, Build, Outcome, Step};
use crate::db::tokens::{self, NewToken};
use crate::error::{Error, Result};
use crate::proto::depot::cli::v1 as pb;

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

/// Authenticates the call and authorizes `action` on the build it names.
async fn authorized_build(
    call: &Call,
    build_id: &str,
    action: Action,
) -> Result<std::sync::Arc<crate::builds::BuildRef>> {
    let principal = call.principal().await?;
    call.app
        .builds
        .authorize(&principal, build_id, action)
        .await
}

fn build_url(call: &Call, build: &Build) -> String {
    call.app.config.public_link(&format!(
        "/dashboard/projects/{}/builds/{}",
        build.project_id, build.id
    ))
}

async fn create_build(call: Call, req: pb::CreateBuildRequest) -> Result<pb::CreateBuildResponse> {
    let principal = call.principal().await?;
    if req.options.len() > 100 {
        return Err(Error::invalid("options", "at most 100 targets per build"));
    }
    let project = call
        .app
        .builds
        .resolve_project(&principal, req.project_id.as_deref())
        .await?;
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
    let (build, token) = call
        .app
        .builds
        .create(
            &principal,
            &project,
            &command,
            build_options_json(&req.options),
        )
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
    crate::builds::connection::get(&call.app, &principal, &req.build_id, platform).await
}

async fn report_build_health(
    call: Call,
    req: pb::ReportBuildHealthRequest,
) -> Result<pb::ReportBuildHealthResponse> {
    // Validated for the client's sake; liveness is tracked per build.
    platform_from_wire(req.platform)?;
    let build = authorized_build(&call, &req.build_id, Action::WriteBuild).await?;
    call.app.builds.health.report(&build.id);
    // A finished build (reaped, or canceled elsewhere) is released at once.
    let cancels_at = if build.finished {
        Utc::now()
    } else {
        build.cancels_at
    };
    Ok(pb::ReportBuildHealthResponse {
        cancels_at: Some(to_timestamp(cancels_at)),
    })
}

async fn record_status_message(
    call: &Call,
    principal: &Principal,
    build_id: &str,
    statuses: &[crate::proto::moby::buildkit::v1::StatusResponse],
) -> Result<()> {
    let build = call
        .app
        .builds
        .authorize(principal, build_id, Action::WriteBuild)
        .await?;
    call.app.builds.record_statuses(&build.id, statuses).await
}

async fn report_status(
    call: Call,
    req: pb::ReportStatusRequest,
) -> Result<pb::ReportStatusResponse> {
    let principal = call.principal().await?;
    record_status_message(&call, &principal, &req.build_id, &req.statuses).await?;
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
        record_status_message(&call, &principal, &message.build_id, &message.statuses).await?;
        stream_build = Some(message.build_id);
    }
    Ok(pb::ReportStatusStreamResponse {})
}

async fn report_timings(
    call: Call,
    req: pb::ReportTimingsRequest,
) -> Result<pb::ReportTimingsResponse> {
    let build = authorized_build(&call, &req.build_id, Action::WriteBuild).await?;
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
    builds::upsert_steps(&call.app.db, &build.id, &steps).await?;
    Ok(pb::ReportTimingsResponse {})
}

async fn report_build_context(
    call: Call,
    req: pb::ReportBuildContextRequest,
) -> Result<pb::ReportBuildContextResponse> {
    let build = authorized_build(&call, &req.build_id, Action::WriteBuild).await?;
    if req.dockerfiles.len() > 100 {
        return Err(Error::invalid("dockerfiles", "at most 100 per build"));
    }
    let files: Vec<(String, String, String)> = req
        .dockerfiles
        .into_iter()
        .map(|d| {
            (
                d.target.chars().take(200).collect(),
                d.filename.chars().take(1000).collect(),
                d.contents,
            )
        })
        .collect();
    builds::upsert_dockerfiles(&call.app.db, &build.id, &files).await?;
    Ok(pb::ReportBuildContextResponse {})
}

fn encode_page_token(created_at: DateTime<Utc>, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{id}", created_at.timestamp_micros()))
}

fn decode_page_token(token: &str) -> Result<Option<(DateTime<Utc>, String)>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::invalid(
            "page_token",
            "is not a token this server issued; start from the first page",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok(Some((at, id.to_string())))
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
    let project_id = match (req.project_id.trim(), &principal.project_id) {
        ("", Some(own)) => own.clone(),
        ("", None) => {
            return Err(Error::invalid(
                "project_id",
                "is required; pass --project <id>",
            ));
        }
        (id, _) => id.to_string(),
    };
    let project = guard::project(&call.app.db, &principal, &project_id, Action::ViewBuild).await?;
    let page_size = match req.page_size {
        n if n <= 0 => 100,
        n => i64::from(n.min(1000)),
    };
    let after = decode_page_token(&req.page_token)?;
    let mut list = builds::list(&call.app.db, &project.id, after, page_size + 1).await?;
    let next_page_token = if list.len() as i64 > page_size {
        list.truncate(page_size as usize);
        list.last()
            .map(|b| encode_page_token(b.created_at, &b.id))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(pb::ListBuildsResponse {
        builds: list
            .iter()
            .map(|b| pb::Build {
                id: b.id.clone(),
                status: status_of(b) as i32,
                created_at: Some(to_timestamp(b.created_at)),
                finished_at: b.finished_at.map(to_timestamp),
            })
            .collect(),
        next_page_token,
    })
}

async fn mint_pull_token(
    call: &Call,
    principal: &Principal,
    project_id: &str,
    organization_id: &str,
) -> Result<String> {
    let mut token = NewToken::new(TokenKind::Pull, "depot pull-token");
    token.organization_id = Some(organization_id.to_string());
    token.project_id = Some(project_id.to_string());
    token.expires_at = Some(super::projects::pull_token_expiry(
        call.app.config.registry.pull_token_ttl_seconds,
    ));
    token.created_by = principal.user_id.clone();
    let (_, minted) = tokens::create(&call.app.db, token).await?;
    Ok(minted.secret)
}

async fn get_pull_token(
    call: Call,
    req: pb::GetPullTokenRequest,
) -> Result<pb::GetPullTokenResponse> {
    let principal = call.principal().await?;
    let build_id = req
        .build_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let project_id = req
        .project_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let (project_id, organization_id) = match (build_id, project_id) {
        (Some(build_id), requested) => {
            let build = call
                .app
                .builds
                .authorize(&principal, build_id, Action::PullImages)
                .await?;
            if requested.is_some_and(|p| p != build.project_id) {
                return Err(Error::invalid(
                    "build_id",
                    "the build belongs to another project",
                ));
            }
            (build.project_id.clone(), build.organization_id.clone())
        }
        (None, requested) => {
            let id = requested
                .map(str::to_string)
                .or_else(|| principal.project_id.clone())
                .ok_or_else(|| Error::invalid("project_id", "is required; pass --project <id>"))?;
            let project = guard::project(&call.app.db, &principal, &id, Action::PullImages).await?;
            (project.id, project.organization_id)
        }
    };
    let token = mint_pull_token(&call, &principal, &project_id, &organization_id).await?;
    Ok(pb::GetPullTokenResponse {
        token,
        registry_host: call.app.config.registry_host(),
    })
}

async fn get_pull_info(call: Call, req: pb::GetPullInfoRequest) -> Result<pb::GetPullInfoResponse> {
    let principal = call.principal().await?;
    let build = call
        .app
        .builds
        .authorize(&principal, &req.build_id, Action::PullImages)
        .await?;
    let full = builds::get(&call.app.db, &build.id)
        .await?
        .ok_or_else(|| Error::not_found("build", &build.id))?;
    let password =
        mint_pull_token(&call, &principal, &build.project_id, &build.organization_id).await?;
    let registry_host = call.app.config.registry_host();
    let options: Vec<pb::BuildOptions> = full
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
        password,
        options,
        save_for_load: false,
        registry_host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let token = encode_page_token(at, "abc");
        assert_eq!(
            decode_page_token(&token).unwrap(),
            Some((at, "abc".to_string()))
        );
        assert_eq!(decode_page_token("").unwrap(), None);
        assert!(decode_page_token("!!!").is_err());
        assert!(
            decode_page_token(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("nope"))
                .is_err()
        );
    }
}
