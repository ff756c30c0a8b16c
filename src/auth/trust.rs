//! Trust relationships as authentication sees them: which CI identity, of which issuer, a
//! policy names. Whether a token's identity matches a stored policy is decided in SQL
//! (`db::trust_policies`), per project; projects' CRUD of policies lives in
//! `projects::trust`; what a matched identity may do lives in `authz`.

use serde_json::{Value, json};

use crate::config::{OidcConfig, TrustedProvider};
use crate::db::trust_policies::IdentityLookup;
use crate::error::{Error, Result};

/// The public issuers of the providers that have one (CircleCI's is per organization).
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";
pub const GITLAB_ISSUER: &str = "https://gitlab.com";
pub const BUILDKITE_ISSUER: &str = "https://agent.buildkite.com";
pub const CIRCLECI_ISSUER_PREFIX: &str = "https://oidc.circleci.com/org/";

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
        /// The issuer whose tokens are trusted. Empty on a new policy: the one GitHub
        /// issuer this server trusts (GitHub.com's unless the operator set another).
        #[serde(default)]
        issuer: String,
    },
    #[serde(rename = "circleci")]
    CircleCi {
        organization_uuid: String,
        project_uuid: String,
        /// Empty on a new policy: the organization's issuer,
        /// `https://oidc.circleci.com/org/<organization_uuid>`.
        #[serde(default)]
        issuer: String,
    },
    #[serde(rename = "buildkite")]
    Buildkite {
        organization_slug: String,
        pipeline_slug: String,
        /// Empty on a new policy: the one Buildkite issuer this server trusts.
        #[serde(default)]
        issuer: String,
    },
    /// `git_ref` empty: any ref.
    #[serde(rename = "gitlab")]
    GitLab {
        project_path: String,
        #[serde(default, rename = "ref")]
        git_ref: String,
        /// Empty on a new policy: the one GitLab this server trusts (GitLab.com unless the
        /// operator set another); required when several are trusted.
        #[serde(default)]
        issuer: String,
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

    /// What the policies that trust this identity, under `policy_issuer`, are found by.
    pub fn lookup(&self, policy_issuer: &str) -> IdentityLookup {
        let (repository_id, git_ref) = match self {
            CiIdentity::GitHub { repository_id, .. } => (repository_id.clone(), String::new()),
            CiIdentity::GitLab { git_ref, .. } => (String::new(), git_ref.clone()),
            _ => (String::new(), String::new()),
        };
        IdentityLookup {
            provider: self.provider(),
            issuer: policy_issuer.to_string(),
            match_key: self.match_key(),
            repository_id,
            git_ref,
        }
    }

    /// The same identity, whatever its ref: where its builds are remembered, under the
    /// issuer of the token itself.
    pub fn history_key(&self, token_issuer: &str) -> String {
        let id = match self {
            CiIdentity::GitHub { repository_id, .. } => repository_id.as_str(),
            _ => "",
        };
        format!(
            "{token_issuer} {} {} {id}",
            self.provider(),
            self.match_key()
        )
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

/// The issuers trust policies may name: those the operator trusts
/// (`oidc.trusted_issuers`), by provider.
#[derive(Debug, Clone, Default)]
pub struct PolicyIssuers {
    configured: Vec<(&'static str, String)>,
}

impl PolicyIssuers {
    pub fn from_config(oidc: &OidcConfig) -> PolicyIssuers {
        PolicyIssuers {
            configured: oidc
                .trusted_issuers
                .iter()
                .filter_map(|c| {
                    let provider = match c.provider {
                        TrustedProvider::Github => "github",
                        TrustedProvider::Gitlab => "gitlab",
                        TrustedProvider::Circleci => "circleci",
                        TrustedProvider::Buildkite => "buildkite",
                        // Fork pull request issuers vouch for GitHub repositories; their
                        // tokens match GitHub policies (see `fork_policy_issuer`).
                        TrustedProvider::GithubFork => return None,
                    };
                    Some((provider, c.issuer.clone()))
                })
                .collect(),
        }
    }

    /// The GitHub issuer whose policies fork pull request tokens (Kiln's own, or another
    /// fork issuer's) count for: the one new GitHub policies name by default, GitHub.com's
    /// when several are trusted.
    pub fn fork_github_issuer(&self) -> String {
        match self.of("github").as_slice() {
            [one] => one.to_string(),
            _ => GITHUB_ISSUER.to_string(),
        }
    }

    fn of(&self, provider: &str) -> Vec<&str> {
        self.configured
            .iter()
            .filter(|(p, _)| *p == provider)
            .map(|(_, i)| i.as_str())
            .collect()
    }

    /// The issuer a new policy names: `given`, which must be one the operator trusts for
    /// that provider (or its public one); or, when empty, the one such issuer (the
    /// provider's public one when none is configured; CircleCI's per-organization one
    /// when several are).
    fn resolve(&self, provider: &str, given: &str, public: String) -> Result<String> {
        let trusted = self.of(provider);
        let given = given.trim().trim_end_matches('/');
        if !given.is_empty() {
            return match trusted.iter().find(|i| i.trim_end_matches('/') == given) {
                Some(issuer) => Ok(issuer.to_string()),
                None if given == public => Ok(public),
                None => Err(Error::invalid(
                    format!("{provider}.issuer"),
                    format!(
                        "is not a {provider} issuer this server trusts; use one of {:?}, or ask \
                         the operator to add it to oidc.trusted_issuers",
                        if trusted.is_empty() {
                            vec![public.as_str()]
                        } else {
                            trusted
                        }
                    ),
                )),
            };
        }
        // CircleCI's issuers are per organization: the organization's own when several
        // are trusted.
        if provider == "circleci" && (trusted.len() > 1 || trusted.contains(&public.as_str())) {
            return Ok(public);
        }
        match trusted.as_slice() {
            [] => Ok(public),
            [one] => Ok(one.to_string()),
            several => Err(Error::invalid(
                format!("{provider}.issuer"),
                format!(
                    "is required: this server trusts several {provider} issuers ({several:?}); \
                     say which one this policy trusts"
                ),
            )),
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

/// A policy as stored: its provider, issuer, match fields and match key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPolicy {
    pub provider: &'static str,
    pub issuer: String,
    pub claims: Value,
    pub match_key: String,
}

impl TrustProvider {
    pub fn issuer(&self) -> &str {
        match self {
            TrustProvider::GitHub { issuer, .. }
            | TrustProvider::CircleCi { issuer, .. }
            | TrustProvider::Buildkite { issuer, .. }
            | TrustProvider::GitLab { issuer, .. } => issuer,
        }
    }

    /// Validated and trimmed, as stored, with its issuer resolved among `issuers`.
    pub fn to_stored(&self, issuers: &PolicyIssuers) -> Result<StoredPolicy> {
        Ok(match self {
            TrustProvider::GitHub {
                repository_owner,
                repository,
                repository_id,
                issuer,
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
                StoredPolicy {
                    provider: "github",
                    issuer: issuers.resolve("github", issuer, GITHUB_ISSUER.into())?,
                    match_key: format!("{owner}/{name}").to_lowercase(),
                    claims: json!({ "repository_owner": owner, "repository": name, "repository_id": id }),
                }
            }
            TrustProvider::CircleCi {
                organization_uuid,
                project_uuid,
                issuer,
            } => {
                let org = required("circleci.organization_uuid", organization_uuid)?;
                let project = required("circleci.project_uuid", project_uuid)?;
                StoredPolicy {
                    provider: "circleci",
                    issuer: issuers.resolve(
                        "circleci",
                        issuer,
                        format!("{CIRCLECI_ISSUER_PREFIX}{org}"),
                    )?,
                    match_key: format!("{org}/{project}").to_lowercase(),
                    claims: json!({ "organization_uuid": org, "project_uuid": project }),
                }
            }
            TrustProvider::Buildkite {
                organization_slug,
                pipeline_slug,
                issuer,
            } => {
                let org = required("buildkite.organization_slug", organization_slug)?;
                let pipeline = required("buildkite.pipeline_slug", pipeline_slug)?;
                StoredPolicy {
                    provider: "buildkite",
                    issuer: issuers.resolve("buildkite", issuer, BUILDKITE_ISSUER.into())?,
                    match_key: format!("{org}/{pipeline}").to_lowercase(),
                    claims: json!({ "organization_slug": org, "pipeline_slug": pipeline }),
                }
            }
            TrustProvider::GitLab {
                project_path,
                git_ref,
                issuer,
            } => {
                let path = required("gitlab.project_path", project_path)?;
                StoredPolicy {
                    provider: "gitlab",
                    issuer: issuers.resolve("gitlab", issuer, GITLAB_ISSUER.into())?,
                    match_key: path.to_lowercase(),
                    claims: json!({ "project_path": path, "ref": optional("gitlab.ref", git_ref)? }),
                }
            }
        })
    }

    pub fn from_stored(provider: &str, issuer: &str, claims: &Value) -> Option<TrustProvider> {
        let claim = |key: &str| {
            claims
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let issuer = issuer.to_string();
        Some(match provider {
            "github" => TrustProvider::GitHub {
                repository_owner: claim("repository_owner"),
                repository: claim("repository"),
                repository_id: claim("repository_id"),
                issuer,
            },
            "circleci" => TrustProvider::CircleCi {
                organization_uuid: claim("organization_uuid"),
                project_uuid: claim("project_uuid"),
                issuer,
            },
            "buildkite" => TrustProvider::Buildkite {
                organization_slug: claim("organization_slug"),
                pipeline_slug: claim("pipeline_slug"),
                issuer,
            },
            "gitlab" => TrustProvider::GitLab {
                project_path: claim("project_path"),
                git_ref: claim("ref"),
                issuer,
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuers(configured: &[(&'static str, &str)]) -> PolicyIssuers {
        PolicyIssuers {
            configured: configured
                .iter()
                .map(|(p, i)| (*p, i.to_string()))
                .collect(),
        }
    }

    fn gitlab(issuer: &str) -> TrustProvider {
        TrustProvider::GitLab {
            project_path: "g/p".into(),
            git_ref: String::new(),
            issuer: issuer.into(),
        }
    }

    #[test]
    fn providers_round_trip_and_validate() {
        let github = TrustProvider::GitHub {
            repository_owner: " acme ".into(),
            repository: "api".into(),
            repository_id: String::new(),
            issuer: String::new(),
        };
        let stored = github.to_stored(&PolicyIssuers::default()).unwrap();
        assert_eq!(stored.match_key, "acme/api");
        assert_eq!(stored.issuer, GITHUB_ISSUER);
        assert_eq!(
            TrustProvider::from_stored(stored.provider, &stored.issuer, &stored.claims),
            Some(TrustProvider::GitHub {
                repository_owner: "acme".into(),
                repository: "api".into(),
                repository_id: String::new(),
                issuer: GITHUB_ISSUER.into(),
            })
        );
        let bad = TrustProvider::Buildkite {
            organization_slug: String::new(),
            pipeline_slug: "p".into(),
            issuer: String::new(),
        };
        assert!(bad.to_stored(&PolicyIssuers::default()).is_err());
        let slashed = TrustProvider::GitHub {
            repository_owner: "acme".into(),
            repository: "acme/api".into(),
            repository_id: String::new(),
            issuer: String::new(),
        };
        assert!(slashed.to_stored(&PolicyIssuers::default()).is_err());
        let any_ref = TrustProvider::GitLab {
            project_path: "g/p".into(),
            git_ref: " ".into(),
            issuer: String::new(),
        };
        assert_eq!(
            any_ref.to_stored(&PolicyIssuers::default()).unwrap().claims["ref"],
            ""
        );
    }

    #[test]
    fn a_policy_names_one_trusted_issuer() {
        let none = PolicyIssuers::default();
        assert_eq!(gitlab("").to_stored(&none).unwrap().issuer, GITLAB_ISSUER);
        let one = issuers(&[("gitlab", "https://gitlab.example")]);
        assert_eq!(
            gitlab("").to_stored(&one).unwrap().issuer,
            "https://gitlab.example"
        );
        let two = issuers(&[
            ("gitlab", "https://gitlab.example"),
            ("gitlab", "https://gitlab.com"),
        ]);
        let err = gitlab("").to_stored(&two).unwrap_err().to_string();
        assert!(err.contains("several gitlab issuers"), "{err}");
        assert_eq!(
            gitlab("https://gitlab.com/")
                .to_stored(&two)
                .unwrap()
                .issuer,
            "https://gitlab.com"
        );
        let err = gitlab("https://evil.example")
            .to_stored(&two)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a gitlab issuer this server trusts"),
            "{err}"
        );
        let circle = TrustProvider::CircleCi {
            organization_uuid: "o-1".into(),
            project_uuid: "p-2".into(),
            issuer: String::new(),
        };
        assert_eq!(
            circle.to_stored(&none).unwrap().issuer,
            "https://oidc.circleci.com/org/o-1"
        );
    }

    #[test]
    fn fork_tokens_count_for_the_default_github_issuer() {
        assert_eq!(PolicyIssuers::default().fork_github_issuer(), GITHUB_ISSUER);
        let ghes = issuers(&[("github", "https://ghe.example/_services/token")]);
        assert_eq!(
            ghes.fork_github_issuer(),
            "https://ghe.example/_services/token"
        );
        let both = issuers(&[
            ("github", "https://ghe.example/_services/token"),
            ("github", GITHUB_ISSUER),
        ]);
        assert_eq!(both.fork_github_issuer(), GITHUB_ISSUER);
    }

    #[test]
    fn identities_are_looked_up_by_issuer_key_and_qualifier() {
        let token = CiIdentity::GitHub {
            repository: "Octo-Org/octo-repo".into(),
            repository_id: "74".into(),
        };
        let lookup = token.lookup(GITHUB_ISSUER);
        assert_eq!(lookup.provider, "github");
        assert_eq!(lookup.match_key, "octo-org/octo-repo");
        assert_eq!(lookup.repository_id, "74");
        assert_ne!(
            token.history_key(GITHUB_ISSUER),
            token.history_key("https://kiln.example"),
            "a fork pull request's builds are remembered apart from the repository's own"
        );
    }
}
