//! The mirror's data path: one channel per reactor, owning a channel on every child.
//!
//! A request lives in a slot ([`Slots`]) from submission to completion:
//! - a read goes to the least loaded readable child (in turn among equals); failed, it goes
//!   to another one;
//! - a write, unmap or write-zeroes takes its regions' locks shared (in pieces of at most
//!   [`PIECE_REGIONS`] regions for large unmaps), marks them dirty if a member misses it,
//!   goes to every child taking writes, and releases the locks once all answered (marking the
//!   regions dirty if a child failed);
//! - a flush goes to every child taking writes.
//!
//! A request that a member missed (degraded, or failed it) then waits in `persist_wait` until
//! its regions are dirty in the bitmap and the superblock that records the member as stale is
//! on the children taking writes: one channel at a time writes them (the metadata lock), from
//! buffers it owns, as a *job*. Only then is the request acknowledged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Shared;
use super::bitmap::MAX_CHILDREN;
use crate::bdev::{Channel, ChannelOps, IoCompletion, IoRequest, Wake};
use crate::buf::{AlignedBuf, INLINE_SEGS, IoSeg, SgList};
use crate::error::BdevError;
use crate::stacked::{BaseQueue, Slots};
use crate::types::{IoStatus, IoType, MAX_EXPORT_SEGMENTS};

/// Most regions one piece of an unmap or write-zeroes locks at once.
const PIECE_REGIONS: u64 = 64;
/// Most requests in flight on one mirror channel.
const MAX_DEPTH: usize = 1024;
/// Tags of the metadata job's requests (a request's own tag is its slot).
const JOB_TAG: u64 = 1 << 40;

/// One request of the submitter.
struct Op {
    io: IoRequest,
    /// The piece in flight (write-type requests): blocks `at .. piece_end`.
    at: u64,
    piece_end: u64,
    /// Children answers awaited.
    pending: u8,
    /// Children that answered well, that failed, and members that took no part.
    ok: u8,
    failed: u8,
    missed: u8,
    /// Children a read has tried.
    tried: u8,
    status: IoStatus,
    /// Region locks held: (first, count).
    locked: Option<(u64, u64)>,
    /// The superblock version to be persisted before it is acknowledged.
    need_sbv: u64,
}

impl Op {
    fn end(&self) -> u64 {
        self.io.offset_blocks + u64::from(self.io.num_blocks)
    }
}

/// The metadata write in flight.
struct Job {
    pending: u8,
    targets: u8,
    bad: u8,
    sbv: u64,
    /// Bitmap blocks written: first and count.
    bm: (u64, u64),
}

struct MirrorChannel {
    s: Arc<Shared>,
    children: [Option<BaseQueue>; MAX_CHILDREN],
    /// Children whose channel is open here, as a mask.
    present: u8,
    epoch: u64,
    slots: Slots<Op>,
    lock_wait: VecDeque<u32>,
    persist_wait: VecDeque<u32>,
    done: VecDeque<IoCompletion>,
    seg_pool: Vec<Vec<IoSeg>>,
    rr: usize,
    job: Option<Job>,
    sb_bufs: Vec<AlignedBuf>,
    bm_buf: AlignedBuf,
    depth: usize,
    /// Whether `open` has sized the channel.
    opened: bool,
}

/// Opens a channel of the mirror on the calling thread.
pub(super) fn open(s: &Arc<Shared>) -> Result<Channel, BdevError> {
    let bs = s.bs.bytes() as usize;
    let mut ch = MirrorChannel {
        s: s.clone(),
        children: std::array::from_fn(|_| None),
        present: 0,
        epoch: 0,
        slots: Slots::new(0),
        lock_wait: VecDeque::new(),
        persist_wait: VecDeque::new(),
        done: VecDeque::new(),
        seg_pool: Vec::new(),
        rr: 0,
        job: None,
        sb_bufs: (0..MAX_CHILDREN).map(|_| AlignedBuf::new(bs)).collect(),
        bm_buf: AlignedBuf::new(s.layout.bitmap_blocks as usize * bs),
        depth: 0,
        opened: false,
    };
    ch.sync_children()?;
    ch.opened = true;
    let depth = ch.depth;
    ch.slots = Slots::new(depth);
    ch.lock_wait = VecDeque::with_capacity(depth);
    ch.persist_wait = VecDeque::with_capacity(depth);
    ch.done = VecDeque::with_capacity(depth);
    Ok(Channel::new(s.info.clone(), Box::new(ch), depth))
}

