//! `depot.cli.v1beta1.ProjectsService`, `depot.core.v1.ProjectService` and
//! `depot.core.v1.OrganizationService`.

use chrono::{Duration, Utc};
use serde_json::json;

use crate::api::connect::{Call, ConnectRouter, unary};
use crate::auth::{Action, Target, TokenKind, authorize, guard};
use crate::builds::to_timestamp;
use crate::db::audit::{self, AuditEvent};
use crate::db::ids::new_id;
use crate::db::orgs;
use crate::db::projects::{self, Project, ProjectSettings};
use crate::db::tokens::{self, NewToken, TokenFilter};
use crate::error::{Error, Result};
use crate::proto::depot::cli::v1beta1 as cli;
use crate::proto::depot::core::v1 as core;

const GIB: i64 = 1 << 30;

pub fn register(router: &mut ConnectRouter) {
    router
        .register(
            "depot.cli.v1beta1.ProjectsService",
            "ListProjects",
            unary(cli_list_projects),
        )
        .register(
            "depot.cli.v1beta1.ProjectsService",
            "ResetProjectCache",
            unary(reset_project_cache),
        )
        .register(
            "depot.core.v1.OrganizationService",
            "ListOrganizations",
            unary(list_organizations),
        )
        .register(
            "depot.core.v1.ProjectService",
            "ListProjects",
            unary(list_projects),
        )
        .register(
            "depot.core.v1.ProjectService",
            "GetProject",
            unary(get_project),
        )
        .register(
            "depot.core.v1.ProjectService",
            "CreateProject",
            unary(create_project),
        )
        .register(
            "depot.core.v1.ProjectService",
            "UpdateProject",
            unary(update_project),
        )
        .register(
            "depot.core.v1.ProjectService",
            "DeleteProject",
            unary(delete_project),
        )
        .register(
            "depot.core.v1.ProjectService",
            "ResetProject",
            unary(reset_project),
        )
        .register(
            "depot.core.v1.ProjectService",
            "ListTrustPolicies",
            unary(list_trust_policies),
        )
        .register(
            "depot.core.v1.ProjectService",
            "AddTrustPolicy",
            unary(add_trust_policy),
        )
        .register(
            "depot.core.v1.ProjectService",
            "RemoveTrustPolicy",
            unary(remove_trust_policy),
        )
        .register(
            "depot.core.v1.ProjectService",
            "ListTokens",
            unary(list_tokens),
        )
        .register(
            "depot.core.v1.ProjectService",
            "CreateToken",
            unary(create_token),
        )
        .register(
            "depot.core.v1.ProjectService",
            "UpdateToken",
            unary(update_token),
        )
        .register(
            "depot.core.v1.ProjectService",
            "DeleteToken",
            unary(delete_token),
        );
}

async fn cli_list_projects(
    call: Call,
    _req: cli::ListProjectsRequest,
) -> Result<cli::ListProjectsResponse> {
    let principal = call.principal().await?;
    let db = &call.app.db;
    let projects = projects::list(db, &principal.project_reach(), None).await?;
    let orgs = orgs::list_organizations(db, Some(&principal.organization_ids())).await?;
    let org_name = |id: &str| {
        orgs.iter()
            .find(|o| o.id == id)
            .map(|o| o.name.clone())
            .unwrap_or_default()
    };
    Ok(cli::ListProjectsResponse {
        projects: projects
            .into_iter()
            .map(|p| cli::list_projects_response::Project {
                org_name: org_name(&p.organization_id),
                id: p.id,
                name: p.name,
                org_id: p.organization_id,
            })
            .collect(),
    })
}

async fn reset_project_cache(
    call: Call,
    req: cli::ResetProjectCacheRequest,
) -> Result<cli::ResetProjectCacheResponse> {
    let principal = call.principal().await?;
    let project = project_for(&call, &principal, &req.project_id, Action::ResetCache).await?;
    crate::cache::reset(&call.app.db, &principal, &project).await?;
    let org = orgs::get_organization(&call.app.db, &project.organization_id).await?;
    Ok(cli::ResetProjectCacheResponse {
        name: project.name,
        org_name: org.map(|o| o.name).unwrap_or_default(),
    })
}

