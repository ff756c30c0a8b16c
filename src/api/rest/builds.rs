//! Builds over REST: create one without a CLI, finish it, its steps and step logs in
//! pages, and share links. The same domain calls as `depot.build.v1.BuildService` and
//! `depot.core.v1.BuildService`.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::extract::{ApiJson, ApiQuery, Auth};
use crate::app::AppState;
use crate::builds::BuildSpec;
use crate::db::builds::Outcome;
use crate::error::{Error, Result};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/builds/{id}/finish", post(finish_build))
        .route("/builds/{id}/steps", get(list_steps))
        .route("/builds/{id}/steps/{digest}/logs", get(list_step_logs))
        .route(
            "/builds/{id}/share",
            post(share_build).delete(stop_sharing_build),
        )
}

type Json = axum::Json<Value>;

/// Page parameters every listing takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub page_size: Option<i64>,
    pub page_token: Option<String>,
}

/// `POST /projects/{id}/builds` (routed with the listing in `super`).
pub(super) async fn create_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(project): Path<String>,
) -> Result<(StatusCode, Json)> {
    let spec = BuildSpec {
        command: "build".into(),
        options: json!([]),
        save: false,
        ephemeral_cache: false,
    };
    let (build, token, _) = app.builds.create(&principal, Some(&project), spec).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "build": build, "build_token": token })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum FinishStatus {
    Success,
    Failed,
    Canceled,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FinishBody {
    status: FinishStatus,
    error: Option<String>,
}

async fn finish_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<FinishBody>,
) -> Result<StatusCode> {
    let outcome = match body.status {
        FinishStatus::Success if body.error.is_some() => {
            return Err(Error::invalid("error", "is only for a failed build"));
        }
        FinishStatus::Success => Outcome::Success,
        FinishStatus::Canceled => Outcome::Canceled,
        FinishStatus::Failed => Outcome::Failed(
            body.error
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| "build failed".into()),
        ),
    };
    app.builds.finish(&principal, &id, outcome).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_steps(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json> {
    let page = app
        .builds
        .steps_page(
            &principal,
            None,
            &id,
            q.page_token.as_deref().unwrap_or_default(),
            q.page_size,
        )
        .await?;
    Ok(axum::Json(json!({
        "steps": page.steps,
        "next_page_token": page.next_page_token.unwrap_or_default(),
    })))
}

async fn list_step_logs(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path((id, digest)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json> {
    let page = app
        .builds
        .step_logs(
            &principal,
            None,
            &id,
            &digest,
            q.page_token.as_deref().unwrap_or_default(),
            q.page_size,
        )
        .await?;
    Ok(axum::Json(json!({
        "lines": page.lines,
        "next_page_token": page.next_page_token.unwrap_or_default(),
    })))
}

async fn share_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let path = app.builds.share(&principal, &id).await?;
    Ok(axum::Json(
        json!({ "share_url": app.config.public_link(&path) }),
    ))
}

async fn stop_sharing_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.builds.stop_sharing(&principal, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
