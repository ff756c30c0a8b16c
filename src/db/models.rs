//! Model registry rows: models, their revisions and tags, and which blobs each holds.
//! The domain (`crate::registry`) decides what to write.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::error::Result;

/// A model with its `latest` revision (or its newest, when nothing is tagged `latest`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ModelListing {
    #[serde(skip)]
    pub id: String,
    pub name: String,
    pub source: Option<String>,
    pub license: Option<String>,
    pub pull_count: i64,
    pub revision: String,
    pub index_digest: String,
    pub file_count: i32,
    pub file_bytes: i64,
    pub image_bytes: i64,
    pub layer_format: String,
    pub imported_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RevisionRow {
    pub revision: String,
    pub index_digest: String,
    pub file_count: i32,
    pub file_bytes: i64,
    pub image_bytes: i64,
    pub layer_format: String,
    #[schema(value_type = Vec<Object>)]
    pub files: serde_json::Value,
    pub imported_at: DateTime<Utc>,
}

/// What a manifest or blob request resolves to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredBlob {
    pub digest: String,
    pub size_bytes: i64,
    pub media_type: String,
}

pub struct NewModel<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub source: Option<&'a str>,
    pub hub_repository: Option<&'a str>,
    pub license: Option<&'a str>,
}

/// Creates the model or updates its description; returns its id.
pub async fn upsert_model<'e>(db: impl PgExecutor<'e>, model: &NewModel<'_>) -> Result<String> {
    let id: String = sqlx::query_scalar(
        "INSERT INTO models (id, name, source, hub_repository, license)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (name) DO UPDATE SET
             source = COALESCE(EXCLUDED.source, models.source),
             hub_repository = COALESCE(EXCLUDED.hub_repository, models.hub_repository),
             license = COALESCE(EXCLUDED.license, models.license),
             updated_at = now()
         RETURNING id",
    )
    .bind(model.id)
    .bind(model.name)
    .bind(model.source)
    .bind(model.hub_repository)
    .bind(model.license)
    .fetch_one(db)
    .await?;
    Ok(id)
}

/// Digests of `digests` already recorded (so already in the store).
pub async fn known_blobs(db: &PgPool, digests: &[String]) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT digest FROM model_blobs WHERE digest = ANY($1)")
            .bind(digests)
            .fetch_all(db)
            .await?,
    )
}

/// Records blobs and that `model_id` holds them.
pub async fn add_contents(
    tx: &mut sqlx::PgConnection,
    model_id: &str,
    blobs: &[StoredBlob],
) -> Result<()> {
    let digests: Vec<&str> = blobs.iter().map(|b| b.digest.as_str()).collect();
    let sizes: Vec<i64> = blobs.iter().map(|b| b.size_bytes).collect();
    let types: Vec<&str> = blobs.iter().map(|b| b.media_type.as_str()).collect();
    sqlx::query(
        "INSERT INTO model_blobs (digest, size_bytes, media_type)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
         ON CONFLICT (digest) DO NOTHING",
    )
    .bind(&digests)
    .bind(&sizes)
    .bind(&types)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO model_contents (model_id, digest)
         SELECT $1, d FROM unnest($2::text[]) AS d
         ON CONFLICT DO NOTHING",
    )
    .bind(model_id)
    .bind(&digests)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

pub struct NewRevision<'a> {
    pub model_id: &'a str,
    pub revision: &'a str,
    pub index_digest: &'a str,
    pub file_count: i32,
    pub file_bytes: i64,
    pub image_bytes: i64,
    pub layer_format: &'a str,
    pub files: serde_json::Value,
}

/// Records a revision; returns the index digest it had before, if it existed.
pub async fn upsert_revision<'e>(
    db: impl PgExecutor<'e>,
    r: &NewRevision<'_>,
) -> Result<Option<String>> {
    let previous: Option<Option<String>> = sqlx::query_scalar(
        "WITH old AS (
             SELECT index_digest FROM model_revisions WHERE model_id = $1 AND revision = $2
         )
         INSERT INTO model_revisions (model_id, revision, index_digest, file_count, file_bytes,
                                      image_bytes, layer_format, files)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (model_id, revision) DO UPDATE SET
             index_digest = EXCLUDED.index_digest, file_count = EXCLUDED.file_count,
             file_bytes = EXCLUDED.file_bytes, image_bytes = EXCLUDED.image_bytes,
             layer_format = EXCLUDED.layer_format, files = EXCLUDED.files, imported_at = now()
         RETURNING (SELECT index_digest FROM old)",
    )
    .bind(r.model_id)
    .bind(r.revision)
    .bind(r.index_digest)
    .bind(r.file_count)
    .bind(r.file_bytes)
    .bind(r.image_bytes)
    .bind(r.layer_format)
    .bind(&r.files)
    .fetch_optional(db)
    .await?;
    Ok(previous.flatten())
}

