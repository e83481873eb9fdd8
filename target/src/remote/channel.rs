//! The `nvmf` bdev's data path: one channel per reactor, owning one I/O queue per path.
//!
//! A request takes a slot (its index is the command tag), becomes one NVMe command (Write
//! Zeroes larger than 65,536 blocks: several, tagged `slot | sub << 32`) and goes to the path
//! the policy picks, with the request's scatter-gather list as the command's data (no copy).
//! Completions come back with the list. A command whose path failed (the queue's connection
//! dropped: Host Pathing Error; or a path-related status from the controller, such as ANA
//! Inaccessible) is held and resubmitted on the next usable path. Held commands fail with
//! [`IoStatus::Aborted`] once no path has been usable for `ctrl_loss_tmo` (or they waited
//! that long). Nothing here blocks or allocates per request: slots, the held queue and the
//! completion vector are sized at open; lost queues are replaced by the control thread
//! ([`super::path`]), picked up from the path's pool.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferroblk_bdev::uring::FdWatch;
use ferroblk_bdev::{ChannelOps, IoCompletion, IoRequest, IoStatus, IoType, SgList, Wake};

use super::Policy;
use super::path::{Shared, ana};
use crate::initiator::{Completion, IoCommand, IoQueue, RejectReason};
use crate::spec::Status;
use crate::spec::command::DsmRange;
use crate::spec::status::{StatusCodeType, from_nvme_status, path};

/// Most blocks of one Write Zeroes command (NLB is a 0's based 16-bit field).
const MAX_WRITE_ZEROES_BLOCKS: u64 = 1 << 16;
/// How often a held command is retried while no path takes it.
const HELD_RETRY: Duration = Duration::from_millis(5);
/// A channel missing a path's queue asks the pool again every this many polls.
const ACQUIRE_EVERY: u32 = 1024;

struct ReqSlot {
    io_type: IoType,
    offset: u64,
    blocks: u32,
    tag: u64,
    /// Commands of the request not yet completed.
    outstanding: u32,
    /// The first failure among them.
    status: IoStatus,
    /// The Dataset Management range buffer (16 bytes), while no Deallocate carries it.
    dsm: Vec<u8>,
}

struct ChanPath {
    q: Option<IoQueue>,
    /// Readiness of the queue's socket on this reactor's ring.
    watch: Option<FdWatch>,
    /// The controller generation the queue belongs to.
    generation: u64,
    /// This channel is counted in the path pool's `waiting`.
    waiting: bool,
}

/// One reactor's channel of an `nvmf` bdev.
pub struct NvmfChannel {
    shared: Arc<Shared>,
    paths: Vec<ChanPath>,
    slots: Vec<ReqSlot>,
    free: Vec<u32>,
    /// Commands waiting for a usable path: tag and data.
    held: VecDeque<(u64, SgList)>,
    /// When the oldest held command was held.
    held_since: Option<Instant>,
    /// Completions of the queues, reused.
    cq: Vec<Completion>,
    /// Requests finished without a queue (failed, or held past `ctrl_loss_tmo`).
    ready: VecDeque<IoCompletion>,
    /// Round-robin position.
    rr: usize,
    polls: u32,
}

fn is_path_error(s: Status) -> bool {
    s.sct == StatusCodeType::Path || s == Status::TRANSIENT_TRANSPORT_ERROR
}

/// The ANA state a path-related status implies (NVMe Base 2.0 §8.20.3.5).
fn ana_state_of_status(s: Status) -> Option<u8> {
    if s.sct != StatusCodeType::Path {
        return None;
    }
    match s.sc {
        path::ANA_INACCESSIBLE => Some(ana::INACCESSIBLE),
        path::ANA_PERSISTENT_LOSS => Some(ana::PERSISTENT_LOSS),
        path::ANA_TRANSITION => Some(ana::CHANGE),
        _ => None,
    }
}

impl NvmfChannel {
    /// A channel taking what queues the paths' pools have ready now (the rest come later).
    pub fn new(shared: Arc<Shared>) -> NvmfChannel {
        let depth = usize::from(shared.qopts.depth);
        let slots = (0..depth)
            .map(|_| ReqSlot {
                io_type: IoType::Flush,
                offset: 0,
                blocks: 0,
                tag: 0,
                outstanding: 0,
                status: IoStatus::Success,
                dsm: vec![0u8; DsmRange::LEN],
            })
            .collect();
        let paths = shared
            .paths
            .iter()
            .map(|_| ChanPath {
                q: None,
                watch: None,
                generation: 0,
                waiting: false,
            })
            .collect();
        let mut ch = NvmfChannel {
            shared,
            paths,
            slots,
            free: (0..depth as u32).rev().collect(),
            held: VecDeque::with_capacity(depth * 2),
            held_since: None,
            cq: Vec::with_capacity(depth),
            ready: VecDeque::with_capacity(depth),
            rr: 0,
            polls: 0,
        };
        ch.acquire_queues();
        ch
    }

