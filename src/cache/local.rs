//! Volumes as directories under one data directory, for `kiln dev` and tests without
//! Ceph: `<dir>/<namespace>/<image>/` is the volume, `.<image>.size` its provisioned
//! size. Directories are thin like RBD images (usage counts allocated blocks), but their
//! size is enforced only by BuildKit's GC, not by a filesystem.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;

use super::names::is_kiln_namespace;
use super::provider::{Attachment, Grant, ImageRef, VolumeProvider};
use crate::error::{Error, Result};

pub struct LocalVolumes {
    dir: PathBuf,
}

impl LocalVolumes {
    pub fn new(dir: PathBuf) -> Self {
        LocalVolumes { dir }
    }

    pub fn path(&self, image: &ImageRef) -> PathBuf {
        self.dir.join(&image.namespace).join(&image.image)
    }

    fn size_file(&self, image: &ImageRef) -> PathBuf {
        self.dir
            .join(&image.namespace)
            .join(format!(".{}.size", image.image))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(Error::internal)?
            .map_err(Error::internal)
    }
}

fn read_size(path: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Allocated bytes under `path`, symlinks not followed.
fn allocated(path: &Path) -> std::io::Result<u64> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            total += allocated(&entry?.path())?;
        }
    }
    Ok(total)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from)?;
        let _ = std::fs::remove_file(to);
        std::os::unix::fs::symlink(target, to)?;
    } else if meta.is_file() {
        std::fs::copy(from, to)?;
    }
    Ok(())
}

impl VolumeProvider for LocalVolumes {
    fn name(&self) -> &'static str {
        "local"
    }

    fn capacity(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Box::pin(async { Ok(None) })
    }

    fn create<'a>(&'a self, image: &'a ImageRef, size: u64) -> BoxFuture<'a, Result<()>> {
        let path = self.path(image);
        let size_file = self.size_file(image);
        Box::pin(self.blocking(move || {
            std::fs::create_dir_all(&path)?;
            if read_size(&size_file)?.is_none() {
                std::fs::write(&size_file, size.to_string())?;
            }
            Ok(())
        }))
    }

    fn size<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<u64>>> {
        let path = self.path(image);
        let size_file = self.size_file(image);
        Box::pin(self.blocking(move || {
            if !path.is_dir() {
                return Ok(None);
            }
            read_size(&size_file)
        }))
    }

    fn grow<'a>(&'a self, image: &'a ImageRef, size: u64) -> BoxFuture<'a, Result<()>> {
        let path = self.path(image);
        let size_file = self.size_file(image);
        Box::pin(async move {
            let current = self
                .blocking(move || {
                    if path.is_dir() {
                        read_size(&size_file)
                    } else {
                        Ok(None)
                    }
                })
                .await?;
            match current {
                None => Err(Error::NotFound(format!(
                    "volume image {image} does not exist"
                ))),
                Some(current) if current >= size => Ok(()),
                Some(_) => {
                    let size_file = self.size_file(image);
                    self.blocking(move || std::fs::write(size_file, size.to_string()))
                        .await
                }
            }
        })
    }

    fn remove<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<()>> {
        let path = self.path(image);
        let size_file = self.size_file(image);
        Box::pin(self.blocking(move || {
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            match std::fs::remove_file(&size_file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }))
    }

    fn remove_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<()>> {
        let path = self.dir.join(namespace);
        Box::pin(self.blocking(move || {
            let Ok(entries) = std::fs::read_dir(&path) else {
                return Ok(());
            };
            // Lock files of released volumes may remain; any volume left keeps it.
            for entry in entries {
                let entry = entry?;
                if !entry.file_name().to_string_lossy().ends_with(".lock") {
                    return Ok(());
                }
            }
            std::fs::remove_dir_all(&path)
        }))
    }

    fn used<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<u64>> {
        let path = self.path(image);
        Box::pin(self.blocking(move || allocated(&path)))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ImageRef>>> {
        let dir = self.dir.clone();
        Box::pin(self.blocking(move || {
            let mut images = Vec::new();
            let Ok(namespaces) = std::fs::read_dir(&dir) else {
                return Ok(images);
            };
            for namespace in namespaces {
                let namespace = namespace?;
                let ns = namespace.file_name().to_string_lossy().into_owned();
                if !is_kiln_namespace(&ns) || !namespace.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(namespace.path())? {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !name.starts_with('.') && entry.file_type()?.is_dir() {
                        images.push(ImageRef::new(ns.clone(), name));
                    }
                }
            }
            images.sort();
            Ok(images)
        }))
    }

    fn clone_image<'a>(
        &'a self,
        parent: &'a ImageRef,
        _snapshot: &'a str,
        child: &'a ImageRef,
    ) -> BoxFuture<'a, Result<()>> {
        let from = self.path(parent);
        let to = self.path(child);
        let parent_size = self.size_file(parent);
        let child_size = self.size_file(child);
        Box::pin(self.blocking(move || {
            if read_size(&child_size)?.is_some() {
                return Ok(());
            }
            // Copied into a scratch name first, so a crash never leaves a half clone
            // under the child's name.
            let scratch = to.with_extension("partial");
            let _ = std::fs::remove_dir_all(&scratch);
            copy_tree(&from, &scratch)?;
            let _ = std::fs::remove_dir_all(&to);
            std::fs::rename(&scratch, &to)?;
            let size = read_size(&parent_size)?.unwrap_or(0);
            std::fs::write(&child_size, size.to_string())
        }))
    }

    fn grant<'a>(&'a self, _grant: Grant<'a>) -> BoxFuture<'a, Result<BTreeMap<String, String>>> {
        Box::pin(async { Ok(BTreeMap::new()) })
    }

    fn revoke<'a>(&'a self, _machine_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn attachment(&self, image: &ImageRef, _access: BTreeMap<String, String>) -> Attachment {
        let mut options = BTreeMap::new();
        options.insert(
            "lock_file".to_string(),
            self.dir
                .join(&image.namespace)
                .join(format!(".{}.lock", image.image))
                .display()
                .to_string(),
        );
        Attachment {
            kind: "directory",
            source: self.path(image).display().to_string(),
            options,
        }
    }

    /// Local locks are `flock`s, which die with the process that held them: nothing
    /// stale can hold one.
    fn lockers<'a>(&'a self, _image: &'a ImageRef) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn break_lock<'a>(
        &'a self,
        _image: &'a ImageRef,
        _cookie: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Local clones are copies: there is no snapshot to remove.
    fn remove_snapshot<'a>(
        &'a self,
        _image: &'a ImageRef,
        _snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn namespaces(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        let dir = self.dir.clone();
        Box::pin(self.blocking(move || {
            let mut names = Vec::new();
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return Ok(names);
            };
            for entry in entries {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if is_kiln_namespace(&name) {
                    names.push(name);
                }
            }
            names.sort();
            Ok(names)
        }))
    }
}

/// Free (to unprivileged users) and total bytes of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains NUL"))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = stat.f_frsize as u64;
    Ok((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}