impl MirrorChannel {
    /// Opens channels on children added since the last look, and closes those on removed
    /// children that have nothing in flight here.
    fn sync_children(&mut self) -> Result<(), BdevError> {
        let epoch = self.s.epoch.load(Ordering::Acquire);
        let bdevs = self.s.bdevs.lock().expect("bdevs lock").clone();
        let mut all_synced = true;
        for (i, b) in bdevs.iter().enumerate() {
            match (b, &self.children[i]) {
                (Some(b), None) => {
                    let ch = b.open_channel()?;
                    if !self.opened {
                        // Room for every child's depth at once, so that reads spread over
                        // the children can fill them all; a child's share of the writes
                        // beyond its own depth (and children added later) queue in its
                        // `BaseQueue`.
                        self.depth = (self.depth + ch.depth()).min(MAX_DEPTH);
                    }
                    self.children[i] = Some(BaseQueue::new(ch, MAX_DEPTH + 4));
                    self.present |= 1 << i;
                }
                (Some(b), Some(q)) if q.channel().info().name() != b.info().name() => {
                    all_synced = false;
                }
                (None, Some(q)) => {
                    if q.channel().in_flight() == 0 {
                        self.children[i] = None;
                        self.present &= !(1 << i);
                    } else {
                        all_synced = false;
                    }
                }
                _ => {}
            }
        }
        if all_synced {
            self.epoch = epoch;
        }
        Ok(())
    }

    /// Keeps the children in step with the mirror's membership.
    fn follow_membership(&mut self) {
        if self.s.epoch.load(Ordering::Acquire) != self.epoch
            && let Err(e) = self.sync_children()
        {
            tracing::warn!(bdev = %self.s.info.name(), error = %e,
                "mirror: opening a channel on a new child failed");
        }
    }

    /// `mask` restricted to the children open here, after catching up with the membership if
    /// it names one that is not.
    fn open_in(&mut self, mask: u8) -> u8 {
        if mask & !self.present != 0 {
            self.follow_membership();
            for i in 0..MAX_CHILDREN {
                if mask & !self.present & (1 << i) != 0 && self.s.bdevs_has(i) {
                    // A child that cannot be opened here cannot take this reactor's writes.
                    self.s.mark_failed(i, true);
                }
            }
        }
        mask & self.present
    }

    fn finish(&mut self, slot: u32, status: IoStatus) {
        let op = self.slots.remove(slot);
        self.done.push_back(op.io.complete(status));
    }

