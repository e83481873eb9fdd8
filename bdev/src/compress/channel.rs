//! The channel of a compress bdev: its requests, their per-chunk operations (lock, read,
//! write, map-update log record) and the checkpoint it drives.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[cfg(feature = "zstd")]
use super::format::K_ZSTD;
use super::format::{
    Entry, K_LZ4, K_RAW, LOG_HEADER, RECORD_BYTES, encode_page, encode_record, seal_log_block,
};
use super::{Algorithm, CompressShared, Pending};
use crate::bdev::{
    BdevInfo, CROSS_CHANNEL_WAIT, Channel, ChannelOps, IoCompletion, IoRequest, Wake,
};
use crate::buf::{AlignedBuf, SgList};
use crate::stacked::{BaseQueue, Slots, idle_wait};
use crate::types::{IoStatus, IoType};

/// Log block writes one channel keeps in flight.
pub(super) const LOG_WRITES_IN_FLIGHT: usize = 4;
/// Most requests a compress channel keeps in flight.
pub(super) const MAX_DEPTH: usize = 128;
/// Chunk operations with buffers one channel runs at once.
pub(super) const OP_BUFFERS: usize = 32;
/// Chunk operations one request keeps in flight at most.
pub(super) const OPS_PER_REQ: u32 = 8;
/// Map page writes a checkpoint keeps in flight.
pub(super) const PAGE_WRITES_IN_FLIGHT: usize = 32;

/// Size of a channel's stored-data buffer: room for a whole compressor output.
fn stored_buf_len(chunk: usize, bs: usize) -> usize {
    let lz4 = lz4_flex::block::get_maximum_output_size(chunk);
    #[cfg(feature = "zstd")]
    let lz4 = lz4.max(zstd::zstd_safe::compress_bound(chunk));
    lz4.max(chunk).next_multiple_of(bs)
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

pub(super) struct CompressChannel {
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
    /// A channel of the compress bdev `info` over its base's channel `base`, its buffers
    /// aligned to `align` bytes.
    pub(super) fn open(
        info: &Arc<BdevInfo>,
        shared: &Arc<CompressShared>,
        base: Channel,
        align: usize,
    ) -> Channel {
        let depth = base.depth().min(MAX_DEPTH);
        let l = shared.layout;
        let bs = l.block_size.bytes() as usize;
        let chunk = l.chunk_size as usize;
        let stored_len = stored_buf_len(chunk, bs);
        let op_slots = depth * OPS_PER_REQ as usize;
        let ops = CompressChannel {
            shared: shared.clone(),
            name: info.name().to_string(),
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
        Channel::new(info.clone(), Box::new(ops), depth)
    }

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
        if !self.completed.is_empty() || can_pump || can_log {
            Wake::Immediate
        } else if !self.lock_wait.is_empty() || waits_on_others {
            // Waiting for a lock or a checkpoint another channel (maybe on another reactor)
            // holds: this channel's own completions still wake it at once.
            self.base
                .wake()
                .min(Wake::At(Instant::now() + CROSS_CHANNEL_WAIT))
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
