//! A model directory as a reproducible OCI image.
//!
//! The same files always give the same digests, on any machine: entries sorted by path,
//! mtime 0, uid/gid 0, no user or group names, modes 0644 (0755 for directories and
//! executables), config `created` at the epoch, JSON with a fixed key order. Each file of
//! at least `large_file_bytes` gets a layer of its own (so an unchanged weight file is the
//! same blob in every revision and every model that ships it); every other file, and the
//! directory tree, share the first layer. The layer count is capped, because runtimes
//! fail past about 125 layers. Both platforms' manifests point at the same layers.
//!
//! Output is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) that
//! skopeo and other tools read; blobs already present are kept, not rewritten.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const TAR_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZIP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The platforms every model image is published for (its files are the same on both).
pub const ARCHITECTURES: [&str; 2] = ["amd64", "arm64"];

/// How layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// Plain tar: the digest is the diff id, Range reads hit file bytes directly, no CPU.
    Tar,
    /// tar+gzip at a fixed level, without name or mtime in the gzip header.
    Gzip,
}

impl LayerFormat {
    fn media_type(self) -> &'static str {
        match self {
            LayerFormat::Tar => TAR_MEDIA_TYPE,
            LayerFormat::Gzip => TAR_GZIP_MEDIA_TYPE,
        }
    }
}

/// What to build and how.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Files at least this large get a layer of their own.
    pub large_file_bytes: u64,
    /// At most this many layers in all.
    pub max_layers: usize,
    pub format: LayerFormat,
    /// `org.opencontainers.image.source`, e.g. the hub URL of the model.
    pub source: Option<String>,
    /// `org.opencontainers.image.revision`, e.g. the hub commit.
    pub revision: Option<String>,
    /// `org.opencontainers.image.licenses`, from the model card when it has one.
    pub license: Option<String>,
    /// The tags the layout's `index.json` names the image by.
    pub tags: Vec<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            large_file_bytes: 4 * 1024 * 1024,
            max_layers: 64,
            format: LayerFormat::Tar,
            source: None,
            revision: None,
            license: None,
            tags: vec!["latest".into()],
        }
    }
}

/// Why a directory cannot become an image. Nothing is left in the layout but complete
/// blobs (unreferenced ones are harmless and reused by the next build).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{path}: a symbolic link pointing outside the model directory (to {target})")]
    SymlinkEscapes { path: String, target: String },
    #[error("{path}: not a regular file, directory or symbolic link")]
    UnsupportedFile { path: String },
    #[error("{path}: the name is not valid UTF-8")]
    NonUtf8Name { path: String },
    #[error("{0}: the model directory holds no files")]
    Empty(String),
    #[error("max_layers must be at least 1")]
    NoLayers,
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One entry of the model directory, by its path inside the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative, `/`-separated, no leading `./`.
    pub path: String,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File {
        size: u64,
        executable: bool,
    },
    /// A link to another entry of the directory, kept as a link.
    Symlink {
        target: String,
    },
}

/// A blob written to the layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[serde(serialize_with = "annotations")]
    pub annotations: Vec<(String, String)>,
}

fn annotations<S: serde::Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// A layer: its descriptor and its uncompressed digest (the config's diff id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub descriptor: Descriptor,
    pub diff_id: String,
    /// The files it holds (directories are in the first layer).
    pub files: Vec<String>,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The image index: what a tag points at.
    pub index: Descriptor,
    /// One manifest per architecture, in [`ARCHITECTURES`] order.
    pub manifests: Vec<Descriptor>,
    /// Their configs, in the same order.
    pub configs: Vec<Descriptor>,
    pub layers: Vec<Layer>,
    pub entries: Vec<Entry>,
    /// Bytes of all the files.
    pub file_bytes: u64,
}

/// Reads `dir` in path order. Symbolic links must point inside it.
pub fn scan(dir: &Path) -> Result<Vec<Entry>, BuildError> {
    let root = dir.canonicalize().map_err(io_error(dir))?;
    let mut entries = Vec::new();
    walk(&root, &root, &mut entries)?;
    if !entries
        .iter()
        .any(|e| matches!(e.kind, EntryKind::File { .. }))
    {
        return Err(BuildError::Empty(dir.display().to_string()));
    }
    Ok(entries)
}

