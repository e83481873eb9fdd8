//! `compress`: a thin, compressing bdev of fixed logical size over a (smaller) base. The logical
//! space is cut into chunks (16 KiB by default, 4-64 KiB); each written chunk is compressed
//! (LZ4 by default, or zstd) into a run of whole base blocks, or stored raw when compression
//! would not save a block. Zero chunks take no space. A persistent chunk map says where each
//! chunk is; a free-space allocator hands out runs.
//!
//! # On-disk layout (base blocks of the bdev's block size `bs`)
//! ```text
//! block 0                    superblock: magic "FBLKCMP1", version (2), block size, chunk
//!                            size, chunk count, map, data and log geometry, CRC32C of the
//!                            superblock
//! blocks 1 .. 1 + 2P         chunk map: P pages, two slots each (page p, slot s at 1 + 2p + s)
//! blocks 1 + 2P .. L         data region: runs of compressed or raw chunks
//! blocks L .. L + N          map-update log: N blocks (1/16 of the rest, 2 to 1024)
//! ```
//! A map page is one block: a 32-byte header (`"FBCM"`, CRC32C of the block with this field
//! zero, sequence number, page index, and the sequence number of the last map update the page
//! includes, its *covered* number) followed by `(bs - 32) / 16` entries (254 per 4 KiB
//! page). An entry (16 bytes, little-endian) is
//! `first base block of the run (48 bits) | kind (8: 0 unmapped, 1 raw, 2 lz4, 3 zstd) |
//! reserved (8) | stored bytes (32) | CRC32C of the stored bytes (32)`; an all-zero entry is an
//! unmapped chunk, which reads as zeroes. An all-zero page is a valid page of unmapped entries.
//! Each page is written alternately to its two slots with an increasing sequence number; opening
//! takes, per page, the valid slot (CRC, magic, index) with the higher sequence number, so a torn
//! page write falls back to the page's previous version.
//!
//! A log block is a 32-byte header (`"FBCL"`, CRC32C of the block with this field zero, record
//! count, reserved, log position, reserved) followed by records of 32 bytes: `chunk (64) |
//! sequence number (64) | entry (16 bytes)`, 127 per 4 KiB block.
//!
//! Version 1 (no log) volumes are upgraded in place at their first writable open: the log
//! takes the last blocks of the data region, which must be free (else the open is refused and
//! says so); a read-only open of a version-1 volume is refused.
//!
//! # Map-update log: acknowledged writes survive a crash of the process
//! The in-memory map is the only place that knows where a freshly written chunk is until a
//! checkpoint writes its page. A daemon killed with SIGKILL under a live guest is not a power
//! loss: the guest keeps its page cache and never rewrites what it was told is written. So
//! every map update (each gets the next *sequence number* as it is applied in memory, under the
//! map mutex) is written to the log before its request completes, after its data run:
//! - Group commit: the updates a channel commits between two polls share one log block write
//!   (up to 4 in flight per channel); the op keeps its chunk lock (not its buffers) until then.
//! - The log is a ring of positions; position `p` goes to block `p mod N`. A checkpoint records
//!   the position and the last sequence number at its snapshot; once it is durable, every
//!   update logged before that position is in a durable page, so those blocks may be
//!   overwritten, and updates not yet logged but covered need no record. A log half full
//!   starts a checkpoint; a full one makes writes wait for it.
//! - Opening replays the log: per chunk, the newest record with a sequence number above its
//!   page's covered number whose run is intact (CRC32C of the stored bytes; after a power loss
//!   a record can be durable before its data, and the chunk's previous run is then still in
//!   place, since runs are freed only by a durable checkpoint). The pages of those chunks are
//!   then written (flush, pages, flush) covering every record on the volume, so that the whole
//!   log is free again and new records get higher numbers.
//! - No fsync: a completed write of the base (at least its page cache) is what survives a
//!   killed process; a flush still checkpoints, for power loss.
//!
//! # Data path
//! - Every chunk operation holds the chunk's lock (striped try-locks shared by all channels:
//!   shared for reads, exclusive for writes; a chunk op that misses it waits in its channel's
//!   queue and is retried on the next poll). The chunk map and the allocator live in memory
//!   behind one mutex (`MapState`), taken only briefly to look up or commit an entry, never
//!   across I/O. So the compress bdev serializes its *metadata* work (lookups, commits, one
//!   checkpoint at a time) across reactors, not its data I/O or its compression.
//! - Read: the stored run is read into a channel buffer, its CRC32C checked, then decompressed
//!   (or, raw, copied) and the asked blocks copied out. A CRC or decompression failure fails the
//!   read with [`IoStatus::IntegrityError`].
//! - Write (copy-on-write): a full-chunk write compresses the caller's data; a partial one first
//!   reads and decompresses the chunk (read-modify-write). The result goes to a *newly
//!   allocated* run; only when that write completes does the in-memory map point at it, and the
//!   old run becomes *pending free*; the request completes once the update's log record is
//!   written. A chunk of zeroes is stored as unmapped.
//! - Unmap and write-zeroes: a whole chunk becomes unmapped (its run pending free); part of a
//!   chunk is zeroed by read-modify-write. Unmapped blocks read as zeroes.
//! - Flush (a *checkpoint*): (1) snapshot the dirty map pages under the map mutex, (2) flush the
//!   base, making durable the data of every write completed before the snapshot, (3) write the
//!   snapshot pages to their other slots, (4) flush the base again. Only then are the runs freed
//!   by the updates in that snapshot returned to the allocator. The persisted map therefore only
//!   ever points at data that was durable before it, and a run is reused only once no durable
//!   map page can point at it. One checkpoint runs at a time; a flush waits for one whose
//!   snapshot was taken after it arrived. A write that finds no free run while runs are pending
//!   free starts a checkpoint and retries; with nothing pending it fails with
//!   [`IoStatus::NoSpace`]. Since copy-on-write needs room for a new run before the old one is
//!   freed, a reserve (8 chunks' worth, at most an eighth of the data region) is kept for
//!   overwrites of mapped chunks: new chunks stop at the reserve, so a full volume can still be
//!   rewritten.
//! - After a crash, opening replays the log, then rebuilds the allocator from the map (never
//!   from a free list): the runs of the mapped entries are in use, everything else is free; a
//!   map in which two chunks share a block is refused. A crash of the process loses no
//!   completed write; a power loss may lose writes not covered by a completed flush, as on any
//!   disk with a volatile cache (the bdev reports `VOLATILE_CACHE`).
//!
//! # Costs and limits
//! - The whole chunk map is kept in memory: 16 bytes per chunk (1 MiB per GiB of logical space
//!   with 16 KiB chunks), plus a bitmap of the data region (1 bit per base block).
//! - A run is contiguous; a fragmented data region can fail an allocation that the total free
//!   space would allow (reported as `NoSpace`).
//! - Freed runs are not unmapped on the base.
//! - The layout (logical size, chunk size, map and data region) is fixed when the base is
//!   formatted: reopening with another `size` or `chunk_size` is refused, and a base grown later
//!   keeps its extra blocks unused. The algorithm may change between opens (each entry records
//!   its own).
//! - `describe()` reports the logical bytes of mapped chunks, the physical bytes in use (mapped
//!   runs, runs pending free, runs of writes in flight), the live part of those (without the
//!   runs pending free), the compression ratio (logical over live), the checkpoints made, and
//!   the log's place and block writes since open.
//! - Each chunk costs one read (partial writes and reads) and one write of the base; a 4 KiB
//!   write into a 16 KiB chunk reads, decompresses, compresses and writes the whole chunk. A
//!   written chunk also waits for one log block write, shared with the other updates its
//!   channel committed in the same poll.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bdev::{Bdev, BdevInfo, Channel, ChannelOps, IoCompletion, IoRequest, Wake};
use crate::buf::{AlignedBuf, SgList};
use crate::error::BdevError;
use crate::stacked::{
    BaseQueue, Format, LockTable, Slots, flush_if, idle_wait, zero_range, zeroing_ops,
};
use crate::sync::SyncChannel;
use crate::types::{BlockSize, Caps, IoStatus, IoType};

/// The `kind` name of this bdev.
pub const KIND: &str = "compress";
/// Bytes of one chunk map entry.
pub const ENTRY_BYTES: usize = 16;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 16 << 10;
/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 64 << 10;

const MAGIC: &[u8; 8] = b"FBLKCMP1";
/// Format version: 2 added the map-update log.
const VERSION: u32 = 2;
/// Superblock bytes the CRC covers (the CRC follows them).
const SUPER_BYTES: usize = 84;
/// Superblock bytes of version 1 (no log).
const SUPER_BYTES_V1: usize = 68;
const PAGE_MAGIC: &[u8; 4] = b"FBCM";
const PAGE_HEADER: usize = 32;
const LOG_MAGIC: &[u8; 4] = b"FBCL";
const LOG_HEADER: usize = 32;
/// Bytes of one log record: chunk (8), sequence number (8), entry (16).
const RECORD_BYTES: usize = 32;
/// Most blocks of the map-update log (4 MiB of 4 KiB blocks).
const MAX_LOG_BLOCKS: u64 = 1024;
/// Log block writes one channel keeps in flight.
const LOG_WRITES_IN_FLIGHT: usize = 4;
/// Most requests a compress channel keeps in flight.
const MAX_DEPTH: usize = 128;
/// Chunk operations with buffers one channel runs at once.
const OP_BUFFERS: usize = 32;
/// Chunk operations one request keeps in flight at most.
const OPS_PER_REQ: u32 = 8;
/// Map page writes a checkpoint keeps in flight.
const PAGE_WRITES_IN_FLIGHT: usize = 32;
/// Largest transfer of a compress bdev.
const MAX_TRANSFER_BYTES: u64 = 1 << 20;
/// Chunks' worth of the data region kept for overwrites (at most an eighth of it).
const RESERVE_CHUNKS: u64 = 8;
/// Default zstd level.
const DEFAULT_ZSTD_LEVEL: i32 = 3;

const K_UNMAPPED: u8 = 0;
const K_RAW: u8 = 1;
const K_LZ4: u8 = 2;
const K_ZSTD: u8 = 3;

/// The compression of newly written chunks. Chunks record their own algorithm, so a volume
/// reopened with another one still reads its old chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// LZ4 block format (fast).
    #[default]
    Lz4,
    /// zstd (better ratio, slower); needs the `zstd` cargo feature (on by default).
    Zstd,
}

impl Algorithm {
    /// The stable name (`lz4`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        }
    }
}

/// How to open a compress bdev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressOptions {
    /// Logical size in bytes, a multiple of `chunk_size`.
    pub size: u64,
    /// Chunk size in bytes: a power of two from 4 KiB to 64 KiB, at least the block size.
    pub chunk_size: u32,
    /// Compression of new chunks.
    pub algorithm: Algorithm,
    /// zstd level (1-22).
    pub zstd_level: i32,
    /// When to format the base.
    pub format: Format,
}

impl CompressOptions {
    /// Options with the defaults (16 KiB chunks, LZ4) for a logical size.
    pub fn new(size: u64) -> CompressOptions {
        CompressOptions {
            size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            algorithm: Algorithm::Lz4,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            format: Format::IfZero,
        }
    }

    /// Checks the values; errors name the field.
    pub fn validate(&self, bs: Option<BlockSize>) -> Result<(), BdevError> {
        let c = self.chunk_size;
        if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
            return Err(BdevError::invalid(
                "chunk_size",
                format!("{c} is not a power of two from 4 KiB to 64 KiB"),
            ));
        }
        if let Some(bs) = bs
            && c < bs.bytes()
        {
            return Err(BdevError::invalid(
                "chunk_size",
                format!("{c} is smaller than the base's block size {bs}"),
            ));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(c)) {
            return Err(BdevError::invalid(
                "size",
                format!(
                    "{} bytes is not a positive multiple of chunk_size {c}",
                    self.size
                ),
            ));
        }
        if self.size / u64::from(c) > u64::from(u32::MAX) {
            return Err(BdevError::invalid("size", "too many chunks (at most 2^32)"));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(BdevError::invalid(
                "zstd_level",
                format!("{} is not a zstd level (1-22)", self.zstd_level),
            ));
        }
        if self.algorithm == Algorithm::Zstd && !cfg!(feature = "zstd") {
            return Err(BdevError::invalid(
                "algorithm",
                "zstd is not available: ferroblk was built without the `zstd` feature",
            ));
        }
        Ok(())
    }
}

/// One chunk map entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// First base block of the run (0: unmapped).
    block: u64,
    /// Stored bytes.
    len: u32,
    kind: u8,
    /// CRC32C of the stored bytes.
    crc: u32,
}

impl Entry {
    fn is_mapped(&self) -> bool {
        self.kind != K_UNMAPPED
    }

    fn blocks(&self, shift: u32) -> u64 {
        u64::from(self.len).div_ceil(1 << shift)
    }

    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.block.to_le_bytes());
        out[6] = self.kind;
        out[7] = 0;
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let mut block = [0u8; 8];
        block[..6].copy_from_slice(&b[..6]);
        Entry {
            block: u64::from_le_bytes(block),
            kind: b[6],
            len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        }
    }
}

/// Where things are on the base, in base blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressLayout {
    /// Block size of the base and of the compress bdev.
    pub block_size: BlockSize,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Logical chunks.
    pub chunks: u64,
    /// Entries per map page.
    pub entries_per_page: u64,
    /// First map block.
    pub map_start: u64,
    /// Map pages (each has two slots, so the map takes `2 * map_pages` blocks).
    pub map_pages: u64,
    /// First block of the data region.
    pub data_start: u64,
    /// Blocks of the data region.
    pub data_blocks: u64,
    /// First block of the map-update log (right after the data region).
    pub log_start: u64,
    /// Blocks of the map-update log.
    pub log_blocks: u64,
}

impl CompressLayout {
    /// The layout of `chunks` chunks of `chunk_size` on a base of `base_blocks` blocks, if the
    /// map fits with at least one chunk's worth of data blocks.
    pub fn new(
        bs: BlockSize,
        chunk_size: u32,
        chunks: u64,
        base_blocks: u64,
    ) -> Option<CompressLayout> {
        CompressLayout::with_log(bs, chunk_size, chunks, base_blocks, true)
    }

    /// The layout of [`CompressLayout::new`], or without a log (version 1) if `log` is false.
    fn with_log(
        bs: BlockSize,
        chunk_size: u32,
        chunks: u64,
        base_blocks: u64,
        log: bool,
    ) -> Option<CompressLayout> {
        let epp = (u64::from(bs.bytes()) - PAGE_HEADER as u64) / ENTRY_BYTES as u64;
        let map_pages = chunks.div_ceil(epp);
        let map_start = 1;
        let data_start = map_start + 2 * map_pages;
        let rest = base_blocks.checked_sub(data_start)?;
        let log_blocks = if log {
            (rest / 16).clamp(2, MAX_LOG_BLOCKS)
        } else {
            0
        };
        let data_blocks = rest.checked_sub(log_blocks)?;
        (data_blocks >= u64::from(chunk_size >> bs.shift())).then_some(CompressLayout {
            block_size: bs,
            chunk_size,
            chunks,
            entries_per_page: epp,
            map_start,
            map_pages,
            data_start,
            data_blocks,
            log_start: if log { data_start + data_blocks } else { 0 },
            log_blocks,
        })
    }

