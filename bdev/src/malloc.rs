//! `malloc`: a RAM bdev. Its memory is one anonymous mapping reserved at the largest size the
//! bdev may grow to (untouched pages cost nothing), so a resize never moves data under the
//! reactors' channels.

use std::sync::Arc;

use crate::bdev::{Bdev, BdevInfo, Channel, ChannelOps, IoCompletion, IoRequest, Wake};
use crate::error::BdevError;
use crate::types::{BlockSize, Caps, IoStatus, IoType};

/// Requests a channel of an in-memory bdev lets in flight.
pub const MEM_CHANNEL_DEPTH: usize = 4096;

struct Region {
    base: *mut u8,
    reserved: usize,
}

// SAFETY: the mapping is plain bytes without invariants. Channels on different reactors access it
// concurrently through raw pointers only; concurrent overlapping requests give unspecified data
// (as on a disk) and never touch memory outside the mapping (the layer checks ranges).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base..base+reserved` is the mapping made in `MallocBdev::new`; every channel
        // holds an `Arc` to the bdev, so none is alive here.
        unsafe { libc::munmap(self.base.cast(), self.reserved) };
    }
}

/// A RAM bdev.
pub struct MallocBdev {
    info: Arc<BdevInfo>,
    region: Arc<Region>,
}

impl MallocBdev {
    /// A zero-filled RAM bdev of `block_count` blocks that can grow to `max_blocks`.
    pub fn new(
        name: &str,
        block_size: BlockSize,
        block_count: u64,
        max_blocks: u64,
    ) -> Result<MallocBdev, BdevError> {
        if block_count == 0 {
            return Err(BdevError::invalid("size", "must be at least one block"));
        }
        let max_blocks = max_blocks.max(block_count);
        let reserved = usize::try_from(block_size.to_bytes(max_blocks))
            .map_err(|_| BdevError::invalid("size", "too large"))?;
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(BdevError::Io {
                op: "map memory for",
                path: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let caps = Caps::ALL_IO | Caps::RETAINS_DATA | Caps::UNMAP_READS_ZEROES;
        Ok(MallocBdev {
            info: BdevInfo::builder(name, "malloc", block_size, block_count, caps)
                .max_transfer_blocks(u32::MAX >> block_size.shift())
                .max_segments(u32::MAX)
                .build(),
            region: Arc::new(Region {
                base: base.cast(),
                reserved,
            }),
        })
    }

    /// Bytes reserved for growth.
    pub fn reserved_bytes(&self) -> usize {
        self.region.reserved
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let ops = MallocChannel {
            region: self.region.clone(),
            shift: self.info.block_size().shift(),
            done: Vec::with_capacity(MEM_CHANNEL_DEPTH),
        };
        Ok(Channel::new(
            self.info.clone(),
            Box::new(ops),
            MEM_CHANNEL_DEPTH,
        ))
    }

    fn resize(&self, new_blocks: u64) -> Result<(), BdevError> {
        let bytes = self.info.block_size().to_bytes(new_blocks);
        if new_blocks == 0 || bytes > self.region.reserved as u64 {
            return Err(BdevError::invalid(
                "size",
                format!(
                    "a malloc bdev resizes between 1 block and its max_size ({} bytes)",
                    self.region.reserved
                ),
            ));
        }
        let old = self.info.block_count();
        if new_blocks < old {
            // Shrinking frees the tail; growing again later shows zeroes there, like a new disk.
            let from = bytes as usize;
            let len = self.info.block_size().to_bytes(old) as usize - from;
            // SAFETY: the range lies inside the mapping; MADV_DONTNEED on a private anonymous
            // mapping only replaces its pages with zero pages.
            unsafe { libc::madvise(self.region.base.add(from).cast(), len, libc::MADV_DONTNEED) };
        }
        self.info.set_block_count(new_blocks);
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "max_size": self.region.reserved })
    }
}

struct MallocChannel {
    region: Arc<Region>,
    shift: u32,
    done: Vec<IoCompletion>,
}

