//! The verbs and CM objects of one queue pair, shared by the target's queue pairs ([`super::conn`])
//! and the initiator's (`crate::initiator::rdma`): a registered region with its buffer, and the
//! set destroyed in order on drop.

use ferroblk_bdev::AlignedBuf;

use super::ffi;
use super::regpool::RegPool;

/// A registered memory region with the buffer it covers.
pub(crate) struct Region {
    pub(crate) buf: AlignedBuf,
    pub(crate) mr: *mut ffi::Mr,
    pub(crate) lkey: u32,
}

impl Region {
    /// Registers a new zeroed buffer of `len` bytes for local access in `qp`'s protection
    /// domain.
    pub(crate) fn new(qp: *mut ffi::Qp, len: usize) -> std::io::Result<Region> {
        let mut buf = AlignedBuf::new(len);
        // SAFETY: `qp` is live; the buffer outlives the region (both live in the same Region,
        // deregistered in `QpObjects::drop` before the buffer is freed).
        let mr = unsafe { ffi::fb_reg_mr(qp, buf.as_mut_ptr().cast(), len) };
        if mr.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `mr` is a live region just registered.
        let lkey = unsafe { ffi::fb_mr_lkey(mr) };
        Ok(Region { buf, mr, lkey })
    }
}

/// The verbs and CM objects of one queue, destroyed in order on drop.
pub(crate) struct QpObjects {
    pub(crate) ch: *mut ffi::EventChannel,
    pub(crate) id: *mut ffi::CmId,
    pub(crate) qp: *mut ffi::Qp,
    pub(crate) regions: Vec<Region>,
    pub(crate) pool: RegPool,
    /// Regions over memory the owner does not hold (an initiator's callers' buffers).
    pub(crate) foreign: Vec<*mut ffi::Mr>,
}

impl Drop for QpObjects {
    fn drop(&mut self) {
        // SAFETY: each pointer is live and owned here; the QP goes first (no work request uses
        // a region after it), then the regions, then what remains, then the id and its channel.
        unsafe {
            if !self.qp.is_null() {
                ffi::fb_qp_destroy_qp(self.qp);
            }
            for r in self.regions.drain(..) {
                ffi::fb_dereg_mr(r.mr);
            }
            for mr in self.foreign.drain(..) {
                ffi::fb_dereg_mr(mr);
            }
            self.pool.dereg_all();
            if !self.qp.is_null() {
                ffi::fb_qp_free(self.qp);
            }
            if !self.id.is_null() {
                ffi::fb_destroy_id(self.id);
            }
            if !self.ch.is_null() {
                ffi::fb_channel_destroy(self.ch);
            }
        }
    }
}

/// Drops the objects of a queue whose id the caller keeps (to reject it).
pub(crate) fn drop_without_id(mut obj: QpObjects) {
    obj.id = std::ptr::null_mut();
    drop(obj);
}
