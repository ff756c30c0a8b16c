//! Trust policies: the CI identities (GitHub Actions, GitLab, CircleCI, Buildkite OIDC
//! tokens) that may act on a project without a Kiln token.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{Projects, load, load_for_update, resolve_id};
use crate::auth::Principal;
use crate::auth::authz::Action;
use crate::db::audit;
use crate::db::ids::new_id;
use crate::db::trust_policies::{self as rows, TrustPolicyRow};
use crate::error::{Error, Result};

/// A project has at most this many trust policies.
pub const MAX_PER_PROJECT: i64 = 100;

/// Which CI identity a policy trusts, by provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustProvider {
    GitHub {
        repository_owner: String,
        repository: String,
    },
    CircleCi {
        organization_uuid: String,
        project_uuid: String,
    },
    Buildkite {
        organization_slug: String,
        pipeline_slug: String,
    },
    /// `git_ref` empty: any ref.
    GitLab {
        project_path: String,
        git_ref: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    pub id: String,
    pub project_id: String,
    pub provider: TrustProvider,
    pub created_at: DateTime<Utc>,
}

fn required(field: &str, value: &str) -> Result<String> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > 200 || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "must be 1 to 200 printable characters",
        ));
    }
    Ok(value.to_string())
}

fn optional(field: &str, value: &str) -> Result<String> {
    if value.trim().is_empty() {
        Ok(String::new())
    } else {
        required(field, value)
    }
}

impl TrustProvider {
    /// Validated and trimmed, as stored: (provider name, claims).
    fn to_stored(&self) -> Result<(&'static str, Value)> {
        Ok(match self {
            TrustProvider::GitHub {
                repository_owner,
                repository,
            } => (
                "github",
                json!({
                    "repository_owner": required("github.repository_owner", repository_owner)?,
                    "repository": required("github.repository", repository)?,
                }),
            ),
            TrustProvider::CircleCi {
                organization_uuid,
                project_uuid,
            } => (
                "circleci",
                json!({
                    "organization_uuid": required("circleci.organization_uuid", organization_uuid)?,
                    "project_uuid": required("circleci.project_uuid", project_uuid)?,
                }),
            ),
            TrustProvider::Buildkite {
                organization_slug,
                pipeline_slug,
            } => (
                "buildkite",
                json!({
                    "organization_slug": required("buildkite.organization_slug", organization_slug)?,
                    "pipeline_slug": required("buildkite.pipeline_slug", pipeline_slug)?,
                }),
            ),
            TrustProvider::GitLab {
                project_path,
                git_ref,
            } => (
                "gitlab",
                json!({
                    "project_path": required("gitlab.project_path", project_path)?,
                    "ref": optional("gitlab.ref", git_ref)?,
                }),
            ),
        })
    }

    fn from_stored(provider: &str, claims: &Value) -> Option<TrustProvider> {
        let claim = |key: &str| {
            claims
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Some(match provider {
            "github" => TrustProvider::GitHub {
                repository_owner: claim("repository_owner"),
                repository: claim("repository"),
            },
            "circleci" => TrustProvider::CircleCi {
                organization_uuid: claim("organization_uuid"),
                project_uuid: claim("project_uuid"),
            },
            "buildkite" => TrustProvider::Buildkite {
                organization_slug: claim("organization_slug"),
                pipeline_slug: claim("pipeline_slug"),
            },
            "gitlab" => TrustProvider::GitLab {
                project_path: claim("project_path"),
                git_ref: claim("ref"),
            },
            _ => return None,
        })
    }
}

fn from_row(row: TrustPolicyRow) -> Option<TrustPolicy> {
    Some(TrustPolicy {
        provider: TrustProvider::from_stored(&row.provider, &row.claims)?,
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
        let project = load(&self.pool, principal, &id, Action::ViewProject).await?;
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
        let project = load_for_update(&mut *tx, principal, &id, Action::UpdateProject).await?;
        let (name, claims) = provider.to_stored()?;
        if rows::count(&mut *tx, &project.id).await? >= MAX_PER_PROJECT {
            return Err(Error::ResourceExhausted(format!(
                "project {} already has {MAX_PER_PROJECT} trust policies; remove one first",
                project.id
            )));
        }
        let row = rows::insert(&mut *tx, &new_id(), &project.id, name, &claims).await?;
        audit::record(
            &mut *tx,
            principal
                .audit("trust_policy.add")
                .org(&project.organization_id)
                .target("trust_policy", &row.id)
                .details(json!({ "project_id": project.id, "provider": name, "claims": claims })),
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
        let project = load_for_update(&mut *tx, principal, &id, Action::UpdateProject).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_round_trip_and_validate() {
        let github = TrustProvider::GitHub {
            repository_owner: " acme ".into(),
            repository: "api".into(),
        };
        let (name, claims) = github.to_stored().unwrap();
        assert_eq!(
            TrustProvider::from_stored(name, &claims),
            Some(TrustProvider::GitHub {
                repository_owner: "acme".into(),
                repository: "api".into(),
            })
        );
        let bad = TrustProvider::Buildkite {
            organization_slug: String::new(),
            pipeline_slug: "p".into(),
        };
        assert!(bad.to_stored().is_err());
        let any_ref = TrustProvider::GitLab {
            project_path: "g/p".into(),
            git_ref: " ".into(),
        };
        assert_eq!(any_ref.to_stored().unwrap().1["ref"], "");
    }
}
