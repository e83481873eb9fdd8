//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! The back-end keeps, in shared memory the front-end holds on to, which descriptor heads it has
//! taken and not yet completed. If the back-end dies, the front-end reconnects to its successor
//! and hands the region back; the successor resubmits exactly the heads still marked, in the
//! order they were first taken, so nothing is lost or completed twice.
//!
//! Layout per queue (the split-ring layout of libvhost-user, which QEMU treats as opaque):
//! a 16-byte header `{u64 features, u16 version, u16 desc_num, u16 last_batch_head,
//! u16 used_idx}` then `desc_num` entries of 16 bytes `{u8 inflight, u8 pad[5], u16 next,
//! u64 counter}`; queues are 64-byte aligned.
//!
//! Completion protocol, one head at a time: write `last_batch_head`, publish the used entry
//! (guest `used.idx` += 1), clear the head's `inflight`, then store `used_idx`. After a crash,
//! `used_idx != used.idx` means the last head was published but not cleared: it is cleared.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

const HDR: usize = 16;
const ENTRY: usize = 16;

/// Bytes one queue of `queue_size` entries needs.
pub fn queue_stride(queue_size: u16) -> usize {
    (HDR + ENTRY * queue_size as usize).div_ceil(64) * 64
}

/// A mapping of the shared inflight region.
pub struct InflightRegion {
    base: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: shared memory owned by this value until drop; each queue's slice is used by the one
// reactor serving that queue.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `map`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl InflightRegion {
    /// Maps `size` bytes at `offset` of `fd` for `num_queues` queues of `queue_size`.
    pub fn map(
        fd: &OwnedFd,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<InflightRegion>, String> {
        if queue_size == 0 || num_queues == 0 {
            return Err("inflight region for zero queues".into());
        }
        let need = queue_stride(queue_size) as u64 * u64::from(num_queues);
        if size < need {
            return Err(format!("inflight region of {size} bytes, need {need}"));
        }
        if !offset.is_multiple_of(4096) {
            return Err("inflight region offset is not page aligned".into());
        }
        let len = usize::try_from(size).map_err(|_| "inflight region too large")?;
        crate::memory::check_fd_span(fd, offset, size)
            .map_err(|e| format!("inflight region: {e}"))?;
        // SAFETY: a shared mapping of the front-end's memfd; the result is checked, and the file
        // covers the whole range (`check_fd_span`), so touching it cannot raise SIGBUS.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "cannot map inflight region: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Arc::new(InflightRegion {
            base: p.cast(),
            len,
            num_queues,
            queue_size,
        }))
    }

    /// Queue size the region was made for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of queue `q`, or `None` if out of range or made for smaller queues.
    pub fn queue(self: &Arc<Self>, q: u16, size: u16) -> Option<InflightQueue> {
        if q >= self.num_queues || size > self.queue_size {
            return None;
        }
        // SAFETY: `q < num_queues`, so the queue's stride lies inside the mapping.
        let base = unsafe { self.base.add(q as usize * queue_stride(self.queue_size)) };
        Some(InflightQueue {
            _region: self.clone(),
            base,
            size,
            counter: 0,
        })
    }
}

/// One queue's inflight state.
pub struct InflightQueue {
    _region: Arc<InflightRegion>,
    base: *mut u8,
    size: u16,
    counter: u64,
}

