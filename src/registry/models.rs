//! The model registry's domain: importing a model as an image (authorized, validated,
//! uploaded, recorded and audited), resolving what `/v2/` asks for, listing models, and
//! counting pulls.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use super::image::{self, BuildError, BuildOptions, EntryKind, LayerFormat};
use super::reference::{Digest, Name, Reference, Tag};
use super::store::ModelStore;
use crate::auth::Principal;
use crate::auth::authz::{self, Action, Target};
use crate::config::{Config, ModelPullAuth, ModelsConfig};
use crate::db;
use crate::db::audit;
use crate::db::models::{ModelListing, NewModel, NewRevision, RevisionRow, StoredBlob};
use crate::error::{Error, Result};

/// Every replica LISTENs here; the payload is the model's name.
pub const MODEL_CHANNEL: &str = "kiln_models";

/// What to import from a directory.
#[derive(Debug, Clone)]
pub struct DirectoryImport {
    /// The repository name; lower-cased hub ids are accepted as they are.
    pub name: String,
    pub dir: PathBuf,
    /// The revision it is (a hub commit); default: derived from the content.
    pub revision: Option<String>,
    /// Tags besides the revision; default `latest`.
    pub tags: Vec<String>,
    pub source: Option<String>,
    pub license: Option<String>,
    pub hub_repository: Option<String>,
}

/// What to import from the hub.
#[derive(Debug, Clone, serde::Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HubImport {
    /// The hub's repository id, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub repository: String,
    /// A branch, tag or commit; default `main`.
    #[serde(default)]
    pub revision: Option<String>,
    /// The name to serve it under; default: the lower-cased repository id (as depot.ai).
    #[serde(default)]
    pub name: Option<String>,
}

/// The job kind of hub imports started through the API.
pub const HUB_IMPORT_JOB: &str = "models.import_hub";

/// What an import did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Imported {
    pub name: String,
    pub revision: String,
    /// What the tags point at: the image index over linux/amd64 and linux/arm64.
    pub digest: String,
    pub tags: Vec<String>,
    pub files: usize,
    pub file_bytes: u64,
    pub layers: usize,
    /// Blobs the store did not have yet, and their bytes.
    pub uploaded_blobs: usize,
    pub uploaded_bytes: u64,
    /// The Dockerfile line that embeds this model.
    pub copy_from: String,
}

/// A model with its revisions, for the API and the dashboard.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelDetail {
    #[serde(flatten)]
    pub model: ModelListing,
    pub copy_from: String,
    pub revisions: Vec<RevisionRow>,
}

pub struct Models {
    db: PgPool,
    /// The store, or why it could not be opened (then every registry call says so).
    store: std::result::Result<Arc<ModelStore>, String>,
    config: ModelsConfig,
    /// `host[:port]` clients pull from, for `COPY --from` lines.
    host: String,
    /// Pulls counted since the last flush, by model name (only names that exist).
    pulls: Mutex<HashMap<String, i64>>,
    hub: super::hub::Hub,
}

impl Models {
    /// Opens the configured store; a store that cannot be opened is logged and makes
    /// every registry call fail with that reason, while the rest of Kiln serves.
    pub fn new(db: PgPool, config: &Config) -> Models {
        let store = ModelStore::from_config(config).map(Arc::new).map_err(|err| {
            tracing::error!(error = %format!("{err:#}"), "the model store cannot be opened; the model registry is unavailable");
            format!("{err:#}")
        });
        Models {
            db,
            store,
            config: config.models.clone(),
            host: config.registry_host(),
            pulls: Mutex::new(HashMap::new()),
            hub: super::hub::Hub::new(config),
        }
    }

    pub fn store(&self) -> Result<&ModelStore> {
        self.store.as_deref().map_err(|reason| {
            Error::Unavailable(format!(
                "the model store cannot be opened ({reason}); fix the [models] configuration"
            ))
        })
    }

