//! `mdregion`: the machinery of stacked bdevs that keep one metadata entry per data block in a
//! region at the end of their base: [`crate::crc`] (a CRC32C per block) and the crypto crate's
//! `crypt_gcm` (a nonce and a tag per block). Public so that `ferroblk-crypto` uses it. A kind
//! supplies its [`MdFormat`] (magic, entry size, lock granularity), its header fields, and an
//! [`EntryOps`] that computes and checks entries; this module does the rest: layout, header,
//! formatting, and the channel ([`MdChannel`]) with its locking and metadata read-modify-write.
//!
//! # On-disk layout (base blocks of the bdev's block size `bs`, entries of `E` bytes)
//! ```text
//! block 0            header: magic, version, block size, data blocks, metadata start (the
//!                    first 32 bytes, common to every kind), the kind's fields, a checksum
//! blocks 1 ..= D     data: block `lba` of the stacked bdev is base block `1 + lba`
//! blocks 1 + D ..    metadata: one E-byte entry per data block, `bs / E` per base block
//! ```
//! The common header fields are little-endian: magic (8 bytes) | version (u32) | block size
//! (u32) | data blocks `D` (u64) | metadata start (u64). The kind's fields follow from byte 32
//! up to [`MdFormat::sum_at`], where a u32 checksum of the bytes before it ends the header; the
//! rest of block 0 is zero. `D` is the largest count for which header, data and metadata fit the
//! base ([`MdLayout::for_base`]); the stacked bdev exposes those `D` blocks. The layout is fixed
//! when the base is formatted; the bdev does not follow base resizes. An all-zero entry beside
//! all-zero data is what formatting leaves, and every kind reads it as a zero block.
//!
//! # Formatting
//! [`open`] formats a base whose block 0 is all zeroes (or, with [`Format::IfUnformatted`], lacks
//! the kind's magic): it zeroes the data and metadata regions (the base's unmap where unmapped
//! blocks read zeroes, which keeps sparse files sparse; else its write-zeroes; else zero writes)
//! and writes the header, flushing after each. On a device without fast zeroing that takes as
//! long as writing it once. The header goes last, so a crash while formatting leaves block 0 as
//! it was and the next open formats again. A base whose block 0 is neither zero nor a header of
//! the kind is refused, never formatted over; so is a header with a bad checksum.
//!
//! # Data path
//! A request becomes *ops*: a read or a write is one op; an unmap or write-zeroes is cut into
//! pieces of at most a few metadata blocks' worth of data (the kind says how many, in
//! [`MdChannel::new`]), at most [`DEALLOC_OPS_IN_FLIGHT`] in flight per request. Each op:
//! - Read: takes its range locks shared, then reads the data while it reads the covering
//!   metadata blocks into a channel buffer; then the kind checks every block. The data goes
//!   either straight into the caller's buffer, checked there ([`EntryOps::verify`]), or, when
//!   the kind gives the read a data buffer of its own ([`EntryOps::take_bufs`]), into that
//!   buffer, checked (and turned back) there ([`EntryOps::verify_own`]) and copied to the caller
//!   once, only if every block passed. If any block fails, the whole caller buffer is zeroed and
//!   the read completes with [`IoStatus::IntegrityError`]: no unverified byte is returned.
//! - Write: takes its range locks exclusive, then (with separate metadata locks, see below) the
//!   locks of its metadata blocks; reads those blocks, patches its entries
//!   ([`EntryOps::patch`]) and writes them back. The data goes to the base either from the
//!   caller's buffer as soon as the range locks are held, concurrently with the metadata work
//!   ([`EntryOps::WRITE_IN_PLACE`]: the entries were computed when the request arrived), or from
//!   the op's own buffer together with the metadata write. The request completes when both the
//!   data and the metadata writes have; a crash between the two leaves the block failing its
//!   check (a torn write shows as `IntegrityError`, not as silently wrong data). Once an op has
//!   failed (its metadata read, or its data I/O before the read returned) it writes no metadata.
//! - Unmap and write-zeroes (per piece): like a write whose data step zeroes the data range in
//!   the base (unmap where unmapped blocks read zeroes, else write-zeroes; a write-zeroes
//!   prefers the base's write-zeroes) and whose patch clears the entries: the blocks read as
//!   zeroes. Cheap (no data is transformed), at the cost of showing an observer of the base
//!   which blocks are zero, as discards do on dm-crypt.
//! - Flush: passed through (a write completes only once both its data and metadata have).
//!
//! # Locks
//! Shared by all channels of the bdev ([`LockTable`]: striped atomic words, taken with try-lock,
//! all-or-nothing; an op that misses one waits in its channel's queue and is retried on the next
//! poll, so no reactor ever blocks):
//! - *Range locks* cover [`MdFormat::range_bytes`] of data each, or, without it, exactly the data
//!   of one metadata block. Writes and unmap pieces hold theirs exclusively from before their
//!   data I/O until their metadata is written; reads hold theirs shared for the data and
//!   metadata reads. So a read never sees new data with an old entry (or the reverse) of a block
//!   being written, and never reports a false integrity error.
//! - *Metadata block locks*, only with `range_bytes` (ranges smaller than a metadata block's
//!   coverage): exclusive, held only for the read-modify-write of the op's metadata blocks, so
//!   neighbouring writes from any channel serialize only that step, not their data I/O; there is
//!   no global lock. Reads need none: a concurrent read-modify-write by another writer rewrites
//!   the entries of *this* read's range with their current values (its writer is excluded by the
//!   range lock), so whatever mix of old and new block the read sees, its own entries are right.
//!   A write waiting for its metadata locks keeps its range locks; that cannot deadlock, since
//!   range locks are taken while holding no other lock, and metadata locks are held only for
//!   I/O, never while waiting for a lock. Without `range_bytes`, the range locks are the
//!   metadata block locks, and an op never waits for a lock while holding one.
//!
//! A channel refuses a request (back-pressure) when its base is full, or it has no request
//! slot, op slot or buffer for it ([`EntryOps::take_bufs`]); a base request the base refuses
//! after its request was accepted waits in the channel's retry queue. Nothing is allocated per
//! request: every table and queue is sized when the channel opens.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bdev::{
    Bdev, BdevInfo, CROSS_CHANNEL_WAIT, Channel, ChannelOps, IoCompletion, IoRequest, Wake,
};
use crate::buf::{AlignedBuf, IoSeg, SgList};
use crate::error::BdevError;
use crate::stacked::{BaseQueue, Format, LockTable, Slots, flush_if, zero_range, zeroing_ops};
use crate::sync::SyncChannel;
use crate::types::{BlockSize, Caps, IoStatus, IoType};

