//! Usage over REST: the same domain calls as `depot.core.v1.UsageService`.

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiQuery, Auth};
use crate::app::AppState;
use crate::db::usage::ProjectUsage;
use crate::error::{ErrorBody, Result};
use crate::usage::Range;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_usage))
        .routes(routes!(list_project_usage))
        .routes(routes!(get_project_usage))
}

type Json<T> = axum::Json<T>;

/// A time range; absent bounds default to this month (UTC) so far. Builds count in the
/// hour they finished.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RangeQuery {
    /// Start (RFC 3339, from 1970 on).
    start: Option<DateTime<Utc>>,
    /// End (RFC 3339, after start, at most 400 days later).
    end: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RangePageQuery {
    /// Start (RFC 3339, from 1970 on).
    start: Option<DateTime<Utc>>,
    /// End (RFC 3339, after start, at most 400 days later).
    end: Option<DateTime<Utc>>,
    /// Rows per page: 1 to 1000 (default 100).
    #[param(minimum = 0, maximum = 1000)]
    page_size: Option<i64>,
    /// The `next_page_token` of the previous page; absent for the first page.
    page_token: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct UsageReport {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// Projects that built in the range.
    projects: Vec<ProjectUsage>,
    /// Bytes the projects' cache volumes hold now, as last measured.
    cache_used_bytes: i64,
}

/// Usage of every project the token can see.
#[utoipa::path(get, path = "/usage", tag = "usage", params(RangeQuery),
    responses((status = 200, body = UsageReport), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_usage(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json<UsageReport>> {
    let range = Range::new(q.start, q.end)?;
    let report = app.usage.report(&principal, range).await?;
    Ok(axum::Json(UsageReport {
        start: report.range.start,
        end: report.range.end,
        projects: report.projects,
        cache_used_bytes: report.cache_used_bytes,
    }))
}

#[derive(Serialize, ToSchema)]
struct UsagePage {
    projects: Vec<ProjectUsage>,
    next_page_token: String,
}

/// Usage per project, idle projects included, in pages.
#[utoipa::path(get, path = "/usage/projects", tag = "usage", params(RangePageQuery),
    responses((status = 200, body = UsagePage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_project_usage(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiQuery(q): ApiQuery<RangePageQuery>,
) -> Result<Json<UsagePage>> {
    let range = Range::new(q.start, q.end)?;
    let page = app
        .usage
        .list(
            &principal,
            range,
            q.page_token.as_deref().unwrap_or_default(),
            q.page_size,
        )
        .await?;
    Ok(axum::Json(UsagePage {
        projects: page.projects,
        next_page_token: page.next_page_token,
    }))
}

#[derive(Serialize, ToSchema)]
struct ProjectUsageReply {
    usage: ProjectUsage,
}

/// One project's usage.
#[utoipa::path(get, path = "/projects/{id}/usage", tag = "usage",
    params(("id" = String, Path, description = "Project id"), RangeQuery),
    responses((status = 200, body = ProjectUsageReply), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_project_usage(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json<ProjectUsageReply>> {
    let range = Range::new(q.start, q.end)?;
    let usage = app.usage.project(&principal, &id, range).await?;
    Ok(axum::Json(ProjectUsageReply { usage }))
}