    /// An alias of the request's buffers for one child (no copy; a recycled vector for long
    /// lists).
    fn alias(&mut self, slot: u32) -> SgList {
        let segs = self.slots.get(slot).io.bufs.segments();
        if segs.is_empty() {
            return SgList::empty();
        }
        if segs.len() <= INLINE_SEGS {
            // SAFETY: the segments are the parent request's, which stays in its slot,
            // untouched, until every child request aliasing it has completed.
            return unsafe { SgList::from_raw(segs) };
        }
        let n = segs.len();
        let mut v = self
            .seg_pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(n.max(MAX_EXPORT_SEGMENTS as usize)));
        v.extend_from_slice(self.slots.get(slot).io.bufs.segments());
        // SAFETY: as above.
        unsafe { SgList::from_raw_vec(v) }
    }

    fn recycle(&mut self, bufs: SgList) {
        let v = bufs.into_vec();
        if v.capacity() > 0 {
            self.seg_pool.push(v);
        }
    }

    fn start_read(&mut self, slot: u32) {
        let tried = self.slots.get(slot).tried;
        let avail = self.s.readable() & !tried;
        let avail = self.open_in(avail);
        if avail == 0 {
            let st = self.slots.get(slot).status;
            let st = if st.is_ok() { IoStatus::MediaError } else { st };
            return self.finish(slot, st);
        }
        // The least loaded readable child (requests in flight or queued on it here), the
        // next in turn first among equals: children of one speed alternate, a slower or busier
        // one gets less.
        let mut pick = None;
        let mut least = usize::MAX;
        for k in 0..MAX_CHILDREN {
            let i = (self.rr + k) % MAX_CHILDREN;
            if avail & (1 << i) != 0 {
                let load = self.children[i]
                    .as_ref()
                    .map_or(usize::MAX, BaseQueue::load);
                if load < least {
                    (pick, least) = (Some(i), load);
                }
            }
        }
        let i = pick.expect("a readable child");
        self.rr = i + 1;
        let op = self.slots.get_mut(slot);
        op.tried |= 1 << i;
        op.pending = 1;
        let bufs = std::mem::take(&mut op.io.bufs);
        let io = IoRequest::read(op.io.offset_blocks, op.io.num_blocks, bufs, u64::from(slot));
        self.children[i].as_mut().expect("open child").submit(io);
    }

    fn start_flush(&mut self, slot: u32) {
        let targets = self.s.writable();
        let targets = self.open_in(targets);
        if targets == 0 {
            return self.finish(slot, IoStatus::MediaError);
        }
        let op = self.slots.get_mut(slot);
        op.pending = targets.count_ones() as u8;
        op.missed |= self.s.degraded();
        for i in 0..MAX_CHILDREN {
            if targets & (1 << i) != 0 {
                let io = IoRequest::no_data(IoType::Flush, 0, 0, u64::from(slot));
                self.children[i].as_mut().expect("open child").submit(io);
            }
        }
    }

    /// Starts the next piece of a write-type request if its region locks are free; false if
    /// it has to wait.
    fn try_start_piece(&mut self, slot: u32) -> bool {
        let l = self.s.layout;
        let op = self.slots.get(slot);
        let at = op.at;
        let piece_end = if op.io.io_type == IoType::Write {
            op.end()
        } else {
            let shift = l.region_blocks.trailing_zeros();
            (((at >> shift) + PIECE_REGIONS) << shift).min(op.end())
        };
        let (first, count) = l.region_span(at, piece_end - at);
        if !self.s.regions.try_lock(first, count, false) {
            return false;
        }
        let (targets, missed) = self.s.write_masks();
        let targets = self.open_in(targets);
        if missed != 0 {
            self.s.dirty.set(first, count);
        }
        let op = self.slots.get_mut(slot);
        op.locked = Some((first, count));
        op.piece_end = piece_end;
        op.missed |= missed;
        if targets == 0 {
            self.s.regions.unlock(first, count, false);
            op.locked = None;
            let st = if op.status.is_ok() {
                IoStatus::MediaError
            } else {
                op.status
            };
            self.finish(slot, st);
            return true;
        }
        op.pending = targets.count_ones() as u8;
        op.ok = 0;
        let (t, n) = (op.io.io_type, (piece_end - at) as u32);
        for i in 0..MAX_CHILDREN {
            if targets & (1 << i) != 0 {
                let bufs = self.alias(slot);
                let io = IoRequest {
                    io_type: t,
                    offset_blocks: at,
                    num_blocks: n,
                    bufs,
                    tag: u64::from(slot),
                };
                self.children[i].as_mut().expect("open child").submit(io);
            }
        }
        true
    }

    fn advance_locks(&mut self) {
        for _ in 0..self.lock_wait.len() {
            let slot = self.lock_wait.pop_front().expect("waiting slot");
            if !self.try_start_piece(slot) {
                self.lock_wait.push_back(slot);
            }
        }
    }

    /// One child's answer to a request of slot `slot`.
    fn child_done(&mut self, i: usize, c: IoCompletion) {
        let slot = c.tag as u32;
        let IoCompletion { status, bufs, .. } = c;
        let is_read = self.slots.get(slot).io.io_type == IoType::Read;
        if is_read {
            self.slots.get_mut(slot).io.bufs = bufs;
        } else {
            self.recycle(bufs);
        }
        let op = self.slots.get_mut(slot);
        op.pending -= 1;
        if status.is_ok() {
            op.ok |= 1 << i;
        } else {
            op.failed |= 1 << i;
            if op.status.is_ok() {
                op.status = status;
            }
            let full = op.io.io_type == IoType::Flush;
            self.s.mark_failed(i, full);
        }
        let (pending, t) = (op.pending, op.io.io_type);
        if pending > 0 {
            return;
        }
        match t {
            IoType::Read => {
                if self.slots.get(slot).ok != 0 {
                    self.finish(slot, IoStatus::Success);
                } else {
                    self.start_read(slot);
                }
            }
            IoType::Flush => self.settle(slot),
            _ => {
                let op = self.slots.get_mut(slot);
                let (first, count) = op.locked.take().expect("locked piece");
                if op.failed != 0 {
                    self.s.dirty.set(first, count);
                }
                self.s.regions.unlock(first, count, false);
                let op = self.slots.get_mut(slot);
                if op.ok == 0 {
                    let st = op.status;
                    return self.finish(slot, st);
                }
                op.at = op.piece_end;
                if op.at < op.end() {
                    self.lock_wait.push_back(slot);
                } else {
                    self.settle(slot);
                }
            }
        }
    }

    /// A request all children answered: acknowledged now, or once the metadata recording what
    /// a member missed is written.
    fn settle(&mut self, slot: u32) {
        let op = self.slots.get_mut(slot);
        if op.ok == 0 {
            let st = op.status;
            return self.finish(slot, st);
        }
        op.missed |= op.failed;
        if op.missed == 0 {
            return self.finish(slot, IoStatus::Success);
        }
        op.need_sbv = self.s.sb_version.load(Ordering::Acquire);
        self.persist_wait.push_back(slot);
    }

    /// Bitmap regions a waiting request needs persisted: (first, count), or none for a flush.
    fn needs_regions(&self, slot: u32) -> Option<(u64, u64)> {
        let op = self.slots.get(slot);
        (op.io.io_type != IoType::Flush).then(|| {
            self.s
                .layout
                .region_span(op.io.offset_blocks, u64::from(op.io.num_blocks))
        })
    }

    fn satisfied(&self, slot: u32) -> bool {
        let op = self.slots.get(slot);
        self.s.sb_persisted.load(Ordering::Acquire) >= op.need_sbv
            && self
                .needs_regions(slot)
                .is_none_or(|(f, n)| self.s.persisted.all_set(f, n))
    }

    /// Acknowledges the waiting requests whose metadata is written; starts a job for the
    /// others if none runs.
    fn advance_persist(&mut self) {
        if self.job.is_some() || self.persist_wait.is_empty() {
            return;
        }
        for _ in 0..self.persist_wait.len() {
            let slot = self.persist_wait.pop_front().expect("waiting slot");
            if self.satisfied(slot) {
                self.finish(slot, IoStatus::Success);
            } else {
                self.persist_wait.push_back(slot);
            }
        }
        let Some(&first) = self.persist_wait.front() else {
            return;
        };
        if !self.s.try_md_lock() {
            return;
        }
        let bs = self.s.bs;
        let bm = match self.needs_regions(first) {
            Some((f, n)) => self.s.layout.bitmap_span(bs, f, n),
            None => (0, 0),
        };
        // Dirty bits were set before the data went out; write the blocks that hold them.
        let len = bm.1 as usize * bs.bytes() as usize;
        self.s
            .dirty
            .snapshot(bs, bm.0, &mut self.bm_buf.as_mut_slice()[..len]);
        let sbv = self.s.sb_version.load(Ordering::Acquire);
        let generation = self.s.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let targets = self.s.writable();
        let targets = self.open_in(targets);
        if targets == 0 {
            self.s.md_unlock();
            while let Some(slot) = self.persist_wait.pop_front() {
                self.finish(slot, IoStatus::MediaError);
            }
            return;
        }
        let mut pending = 0;
        let sb_block = self.s.layout.sb_block;
        for i in 0..MAX_CHILDREN {
            if targets & (1 << i) == 0 {
                continue;
            }
            self.s
                .superblock(i, generation)
                .encode(self.sb_bufs[i].as_mut_slice());
            let seg = IoSeg {
                base: self.sb_bufs[i].as_mut_ptr(),
                len: bs.bytes() as usize,
            };
            // SAFETY: `sb_bufs[i]` belongs to this channel, is not touched while the job is in
            // flight, and the channel drains its children before it drops its buffers.
            let bufs = unsafe { SgList::from_raw(&[seg]) };
            let q = self.children[i].as_mut().expect("open child");
            q.submit(IoRequest::write(sb_block, 1, bufs, JOB_TAG));
            pending += 1;
            if bm.1 > 0 {
                let seg = IoSeg {
                    base: self.bm_buf.as_mut_ptr(),
                    len,
                };
                // SAFETY: as above, for `bm_buf`.
                let bufs = unsafe { SgList::from_raw(&[seg]) };
                q.submit(IoRequest::write(
                    sb_block + 1 + bm.0,
                    bm.1 as u32,
                    bufs,
                    JOB_TAG,
                ));
                pending += 1;
            }
        }
        self.job = Some(Job {
            pending,
            targets,
            bad: 0,
            sbv,
            bm,
        });
    }

    fn job_done(&mut self, i: usize, c: IoCompletion) {
        let job = self.job.as_mut().expect("metadata job");
        job.pending -= 1;
        if !c.status.is_ok() {
            job.bad |= 1 << i;
            self.s.mark_failed(i, false);
        }
        if job.pending > 0 {
            return;
        }
        let job = self.job.take().expect("metadata job");
        if job.targets & !job.bad != 0 {
            let bs = self.s.bs;
            let len = job.bm.1 as usize * bs.bytes() as usize;
            self.s
                .persisted
                .merge(bs, job.bm.0, &self.bm_buf.as_slice()[..len]);
            self.s.sb_persisted.fetch_max(job.sbv, Ordering::AcqRel);
        }
        self.s.md_unlock();
        if self.s.writable() == 0 {
            while let Some(slot) = self.persist_wait.pop_front() {
                self.finish(slot, IoStatus::MediaError);
            }
        }
    }
}