// SAFETY: see `InflightRegion`; one queue's slice has one user.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn entry(&self, head: u16) -> *mut u8 {
        debug_assert!(head < self.size);
        // SAFETY: `head < size <= queue_size`, inside this queue's stride.
        unsafe { self.base.add(HDR + ENTRY * head as usize) }
    }

    fn hdr16(&self, off: usize) -> *mut u16 {
        // SAFETY: offsets 8..16 of the header.
        unsafe { self.base.add(off).cast() }
    }

    /// Prepares the region at queue start; returns the heads to resubmit, oldest first, given
    /// the guest's current `used.idx`.
    pub fn recover(&mut self, guest_used_idx: u16) -> Vec<u16> {
        // SAFETY: every access below is to the header or an entry `< size` of this queue's
        // slice, which lies inside the mapping kept alive by `_region`.
        unsafe {
            let desc_num = self.hdr16(10);
            if std::ptr::read_volatile(desc_num) == 0 {
                // A fresh region: stamp version and size.
                std::ptr::write_volatile(self.hdr16(8), 1);
                std::ptr::write_volatile(desc_num, self.size);
                std::ptr::write_volatile(self.hdr16(14), guest_used_idx);
                return Vec::new();
            }
            let used_idx = std::ptr::read_volatile(self.hdr16(14));
            if used_idx != guest_used_idx {
                let last = std::ptr::read_volatile(self.hdr16(12));
                if last < self.size {
                    std::ptr::write_volatile(self.entry(last), 0);
                }
                std::ptr::write_volatile(self.hdr16(14), guest_used_idx);
            }
            let mut heads: Vec<(u64, u16)> = Vec::new();
            for h in 0..self.size {
                let e = self.entry(h);
                if std::ptr::read_volatile(e) == 1 {
                    heads.push((std::ptr::read_volatile(e.add(8).cast::<u64>()), h));
                }
                self.counter = self
                    .counter
                    .max(std::ptr::read_volatile(e.add(8).cast::<u64>()));
            }
            heads.sort_unstable();
            heads.into_iter().map(|(_, h)| h).collect()
        }
    }

    /// Marks `head` as taken (before its request is submitted).
    #[inline]
    pub fn mark(&mut self, head: u16) {
        self.counter += 1;
        let e = self.entry(head);
        // SAFETY: the entry lies inside this queue's slice.
        unsafe {
            std::ptr::write_volatile(e.add(8).cast::<u64>(), self.counter);
            std::ptr::write_volatile(e, 1);
        }
    }

    /// Step 1 of completing `head`: record it as the batch in progress.
    #[inline]
    pub fn begin_complete(&mut self, head: u16) {
        // SAFETY: header field inside this queue's slice.
        unsafe { std::ptr::write_volatile(self.hdr16(12), head) };
    }

    /// Step 3 of completing `head` (after the used ring is published).
    #[inline]
    pub fn end_complete(&mut self, head: u16, used_idx: u16) {
        // SAFETY: the entry and header lie inside this queue's slice.
        unsafe {
            std::ptr::write_volatile(self.entry(head), 0);
            std::ptr::write_volatile(self.hdr16(14), used_idx);
        }
    }
}

/// Creates a zeroed region for `num_queues` queues of `queue_size` (answer to
/// `GET_INFLIGHT_FD`): the descriptor and its size.
pub fn create(num_queues: u16, queue_size: u16) -> std::io::Result<(OwnedFd, u64)> {
    let size = (queue_stride(queue_size) * num_queues as usize).div_ceil(4096) * 4096;
    let fd = crate::memory::memfd("ferroblk-inflight", size as u64)?;
    Ok((fd, size as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resubmits_marked_heads_in_order_and_fixes_a_torn_completion() {
        let (fd, size) = create(2, 8).unwrap();
        let r = InflightRegion::map(&fd, 0, size, 2, 8).unwrap();
        let mut q = r.queue(1, 8).unwrap();
        assert!(q.recover(0).is_empty());
        q.mark(5);
        q.mark(2);
        q.mark(7);
        // 5 completes fully.
        q.begin_complete(5);
        q.end_complete(5, 1);
        // 2 is published (guest used.idx = 2) but the process dies before clearing it.
        q.begin_complete(2);
        drop(q);
        // The successor maps the same memory.
        let r2 = InflightRegion::map(&fd, 0, size, 2, 8).unwrap();
        let mut q2 = r2.queue(1, 8).unwrap();
        assert_eq!(q2.recover(2), vec![7]);
        q2.mark(3);
        // 3 is newer than 7.
        let mut q3 = r2.queue(1, 8).unwrap();
        assert_eq!(q3.recover(2), vec![7, 3]);
        // Queue 0 is untouched.
        assert!(r2.queue(0, 8).unwrap().recover(0).is_empty());
        assert!(r2.queue(2, 8).is_none());
        assert!(r2.queue(0, 16).is_none());
    }

    #[test]
    fn short_regions_are_refused() {
        let (fd, _) = create(1, 8).unwrap();
        assert!(InflightRegion::map(&fd, 0, 64, 1, 128).is_err());
        assert!(InflightRegion::map(&fd, 1, 4096, 1, 8).is_err());
    }

    #[test]
    fn regions_past_the_end_of_their_file_are_refused() {
        // The front-end claims 64 KiB of a one-page memfd: touching the mapping past the first
        // page would raise SIGBUS.
        let fd = crate::memory::memfd("short-inflight", 4096).unwrap();
        let e = InflightRegion::map(&fd, 0, 64 << 10, 2, 1024)
            .err()
            .unwrap();
        assert!(e.contains("past the end"), "{e}");
        // The offset counts too.
        let (fd, size) = create(1, 8).unwrap();
        assert!(InflightRegion::map(&fd, 4096, size, 1, 8).is_err());
        assert!(InflightRegion::map(&fd, !4095, size, 1, 8).is_err());
        assert!(InflightRegion::map(&fd, 0, size, 1, 8).is_ok());
    }
}