async fn reset_project(
    call: Call,
    req: core::ResetProjectRequest,
) -> Result<core::ResetProjectResponse> {
    let principal = call.principal().await?;
    let project = project_for(&call, &principal, &req.project_id, Action::ResetCache).await?;
    crate::cache::reset(&call.app.db, &principal, &project).await?;
    Ok(core::ResetProjectResponse {})
}

/// Loads and authorizes a project; an empty id uses the token's own project.
async fn project_for(
    call: &Call,
    principal: &crate::auth::Principal,
    id: &str,
    action: Action,
) -> Result<Project> {
    let id = match (id.trim(), &principal.project_id) {
        ("", Some(own)) => own.clone(),
        ("", None) => {
            return Err(Error::invalid(
                "project_id",
                "is required; pass --project <id>",
            ));
        }
        (id, _) => id.to_string(),
    };
    guard::project(&call.app.db, principal, &id, action).await
}

async fn list_organizations(
    call: Call,
    _req: core::ListOrganizationsRequest,
) -> Result<core::ListOrganizationResponse> {
    let principal = call.principal().await?;
    let orgs = orgs::list_organizations(&call.app.db, Some(&principal.organization_ids())).await?;
    Ok(core::ListOrganizationResponse {
        organizations: orgs
            .into_iter()
            .map(|o| core::list_organization_response::Organization {
                org_id: o.id,
                name: o.name,
                created_at: Some(to_timestamp(o.created_at)),
            })
            .collect(),
    })
}

fn hardware(size: &str) -> i32 {
    match size {
        "32x64" => core::Hardware::Hardware32x64 as i32,
        "64x128" => core::Hardware::Hardware64x128 as i32,
        _ => core::Hardware::Hardware16x32 as i32,
    }
}

fn builder_size(hardware: i32) -> Result<Option<String>> {
    match core::Hardware::try_from(hardware) {
        Ok(core::Hardware::Unspecified) => Ok(None),
        Ok(core::Hardware::Hardware16x32) => Ok(Some("16x32".into())),
        Ok(core::Hardware::Hardware32x64) => Ok(Some("32x64".into())),
        Ok(core::Hardware::Hardware64x128) => Ok(Some("64x128".into())),
        _ => Err(Error::invalid(
            "hardware",
            "must be HARDWARE_16X32, HARDWARE_32X64 or HARDWARE_64X128",
        )),
    }
}

fn to_core(p: Project) -> core::Project {
    core::Project {
        cache_policy: Some(core::CachePolicy {
            keep_bytes: i64::from(p.cache_size_gb_amd64) * GIB,
            keep_days: p.cache_retention_days,
            keep_gb: p.cache_size_gb_amd64,
        }),
        hardware: hardware(&p.builder_size),
        created_at: Some(to_timestamp(p.created_at)),
        project_id: p.id,
        organization_id: p.organization_id,
        name: p.name,
        region_id: p.region,
    }
}

/// A cache policy's size in whole GB (keep_gb wins; keep_bytes rounds up).
fn policy_gb(policy: &core::CachePolicy) -> Result<Option<i32>> {
    if policy.keep_gb > 0 {
        return Ok(Some(policy.keep_gb));
    }
    if policy.keep_bytes < 0 || policy.keep_gb < 0 {
        return Err(Error::invalid("cache_policy", "sizes must not be negative"));
    }
    if policy.keep_bytes == 0 {
        return Ok(None);
    }
    let gb = (policy.keep_bytes + GIB - 1) / GIB;
    i32::try_from(gb)
        .map(Some)
        .map_err(|_| Error::invalid("cache_policy.keep_bytes", "is too large"))
}

fn apply_policy(settings: &mut ProjectSettings, policy: Option<&core::CachePolicy>) -> Result<()> {
    if let Some(policy) = policy {
        if let Some(gb) = policy_gb(policy)? {
            settings.cache_size_gb_amd64 = Some(gb);
            settings.cache_size_gb_arm64 = Some(gb);
        }
        if policy.keep_days != 0 {
            settings.cache_retention_days = Some(policy.keep_days);
        }
    }
    Ok(())
}