impl Shared {
    /// Whether slot `i` holds a child.
    fn bdevs_has(&self, i: usize) -> bool {
        self.bdevs.lock().expect("bdevs lock")[i].is_some()
    }
}

impl ChannelOps for MirrorChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        let t = io.io_type;
        let at = io.offset_blocks;
        let op = Op {
            io,
            at,
            piece_end: at,
            pending: 0,
            ok: 0,
            failed: 0,
            missed: 0,
            tried: 0,
            status: IoStatus::Success,
            locked: None,
            need_sbv: 0,
        };
        let slot = self.slots.insert(op).map_err(|op| op.io)?;
        match t {
            IoType::Read => self.start_read(slot),
            IoType::Flush => self.start_flush(slot),
            _ => {
                if !self.lock_wait.is_empty() || !self.try_start_piece(slot) {
                    self.lock_wait.push_back(slot);
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        if self.s.epoch.load(Ordering::Relaxed) != self.epoch {
            self.follow_membership();
        }
        let mut open = self.present;
        while open != 0 {
            let i = open.trailing_zeros() as usize;
            open &= open - 1;
            let Some(q) = self.children[i].as_mut() else {
                continue;
            };
            let mut comps = q.poll();
            for c in comps.drain(..) {
                if c.tag == JOB_TAG {
                    self.job_done(i, c);
                } else {
                    self.child_done(i, c);
                }
            }
            if let Some(q) = self.children[i].as_mut() {
                q.recycle(comps);
            }
        }
        if !self.lock_wait.is_empty() {
            self.advance_locks();
        }
        if !self.persist_wait.is_empty() {
            self.advance_persist();
        }
        let n = self.done.len();
        done.extend(self.done.drain(..));
        n
    }

    fn wake(&self) -> Wake {
        if !self.done.is_empty()
            || !self.lock_wait.is_empty()
            || (self.job.is_none() && !self.persist_wait.is_empty())
        {
            return Wake::Immediate;
        }
        let mut w = Wake::Event;
        for q in self.children.iter().flatten() {
            w = w.min(q.wake());
        }
        w
    }
}

impl Drop for MirrorChannel {
    fn drop(&mut self) {
        // Child requests point into the slots' requests and this channel's buffers: wait for
        // them before either goes.
        for q in self.children.iter_mut().flatten() {
            q.drain(Duration::from_secs(5));
        }
        if self.job.take().is_some() {
            self.s.md_unlock();
        }
        for op in self.slots.iter() {
            if let Some((f, n)) = op.locked {
                self.s.regions.unlock(f, n, false);
            }
        }
    }
}
