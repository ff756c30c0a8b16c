//! `kiln admin`: operator commands that act on the database directly.
//! Every change is written to the audit log with the actor `admin`.

use chrono::{Duration, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::auth::{Role, Scope, Scopes, TokenKind};
use crate::config::Config;
use crate::db::audit::{self, AuditEvent};
use crate::db::projects::ProjectSettings;
use crate::db::tokens::{NewToken, TokenFilter};
use crate::db::{self, orgs, projects, tokens};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Print results as JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Organizations
    #[command(subcommand)]
    Org(OrgCommand),
    /// Users
    #[command(subcommand)]
    User(UserCommand),
    /// Organization memberships (owner or member)
    #[command(subcommand)]
    Member(MemberCommand),
    /// Projects
    #[command(subcommand)]
    Project(ProjectCommand),
    /// API tokens (only their hashes are stored; a new token is printed once)
    #[command(subcommand)]
    Token(TokenCommand),
    /// Background jobs
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Builder machines
    #[command(subcommand)]
    Machines(MachinesCommand),
    /// The audit log
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organization, optionally with an owner (created if the email is new)
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "EMAIL")]
        owner_email: Option<String>,
    },
    /// List organizations
    List,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List users
    List,
    /// Set a user's password for the sign-in pages; reads it from standard input
    SetPassword {
        /// User id or email
        #[arg(long)]
        user: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a user to an organization, or change their role
    Add {
        #[arg(long, value_name = "ORG_ID")]
        org: String,
        /// User id or email
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "member", value_parser = ["owner", "member"])]
        role: String,
    },
    /// Remove a user from an organization
    Remove {
        #[arg(long, value_name = "ORG_ID")]
        org: String,
        #[arg(long)]
        user: String,
    },
    /// List an organization's members
    List {
        #[arg(long, value_name = "ORG_ID")]
        org: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project
    Create {
        #[arg(long, value_name = "ORG_ID")]
        org: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        region: Option<String>,
        /// Layer-cache size per architecture, in GB (default 50)
        #[arg(long)]
        cache_size_gb: Option<i32>,
    },
    /// List projects
    List {
        #[arg(long, value_name = "ORG_ID")]
        org: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once
    Create {
        /// user, organization, project or pull
        #[arg(long)]
        kind: TokenKind,
        #[arg(long, default_value = "")]
        name: String,
        /// User id or email (user tokens)
        #[arg(long)]
        user: Option<String>,
        /// Organization id (organization tokens)
        #[arg(long, value_name = "ORG_ID")]
        org: Option<String>,
        /// Project id (project and pull tokens)
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<String>,
        /// Narrower scopes, comma-separated (default: everything the kind allows)
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<Scope>,
        #[arg(long, value_name = "DAYS")]
        expires_in_days: Option<i64>,
    },
    /// List tokens (never their secrets)
    List {
        #[arg(long, value_name = "ORG_ID")]
        org: Option<String>,
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        include_revoked: bool,
    },
    /// Revoke a token; every replica stops accepting it at once
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List queued, running and failed jobs
    List {
        #[arg(long, value_parser = ["pending", "running", "failed"])]
        state: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// List builder machines (live ones unless --state is given)
    List {
        #[arg(long, value_parser = ["requested", "launching", "booting", "ready", "assigned", "draining", "terminated", "failed"])]
        state: Option<String>,
    },
    /// Stop giving builds to a machine; it is terminated once its builds finish
    Drain { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show recent audit events
    List {
        #[arg(long, value_name = "ORG_ID")]
        org: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

fn actor() -> (&'static str, Option<String>) {
    ("admin", std::env::var("USER").ok().or(Some("cli".into())))
}

pub async fn run(config: Config, args: AdminArgs) -> anyhow::Result<()> {
    let pool = db::lazy_pool(&config.database)?;
    anyhow::ensure!(
        db::is_migrated(&pool).await?,
        "the database is not migrated to this version of kiln; run `kiln migrate` first"
    );
    let out = Output { json: args.json };
    match args.command {
        AdminCommand::Org(cmd) => org(&pool, &out, cmd).await,
        AdminCommand::User(cmd) => user(&pool, &out, cmd).await,
        AdminCommand::Member(cmd) => member(&pool, &out, cmd).await,
        AdminCommand::Project(cmd) => project(&pool, &out, cmd).await,
        AdminCommand::Token(cmd) => token(&pool, &out, cmd).await,
        AdminCommand::Jobs(JobsCommand::List { state }) => {
            out.rows(&db::jobs::list(&pool, state.as_deref()).await?);
            Ok(())
        }
        AdminCommand::Machines(MachinesCommand::List { state }) => {
            out.rows(&db::machines::list(&pool, state.as_deref()).await?);
            Ok(())
        }
        AdminCommand::Machines(MachinesCommand::Drain { id }) => {
            anyhow::ensure!(
                db::machines::drain(&pool, &id).await?,
                "machine {id:?} is not ready or assigned (see `kiln admin machines list`)"
            );
            audit::record(
                &pool,
                AuditEvent::new("machine.drain", actor()).target("machine", &id),
            )
            .await?;
            eprintln!("machine {id} is draining; it is terminated once its builds finish");
            Ok(())
        }
        AdminCommand::Audit(AuditCommand::List { org, limit }) => {
            out.rows(&audit::list(&pool, org.as_deref(), limit).await?);
            Ok(())
        }
    }
}

async fn org(pool: &PgPool, out: &Output, cmd: OrgCommand) -> anyhow::Result<()> {
    match cmd {
        OrgCommand::Create { name, owner_email } => {
            let mut tx = pool.begin().await?;
            let org = orgs::create_organization(&mut *tx, &name).await?;
            audit::record(
                &mut *tx,
                AuditEvent::new("organization.create", actor())
                    .org(&org.id)
                    .target("organization", &org.id),
            )
            .await?;
            tx.commit().await?;
            if let Some(email) = owner_email {
                let user = find_or_create_user(pool, &email).await?;
                orgs::set_membership(pool, &org.id, &user.id, Role::Owner).await?;
            }
            out.rows(&[org]);
        }
        OrgCommand::List => out.rows(&orgs::list_organizations(pool, None).await?),
    }
    Ok(())
}

async fn find_or_create_user(pool: &PgPool, email: &str) -> anyhow::Result<orgs::User> {
    if let Some(user) = orgs::find_user_by_email(pool, email).await? {
        return Ok(user);
    }
    let user = orgs::create_user(pool, email, "").await?;
    audit::record(
        pool,
        AuditEvent::new("user.create", actor()).target("user", &user.id),
    )
    .await?;
    Ok(user)
}

async fn resolve_user(pool: &PgPool, user: &str) -> anyhow::Result<orgs::User> {
    let found = if user.contains('@') {
        orgs::find_user_by_email(pool, user).await?
    } else {
        orgs::list_users(pool)
            .await?
            .into_iter()
            .find(|u| u.id == user)
    };
    found.ok_or_else(|| {
        anyhow::anyhow!("no user {user:?}; create it with `kiln admin user create --email ...`")
    })
}

async fn user(pool: &PgPool, out: &Output, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Create { email, name } => {
            let user = orgs::create_user(pool, &email, &name).await?;
            audit::record(
                pool,
                AuditEvent::new("user.create", actor()).target("user", &user.id),
            )
            .await?;
            out.rows(&[user]);
        }
        UserCommand::List => out.rows(&orgs::list_users(pool).await?),
        UserCommand::SetPassword { user } => {
            let user = resolve_user(pool, &user).await?;
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            crate::auth::login::set_password(pool, &user.id, password).await?;
            audit::record(
                pool,
                AuditEvent::new("user.set_password", actor()).target("user", &user.id),
            )
            .await?;
            eprintln!("password set for {}", user.email);
        }
    }
    Ok(())
}

async fn member(pool: &PgPool, out: &Output, cmd: MemberCommand) -> anyhow::Result<()> {
    match cmd {
        MemberCommand::Add { org, user, role } => {
            let user = resolve_user(pool, &user).await?;
            let role = Role::parse(&role).unwrap_or(Role::Member);
            orgs::set_membership(pool, &org, &user.id, role).await?;
            audit::record(
                pool,
                AuditEvent::new("membership.set", actor())
                    .org(&org)
                    .target("user", &user.id)
                    .details(json!({"role": role})),
            )
            .await?;
            out.rows(&orgs::list_members(pool, &org).await?);
        }
        MemberCommand::Remove { org, user } => {
            let user = resolve_user(pool, &user).await?;
            anyhow::ensure!(
                orgs::remove_membership(pool, &org, &user.id).await?,
                "{} is not a member of {org}",
                user.email
            );
            audit::record(
                pool,
                AuditEvent::new("membership.remove", actor())
                    .org(&org)
                    .target("user", &user.id),
            )
            .await?;
        }
        MemberCommand::List { org } => out.rows(&orgs::list_members(pool, &org).await?),
    }
    Ok(())
}

async fn project(pool: &PgPool, out: &Output, cmd: ProjectCommand) -> anyhow::Result<()> {
    match cmd {
        ProjectCommand::Create {
            org,
            name,
            region,
            cache_size_gb,
        } => {
            let settings = ProjectSettings {
                name: Some(name),
                region,
                cache_size_gb_amd64: cache_size_gb,
                cache_size_gb_arm64: cache_size_gb,
                ..Default::default()
            };
            let mut tx = pool.begin().await?;
            let project = projects::create(&mut *tx, &org, settings).await?;
            audit::record(
                &mut *tx,
                AuditEvent::new("project.create", actor())
                    .org(&org)
                    .target("project", &project.id),
            )
            .await?;
            tx.commit().await?;
            out.rows(&[project]);
        }
        ProjectCommand::List { org } => {
            let reach = match org {
                Some(org) => crate::auth::ProjectReach::Organizations(vec![org]),
                None => crate::auth::ProjectReach::Organizations(
                    orgs::list_organizations(pool, None)
                        .await?
                        .into_iter()
                        .map(|o| o.id)
                        .collect(),
                ),
            };
            out.rows(&projects::list(pool, &reach, None).await?);
        }
    }
    Ok(())
}

async fn token(pool: &PgPool, out: &Output, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            kind,
            name,
            user,
            org,
            project,
            scopes,
            expires_in_days,
        } => {
            anyhow::ensure!(
                matches!(
                    kind,
                    TokenKind::User
                        | TokenKind::Organization
                        | TokenKind::Project
                        | TokenKind::Pull
                ),
                "{kind} tokens are minted by Kiln itself; create a user, organization, project or pull token"
            );
            let mut new = NewToken::new(kind, name);
            if let Some(user) = user {
                new.user_id = Some(resolve_user(pool, &user).await?.id);
            }
            new.organization_id = org;
            if let Some(project_id) = project {
                let p = projects::get(pool, &project_id)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no project {project_id:?}"))?;
                new.organization_id = Some(p.organization_id);
                new.project_id = Some(p.id);
            }
            if !scopes.is_empty() {
                new.scopes = Some(Scopes::of(&scopes));
            }
            if let Some(days) = expires_in_days {
                anyhow::ensure!(
                    (1..=3650).contains(&days),
                    "--expires-in-days must be between 1 and 3650"
                );
                new.expires_at = Some(Utc::now() + Duration::days(days));
            }
            let mut tx = pool.begin().await?;
            let (info, minted) = tokens::create(&mut *tx, new).await?;
            let mut event = AuditEvent::new("token.create", actor())
                .target("token", &info.id)
                .details(json!({"kind": info.kind, "prefix": info.display_prefix}));
            if let Some(org) = &info.organization_id {
                event = event.org(org);
            }
            audit::record(&mut *tx, event).await?;
            tx.commit().await?;
            if out.json {
                println!("{}", json!({"token": info, "secret": minted.secret}));
            } else {
                eprintln!(
                    "created {} token {} ({}); it is shown only once:",
                    info.kind, info.id, info.display_prefix
                );
                println!("{}", minted.secret);
            }
        }
        TokenCommand::List {
            org,
            project,
            user,
            include_revoked,
        } => {
            let user_id = match user {
                Some(u) => Some(resolve_user(pool, &u).await?.id),
                None => None,
            };
            let filter = TokenFilter {
                organization_id: org,
                project_id: project,
                user_id,
                include_revoked,
            };
            out.rows(&tokens::list(pool, &filter).await?);
        }
        TokenCommand::Revoke { id } => {
            let info = tokens::get(pool, &id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no token {id:?}"))?;
            match tokens::revoke(pool, &id).await? {
                Some(_) => {
                    let mut event = AuditEvent::new("token.revoke", actor()).target("token", &id);
                    if let Some(org) = &info.organization_id {
                        event = event.org(org);
                    }
                    audit::record(pool, event).await?;
                    eprintln!("revoked token {id}");
                }
                None => eprintln!("token {id} was already revoked"),
            }
        }
    }
    Ok(())
}

/// Prints rows as a table (or JSON lines with --json).
struct Output {
    json: bool,
}

impl Output {
    fn rows<T: Serialize>(&self, rows: &[T]) {
        let values: Vec<serde_json::Value> = rows
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .collect();
        if self.json {
            for v in &values {
                println!("{v}");
            }
            return;
        }
        let Some(first) = values.first().and_then(|v| v.as_object()) else {
            eprintln!("(none)");
            return;
        };
        let columns: Vec<&String> = first.keys().collect();
        let cell = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        };
        let table: Vec<Vec<String>> = values
            .iter()
            .map(|v| columns.iter().map(|c| cell(&v[c.as_str()])).collect())
            .collect();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                table
                    .iter()
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(c.len())
            })
            .collect();
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("{}", padded.join("  ").trim_end());
        };
        line(columns.iter().map(|c| c.to_uppercase()).collect());
        for row in table {
            line(row);
        }
    }
}
