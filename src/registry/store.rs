//! Where model images' bytes live, through the `object_store` crate: a local directory
//! (`kiln dev`) or any S3-compatible store (S3, R2, MinIO, Ceph RGW).
//!
//! Layout, under the configured prefix:
//! - `blobs/sha256/<hex>`: every blob (layers, configs, manifests, indexes) once, shared
//!   by every model and revision that holds it;
//! - `models/<name>/tags/<tag>`: the digest a tag points at, so the store alone says
//!   what each model's tags were (PostgreSQL is what the registry serves from).

use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::reference::Digest;
use crate::config::{Config, ModelStoreKind};

/// Bytes of a blob, as they are read from the store.
pub type BlobStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Reads of local blobs go this many bytes at a time, this many chunks ahead of the
/// socket.
const LOCAL_READ_CHUNK: usize = 2 * 1024 * 1024;
const LOCAL_READ_AHEAD: usize = 2;
/// Reads at least this large are served from a memory map of the blob (smaller ones are
/// not worth a mapping and the TLB shootdown of unmapping it).
const MAP_AT_LEAST: u64 = 4 * 1024 * 1024;
const PAGE: usize = 4096;
/// Uploads are sent in parts of this size (S3 multipart), several at once.
const UPLOAD_PART_BYTES: usize = 16 * 1024 * 1024;
const UPLOAD_CONCURRENCY: usize = 4;

pub struct ModelStore {
    objects: Arc<dyn ObjectStore>,
    /// The directory of a local store: blobs are read straight from their files, since
    /// `object_store` reads local files 8 KiB at a time.
    local_root: Option<PathBuf>,
    /// Presigns blob URLs (S3).
    signer: Option<Arc<dyn Signer>>,
    prefix: String,
}

impl ModelStore {
    pub fn from_config(config: &Config) -> anyhow::Result<ModelStore> {
        match config.models.store {
            ModelStoreKind::Local => ModelStore::local(&config.local_models_dir()),
            ModelStoreKind::S3 => {
                let s3 = &config.models.s3;
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_allow_http(s3.allow_http)
                    .with_virtual_hosted_style_request(s3.virtual_hosted_style);
                if !s3.endpoint.is_empty() {
                    builder = builder.with_endpoint(&s3.endpoint);
                }
                if !s3.access_key_id.is_empty() {
                    builder = builder
                        .with_access_key_id(&s3.access_key_id)
                        .with_secret_access_key(s3.secret_access_key.expose_secret());
                }
                let store = Arc::new(builder.build()?);
                let prefix = s3.prefix.trim_matches('/').to_string();
                Ok(ModelStore {
                    objects: store.clone(),
                    local_root: None,
                    signer: Some(store),
                    prefix,
                })
            }
        }
    }