pub async fn set_tag<'e>(
    db: impl PgExecutor<'e>,
    model_id: &str,
    tag: &str,
    revision: &str,
    digest: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO model_tags (model_id, tag, revision, digest) VALUES ($1, $2, $3, $4)
         ON CONFLICT (model_id, tag) DO UPDATE SET
             revision = EXCLUDED.revision, digest = EXCLUDED.digest, updated_at = now()",
    )
    .bind(model_id)
    .bind(tag)
    .bind(revision)
    .bind(digest)
    .execute(db)
    .await?;
    Ok(())
}

/// The manifest `tag` of `name` points at.
pub async fn manifest_by_tag(db: &PgPool, name: &str, tag: &str) -> Result<Option<StoredBlob>> {
    Ok(sqlx::query_as(
        "SELECT b.digest, b.size_bytes, b.media_type
         FROM models m
         JOIN model_tags t ON t.model_id = m.id
         JOIN model_blobs b ON b.digest = t.digest
         WHERE m.name = $1 AND t.tag = $2",
    )
    .bind(name)
    .bind(tag)
    .fetch_optional(db)
    .await?)
}

/// A blob (or manifest) of `name` by digest; `None` unless that model holds it.
pub async fn content(db: &PgPool, name: &str, digest: &str) -> Result<Option<StoredBlob>> {
    Ok(sqlx::query_as(
        "SELECT b.digest, b.size_bytes, b.media_type
         FROM models m
         JOIN model_contents c ON c.model_id = m.id
         JOIN model_blobs b ON b.digest = c.digest
         WHERE m.name = $1 AND c.digest = $2",
    )
    .bind(name)
    .bind(digest)
    .fetch_optional(db)
    .await?)
}

pub async fn model_id(db: &PgPool, name: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT id FROM models WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?)
}

/// Tags of a model in byte order, after `last`, at most `limit`.
pub async fn tags(
    db: &PgPool,
    model_id: &str,
    last: Option<&str>,
    limit: i64,
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT tag FROM model_tags
         WHERE model_id = $1 AND ($2::text IS NULL OR tag COLLATE \"C\" > $2 COLLATE \"C\")
         ORDER BY tag COLLATE \"C\" LIMIT $3",
    )
    .bind(model_id)
    .bind(last)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Model names in byte order, after `last`, at most `limit`.
pub async fn names(db: &PgPool, last: Option<&str>, limit: i64) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT name FROM models
         WHERE $1::text IS NULL OR name COLLATE \"C\" > $1 COLLATE \"C\"
         ORDER BY name COLLATE \"C\" LIMIT $2",
    )
    .bind(last)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Every model (or only `name`) with its `latest` (else newest) revision, by name.
pub async fn list(db: &PgPool, name: Option<&str>) -> Result<Vec<ModelListing>> {
    Ok(sqlx::query_as(
        "SELECT m.id, m.name, m.source, m.license, m.pull_count, r.revision, r.index_digest,
                r.file_count, r.file_bytes, r.image_bytes, r.layer_format, r.imported_at,
                m.updated_at,
                ARRAY(SELECT tag FROM model_tags t WHERE t.model_id = m.id
                      ORDER BY tag COLLATE \"C\") AS tags
         FROM models m
         JOIN LATERAL (
             SELECT r.* FROM model_revisions r
             LEFT JOIN model_tags lt ON lt.model_id = r.model_id AND lt.tag = 'latest'
                                    AND lt.revision = r.revision
             WHERE r.model_id = m.id
             ORDER BY (lt.tag IS NOT NULL) DESC, r.imported_at DESC
             LIMIT 1
         ) r ON true
         WHERE $1::text IS NULL OR m.name = $1
         ORDER BY m.name COLLATE \"C\"",
    )
    .bind(name)
    .fetch_all(db)
    .await?)
}

pub async fn revisions(db: &PgPool, model_id: &str) -> Result<Vec<RevisionRow>> {
    Ok(sqlx::query_as(
        "SELECT revision, index_digest, file_count, file_bytes, image_bytes, layer_format, files,
                imported_at
         FROM model_revisions WHERE model_id = $1 ORDER BY imported_at DESC, revision",
    )
    .bind(model_id)
    .fetch_all(db)
    .await?)
}

/// Adds counted pulls: (name, pulls) pairs.
pub async fn add_pulls(db: &PgPool, names: &[String], pulls: &[i64]) -> Result<()> {
    sqlx::query(
        "UPDATE models m SET pull_count = m.pull_count + p.n
         FROM unnest($1::text[], $2::bigint[]) AS p(name, n)
         WHERE m.name = p.name",
    )
    .bind(names)
    .bind(pulls)
    .execute(db)
    .await?;
    Ok(())
}
