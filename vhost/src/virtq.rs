//! The split virtqueue (virtio 1.2 §2.7), device side, hardened against a hostile driver.
//!
//! Each field of guest memory is read once with a volatile access and validated before use:
//! descriptor indices, chain length (a loop cannot run forever), indirect tables (virtio 1.2
//! §2.7.5.3: no nesting, no NEXT with INDIRECT, length a multiple of 16), and every buffer
//! address and length against the guest memory map.

use std::sync::atomic::{Ordering, fence};

use crate::memory::GuestMemory;
use crate::spec::{
    AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE_SIZE,
};

/// One buffer of a descriptor chain, translated to host memory.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Host address, or null if the guest address was outside its memory.
    pub host: *mut u8,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A fault that makes the whole queue unusable (the device needs a reset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// A ring address or size is invalid.
    #[error("invalid ring layout: {0}")]
    Layout(String),
    /// The driver broke the ring protocol.
    #[error("driver error: {0}")]
    Driver(String),
}

/// Guest addresses of the three rings, as front-end virtual addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// The device's view of one split virtqueue.
pub struct SplitQueue {
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    /// Next available-ring entry to take (set with [`SplitQueue::set_last_avail`]).
    last_avail: u16,
    /// Our copy of `used.idx`.
    pub used_idx: u16,
    signalled_used: u16,
    signalled_valid: bool,
    /// `avail.idx` as last read: entries up to it are taken without touching the (contended)
    /// index line again.
    avail_cache: u16,
    /// Used entries written but not yet published in `used.idx`.
    unpublished: bool,
    event_idx: bool,
    indirect: bool,
}

// SAFETY: the pointers address guest memory that the owner keeps mapped (an `Arc<GuestMemory>`
// held beside the queue); the queue itself is used by one thread at a time.
unsafe impl Send for SplitQueue {}

/// Reads a little-endian `u16` of guest memory with one volatile access.
///
/// # Safety
/// `p` must be valid for a 2-byte read and 2-byte aligned: an address inside a ring area or
/// descriptor table that [`SplitQueue::new`] or [`GuestMemory`] translation validated, kept
/// mapped by the queue's owner.
#[inline]
unsafe fn rd16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees `p` is valid and aligned for a 2-byte read.
    u16::from_le(unsafe { std::ptr::read_volatile(p.cast::<u16>()) })
}

/// Reads a little-endian `u32` of guest memory with one volatile access.
///
/// # Safety
/// As for [`rd16`], for a 4-byte read.
#[inline]
unsafe fn rd32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees `p` is valid and aligned for a 4-byte read.
    u32::from_le(unsafe { std::ptr::read_volatile(p.cast::<u32>()) })
}

/// Reads a little-endian `u64` of guest memory with one volatile access.
///
/// # Safety
/// As for [`rd16`], for an 8-byte read.
#[inline]
unsafe fn rd64(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees `p` is valid and aligned for an 8-byte read.
    u64::from_le(unsafe { std::ptr::read_volatile(p.cast::<u64>()) })
}

/// Writes a little-endian `u16` to guest memory with one volatile access.
///
/// # Safety
/// `p` must be valid for a 2-byte write and 2-byte aligned, inside a validated ring area.
#[inline]
unsafe fn wr16(p: *mut u8, v: u16) {
    // SAFETY: the caller guarantees `p` is valid and aligned for a 2-byte write.
    unsafe { std::ptr::write_volatile(p.cast::<u16>(), v.to_le()) }
}

/// Writes a little-endian `u32` to guest memory with one volatile access.
///
/// # Safety
/// As for [`wr16`], for a 4-byte write.
#[inline]
unsafe fn wr32(p: *mut u8, v: u32) {
    // SAFETY: the caller guarantees `p` is valid and aligned for a 4-byte write.
    unsafe { std::ptr::write_volatile(p.cast::<u32>(), v.to_le()) }
}

