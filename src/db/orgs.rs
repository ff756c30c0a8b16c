//! Organizations, users and memberships.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::db::ids::new_id;
use crate::error::{ConstraintExt, Error, Result};

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Organization {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Member {
    pub user_id: String,
    pub email: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
}

pub async fn create_organization<'e>(db: impl PgExecutor<'e>, name: &str) -> Result<Organization> {
    Ok(sqlx::query_as(
        "INSERT INTO organizations (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
    )
    .bind(new_id())
    .bind(name)
    .fetch_one(db)
    .await?)
}

pub async fn get_organization<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
) -> Result<Option<Organization>> {
    Ok(
        sqlx::query_as("SELECT id, name, created_at FROM organizations WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

pub async fn list_organizations(
    pool: &PgPool,
    only: Option<&[String]>,
) -> Result<Vec<Organization>> {
    Ok(sqlx::query_as(
        "SELECT id, name, created_at FROM organizations
         WHERE ($1::text[] IS NULL OR id = ANY($1)) ORDER BY created_at, id",
    )
    .bind(only)
    .fetch_all(pool)
    .await?)
}

pub async fn find_organization_by_name(pool: &PgPool, name: &str) -> Result<Option<Organization>> {
    Ok(sqlx::query_as("SELECT id, name, created_at FROM organizations WHERE name = $1 ORDER BY created_at LIMIT 1")
        .bind(name)
        .fetch_optional(pool)
        .await?)
}

pub async fn create_user<'e>(db: impl PgExecutor<'e>, email: &str, name: &str) -> Result<User> {
    sqlx::query_as("INSERT INTO users (id, email, name) VALUES ($1, $2, $3) RETURNING id, email, name, created_at")
        .bind(new_id())
        .bind(email)
        .bind(name)
        .fetch_one(db)
        .await
        .on_unique("users_email_key", || format!("a user with email {email} already exists"))
}

pub async fn find_user_by_email<'e>(db: impl PgExecutor<'e>, email: &str) -> Result<Option<User>> {
    Ok(sqlx::query_as(
        "SELECT id, email, name, created_at FROM users WHERE lower(email) = lower($1)",
    )
    .bind(email.trim())
    .fetch_optional(db)
    .await?)
}

pub async fn get_user(pool: &PgPool, id: &str) -> Result<Option<User>> {
    Ok(
        sqlx::query_as("SELECT id, email, name, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

pub async fn list_users(pool: &PgPool) -> Result<Vec<User>> {
    Ok(sqlx::query_as(
        "SELECT id, email, name, created_at FROM users ORDER BY created_at, id LIMIT 10000",
    )
    .fetch_all(pool)
    .await?)
}

/// Adds a membership or changes its role (`owner` or `member`).
pub async fn set_membership<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
    user_id: &str,
    role: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO memberships (organization_id, user_id, role) VALUES ($1, $2, $3)
         ON CONFLICT (organization_id, user_id) DO UPDATE SET role = EXCLUDED.role",
    )
    .bind(organization_id)
    .bind(user_id)
    .bind(role)
    .execute(db)
    .await
    .map_err(|err| match &err {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            Error::invalid("membership", "the organization or user does not exist")
        }
        _ => Error::from(err),
    })?;
    Ok(())
}

pub async fn remove_membership<'e>(
    db: impl PgExecutor<'e>,
    organization_id: &str,
    user_id: &str,
) -> Result<bool> {
    Ok(
        sqlx::query("DELETE FROM memberships WHERE organization_id = $1 AND user_id = $2")
            .bind(organization_id)
            .bind(user_id)
            .execute(db)
            .await?
            .rows_affected()
            > 0,
    )
}

pub async fn list_members(pool: &PgPool, organization_id: &str) -> Result<Vec<Member>> {
    Ok(sqlx::query_as(
        "SELECT m.user_id, u.email, m.role, m.created_at FROM memberships m
         JOIN users u ON u.id = m.user_id WHERE m.organization_id = $1 ORDER BY m.created_at",
    )
    .bind(organization_id)
    .fetch_all(pool)
    .await?)
}
