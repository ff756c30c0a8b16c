//! Who is calling: a verified token (or an operator at the `kiln admin` console),
//! resolved to its kind and scope of reach.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::token::{Scope, Scopes, TokenKind};
use crate::db::audit::AuditEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// What kind of caller a principal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A caller that presented a token of this kind.
    Token(TokenKind),
    /// An operator running `kiln admin` with direct access to the database: reaches
    /// everything, and alone may manage organizations, users and the fleet.
    Operator,
    /// A CI job that presented its provider's OIDC token, acting on the projects whose
    /// trust relationships name its identity.
    Ci(CiTrust),
}

/// How far a CI job's token is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CiTrust {
    /// A job of the repository itself (GitHub Actions, GitLab, CircleCI, Buildkite).
    Trusted,
    /// A pull request from a fork, vouched for by a fork pull request issuer (Kiln's own):
    /// its code is anyone's, so it is isolated.
    ForkPullRequest,
}

/// What a CI token was verified to be, and which projects trust it. Whether a project
/// trusts the token is looked up for that project alone (`auth::ci::confirm`), so other
/// projects' policies, however many, never decide it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CiGrant {
    pub issuer: String,
    pub subject: String,
    pub identity: crate::auth::trust::CiIdentity,
    /// How the policies that trust it are found.
    #[serde(skip)]
    #[schema(ignore)]
    pub lookup: crate::db::trust_policies::IdentityLookup,
    /// Where its builds are remembered (`builds.ci_identity`).
    #[serde(skip)]
    #[schema(ignore)]
    pub history_key: String,
    /// The project it builds in when it names none: the one it last built in, while
    /// that project still trusts it. Only its own builds decide this.
    pub default_project: Option<TrustedProject>,
    /// Projects that trust it, for listings (at most `auth::ci::MAX_LISTED`).
    pub listed: Vec<TrustedProject>,
    /// Projects confirmed to trust it while serving this request.
    #[serde(skip)]
    #[schema(ignore)]
    pub confirmed: Confirmed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TrustedProject {
    pub project_id: String,
    pub organization_id: String,
}

/// Projects looked up one at a time during a request (a principal lives for one).
#[derive(Debug, Default)]
pub struct Confirmed(std::sync::Mutex<Vec<TrustedProject>>);

impl Clone for Confirmed {
    fn clone(&self) -> Self {
        Confirmed(std::sync::Mutex::new(self.all()))
    }
}

impl Confirmed {
    pub fn all(&self) -> Vec<TrustedProject> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn add(&self, project: TrustedProject) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !all.contains(&project) {
            all.push(project);
        }
    }
}

impl Confirmed {
    fn contains(&self, project_id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|p| p.project_id == project_id)
    }
}

impl CiGrant {
    pub fn trusts(&self, project_id: &str) -> bool {
        self.default_project
            .iter()
            .chain(&self.listed)
            .any(|p| p.project_id == project_id)
            || self.confirmed.contains(project_id)
    }

    /// Every project known to trust it: its default, the listed ones and those
    /// confirmed one by one.
    pub fn projects(&self) -> Vec<TrustedProject> {
        let mut all: Vec<TrustedProject> = self.default_project.iter().cloned().collect();
        for p in self.listed.iter().cloned().chain(self.confirmed.all()) {
            if !all.contains(&p) {
                all.push(p);
            }
        }
        all
    }
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Token(kind) => kind.as_str(),
            PrincipalKind::Operator => "operator",
            PrincipalKind::Ci(CiTrust::Trusted) => "CI",
            PrincipalKind::Ci(CiTrust::ForkPullRequest) => "fork pull request",
        }
    }
}

impl std::fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PrincipalKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Membership {
    pub organization_id: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Principal {
    /// The token's id; for an operator, their login name.
    pub token_id: String,
    #[schema(value_type = String)]
    pub kind: PrincipalKind,
    pub user_id: Option<String>,
    /// Set for organization, project, pull and build tokens.
    pub organization_id: Option<String>,
    /// Set for project, pull and build tokens.
    pub project_id: Option<String>,
    pub build_id: Option<String>,
    pub machine_id: Option<String>,
    #[serde(serialize_with = "serialize_scopes")]
    #[schema(value_type = Vec<String>)]
    pub scopes: Scopes,
    /// For user tokens: the organizations the user belongs to.
    pub memberships: Vec<Membership>,
    /// For user tokens: the user is a server admin, who operates the installation.
    pub server_admin: bool,
    pub expires_at: Option<DateTime<Utc>>,
    /// For CI principals: the verified identity and the projects that trust it.
    #[schema(value_type = Option<CiGrant>)]
    pub ci: Option<Arc<CiGrant>>,
}

fn serialize_scopes<S: serde::Serializer>(scopes: &Scopes, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(scopes.iter().map(|x| x.as_str()))
}

impl Principal {
    /// The operator of this installation, named for the audit log (`$USER`).
    pub fn operator(name: &str) -> Principal {
        Principal {
            token_id: name.to_string(),
            kind: PrincipalKind::Operator,
            user_id: None,
            organization_id: None,
            project_id: None,
            build_id: None,
            machine_id: None,
            // Everything but acting as a builder machine.
            scopes: Scopes::of(
                &Scope::ALL
                    .into_iter()
                    .filter(|s| *s != Scope::Machine)
                    .collect::<Vec<_>>(),
            ),
            memberships: Vec::new(),
            server_admin: false,
            expires_at: None,
            ci: None,
        }
    }

    /// Whether this caller presented a token of `kind`.
    pub fn is(&self, kind: TokenKind) -> bool {
        self.kind == PrincipalKind::Token(kind)
    }

    pub fn role_in(&self, organization_id: &str) -> Option<Role> {
        self.memberships
            .iter()
            .find(|m| m.organization_id == organization_id)
            .map(|m| m.role)
    }

    /// Organizations this principal belongs to (none for operators and machines, whose
    /// reach is not organizational).
    pub fn organization_ids(&self) -> Vec<String> {
        match self.kind {
            PrincipalKind::Token(TokenKind::User) => self
                .memberships
                .iter()
                .map(|m| m.organization_id.clone())
                .collect(),
            PrincipalKind::Token(TokenKind::Machine) | PrincipalKind::Operator => Vec::new(),
            PrincipalKind::Ci(_) => {
                let mut orgs: Vec<String> = self
                    .ci
                    .iter()
                    .flat_map(|g| g.projects().into_iter().map(|p| p.organization_id))
                    .collect();
                orgs.sort();
                orgs.dedup();
                orgs
            }
            PrincipalKind::Token(_) => self.organization_id.iter().cloned().collect(),
        }
    }

    /// An audit-log actor: (kind, id).
    pub fn actor(&self) -> (&'static str, String) {
        match (&self.user_id, self.kind) {
            (_, PrincipalKind::Operator) => ("admin", self.token_id.clone()),
            (_, PrincipalKind::Ci(_)) => (
                "ci",
                self.ci
                    .as_ref()
                    .map_or_else(|| self.token_id.clone(), |g| g.subject.clone()),
            ),
            (Some(user), PrincipalKind::Token(TokenKind::User)) => ("user", user.clone()),
            _ => ("token", self.token_id.clone()),
        }
    }

    /// An audit entry whose actor is this principal.
    pub fn audit(&self, action: &str) -> AuditEvent {
        let (kind, id) = self.actor();
        AuditEvent::new(action, (kind, Some(id)))
    }
}
