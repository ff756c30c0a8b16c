//! THE authorization module: every "may this principal do that" decision is made here,
//! for single targets (`authorize`), for lists (`visible_projects`,
//! `visible_organizations`) and for tokens (`authorize_token`).
//!
//! A decision has three parts, checked in this order:
//! 1. reach: is the target inside the token's organization/project/build/machine?
//!    Targets in other organizations answer `not_found`, so ids don't leak.
//! 2. scope: does the token carry the scope the action needs?
//! 3. role and kind: owner-only actions need the owner role (user tokens); minting
//!    tokens needs a user, organization or project token; operating the installation
//!    needs an operator (`kiln admin`).

use super::principal::{CiTrust, Principal, PrincipalKind, Role};
use super::token::{Scope, Scopes, TokenKind};
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
    /// Make a build readable by anyone with its share link, or stop.
    ShareBuild,
    ResetCache,
    PullImages,
    /// Mint a short-lived pull token (`depot pull-token`, `depot pull`).
    MintPullToken,
    ViewAuditLog,
    /// See the builder machines serving an organization's projects, and drain them.
    ManageMachines,
    ActAsMachine,
    /// Import models into the model registry (they are public to every puller).
    ManageModels,
    /// Manage the installation: organizations, users, memberships, any token, builder
    /// machines and jobs. Operators only.
    Operate,
}

impl Action {
    fn required_scope(self) -> Scope {
        match self {
            Action::ViewOrganization => Scope::OrgRead,
            Action::ManageOrganization
            | Action::ViewAuditLog
            | Action::ManageMachines
            | Action::ManageModels
            | Action::Operate => Scope::OrgAdmin,
            Action::ViewProject => Scope::ProjectsRead,
            Action::CreateProject
            | Action::UpdateProject
            | Action::DeleteProject
            | Action::ShareBuild => Scope::ProjectsWrite,
            Action::ManageProjectTokens => Scope::TokensWrite,
            Action::CreateBuild | Action::WriteBuild => Scope::BuildsWrite,
            Action::ViewBuild => Scope::BuildsRead,
            Action::ResetCache => Scope::CacheWrite,
            Action::PullImages | Action::MintPullToken => Scope::RegistryRead,
            Action::ActAsMachine => Scope::Machine,
        }
    }

    fn owner_only(self) -> bool {
        matches!(
            self,
            Action::ManageOrganization
                | Action::DeleteProject
                | Action::ViewAuditLog
                | Action::ManageMachines
        )
    }

    /// Actions that issue credentials: a derived token (pull, build, machine) must never
    /// renew or widen itself.
    fn mints_tokens(self) -> bool {
        matches!(self, Action::MintPullToken | Action::ManageProjectTokens)
    }

    fn describe(self) -> &'static str {
        match self {
            Action::ViewOrganization => "view this organization",
            Action::ManageOrganization => "manage this organization",
            Action::CreateProject => "create projects",
            Action::ViewProject => "view projects",
            Action::UpdateProject => "change this project's settings",
            Action::DeleteProject => "delete this project",
            Action::ManageProjectTokens => "manage this project's tokens",
            Action::CreateBuild => "start builds",
            Action::ViewBuild => "view builds",
            Action::ShareBuild => "share builds",
            Action::WriteBuild => "report on this build",
            Action::ResetCache => "reset this project's cache",
            Action::PullImages => "pull images",
            Action::MintPullToken => "mint pull tokens",
            Action::ViewAuditLog => "read the audit log",
            Action::ManageMachines => "see and drain this organization's builder machines",
            Action::ActAsMachine => "act as a builder machine",
            Action::ManageModels => "import models",
            Action::Operate => "manage this installation",
        }
    }
}

