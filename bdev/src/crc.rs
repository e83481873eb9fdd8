//! `crc`: end-to-end data integrity on any base. Every logical block carries a CRC32C, kept in a
//! metadata region at the end of the base; computed on write, verified on read. A block whose
//! data or metadata changed behind the bdev's back fails its read with
//! [`IoStatus::IntegrityError`] (NVMe: End-to-end Guard Check Error; virtio: IOERR).
//!
//! # On-disk layout (base blocks of the bdev's block size `bs`)
//! ```text
//! block 0            header: magic "FBLKCRC1", version, block size, data blocks, metadata start,
//!                    CRC32C of the header
//! blocks 1 ..= D     data: block `lba` of the crc bdev is base block `1 + lba`
//! blocks 1 + D ..    metadata: one 4-byte little-endian entry per data block, `bs / 4` entries
//!                    per base block (1024 for 4 KiB blocks: 0.1% of the base)
//! ```
//! `D` is the largest count for which header, data and metadata fit the base; the crc bdev
//! exposes those `D` blocks. The layout is fixed when the base is formatted; the bdev does not
//! follow base resizes.
//!
//! # The entry convention
//! An entry is `CRC32C(block) XOR CRC32C(zero block)`. A zero block therefore has a zero entry,
//! so a never-written block (zero data, zero entry, as formatting leaves it), a zeroed one and
//! an unmapped one need no special case and no "written" bit: they verify like any other block
//! and read as zeroes. Non-zero data beside a zero entry fails, so clearing an entry is detected.
//!
//! What a per-block CRC does not detect: a block and its entry both rolled back to an older
//! consistent pair (a lost write of both), a write misdirected together with its entry, or a
//! deliberate forgery (CRC32C is not a MAC: use `crypt_gcm` for that).
//!
//! # Formatting
//! [`CrcBdev::open`] formats a base whose block 0 is all zeroes: it zeroes the data and metadata
//! regions (the base's unmap where unmapped blocks read zeroes, else its write-zeroes, else
//! zero writes) and writes the header, flushing after each. A base whose block 0 is neither zero
//! nor a crc header is refused, never formatted over, unless [`Format::IfUnformatted`] says to
//! format a block 0 without the magic (a base that does not read zeroes when new).
//!
//! # Data path and concurrency
//! - Write: the CRCs are computed from the caller's buffer when the request arrives, and the
//!   data is written to the base from that buffer (no copy). The entries are then patched in a
//!   read-modify-write of their metadata block(s). The request completes when both the data and
//!   the metadata writes have; a crash between the two leaves the block failing its check (a torn
//!   write shows as `IntegrityError`, not as silently wrong data). A caller that changes its
//!   buffer while its write is in flight gets integrity errors on those blocks.
//! - Read: the data goes straight into the caller's buffer while the covering metadata blocks
//!   are read into a channel buffer; then every block is verified. If any block fails, the whole
//!   caller buffer is zeroed and the read fails: no unverified byte is returned.
//! - Two lock tables, shared by all channels of the bdev (striped atomic words, taken with
//!   try-lock, all-or-nothing; a request that misses one waits in its channel's queue and is
//!   retried on the next poll, so no reactor ever blocks):
//!   - *range locks*, one per 128 KiB of data: writes, unmaps and write-zeroes take theirs
//!     exclusively from the data write until the metadata is written; reads take theirs shared
//!     for the data and metadata reads. So a read never sees new data with an old entry (or the
//!     reverse) of a block being written, and never reports a false integrity error.
//!   - *metadata block locks*, exclusive, held only for the read-modify-write of one metadata
//!     block (read, patch, write). One metadata block covers 4 MiB of data (4 KiB blocks), so
//!     neighbouring writes from any channel serialize only this small step, not their data I/O;
//!     there is no global lock. Reads need no metadata lock: a concurrent read-modify-write by
//!     another writer rewrites the entries of *this* read's range with their current values (its
//!     writer is excluded by the range lock), so whatever mix of old and new block the read
//!     sees, its own entries are right.
//! - Unmap and write-zeroes zero the data range in the base (its unmap where unmapped blocks read
//!   zeroes, else its write-zeroes) and clear the entries: the blocks read as zeroes.
//! - Flush: passed through (a write completes only once both its data and metadata have).
//!
//! Mismatches are counted per bdev (`integrity_errors` in `describe()`, per failed block) and
//! logged at warn level once per LBA; the set of logged LBAs is bounded (4096), past which
//! failures are only counted.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bdev::{Bdev, BdevInfo, Channel, ChannelOps, IoCompletion, IoRequest, Wake};
use crate::buf::{AlignedBuf, SgList};
use crate::error::BdevError;
use crate::sync::SyncChannel;
use crate::types::{BlockSize, Caps, IoStatus, IoType};
use crate::uring::ThreadRing;

/// The `kind` name of this bdev.
pub const KIND: &str = "crc";
/// Bytes of one metadata entry.
pub const ENTRY_BYTES: usize = 4;

const MAGIC: &[u8; 8] = b"FBLKCRC1";
const VERSION: u32 = 1;
/// Header bytes the header CRC covers (the CRC follows them).
const HEADER_BYTES: usize = 36;
/// Data bytes covered by one range lock.
const RANGE_BYTES: u64 = 128 << 10;
/// Lock stripes per table.
const LOCK_STRIPES: usize = 4096;
const WRITER: u32 = 1 << 31;
/// Largest transfer of a crc bdev.
const MAX_TRANSFER_BYTES: u64 = 1 << 20;
/// Most requests a crc channel keeps in flight.
const MAX_DEPTH: usize = 256;
/// Unmap / write-zeroes pieces one request keeps in flight at most.
const DEALLOC_OPS_IN_FLIGHT: u32 = 4;
/// LBAs whose integrity failure is logged (once each).
const LOGGED_LBAS: usize = 4096;

/// Where things are on the base, in base blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrcLayout {
    /// First data block (block `lba` of the crc bdev is base block `data_start + lba`).
    pub data_start: u64,
    /// Data blocks: the crc bdev's size.
    pub data_blocks: u64,
    /// First metadata block.
    pub md_start: u64,
    /// Metadata blocks.
    pub md_blocks: u64,
    /// Entries per metadata block (`block size / ENTRY_BYTES`).
    pub entries_per_block: u64,
}

impl CrcLayout {
    /// The largest layout that fits `base_blocks` blocks of `bs`, if any data block fits.
    pub fn for_base(bs: BlockSize, base_blocks: u64) -> Option<CrcLayout> {
        let e = u64::from(bs.bytes()) / ENTRY_BYTES as u64;
        let avail = base_blocks.checked_sub(1)?;
        // The largest d with d + ceil(d / e) <= avail: start near avail * e / (e + 1), adjust.
        let mut d = (u128::from(avail) * u128::from(e) / (u128::from(e) + 1)) as u64;
        while d > 0 && d + d.div_ceil(e) > avail {
            d -= 1;
        }
        while d + 1 + (d + 1).div_ceil(e) <= avail {
            d += 1;
        }
        (d > 0).then(|| CrcLayout::with_data_blocks(bs, d))
    }

