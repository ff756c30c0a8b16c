//! Ceph access for Kiln's layer-cache allocator: RBD images in per-project namespaces,
//! cephx keys scoped to a namespace, usage, snapshots, clones and locks.
//!
//! librados comes from the `ceph` crate (connect, io contexts); the calls it binds
//! unsoundly (mon commands, pool stats) and all of librbd are declared in `ffi.rs` and
//! wrapped here. Every call blocks, so each runs on `tokio::task::spawn_blocking`. This
//! crate is the only place in Kiln with `unsafe` code for Ceph.

mod ffi;

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libc::{c_char, c_int, c_void, size_t};

/// RBD image features: layering, exclusive-lock, object-map, fast-diff, deep-flatten.
/// Object-map and fast-diff make usage, removal and shrinking cost what was written.
pub const IMAGE_FEATURES: u64 = 1 | 4 | 8 | 16 | 32;
/// 4 MiB objects.
const IMAGE_ORDER: c_int = 22;

/// A failed Ceph call: which operation, and the errno it returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {message} (errno {errno})")]
pub struct CephError {
    pub op: &'static str,
    pub errno: i32,
    pub message: String,
}

impl CephError {
    fn from_errno(op: &'static str, code: i64) -> CephError {
        let errno = code.unsigned_abs().min(i32::MAX as u64) as i32;
        CephError {
            op,
            errno,
            message: std::io::Error::from_raw_os_error(errno).to_string(),
        }
    }

    fn invalid(op: &'static str, message: impl Into<String>) -> CephError {
        CephError {
            op,
            errno: libc::EINVAL,
            message: message.into(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.errno == libc::ENOENT
    }

    pub fn is_exists(&self) -> bool {
        self.errno == libc::EEXIST
    }

    /// In use: watchers, children, or a lock held by someone else.
    pub fn is_busy(&self) -> bool {
        self.errno == libc::EBUSY
    }

    pub fn is_permission_denied(&self) -> bool {
        self.errno == libc::EPERM || self.errno == libc::EACCES
    }

    /// The cluster did not answer in time, or the connection broke: worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.errno,
            libc::ETIMEDOUT | libc::ECONNREFUSED | libc::ECONNRESET | libc::EIO
        )
    }

    /// This client was blocklisted (fenced): nothing it sends is accepted any more.
    pub fn is_fenced(&self) -> bool {
        self.errno == libc::ESHUTDOWN
    }
}

pub type Result<T, E = CephError> = std::result::Result<T, E>;

fn check(op: &'static str, code: i64) -> Result<i64> {
    if code < 0 {
        Err(CephError::from_errno(op, code))
    } else {
        Ok(code)
    }
}

fn cstring(op: &'static str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| CephError::invalid(op, "names must not contain NUL"))
}

/// Reads a C string librbd or librados allocated.
///
/// # Safety
/// `ptr` must be null or point to a NUL-terminated string that outlives the call.
unsafe fn owned(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// NUL-separated strings in the first `len` bytes of `buf`.
fn split_nul(buf: &[u8], len: usize) -> Vec<String> {
    buf[..len.min(buf.len())]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The connection: one `rados_t` per process, shared by every operation.
struct Handle(ceph::ceph::Rados);

// SAFETY: librados' `rados_t` is thread-safe (one handle per process is the documented
// use); the `ceph` crate marks it Sync but not Send only because of a raw pointer.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Handle {
    fn raw(&self) -> ffi::rados_t {
        *self.0.inner() as ffi::rados_t
    }

    /// An io context on `pool`, in `namespace` (empty: the pool's default namespace).
    fn ioctx(&self, pool: &str, namespace: &str) -> Result<ceph::ceph::IoCtx> {
        let io = self
            .0
            .get_rados_ioctx(pool)
            .map_err(|e| rados_error("open pool", &e))?;
        if !namespace.is_empty() {
            let ns = cstring("set namespace", namespace)?;
            // SAFETY: the io context is live; librados copies the name.
            unsafe {
                ffi::rados_ioctx_set_namespace(*io.inner() as ffi::rados_ioctx_t, ns.as_ptr())
            };
        }
        Ok(io)
    }
}

fn rados_error(op: &'static str, err: &ceph::error::RadosError) -> CephError {
    match err {
        ceph::error::RadosError::ApiError(errno) => CephError {
            op,
            errno: *errno as i32,
            message: std::io::Error::from_raw_os_error(*errno as i32).to_string(),
        },
        other => CephError {
            op,
            errno: libc::EIO,
            message: other.to_string(),
        },
    }
}

/// Cluster-wide usage, from `rados_cluster_stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterStat {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

/// A pool's usage, from `rados_ioctx_pool_stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStat {
    pub stored_bytes: u64,
    pub objects: u64,
}

/// A connected Ceph client. Cheap to clone.
#[derive(Clone)]
pub struct Ceph {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Ceph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ceph").finish_non_exhaustive()
    }
}

