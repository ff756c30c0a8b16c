//! Volumes as RBD images on a Ceph cluster (through crates/kiln-ceph): one pool, a
//! namespace per project, an image per architecture and generation. Each machine gets a
//! cephx key whose caps reach only its namespace (and, for a clone, read its parent's).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::BoxFuture;
use kiln_ceph::{Ceph, CephError, Rbd};
use tokio::sync::OnceCell;

use super::names::{is_kiln_namespace, machine_client};
use super::provider::{Attachment, Grant, ImageRef, VolumeProvider};
use crate::config::CephCacheConfig;
use crate::error::{Error, Result};

pub struct CephVolumes {
    config: CephCacheConfig,
    call_timeout: Duration,
    ceph: OnceCell<Ceph>,
    monitors: OnceCell<String>,
}

fn ceph_error(err: CephError) -> Error {
    if err.is_transient() {
        Error::Unavailable(format!(
            "the Ceph cluster failed a call; retrying later ({err})"
        ))
    } else if err.is_not_found() {
        Error::NotFound(format!("Ceph: {err}"))
    } else if err.is_busy() {
        Error::FailedPrecondition(format!("the volume is in use ({err})"))
    } else {
        Error::internal(err)
    }
}

impl CephVolumes {
    pub fn new(config: CephCacheConfig, call_timeout: Duration) -> Self {
        CephVolumes {
            config,
            call_timeout,
            ceph: OnceCell::new(),
            monitors: OnceCell::new(),
        }
    }

    /// Bounds a call: a cluster that stopped answering fails the job attempt, which is
    /// retried, instead of holding a worker forever.
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = std::result::Result<T, CephError>>,
    ) -> Result<T> {
        self.within(what, call).await?.map_err(ceph_error)
    }

    /// Like [`CephVolumes::bounded`], leaving Ceph's own error to the caller.
    async fn within<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = std::result::Result<T, CephError>>,
    ) -> Result<std::result::Result<T, CephError>> {
        tokio::time::timeout(self.call_timeout, call)
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "the Ceph cluster did not answer {what} within {}s",
                    self.call_timeout.as_secs()
                ))
            })
    }

    /// The connection, made on first use (so Kiln starts while Ceph is down).
    pub async fn client(&self) -> Result<&Ceph> {
        self.ceph
            .get_or_try_init(|| async {
                self.bounded(
                    "the connection",
                    Ceph::connect(&self.config.conf_path, &self.config.client),
                )
                .await
            })
            .await
    }

    async fn rbd(&self, namespace: &str) -> Result<Rbd> {
        Ok(self.client().await?.rbd(&self.config.pool, namespace))
    }

    async fn monitors(&self) -> Result<String> {
        self.monitors
            .get_or_try_init(|| async {
                if !self.config.monitors.is_empty() {
                    return Ok(self.config.monitors.join(","));
                }
                let ceph = self.client().await?;
                let addresses = self
                    .bounded("the monitor map", ceph.monitor_addresses())
                    .await?;
                Ok(addresses.join(","))
            })
            .await
            .cloned()
    }

    fn entity(machine_id: &str) -> Result<String> {
        Ok(format!("client.{}", machine_client(machine_id)?))
    }
}

