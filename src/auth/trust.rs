//! Trust relationships as authentication sees them: which CI identity a policy names, and
//! whether a verified CI token's identity is that one. Projects' CRUD of policies lives in
//! `projects::trust`; the decision what a matched identity may do lives in `authz`.

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Which CI identity a policy trusts, by provider. On the JSON API it is flat:
/// `{"provider": "github", "repository_owner": …, "repository": …}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(tag = "provider", deny_unknown_fields)]
pub enum TrustProvider {
    /// `repository` is the name without its owner. `repository_id` empty: any repository
    /// of that name (set it to survive a rename and re-creation of the name).
    #[serde(rename = "github")]
    GitHub {
        repository_owner: String,
        repository: String,
        #[serde(default)]
        repository_id: String,
    },
    #[serde(rename = "circleci")]
    CircleCi {
        organization_uuid: String,
        project_uuid: String,
    },
    #[serde(rename = "buildkite")]
    Buildkite {
        organization_slug: String,
        pipeline_slug: String,
    },
    /// `git_ref` empty: any ref.
    #[serde(rename = "gitlab")]
    GitLab {
        project_path: String,
        #[serde(default, rename = "ref")]
        git_ref: String,
    },
}

/// The CI identity a verified token states.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum CiIdentity {
    GitHub {
        /// `owner/name`, as GitHub spells it.
        repository: String,
        repository_id: String,
    },
    GitLab {
        project_path: String,
        git_ref: String,
    },
    CircleCi {
        organization_uuid: String,
        project_uuid: String,
    },
    Buildkite {
        organization_slug: String,
        pipeline_slug: String,
    },
}

impl CiIdentity {
    pub fn provider(&self) -> &'static str {
        match self {
            CiIdentity::GitHub { .. } => "github",
            CiIdentity::GitLab { .. } => "gitlab",
            CiIdentity::CircleCi { .. } => "circleci",
            CiIdentity::Buildkite { .. } => "buildkite",
        }
    }

    /// The lowercase key policies for this identity are stored under.
    pub fn match_key(&self) -> String {
        match self {
            CiIdentity::GitHub { repository, .. } => repository.to_lowercase(),
            CiIdentity::GitLab { project_path, .. } => project_path.to_lowercase(),
            CiIdentity::CircleCi {
                organization_uuid,
                project_uuid,
            } => format!("{organization_uuid}/{project_uuid}").to_lowercase(),
            CiIdentity::Buildkite {
                organization_slug,
                pipeline_slug,
            } => format!("{organization_slug}/{pipeline_slug}").to_lowercase(),
        }
    }

    /// For messages: "GitHub repository octo-org/octo-repo".
    pub fn describe(&self) -> String {
        match self {
            CiIdentity::GitHub { repository, .. } => format!("GitHub repository {repository}"),
            CiIdentity::GitLab {
                project_path,
                git_ref,
            } => format!("GitLab project {project_path} (ref {git_ref})"),
            CiIdentity::CircleCi {
                organization_uuid,
                project_uuid,
            } => format!("CircleCI project {organization_uuid}/{project_uuid}"),
            CiIdentity::Buildkite {
                organization_slug,
                pipeline_slug,
            } => format!("Buildkite pipeline {organization_slug}/{pipeline_slug}"),
        }
    }
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

fn no_slash(field: &str, value: String, hint: &str) -> Result<String> {
    if value.contains('/') {
        return Err(Error::invalid(field, hint));
    }
    Ok(value)
}