    /// Log records per log block.
    pub fn records_per_log_block(&self) -> usize {
        (self.block_size.bytes() as usize - LOG_HEADER) / RECORD_BYTES
    }

    /// The base block of slot `slot` (0 or 1) of map page `page`.
    pub fn page_block(&self, page: u64, slot: u64) -> u64 {
        self.map_start + 2 * page + slot
    }

    /// The map page holding chunk `chunk`'s entry, and the entry's byte offset in it.
    pub fn entry_of(&self, chunk: u64) -> (u64, usize) {
        (
            chunk / self.entries_per_page,
            PAGE_HEADER + (chunk % self.entries_per_page) as usize * ENTRY_BYTES,
        )
    }

    fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.block_size.bytes().to_le_bytes());
        out[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.chunks.to_le_bytes());
        out[32..40].copy_from_slice(&self.map_start.to_le_bytes());
        out[40..48].copy_from_slice(&self.map_pages.to_le_bytes());
        out[48..56].copy_from_slice(&self.data_start.to_le_bytes());
        out[56..64].copy_from_slice(&self.data_blocks.to_le_bytes());
        out[64..68].copy_from_slice(&(self.entries_per_page as u32).to_le_bytes());
        out[68..76].copy_from_slice(&self.log_start.to_le_bytes());
        out[76..84].copy_from_slice(&self.log_blocks.to_le_bytes());
        let crc = crate::checksum::crc32c(&out[..SUPER_BYTES]);
        out[SUPER_BYTES..SUPER_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a superblock: the layout, and whether it is of version 1 (no log; its layout
    /// has `log_blocks` 0 and a data region up to the end of the volume).
    fn decode(b: &[u8]) -> Result<(CompressLayout, bool), String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..8] != MAGIC {
            return Err("block 0 is neither zero nor a compress superblock; \
                        refusing to format over existing data"
                .into());
        }
        let version = u32_at(8);
        let crc_at = match version {
            1 => SUPER_BYTES_V1,
            VERSION => SUPER_BYTES,
            _ => {
                return Err(format!(
                    "compress format version {version} is not supported (this build reads 1 \
                     and {VERSION})"
                ));
            }
        };
        if crate::checksum::crc32c(&b[..crc_at]) != u32_at(crc_at) {
            return Err("the compress superblock is corrupted (CRC mismatch)".into());
        }
        let bs = BlockSize::new(u32_at(12)).ok_or("the superblock has a bad block size")?;
        let mut l = CompressLayout {
            block_size: bs,
            chunk_size: u32_at(16),
            chunks: u64_at(24),
            map_start: u64_at(32),
            map_pages: u64_at(40),
            data_start: u64_at(48),
            data_blocks: u64_at(56),
            entries_per_page: u64::from(u32_at(64)),
            log_start: 0,
            log_blocks: 0,
        };
        let v1 = version == 1;
        if !v1 {
            l.log_start = u64_at(68);
            l.log_blocks = u64_at(76);
        }
        // Untrusted fields: their sum may overflow.
        let expect = l
            .data_start
            .checked_add(l.data_blocks)
            .and_then(|end| end.checked_add(l.log_blocks))
            .and_then(|base_blocks| {
                CompressLayout::with_log(bs, l.chunk_size, l.chunks, base_blocks, !v1)
            });
        if expect != Some(l) {
            return Err("the compress superblock has an inconsistent layout".into());
        }
        Ok((l, v1))
    }

    /// The version-1 layout of the same geometry: the data region runs to the end.
    #[cfg(test)]
    fn without_log(mut self) -> CompressLayout {
        self.data_blocks += self.log_blocks;
        self.log_start = 0;
        self.log_blocks = 0;
        self
    }
}

/// Free space of the data region: one bit per block, next-fit allocation of contiguous runs.
struct Allocator {
    bits: Vec<u64>,
    blocks: u64,
    used: u64,
    cursor: u64,
}

impl Allocator {
    fn new(blocks: u64) -> Allocator {
        Allocator {
            bits: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            used: 0,
            cursor: 0,
        }
    }

    fn is_used(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Marks `first .. first + n` used; false (and no change) if any of them is used already.
    fn mark(&mut self, first: u64, n: u64) -> bool {
        if (first..first + n).any(|b| self.is_used(b)) {
            return false;
        }
        for b in first..first + n {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        self.used += n;
        true
    }

    fn free(&mut self, first: u64, n: u64) {
        for b in first..first + n {
            debug_assert!(self.is_used(b), "freeing free block {b}");
            self.bits[(b / 64) as usize] &= !(1 << (b % 64));
        }
        self.used -= n;
    }

    /// A run of `n` free blocks, marked used; next-fit from the last allocation.
    fn alloc(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.blocks - self.used {
            return None;
        }
        let total = self.blocks;
        let mut pos = self.cursor.min(total);
        let (mut run_start, mut run_len) = (pos, 0u64);
        let mut scanned = 0u64;
        while scanned < total + n {
            if pos >= total {
                pos = 0;
                run_len = 0;
            }
            if run_len == 0
                && pos.is_multiple_of(64)
                && pos + 64 <= total
                && self.bits[(pos / 64) as usize] == !0
            {
                pos += 64;
                scanned += 64;
                continue;
            }
            if self.is_used(pos) {
                run_len = 0;
            } else {
                if run_len == 0 {
                    run_start = pos;
                }
                run_len += 1;
                if run_len == n {
                    let ok = self.mark(run_start, n);
                    debug_assert!(ok);
                    self.cursor = run_start + n;
                    return Some(run_start);
                }
            }
            pos += 1;
            scanned += 1;
        }
        None
    }
}

/// A run freed by a map update, reusable once a checkpoint with snapshot `tag` (or later) has
/// made the update durable.
struct Pending {
    tag: u64,
    first: u64,
    blocks: u64,
}

/// The chunk map, the allocator and the checkpoint bookkeeping, behind one mutex.
struct MapState {
    entries: Vec<Entry>,
    /// Per page: the sequence number of its newest durable version.
    page_seq: Vec<u64>,
    dirty: Vec<bool>,
    dirty_count: usize,
    /// Data-region blocks (relative to `data_start`).
    alloc: Allocator,
    /// Blocks allocated to writes in flight, not yet in the map.
    in_flight_blocks: u64,
    pending: VecDeque<Pending>,
    pending_blocks: u64,
    /// Snapshot number of the next checkpoint.
    epoch: u64,
    /// Snapshot number of the last successful checkpoint.
    durable: u64,
    /// A checkpoint is between its snapshot and its end.
    running: bool,
    mapped: u64,
    raw: u64,
    stored_bytes: u64,
    checkpoints: u64,
    /// Sequence number of the last map update (each update gets the next one; its log record
    /// carries it).
    last_seq: u64,
    /// The updates up to this one are in durable map pages (the last successful checkpoint's
    /// snapshot): they need no log record any more.
    covered_durable: u64,
    /// Position of the next log block write (block `log_next % log_blocks` of the log).
    log_next: u64,
    /// Log positions before this one hold only updates a durable checkpoint covers: their
    /// blocks may be overwritten (by positions up to `log_reusable + log_blocks`).
    log_reusable: u64,
    /// Per log block: a write of it is in flight.
    log_busy: Vec<bool>,
    /// Log block writes since open.
    log_writes: u64,
}

impl MapState {
    fn mark_dirty(&mut self, page: u64) {
        let d = &mut self.dirty[page as usize];
        if !*d {
            *d = true;
            self.dirty_count += 1;
        }
    }

    fn account(&mut self, e: &Entry, add: bool) {
        if !e.is_mapped() {
            return;
        }
        let sign = |v: &mut u64, n: u64| {
            if add {
                *v += n;
            } else {
                *v -= n;
            }
        };
        sign(&mut self.mapped, 1);
        sign(&mut self.stored_bytes, u64::from(e.len));
        if e.kind == K_RAW {
            sign(&mut self.raw, 1);
        }
    }
}

/// What [`CompressBdev::check_consistency`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Consistency {
    /// Chunks mapped to a run.
    pub mapped_chunks: u64,
    /// Blocks the map points at.
    pub mapped_blocks: u64,
    /// Blocks freed by updates not yet durable.
    pub pending_blocks: u64,
    /// Blocks allocated to writes in flight.
    pub in_flight_blocks: u64,
    /// Blocks free.
    pub free_blocks: u64,
}

/// Per-bdev state shared by the channels.
struct CompressShared {
    layout: CompressLayout,
    algorithm: Algorithm,
    #[cfg(feature = "zstd")]
    zstd_level: i32,
    map: Mutex<MapState>,
    chunk_locks: LockTable,
    integrity_errors: AtomicU64,
    /// Whether the base needs flushes.
    base_flush: bool,
    /// Free blocks that only overwrites of mapped chunks may take.
    reserve_blocks: u64,
}

impl CompressShared {
    fn map(&self) -> MutexGuard<'_, MapState> {
        self.map.lock().expect("map lock")
    }
}

/// A compressing bdev; see the module documentation.
pub struct CompressBdev {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    shared: Arc<CompressShared>,
}

/// Size of a channel's stored-data buffer: room for a whole compressor output.
fn stored_buf_len(chunk: usize, bs: usize) -> usize {
    let lz4 = lz4_flex::block::get_maximum_output_size(chunk);
    #[cfg(feature = "zstd")]
    let lz4 = lz4.max(zstd::zstd_safe::compress_bound(chunk));
    lz4.max(chunk).next_multiple_of(bs)
}

impl CompressBdev {
    /// Opens the compress volume on `base`, formatting the base first if its block 0 is all
    /// zeroes (or as `opts.format` says). The logical size and chunk size must match those the volume was formatted with.
    pub fn open(
        name: &str,
        base: Arc<dyn Bdev>,
        opts: &CompressOptions,
    ) -> Result<CompressBdev, BdevError> {
        let base_name = base.info().name().to_string();
        let invalid = |reason: String| BdevError::invalid("base", format!("{base_name}: {reason}"));
        let io_fail = |what: &str, st: IoStatus| invalid(format!("{what} failed: {st}"));
        let g = base.info().geometry();
        let bs = g.block_size;
        opts.validate(Some(bs))?;
        if !g
            .caps
            .contains(Caps::READ | Caps::WRITE | Caps::RETAINS_DATA)
        {
            return Err(invalid(
                "a compress bdev needs a readable, writable base that keeps data".into(),
            ));
        }
        let chunks = opts.size / u64::from(opts.chunk_size);
        let mut ch = SyncChannel::new(base.open_channel()?);
        let (st, block0) = ch.read(0, 1);
        if !st.is_ok() {
            return Err(io_fail("reading the superblock", st));
        }
        let (layout, v1) = if opts.format.wants(&block0, MAGIC) {
            let layout = CompressLayout::new(bs, opts.chunk_size, chunks, g.block_count)
                .ok_or_else(|| {
                    invalid(format!(
                        "{} blocks is too small for the chunk map of {} chunks plus one chunk",
                        g.block_count, chunks
                    ))
                })?;
            if base.info().is_read_only() {
                return Err(invalid(
                    "block 0 is zero (no volume yet) and the base is read-only".into(),
                ));
            }
            let (op, _) = zeroing_ops(g.caps);
            zero_range(&mut ch, layout.map_start, 2 * layout.map_pages, op)
                .map_err(|st| io_fail("zeroing the chunk map", st))?;
            zero_range(&mut ch, layout.log_start, layout.log_blocks, op)
                .map_err(|st| io_fail("zeroing the map-update log", st))?;
            flush_if(&mut ch, g.caps).map_err(|st| io_fail("flushing the chunk map", st))?;
            let mut sb = vec![0u8; bs.bytes() as usize];
            layout.encode(&mut sb);
            let st = ch.write(0, &sb);
            if !st.is_ok() {
                return Err(io_fail("writing the superblock", st));
            }
            flush_if(&mut ch, g.caps).map_err(|st| io_fail("flushing the superblock", st))?;
            tracing::info!(bdev = %name, base = %base_name, chunks,
                chunk_size = opts.chunk_size, data_blocks = layout.data_blocks,
                log_blocks = layout.log_blocks, "formatted a compress volume");
            (layout, false)
        } else {
            CompressLayout::decode(&block0).map_err(invalid)?
        };
        if layout.block_size != bs {
            return Err(invalid(format!(
                "the volume was formatted with {}-byte blocks but the base has {}-byte blocks",
                layout.block_size,
                bs.bytes()
            )));
        }
        if layout.chunk_size != opts.chunk_size {
            return Err(BdevError::invalid(
                "chunk_size",
                format!(
                    "the volume on {base_name} was formatted with chunk_size {}",
                    layout.chunk_size
                ),
            ));
        }
        if layout.chunks != chunks {
            return Err(BdevError::invalid(
                "size",
                format!(
                    "the volume on {base_name} was formatted with size {}",
                    layout.chunks * u64::from(layout.chunk_size)
                ),
            ));
        }
        let needs = layout.data_start + layout.data_blocks + layout.log_blocks;
        if needs > g.block_count {
            return Err(invalid(format!(
                "the volume needs {needs} blocks but the base has only {}",
                g.block_count
            )));
        }
        let read_only = base.info().is_read_only();
        let layout = if v1 {
            if read_only {
                return Err(invalid(
                    "a version-1 compress volume is upgraded to version 2 (map-update log) at \
                     its first writable open; this base is read-only"
                        .into(),
                ));
            }
            let l = upgrade_v1(&mut ch, &layout, g.caps).map_err(invalid)?;
            tracing::info!(bdev = %name, base = %base_name, log_blocks = l.log_blocks,
                "upgraded a version-1 compress volume to version 2");
            l
        } else {
            layout
        };
        let mut pages = load_pages(&mut ch, &layout).map_err(invalid)?;
        let mut dirty = vec![false; layout.map_pages as usize];
        let last_seq = replay_log(
            &mut ch,
            &layout,
            &mut pages.entries,
            &pages.covered,
            &mut dirty,
        )
        .map_err(invalid)?;
        let mut map =
            build_state(&layout, pages.entries, pages.seq, dirty, last_seq).map_err(invalid)?;
        if map.dirty_count > 0 && !read_only {
            tracing::info!(bdev = %name, pages = map.dirty_count,
                "replayed the map-update log");
            checkpoint_at_open(&mut ch, &layout, &mut map, g.caps)
                .map_err(|st| io_fail("writing the replayed chunk map", st))?;
        }
        drop(ch);

        let mut caps =
            Caps::ALL_IO | Caps::RETAINS_DATA | Caps::UNMAP_READS_ZEROES | Caps::VOLATILE_CACHE;
        if g.caps.contains(Caps::PERSISTENT) {
            caps = caps | Caps::PERSISTENT;
        }
        let logical_blocks = opts.size >> bs.shift();
        let info = BdevInfo::builder(name, KIND, bs, logical_blocks, caps)
            .buf_align(g.buf_align)
            .max_transfer_blocks((MAX_TRANSFER_BYTES >> bs.shift()) as u32)
            .read_only(base.info().is_read_only())
            .build();
        Ok(CompressBdev {
            info,
            base,
            shared: Arc::new(CompressShared {
                layout,
                algorithm: opts.algorithm,
                #[cfg(feature = "zstd")]
                zstd_level: opts.zstd_level,
                map: Mutex::new(map),
                chunk_locks: LockTable::new(),
                integrity_errors: AtomicU64::new(0),
                base_flush: g.caps.contains(Caps::FLUSH),
                reserve_blocks: (RESERVE_CHUNKS * u64::from(opts.chunk_size >> bs.shift()))
                    .min(layout.data_blocks / 8),
            }),
        })
    }