fn walk(root: &Path, dir: &Path, entries: &mut Vec<Entry>) -> Result<(), BuildError> {
    let mut children: Vec<(String, PathBuf)> = Vec::new();
    for child in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let child = child.map_err(io_error(dir))?;
        let path = child.path();
        let name = child
            .file_name()
            .into_string()
            .map_err(|_| BuildError::NonUtf8Name {
                path: path.display().to_string(),
            })?;
        children.push((name, path));
    }
    // Byte order of the names: the same on every machine and locale.
    children.sort();
    for (_, path) in children {
        let relative = relative_path(root, &path)?;
        let meta = std::fs::symlink_metadata(&path).map_err(io_error(&path))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            entries.push(Entry {
                path: relative,
                kind: EntryKind::Directory,
            });
            walk(root, &path, entries)?;
        } else if kind.is_file() {
            use std::os::unix::fs::PermissionsExt;
            entries.push(Entry {
                path: relative,
                kind: EntryKind::File {
                    size: meta.len(),
                    executable: meta.permissions().mode() & 0o111 != 0,
                },
            });
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_error(&path))?;
            let escapes = || BuildError::SymlinkEscapes {
                path: relative.clone(),
                target: target.display().to_string(),
            };
            // Where it leads once every link on the way is followed.
            let resolved = path
                .parent()
                .unwrap_or(root)
                .join(&target)
                .canonicalize()
                .map_err(|_| escapes())?;
            if !resolved.starts_with(root) || target.is_absolute() {
                return Err(escapes());
            }
            let target = target.to_str().ok_or_else(|| BuildError::NonUtf8Name {
                path: relative.clone(),
            })?;
            entries.push(Entry {
                path: relative.clone(),
                kind: EntryKind::Symlink {
                    target: target.to_string(),
                },
            });
        } else {
            return Err(BuildError::UnsupportedFile { path: relative });
        }
    }
    Ok(())
}

fn relative_path(root: &Path, path: &Path) -> Result<String, BuildError> {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let parts: Option<Vec<&str>> = relative
        .components()
        .map(|c| match c {
            Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .collect();
    parts
        .map(|p| p.join("/"))
        .ok_or_else(|| BuildError::NonUtf8Name {
            path: path.display().to_string(),
        })
}

/// Which files go in which layer: the first holds the directory tree and the small files;
/// each large file has its own, the largest first while the cap allows (the rest join the
/// first layer). Layers after the first are in path order.
fn plan_layers(entries: &[Entry], options: &BuildOptions) -> Vec<Vec<usize>> {
    let mut large: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, EntryKind::File { size, .. } if size >= options.large_file_bytes))
        .map(|(i, _)| i)
        .collect();
    let size_of = |i: &usize| match entries[*i].kind {
        EntryKind::File { size, .. } => size,
        _ => 0,
    };
    large.sort_by(|a, b| size_of(b).cmp(&size_of(a)).then(a.cmp(b)));
    large.truncate(options.max_layers.saturating_sub(1));
    large.sort();
    let mut first: Vec<usize> = (0..entries.len()).filter(|i| !large.contains(i)).collect();
    first.sort();
    let mut plan = Vec::with_capacity(large.len() + 1);
    plan.push(first);
    plan.extend(large.into_iter().map(|i| vec![i]));
    plan
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn digest_of(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// An OCI image layout being written.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn open(root: &Path) -> Result<Layout, BuildError> {
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_error(&blobs))?;
        let marker = root.join("oci-layout");
        std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_error(&marker))?;
        Ok(Layout {
            root: root.to_path_buf(),
        })
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.root.join("blobs").join("sha256").join(hex)
    }

    /// A temporary file in the layout, renamed to its digest once complete.
    fn temporary(&self) -> Result<tempfile::NamedTempFile, BuildError> {
        let dir = self.root.join("blobs");
        tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&dir)
            .map_err(io_error(&dir))
    }

    fn commit(&self, temp: tempfile::NamedTempFile, digest: &str) -> Result<(), BuildError> {
        let path = self.blob_path(digest);
        if path.exists() {
            // Content-addressed: the same digest is the same bytes.
            return Ok(());
        }
        temp.persist(&path).map_err(|e| BuildError::Io {
            path: path.display().to_string(),
            source: e.error,
        })?;
        Ok(())
    }

    fn put_json(&self, media_type: &str, value: &impl Serialize) -> Result<Descriptor, BuildError> {
        let bytes = serde_json::to_vec(value).map_err(|e| BuildError::Io {
            path: self.root.display().to_string(),
            source: io::Error::other(e),
        })?;
        let digest = digest_of(Sha256::new_with_prefix(&bytes));
        let path = self.blob_path(&digest);
        if !path.exists() {
            let mut temp = self.temporary()?;
            temp.write_all(&bytes).map_err(io_error(&path))?;
            self.commit(temp, &digest)?;
        }
        Ok(Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
            platform: None,
            annotations: Vec::new(),
        })
    }
}