    fn with_data_blocks(bs: BlockSize, d: u64) -> CrcLayout {
        let e = u64::from(bs.bytes()) / ENTRY_BYTES as u64;
        CrcLayout {
            data_start: 1,
            data_blocks: d,
            md_start: 1 + d,
            md_blocks: d.div_ceil(e),
            entries_per_block: e,
        }
    }

    /// Base blocks the layout uses.
    pub fn base_blocks(&self) -> u64 {
        self.md_start + self.md_blocks
    }

    /// The metadata block (relative to `md_start`) and byte offset in it of block `lba`'s entry.
    pub fn entry_of(&self, lba: u64) -> (u64, usize) {
        (
            lba / self.entries_per_block,
            (lba % self.entries_per_block) as usize * ENTRY_BYTES,
        )
    }

    /// Metadata blocks (first, relative to `md_start`, and count) holding the entries of blocks
    /// `lba .. lba + n`.
    fn md_span(&self, lba: u64, n: u32) -> (u64, u32) {
        let first = lba / self.entries_per_block;
        let last = (lba + u64::from(n) - 1) / self.entries_per_block;
        (first, (last - first + 1) as u32)
    }
}

struct Header {
    block_size: u32,
    data_blocks: u64,
    md_start: u64,
}

impl Header {
    fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.data_blocks.to_le_bytes());
        out[24..32].copy_from_slice(&self.md_start.to_le_bytes());
        let crc = crate::checksum::crc32c(&out[..HEADER_BYTES]);
        out[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Result<Header, String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..8] != MAGIC {
            return Err("block 0 is neither zero nor a crc header; \
                        refusing to format over existing data"
                .into());
        }
        if crate::checksum::crc32c(&b[..HEADER_BYTES]) != u32_at(HEADER_BYTES) {
            return Err("the crc header is corrupted (CRC mismatch)".into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "crc format version {version} is not supported (this build reads {VERSION})"
            ));
        }
        Ok(Header {
            block_size: u32_at(12),
            data_blocks: u64_at(16),
            md_start: u64_at(24),
        })
    }
}

/// When opening a stacked volume formats its base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Only a base whose block 0 is all zeroes (a new disk or file); anything else that is not
    /// a volume of this kind is refused.
    #[default]
    IfZero,
    /// Also a base whose block 0 does not start with this kind's magic: needed on bases that
    /// do not read zeroes when new, such as `crypt_xts` on a new file. A block 0 with the magic
    /// but a bad checksum is still refused, never formatted over.
    IfUnformatted,
}

impl Format {
    /// Whether a base whose block 0 is `block0` is to be formatted for a kind with `magic`.
    pub(crate) fn wants(self, block0: &[u8], magic: &[u8]) -> bool {
        block0.iter().all(|&b| b == 0)
            || (self == Format::IfUnformatted && !block0.starts_with(magic))
    }
}

/// Striped reader/writer try-locks shared by every channel of a bdev.
pub(crate) struct LockTable {
    words: Box<[AtomicU32]>,
}

