//! `depot.build.v1.BuildService` (builds for SDK users who bring their own BuildKit
//! client, and a build's steps and step logs) and `depot.build.v1.RegistryService`.
//! Translation only, onto `crate::builds`.

use crate::api::connect::convert::to_timestamp;
use crate::api::connect::{Call, ConnectRouter, unary};
use crate::builds::BuildSpec;
use crate::db::builds::Outcome;
use crate::error::{Error, Result};
use crate::proto::depot::build::v1 as pb;
use pb::get_build_steps_response::{BuildStep, build_step::CacheState};

pub fn register(router: &mut ConnectRouter) {
    const S: &str = "depot.build.v1.BuildService";
    router
        .register(S, "CreateBuild", unary(create_build))
        .register(S, "FinishBuild", unary(finish_build))
        .register(S, "GetBuildSteps", unary(get_build_steps))
        .register(S, "GetBuildStepLogs", unary(get_build_step_logs));
    const R: &str = "depot.build.v1.RegistryService";
    router
        .register(R, "ListImages", unary(list_images))
        .register(R, "DeleteImage", unary(delete_image));
}

fn given(id: &str) -> Option<&str> {
    Some(id).filter(|s| !s.trim().is_empty())
}

async fn create_build(call: Call, req: pb::CreateBuildRequest) -> Result<pb::CreateBuildResponse> {
    let principal = call.principal().await?;
    let spec = BuildSpec::without_cli();
    let (build, token, _) = call
        .app
        .builds
        .create(&principal, given(&req.project_id), spec)
        .await?;
    Ok(pb::CreateBuildResponse {
        build_id: build.id,
        build_token: token,
    })
}

async fn finish_build(call: Call, req: pb::FinishBuildRequest) -> Result<pb::FinishBuildResponse> {
    use pb::finish_build_request::Result as R;
    let outcome = match req.result {
        Some(R::Success(_)) => Outcome::Success,
        Some(R::Error(e)) if e.error.trim().is_empty() => Outcome::Failed("build failed".into()),
        Some(R::Error(e)) => Outcome::Failed(e.error),
        None => return Err(Error::invalid("result", "set one of success or error")),
    };
    let principal = call.principal().await?;
    call.app
        .builds
        .finish(&principal, &req.build_id, outcome)
        .await?;
    Ok(pb::FinishBuildResponse {})
}

async fn get_build_steps(
    call: Call,
    req: pb::GetBuildStepsRequest,
) -> Result<pb::GetBuildStepsResponse> {
    let principal = call.principal().await?;
    let page = call
        .app
        .builds
        .steps_page(
            &principal,
            given(&req.project_id),
            &req.build_id,
            req.page_token.as_deref().unwrap_or_default(),
            req.page_size.map(i64::from),
        )
        .await?;
    Ok(pb::GetBuildStepsResponse {
        build_steps: page
            .steps
            .into_iter()
            .map(|s| BuildStep {
                name: s.name,
                digest: s.digest,
                started_at: s.started_at.map(to_timestamp),
                completed_at: s.completed_at.map(to_timestamp),
                cache_state: if s.cached {
                    CacheState::Cached
                } else {
                    CacheState::Uncached
                } as i32,
                error: s.error,
                has_logs: s.log_lines > 0,
            })
            .collect(),
        next_page_token: page.next_page_token,
    })
}

async fn get_build_step_logs(
    call: Call,
    req: pb::GetBuildStepLogsRequest,
) -> Result<pb::GetBuildStepLogsResponse> {
    let principal = call.principal().await?;
    let page = call
        .app
        .builds
        .step_logs(
            &principal,
            given(&req.project_id),
            &req.build_id,
            &req.build_step_digest,
            req.page_token.as_deref().unwrap_or_default(),
            req.page_size.map(i64::from),
        )
        .await?;
    Ok(pb::GetBuildStepLogsResponse {
        logs: page
            .lines
            .into_iter()
            .map(|l| pb::get_build_step_logs_response::Log {
                message: l.message,
                timestamp: Some(to_timestamp(l.at)),
            })
            .collect(),
        next_page_token: page.next_page_token,
    })
}

fn no_registry() -> Error {
    Error::Unimplemented(
        "the image registry is not part of Kiln yet: build with --push to your own registry, \
         or --load"
            .into(),
    )
}

async fn list_images(call: Call, _: pb::ListImagesRequest) -> Result<pb::ListImagesResponse> {
    call.principal().await?;
    Err(no_registry())
}

async fn delete_image(call: Call, _: pb::DeleteImageRequest) -> Result<pb::DeleteImageResponse> {
    call.principal().await?;
    Err(no_registry())
}
