//! Projects: settings (guarded by ETag/If-Match), tokens, trust relationships, and their
//! layer-cache volumes.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiJson, ApiQuery, Auth};
use crate::app::AppState;
use crate::auth::trust::TrustProvider;
use crate::cache::VolumeView;
use crate::db::projects::Project;
use crate::db::tokens::TokenInfo;
use crate::error::{Error, ErrorBody, Result};
use crate::projects::ProjectSettings;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_projects, create_project))
        .routes(routes!(get_project, update_project, delete_project))
        .routes(routes!(list_project_tokens, create_project_token))
        .routes(routes!(rename_token, revoke_token))
        .routes(routes!(list_trust_policies, add_trust_policy))
        .routes(routes!(remove_trust_policy))
        .routes(routes!(get_project_cache))
        .routes(routes!(reset_project_cache))
        .routes(routes!(get_volume))
}

type Json<T> = axum::Json<T>;

#[derive(Serialize, ToSchema)]
struct Projects {
    projects: Vec<Project>,
    next_page_token: String,
}

#[derive(Serialize, ToSchema)]
struct ProjectReply {
    project: Project,
}

#[derive(Serialize, ToSchema)]
struct UpdatedProject {
    project: Project,
    /// What the change means, in words (a shrink waits for the next cache reset, …).
    notices: Vec<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ProjectListQuery {
    /// Only this organization's projects.
    organization_id: Option<String>,
    /// Rows per page: 1 to 1000 (default 100).
    #[param(minimum = 0, maximum = 1000)]
    page_size: Option<i64>,
    /// The `next_page_token` of the previous page; absent for the first page.
    page_token: Option<String>,
}

/// The projects the token can see, by name.
#[utoipa::path(get, path = "/projects", tag = "projects", params(ProjectListQuery),
    responses((status = 200, body = Projects), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_projects(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiQuery(q): ApiQuery<ProjectListQuery>,
) -> Result<Json<Projects>> {
    let (projects, next_page_token) = app
        .projects
        .list_page(
            &principal,
            q.organization_id.as_deref(),
            q.page_token.as_deref().unwrap_or_default(),
            q.page_size,
        )
        .await?;
    Ok(axum::Json(Projects {
        projects,
        next_page_token,
    }))
}

#[derive(Deserialize, ToSchema)]
struct CreateProjectBody {
    /// Required when the token's user belongs to several organizations.
    organization_id: Option<String>,
    #[serde(flatten)]
    settings: ProjectSettings,
}

#[utoipa::path(post, path = "/projects", tag = "projects", request_body = CreateProjectBody,
    responses((status = 201, body = ProjectReply), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn create_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiJson(body): ApiJson<CreateProjectBody>,
) -> Result<(StatusCode, Json<ProjectReply>)> {
    let project = app
        .projects
        .create(&principal, body.organization_id.as_deref(), body.settings)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(ProjectReply { project })))
}

/// A project's ETag: its settings version (strong; changes with every settings change).
fn project_etag(project: &Project) -> [(HeaderName, String); 1] {
    [(header::ETAG, format!("\"v{}\"", project.version))]
}

/// The versions an `If-Match` header names: `None` without the header or for `*`. An
/// entry that is not one of our ETags (weak ones included: If-Match compares strongly)
/// matches nothing.
fn if_match_versions(headers: &HeaderMap) -> Result<Option<Vec<i64>>> {
    let mut versions = Vec::new();
    let mut present = false;
    for value in headers.get_all(header::IF_MATCH) {
        present = true;
        let text = value
            .to_str()
            .map_err(|_| Error::invalid("If-Match", "is not ASCII"))?;
        for tag in text.split(',').map(str::trim) {
            if tag == "*" {
                return Ok(None);
            }
            if let Some(v) = tag
                .strip_prefix("\"v")
                .and_then(|t| t.strip_suffix('"'))
                .and_then(|t| t.parse::<i64>().ok())
            {
                versions.push(v);
            }
        }
    }
    Ok(present.then_some(versions))
}

