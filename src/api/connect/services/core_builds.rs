//! `depot.core.v1.BuildService`: a project's builds as the public API lists and shares
//! them. Translation only, onto `crate::builds`.

use crate::api::connect::convert::to_timestamp;
use crate::api::connect::{Call, ConnectRouter, unary};
use crate::db::builds::Build;
use crate::error::{Error, Result};
use crate::proto::depot::core::v1 as pb;
use pb::build::Status;

pub fn register(router: &mut ConnectRouter) {
    const S: &str = "depot.core.v1.BuildService";
    router
        .register(S, "ShareBuild", unary(share_build))
        .register(S, "StopSharingBuild", unary(stop_sharing_build))
        .register(S, "ListBuilds", unary(list_builds))
        .register(S, "GetBuild", unary(get_build));
}

fn status(build: &Build) -> Status {
    match build.state.as_str() {
        "success" => Status::Success,
        "failed" => Status::Failed,
        "canceled" => Status::Canceled,
        // The build did not end by itself: its deadline passed.
        "timed_out" => Status::Error,
        _ => Status::Running,
    }
}

/// A build on the wire. Finished builds carry their statistics; `live_steps` gives a
/// running build's step counts when the caller has them.
pub fn build_to_wire(build: &Build, live_steps: Option<(i32, i32)>) -> pb::Build {
    let duration = build.finished_at.map(|finished| {
        let started = build.started_at.unwrap_or(build.created_at);
        i32::try_from((finished - started).num_seconds().max(0)).unwrap_or(i32::MAX)
    });
    let (total, cached) = match (build.total_steps, build.cached_steps, live_steps) {
        (Some(total), Some(cached), _) => (Some(total), Some(cached)),
        (_, _, Some((total, cached))) => (Some(total), Some(cached)),
        _ => (None, None),
    };
    pb::Build {
        build_id: build.id.clone(),
        status: status(build) as i32,
        created_at: Some(to_timestamp(build.created_at)),
        started_at: build.started_at.map(to_timestamp),
        finished_at: build.finished_at.map(to_timestamp),
        build_duration_seconds: duration,
        saved_duration_seconds: build.saved_seconds,
        cached_steps: cached,
        total_steps: total,
    }
}

fn required(field: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Ok(())
}

async fn share_build(call: Call, req: pb::ShareBuildRequest) -> Result<pb::ShareBuildResponse> {
    required("build_id", &req.build_id)?;
    let principal = call.principal().await?;
    let path = call.app.builds.share(&principal, &req.build_id).await?;
    Ok(pb::ShareBuildResponse {
        share_url: call.app.config.public_link(&path),
    })
}

async fn stop_sharing_build(
    call: Call,
    req: pb::StopSharingBuildRequest,
) -> Result<pb::StopSharingBuildResponse> {
    required("build_id", &req.build_id)?;
    let principal = call.principal().await?;
    call.app
        .builds
        .stop_sharing(&principal, &req.build_id)
        .await?;
    Ok(pb::StopSharingBuildResponse {})
}

async fn list_builds(call: Call, req: pb::ListBuildsRequest) -> Result<pb::ListBuildsResponse> {
    required("project_id", &req.project_id)?;
    let principal = call.principal().await?;
    let page = call
        .app
        .builds
        .list(
            &principal,
            Some(&req.project_id),
            req.page_token.as_deref().unwrap_or_default(),
            req.page_size.map(i64::from),
        )
        .await?;
    Ok(pb::ListBuildsResponse {
        builds: page.builds.iter().map(|b| build_to_wire(b, None)).collect(),
        next_page_token: page.next_page_token,
    })
}

async fn get_build(call: Call, req: pb::GetBuildRequest) -> Result<pb::GetBuildResponse> {
    required("build_id", &req.build_id)?;
    let principal = call.principal().await?;
    let (build, live) = call
        .app
        .builds
        .get_with_step_counts(&principal, &req.build_id)
        .await?;
    Ok(pb::GetBuildResponse {
        build: Some(build_to_wire(&build, live)),
    })
}