/// What an action is applied to, with the ids needed to decide reach.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The installation as a whole (organizations, users, the fleet).
    Instance,
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
    /// A builder machine, with the organization of the project it serves (none for a
    /// machine in the warm pool).
    Machine {
        id: &'a str,
        organization_id: Option<&'a str>,
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
            Target::Machine {
                organization_id, ..
            } => *organization_id,
            Target::Instance => None,
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
            Target::Instance => Error::PermissionDenied(
                "only an operator (with `kiln admin` on the server) or a server admin can do this"
                    .into(),
            ),
            Target::Organization { id } => Error::not_found("organization", id),
            Target::Project { id, .. } => Error::not_found("project", id),
            Target::Build { id, .. } => Error::not_found("build", id),
            Target::Machine { id, .. } => Error::not_found("machine", id),
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
    let kind = match p.kind {
        PrincipalKind::Operator => return Reach::Within(Some(Role::Owner)),
        // A server admin reaches the installation and its machines; inside organizations
        // only as their memberships allow.
        PrincipalKind::Token(TokenKind::User)
            if p.server_admin && matches!(target, Target::Instance | Target::Machine { .. }) =>
        {
            return Reach::Within(Some(Role::Owner));
        }
        PrincipalKind::Ci(trust) => return ci_reach(p, trust, target),
        PrincipalKind::Token(kind) => kind,
    };
    if matches!(target, Target::Instance) {
        return Reach::Outside;
    }
    let same_org = |org: Option<&str>| org.is_some() && org == p.organization_id.as_deref();
    match kind {
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
            Target::Machine { id, .. } if Some(*id) == p.machine_id.as_deref() => {
                Reach::Within(None)
            }
            _ => Reach::Outside,
        },
    }
}

/// A CI job reaches the projects that trust it; a trusted job also their builds, as a
/// project token does. A fork pull request reaches no build: not even its own, whose
/// build token it holds for that.
fn ci_reach(p: &Principal, trust: CiTrust, target: &Target<'_>) -> Reach {
    let Some(grant) = p.ci.as_deref() else {
        return Reach::Outside;
    };
    match (target, trust) {
        (Target::Project { id, .. }, _) if grant.trusts(id) => Reach::Within(None),
        (Target::Build { project_id, .. }, CiTrust::Trusted) if grant.trusts(project_id) => {
            Reach::Within(None)
        }
        _ => Reach::Outside,
    }
}

/// What a CI job may do in a project that trusts it: a trusted job what a project token
/// may; a fork pull request only start builds (isolated ones, see [`isolated_builds`]).
pub fn ci_scopes(trust: CiTrust) -> Scopes {
    match trust {
        CiTrust::Trusted => TokenKind::Project.default_scopes(),
        CiTrust::ForkPullRequest => Scopes::of(&[Scope::BuildsWrite]),
    }
}

/// Whether `principal`'s builds must run isolated: on an ephemeral builder with a cache
/// volume of their own, never reading or writing the project's cache.
pub fn isolated_builds(principal: &Principal) -> bool {
    principal.kind == PrincipalKind::Ci(CiTrust::ForkPullRequest)
}

/// The project a CI job means when it names none: the one its identity last built in,
/// while that project still trusts it. Any tenant can add a policy naming any
/// repository, so which projects trust an identity never decides this; only the
/// identity's own builds do. A fork pull request always names its project.
pub fn ci_default_project(principal: &Principal) -> Result<Option<String>> {
    let Some(grant) = principal.ci.as_deref() else {
        return Ok(None);
    };
    if principal.kind == PrincipalKind::Ci(CiTrust::ForkPullRequest) {
        return Err(Error::InvalidArgument {
            field: "project_id".into(),
            reason: "a fork pull request must name its project: pass --project <id> (or set \
                     DEPOT_PROJECT_ID)"
                .into(),
        });
    }
    if let Some(project) = &grant.default_project {
        return Ok(Some(project.project_id.clone()));
    }
    if grant.listed.is_empty() {
        return Err(Error::PermissionDenied(format!(
            "no project trusts {} yet; add a trust relationship to the project's settings",
            grant.identity.describe()
        )));
    }
    Err(Error::InvalidArgument {
        field: "project_id".into(),
        reason: format!(
            "{} has not built in a project of this Kiln yet; pass --project <id> (or set \
             DEPOT_PROJECT_ID) to say which, and later builds that name none go to the project \
             it last built in",
            grant.identity.describe()
        ),
    })
}

