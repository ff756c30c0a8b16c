//! `depot.core.v1.UsageService`: builds, build minutes, minutes saved by the cache, and
//! cache storage over a time range. Translation only, onto `crate::usage`.

use crate::api::connect::convert::{timestamp, to_timestamp};
use crate::api::connect::{Call, ConnectRouter, unary};
use crate::cache::GIB;
use crate::db::usage::ProjectUsage;
use crate::error::{Error, Result};
use crate::proto::depot::core::v1 as pb;
use crate::usage::Range;

pub fn register(router: &mut ConnectRouter) {
    const S: &str = "depot.core.v1.UsageService";
    router
        .register(S, "ListProjectUsage", unary(list_project_usage))
        .register(S, "GetProjectUsage", unary(get_project_usage))
        .register(S, "GetUsage", unary(get_usage));
}

fn range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<Range> {
    let convert = |field: &str, t: Option<&prost_types::Timestamp>| {
        t.map(|t| {
            timestamp(t)
                .filter(|_| (0..=999_999_999).contains(&t.nanos))
                .ok_or_else(|| Error::invalid(field, "is not a valid timestamp"))
        })
        .transpose()
    };
    Range::new(convert("start_at", start)?, convert("end_at", end)?)
}

fn clamp_i32(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn project_to_wire(p: &ProjectUsage) -> pb::ProjectUsage {
    pb::ProjectUsage {
        project_id: p.project_id.clone(),
        build_count: clamp_i32(p.build_count),
        build_duration_seconds: clamp_i32(p.build_seconds),
        // Whole GiB, rounded up: a cache that holds anything shows at least 1.
        layer_cache_size_gb: clamp_i32((p.cache_used_bytes + GIB - 1) / GIB),
    }
}

async fn list_project_usage(
    call: Call,
    req: pb::ListProjectUsageRequest,
) -> Result<pb::ListProjectUsageResponse> {
    let range = range(req.start_at.as_ref(), req.end_at.as_ref())?;
    let principal = call.principal().await?;
    let page = call
        .app
        .usage
        .list(
            &principal,
            range,
            req.page_token.as_deref().unwrap_or_default(),
            req.page_size.map(i64::from),
        )
        .await?;
    Ok(pb::ListProjectUsageResponse {
        usage: page.projects.iter().map(project_to_wire).collect(),
        next_page_token: page.next_page_token,
    })
}

async fn get_project_usage(
    call: Call,
    req: pb::GetProjectUsageRequest,
) -> Result<pb::GetProjectUsageResponse> {
    let range = range(req.start_at.as_ref(), req.end_at.as_ref())?;
    if req.project_id.trim().is_empty() {
        return Err(Error::invalid("project_id", "is required"));
    }
    let principal = call.principal().await?;
    let usage = call
        .app
        .usage
        .project(&principal, &req.project_id, range)
        .await?;
    Ok(pb::GetProjectUsageResponse {
        usage: Some(project_to_wire(&usage)),
    })
}

async fn get_usage(call: Call, req: pb::GetUsageRequest) -> Result<pb::GetUsageResponse> {
    let range = range(req.start_at.as_ref(), req.end_at.as_ref())?;
    let principal = call.principal().await?;
    let report = call.app.usage.report(&principal, range).await?;
    let minutes = |seconds: i64| seconds as f32 / 60.0;
    Ok(pb::GetUsageResponse {
        period_start: Some(to_timestamp(report.range.start)),
        period_end: Some(to_timestamp(report.range.end)),
        container_build: report
            .projects
            .iter()
            .map(|p| pb::ContainerBuildUsage {
                project_name: p.project_name.clone(),
                build_count: clamp_i32(p.build_count),
                minutes_saved: minutes(p.saved_seconds),
                minutes_billed: minutes(p.build_seconds),
            })
            .collect(),
        github_actions_jobs: Vec::new(),
        storage: vec![pb::StorageUsage {
            storage_type: "cache".into(),
            total_gb: report.cache_used_bytes as f32 / GIB as f32,
        }],
        agent_sandbox: Vec::new(),
    })
}
