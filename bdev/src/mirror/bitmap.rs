//! The mirror's metadata on each child: where it lives, the superblock, and the dirty-region
//! bitmap shared (as atomics) by every channel.
//!
//! # On-disk layout (blocks of the children's block size `bs`)
//! ```text
//! blocks 0 .. D          data: block `lba` of the mirror is block `lba` of every child
//! block  D               superblock (below)
//! blocks D + 1 ..        dirty-region bitmap: bit `r` (word r / 64, bit r % 64, little-endian
//!                        u64 words) set = region r (`region_blocks` blocks) may differ between
//!                        the children; `ceil(regions / (bs * 8))` blocks
//! ```
//! `D` is the largest count for which data, superblock and bitmap fit the child. The data sits
//! at the same blocks on every child, so a child read alone holds the mirror's data.
//!
//! # Superblock (little-endian)
//! ```text
//! 0   magic "FBMIRROR"          8   version u32      12  block size u32
//! 16  data blocks D u64         24  region blocks u64
//! 32  mirror id u64 (random, chosen at format)
//! 40  generation u64 (bumped by every superblock write; the highest is the newest)
//! 48  this child's id u64
//! 56  member ids [u64; MAX_CHILDREN] (0 = free slot)
//! 120 member states [u8; MAX_CHILDREN]: 0 in sync, 1 stale (resync the dirty regions),
//!     2 needs a full rebuild
//! 128 CRC32C of bytes 0 .. 128
//! ```
//! A child is written a superblock only while it takes writes, so a child that went away keeps
//! an older generation; at open the child with the highest generation says which members are
//! stale, and its bitmap which regions they miss.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::checksum::crc32c;
use crate::types::BlockSize;

/// Most children of one mirror.
pub const MAX_CHILDREN: usize = 8;
/// First bytes of a mirror superblock.
pub const MAGIC: &[u8; 8] = b"FBMIRROR";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
const SUM_AT: usize = 128;

/// Where the data, superblock and bitmap are on a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Data blocks: the mirror's size.
    pub data_blocks: u64,
    /// Blocks per region (a power of two).
    pub region_blocks: u64,
    /// The superblock's block; the bitmap follows it.
    pub sb_block: u64,
    /// Bitmap blocks.
    pub bitmap_blocks: u64,
    /// Regions (bits of the bitmap in use).
    pub regions: u64,
}

impl Layout {
    /// The layout of `d` data blocks in regions of `region_blocks`.
    pub fn with_data_blocks(bs: BlockSize, region_blocks: u64, d: u64) -> Layout {
        let regions = d.div_ceil(region_blocks);
        Layout {
            data_blocks: d,
            region_blocks,
            sb_block: d,
            bitmap_blocks: regions.div_ceil(u64::from(bs.bytes()) * 8),
            regions,
        }
    }

    /// The largest layout that fits a child of `child_blocks`, if any data block fits.
    pub fn for_child(bs: BlockSize, region_blocks: u64, child_blocks: u64) -> Option<Layout> {
        let bits_per_block = u64::from(bs.bytes()) * 8;
        let meta = |d: u64| 1 + d.div_ceil(region_blocks).div_ceil(bits_per_block);
        let mut d = child_blocks.checked_sub(meta(child_blocks))?;
        while d > 0 && d + meta(d) > child_blocks {
            d -= 1;
        }
        (d > 0).then(|| Layout::with_data_blocks(bs, region_blocks, d))
    }

    /// Child blocks the layout uses.
    pub fn child_blocks(&self) -> u64 {
        self.sb_block + 1 + self.bitmap_blocks
    }

    /// Regions `first .. first + count` that blocks `lba .. lba + n` touch.
    pub fn region_span(&self, lba: u64, n: u64) -> (u64, u64) {
        let shift = self.region_blocks.trailing_zeros();
        let first = lba >> shift;
        let last = (lba + n.max(1) - 1) >> shift;
        (first, last - first + 1)
    }

