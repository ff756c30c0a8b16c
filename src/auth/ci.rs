//! CI jobs as principals: a verified OIDC token's claims become a [`CiIdentity`], which a
//! project trusts when one of its trust relationships names that identity and issuer
//! (looked up project by project, in SQL). What the job may then do is `authz`'s.

use std::sync::Arc;

use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};

use super::authz;
use super::principal::{CiGrant, CiTrust, Principal, PrincipalKind, TrustedProject};
use super::trust::CiIdentity;
use crate::config::TrustedProvider;
use crate::db::trust_policies;
use crate::error::{Error, Result};
use crate::oidc::trusted::CiToken;

fn claim(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn missing(provider: &str, name: &str) -> Error {
    Error::Unauthenticated(format!(
        "invalid OIDC token: a {provider} token must carry the {name} claim"
    ))
}

/// The identity a token of `provider` states.
pub fn identity(provider: TrustedProvider, claims: &Map<String, Value>) -> Result<CiIdentity> {
    let need = |name: &str, who: &str| claim(claims, name).ok_or_else(|| missing(who, name));
    Ok(match provider {
        TrustedProvider::Github | TrustedProvider::GithubFork => CiIdentity::GitHub {
            repository: need("repository", "GitHub")?,
            repository_id: claim(claims, "repository_id").unwrap_or_default(),
        },
        TrustedProvider::Gitlab => CiIdentity::GitLab {
            project_path: need("project_path", "GitLab")?,
            git_ref: claim(claims, "ref").unwrap_or_default(),
        },
        TrustedProvider::Buildkite => CiIdentity::Buildkite {
            organization_slug: need("organization_slug", "Buildkite")?,
            pipeline_slug: need("pipeline_slug", "Buildkite")?,
        },
        TrustedProvider::Circleci => {
            // sub = org/<org-uuid>/project/<project-uuid>/user/<user-uuid>
            let sub = need("sub", "CircleCI")?;
            let parts: Vec<&str> = sub.split('/').collect();
            match parts.as_slice() {
                ["org", org, "project", project, ..] if !org.is_empty() && !project.is_empty() => {
                    CiIdentity::CircleCi {
                        organization_uuid: org.to_string(),
                        project_uuid: project.to_string(),
                    }
                }
                _ => {
                    return Err(Error::Unauthenticated(
                        "invalid OIDC token: a CircleCI token's sub must be org/<uuid>/project/<uuid>/…"
                            .into(),
                    ));
                }
            }
        }
    })
}

/// Trusting projects kept for listings; which projects a token may act on is looked up
/// project by project ([`confirm`]), never from this list alone.
pub const MAX_LISTED: i64 = 100;

/// The principal a verified CI token stands for: its identity, how its policies are
/// found, the projects that trust it (for listings), and its default project (the one it
/// last built in), with the rights `authz` gives its kind of issuer.
pub async fn principal(pool: &PgPool, token: CiToken) -> Result<Principal> {
    let claims = &token.verified.claims;
    let identity = identity(token.provider, claims)?;
    let trust = match token.provider {
        TrustedProvider::GithubFork => CiTrust::ForkPullRequest,
        _ => CiTrust::Trusted,
    };
    let lookup = identity.lookup(&token.policy_issuer);
    let listed: Vec<TrustedProject> = trust_policies::trusting_projects(pool, &lookup, MAX_LISTED)
        .await?
        .into_iter()
        .map(|(project_id, organization_id)| TrustedProject {
            project_id,
            organization_id,
        })
        .collect();
    if token.replayed {
        // The depot CLI sends a refused build's token again to list projects: say why the
        // first use was refused rather than only that this is the second.
        return Err(Error::Unauthenticated(if listed.is_empty() {
            format!(
                "no project has a trust relationship for {}; add one to the project's settings \
                 (and this OIDC token was already used once: request a new one)",
                identity.describe()
            )
        } else {
            "invalid OIDC token: it was already used; request a new one".into()
        }));
    }
    let history_key = identity.history_key(&token.issuer);
    // The project this identity last built in, while it still trusts the identity.
    let default_project = match trust {
        CiTrust::Trusted => trust_policies::last_trusting_project(pool, &lookup, &history_key)
            .await?
            .map(|(project_id, organization_id)| TrustedProject {
                project_id,
                organization_id,
            }),
        CiTrust::ForkPullRequest => None,
    };
    let subject = claim(claims, "sub").unwrap_or_else(|| identity.describe());
    let jti = &token.verified.jti;
    Ok(Principal {
        token_id: if jti.is_empty() {
            format!("oidc:{subject}")
        } else {
            format!("oidc:{jti}")
        },
        kind: PrincipalKind::Ci(trust),
        user_id: None,
        organization_id: None,
        project_id: None,
        build_id: None,
        machine_id: None,
        scopes: authz::ci_scopes(trust),
        memberships: Vec::new(),
        server_admin: false,
        expires_at: Some(token.verified.expires_at),
        ci: Some(Arc::new(CiGrant {
            issuer: token.issuer,
            subject,
            identity,
            lookup,
            history_key,
            default_project,
            listed,
            confirmed: Default::default(),
        })),
    })
}

/// [`confirm`] on a connection of `pool`, taken only for CI principals.
pub async fn confirm_from(pool: &PgPool, principal: &Principal, project_id: &str) -> Result<()> {
    if principal.ci.is_none() {
        return Ok(());
    }
    confirm(&mut *pool.acquire().await?, principal, project_id).await
}

/// Looks up whether `project_id` trusts a CI principal, with a query of that project's
/// policies alone, and records the answer for `authz`. Other principals pass through.
pub async fn confirm(
    conn: &mut PgConnection,
    principal: &Principal,
    project_id: &str,
) -> Result<()> {
    let Some(grant) = principal.ci.as_deref() else {
        return Ok(());
    };
    if grant.trusts(project_id) || !crate::db::ids::is_well_formed(project_id) {
        return Ok(());
    }
    if let Some(organization_id) =
        trust_policies::trusting_project(&mut *conn, &grant.lookup, project_id).await?
    {
        grant.confirmed.add(TrustedProject {
            project_id: project_id.to_string(),
            organization_id,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn identities_come_from_each_providers_claims() {
        assert_eq!(
            identity(
                TrustedProvider::Github,
                &claims(json!({"repository": "octo-org/octo-repo", "repository_id": "74"}))
            )
            .unwrap(),
            CiIdentity::GitHub {
                repository: "octo-org/octo-repo".into(),
                repository_id: "74".into()
            }
        );
        assert_eq!(
            identity(
                TrustedProvider::Circleci,
                &claims(json!({"sub": "org/o-1/project/p-2/user/u-3"}))
            )
            .unwrap(),
            CiIdentity::CircleCi {
                organization_uuid: "o-1".into(),
                project_uuid: "p-2".into()
            }
        );
        assert!(identity(TrustedProvider::Circleci, &claims(json!({"sub": "nope"}))).is_err());
        assert!(
            identity(
                TrustedProvider::Buildkite,
                &claims(json!({"organization_slug": "a"}))
            )
            .is_err()
        );
        assert!(identity(TrustedProvider::Gitlab, &claims(json!({}))).is_err());
    }
}
