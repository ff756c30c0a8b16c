//! CI jobs as principals: a verified OIDC token's claims become a [`CiIdentity`], matched
//! against every project's trust relationships. What the job may then do is `authz`'s.

use std::sync::Arc;

use serde_json::{Map, Value};
use sqlx::PgPool;

use super::authz;
use super::principal::{CiGrant, CiTrust, Principal, PrincipalKind, TrustedProject};
use super::trust::{CiIdentity, TrustProvider};
use crate::config::TrustedProvider;
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

/// The principal a verified CI token stands for: the projects whose trust relationships
/// name its identity, with the rights `authz` gives its kind of issuer.
pub async fn principal(pool: &PgPool, token: CiToken) -> Result<Principal> {
    let claims = &token.verified.claims;
    let identity = identity(token.provider, claims)?;
    let trust = match token.provider {
        TrustedProvider::GithubFork => CiTrust::ForkPullRequest,
        _ => CiTrust::Trusted,
    };
    let projects =
        crate::db::trust_policies::candidates(pool, identity.provider(), &identity.match_key())
            .await?
            .into_iter()
            .filter(|row| {
                TrustProvider::from_stored(&row.provider, &row.claims)
                    .is_some_and(|policy| policy.matches(&identity))
            })
            .map(|row| TrustedProject {
                project_id: row.project_id,
                organization_id: row.organization_id,
            })
            .fold(Vec::<TrustedProject>::new(), |mut all, p| {
                if !all.contains(&p) {
                    all.push(p);
                }
                all
            });
    if token.replayed {
        // The depot CLI sends a refused build's token again to list projects: say why the
        // first use was refused rather than only that this is the second.
        return Err(Error::Unauthenticated(if projects.is_empty() {
            format!(
                "no project has a trust relationship for {}; add one to the project's settings \
                 (and this OIDC token was already used once: request a new one)",
                identity.describe()
            )
        } else {
            "invalid OIDC token: it was already used; request a new one".into()
        }));
    }
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
            projects,
        })),
    })
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
