//! The JSON API under `/api/v1`, used by the dashboard and by scripts. Translation only:
//! each handler maps the request onto one domain call and the answer to JSON.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::extract::{ApiJson, ApiQuery, Auth};
use crate::app::AppState;
use crate::error::{Error, Result};
use crate::projects::ProjectSettings;

mod builds;
mod usage;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(builds::routes())
        .merge(usage::routes())
        .route("/me", get(me))
        .route("/organizations", get(list_organizations))
        .route("/organizations/{id}/audit-events", get(list_audit_events))
        .route("/projects", get(list_projects).post(create_project))
        .route(
            "/projects/{id}",
            get(get_project)
                .patch(update_project)
                .delete(delete_project),
        )
        .route(
            "/projects/{id}/tokens",
            get(list_project_tokens).post(create_project_token),
        )
        .route("/tokens/{id}", delete(revoke_token))
        .route(
            "/projects/{id}/trust-policies",
            get(list_trust_policies).post(add_trust_policy),
        )
        .route(
            "/projects/{id}/trust-policies/{policy_id}",
            delete(remove_trust_policy),
        )
        .route(
            "/projects/{id}/builds",
            get(list_project_builds).post(builds::create_build),
        )
        .route("/projects/{id}/cache", get(get_project_cache))
        .route(
            "/projects/{id}/cache/reset",
            axum::routing::post(reset_project_cache),
        )
        .route("/volumes/{id}", get(get_volume))
        .route("/builds/{id}", get(get_build))
        .route("/builds/{id}/cancel", axum::routing::post(cancel_build))
}

type Json = axum::Json<Value>;

/// Who the token belongs to. Cheap: served from the token cache.
async fn me(Auth(principal): Auth) -> axum::Json<crate::auth::Principal> {
    axum::Json((*principal).clone())
}

async fn list_organizations(State(app): State<AppState>, Auth(principal): Auth) -> Result<Json> {
    let orgs = app.orgs.list(&principal).await?;
    Ok(axum::Json(json!({ "organizations": orgs })))
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

async fn list_audit_events(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Query(q): Query<AuditQuery>,
) -> Result<Json> {
    let events = app
        .orgs
        .audit_events(&principal, Some(&id), q.limit.unwrap_or(100))
        .await?;
    Ok(axum::Json(json!({ "events": events })))
}

#[derive(Deserialize)]
struct ProjectListQuery {
    organization_id: Option<String>,
}

async fn list_projects(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Query(q): Query<ProjectListQuery>,
) -> Result<Json> {
    let projects = app
        .projects
        .list(&principal, q.organization_id.as_deref())
        .await?;
    Ok(axum::Json(json!({ "projects": projects })))
}

#[derive(Deserialize)]
struct CreateProjectBody {
    organization_id: Option<String>,
    #[serde(flatten)]
    settings: ProjectSettings,
}

async fn create_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiJson(body): ApiJson<CreateProjectBody>,
) -> Result<(StatusCode, Json)> {
    let project = app
        .projects
        .create(&principal, body.organization_id.as_deref(), body.settings)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "project": project })),
    ))
}

/// A project's ETag: its settings version (strong; changes with every settings change).
fn project_etag(project: &crate::db::projects::Project) -> [(HeaderName, String); 1] {
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

async fn get_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse> {
    let project = app.projects.get(&principal, Some(&id)).await?;
    Ok((
        project_etag(&project),
        axum::Json(json!({ "project": project })),
    ))
}

/// Changes settings. With `If-Match: <ETag of a GET>`, only if nobody changed the
/// project since (412 otherwise, and nothing changes).
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
        axum::Json(json!({ "project": updated.project, "notices": updated.notices })),
    ))
}

/// The project's cache volumes: size, pending changes, usage.
async fn get_project_cache(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let volumes = app.cache.list(&principal, Some(&id)).await?;
    Ok(axum::Json(json!({ "volumes": volumes })))
}

async fn reset_project_cache(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let reset = app.cache.reset(&principal, Some(&id)).await?;
    Ok(axum::Json(json!({
        "project_id": reset.project.id,
        "generation": reset.generation,
        "took_effect": reset.took_effect,
        "retired_volumes": reset.retired,
    })))
}

async fn get_volume(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let volume = app.cache.get(&principal, &id).await?;
    Ok(axum::Json(json!({ "volume": volume })))
}

async fn delete_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.projects.delete(&principal, Some(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_project_tokens(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let tokens = app
        .tokens
        .list_project_tokens(&principal, Some(&id))
        .await?;
    Ok(axum::Json(json!({ "tokens": tokens })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTokenBody {
    name: String,
    expires_in_days: Option<i64>,
}

async fn create_project_token(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateTokenBody>,
) -> Result<(StatusCode, Json)> {
    let (info, secret) = app
        .tokens
        .create_project_token(&principal, Some(&id), &body.name, body.expires_in_days)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "token": info, "secret": secret })),
    ))
}

async fn revoke_token(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    app.tokens.revoke(&principal, None, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_project_builds(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<builds::PageQuery>,
) -> Result<Json> {
    let page = app
        .builds
        .list(
            &principal,
            Some(&id),
            q.page_token.as_deref().unwrap_or_default(),
            q.page_size,
        )
        .await?;
    Ok(axum::Json(
        json!({ "builds": page.builds, "next_page_token": page.next_page_token }),
    ))
}

/// A build with its platforms and steps: the build insights.
async fn get_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let details = app.builds.details(&principal, &id).await?;
    Ok(axum::Json(json!(details)))
}

/// Cancels a running build: the CLI stops it at its next health report (within ~5 s).
async fn cancel_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let canceled = app.builds.cancel(&principal, &id).await?;
    Ok(axum::Json(json!({ "canceled": canceled })))
}

fn trust_policy_json(policy: crate::projects::trust::TrustPolicy) -> Value {
    let mut value = serde_json::to_value(&policy.provider).unwrap_or_else(|_| json!({}));
    if let Some(map) = value.as_object_mut() {
        map.insert("id".into(), json!(policy.id));
        map.insert("project_id".into(), json!(policy.project_id));
        map.insert("created_at".into(), json!(policy.created_at));
    }
    value
}

async fn list_trust_policies(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let policies = app.projects.trust_policies(&principal, Some(&id)).await?;
    Ok(axum::Json(json!({
        "trust_policies": policies.into_iter().map(trust_policy_json).collect::<Vec<_>>()
    })))
}

async fn add_trust_policy(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiJson(provider): ApiJson<crate::auth::trust::TrustProvider>,
) -> Result<(StatusCode, Json)> {
    let policy = app
        .projects
        .add_trust_policy(&principal, Some(&id), provider)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "trust_policy": trust_policy_json(policy) })),
    ))
}

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
