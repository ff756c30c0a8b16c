//! The JSON API under `/api/v1`, used by the dashboard and by scripts.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use chrono::{Duration, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::extract::{ApiJson, Auth};
use crate::app::AppState;
use crate::auth::{Action, Target, TokenKind, authorize, guard};
use crate::db::audit::{self, AuditEvent};
use crate::db::ids::is_well_formed;
use crate::db::orgs;
use crate::db::projects::{self, ProjectSettings};
use crate::db::tokens::{self, NewToken, TokenFilter};
use crate::error::{Error, Result};

pub fn routes() -> Router<AppState> {
    Router::new()
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
        .route("/projects/{id}/builds", get(list_project_builds))
        .route("/builds/{id}", get(get_build))
        .route("/builds/{id}/cancel", axum::routing::post(cancel_build))
}

type Json = axum::Json<Value>;

/// Who the token belongs to. Cheap: served from the token cache.
async fn me(Auth(principal): Auth) -> axum::Json<crate::auth::Principal> {
    axum::Json((*principal).clone())
}

async fn list_organizations(State(app): State<AppState>, Auth(principal): Auth) -> Result<Json> {
    let ids = principal.organization_ids();
    let orgs = orgs::list_organizations(&app.db, Some(&ids)).await?;
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
    guard::organization(&app.db, &principal, &id, Action::ViewAuditLog).await?;
    let events = audit::list(&app.db, Some(&id), q.limit.unwrap_or(100)).await?;
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
    let projects = projects::list(
        &app.db,
        &principal.project_reach(),
        q.organization_id.as_deref(),
    )
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
    let org = guard::pick_organization(&principal, body.organization_id.as_deref())?;
    authorize(
        &principal,
        Action::CreateProject,
        Target::Organization { id: &org },
    )?;
    let mut tx = app.db.begin().await?;
    let project = projects::create(&mut *tx, &org, body.settings).await?;
    audit::record(
        &mut *tx,
        AuditEvent::by("project.create", &principal)
            .org(&org)
            .target("project", &project.id)
            .details(json!({ "name": project.name })),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "project": project })),
    ))
}

async fn get_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let project = guard::project(&app.db, &principal, &id, Action::ViewProject).await?;
    Ok(axum::Json(json!({ "project": project })))
}

async fn update_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiJson(mut settings): ApiJson<ProjectSettings>,
) -> Result<Json> {
    settings.validate()?;
    let before = guard::project(&app.db, &principal, &id, Action::UpdateProject).await?;
    let project = projects::update(&app.db, &id, settings).await?;
    audit::record(
        &app.db,
        AuditEvent::by("project.update", &principal)
            .org(&project.organization_id)
            .target("project", &project.id)
            .details(json!({ "before": before, "after": project })),
    )
    .await?;
    Ok(axum::Json(json!({ "project": project })))
}

async fn delete_project(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let project = guard::project(&app.db, &principal, &id, Action::DeleteProject).await?;
    projects::delete(&app.db, &id).await?;
    audit::record(
        &app.db,
        AuditEvent::by("project.delete", &principal)
            .org(&project.organization_id)
            .target("project", &project.id)
            .details(json!({ "name": project.name })),
    )
    .await?;
    // Tokens of the project are gone with it (ON DELETE CASCADE); drop cached ones.
    app.auth.invalidate(None);
    Ok(StatusCode::NO_CONTENT)
}

async fn list_project_tokens(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    guard::project(&app.db, &principal, &id, Action::ManageProjectTokens).await?;
    let filter = TokenFilter {
        project_id: Some(id),
        ..Default::default()
    };
    let tokens = tokens::list(&app.db, &filter).await?;
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
    let project = guard::project(&app.db, &principal, &id, Action::ManageProjectTokens).await?;
    let expires_at = match body.expires_in_days {
        None => None,
        Some(days) if (1..=3650).contains(&days) => Some(Utc::now() + Duration::days(days)),
        Some(_) => {
            return Err(Error::invalid(
                "expires_in_days",
                "must be between 1 and 3650",
            ));
        }
    };
    let mut new = NewToken::new(TokenKind::Project, body.name);
    new.organization_id = Some(project.organization_id.clone());
    new.project_id = Some(project.id.clone());
    new.expires_at = expires_at;
    new.created_by = principal.user_id.clone();
    let mut tx = app.db.begin().await?;
    let (info, minted) = tokens::create(&mut *tx, new).await?;
    audit::record(
        &mut *tx,
        AuditEvent::by("token.create", &principal)
            .org(&project.organization_id)
            .target("token", &info.id)
            .details(json!({ "kind": "project", "project_id": project.id, "prefix": info.display_prefix })),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "token": info, "secret": minted.secret })),
    ))
}

async fn revoke_token(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    if !is_well_formed(&id) {
        return Err(Error::not_found("token", &id));
    }
    let info = tokens::get(&app.db, &id)
        .await?
        .ok_or_else(|| Error::not_found("token", &id))?;
    // A token is managed through what it is scoped to; a user may always revoke their own.
    let own = info.user_id.is_some()
        && info.user_id == principal.user_id
        && principal.kind == TokenKind::User;
    if !own {
        match (&info.project_id, &info.organization_id) {
            (Some(project), Some(org)) => authorize(
                &principal,
                Action::ManageProjectTokens,
                Target::Project {
                    id: project,
                    organization_id: org,
                },
            )?,
            (None, Some(org)) => authorize(
                &principal,
                Action::ManageOrganization,
                Target::Organization { id: org },
            )?,
            _ => return Err(Error::not_found("token", &id)),
        }
    }
    if let Some(hash) = tokens::revoke(&app.db, &id).await? {
        app.auth.invalidate(Some(&hash));
        let mut event = AuditEvent::by("token.revoke", &principal).target("token", &id);
        if let Some(org) = &info.organization_id {
            event = event.org(org);
        }
        audit::record(&app.db, event).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct BuildListQuery {
    limit: Option<i64>,
}

async fn list_project_builds(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Query(q): Query<BuildListQuery>,
) -> Result<Json> {
    let project = guard::project(&app.db, &principal, &id, Action::ViewBuild).await?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let builds = crate::db::builds::list(&app.db, &project.id, None, limit).await?;
    Ok(axum::Json(json!({ "builds": builds })))
}

/// A build with its platforms and steps: the build insights.
async fn get_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let build = app.builds.get(&principal, &id).await?;
    let platforms = crate::db::builds::platforms(&app.db, &id).await?;
    let steps = crate::db::builds::steps(&app.db, &id).await?;
    Ok(axum::Json(
        json!({ "build": build, "platforms": platforms, "steps": steps }),
    ))
}

/// Cancels a running build: the CLI stops it at its next health report (within ~5 s).
async fn cancel_build(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json> {
    let canceled = app.builds.cancel(&principal, &id).await?;
    if canceled {
        let build = app
            .builds
            .lookup(&id)
            .await?
            .ok_or_else(|| Error::not_found("build", &id))?;
        audit::record(
            &app.db,
            AuditEvent::by("build.cancel", &principal)
                .org(&build.organization_id)
                .target("build", &id),
        )
        .await?;
    }
    Ok(axum::Json(json!({ "canceled": canceled })))
}