fn header_for(entry: &Entry) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    match &entry.kind {
        EntryKind::Directory => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
        }
        EntryKind::File { size, executable } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if *executable { 0o755 } else { 0o644 });
            header.set_size(*size);
        }
        EntryKind::Symlink { .. } => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
        }
    }
    header
}

/// Writes one layer: the parent directories of its files first (so every layer unpacks
/// on its own), then the entries.
fn write_layer(
    layout: &Layout,
    dir: &Path,
    entries: &[Entry],
    members: &[usize],
    format: LayerFormat,
) -> Result<Layer, BuildError> {
    let mut wanted: Vec<usize> = Vec::new();
    for &i in members {
        let path = &entries[i].path;
        for (j, entry) in entries.iter().enumerate() {
            let is_parent = matches!(entry.kind, EntryKind::Directory)
                && path.starts_with(&entry.path)
                && path.as_bytes().get(entry.path.len()) == Some(&b'/');
            if is_parent && !wanted.contains(&j) && !members.contains(&j) {
                wanted.push(j);
            }
        }
    }
    wanted.extend_from_slice(members);
    wanted.sort();
    wanted.dedup();

    let temp = layout.temporary()?;
    let file = temp.reopen().map_err(io_error(temp.path()))?;
    let stored = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let (stored, diff_id) = match format {
        LayerFormat::Tar => {
            let mut tar = tar::Builder::new(stored);
            append_entries(&mut tar, dir, entries, &wanted)?;
            let stored = tar.into_inner().map_err(io_error(dir))?;
            let diff_id = stored.hasher.clone();
            (stored, diff_id)
        }
        LayerFormat::Gzip => {
            let gzip = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(255)
                .write(stored, flate2::Compression::new(6));
            let plain = Hashing {
                inner: gzip,
                hasher: Sha256::new(),
                bytes: 0,
            };
            let mut tar = tar::Builder::new(plain);
            append_entries(&mut tar, dir, entries, &wanted)?;
            let plain = tar.into_inner().map_err(io_error(dir))?;
            let diff_id = plain.hasher;
            let stored = plain.inner.finish().map_err(io_error(dir))?;
            (stored, diff_id)
        }
    };
    let Hashing {
        mut inner,
        hasher,
        bytes,
    } = stored;
    inner.flush().map_err(io_error(temp.path()))?;
    drop(inner);
    let digest = digest_of(hasher);
    layout.commit(temp, &digest)?;
    let files: Vec<String> = members
        .iter()
        .filter(|i| !matches!(entries[**i].kind, EntryKind::Directory))
        .map(|i| entries[*i].path.clone())
        .collect();
    let mut annotations = Vec::new();
    if let [only] = members {
        annotations.push((
            "org.opencontainers.image.title".to_string(),
            entries[*only].path.clone(),
        ));
    }
    Ok(Layer {
        descriptor: Descriptor {
            media_type: format.media_type().to_string(),
            digest,
            size: bytes,
            platform: None,
            annotations,
        },
        diff_id: digest_of(diff_id),
        files,
    })
}

fn append_entries<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    entries: &[Entry],
    wanted: &[usize],
) -> Result<(), BuildError> {
    for &i in wanted {
        let entry = &entries[i];
        let mut header = header_for(entry);
        let name = match entry.kind {
            EntryKind::Directory => format!("{}/", entry.path),
            _ => entry.path.clone(),
        };
        match &entry.kind {
            EntryKind::Directory => tar
                .append_data(&mut header, &name, io::empty())
                .map_err(io_error(dir))?,
            EntryKind::Symlink { target } => tar
                .append_link(&mut header, &name, target)
                .map_err(io_error(dir))?,
            EntryKind::File { size, .. } => {
                let path = dir.join(&entry.path);
                let file = File::open(&path).map_err(io_error(&path))?;
                // Exactly the size scanned: a file that changes under us fails the build
                // instead of producing a layer that disagrees with its header.
                let mut reader = file.take(*size);
                let mut counted = CountingReader {
                    inner: &mut reader,
                    read: 0,
                };
                tar.append_data(&mut header, &name, &mut counted)
                    .map_err(io_error(&path))?;
                if counted.read != *size {
                    return Err(BuildError::Io {
                        path: path.display().to_string(),
                        source: io::Error::other("the file changed while it was read"),
                    });
                }
            }
        }
    }
    Ok(())
}