impl VolumeProvider for CephVolumes {
    fn name(&self) -> &'static str {
        "ceph"
    }

    fn capacity(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Box::pin(async move {
            let ceph = self.client().await?;
            Ok(Some(
                self.bounded("the cluster's size", ceph.cluster_stat())
                    .await?
                    .total_bytes,
            ))
        })
    }

    fn create<'a>(&'a self, image: &'a ImageRef, size: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            self.bounded("namespace create", rbd.namespace_create())
                .await?;
            match self
                .within("image create", rbd.create(&image.image, size))
                .await?
            {
                Err(e) if e.is_exists() => Ok(()),
                other => other.map_err(ceph_error),
            }
        })
    }

    fn size<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<u64>>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            match self.bounded("image stat", rbd.stat(&image.image)).await {
                Ok(stat) => Ok(Some(stat.size)),
                Err(Error::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn grow<'a>(&'a self, image: &'a ImageRef, size: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            let current = self.bounded("image stat", rbd.stat(&image.image)).await?;
            if current.size >= size {
                return Ok(());
            }
            self.bounded("image resize", rbd.resize(&image.image, size, false))
                .await
        })
    }

    fn remove<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            // Trash first (instant, and the name is free at once), then purge. ESTALE:
            // another worker moved it at the same moment.
            match self
                .within("move to trash", rbd.trash_move(&image.image))
                .await?
            {
                Ok(()) => {}
                Err(e) if e.is_not_found() || e.errno == libc::ESTALE => {}
                Err(e) => return Err(ceph_error(e)),
            }
            let trash = match self.bounded("trash list", rbd.trash_list()).await {
                Ok(trash) => trash,
                Err(Error::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in trash.iter().filter(|e| e.name == image.image) {
                self.bounded("trash purge", rbd.trash_remove(&entry.id))
                    .await?;
            }
            self.bounded("lease remove", rbd.remove_lease(&image.image))
                .await
        })
    }

    fn remove_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rbd = self.rbd(namespace).await?;
            match self
                .bounded("namespace remove", rbd.namespace_remove())
                .await
            {
                Err(Error::FailedPrecondition(_)) => Ok(()), // still holds images
                other => other,
            }
        })
    }

    fn used<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            self.bounded("image usage", rbd.used_bytes(&image.image))
                .await
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ImageRef>>> {
        Box::pin(async move {
            let ceph = self.client().await?;
            let namespaces = self
                .bounded("namespace list", ceph.namespaces(&self.config.pool))
                .await?;
            let mut images = Vec::new();
            for namespace in namespaces.into_iter().filter(|n| is_kiln_namespace(n)) {
                let rbd = ceph.rbd(&self.config.pool, &namespace);
                for image in self.bounded("image list", rbd.list()).await? {
                    images.push(ImageRef::new(namespace.clone(), image));
                }
            }
            images.sort();
            Ok(images)
        })
    }

    fn clone_image<'a>(
        &'a self,
        parent: &'a ImageRef,
        snapshot: &'a str,
        child: &'a ImageRef,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let source = self.rbd(&parent.namespace).await?;
            let target = self.rbd(&child.namespace).await?;
            self.bounded("namespace create", target.namespace_create())
                .await?;
            if self
                .bounded("image exists", target.exists(&child.image))
                .await?
            {
                return Ok(());
            }
            self.bounded(
                "snapshot create",
                source.snapshot_create(&parent.image, snapshot),
            )
            .await?;
            self.bounded(
                "image clone",
                source.clone_to(&parent.image, snapshot, &target, &child.image),
            )
            .await
        })
    }

    fn grant<'a>(&'a self, grant: Grant<'a>) -> BoxFuture<'a, Result<BTreeMap<String, String>>> {
        Box::pin(async move {
            let ceph = self.client().await?;
            let entity = Self::entity(grant.machine_id)?;
            let pool = &self.config.pool;
            let mut osd = format!("profile rbd pool={pool} namespace={}", grant.writable);
            if let Some(readable) = grant.readable {
                osd.push_str(&format!(
                    ", profile rbd-read-only pool={pool} namespace={readable}"
                ));
            }
            let caps = [("mon", "profile rbd"), ("osd", osd.as_str())];
            let key = match self
                .within("key create", ceph.key_get_or_create(&entity, &caps))
                .await?
            {
                Ok(key) => key,
                // The machine's key exists with other caps (it was given another volume):
                // replace it.
                Err(e) if e.errno == libc::EINVAL => {
                    self.bounded("key remove", ceph.key_remove(&entity)).await?;
                    self.bounded("key create", ceph.key_get_or_create(&entity, &caps))
                        .await?
                }
                Err(e) => return Err(ceph_error(e)),
            };
            let mut access = BTreeMap::new();
            access.insert("client".into(), machine_client(grant.machine_id)?);
            access.insert("key".into(), key);
            access.insert("monitors".into(), self.monitors().await?);
            Ok(access)
        })
    }

    fn revoke<'a>(&'a self, machine_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let ceph = self.client().await?;
            let entity = Self::entity(machine_id)?;
            self.bounded("key remove", ceph.key_remove(&entity)).await
        })
    }

    fn attachment(&self, image: &ImageRef, access: BTreeMap<String, String>) -> Attachment {
        Attachment {
            kind: "rbd",
            source: format!("{}/{}/{}", self.config.pool, image.namespace, image.image),
            options: access,
        }
    }

    fn lockers<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            match self.bounded("lock list", rbd.lockers(&image.image)).await {
                Ok(lockers) => Ok(lockers.into_iter().map(|l| l.cookie).collect()),
                Err(Error::NotFound(_)) => Ok(Vec::new()),
                Err(e) => Err(e),
            }
        })
    }

    fn break_lock<'a>(&'a self, image: &'a ImageRef, cookie: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            let lockers = match self.bounded("lock list", rbd.lockers(&image.image)).await {
                Ok(lockers) => lockers,
                Err(Error::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            for locker in lockers.iter().filter(|l| l.cookie == cookie) {
                // librbd blocklists the holder as it breaks the lock.
                self.bounded("lock break", rbd.break_lock(&image.image, locker))
                    .await?;
                tracing::warn!(image = %image, holder = %cookie, "fenced a stale holder of a cache volume");
            }
            Ok(())
        })
    }

    fn remove_snapshot<'a>(
        &'a self,
        image: &'a ImageRef,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let rbd = self.rbd(&image.namespace).await?;
            match self
                .bounded(
                    "snapshot remove",
                    rbd.snapshot_remove(&image.image, snapshot),
                )
                .await
            {
                Err(Error::NotFound(_)) => Ok(()),
                other => other,
            }
        })
    }

    fn namespaces(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async move {
            let ceph = self.client().await?;
            let mut names = self
                .bounded("namespace list", ceph.namespaces(&self.config.pool))
                .await?;
            names.retain(|n| is_kiln_namespace(n));
            Ok(names)
        })
    }
}
