//! Who you are, organizations, the audit log, and builder machines for operators.

use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiQuery, Auth};
use crate::app::AppState;
use crate::auth::Principal;
use crate::db::audit::AuditFilter;
use crate::db::machines::MachineInfo;
use crate::db::orgs::Organization;
use crate::error::{ErrorBody, Result};
use crate::orgs::AuditPage;
use chrono::{DateTime, Utc};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(list_organizations))
        .routes(routes!(list_audit_events))
        .routes(routes!(list_machines))
        .routes(routes!(list_organization_machines))
        .routes(routes!(drain_machine))
}

type Json<T> = axum::Json<T>;

/// Who the token belongs to. Cheap: served from the token cache.
#[utoipa::path(get, path = "/me", tag = "organizations",
    responses((status = 200, body = Principal), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn me(Auth(principal): Auth) -> Json<Principal> {
    axum::Json((*principal).clone())
}

#[derive(Serialize, ToSchema)]
struct Organizations {
    organizations: Vec<Organization>,
}

/// The organizations the token can see.
#[utoipa::path(get, path = "/organizations", tag = "organizations",
    responses((status = 200, body = Organizations), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_organizations(
    State(app): State<AppState>,
    Auth(principal): Auth,
) -> Result<Json<Organizations>> {
    let organizations = app.orgs.list(&principal).await?;
    Ok(axum::Json(Organizations { organizations }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// An action, such as `project.update`.
    action: Option<String>,
    /// What was acted on: its kind (`project`, `build`, `token`, …) and id.
    target_kind: Option<String>,
    target_id: Option<String>,
    /// Who acted: a user, token or operator id.
    actor_id: Option<String>,
    /// Events at or after this time (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Events before this time (RFC 3339).
    until: Option<DateTime<Utc>>,
    /// Rows per page: 1 to 1000 (default 100).
    #[param(minimum = 0, maximum = 1000)]
    page_size: Option<i64>,
    /// The `next_page_token` of the previous page; absent for the first page.
    page_token: Option<String>,
}

/// An organization's audit log, newest first (organization owners).
#[utoipa::path(get, path = "/organizations/{id}/audit-events", tag = "organizations",
    params(("id" = String, Path, description = "Organization id"), AuditQuery),
    responses((status = 200, body = AuditPage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_audit_events(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>> {
    let filter = AuditFilter {
        action: q.action,
        target_kind: q.target_kind,
        target_id: q.target_id,
        actor_id: q.actor_id,
        since: q.since,
        until: q.until,
    };
    let page = app
        .orgs
        .audit_events(
            &principal,
            Some(&id),
            &filter,
            q.page_token.as_deref().unwrap_or_default(),
            q.page_size,
        )
        .await?;
    Ok(axum::Json(page))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct MachineQuery {
    /// Only machines in this state; absent: every live machine.
    state: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Machines {
    machines: Vec<MachineInfo>,
}

/// Every live builder machine: state, project and age (operators and server admins).
#[utoipa::path(get, path = "/machines", tag = "operators", params(MachineQuery),
    responses((status = 200, body = Machines), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_machines(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiQuery(q): ApiQuery<MachineQuery>,
) -> Result<Json<Machines>> {
    let machines = app
        .scheduler
        .machines(&principal, q.state.as_deref())
        .await?;
    Ok(axum::Json(Machines { machines }))
}

/// Builder machines serving an organization's projects: state, project and age
/// (organization owners).
#[utoipa::path(get, path = "/organizations/{id}/machines", tag = "organizations",
    params(("id" = String, Path, description = "Organization id"), MachineQuery),
    responses((status = 200, body = Machines), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_organization_machines(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<MachineQuery>,
) -> Result<Json<Machines>> {
    let machines = app
        .scheduler
        .organization_machines(&principal, &id, q.state.as_deref())
        .await?;
    Ok(axum::Json(Machines { machines }))
}

#[derive(Serialize, ToSchema)]
struct Drained {
    /// False if the machine was in no state to drain (already draining, or gone).
    drained: bool,
}

/// Stops giving builds to a machine; it is terminated once its builds finish (operators,
/// and owners of the organization whose project it serves).
#[utoipa::path(post, path = "/machines/{id}/drain", tag = "operators",
    params(("id" = String, Path, description = "Machine id")),
    responses((status = 200, body = Drained), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn drain_machine(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Json<Drained>> {
    let drained = app.scheduler.drain(&principal, &id).await?;
    Ok(axum::Json(Drained { drained }))
}