    /// The Dockerfile line that embeds `name`.
    pub fn copy_from_line(&self, name: &str, tag: &str) -> String {
        format!("COPY --from={}/{name}:{tag} / /model", self.host)
    }

    /// Builds the image of a directory, uploads the blobs the store lacks, and records the
    /// revision and its tags. The same files always give the same digest; re-importing
    /// uploads nothing new.
    pub async fn import_directory(
        &self,
        principal: &Principal,
        import: DirectoryImport,
    ) -> Result<Imported> {
        authz::authorize(principal, Action::ManageModels, Target::Instance)?;
        let name = Name::parse(&import.name).map_err(|e| Error::invalid("name", e.to_string()))?;
        let mut tags = Vec::new();
        for tag in if import.tags.is_empty() {
            vec!["latest".to_string()]
        } else {
            import.tags.clone()
        } {
            let tag = Tag::parse(&tag).map_err(|e| Error::invalid("tag", e.to_string()))?;
            if !tags.contains(&tag.as_str().to_string()) {
                tags.push(tag.as_str().to_string());
            }
        }
        if let Some(revision) = &import.revision {
            Tag::parse(revision).map_err(|e| {
                Error::invalid("revision", format!("{e} (a revision is also a tag)"))
            })?;
        }
        let license = match &import.license {
            Some(license) => Some(license.clone()),
            None => license_from_model_card(&import.dir),
        };
        let format = match self.config.layer_format.as_str() {
            "gzip" => LayerFormat::Gzip,
            _ => LayerFormat::Tar,
        };
        let options = BuildOptions {
            large_file_bytes: self.config.large_file_mb * 1024 * 1024,
            max_layers: self.config.max_layers,
            format,
            source: import.source.clone(),
            revision: import.revision.clone(),
            license: license.clone(),
            tags: tags.clone(),
        };
        let work = tempfile::Builder::new()
            .prefix("kiln-model-import-")
            .tempdir()
            .map_err(Error::internal)?;
        let layout = work.path().to_path_buf();
        let dir = import.dir.clone();
        let built = tokio::task::spawn_blocking(move || image::build(&dir, &layout, &options))
            .await
            .map_err(Error::internal)?
            .map_err(build_error)?;
        let revision = import
            .revision
            .clone()
            .unwrap_or_else(|| built.index.digest["sha256:".len()..][..12].to_string());
        if !tags.contains(&revision) {
            tags.push(revision.clone());
        }

        // Every blob of the image, once: layers, configs, manifests, the index.
        let mut blobs: Vec<StoredBlob> = Vec::new();
        let descriptors = built
            .layers
            .iter()
            .map(|l| &l.descriptor)
            .chain(&built.configs)
            .chain(&built.manifests)
            .chain(std::iter::once(&built.index));
        for d in descriptors {
            if !blobs.iter().any(|b| b.digest == d.digest) {
                blobs.push(StoredBlob {
                    digest: d.digest.clone(),
                    size_bytes: d.size as i64,
                    media_type: d.media_type.clone(),
                });
            }
        }
        let digests: Vec<String> = blobs.iter().map(|b| b.digest.clone()).collect();
        let known = db::models::known_blobs(&self.db, &digests).await?;
        let mut uploaded_blobs = 0;
        let mut uploaded_bytes = 0u64;
        // Blobs first, so no row ever names a blob the store lacks.
        for blob in &blobs {
            if known.contains(&blob.digest) {
                continue;
            }
            let digest = Digest::parse(&blob.digest).map_err(Error::internal)?;
            let path = work.path().join("blobs/sha256").join(digest.hex());
            self.store()?
                .put_blob_file(&digest, &path)
                .await
                .map_err(|e| Error::internal(e.context(format!("uploading {digest}"))))?;
            uploaded_blobs += 1;
            uploaded_bytes += blob.size_bytes as u64;
        }
        let index_digest = Digest::parse(&built.index.digest).map_err(Error::internal)?;
        for tag in &tags {
            self.store()?
                .put_tag(name.as_str(), tag, &index_digest)
                .await
                .map_err(Error::internal)?;
        }

        let files: Vec<serde_json::Value> = built
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::File { size, .. } => Some(json!({"path": e.path, "size": size})),
                _ => None,
            })
            .collect();
        let image_bytes: i64 = blobs.iter().map(|b| b.size_bytes).sum();
        let mut tx = self.db.begin().await?;
        let model_id = db::models::upsert_model(
            &mut *tx,
            &NewModel {
                id: &db::ids::new_id(),
                name: name.as_str(),
                source: import.source.as_deref(),
                hub_repository: import.hub_repository.as_deref(),
                license: license.as_deref(),
            },
        )
        .await?;
        db::models::add_contents(&mut tx, &model_id, &blobs).await?;
        let previous = db::models::upsert_revision(
            &mut *tx,
            &NewRevision {
                model_id: &model_id,
                revision: &revision,
                index_digest: index_digest.as_str(),
                file_count: files.len() as i32,
                file_bytes: built.file_bytes as i64,
                image_bytes,
                layer_format: self.config.layer_format.as_str(),
                files: serde_json::Value::Array(files.clone()),
            },
        )
        .await?;
        for tag in &tags {
            db::models::set_tag(&mut *tx, &model_id, tag, &revision, index_digest.as_str()).await?;
        }
        audit::record(
            &mut *tx,
            principal
                .audit("model.import")
                .target("model", &model_id)
                .details(json!({
                    "name": name.as_str(),
                    "revision": revision,
                    "digest": index_digest.as_str(),
                    "previous_digest": previous,
                    "tags": tags,
                    "source": import.source,
                    "uploaded_blobs": uploaded_blobs,
                })),
        )
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(MODEL_CHANNEL)
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(
            model = name.as_str(),
            revision,
            digest = index_digest.as_str(),
            uploaded_blobs,
            uploaded_bytes,
            "model imported"
        );
        Ok(Imported {
            copy_from: self.copy_from_line(name.as_str(), &tags[0]),
            name: name.as_str().to_string(),
            revision,
            digest: index_digest.as_str().to_string(),
            tags,
            files: files.len(),
            file_bytes: built.file_bytes,
            layers: built.layers.len(),
            uploaded_blobs,
            uploaded_bytes,
        })
    }

    /// Downloads a revision from the hub (resuming an earlier attempt's downloads, every
    /// file checked against the hub's hashes) and imports it, named and tagged as
    /// depot.ai does: the lower-cased repository id, `latest` and the commit.
    pub async fn import_from_hub(
        &self,
        principal: &Principal,
        import: HubImport,
    ) -> Result<Imported> {
        authz::authorize(principal, Action::ManageModels, Target::Instance)?;
        super::hub::validate_repository(&import.repository)?;
        let name = match &import.name {
            Some(name) => Name::parse(name),
            None => Name::from_hub_id(&import.repository),
        }
        .map_err(|e| Error::invalid("name", e.to_string()))?;
        let requested = import
            .revision
            .clone()
            .unwrap_or_else(|| "main".to_string());
        let revision = self.hub.revision(&import.repository, &requested).await?;
        let dir = self.hub.download(&revision).await?;
        let imported = self
            .import_directory(
                principal,
                DirectoryImport {
                    name: name.as_str().to_string(),
                    dir,
                    revision: Some(revision.commit.clone()),
                    tags: vec!["latest".to_string()],
                    source: Some(self.hub.repository_url(&import.repository)),
                    license: revision.license.clone(),
                    hub_repository: Some(import.repository.clone()),
                },
            )
            .await?;
        self.hub.discard(&revision).await;
        Ok(imported)
    }

    /// Queues a hub import to run in the background (a job, retried and resumed on
    /// failure); the caller is checked now, the import runs as the job.
    pub async fn start_hub_import(&self, principal: &Principal, import: HubImport) -> Result<i64> {
        authz::authorize(principal, Action::ManageModels, Target::Instance)?;
        super::hub::validate_repository(&import.repository)?;
        if let Some(name) = &import.name {
            Name::parse(name).map_err(|e| Error::invalid("name", e.to_string()))?;
        }
        let mut tx = self.db.begin().await?;
        let job = db::jobs::enqueue(
            &mut *tx,
            db::jobs::NewJob {
                queue: db::jobs::DEFAULT_QUEUE.to_string(),
                kind: HUB_IMPORT_JOB.to_string(),
                payload: serde_json::to_value(&import).map_err(Error::internal)?,
                dedupe_key: Some(format!(
                    "{}@{}",
                    import.repository,
                    import.revision.as_deref().unwrap_or("main")
                )),
                run_at: None,
                max_attempts: Some(5),
            },
        )
        .await?;
        let Some(job) = job else {
            return Err(Error::AlreadyExists(format!(
                "an import of {} is already queued or running",
                import.repository
            )));
        };
        audit::record(
            &mut *tx,
            principal
                .audit("model.import_requested")
                .target("job", job.to_string())
                .details(json!({ "repository": import.repository, "revision": import.revision, "name": import.name })),
        )
        .await?;
        tx.commit().await?;
        Ok(job)
    }

    /// Whether `principal` (none for an anonymous request) may pull.
    pub fn authorize_pull(&self, principal: Option<&Principal>) -> Result<()> {
        authz::authorize_model_pull(principal, self.config.auth == ModelPullAuth::Anonymous)
    }

    /// What a manifest reference of `name` resolves to; `None` when there is none.
    pub async fn manifest(&self, name: &Name, reference: &Reference) -> Result<Option<StoredBlob>> {
        let found = match reference {
            Reference::Tag(tag) => {
                db::models::manifest_by_tag(&self.db, name.as_str(), tag.as_str()).await?
            }
            Reference::Digest(digest) => {
                db::models::content(&self.db, name.as_str(), digest.as_str()).await?
            }
        };
        Ok(found.filter(|blob| is_manifest(&blob.media_type)))
    }

    /// The bytes of a small stored blob (a manifest or an index) the rows name.
    pub async fn stored_bytes(&self, digest: &str) -> Result<bytes::Bytes> {
        let digest = Digest::parse(digest).map_err(Error::internal)?;
        self.store()?
            .blob_bytes(&digest)
            .await
            .map_err(Error::internal)
    }

    /// A blob of `name`; `None` unless that model holds it.
    pub async fn blob(&self, name: &Name, digest: &Digest) -> Result<Option<StoredBlob>> {
        db::models::content(&self.db, name.as_str(), digest.as_str()).await
    }

    pub async fn model_exists(&self, name: &Name) -> Result<Option<String>> {
        db::models::model_id(&self.db, name.as_str()).await
    }

    pub async fn tags(
        &self,
        model_id: &str,
        last: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>> {
        db::models::tags(&self.db, model_id, last, limit).await
    }

    pub async fn names(&self, last: Option<&str>, limit: i64) -> Result<Vec<String>> {
        db::models::names(&self.db, last, limit).await
    }

    /// Every model with its current revision.
    pub async fn list(&self, principal: Option<&Principal>) -> Result<Vec<ModelListing>> {
        self.authorize_pull(principal)?;
        db::models::list(&self.db, None).await
    }

    /// One model with all its revisions.
    pub async fn get(&self, principal: Option<&Principal>, name: &str) -> Result<ModelDetail> {
        self.authorize_pull(principal)?;
        let listing = db::models::list(&self.db, Some(name))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::not_found("model", name))?;
        Ok(ModelDetail {
            copy_from: self.copy_from_line(name, "latest"),
            revisions: db::models::revisions(&self.db, &listing.id).await?,
            model: listing,
        })
    }

    /// Counts a pull of `name` (a GET of one of its image indexes).
    pub fn count_pull(&self, name: &str) {
        let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
        *pulls.entry(name.to_string()).or_default() += 1;
    }

    /// Adds the counted pulls to the database; on failure they are kept for the next try.
    pub async fn flush_pulls(&self) -> Result<()> {
        let taken: HashMap<String, i64> = {
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *pulls)
        };
        if taken.is_empty() {
            return Ok(());
        }
        let (names, counts): (Vec<String>, Vec<i64>) =
            taken.iter().map(|(name, n)| (name.clone(), *n)).unzip();
        if let Err(err) = db::models::add_pulls(&self.db, &names, &counts).await {
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            for (name, n) in taken {
                *pulls.entry(name).or_default() += n;
            }
            return Err(err);
        }
        Ok(())
    }

    /// Flushes pull counts every `pull_count_flush_seconds` until `stop`, then once more.
    pub async fn run_pull_counter(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let period = Duration::from_secs(self.config.pull_count_flush_seconds);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => break,
            }
            if let Err(err) = self.flush_pulls().await {
                tracing::warn!(error = %err, "could not record model pull counts; retrying");
            }
        }
        if let Err(err) = self.flush_pulls().await {
            tracing::warn!(error = %err, "model pull counts since the last flush are lost");
        }
    }
}

