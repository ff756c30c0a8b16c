//! Volume rows: the layer-cache images and their lifecycle state. Transitions are
//! conditional UPDATEs; the domain (`crate::cache`) decides which.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::cache::ImageRef;
use crate::error::Result;

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Volume {
    pub id: String,
    pub kind: String,
    pub project_id: Option<String>,
    pub organization_id: String,
    pub platform: String,
    pub generation: i32,
    pub namespace: String,
    pub image: String,
    pub state: String,
    pub size_bytes: i64,
    pub target_size_bytes: i64,
    pub machine_id: Option<String>,
    pub parent_volume_id: Option<String>,
    pub snapshot: Option<String>,
    pub build_id: Option<String>,
    pub used_bytes: Option<i64>,
    pub used_measured_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub const COLUMNS: &str = "id, kind, project_id, organization_id, platform, generation, namespace,
    image, state, size_bytes, target_size_bytes, machine_id, parent_volume_id, snapshot, build_id,
    used_bytes, used_measured_at, error, created_at, updated_at";

/// States in which a project volume is the one its slot uses.
pub const LIVE: &str = "('creating', 'available', 'attached', 'resizing')";
const LIVE_MACHINE: &str = "('requested', 'launching', 'booting', 'ready', 'assigned', 'draining')";

/// A volume row to insert (state `creating`).
pub struct NewVolume<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub project_id: Option<&'a str>,
    pub organization_id: &'a str,
    pub platform: &'a str,
    pub generation: i32,
    pub namespace: &'a str,
    pub image: &'a str,
    pub size_bytes: i64,
    pub parent_volume_id: Option<&'a str>,
    pub snapshot: Option<&'a str>,
    pub build_id: Option<&'a str>,
}

/// Inserts a volume; `None` when a live project volume of that project and platform
/// already exists (another caller won).
pub async fn insert<'e>(db: impl PgExecutor<'e>, new: &NewVolume<'_>) -> Result<Option<Volume>> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO volumes (id, kind, project_id, organization_id, platform, generation, namespace,
                              image, size_bytes, target_size_bytes, parent_volume_id, snapshot, build_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $12)
         ON CONFLICT DO NOTHING
         RETURNING {COLUMNS}"
    ))
    .bind(new.id)
    .bind(new.kind)
    .bind(new.project_id)
    .bind(new.organization_id)
    .bind(new.platform)
    .bind(new.generation)
    .bind(new.namespace)
    .bind(new.image)
    .bind(new.size_bytes)
    .bind(new.parent_volume_id)
    .bind(new.snapshot)
    .bind(new.build_id)
    .fetch_optional(db)
    .await?)
}

pub async fn get<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<Volume>> {
    Ok(
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM volumes WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

/// The live project volume of a project and architecture; with `lock`, its row is
/// locked to the end of the transaction.
pub async fn live_project_volume<'e>(
    db: impl PgExecutor<'e>,
    project_id: &str,
    platform: &str,
    lock: bool,
) -> Result<Option<Volume>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM volumes
         WHERE project_id = $1 AND platform = $2 AND kind = 'project' AND state IN {LIVE}{}",
        if lock { " FOR UPDATE" } else { "" }
    ))
    .bind(project_id)
    .bind(platform)
    .fetch_optional(db)
    .await?)
}

/// Every live project volume of a project, locked.
pub async fn live_project_volumes_for_update<'e>(
    db: impl PgExecutor<'e>,
    project_id: &str,
) -> Result<Vec<Volume>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM volumes
         WHERE project_id = $1 AND kind = 'project' AND state IN {LIVE}
         ORDER BY platform FOR UPDATE"
    ))
    .bind(project_id)
    .fetch_all(db)
    .await?)
}

/// Every volume of a project that still holds an image (not deleted).
pub async fn of_project<'e>(db: impl PgExecutor<'e>, project_id: &str) -> Result<Vec<Volume>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM volumes
         WHERE project_id = $1 AND state <> 'deleted' ORDER BY platform, created_at"
    ))
    .bind(project_id)
    .fetch_all(db)
    .await?)
}

/// The volume a machine serves from.
pub async fn of_machine<'e>(db: impl PgExecutor<'e>, machine_id: &str) -> Result<Option<Volume>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM volumes
         WHERE id = (SELECT volume_id FROM machines WHERE id = $1)"
    ))
    .bind(machine_id)
    .fetch_optional(db)
    .await?)
}