/// librbd's version, as `major.minor.extra`.
pub fn rbd_version() -> String {
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: writes three ints we own.
    unsafe { ffi::rbd_version(&mut major, &mut minor, &mut extra) };
    format!("{major}.{minor}.{extra}")
}

impl Ceph {
    /// Connects as `client.<client_id>` with the cluster configuration at `conf` (which
    /// names the monitors and the keyring).
    pub async fn connect(conf: &Path, client_id: &str) -> Result<Ceph> {
        let conf: PathBuf = conf.to_path_buf();
        let client_id = client_id.to_string();
        let rados = tokio::task::spawn_blocking(move || {
            let conf = conf.to_str().ok_or_else(|| {
                CephError::invalid("connect", "the configuration path is not UTF-8")
            })?;
            ceph::ceph::connect_to_ceph(&client_id, conf)
                .map(Handle)
                .map_err(|e| rados_error("connect", &e))
        })
        .await
        .map_err(|e| CephError::invalid("connect", e.to_string()))??;
        Ok(Ceph {
            handle: Arc::new(rados),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Handle) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let handle = self.handle.clone();
        tokio::task::spawn_blocking(move || f(&handle))
            .await
            .map_err(|e| CephError::invalid(op, format!("the blocking task failed: {e}")))?
    }

    /// A monitor command (JSON in, JSON out), e.g. `{"prefix": "mon dump"}`.
    pub async fn mon_command(&self, command: serde_json::Value) -> Result<serde_json::Value> {
        self.blocking("mon command", move |h| {
            let mut command = command;
            if let Some(map) = command.as_object_mut() {
                map.entry("format").or_insert("json".into());
            }
            let text = cstring("mon command", &command.to_string())?;
            let mut cmds = [text.as_ptr()];
            let (mut out, mut out_len) = (std::ptr::null_mut(), 0usize);
            let (mut status, mut status_len) = (std::ptr::null_mut(), 0usize);
            // SAFETY: the command array and string live across the call; librados
            // allocates the reply buffers, which we copy by their lengths and free.
            let code = unsafe {
                ffi::rados_mon_command(
                    h.raw(),
                    cmds.as_mut_ptr(),
                    1,
                    std::ptr::null(),
                    0,
                    &mut out,
                    &mut out_len,
                    &mut status,
                    &mut status_len,
                )
            };
            let take = |ptr: *mut c_char, len: usize| -> String {
                if ptr.is_null() {
                    return String::new();
                }
                // SAFETY: librados returned `len` readable bytes at `ptr` (not
                // NUL-terminated), which we copy before freeing.
                let text = String::from_utf8_lossy(unsafe {
                    std::slice::from_raw_parts(ptr as *const u8, len)
                })
                .into_owned();
                // SAFETY: allocated by librados for us.
                unsafe { ffi::rados_buffer_free(ptr) };
                text
            };
            let (out, status) = (take(out, out_len), take(status, status_len));
            if code < 0 {
                let mut err = CephError::from_errno("mon command", code as i64);
                if !status.trim().is_empty() {
                    err.message = status.trim().to_string();
                }
                return Err(err);
            }
            if out.trim().is_empty() {
                return Ok(serde_json::Value::Null);
            }
            serde_json::from_str(&out)
                .map_err(|e| CephError::invalid("mon command", format!("reply is not JSON: {e}")))
        })
        .await
    }

    pub async fn cluster_stat(&self) -> Result<ClusterStat> {
        self.blocking("cluster stat", |h| {
            let mut stat = ffi::rados_cluster_stat_t::default();
            // SAFETY: writes the struct we own, sized as the header declares.
            check(
                "cluster stat",
                unsafe { ffi::rados_cluster_stat(h.raw(), &mut stat) } as i64,
            )?;
            Ok(ClusterStat {
                total_bytes: stat.kb * 1024,
                used_bytes: stat.kb_used * 1024,
                available_bytes: stat.kb_avail * 1024,
            })
        })
        .await
    }

    pub async fn pool_stat(&self, pool: &str) -> Result<PoolStat> {
        let pool = pool.to_string();
        self.blocking("pool stat", move |h| {
            let io = h.ioctx(&pool, "")?;
            let mut stat = ffi::rados_pool_stat_t::default();
            // SAFETY: writes all 16 counters into the struct we own.
            check("pool stat", unsafe {
                ffi::rados_ioctx_pool_stat(*io.inner() as ffi::rados_ioctx_t, &mut stat)
            } as i64)?;
            Ok(PoolStat {
                stored_bytes: stat.num_bytes,
                objects: stat.num_objects,
            })
        })
        .await
    }

    /// The monitors' addresses as clients reach them (`mon host` syntax, v2 and v1).
    pub async fn monitor_addresses(&self) -> Result<Vec<String>> {
        let dump = self
            .mon_command(serde_json::json!({"prefix": "mon dump"}))
            .await?;
        let mut addresses = Vec::new();
        for mon in dump["mons"].as_array().into_iter().flatten() {
            let addrs: Vec<String> = mon["public_addrs"]["addrvec"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| Some(format!("{}:{}", a["type"].as_str()?, a["addr"].as_str()?)))
                .collect();
            if !addrs.is_empty() {
                addresses.push(format!("[{}]", addrs.join(",")));
            }
        }
        Ok(addresses)
    }

    /// Creates (or returns) the cephx key of `entity` (`client.…`) with `caps`, e.g.
    /// `[("mon", "profile rbd"), ("osd", "profile rbd pool=p namespace=n")]`. The key is a
    /// secret: never log it.
    pub async fn key_get_or_create(&self, entity: &str, caps: &[(&str, &str)]) -> Result<String> {
        let caps: Vec<&str> = caps.iter().flat_map(|(k, v)| [*k, *v]).collect();
        let reply = self
            .mon_command(serde_json::json!({
                "prefix": "auth get-or-create",
                "entity": entity,
                "caps": caps,
            }))
            .await?;
        reply[0]["key"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CephError::invalid("auth get-or-create", "no key in the reply"))
    }

    /// Removes a cephx entity; succeeds if it does not exist.
    pub async fn key_remove(&self, entity: &str) -> Result<()> {
        match self
            .mon_command(serde_json::json!({"prefix": "auth rm", "entity": entity}))
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(drop),
        }
    }