async fn list_projects(
    call: Call,
    _req: core::ListProjectsRequest,
) -> Result<core::ListProjectsResponse> {
    let principal = call.principal().await?;
    let list = projects::list(&call.app.db, &principal.project_reach(), None).await?;
    Ok(core::ListProjectsResponse {
        projects: list.into_iter().map(to_core).collect(),
    })
}

async fn get_project(call: Call, req: core::GetProjectRequest) -> Result<core::GetProjectResponse> {
    let principal = call.principal().await?;
    let project = project_for(&call, &principal, &req.project_id, Action::ViewProject).await?;
    Ok(core::GetProjectResponse {
        project: Some(to_core(project)),
    })
}

async fn create_project(
    call: Call,
    req: core::CreateProjectRequest,
) -> Result<core::CreateProjectResponse> {
    let principal = call.principal().await?;
    let org = guard::pick_organization(&principal, req.organization_id.as_deref())?;
    authorize(
        &principal,
        Action::CreateProject,
        Target::Organization { id: &org },
    )?;
    let mut settings = ProjectSettings {
        name: Some(req.name.clone()),
        region: (!req.region_id.is_empty()).then(|| req.region_id.clone()),
        ..Default::default()
    };
    apply_policy(&mut settings, req.cache_policy.as_ref())?;
    if let Some(hw) = req.hardware {
        settings.builder_size = builder_size(hw)?;
    }
    let mut tx = call.app.db.begin().await?;
    let project = projects::create(&mut *tx, &org, settings).await?;
    audit::record(
        &mut *tx,
        AuditEvent::by("project.create", &principal)
            .org(&org)
            .target("project", &project.id)
            .details(json!({"name": project.name})),
    )
    .await?;
    tx.commit().await?;
    Ok(core::CreateProjectResponse {
        project: Some(to_core(project)),
    })
}

async fn update_project(
    call: Call,
    req: core::UpdateProjectRequest,
) -> Result<core::UpdateProjectResponse> {
    let principal = call.principal().await?;
    let before = project_for(&call, &principal, &req.project_id, Action::UpdateProject).await?;
    let mut settings = ProjectSettings {
        name: req.name.clone(),
        region: req.region_id.clone(),
        ..Default::default()
    };
    apply_policy(&mut settings, req.cache_policy.as_ref())?;
    if let Some(hw) = req.hardware {
        settings.builder_size = builder_size(hw)?;
    }
    let project = projects::update(&call.app.db, &before.id, settings).await?;
    audit::record(
        &call.app.db,
        AuditEvent::by("project.update", &principal)
            .org(&project.organization_id)
            .target("project", &project.id)
            .details(json!({"before": before, "after": project})),
    )
    .await?;
    Ok(core::UpdateProjectResponse {
        project: Some(to_core(project)),
    })
}

async fn delete_project(
    call: Call,
    req: core::DeleteProjectRequest,
) -> Result<core::DeleteProjectResponse> {
    let principal = call.principal().await?;
    let project = project_for(&call, &principal, &req.project_id, Action::DeleteProject).await?;
    projects::delete(&call.app.db, &project.id).await?;
    audit::record(
        &call.app.db,
        AuditEvent::by("project.delete", &principal)
            .org(&project.organization_id)
            .target("project", &project.id)
            .details(json!({"name": project.name})),
    )
    .await?;
    call.app.auth.invalidate(None);
    Ok(core::DeleteProjectResponse {})
}

#[derive(sqlx::FromRow)]
struct TrustPolicyRow {
    id: String,
    provider: String,
    claims: serde_json::Value,
}

fn claim(claims: &serde_json::Value, key: &str) -> String {
    claims
        .get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

fn to_trust_policy(row: TrustPolicyRow) -> core::TrustPolicy {
    use core::trust_policy::{Buildkite, CircleCi, GitHub, GitLab, Provider};
    let c = &row.claims;
    let provider = match row.provider.as_str() {
        "github" => Provider::Github(GitHub {
            repository_owner: claim(c, "repository_owner"),
            repository: claim(c, "repository"),
        }),
        "circleci" => Provider::Circleci(CircleCi {
            organization_uuid: claim(c, "organization_uuid"),
            project_uuid: claim(c, "project_uuid"),
        }),
        "buildkite" => Provider::Buildkite(Buildkite {
            organization_slug: claim(c, "organization_slug"),
            pipeline_slug: claim(c, "pipeline_slug"),
        }),
        _ => Provider::Gitlab(GitLab {
            project_path: claim(c, "project_path"),
            r#ref: claim(c, "ref"),
        }),
    };
    core::TrustPolicy {
        trust_policy_id: row.id,
        provider: Some(provider),
    }
}

fn required(field: &str, value: &str) -> Result<String> {
    let value = value.trim();
    if value.is_empty() || value.len() > 200 || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "must be 1 to 200 printable characters",
        ));
    }
    Ok(value.to_string())
}

