//! Projects and their settings: the one implementation of each project operation.
//!
//! REST, Connect and `kiln admin` call these with the caller's principal. Each one
//! authorizes through `auth::authz`, validates, and writes together with its audit entry
//! (and any NOTIFY) in one transaction, so a failed audit insert undoes the write.

pub mod trust;

use std::sync::Arc;

use serde_json::json;
use sqlx::{PgConnection, PgPool};

use crate::auth::authz::{self, Action, Target, Visible};
use crate::auth::ci;
use crate::auth::{Authenticator, INVALIDATE_ALL, INVALIDATION_CHANNEL, Principal};
use crate::cache::Cache;
use crate::db::ids::is_well_formed;
use crate::db::projects::{self as rows, ProjectFilter};
use crate::db::{audit, notify};
use crate::error::{Error, Result};

pub use crate::db::projects::{
    DEFAULT_CACHE_SIZE_GB, Project, ProjectOverview, ProjectSettings, ProjectSummary,
};

pub const BUILDER_SIZES: [&str; 3] = ["16x32", "32x64", "64x128"];

/// Live machine states (see `crate::scheduler`).
const LIVE_MACHINE_STATES: &str =
    "('requested', 'launching', 'booting', 'ready', 'assigned', 'draining')";

fn in_range(field: &str, value: Option<i32>, min: i32, max: i32) -> Result<()> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(Error::invalid(
            field,
            format!("must be between {min} and {max}, got {v}"),
        )),
        _ => Ok(()),
    }
}

/// Checks every setting before anything is written, so bad input changes nothing.
/// Normalizes the name (trimmed).
pub fn validate(settings: &mut ProjectSettings) -> Result<()> {
    if let Some(name) = &settings.name {
        settings.name = Some(crate::orgs::validate_name("name", name)?);
    }
    if let Some(region) = &settings.region {
        let ok = !region.is_empty()
            && region.len() <= 32
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(Error::invalid("region", "must look like us-east-1"));
        }
    }
    in_range(
        "cache_retention_days",
        settings.cache_retention_days,
        1,
        365,
    )?;
    in_range(
        "build_timeout_minutes",
        settings.build_timeout_minutes,
        1,
        1440,
    )?;
    in_range(
        "autoscaling_builds_per_builder",
        settings.autoscaling_builds_per_builder,
        1,
        100,
    )?;
    in_range(
        "autoscaling_max_builders",
        settings.autoscaling_max_builders,
        1,
        100,
    )?;
    if let Some(size) = &settings.builder_size
        && !BUILDER_SIZES.contains(&size.as_str())
    {
        return Err(Error::invalid(
            "builder_size",
            format!("must be one of {}", BUILDER_SIZES.join(", ")),
        ));
    }
    Ok(())
}

/// The project a request names: `given`, or when it is empty the token's own project.
/// Without either, `not_found` (which starts the depot CLI's onboarding).
pub fn resolve_id(principal: &Principal, given: Option<&str>) -> Result<String> {
    match (given.map(str::trim).filter(|s| !s.is_empty()), &principal.project_id) {
        (Some(id), _) => Ok(id.to_string()),
        (None, Some(own)) => Ok(own.clone()),
        (None, None) if principal.ci.is_some() => {
            crate::auth::authz::ci_default_project(principal)?.ok_or_else(|| {
                Error::NotFound("missing project ID; pass --project <id>".into())
            })
        }
        (None, None) => Err(Error::NotFound(
            "missing project ID; pass --project <id> or set DEPOT_PROJECT_ID (see `depot projects list`)"
                .into(),
        )),
    }
}

fn target(project: &Project) -> Target<'_> {
    Target::Project {
        id: &project.id,
        organization_id: &project.organization_id,
    }
}

/// Loads a project and authorizes `action` on it. Unknown and unreachable projects are
/// both `not_found`, so ids don't leak. A CI job's trust in it is looked up first, for
/// this project alone.
pub async fn load(
    conn: &mut PgConnection,
    principal: &Principal,
    id: &str,
    action: Action,
) -> Result<Project> {
    ci::confirm(conn, principal, id).await?;
    let project = match is_well_formed(id) {
        true => rows::get(&mut *conn, id).await?,
        false => None,
    };
    authorized(project, principal, id, action)
}

/// [`load`] on a connection of `pool`.
pub async fn load_from(
    pool: &PgPool,
    principal: &Principal,
    id: &str,
    action: Action,
) -> Result<Project> {
    load(&mut *pool.acquire().await?, principal, id, action).await
}

/// Like [`load`], locking the row for the rest of the transaction.
pub async fn load_for_update(
    conn: &mut PgConnection,
    principal: &Principal,
    id: &str,
    action: Action,
) -> Result<Project> {
    ci::confirm(conn, principal, id).await?;
    let project = match is_well_formed(id) {
        true => rows::get_for_update(&mut *conn, id).await?,
        false => None,
    };
    authorized(project, principal, id, action)
}