/// Hints the CPU to start loading the cache line at `p` (no fault for any address).
#[inline(always)]
pub(crate) fn prefetch_read(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Hints the CPU to load the cache line at `p` for writing (PREFETCHW where the CPU has it).
#[inline(always)]
pub(crate) fn prefetch_write(p: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(
            p.cast_const().cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Reads descriptor `i` of the table at `table`, each field once.
///
/// # Safety
/// `table` must be a 16-byte aligned descriptor table of more than `i` entries, validated
/// against guest memory ([`SplitQueue::new`] for the ring's table, [`GuestMemory::gpa_to_host`]
/// for an indirect one) and kept mapped by the queue's owner.
unsafe fn read_desc(table: *const u8, i: u16) -> RawDesc {
    // SAFETY: the caller guarantees entry `i` lies inside the table: its 16 bytes at
    // `16 * i` are valid and 8-byte aligned.
    unsafe {
        let p = table.add(16 * i as usize);
        RawDesc {
            addr: rd64(p),
            len: rd32(p.add(8)),
            flags: rd16(p.add(12)),
            next: rd16(p.add(14)),
        }
    }
}

impl SplitQueue {
    /// Validates the layout of a queue of `size` entries at `addrs` in `mem`.
    pub fn new(
        mem: &GuestMemory,
        size: u16,
        addrs: RingAddrs,
        event_idx: bool,
        indirect: bool,
    ) -> Result<SplitQueue, QueueError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(QueueError::Layout(format!("queue size {size}")));
        }
        let n = u64::from(size);
        let map = |a: u64, len: u64, align: u64, what: &str| {
            if !a.is_multiple_of(align) {
                return Err(QueueError::Layout(format!(
                    "{what} at {a:#x} is misaligned"
                )));
            }
            let host = mem.uva_to_host(a, len).ok_or_else(|| {
                QueueError::Layout(format!("{what} at {a:#x} is outside guest memory"))
            })?;
            // The ring words are read and written as aligned values: the address in the
            // daemon must be aligned too, not only the front-end's (a region whose mmap_offset
            // and user address disagree modulo the alignment would break that).
            if !(host as usize).is_multiple_of(align as usize) {
                return Err(QueueError::Layout(format!(
                    "{what} at {a:#x} maps to a misaligned address in the daemon"
                )));
            }
            Ok(host)
        };
        Ok(SplitQueue {
            size,
            desc: map(addrs.desc, 16 * n, 16, "descriptor table")?,
            avail: map(addrs.avail, 6 + 2 * n, 2, "available ring")?,
            used: map(addrs.used, 6 + 8 * n, 4, "used ring")?,
            last_avail: 0,
            used_idx: 0,
            signalled_used: 0,
            signalled_valid: false,
            avail_cache: 0,
            unpublished: false,
            event_idx,
            indirect,
        })
    }

    /// The next available-ring entry to take.
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// Moves the next entry to take (queue start, inflight recovery); forgets the cached
    /// `avail.idx` so the next pop reads the driver's index.
    pub fn set_last_avail(&mut self, v: u16) {
        self.last_avail = v;
        self.avail_cache = v;
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The driver's `avail.idx`.
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: offset 2 of the available ring, validated in `new`.
        let v = unsafe { rd16(self.avail.add(2)) };
        fence(Ordering::Acquire);
        v
    }

    /// The device's `used.idx` as stored in guest memory.
    pub fn guest_used_idx(&self) -> u16 {
        // SAFETY: offset 2 of the used ring, validated in `new`.
        unsafe { rd16(self.used.add(2)) }
    }

    /// Entries the driver made available and the device has not taken.
    #[inline]
    pub fn pending(&self) -> u16 {
        self.avail_idx().wrapping_sub(self.last_avail)
    }

    /// Takes the next available chain head, if any.
    #[inline]
    pub fn pop_head(&mut self) -> Result<Option<u16>, QueueError> {
        let mut avail = self.avail_cache;
        let mut pending = avail.wrapping_sub(self.last_avail);
        if pending == 0 || pending > self.size {
            // Nothing cached (or `last_avail` was moved): read the driver's index.
            avail = self.avail_idx();
            self.avail_cache = avail;
            pending = avail.wrapping_sub(self.last_avail);
        }
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::Driver(format!(
                "avail.idx {avail} is {pending} entries ahead of the device (queue size {})",
                self.size
            )));
        }
        let slot = self.last_avail % self.size;
        // SAFETY: entry `slot < size` of the available ring (offset 4 + 2 * slot).
        let head = unsafe { rd16(self.avail.add(4 + 2 * slot as usize)) };
        if head >= self.size {
            return Err(QueueError::Driver(format!(
                "chain head {head} out of range"
            )));
        }
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Takes up to `out.len()` available chain heads (as [`SplitQueue::pop_head`]) and starts
    /// loading each head's descriptor into the cache, so that walking the chains afterwards
    /// overlaps their cache misses instead of taking them one after another (the driver wrote
    /// these lines on another core). Returns how many heads were taken; on a ring error the
    /// heads taken before it are still returned through `out` with the error.
    #[inline]
    pub fn pop_heads(&mut self, out: &mut [u16]) -> (usize, Result<(), QueueError>) {
        let mut n = 0;
        while n < out.len() {
            match self.pop_head() {
                Ok(Some(h)) => {
                    // SAFETY: `h < size` (checked by `pop_head`): entry `h` of the descriptor
                    // table validated in `new`.
                    prefetch_read(unsafe { self.desc.add(16 * h as usize) });
                    out[n] = h;
                    n += 1;
                }
                Ok(None) => break,
                Err(e) => return (n, Err(e)),
            }
        }
        (n, Ok(()))
    }

    /// Starts loading what walking the chain at `head` will read next: the request header the
    /// head descriptor points at, and the next descriptor. Only a hint: nothing is validated
    /// beyond what keeps the addresses inside the rings and guest memory, and nothing is read
    /// but the head descriptor.
    #[inline]
    pub fn prefetch_chain(&self, mem: &GuestMemory, head: u16) {
        if head >= self.size {
            return;
        }
        // SAFETY: `head < size`: an entry of the descriptor table validated in `new`.
        let d = unsafe { read_desc(self.desc, head) };
        if d.flags & DESC_F_INDIRECT != 0 {
            if let Some(t) = mem.gpa_to_host(d.addr, 16) {
                prefetch_read(t);
            }
            return;
        }
        if let Some(h) = mem.gpa_to_host(d.addr, 1) {
            prefetch_read(h);
        }
        if d.flags & DESC_F_NEXT != 0 && d.next < self.size {
            // SAFETY: `d.next < size`: inside the descriptor table.
            prefetch_read(unsafe { self.desc.add(16 * d.next as usize) });
        }
    }

    /// Starts loading, for writing, the used-ring entries of the next `n` completions.
    #[inline]
    pub fn prefetch_used(&self, n: u16) {
        for k in 0..n.min(self.size) {
            let slot = (self.used_idx.wrapping_add(k) % self.size) as usize;
            // SAFETY: entry `slot < size` of the used ring, validated in `new`.
            let e = unsafe { self.used.add(4 + 8 * slot) };
            // The first entry's line, then each line an entry starts (entries are 8 bytes at
            // offset 4 of the ring, so a line boundary falls inside one: its second half is
            // on the next line and covered by the following entry's check).
            if k == 0 || (e as usize) % 64 < 8 {
                prefetch_write(e);
            }
        }
    }

    /// Walks the chain starting at `head` into `out` (cleared first).
    pub fn read_chain(
        &self,
        mem: &GuestMemory,
        head: u16,
        out: &mut Vec<Buf>,
    ) -> Result<(), QueueError> {
        out.clear();
        let mut table = self.desc as *const u8;
        let mut table_len = self.size;
        let mut i = head;
        let mut in_indirect = false;
        let mut budget = u32::from(self.size);
        loop {
            if i >= table_len {
                return Err(QueueError::Driver(format!(
                    "descriptor index {i} out of range"
                )));
            }
            if budget == 0 {
                return Err(QueueError::Driver("descriptor chain loops".into()));
            }
            budget -= 1;
            // SAFETY: `i < table_len`: the ring's table validated in `new`, or an indirect
            // table translated with its whole length and checked 16-byte aligned on entry.
            let d = unsafe { read_desc(table, i) };
            if d.flags & DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::Driver(
                        "indirect descriptor not negotiated".into(),
                    ));
                }
                if in_indirect {
                    return Err(QueueError::Driver("nested indirect table".into()));
                }
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(QueueError::Driver("indirect descriptor with NEXT".into()));
                }
                if d.len == 0 || !d.len.is_multiple_of(16) || d.len / 16 > u32::from(MAX_QUEUE_SIZE)
                {
                    return Err(QueueError::Driver(format!(
                        "indirect table of {} bytes",
                        d.len
                    )));
                }
                let t = mem.gpa_to_host(d.addr, u64::from(d.len)).ok_or_else(|| {
                    QueueError::Driver("indirect table outside guest memory".into())
                })?;
                if !(t as usize).is_multiple_of(16) {
                    // Descriptor tables are 16-byte aligned (virtio 1.2 §2.7); the fields are
                    // read as aligned words.
                    return Err(QueueError::Driver("misaligned indirect table".into()));
                }
                table = t;
                table_len = (d.len / 16) as u16;
                budget = u32::from(table_len);
                in_indirect = true;
                i = 0;
                continue;
            }
            let host = mem
                .gpa_to_host(d.addr, u64::from(d.len))
                .unwrap_or(std::ptr::null_mut());
            out.push(Buf {
                host,
                len: d.len,
                write: d.flags & DESC_F_WRITE != 0,
            });
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            i = d.next;
        }
    }

    /// Puts `head` on the used ring with `len` bytes written, and publishes it.
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        self.push_used_deferred(head, len);
        self.publish_used();
    }

    /// Writes the used entry for `head` without publishing it: a batch of completions is made
    /// visible with one [`SplitQueue::publish_used`] (one index update for the driver to read).
    #[inline]
    pub fn push_used_deferred(&mut self, head: u16, len: u32) {
        let slot = (self.used_idx % self.size) as usize;
        // SAFETY: entry `slot < size` of the used ring (offset 4 + 8 * slot), validated in `new`.
        unsafe {
            wr32(self.used.add(4 + 8 * slot), u32::from(head));
            wr32(self.used.add(8 + 8 * slot), len);
        }
        self.used_idx = self.used_idx.wrapping_add(1);
        self.unpublished = true;
    }

    /// Publishes the used entries written so far (`used.idx`, after a release fence).
    #[inline]
    pub fn publish_used(&mut self) {
        if self.unpublished {
            self.unpublished = false;
            fence(Ordering::Release);
            // SAFETY: offset 2 of the used ring.
            unsafe { wr16(self.used.add(2), self.used_idx) };
        }
    }

    /// Whether the driver wants an interrupt for what was published since the last one
    /// (virtio 1.2 §2.7.10: `used_event` with EVENT_IDX, `VIRTQ_AVAIL_F_NO_INTERRUPT` without).
    pub fn needs_notification(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let new = self.used_idx;
        if self.event_idx {
            let old = self.signalled_used;
            let valid = self.signalled_valid;
            self.signalled_used = new;
            self.signalled_valid = true;
            if !valid {
                return true;
            }
            // SAFETY: `used_event` follows the available ring's entries (offset 4 + 2 * size),
            // inside the area validated in `new`.
            let used_event = unsafe { rd16(self.avail.add(4 + 2 * self.size as usize)) };
            new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: offset 0 of the available ring.
            let flags = unsafe { rd16(self.avail) };
            flags & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver to kick for the next entry after what was taken (EVENT_IDX
    /// `avail_event`, else clearing `VIRTQ_USED_F_NO_NOTIFY`); then re-checks so an entry added
    /// meanwhile is not missed. Returns whether entries are pending.
    pub fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            // SAFETY: `avail_event` follows the used ring's entries (offset 4 + 8 * size).
            unsafe { wr16(self.used.add(4 + 8 * self.size as usize), self.last_avail) };
        } else {
            // SAFETY: offset 0 of the used ring (flags).
            unsafe { wr16(self.used, 0) };
        }
        fence(Ordering::SeqCst);
        self.pending() != 0
    }

    /// Tells the driver not to kick while the device polls the ring: `VIRTQ_USED_F_NO_NOTIFY`,
    /// or with EVENT_IDX an `avail_event` the driver has already passed (it kicks again only
    /// after a full wrap of the 16-bit index).
    pub fn disable_notification(&mut self) {
        if self.event_idx {
            // SAFETY: as in `enable_notification`.
            unsafe {
                wr16(
                    self.used.add(4 + 8 * self.size as usize),
                    self.last_avail.wrapping_sub(1),
                )
            };
        } else {
            // SAFETY: offset 0 of the used ring (flags).
            unsafe { wr16(self.used, 1) };
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A driver-side model of a split ring in a memfd, for tests of the device side.
    use super::*;
    use crate::memory::{RegionDesc, memfd};

    /// Guest memory of 1 MiB with a queue at fixed addresses; gpa == uva for simplicity.
    pub struct Driver {
        /// The mapped memory.
        pub mem: std::sync::Arc<GuestMemory>,
        /// The memfd behind it (for tests that hand it to a device over the socket).
        pub fd: std::os::fd::OwnedFd,
        /// Ring addresses.
        pub addrs: RingAddrs,
        /// Queue size.
        pub size: u16,
        avail_idx: u16,
        /// Next free data address.
        pub heap: u64,
    }

    /// Base guest address of the test memory.
    pub const BASE: u64 = 0x10_0000;
    /// Size of the test memory.
    pub const MEM: u64 = 4 << 20;

    impl Driver {
        /// A queue of `size` entries.
        pub fn new(size: u16) -> Driver {
            let fd = memfd("guest", MEM).unwrap();
            let d = RegionDesc {
                guest_phys_addr: BASE,
                memory_size: MEM,
                user_addr: BASE,
                mmap_offset: 0,
            };
            let fds = [fd];
            let mem = std::sync::Arc::new(GuestMemory::new(&[d], &fds).unwrap());
            let [fd] = fds;
            let n = u64::from(size);
            let addrs = RingAddrs {
                desc: BASE,
                avail: BASE + 16 * n,
                used: (BASE + 16 * n + 6 + 2 * n + 4095) & !4095,
            };
            Driver {
                mem,
                fd,
                addrs,
                size,
                avail_idx: 0,
                heap: BASE + (1 << 20),
            }
        }

        /// Host pointer of a guest address.
        pub fn host(&self, gpa: u64, len: u64) -> *mut u8 {
            self.mem.gpa_to_host(gpa, len).expect("inside test memory")
        }

        /// Writes bytes at a guest address.
        pub fn write(&self, gpa: u64, data: &[u8]) {
            // SAFETY: test memory, bounds checked by `host`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    self.host(gpa, data.len() as u64),
                    data.len(),
                )
            }
        }

        /// Reads bytes at a guest address.
        pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            // SAFETY: test memory, bounds checked by `host`.
            unsafe {
                std::ptr::copy_nonoverlapping(self.host(gpa, len as u64), v.as_mut_ptr(), len)
            };
            v
        }

        /// Allocates `len` bytes of guest memory (16-byte aligned).
        pub fn alloc(&mut self, len: u64) -> u64 {
            let a = self.heap;
            self.heap = (self.heap + len + 15) & !15;
            assert!(self.heap < BASE + MEM, "test memory exhausted");
            a
        }

        /// Writes descriptor `i` of a table at `table`.
        pub fn set_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            e[12..14].copy_from_slice(&flags.to_le_bytes());
            e[14..16].copy_from_slice(&next.to_le_bytes());
            self.write(table + 16 * u64::from(i), &e);
        }

        /// Makes chain `head` available.
        pub fn publish(&mut self, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            self.write(self.addrs.avail + 4 + 2 * slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
            fence(Ordering::Release);
            self.write(self.addrs.avail + 2, &self.avail_idx.to_le_bytes());
        }

        /// Sets `avail.idx` directly (to misbehave).
        pub fn set_avail_idx(&mut self, v: u16) {
            self.avail_idx = v;
            self.write(self.addrs.avail + 2, &v.to_le_bytes());
        }

        /// The used ring's index and entry `i`.
        pub fn used(&self, i: u16) -> (u16, u32, u32) {
            let idx = u16::from_le_bytes(self.read(self.addrs.used + 2, 2).try_into().unwrap());
            let e = self.read(self.addrs.used + 4 + 8 * u64::from(i % self.size), 8);
            (
                idx,
                u32::from_le_bytes(e[0..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..8].try_into().unwrap()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn queue(d: &Driver) -> SplitQueue {
        SplitQueue::new(&d.mem, d.size, d.addrs, true, true).unwrap()
    }

    #[test]
    fn chains_walk_direct_and_indirect() {
        let mut d = Driver::new(8);
        let a = d.alloc(64);
        d.set_desc(d.addrs.desc, 0, a, 16, DESC_F_NEXT, 3);
        d.set_desc(d.addrs.desc, 3, a + 16, 1, DESC_F_WRITE, 0);
        d.publish(0);
        let t = d.alloc(32);
        d.set_desc(t, 0, a, 16, DESC_F_NEXT, 1);
        d.set_desc(t, 1, a + 32, 8, DESC_F_WRITE, 0);
        d.set_desc(d.addrs.desc, 1, t, 32, DESC_F_INDIRECT, 0);
        d.publish(1);
        let mut q = queue(&d);
        let mut out = Vec::new();
        let h = q.pop_head().unwrap().unwrap();
        q.read_chain(&d.mem, h, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(!out[0].write && out[1].write && out[1].len == 1);
        let h = q.pop_head().unwrap().unwrap();
        q.read_chain(&d.mem, h, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].len, 8);
        assert_eq!(q.pop_head().unwrap(), None);
        q.push_used(h, 9);
        assert_eq!(d.used(0), (1, 1, 9));
    }

    #[test]
    fn hostile_chains_are_driver_errors() {
        let mut d = Driver::new(8);
        let a = d.alloc(64);
        let q = queue(&d);
        let mut out = Vec::new();
        // A loop.
        d.set_desc(d.addrs.desc, 0, a, 16, DESC_F_NEXT, 1);
        d.set_desc(d.addrs.desc, 1, a, 16, DESC_F_NEXT, 0);
        assert!(q.read_chain(&d.mem, 0, &mut out).is_err());
        // A next index out of range.
        d.set_desc(d.addrs.desc, 2, a, 16, DESC_F_NEXT, 99);
        assert!(q.read_chain(&d.mem, 2, &mut out).is_err());
        // Indirect with NEXT, nested indirect, bad length, outside memory.
        let t = d.alloc(32);
        d.set_desc(d.addrs.desc, 3, t, 32, DESC_F_INDIRECT | DESC_F_NEXT, 4);
        assert!(q.read_chain(&d.mem, 3, &mut out).is_err());
        d.set_desc(t, 0, t, 32, DESC_F_INDIRECT, 0);
        d.set_desc(d.addrs.desc, 3, t, 32, DESC_F_INDIRECT, 0);
        assert!(q.read_chain(&d.mem, 3, &mut out).is_err());
        d.set_desc(d.addrs.desc, 3, t, 24, DESC_F_INDIRECT, 0);
        assert!(q.read_chain(&d.mem, 3, &mut out).is_err());
        d.set_desc(d.addrs.desc, 3, 0xdead_0000_0000, 32, DESC_F_INDIRECT, 0);
        assert!(q.read_chain(&d.mem, 3, &mut out).is_err());
        // A loop inside an indirect table.
        d.set_desc(t, 0, a, 4, DESC_F_NEXT, 1);
        d.set_desc(t, 1, a, 4, DESC_F_NEXT, 0);
        d.set_desc(d.addrs.desc, 3, t, 32, DESC_F_INDIRECT, 0);
        assert!(q.read_chain(&d.mem, 3, &mut out).is_err());
        // Indirect not negotiated.
        let mut q2 = SplitQueue::new(&d.mem, 8, d.addrs, false, false).unwrap();
        d.set_desc(t, 0, a, 4, 0, 0);
        assert!(q2.read_chain(&d.mem, 3, &mut out).is_err());
        // A buffer outside memory is not a queue error: it is reported as a null host address.
        d.set_desc(d.addrs.desc, 5, 0xdead_0000_0000, 16, 0, 0);
        q.read_chain(&d.mem, 5, &mut out).unwrap();
        assert!(out[0].host.is_null());
        // A buffer whose length overflows the address space.
        d.set_desc(d.addrs.desc, 5, u64::MAX - 4, 16, 0, 0);
        q.read_chain(&d.mem, 5, &mut out).unwrap();
        assert!(out[0].host.is_null());
        // avail.idx far ahead of the device; head out of range.
        d.set_avail_idx(100);
        assert!(q2.pop_head().is_err());
        d.set_avail_idx(1);
        d.write(d.addrs.avail + 4, &77u16.to_le_bytes());
        assert!(q2.pop_head().is_err());
    }

    #[test]
    fn a_moved_last_avail_never_uses_a_stale_cached_index() {
        let mut d = Driver::new(8);
        let mut q = queue(&d);
        d.set_avail_idx(65535);
        q.set_last_avail(65535);
        assert_eq!(q.pending(), 0);
        assert_eq!(q.pop_head().unwrap(), None, "nothing was made available");
        d.set_desc(d.addrs.desc, 0, d.heap, 16, 0, 0);
        d.write(d.addrs.avail + 4 + 2 * (65535 % 8), &0u16.to_le_bytes());
        d.set_avail_idx(0);
        assert_eq!(q.pop_head().unwrap(), Some(0));
        assert_eq!(q.last_avail(), 0);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let d = Driver::new(8);
        assert!(SplitQueue::new(&d.mem, 6, d.addrs, false, false).is_err());
        assert!(SplitQueue::new(&d.mem, 0, d.addrs, false, false).is_err());
        let mut bad = d.addrs;
        bad.used = 0x1;
        assert!(SplitQueue::new(&d.mem, 8, bad, false, false).is_err());
        bad = d.addrs;
        bad.desc = BASE + MEM - 16;
        assert!(SplitQueue::new(&d.mem, 8, bad, false, false).is_err());
    }

    #[test]
    fn event_idx_suppresses_notifications() {
        let mut d = Driver::new(8);
        let mut q = queue(&d);
        q.push_used(0, 0);
        assert!(q.needs_notification(), "first completion always notifies");
        // used_event = 5: no interrupt until used.idx passes 5.
        d.write(d.addrs.avail + 4 + 2 * 8, &5u16.to_le_bytes());
        q.push_used(0, 0);
        assert!(!q.needs_notification());
        for _ in 0..4 {
            q.push_used(0, 0);
        }
        assert!(q.needs_notification());
        d.publish(0);
        assert!(q.enable_notification());
    }
}
