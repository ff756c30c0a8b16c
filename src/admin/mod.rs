//! `kiln admin`: operator commands. Each one calls the same domain function as the
//! APIs do, as an operator principal, so it is authorized, validated and written to the
//! audit log (actor `admin`, named by `$USER`) the same way.

use chrono::{Duration, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;

pub mod models;

use crate::app::App;
use crate::auth::{Principal, Role, Scope, Scopes, TokenKind};
use crate::config::Config;
use crate::db;
use crate::db::tokens::TokenFilter;
use crate::projects::ProjectSettings;
use crate::tokens::NewToken;

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
    /// Layer-cache volumes
    #[command(subcommand)]
    Cache(CacheCommand),
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
    /// Make a user a server admin (every builder machine and the installation's audit log
    /// in the dashboard; `kiln admin`'s powers through their own sessions and user tokens)
    GrantAdmin {
        /// User id or email
        #[arg(long)]
        user: String,
    },
    /// Take server admin away from a user
    RevokeAdmin {
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
pub enum CacheCommand {
    /// A project's cache volumes: size, pending changes, usage
    List {
        #[arg(long, value_name = "PROJECT_ID")]
        project: String,
    },
    /// Reset a project's cache: its builders drain, its volumes are replaced by empty ones
    Reset {
        #[arg(long, value_name = "PROJECT_ID")]
        project: String,
    },
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

/// The operator running this command, as the audit log names them.
fn operator() -> Principal {
    let name = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "cli".into());
    Principal::operator(&name)
}

pub async fn run(config: Config, args: AdminArgs) -> anyhow::Result<()> {
    let pool = db::lazy_pool(&config.database)?;
    anyhow::ensure!(
        db::is_migrated(&pool).await?,
        "the database is not migrated to this version of kiln; run `kiln migrate` first"
    );
    let app = App::new(config, pool.clone());
    let out = Output { json: args.json };
    let me = operator();
    let result = match args.command {
        AdminCommand::Org(cmd) => org(&app, &me, &out, cmd).await,
        AdminCommand::User(cmd) => user(&app, &me, &out, cmd).await,
        AdminCommand::Member(cmd) => member(&app, &me, &out, cmd).await,
        AdminCommand::Project(cmd) => project(&app, &me, &out, cmd).await,
        AdminCommand::Token(cmd) => token(&app, &me, &out, cmd).await,
        AdminCommand::Jobs(JobsCommand::List { state }) => {
            out.rows(&crate::jobs::list(&pool, &me, state.as_deref()).await?);
            Ok(())
        }
        AdminCommand::Machines(MachinesCommand::List { state }) => {
            out.rows(&app.scheduler.machines(&me, state.as_deref()).await?);
            Ok(())
        }
        AdminCommand::Machines(MachinesCommand::Drain { id }) => {
            if app.scheduler.drain(&me, &id).await? {
                eprintln!("machine {id} is draining; it is terminated once its builds finish");
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "machine {id:?} is not ready or assigned (see `kiln admin machines list`)"
                ))
            }
        }
        AdminCommand::Cache(CacheCommand::List { project }) => {
            let volumes = app.cache.list(&me, Some(&project)).await?;
            let rows: Vec<serde_json::Value> = volumes
                .iter()
                .map(|v| {
                    json!({
                        "id": v.volume.id, "kind": v.volume.kind, "platform": v.volume.platform,
                        "state": v.volume.state,
                        "image": format!("{}/{}", v.volume.namespace, v.volume.image),
                        "size_gib": v.volume.size_bytes / crate::cache::GIB,
                        "used_bytes": v.volume.used_bytes, "machine": v.volume.machine_id,
                        "pending": v.pending,
                    })
                })
                .collect();
            out.rows(&rows);
            Ok(())
        }
        AdminCommand::Cache(CacheCommand::Reset { project }) => {
            let reset = app.cache.reset(&me, Some(&project)).await?;
            if reset.took_effect {
                eprintln!(
                    "project {project}'s cache is reset (generation {}); {} volume(s) retired",
                    reset.generation,
                    reset.retired.len()
                );
            } else {
                eprintln!(
                    "project {project}'s cache was not used since its last reset; nothing to do"
                );
            }
            Ok(())
        }
        AdminCommand::Audit(AuditCommand::List { org, limit }) => {
            let page = app
                .orgs
                .audit_events(
                    &me,
                    org.as_deref(),
                    &crate::db::audit::AuditFilter::default(),
                    "",
                    Some(limit),
                )
                .await?;
            out.rows(&page.events);
            Ok(())
        }
    };
    pool.close().await;
    result
}