    /// Whether a cephx entity exists.
    pub async fn key_exists(&self, entity: &str) -> Result<bool> {
        match self
            .mon_command(serde_json::json!({"prefix": "auth get", "entity": entity}))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Cuts a client off the cluster (by the address its watch or lock shows), so a
    /// builder that lost its lease cannot write to a volume handed to another.
    pub async fn blocklist(&self, address: &str, seconds: u32) -> Result<()> {
        self.mon_command(serde_json::json!({
            "prefix": "osd blocklist",
            "blocklistop": "add",
            "addr": address,
            "expire": f64::from(seconds),
        }))
        .await
        .map(drop)
    }

    /// RBD operations in `pool`, in `namespace` (empty: the default namespace).
    pub fn rbd(&self, pool: &str, namespace: &str) -> Rbd {
        Rbd {
            ceph: self.clone(),
            pool: pool.to_string(),
            namespace: namespace.to_string(),
        }
    }

    /// The RBD namespaces of `pool`.
    pub async fn namespaces(&self, pool: &str) -> Result<Vec<String>> {
        let pool = pool.to_string();
        self.blocking("namespace list", move |h| {
            let io = h.ioctx(&pool, "")?;
            let mut size: size_t = 4096;
            loop {
                let mut buf = vec![0u8; size];
                // SAFETY: `buf` has `size` writable bytes; librbd updates `size`.
                let code = unsafe {
                    ffi::rbd_namespace_list(
                        *io.inner() as ffi::rados_ioctx_t,
                        buf.as_mut_ptr() as *mut c_char,
                        &mut size,
                    )
                };
                if code == -libc::ERANGE {
                    continue;
                }
                check("namespace list", code as i64)?;
                return Ok(split_nul(&buf, size));
            }
        })
        .await
    }
}

/// Basic facts about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageStat {
    pub size: u64,
    pub object_size: u64,
}

/// An image in the trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashEntry {
    pub id: String,
    pub name: String,
}

/// A client watching an image (it has it open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    pub address: String,
    pub id: i64,
}

/// A holder of an advisory lock on an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    pub client: String,
    pub cookie: String,
    pub address: String,
}

/// Image options for a v2 clone with Kiln's features; destroyed when dropped.
struct CloneOptions(ffi::rbd_image_options_t);

impl CloneOptions {
    fn new() -> Result<CloneOptions> {
        let mut raw: ffi::rbd_image_options_t = std::ptr::null_mut();
        // SAFETY: librbd allocates the options and writes the handle.
        unsafe { ffi::rbd_image_options_create(&mut raw) };
        let options = CloneOptions(raw);
        for (name, value) in [
            (ffi::RBD_IMAGE_OPTION_FEATURES, IMAGE_FEATURES),
            (ffi::RBD_IMAGE_OPTION_ORDER, IMAGE_ORDER as u64),
            (ffi::RBD_IMAGE_OPTION_CLONE_FORMAT, 2),
        ] {
            // SAFETY: a live options handle.
            check("clone options", unsafe {
                ffi::rbd_image_options_set_uint64(options.0, name, value)
            } as i64)?;
        }
        Ok(options)
    }
}

impl Drop for CloneOptions {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { ffi::rbd_image_options_destroy(self.0) };
    }
}

/// An open image; closed when dropped.
struct Image(ffi::rbd_image_t);

