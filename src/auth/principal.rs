//! Who is calling: a verified token resolved to its kind and scope of reach.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::token::{Scopes, TokenKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
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

#[derive(Debug, Clone, Serialize)]
pub struct Membership {
    pub organization_id: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    pub token_id: String,
    pub kind: TokenKind,
    pub user_id: Option<String>,
    /// Set for organization, project, pull and build tokens.
    pub organization_id: Option<String>,
    /// Set for project, pull and build tokens.
    pub project_id: Option<String>,
    pub build_id: Option<String>,
    pub machine_id: Option<String>,
    #[serde(serialize_with = "serialize_scopes")]
    pub scopes: Scopes,
    /// For user tokens: the organizations the user belongs to.
    pub memberships: Vec<Membership>,
    pub expires_at: Option<DateTime<Utc>>,
}

fn serialize_scopes<S: serde::Serializer>(scopes: &Scopes, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(scopes.iter().map(|x| x.as_str()))
}

/// Which projects a principal may list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectReach {
    Organizations(Vec<String>),
    Project(String),
    Nothing,
}

impl Principal {
    pub fn role_in(&self, organization_id: &str) -> Option<Role> {
        self.memberships
            .iter()
            .find(|m| m.organization_id == organization_id)
            .map(|m| m.role)
    }

    /// Organizations this principal can see.
    pub fn organization_ids(&self) -> Vec<String> {
        match self.kind {
            TokenKind::User => self
                .memberships
                .iter()
                .map(|m| m.organization_id.clone())
                .collect(),
            TokenKind::Machine => Vec::new(),
            _ => self.organization_id.iter().cloned().collect(),
        }
    }

    pub fn project_reach(&self) -> ProjectReach {
        match self.kind {
            TokenKind::User | TokenKind::Organization => {
                ProjectReach::Organizations(self.organization_ids())
            }
            TokenKind::Project | TokenKind::Pull | TokenKind::Build => match &self.project_id {
                Some(id) => ProjectReach::Project(id.clone()),
                None => ProjectReach::Nothing,
            },
            TokenKind::Machine => ProjectReach::Nothing,
        }
    }

    /// An audit-log actor: (kind, id).
    pub fn actor(&self) -> (&'static str, String) {
        match (&self.user_id, self.kind) {
            (Some(user), TokenKind::User) => ("user", user.clone()),
            _ => ("token", self.token_id.clone()),
        }
    }
}
