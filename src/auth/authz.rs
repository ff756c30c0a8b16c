//! THE authorization module: every "may this principal do that" decision is made here.
//!
//! A decision has three parts, checked in this order:
//! 1. reach: is the target inside the token's organization/project/build/machine?
//!    Targets in other organizations answer `not_found`, so ids don't leak.
//! 2. scope: does the token carry the scope the action needs?
//! 3. role: owner-only actions need the owner role (user tokens).

use super::principal::{Principal, Role};
use super::token::{Scope, TokenKind};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ViewOrganization,
    ManageOrganization,
    CreateProject,
    ViewProject,
    UpdateProject,
    DeleteProject,
    ManageProjectTokens,
    CreateBuild,
    ViewBuild,
    WriteBuild,
    ResetCache,
    PullImages,
    ViewAuditLog,
    ActAsMachine,
}

impl Action {
    fn required_scope(self) -> Scope {
        match self {
            Action::ViewOrganization => Scope::OrgRead,
            Action::ManageOrganization | Action::ViewAuditLog => Scope::OrgAdmin,
            Action::ViewProject => Scope::ProjectsRead,
            Action::CreateProject | Action::UpdateProject | Action::DeleteProject => {
                Scope::ProjectsWrite
            }
            Action::ManageProjectTokens => Scope::TokensWrite,
            Action::CreateBuild | Action::WriteBuild => Scope::BuildsWrite,
            Action::ViewBuild => Scope::BuildsRead,
            Action::ResetCache => Scope::CacheWrite,
            Action::PullImages => Scope::RegistryRead,
            Action::ActAsMachine => Scope::Machine,
        }
    }

    fn owner_only(self) -> bool {
        matches!(
            self,
            Action::ManageOrganization | Action::DeleteProject | Action::ViewAuditLog
        )
    }

    fn describe(self) -> &'static str {
        match self {
            Action::ViewOrganization => "view this organization",
            Action::ManageOrganization => "manage this organization",
            Action::CreateProject => "create projects",
            Action::ViewProject => "view this project",
            Action::UpdateProject => "change this project's settings",
            Action::DeleteProject => "delete this project",
            Action::ManageProjectTokens => "manage this project's tokens",
            Action::CreateBuild => "start builds",
            Action::ViewBuild => "view this build",
            Action::WriteBuild => "report on this build",
            Action::ResetCache => "reset this project's cache",
            Action::PullImages => "pull images",
            Action::ViewAuditLog => "read the audit log",
            Action::ActAsMachine => "act as a builder machine",
        }
    }
}

/// What an action is applied to, with the ids needed to decide reach.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Organization {
        id: &'a str,
    },
    Project {
        id: &'a str,
        organization_id: &'a str,
    },
    Build {
        id: &'a str,
        project_id: &'a str,
        organization_id: &'a str,
    },
    Machine {
        id: &'a str,
    },
}

impl Target<'_> {
    fn organization_id(&self) -> Option<&str> {
        match self {
            Target::Organization { id } => Some(id),
            Target::Project {
                organization_id, ..
            }
            | Target::Build {
                organization_id, ..
            } => Some(organization_id),
            Target::Machine { .. } => None,
        }
    }

    fn project_id(&self) -> Option<&str> {
        match self {
            Target::Project { id, .. } => Some(id),
            Target::Build { project_id, .. } => Some(project_id),
            _ => None,
        }
    }

    fn not_found(&self) -> Error {
        match self {
            Target::Organization { id } => Error::not_found("organization", id),
            Target::Project { id, .. } => Error::not_found("project", id),
            Target::Build { id, .. } => Error::not_found("build", id),
            Target::Machine { id } => Error::not_found("machine", id),
        }
    }
}

enum Reach {
    /// The target is within the token's reach, with the caller's role if it is a user.
    Within(Option<Role>),
    /// Same organization, but this token kind is confined to a narrower target.
    Narrower,
    Outside,
}

fn reach(p: &Principal, target: &Target<'_>) -> Reach {
    let same_org = |org: Option<&str>| org.is_some() && org == p.organization_id.as_deref();
    match p.kind {
        TokenKind::User => match target.organization_id().and_then(|org| p.role_in(org)) {
            Some(role) => Reach::Within(Some(role)),
            None => Reach::Outside,
        },
        TokenKind::Organization => {
            if same_org(target.organization_id()) {
                Reach::Within(None)
            } else {
                Reach::Outside
            }
        }
        TokenKind::Project | TokenKind::Pull => {
            if target.project_id().is_some() && target.project_id() == p.project_id.as_deref() {
                Reach::Within(None)
            } else if same_org(target.organization_id()) {
                Reach::Narrower
            } else {
                Reach::Outside
            }
        }
        TokenKind::Build => match target {
            Target::Build { id, .. } if Some(*id) == p.build_id.as_deref() => Reach::Within(None),
            _ if same_org(target.organization_id()) => Reach::Narrower,
            _ => Reach::Outside,
        },
        TokenKind::Machine => match target {
            Target::Machine { id } if Some(*id) == p.machine_id.as_deref() => Reach::Within(None),
            _ => Reach::Outside,
        },
    }
}