    /// Where the superblock, the map and the data are on the base.
    pub fn layout(&self) -> CompressLayout {
        self.shared.layout
    }

    /// Reads that failed their CRC or decompression since the bdev was opened.
    pub fn integrity_errors(&self) -> u64 {
        self.shared.integrity_errors.load(Ordering::Relaxed)
    }

    /// Checks the in-memory map against the allocator: every mapped run lies in the data
    /// region, no two runs (mapped or pending free) share a block, and the allocator's used
    /// blocks are exactly those runs plus the blocks of writes in flight. Call it with no I/O in
    /// flight for an exact answer.
    pub fn check_consistency(&self) -> Result<Consistency, String> {
        let m = self.shared.map();
        let l = self.shared.layout;
        let shift = l.block_size.shift();
        let mut seen = Allocator::new(l.data_blocks);
        let mut report = Consistency::default();
        for (chunk, e) in m.entries.iter().enumerate() {
            if !e.is_mapped() {
                if *e != Entry::default() {
                    return Err(format!("chunk {chunk}: unmapped entry with data {e:?}"));
                }
                continue;
            }
            check_entry(e, &l).map_err(|r| format!("chunk {chunk}: {r}"))?;
            let (first, n) = (e.block - l.data_start, e.blocks(shift));
            if !seen.mark(first, n) {
                return Err(format!(
                    "chunk {chunk}: its run {}+{n} overlaps another chunk's",
                    e.block
                ));
            }
            for b in first..first + n {
                if !m.alloc.is_used(b) {
                    return Err(format!(
                        "chunk {chunk}: block {} is in use but free in the allocator",
                        l.data_start + b
                    ));
                }
            }
            report.mapped_chunks += 1;
            report.mapped_blocks += n;
        }
        for p in &m.pending {
            if !seen.mark(p.first, p.blocks) {
                return Err(format!(
                    "pending-free run {}+{} overlaps a mapped or pending run",
                    l.data_start + p.first,
                    p.blocks
                ));
            }
            for b in p.first..p.first + p.blocks {
                if !m.alloc.is_used(b) {
                    return Err(format!(
                        "pending-free block {} is free in the allocator",
                        l.data_start + b
                    ));
                }
            }
            report.pending_blocks += p.blocks;
        }
        if report.pending_blocks != m.pending_blocks {
            return Err("the pending-free count is wrong".into());
        }
        report.in_flight_blocks = m.in_flight_blocks;
        if m.alloc.used != report.mapped_blocks + report.pending_blocks + m.in_flight_blocks {
            return Err(format!(
                "the allocator has {} blocks in use but the map, pending frees and writes in \
                 flight account for {}",
                m.alloc.used,
                report.mapped_blocks + report.pending_blocks + m.in_flight_blocks
            ));
        }
        let counted = m
            .alloc
            .bits
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>();
        if counted != m.alloc.used {
            return Err("the allocator's count does not match its bitmap".into());
        }
        if report.mapped_chunks != m.mapped {
            return Err("the mapped-chunk count is wrong".into());
        }
        report.free_blocks = l.data_blocks - m.alloc.used;
        Ok(report)
    }
}

impl Drop for CompressBdev {
    /// A bdev closed cleanly persists its map in its pages (best effort; after a crash instead,
    /// opening replays the map-update log), so that the next open has no log to replay.
    fn drop(&mut self) {
        let dirty = self.shared.map().dirty_count > 0;
        if !dirty || self.info.is_read_only() {
            return;
        }
        match self.open_channel() {
            Ok(ch) => {
                let st = SyncChannel::new(ch).flush();
                if !st.is_ok() {
                    tracing::error!(bdev = %self.info.name(), status = %st,
                        "persisting the chunk map at close failed");
                }
            }
            Err(e) => tracing::error!(bdev = %self.info.name(), error = %e,
                "persisting the chunk map at close failed"),
        }
    }
}

/// Checks that a mapped entry is well formed and its run lies in the data region.
fn check_entry(e: &Entry, l: &CompressLayout) -> Result<(), String> {
    let shift = l.block_size.shift();
    let ok_kind = match e.kind {
        K_RAW => e.len == l.chunk_size,
        K_LZ4 | K_ZSTD => e.len > 0 && e.len < l.chunk_size,
        _ => false,
    };
    if !ok_kind {
        return Err(format!("bad entry {e:?}"));
    }
    let n = e.blocks(shift);
    if e.block < l.data_start || e.block + n > l.data_start + l.data_blocks {
        return Err(format!("run {}+{n} lies outside the data region", e.block));
    }
    Ok(())
}

/// Decodes one map page slot: `Some((seq, page bytes))` if it is valid (an all-zero block is a
/// valid empty page with sequence 0).
fn valid_page(b: &[u8], page: u64) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    if &b[0..4] != PAGE_MAGIC {
        return None;
    }
    let stored = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    let mut crc = crate::checksum::crc32c(&b[..4]);
    crc = crate::checksum::crc32c_append(crc, &[0; 4]);
    crc = crate::checksum::crc32c_append(crc, &b[8..]);
    let seq = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    // A sequence number that cannot be incremented is no version a checkpoint wrote.
    (crc == stored && index == page && seq > 0 && seq < u64::MAX).then_some(seq)
}

