//! Where volumes live. Every call is idempotent, so a retried job converges: creating an
//! image that exists, growing one that is already that large, or removing one that is
//! gone all succeed.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;

use crate::error::Result;

/// An image's place in the store: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    pub namespace: String,
    pub image: String,
}

impl ImageRef {
    pub fn new(namespace: impl Into<String>, image: impl Into<String>) -> Self {
        ImageRef {
            namespace: namespace.into(),
            image: image.into(),
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.image)
    }
}

/// What a machine is told so it can attach a volume (part of its directive). The options
/// may hold a secret (a cephx key): never log them.
#[derive(Clone, PartialEq)]
pub struct Attachment {
    /// "directory" or "rbd".
    pub kind: &'static str,
    /// A directory, or the image spec pool/namespace/image.
    pub source: String,
    pub options: BTreeMap<String, String>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A machine's access to volumes: which namespace it may write, and which one it may
/// only read (the project's, for a copy-on-write clone's parent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant<'a> {
    pub machine_id: &'a str,
    pub writable: &'a str,
    pub readable: Option<&'a str>,
}

pub trait VolumeProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// The backing store's raw size in bytes; `None` when sizes reserve nothing (local
    /// directories, which only BuildKit's GC keeps to their size).
    fn capacity(&self) -> BoxFuture<'_, Result<Option<u64>>>;

    /// Creates a thin image of `size` bytes (and its namespace). Succeeds if it exists.
    fn create<'a>(&'a self, image: &'a ImageRef, size: u64) -> BoxFuture<'a, Result<()>>;

    /// The image's provisioned size, or `None` if it does not exist.
    fn size<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Option<u64>>>;

    /// Grows the image to `size`; a no-op if it is already at least that large.
    fn grow<'a>(&'a self, image: &'a ImageRef, size: u64) -> BoxFuture<'a, Result<()>>;

    /// Removes the image (and the snapshots Kiln made of it). Succeeds if it is gone.
    fn remove<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<()>>;

    /// Removes a namespace of Kiln's once it holds no image; succeeds if it is gone.
    fn remove_namespace<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Bytes written to the image (what `rbd du` reports).
    fn used<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<u64>>;

    /// Every image in Kiln's namespaces.
    fn list(&self) -> BoxFuture<'_, Result<Vec<ImageRef>>>;

    /// Makes `child` a copy-on-write clone of `parent` at a new snapshot `snapshot`.
    fn clone_image<'a>(
        &'a self,
        parent: &'a ImageRef,
        snapshot: &'a str,
        child: &'a ImageRef,
    ) -> BoxFuture<'a, Result<()>>;

    /// Gives a machine access to its namespaces and returns what it needs to attach
    /// (credentials included). Calling it again returns the same access.
    fn grant<'a>(&'a self, grant: Grant<'a>) -> BoxFuture<'a, Result<BTreeMap<String, String>>>;

    /// Takes a machine's access away. Succeeds if it had none.
    fn revoke<'a>(&'a self, machine_id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// How a machine holding `access` attaches `image`.
    fn attachment(&self, image: &ImageRef, access: BTreeMap<String, String>) -> Attachment;

    /// The cookies (machine ids) of the exclusive locks held on `image`.
    fn lockers<'a>(&'a self, image: &'a ImageRef) -> BoxFuture<'a, Result<Vec<String>>>;

    /// Breaks the lock `cookie` holds on `image`, fencing its holder so it cannot write
    /// to the image any more. Succeeds if the lock is gone.
    fn break_lock<'a>(&'a self, image: &'a ImageRef, cookie: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Removes a snapshot Kiln made of `image` for a clone (after the clone is gone).
    /// Succeeds if the snapshot or the image is gone.
    fn remove_snapshot<'a>(
        &'a self,
        image: &'a ImageRef,
        snapshot: &'a str,
    ) -> BoxFuture<'a, Result<()>>;

    /// Kiln's namespaces in the store.
    fn namespaces(&self) -> BoxFuture<'_, Result<Vec<String>>>;
}
