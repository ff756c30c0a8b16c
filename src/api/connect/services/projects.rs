//! `depot.cli.v1beta1.ProjectsService`, `depot.core.v1.ProjectService` and
//! `depot.core.v1.OrganizationService`.

//!
//! Translation only: each handler maps the request onto one domain call
//! (`crate::projects`, `crate::tokens`, `crate::orgs`, `crate::cache`) and the answer back.

use crate::api::connect::convert::to_timestamp;
use crate::api::connect::{Call, ConnectRouter, unary};
use crate::error::{Error, Result};
use crate::projects::trust::{TrustPolicy, TrustProvider};
use crate::projects::{Project, ProjectSettings};
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

/// An optional id: empty means "not given".
fn given(id: &str) -> Option<&str> {
    Some(id).filter(|s| !s.trim().is_empty())
}

async fn cli_list_projects(
    call: Call,
    _req: cli::ListProjectsRequest,
) -> Result<cli::ListProjectsResponse> {
    let principal = call.principal().await?;
    let projects = call.app.projects.summaries(&principal).await?;
    Ok(cli::ListProjectsResponse {
        projects: projects
            .into_iter()
            .map(|p| cli::list_projects_response::Project {
                id: p.id,
                name: p.name,
                org_id: p.organization_id,
                org_name: p.organization_name,
            })
            .collect(),
    })
}

async fn reset_project_cache(
    call: Call,
    req: cli::ResetProjectCacheRequest,
) -> Result<cli::ResetProjectCacheResponse> {
    let principal = call.principal().await?;
    let reset = call
        .app
        .cache
        .reset(&principal, given(&req.project_id))
        .await?;
    Ok(cli::ResetProjectCacheResponse {
        name: reset.project.name,
        org_name: reset.organization_name,
    })
}

async fn reset_project(
    call: Call,
    req: core::ResetProjectRequest,
) -> Result<core::ResetProjectResponse> {
    let principal = call.principal().await?;
    call.app
        .cache
        .reset(&principal, given(&req.project_id))
        .await?;
    Ok(core::ResetProjectResponse {})
}

