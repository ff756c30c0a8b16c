//! Token kinds, scopes, minting and hashing, and [`issue`], the one place a token is
//! created. Only the SHA-256 of a token is stored.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgExecutor;

use crate::db::ids::random_alphanumeric;
use crate::db::tokens::{self as rows, TokenInfo, TokenRow};
use crate::error::{Error, Result};

pub const TOKEN_PREFIX: &str = "kiln_";
const SECRET_LEN: usize = 40;
/// Longest Authorization value we look at; longer ones are rejected before hashing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024 + 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Acts as a user across every organization they belong to.
    User,
    /// Acts on one organization and all its projects.
    Organization,
    /// Acts on one project.
    Project,
    /// Pulls images of one project from the registry; short-lived.
    Pull,
    /// Drives one build; minted by CreateBuild.
    Build,
    /// Identifies one builder machine's agent.
    Machine,
}

impl TokenKind {
    pub const ALL: [TokenKind; 6] = [
        TokenKind::User,
        TokenKind::Organization,
        TokenKind::Project,
        TokenKind::Pull,
        TokenKind::Build,
        TokenKind::Machine,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::User => "user",
            TokenKind::Organization => "organization",
            TokenKind::Project => "project",
            TokenKind::Pull => "pull",
            TokenKind::Build => "build",
            TokenKind::Machine => "machine",
        }
    }

    /// Short code embedded in the token text, so a leaked token says what it is.
    fn code(self) -> &'static str {
        match self {
            TokenKind::User => "u",
            TokenKind::Organization => "o",
            TokenKind::Project => "p",
            TokenKind::Pull => "pl",
            TokenKind::Build => "b",
            TokenKind::Machine => "m",
        }
    }

    /// What a token of this kind may do when no narrower scopes were asked for.
    pub fn default_scopes(self) -> Scopes {
        use Scope::*;
        match self {
            TokenKind::User | TokenKind::Organization => Scopes::of(&[
                OrgRead,
                OrgAdmin,
                ProjectsRead,
                ProjectsWrite,
                BuildsRead,
                BuildsWrite,
                CacheWrite,
                RegistryRead,
                TokensWrite,
            ]),
            TokenKind::Project => Scopes::of(&[
                ProjectsRead,
                BuildsRead,
                BuildsWrite,
                CacheWrite,
                RegistryRead,
            ]),
            TokenKind::Pull => Scopes::of(&[RegistryRead]),
            TokenKind::Build => Scopes::of(&[BuildsRead, BuildsWrite, RegistryRead]),
            TokenKind::Machine => Scopes::of(&[Machine]),
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TokenKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TokenKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s || (s == "org" && *k == TokenKind::Organization))
            .ok_or_else(|| {
                format!("unknown token kind {s:?}; expected one of user, organization, project, pull, build, machine")
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Scope {
    OrgRead = 1 << 0,
    OrgAdmin = 1 << 1,
    ProjectsRead = 1 << 2,
    ProjectsWrite = 1 << 3,
    BuildsRead = 1 << 4,
    BuildsWrite = 1 << 5,
    CacheWrite = 1 << 6,
    RegistryRead = 1 << 7,
    TokensWrite = 1 << 8,
    Machine = 1 << 9,
}

impl Scope {
    pub const ALL: [Scope; 10] = [
        Scope::OrgRead,
        Scope::OrgAdmin,
        Scope::ProjectsRead,
        Scope::ProjectsWrite,
        Scope::BuildsRead,
        Scope::BuildsWrite,
        Scope::CacheWrite,
        Scope::RegistryRead,
        Scope::TokensWrite,
        Scope::Machine,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::OrgRead => "org:read",
            Scope::OrgAdmin => "org:admin",
            Scope::ProjectsRead => "projects:read",
            Scope::ProjectsWrite => "projects:write",
            Scope::BuildsRead => "builds:read",
            Scope::BuildsWrite => "builds:write",
            Scope::CacheWrite => "cache:write",
            Scope::RegistryRead => "registry:read",
            Scope::TokensWrite => "tokens:write",
            Scope::Machine => "machine",
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Scope::ALL.iter().map(|x| x.as_str()).collect();
                format!("unknown scope {s:?}; expected one of {}", known.join(", "))
            })
    }
}

/// A set of scopes, as a bitmask so the hot path checks it without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u16);

impl Scopes {
    pub fn of(scopes: &[Scope]) -> Self {
        Scopes(scopes.iter().fold(0, |acc, s| acc | *s as u16))
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope as u16 != 0
    }

    pub fn is_subset_of(self, other: Scopes) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    pub fn to_strings(self) -> Vec<String> {
        self.iter().map(|s| s.as_str().to_string()).collect()
    }

    /// Parses stored scope names; unknown names (from a newer version) are ignored.
    pub fn from_stored(names: &[String]) -> Self {
        Scopes::of(
            &names
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect::<Vec<_>>(),
        )
    }
}

/// A freshly minted token. `secret` is shown once and then dropped.
pub struct MintedToken {
    pub secret: String,
    pub hash: [u8; 32],
    pub display_prefix: String,
}

impl fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedToken")
            .field("display_prefix", &self.display_prefix)
            .finish_non_exhaustive()
    }
}