    /// Takes a spare queue for every path this channel lacks one of, or registers as waiting
    /// (and kicks the control thread). Control plane: a lock per path without a queue.
    fn acquire_queues(&mut self) {
        for (i, p) in self.paths.iter_mut().enumerate() {
            if p.q.is_some() {
                continue;
            }
            let path = &self.shared.paths[i];
            if !path.is_up() {
                continue;
            }
            let Ok(mut pool) = path.pool.try_lock() else {
                continue;
            };
            let generation = path.generation();
            pool.spares.retain(|(_, g)| *g == generation);
            if let Some((q, g)) = pool.spares.pop() {
                if p.waiting {
                    pool.waiting -= 1;
                    p.waiting = false;
                }
                drop(pool);
                // SAFETY: the watch is dropped before the queue (see `drop_queue` and the
                // field order of `ChanPath`), so the fd outlives the poll watching it.
                let fd = unsafe { BorrowedFd::borrow_raw(q.as_raw_fd()) };
                p.watch = FdWatch::new(fd, libc::POLLIN as u32).ok();
                p.q = Some(q);
                p.generation = g;
                self.shared.kick();
            } else if !p.waiting {
                pool.waiting += 1;
                p.waiting = true;
                drop(pool);
                self.shared.kick();
            }
        }
    }

    /// Closes path `i`'s queue after its connection failed: collects the commands it failed
    /// (they are held for another path), gives its queue identifier back, and asks the control
    /// thread for a new one.
    fn drop_queue(&mut self, i: usize) {
        let p = &mut self.paths[i];
        p.watch = None;
        let Some(mut q) = p.q.take() else { return };
        // What already arrived completes normally; then a live queue (a path declared lost)
        // fails what it still has in flight, as a dead one already did.
        let _ = q.poll(&mut self.cq);
        q.abort();
        let _ = q.poll(&mut self.cq);
        let path = &self.shared.paths[i];
        tracing::debug!(bdev = %self.shared.info.name(), addr = %path.addr, qid = q.qid(), "nvmf: I/O queue lost");
        if let Ok(mut pool) = path.pool.lock()
            && path.generation() == p.generation
        {
            pool.release(q.qid());
        }
        drop(q);
        self.shared.kick();
        // The commands the queue failed go to the held queue now, whoever called.
        if !self.cq.is_empty() {
            self.handle_completions(i);
        }
    }

    /// The path the next command goes to: among those with a live queue and a usable ANA
    /// state, the best state; the first such (failover) or the next in turn (round robin).
    #[inline]
    fn pick(&mut self) -> Option<usize> {
        let n = self.paths.len();
        let mut best: Option<(u8, usize)> = None;
        let start = match self.shared.policy {
            Policy::Failover => 0,
            Policy::RoundRobin => self.rr,
        };
        for k in 0..n {
            let i = (start + k) % n;
            if self.paths[i].q.is_none() {
                continue;
            }
            let Some(rank) = ana::rank(self.shared.paths[i].ana()) else {
                continue;
            };
            if best.is_none_or(|(r, _)| rank < r) {
                best = Some((rank, i));
                if rank == 0 {
                    break;
                }
            }
        }
        let i = best?.1;
        if self.shared.policy == Policy::RoundRobin {
            self.rr = (i + 1) % n;
        }
        Some(i)
    }

    /// The NVMe command of command `tag` of its request.
    fn command(&self, tag: u64) -> IoCommand {
        let s = &self.slots[(tag & 0xffff_ffff) as usize];
        let nsid = self.shared.nsid;
        match s.io_type {
            IoType::Read => IoCommand::Read {
                nsid,
                slba: s.offset,
                nlb: s.blocks,
            },
            IoType::Write => IoCommand::Write {
                nsid,
                slba: s.offset,
                nlb: s.blocks,
                fua: false,
            },
            IoType::Flush => IoCommand::Flush { nsid },
            IoType::Unmap => IoCommand::Deallocate { nsid, nr: 1 },
            IoType::WriteZeroes => {
                let sub = tag >> 32;
                let first = sub * MAX_WRITE_ZEROES_BLOCKS;
                let nlb = (u64::from(s.blocks) - first).min(MAX_WRITE_ZEROES_BLOCKS);
                IoCommand::WriteZeroes {
                    nsid,
                    slba: s.offset + first,
                    nlb: nlb as u32,
                    deac: false,
                }
            }
        }
    }

