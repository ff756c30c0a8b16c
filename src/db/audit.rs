//! The append-only audit log.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

/// One audit entry, built with the fluent setters and written with [`record`].
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub organization_id: Option<String>,
    pub actor_kind: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    pub details: serde_json::Value,
}

impl AuditEvent {
    pub fn new(action: &str, actor: (&str, Option<String>)) -> Self {
        AuditEvent {
            organization_id: None,
            actor_kind: actor.0.to_string(),
            actor_id: actor.1,
            action: action.to_string(),
            target_kind: None,
            target_id: None,
            details: serde_json::json!({}),
        }
    }

    pub fn org(mut self, id: impl Into<String>) -> Self {
        self.organization_id = Some(id.into());
        self
    }

    /// Sets the organization when there is one (tokens of users have none).
    pub fn org_of(mut self, id: Option<&str>) -> Self {
        self.organization_id = id.map(str::to_string);
        self
    }

    pub fn target(mut self, kind: &str, id: impl Into<String>) -> Self {
        self.target_kind = Some(kind.to_string());
        self.target_id = Some(id.into());
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

pub async fn record<'e>(db: impl PgExecutor<'e>, event: AuditEvent) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (organization_id, actor_kind, actor_id, action, target_kind, target_id, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(event.organization_id)
    .bind(event.actor_kind)
    .bind(event.actor_id)
    .bind(event.action)
    .bind(event.target_kind)
    .bind(event.target_id)
    .bind(event.details)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditRecord {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub organization_id: Option<String>,
    pub actor_kind: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// Which audit events to list; `None` fields match anything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub action: Option<String>,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    pub actor_id: Option<String>,
    /// At or after.
    pub since: Option<DateTime<Utc>>,
    /// Before.
    pub until: Option<DateTime<Utc>>,
}

/// A page of an organization's events (or every event: `None`), newest first, after the
/// (occurred_at, id) cursor.
pub async fn list_page(
    pool: &PgPool,
    organization_id: Option<&str>,
    filter: &AuditFilter,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<AuditRecord>> {
    Ok(sqlx::query_as(
        "SELECT id, occurred_at, organization_id, actor_kind, actor_id, action, target_kind, target_id, details
         FROM audit_events
         WHERE ($1::text IS NULL OR organization_id = $1)
           AND ($2::text IS NULL OR action = $2)
           AND ($3::text IS NULL OR target_kind = $3)
           AND ($4::text IS NULL OR target_id = $4)
           AND ($5::text IS NULL OR actor_id = $5)
           AND ($6::timestamptz IS NULL OR occurred_at >= $6)
           AND ($7::timestamptz IS NULL OR occurred_at < $7)
           AND ($8::timestamptz IS NULL OR (occurred_at, id) < ($8, $9))
         ORDER BY occurred_at DESC, id DESC LIMIT $10",
    )
    .bind(organization_id)
    .bind(&filter.action)
    .bind(&filter.target_kind)
    .bind(&filter.target_id)
    .bind(&filter.actor_id)
    .bind(filter.since)
    .bind(filter.until)
    .bind(after.as_ref().map(|a| a.0))
    .bind(after.as_ref().map_or(0, |a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Deletes events of `actions` older than `older_than_days`.
pub async fn purge_actions(pool: &PgPool, actions: &[&str], older_than_days: i32) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM audit_events
         WHERE action = ANY($1) AND occurred_at < now() - make_interval(days => $2)",
    )
    .bind(actions)
    .bind(older_than_days)
    .execute(pool)
    .await?
    .rows_affected())
}

/// How many events of `actions` exist (bounded-growth checks).
pub async fn count_actions(pool: &PgPool, actions: &[&str]) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = ANY($1)")
            .bind(actions)
            .fetch_one(pool)
            .await?,
    )
}