/// Unmap / write-zeroes pieces one request keeps in flight at most; a channel also keeps as many
/// op slots for them ([`op_slots`]).
pub const DEALLOC_OPS_IN_FLIGHT: u32 = 4;
/// Header bytes every kind shares (magic through metadata start); the kind's fields follow.
pub const HEADER_COMMON_BYTES: usize = 32;

/// Where things are on the base, in base blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MdLayout {
    /// First data block (block `lba` of the stacked bdev is base block `data_start + lba`).
    pub data_start: u64,
    /// Data blocks: the stacked bdev's size.
    pub data_blocks: u64,
    /// First metadata block.
    pub md_start: u64,
    /// Metadata blocks.
    pub md_blocks: u64,
    /// Entries per metadata block (`block size / entry_bytes`).
    pub entries_per_block: u64,
    /// Bytes of one entry.
    pub entry_bytes: usize,
}

impl MdLayout {
    /// The largest layout with `entry_bytes`-byte entries that fits `base_blocks` blocks of
    /// `bs`, if any data block fits.
    pub fn for_base(bs: BlockSize, entry_bytes: usize, base_blocks: u64) -> Option<MdLayout> {
        let e = u64::from(bs.bytes()) / entry_bytes as u64;
        let avail = base_blocks.checked_sub(1)?;
        // The largest d with d + ceil(d / e) <= avail: start near avail * e / (e + 1), adjust.
        let mut d = (u128::from(avail) * u128::from(e) / (u128::from(e) + 1)) as u64;
        while d > 0 && d + d.div_ceil(e) > avail {
            d -= 1;
        }
        while d + 1 + (d + 1).div_ceil(e) <= avail {
            d += 1;
        }
        (d > 0).then(|| MdLayout::with_data_blocks(bs, entry_bytes, d))
    }

    /// The layout of `d` data blocks with `entry_bytes`-byte entries on blocks of `bs`.
    pub fn with_data_blocks(bs: BlockSize, entry_bytes: usize, d: u64) -> MdLayout {
        let e = u64::from(bs.bytes()) / entry_bytes as u64;
        MdLayout {
            data_start: 1,
            data_blocks: d,
            // Saturating: a header can claim any count, and must fail the size check, not wrap.
            md_start: d.saturating_add(1),
            md_blocks: d.div_ceil(e),
            entries_per_block: e,
            entry_bytes,
        }
    }

    /// Base blocks the layout uses.
    pub fn base_blocks(&self) -> u64 {
        self.md_start.saturating_add(self.md_blocks)
    }

    /// The metadata block (relative to `md_start`) and byte offset in it of block `lba`'s entry.
    pub fn entry_of(&self, lba: u64) -> (u64, usize) {
        (
            lba / self.entries_per_block,
            (lba % self.entries_per_block) as usize * self.entry_bytes,
        )
    }

    /// Metadata blocks (first, relative to `md_start`, and count) holding the entries of blocks
    /// `lba .. lba + n`.
    pub fn md_span(&self, lba: u64, n: u32) -> (u64, u32) {
        let first = lba / self.entries_per_block;
        let last = (lba + u64::from(n) - 1) / self.entries_per_block;
        (first, (last - first + 1) as u32)
    }
}

