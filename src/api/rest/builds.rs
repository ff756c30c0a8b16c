//! Builds over REST: a project's builds in pages, one build with its platforms and steps,
//! cancel, create one without a CLI and finish it, its steps and step logs in pages, and
//! share links. The same domain calls as `depot.build.v1.BuildService` and
//! `depot.core.v1.BuildService`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::PageQuery;
use crate::api::extract::{ApiJson, ApiQuery, Auth};
use crate::app::AppState;
use crate::builds::connection::{self, BuilderConnection};
use crate::builds::{BuildDetails, BuildSpec};
use crate::db::builds::{Build, LogLine, Outcome, Platform, StepRow};
use crate::error::{Error, ErrorBody, Result};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_project_builds, create_build))
        .routes(routes!(get_build))
        .routes(routes!(cancel_build))
        .routes(routes!(finish_build))
        .routes(routes!(list_steps))
        .routes(routes!(list_step_logs))
        .routes(routes!(share_build, stop_sharing_build))
        .routes(routes!(get_endpoint))
        .routes(routes!(report_health))
        .routes(routes!(release_endpoint))
}

type Json<T> = axum::Json<T>;

#[derive(Serialize, ToSchema)]
struct BuildPage {
    builds: Vec<Build>,
    next_page_token: String,
}

/// A project's builds, newest first.
#[utoipa::path(get, path = "/projects/{id}/builds", tag = "builds",
    params(("id" = String, Path, description = "Project id"), PageQuery),
    responses((status = 200, body = BuildPage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_project_builds(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<BuildPage>> {
    let page = app
        .builds
        .list(&principal, Some(&id), q.token(), q.page_size)
        .await?;
    Ok(axum::Json(BuildPage {
        builds: page.builds,
        next_page_token: page.next_page_token,
    }))
}

#[derive(Serialize, ToSchema)]
struct CreatedBuild {
    build: Build,
    /// A token for this build only: connect a BuildKit client through
    /// `depot.buildkit.v1.BuildKitService`, then finish the build with it.
    build_token: String,
}

/// Starts a build with no CLI attached, for clients that drive BuildKit themselves.
#[utoipa::path(post, path = "/projects/{id}/builds", tag = "builds",
    params(("id" = String, Path, description = "Project id")),
    responses((status = 201, body = CreatedBuild), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn create_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(project): Path<String>,
) -> Result<(StatusCode, Json<CreatedBuild>)> {
    let spec = BuildSpec::without_cli();
    let (build, build_token, _) = app.builds.create(&principal, Some(&project), spec).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedBuild { build, build_token }),
    ))
}