impl Image {
    fn open(io: &ceph::ceph::IoCtx, name: &str, snap: Option<&str>) -> Result<Image> {
        let name = cstring("open image", name)?;
        let snap = snap.map(|s| cstring("open image", s)).transpose()?;
        let mut image: ffi::rbd_image_t = std::ptr::null_mut();
        // SAFETY: the io context and strings are live; librbd writes the handle.
        check("open image", unsafe {
            ffi::rbd_open(
                *io.inner() as ffi::rados_ioctx_t,
                name.as_ptr(),
                &mut image,
                snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            )
        } as i64)?;
        Ok(Image(image))
    }

    fn size(&self) -> Result<u64> {
        let mut info: ffi::rbd_image_info_t = empty_info();
        // SAFETY: writes the struct we own, whose size we pass.
        check("stat image", unsafe {
            ffi::rbd_stat(
                self.0,
                &mut info,
                std::mem::size_of::<ffi::rbd_image_info_t>(),
            )
        } as i64)?;
        Ok(info.size)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle came from rbd_open and is closed exactly once.
        unsafe { ffi::rbd_close(self.0) };
    }
}

fn empty_info() -> ffi::rbd_image_info_t {
    ffi::rbd_image_info_t {
        size: 0,
        obj_size: 0,
        num_objs: 0,
        order: 0,
        block_name_prefix: [0; ffi::RBD_MAX_BLOCK_NAME_SIZE],
        parent_pool: 0,
        parent_name: [0; ffi::RBD_MAX_IMAGE_NAME_SIZE],
    }
}

extern "C" fn no_progress(_done: u64, _total: u64, _arg: *mut c_void) -> c_int {
    0
}

extern "C" fn add_extent(_offset: u64, len: size_t, exists: c_int, arg: *mut c_void) -> c_int {
    if exists != 0 {
        // SAFETY: `arg` is the `u64` the caller of rbd_diff_iterate2 passed, alive for
        // the call, and librbd calls back on the calling thread.
        unsafe { *(arg as *mut u64) += len as u64 };
    }
    0
}

/// RBD images of one pool and namespace.
#[derive(Clone, Debug)]
pub struct Rbd {
    ceph: Ceph,
    pool: String,
    namespace: String,
}