/// What differs between kinds of metadata-region volumes, besides their [`EntryOps`].
#[derive(Clone, Copy, Debug)]
pub struct MdFormat {
    /// The bdev's `kind` name.
    pub kind: &'static str,
    /// The volume as messages name it (`"crc volume"`).
    pub volume: &'static str,
    /// Its header as messages name it (`"crc header"`).
    pub header: &'static str,
    /// The first 8 bytes of the header.
    pub magic: &'static [u8; 8],
    /// The format version this build writes and reads.
    pub version: u32,
    /// Header bytes the checksum covers (at least [`HEADER_COMMON_BYTES`]); the checksum
    /// (u32, little-endian) follows them.
    pub sum_at: usize,
    /// The header checksum.
    pub sum: fn(&[u8]) -> u32,
    /// Bytes of one metadata entry (a power of two that divides the block size).
    pub entry_bytes: usize,
    /// Data bytes one range lock covers, with separate metadata block locks for the
    /// read-modify-write; `None`: one range lock per metadata block, and no others (see the
    /// module documentation).
    pub range_bytes: Option<u64>,
    /// Largest transfer of the bdev, in bytes (also bounded by the base's and the data
    /// region's).
    pub max_transfer_bytes: u64,
}

/// The header fields every kind shares.
struct Header {
    block_size: u32,
    data_blocks: u64,
    md_start: u64,
}

impl MdFormat {
    /// Writes the common fields into a zeroed `out` (the kind's fields and checksum follow).
    fn encode(&self, h: &Header, out: &mut [u8]) {
        out.fill(0);
        out[0..8].copy_from_slice(self.magic);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&h.block_size.to_le_bytes());
        out[16..24].copy_from_slice(&h.data_blocks.to_le_bytes());
        out[24..32].copy_from_slice(&h.md_start.to_le_bytes());
    }

    /// Writes the checksum of the header bytes before it.
    fn seal(&self, out: &mut [u8]) {
        let sum = (self.sum)(&out[..self.sum_at]);
        out[self.sum_at..self.sum_at + 4].copy_from_slice(&sum.to_le_bytes());
    }

    fn decode(&self, b: &[u8]) -> Result<Header, String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..8] != self.magic {
            return Err(format!(
                "block 0 is neither zero nor a {}; refusing to format over existing data",
                self.header
            ));
        }
        if (self.sum)(&b[..self.sum_at]) != u32_at(self.sum_at) {
            return Err(format!("the {} is corrupted (CRC mismatch)", self.header));
        }
        let version = u32_at(8);
        if version != self.version {
            return Err(format!(
                "{} format version {version} is not supported (this build reads {})",
                self.volume, self.version
            ));
        }
        Ok(Header {
            block_size: u32_at(12),
            data_blocks: u64_at(16),
            md_start: u64_at(24),
        })
    }
}

/// Why [`open`] failed. `E` is the kind's own error (from its header hooks).
#[derive(Debug, thiserror::Error)]
pub enum OpenError<E: std::error::Error + 'static> {
    /// The base holds something that is not a usable volume of this kind, or cannot hold one.
    #[error("{0}")]
    Volume(String),
    /// Reading or writing the base while opening or formatting failed.
    #[error("{what} failed: {status}")]
    BaseIo {
        /// What was being done.
        what: &'static str,
        /// The base's status.
        status: IoStatus,
    },
    /// The base refused to open a channel.
    #[error("base bdev")]
    Bdev(#[source] BdevError),
    /// The kind's check of its header fields failed.
    #[error(transparent)]
    Kind(E),
}

/// A volume [`open`] opened (formatting its base first if asked).
pub struct MdVolume {
    /// The stacked bdev's info: the data region's size, the base's block size, alignment and
    /// segment limits, and the capabilities a metadata-region bdev has on this base.
    pub info: Arc<BdevInfo>,
    /// The state its channels share.
    pub region: Arc<MdRegion>,
    /// Block 0 as on the base: the kind reads its own header fields from it.
    pub header: Vec<u8>,
}

