//! One open RBD image: its I/O context on a cluster connection and its librbd handle. Opening,
//! creating and resizing block the calling thread (the control plane, never a reactor).

use std::ffi::CString;
use std::sync::Arc;

use ferroblk_bdev::BdevError;

use crate::cluster::{Cluster, bounded};
use crate::ffi;

/// Where an image lives and how to open it.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace inside the pool (none: the default namespace).
    pub namespace: Option<String>,
    /// The image's name.
    pub image: String,
    /// Create the image with this size in bytes when it does not exist.
    pub create_size: Option<u64>,
    /// Open read-only (no exclusive lock, no watch).
    pub read_only: bool,
}

/// An open image. librbd's handle is thread-safe: every reactor's channel submits to it.
pub struct Image {
    raw: ffi::rbd_image_t,
    ioctx: ffi::rados_ioctx_t,
    // Declared last: the I/O context and image are closed (in `Drop`) before the cluster's
    // handles may shut down.
    _cluster: Arc<Cluster>,
}

// SAFETY: librbd's image handle and librados' I/O context are thread-safe for the calls made
// here (asynchronous I/O from any thread, resize and size from the control plane); both are
// released only in `Drop`, when no channel holds the image any more.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Opens (or creates, then opens) the image of `spec` on `cluster`.
    pub fn open(cluster: Arc<Cluster>, spec: &ImageSpec) -> Result<Image, BdevError> {
        let pool = CString::new(spec.pool.as_str())
            .map_err(|_| BdevError::invalid("pool", "contains a NUL byte"))?;
        let name = CString::new(spec.image.as_str())
            .map_err(|_| BdevError::invalid("image", "contains a NUL byte"))?;
        let mut ioctx: ffi::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated name and a valid out-pointer.
        let r = unsafe { ffi::rados_ioctx_create(cluster.pick().raw(), pool.as_ptr(), &mut ioctx) };
        if r < 0 {
            let why = if r == -libc::ENOENT {
                "no such pool".to_string()
            } else {
                ffi::errno(r.into()).to_string()
            };
            return Err(BdevError::invalid(
                "pool",
                format!("cannot open pool '{}': {why}", spec.pool),
            ));
        }
        let mut img = Image {
            raw: std::ptr::null_mut(),
            ioctx,
            _cluster: cluster,
        };
        if let Some(ns) = &spec.namespace {
            let ns = CString::new(ns.as_str())
                .map_err(|_| BdevError::invalid("namespace", "contains a NUL byte"))?;
            // SAFETY: a live I/O context; librados copies the name.
            unsafe { ffi::rados_ioctx_set_namespace(img.ioctx, ns.as_ptr()) };
        }
        let mut r = img.open_raw(&name, spec.read_only);
        if r == -libc::ENOENT
            && let Some(size) = spec.create_size
        {
            let mut order = 0;
            // SAFETY: a live I/O context, a NUL-terminated name, a valid out-pointer (order 0:
            // librbd's default object size).
            let c = unsafe { ffi::rbd_create(img.ioctx, name.as_ptr(), size, &mut order) };
            if c < 0 && c != -libc::EEXIST {
                return Err(BdevError::invalid(
                    "image",
                    format!(
                        "cannot create image '{}' in {}: {}",
                        spec.image,
                        spec.where_(),
                        ffi::errno(c.into())
                    ),
                ));
            }
            tracing::info!(image = %spec.image, pool = %spec.pool, size, "rbd image created");
            r = img.open_raw(&name, spec.read_only);
        }
        if r < 0 {
            let why = match r {
                // The namespace is part of where the image is looked up.
                e if e == -libc::ENOENT => {
                    "no such image (set create = true and size to create it)".to_string()
                }
                e => ffi::errno(e.into()).to_string(),
            };
            return Err(BdevError::invalid(
                "image",
                format!(
                    "cannot open image '{}' in {}: {why}",
                    spec.image,
                    spec.where_()
                ),
            ));
        }
        Ok(img)
    }

    fn open_raw(&mut self, name: &CString, read_only: bool) -> i32 {
        let mut raw: ffi::rbd_image_t = std::ptr::null_mut();
        // SAFETY: a live I/O context, a NUL-terminated name, a valid out-pointer, no snapshot.
        let r = unsafe {
            if read_only {
                ffi::rbd_open_read_only(self.ioctx, name.as_ptr(), &mut raw, std::ptr::null())
            } else {
                ffi::rbd_open(self.ioctx, name.as_ptr(), &mut raw, std::ptr::null())
            }
        };
        if r == 0 {
            self.raw = raw;
        }
        r
    }

    /// The librbd handle, for asynchronous requests.
    pub(crate) fn raw(&self) -> ffi::rbd_image_t {
        self.raw
    }

    /// The image's size in bytes, as the cluster has it.
    pub fn size(&self) -> Result<u64, BdevError> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let r = unsafe { ffi::rbd_get_size(self.raw, &mut size) };
        if r < 0 {
            return Err(BdevError::Io {
                op: "get the size of rbd image",
                path: "image".into(),
                source: ffi::errno(r.into()),
            });
        }
        Ok(size)
    }

    /// Sets the image's size in bytes (blocks the calling thread until the cluster has it).
    pub fn resize(&self, bytes: u64) -> Result<(), BdevError> {
        // SAFETY: an open, writable image.
        let r = unsafe { ffi::rbd_resize(self.raw, bytes) };
        if r < 0 {
            return Err(BdevError::invalid(
                "size",
                format!("the cluster refused the resize: {}", ffi::errno(r.into())),
            ));
        }
        Ok(())
    }
}

impl ImageSpec {
    /// `pool 'p'` or `pool 'p' namespace 'n'`, for messages.
    fn where_(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("pool '{}' namespace '{ns}'", self.pool),
            None => format!("pool '{}'", self.pool),
        }
    }
}

/// librbd and librados handles moved to the thread that closes them.
struct Handles(ffi::rbd_image_t, ffi::rados_ioctx_t);

// SAFETY: librbd's image handle and librados' I/O context may be used from any thread; the
// closing thread is the only one left using them.
unsafe impl Send for Handles {}

impl Drop for Image {
    fn drop(&mut self) {
        let h = Handles(self.raw, self.ioctx);
        // Kept alive by the closing thread: the I/O context and image go before the connection.
        let cluster = self._cluster.clone();
        let c = cluster.config();
        let bound = c.op_timeout + c.connect_timeout;
        bounded("close an rbd image", bound, move || {
            let h = h;
            if !h.0.is_null() {
                // SAFETY: the image is open and no channel holds it (each holds an `Arc` of
                // it); this thread is its last user.
                let r = unsafe { ffi::rbd_close(h.0) };
                if r < 0 {
                    tracing::warn!(error = %ffi::errno(r.into()), "closing an rbd image failed");
                }
            }
            // SAFETY: the context was created in `open` and the image on it is closed.
            unsafe { ffi::rados_ioctx_destroy(h.1) };
            drop(cluster);
        });
    }
}