async fn list_organizations(
    call: Call,
    _req: core::ListOrganizationsRequest,
) -> Result<core::ListOrganizationsResponse> {
    let principal = call.principal().await?;
    let orgs = call.app.orgs.list(&principal).await?;
    Ok(core::ListOrganizationsResponse {
        organizations: orgs
            .into_iter()
            .map(|o| core::list_organizations_response::Organization {
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

// keep_bytes is deprecated in the public API, but the depot CLI still sends and reads it.
#[allow(deprecated)]
fn to_core(p: Project) -> core::Project {
    core::Project {
        cache_policy: Some(core::CachePolicy {
            keep_bytes: Some(i64::from(p.cache_size_gb_amd64) * GIB),
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
#[allow(deprecated)]
fn policy_gb(policy: &core::CachePolicy) -> Result<Option<i32>> {
    let keep_bytes = policy.keep_bytes.unwrap_or(0);
    if keep_bytes < 0 || policy.keep_gb < 0 {
        return Err(Error::invalid("cache_policy", "sizes must not be negative"));
    }
    if policy.keep_gb > 0 {
        return Ok(Some(policy.keep_gb));
    }
    if keep_bytes == 0 {
        return Ok(None);
    }
    let gb = (keep_bytes + GIB - 1) / GIB;
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
    let list = call.app.projects.list(&principal, None).await?;
    Ok(core::ListProjectsResponse {
        projects: list.into_iter().map(to_core).collect(),
    })
}

async fn get_project(call: Call, req: core::GetProjectRequest) -> Result<core::GetProjectResponse> {
    let principal = call.principal().await?;
    let project = call
        .app
        .projects
        .get(&principal, given(&req.project_id))
        .await?;
    Ok(core::GetProjectResponse {
        project: Some(to_core(project)),
    })
}

async fn create_project(
    call: Call,
    req: core::CreateProjectRequest,
) -> Result<core::CreateProjectResponse> {
    let principal = call.principal().await?;
    let mut settings = ProjectSettings {
        name: Some(req.name.clone()),
        region: given(&req.region_id).map(str::to_string),
        ..Default::default()
    };
    apply_policy(&mut settings, req.cache_policy.as_ref())?;
    if let Some(hw) = req.hardware {
        settings.builder_size = builder_size(hw)?;
    }
    let project = call
        .app
        .projects
        .create(&principal, req.organization_id.as_deref(), settings)
        .await?;
    Ok(core::CreateProjectResponse {
        project: Some(to_core(project)),
    })
}

async fn update_project(
    call: Call,
    req: core::UpdateProjectRequest,
) -> Result<core::UpdateProjectResponse> {
    let principal = call.principal().await?;
    let mut settings = ProjectSettings {
        name: req.name.clone(),
        region: req.region_id.clone(),
        ..Default::default()
    };
    apply_policy(&mut settings, req.cache_policy.as_ref())?;
    if let Some(hw) = req.hardware {
        settings.builder_size = builder_size(hw)?;
    }
    let project = call
        .app
        .projects
        .update(&principal, given(&req.project_id), settings)
        .await?;
    Ok(core::UpdateProjectResponse {
        project: Some(to_core(project.project)),
    })
}

async fn delete_project(
    call: Call,
    req: core::DeleteProjectRequest,
) -> Result<core::DeleteProjectResponse> {
    let principal = call.principal().await?;
    call.app
        .projects
        .delete(&principal, given(&req.project_id))
        .await?;
    Ok(core::DeleteProjectResponse {})
}

fn to_trust_policy(policy: TrustPolicy) -> core::TrustPolicy {
    use core::trust_policy::{Buildkite, CircleCi, GitHub, GitLab, Provider};
    let provider = match policy.provider {
        TrustProvider::GitHub {
            repository_owner,
            repository,
            repository_id,
            issuer,
        } => Provider::Github(GitHub {
            repository_owner,
            repository,
            repository_id,
            issuer,
        }),
        TrustProvider::CircleCi {
            organization_uuid,
            project_uuid,
            issuer,
        } => Provider::Circleci(CircleCi {
            organization_uuid,
            project_uuid,
            issuer,
        }),
        TrustProvider::Buildkite {
            organization_slug,
            pipeline_slug,
            issuer,
        } => Provider::Buildkite(Buildkite {
            organization_slug,
            pipeline_slug,
            issuer,
        }),
        TrustProvider::GitLab {
            project_path,
            git_ref,
            issuer,
        } => Provider::Gitlab(GitLab {
            project_path,
            r#ref: git_ref,
            issuer,
        }),
    };
    core::TrustPolicy {
        trust_policy_id: policy.id,
        provider: Some(provider),
    }
}

async fn list_trust_policies(
    call: Call,
    req: core::ListTrustPoliciesRequest,
) -> Result<core::ListTrustPoliciesResponse> {
    let principal = call.principal().await?;
    let policies = call
        .app
        .projects
        .trust_policies(&principal, given(&req.project_id))
        .await?;
    Ok(core::ListTrustPoliciesResponse {
        trust_policies: policies.into_iter().map(to_trust_policy).collect(),
    })
}

async fn add_trust_policy(
    call: Call,
    req: core::AddTrustPolicyRequest,
) -> Result<core::AddTrustPolicyResponse> {
    use core::add_trust_policy_request::Provider;
    let principal = call.principal().await?;
    let provider = match req.provider {
        Some(Provider::Github(g)) => TrustProvider::GitHub {
            repository_owner: g.repository_owner,
            repository: g.repository,
            repository_id: g.repository_id,
            issuer: g.issuer,
        },
        Some(Provider::Circleci(c)) => TrustProvider::CircleCi {
            organization_uuid: c.organization_uuid,
            project_uuid: c.project_uuid,
            issuer: c.issuer,
        },
        Some(Provider::Buildkite(b)) => TrustProvider::Buildkite {
            organization_slug: b.organization_slug,
            pipeline_slug: b.pipeline_slug,
            issuer: b.issuer,
        },
        Some(Provider::Gitlab(g)) => TrustProvider::GitLab {
            project_path: g.project_path,
            git_ref: g.r#ref,
            issuer: g.issuer,
        },
        None => {
            return Err(Error::invalid(
                "provider",
                "set one of github, circleci, buildkite or gitlab",
            ));
        }
    };
    let policy = call
        .app
        .projects
        .add_trust_policy(&principal, given(&req.project_id), provider)
        .await?;
    Ok(core::AddTrustPolicyResponse {
        trust_policy: Some(to_trust_policy(policy)),
    })
}

async fn remove_trust_policy(
    call: Call,
    req: core::RemoveTrustPolicyRequest,
) -> Result<core::RemoveTrustPolicyResponse> {
    let principal = call.principal().await?;
    call.app
        .projects
        .remove_trust_policy(&principal, given(&req.project_id), &req.trust_policy_id)
        .await?;
    Ok(core::RemoveTrustPolicyResponse {})
}

async fn list_tokens(call: Call, req: core::ListTokensRequest) -> Result<core::ListTokensResponse> {
    let principal = call.principal().await?;
    let list = call
        .app
        .tokens
        .list_project_tokens(&principal, given(&req.project_id))
        .await?;
    Ok(core::ListTokensResponse {
        tokens: list
            .into_iter()
            .map(|t| core::list_tokens_response::Token {
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
    let (info, secret) = call
        .app
        .tokens
        .create_project_token(&principal, given(&req.project_id), &req.description, None)
        .await?;
    Ok(core::CreateTokenResponse {
        token_id: info.id,
        secret,
    })
}

async fn update_token(
    call: Call,
    req: core::UpdateTokenRequest,
) -> Result<core::UpdateTokenResponse> {
    let principal = call.principal().await?;
    call.app
        .tokens
        .rename(&principal, None, &req.token_id, &req.description)
        .await?;
    Ok(core::UpdateTokenResponse {})
}

async fn delete_token(
    call: Call,
    req: core::DeleteTokenRequest,
) -> Result<core::DeleteTokenResponse> {
    let principal = call.principal().await?;
    call.app
        .tokens
        .revoke(&principal, None, &req.token_id)
        .await?;
    Ok(core::DeleteTokenResponse {})
}