/// A build with its platforms and steps: the build insights.
#[utoipa::path(get, path = "/builds/{id}", tag = "builds",
    params(("id" = String, Path, description = "Build id")),
    responses((status = 200, body = BuildDetails), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<BuildDetails>> {
    Ok(axum::Json(app.builds.details(&principal, &id).await?))
}

#[derive(Serialize, ToSchema)]
struct Canceled {
    /// False if the build had already finished.
    canceled: bool,
}

/// Cancels a running build: the CLI stops it at its next health report (within ~5 s).
#[utoipa::path(post, path = "/builds/{id}/cancel", tag = "builds",
    params(("id" = String, Path, description = "Build id")),
    responses((status = 200, body = Canceled), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn cancel_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<Canceled>> {
    let canceled = app.builds.cancel(&principal, &id).await?;
    Ok(axum::Json(Canceled { canceled }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum FinishStatus {
    Success,
    Failed,
    Canceled,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct FinishBody {
    status: FinishStatus,
    /// Why a failed build failed.
    error: Option<String>,
}

/// Records a build's outcome (the first outcome wins) and releases its builders.
#[utoipa::path(post, path = "/builds/{id}/finish", tag = "builds",
    params(("id" = String, Path, description = "Build id")), request_body = FinishBody,
    responses((status = 204), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
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

#[derive(Serialize, ToSchema)]
struct StepPage {
    steps: Vec<StepRow>,
    next_page_token: String,
}

/// A build's steps, in the order BuildKit first reported them.
#[utoipa::path(get, path = "/builds/{id}/steps", tag = "builds",
    params(("id" = String, Path, description = "Build id"), PageQuery),
    responses((status = 200, body = StepPage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_steps(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<StepPage>> {
    let page = app
        .builds
        .steps_page(&principal, None, &id, q.token(), q.page_size)
        .await?;
    Ok(axum::Json(StepPage {
        steps: page.steps,
        next_page_token: page.next_page_token.unwrap_or_default(),
    }))
}

#[derive(Serialize, ToSchema)]
struct LogPage {
    lines: Vec<LogLine>,
    next_page_token: String,
}

/// One step's log lines, oldest first.
#[utoipa::path(get, path = "/builds/{id}/steps/{digest}/logs", tag = "builds",
    params(("id" = String, Path, description = "Build id"), ("digest" = String, Path, description = "Step digest"), PageQuery),
    responses((status = 200, body = LogPage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_step_logs(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path((id, digest)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<LogPage>> {
    let page = app
        .builds
        .step_logs(&principal, None, &id, &digest, q.token(), q.page_size)
        .await?;
    Ok(axum::Json(LogPage {
        lines: page.lines,
        next_page_token: page.next_page_token.unwrap_or_default(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PlatformQuery {
    /// `amd64` or `arm64`.
    platform: String,
}

fn platform(name: &str) -> Result<Platform> {
    Platform::parse(name).ok_or_else(|| Error::invalid("platform", "must be amd64 or arm64"))
}

/// Where to reach a build's BuildKit for one platform.
#[derive(Serialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Endpoint {
    /// The builder is still starting: ask again after `wait_ms`.
    Pending { wait_ms: u32 },
    /// Connect with mTLS: this client certificate and key, trusting `ca_cert`.
    Active {
        endpoint: String,
        server_name: String,
        cert: String,
        key: String,
        ca_cert: String,
    },
}

/// A BuildKit endpoint for one platform of a build (build tokens): held until the builder
/// is ready or the scheduler's wait runs out, then `active` or `pending`. The same path
/// as the depot CLI's GetBuildKitConnection and the public API's GetEndpoint.
#[utoipa::path(get, path = "/builds/{id}/endpoint", tag = "builds",
    params(("id" = String, Path, description = "Build id"), PlatformQuery),
    responses((status = 200, body = Endpoint), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_endpoint(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PlatformQuery>,
) -> Result<Json<Endpoint>> {
    let platform = platform(&q.platform)?;
    let connection = connection::get(
        &app.builds,
        &app.scheduler,
        &app.events,
        &principal,
        &id,
        platform,
    )
    .await?;
    Ok(axum::Json(match connection {
        BuilderConnection::Pending { wait_ms } => Endpoint::Pending { wait_ms },
        BuilderConnection::Active(a) => Endpoint::Active {
            endpoint: a.endpoint,
            server_name: a.server_name,
            cert: a.client_cert_pem,
            key: a.client_key_pem,
            ca_cert: a.ca_cert_pem,
        },
    }))
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// When the build must stop: its deadline, or now once it is finished or canceled.
    cancels_at: chrono::DateTime<chrono::Utc>,
}

/// Reports that the build's client is alive (build tokens); a build whose reports stop
/// is failed after `builds.health_timeout_seconds`.
#[utoipa::path(post, path = "/builds/{id}/health", tag = "builds",
    params(("id" = String, Path, description = "Build id")),
    responses((status = 200, body = Health), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn report_health(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<Health>> {
    let cancels_at = app.builds.report_health(&principal, &id).await?;
    Ok(axum::Json(Health { cancels_at }))
}

/// Gives one platform's builder back; the build goes on (build tokens).
#[utoipa::path(post, path = "/builds/{id}/release", tag = "builds",
    params(("id" = String, Path, description = "Build id"), PlatformQuery),
    responses((status = 204), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn release_endpoint(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PlatformQuery>,
) -> Result<StatusCode> {
    let platform = platform(&q.platform)?;
    connection::release(&app.builds, &principal, &id, platform).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct Shared {
    /// Readable by anyone with the link, without signing in, until sharing stops.
    share_url: String,
}

/// Shares a build: the same link each time until sharing stops.
#[utoipa::path(post, path = "/builds/{id}/share", tag = "builds",
    params(("id" = String, Path, description = "Build id")),
    responses((status = 200, body = Shared), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn share_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<Shared>> {
    let path = app.builds.share(&principal, &id).await?;
    Ok(axum::Json(Shared {
        share_url: app.config.public_link(&path),
    }))
}

/// Stops sharing a build: its link stops working for good.
#[utoipa::path(delete, path = "/builds/{id}/share", tag = "builds",
    params(("id" = String, Path, description = "Build id")),
    responses((status = 204), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn stop_sharing_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.builds.stop_sharing(&principal, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
