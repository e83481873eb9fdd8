//! `rbd`: a bdev on a Ceph RBD image.

use std::sync::{Arc, Mutex};

use ferroblk_bdev::bdev::BdevInfo;
use ferroblk_bdev::{Bdev, BdevError, BlockSize, Caps, Channel};

use crate::channel::{RBD_CHANNEL_DEPTH, RbdChannel};
use crate::cluster::{Cluster, ClusterConfig, bounded};
use crate::ffi;
use crate::image::{Image, ImageSpec};

/// The kind name.
pub const KIND: &str = "rbd";

/// Largest request passed to librbd whole: one default RBD object (4 MiB); larger ones are split
/// by the channel layer.
const MAX_TRANSFER_BYTES: u64 = 4 << 20;

/// Most segments per request (`IOV_MAX`).
const MAX_SEGMENTS: u32 = 1024;

/// What librbd's header-update callback needs: the image, to read its size, and the bdev's info,
/// to grow it.
struct SizeWatch {
    image: Arc<Image>,
    info: Arc<BdevInfo>,
}

/// librbd's header-update callback (a librbd thread, which may call librbd, as rbd-nbd's and
/// rbd-ggate's watchers do): an image grown by someone else (`rbd resize`) grows the bdev.
unsafe extern "C" fn header_updated(arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the `SizeWatch` boxed in `RbdBdev`, which unregisters the callback (and
    // waits for a running one) before it drops the box.
    let w = unsafe { &*(arg as *const SizeWatch) };
    match w.image.size() {
        Ok(bytes) => {
            let blocks = bytes >> w.info.block_size().shift();
            let now = w.info.block_count();
            if blocks > now {
                w.info.set_block_count(blocks);
            } else if blocks < now {
                tracing::warn!(
                    bdev = %w.info.name(),
                    blocks,
                    now,
                    "the rbd image was shrunk outside ferroblk; the volume keeps its size"
                );
            }
        }
        Err(e) => tracing::warn!(bdev = %w.info.name(), error = %e, "rbd header update"),
    }
}

/// A bdev on an RBD image. Its size is the image's, rounded down to whole blocks; it follows
/// the image when someone else grows it.
pub struct RbdBdev {
    /// The registered header-update watch and its callback's argument.
    watch: Option<(u64, Box<SizeWatch>)>,
    info: Arc<BdevInfo>,
    image: Arc<Image>,
    cluster: Arc<Cluster>,
    spec: ImageSpec,
    /// Serializes resizes (control plane).
    resizing: Mutex<()>,
}

impl RbdBdev {
    /// Connects (or reuses the connections to) the cluster and opens the image, creating it when
    /// `spec.create_size` is set and it does not exist. Blocks the calling thread (control
    /// plane); errors name the field at fault.
    pub fn open(
        name: &str,
        cluster: &ClusterConfig,
        spec: ImageSpec,
        block_size: BlockSize,
    ) -> Result<RbdBdev, BdevError> {
        let cluster = Cluster::get(cluster)?;
        let image = Image::open(cluster.clone(), &spec)?;
        let bytes = image.size()?;
        let blocks = bytes >> block_size.shift();
        if blocks == 0 {
            return Err(BdevError::invalid(
                "image",
                format!(
                    "image '{}' is {bytes} bytes, smaller than one {}-byte block",
                    spec.image,
                    block_size.bytes()
                ),
            ));
        }
        let caps = Caps::ALL_IO | Caps::RETAINS_DATA | Caps::PERSISTENT;
        let info = BdevInfo::builder(name, KIND, block_size, blocks, caps)
            .max_transfer_blocks((MAX_TRANSFER_BYTES >> block_size.shift()) as u32)
            .max_segments(MAX_SEGMENTS)
            .read_only(spec.read_only)
            .build();
        tracing::info!(
            bdev = name,
            pool = %spec.pool,
            image = %spec.image,
            bytes,
            connections = cluster.connections(),
            "rbd image open"
        );
        let image = Arc::new(image);
        let watch = if spec.read_only {
            // A read-only open sets no watch on the header: there is nothing to be told.
            None
        } else {
            let w = Box::new(SizeWatch {
                image: image.clone(),
                info: info.clone(),
            });
            let mut handle = 0u64;
            let arg = &*w as *const SizeWatch as *mut std::ffi::c_void;
            // SAFETY: an open image; `arg` points into the box, kept until `rbd_update_unwatch`
            // in `Drop`.
            let r = unsafe { ffi::rbd_update_watch(image.raw(), &mut handle, header_updated, arg) };
            if r < 0 {
                tracing::warn!(
                    bdev = name,
                    error = %ffi::errno(r.into()),
                    "cannot watch the rbd image's header: a resize made outside ferroblk will not be seen"
                );
                None
            } else {
                Some((handle, w))
            }
        };
        Ok(RbdBdev {
            watch,
            info,
            image,
            cluster,
            spec,
            resizing: Mutex::new(()),
        })
    }

    /// The connections its image uses, shared with the other images of the same cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
}

impl Drop for RbdBdev {
    fn drop(&mut self) {
        if let Some((handle, w)) = self.watch.take() {
            let c = self.cluster.config();
            let bound = c.op_timeout + c.connect_timeout;
            // The watch's argument moves to the unregistering thread, which frees it only once
            // librbd has returned (having waited for a running callback).
            bounded("unwatch an rbd image", bound, move || {
                let image = w.image.raw();
                // SAFETY: the handle came from `rbd_update_watch` on this open image (kept open
                // by `w`'s `Arc`).
                let r = unsafe { ffi::rbd_update_unwatch(image, handle) };
                if r < 0 {
                    // The callback may still be registered: leak its argument rather than free it.
                    tracing::warn!(error = %ffi::errno(r.into()), "rbd_update_unwatch failed");
                    std::mem::forget(w);
                }
            });
        }
    }
}

impl Bdev for RbdBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let ops = RbdChannel::new(self.image.clone(), self.info.block_size().shift())?;
        Ok(Channel::new(
            self.info.clone(),
            Box::new(ops),
            RBD_CHANNEL_DEPTH,
        ))
    }

    /// Grows the image in the cluster, then the bdev (exports hear of it through the bdev's
    /// listeners). Shrinking is refused: it would discard data at the end of the image.
    fn resize(&self, new_blocks: u64) -> Result<(), BdevError> {
        let _one = self.resizing.lock().expect("resize lock");
        if self.spec.read_only {
            return Err(BdevError::invalid("size", "the image is open read-only"));
        }
        let old = self.info.block_count();
        if new_blocks < old {
            return Err(BdevError::invalid(
                "size",
                format!("an rbd volume only grows ({old} blocks now, {new_blocks} asked)"),
            ));
        }
        let bytes = self.info.block_size().to_bytes(new_blocks);
        if self.image.size()? < bytes {
            self.image.resize(bytes)?;
        }
        self.info.set_block_count(new_blocks);
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        let c = self.cluster.config();
        serde_json::json!({
            "pool": self.spec.pool,
            "namespace": self.spec.namespace,
            "image": self.spec.image,
            "mon_host": c.mon_host,
            "conf": c.conf,
            "client": c.client,
            "connections": self.cluster.connections(),
            "read_only": self.spec.read_only,
        })
    }
}