fn lacks_scope(principal: &Principal, action: Action) -> Error {
    Error::PermissionDenied(format!(
        "this {} token lacks the `{}` scope needed to {}; use a token with that scope",
        principal.kind,
        action.required_scope().as_str(),
        action.describe()
    ))
}

fn require_scope(principal: &Principal, action: Action) -> Result<()> {
    if principal.scopes.contains(action.required_scope()) {
        Ok(())
    } else {
        Err(lacks_scope(principal, action))
    }
}

/// Derived tokens (pull, build, machine) cannot issue tokens, not even their own kind.
fn require_minting_kind(principal: &Principal, action: Action) -> Result<()> {
    let derived = matches!(
        principal.kind,
        PrincipalKind::Token(TokenKind::Pull | TokenKind::Build | TokenKind::Machine)
    );
    if action.mints_tokens() && derived {
        return Err(Error::PermissionDenied(format!(
            "a {} token cannot {}; use a user, organization or project token",
            principal.kind,
            action.describe()
        )));
    }
    Ok(())
}

/// Whether a caller may pull from the model registry: anyone when pulls are anonymous,
/// else any valid token with the `registry:read` scope (models are not tenant data).
pub fn authorize_model_pull(principal: Option<&Principal>, anonymous: bool) -> Result<()> {
    if anonymous {
        return Ok(());
    }
    let Some(principal) = principal else {
        return Err(Error::Unauthenticated(
            "this model registry needs a token: log in with any user name and a Kiln token as the password".into(),
        ));
    };
    if principal.kind == PrincipalKind::Operator {
        return Ok(());
    }
    require_scope(principal, Action::PullImages)
}

/// Decides whether `principal` may perform `action` on `target`.
pub fn authorize(principal: &Principal, action: Action, target: Target<'_>) -> Result<()> {
    let role = match reach(principal, &target) {
        Reach::Within(role) => role,
        Reach::Narrower => {
            return Err(Error::PermissionDenied(format!(
                "this {} token is limited to a single {}; use a user or organization token to {}",
                principal.kind,
                if principal.is(TokenKind::Build) {
                    "build"
                } else {
                    "project"
                },
                action.describe()
            )));
        }
        Reach::Outside => {
            if let (Some(grant), Target::Project { id, .. }) = (principal.ci.as_deref(), &target) {
                return Err(Error::NotFound(format!(
                    "project {id:?} not found, or it has no trust relationship for {}; add one \
                     to the project's settings",
                    grant.identity.describe()
                )));
            }
            return Err(target.not_found());
        }
    };
    if action == Action::Operate && !operates(principal) {
        return Err(Target::Instance.not_found());
    }
    require_scope(principal, action)?;
    require_minting_kind(principal, action)?;
    if action.owner_only() && principal.is(TokenKind::User) && role != Some(Role::Owner) {
        return Err(Error::PermissionDenied(format!(
            "only organization owners can {}; ask an owner of this organization",
            action.describe()
        )));
    }
    Ok(())
}

/// Operators at the console, and server admins signed in as themselves.
fn operates(principal: &Principal) -> bool {
    principal.kind == PrincipalKind::Operator
        || (principal.is(TokenKind::User) && principal.server_admin)
}

/// Which rows of a listing a principal may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    /// Every row (operators).
    All,
    /// Rows of these organizations (possibly none).
    Organizations(Vec<String>),
    /// The rows of these projects.
    Projects(Vec<String>),
}

/// The projects `principal` may list for `action` (a read such as `ViewProject` or
/// `ViewBuild`). A token without the action's scope is refused rather than shown an
/// empty list, so a pull token learns it cannot read settings.
pub fn visible_projects(principal: &Principal, action: Action) -> Result<Visible> {
    require_scope(principal, action)?;
    Ok(match principal.kind {
        PrincipalKind::Operator => Visible::All,
        PrincipalKind::Token(TokenKind::User | TokenKind::Organization) => {
            Visible::Organizations(principal.organization_ids())
        }
        PrincipalKind::Token(TokenKind::Project | TokenKind::Pull | TokenKind::Build) => {
            match &principal.project_id {
                Some(id) => Visible::Projects(vec![id.clone()]),
                None => Visible::Organizations(Vec::new()),
            }
        }
        PrincipalKind::Ci(_) => Visible::Projects(
            principal
                .ci
                .iter()
                .flat_map(|g| g.projects().into_iter().map(|p| p.project_id))
                .collect(),
        ),
        PrincipalKind::Token(TokenKind::Machine) => Visible::Organizations(Vec::new()),
    })
}

