//! Loading a resource and authorizing access to it in one step, so no caller can load
//! without deciding. Missing and unreachable resources look the same (`not_found`).

use sqlx::PgPool;

use super::authz::{Action, Target, authorize};
use super::principal::Principal;
use crate::db::ids::is_well_formed;
use crate::db::orgs::{self, Organization};
use crate::db::projects::{self, Project};
use crate::error::{Error, Result};

pub async fn project(
    pool: &PgPool,
    principal: &Principal,
    id: &str,
    action: Action,
) -> Result<Project> {
    if !is_well_formed(id) {
        return Err(Error::not_found("project", id));
    }
    let project = projects::get(pool, id)
        .await?
        .ok_or_else(|| Error::not_found("project", id))?;
    authorize(
        principal,
        action,
        Target::Project {
            id: &project.id,
            organization_id: &project.organization_id,
        },
    )?;
    Ok(project)
}

pub async fn organization(
    pool: &PgPool,
    principal: &Principal,
    id: &str,
    action: Action,
) -> Result<Organization> {
    if !is_well_formed(id) {
        return Err(Error::not_found("organization", id));
    }
    authorize(principal, action, Target::Organization { id })?;
    orgs::get_organization(pool, id)
        .await?
        .ok_or_else(|| Error::not_found("organization", id))
}

/// The organization a request means: the given one, or the caller's only one.
pub fn pick_organization(principal: &Principal, given: Option<&str>) -> Result<String> {
    if let Some(id) = given.filter(|s| !s.is_empty()) {
        return Ok(id.to_string());
    }
    let mut orgs = principal.organization_ids();
    match orgs.len() {
        1 => Ok(orgs.remove(0)),
        0 => Err(Error::PermissionDenied(
            "this token belongs to no organization".into(),
        )),
        _ => Err(Error::invalid(
            "organization_id",
            "you belong to several organizations; say which one (organization_id)",
        )),
    }
}