fn authorized(
    project: Option<Project>,
    principal: &Principal,
    id: &str,
    action: Action,
) -> Result<Project> {
    let project = project.ok_or_else(|| Error::not_found("project", id))?;
    authz::authorize(principal, action, target(&project))?;
    Ok(project)
}

/// The organization a request means: the given one, or the caller's only one.
pub fn organization_for(principal: &Principal, given: Option<&str>) -> Result<String> {
    if let Some(id) = given.map(str::trim).filter(|s| !s.is_empty()) {
        return Ok(id.to_string());
    }
    let mut orgs = principal.organization_ids();
    match orgs.len() {
        1 => Ok(orgs.remove(0)),
        0 => Err(Error::invalid(
            "organization_id",
            "is required: this caller belongs to no single organization",
        )),
        _ => Err(Error::invalid(
            "organization_id",
            "you belong to several organizations; say which one (organization_id)",
        )),
    }
}

/// The rows a listing may return, or `None` when it returns nothing at all.
pub fn filter_for(visible: Visible, organization_id: Option<&str>) -> Option<ProjectFilter> {
    let mut filter = ProjectFilter {
        organization_id: organization_id
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        ..Default::default()
    };
    match visible {
        Visible::All => {}
        Visible::Organizations(orgs) if orgs.is_empty() => return None,
        Visible::Organizations(orgs) => filter.organization_ids = Some(orgs),
        Visible::Projects(ids) if ids.is_empty() => return None,
        Visible::Projects(ids) => filter.project_ids = Some(ids),
    }
    Some(filter)
}

pub struct Projects {
    pool: PgPool,
    auth: Arc<Authenticator>,
    cache: Arc<Cache>,
    /// The issuers trust policies may name (`oidc.trusted_issuers`).
    policy_issuers: crate::auth::trust::PolicyIssuers,
}

/// A project after an update, and what the caller should be told about it (a cache
/// shrink that waits for the next reset, say).
#[derive(Debug, Clone)]
pub struct Updated {
    pub project: Project,
    pub notices: Vec<String>,
}

impl Projects {
    pub fn new(pool: PgPool, auth: Arc<Authenticator>, cache: Arc<Cache>) -> Self {
        Projects {
            pool,
            auth,
            cache,
            policy_issuers: Default::default(),
        }
    }

    /// The issuers this server trusts, which new trust policies name.
    pub fn with_policy_issuers(mut self, issuers: crate::auth::trust::PolicyIssuers) -> Self {
        self.policy_issuers = issuers;
        self
    }

    /// Every check of the settings, the cache sizes' bounds included.
    fn validate(&self, settings: &mut ProjectSettings) -> Result<()> {
        validate(settings)?;
        if let Some(gb) = settings.cache_size_gb_amd64 {
            self.cache.check_size("cache_size_gb_amd64", gb)?;
        }
        if let Some(gb) = settings.cache_size_gb_arm64 {
            self.cache.check_size("cache_size_gb_arm64", gb)?;
        }
        Ok(())
    }

    /// Projects the caller may view, optionally within one organization.
    pub async fn list(
        &self,
        principal: &Principal,
        organization_id: Option<&str>,
    ) -> Result<Vec<Project>> {
        let visible = authz::visible_projects(principal, Action::ViewProject)?;
        match filter_for(visible, organization_id) {
            Some(filter) => rows::list(&self.pool, &filter).await,
            None => Ok(Vec::new()),
        }
    }