impl ChannelOps for MallocChannel {
    fn submit(&mut self, mut io: IoRequest) -> Result<(), IoRequest> {
        let off = (io.offset_blocks << self.shift) as usize;
        let len = (u64::from(io.num_blocks) << self.shift) as usize;
        let base = self.region.base;
        // The layer checked `off + len` against the block count, which never exceeds the
        // reserved mapping, and that the buffers hold exactly `len` bytes.
        match io.io_type {
            // SAFETY: `base + off .. + len` lies inside the mapping (see above).
            IoType::Read => unsafe { io.bufs.copy_from_raw(base.add(off), len) },
            // SAFETY: as above.
            IoType::Write => unsafe { io.bufs.copy_to_raw(base.add(off), len) },
            // SAFETY: as above.
            IoType::Unmap | IoType::WriteZeroes => unsafe {
                std::ptr::write_bytes(base.add(off), 0, len)
            },
            IoType::Flush => {}
        }
        self.done.push(io.complete(IoStatus::Success));
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        // Completions are in submission order: one bulk move keeps it.
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }

    fn wake(&self) -> Wake {
        if self.done.is_empty() {
            Wake::Event
        } else {
            Wake::Immediate
        }
    }
}

/// `null`: accepts every request and completes it at once without touching data (reads leave
/// the buffers as they are). For benchmarks of the layers above.
pub struct NullBdev {
    info: Arc<BdevInfo>,
}

impl NullBdev {
    /// A null bdev of `block_count` blocks.
    pub fn new(name: &str, block_size: BlockSize, block_count: u64) -> Result<NullBdev, BdevError> {
        if block_count == 0 {
            return Err(BdevError::invalid("size", "must be at least one block"));
        }
        Ok(NullBdev {
            info: BdevInfo::builder(name, "null", block_size, block_count, Caps::ALL_IO)
                .max_transfer_blocks(u32::MAX >> block_size.shift())
                .max_segments(u32::MAX)
                .build(),
        })
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let ops = NullChannel {
            done: Vec::with_capacity(MEM_CHANNEL_DEPTH),
        };
        Ok(Channel::new(
            self.info.clone(),
            Box::new(ops),
            MEM_CHANNEL_DEPTH,
        ))
    }

    fn resize(&self, new_blocks: u64) -> Result<(), BdevError> {
        if new_blocks == 0 {
            return Err(BdevError::invalid("size", "must be at least one block"));
        }
        self.info.set_block_count(new_blocks);
        Ok(())
    }
}

struct NullChannel {
    done: Vec<IoCompletion>,
}

impl ChannelOps for NullChannel {
    #[inline]
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        self.done.push(io.complete(IoStatus::Success));
        Ok(())
    }

    #[inline]
    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        // Completions are in submission order: one bulk move keeps it.
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }

    fn wake(&self) -> Wake {
        if self.done.is_empty() {
            Wake::Event
        } else {
            Wake::Immediate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::sync::SyncChannel;

    #[test]
    fn malloc_passes_conformance_4k_and_512() {
        conformance::run(
            &|| Arc::new(MallocBdev::new("m4k", BlockSize::B4096, 1024, 4096).unwrap()),
            false,
        );
        conformance::run(
            &|| Arc::new(MallocBdev::new("m512", BlockSize::B512, 4096, 4096).unwrap()),
            false,
        );
    }

    #[test]
    fn null_passes_conformance() {
        conformance::run(
            &|| Arc::new(NullBdev::new("n", BlockSize::B4096, 1 << 20).unwrap()),
            false,
        );
    }

    #[test]
    fn malloc_resize_grows_with_zeroes_and_notifies() {
        let m = Arc::new(MallocBdev::new("m", BlockSize::B4096, 16, 64).unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        m.info().subscribe(move |ev| s2.lock().unwrap().push(*ev));
        let mut ch = SyncChannel::new(m.open_channel().unwrap());
        assert_eq!(ch.read(16, 1).0, IoStatus::InvalidRange);
        m.resize(32).unwrap();
        let (st, data) = ch.read(31, 1);
        assert_eq!(st, IoStatus::Success);
        assert!(data.iter().all(|&b| b == 0));
        assert!(m.resize(65).is_err(), "beyond max_size");
        assert_eq!(
            seen.lock().unwrap()[0],
            crate::BdevEvent::Resized {
                old_blocks: 16,
                new_blocks: 32
            }
        );
    }
}
