//! Trust policies: the CI identities (GitHub Actions, GitLab, CircleCI, Buildkite OIDC
//! tokens) that may act on a project without a Kiln token.

use chrono::{DateTime, Utc};
use serde_json::json;

pub use crate::auth::trust::TrustProvider;

use super::{Projects, load_for_update, load_from, resolve_id};
use crate::auth::Principal;
use crate::auth::authz::Action;
use crate::db::audit;
use crate::db::ids::new_id;
use crate::db::trust_policies::{self as rows, NewTrustPolicy, TrustPolicyRow};
use crate::error::{Error, Result};

/// A project has at most this many trust policies.
pub const MAX_PER_PROJECT: i64 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    pub id: String,
    pub project_id: String,
    pub provider: TrustProvider,
    pub created_at: DateTime<Utc>,
}

fn from_row(row: TrustPolicyRow) -> Option<TrustPolicy> {
    Some(TrustPolicy {
        provider: TrustProvider::from_stored(&row.provider, &row.issuer, &row.claims)?,
        id: row.id,
        project_id: row.project_id,
        created_at: row.created_at,
    })
}

impl Projects {
    pub async fn trust_policies(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
    ) -> Result<Vec<TrustPolicy>> {
        let id = resolve_id(principal, project_id)?;
        let project = load_from(&self.pool, principal, &id, Action::ViewProject).await?;
        Ok(rows::list(&self.pool, &project.id)
            .await?
            .into_iter()
            .filter_map(from_row)
            .collect())
    }

    pub async fn add_trust_policy(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        provider: TrustProvider,
    ) -> Result<TrustPolicy> {
        let id = resolve_id(principal, project_id)?;
        let mut tx = self.pool.begin().await?;
        let project = load_for_update(&mut tx, principal, &id, Action::UpdateProject).await?;
        let stored = provider.to_stored(&self.policy_issuers)?;
        let row = rows::insert(
            &mut *tx,
            &NewTrustPolicy {
                id: &new_id(),
                project_id: &project.id,
                provider: stored.provider,
                issuer: &stored.issuer,
                claims: &stored.claims,
                match_key: &stored.match_key,
            },
        )
        .await?
        .ok_or_else(|| {
            Error::AlreadyExists(format!(
                "project {} already trusts this {} identity of {}; nothing was added",
                project.id, stored.provider, stored.issuer
            ))
        })?;
        // Counted after the insert, under the project's row lock: a duplicate is told
        // it is one even when the project is full.
        if rows::count(&mut *tx, &project.id).await? > MAX_PER_PROJECT {
            return Err(Error::ResourceExhausted(format!(
                "project {} already has {MAX_PER_PROJECT} trust policies; remove one first",
                project.id
            )));
        }
        audit::record(
            &mut *tx,
            principal
                .audit("trust_policy.add")
                .org(&project.organization_id)
                .target("trust_policy", &row.id)
                .details(json!({
                    "project_id": project.id,
                    "provider": stored.provider,
                    "issuer": stored.issuer,
                    "claims": stored.claims,
                })),
        )
        .await?;
        tx.commit().await?;
        from_row(row).ok_or_else(|| Error::internal(anyhow::anyhow!("stored an unknown provider")))
    }

    pub async fn remove_trust_policy(
        &self,
        principal: &Principal,
        project_id: Option<&str>,
        policy_id: &str,
    ) -> Result<()> {
        let id = resolve_id(principal, project_id)?;
        let mut tx = self.pool.begin().await?;
        let project = load_for_update(&mut tx, principal, &id, Action::UpdateProject).await?;
        if !rows::delete(&mut *tx, &project.id, policy_id).await? {
            return Err(Error::not_found("trust policy", policy_id));
        }
        audit::record(
            &mut *tx,
            principal
                .audit("trust_policy.remove")
                .org(&project.organization_id)
                .target("trust_policy", policy_id)
                .details(json!({ "project_id": project.id })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