/// Opens the volume of format `f` on `base`, formatting the base first as `format` says.
/// When formatting, `init_header` gets the header block with the common fields written and
/// writes the kind's fields (bytes [`HEADER_COMMON_BYTES`] `..` [`MdFormat::sum_at`]) before the
/// checksum is computed; when opening a formatted base, `check_header` gets block 0 once its
/// magic, checksum and version have been checked.
pub fn open<E: std::error::Error + 'static>(
    name: &str,
    base: &Arc<dyn Bdev>,
    format: Format,
    f: &MdFormat,
    init_header: impl FnOnce(&mut [u8]) -> Result<(), E>,
    check_header: impl FnOnce(&[u8]) -> Result<(), E>,
) -> Result<MdVolume, OpenError<E>> {
    let io_fail = |what, status| OpenError::BaseIo { what, status };
    let g = base.info().geometry();
    let bs = g.block_size;
    if !g.caps.contains(Caps::READ | Caps::RETAINS_DATA) {
        return Err(OpenError::Volume(format!(
            "the base does not keep data (a {} needs a readable, retaining base)",
            f.volume
        )));
    }
    let (unmap_op, zeroes_op) = zeroing_ops(g.caps);
    let mut ch = SyncChannel::new(base.open_channel().map_err(OpenError::Bdev)?);
    let (st, block0) = ch.read(0, 1);
    if !st.is_ok() {
        return Err(io_fail("reading the header", st));
    }
    let (header, block0) = if format.wants(&block0, f.magic) {
        let layout = MdLayout::for_base(bs, f.entry_bytes, g.block_count).ok_or_else(|| {
            OpenError::Volume(format!(
                "{} blocks is too small for a {} (header, data and metadata)",
                g.block_count, f.volume
            ))
        })?;
        if base.info().is_read_only() || !g.caps.contains(Caps::WRITE) {
            return Err(OpenError::Volume(format!(
                "block 0 is zero (no {} yet) and the base is read-only, so it cannot be formatted",
                f.volume
            )));
        }
        let h = Header {
            block_size: bs.bytes(),
            data_blocks: layout.data_blocks,
            md_start: layout.md_start,
        };
        let mut hb = vec![0u8; bs.bytes() as usize];
        f.encode(&h, &mut hb);
        init_header(&mut hb).map_err(OpenError::Kind)?;
        f.seal(&mut hb);
        // Data and metadata start out zero: every block reads as never written.
        zero_range(&mut ch, 1, layout.base_blocks() - 1, unmap_op)
            .map_err(|st| io_fail("zeroing the data and metadata regions", st))?;
        flush_if(&mut ch, g.caps).map_err(|st| io_fail("flushing the zeroed regions", st))?;
        let st = ch.write(0, &hb);
        if !st.is_ok() {
            return Err(io_fail("writing the header", st));
        }
        flush_if(&mut ch, g.caps).map_err(|st| io_fail("flushing the header", st))?;
        tracing::info!(bdev = %name, base = %base.info().name(),
            data_blocks = layout.data_blocks, "formatted a {}", f.volume);
        (h, hb)
    } else {
        let h = f.decode(&block0).map_err(OpenError::Volume)?;
        check_header(&block0).map_err(OpenError::Kind)?;
        (h, block0)
    };
    drop(ch);
    if header.block_size != bs.bytes() {
        return Err(OpenError::Volume(format!(
            "the {} was formatted with {}-byte blocks but the base has {}-byte blocks",
            f.volume,
            header.block_size,
            bs.bytes()
        )));
    }
    let layout = MdLayout::with_data_blocks(bs, f.entry_bytes, header.data_blocks);
    if header.data_blocks == 0 || header.md_start != layout.md_start {
        return Err(OpenError::Volume(format!(
            "the {} has an inconsistent layout",
            f.header
        )));
    }
    if layout.base_blocks() > g.block_count {
        return Err(OpenError::Volume(format!(
            "the {} needs {} blocks but the base has only {}",
            f.volume,
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
        .min(f.max_transfer_bytes >> bs.shift())
        .min(layout.data_blocks) as u32;
    let info = BdevInfo::builder(name, f.kind, bs, layout.data_blocks, caps)
        .buf_align(g.buf_align)
        .max_transfer_blocks(max_transfer)
        .max_segments(g.max_segments)
        .read_only(base.info().is_read_only())
        .build();
    debug_assert!(layout.entries_per_block.is_power_of_two());
    let range_shift = match f.range_bytes {
        Some(bytes) => (bytes >> bs.shift()).trailing_zeros(),
        None => layout.entries_per_block.trailing_zeros(),
    };
    Ok(MdVolume {
        info,
        region: Arc::new(MdRegion {
            layout,
            range_shift,
            ranges: LockTable::new(),
            md_locks: f.range_bytes.map(|_| LockTable::new()),
            unmap_op: unmap_op.unwrap_or(IoType::WriteZeroes),
            zeroes_op: zeroes_op.unwrap_or(IoType::WriteZeroes),
        }),
        header: block0,
    })
}

/// The state the channels of one metadata-region bdev share: its layout and lock tables.
pub struct MdRegion {
    layout: MdLayout,
    /// `lba >> range_shift` is the block's range lock.
    range_shift: u32,
    ranges: LockTable,
    /// Metadata block locks, where ranges are not metadata blocks.
    md_locks: Option<LockTable>,
    /// Base operation that zeroes a data range for an unmap.
    unmap_op: IoType,
    /// Base operation that zeroes a data range for a write-zeroes.
    zeroes_op: IoType,
}

impl MdRegion {
    /// Where the header, data and metadata are on the base.
    pub fn layout(&self) -> MdLayout {
        self.layout
    }

    fn range_span(&self, lba: u64, n: u32) -> (u64, u64) {
        let first = lba >> self.range_shift;
        let last = (lba + u64::from(n) - 1) >> self.range_shift;
        (first, last - first + 1)
    }
}

/// What an op does to its blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OpKind {
    /// Read and check.
    Read,
    /// Write data and entries.
    Write,
    /// Unmap or write-zeroes: zero the data with this base operation, clear the entries.
    Dealloc(IoType),
}

/// What one kind of metadata-region bdev does per block, and where a channel's buffers come
/// from; [`MdChannel`] does the rest. Called on the data path: no allocation.
pub trait EntryOps {
    /// How log messages name the kind (`"crc"`).
    const NAME: &'static str;
    /// True: a write's data goes to the base from the caller's buffer as soon as the write holds
    /// its range locks, and [`EntryOps::prepare_write`] computes its entries when it arrives.
    /// False: the data goes from the op's own data buffer (from [`EntryOps::take_bufs`]) after
    /// the metadata read, together with the metadata write; [`EntryOps::patch`] fills both.
    const WRITE_IN_PLACE: bool;

    /// Buffers for a new op: a metadata buffer of at least `md_len` bytes, and a data buffer of
    /// at least `data_len` bytes for a write when not [`EntryOps::WRITE_IN_PLACE`] (required)
    /// and, optionally, for a read (the base then reads into it instead of the caller's buffer,
    /// and [`EntryOps::verify_own`] checks it there). `None` when the channel has none to spare
    /// (the request is handed back, or the unmap piece waits).
    fn take_bufs(
        &mut self,
        kind: OpKind,
        md_len: usize,
        data_len: usize,
    ) -> Option<(AlignedBuf, Option<AlignedBuf>)>;

    /// Whether [`EntryOps::take_bufs`] would give the buffers of an unmap piece.
    fn can_take_dealloc(&self) -> bool;

    /// Gives a buffer from [`EntryOps::take_bufs`] back.
    fn put_buf(&mut self, buf: AlignedBuf);

    /// A write arrived in request slot `req` with the caller's `bufs` (for
    /// [`EntryOps::WRITE_IN_PLACE`]: the last look at them before they go to the base).
    fn prepare_write(&mut self, req: u32, bufs: &SgList) {
        let _ = (req, bufs);
    }

    /// Sets the entries of blocks `lba ..` of the write in request slot `req` (one
    /// [`MdLayout::entry_bytes`] piece of `entries` per block). `caller` is the caller's buffer
    /// (empty while it is at the base, that is [`EntryOps::WRITE_IN_PLACE`]); `data` is the op's
    /// data buffer (exactly the blocks' bytes) otherwise, to fill with what goes to the base.
    fn patch(
        &mut self,
        req: u32,
        lba: u64,
        caller: &SgList,
        entries: &mut [u8],
        data: Option<&mut [u8]>,
    );

    /// Checks (and, where the kind transforms data, turns back in place) the blocks `lba ..`
    /// just read into `bufs` against their `entries`; false if any block fails (the channel
    /// then zeroes `bufs` and fails the read). Counting and logging failures is the kind's.
    fn verify(&mut self, lba: u64, entries: &[u8], bufs: &mut SgList) -> bool;

    /// As [`EntryOps::verify`], for a read that [`EntryOps::take_bufs`] gave a data buffer: the
    /// blocks `lba ..` are in `data` (exactly their bytes), the channel's own memory, so the kind
    /// may look at and transform them through references. The channel copies `data` to the
    /// caller only if this returns true (else it zeroes the caller's buffer). The default checks
    /// `data` with [`EntryOps::verify`].
    fn verify_own(&mut self, lba: u64, entries: &[u8], data: &mut [u8]) -> bool {
        let seg = IoSeg {
            base: data.as_mut_ptr(),
            len: data.len(),
        };
        // SAFETY: `data` is borrowed mutably for this whole call, so the segment is valid for
        // reads and writes of its length and reached by nothing else until the list, which does
        // not outlive the call, is dropped; one segment is held inline (no allocation).
        let mut bufs = unsafe { SgList::from_raw(&[seg]) };
        self.verify(lba, entries, &mut bufs)
    }
}

/// Op slots of a channel of `depth` requests: one per request, and [`DEALLOC_OPS_IN_FLIGHT`]
/// kept for unmap pieces.
pub fn op_slots(depth: usize) -> usize {
    depth + DEALLOC_OPS_IN_FLIGHT as usize
}

struct Req {
    /// `None` for a flush.
    kind: Option<OpKind>,
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
    kind: OpKind,
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
    /// Its metadata buffer (`None` while in a base request).
    md: Option<AlignedBuf>,
    /// Its data buffer, for writes that are not in place and reads the kind gave one (`None`
    /// while in a base request).
    data: Option<AlignedBuf>,
}

impl Op {
    fn writes(&self) -> bool {
        self.kind != OpKind::Read
    }
}

// The low byte of a base request's tag says what it is; the rest is the op (or request) slot.
/// Data I/O with the caller's buffers (or none: unmap pieces).
const SUB_DATA: u64 = 1;
const SUB_MD_READ: u64 = 2;
const SUB_MD_WRITE: u64 = 3;
const SUB_FLUSH: u64 = 4;
/// Data I/O with the op's own buffer (a write that is not in place, or a read given one).
const SUB_DATA_OWN: u64 = 5;

fn sub_tag(slot: u32, sub: u64) -> u64 {
    u64::from(slot) << 8 | sub
}

/// The channel of a metadata-region bdev: requests, ops, locks and metadata read-modify-write
/// (see the module documentation), with `K` for what is per kind.
pub struct MdChannel<K: EntryOps> {
    base: BaseQueue,
    region: Arc<MdRegion>,
    entries: K,
    bs: usize,
    /// Most metadata blocks one unmap piece covers.
    dealloc_md_blocks: u32,
    reqs: Slots<Req>,
    ops: Slots<Op>,
    /// Dealloc requests with pieces still to create, oldest first.
    waiting: VecDeque<u32>,
    /// Ops waiting for locks.
    lock_wait: VecDeque<u32>,
}

impl<K: EntryOps> MdChannel<K> {
    /// A channel over `base` of `depth` requests (and [`op_slots`]`(depth)` ops), whose unmap
    /// pieces cover at most `dealloc_md_blocks` metadata blocks each (at least 1).
    pub fn new(
        base: Channel,
        region: Arc<MdRegion>,
        entries: K,
        depth: usize,
        dealloc_md_blocks: u32,
    ) -> MdChannel<K> {
        let op_slots = op_slots(depth);
        MdChannel {
            bs: base.info().block_size().bytes() as usize,
            base: BaseQueue::new(base, 3 * op_slots),
            region,
            entries,
            dealloc_md_blocks: dealloc_md_blocks.max(1),
            reqs: Slots::new(depth),
            ops: Slots::new(op_slots),
            waiting: VecDeque::with_capacity(depth),
            lock_wait: VecDeque::with_capacity(op_slots),
        }
    }

    fn md_request(&mut self, slot: u32, read: bool) -> IoRequest {
        let o = self.ops.get_mut(slot);
        let buf = o.md.take().expect("metadata buffer at home");
        let bufs = SgList::from_buf_prefix(buf, o.md_count as usize * self.bs);
        let lba = self.region.layout.md_start + o.md_first;
        if read {
            IoRequest::read(lba, o.md_count, bufs, sub_tag(slot, SUB_MD_READ))
        } else {
            IoRequest::write(lba, o.md_count, bufs, sub_tag(slot, SUB_MD_WRITE))
        }
    }

    /// Creates an op for blocks `lba .. lba + n` of request `req` and starts it (or queues it).
    fn new_op(
        &mut self,
        req: u32,
        kind: OpKind,
        lba: u64,
        n: u32,
        bufs: (AlignedBuf, Option<AlignedBuf>),
    ) {
        let (md_first, md_count) = self.region.layout.md_span(lba, n);
        let (range_first, range_count) = self.region.range_span(lba, n);
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
                md: Some(bufs.0),
                data: bufs.1,
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
                    .region
                    .ranges
                    .try_lock(o.range_first, o.range_count, o.writes())
                {
                    return false;
                }
                let (kind, lba, n, req) = (o.kind, o.lba, o.n, o.req);
                let at = self.region.layout.data_start + lba;
                let data = match kind {
                    OpKind::Write if !K::WRITE_IN_PLACE => None,
                    OpKind::Read if o.data.is_some() => {
                        let buf = self.ops.get_mut(slot).data.take().expect("checked");
                        let len = n as usize * self.bs;
                        Some(IoRequest::read(
                            at,
                            n,
                            SgList::from_buf_prefix(buf, len),
                            sub_tag(slot, SUB_DATA_OWN),
                        ))
                    }
                    OpKind::Read | OpKind::Write => {
                        let r = self.reqs.get_mut(req);
                        Some(IoRequest {
                            io_type: r.io.io_type,
                            offset_blocks: at,
                            num_blocks: n,
                            bufs: std::mem::take(&mut r.io.bufs),
                            tag: sub_tag(slot, SUB_DATA),
                        })
                    }
                    OpKind::Dealloc(op) => {
                        Some(IoRequest::no_data(op, at, n, sub_tag(slot, SUB_DATA)))
                    }
                };
                let o = self.ops.get_mut(slot);
                o.holds_ranges = true;
                if let Some(data) = data {
                    o.data_pending = true;
                    self.base.submit(data);
                }
                if kind == OpKind::Read {
                    // Readers need no metadata lock (see the module documentation).
                    self.ops.get_mut(slot).stage = Stage::MdRead;
                    let md = self.md_request(slot, true);
                    self.base.submit(md);
                    true
                } else {
                    self.ops.get_mut(slot).stage = Stage::WaitMd;
                    self.try_advance(slot)
                }
            }
            Stage::WaitMd => {
                let (first, count) = (o.md_first, u64::from(o.md_count));
                let holds_md = match &self.region.md_locks {
                    Some(locks) if !locks.try_lock(first, count, true) => return false,
                    Some(_) => true,
                    // The range locks are the metadata block locks.
                    None => false,
                };
                let o = self.ops.get_mut(slot);
                o.holds_md = holds_md;
                o.stage = Stage::MdRead;
                let md = self.md_request(slot, true);
                self.base.submit(md);
                true
            }
            _ => true,
        }
    }

    fn release_md(&mut self, slot: u32) {
        let o = self.ops.get_mut(slot);
        if o.holds_md {
            o.holds_md = false;
            if let Some(locks) = &self.region.md_locks {
                locks.unlock(o.md_first, u64::from(o.md_count), true);
            }
        }
    }

    /// After a write's metadata read: patch its entries and write the metadata back (and its
    /// data, when not in place).
    fn patch_and_write_md(&mut self, slot: u32) {
        let layout = self.region.layout;
        let (e, bs) = (layout.entry_bytes, self.bs);
        let o = self.ops.get_mut(slot);
        let first_entry = (o.lba - o.md_first * layout.entries_per_block) as usize;
        let n = o.n as usize;
        let md = o.md.as_mut().expect("metadata buffer at home");
        let entries = &mut md.as_mut_slice()[first_entry * e..][..n * e];
        match o.kind {
            OpKind::Write => {
                let data = o.data.as_mut().map(|d| &mut d.as_mut_slice()[..n * bs]);
                let caller = &self.reqs.get(o.req).io.bufs;
                self.entries.patch(o.req, o.lba, caller, entries, data);
            }
            _ => entries.fill(0),
        }
        o.stage = Stage::MdWrite;
        if let Some(data) = o.data.take() {
            o.data_pending = true;
            let io = IoRequest::write(
                layout.data_start + o.lba,
                o.n,
                SgList::from_buf_prefix(data, n * bs),
                sub_tag(slot, SUB_DATA_OWN),
            );
            self.base.submit(io);
        }
        let io = self.md_request(slot, false);
        self.base.submit(io);
    }

    /// Checks a finished read against its entries, where it was read (the op's own buffer,
    /// then copied to the caller once it passed, or the caller's); false if any block fails
    /// (the caller's buffer is then zeroed).
    fn verify(&mut self, slot: u32) -> bool {
        let layout = self.region.layout;
        let e = layout.entry_bytes;
        let o = self.ops.get_mut(slot);
        let first_entry = (o.lba - o.md_first * layout.entries_per_block) as usize;
        let md = o.md.as_ref().expect("metadata buffer at home");
        let entries = &md.as_slice()[first_entry * e..][..o.n as usize * e];
        let bufs = &mut self.reqs.get_mut(o.req).io.bufs;
        let ok = match o.data.as_mut() {
            Some(data) => {
                let data = &mut data.as_mut_slice()[..o.n as usize * self.bs];
                let ok = self.entries.verify_own(o.lba, entries, data);
                if ok {
                    bufs.copy_from_slice(0, data);
                }
                // The buffer goes back to the reactor's pool, which other volumes and hosts
                // take from: no plaintext is left in it.
                data.fill(0);
                ok
            }
            None => self.entries.verify(o.lba, entries, bufs),
        };
        if !ok {
            bufs.fill_zero();
        }
        ok
    }

    /// Finishes an op whose base requests are all done: releases its locks and buffers, and
    /// completes its request if that was the last op.
    fn finish_op(&mut self, slot: u32, done: &mut Vec<IoCompletion>) {
        let mut status = self.ops.get(slot).status;
        if self.ops.get(slot).kind == OpKind::Read {
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
            self.region
                .ranges
                .unlock(o.range_first, o.range_count, o.writes());
        }
        for b in [o.md, o.data].into_iter().flatten() {
            self.entries.put_buf(b);
        }
        let r = self.reqs.get_mut(o.req);
        r.in_flight -= 1;
        if !status.is_ok() && r.status.is_ok() {
            r.status = status;
        }
        let finished = match r.kind {
            Some(OpKind::Dealloc(_)) => {
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
                if matches!(o.kind, OpKind::Read | OpKind::Write) {
                    let req = o.req;
                    self.reqs.get_mut(req).io.bufs = c.bufs;
                }
            }
            SUB_DATA_OWN => {
                o.data_pending = false;
                o.data = c.bufs.into_buf();
            }
            SUB_MD_READ => {
                o.md = c.bufs.into_buf();
                if o.kind == OpKind::Read {
                    o.stage = Stage::MdDone;
                } else if o.status.is_ok() {
                    self.patch_and_write_md(slot);
                } else {
                    o.stage = Stage::MdDone;
                    self.release_md(slot);
                }
            }
            SUB_MD_WRITE => {
                o.md = c.bufs.into_buf();
                o.stage = Stage::MdDone;
                self.release_md(slot);
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
        let layout = self.region.layout;
        loop {
            let r = self.reqs.get(slot);
            let Some(kind @ OpKind::Dealloc(_)) = r.kind else {
                return true;
            };
            if r.next == r.io.num_blocks || !r.status.is_ok() {
                return true;
            }
            if r.in_flight >= DEALLOC_OPS_IN_FLIGHT || self.base.is_full() || !self.ops.has_room() {
                return false;
            }
            let lba = r.io.offset_blocks + u64::from(r.next);
            let md_first = lba / layout.entries_per_block;
            let end = (md_first + u64::from(self.dealloc_md_blocks)) * layout.entries_per_block;
            let n = (r.io.num_blocks - r.next).min((end - lba).min(u64::from(u32::MAX)) as u32);
            let md_len = layout.md_span(lba, n).1 as usize * self.bs;
            let Some(bufs) = self.entries.take_bufs(kind, md_len, 0) else {
                return false;
            };
            let r = self.reqs.get_mut(slot);
            r.next += n;
            r.in_flight += 1;
            self.new_op(slot, kind, lba, n, bufs);
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

impl<K: EntryOps> Drop for MdChannel<K> {
    /// Waits for the base requests still in flight (their buffers and the metadata blocks they
    /// write are this channel's), then releases the locks its ops hold, so that a channel closed
    /// mid-request never blocks the other channels.
    fn drop(&mut self) {
        if !self.base.drain(Duration::from_secs(30)) {
            tracing::error!(
                "{} channel closed with base I/O still in flight; keeping its locks",
                K::NAME
            );
            return;
        }
        for o in self.ops.iter() {
            if o.holds_md
                && let Some(locks) = &self.region.md_locks
            {
                locks.unlock(o.md_first, u64::from(o.md_count), true);
            }
            if o.holds_ranges {
                self.region
                    .ranges
                    .unlock(o.range_first, o.range_count, o.writes());
            }
        }
    }
}

impl<K: EntryOps> ChannelOps for MdChannel<K> {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        if self.base.is_full() || !self.reqs.has_room() {
            return Err(io);
        }
        match io.io_type {
            IoType::Flush => {
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: None,
                        io,
                        next: 0,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|r| r.io)?;
                self.base.submit(IoRequest::no_data(
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
                    OpKind::Write
                } else {
                    OpKind::Read
                };
                let (lba, n) = (io.offset_blocks, io.num_blocks);
                let md_len = self.region.layout.md_span(lba, n).1 as usize * self.bs;
                let Some(bufs) = self.entries.take_bufs(kind, md_len, n as usize * self.bs) else {
                    return Err(io);
                };
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: Some(kind),
                        io,
                        next: n,
                        in_flight: 1,
                        status: IoStatus::Success,
                    })
                    .map_err(|_| ())
                    .expect("room checked");
                if kind == OpKind::Write {
                    self.entries
                        .prepare_write(slot, &self.reqs.get(slot).io.bufs);
                }
                self.new_op(slot, kind, lba, n, bufs);
            }
            IoType::Unmap | IoType::WriteZeroes => {
                let op = if io.io_type == IoType::Unmap {
                    self.region.unmap_op
                } else {
                    self.region.zeroes_op
                };
                let slot = self
                    .reqs
                    .insert(Req {
                        kind: Some(OpKind::Dealloc(op)),
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
        let mut completions = self.base.poll();
        for c in completions.drain(..) {
            self.complete_sub(c, done);
        }
        self.base.recycle(completions);
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
                && !self.base.is_full()
                && self.ops.has_room()
                && self.entries.can_take_dealloc()
        });
        if front_can_issue {
            Wake::Immediate
        } else if !self.lock_wait.is_empty() {
            // A range or metadata lock another channel (maybe on another reactor) holds.
            self.base
                .wake()
                .min(Wake::At(Instant::now() + CROSS_CHANNEL_WAIT))
        } else {
            self.base.wake()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_the_largest_that_fits() {
        for entry_bytes in [4, 32] {
            for bs in [BlockSize::B512, BlockSize::B4096] {
                let e = u64::from(bs.bytes()) / entry_bytes as u64;
                for base in [
                    3u64,
                    4,
                    17,
                    18,
                    100,
                    129,
                    130,
                    131,
                    1000,
                    2048,
                    e,
                    e + 1,
                    e + 2,
                    4 * e + 7,
                    1 << 20,
                    (1 << 40) + 5,
                ] {
                    let l = MdLayout::for_base(bs, entry_bytes, base)
                        .unwrap_or_else(|| panic!("{base} blocks of {bs} should fit a volume"));
                    assert!(l.base_blocks() <= base, "{bs}/{base}: {l:?} does not fit");
                    assert_eq!(l.md_blocks, l.data_blocks.div_ceil(l.entries_per_block));
                    assert_eq!((l.entries_per_block, l.entry_bytes), (e, entry_bytes));
                    // One more data block would not fit.
                    let bigger = MdLayout::with_data_blocks(bs, entry_bytes, l.data_blocks + 1);
                    assert!(
                        bigger.base_blocks() > base,
                        "{bs}/{base}: {l:?} is not maximal"
                    );
                }
                assert_eq!(MdLayout::for_base(bs, entry_bytes, 2), None);
                assert_eq!(MdLayout::for_base(bs, entry_bytes, 0), None);
            }
        }
    }

    #[test]
    fn a_header_claiming_any_size_does_not_overflow_the_layout() {
        let l = MdLayout::with_data_blocks(BlockSize::B4096, 4, u64::MAX);
        assert_eq!(l.base_blocks(), u64::MAX);
    }
}