/// A project, with its ETag for a later conditional update.
#[utoipa::path(get, path = "/projects/{id}", tag = "projects",
    params(("id" = String, Path, description = "Project id")),
    responses(
        (status = 200, body = ProjectReply, headers(("ETag" = String, description = "The settings version; send it back in If-Match"))),
        (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse> {
    let project = app.projects.get(&principal, Some(&id)).await?;
    Ok((project_etag(&project), axum::Json(ProjectReply { project })))
}

/// Changes settings. With `If-Match: <ETag of a GET>`, only if nobody changed the
/// project since (412 otherwise, and nothing changes).
#[utoipa::path(patch, path = "/projects/{id}", tag = "projects",
    params(("id" = String, Path, description = "Project id"),
           ("If-Match" = Option<String>, Header, description = "The ETag you read; the update fails with 412 if the project changed since")),
    request_body = ProjectSettings,
    responses(
        (status = 200, body = UpdatedProject, headers(("ETag" = String, description = "The new settings version"))),
        (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn update_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(settings): ApiJson<ProjectSettings>,
) -> Result<impl IntoResponse> {
    let expected = if_match_versions(&headers)?;
    let updated = app
        .projects
        .update_if_unchanged(&principal, Some(&id), settings, expected.as_deref())
        .await?;
    Ok((
        project_etag(&updated.project),
        axum::Json(UpdatedProject {
            project: updated.project,
            notices: updated.notices,
        }),
    ))
}

/// Deletes a project with its builds, tokens, trust relationships and cache.
#[utoipa::path(delete, path = "/projects/{id}", tag = "projects",
    params(("id" = String, Path, description = "Project id")),
    responses((status = 204), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn delete_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.projects.delete(&principal, Some(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct Tokens {
    tokens: Vec<TokenInfo>,
}

/// A project's tokens (never their secrets).
#[utoipa::path(get, path = "/projects/{id}/tokens", tag = "projects",
    params(("id" = String, Path, description = "Project id")),
    responses((status = 200, body = Tokens), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_project_tokens(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<Tokens>> {
    let tokens = app
        .tokens
        .list_project_tokens(&principal, Some(&id))
        .await?;
    Ok(axum::Json(Tokens { tokens }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTokenBody {
    name: String,
    /// Lifetime in days; absent: no expiry.
    expires_in_days: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct CreatedToken {
    token: TokenInfo,
    /// The token itself: shown once, never stored.
    secret: String,
}

#[utoipa::path(post, path = "/projects/{id}/tokens", tag = "projects",
    params(("id" = String, Path, description = "Project id")), request_body = CreateTokenBody,
    responses((status = 201, body = CreatedToken), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn create_project_token(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateTokenBody>,
) -> Result<(StatusCode, Json<CreatedToken>)> {
    let (token, secret) = app
        .tokens
        .create_project_token(&principal, Some(&id), &body.name, body.expires_in_days)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken { token, secret }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RenameTokenBody {
    name: String,
}

/// Renames a token (its description).
#[utoipa::path(patch, path = "/tokens/{id}", tag = "projects",
    params(("id" = String, Path, description = "Token id")), request_body = RenameTokenBody,
    responses((status = 204), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn rename_token(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RenameTokenBody>,
) -> Result<StatusCode> {
    app.tokens.rename(&principal, None, &id, &body.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/tokens/{id}", tag = "projects",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn revoke_token(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.tokens.revoke(&principal, None, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A trust relationship: which CI identity may build the project without a token.
#[derive(Serialize, ToSchema)]
struct TrustPolicyView {
    id: String,
    project_id: String,
    created_at: DateTime<Utc>,
    #[serde(flatten)]
    provider: TrustProvider,
}

impl From<crate::projects::trust::TrustPolicy> for TrustPolicyView {
    fn from(p: crate::projects::trust::TrustPolicy) -> Self {
        TrustPolicyView {
            id: p.id,
            project_id: p.project_id,
            created_at: p.created_at,
            provider: p.provider,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct TrustPolicies {
    trust_policies: Vec<TrustPolicyView>,
}

#[derive(Serialize, ToSchema)]
struct TrustPolicyReply {
    trust_policy: TrustPolicyView,
}

#[utoipa::path(get, path = "/projects/{id}/trust-policies", tag = "projects",
    params(("id" = String, Path, description = "Project id")),
    responses((status = 200, body = TrustPolicies), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_trust_policies(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<TrustPolicies>> {
    let policies = app.projects.trust_policies(&principal, Some(&id)).await?;
    Ok(axum::Json(TrustPolicies {
        trust_policies: policies.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(post, path = "/projects/{id}/trust-policies", tag = "projects",
    params(("id" = String, Path, description = "Project id")), request_body = TrustProvider,
    responses((status = 201, body = TrustPolicyReply), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn add_trust_policy(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiJson(provider): ApiJson<TrustProvider>,
) -> Result<(StatusCode, Json<TrustPolicyReply>)> {
    let policy = app
        .projects
        .add_trust_policy(&principal, Some(&id), provider)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TrustPolicyReply {
            trust_policy: policy.into(),
        }),
    ))
}

#[utoipa::path(delete, path = "/projects/{id}/trust-policies/{policy_id}", tag = "projects",
    params(("id" = String, Path, description = "Project id"), ("policy_id" = String, Path, description = "Trust policy id")),
    responses((status = 204), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn remove_trust_policy(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path((id, policy_id)): Path<(String, String)>,
) -> Result<StatusCode> {
    app.projects
        .remove_trust_policy(&principal, Some(&id), &policy_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct Volumes {
    volumes: Vec<VolumeView>,
}

/// The project's cache volumes: size, pending changes, usage.
#[utoipa::path(get, path = "/projects/{id}/cache", tag = "cache",
    params(("id" = String, Path, description = "Project id")),
    responses((status = 200, body = Volumes), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_project_cache(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<Volumes>> {
    let volumes = app.cache.list(&principal, Some(&id)).await?;
    Ok(axum::Json(Volumes { volumes }))
}

#[derive(Serialize, ToSchema)]
struct CacheResetReply {
    project_id: String,
    /// The project's cache generation from now on.
    generation: i32,
    /// False when the cache was not used since the last reset: nothing changed.
    took_effect: bool,
    /// Volumes retired by this reset (deleted once their builders let go).
    retired_volumes: Vec<String>,
}

/// Resets the project's cache: its builds start from an empty cache.
#[utoipa::path(post, path = "/projects/{id}/cache/reset", tag = "cache",
    params(("id" = String, Path, description = "Project id")),
    responses((status = 200, body = CacheResetReply), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn reset_project_cache(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<CacheResetReply>> {
    let reset = app.cache.reset(&principal, Some(&id)).await?;
    Ok(axum::Json(CacheResetReply {
        project_id: reset.project.id,
        generation: reset.generation,
        took_effect: reset.took_effect,
        retired_volumes: reset.retired,
    }))
}

#[derive(Serialize, ToSchema)]
struct VolumeReply {
    volume: VolumeView,
}

#[utoipa::path(get, path = "/volumes/{id}", tag = "cache",
    params(("id" = String, Path, description = "Volume id")),
    responses((status = 200, body = VolumeReply), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_volume(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<VolumeReply>> {
    let volume = app.cache.get(&principal, &id).await?;
    Ok(axum::Json(VolumeReply { volume }))
}