    /// A store in `dir` (created if needed).
    pub fn local(dir: &FsPath) -> anyhow::Result<ModelStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("creating the model store {}: {e}", dir.display()))?;
        let root = dir.canonicalize()?;
        Ok(ModelStore {
            objects: Arc::new(LocalFileSystem::new_with_prefix(&root)?),
            local_root: Some(root),
            signer: None,
            prefix: String::new(),
        })
    }

    fn key(&self, relative: &str) -> String {
        if self.prefix.is_empty() {
            relative.to_string()
        } else {
            format!("{}/{relative}", self.prefix)
        }
    }

    fn blob_key(&self, digest: &Digest) -> Path {
        Path::from(self.key(&format!("blobs/sha256/{}", digest.hex())))
    }

    /// The size of a stored blob, or `None` when the store lacks it.
    pub async fn blob_size(&self, digest: &Digest) -> object_store::Result<Option<u64>> {
        match self.objects.head(&self.blob_key(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Uploads the file at `path` as the blob `digest` (multipart for large files). The
    /// object appears whole or not at all.
    pub async fn put_blob_file(&self, digest: &Digest, path: &FsPath) -> anyhow::Result<()> {
        let mut file = tokio::fs::File::open(path).await?;
        let mut writer = object_store::buffered::BufWriter::with_capacity(
            self.objects.clone(),
            self.blob_key(digest),
            UPLOAD_PART_BYTES,
        )
        .with_max_concurrency(UPLOAD_CONCURRENCY);
        let mut buffer = vec![0u8; 1024 * 1024];
        loop {
            let read = file.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            if let Err(err) = writer.write_all(&buffer[..read]).await {
                let _ = writer.abort().await;
                return Err(err.into());
            }
        }
        writer.shutdown().await?;
        Ok(())
    }

    /// Records what `tag` of `name` points at, beside the blobs.
    pub async fn put_tag(&self, name: &str, tag: &str, digest: &Digest) -> anyhow::Result<()> {
        let key = Path::from(self.key(&format!("models/{name}/tags/{tag}")));
        self.objects
            .put(&key, PutPayload::from(digest.as_str().to_string()))
            .await?;
        Ok(())
    }

    /// A whole small blob (a manifest or a config).
    pub async fn blob_bytes(&self, digest: &Digest) -> anyhow::Result<Bytes> {
        if let Some(root) = &self.local_root {
            let path = root.join("blobs/sha256").join(digest.hex());
            return Ok(Bytes::from(tokio::fs::read(path).await?));
        }
        Ok(self
            .objects
            .get(&self.blob_key(digest))
            .await?
            .bytes()
            .await?)
    }

    /// Streams `range` of a blob (the whole of it if `None`).
    pub async fn blob_stream(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> anyhow::Result<BlobStream> {
        if let Some(root) = &self.local_root {
            let path = root.join("blobs/sha256").join(digest.hex());
            let file = tokio::fs::File::open(path).await?.into_std().await;
            let size = file.metadata()?.len();
            let range = range.unwrap_or(0..size);
            if range.end > size {
                anyhow::bail!("{digest} is {size} bytes in the store, shorter than recorded");
            }
            if range.end - range.start >= MAP_AT_LEAST {
                return Ok(mapped(file, range)?);
            }
            return Ok(read_ahead(file, range));
        }
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let result = self
            .objects
            .get_opts(&self.blob_key(digest), options)
            .await?;
        Ok(result
            .into_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other))
            .boxed())
    }

    /// A URL the client can fetch the blob from directly, when the store can presign.
    pub async fn presigned_blob_url(
        &self,
        digest: &Digest,
        valid_for: Duration,
    ) -> anyhow::Result<Option<url::Url>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(http::Method::GET, &self.blob_key(digest), valid_for)
            .await?;
        Ok(Some(url))
    }
}

/// Streams `range` of a local blob from a memory map of it, so the socket write copies
/// straight from the page cache (one copy per byte instead of a read and a write). A
/// blocking task touches each chunk's pages before handing it over, two chunks ahead, so
/// a page-in from disk happens there and never stalls the runtime's threads.
fn mapped(file: std::fs::File, range: Range<u64>) -> std::io::Result<BlobStream> {
    // SAFETY: blob files are immutable. The store writes each one to a temporary file and
    // renames it into place under its digest; nothing in Kiln writes to or truncates a
    // blob file afterwards, and deleting one leaves this mapping valid. (A file truncated
    // by something outside Kiln would fault the reader.)
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let _ = map.advise(memmap2::Advice::Sequential);
    let whole = Bytes::from_owner(map);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(LOCAL_READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut offset = range.start as usize;
        let end = range.end as usize;
        while offset < end {
            let chunk = whole.slice(offset..end.min(offset + LOCAL_READ_CHUNK));
            let touched = chunk.iter().step_by(PAGE).fold(0u8, |a, b| a ^ b);
            std::hint::black_box(touched);
            offset += chunk.len();
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        }
    });
    Ok(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
    .boxed())
}

/// Streams `range` of a local file: one blocking task reads it in large chunks straight
/// into the buffers that are sent, a few chunks ahead, so reading overlaps sending and
/// the runtime is woken once per chunk. The task ends when the response is dropped.
fn read_ahead(mut file: std::fs::File, range: Range<u64>) -> BlobStream {
    use std::io::{Read, Seek};
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(LOCAL_READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        if let Err(err) = file.seek(std::io::SeekFrom::Start(range.start)) {
            let _ = tx.blocking_send(Err(err));
            return;
        }
        let mut left = range.end - range.start;
        while left > 0 {
            let want = left.min(LOCAL_READ_CHUNK as u64);
            // read_to_end fills spare capacity without zeroing it first.
            let mut chunk = Vec::with_capacity(want as usize);
            let result = match (&mut file).take(want).read_to_end(&mut chunk) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the blob is shorter than its recorded size",
                )),
                Ok(read) => {
                    left -= read as u64;
                    Ok(Bytes::from(chunk))
                }
                Err(err) => Err(err),
            };
            let failed = result.is_err();
            if tx.blocking_send(result).is_err() || failed {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
    .boxed()
}