struct CountingReader<'a, R> {
    inner: &'a mut R,
    read: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    created: &'static str,
    architecture: &'a str,
    os: &'static str,
    config: ConfigLabels<'a>,
    rootfs: RootFs<'a>,
}

#[derive(Serialize)]
struct ConfigLabels<'a> {
    #[serde(rename = "Labels", serialize_with = "annotations")]
    labels: &'a [(String, String)],
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<&'a str>,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: &'a Descriptor,
    layers: Vec<&'a Descriptor>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    #[serde(serialize_with = "annotations")]
    annotations: &'a [(String, String)],
}

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: &'a [Descriptor],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    #[serde(serialize_with = "annotations")]
    annotations: &'a [(String, String)],
}

/// Builds the image of `dir` into the OCI image layout at `layout_dir` (created if
/// needed), and names it there by `options.tags`.
pub fn build(
    dir: &Path,
    layout_dir: &Path,
    options: &BuildOptions,
) -> Result<BuiltImage, BuildError> {
    if options.max_layers == 0 {
        return Err(BuildError::NoLayers);
    }
    let entries = scan(dir)?;
    let root = dir.canonicalize().map_err(io_error(dir))?;
    let layout = Layout::open(layout_dir)?;
    let mut layers = Vec::new();
    for members in plan_layers(&entries, options) {
        if members.is_empty() {
            continue;
        }
        layers.push(write_layer(
            &layout,
            &root,
            &entries,
            &members,
            options.format,
        )?);
    }
    let mut labels = Vec::new();
    if let Some(source) = &options.source {
        labels.push((
            "org.opencontainers.image.source".to_string(),
            source.clone(),
        ));
    }
    if let Some(revision) = &options.revision {
        labels.push((
            "org.opencontainers.image.revision".to_string(),
            revision.clone(),
        ));
    }
    if let Some(license) = &options.license {
        labels.push((
            "org.opencontainers.image.licenses".to_string(),
            license.clone(),
        ));
    }
    let mut manifests = Vec::new();
    let mut configs = Vec::new();
    for architecture in ARCHITECTURES {
        let config = layout.put_json(
            CONFIG_MEDIA_TYPE,
            &ImageConfig {
                created: "1970-01-01T00:00:00Z",
                architecture,
                os: "linux",
                config: ConfigLabels { labels: &labels },
                rootfs: RootFs {
                    kind: "layers",
                    diff_ids: layers.iter().map(|l| l.diff_id.as_str()).collect(),
                },
            },
        )?;
        let mut manifest = layout.put_json(
            MANIFEST_MEDIA_TYPE,
            &Manifest {
                schema_version: 2,
                media_type: MANIFEST_MEDIA_TYPE,
                config: &config,
                layers: layers.iter().map(|l| &l.descriptor).collect(),
                annotations: &labels,
            },
        )?;
        manifest.platform = Some(Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
        });
        manifest.annotations = labels.clone();
        manifests.push(manifest);
        configs.push(config);
    }
    let index = layout.put_json(
        INDEX_MEDIA_TYPE,
        &Index {
            schema_version: 2,
            media_type: INDEX_MEDIA_TYPE,
            manifests: &manifests,
            annotations: &labels,
        },
    )?;
    write_layout_index(&layout, &index, &options.tags)?;
    let file_bytes = entries
        .iter()
        .map(|e| match e.kind {
            EntryKind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    Ok(BuiltImage {
        index,
        manifests,
        configs,
        layers,
        entries,
        file_bytes,
    })
}

/// The layout's `index.json`: the image under each tag, replacing what those tags named
/// before and keeping other tags.
fn write_layout_index(
    layout: &Layout,
    index: &Descriptor,
    tags: &[String],
) -> Result<(), BuildError> {
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    let path = layout.root.join("index.json");
    let mut existing: Vec<serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v.get("manifests").and_then(|m| m.as_array()).cloned())
        .unwrap_or_default();
    existing.retain(|m| {
        let name = m
            .get("annotations")
            .and_then(|a| a.get(REF_NAME))
            .and_then(|n| n.as_str());
        !name.is_some_and(|n| tags.iter().any(|t| t == n))
    });
    for tag in tags {
        let mut named = index.clone();
        named.annotations = vec![(REF_NAME.to_string(), tag.clone())];
        existing.push(serde_json::to_value(&named).map_err(|e| BuildError::Io {
            path: path.display().to_string(),
            source: io::Error::other(e),
        })?);
    }
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": existing,
    });
    let temp = layout.temporary()?;
    std::fs::write(temp.path(), body.to_string()).map_err(io_error(&path))?;
    temp.persist(&path).map_err(|e| BuildError::Io {
        path: path.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}
