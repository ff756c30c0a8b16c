//! API tokens: the one implementation of creating, listing, renaming and revoking them.
//!
//! Every token Kiln hands out is minted by `auth::token::issue`, which validates it; only
//! its SHA-256 and a display prefix are stored. Revocation commits a NOTIFY with the
//! token's hash, so every replica drops it from its cache at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use sqlx::{PgExecutor, PgPool};

use crate::auth::authz::{self, Action, Target, TokenSubject};
use crate::auth::token::{TokenKind, issue, validate_name};
use crate::auth::{Authenticator, INVALIDATION_CHANNEL, Principal};
use crate::db::ids::is_well_formed;
use crate::db::tokens::{self as rows, TokenFilter, TokenInfo};
use crate::db::{audit, notify};
use crate::error::{Error, Result};

pub use crate::auth::token::NewToken;

fn kind_of(info: &TokenInfo) -> Result<TokenKind> {
    info.kind
        .parse()
        .map_err(|e: String| Error::internal(anyhow::anyhow!("stored token {}: {e}", info.id)))
}

fn subject(info: &TokenInfo, kind: TokenKind) -> TokenSubject<'_> {
    TokenSubject {
        kind,
        user_id: info.user_id.as_deref(),
        organization_id: info.organization_id.as_deref(),
        project_id: info.project_id.as_deref(),
    }
}

/// A token of one project, created by `principal`.
fn project_scoped(
    kind: TokenKind,
    name: &str,
    organization_id: &str,
    project_id: &str,
    expires_at: Option<chrono::DateTime<Utc>>,
    principal: &Principal,
) -> NewToken {
    let mut new = NewToken::new(kind, name);
    new.organization_id = Some(organization_id.to_string());
    new.project_id = Some(project_id.to_string());
    new.expires_at = expires_at;
    new.created_by = principal.user_id.clone();
    new
}

/// A pull token and the project it pulls from.
#[derive(Debug)]
pub struct PullToken {
    pub secret: String,
    pub project_id: String,
    pub organization_id: String,
}

pub struct Tokens {
    pool: PgPool,
    auth: Arc<Authenticator>,
    pull_token_ttl: Duration,
}

impl Tokens {
    pub fn new(pool: PgPool, auth: Arc<Authenticator>, pull_token_ttl: Duration) -> Self {
        Tokens {
            pool,
            auth,
            pull_token_ttl,
        }
    }

    /// A project's live project tokens (never their secrets).
    pub async fn list_project_tokens(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
    ) -> Result<Vec<TokenInfo>> {
        let id = crate::projects::resolve_id(principal, project_id)?;
        let project =
            crate::projects::load_from(&self.pool, principal, &id, Action::ManageProjectTokens)
                .await?;
        let filter = TokenFilter {
            kind: Some(TokenKind::Project.as_str().to_string()),
            project_id: Some(project.id),
            ..Default::default()
        };
        rows::list(&self.pool, &filter).await
    }

