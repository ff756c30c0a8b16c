//! The C functions this crate calls that the `ceph` crate does not bind soundly: all of
//! librbd (`librbd.h`, Pacific), and librados' mon command and stats, declared from the
//! headers by hand. Only `lib.rs` calls them, through safe wrappers.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, size_t, ssize_t, time_t};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_image_options_t = *mut c_void;
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;
pub const RBD_IMAGE_OPTION_CLONE_FORMAT: c_int = 12;
pub type librbd_progress_fn_t = Option<extern "C" fn(u64, u64, *mut c_void) -> c_int>;

pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;
pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;

#[repr(C)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

#[repr(C)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

#[repr(C)]
pub struct rbd_trash_image_info_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
    pub source: c_int,
    pub deletion_time: time_t,
    pub deferment_end_time: time_t,
}

#[repr(C)]
pub struct rbd_image_watcher_t {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

/// All 16 counters librados ≥ Nautilus writes (the `ceph` crate's struct has 12, and
/// the call overwrites the stack past it).
#[repr(C)]
#[derive(Default)]
pub struct rados_pool_stat_t {
    pub num_bytes: u64,
    pub num_kb: u64,
    pub num_objects: u64,
    pub num_object_clones: u64,
    pub num_object_copies: u64,
    pub num_objects_missing_on_primary: u64,
    pub num_objects_unfound: u64,
    pub num_objects_degraded: u64,
    pub num_rd: u64,
    pub num_rd_kb: u64,
    pub num_wr: u64,
    pub num_wr_kb: u64,
    pub num_user_bytes: u64,
    pub compressed_bytes_orig: u64,
    pub compressed_bytes: u64,
    pub compressed_bytes_alloc: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct rados_cluster_stat_t {
    pub kb: u64,
    pub kb_used: u64,
    pub kb_avail: u64,
    pub num_objects: u64,
}

unsafe extern "C" {
    // librados (linked by the `ceph` crate)
    pub fn rados_mon_command(
        cluster: rados_t,
        cmd: *mut *const c_char,
        cmdlen: size_t,
        inbuf: *const c_char,
        inbuflen: size_t,
        outbuf: *mut *mut c_char,
        outbuflen: *mut size_t,
        outs: *mut *mut c_char,
        outslen: *mut size_t,
    ) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
    pub fn rados_ioctx_pool_stat(io: rados_ioctx_t, stats: *mut rados_pool_stat_t) -> c_int;
    pub fn rados_cluster_stat(cluster: rados_t, result: *mut rados_cluster_stat_t) -> c_int;
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    pub fn rados_list_lockers(
        io: rados_ioctx_t,
        o: *const c_char,
        name: *const c_char,
        exclusive: *mut c_int,
        tag: *mut c_char,
        tag_len: *mut size_t,
        clients: *mut c_char,
        clients_len: *mut size_t,
        cookies: *mut c_char,
        cookies_len: *mut size_t,
        addrs: *mut c_char,
        addrs_len: *mut size_t,
    ) -> ssize_t;
}

#[link(name = "rbd")]
unsafe extern "C" {
    pub fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    pub fn rbd_create2(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        features: u64,
        order: *mut c_int,
    ) -> c_int;
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: size_t) -> c_int;
    pub fn rbd_resize2(
        image: rbd_image_t,
        size: u64,
        allow_shrink: bool,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: extern "C" fn(u64, size_t, c_int, *mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_write(image: rbd_image_t, ofs: u64, len: size_t, buf: *const c_char) -> ssize_t;
    pub fn rbd_read(image: rbd_image_t, ofs: u64, len: size_t, buf: *mut c_char) -> ssize_t;
    pub fn rbd_flush(image: rbd_image_t) -> c_int;
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_list2(io: rados_ioctx_t, images: *mut rbd_image_spec_t, max: *mut size_t) -> c_int;
    pub fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num: size_t);
    pub fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
    pub fn rbd_trash_list(
        io: rados_ioctx_t,
        entries: *mut rbd_trash_image_info_t,
        num: *mut size_t,
    ) -> c_int;
    pub fn rbd_trash_list_cleanup(entries: *mut rbd_trash_image_info_t, num: size_t);
    pub fn rbd_trash_remove(io: rados_ioctx_t, id: *const c_char, force: bool) -> c_int;
    pub fn rbd_namespace_create(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_namespace_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_namespace_list(io: rados_ioctx_t, names: *mut c_char, size: *mut size_t) -> c_int;
    pub fn rbd_namespace_exists(io: rados_ioctx_t, name: *const c_char, exists: *mut bool)
    -> c_int;
    pub fn rbd_snap_create(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_remove(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_exists(image: rbd_image_t, name: *const c_char, exists: *mut bool) -> c_int;
    pub fn rbd_snap_protect(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_unprotect(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
    pub fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;
    pub fn rbd_clone3(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        c_opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_watchers_list(
        image: rbd_image_t,
        watchers: *mut rbd_image_watcher_t,
        max: *mut size_t,
    ) -> c_int;
    pub fn rbd_watchers_list_cleanup(watchers: *mut rbd_image_watcher_t, num: size_t);
}