/// Decides whether `principal` may perform `action` on `target`.
pub fn authorize(principal: &Principal, action: Action, target: Target<'_>) -> Result<()> {
    let role = match reach(principal, &target) {
        Reach::Within(role) => role,
        Reach::Narrower => {
            return Err(Error::PermissionDenied(format!(
                "this {} token is limited to a single {}; use a user or organization token to {}",
                principal.kind,
                if principal.kind == TokenKind::Build {
                    "build"
                } else {
                    "project"
                },
                action.describe()
            )));
        }
        Reach::Outside => return Err(target.not_found()),
    };
    if !principal.scopes.contains(action.required_scope()) {
        return Err(Error::PermissionDenied(format!(
            "this {} token lacks the `{}` scope needed to {}; create a token with that scope",
            principal.kind,
            action.required_scope().as_str(),
            action.describe()
        )));
    }
    if action.owner_only() && principal.kind == TokenKind::User && role != Some(Role::Owner) {
        return Err(Error::PermissionDenied(format!(
            "only organization owners can {}; ask an owner of this organization",
            action.describe()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::principal::Membership;

    fn principal(kind: TokenKind) -> Principal {
        Principal {
            token_id: "tok".into(),
            kind,
            user_id: None,
            organization_id: Some("orga".into()),
            project_id: Some("proja".into()),
            build_id: Some("builda".into()),
            machine_id: None,
            scopes: kind.default_scopes(),
            memberships: vec![],
            expires_at: None,
        }
    }

    const PROJ_A: Target<'static> = Target::Project {
        id: "proja",
        organization_id: "orga",
    };
    const PROJ_A2: Target<'static> = Target::Project {
        id: "proja2",
        organization_id: "orga",
    };
    const PROJ_B: Target<'static> = Target::Project {
        id: "projb",
        organization_id: "orgb",
    };

    #[test]
    fn other_organizations_are_not_found_for_every_kind() {
        for kind in TokenKind::ALL {
            let err = authorize(&principal(kind), Action::ViewProject, PROJ_B).unwrap_err();
            assert!(matches!(err, Error::NotFound(_)), "{kind}: {err:?}");
        }
    }

    #[test]
    fn project_tokens_stay_in_their_project() {
        let p = principal(TokenKind::Project);
        authorize(&p, Action::ResetCache, PROJ_A).unwrap();
        let err = authorize(&p, Action::ResetCache, PROJ_A2).unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)));
        let err = authorize(&p, Action::DeleteProject, PROJ_A).unwrap_err();
        assert!(err.to_string().contains("projects:write"), "{err}");
    }

    #[test]
    fn pull_tokens_only_pull() {
        let p = principal(TokenKind::Pull);
        authorize(&p, Action::PullImages, PROJ_A).unwrap();
        assert!(authorize(&p, Action::CreateBuild, PROJ_A).is_err());
    }

    #[test]
    fn build_tokens_only_touch_their_build() {
        let p = principal(TokenKind::Build);
        let own = Target::Build {
            id: "builda",
            project_id: "proja",
            organization_id: "orga",
        };
        let other = Target::Build {
            id: "buildb",
            project_id: "proja",
            organization_id: "orga",
        };
        authorize(&p, Action::WriteBuild, own).unwrap();
        assert!(matches!(
            authorize(&p, Action::WriteBuild, other),
            Err(Error::PermissionDenied(_))
        ));
    }

    #[test]
    fn members_cannot_do_owner_actions() {
        let mut p = principal(TokenKind::User);
        p.memberships = vec![Membership {
            organization_id: "orga".into(),
            role: Role::Member,
        }];
        authorize(&p, Action::UpdateProject, PROJ_A).unwrap();
        let err = authorize(&p, Action::DeleteProject, PROJ_A).unwrap_err();
        assert!(err.to_string().contains("only organization owners"));
        p.memberships[0].role = Role::Owner;
        authorize(&p, Action::DeleteProject, PROJ_A).unwrap();
    }

    #[test]
    fn machines_reach_only_themselves() {
        let mut p = principal(TokenKind::Machine);
        p.machine_id = Some("m1".into());
        authorize(&p, Action::ActAsMachine, Target::Machine { id: "m1" }).unwrap();
        assert!(authorize(&p, Action::ActAsMachine, Target::Machine { id: "m2" }).is_err());
        assert!(authorize(&p, Action::ViewProject, PROJ_A).is_err());
    }
}