/// The organizations `principal` may list. Project and build tokens see their own
/// organization (they already see its name next to their project); pull and machine
/// tokens see none and are told so.
pub fn visible_organizations(principal: &Principal) -> Result<Visible> {
    let own = || Visible::Organizations(principal.organization_ids());
    match principal.kind {
        PrincipalKind::Operator => Ok(Visible::All),
        PrincipalKind::Token(TokenKind::User | TokenKind::Organization) => {
            require_scope(principal, Action::ViewOrganization).map(|()| own())
        }
        PrincipalKind::Token(TokenKind::Project | TokenKind::Build) | PrincipalKind::Ci(_)
            if principal.scopes.contains(Scope::ProjectsRead)
                || principal.scopes.contains(Scope::BuildsRead) =>
        {
            Ok(own())
        }
        PrincipalKind::Token(_) | PrincipalKind::Ci(_) => {
            Err(lacks_scope(principal, Action::ViewOrganization))
        }
    }
}

/// A token as authorization sees it: its kind and what it is scoped to.
#[derive(Debug, Clone, Copy)]
pub struct TokenSubject<'a> {
    pub kind: TokenKind,
    pub user_id: Option<&'a str>,
    pub organization_id: Option<&'a str>,
    pub project_id: Option<&'a str>,
}