/// Encodes map page `page` with sequence `seq`, covering the log records up to `covered`, from
/// `entries` into `out` (one block).
fn encode_page(
    out: &mut [u8],
    page: u64,
    seq: u64,
    covered: u64,
    entries: &[Entry],
    l: &CompressLayout,
) {
    out.fill(0);
    out[0..4].copy_from_slice(PAGE_MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&page.to_le_bytes());
    out[24..32].copy_from_slice(&covered.to_le_bytes());
    let first = (page * l.entries_per_page) as usize;
    let last = (first + l.entries_per_page as usize).min(entries.len());
    for (i, e) in entries[first..last].iter().enumerate() {
        e.encode(&mut out[PAGE_HEADER + i * ENTRY_BYTES..][..ENTRY_BYTES]);
    }
    let crc = crate::checksum::crc32c(out);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// The chunk map as its pages hold it.
struct Pages {
    entries: Vec<Entry>,
    /// Per page: the sequence number of its newest valid version.
    seq: Vec<u64>,
    /// Per page: the last log record (sequence number) that version includes.
    covered: Vec<u64>,
}

/// Reads the whole chunk map and picks each page's newest valid slot.
fn load_pages(ch: &mut SyncChannel, l: &CompressLayout) -> Result<Pages, String> {
    let bs = l.block_size.bytes() as usize;
    let total = 2 * l.map_pages;
    let step = u64::from(ch.channel().info().geometry().max_transfer_blocks).min(256);
    let mut entries = vec![Entry::default(); l.chunks as usize];
    let mut page_seq = vec![0u64; l.map_pages as usize];
    let mut covered = vec![0u64; l.map_pages as usize];
    let mut at = 0u64;
    while at < total {
        let n = (total - at).min(step) & !1;
        let (st, data) = ch.read(l.map_start + at, n as u32);
        if !st.is_ok() {
            return Err(format!("reading the chunk map failed: {st}"));
        }
        for (k, pair) in data.chunks_exact(2 * bs).enumerate() {
            let page = at / 2 + k as u64;
            let slots = [&pair[..bs], &pair[bs..]];
            let best = (0..2)
                .filter_map(|s| valid_page(slots[s], page).map(|seq| (seq, s)))
                .max();
            let Some((seq, s)) = best else {
                return Err(format!(
                    "map page {page} is corrupted in both copies (blocks {} and {})",
                    l.page_block(page, 0),
                    l.page_block(page, 1)
                ));
            };
            page_seq[page as usize] = seq;
            if seq == 0 {
                continue;
            }
            covered[page as usize] =
                u64::from_le_bytes(slots[s][24..32].try_into().expect("8 bytes"));
            let first = page * l.entries_per_page;
            let last = (first + l.entries_per_page).min(l.chunks);
            for chunk in first..last {
                let off = PAGE_HEADER + ((chunk - first) as usize) * ENTRY_BYTES;
                let e = Entry::decode(&slots[s][off..off + ENTRY_BYTES]);
                check_any_entry(&e, l).map_err(|r| format!("chunk {chunk}: {r}"))?;
                entries[chunk as usize] = e;
            }
        }
        at += n;
    }
    Ok(Pages {
        entries,
        seq: page_seq,
        covered,
    })
}

/// Checks an entry read from the volume: unmapped (all zero) or well formed.
fn check_any_entry(e: &Entry, l: &CompressLayout) -> Result<(), String> {
    if e.is_mapped() {
        check_entry(e, l)
    } else if *e != Entry::default() {
        Err("unmapped entry with data".into())
    } else {
        Ok(())
    }
}

/// Whether a log block is valid (magic, CRC): its record count if so.
fn valid_log_block(b: &[u8], per_block: usize) -> Option<usize> {
    if &b[0..4] != LOG_MAGIC {
        return None;
    }
    let stored = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    let mut crc = crate::checksum::crc32c(&b[..4]);
    crc = crate::checksum::crc32c_append(crc, &[0; 4]);
    crc = crate::checksum::crc32c_append(crc, &b[8..]);
    let count = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
    (crc == stored && count <= per_block).then_some(count)
}

/// Encodes one log record.
fn encode_record(out: &mut [u8], chunk: u64, seq: u64, e: &Entry) {
    out[0..8].copy_from_slice(&chunk.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    e.encode(&mut out[16..32]);
}

/// Seals a log block of `count` records (header and CRC).
fn seal_log_block(out: &mut [u8], count: usize, pos: u64) {
    out[0..4].copy_from_slice(LOG_MAGIC);
    out[4..8].fill(0);
    out[8..12].copy_from_slice(&(count as u32).to_le_bytes());
    out[12..16].fill(0);
    out[16..24].copy_from_slice(&pos.to_le_bytes());
    out[24..32].fill(0);
    out[LOG_HEADER + count * RECORD_BYTES..].fill(0);
    let crc = crate::checksum::crc32c(out);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Whether the run of `e` holds its stored bytes (their CRC32C matches).
fn run_is_intact(ch: &mut SyncChannel, e: &Entry, shift: u32) -> Result<bool, String> {
    let (st, data) = ch.read(e.block, e.blocks(shift) as u32);
    if !st.is_ok() {
        return Err(format!("reading the run of a logged update failed: {st}"));
    }
    Ok(crate::checksum::crc32c(&data[..e.len as usize]) == e.crc)
}

/// Replays the map-update log over the entries of the map pages: per chunk, the newest record
/// newer than what its page covers and whose run is intact (a record can be durable before its
/// data after a power loss; the previous version of the chunk is then still in place). Marks
/// the pages of every such record dirty in `dirty`; returns the highest sequence number on the
/// volume.
fn replay_log(
    ch: &mut SyncChannel,
    l: &CompressLayout,
    entries: &mut [Entry],
    covered: &[u64],
    dirty: &mut [bool],
) -> Result<u64, String> {
    let bs = l.block_size.bytes() as usize;
    let per_block = l.records_per_log_block();
    let step = u64::from(ch.channel().info().geometry().max_transfer_blocks).min(256);
    let mut max_seq = covered.iter().copied().max().unwrap_or(0);
    // (chunk, seq, entry) of the records newer than their page.
    let mut records: Vec<(u64, u64, Entry)> = Vec::new();
    let mut at = 0u64;
    while at < l.log_blocks {
        let n = (l.log_blocks - at).min(step);
        let (st, data) = ch.read(l.log_start + at, n as u32);
        if !st.is_ok() {
            return Err(format!("reading the map-update log failed: {st}"));
        }
        for b in data.chunks_exact(bs) {
            let Some(count) = valid_log_block(b, per_block) else {
                continue;
            };
            for r in b[LOG_HEADER..LOG_HEADER + count * RECORD_BYTES].chunks_exact(RECORD_BYTES) {
                let chunk = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                let seq = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
                let e = Entry::decode(&r[16..32]);
                if chunk >= l.chunks {
                    return Err(format!("the map-update log names chunk {chunk}"));
                }
                check_any_entry(&e, l).map_err(|r| format!("log record of chunk {chunk}: {r}"))?;
                max_seq = max_seq.max(seq);
                if seq > covered[(chunk / l.entries_per_page) as usize] {
                    records.push((chunk, seq, e));
                }
            }
        }
        at += n;
    }
    // Per chunk, newest first.
    records.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let shift = l.block_size.shift();
    let mut i = 0;
    while i < records.len() {
        let chunk = records[i].0;
        dirty[(chunk / l.entries_per_page) as usize] = true;
        let mut found = false;
        while i < records.len() && records[i].0 == chunk {
            let e = records[i].2;
            if !found && (!e.is_mapped() || run_is_intact(ch, &e, shift)?) {
                entries[chunk as usize] = e;
                found = true;
            }
            i += 1;
        }
    }
    Ok(max_seq)
}

/// The map state of `entries`, with the allocator rebuilt from them (never from a free list);
/// a map in which two chunks share a block is refused.
fn build_state(
    l: &CompressLayout,
    entries: Vec<Entry>,
    page_seq: Vec<u64>,
    dirty: Vec<bool>,
    last_seq: u64,
) -> Result<MapState, String> {
    let shift = l.block_size.shift();
    let mut alloc = Allocator::new(l.data_blocks);
    let (mut mapped, mut raw, mut stored) = (0u64, 0u64, 0u64);
    for (chunk, e) in entries.iter().enumerate() {
        if !e.is_mapped() {
            continue;
        }
        if !alloc.mark(e.block - l.data_start, e.blocks(shift)) {
            return Err(format!(
                "the chunk map is inconsistent: chunk {chunk}'s run {}+{} overlaps another \
                 chunk's",
                e.block,
                e.blocks(shift)
            ));
        }
        mapped += 1;
        stored += u64::from(e.len);
        raw += u64::from(e.kind == K_RAW);
    }
    let dirty_count = dirty.iter().filter(|&&d| d).count();
    Ok(MapState {
        entries,
        page_seq,
        dirty,
        dirty_count,
        alloc,
        in_flight_blocks: 0,
        pending: VecDeque::new(),
        pending_blocks: 0,
        epoch: 1,
        durable: 0,
        running: false,
        mapped,
        raw,
        stored_bytes: stored,
        checkpoints: 0,
        last_seq,
        covered_durable: last_seq,
        log_next: 0,
        log_reusable: 0,
        log_busy: vec![false; l.log_blocks as usize],
        log_writes: 0,
    })
}

/// Writes the dirty map pages at open (after a log replay), covering every record on the
/// volume, so that the whole log is free again: flush (the replayed runs durable), pages,
/// flush.
fn checkpoint_at_open(
    ch: &mut SyncChannel,
    l: &CompressLayout,
    m: &mut MapState,
    caps: Caps,
) -> Result<(), IoStatus> {
    flush_if(ch, caps)?;
    let mut b = vec![0u8; l.block_size.bytes() as usize];
    for p in 0..l.map_pages {
        if !m.dirty[p as usize] {
            continue;
        }
        let seq = m.page_seq[p as usize] + 1;
        encode_page(&mut b, p, seq, m.last_seq, &m.entries, l);
        let st = ch.write(l.page_block(p, seq % 2), &b);
        if !st.is_ok() {
            return Err(st);
        }
        m.page_seq[p as usize] = seq;
    }
    flush_if(ch, caps)?;
    m.dirty.fill(false);
    m.dirty_count = 0;
    Ok(())
}

/// Upgrades a version-1 volume in place: its map-update log takes the last blocks of its data
/// region, which must be free.
fn upgrade_v1(
    ch: &mut SyncChannel,
    v1: &CompressLayout,
    caps: Caps,
) -> Result<CompressLayout, String> {
    let l = CompressLayout::new(
        v1.block_size,
        v1.chunk_size,
        v1.chunks,
        v1.data_start + v1.data_blocks,
    )
    .ok_or("the version-1 volume is too small for the map-update log of version 2")?;
    let entries = load_pages(ch, v1)?.entries;
    let shift = l.block_size.shift();
    if let Some((chunk, e)) = entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.is_mapped() && e.block + e.blocks(shift) > l.log_start)
    {
        return Err(format!(
            "cannot upgrade the version-1 volume to version 2 in place: the map-update log \
             needs its last {} data blocks (from block {}), but chunk {chunk} is stored at \
             block {}",
            l.log_blocks, l.log_start, e.block
        ));
    }
    let io = |what: &str, st: IoStatus| format!("upgrading to version 2: {what} failed: {st}");
    let (op, _) = zeroing_ops(caps);
    zero_range(ch, l.log_start, l.log_blocks, op).map_err(|st| io("zeroing the log", st))?;
    flush_if(ch, caps).map_err(|st| io("flushing the log", st))?;
    let mut sb = vec![0u8; l.block_size.bytes() as usize];
    l.encode(&mut sb);
    let st = ch.write(0, &sb);
    if !st.is_ok() {
        return Err(io("writing the superblock", st));
    }
    flush_if(ch, caps).map_err(|st| io("flushing the superblock", st))?;
    Ok(l)
}

impl Bdev for CompressBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth().min(MAX_DEPTH);
        let l = self.shared.layout;
        let bs = l.block_size.bytes() as usize;
        let chunk = l.chunk_size as usize;
        let align = (self.base.info().geometry().buf_align as usize).max(4096);
        let stored_len = stored_buf_len(chunk, bs);
        let op_slots = depth * OPS_PER_REQ as usize;
        let ops = CompressChannel {
            shared: self.shared.clone(),
            name: self.info.name().to_string(),
            shift: l.block_size.shift(),
            bs,
            chunk,
            chunk_blocks: (chunk / bs) as u32,
            reqs_capacity: depth,
            reqs: Slots::new(depth),
            ops: Slots::new(op_slots),
            bufs: (0..OP_BUFFERS)
                .map(|_| {
                    (
                        AlignedBuf::with_align(chunk, align),
                        AlignedBuf::with_align(stored_len, align),
                    )
                })
                .collect(),
            lz4_table: lz4_flex::block::CompressTable::large(),
            #[cfg(feature = "zstd")]
            zstd_c: None,
            #[cfg(feature = "zstd")]
            zstd_d: None,
            waiting: VecDeque::with_capacity(depth),
            lock_wait: VecDeque::with_capacity(op_slots),
            space_wait: VecDeque::with_capacity(OP_BUFFERS),
            flushes: VecDeque::with_capacity(depth),
            ckpt: None,
            completed: Vec::with_capacity(depth),
            log_wait: VecDeque::with_capacity(op_slots),
            log: (0..LOG_WRITES_IN_FLIGHT)
                .map(|_| LogBatch {
                    buf: Some(AlignedBuf::with_align(bs, align)),
                    ops: Vec::with_capacity(l.records_per_log_block()),
                    pos: None,
                })
                .collect(),
            log_records: l.records_per_log_block(),
            want_ckpt: false,
            base: BaseQueue::new(base, op_slots + LOG_WRITES_IN_FLIGHT),
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn describe(&self) -> serde_json::Value {
        let l = self.shared.layout;
        let m = self.shared.map();
        let bs = u64::from(l.block_size.bytes());
        let logical_used = m.mapped * u64::from(l.chunk_size);
        let physical_used = m.alloc.used * bs;
        // Space the map points at; blocks of overwritten chunks stay allocated ("pending free")
        // until the next map checkpoint, which says nothing about how well data compresses.
        let physical_live = physical_used.saturating_sub(m.pending_blocks * bs);
        let ratio = if physical_live > 0 {
            serde_json::json!(logical_used as f64 / physical_live as f64)
        } else {
            serde_json::Value::Null
        };
        serde_json::json!({
            "algorithm": self.shared.algorithm.name(),
            "chunk_size": l.chunk_size,
            "logical_size": l.chunks * u64::from(l.chunk_size),
            "chunks": l.chunks,
            "chunks_mapped": m.mapped,
            "chunks_raw": m.raw,
            "chunks_compressed": m.mapped - m.raw,
            "logical_bytes_used": logical_used,
            "physical_bytes_used": physical_used,
            "physical_bytes_live": physical_live,
            "physical_bytes_pending_free": m.pending_blocks * bs,
            "physical_bytes_free": (l.data_blocks - m.alloc.used) * bs,
            "stored_bytes": m.stored_bytes,
            "compression_ratio": ratio,
            "map_start": l.map_start,
            "map_pages": l.map_pages,
            "data_start": l.data_start,
            "data_blocks": l.data_blocks,
            "checkpoints": m.checkpoints,
            "log_start": l.log_start,
            "log_blocks": l.log_blocks,
            "log_block_writes": m.log_writes,
            "integrity_errors": self.integrity_errors(),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqKind {
    Read,
    Write,
    /// Unmap or write-zeroes.
    Zero,
    Flush,
}

struct Req {
    kind: ReqKind,
    /// The caller's request (its buffers stay here; ops copy in and out of them).
    io: IoRequest,
    /// Read / write / zero: blocks handed to ops so far. Flush: the checkpoint snapshot that
    /// must have completed.
    next: u64,
    /// Ops in flight.
    in_flight: u32,
    status: IoStatus,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Waiting for the chunk lock.
    WaitLock,
    /// Reading the stored run.
    ReadOld,
    /// Waiting for a checkpoint to free space.
    WaitSpace,
    /// Writing the new run.
    WriteNew,
    /// Committed in memory; its log record is waiting for, or in, a log block write.
    WaitLog,
}

/// The work on one chunk: it holds the chunk's lock from `WaitLock` to its end.
struct Op {
    req: u32,
    kind: ReqKind,
    chunk: u64,
    /// Blocks of the chunk this op covers: `first .. first + n`.
    first: u32,
    n: u32,
    /// Byte offset of the op's data in the request's buffers.
    req_off: usize,
    stage: Stage,
    /// Plain chunk buffer and stored-data buffer (`None` while in a base request).
    plain: Option<AlignedBuf>,
    stored: Option<AlignedBuf>,
    /// Whether it took buffers from the pool.
    has_bufs: bool,
    old: Entry,
    new: Entry,
    /// Whether the new run's data is in `plain` (raw) rather than `stored`.
    new_raw: bool,
    locked: bool,
    /// Sequence number of its map update (`WaitLog`).
    seq: u64,
}

/// One log block write of a channel: the records of the ops in `ops` (group commit).
struct LogBatch {
    /// The block (`None` while written).
    buf: Option<AlignedBuf>,
    ops: Vec<u32>,
    /// Its log position while written.
    pos: Option<u64>,
}

/// A checkpoint driven by this channel.
struct Ckpt {
    snap: u64,
    /// Sequence number of the last update in the snapshot.
    covered: u64,
    /// The log position at the snapshot: earlier positions hold only covered updates.
    log_pos: u64,
    /// 0: first flush; 1: page writes; 2: second flush.
    step: u8,
    pages: Vec<(u64, u64)>,
    bufs: Vec<Option<AlignedBuf>>,
    next: usize,
    in_flight: usize,
    status: IoStatus,
}

// The low byte of a base request's tag says what it is; the rest is the op slot or page index.
const SUB_READ: u64 = 1;
const SUB_WRITE: u64 = 2;
const SUB_CK_FLUSH: u64 = 3;
const SUB_CK_PAGE: u64 = 4;
const SUB_LOG: u64 = 5;

fn sub_tag(slot: u64, sub: u64) -> u64 {
    slot << 8 | sub
}

/// Whether every byte of `b` is zero (word at a time).
fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; `align_to` returns the aligned middle.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0)
}

struct CompressChannel {
    base: BaseQueue,
    shared: Arc<CompressShared>,
    name: String,
    shift: u32,
    bs: usize,
    chunk: usize,
    chunk_blocks: u32,
    reqs_capacity: usize,
    reqs: Slots<Req>,
    ops: Slots<Op>,
    /// Free buffer pairs (plain chunk, stored data).
    bufs: Vec<(AlignedBuf, AlignedBuf)>,
    lz4_table: lz4_flex::block::CompressTable,
    #[cfg(feature = "zstd")]
    zstd_c: Option<zstd::bulk::Compressor<'static>>,
    #[cfg(feature = "zstd")]
    zstd_d: Option<zstd::bulk::Decompressor<'static>>,
    /// Requests with ops still to create, oldest first.
    waiting: VecDeque<u32>,
    /// Ops waiting for their chunk lock.
    lock_wait: VecDeque<u32>,
    /// Ops waiting for space.
    space_wait: VecDeque<u32>,
    /// Flush requests waiting for their checkpoint.
    flushes: VecDeque<u32>,
    ckpt: Option<Ckpt>,
    /// Requests finished outside `poll`, handed out by the next one.
    completed: Vec<IoCompletion>,
    /// Committed ops waiting for their log record to be written, oldest first.
    log_wait: VecDeque<u32>,
    /// Log block writes (free when `pos` is `None`).
    log: Vec<LogBatch>,
    /// Records per log block.
    log_records: usize,
    /// The log is half full (or full): start a checkpoint.
    want_ckpt: bool,
}

impl CompressChannel {
    fn ops_capacity(&self) -> usize {
        self.reqs_capacity * OPS_PER_REQ as usize
    }

    /// Creates ops of request `slot` while resources last; true when it has none left to create.
    fn pump_req(&mut self, slot: u32) -> bool {
        loop {
            let r = self.reqs.get(slot);
            let total = u64::from(r.io.num_blocks);
            if r.next == total || !r.status.is_ok() {
                return true;
            }
            if r.in_flight >= OPS_PER_REQ || !self.ops.has_room() {
                return false;
            }
            let lba = r.io.offset_blocks + r.next;
            let cb = u64::from(self.chunk_blocks);
            let chunk = lba / cb;
            let first = (lba % cb) as u32;
            let n = (total - r.next).min(cb - u64::from(first)) as u32;
            let kind = r.kind;
            let full = n == self.chunk_blocks;
            let need_bufs = !(kind == ReqKind::Zero && full);
            if need_bufs && self.bufs.is_empty() {
                return false;
            }
            let (plain, stored) = if need_bufs {
                let (p, s) = self.bufs.pop().expect("checked");
                (Some(p), Some(s))
            } else {
                (None, None)
            };
            let req_off = (r.next as usize) << self.shift;
            let r = self.reqs.get_mut(slot);
            r.next += u64::from(n);
            r.in_flight += 1;
            let op = self
                .ops
                .insert(Op {
                    req: slot,
                    kind,
                    chunk,
                    first,
                    n,
                    req_off,
                    stage: Stage::WaitLock,
                    plain,
                    stored,
                    has_bufs: need_bufs,
                    old: Entry::default(),
                    new: Entry::default(),
                    new_raw: false,
                    locked: false,
                    seq: 0,
                })
                .map_err(|_| ())
                .expect("room checked");
            if !self.try_start(op) {
                self.lock_wait.push_back(op);
            }
            if !self.reqs.contains(slot) {
                // Its last op finished at once (a read of unmapped chunks): completed.
                return true;
            }
        }
    }

    fn pump_waiting(&mut self) {
        while let Some(&slot) = self.waiting.front() {
            if !self.pump_req(slot) {
                break;
            }
            // A request that completed while its last ops were created left the queue already.
            if self.waiting.front() == Some(&slot) {
                self.waiting.pop_front();
            }
        }
    }

    /// Takes the op's chunk lock and starts it; false if the lock is busy.
    fn try_start(&mut self, slot: u32) -> bool {
        let o = self.ops.get(slot);
        let write = o.kind != ReqKind::Read;
        if !self.shared.chunk_locks.try_lock(o.chunk, 1, write) {
            return false;
        }
        let old = self.shared.map().entries[o.chunk as usize];
        let o = self.ops.get_mut(slot);
        o.locked = true;
        o.old = old;
        let full = o.n == self.chunk_blocks;
        match (o.kind, old.is_mapped()) {
            (ReqKind::Read, false) => {
                let (req, off, len) = (o.req, o.req_off, (o.n as usize) << self.shift);
                zero_sg(&mut self.reqs.get_mut(req).io.bufs, off, len);
                self.finish_op(slot, IoStatus::Success);
            }
            (ReqKind::Read, true) => self.read_old(slot),
            (_, true) if !full => self.read_old(slot),
            (_, mapped) => {
                // A whole chunk is replaced, or a part of a never-written one is written.
                if !full && !mapped {
                    let p = o.plain.as_mut().expect("plain buffer");
                    p.as_mut_slice()[..self.chunk].fill(0);
                }
                self.modify_and_store(slot);
            }
        }
        true
    }

    fn read_old(&mut self, slot: u32) {
        let o = self.ops.get_mut(slot);
        o.stage = Stage::ReadOld;
        let n = o.old.blocks(self.shift) as u32;
        let len = (n as usize) << self.shift;
        let buf = o.stored.take().expect("stored buffer");
        let io = IoRequest::read(
            o.old.block,
            n,
            SgList::from_buf_prefix(buf, len),
            sub_tag(u64::from(slot), SUB_READ),
        );
        self.base.submit(io);
    }

    /// Verifies the stored run in `stored` and decodes it into `plain` (raw runs are copied).
    fn decode_old(&mut self, slot: u32) -> bool {
        let chunk = self.chunk;
        let o = self.ops.get_mut(slot);
        let e = o.old;
        let stored = &o.stored.as_ref().expect("stored buffer").as_slice()[..e.len as usize];
        if crate::checksum::crc32c(stored) != e.crc {
            return false;
        }
        let plain = &mut o.plain.as_mut().expect("plain buffer").as_mut_slice()[..chunk];
        let got = match e.kind {
            K_RAW => {
                plain.copy_from_slice(stored);
                Ok(chunk)
            }
            K_LZ4 => lz4_flex::block::decompress_into(stored, plain).map_err(|e| e.to_string()),
            #[cfg(not(feature = "zstd"))]
            _ => Err("a zstd chunk, and this build has no zstd".to_string()),
            #[cfg(feature = "zstd")]
            _ => {
                let d = match &mut self.zstd_d {
                    Some(d) => d,
                    None => match zstd::bulk::Decompressor::new() {
                        Ok(d) => self.zstd_d.insert(d),
                        Err(e) => {
                            tracing::error!(error = %e, "creating a zstd decompressor failed");
                            return false;
                        }
                    },
                };
                d.decompress_to_buffer(stored, plain)
                    .map_err(|e| e.to_string())
            }
        };
        got == Ok(chunk)
    }

    fn integrity_failure(&self, chunk: u64) {
        self.shared.integrity_errors.fetch_add(1, Ordering::Relaxed);
        // At debug level: a broken base must not flood the log.
        tracing::debug!(bdev = %self.name, chunk, "compressed chunk failed its check");
    }

    /// The old run of a read or partial write is in: verify, decode, then copy out (read) or
    /// overlay and store (write).
    fn old_read_done(&mut self, slot: u32, status: IoStatus) {
        if !status.is_ok() {
            self.finish_op(slot, status);
            return;
        }
        if !self.decode_old(slot) {
            let chunk = self.ops.get(slot).chunk;
            self.integrity_failure(chunk);
            self.finish_op(slot, IoStatus::IntegrityError);
            return;
        }
        let o = self.ops.get(slot);
        if o.kind == ReqKind::Read {
            let off = (o.first as usize) << self.shift;
            let len = (o.n as usize) << self.shift;
            let (req, req_off) = (o.req, o.req_off);
            let plain = &o.plain.as_ref().expect("plain buffer").as_slice()[off..off + len];
            self.reqs
                .get_mut(req)
                .io
                .bufs
                .copy_from_slice(req_off, plain);
            self.finish_op(slot, IoStatus::Success);
        } else {
            self.modify_and_store(slot);
        }
    }

    /// Overlays the op's new data on `plain` (a write copies the caller's, a zero op zeroes),
    /// then compresses it and writes it to a new run, or commits an unmapped entry.
    fn modify_and_store(&mut self, slot: u32) {
        let o = self.ops.get_mut(slot);
        let Some(plain) = o.plain.as_mut() else {
            // A whole chunk unmapped: no data at all.
            o.new = Entry::default();
            self.commit(slot);
            return;
        };
        let off = (o.first as usize) << self.shift;
        let len = (o.n as usize) << self.shift;
        let p = &mut plain.as_mut_slice()[off..off + len];
        if o.kind == ReqKind::Write {
            self.reqs.get(o.req).io.bufs.copy_to_slice(o.req_off, p);
        } else {
            p.fill(0);
        }
        let plain = &o.plain.as_ref().expect("plain buffer").as_slice()[..self.chunk];
        if is_zero(plain) {
            o.new = Entry::default();
            self.commit(slot);
            return;
        }
        // Compress into `stored`; keep it only if it saves at least one block.
        let limit = self.chunk - self.bs;
        let stored = o.stored.as_mut().expect("stored buffer").as_mut_slice();
        let packed = match self.shared.algorithm {
            Algorithm::Lz4 => {
                lz4_flex::block::compress_into_with_table(plain, stored, &mut self.lz4_table)
                    .ok()
                    .map(|n| (n, K_LZ4))
            }
            // Refused by `CompressOptions::validate`: stored raw if it ever got here.
            #[cfg(not(feature = "zstd"))]
            Algorithm::Zstd => None,
            #[cfg(feature = "zstd")]
            Algorithm::Zstd => {
                let level = self.shared.zstd_level;
                let c = match &mut self.zstd_c {
                    Some(c) => Some(c),
                    None => match zstd::bulk::Compressor::new(level) {
                        Ok(c) => Some(self.zstd_c.insert(c)),
                        Err(e) => {
                            tracing::error!(error = %e, "creating a zstd compressor failed");
                            None
                        }
                    },
                };
                c.and_then(|c| c.compress_to_buffer(plain, &mut stored[..]).ok())
                    .map(|n| (n, K_ZSTD))
            }
        };
        let new = match packed {
            Some((n, kind)) if n <= limit => {
                let padded = n.next_multiple_of(self.bs);
                stored[n..padded].fill(0);
                o.new_raw = false;
                Entry {
                    block: 0,
                    len: n as u32,
                    kind,
                    crc: crate::checksum::crc32c(&stored[..n]),
                }
            }
            _ => {
                o.new_raw = true;
                Entry {
                    block: 0,
                    len: self.chunk as u32,
                    kind: K_RAW,
                    crc: crate::checksum::crc32c(plain),
                }
            }
        };
        o.new = new;
        self.allocate_and_write(slot);
    }

    /// Allocates the new run and writes it; waits for a checkpoint when space is only pending;
    /// fails with `NoSpace` when there is none.
    fn allocate_and_write(&mut self, slot: u32) {
        let o = self.ops.get(slot);
        let blocks = o.new.blocks(self.shift);
        // Only overwrites may use the reserve: it lets them proceed (copy-on-write needs room
        // for the new run before the old one is freed) when new chunks have filled the base.
        let reserve = if o.old.is_mapped() {
            0
        } else {
            self.shared.reserve_blocks
        };
        let got = {
            let mut m = self.shared.map();
            let free = m.alloc.blocks - m.alloc.used;
            let run = if blocks + reserve <= free {
                m.alloc.alloc(blocks)
            } else {
                None
            };
            match run {
                Some(first) => {
                    m.in_flight_blocks += blocks;
                    Ok(first)
                }
                None => Err(m.pending_blocks > 0 || m.running),
            }
        };
        match got {
            Ok(first) => {
                let data_start = self.shared.layout.data_start;
                let o = self.ops.get_mut(slot);
                o.stage = Stage::WriteNew;
                o.new.block = data_start + first;
                let len = (blocks as usize) << self.shift;
                let buf = if o.new_raw {
                    o.plain.take()
                } else {
                    o.stored.take()
                }
                .expect("buffer");
                let io = IoRequest::write(
                    o.new.block,
                    blocks as u32,
                    SgList::from_buf_prefix(buf, len),
                    sub_tag(u64::from(slot), SUB_WRITE),
                );
                self.base.submit(io);
            }
            Err(true) => {
                self.ops.get_mut(slot).stage = Stage::WaitSpace;
                self.space_wait.push_back(slot);
            }
            Err(false) => self.finish_op(slot, IoStatus::NoSpace),
        }
    }

    /// Points the map at the op's new entry (its run, if any, is written) and frees the old run
    /// once that is durable.
    fn commit(&mut self, slot: u32) {
        let o = self.ops.get(slot);
        let (chunk, old, new) = (o.chunk, o.old, o.new);
        let l = self.shared.layout;
        let seq = {
            let mut m = self.shared.map();
            debug_assert_eq!(
                m.entries[chunk as usize], old,
                "entry changed under its lock"
            );
            if old != new {
                m.entries[chunk as usize] = new;
                m.account(&old, false);
                m.account(&new, true);
                if new.is_mapped() {
                    m.in_flight_blocks -= new.blocks(self.shift);
                }
                if old.is_mapped() {
                    let tag = m.epoch;
                    let blocks = old.blocks(self.shift);
                    m.pending.push_back(Pending {
                        tag,
                        first: old.block - l.data_start,
                        blocks,
                    });
                    m.pending_blocks += blocks;
                }
                m.mark_dirty(chunk / l.entries_per_page);
                m.last_seq += 1;
                Some(m.last_seq)
            } else {
                None
            }
        };
        let Some(seq) = seq else {
            self.finish_op(slot, IoStatus::Success);
            return;
        };
        // Acknowledged only once its record is in the log on the base: the in-memory map must
        // not be all that knows of a completed write (a killed daemon would lose it).
        let o = self.ops.get_mut(slot);
        o.seq = seq;
        o.stage = Stage::WaitLog;
        if o.has_bufs {
            o.has_bufs = false;
            let bufs = (
                o.plain.take().expect("plain buffer"),
                o.stored.take().expect("stored buffer"),
            );
            self.bufs.push(bufs);
        }
        self.log_wait.push_back(slot);
    }

    /// Writes the records of the ops waiting for the log, up to a block per free log write
    /// (group commit: every op committed since the last log write shares the next one). Ops
    /// whose update a durable checkpoint already covers finish without a record. A full log
    /// waits for a checkpoint; a half-full one asks for one.
    fn pump_log(&mut self) {
        let l = self.shared.layout;
        while !self.log_wait.is_empty() {
            let Some(i) = self.log.iter().position(|b| b.pos.is_none()) else {
                return;
            };
            let (covered, pos) = {
                let mut m = self.shared.map();
                let pos = m.log_next;
                let used = pos - m.log_reusable;
                if 2 * (used + 1) >= l.log_blocks && !m.running {
                    self.want_ckpt = true;
                }
                let idx = (pos % l.log_blocks) as usize;
                let free = used < l.log_blocks && !m.log_busy[idx];
                let covered = m.covered_durable;
                let any = self.log_wait.iter().any(|&o| self.ops.get(o).seq > covered);
                if free && any {
                    m.log_next += 1;
                    m.log_busy[idx] = true;
                    m.log_writes += 1;
                    (covered, Some(pos))
                } else {
                    (covered, None)
                }
            };
            for _ in 0..self.log_wait.len() {
                let slot = self.log_wait.pop_front().expect("counted");
                if self.ops.get(slot).seq <= covered {
                    self.finish_op(slot, IoStatus::Success);
                } else {
                    self.log_wait.push_back(slot);
                }
            }
            let Some(pos) = pos else {
                if !self.log_wait.is_empty() {
                    self.want_ckpt = true;
                }
                return;
            };
            let batch = &mut self.log[i];
            let mut buf = batch.buf.take().expect("log buffer");
            let b = buf.as_mut_slice();
            let mut count = 0;
            while count < self.log_records {
                let Some(slot) = self.log_wait.pop_front() else {
                    break;
                };
                let o = self.ops.get(slot);
                let at = LOG_HEADER + count * RECORD_BYTES;
                encode_record(&mut b[at..at + RECORD_BYTES], o.chunk, o.seq, &o.new);
                batch.ops.push(slot);
                count += 1;
            }
            seal_log_block(b, count, pos);
            batch.pos = Some(pos);
            let io = IoRequest::write(
                l.log_start + pos % l.log_blocks,
                1,
                SgList::from_buf(buf),
                sub_tag(i as u64, SUB_LOG),
            );
            self.base.submit(io);
        }
    }

    /// A log block write completed: its ops are done.
    fn log_done(&mut self, c: IoCompletion) {
        let i = (c.tag >> 8) as usize;
        let l = self.shared.layout;
        let batch = &mut self.log[i];
        batch.buf = c.bufs.into_buf();
        let pos = batch.pos.take().expect("log write in flight");
        let mut ops = std::mem::take(&mut batch.ops);
        self.shared.map().log_busy[(pos % l.log_blocks) as usize] = false;
        if !c.status.is_ok() {
            tracing::warn!(bdev = %self.name, status = %c.status, "map-update log write failed");
        }
        for &slot in &ops {
            self.finish_op(slot, c.status);
        }
        ops.clear();
        self.log[i].ops = ops;
    }

    /// The new run's write completed.
    fn new_write_done(&mut self, slot: u32, status: IoStatus) {
        if status.is_ok() {
            self.commit(slot);
            return;
        }
        let o = self.ops.get(slot);
        let (first, blocks) = (
            o.new.block - self.shared.layout.data_start,
            o.new.blocks(self.shift),
        );
        {
            // Never in the map: free at once.
            let mut m = self.shared.map();
            m.alloc.free(first, blocks);
            m.in_flight_blocks -= blocks;
        }
        self.finish_op(slot, status);
    }

    /// Ends an op: releases its lock and buffers; completes its request if that was the last.
    fn finish_op(&mut self, slot: u32, status: IoStatus) {
        let o = self.ops.remove(slot);
        if o.locked {
            self.shared
                .chunk_locks
                .unlock(o.chunk, 1, o.kind != ReqKind::Read);
        }
        if o.has_bufs {
            self.bufs.push((
                o.plain.expect("plain buffer back"),
                o.stored.expect("stored buffer back"),
            ));
        }
        let r = self.reqs.get_mut(o.req);
        r.in_flight -= 1;
        if !status.is_ok() && r.status.is_ok() {
            r.status = status;
        }
        if r.in_flight == 0 && (r.next == u64::from(r.io.num_blocks) || !r.status.is_ok()) {
            self.waiting.retain(|&s| s != o.req);
            let r = self.reqs.remove(o.req);
            if !r.status.is_ok() && r.kind == ReqKind::Read {
                let mut bufs = r.io.bufs;
                bufs.fill_zero();
                self.completed.push(IoCompletion {
                    tag: r.io.tag,
                    status: r.status,
                    bufs,
                });
            } else {
                self.completed.push(r.io.complete(r.status));
            }
        }
    }

    /// Takes a snapshot of the dirty map pages and starts a checkpoint; false if one is running.
    fn start_checkpoint(&mut self) -> bool {
        let l = self.shared.layout;
        let ck = {
            let mut m = self.shared.map();
            if m.running {
                return false;
            }
            m.running = true;
            let snap = m.epoch;
            m.epoch += 1;
            let (covered, log_pos) = (m.last_seq, m.log_next);
            let mut pages = Vec::with_capacity(m.dirty_count);
            let mut bufs = Vec::with_capacity(m.dirty_count);
            for p in 0..l.map_pages {
                if !m.dirty[p as usize] {
                    continue;
                }
                m.dirty[p as usize] = false;
                let seq = m.page_seq[p as usize] + 1;
                let mut b = AlignedBuf::with_align(self.bs, 4096);
                encode_page(b.as_mut_slice(), p, seq, covered, &m.entries, &l);
                pages.push((p, seq));
                bufs.push(Some(b));
            }
            m.dirty_count = 0;
            Ckpt {
                snap,
                covered,
                log_pos,
                step: 0,
                pages,
                bufs,
                next: 0,
                in_flight: 0,
                status: IoStatus::Success,
            }
        };
        self.ckpt = Some(ck);
        self.ckpt_flush();
        true
    }

    fn ckpt_flush(&mut self) {
        if self.shared.base_flush {
            let io = IoRequest::no_data(IoType::Flush, 0, 0, sub_tag(0, SUB_CK_FLUSH));
            self.base.submit(io);
        } else {
            let c = IoCompletion {
                tag: sub_tag(0, SUB_CK_FLUSH),
                status: IoStatus::Success,
                bufs: SgList::empty(),
            };
            self.ckpt_step(c);
        }
    }

    /// Issues page writes of the running checkpoint while under the in-flight bound.
    fn ckpt_pages(&mut self) {
        let l = self.shared.layout;
        loop {
            let ck = self.ckpt.as_mut().expect("checkpoint");
            if ck.next == ck.pages.len() || ck.in_flight >= PAGE_WRITES_IN_FLIGHT {
                break;
            }
            let i = ck.next;
            ck.next += 1;
            ck.in_flight += 1;
            let (page, seq) = ck.pages[i];
            let buf = ck.bufs[i].take().expect("page buffer");
            let io = IoRequest::write(
                l.page_block(page, seq % 2),
                1,
                SgList::from_buf(buf),
                sub_tag(i as u64, SUB_CK_PAGE),
            );
            self.base.submit(io);
        }
    }

    /// Advances the running checkpoint with one of its base completions.
    fn ckpt_step(&mut self, c: IoCompletion) {
        let ck = self.ckpt.as_mut().expect("checkpoint");
        if !c.status.is_ok() && ck.status.is_ok() {
            ck.status = c.status;
        }
        let sub = c.tag & 0xff;
        if sub == SUB_CK_PAGE {
            ck.in_flight -= 1;
            ck.bufs[(c.tag >> 8) as usize] = c.bufs.into_buf();
            if ck.in_flight > 0 || (ck.next < ck.pages.len() && ck.status.is_ok()) {
                if ck.status.is_ok() {
                    self.ckpt_pages();
                }
                return;
            }
            if !ck.status.is_ok() {
                self.end_checkpoint();
                return;
            }
            ck.step = 2;
            self.ckpt_flush();
            return;
        }
        // A flush.
        if !ck.status.is_ok() {
            self.end_checkpoint();
            return;
        }
        if ck.step == 0 {
            ck.step = 1;
            if ck.pages.is_empty() {
                self.end_checkpoint();
            } else {
                self.ckpt_pages();
            }
        } else {
            self.end_checkpoint();
        }
    }

    /// Ends the running checkpoint: on success the snapshot is durable and the runs it freed
    /// become free; on failure its pages are dirty again.
    fn end_checkpoint(&mut self) {
        let ck = self.ckpt.take().expect("checkpoint");
        let mut m = self.shared.map();
        m.running = false;
        if ck.status.is_ok() {
            m.durable = ck.snap;
            m.checkpoints += 1;
            m.covered_durable = m.covered_durable.max(ck.covered);
            m.log_reusable = m.log_reusable.max(ck.log_pos);
            for &(page, seq) in &ck.pages {
                m.page_seq[page as usize] = seq;
            }
            while m.pending.front().is_some_and(|p| p.tag <= ck.snap) {
                let p = m.pending.pop_front().expect("front exists");
                m.alloc.free(p.first, p.blocks);
                m.pending_blocks -= p.blocks;
            }
        } else {
            tracing::warn!(bdev = %self.name, status = %ck.status, "checkpoint failed");
            for &(page, _) in &ck.pages {
                m.mark_dirty(page);
            }
        }
        drop(m);
        // Fail this channel's flushes that counted on it.
        if !ck.status.is_ok() {
            for _ in 0..self.flushes.len() {
                let slot = self.flushes.pop_front().expect("counted");
                if self.reqs.get(slot).next <= ck.snap {
                    let r = self.reqs.remove(slot);
                    self.completed.push(r.io.complete(ck.status));
                } else {
                    self.flushes.push_back(slot);
                }
            }
        }
    }

    /// Completes flushes whose checkpoint is durable, starts a checkpoint if one is needed and
    /// none runs, and retries ops waiting for space.
    fn service(&mut self) {
        if self.flushes.is_empty() && self.space_wait.is_empty() && !self.want_ckpt {
            return;
        }
        let (durable, running, pending) = {
            let m = self.shared.map();
            (m.durable, m.running, m.pending_blocks)
        };
        for _ in 0..self.flushes.len() {
            let slot = self.flushes.pop_front().expect("counted");
            if self.reqs.get(slot).next <= durable {
                let r = self.reqs.remove(slot);
                self.completed.push(r.io.complete(IoStatus::Success));
            } else {
                self.flushes.push_back(slot);
            }
        }
        if !running && self.ckpt.is_none() && (!self.flushes.is_empty() || self.want_ckpt) {
            self.want_ckpt = false;
            self.start_checkpoint();
            return;
        }
        if running {
            // The running checkpoint frees the log; a log still full asks again.
            self.want_ckpt = false;
        }
        if self.space_wait.is_empty() || running {
            return;
        }
        // No checkpoint runs: allocate, or start one to free the pending runs.
        for _ in 0..self.space_wait.len() {
            let slot = self.space_wait.pop_front().expect("counted");
            self.allocate_and_write(slot);
        }
        if !self.space_wait.is_empty() && pending > 0 && self.ckpt.is_none() {
            self.start_checkpoint();
        }
    }
}

/// Zeroes `len` bytes of `bufs` from byte `off`.
fn zero_sg(bufs: &mut SgList, off: usize, len: usize) {
    const Z: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(Z.len());
        bufs.copy_from_slice(off + done, &Z[..n]);
        done += n;
    }
}

impl ChannelOps for CompressChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        if !self.reqs.has_room() {
            return Err(io);
        }
        let kind = match io.io_type {
            IoType::Read => ReqKind::Read,
            IoType::Write => ReqKind::Write,
            IoType::Unmap | IoType::WriteZeroes => ReqKind::Zero,
            IoType::Flush => ReqKind::Flush,
        };
        let next = if kind == ReqKind::Flush {
            // The snapshot that covers every update so far: the running (or last) one when no
            // page is dirty, else the next one.
            let m = self.shared.map();
            if m.dirty_count == 0 {
                m.epoch - 1
            } else {
                m.epoch
            }
        } else {
            0
        };
        let slot = self
            .reqs
            .insert(Req {
                kind,
                io,
                next,
                in_flight: 0,
                status: IoStatus::Success,
            })
            .map_err(|r| r.io)?;
        if kind == ReqKind::Flush {
            self.flushes.push_back(slot);
            self.service();
        } else {
            self.waiting.push_back(slot);
            self.pump_waiting();
            self.pump_log();
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let start = done.len();
        let mut completions = self.base.poll();
        for c in completions.drain(..) {
            let slot = (c.tag >> 8) as u32;
            match c.tag & 0xff {
                SUB_READ => {
                    let o = self.ops.get_mut(slot);
                    o.stored = c.bufs.into_buf();
                    self.old_read_done(slot, c.status);
                }
                SUB_WRITE => {
                    let o = self.ops.get_mut(slot);
                    if o.new_raw {
                        o.plain = c.bufs.into_buf();
                    } else {
                        o.stored = c.bufs.into_buf();
                    }
                    self.new_write_done(slot, c.status);
                }
                SUB_CK_FLUSH | SUB_CK_PAGE => self.ckpt_step(c),
                SUB_LOG => self.log_done(c),
                sub => unreachable!("unknown sub-request {sub}"),
            }
        }
        self.base.recycle(completions);
        for _ in 0..self.lock_wait.len() {
            let slot = self.lock_wait.pop_front().expect("counted");
            if !self.try_start(slot) {
                self.lock_wait.push_back(slot);
            }
        }
        self.pump_waiting();
        self.pump_log();
        self.service();
        done.append(&mut self.completed);
        done.len() - start
    }

    fn wake(&self) -> Wake {
        let can_pump = self.waiting.front().is_some_and(|&s| {
            self.reqs.get(s).in_flight < OPS_PER_REQ && self.ops.has_room() && !self.bufs.is_empty()
        });
        let waits_on_others = self.ckpt.is_none()
            && (!self.flushes.is_empty() || !self.space_wait.is_empty() || self.want_ckpt);
        let can_log = !self.log_wait.is_empty() && self.log.iter().any(|b| b.pos.is_none());
        if !self.completed.is_empty()
            || !self.lock_wait.is_empty()
            || can_pump
            || waits_on_others
            || can_log
        {
            Wake::Immediate
        } else {
            self.base.wake()
        }
    }
}

impl Drop for CompressChannel {
    /// Drives the ops and the checkpoint this channel has in flight to their end (their buffers
    /// and the map's bookkeeping are this channel's), then releases what is left, so that a
    /// channel closed mid-request never blocks the others.
    fn drop(&mut self) {
        self.waiting.clear();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut sink = Vec::new();
        while (self.ops.free_slots() < self.ops_capacity()
            || self.ckpt.is_some()
            || self.base.channel().in_flight() > 0)
            && Instant::now() < deadline
        {
            if ChannelOps::poll(self, &mut sink) == 0 && self.base.channel().in_flight() > 0 {
                idle_wait(self.base.channel().wake());
            }
            sink.clear();
        }
        if self.base.channel().in_flight() > 0 {
            tracing::error!(bdev = %self.name,
                "compress channel closed with base I/O still in flight; keeping its locks");
            return;
        }
        for o in self.ops.iter() {
            if o.locked {
                self.shared
                    .chunk_locks
                    .unlock(o.chunk, 1, o.kind != ReqKind::Read);
            }
        }
        if let Some(ck) = self.ckpt.take() {
            let mut m = self.shared.map();
            m.running = false;
            for &(page, _) in &ck.pages {
                m.mark_dirty(page);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::testing::{Rng, file, malloc, write_alternate_blocks_from_two_channels};

    /// A block whose first `random` bytes are pseudo-random and the rest a repeated byte: about
    /// `bs / random` to one compressible.
    fn block(seed: u64, bs: usize, random: usize) -> Vec<u8> {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for _ in 0..4 {
            r.next();
        }
        let mut v: Vec<u8> = (0..bs).map(|_| r.next() as u8).collect();
        v[random..].fill(seed as u8 | 1);
        v
    }

    fn opts(size: u64) -> CompressOptions {
        CompressOptions::new(size)
    }

    fn file_base(path: &std::path::Path, blocks: u64) -> Arc<dyn Bdev> {
        file(path, BlockSize::B4096, blocks)
    }

    fn describe_u64(c: &CompressBdev, key: &str) -> u64 {
        c.describe()[key].as_u64().unwrap()
    }

    #[test]
    fn allocator_finds_runs_and_wraps() {
        let mut a = Allocator::new(200);
        assert_eq!(a.alloc(10), Some(0));
        assert_eq!(a.alloc(60), Some(10));
        assert_eq!(a.alloc(100), Some(70));
        assert_eq!(a.alloc(40), None, "only 30 left");
        assert_eq!(a.alloc(30), Some(170));
        a.free(10, 60);
        assert_eq!(a.alloc(64), None, "no run of 64");
        assert_eq!(a.alloc(60), Some(10), "wraps to the freed run");
        assert_eq!(a.used, 200);
        assert!(!a.mark(5, 1));
    }

    #[test]
    fn entries_and_pages_round_trip() {
        let e = Entry {
            block: 0x0012_3456_789a,
            len: 5000,
            kind: K_LZ4,
            crc: 0xdead_beef,
        };
        let mut b = [0u8; 16];
        e.encode(&mut b);
        assert_eq!(Entry::decode(&b), e);
        let l = CompressLayout::new(BlockSize::B4096, 16384, 1000, 10_000).unwrap();
        assert_eq!(l.entries_per_page, 254);
        assert_eq!(l.map_pages, 4);
        assert_eq!(l.data_start, 9);
        assert_eq!(l.log_blocks, (10_000 - 9) / 16);
        assert_eq!(l.log_start + l.log_blocks, 10_000);
        assert_eq!(l.data_start + l.data_blocks, l.log_start);
        let mut entries = vec![Entry::default(); 1000];
        entries[300] = e;
        let mut page = vec![0u8; 4096];
        encode_page(&mut page, 1, 7, 5, &entries, &l);
        assert_eq!(valid_page(&page, 1), Some(7));
        assert_eq!(valid_page(&page, 2), None, "misdirected");
        let (p, off) = l.entry_of(300);
        assert_eq!(p, 1);
        assert_eq!(Entry::decode(&page[off..off + 16]), e);
        page[100] ^= 1;
        assert_eq!(valid_page(&page, 1), None, "torn");
        assert_eq!(valid_page(&[0u8; 4096], 3), Some(0));
        let mut sb = vec![0u8; 4096];
        l.encode(&mut sb);
        assert_eq!(CompressLayout::decode(&sb), Ok((l, false)));
        let mut rec = [0u8; 4096];
        encode_record(&mut rec[LOG_HEADER..LOG_HEADER + RECORD_BYTES], 300, 9, &e);
        seal_log_block(&mut rec, 1, 0);
        assert_eq!(valid_log_block(&rec, l.records_per_log_block()), Some(1));
        rec[LOG_HEADER + 3] ^= 1;
        assert_eq!(
            valid_log_block(&rec, l.records_per_log_block()),
            None,
            "torn"
        );
    }

    #[test]
    fn compress_passes_conformance_over_malloc() {
        conformance::run(
            &|| {
                Arc::new(
                    CompressBdev::open("z", malloc(BlockSize::B4096, 2048), &opts(16 << 20))
                        .unwrap(),
                )
            },
            false,
        );
        let mut o = opts(4 << 20);
        o.chunk_size = 4096;
        conformance::run(
            &|| Arc::new(CompressBdev::open("z", malloc(BlockSize::B512, 16384), &o).unwrap()),
            false,
        );
        #[cfg(feature = "zstd")]
        {
            let mut o = opts(8 << 20);
            o.algorithm = Algorithm::Zstd;
            o.chunk_size = 64 << 10;
            conformance::run(
                &|| Arc::new(CompressBdev::open("z", malloc(BlockSize::B4096, 4096), &o).unwrap()),
                false,
            );
        }
    }

    #[test]
    fn zstd_is_refused_naming_algorithm_only_in_a_build_without_it() {
        let mut o = opts(4 << 20);
        o.algorithm = Algorithm::Zstd;
        let r = CompressBdev::open("z", malloc(BlockSize::B4096, 2048), &o);
        if cfg!(feature = "zstd") {
            assert!(r.is_ok(), "{:?}", r.err());
        } else {
            let e = r.err().expect("zstd refused");
            assert_eq!(e.field(), Some("algorithm"));
            assert!(e.to_string().contains("`zstd` feature"), "{e}");
        }
    }

    #[test]
    fn compress_passes_conformance_over_file_with_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.img");
        let open = || -> Arc<dyn Bdev> {
            Arc::new(CompressBdev::open("z", file_base(&path, 1024), &opts(8 << 20)).unwrap())
        };
        conformance::run(&open, true);
        let z = CompressBdev::open("z", file_base(&path, 1024), &opts(8 << 20)).unwrap();
        z.check_consistency().unwrap();
    }

    #[test]
    fn data_of_ratio_two_takes_half_the_space() {
        for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
            if algorithm == Algorithm::Zstd && !cfg!(feature = "zstd") {
                continue;
            }
            let mut o = opts(16 << 20);
            o.algorithm = algorithm;
            let z = CompressBdev::open("z", malloc(BlockSize::B4096, 4096), &o).unwrap();
            let mut ch = SyncChannel::new(z.open_channel().unwrap());
            let blocks = 2048u64;
            for lba in (0..blocks).step_by(16) {
                // Somewhat less than half random, so that a chunk fits in half its blocks.
                let data: Vec<u8> = (lba..lba + 16).flat_map(|b| block(b, 4096, 1900)).collect();
                assert_eq!(ch.write(lba, &data), IoStatus::Success);
            }
            let d = z.describe();
            let logical = d["logical_bytes_used"].as_u64().unwrap();
            let physical = d["physical_bytes_used"].as_u64().unwrap();
            let ratio = d["compression_ratio"].as_f64().unwrap();
            assert_eq!(logical, blocks * 4096);
            assert!(
                (1.9..=2.0).contains(&ratio),
                "{algorithm:?}: ratio {ratio} ({logical} -> {physical})"
            );
            assert_eq!(d["chunks_raw"], 0);
            for lba in (0..blocks).step_by(13) {
                assert_eq!(ch.read(lba, 1), (IoStatus::Success, block(lba, 4096, 1900)));
            }
            z.check_consistency().unwrap();
        }
    }

    #[test]
    fn incompressible_chunks_are_raw_and_zero_chunks_take_no_space() {
        let z = CompressBdev::open("z", malloc(BlockSize::B4096, 1024), &opts(8 << 20)).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        let random: Vec<u8> = (0..8).flat_map(|b| block(b + 1, 4096, 4096)).collect();
        assert_eq!(ch.write(0, &random), IoStatus::Success);
        assert_eq!(ch.write(8, &vec![0u8; 8 * 4096]), IoStatus::Success);
        let d = z.describe();
        assert_eq!(d["chunks_raw"], 2);
        assert_eq!(d["chunks_mapped"], 2);
        assert_eq!(d["physical_bytes_used"], 8 * 4096);
        assert_eq!(ch.read(0, 8), (IoStatus::Success, random));
        // A zero write over data unmaps it.
        assert_eq!(ch.write(4, &vec![0u8; 4 * 4096]), IoStatus::Success);
        assert_eq!(z.describe()["chunks_mapped"], 1);
        z.check_consistency().unwrap();
    }

    #[test]
    fn unmap_and_overwrites_free_space_once_durable() {
        let z = CompressBdev::open("z", malloc(BlockSize::B4096, 1024), &opts(8 << 20)).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        let data: Vec<u8> = (0..64).flat_map(|b| block(b, 4096, 4096)).collect();
        assert_eq!(ch.write(0, &data), IoStatus::Success);
        let free0 = describe_u64(&z, "physical_bytes_free");
        // Overwrite: the new runs take space, the old ones wait for a durable map.
        assert_eq!(ch.write(0, &data), IoStatus::Success);
        assert_eq!(describe_u64(&z, "physical_bytes_pending_free"), 64 * 4096);
        assert_eq!(describe_u64(&z, "physical_bytes_free"), free0 - 64 * 4096);
        z.check_consistency().unwrap();
        assert_eq!(ch.flush(), IoStatus::Success);
        assert_eq!(describe_u64(&z, "physical_bytes_pending_free"), 0);
        assert_eq!(describe_u64(&z, "physical_bytes_free"), free0);
        // Unmap half (and part of a chunk: read-modify-write), then flush.
        assert_eq!(ch.unmap(30, 34), IoStatus::Success);
        assert_eq!(ch.flush(), IoStatus::Success);
        assert_eq!(describe_u64(&z, "chunks_mapped"), 8);
        let (st, back) = ch.read(0, 64);
        assert_eq!(st, IoStatus::Success);
        assert!(back[..30 * 4096] == data[..30 * 4096]);
        assert!(back[30 * 4096..].iter().all(|&b| b == 0));
        let c = z.check_consistency().unwrap();
        assert_eq!(c.mapped_chunks, 8);
        assert_eq!(
            c.mapped_blocks,
            29 + 2,
            "7 raw chunks, and one with 2 blocks of data"
        );
    }

    #[test]
    fn a_full_base_reports_no_space_and_recovers_after_overwrites() {
        // 8 MiB logical over 1 MiB of base: random data fills it.
        let z = CompressBdev::open("z", malloc(BlockSize::B4096, 256), &opts(8 << 20)).unwrap();
        let data_blocks = z.layout().data_blocks;
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        let mut lba = 0;
        let status = loop {
            let data: Vec<u8> = (lba..lba + 4)
                .flat_map(|b| block(b + 9, 4096, 4096))
                .collect();
            let st = ch.write(lba, &data);
            if !st.is_ok() {
                break st;
            }
            lba += 4;
        };
        assert_eq!(status, IoStatus::NoSpace);
        let reserve = z.shared.reserve_blocks;
        assert_eq!(
            lba,
            (data_blocks - reserve) / 4 * 4,
            "new chunks stop at the reserve"
        );
        // Overwriting in place works: the writes wait for checkpoints that free the old runs.
        for round in 0..3u64 {
            for at in (0..lba).step_by(4) {
                let data: Vec<u8> = (at..at + 4)
                    .flat_map(|b| block(b + round * 1000, 4096, 4096))
                    .collect();
                assert_eq!(
                    ch.write(at, &data),
                    IoStatus::Success,
                    "round {round} at {at}"
                );
            }
        }
        assert!(describe_u64(&z, "checkpoints") > 0);
        z.check_consistency().unwrap();
        // Unmapping frees room for new chunks.
        assert_eq!(ch.unmap(0, 16), IoStatus::Success);
        let data: Vec<u8> = (0..8).flat_map(|b| block(b + 77, 4096, 4096)).collect();
        assert_eq!(ch.write(lba, &data), IoStatus::Success);
        assert_eq!(ch.read(lba, 8), (IoStatus::Success, data));
        z.check_consistency().unwrap();
    }

    #[test]
    fn acknowledged_writes_survive_a_crash_without_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.img");
        let a: Vec<u8> = (0..8).flat_map(|b| block(b, 4096, 1024)).collect();
        let b: Vec<u8> = (0..8).flat_map(|x| block(x + 50, 4096, 1024)).collect();
        {
            let z = CompressBdev::open("z", file_base(&path, 512), &opts(4 << 20)).unwrap();
            let mut ch = SyncChannel::new(z.open_channel().unwrap());
            assert_eq!(ch.write(0, &a), IoStatus::Success);
            assert_eq!(ch.flush(), IoStatus::Success);
            assert_eq!(ch.write(0, &b), IoStatus::Success);
            // Closed without a flush and without the clean-close checkpoint: a crash.
            drop(ch);
            std::mem::forget(z);
        }
        // The file lock of the forgotten bdev is still held: copy the image.
        let copy = dir.path().join("copy.img");
        std::fs::copy(&path, &copy).unwrap();
        let z = CompressBdev::open("z", file_base(&copy, 512), &opts(4 << 20)).unwrap();
        z.check_consistency().unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        // The unflushed write was acknowledged: its map update is in the log.
        assert_eq!(ch.read(0, 8), (IoStatus::Success, b.clone()));
        // A clean close persists.
        assert_eq!(ch.write(0, &a), IoStatus::Success);
        drop(ch);
        drop(z);
        let z = CompressBdev::open("z", file_base(&copy, 512), &opts(4 << 20)).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.read(0, 8), (IoStatus::Success, a));
        assert_eq!(ch.write(0, &b), IoStatus::Success);
        drop(ch);
        drop(z);
        let z = CompressBdev::open("z", file_base(&copy, 512), &opts(4 << 20)).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.read(0, 8), (IoStatus::Success, b));
        z.check_consistency().unwrap();
    }

    #[test]
    fn a_torn_map_page_falls_back_to_its_previous_version() {
        let base = malloc(BlockSize::B4096, 1024);
        let o = opts(4 << 20);
        let a: Vec<u8> = (0..4).flat_map(|b| block(b, 4096, 1024)).collect();
        let b: Vec<u8> = (0..4).flat_map(|x| block(x + 50, 4096, 1024)).collect();
        let z = CompressBdev::open("z", base.clone(), &o).unwrap();
        let l = z.layout();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.write(0, &a), IoStatus::Success);
        assert_eq!(ch.flush(), IoStatus::Success); // page 0, seq 1, slot 1
        assert_eq!(ch.write(0, &b), IoStatus::Success);
        assert_eq!(ch.flush(), IoStatus::Success); // page 0, seq 2, slot 0
        drop(ch);
        drop(z);
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        let (_, mut page) = raw.read(l.page_block(0, 0), 1);
        assert_eq!(valid_page(&page, 0), Some(2));
        page[2000] ^= 0xff;
        assert_eq!(raw.write(l.page_block(0, 0), &page), IoStatus::Success);
        // The log would replay the updates of the torn version (a power loss tears only a page
        // whose updates are still logged): without it, the previous version is what is left.
        let zero = vec![0u8; l.log_blocks as usize * 4096];
        assert_eq!(raw.write(l.log_start, &zero), IoStatus::Success);
        let z = CompressBdev::open("z", base.clone(), &o).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.read(0, 4), (IoStatus::Success, a));
        z.check_consistency().unwrap();
        drop(ch);
        drop(z);
        // Both copies broken: refused.
        let (_, mut page) = raw.read(l.page_block(0, 1), 1);
        page[100] ^= 0xff;
        assert_eq!(raw.write(l.page_block(0, 1), &page), IoStatus::Success);
        let e = CompressBdev::open("z", base, &o).err().unwrap();
        assert!(e.to_string().contains("both copies"), "{e}");
    }

    #[test]
    fn corrupted_chunks_fail_reads_with_integrity_errors() {
        let base = malloc(BlockSize::B4096, 1024);
        let z = CompressBdev::open("z", base.clone(), &opts(4 << 20)).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        let a: Vec<u8> = (0..8).flat_map(|b| block(b, 4096, 1024)).collect();
        assert_eq!(ch.write(0, &a), IoStatus::Success);
        let run = z.shared.map().entries[1].block;
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        let (_, mut d) = raw.read(run, 1);
        d[10] ^= 1;
        assert_eq!(raw.write(run, &d), IoStatus::Success);
        let (st, back) = ch.read(4, 1);
        assert_eq!(st, IoStatus::IntegrityError);
        assert!(back.iter().all(|&x| x == 0));
        assert_eq!(ch.read(0, 4), (IoStatus::Success, a[..4 * 4096].to_vec()));
        assert_eq!(z.integrity_errors(), 1);
        // A partial write into the broken chunk fails too, and changes nothing.
        assert_eq!(ch.write(5, &a[..4096]), IoStatus::IntegrityError);
        // A whole-chunk write replaces it.
        assert_eq!(ch.write(4, &a[..4 * 4096]), IoStatus::Success);
        assert_eq!(ch.read(4, 4), (IoStatus::Success, a[..4 * 4096].to_vec()));
    }

    #[test]
    fn reopening_with_another_geometry_is_refused_and_names_the_field() {
        let base = malloc(BlockSize::B4096, 1024);
        drop(CompressBdev::open("z", base.clone(), &opts(4 << 20)).unwrap());
        let e = CompressBdev::open("z", base.clone(), &opts(8 << 20))
            .err()
            .unwrap();
        assert_eq!(e.field(), Some("size"));
        let mut o = opts(4 << 20);
        o.chunk_size = 32 << 10;
        let e = CompressBdev::open("z", base.clone(), &o).err().unwrap();
        assert_eq!(e.field(), Some("chunk_size"));
        // Another algorithm is fine: chunks record theirs.
        #[cfg(feature = "zstd")]
        {
            let mut o = opts(4 << 20);
            o.algorithm = Algorithm::Zstd;
            drop(CompressBdev::open("z", base, &o).unwrap());
        }
        let mut raw = SyncChannel::new(malloc(BlockSize::B4096, 4).open_channel().unwrap());
        assert_eq!(raw.write(0, &[1u8; 4096]), IoStatus::Success);
    }

    #[test]
    fn channels_writing_parts_of_the_same_chunks_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_base(&dir.path().join("z.img"), 2048);
        for base in [malloc(BlockSize::B4096, 2048), file] {
            let z = CompressBdev::open("z", base, &opts(8 << 20)).unwrap();
            write_alternate_blocks_from_two_channels(&z, 1024, |lba| block(lba, 4096, 2048));
            let mut ch = SyncChannel::new(z.open_channel().unwrap());
            assert_eq!(ch.flush(), IoStatus::Success);
            z.check_consistency().unwrap();
        }
    }

    /// A disk with a volatile write cache, for power-loss tests: writes complete after a few
    /// polls, land in the cache when they complete, and reach the durable image at a flush. A
    /// crash image is the durable image plus a random subset of the blocks of cached and
    /// in-flight writes (block-atomic writes, any order).
    struct SimDisk {
        durable: Vec<u8>,
        cache: std::collections::BTreeMap<u64, Vec<u8>>,
        in_flight: std::collections::BTreeMap<u64, (u64, Vec<u8>)>,
        next: u64,
    }

    #[test]
    fn a_full_log_checkpoints_and_a_crash_loses_no_acknowledged_write() {
        // 512 blocks: a log of 31 blocks, filled many times over by unflushed writes.
        let base = malloc(BlockSize::B4096, 512);
        let o = opts(2 << 20);
        let z = CompressBdev::open("z", base.clone(), &o).unwrap();
        let l = z.layout();
        assert_eq!(l.log_blocks, 31);
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        let mut want = vec![0u8; 512 * 4096];
        let mut rng = Rng(7);
        for i in 0..600u64 {
            let lba = rng.next() % 500;
            let n = 1 + rng.next() % 8;
            let data: Vec<u8> = (0..n).flat_map(|k| block(i << 8 | k, 4096, 1024)).collect();
            assert_eq!(ch.write(lba, &data), IoStatus::Success, "write {i}");
            want[lba as usize * 4096..][..data.len()].copy_from_slice(&data);
        }
        assert!(describe_u64(&z, "log_block_writes") > 2 * l.log_blocks);
        assert!(
            describe_u64(&z, "checkpoints") > 0,
            "the log asked for checkpoints"
        );
        // A crash: no flush, no clean-close checkpoint.
        drop(ch);
        std::mem::forget(z);
        let z = CompressBdev::open("z", base.clone(), &o).unwrap();
        z.check_consistency().unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(read_all(&mut ch, 512), want);
        // The replay was written to the map: the log is free and a second crash loses nothing.
        assert_eq!(ch.write(3, &block(99, 4096, 1024)), IoStatus::Success);
        want[3 * 4096..4 * 4096].copy_from_slice(&block(99, 4096, 1024));
        drop(ch);
        std::mem::forget(z);
        let z = CompressBdev::open("z", base, &o).unwrap();
        z.check_consistency().unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(read_all(&mut ch, 512), want);
    }

    /// Blocks `0 .. blocks`, read 256 at a time.
    fn read_all(ch: &mut SyncChannel, blocks: u64) -> Vec<u8> {
        let mut all = Vec::new();
        for first in (0..blocks).step_by(256) {
            let (st, d) = ch.read(first, (blocks - first).min(256) as u32);
            assert_eq!(st, IoStatus::Success);
            all.extend(d);
        }
        all
    }

    #[test]
    fn a_logged_update_whose_data_is_not_there_falls_back_to_the_previous_run() {
        let base = malloc(BlockSize::B4096, 1024);
        let o = opts(4 << 20);
        let a: Vec<u8> = (0..4).flat_map(|b| block(b, 4096, 1024)).collect();
        let b: Vec<u8> = (0..4).flat_map(|x| block(x + 50, 4096, 1024)).collect();
        let z = CompressBdev::open("z", base.clone(), &o).unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.write(0, &a), IoStatus::Success);
        assert_eq!(ch.flush(), IoStatus::Success);
        assert_eq!(ch.write(0, &b), IoStatus::Success);
        let run = z.shared.map().entries[0];
        drop(ch);
        std::mem::forget(z);
        // A power loss that kept the log record but not the data of the second write.
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        let zero = vec![0u8; run.blocks(12) as usize * 4096];
        assert_eq!(raw.write(run.block, &zero), IoStatus::Success);
        let z = CompressBdev::open("z", base, &o).unwrap();
        z.check_consistency().unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.read(0, 4), (IoStatus::Success, a));
        assert_eq!(z.integrity_errors(), 0);
    }

    /// `sb` turned into the version-1 superblock of `l` (no log).
    fn superblock_v1(l: &CompressLayout) -> Vec<u8> {
        let mut sb = vec![0u8; 4096];
        l.without_log().encode(&mut sb);
        sb[8..12].copy_from_slice(&1u32.to_le_bytes());
        sb[SUPER_BYTES_V1..].fill(0);
        let crc = crate::checksum::crc32c(&sb[..SUPER_BYTES_V1]);
        sb[SUPER_BYTES_V1..SUPER_BYTES_V1 + 4].copy_from_slice(&crc.to_le_bytes());
        sb
    }

    #[test]
    fn a_version_1_volume_is_upgraded_in_place_or_refused_clearly() {
        let base = malloc(BlockSize::B4096, 1024);
        let o = opts(4 << 20);
        let a: Vec<u8> = (0..8).flat_map(|b| block(b, 4096, 1024)).collect();
        let z = CompressBdev::open("z", base.clone(), &o).unwrap();
        let l = z.layout();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.write(0, &a), IoStatus::Success);
        drop(ch);
        drop(z); // a clean close: the map is in its pages
        let v1 = l.without_log();
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        let sb = superblock_v1(&l);
        assert_eq!(CompressLayout::decode(&sb), Ok((v1, true)));
        assert_eq!(raw.write(0, &sb), IoStatus::Success);
        let junk = vec![0x5a_u8; l.log_blocks as usize * 4096];
        assert_eq!(raw.write(l.log_start, &junk), IoStatus::Success);
        let z = CompressBdev::open("z", base.clone(), &o).unwrap();
        assert_eq!(z.layout(), l);
        z.check_consistency().unwrap();
        let mut ch = SyncChannel::new(z.open_channel().unwrap());
        assert_eq!(ch.read(0, 8), (IoStatus::Success, a.clone()));
        drop(ch);
        drop(z);
        assert_eq!(CompressLayout::decode(&raw.read(0, 1).1), Ok((l, false)));
        // A version-1 volume with a chunk where the log would go is refused, not damaged.
        let mut pages = load_pages(&mut raw, &v1).unwrap();
        let e = pages.entries[0];
        let tail = v1.data_start + v1.data_blocks - e.blocks(12);
        let (_, run) = raw.read(e.block, e.blocks(12) as u32);
        assert_eq!(raw.write(tail, &run), IoStatus::Success);
        pages.entries[0].block = tail;
        let seq = pages.seq[0] + 1;
        let mut page = vec![0u8; 4096];
        encode_page(&mut page, 0, seq, pages.covered[0], &pages.entries, &v1);
        assert_eq!(
            raw.write(v1.page_block(0, seq % 2), &page),
            IoStatus::Success
        );
        assert_eq!(raw.write(0, &sb), IoStatus::Success);
        let e = CompressBdev::open("z", base.clone(), &o).err().unwrap();
        assert!(e.to_string().contains("cannot upgrade"), "{e}");
        assert_eq!(raw.read(0, 1).1, sb, "the superblock is left alone");
    }

    struct SimBdev {
        info: Arc<BdevInfo>,
        disk: Arc<Mutex<SimDisk>>,
    }

    impl SimBdev {
        fn new(image: Vec<u8>) -> SimBdev {
            let caps = Caps::ALL_IO
                | Caps::RETAINS_DATA
                | Caps::UNMAP_READS_ZEROES
                | Caps::PERSISTENT
                | Caps::VOLATILE_CACHE;
            let blocks = (image.len() / 4096) as u64;
            SimBdev {
                info: BdevInfo::builder("sim", "sim", BlockSize::B4096, blocks, caps).build(),
                disk: Arc::new(Mutex::new(SimDisk {
                    durable: image,
                    cache: Default::default(),
                    in_flight: Default::default(),
                    next: 0,
                })),
            }
        }

        fn crash_image(&self, rng: &mut Rng) -> Vec<u8> {
            let d = self.disk.lock().unwrap();
            let mut img = d.durable.clone();
            let mut put = |b: u64, v: &[u8]| {
                if rng.next() & 1 == 0 {
                    img[b as usize * 4096..][..4096].copy_from_slice(v);
                }
            };
            for (b, v) in &d.cache {
                put(*b, v);
            }
            for (lba, v) in d.in_flight.values() {
                for (i, x) in v.chunks(4096).enumerate() {
                    put(lba + i as u64, x);
                }
            }
            img
        }
    }

    impl Bdev for SimBdev {
        fn info(&self) -> &Arc<BdevInfo> {
            &self.info
        }

        fn open_channel(&self) -> Result<Channel, BdevError> {
            let ops = SimChannel {
                disk: self.disk.clone(),
                queue: VecDeque::new(),
                rng: Rng(0x1234_5678 ^ self.info.block_count()),
            };
            Ok(Channel::new(self.info.clone(), Box::new(ops), 256))
        }
    }

    struct SimChannel {
        disk: Arc<Mutex<SimDisk>>,
        queue: VecDeque<(u64, u64, IoRequest)>,
        rng: Rng,
    }

    impl ChannelOps for SimChannel {
        fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
            let mut d = self.disk.lock().unwrap();
            let id = d.next;
            d.next += 1;
            match io.io_type {
                IoType::Write => {
                    let mut v = vec![0u8; io.bufs.total_len()];
                    io.bufs.copy_to_slice(0, &mut v);
                    d.in_flight.insert(id, (io.offset_blocks, v));
                }
                IoType::Unmap | IoType::WriteZeroes => {
                    let v = vec![0u8; io.num_blocks as usize * 4096];
                    d.in_flight.insert(id, (io.offset_blocks, v));
                }
                IoType::Flush => {
                    // Covers what completed before it.
                    let cache = std::mem::take(&mut d.cache);
                    for (b, v) in cache {
                        d.durable[b as usize * 4096..][..4096].copy_from_slice(&v);
                    }
                }
                IoType::Read => {}
            }
            let delay = self.rng.next() % 4;
            self.queue.push_back((delay, id, io));
            Ok(())
        }

        fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
            let mut n = 0;
            let mut d = self.disk.lock().unwrap();
            for _ in 0..self.queue.len() {
                let (delay, id, mut io) = self.queue.pop_front().unwrap();
                if delay > 0 {
                    self.queue.push_back((delay - 1, id, io));
                    continue;
                }
                if let Some((lba, v)) = d.in_flight.remove(&id) {
                    for (i, x) in v.chunks(4096).enumerate() {
                        d.cache.insert(lba + i as u64, x.to_vec());
                    }
                }
                if io.io_type == IoType::Read {
                    for i in 0..u64::from(io.num_blocks) {
                        let b = io.offset_blocks + i;
                        let v = match d.cache.get(&b) {
                            Some(v) => v.clone(),
                            None => d.durable[b as usize * 4096..][..4096].to_vec(),
                        };
                        io.bufs.copy_from_slice(i as usize * 4096, &v);
                    }
                }
                done.push(io.complete(IoStatus::Success));
                n += 1;
            }
            n
        }

        fn wake(&self) -> Wake {
            if self.queue.is_empty() {
                Wake::Event
            } else {
                Wake::Immediate
            }
        }
    }

    /// What a crash image may hold, from the log: per block, the seeds it may have (0: zero).
    fn allowed(events: &[(char, u64, u64, u64, u64)], blocks: u64) -> Vec<Vec<u64>> {
        // (W, id, lba, n, seed), (C, id, ..), (F, completions before the flush, ..)
        let mut completions = Vec::new();
        let mut durable_count = 0;
        for &(k, a, ..) in events {
            match k {
                'C' => completions.push(a),
                'F' => durable_count = a as usize,
                _ => {}
            }
        }
        let durable: std::collections::HashSet<u64> =
            completions[..durable_count].iter().copied().collect();
        let mut model = vec![vec![0u64]; blocks as usize];
        for &(k, id, lba, n, seed) in events {
            if k != 'W' {
                continue;
            }
            for b in lba..lba + n {
                let set = &mut model[b as usize];
                if durable.contains(&id) {
                    *set = vec![seed];
                } else if !set.contains(&seed) {
                    set.push(seed);
                }
            }
        }
        model
    }

    #[test]
    fn power_loss_at_random_points_keeps_flushed_writes() {
        let logical_blocks = 512u64;
        let sim = SimBdev::new(vec![0u8; 512 * 4096]);
        let sim = Arc::new(sim);
        let z = CompressBdev::open("z", sim.clone(), &opts(logical_blocks * 4096)).unwrap();
        let mut ch = z.open_channel().unwrap();
        let mut rng = Rng(0xfeed_beef);
        let mut events: Vec<(char, u64, u64, u64, u64)> = Vec::new();
        let mut in_flight: Vec<(u64, u64, u64)> = Vec::new();
        let mut flush: Option<u64> = None;
        let (mut next_id, mut completed, mut crashes, mut step) = (0u64, 0u64, 0u32, 0u64);
        let mut done = Vec::new();
        const FLUSH: u64 = 1 << 62;
        while crashes < 200 {
            step += 1;
            while in_flight.len() < 8 {
                let lba = rng.next() % logical_blocks;
                let n = (1 + rng.next() % 12).min(logical_blocks - lba);
                if in_flight
                    .iter()
                    .any(|&(_, l, k)| lba < l + k && l < lba + n)
                {
                    break;
                }
                let id = next_id;
                next_id += 1;
                let (io, seed) = match rng.next() % 10 {
                    0 => (IoRequest::no_data(IoType::Unmap, lba, n as u32, id), 0),
                    _ => {
                        let seed = rng.next() | 1;
                        let random = [4096, 1900, 200][(seed % 3) as usize];
                        let mut data = AlignedBuf::new(n as usize * 4096);
                        for (i, b) in data.as_mut_slice().chunks_mut(4096).enumerate() {
                            b.copy_from_slice(&block(seed ^ (lba + i as u64), 4096, random));
                        }
                        (
                            IoRequest::write(lba, n as u32, SgList::from_buf(data), id),
                            seed,
                        )
                    }
                };
                events.push(('W', id, lba, n, seed));
                ch.submit(io).unwrap();
                in_flight.push((id, lba, n));
            }
            if flush.is_none() && rng.next().is_multiple_of(6) {
                ch.submit(IoRequest::no_data(IoType::Flush, 0, 0, FLUSH))
                    .unwrap();
                flush = Some(completed);
            }
            ch.poll(&mut done);
            for c in done.drain(..) {
                assert_eq!(c.status, IoStatus::Success);
                if c.tag == FLUSH {
                    events.push(('F', flush.take().unwrap(), 0, 0, 0));
                } else {
                    in_flight.retain(|&(id, _, _)| id != c.tag);
                    events.push(('C', c.tag, 0, 0, 0));
                    completed += 1;
                }
            }
            if step % 3 != 0 {
                continue;
            }
            // Power loss now: reopen a crash image and check it.
            crashes += 1;
            let img = sim.crash_image(&mut rng);
            let z2 = CompressBdev::open(
                "z2",
                Arc::new(SimBdev::new(img)),
                &opts(logical_blocks * 4096),
            )
            .unwrap_or_else(|e| panic!("crash {crashes}: {e}"));
            z2.check_consistency()
                .unwrap_or_else(|e| panic!("crash {crashes}: {e}"));
            let model = allowed(&events, logical_blocks);
            let mut r = SyncChannel::new(z2.open_channel().unwrap());
            let mut data = Vec::new();
            for half in 0..2 {
                let (st, d) = r.read(half * logical_blocks / 2, logical_blocks as u32 / 2);
                assert_eq!(st, IoStatus::Success, "crash {crashes}");
                data.extend(d);
            }
            for (lba, got) in data.chunks(4096).enumerate() {
                let ok = model[lba].iter().any(|&seed| {
                    if seed == 0 {
                        return got.iter().all(|&x| x == 0);
                    }
                    let random = [4096, 1900, 200][(seed % 3) as usize];
                    got == block(seed ^ lba as u64, 4096, random)
                });
                assert!(
                    ok,
                    "crash {crashes}: block {lba} holds none of {:x?}",
                    model[lba]
                );
            }
            drop(r);
            std::mem::forget(z2); // no clean-close checkpoint on a crash image
        }
        // Flushes made checkpoints (each write now also waits for its log record, so fewer
        // requests and flushes complete per step than before the log).
        assert!(
            z.describe()["checkpoints"].as_u64().unwrap() > 30,
            "{}",
            z.describe()
        );
    }
}
