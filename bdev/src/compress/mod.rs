//! `compress`: a thin, compressing bdev of fixed logical size over a (smaller) base. The logical
//! space is cut into chunks (16 KiB by default, 4-64 KiB); each written chunk is compressed
//! (LZ4 by default, or zstd) into a run of whole base blocks, or stored raw when compression
//! would not save a block. Zero chunks take no space. A persistent chunk map says where each
//! chunk is; a free-space allocator hands out runs.
//!
//! The code: `format.rs` is the on-disk format (superblock, layout, map pages, log records:
//! pure encoders, decoders and checks), `alloc.rs` the free-space allocator, `channel.rs` the
//! channel with its request, chunk operation and checkpoint state machine; this file holds the
//! bdev, its options, opening (format, upgrade, log replay) and the shared map state.
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

use serde::{Deserialize, Serialize};

use crate::bdev::{Bdev, BdevInfo, Channel};
use crate::error::BdevError;
use crate::stacked::{Format, LockTable, flush_if, zero_range, zeroing_ops};
use crate::sync::SyncChannel;
use crate::types::{BlockSize, Caps, IoStatus};

mod alloc;
mod channel;
mod format;
#[cfg(test)]
mod tests;

pub use self::format::{CompressLayout, ENTRY_BYTES};

use self::alloc::Allocator;
use self::channel::CompressChannel;
use self::format::{
    Entry, K_RAW, LOG_HEADER, MAGIC, PAGE_HEADER, RECORD_BYTES, check_any_entry, check_entry,
    encode_page, valid_log_block, valid_page,
};

/// The `kind` name of this bdev.
pub const KIND: &str = "compress";
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 16 << 10;
/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 64 << 10;

/// Largest transfer of a compress bdev.
const MAX_TRANSFER_BYTES: u64 = 1 << 20;
/// Chunks' worth of the data region kept for overwrites (at most an eighth of it).
const RESERVE_CHUNKS: u64 = 8;
/// Default zstd level.
const DEFAULT_ZSTD_LEVEL: i32 = 3;

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
    // Whole pages (two blocks each), at least one per read.
    let step = u64::from(ch.channel().info().geometry().max_transfer_blocks).clamp(2, 256);
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
        let align = (self.base.info().geometry().buf_align as usize).max(4096);
        Ok(CompressChannel::open(&self.info, &self.shared, base, align))
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
