//! Organizations, users, memberships and the audit log: the one implementation of each
//! operation, for REST, Connect and `kiln admin`. Managing organizations and users is
//! an operator's job (`kiln admin`); members see their organizations and owners read
//! their audit log.

use std::sync::Arc;

use serde_json::json;
use sqlx::PgPool;

use crate::auth::authz::{self, Action, Target, Visible};
use crate::auth::{Authenticator, INVALIDATE_ALL, INVALIDATION_CHANNEL, Principal, Role};
use crate::db::audit::{self, AuditFilter, AuditRecord};
use crate::db::ids::is_well_formed;
use crate::db::notify;
use crate::db::orgs::{self as rows, Member, Organization, User};
use crate::error::{Error, Result};

/// A display name: 1 to 100 characters, no control characters. Returns it trimmed.
pub fn validate_name(field: &str, name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::invalid(field, "must be 1 to 100 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(name.to_string())
}

pub use crate::auth::login::validate_email;

fn operate(principal: &Principal) -> Result<()> {
    authz::authorize(principal, Action::Operate, Target::Instance)
}

pub struct Orgs {
    pool: PgPool,
    auth: Arc<Authenticator>,
}

impl Orgs {
    pub fn new(pool: PgPool, auth: Arc<Authenticator>) -> Self {
        Orgs { pool, auth }
    }

    /// Organizations the caller can see.
    pub async fn list(&self, principal: &Principal) -> Result<Vec<Organization>> {
        match authz::visible_organizations(principal)? {
            Visible::All => rows::list_organizations(&self.pool, None).await,
            Visible::Organizations(ids) => rows::list_organizations(&self.pool, Some(&ids)).await,
            Visible::Projects(_) => Ok(Vec::new()),
        }
    }

    /// Creates an organization and, with `owner_email`, makes that user (created if new)
    /// its owner. One transaction.
    pub async fn create(
        &self,
        principal: &Principal,
        name: &str,
        owner_email: Option<&str>,
    ) -> Result<(Organization, Option<User>)> {
        operate(principal)?;
        let name = validate_name("name", name)?;
        let owner_email = owner_email.map(validate_email).transpose()?;
        let mut tx = self.pool.begin().await?;
        let org = rows::create_organization(&mut *tx, &name).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("organization.create")
                .org(&org.id)
                .target("organization", &org.id)
                .details(json!({ "name": org.name })),
        )
        .await?;
        let owner = match owner_email {
            Some(email) => {
                let user = match rows::find_user_by_email(&mut *tx, &email).await? {
                    Some(user) => user,
                    None => {
                        let user = rows::create_user(&mut *tx, &email, "").await?;
                        audit::record(
                            &mut *tx,
                            principal.audit("user.create").target("user", &user.id),
                        )
                        .await?;
                        user
                    }
                };
                rows::set_membership(&mut *tx, &org.id, &user.id, Role::Owner.as_str()).await?;
                audit::record(
                    &mut *tx,
                    principal
                        .audit("membership.set")
                        .org(&org.id)
                        .target("user", &user.id)
                        .details(json!({ "role": Role::Owner })),
                )
                .await?;
                notify::send(&mut *tx, INVALIDATION_CHANNEL, INVALIDATE_ALL).await?;
                Some(user)
            }
            None => None,
        };
        tx.commit().await?;
        self.auth.invalidate(None);
        Ok((org, owner))
    }

    /// Finds an organization by exact name (operators; `kiln dev` seeding).
    pub async fn find_by_name(
        &self,
        principal: &Principal,
        name: &str,
    ) -> Result<Option<Organization>> {
        operate(principal)?;
        rows::find_organization_by_name(&self.pool, name).await
    }

    pub async fn create_user(
        &self,
        principal: &Principal,
        email: &str,
        name: &str,
    ) -> Result<User> {
        operate(principal)?;
        let email = validate_email(email)?;
        let name = name.trim();
        if name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "name",
                "must be at most 100 characters, without control characters",
            ));
        }
        let mut tx = self.pool.begin().await?;
        let user = rows::create_user(&mut *tx, &email, name).await?;
        audit::record(
            &mut *tx,
            principal.audit("user.create").target("user", &user.id),
        )
        .await?;
        tx.commit().await?;
        Ok(user)
    }

    pub async fn list_users(&self, principal: &Principal) -> Result<Vec<User>> {
        operate(principal)?;
        rows::list_users(&self.pool).await
    }

    /// A user by id or email.
    pub async fn find_user(&self, principal: &Principal, user: &str) -> Result<User> {
        operate(principal)?;
        let found = if user.contains('@') {
            rows::find_user_by_email(&self.pool, user).await?
        } else if is_well_formed(user) {
            rows::get_user(&self.pool, user).await?
        } else {
            None
        };
        found.ok_or_else(|| {
            Error::NotFound(format!(
                "no user {user:?}; create it with `kiln admin user create --email ...`"
            ))
        })
    }

    /// Sets the password of a user for the sign-in pages.
    pub async fn set_password(
        &self,
        principal: &Principal,
        user_id: &str,
        password: &str,
    ) -> Result<()> {
        operate(principal)?;
        let hash = crate::auth::login::hash_password(password).await?;
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
            .bind(user_id)
            .bind(hash)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(Error::not_found("user", user_id));
        }
        audit::record(
            &mut *tx,
            principal.audit("user.set_password").target("user", user_id),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Makes a user a server admin, or no longer one (operators only: a server admin
    /// cannot grant it). Every replica re-reads its cached tokens. False if it was so
    /// already.
    pub async fn set_server_admin(
        &self,
        principal: &Principal,
        user_id: &str,
        admin: bool,
    ) -> Result<bool> {
        if principal.kind != crate::auth::PrincipalKind::Operator {
            return Err(Error::PermissionDenied(
                "only an operator grants or revokes server admin, with `kiln admin` on the server"
                    .into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let exists: Option<bool> =
            sqlx::query_scalar("SELECT server_admin FROM users WHERE id = $1 FOR UPDATE")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
        match exists {
            None => return Err(Error::not_found("user", user_id)),
            Some(current) if current == admin => return Ok(false),
            Some(_) => {}
        }
        sqlx::query("UPDATE users SET server_admin = $2 WHERE id = $1")
            .bind(user_id)
            .bind(admin)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut *tx,
            principal
                .audit(if admin {
                    "user.grant_server_admin"
                } else {
                    "user.revoke_server_admin"
                })
                .target("user", user_id),
        )
        .await?;
        notify::send(&mut *tx, INVALIDATION_CHANNEL, INVALIDATE_ALL).await?;
        tx.commit().await?;
        self.auth.invalidate(None);
        Ok(true)
    }

    /// Adds a member or changes their role; every replica re-reads memberships.
    pub async fn set_member(
        &self,
        principal: &Principal,
        organization_id: &str,
        user_id: &str,
        role: Role,
    ) -> Result<()> {
        operate(principal)?;
        let mut tx = self.pool.begin().await?;
        rows::set_membership(&mut *tx, organization_id, user_id, role.as_str()).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("membership.set")
                .org(organization_id)
                .target("user", user_id)
                .details(json!({ "role": role })),
        )
        .await?;
        notify::send(&mut *tx, INVALIDATION_CHANNEL, INVALIDATE_ALL).await?;
        tx.commit().await?;
        self.auth.invalidate(None);
        Ok(())
    }

    /// Removes a member; false if they were not one.
    pub async fn remove_member(
        &self,
        principal: &Principal,
        organization_id: &str,
        user_id: &str,
    ) -> Result<bool> {
        operate(principal)?;
        let mut tx = self.pool.begin().await?;
        if !rows::remove_membership(&mut *tx, organization_id, user_id).await? {
            return Ok(false);
        }
        audit::record(
            &mut *tx,
            principal
                .audit("membership.remove")
                .org(organization_id)
                .target("user", user_id),
        )
        .await?;
        notify::send(&mut *tx, INVALIDATION_CHANNEL, INVALIDATE_ALL).await?;
        tx.commit().await?;
        self.auth.invalidate(None);
        Ok(true)
    }

    pub async fn members(
        &self,
        principal: &Principal,
        organization_id: &str,
    ) -> Result<Vec<Member>> {
        if !is_well_formed(organization_id) {
            return Err(Error::not_found("organization", organization_id));
        }
        authz::authorize(
            principal,
            Action::ManageOrganization,
            Target::Organization {
                id: organization_id,
            },
        )?;
        rows::list_members(&self.pool, organization_id).await
    }

    /// Audit events of one organization (its owners), or of the whole installation
    /// (operators), newest first, filtered, in pages.
    pub async fn audit_events(
        &self,
        principal: &Principal,
        organization_id: Option<&str>,
        filter: &AuditFilter,
        page_token: &str,
        page_size: Option<i64>,
    ) -> Result<AuditPage> {
        let size = crate::pages::page_size(page_size, 100)?;
        let after = match crate::pages::decode_time_id(AUDIT_LISTING, page_token)? {
            None => None,
            Some((at, id)) => Some((
                at,
                id.parse::<i64>().map_err(|_| {
                    Error::invalid("page_token", "is not a page token of this listing")
                })?,
            )),
        };
        if let (Some(since), Some(until)) = (filter.since, filter.until)
            && since >= until
        {
            return Err(Error::invalid("since", "must be before until"));
        }
        match organization_id {
            Some(id) => {
                if !is_well_formed(id) {
                    return Err(Error::not_found("organization", id));
                }
                authz::authorize(principal, Action::ViewAuditLog, Target::Organization { id })?;
                if rows::get_organization(&self.pool, id).await?.is_none() {
                    return Err(Error::not_found("organization", id));
                }
            }
            None => operate(principal)?,
        }
        let mut events =
            audit::list_page(&self.pool, organization_id, filter, after, size + 1).await?;
        let next_page_token = if events.len() as i64 > size {
            events.truncate(size as usize);
            events
                .last()
                .map(|e| {
                    crate::pages::encode_time_id(AUDIT_LISTING, e.occurred_at, &e.id.to_string())
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(AuditPage {
            events,
            next_page_token,
        })
    }
}

const AUDIT_LISTING: &str = "audit-events";

/// A page of audit events and the token of the next (empty on the last page).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub events: Vec<AuditRecord>,
    pub next_page_token: String,
}