impl LockTable {
    pub(crate) fn new() -> LockTable {
        LockTable {
            words: (0..LOCK_STRIPES).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn word(&self, key: u64) -> &AtomicU32 {
        &self.words[(key % LOCK_STRIPES as u64) as usize]
    }

    fn try_lock_one(&self, key: u64, write: bool) -> bool {
        let l = self.word(key);
        if write {
            l.compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        } else {
            l.fetch_update(Ordering::Acquire, Ordering::Relaxed, |v| {
                (v & WRITER == 0).then_some(v + 1)
            })
            .is_ok()
        }
    }

    fn unlock_one(&self, key: u64, write: bool) {
        let l = self.word(key);
        if write {
            l.store(0, Ordering::Release);
        } else {
            l.fetch_sub(1, Ordering::Release);
        }
    }

    /// Takes the locks of keys `first .. first + count`, all or none. `count` must be below the
    /// number of stripes, so that no two keys of one call share a stripe.
    pub(crate) fn try_lock(&self, first: u64, count: u64, write: bool) -> bool {
        debug_assert!(count < LOCK_STRIPES as u64);
        for i in 0..count {
            if !self.try_lock_one(first + i, write) {
                for j in 0..i {
                    self.unlock_one(first + j, write);
                }
                return false;
            }
        }
        true
    }

    /// Releases what [`LockTable::try_lock`] took.
    pub(crate) fn unlock(&self, first: u64, count: u64, write: bool) {
        for i in 0..count {
            self.unlock_one(first + i, write);
        }
    }
}

/// Per-bdev state shared by the channels.
struct CrcShared {
    layout: CrcLayout,
    /// `CRC32C` of a zero block: entries are `CRC32C(block) ^ zero_crc`.
    zero_crc: u32,
    /// `lba >> range_shift` is the block's range lock.
    range_shift: u32,
    ranges: LockTable,
    md_locks: LockTable,
    integrity_errors: AtomicU64,
    failed_reads: AtomicU64,
    logged: Mutex<HashSet<u64>>,
    /// Base operation that zeroes a data range for an unmap.
    unmap_op: IoType,
    /// Base operation that zeroes a data range for a write-zeroes.
    zeroes_op: IoType,
}

impl CrcShared {
    fn range_span(&self, lba: u64, n: u64) -> (u64, u64) {
        let first = lba >> self.range_shift;
        let last = (lba + n - 1) >> self.range_shift;
        (first, last - first + 1)
    }

    /// Counts and (once per LBA, within a bound) logs a block that failed its check.
    fn report_mismatch(&self, name: &str, lba: u64) {
        self.integrity_errors.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().expect("logged lock");
        if logged.contains(&lba) {
            return;
        }
        if logged.len() < LOGGED_LBAS {
            logged.insert(lba);
            tracing::warn!(bdev = %name, lba, "CRC32C mismatch: read refused");
            if logged.len() == LOGGED_LBAS {
                tracing::warn!(bdev = %name,
                    "{LOGGED_LBAS} LBAs failed their CRC check; further failures are only counted");
            }
        }
    }
}

/// Computes the CRC32C of each `bs`-byte block of `bufs`, in order, calling `f(index, crc)`.
/// Blocks that straddle segments are handled without a copy.
fn for_each_block_crc(bufs: &SgList, bs: usize, mut f: impl FnMut(usize, u32)) {
    let (mut index, mut crc, mut fill) = (0usize, 0u32, 0usize);
    for s in bufs.segments() {
        if s.len == 0 {
            continue;
        }
        // SAFETY: the list's constructors guarantee every segment is valid for reads of its
        // length while the list lives; `bufs` is borrowed for the whole loop.
        let mut data = unsafe { std::slice::from_raw_parts(s.base.cast_const(), s.len) };
        while !data.is_empty() {
            if fill == 0 && data.len() >= bs {
                // The common case: a whole block inside one segment.
                f(index, crate::checksum::crc32c(&data[..bs]));
                index += 1;
                data = &data[bs..];
                continue;
            }
            let take = (bs - fill).min(data.len());
            crc = crate::checksum::crc32c_append(crc, &data[..take]);
            fill += take;
            data = &data[take..];
            if fill == bs {
                f(index, crc);
                index += 1;
                crc = 0;
                fill = 0;
            }
        }
    }
}

/// Zeroes base blocks `first .. first + count` with `op` (unmap or write-zeroes) where the base
/// has one, else by writing zero buffers.
pub(crate) fn zero_range(
    ch: &mut SyncChannel,
    first: u64,
    count: u64,
    op: Option<IoType>,
) -> Result<(), IoStatus> {
    let info = ch.channel().info().clone();
    let bs = info.block_size();
    let step = match op {
        Some(_) => u64::from(u32::MAX).min(u64::from(info.geometry().max_transfer_blocks)),
        None => u64::from(info.geometry().max_transfer_blocks).min((1 << 20) >> bs.shift()),
    };
    let zeroes = match op {
        Some(_) => Vec::new(),
        None => vec![0u8; bs.to_bytes(step) as usize],
    };
    let mut at = first;
    while at < first + count {
        let n = (first + count - at).min(step);
        let st = match op {
            Some(IoType::Unmap) => ch.unmap(at, n as u32),
            Some(_) => ch.write_zeroes(at, n as u32),
            None => ch.write(at, &zeroes[..bs.to_bytes(n) as usize]),
        };
        if !st.is_ok() {
            return Err(st);
        }
        at += n;
    }
    Ok(())
}

/// How a stacked bdev zeroes a range of its base: (for unmap, for write-zeroes), or `None` when
/// the base cannot zero without data buffers.
pub(crate) fn zeroing_ops(caps: Caps) -> (Option<IoType>, Option<IoType>) {
    let unmap_zeroes = caps.contains(Caps::UNMAP | Caps::UNMAP_READS_ZEROES);
    let can_write_zeroes = caps.contains(Caps::WRITE_ZEROES);
    let unmap_op = match (unmap_zeroes, can_write_zeroes) {
        (true, _) => Some(IoType::Unmap),
        (false, true) => Some(IoType::WriteZeroes),
        _ => None,
    };
    let zeroes_op = if can_write_zeroes {
        Some(IoType::WriteZeroes)
    } else {
        unmap_op
    };
    (unmap_op, zeroes_op)
}

/// A CRC32C integrity bdev stacked on any bdev; see the module documentation.
pub struct CrcBdev {
    info: Arc<BdevInfo>,
    base: Arc<dyn Bdev>,
    shared: Arc<CrcShared>,
}

impl CrcBdev {
    /// Opens the crc volume on `base`, formatting the base first if its block 0 is all zeroes.
    pub fn open(name: &str, base: Arc<dyn Bdev>) -> Result<CrcBdev, BdevError> {
        CrcBdev::open_with(name, base, Format::IfZero)
    }

    /// Opens the crc volume on `base`, formatting the base first as `format` says.
    pub fn open_with(
        name: &str,
        base: Arc<dyn Bdev>,
        format: Format,
    ) -> Result<CrcBdev, BdevError> {
        let base_name = base.info().name().to_string();
        let invalid = |reason: String| BdevError::invalid("base", format!("{base_name}: {reason}"));
        let io_fail = |what: &str, st: IoStatus| invalid(format!("{what} failed: {st}"));
        let g = base.info().geometry();
        let bs = g.block_size;
        if !g.caps.contains(Caps::READ | Caps::RETAINS_DATA) {
            return Err(invalid(
                "the base does not keep data (a crc bdev needs a readable, retaining base)".into(),
            ));
        }
        let (unmap_op, zeroes_op) = zeroing_ops(g.caps);
        let mut ch = SyncChannel::new(base.open_channel()?);
        let (st, block0) = ch.read(0, 1);
        if !st.is_ok() {
            return Err(io_fail("reading the header", st));
        }
        let header = if format.wants(&block0, MAGIC) {
            let layout = CrcLayout::for_base(bs, g.block_count).ok_or_else(|| {
                invalid(format!(
                    "{} blocks is too small for a crc volume (header, data and metadata)",
                    g.block_count
                ))
            })?;
            if base.info().is_read_only() || !g.caps.contains(Caps::WRITE) {
                return Err(invalid(
                    "block 0 is zero (no crc volume yet) and the base is read-only, so it cannot \
                     be formatted"
                        .into(),
                ));
            }
            let h = Header {
                block_size: bs.bytes(),
                data_blocks: layout.data_blocks,
                md_start: layout.md_start,
            };
            zero_range(&mut ch, 1, layout.base_blocks() - 1, unmap_op)
                .map_err(|st| io_fail("zeroing the data and metadata regions", st))?;
            flush_if(&mut ch, g.caps).map_err(|st| io_fail("flushing the zeroed regions", st))?;
            let mut hb = vec![0u8; bs.bytes() as usize];
            h.encode(&mut hb);
            let st = ch.write(0, &hb);
            if !st.is_ok() {
                return Err(io_fail("writing the header", st));
            }
            flush_if(&mut ch, g.caps).map_err(|st| io_fail("flushing the header", st))?;
            tracing::info!(bdev = %name, base = %base_name, data_blocks = layout.data_blocks,
                "formatted a crc volume");
            h
        } else {
            Header::decode(&block0).map_err(invalid)?
        };
        drop(ch);
        if header.block_size != bs.bytes() {
            return Err(invalid(format!(
                "the crc volume was formatted with {}-byte blocks but the base has {}-byte blocks",
                header.block_size,
                bs.bytes()
            )));
        }
        let layout = CrcLayout::with_data_blocks(bs, header.data_blocks);
        if header.data_blocks == 0 || header.md_start != layout.md_start {
            return Err(invalid("the crc header has an inconsistent layout".into()));
        }
        if layout.base_blocks() > g.block_count {
            return Err(invalid(format!(
                "the crc volume needs {} blocks but the base has only {}",
                layout.base_blocks(),
                g.block_count
            )));
        }

        let mut caps = Caps::READ | Caps::RETAINS_DATA;
        for c in [
            Caps::WRITE,
            Caps::FLUSH,
            Caps::PERSISTENT,
            Caps::VOLATILE_CACHE,
        ] {
            if g.caps.contains(c) {
                caps = caps | c;
            }
        }
        if g.caps.contains(Caps::WRITE) && unmap_op.is_some() {
            caps = caps | Caps::WRITE_ZEROES | Caps::UNMAP | Caps::UNMAP_READS_ZEROES;
        }
        let max_transfer = u64::from(g.max_transfer_blocks)
            .min(MAX_TRANSFER_BYTES >> bs.shift())
            .min(layout.data_blocks) as u32;
        let info = BdevInfo::builder(name, KIND, bs, layout.data_blocks, caps)
            .buf_align(g.buf_align)
            .max_transfer_blocks(max_transfer)
            .max_segments(g.max_segments)
            .read_only(base.info().is_read_only())
            .build();
        let zero_crc = crate::checksum::crc32c(&vec![0u8; bs.bytes() as usize]);
        Ok(CrcBdev {
            info,
            base,
            shared: Arc::new(CrcShared {
                layout,
                zero_crc,
                range_shift: (RANGE_BYTES >> bs.shift()).trailing_zeros(),
                ranges: LockTable::new(),
                md_locks: LockTable::new(),
                integrity_errors: AtomicU64::new(0),
                failed_reads: AtomicU64::new(0),
                logged: Mutex::new(HashSet::new()),
                unmap_op: unmap_op.unwrap_or(IoType::WriteZeroes),
                zeroes_op: zeroes_op.unwrap_or(IoType::WriteZeroes),
            }),
        })
    }

    /// Where the header, data and metadata are on the base.
    pub fn layout(&self) -> CrcLayout {
        self.shared.layout
    }

    /// Blocks that failed their CRC check since the bdev was opened.
    pub fn integrity_errors(&self) -> u64 {
        self.shared.integrity_errors.load(Ordering::Relaxed)
    }
}

fn flush_if(ch: &mut SyncChannel, caps: Caps) -> Result<(), IoStatus> {
    if caps.contains(Caps::FLUSH) {
        let st = ch.flush();
        if !st.is_ok() {
            return Err(st);
        }
    }
    Ok(())
}

impl Bdev for CrcBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let base = self.base.open_channel()?;
        let depth = base.depth().min(MAX_DEPTH);
        let bs = self.info.block_size().bytes() as usize;
        let layout = self.shared.layout;
        let max_transfer = u64::from(self.info.geometry().max_transfer_blocks);
        // Metadata blocks one read or write spans at most; unmap pieces use the same buffers.
        let md_buf_blocks = (max_transfer.div_ceil(layout.entries_per_block) + 1).max(2);
        let op_slots = depth + DEALLOC_OPS_IN_FLIGHT as usize;
        let align = (self.base.info().geometry().buf_align as usize).max(4096);
        let ops = CrcChannel {
            shared: self.shared.clone(),
            name: self.info.name().to_string(),
            bs,
            md_buf_blocks: md_buf_blocks as u32,
            reqs: Slots::new(depth),
            crcs: (0..depth)
                .map(|_| vec![0u32; max_transfer as usize])
                .collect(),
            ops: Slots::new(op_slots),
            md_bufs: (0..op_slots)
                .map(|_| Some(AlignedBuf::with_align(md_buf_blocks as usize * bs, align)))
                .collect(),
            waiting: VecDeque::with_capacity(depth),
            lock_wait: VecDeque::with_capacity(op_slots),
            retry: VecDeque::with_capacity(3 * op_slots),
            scratch: Vec::with_capacity(3 * op_slots),
            base,
        };
        Ok(Channel::new(self.info.clone(), Box::new(ops), depth))
    }

    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        vec![self.base.clone()]
    }

    fn describe(&self) -> serde_json::Value {
        let l = self.shared.layout;
        serde_json::json!({
            "checksum": "crc32c",
            "data_start": l.data_start,
            "data_blocks": l.data_blocks,
            "metadata_start": l.md_start,
            "metadata_blocks": l.md_blocks,
            "integrity_errors": self.integrity_errors(),
            "failed_reads": self.shared.failed_reads.load(Ordering::Relaxed),
            "logged_lbas": self.shared.logged.lock().map(|s| s.len()).unwrap_or(0),
        })
    }
}