async fn list_trust_policies(
    call: Call,
    req: core::ListTrustPoliciesRequest,
) -> Result<core::ListTrustPoliciesResponse> {
    let principal = call.principal().await?;
    let project = project_for(&call, &principal, &req.project_id, Action::ViewProject).await?;
    let rows: Vec<TrustPolicyRow> = sqlx::query_as(
        "SELECT id, provider, claims FROM trust_policies WHERE project_id = $1 ORDER BY created_at",
    )
    .bind(&project.id)
    .fetch_all(&call.app.db)
    .await?;
    Ok(core::ListTrustPoliciesResponse {
        trust_policies: rows.into_iter().map(to_trust_policy).collect(),
    })
}

async fn add_trust_policy(
    call: Call,
    req: core::AddTrustPolicyRequest,
) -> Result<core::AddTrustPolicyResponse> {
    use core::add_trust_policy_request::Provider;
    let principal = call.principal().await?;
    let project = project_for(&call, &principal, &req.project_id, Action::UpdateProject).await?;
    let (provider, claims) = match req.provider {
        Some(Provider::Github(g)) => (
            "github",
            json!({"repository_owner": required("github.repository_owner", &g.repository_owner)?, "repository": required("github.repository", &g.repository)?}),
        ),
        Some(Provider::Circleci(c)) => (
            "circleci",
            json!({"organization_uuid": required("circleci.organization_uuid", &c.organization_uuid)?, "project_uuid": required("circleci.project_uuid", &c.project_uuid)?}),
        ),
        Some(Provider::Buildkite(b)) => (
            "buildkite",
            json!({"organization_slug": required("buildkite.organization_slug", &b.organization_slug)?, "pipeline_slug": required("buildkite.pipeline_slug", &b.pipeline_slug)?}),
        ),
        Some(Provider::Gitlab(g)) => (
            "gitlab",
            json!({"project_path": required("gitlab.project_path", &g.project_path)?, "ref": g.r#ref.trim()}),
        ),
        None => {
            return Err(Error::invalid(
                "provider",
                "set one of github, circleci, buildkite or gitlab",
            ));
        }
    };
    let row: TrustPolicyRow = sqlx::query_as(
        "INSERT INTO trust_policies (id, project_id, provider, claims) VALUES ($1, $2, $3, $4) RETURNING id, provider, claims",
    )
    .bind(new_id())
    .bind(&project.id)
    .bind(provider)
    .bind(&claims)
    .fetch_one(&call.app.db)
    .await?;
    audit::record(
        &call.app.db,
        AuditEvent::by("trust_policy.add", &principal)
            .org(&project.organization_id)
            .target("trust_policy", &row.id)
            .details(json!({"project_id": project.id, "provider": provider, "claims": claims})),
    )
    .await?;
    Ok(core::AddTrustPolicyResponse {
        trust_policy: Some(to_trust_policy(row)),
    })
}

async fn remove_trust_policy(
    call: Call,
    req: core::RemoveTrustPolicyRequest,
) -> Result<core::RemoveTrustPolicyResponse> {
    let principal = call.principal().await?;
    let project = project_for(&call, &principal, &req.project_id, Action::UpdateProject).await?;
    let removed = sqlx::query("DELETE FROM trust_policies WHERE id = $1 AND project_id = $2")
        .bind(&req.trust_policy_id)
        .bind(&project.id)
        .execute(&call.app.db)
        .await?
        .rows_affected();
    if removed == 0 {
        return Err(Error::not_found("trust policy", &req.trust_policy_id));
    }
    audit::record(
        &call.app.db,
        AuditEvent::by("trust_policy.remove", &principal)
            .org(&project.organization_id)
            .target("trust_policy", &req.trust_policy_id),
    )
    .await?;
    Ok(core::RemoveTrustPolicyResponse {})
}

async fn list_tokens(call: Call, req: core::ListTokensRequest) -> Result<core::ListTokensResponse> {
    let principal = call.principal().await?;
    let project = project_for(
        &call,
        &principal,
        &req.project_id,
        Action::ManageProjectTokens,
    )
    .await?;
    let filter = TokenFilter {
        project_id: Some(project.id),
        ..Default::default()
    };
    let list = tokens::list(&call.app.db, &filter).await?;
    Ok(core::ListTokensResponse {
        tokens: list
            .into_iter()
            .filter(|t| t.kind == "project")
            .map(|t| core::Token {
                token_id: t.id,
                description: t.name,
                created_at: Some(to_timestamp(t.created_at)),
                expires_at: t.expires_at.map(to_timestamp),
                last_used_at: t.last_used_at.map(to_timestamp),
                prefix: t.display_prefix,
            })
            .collect(),
    })
}

async fn create_token(
    call: Call,
    req: core::CreateTokenRequest,
) -> Result<core::CreateTokenResponse> {
    let principal = call.principal().await?;
    let project = project_for(
        &call,
        &principal,
        &req.project_id,
        Action::ManageProjectTokens,
    )
    .await?;
    let mut new = NewToken::new(TokenKind::Project, req.description.trim());
    new.organization_id = Some(project.organization_id.clone());
    new.project_id = Some(project.id.clone());
    new.created_by = principal.user_id.clone();
    let mut tx = call.app.db.begin().await?;
    let (info, minted) = tokens::create(&mut *tx, new).await?;
    audit::record(
        &mut *tx,
        AuditEvent::by("token.create", &principal)
            .org(&project.organization_id)
            .target("token", &info.id)
            .details(
                json!({"kind": "project", "project_id": project.id, "prefix": info.display_prefix}),
            ),
    )
    .await?;
    tx.commit().await?;
    Ok(core::CreateTokenResponse {
        token_id: info.id,
        secret: minted.secret,
    })
}

/// Authenticates the call, authorizes token management on the project, and loads one
/// of its project tokens.
async fn project_token(
    call: &Call,
    project_id: &str,
    token_id: &str,
) -> Result<(
    std::sync::Arc<crate::auth::Principal>,
    Project,
    tokens::TokenInfo,
)> {
    let principal = call.principal().await?;
    let project = project_for(call, &principal, project_id, Action::ManageProjectTokens).await?;
    let token = tokens::get(&call.app.db, token_id)
        .await?
        .filter(|t| t.project_id.as_deref() == Some(project.id.as_str()) && t.kind == "project")
        .ok_or_else(|| Error::not_found("token", token_id))?;
    Ok((principal, project, token))
}

async fn update_token(
    call: Call,
    req: core::UpdateTokenRequest,
) -> Result<core::UpdateTokenResponse> {
    let (_, _, token) = project_token(&call, &req.project_id, &req.token_id).await?;
    let name: String = req.description.trim().chars().take(100).collect();
    sqlx::query("UPDATE tokens SET name = $2 WHERE id = $1")
        .bind(&token.id)
        .bind(&name)
        .execute(&call.app.db)
        .await?;
    Ok(core::UpdateTokenResponse {})
}

async fn delete_token(
    call: Call,
    req: core::DeleteTokenRequest,
) -> Result<core::DeleteTokenResponse> {
    let (principal, project, token) = project_token(&call, &req.project_id, &req.token_id).await?;
    if let Some(hash) = tokens::revoke(&call.app.db, &token.id).await? {
        call.app.auth.invalidate(Some(&hash));
        audit::record(
            &call.app.db,
            AuditEvent::by("token.revoke", &principal)
                .org(&project.organization_id)
                .target("token", &token.id),
        )
        .await?;
    }
    Ok(core::DeleteTokenResponse {})
}

/// Expiry of pull tokens minted for `depot pull-token`.
pub fn pull_token_expiry(ttl_seconds: u64) -> chrono::DateTime<Utc> {
    Utc::now() + Duration::seconds(ttl_seconds as i64)
}