impl TrustProvider {
    /// Validated and trimmed, as stored: (provider name, claims, match key).
    pub fn to_stored(&self) -> Result<(&'static str, Value, String)> {
        Ok(match self {
            TrustProvider::GitHub {
                repository_owner,
                repository,
                repository_id,
            } => {
                let owner = no_slash(
                    "github.repository_owner",
                    required("github.repository_owner", repository_owner)?,
                    "is the user or organization alone, without a '/'",
                )?;
                let name = no_slash(
                    "github.repository",
                    required("github.repository", repository)?,
                    "is the repository's name without its owner (set repository_owner separately)",
                )?;
                let id = optional("github.repository_id", repository_id)?;
                if !id.is_empty() && (id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit())) {
                    return Err(Error::invalid(
                        "github.repository_id",
                        "is GitHub's numeric repository id (or empty for any)",
                    ));
                }
                let key = format!("{owner}/{name}").to_lowercase();
                (
                    "github",
                    json!({ "repository_owner": owner, "repository": name, "repository_id": id }),
                    key,
                )
            }
            TrustProvider::CircleCi {
                organization_uuid,
                project_uuid,
            } => {
                let org = required("circleci.organization_uuid", organization_uuid)?;
                let project = required("circleci.project_uuid", project_uuid)?;
                let key = format!("{org}/{project}").to_lowercase();
                (
                    "circleci",
                    json!({ "organization_uuid": org, "project_uuid": project }),
                    key,
                )
            }
            TrustProvider::Buildkite {
                organization_slug,
                pipeline_slug,
            } => {
                let org = required("buildkite.organization_slug", organization_slug)?;
                let pipeline = required("buildkite.pipeline_slug", pipeline_slug)?;
                let key = format!("{org}/{pipeline}").to_lowercase();
                (
                    "buildkite",
                    json!({ "organization_slug": org, "pipeline_slug": pipeline }),
                    key,
                )
            }
            TrustProvider::GitLab {
                project_path,
                git_ref,
            } => {
                let path = required("gitlab.project_path", project_path)?;
                let key = path.to_lowercase();
                (
                    "gitlab",
                    json!({ "project_path": path, "ref": optional("gitlab.ref", git_ref)? }),
                    key,
                )
            }
        })
    }

    pub fn from_stored(provider: &str, claims: &Value) -> Option<TrustProvider> {
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
                repository_id: claim("repository_id"),
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

    /// Whether this policy trusts `identity`. Names compare exactly but without regard to
    /// case, as GitHub, GitLab and Buildkite treat them; ids and UUIDs compare exactly.
    pub fn matches(&self, identity: &CiIdentity) -> bool {
        let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match (self, identity) {
            (
                TrustProvider::GitHub {
                    repository_owner,
                    repository,
                    repository_id,
                },
                CiIdentity::GitHub {
                    repository: full,
                    repository_id: id,
                },
            ) => {
                same(full, &format!("{repository_owner}/{repository}"))
                    && (repository_id.is_empty() || repository_id == id)
            }
            (
                TrustProvider::GitLab {
                    project_path,
                    git_ref,
                },
                CiIdentity::GitLab {
                    project_path: path,
                    git_ref: r,
                },
            ) => {
                same(project_path, path)
                    && (git_ref.is_empty()
                        || git_ref == r
                        || r.strip_prefix("refs/heads/") == Some(git_ref.as_str())
                        || r.strip_prefix("refs/tags/") == Some(git_ref.as_str()))
            }
            (
                TrustProvider::CircleCi {
                    organization_uuid,
                    project_uuid,
                },
                CiIdentity::CircleCi {
                    organization_uuid: org,
                    project_uuid: project,
                },
            ) => same(organization_uuid, org) && same(project_uuid, project),
            (
                TrustProvider::Buildkite {
                    organization_slug,
                    pipeline_slug,
                },
                CiIdentity::Buildkite {
                    organization_slug: org,
                    pipeline_slug: pipeline,
                },
            ) => same(organization_slug, org) && same(pipeline_slug, pipeline),
            _ => false,
        }
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
            repository_id: String::new(),
        };
        let (name, claims, key) = github.to_stored().unwrap();
        assert_eq!(key, "acme/api");
        assert_eq!(
            TrustProvider::from_stored(name, &claims),
            Some(TrustProvider::GitHub {
                repository_owner: "acme".into(),
                repository: "api".into(),
                repository_id: String::new(),
            })
        );
        let bad = TrustProvider::Buildkite {
            organization_slug: String::new(),
            pipeline_slug: "p".into(),
        };
        assert!(bad.to_stored().is_err());
        let slashed = TrustProvider::GitHub {
            repository_owner: "acme".into(),
            repository: "acme/api".into(),
            repository_id: String::new(),
        };
        assert!(slashed.to_stored().is_err());
        let any_ref = TrustProvider::GitLab {
            project_path: "g/p".into(),
            git_ref: " ".into(),
        };
        assert_eq!(any_ref.to_stored().unwrap().1["ref"], "");
    }

    #[test]
    fn github_policies_match_by_name_and_optionally_by_id() {
        let by_name = TrustProvider::GitHub {
            repository_owner: "Octo-Org".into(),
            repository: "octo-repo".into(),
            repository_id: String::new(),
        };
        let token = CiIdentity::GitHub {
            repository: "octo-org/octo-repo".into(),
            repository_id: "74".into(),
        };
        assert!(by_name.matches(&token));
        let by_id = TrustProvider::GitHub {
            repository_owner: "octo-org".into(),
            repository: "octo-repo".into(),
            repository_id: "75".into(),
        };
        assert!(
            !by_id.matches(&token),
            "a re-created repository has a new id"
        );
        let other = CiIdentity::GitHub {
            repository: "octo-org/octo-repo-fork".into(),
            repository_id: "74".into(),
        };
        assert!(!by_name.matches(&other), "no prefix matching");
        let gitlab = TrustProvider::GitLab {
            project_path: "group/app".into(),
            git_ref: "main".into(),
        };
        assert!(gitlab.matches(&CiIdentity::GitLab {
            project_path: "group/app".into(),
            git_ref: "main".into()
        }));
        assert!(!gitlab.matches(&CiIdentity::GitLab {
            project_path: "group/app".into(),
            git_ref: "feature".into()
        }));
        assert!(!by_name.matches(&CiIdentity::GitLab {
            project_path: "octo-org/octo-repo".into(),
            git_ref: String::new()
        }));
    }
}