    /// A new project token, shown once. `expires_in_days`: 1 to 3650, or never.
    pub async fn create_project_token(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        name: &str,
        expires_in_days: Option<i64>,
    ) -> Result<(TokenInfo, String)> {
        let expires_at = match expires_in_days {
            None => None,
            Some(days) if (1..=3650).contains(&days) => {
                Some(Utc::now() + chrono::Duration::days(days))
            }
            Some(_) => {
                return Err(Error::invalid(
                    "expires_in_days",
                    "must be between 1 and 3650",
                ));
            }
        };
        let id = crate::projects::resolve_id(principal, project_id)?;
        let mut tx = self.pool.begin().await?;
        let project =
            crate::projects::load(&mut tx, principal, &id, Action::ManageProjectTokens).await?;
        let new = project_scoped(
            TokenKind::Project,
            name,
            &project.organization_id,
            &project.id,
            expires_at,
            principal,
        );
        let (info, minted) = issue(&mut *tx, new).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("token.create")
                .org(&project.organization_id)
                .target("token", &info.id)
                .details(json!({
                    "kind": info.kind,
                    "project_id": project.id,
                    "prefix": info.display_prefix,
                    "expires_at": info.expires_at,
                })),
        )
        .await?;
        tx.commit().await?;
        Ok((info, minted.secret))
    }

    /// Loads a token the caller may manage; with `project_id`, it must be one of that
    /// project's tokens.
    async fn manageable<'e>(
        &self,
        db: impl PgExecutor<'e>,
        principal: &Principal,
        project_id: Option<&str>,
        token_id: &str,
    ) -> Result<(TokenInfo, TokenKind)> {
        let not_found = || Error::not_found("token", token_id);
        if !is_well_formed(token_id) {
            return Err(not_found());
        }
        let info = rows::get(db, token_id).await?.ok_or_else(not_found)?;
        let kind = kind_of(&info)?;
        authz::authorize_token(principal, token_id, subject(&info, kind))?;
        if let Some(project) = project_id
            && info.project_id.as_deref() != Some(project)
        {
            return Err(not_found());
        }
        Ok((info, kind))
    }

    /// Renames a project's token (`UpdateToken`).
    pub async fn rename(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        token_id: &str,
        name: &str,
    ) -> Result<()> {
        // With a project id (REST), only that project's tokens; without (the public API's
        // UpdateToken names the token alone), any token the caller may manage.
        let project_id = project_id
            .map(|p| crate::projects::resolve_id(principal, Some(p)))
            .transpose()?;
        let name = validate_name(name)?;
        let mut tx = self.pool.begin().await?;
        let (info, _) = self
            .manageable(&mut *tx, principal, project_id.as_deref(), token_id)
            .await?;
        rows::rename(&mut *tx, &info.id, &name).await?;
        let event = principal
            .audit("token.rename")
            .org_of(info.organization_id.as_deref())
            .target("token", &info.id)
            .details(json!({ "before": info.name, "after": name }));
        audit::record(&mut *tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Revokes a token; every replica stops accepting it at once. False when it was
    /// already revoked. With `project_id`, only that project's tokens.
    pub async fn revoke(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        token_id: &str,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let (info, kind) = self
            .manageable(&mut *tx, principal, project_id, token_id)
            .await?;
        let Some(hash) = rows::revoke(&mut *tx, &info.id).await? else {
            return Ok(false);
        };
        let event = principal
            .audit("token.revoke")
            .org_of(info.organization_id.as_deref())
            .target("token", &info.id)
            .details(json!({ "kind": kind.as_str(), "prefix": info.display_prefix }));
        audit::record(&mut *tx, event).await?;
        notify::send(&mut *tx, INVALIDATION_CHANNEL, &hex::encode(hash)).await?;
        tx.commit().await?;
        self.auth.invalidate(Some(&hash));
        Ok(true)
    }

    /// A short-lived pull token for a project, or for the project of `build_id`. Only
    /// user, organization and project tokens mint them: a pull token cannot renew itself.
    pub async fn mint_pull_token(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        build_id: Option<&str>,
    ) -> Result<PullToken> {
        let project_id = project_id.map(str::trim).filter(|s| !s.is_empty());
        let build_id = build_id.map(str::trim).filter(|s| !s.is_empty());
        let mut tx = self.pool.begin().await?;
        let (project_id, organization_id) = match build_id {
            Some(build_id) => {
                let build = match is_well_formed(build_id) {
                    true => crate::db::builds::get(&mut *tx, build_id).await?,
                    false => None,
                }
                .ok_or_else(|| Error::not_found("build", build_id))?;
                crate::auth::ci::confirm(&mut tx, principal, &build.project_id).await?;
                authz::authorize(
                    principal,
                    Action::MintPullToken,
                    Target::Build {
                        id: &build.id,
                        project_id: &build.project_id,
                        organization_id: &build.organization_id,
                    },
                )?;
                if project_id.is_some_and(|p| p != build.project_id) {
                    return Err(Error::invalid(
                        "build_id",
                        "the build belongs to another project",
                    ));
                }
                (build.project_id, build.organization_id)
            }
            None => {
                let id = crate::projects::resolve_id(principal, project_id)?;
                let project =
                    crate::projects::load(&mut tx, principal, &id, Action::MintPullToken).await?;
                (project.id, project.organization_id)
            }
        };
        let ttl =
            chrono::Duration::from_std(self.pull_token_ttl).unwrap_or(chrono::Duration::hours(1));
        let new = project_scoped(
            TokenKind::Pull,
            "depot pull-token",
            &organization_id,
            &project_id,
            Some(Utc::now() + ttl),
            principal,
        );
        let (info, minted) = issue(&mut *tx, new).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("token.create")
                .org(&organization_id)
                .target("token", &info.id)
                .details(json!({
                    "kind": "pull",
                    "project_id": project_id,
                    "build_id": build_id,
                    "expires_at": info.expires_at,
                })),
        )
        .await?;
        tx.commit().await?;
        Ok(PullToken {
            secret: minted.secret,
            project_id,
            organization_id,
        })
    }

    /// Any user, organization, project or pull token (operators, `kiln admin`).
    pub async fn create(
        &self,
        principal: &Principal,
        new: NewToken,
    ) -> Result<(TokenInfo, String)> {
        authz::authorize(principal, Action::Operate, Target::Instance)?;
        if matches!(new.kind, TokenKind::Build | TokenKind::Machine) {
            return Err(Error::invalid(
                "kind",
                format!(
                    "{} tokens are minted by Kiln itself; create a user, organization, project or pull token",
                    new.kind
                ),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let (info, minted) = issue(&mut *tx, new).await?;
        let event = principal
            .audit("token.create")
            .org_of(info.organization_id.as_deref())
            .target("token", &info.id)
            .details(json!({ "kind": info.kind, "prefix": info.display_prefix }));
        audit::record(&mut *tx, event).await?;
        tx.commit().await?;
        Ok((info, minted.secret))
    }

    /// Tokens matching `filter` (operators, `kiln admin`).
    pub async fn list(
        &self,
        principal: &Principal,
        filter: &TokenFilter,
    ) -> Result<Vec<TokenInfo>> {
        authz::authorize(principal, Action::Operate, Target::Instance)?;
        rows::list(&self.pool, filter).await
    }
}