    /// Sends command `tag` on some path; hands its data back if no path took it.
    #[inline]
    fn dispatch(&mut self, tag: u64, sg: SgList) -> Result<(), SgList> {
        let mut sg = sg;
        loop {
            let Some(i) = self.pick() else {
                return Err(sg);
            };
            let cmd = self.command(tag);
            let watched = self.paths[i].watch.is_some();
            let q = self.paths[i]
                .q
                .as_mut()
                .expect("picked a path with a queue");
            let r = if let IoCommand::Deallocate { .. } = cmd {
                let s = &mut self.slots[(tag & 0xffff_ffff) as usize];
                let buf = std::mem::take(&mut s.dsm);
                q.submit(cmd, buf, tag).map_err(|r| {
                    s.dsm = r.buf;
                    r.reason
                })
            } else {
                match q.submit_sg(cmd, sg, tag) {
                    Ok(()) => {
                        // NVMe/RDMA: the reactor may sleep before this channel polls again.
                        if watched {
                            q.arm();
                        }
                        return Ok(());
                    }
                    Err((r, l)) => {
                        sg = l;
                        Err(r)
                    }
                }
            };
            match r {
                Ok(()) => {
                    if watched {
                        q.arm();
                    }
                    return Ok(());
                }
                Err(RejectReason::Disconnected) => self.drop_queue(i),
                // Every other reason is this queue's, not the path's: wait for a completion.
                Err(_) => return Err(sg),
            }
        }
    }

    /// One command of request `slot` finished with `status`.
    fn finish(&mut self, slot: usize, status: IoStatus, bufs: SgList) {
        let s = &mut self.slots[slot];
        if !status.is_ok() && s.status.is_ok() {
            s.status = status;
        }
        s.outstanding -= 1;
        if s.outstanding == 0 {
            self.ready.push_back(IoCompletion {
                tag: s.tag,
                status: s.status,
                bufs,
            });
            self.free.push(slot as u32);
        }
    }

    /// Holds command `tag` until a path takes it.
    fn hold(&mut self, tag: u64, sg: SgList) {
        if self.held_since.is_none() {
            self.held_since = Some(Instant::now());
        }
        self.held.push_back((tag, sg));
    }

    /// Resubmits held commands; fails them once no path was usable for `ctrl_loss_tmo`.
    fn retry_held(&mut self) {
        self.acquire_queues();
        let before = self.held.len();
        for _ in 0..before {
            let (tag, sg) = self.held.pop_front().expect("counted");
            if let Err(sg) = self.dispatch(tag, sg) {
                self.held.push_front((tag, sg));
                break;
            }
        }
        if self.held.is_empty() {
            self.held_since = None;
            return;
        }
        if self.held.len() < before {
            // A path takes commands (a long Write Zeroes waits for queue slots, not a path).
            self.held_since = Some(Instant::now());
        }
        let waited = self
            .held_since
            .is_some_and(|t| t.elapsed() >= self.shared.ctrl_loss_tmo);
        if waited || self.shared.all_paths_lost() {
            let n = self.held.len() as u64;
            tracing::warn!(bdev = %self.shared.info.name(), commands = n, "nvmf: no usable path for ctrl_loss_tmo; failing held I/O");
            self.shared.failed_no_path.fetch_add(n, Ordering::Relaxed);
            while let Some((tag, sg)) = self.held.pop_front() {
                self.finish((tag & 0xffff_ffff) as usize, IoStatus::Aborted, sg);
            }
            self.held_since = None;
        }
    }