/// Hands a volume to a machine: `available` becomes `attached`; a volume still being
/// created or grown keeps its state and is the machine's once that is done.
pub async fn attach<'e>(db: impl PgExecutor<'e>, id: &str, machine_id: &str) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE volumes SET machine_id = $2, updated_at = now(),
             state = CASE WHEN state = 'available' THEN 'attached' ELSE state END
         WHERE id = $1 AND state IN ('creating', 'available', 'attached', 'resizing')",
    )
    .bind(id)
    .bind(machine_id)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Moves a volume from one of `from` to `to`; false if it was in none of them.
pub async fn transition<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    from: &[&str],
    to: &str,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE volumes SET state = $3, updated_at = now(),
             deleted_at = CASE WHEN $3 = 'deleted' THEN now() ELSE deleted_at END
         WHERE id = $1 AND state = ANY($2)",
    )
    .bind(id)
    .bind(from)
    .bind(to)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// The image exists: `creating` becomes `attached` when a machine waits for it, else
/// `available`. Returns the waiting machine.
pub async fn created<'e>(db: impl PgExecutor<'e>, id: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar::<_, Option<String>>(
        "UPDATE volumes SET updated_at = now(), error = NULL,
             state = CASE WHEN machine_id IS NULL THEN 'available' ELSE 'attached' END
         WHERE id = $1 AND state = 'creating' RETURNING machine_id",
    )
    .bind(id)
    .fetch_optional(db)
    .await?
    .flatten())
}

/// Creation gave up: `creating` becomes `failed`. Returns the machine that waited.
pub async fn fail<'e>(db: impl PgExecutor<'e>, id: &str, error: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar::<_, Option<String>>(
        "UPDATE volumes SET state = 'failed', error = $2, updated_at = now()
         WHERE id = $1 AND state = 'creating' RETURNING machine_id",
    )
    .bind(id)
    .bind(truncate(error))
    .fetch_optional(db)
    .await?
    .flatten())
}

pub async fn set_sizes<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    size: i64,
    target: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE volumes SET size_bytes = $2, target_size_bytes = $3, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(size)
    .bind(target)
    .execute(db)
    .await?;
    Ok(())
}

/// Asks for a grow to `target`: the volume is `resizing` until the job has done it.
pub async fn request_grow<'e>(db: impl PgExecutor<'e>, id: &str, target: i64) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE volumes SET target_size_bytes = $2, state = 'resizing', updated_at = now()
         WHERE id = $1 AND state IN ('available', 'attached', 'resizing')",
    )
    .bind(id)
    .bind(target)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Records that the image now has `size` bytes. The volume leaves `resizing` unless a
/// larger target arrived meanwhile. Returns (still resizing, the machine holding it).
pub async fn resized<'e>(
    db: impl PgExecutor<'e>,
    id: &str,
    size: i64,
) -> Result<(bool, Option<String>)> {
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "UPDATE volumes SET size_bytes = GREATEST(size_bytes, $2), updated_at = now(), error = NULL,
             state = CASE WHEN state <> 'resizing' THEN state
                          WHEN target_size_bytes > GREATEST(size_bytes, $2) THEN 'resizing'
                          WHEN machine_id IS NOT NULL THEN 'attached' ELSE 'available' END
         WHERE id = $1 AND state IN ('available', 'attached', 'resizing')
         RETURNING state, machine_id",
    )
    .bind(id)
    .bind(size)
    .fetch_optional(db)
    .await?;
    Ok(match row {
        Some((state, holder)) => (state == "resizing", holder),
        None => (false, None),
    })
}

/// A grow that gave up: the volume keeps its size and says why.
pub async fn abandon_grow<'e>(db: impl PgExecutor<'e>, id: &str, error: &str) -> Result<()> {
    sqlx::query(
        "UPDATE volumes SET target_size_bytes = size_bytes, error = $2, updated_at = now(),
             state = CASE WHEN state <> 'resizing' THEN state
                          WHEN machine_id IS NOT NULL THEN 'attached' ELSE 'available' END
         WHERE id = $1",
    )
    .bind(id)
    .bind(truncate(error))
    .execute(db)
    .await?;
    Ok(())
}

/// The project is going away: all its volumes that hold an image are to be deleted.
pub async fn mark_project_deleting<'e>(
    db: impl PgExecutor<'e>,
    project_id: &str,
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE volumes SET state = 'deleting', updated_at = now()
         WHERE project_id = $1 AND state NOT IN ('deleting', 'deleted')
         RETURNING id",
    )
    .bind(project_id)
    .fetch_all(db)
    .await?)
}

/// Clones of a volume that still hold an image.
pub async fn live_children(pool: &PgPool, id: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM volumes WHERE parent_volume_id = $1 AND state NOT IN ('deleted', 'failed')",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// Whether any volume that holds an image lives in `namespace`.
pub async fn namespace_in_use(pool: &PgPool, namespace: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM volumes WHERE namespace = $1 AND state <> 'deleted')",
    )
    .bind(namespace)
    .fetch_one(pool)
    .await?)
}