pub fn is_manifest(media_type: &str) -> bool {
    matches!(
        media_type,
        image::INDEX_MEDIA_TYPE
            | image::MANIFEST_MEDIA_TYPE
            | "application/vnd.docker.distribution.manifest.v2+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
    )
}

fn build_error(err: BuildError) -> Error {
    match err {
        BuildError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::invalid("dir", err.to_string())
        }
        BuildError::Io { .. } => Error::internal(anyhow::Error::new(err)),
        other => Error::invalid("dir", other.to_string()),
    }
}

/// `license:` from the YAML front matter of a Hugging Face model card (`README.md`).
pub fn license_from_model_card(dir: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = String::new();
    std::fs::File::open(dir.join("README.md"))
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut head)
        .ok()?;
    let mut lines = head.lines();
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    for line in lines {
        let line = line.trim_end();
        if line == "---" {
            break;
        }
        if let Some(value) = line.strip_prefix("license:") {
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            if !value.is_empty() && value.len() <= 100 {
                return Some(value.to_string());
            }
        }
    }
    None
}

/// Registers the hub import job: it runs as the installation (the request was
/// authorized and audited when it was queued) and may run up to the import timeout.
pub fn register_jobs(runner: &mut crate::jobs::JobRunner, models: Arc<Models>) {
    let limit = Duration::from_secs(models.config.import_timeout_seconds);
    runner.long_running(HUB_IMPORT_JOB, limit).register_with(
        HUB_IMPORT_JOB,
        models,
        |models, job| async move {
            let import: HubImport = serde_json::from_value(job.payload)?;
            let principal = Principal::operator("models.import_hub job");
            models.import_from_hub(&principal, import).await?;
            Ok(())
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_comes_from_the_model_cards_front_matter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("README.md"),
            "---\nlanguage: en\nlicense: apache-2.0\ntags:\n- x\n---\n# Model\nlicense: mit\n",
        )
        .unwrap();
        assert_eq!(
            license_from_model_card(dir.path()).as_deref(),
            Some("apache-2.0")
        );
        std::fs::write(dir.path().join("README.md"), "# Model\nlicense: mit\n").unwrap();
        assert_eq!(license_from_model_card(dir.path()), None);
        std::fs::write(
            dir.path().join("README.md"),
            "---\ntags: []\n---\nlicense: mit\n",
        )
        .unwrap();
        assert_eq!(license_from_model_card(dir.path()), None);
    }
}