    /// Bitmap blocks (relative to the bitmap's first block) holding regions `first ..
    /// first + count`.
    pub fn bitmap_span(&self, bs: BlockSize, first: u64, count: u64) -> (u64, u64) {
        let bits = u64::from(bs.bytes()) * 8;
        let b0 = first / bits;
        let b1 = (first + count - 1) / bits;
        (b0, b1 - b0 + 1)
    }
}

/// What a superblock says of one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MemberState {
    /// Holds every acknowledged write.
    InSync = 0,
    /// Missed writes to the regions marked in the bitmap.
    Stale = 1,
    /// Holds nothing usable (new, or it lost a flush): rebuilt whole.
    Full = 2,
}

/// One child's superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Block size of the children.
    pub block_size: u32,
    /// Data blocks.
    pub data_blocks: u64,
    /// Blocks per region.
    pub region_blocks: u64,
    /// The mirror's id.
    pub mirror_id: u64,
    /// Bumped by every write of the superblocks.
    pub generation: u64,
    /// The id of the child this superblock is on.
    pub self_id: u64,
    /// Member ids by slot (0: free).
    pub ids: [u64; MAX_CHILDREN],
    /// Member states by slot.
    pub states: [MemberState; MAX_CHILDREN],
}

impl Superblock {
    /// Writes the superblock into `out` (one block; the rest is zeroed).
    pub fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.data_blocks.to_le_bytes());
        out[24..32].copy_from_slice(&self.region_blocks.to_le_bytes());
        out[32..40].copy_from_slice(&self.mirror_id.to_le_bytes());
        out[40..48].copy_from_slice(&self.generation.to_le_bytes());
        out[48..56].copy_from_slice(&self.self_id.to_le_bytes());
        for i in 0..MAX_CHILDREN {
            out[56 + 8 * i..64 + 8 * i].copy_from_slice(&self.ids[i].to_le_bytes());
            out[120 + i] = self.states[i] as u8;
        }
        let sum = crc32c(&out[..SUM_AT]);
        out[SUM_AT..SUM_AT + 4].copy_from_slice(&sum.to_le_bytes());
    }

    /// Reads a superblock: `Ok(None)` for a block without the magic, an error for a damaged
    /// or foreign-version one.
    pub fn decode(b: &[u8]) -> Result<Option<Superblock>, String> {
        if b.len() < SUM_AT + 4 || &b[0..8] != MAGIC {
            return Ok(None);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if crc32c(&b[..SUM_AT]) != u32_at(SUM_AT) {
            return Err("the mirror superblock is corrupted (CRC mismatch)".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!(
                "mirror format version {} is not supported (this build reads {VERSION})",
                u32_at(8)
            ));
        }
        let mut ids = [0; MAX_CHILDREN];
        let mut states = [MemberState::InSync; MAX_CHILDREN];
        for i in 0..MAX_CHILDREN {
            ids[i] = u64_at(56 + 8 * i);
            states[i] = match b[120 + i] {
                0 => MemberState::InSync,
                1 => MemberState::Stale,
                _ => MemberState::Full,
            };
        }
        Ok(Some(Superblock {
            block_size: u32_at(12),
            data_blocks: u64_at(16),
            region_blocks: u64_at(24),
            mirror_id: u64_at(32),
            generation: u64_at(40),
            self_id: u64_at(48),
            ids,
            states,
        }))
    }
}

/// A bitmap of regions as atomic words, shared by every channel.
pub struct Bitmap {
    words: Box<[AtomicU64]>,
}