/// A fixed-capacity table of per-request state addressed by slot: no allocation after creation.
pub(crate) struct Slots<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Slots<T> {
    pub(crate) fn new(capacity: usize) -> Slots<T> {
        Slots {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity as u32).rev().collect(),
        }
    }

    pub(crate) fn insert(&mut self, v: T) -> Result<u32, T> {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(v);
                Ok(i)
            }
            None => Err(v),
        }
    }

    pub(crate) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub(crate) fn contains(&self, i: u32) -> bool {
        self.slots.get(i as usize).is_some_and(Option::is_some)
    }

    pub(crate) fn free_slots(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn get(&self, i: u32) -> &T {
        self.slots[i as usize].as_ref().expect("slot in use")
    }

    pub(crate) fn get_mut(&mut self, i: u32) -> &mut T {
        self.slots[i as usize].as_mut().expect("slot in use")
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }

    pub(crate) fn remove(&mut self, i: u32) -> T {
        let v = self.slots[i as usize].take().expect("slot in use");
        self.free.push(i);
        v
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReqKind {
    Flush,
    Read,
    Write,
    /// Unmap or write-zeroes: zero the data with this base operation, clear the entries.
    Dealloc(IoType),
}

struct Req {
    kind: ReqKind,
    /// The caller's request; its buffers travel in the base data request meanwhile.
    io: IoRequest,
    /// Dealloc: blocks handed to ops so far.
    next: u32,
    /// Ops (or, for flush, base requests) in flight.
    in_flight: u32,
    status: IoStatus,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Waiting for the range locks.
    WaitRanges,
    /// Waiting for the metadata block locks (writes; holds the range locks).
    WaitMd,
    /// Metadata read in flight.
    MdRead,
    /// Metadata write in flight (holds the metadata locks).
    MdWrite,
    /// Metadata work finished (or skipped after an error).
    MdDone,
}

/// The unit of work that holds locks: a whole read or write, or one piece of an unmap.
struct Op {
    req: u32,
    kind: ReqKind,
    lba: u64,
    n: u32,
    md_first: u64,
    md_count: u32,
    range_first: u64,
    range_count: u64,
    stage: Stage,
    data_pending: bool,
    holds_ranges: bool,
    holds_md: bool,
    status: IoStatus,
}

impl Op {
    fn writes(&self) -> bool {
        self.kind != ReqKind::Read
    }
}

// The low byte of a base request's tag says what it is; the rest is the op (or request) slot.
const SUB_DATA: u64 = 1;
const SUB_MD_READ: u64 = 2;
const SUB_MD_WRITE: u64 = 3;
const SUB_FLUSH: u64 = 4;

fn sub_tag(slot: u32, sub: u64) -> u64 {
    u64::from(slot) << 8 | sub
}

struct CrcChannel {
    base: Channel,
    shared: Arc<CrcShared>,
    name: String,
    bs: usize,
    /// Metadata blocks one md buffer holds.
    md_buf_blocks: u32,
    reqs: Slots<Req>,
    /// Per request slot: the CRCs of a write's blocks, computed when it arrives.
    crcs: Vec<Vec<u32>>,
    ops: Slots<Op>,
    /// Per op slot: its metadata buffer (`None` while in a base request).
    md_bufs: Vec<Option<AlignedBuf>>,
    /// Dealloc requests with pieces still to create, oldest first.
    waiting: VecDeque<u32>,
    /// Ops waiting for locks.
    lock_wait: VecDeque<u32>,
    /// Base requests the base refused after their request was accepted, to submit again.
    retry: VecDeque<IoRequest>,
    scratch: Vec<IoCompletion>,
}

impl CrcChannel {
    fn base_full(&self) -> bool {
        self.base.in_flight() >= self.base.depth()
    }

    fn submit_base(&mut self, io: IoRequest) {
        if !self.retry.is_empty() {
            self.retry.push_back(io);
        } else if let Err(io) = self.base.submit(io) {
            self.retry.push_back(io);
        }
    }

    fn md_request(&mut self, slot: u32, read: bool) -> IoRequest {
        let o = self.ops.get(slot);
        let len = o.md_count as usize * self.bs;
        let lba = self.shared.layout.md_start + o.md_first;
        let count = o.md_count;
        let buf = self.md_bufs[slot as usize]
            .take()
            .expect("metadata buffer at home");
        let bufs = SgList::from_buf_split(buf, &[len]);
        if read {
            IoRequest::read(lba, count, bufs, sub_tag(slot, SUB_MD_READ))
        } else {
            IoRequest::write(lba, count, bufs, sub_tag(slot, SUB_MD_WRITE))
        }
    }

    /// Creates an op for blocks `lba .. lba + n` of request `req` and starts it (or queues it).
    fn new_op(&mut self, req: u32, kind: ReqKind, lba: u64, n: u32) {
        let (md_first, md_count) = self.shared.layout.md_span(lba, n);
        let (range_first, range_count) = self.shared.range_span(lba, u64::from(n));
        let slot = self
            .ops
            .insert(Op {
                req,
                kind,
                lba,
                n,
                md_first,
                md_count,
                range_first,
                range_count,
                stage: Stage::WaitRanges,
                data_pending: false,
                holds_ranges: false,
                holds_md: false,
                status: IoStatus::Success,
            })
            .map_err(|_| ())
            .expect("room checked by the caller");
        if !self.try_advance(slot) {
            self.lock_wait.push_back(slot);
        }
    }

    /// Moves an op waiting for locks forward; false if it is still waiting.
    fn try_advance(&mut self, slot: u32) -> bool {
        let o = self.ops.get(slot);
        match o.stage {
            Stage::WaitRanges => {
                if !self
                    .shared
                    .ranges
                    .try_lock(o.range_first, o.range_count, o.writes())
                {
                    return false;
                }
                let (kind, lba, n, req) = (o.kind, o.lba, o.n, o.req);
                let data_start = self.shared.layout.data_start;
                let data = match kind {
                    ReqKind::Read | ReqKind::Write => {
                        let r = self.reqs.get_mut(req);
                        IoRequest {
                            io_type: r.io.io_type,
                            offset_blocks: data_start + lba,
                            num_blocks: n,
                            bufs: std::mem::take(&mut r.io.bufs),
                            tag: sub_tag(slot, SUB_DATA),
                        }
                    }
                    ReqKind::Dealloc(op) => {
                        IoRequest::no_data(op, data_start + lba, n, sub_tag(slot, SUB_DATA))
                    }
                    ReqKind::Flush => unreachable!("flushes take no locks"),
                };
                let o = self.ops.get_mut(slot);
                o.holds_ranges = true;
                o.data_pending = true;
                self.submit_base(data);
                if kind == ReqKind::Read {
                    // Readers need no metadata lock (see the module documentation).
                    self.ops.get_mut(slot).stage = Stage::MdRead;
                    let md = self.md_request(slot, true);
                    self.submit_base(md);
                    true
                } else {
                    self.ops.get_mut(slot).stage = Stage::WaitMd;
                    self.try_advance(slot)
                }
            }
            Stage::WaitMd => {
                if !self
                    .shared
                    .md_locks
                    .try_lock(o.md_first, u64::from(o.md_count), true)
                {
                    return false;
                }
                let o = self.ops.get_mut(slot);
                o.holds_md = true;
                o.stage = Stage::MdRead;
                let md = self.md_request(slot, true);
                self.submit_base(md);
                true
            }
            _ => true,
        }
    }

    /// After a write's metadata read: patch its entries and write the metadata back.
    fn patch_and_write_md(&mut self, slot: u32) {
        let o = self.ops.get(slot);
        let layout = self.shared.layout;
        let first_entry = (o.lba - o.md_first * layout.entries_per_block) as usize;
        let (n, kind, req) = (o.n as usize, o.kind, o.req);
        let md = self.md_bufs[slot as usize]
            .as_mut()
            .expect("metadata buffer at home");
        let entries = &mut md.as_mut_slice()[first_entry * ENTRY_BYTES..][..n * ENTRY_BYTES];
        match kind {
            ReqKind::Write => {
                let zero_crc = self.shared.zero_crc;
                for (e, crc) in entries
                    .chunks_exact_mut(ENTRY_BYTES)
                    .zip(&self.crcs[req as usize][..n])
                {
                    e.copy_from_slice(&(crc ^ zero_crc).to_le_bytes());
                }
            }
            _ => entries.fill(0),
        }
        self.ops.get_mut(slot).stage = Stage::MdWrite;
        let io = self.md_request(slot, false);
        self.submit_base(io);
    }

    /// Verifies a finished read against its entries; false if any block fails (the caller's
    /// buffer is then zeroed).
    fn verify(&mut self, slot: u32) -> bool {
        let o = self.ops.get(slot);
        let layout = self.shared.layout;
        let first_entry = (o.lba - o.md_first * layout.entries_per_block) as usize;
        let (lba0, req) = (o.lba, o.req);
        let md = self.md_bufs[slot as usize]
            .as_ref()
            .expect("metadata buffer at home");
        let entries = &md.as_slice()[first_entry * ENTRY_BYTES..];
        let zero_crc = self.shared.zero_crc;
        let bufs = &mut self.reqs.get_mut(req).io.bufs;
        let mut bad = 0u32;
        let shared = &self.shared;
        let name = &self.name;
        for_each_block_crc(bufs, self.bs, |i, crc| {
            let e = &entries[i * ENTRY_BYTES..][..ENTRY_BYTES];
            let want = u32::from_le_bytes(e.try_into().expect("4 bytes"));
            if crc ^ zero_crc != want {
                bad += 1;
                shared.report_mismatch(name, lba0 + i as u64);
            }
        });
        if bad > 0 {
            bufs.fill_zero();
            self.shared.failed_reads.fetch_add(1, Ordering::Relaxed);
        }
        bad == 0
    }

    /// Finishes an op whose base requests are all done: releases its locks, and completes its
    /// request if that was the last op.
    fn finish_op(&mut self, slot: u32, done: &mut Vec<IoCompletion>) {
        let mut status = self.ops.get(slot).status;
        if self.ops.get(slot).kind == ReqKind::Read {
            if status.is_ok() {
                if !self.verify(slot) {
                    status = IoStatus::IntegrityError;
                }
            } else {
                let req = self.ops.get(slot).req;
                self.reqs.get_mut(req).io.bufs.fill_zero();
            }
        }
        let o = self.ops.remove(slot);
        debug_assert!(!o.holds_md);
        if o.holds_ranges {
            self.shared
                .ranges
                .unlock(o.range_first, o.range_count, o.writes());
        }
        let r = self.reqs.get_mut(o.req);
        r.in_flight -= 1;
        if !status.is_ok() && r.status.is_ok() {
            r.status = status;
        }
        let finished = match r.kind {
            ReqKind::Dealloc(_) => {
                r.in_flight == 0 && (r.next == r.io.num_blocks || !r.status.is_ok())
            }
            _ => true,
        };
        if finished {
            self.waiting.retain(|&s| s != o.req);
            let r = self.reqs.remove(o.req);
            done.push(r.io.complete(r.status));
        }
    }

    fn complete_sub(&mut self, c: IoCompletion, done: &mut Vec<IoCompletion>) {
        let slot = (c.tag >> 8) as u32;
        let sub = c.tag & 0xff;
        if sub == SUB_FLUSH {
            let r = self.reqs.remove(slot);
            done.push(r.io.complete(c.status));
            return;
        }
        let o = self.ops.get_mut(slot);
        if !c.status.is_ok() && o.status.is_ok() {
            o.status = c.status;
        }
        match sub {
            SUB_DATA => {
                o.data_pending = false;
                let req = o.req;
                if matches!(o.kind, ReqKind::Read | ReqKind::Write) {
                    self.reqs.get_mut(req).io.bufs = c.bufs;
                }
            }
            SUB_MD_READ => {
                let ok = c.status.is_ok();
                self.md_bufs[slot as usize] = c.bufs.into_buf();
                let o = self.ops.get_mut(slot);
                if o.kind == ReqKind::Read {
                    o.stage = Stage::MdDone;
                } else if ok {
                    self.patch_and_write_md(slot);
                } else {
                    o.stage = Stage::MdDone;
                    o.holds_md = false;
                    let (f, n) = (o.md_first, u64::from(o.md_count));
                    self.shared.md_locks.unlock(f, n, true);
                }
            }
            SUB_MD_WRITE => {
                self.md_bufs[slot as usize] = c.bufs.into_buf();
                let o = self.ops.get_mut(slot);
                o.stage = Stage::MdDone;
                o.holds_md = false;
                let (f, n) = (o.md_first, u64::from(o.md_count));
                self.shared.md_locks.unlock(f, n, true);
            }
            _ => unreachable!("unknown sub-request {sub}"),
        }
        let o = self.ops.get(slot);
        if o.stage == Stage::MdDone && !o.data_pending {
            self.finish_op(slot, done);
        }
    }

    /// Creates pieces of dealloc request `slot` while resources last; true when it has nothing
    /// left to create.
    fn pump_dealloc(&mut self, slot: u32) -> bool {
        let layout = self.shared.layout;
        loop {
            let r = self.reqs.get(slot);
            let ReqKind::Dealloc(_) = r.kind else {
                return true;
            };
            if r.next == r.io.num_blocks || !r.status.is_ok() {
                return true;
            }
            if r.in_flight >= DEALLOC_OPS_IN_FLIGHT || self.base_full() || !self.ops.has_room() {
                return false;
            }
            let lba = r.io.offset_blocks + u64::from(r.next);
            let md_first = lba / layout.entries_per_block;
            let end = (md_first + u64::from(self.md_buf_blocks)) * layout.entries_per_block;
            let n = (r.io.num_blocks - r.next).min((end - lba).min(u64::from(u32::MAX)) as u32);
            let kind = r.kind;
            let r = self.reqs.get_mut(slot);
            r.next += n;
            r.in_flight += 1;
            self.new_op(slot, kind, lba, n);
        }
    }

    fn pump_waiting(&mut self) {
        while let Some(&slot) = self.waiting.front() {
            if !self.pump_dealloc(slot) {
                break;
            }
            self.waiting.pop_front();
        }
    }
}

impl Drop for CrcChannel {
    /// Waits for the base requests still in flight (their buffers and the metadata blocks they
    /// write are this channel's), then releases the locks its ops hold, so that a channel closed
    /// mid-request never blocks the other channels.
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut discard = Vec::new();
        while (self.base.in_flight() > 0 || !self.retry.is_empty()) && Instant::now() < deadline {
            self.retry.clear();
            if self.base.poll(&mut discard) == 0 {
                match self.base.wake() {
                    Wake::At(t) => std::thread::sleep(t.saturating_duration_since(Instant::now())),
                    Wake::Event => {
                        if let Ok(r) = ThreadRing::current() {
                            r.wait(Some(Duration::from_millis(1)));
                        }
                    }
                    Wake::Immediate => {}
                }
            }
            discard.clear();
        }
        if self.base.in_flight() > 0 {
            tracing::error!("crc channel closed with base I/O still in flight; keeping its locks");
            return;
        }
        for o in self.ops.iter() {
            if o.holds_md {
                self.shared
                    .md_locks
                    .unlock(o.md_first, u64::from(o.md_count), true);
            }
            if o.holds_ranges {
                self.shared
                    .ranges
                    .unlock(o.range_first, o.range_count, o.writes());
            }
        }
    }
}

impl ChannelOps for CrcChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        if self.base_full() || !self.reqs.has_room() {
            return Err(io);
        }
        match io.io_type {
            IoType::Flush => {
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: ReqKind::Flush,
                        io,
                        next: 0,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                self.submit_base(IoRequest::no_data(
                    IoType::Flush,
                    0,
                    0,
                    sub_tag(slot, SUB_FLUSH),
                ));
            }
            IoType::Read | IoType::Write => {
                // Keep op slots for the unmap pieces already promised.
                if self.ops.free_slots() <= DEALLOC_OPS_IN_FLIGHT as usize {
                    return Err(io);
                }
                let kind = if io.io_type == IoType::Write {
                    ReqKind::Write
                } else {
                    ReqKind::Read
                };
                let (lba, n) = (io.offset_blocks, io.num_blocks);
                let slot = self
                    .reqs
                    .insert(Req {
                        kind,
                        io,
                        next: n,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                if kind == ReqKind::Write {
                    let crcs = &mut self.crcs[slot as usize];
                    for_each_block_crc(&self.reqs.get(slot).io.bufs, self.bs, |i, crc| {
                        crcs[i] = crc;
                    });
                }
                self.new_op(slot, kind, lba, n);
            }
            IoType::Unmap | IoType::WriteZeroes => {
                let op = if io.io_type == IoType::Unmap {
                    self.shared.unmap_op
                } else {
                    self.shared.zeroes_op
                };
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: ReqKind::Dealloc(op),
                        io,
                        next: 0,
                        in_flight: 0,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                self.waiting.push_back(slot);
                self.pump_waiting();
            }
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let start = done.len();
        while let Some(io) = self.retry.pop_front() {
            if let Err(io) = self.base.submit(io) {
                self.retry.push_front(io);
                break;
            }
        }
        let mut completions = std::mem::take(&mut self.scratch);
        self.base.poll(&mut completions);
        for c in completions.drain(..) {
            self.complete_sub(c, done);
        }
        self.scratch = completions;
        for _ in 0..self.lock_wait.len() {
            let slot = self.lock_wait.pop_front().expect("counted");
            if !self.try_advance(slot) {
                self.lock_wait.push_back(slot);
            }
        }
        self.pump_waiting();
        done.len() - start
    }

    fn wake(&self) -> Wake {
        let front_can_issue = self.waiting.front().is_some_and(|&s| {
            self.reqs.get(s).in_flight < DEALLOC_OPS_IN_FLIGHT
                && !self.base_full()
                && self.ops.has_room()
        });
        if front_can_issue
            || !self.lock_wait.is_empty()
            || (!self.retry.is_empty() && !self.base_full())
        {
            Wake::Immediate
        } else {
            self.base.wake()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::file::{DirectMode, FileBdev, FileOptions};
    use crate::malloc::MallocBdev;

    fn malloc(bs: BlockSize, blocks: u64) -> Arc<dyn Bdev> {
        Arc::new(MallocBdev::new("m", bs, blocks, blocks).unwrap())
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn block_data(lba: u64, bs: usize, generation: u8) -> Vec<u8> {
        let mut v = vec![0u8; bs];
        conformance::pattern(&mut v, lba, bs, u64::from(generation));
        v
    }

    fn fill(ch: &mut SyncChannel, blocks: u64, bs: usize, generation: u8) {
        let mut lba = 0;
        while lba < blocks {
            let n = (blocks - lba).min(32);
            let data: Vec<u8> = (lba..lba + n)
                .flat_map(|l| block_data(l, bs, generation))
                .collect();
            assert_eq!(ch.write(lba, &data), IoStatus::Success, "fill at {lba}");
            lba += n;
        }
    }

    /// Flips one bit of byte `offset` of base block `lba`.
    fn flip(raw: &mut SyncChannel, lba: u64, offset: usize) {
        let (st, mut b) = raw.read(lba, 1);
        assert_eq!(st, IoStatus::Success);
        b[offset] ^= 0x10;
        assert_eq!(raw.write(lba, &b), IoStatus::Success);
    }

    fn file_options(path: std::path::PathBuf, size: u64) -> FileOptions {
        FileOptions {
            path,
            block_size: BlockSize::B4096,
            size: Some(size),
            create: true,
            direct: DirectMode::Auto,
            read_only: false,
        }
    }

    #[test]
    fn layout_is_the_largest_that_fits() {
        for bs in [BlockSize::B512, BlockSize::B4096] {
            let e = u64::from(bs.bytes()) / 4;
            for base in [3u64, 4, 100, e, e + 1, e + 2, 4 * e + 7, 1 << 20] {
                let l = CrcLayout::for_base(bs, base).unwrap();
                assert!(l.base_blocks() <= base, "{bs} {base}");
                assert!(l.md_blocks * e >= l.data_blocks);
                // One more data block would not fit.
                let bigger = CrcLayout::with_data_blocks(bs, l.data_blocks + 1);
                assert!(bigger.base_blocks() > base, "{bs} {base}: not the largest");
            }
            assert_eq!(CrcLayout::for_base(bs, 2), None);
            assert_eq!(CrcLayout::for_base(bs, 0), None);
        }
    }

    #[test]
    fn crc_passes_conformance_over_malloc_4k_and_512() {
        conformance::run(
            &|| Arc::new(CrcBdev::open("c", malloc(BlockSize::B4096, 2048)).unwrap()),
            false,
        );
        conformance::run(
            &|| Arc::new(CrcBdev::open("c", malloc(BlockSize::B512, 4096)).unwrap()),
            false,
        );
    }

    #[test]
    fn crc_passes_conformance_over_file_with_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.img");
        let open = || -> Arc<dyn Bdev> {
            let o = file_options(path.clone(), 4 << 20);
            let f: Arc<dyn Bdev> = Arc::new(FileBdev::open("f", &o).unwrap());
            Arc::new(CrcBdev::open("c", f).unwrap())
        };
        conformance::run(&open, true);
        // Reopened once more: everything the suite left verifies.
        let c = open();
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        let n = c.info().block_count();
        let mut lba = 0;
        while lba < n {
            let k = (n - lba).min(64) as u32;
            assert_eq!(ch.read(lba, k).0, IoStatus::Success, "lba {lba}");
            lba += u64::from(k);
        }
    }

    #[test]
    fn exposes_the_data_region_and_reads_never_written_blocks_as_zeroes() {
        let base = malloc(BlockSize::B4096, 4096);
        let c = CrcBdev::open("c", base).unwrap();
        let l = c.layout();
        assert_eq!(c.info().block_count(), l.data_blocks);
        assert_eq!(l.data_blocks, 4091, "4096 - header - 4 metadata blocks");
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        let (st, d) = ch.read(l.data_blocks - 8, 8);
        assert_eq!(st, IoStatus::Success);
        assert!(d.iter().all(|&b| b == 0));
        assert_eq!(c.integrity_errors(), 0);
    }

    #[test]
    fn flipping_data_or_metadata_of_sampled_blocks_is_always_detected() {
        for bs in [BlockSize::B4096, BlockSize::B512] {
            let base = malloc(bs, 4096);
            let c = CrcBdev::open("c", base.clone()).unwrap();
            let l = c.layout();
            let b = bs.bytes() as usize;
            let mut ch = SyncChannel::new(c.open_channel().unwrap());
            let mut raw = SyncChannel::new(base.open_channel().unwrap());
            // Every block written except the last 64, which stay never-written.
            let written = l.data_blocks - 64;
            fill(&mut ch, written, b, 1);
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut chosen = std::collections::BTreeSet::new();
            while chosen.len() < 200 {
                chosen.insert(rng.below(l.data_blocks));
            }
            let mut in_data = 0;
            for &lba in &chosen {
                if rng.next() & 1 == 0 {
                    flip(&mut raw, l.data_start + lba, rng.below(b as u64) as usize);
                    in_data += 1;
                } else {
                    let (md, off) = l.entry_of(lba);
                    flip(
                        &mut raw,
                        l.md_start + md,
                        off + rng.below(ENTRY_BYTES as u64) as usize,
                    );
                }
            }
            assert!(in_data > 50 && in_data < 150, "both kinds are exercised");
            let mut detected = 0;
            for &lba in &chosen {
                let (st, data) = ch.read(lba, 1);
                if st == IoStatus::IntegrityError {
                    detected += 1;
                }
                assert!(
                    data.iter().all(|&x| x == 0),
                    "lba {lba}: a failed read returned data"
                );
            }
            assert_eq!(detected, 200, "{bs}: flipped blocks detected out of 200");
            assert_eq!(c.integrity_errors(), 200);
            let d = c.describe();
            assert_eq!(d["integrity_errors"], 200);
            assert_eq!(d["failed_reads"], 200);
            assert_eq!(d["logged_lbas"], 200);
            // Read again: counted again, not logged again.
            assert_eq!(
                ch.read(*chosen.first().unwrap(), 1).0,
                IoStatus::IntegrityError
            );
            assert_eq!(c.describe()["logged_lbas"], 200);
            assert_eq!(c.integrity_errors(), 201);
            // A multi-block read over a flipped block fails whole, and returns nothing.
            let &t = chosen.iter().find(|&&x| x > 4 && x < written).unwrap();
            let (st, data) = ch.read(t - 2, 4);
            assert_eq!(st, IoStatus::IntegrityError);
            assert!(data.iter().all(|&x| x == 0));
            // Untouched blocks still read back.
            for lba in (0..written).filter(|x| !chosen.contains(x)).step_by(37) {
                let (st, data) = ch.read(lba, 1);
                assert_eq!(st, IoStatus::Success, "lba {lba}");
                assert!(data == block_data(lba, b, 1), "lba {lba}");
            }
            // Rewriting a flipped block heals it.
            assert_eq!(ch.write(t, &block_data(t, b, 2)), IoStatus::Success);
            assert_eq!(ch.read(t, 1), (IoStatus::Success, block_data(t, b, 2)));
        }
    }

    #[test]
    fn foreign_data_and_corrupted_headers_are_refused() {
        let base = malloc(BlockSize::B4096, 256);
        let mut raw = SyncChannel::new(base.open_channel().unwrap());
        assert_eq!(raw.write(0, &[7u8; 4096]), IoStatus::Success);
        let e = CrcBdev::open("c", base.clone()).err().unwrap();
        assert_eq!(e.field(), Some("base"));
        assert!(e.to_string().contains("refusing"), "{e}");
        assert_eq!(raw.write(0, &[0u8; 4096]), IoStatus::Success);
        drop(CrcBdev::open("c", base.clone()).unwrap());
        flip(&mut raw, 0, 20);
        let e = CrcBdev::open("c", base.clone()).err().unwrap();
        assert!(e.to_string().contains("corrupted"), "{e}");
        // `if_unformatted` formats a block 0 without the magic, never a damaged header.
        let e = CrcBdev::open_with("c", base.clone(), Format::IfUnformatted)
            .err()
            .unwrap();
        assert!(e.to_string().contains("corrupted"), "{e}");
        assert_eq!(raw.write(0, &[7u8; 4096]), IoStatus::Success);
        assert_eq!(raw.write(9, &[7u8; 4096]), IoStatus::Success);
        let c = CrcBdev::open_with("c", base.clone(), Format::IfUnformatted).unwrap();
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        assert_eq!(
            ch.read(8, 1),
            (IoStatus::Success, vec![0u8; 4096]),
            "data zeroed"
        );
        drop(ch);
        drop(c);
        drop(CrcBdev::open("c", base).unwrap());
    }

    #[test]
    fn unmap_and_write_zeroes_read_as_zeroes_and_keep_neighbours() {
        let base = malloc(BlockSize::B4096, 8192);
        let c = CrcBdev::open("c", base).unwrap();
        let mut ch = SyncChannel::new(c.open_channel().unwrap());
        let n = c.info().block_count();
        fill(&mut ch, n, 4096, 3);
        // Ranges crossing metadata blocks and several unmap pieces.
        assert_eq!(ch.unmap(1000, 3000), IoStatus::Success);
        assert_eq!(ch.write_zeroes(5000, 2100), IoStatus::Success);
        for lba in (0..n)
            .step_by(7)
            .chain([999, 1000, 3999, 4000, 4999, 5000, 7099, 7100])
        {
            let (st, d) = ch.read(lba, 1);
            assert_eq!(st, IoStatus::Success, "lba {lba}");
            let zero = (1000..4000).contains(&lba) || (5000..7100).contains(&lba);
            if zero {
                assert!(d.iter().all(|&x| x == 0), "lba {lba}");
            } else {
                assert!(d == block_data(lba, 4096, 3), "lba {lba}");
            }
        }
        assert_eq!(c.integrity_errors(), 0);
    }

    #[test]
    fn channels_writing_blocks_that_share_metadata_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let o = file_options(dir.path().join("c.img"), 1200 * 4096);
        for base in [
            malloc(BlockSize::B4096, 1200),
            Arc::new(FileBdev::open("f", &o).unwrap()) as Arc<dyn Bdev>,
        ] {
            let c = CrcBdev::open("c", base).unwrap();
            let mut chans = [c.open_channel().unwrap(), c.open_channel().unwrap()];
            let blocks = 1024u64;
            let mut next = [0u64, 1u64];
            let mut done = Vec::new();
            let mut finished = 0;
            while finished < blocks {
                for (i, ch) in chans.iter_mut().enumerate() {
                    while next[i] < blocks {
                        let lba = next[i];
                        let mut b = AlignedBuf::new(4096);
                        b.as_mut_slice().copy_from_slice(&block_data(lba, 4096, 4));
                        match ch.submit(IoRequest::write(lba, 1, SgList::from_buf(b), lba)) {
                            Ok(()) => next[i] += 2,
                            Err(_) => break,
                        }
                    }
                    ch.poll(&mut done);
                }
                for c in done.drain(..) {
                    assert_eq!(c.status, IoStatus::Success, "write of {}", c.tag);
                    finished += 1;
                }
                if let Ok(r) = ThreadRing::current() {
                    r.flush();
                }
            }
            drop(chans);
            let mut ch = SyncChannel::new(c.open_channel().unwrap());
            for lba in 0..blocks {
                let (st, d) = ch.read(lba, 1);
                assert_eq!(st, IoStatus::Success, "lba {lba}");
                assert!(d == block_data(lba, 4096, 4), "lba {lba}");
            }
        }
    }

    #[test]
    fn reads_racing_writes_of_the_same_blocks_never_fail() {
        let c = CrcBdev::open("c", malloc(BlockSize::B4096, 512)).unwrap();
        let mut w = c.open_channel().unwrap();
        let mut r = c.open_channel().unwrap();
        let mut done = Vec::new();
        let mut rng = Rng(99);
        for round in 0..2000u64 {
            let lba = rng.below(64);
            let mut b = AlignedBuf::new(8192);
            b.as_mut_slice()[..4096].copy_from_slice(&block_data(lba, 4096, round as u8));
            b.as_mut_slice()[4096..].copy_from_slice(&block_data(lba + 1, 4096, round as u8));
            let write = IoRequest::write(lba, 2, SgList::from_buf(b), 0);
            let read = IoRequest::read(
                lba + rng.below(2),
                2,
                SgList::from_buf(AlignedBuf::new(8192)),
                1,
            );
            if round % 2 == 0 {
                w.submit(write).unwrap();
                r.submit(read).unwrap();
            } else {
                r.submit(read).unwrap();
                w.submit(write).unwrap();
            }
            while w.in_flight() + r.in_flight() > 0 {
                w.poll(&mut done);
                r.poll(&mut done);
            }
            for c in done.drain(..) {
                assert_eq!(c.status, IoStatus::Success, "round {round} tag {}", c.tag);
            }
        }
        assert_eq!(c.integrity_errors(), 0);
    }
}