pub fn mint(kind: TokenKind) -> MintedToken {
    let random = random_alphanumeric(SECRET_LEN);
    let secret = format!("{TOKEN_PREFIX}{}_{random}", kind.code());
    let display_prefix = format!("{TOKEN_PREFIX}{}_{}", kind.code(), &random[..6]);
    MintedToken {
        hash: hash(&secret),
        secret,
        display_prefix,
    }
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token to issue. Which subject fields must be set depends on `kind`.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub kind: TokenKind,
    pub name: String,
    pub user_id: Option<String>,
    pub organization_id: Option<String>,
    pub project_id: Option<String>,
    pub build_id: Option<String>,
    pub machine_id: Option<String>,
    /// `None`: the kind's default scopes.
    pub scopes: Option<Scopes>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by: Option<String>,
}

impl NewToken {
    pub fn new(kind: TokenKind, name: impl Into<String>) -> Self {
        NewToken {
            kind,
            name: name.into(),
            user_id: None,
            organization_id: None,
            project_id: None,
            build_id: None,
            machine_id: None,
            scopes: None,
            expires_at: None,
            created_by: None,
        }
    }
}

/// A token's name: at most 100 characters, no control characters. Returns it trimmed.
pub fn validate_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.chars().count() > 100 {
        return Err(Error::invalid("name", "must be at most 100 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(name.to_string())
}

fn validate(new: &mut NewToken) -> Result<()> {
    new.name = validate_name(&new.name)?;
    if let Some(scopes) = new.scopes
        && !scopes.is_subset_of(new.kind.default_scopes())
    {
        return Err(Error::invalid(
            "scopes",
            format!(
                "a {} token can hold at most: {}",
                new.kind,
                new.kind.default_scopes().to_strings().join(", ")
            ),
        ));
    }
    if let Some(at) = new.expires_at
        && at <= Utc::now()
    {
        return Err(Error::invalid("expires_at", "must be in the future"));
    }
    let need = |present: bool, field: &str| {
        if present {
            Ok(())
        } else {
            Err(Error::invalid(
                field,
                format!("is required for a {} token", new.kind),
            ))
        }
    };
    match new.kind {
        TokenKind::User => need(new.user_id.is_some(), "user_id"),
        TokenKind::Organization => need(new.organization_id.is_some(), "organization_id"),
        TokenKind::Project | TokenKind::Pull => {
            need(new.organization_id.is_some(), "organization_id")?;
            need(new.project_id.is_some(), "project_id")
        }
        TokenKind::Build => {
            need(new.project_id.is_some(), "project_id")?;
            need(new.build_id.is_some(), "build_id")
        }
        TokenKind::Machine => need(new.machine_id.is_some(), "machine_id"),
    }
}

/// Validates a token, mints its secret and inserts its hash. The secret exists only in
/// the returned value. Callers write their audit entry in the same transaction.
pub async fn issue<'e>(
    db: impl PgExecutor<'e>,
    mut new: NewToken,
) -> Result<(TokenInfo, MintedToken)> {
    validate(&mut new)?;
    let minted = mint(new.kind);
    let row = TokenRow {
        kind: new.kind.as_str(),
        name: new.name,
        display_prefix: minted.display_prefix.clone(),
        token_hash: minted.hash,
        user_id: new.user_id,
        organization_id: new.organization_id,
        project_id: new.project_id,
        build_id: new.build_id,
        machine_id: new.machine_id,
        scopes: new
            .scopes
            .unwrap_or_else(|| new.kind.default_scopes())
            .to_strings(),
        expires_at: new.expires_at,
        created_by: new.created_by,
    };
    let info = rows::insert(db, &row).await?;
    Ok((info, minted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_carry_kind_and_hash_matches() {
        let t = mint(TokenKind::Project);
        assert!(t.secret.starts_with("kiln_p_"));
        assert!(t.secret.starts_with(&t.display_prefix));
        assert_eq!(t.hash, hash(&t.secret));
        assert_ne!(mint(TokenKind::Project).secret, t.secret);
        assert!(!format!("{t:?}").contains(&t.secret));
    }

    #[test]
    fn scopes_round_trip_and_subset() {
        let all = TokenKind::User.default_scopes();
        let pull = TokenKind::Pull.default_scopes();
        assert!(pull.is_subset_of(all));
        assert!(!all.is_subset_of(pull));
        assert_eq!(Scopes::from_stored(&all.to_strings()), all);
        assert!("nope".parse::<Scope>().is_err());
        assert_eq!("org".parse::<TokenKind>(), Ok(TokenKind::Organization));
    }
}
