//! One open RBD image: its I/O context on a cluster connection and its librbd handle. Opening,
//! creating and resizing block the calling thread (the control plane, never a reactor).

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

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
    /// The image's features (`RBD_FEATURE_*`), read at open; none when it is open read-only
    /// (no lock, nothing of the object map to repair).
    features: u64,
    /// A request that may change the object map failed: the map in the cluster may be behind
    /// the one librbd keeps in memory (see [`Image::write_failed`]).
    map_stale: AtomicBool,
    /// A thread is waiting for the cluster to rebuild the object map.
    repairing: AtomicBool,
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
        Ok(Image::open_or_probe(cluster, spec, false)?.expect("an open that is not a probe opens"))
    }

    /// What `check-config` asks of the cluster: opens the image of `spec` read-only (no lock, no
    /// watch, nothing created or changed) with the checks and errors of [`open`](Self::open),
    /// and returns its size in bytes; `None` when it does not exist and `spec` would create it.
    pub fn probe(cluster: Arc<Cluster>, spec: &ImageSpec) -> Result<Option<u64>, BdevError> {
        Image::open_or_probe(cluster, spec, true)?
            .map(|img| img.size())
            .transpose()
    }

    fn open_or_probe(
        cluster: Arc<Cluster>,
        spec: &ImageSpec,
        probe: bool,
    ) -> Result<Option<Image>, BdevError> {
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
            features: 0,
            map_stale: AtomicBool::new(false),
            repairing: AtomicBool::new(false),
            _cluster: cluster,
        };
        if let Some(ns) = &spec.namespace {
            let ns = CString::new(ns.as_str())
                .map_err(|_| BdevError::invalid("namespace", "contains a NUL byte"))?;
            // SAFETY: a live I/O context; librados copies the name.
            unsafe { ffi::rados_ioctx_set_namespace(img.ioctx, ns.as_ptr()) };
        }
        let read_only = spec.read_only || probe;
        let mut r = img.open_raw(&name, read_only);
        if r == -libc::ENOENT && probe && spec.create_size.is_some() {
            return Ok(None);
        }
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
            r = img.open_raw(&name, read_only);
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
        if !read_only {
            img.features = img.features(spec)?;
            if img.features & ffi::RBD_FEATURE_EXCLUSIVE_LOCK != 0 {
                img.lock(spec)?;
            }
        }
        Ok(Some(img))
    }

    /// Takes the image's exclusive lock now, on the control plane, and keeps it until close.
    ///
    /// librbd otherwise takes it on the first write, and that acquisition first needs the
    /// image's header watch registered: once a cluster that went away has made the watch fail,
    /// librbd parks the lock request ("watcher not registered - delaying request") until a
    /// re-watch succeeds, which no timeout bounds, so the write would wait as long as the
    /// cluster is away. With the lock held from open, writes never wait on it: while the
    /// cluster is away they go to the OSDs and fail after `rados_osd_op_timeout`, and librbd
    /// re-registers the watch and refreshes the lock's cookie when the cluster returns.
    /// Taking it explicitly also makes librbd keep it (it no longer hands it over to another
    /// client that asks): two writers on one image are refused at open instead of trading the
    /// lock back and forth.
    fn lock(&self, spec: &ImageSpec) -> Result<(), BdevError> {
        // SAFETY: an open, writable image.
        let r = unsafe { ffi::rbd_lock_acquire(self.raw, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        if r < 0 {
            let why = if r == -libc::EROFS || r == -libc::EBUSY {
                "another client holds its exclusive lock (the image is in use)".to_string()
            } else {
                format!("cannot take its exclusive lock: {}", ffi::errno(r.into()))
            };
            return Err(BdevError::invalid(
                "image",
                format!("image '{}' in {}: {why}", spec.image, spec.where_()),
            ));
        }
        Ok(())
    }

    /// The image's features (`RBD_FEATURE_*`).
    fn features(&self, spec: &ImageSpec) -> Result<u64, BdevError> {
        let mut features = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let r = unsafe { ffi::rbd_get_features(self.raw, &mut features) };
        if r < 0 {
            return Err(BdevError::invalid(
                "image",
                format!(
                    "cannot read the features of image '{}' in {}: {}",
                    spec.image,
                    spec.where_(),
                    ffi::errno(r.into())
                ),
            ));
        }
        Ok(features)
    }

    /// Called by a channel (a reactor) when a write, discard or write-zeroes failed.
    ///
    /// Before writing to an object it has not written yet, librbd records in the image's object
    /// map that the object exists: in memory, and in the cluster. When the cluster does not
    /// answer, librbd 16.2 keeps the in-memory change, fails to record in the cluster that the
    /// map is invalid, and never writes that entry again; a later owner of the image trusts the
    /// map in the cluster and reads zeros from objects written since. So the map is rebuilt
    /// (`rbd_rebuild_object_map`, what `rbd object-map rebuild` runs) once the cluster answers
    /// again, from a thread of its own that retries every `op_timeout`, and at the latest when
    /// the image closes. Only failures start it: nothing on the hot path.
    pub(crate) fn write_failed(self: &Arc<Self>) {
        if self.features & ffi::RBD_FEATURE_OBJECT_MAP == 0 {
            return;
        }
        self.map_stale.store(true, Ordering::SeqCst);
        if self.repairing.swap(true, Ordering::SeqCst) {
            return;
        }
        let image = Arc::downgrade(self);
        let pause = self._cluster.config().op_timeout;
        let spawned = std::thread::Builder::new()
            .name("rbd-map-repair".into())
            .spawn(move || repair_when_back(image, pause));
        if let Err(e) = spawned {
            self.repairing.store(false, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot start the rbd object map repair; it runs at close");
        }
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

/// Rebuilds the object map of `image` once the cluster answers (see [`Image::write_failed`]);
/// returns when it is rebuilt or the image closes (which rebuilds it itself).
fn repair_when_back(image: Weak<Image>, pause: std::time::Duration) {
    loop {
        std::thread::sleep(pause);
        let Some(img) = image.upgrade() else {
            return;
        };
        if img.map_stale.swap(false, Ordering::SeqCst) && !rebuild_object_map(img.raw) {
            img.map_stale.store(true, Ordering::SeqCst);
            continue;
        }
        img.repairing.store(false, Ordering::SeqCst);
        // A request that failed meanwhile found the repair running: carry on for it.
        if !img.map_stale.load(Ordering::SeqCst) || img.repairing.swap(true, Ordering::SeqCst) {
            return;
        }
    }
}

/// `rbd_rebuild_object_map` on an open image this process holds the lock of; false (logged) if
/// the cluster did not let it finish.
fn rebuild_object_map(image: ffi::rbd_image_t) -> bool {
    unsafe extern "C" fn progress(_: u64, _: u64, _: *mut std::ffi::c_void) -> std::ffi::c_int {
        0
    }
    // SAFETY: an open image (the caller holds it open); the progress callback touches nothing.
    let r = unsafe { ffi::rbd_rebuild_object_map(image, progress, std::ptr::null_mut()) };
    if r < 0 {
        tracing::debug!(error = %ffi::errno(r.into()), "rbd object map rebuild failed; retried");
        return false;
    }
    tracing::info!("rbd object map rebuilt after requests failed while the cluster was away");
    true
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
        let stale = self.map_stale.load(Ordering::SeqCst);
        bounded("close an rbd image", bound, move || {
            let h = h;
            if stale && !h.0.is_null() && !rebuild_object_map(h.0) {
                tracing::warn!(
                    "closing an rbd image whose object map could not be rebuilt: run `rbd object-map rebuild` on it"
                );
            }
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