impl Bitmap {
    /// `bits` clear bits (rounded up to whole bitmap blocks of `bs`).
    pub fn new(bs: BlockSize, bitmap_blocks: u64) -> Bitmap {
        let words = bitmap_blocks as usize * bs.bytes() as usize / 8;
        Bitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether every bit of `first .. first + count` is set.
    pub fn all_set(&self, first: u64, count: u64) -> bool {
        (first..first + count).all(|r| self.get(r))
    }

    /// Whether bit `r` is set.
    pub fn get(&self, r: u64) -> bool {
        self.words[(r / 64) as usize].load(Ordering::Acquire) & (1 << (r % 64)) != 0
    }

    /// Sets bits `first .. first + count`.
    pub fn set(&self, first: u64, count: u64) {
        for r in first..first + count {
            self.words[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::AcqRel);
        }
    }

    /// Clears bit `r`.
    pub fn clear(&self, r: u64) {
        self.words[(r / 64) as usize].fetch_and(!(1 << (r % 64)), Ordering::AcqRel);
    }

    /// Set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Copies bitmap blocks `first .. first + out.len() / bs` into `out` (little-endian words).
    pub fn snapshot(&self, bs: BlockSize, first_block: u64, out: &mut [u8]) {
        let w0 = first_block as usize * bs.bytes() as usize / 8;
        for (i, c) in out.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&self.words[w0 + i].load(Ordering::Acquire).to_le_bytes());
        }
    }

    /// Sets the bits set in `data`, bitmap blocks from `first_block` (little-endian words).
    pub fn merge(&self, bs: BlockSize, first_block: u64, data: &[u8]) {
        let w0 = first_block as usize * bs.bytes() as usize / 8;
        for (i, c) in data.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            if v != 0 {
                self.words[w0 + i].fetch_or(v, Ordering::AcqRel);
            }
        }
    }
}

/// A random, non-zero id (a member or a mirror), from the standard library's randomly seeded
/// hasher (seeded from the operating system per process), mixed with the time.
pub fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_data_superblock_and_bitmap() {
        for blocks in [3u64, 10, 256, 257, 1 << 20, (1 << 20) + 7] {
            for bs in [BlockSize::B512, BlockSize::B4096] {
                let l = Layout::for_child(bs, 256, blocks).unwrap();
                assert!(l.child_blocks() <= blocks, "{blocks}: {l:?}");
                let bigger = Layout::with_data_blocks(bs, 256, l.data_blocks + 1);
                assert!(bigger.child_blocks() > blocks, "{blocks}: not the largest");
                assert_eq!(l.regions, l.data_blocks.div_ceil(256));
            }
        }
        assert_eq!(Layout::for_child(BlockSize::B4096, 256, 2), None);
        let l = Layout::with_data_blocks(BlockSize::B4096, 256, 1024);
        assert_eq!(l.region_span(255, 2), (0, 2));
        assert_eq!(l.region_span(256, 256), (1, 1));
    }

    #[test]
    fn superblock_round_trips_and_refuses_damage() {
        let mut ids = [0; MAX_CHILDREN];
        ids[0] = 7;
        ids[1] = 9;
        let mut states = [MemberState::InSync; MAX_CHILDREN];
        states[1] = MemberState::Stale;
        let sb = Superblock {
            block_size: 4096,
            data_blocks: 1000,
            region_blocks: 256,
            mirror_id: 42,
            generation: 5,
            self_id: 7,
            ids,
            states,
        };
        let mut b = vec![0u8; 4096];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b).unwrap(), Some(sb));
        b[45] ^= 1;
        assert!(Superblock::decode(&b).unwrap_err().contains("CRC"));
        assert_eq!(Superblock::decode(&[0u8; 4096]).unwrap(), None);
    }

    #[test]
    fn bitmap_snapshot_and_merge_agree() {
        let bs = BlockSize::B512;
        let a = Bitmap::new(bs, 2);
        a.set(3, 2);
        a.set(4095, 2);
        assert!(a.all_set(3, 2) && !a.get(5));
        assert_eq!(a.count(), 4);
        let mut buf = vec![0u8; 1024];
        a.snapshot(bs, 0, &mut buf);
        let b = Bitmap::new(bs, 2);
        b.merge(bs, 0, &buf);
        assert!(b.get(3) && b.get(4) && b.get(4095) && b.get(4096));
        b.clear(4);
        assert_eq!(b.count(), 3);
    }
}