impl Rbd {
    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Runs `f` with an io context on this pool and namespace, on the blocking pool.
    async fn with_io<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&ceph::ceph::IoCtx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (pool, namespace) = (self.pool.clone(), self.namespace.clone());
        self.ceph
            .blocking(op, move |h| {
                let io = h.ioctx(&pool, &namespace)?;
                f(&io)
            })
            .await
    }

    /// Runs `f` with an io context on the pool's default namespace (namespaces are
    /// managed from there).
    async fn with_pool_io<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&ceph::ceph::IoCtx, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (pool, namespace) = (self.pool.clone(), self.namespace.clone());
        self.ceph
            .blocking(op, move |h| {
                let io = h.ioctx(&pool, "")?;
                f(&io, &namespace)
            })
            .await
    }

    /// Creates this namespace; succeeds if it exists.
    pub async fn namespace_create(&self) -> Result<()> {
        self.with_pool_io("namespace create", |io, ns| {
            let name = cstring("namespace create", ns)?;
            // SAFETY: live io context and string.
            let code = unsafe {
                ffi::rbd_namespace_create(*io.inner() as ffi::rados_ioctx_t, name.as_ptr())
            };
            if code == -libc::EEXIST {
                return Ok(());
            }
            check("namespace create", code as i64).map(drop)
        })
        .await
    }

    /// Removes this namespace (it must hold no images); succeeds if it is gone.
    pub async fn namespace_remove(&self) -> Result<()> {
        self.with_pool_io("namespace remove", |io, ns| {
            let name = cstring("namespace remove", ns)?;
            // SAFETY: live io context and string.
            let code = unsafe {
                ffi::rbd_namespace_remove(*io.inner() as ffi::rados_ioctx_t, name.as_ptr())
            };
            if code == -libc::ENOENT {
                return Ok(());
            }
            check("namespace remove", code as i64).map(drop)
        })
        .await
    }

    pub async fn namespace_exists(&self) -> Result<bool> {
        self.with_pool_io("namespace exists", |io, ns| {
            let name = cstring("namespace exists", ns)?;
            let mut exists = false;
            // SAFETY: live io context and string; librbd writes the bool we own.
            check("namespace exists", unsafe {
                ffi::rbd_namespace_exists(
                    *io.inner() as ffi::rados_ioctx_t,
                    name.as_ptr(),
                    &mut exists,
                )
            } as i64)?;
            Ok(exists)
        })
        .await
    }

    /// Creates a thin image of `size` bytes.
    pub async fn create(&self, image: &str, size: u64) -> Result<()> {
        let image = image.to_string();
        self.with_io("create image", move |io| {
            let name = cstring("create image", &image)?;
            let mut order = IMAGE_ORDER;
            // SAFETY: live io context and string; librbd writes `order`.
            check("create image", unsafe {
                ffi::rbd_create2(
                    *io.inner() as ffi::rados_ioctx_t,
                    name.as_ptr(),
                    size,
                    IMAGE_FEATURES,
                    &mut order,
                )
            } as i64)
            .map(drop)
        })
        .await
    }

    /// Removes an image and its data; `busy` while it is open somewhere.
    pub async fn remove(&self, image: &str) -> Result<()> {
        let image = image.to_string();
        self.with_io("remove image", move |io| {
            let name = cstring("remove image", &image)?;
            // SAFETY: live io context and string.
            check("remove image", unsafe {
                ffi::rbd_remove(*io.inner() as ffi::rados_ioctx_t, name.as_ptr())
            } as i64)
            .map(drop)
        })
        .await
    }

    /// The images of this namespace.
    pub async fn list(&self) -> Result<Vec<String>> {
        self.with_io("list images", |io| {
            let mut max: size_t = 64;
            loop {
                let mut specs: Vec<ffi::rbd_image_spec_t> = (0..max)
                    .map(|_| ffi::rbd_image_spec_t {
                        id: std::ptr::null_mut(),
                        name: std::ptr::null_mut(),
                    })
                    .collect();
                // SAFETY: `specs` has room for `max` entries; librbd fills `max` of them.
                let code = unsafe {
                    ffi::rbd_list2(
                        *io.inner() as ffi::rados_ioctx_t,
                        specs.as_mut_ptr(),
                        &mut max,
                    )
                };
                if code == -libc::ERANGE {
                    continue;
                }
                check("list images", code as i64)?;
                let names = specs[..max]
                    .iter()
                    // SAFETY: librbd allocated these strings; they live until cleanup.
                    .map(|s| unsafe { owned(s.name) })
                    .collect();
                // SAFETY: frees the `max` entries librbd filled.
                unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), max) };
                return Ok(names);
            }
        })
        .await
    }

    pub async fn stat(&self, image: &str) -> Result<ImageStat> {
        let image = image.to_string();
        self.with_io("stat image", move |io| {
            let img = Image::open(io, &image, None)?;
            let mut info = empty_info();
            // SAFETY: writes the struct we own, whose size we pass.
            check("stat image", unsafe {
                ffi::rbd_stat(
                    img.0,
                    &mut info,
                    std::mem::size_of::<ffi::rbd_image_info_t>(),
                )
            } as i64)?;
            Ok(ImageStat {
                size: info.size,
                object_size: info.obj_size,
            })
        })
        .await
    }

    /// Whether an image exists.
    pub async fn exists(&self, image: &str) -> Result<bool> {
        match self.stat(image).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Grows (or, with `allow_shrink`, shrinks) an image. Works while it is attached.
    pub async fn resize(&self, image: &str, size: u64, allow_shrink: bool) -> Result<()> {
        let image = image.to_string();
        self.with_io("resize image", move |io| {
            let img = Image::open(io, &image, None)?;
            // A progress callback is required: librbd calls it unconditionally when
            // shrinking (NULL crashes).
            // SAFETY: live image handle; the callback ignores its arguments.
            check("resize image", unsafe {
                ffi::rbd_resize2(
                    img.0,
                    size,
                    allow_shrink,
                    Some(no_progress),
                    std::ptr::null_mut(),
                )
            } as i64)
            .map(drop)
        })
        .await
    }

    /// Bytes allocated in the image, by whole 4 MiB objects: the figure `rbd du` prints.
    pub async fn used_bytes(&self, image: &str) -> Result<u64> {
        let image = image.to_string();
        self.with_io("image usage", move |io| {
            let img = Image::open(io, &image, None)?;
            let size = img.size()?;
            let mut used: u64 = 0;
            // SAFETY: `used` outlives the call; the callback only adds to it.
            check("image usage", unsafe {
                ffi::rbd_diff_iterate2(
                    img.0,
                    std::ptr::null(),
                    0,
                    size,
                    0,
                    1,
                    add_extent,
                    &mut used as *mut u64 as *mut c_void,
                )
            } as i64)?;
            Ok(used)
        })
        .await
    }

    /// Writes `data` at `offset` (tests and benchmarks; builders write through a mount).
    pub async fn write(&self, image: &str, offset: u64, data: Vec<u8>) -> Result<()> {
        let image = image.to_string();
        self.with_io("write image", move |io| {
            let img = Image::open(io, &image, None)?;
            // SAFETY: `data` is readable for its length during the call.
            check("write image", unsafe {
                ffi::rbd_write(img.0, offset, data.len(), data.as_ptr() as *const c_char)
            } as i64)?;
            // SAFETY: live image handle.
            check("flush image", unsafe { ffi::rbd_flush(img.0) } as i64).map(drop)
        })
        .await
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, image: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let image = image.to_string();
        self.with_io("read image", move |io| {
            let img = Image::open(io, &image, None)?;
            let mut buf = vec![0u8; len];
            // SAFETY: `buf` is writable for `len` bytes during the call.
            let n = check("read image", unsafe {
                ffi::rbd_read(img.0, offset, len, buf.as_mut_ptr() as *mut c_char)
            } as i64)?;
            buf.truncate(n as usize);
            Ok(buf)
        })
        .await
    }

    /// Moves an image to the trash at once (its data is deleted by `trash_remove`). Fast
    /// whatever the image holds, so a reset can recreate the name right away.
    pub async fn trash_move(&self, image: &str) -> Result<()> {
        let image = image.to_string();
        self.with_io("move image to trash", move |io| {
            let name = cstring("move image to trash", &image)?;
            // SAFETY: live io context and string.
            check("move image to trash", unsafe {
                ffi::rbd_trash_move(*io.inner() as ffi::rados_ioctx_t, name.as_ptr(), 0)
            } as i64)
            .map(drop)
        })
        .await
    }

    pub async fn trash_list(&self) -> Result<Vec<TrashEntry>> {
        self.with_io("list trash", |io| {
            let mut num: size_t = 64;
            loop {
                let mut entries: Vec<ffi::rbd_trash_image_info_t> = (0..num)
                    .map(|_| ffi::rbd_trash_image_info_t {
                        id: std::ptr::null_mut(),
                        name: std::ptr::null_mut(),
                        source: 0,
                        deletion_time: 0,
                        deferment_end_time: 0,
                    })
                    .collect();
                // SAFETY: room for `num` entries; librbd fills `num` of them.
                let code = unsafe {
                    ffi::rbd_trash_list(
                        *io.inner() as ffi::rados_ioctx_t,
                        entries.as_mut_ptr(),
                        &mut num,
                    )
                };
                if code == -libc::ERANGE {
                    continue;
                }
                check("list trash", code as i64)?;
                let count = (code as usize).min(num);
                let list = entries[..count]
                    .iter()
                    // SAFETY: librbd allocated these strings; they live until cleanup.
                    .map(|e| TrashEntry {
                        id: unsafe { owned(e.id) },
                        name: unsafe { owned(e.name) },
                    })
                    .collect();
                // SAFETY: frees the entries librbd filled.
                unsafe { ffi::rbd_trash_list_cleanup(entries.as_mut_ptr(), count) };
                return Ok(list);
            }
        })
        .await
    }

    /// Deletes a trashed image and its data; succeeds if it is already gone.
    pub async fn trash_remove(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.with_io("remove trashed image", move |io| {
            let id = cstring("remove trashed image", &id)?;
            // SAFETY: live io context and string.
            let code = unsafe {
                ffi::rbd_trash_remove(*io.inner() as ffi::rados_ioctx_t, id.as_ptr(), true)
            };
            if code == -libc::ENOENT {
                return Ok(());
            }
            check("remove trashed image", code as i64).map(drop)
        })
        .await
    }

    /// Creates a snapshot (and protects it, so it can be cloned); succeeds if it exists.
    pub async fn snapshot_create(&self, image: &str, snap: &str) -> Result<()> {
        let (image, snap) = (image.to_string(), snap.to_string());
        self.with_io("create snapshot", move |io| {
            let img = Image::open(io, &image, None)?;
            let name = cstring("create snapshot", &snap)?;
            let mut exists = false;
            // SAFETY: live image handle and string; librbd writes the bool we own.
            check("create snapshot", unsafe {
                ffi::rbd_snap_exists(img.0, name.as_ptr(), &mut exists)
            } as i64)?;
            if !exists {
                // SAFETY: as above.
                check(
                    "create snapshot",
                    unsafe { ffi::rbd_snap_create(img.0, name.as_ptr()) } as i64,
                )?;
            }
            // SAFETY: as above.
            let code = unsafe { ffi::rbd_snap_protect(img.0, name.as_ptr()) };
            if code == -libc::EBUSY {
                return Ok(()); // already protected
            }
            check("protect snapshot", code as i64).map(drop)
        })
        .await
    }

    /// Unprotects and removes a snapshot; `busy` while clones of it exist. Succeeds if
    /// it is gone.
    pub async fn snapshot_remove(&self, image: &str, snap: &str) -> Result<()> {
        let (image, snap) = (image.to_string(), snap.to_string());
        self.with_io("remove snapshot", move |io| {
            let img = Image::open(io, &image, None)?;
            let name = cstring("remove snapshot", &snap)?;
            let mut exists = false;
            // SAFETY: live image handle and string; librbd writes the bool we own.
            check("remove snapshot", unsafe {
                ffi::rbd_snap_exists(img.0, name.as_ptr(), &mut exists)
            } as i64)?;
            if !exists {
                return Ok(());
            }
            // SAFETY: as above.
            let code = unsafe { ffi::rbd_snap_unprotect(img.0, name.as_ptr()) };
            if code < 0 && code != -libc::EINVAL {
                // EINVAL: it was not protected.
                check("unprotect snapshot", code as i64)?;
            }
            // SAFETY: as above.
            check(
                "remove snapshot",
                unsafe { ffi::rbd_snap_remove(img.0, name.as_ptr()) } as i64,
            )
            .map(drop)
        })
        .await
    }

    /// Clones `image@snap` of this namespace as `child` in `target`'s namespace:
    /// copy-on-write, instant, and writes to the clone never reach the parent. Always a
    /// v2 clone, which crossing namespaces requires.
    pub async fn clone_to(&self, image: &str, snap: &str, target: &Rbd, child: &str) -> Result<()> {
        let (image, snap, child) = (image.to_string(), snap.to_string(), child.to_string());
        let (pool, parent_ns, child_pool, child_ns) = (
            self.pool.clone(),
            self.namespace.clone(),
            target.pool.clone(),
            target.namespace.clone(),
        );
        self.ceph
            .blocking("clone image", move |h| {
                let parent_io = h.ioctx(&pool, &parent_ns)?;
                let child_io = h.ioctx(&child_pool, &child_ns)?;
                let (image, snap, child) = (
                    cstring("clone image", &image)?,
                    cstring("clone image", &snap)?,
                    cstring("clone image", &child)?,
                );
                let options = CloneOptions::new()?;
                // SAFETY: live io contexts, strings and options.
                check("clone image", unsafe {
                    ffi::rbd_clone3(
                        *parent_io.inner() as ffi::rados_ioctx_t,
                        image.as_ptr(),
                        snap.as_ptr(),
                        *child_io.inner() as ffi::rados_ioctx_t,
                        child.as_ptr(),
                        options.0,
                    )
                } as i64)
                .map(drop)
            })
            .await
    }

    /// Clients that have the image open.
    pub async fn watchers(&self, image: &str) -> Result<Vec<Watcher>> {
        let image = image.to_string();
        self.with_io("list watchers", move |io| {
            let img = Image::open(io, &image, None)?;
            let mut max: size_t = 16;
            loop {
                let mut list: Vec<ffi::rbd_image_watcher_t> = (0..max)
                    .map(|_| ffi::rbd_image_watcher_t {
                        addr: std::ptr::null_mut(),
                        id: 0,
                        cookie: 0,
                    })
                    .collect();
                // SAFETY: room for `max` entries; librbd fills `max` of them.
                let code = unsafe { ffi::rbd_watchers_list(img.0, list.as_mut_ptr(), &mut max) };
                if code == -libc::ERANGE {
                    continue;
                }
                check("list watchers", code as i64)?;
                let watchers = list[..max]
                    .iter()
                    // SAFETY: librbd allocated these strings; they live until cleanup.
                    .map(|w| Watcher {
                        address: unsafe { owned(w.addr) },
                        id: w.id,
                    })
                    .collect::<Vec<_>>();
                // SAFETY: frees the entries librbd filled.
                unsafe { ffi::rbd_watchers_list_cleanup(list.as_mut_ptr(), max) };
                // Our own open handle watches too: leave it out.
                return Ok(watchers);
            }
        })
        .await
    }

    /// Takes the image's lease under `cookie` (a machine id): `busy` when another holder
    /// has it, `exists` when this client already holds it.
    ///
    /// The lease is a RADOS object lock on `kiln_lease.<image>` next to the image, not
    /// an RBD advisory lock: those share the header object's lock with the
    /// exclusive-lock feature, so while one is held every other client's writes (the
    /// builder's own rbd-fuse or krbd mapping) wait for a lock that never comes.
    pub async fn lock_exclusive(&self, image: &str, cookie: &str) -> Result<()> {
        let (object, cookie) = (lease_object(image), cookie.to_string());
        self.with_io("take lease", move |io| {
            let mut forever = libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            io.rados_object_lock_exclusive(
                &object,
                LEASE_LOCK,
                &cookie,
                "kiln builder",
                &mut forever,
                0,
            )
            .map_err(|e| rados_error("take lease", &e))
        })
        .await
    }

    /// Releases this client's lease under `cookie`; succeeds if it holds none.
    pub async fn unlock(&self, image: &str, cookie: &str) -> Result<()> {
        let (object, cookie) = (lease_object(image), cookie.to_string());
        self.with_io("release lease", move |io| {
            match io.rados_object_unlock(&object, LEASE_LOCK, &cookie) {
                Err(e) if rados_error("release lease", &e).is_not_found() => Ok(()),
                other => other.map_err(|e| rados_error("release lease", &e)),
            }
        })
        .await
    }

    /// Who holds the image's lease.
    pub async fn lockers(&self, image: &str) -> Result<Vec<Locker>> {
        let object = lease_object(image);
        self.with_io("list lease holders", move |io| {
            let object = cstring("list lease holders", &object)?;
            let name = cstring("list lease holders", LEASE_LOCK)?;
            let mut sizes = [256usize; 4];
            loop {
                let mut tag = vec![0u8; sizes[0]];
                let mut clients = vec![0u8; sizes[1]];
                let mut cookies = vec![0u8; sizes[2]];
                let mut addrs = vec![0u8; sizes[3]];
                let mut exclusive: c_int = 0;
                let [mut t, mut c, mut k, mut a] = sizes;
                // SAFETY: each buffer is writable for the size passed with it; librados
                // writes NUL-separated strings and updates the sizes.
                let code = unsafe {
                    ffi::rados_list_lockers(
                        *io.inner() as ffi::rados_ioctx_t,
                        object.as_ptr(),
                        name.as_ptr(),
                        &mut exclusive,
                        tag.as_mut_ptr() as *mut c_char,
                        &mut t,
                        clients.as_mut_ptr() as *mut c_char,
                        &mut c,
                        cookies.as_mut_ptr() as *mut c_char,
                        &mut k,
                        addrs.as_mut_ptr() as *mut c_char,
                        &mut a,
                    )
                };
                if code == -(libc::ERANGE as isize) {
                    sizes = [
                        t.max(sizes[0] * 2),
                        c.max(sizes[1] * 2),
                        k.max(sizes[2] * 2),
                        a.max(sizes[3] * 2),
                    ];
                    continue;
                }
                if code == -(libc::ENOENT as isize) {
                    return Ok(Vec::new());
                }
                check("list lease holders", code as i64)?;
                let (clients, cookies, addrs) = (
                    split_nul(&clients, c),
                    split_nul(&cookies, k),
                    split_nul(&addrs, a),
                );
                return Ok(clients
                    .into_iter()
                    .zip(cookies)
                    .zip(addrs)
                    .map(|((client, cookie), address)| Locker {
                        client,
                        cookie,
                        address,
                    })
                    .collect());
            }
        })
        .await
    }

    /// Breaks another client's lease and fences it: its address is blocklisted first,
    /// so a builder that lost its volume cannot write to it any more (its calls fail as
    /// [`CephError::is_fenced`]). Succeeds if the lease is gone.
    pub async fn break_lock(&self, image: &str, locker: &Locker) -> Result<()> {
        if !locker.address.is_empty() {
            self.ceph.blocklist(&locker.address, FENCE_SECONDS).await?;
        }
        let object = lease_object(image);
        let (client, cookie) = (locker.client.clone(), locker.cookie.clone());
        self.with_io("break lease", move |io| {
            match io.rados_object_break_lock(&object, LEASE_LOCK, &client, &cookie) {
                Err(e) if rados_error("break lease", &e).is_not_found() => Ok(()),
                other => other.map_err(|e| rados_error("break lease", &e)),
            }
        })
        .await
    }

    /// Removes the image's lease object (with the image); succeeds if it is gone.
    pub async fn remove_lease(&self, image: &str) -> Result<()> {
        let object = lease_object(image);
        self.with_io("remove lease", move |io| {
            match io.rados_object_remove(&object) {
                Err(e) if rados_error("remove lease", &e).is_not_found() => Ok(()),
                other => other.map_err(|e| rados_error("remove lease", &e)),
            }
        })
        .await
    }
}