/// Whether `principal` may see, rename or revoke the token `subject`. A token is
/// managed through what it is scoped to; a user may always manage their own user
/// tokens. Tokens Kiln mints for itself (build, machine) and other users' tokens are
/// `not_found`.
pub fn authorize_token(
    principal: &Principal,
    token_id: &str,
    subject: TokenSubject<'_>,
) -> Result<()> {
    if principal.kind == PrincipalKind::Operator {
        return Ok(());
    }
    let not_found = || Error::not_found("token", token_id);
    match (subject.kind, subject.project_id, subject.organization_id) {
        (TokenKind::User, ..) => {
            let own = principal.is(TokenKind::User)
                && subject.user_id.is_some()
                && subject.user_id == principal.user_id.as_deref();
            if own { Ok(()) } else { Err(not_found()) }
        }
        (TokenKind::Project | TokenKind::Pull, Some(project), Some(org)) => authorize(
            principal,
            Action::ManageProjectTokens,
            Target::Project {
                id: project,
                organization_id: org,
            },
        ),
        (TokenKind::Organization, None, Some(org)) => authorize(
            principal,
            Action::ManageOrganization,
            Target::Organization { id: org },
        ),
        _ => Err(not_found()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::principal::Membership;

    fn principal(kind: TokenKind) -> Principal {
        Principal {
            token_id: "tok".into(),
            kind: PrincipalKind::Token(kind),
            user_id: None,
            organization_id: Some("orga".into()),
            project_id: Some("proja".into()),
            build_id: Some("builda".into()),
            machine_id: None,
            scopes: kind.default_scopes(),
            memberships: vec![],
            server_admin: false,
            expires_at: None,
            ci: None,
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
        authorize(
            &p,
            Action::ActAsMachine,
            Target::Machine {
                id: "m1",
                organization_id: None,
            },
        )
        .unwrap();
        assert!(
            authorize(
                &p,
                Action::ActAsMachine,
                Target::Machine {
                    id: "m2",
                    organization_id: None
                }
            )
            .is_err()
        );
        assert!(authorize(&p, Action::ViewProject, PROJ_A).is_err());
    }

    #[test]
    fn pull_tokens_cannot_read_settings_or_mint_tokens() {
        let p = principal(TokenKind::Pull);
        let err = visible_projects(&p, Action::ViewProject).unwrap_err();
        assert!(err.to_string().contains("projects:read"), "{err}");
        assert!(authorize(&p, Action::ViewProject, PROJ_A).is_err());
        let err = authorize(&p, Action::MintPullToken, PROJ_A).unwrap_err();
        assert!(err.to_string().contains("cannot mint"), "{err}");
        assert!(visible_organizations(&p).is_err());
        // A project token mints pull tokens for its own project only.
        let project = principal(TokenKind::Project);
        authorize(&project, Action::MintPullToken, PROJ_A).unwrap();
        assert!(authorize(&project, Action::MintPullToken, PROJ_A2).is_err());
        assert!(authorize(&principal(TokenKind::Build), Action::MintPullToken, PROJ_A).is_err());
    }

    #[test]
    fn lists_follow_reach_and_scope() {
        assert_eq!(
            visible_projects(&principal(TokenKind::Project), Action::ViewProject).unwrap(),
            Visible::Projects(vec!["proja".into()])
        );
        assert_eq!(
            visible_projects(&principal(TokenKind::Organization), Action::ViewProject).unwrap(),
            Visible::Organizations(vec!["orga".into()])
        );
        assert_eq!(
            visible_projects(&Principal::operator("ops"), Action::ViewProject).unwrap(),
            Visible::All
        );
        assert_eq!(
            visible_organizations(&principal(TokenKind::Project)).unwrap(),
            Visible::Organizations(vec!["orga".into()])
        );
    }

    #[test]
    fn server_admins_operate_through_their_own_user_tokens_only() {
        let mut admin = principal(TokenKind::User);
        admin.server_admin = true;
        authorize(&admin, Action::Operate, Target::Instance).unwrap();
        let warm = Target::Machine {
            id: "m1",
            organization_id: None,
        };
        authorize(&admin, Action::ManageMachines, warm).unwrap();
        // Not a way into organizations the admin does not belong to.
        assert!(authorize(&admin, Action::ViewProject, PROJ_B).is_err());
        // Only a user token carries it; never a derived or narrower one.
        for kind in TokenKind::ALL.into_iter().filter(|k| *k != TokenKind::User) {
            let mut p = principal(kind);
            p.server_admin = true;
            assert!(
                authorize(&p, Action::Operate, Target::Instance).is_err(),
                "{kind}"
            );
        }
        let plain = principal(TokenKind::User);
        assert!(authorize(&plain, Action::ManageMachines, warm).is_err());
    }

    #[test]
    fn only_operators_operate() {
        for kind in TokenKind::ALL {
            let err = authorize(&principal(kind), Action::Operate, Target::Instance).unwrap_err();
            assert!(matches!(err, Error::PermissionDenied(_)), "{kind}: {err:?}");
        }
        let ops = Principal::operator("ops");
        authorize(&ops, Action::Operate, Target::Instance).unwrap();
        authorize(&ops, Action::DeleteProject, PROJ_B).unwrap();
        assert!(
            authorize(
                &ops,
                Action::ActAsMachine,
                Target::Machine {
                    id: "m1",
                    organization_id: None
                }
            )
            .is_err()
        );
    }

    #[test]
    fn tokens_are_managed_through_their_subject() {
        let mut owner = principal(TokenKind::User);
        owner.user_id = Some("u1".into());
        owner.memberships = vec![Membership {
            organization_id: "orga".into(),
            role: Role::Owner,
        }];
        let project_token = TokenSubject {
            kind: TokenKind::Project,
            user_id: None,
            organization_id: Some("orga"),
            project_id: Some("proja"),
        };
        authorize_token(&owner, "t", project_token).unwrap();
        let own = TokenSubject {
            kind: TokenKind::User,
            user_id: Some("u1"),
            organization_id: None,
            project_id: None,
        };
        authorize_token(&owner, "t", own).unwrap();
        let someone_else = TokenSubject {
            user_id: Some("u2"),
            ..own
        };
        assert!(matches!(
            authorize_token(&owner, "t", someone_else),
            Err(Error::NotFound(_))
        ));
        let build = TokenSubject {
            kind: TokenKind::Build,
            ..project_token
        };
        assert!(matches!(
            authorize_token(&owner, "t", build),
            Err(Error::NotFound(_))
        ));
        // A project token holds no tokens:write scope.
        assert!(authorize_token(&principal(TokenKind::Project), "t", project_token).is_err());
    }
}