/// Retired volumes (resetting, deleting) that no live machine holds.
pub async fn unheld_retired(pool: &PgPool) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT v.id FROM volumes v
         WHERE v.state IN ('resetting', 'deleting')
           AND NOT EXISTS (SELECT 1 FROM machines m WHERE m.id = v.machine_id AND m.state IN {LIVE_MACHINE})
         ORDER BY v.updated_at LIMIT 1000"
    ))
    .fetch_all(pool)
    .await?)
}

/// Volumes in `state` for more than a minute (their job may be lost).
pub async fn stale_in_state(pool: &PgPool, state: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM volumes WHERE state = $1 AND updated_at < now() - interval '1 minute'
         ORDER BY updated_at LIMIT 1000",
    )
    .bind(state)
    .fetch_all(pool)
    .await?)
}

/// Volumes whose usage can be measured, in id order after `after`.
pub async fn meterable(pool: &PgPool, after: &str, limit: i64) -> Result<Vec<Volume>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM volumes
         WHERE state IN ('available', 'attached', 'resizing', 'resetting') AND id > $1
         ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Stores measured usage, many volumes in one statement.
pub async fn record_usage(pool: &PgPool, ids: &[String], used: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE volumes v SET used_bytes = m.used, used_measured_at = now()
         FROM UNNEST($1::text[], $2::bigint[]) AS m(id, used) WHERE v.id = m.id",
    )
    .bind(ids)
    .bind(used)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn record_error<'e>(db: impl PgExecutor<'e>, id: &str, error: &str) -> Result<()> {
    sqlx::query("UPDATE volumes SET error = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(truncate(error))
        .execute(db)
        .await?;
    Ok(())
}

fn truncate(text: &str) -> String {
    text.chars().take(2000).collect()
}

/// Provisioned bytes of every volume that holds an image (the larger of its size and a
/// pending grow), and the bytes written to them.
pub async fn totals<'e>(db: impl PgExecutor<'e>) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT COALESCE(sum(GREATEST(size_bytes, target_size_bytes)), 0)::bigint,
                COALESCE(sum(used_bytes), 0)::bigint
         FROM volumes WHERE state NOT IN ('deleted', 'failed')",
    )
    .fetch_one(db)
    .await?)
}

/// Every (namespace, image) a row owns. Failed creations own nothing: what they left
/// is swept.
pub async fn owned_images(pool: &PgPool) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT namespace, image FROM volumes WHERE state NOT IN ('deleted', 'failed')",
    )
    .fetch_all(pool)
    .await?)
}

pub async fn owns(pool: &PgPool, image: &ImageRef) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM volumes WHERE namespace = $1 AND image = $2
                        AND state NOT IN ('deleted', 'failed'))",
    )
    .bind(&image.namespace)
    .bind(&image.image)
    .fetch_one(pool)
    .await?)
}

/// Forgets orphans that are no longer unowned.
pub async fn forget_orphans_except(pool: &PgPool, unowned: &[&ImageRef]) -> Result<()> {
    let keys: Vec<String> = unowned
        .iter()
        .map(|i| format!("{}/{}", i.namespace, i.image))
        .collect();
    sqlx::query("DELETE FROM volume_orphans WHERE NOT (namespace || '/' || image = ANY($1))")
        .bind(&keys)
        .execute(pool)
        .await?;
    Ok(())
}

/// Notes an unowned image. Returns (seen for the first time, unowned past `grace`).
pub async fn note_orphan(
    pool: &PgPool,
    image: &ImageRef,
    grace_seconds: u64,
) -> Result<(bool, bool)> {
    Ok(sqlx::query_as(
        "WITH ins AS (INSERT INTO volume_orphans (namespace, image) VALUES ($1, $2)
                      ON CONFLICT DO NOTHING RETURNING first_seen_at)
         SELECT EXISTS (SELECT 1 FROM ins),
                COALESCE((SELECT first_seen_at <= now() - make_interval(secs => $3)
                          FROM volume_orphans WHERE namespace = $1 AND image = $2), false)",
    )
    .bind(&image.namespace)
    .bind(&image.image)
    .bind(grace_seconds as f64)
    .fetch_one(pool)
    .await?)
}

pub async fn forget_orphan(pool: &PgPool, image: &ImageRef) -> Result<()> {
    sqlx::query("DELETE FROM volume_orphans WHERE namespace = $1 AND image = $2")
        .bind(&image.namespace)
        .bind(&image.image)
        .execute(pool)
        .await?;
    Ok(())
}