    /// A page of the projects the caller may view, by name. The token is the previous
    /// page's `next_page_token` (empty: the first page; the answer's is empty on the last).
    pub async fn list_page(
        &self,
        principal: &Principal,
        organization_id: Option<&str>,
        page_token: &str,
        page_size: Option<i64>,
    ) -> Result<(Vec<Project>, String)> {
        const LISTING: &str = "projects";
        let size = crate::pages::page_size(page_size, 100)?;
        let after = match crate::pages::decode(LISTING, page_token)? {
            None => None,
            Some(cursor) => Some(serde_json::from_str::<(String, String)>(&cursor).map_err(
                |_| Error::invalid("page_token", "is not a page token of this listing"),
            )?),
        };
        let visible = authz::visible_projects(principal, Action::ViewProject)?;
        let Some(filter) = filter_for(visible, organization_id) else {
            return Ok((Vec::new(), String::new()));
        };
        let mut projects = rows::list_page(&self.pool, &filter, after, size + 1).await?;
        let next = if projects.len() as i64 > size {
            projects.truncate(size as usize);
            projects
                .last()
                .map(|p| crate::pages::encode(LISTING, &json!([p.name, p.id]).to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((projects, next))
    }

    /// The projects the caller may view, each with its cache used and newest build (the
    /// dashboard's list), at most `limit` of them.
    pub async fn overview(
        &self,
        principal: &Principal,
        limit: i64,
    ) -> Result<Vec<ProjectOverview>> {
        let visible = authz::visible_projects(principal, Action::ViewProject)?;
        let can_see_builds = authz::visible_projects(principal, Action::ViewBuild).is_ok();
        let Some(filter) = filter_for(visible, None) else {
            return Ok(Vec::new());
        };
        let mut rows = rows::list_overview(&self.pool, &filter, limit).await?;
        if !can_see_builds {
            for row in &mut rows {
                (row.last_build_id, row.last_build_state, row.last_build_at) = (None, None, None);
            }
        }
        Ok(rows)
    }

    /// Like [`Projects::list`], with each project's organization name.
    pub async fn summaries(&self, principal: &Principal) -> Result<Vec<ProjectSummary>> {
        let visible = authz::visible_projects(principal, Action::ViewProject)?;
        match filter_for(visible, None) {
            Some(filter) => rows::list_summaries(&self.pool, &filter).await,
            None => Ok(Vec::new()),
        }
    }

    pub async fn get(&self, principal: &Principal, id: Option<&str>) -> Result<Project> {
        let id = resolve_id(principal, id)?;
        load_from(&self.pool, principal, &id, Action::ViewProject).await
    }

    pub async fn create(
        &self,
        principal: &Principal,
        organization_id: Option<&str>,
        mut settings: ProjectSettings,
    ) -> Result<Project> {
        let organization_id = organization_for(principal, organization_id)?;
        authz::authorize(
            principal,
            Action::CreateProject,
            Target::Organization {
                id: &organization_id,
            },
        )?;
        self.validate(&mut settings)?;
        if settings.name.is_none() {
            return Err(Error::invalid("name", "is required"));
        }
        let mut tx = self.pool.begin().await?;
        let project = rows::create(&mut *tx, &organization_id, &settings).await?;
        self.cache.project_created(&mut tx, &project).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("project.create")
                .org(&project.organization_id)
                .target("project", &project.id)
                .details(json!({ "name": project.name, "settings": project })),
        )
        .await?;
        tx.commit().await?;
        Ok(project)
    }

    /// Changes settings. A new cache size reaches the project's volumes in the same
    /// transaction (a grow within capacity, a shrink recorded for the next reset).
    pub async fn update(
        &self,
        principal: &Principal,
        id: Option<&str>,
        settings: ProjectSettings,
    ) -> Result<Updated> {
        self.update_if_unchanged(principal, id, settings, None)
            .await
    }

    /// Changes settings only if the project is still at one of `expected_versions` (the
    /// versions the caller read, from ETags): a concurrent edit makes this
    /// `PreconditionFailed` and changes nothing. `None` updates unconditionally.
    pub async fn update_if_unchanged(
        &self,
        principal: &Principal,
        id: Option<&str>,
        mut settings: ProjectSettings,
        expected_versions: Option<&[i64]>,
    ) -> Result<Updated> {
        let id = resolve_id(principal, id)?;
        let mut tx = self.pool.begin().await?;
        let before = load_for_update(&mut tx, principal, &id, Action::UpdateProject).await?;
        if let Some(expected) = expected_versions
            && !expected.contains(&before.version)
        {
            return Err(Error::PreconditionFailed(format!(
                "project {:?} changed since you read it (its ETag is now \"v{}\"); read it \
                 again and reapply your change",
                before.id, before.version
            )));
        }
        self.validate(&mut settings)?;
        let after = rows::update(&mut *tx, &before.id, &settings)
            .await?
            .ok_or_else(|| Error::not_found("project", &id))?;
        let notices = self.cache.apply_settings(&mut tx, &before, &after).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("project.update")
                .org(&after.organization_id)
                .target("project", &after.id)
                .details(json!({ "before": before, "after": after, "notices": notices })),
        )
        .await?;
        tx.commit().await?;
        Ok(Updated {
            project: after,
            notices,
        })
    }

    /// Deletes a project with its builds, tokens and trust policies. Its builders stop
    /// taking builds at once (they never serve another project with this one's cache),
    /// and every replica drops cached tokens of the project.
    pub async fn delete(&self, principal: &Principal, id: Option<&str>) -> Result<Project> {
        let id = resolve_id(principal, id)?;
        let mut tx = self.pool.begin().await?;
        let project = load_for_update(&mut tx, principal, &id, Action::DeleteProject).await?;
        let drained = sqlx::query(&format!(
            "UPDATE machines SET state = 'draining', active_builds = 0
             WHERE project_id = $1 AND state IN {LIVE_MACHINE_STATES}"
        ))
        .bind(&project.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let volumes = self.cache.project_deleted(&mut tx, &project.id).await?;
        rows::delete(&mut *tx, &project.id).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("project.delete")
                .org(&project.organization_id)
                .target("project", &project.id)
                .details(json!({ "name": project.name, "drained_machines": drained,
                                 "deleted_volumes": volumes })),
        )
        .await?;
        // Its tokens are gone with it (ON DELETE CASCADE): every replica drops them.
        notify::send(&mut *tx, INVALIDATION_CHANNEL, INVALIDATE_ALL).await?;
        tx.commit().await?;
        self.auth.invalidate(None);
        Ok(project)
    }
}