    /// Handles the completions path `path`'s queue returned.
    fn handle_completions(&mut self, path: usize) {
        let mut cq = std::mem::take(&mut self.cq);
        for mut c in cq.drain(..) {
            let slot = (c.tag & 0xffff_ffff) as usize;
            if !c.buf.is_empty() {
                self.slots[slot].dsm = std::mem::take(&mut c.buf);
            }
            let status = c.status();
            let sg = std::mem::take(&mut c.sg);
            if status.is_success() {
                self.finish(slot, IoStatus::Success, sg);
            } else if is_path_error(status) {
                if let Some(state) = ana_state_of_status(status) {
                    // The controller told us the namespace's state changed: steer away now;
                    // the control thread reads the ANA log page again.
                    self.shared.paths[path].set_ana(state);
                    self.shared.kick();
                }
                self.shared.retried.fetch_add(1, Ordering::Relaxed);
                self.hold(c.tag, sg);
            } else {
                self.finish(slot, from_nvme_status(status), sg);
            }
        }
        self.cq = cq;
    }
}

impl ChannelOps for NvmfChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        let Some(slot) = self.free.pop() else {
            return Err(io);
        };
        let s = &mut self.slots[slot as usize];
        s.io_type = io.io_type;
        s.offset = io.offset_blocks;
        s.blocks = io.num_blocks;
        s.tag = io.tag;
        s.status = IoStatus::Success;
        let subs = if io.io_type == IoType::WriteZeroes {
            u64::from(io.num_blocks).div_ceil(MAX_WRITE_ZEROES_BLOCKS)
        } else {
            1
        };
        s.outstanding = subs as u32;
        if io.io_type == IoType::Unmap {
            DsmRange {
                cattr: 0,
                nlb: io.num_blocks,
                slba: io.offset_blocks,
            }
            .write_to(&mut s.dsm);
        }
        let mut sg = Some(io.bufs);
        for sub in 0..subs {
            let tag = u64::from(slot) | sub << 32;
            let data = sg.take().unwrap_or_default();
            if let Err(data) = self.dispatch(tag, data) {
                if self.shared.all_paths_lost() {
                    self.shared.failed_no_path.fetch_add(1, Ordering::Relaxed);
                    self.finish(slot as usize, IoStatus::Aborted, data);
                } else {
                    self.hold(tag, data);
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let before = done.len();
        self.polls = self.polls.wrapping_add(1);
        for i in 0..self.paths.len() {
            let p = &mut self.paths[i];
            let Some(q) = p.q.as_mut() else { continue };
            let path = &self.shared.paths[i];
            if q.in_flight() > 0 && (!path.is_up() || path.generation() != p.generation) {
                // The control thread found the controller gone (a remote that stopped
                // answering keeps its sockets open): what waits on this queue goes elsewhere.
                self.drop_queue(i);
                continue;
            }
            let ready = match &p.watch {
                Some(w) => w.take() > 0,
                None => q.in_flight() > 0,
            };
            if !(ready || q.has_pending_tx()) {
                continue;
            }
            if q.poll(&mut self.cq).is_err() {
                self.drop_queue(i);
            } else if p.watch.is_some() && q.in_flight() > 0 {
                // NVMe/RDMA: the completion channel signals only once armed (a no-op on TCP);
                // completions found while arming make `has_pending_tx` true.
                q.arm();
            }
            if !self.cq.is_empty() {
                self.handle_completions(i);
            }
        }
        if !self.held.is_empty() {
            self.retry_held();
        } else if self.polls.is_multiple_of(ACQUIRE_EVERY)
            && self.paths.iter().any(|p| p.q.is_none())
        {
            self.acquire_queues();
        }
        done.extend(self.ready.drain(..));
        done.len() - before
    }

    fn wake(&self) -> Wake {
        if !self.ready.is_empty() {
            return Wake::Immediate;
        }
        for p in &self.paths {
            if let Some(q) = &p.q
                && (q.has_pending_tx() || (p.watch.is_none() && q.in_flight() > 0))
            {
                return Wake::Immediate;
            }
        }
        if !self.held.is_empty() {
            return Wake::At(Instant::now() + HELD_RETRY);
        }
        // Commands in flight: their completions wake the reactor, and so does a path the
        // control thread declares lost (it shuts the path's sockets down).
        Wake::Event
    }
}

impl Drop for NvmfChannel {
    fn drop(&mut self) {
        for (i, p) in self.paths.iter_mut().enumerate() {
            p.watch = None;
            let path = &self.shared.paths[i];
            let mut pool = match path.pool.lock() {
                Ok(g) => g,
                Err(e) => e.into_inner(),
            };
            if p.waiting {
                pool.waiting -= 1;
            }
            if let Some(q) = p.q.take()
                && path.generation() == p.generation
            {
                pool.release(q.qid());
                drop(pool);
                drop(q);
            }
        }
        self.shared.kick();
    }
}
