//! Usage over REST: the same domain calls as `depot.core.v1.UsageService`.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::extract::{ApiQuery, Auth};
use crate::app::AppState;
use crate::error::Result;
use crate::usage::Range;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/usage", get(get_usage))
        .route("/usage/projects", get(list_project_usage))
        .route("/projects/{id}/usage", get(get_project_usage))
}

type Json = axum::Json<Value>;

/// A time range (RFC 3339); absent bounds default to this month so far.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    page_size: Option<i64>,
    page_token: Option<String>,
}

async fn get_usage(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json> {
    let range = Range::new(q.start, q.end)?;
    let report = app.usage.report(&principal, range).await?;
    Ok(axum::Json(json!({
        "start": report.range.start,
        "end": report.range.end,
        "projects": report.projects,
        "cache_used_bytes": report.cache_used_bytes,
    })))
}

async fn list_project_usage(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json> {
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
    Ok(axum::Json(json!({
        "projects": page.projects,
        "next_page_token": page.next_page_token,
    })))
}

async fn get_project_usage(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json> {
    let range = Range::new(q.start, q.end)?;
    let usage = app.usage.project(&principal, &id, range).await?;
    Ok(axum::Json(json!({ "usage": usage })))
}