async fn org(app: &App, me: &Principal, out: &Output, cmd: OrgCommand) -> anyhow::Result<()> {
    match cmd {
        OrgCommand::Create { name, owner_email } => {
            let (org, owner) = app.orgs.create(me, &name, owner_email.as_deref()).await?;
            if let Some(owner) = owner {
                eprintln!("{} owns the organization", owner.email);
            }
            out.rows(&[org]);
        }
        OrgCommand::List => out.rows(&app.orgs.list(me).await?),
    }
    Ok(())
}

async fn user(app: &App, me: &Principal, out: &Output, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Create { email, name } => {
            out.rows(&[app.orgs.create_user(me, &email, &name).await?]);
        }
        UserCommand::List => out.rows(&app.orgs.list_users(me).await?),
        UserCommand::SetPassword { user } => {
            let user = app.orgs.find_user(me, &user).await?;
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            app.orgs.set_password(me, &user.id, password).await?;
            eprintln!("password set for {}", user.email);
        }
        UserCommand::GrantAdmin { user: ref who } | UserCommand::RevokeAdmin { user: ref who } => {
            let grant = matches!(cmd, UserCommand::GrantAdmin { .. });
            let user = app.orgs.find_user(me, who).await?;
            let changed = app.orgs.set_server_admin(me, &user.id, grant).await?;
            eprintln!(
                "{} {} a server admin{}",
                user.email,
                if grant { "is" } else { "is not" },
                if changed { "" } else { " (no change)" }
            );
        }
    }
    Ok(())
}

async fn member(app: &App, me: &Principal, out: &Output, cmd: MemberCommand) -> anyhow::Result<()> {
    match cmd {
        MemberCommand::Add { org, user, role } => {
            let user = app.orgs.find_user(me, &user).await?;
            let role = Role::parse(&role).unwrap_or(Role::Member);
            app.orgs.set_member(me, &org, &user.id, role).await?;
            out.rows(&app.orgs.members(me, &org).await?);
        }
        MemberCommand::Remove { org, user } => {
            let user = app.orgs.find_user(me, &user).await?;
            anyhow::ensure!(
                app.orgs.remove_member(me, &org, &user.id).await?,
                "{} is not a member of {org}",
                user.email
            );
        }
        MemberCommand::List { org } => out.rows(&app.orgs.members(me, &org).await?),
    }
    Ok(())
}

async fn project(
    app: &App,
    me: &Principal,
    out: &Output,
    cmd: ProjectCommand,
) -> anyhow::Result<()> {
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
            out.rows(&[app.projects.create(me, Some(&org), settings).await?]);
        }
        ProjectCommand::List { org } => {
            out.rows(&app.projects.list(me, org.as_deref()).await?);
        }
    }
    Ok(())
}

async fn token(app: &App, me: &Principal, out: &Output, cmd: TokenCommand) -> anyhow::Result<()> {
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
            let mut new = NewToken::new(kind, name);
            if let Some(user) = user {
                new.user_id = Some(app.orgs.find_user(me, &user).await?.id);
            }
            new.organization_id = org;
            if let Some(project_id) = project {
                let p = app.projects.get(me, Some(&project_id)).await?;
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
            let (info, secret) = app.tokens.create(me, new).await?;
            if out.json {
                println!("{}", json!({"token": info, "secret": secret}));
            } else {
                eprintln!(
                    "created {} token {} ({}); it is shown only once:",
                    info.kind, info.id, info.display_prefix
                );
                println!("{secret}");
            }
        }
        TokenCommand::List {
            org,
            project,
            user,
            include_revoked,
        } => {
            let user_id = match user {
                Some(u) => Some(app.orgs.find_user(me, &u).await?.id),
                None => None,
            };
            let filter = TokenFilter {
                kind: None,
                organization_id: org,
                project_id: project,
                user_id,
                include_revoked,
            };
            out.rows(&app.tokens.list(me, &filter).await?);
        }
        TokenCommand::Revoke { id } => {
            if app.tokens.revoke(me, None, &id).await? {
                eprintln!("revoked token {id}");
            } else {
                eprintln!("token {id} was already revoked");
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