/// The lock name of image leases.
const LEASE_LOCK: &str = "kiln";
/// How long a fenced holder stays blocklisted: longer than any builder lives.
const FENCE_SECONDS: u32 = 7 * 24 * 3600;

fn lease_object(image: &str) -> String {
    format!("kiln_lease.{image}")
}

/// The files a client needs to reach the cluster as `entity` with `key`: a minimal
/// `ceph.conf` (monitors, cephx, the keyring's path) and the keyring. What the agent
/// writes (mode 0600) before attaching a volume.
pub fn client_files(
    monitors: &[String],
    entity: &str,
    key: &str,
    keyring_path: &Path,
) -> (String, String) {
    let conf = format!(
        "[global]\nmon host = {}\nkeyring = {}\nauth cluster required = cephx\n\
         auth service required = cephx\nauth client required = cephx\n",
        monitors.join(","),
        keyring_path.display()
    );
    let keyring = format!("[{entity}]\n\tkey = {key}\n");
    (conf, keyring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_separated_lists_split() {
        assert_eq!(split_nul(b"a\0bc\0\0", 6), vec!["a", "bc"]);
        assert_eq!(split_nul(b"a\0b", 1), vec!["a"]);
        assert!(split_nul(b"", 0).is_empty());
    }

    #[test]
    fn errors_classify() {
        assert!(CephError::from_errno("x", -(libc::ENOENT as i64)).is_not_found());
        assert!(CephError::from_errno("x", -(libc::EBUSY as i64)).is_busy());
        assert!(CephError::from_errno("x", -(libc::EPERM as i64)).is_permission_denied());
        assert!(cstring("x", "a\0b").is_err());
    }
}
