//! The librados and librbd functions this crate uses, declared by hand from Debian 12's headers
//! (Ceph 16.2: `rados/librados.h`, `rbd/librbd.h`, librbd API 1.16). Every one returns 0 or a
//! positive count on success and a negative errno on failure.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

/// `rados_t`: a cluster handle (one connection: monitor session, OSD sessions, messenger
/// threads).
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`: an I/O context on one pool (and namespace) of a cluster handle.
pub type rados_ioctx_t = *mut c_void;
/// `rbd_image_t`: an open image.
pub type rbd_image_t = *mut c_void;
/// `rbd_completion_t`: one asynchronous request's completion.
pub type rbd_completion_t = *mut c_void;
/// `rbd_callback_t`: called from a librbd thread when a request completes.
pub type rbd_callback_t = unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void);
/// `librbd_progress_fn_t`: progress of a long operation; a non-zero return cancels it.
pub type librbd_progress_fn_t =
    unsafe extern "C" fn(offset: u64, total: u64, arg: *mut c_void) -> c_int;
/// `rbd_update_callback_t`: called from a librbd thread when the image's header changed.
pub type rbd_update_callback_t = unsafe extern "C" fn(arg: *mut c_void);

/// `RBD_FEATURE_EXCLUSIVE_LOCK` (`rbd/features.h`): writers take the image's exclusive lock.
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_OBJECT_MAP` (`rbd/features.h`): the lock owner tracks which objects exist.
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// `RBD_LOCK_MODE_EXCLUSIVE` (`rbd_lock_mode_t`).
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

unsafe extern "C" {
    pub fn rados_create2(
        cluster: *mut rados_t,
        cluster_name: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);

    pub fn rbd_create(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        order: *mut c_int,
    ) -> c_int;
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub fn rbd_update_watch(
        image: rbd_image_t,
        handle: *mut u64,
        watch_cb: rbd_update_callback_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    pub fn rbd_lock_acquire(image: rbd_image_t, lock_mode: c_int) -> c_int;
    pub fn rbd_rebuild_object_map(
        image: rbd_image_t,
        cb: librbd_progress_fn_t,
        cbdata: *mut c_void,
    ) -> c_int;
    pub fn rbd_update_unwatch(image: rbd_image_t, handle: u64) -> c_int;

    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    pub fn rbd_aio_release(c: rbd_completion_t);
    pub fn rbd_aio_readv(
        image: rbd_image_t,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
}

/// A negative errno from librados/librbd as an [`std::io::Error`].
pub fn errno(r: i64) -> std::io::Error {
    std::io::Error::from_raw_os_error((-r) as i32)
}
