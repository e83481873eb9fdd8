//! Registered command buffers of one queue pair: RDMA READ and WRITE move host data straight
//! into and out of the buffers the NVMe queue and the bdevs use, so those buffers must lie in
//! memory regions of the queue pair's protection domain. The pool has the reactor buffer
//! pool's shape ([`bufpool::class`]: power-of-two classes from 4 KiB to 1 MiB) and registers a
//! buffer once, when it is first made; buffers come back to it and are lent again, so serving
//! I/O registers nothing once warm (like the reactor pool, which allocates only while cold).
//!
//! A lent buffer is known by its address until it comes back ([`RegPool::lkey`] finds its
//! region's local key). A buffer the pool did not lend (in-capsule data) is not in the map and
//! goes to the reactor's pool instead. A lent buffer that is dropped rather than given back
//! leaves its region registered until the queue pair goes away (a leak until then, never a
//! wrong key: lending a new buffer at the same address replaces the entry).
//!
//! Both sides use it: the target's queue pairs register for local access (they READ and WRITE
//! host memory), the initiator's for remote access too (the target moves data in and out of
//! them: [`RegPool::new`]'s `remote`).

use std::collections::HashMap;

use ferroblk_bdev::{AlignedBuf, bufpool};

use super::ffi;

/// Bytes of idle buffers a queue pair keeps per class (at least one buffer).
const CLASS_KEEP: usize = 4 << 20;

/// A registered buffer's region.
#[derive(Clone, Copy)]
struct Reg {
    mr: *mut ffi::Mr,
    lkey: u32,
    rkey: u32,
}

/// See the module documentation.
pub(crate) struct RegPool {
    free: [Vec<(AlignedBuf, Reg)>; bufpool::CLASSES],
    lent: HashMap<usize, Reg>,
    remote: bool,
}

impl RegPool {
    /// A pool for about `lent` buffers out at once (the map grows beyond that); `remote`
    /// registers for remote read and write access as well (an initiator's buffers).
    pub(crate) fn new(lent: usize, remote: bool) -> RegPool {
        RegPool {
            free: Default::default(),
            lent: HashMap::with_capacity(lent),
            remote,
        }
    }

    /// A registered buffer of at least `len` bytes (`len` ≤ [`bufpool::MAX_POOLED`]), or
    /// `None` if registration failed.
    ///
    /// # Safety
    /// `qp` is the live queue pair whose protection domain the pool registers in, the same
    /// at every call.
    pub(crate) unsafe fn get(&mut self, qp: *mut ffi::Qp, len: usize) -> Option<AlignedBuf> {
        let c = bufpool::class(len)?;
        let (mut buf, reg) = match self.free[c].pop() {
            Some(x) => x,
            None => {
                let mut buf = AlignedBuf::new(bufpool::MIN_POOLED << c);
                // SAFETY: `qp` is live (caller); the region covers the buffer, which stays
                // allocated while registered (kept here or lent; deregistered in `dereg_all`
                // or when dropped in `put`).
                let mr = unsafe {
                    if self.remote {
                        ffi::fb_reg_mr_remote(qp, buf.as_mut_ptr().cast(), buf.len())
                    } else {
                        ffi::fb_reg_mr(qp, buf.as_mut_ptr().cast(), buf.len())
                    }
                };
                if mr.is_null() {
                    return None;
                }
                // SAFETY: a live region.
                let (lkey, rkey) = unsafe { (ffi::fb_mr_lkey(mr), ffi::fb_mr_rkey(mr)) };
                (buf, Reg { mr, lkey, rkey })
            }
        };
        self.lent.insert(buf.as_mut_ptr() as usize, reg);
        Some(buf)
    }

    /// The local key of the lent buffer starting at `ptr`.
    pub(crate) fn lkey(&self, ptr: *const u8) -> Option<u32> {
        self.lent.get(&(ptr as usize)).map(|r| r.lkey)
    }

    /// The remote key of the lent buffer starting at `ptr` (a pool made with `remote`).
    pub(crate) fn rkey(&self, ptr: *const u8) -> Option<u32> {
        self.lent.get(&(ptr as usize)).map(|r| r.rkey)
    }

    /// Takes a buffer back; one the pool did not lend is returned.
    pub(crate) fn put(&mut self, mut buf: AlignedBuf) -> Result<(), AlignedBuf> {
        let Some(reg) = self.lent.remove(&(buf.as_mut_ptr() as usize)) else {
            return Err(buf);
        };
        let c = bufpool::class(buf.len()).expect("a pool class");
        if self.free[c].len() * buf.len() < CLASS_KEEP {
            self.free[c].push((buf, reg));
        } else {
            // SAFETY: the region is ours and no work request uses it (the buffer came back).
            unsafe { ffi::fb_dereg_mr(reg.mr) };
        }
        Ok(())
    }

    /// Deregisters every region (idle and lent), before the protection domain goes.
    ///
    /// # Safety
    /// The queue pair is destroyed: no work request uses any region.
    pub(crate) unsafe fn dereg_all(&mut self) {
        for (_, r) in self.free.iter_mut().flat_map(|f| f.drain(..)) {
            // SAFETY: the caller guarantees no work request uses it.
            unsafe { ffi::fb_dereg_mr(r.mr) };
        }
        for (_, r) in self.lent.drain() {
            // SAFETY: as above.
            unsafe { ffi::fb_dereg_mr(r.mr) };
        }
    }
}
