//! One NVMe/RDMA queue pair = one NVMe queue, served by one reactor (NVMe-oF 1.1 §7.3).
//!
//! The poller owns the queue pair's verbs objects (protection domain, completion channel,
//! completion queue, RC queue pair; `ffi`), its CM id (migrated to its own event channel so
//! that a disconnect reaches this reactor), the receive buffers (one memory region registered
//! at setup: one command capsule each, SQE + in-capsule data, always posted) and the
//! registered command buffers (`regpool`, which the queue takes its data buffers from through
//! [`Transport::data_buf`]). Per command:
//!
//! - a RECV completion carries a capsule: its SQE (and in-capsule data, copied into a pool
//!   buffer) goes to the [`NvmeQueue`], the receive buffer is posted again at once;
//! - host write data (a Keyed SGL Data Block) is fetched by one RDMA READ straight into the
//!   command's buffer ([`NvmeQueue::transfer_buf`]); at most the negotiated initiator depth of
//!   READs are outstanding, the rest wait in order;
//! - read data (and admin data, copied into a registered buffer) go to the host by one RDMA
//!   WRITE from the read's own buffer, then the CQE by SEND (inline: no memory region), which
//!   the host sees after the data (RC ordering).
//!
//! Completions wake the reactor through the completion channel's fd ([`FdWatch`]); while the
//! reactor spins the CQ is only polled, and before it sleeps the notification is re-armed and
//! the CQ looked at once more ([`Poller::prepare_sleep`]): an idle queue costs no CPU.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use ferroblk_bdev::reactor::{Poller, ReactorHandle};
use ferroblk_bdev::uring::FdWatch;
use ferroblk_bdev::{AlignedBuf, Wake, bufpool};

use super::ffi;
use super::regpool::RegPool;
use super::verbs::{QpObjects, Region, drop_without_id};
use super::wire::{CAPSULE_MAX, CmRequest, DataDesc, cm_reply, parse_capsule};
use crate::queue::{NvmeQueue, Transport};
use crate::spec::command::KeyedSglDescriptor;
use crate::spec::{Cqe, Status};
use crate::subsystem::{Port, Target};
use crate::transport::tcp::admission::Admission;

/// Most RDMA READs one queue has outstanding, whatever the host offers.
pub const MAX_READS: u8 = 16;
/// Bytes a SEND carries inline (a CQE).
const MAX_INLINE: u32 = 64;

const KIND_SHIFT: u32 = 60;
const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_RDMA: u64 = 3;

/// A connect request the listener hands to a reactor: the new CM id and its checked private
/// data.
pub struct Request {
    /// The new connection's id (still on the listener's event channel).
    pub id: *mut ffi::CmId,
    /// The NVMe/RDMA private data.
    pub req: CmRequest,
    /// The host's offered initiator depth, from the connect event.
    pub initiator_depth: u8,
}

// SAFETY: the id is handed over whole from the listener thread to one reactor, which alone
// uses it from then on (rdma_cm ids are not tied to a thread).
unsafe impl Send for Request {}

/// Where a command's data is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Move {
    Idle,
    /// Host data coming by RDMA READ into transfer `ttag`.
    FromHost {
        ttag: u16,
    },
    /// Data going to the host by RDMA WRITE, from `out`.
    ToHost,
}

/// Transport state of one outstanding command.
struct Entry {
    used: bool,
    cid: u16,
    keyed: Option<KeyedSglDescriptor>,
    mv: Move,
    len: usize,
    /// The data going to the host (a registered buffer).
    out: Option<AlignedBuf>,
    /// The completion, held until the data to the host is written.
    cqe: Option<Cqe>,
    /// The data could not move (no keyed SGL, or one too short): the CQE says so.
    fail: Option<Status>,
}

/// The transport side the queue talks to.
struct Wire {
    obj: QpObjects,
    peer: String,
    admission: Arc<Admission>,
    entries: Vec<Entry>,
    free: Vec<u16>,
    /// Entry + 1 by CID (0: none).
    by_cid: Box<[u16]>,
    reads_out: u8,
    max_reads: u8,
    /// Entries whose host data is to be fetched (RDMA READ), in order.
    fetch: VecDeque<u16>,
    sends_out: usize,
    rdma_out: usize,
    /// Send queue entries: work beyond them waits in `cqe_wait` / `write_wait` / `fetch`.
    sq_depth: usize,
    cqe_wait: VecDeque<Cqe>,
    write_wait: VecDeque<u16>,
    /// Set while a CQE that belongs to no entry is sent (a refused duplicate CID).
    bypass: bool,
    /// The queue pair failed (or the host broke the protocol): close.
    broken: Option<String>,
}

impl Wire {
    fn break_queue(&mut self, why: String) {
        if self.broken.is_none() {
            tracing::warn!(peer = %self.peer, reason = %why, "NVMe/RDMA queue failed");
            self.broken = Some(why);
        }
    }

    fn post_recv(&mut self, i: usize) {
        let r = &mut self.obj.regions[0];
        // SAFETY: receive buffer `i` lies inside the registered region; the QP is live.
        let rc = unsafe {
            ffi::fb_post_recv(
                self.obj.qp,
                (KIND_RECV << KIND_SHIFT) | i as u64,
                r.buf.as_mut_ptr().add(i * CAPSULE_MAX).cast(),
                CAPSULE_MAX as u32,
                r.lkey,
            )
        };
        if rc != 0 {
            self.break_queue(format!("post receive: errno {rc}"));
        }
    }

    fn sq_full(&self) -> bool {
        self.sends_out + self.rdma_out >= self.sq_depth
    }

    fn post_cqe(&mut self, cqe: &Cqe) {
        if self.sq_full() || !self.cqe_wait.is_empty() {
            self.cqe_wait.push_back(*cqe);
            return;
        }
        self.send_now(cqe);
    }

    fn send_now(&mut self, cqe: &Cqe) {
        let b = cqe.to_bytes();
        // SAFETY: an inline SEND copies the 16 bytes into the work request before returning.
        let rc = unsafe {
            ffi::fb_post_send_inline(
                self.obj.qp,
                KIND_SEND << KIND_SHIFT,
                b.as_ptr().cast(),
                b.len() as u32,
            )
        };
        if rc != 0 {
            self.break_queue(format!("post send: errno {rc}"));
        } else {
            self.sends_out += 1;
        }
    }

    /// Posts an RDMA READ (`write` false) or WRITE of `len` bytes at `local` for entry `e`,
    /// against its keyed SGL.
    fn post_rdma(&mut self, e: usize, write: bool, local: *mut u8, len: usize) {
        let Some(k) = self.entries[e].keyed else {
            return self.break_queue("data moved without a keyed SGL".into());
        };
        let Some(lkey) = self.obj.pool.lkey(local) else {
            return self.break_queue("command data outside registered memory".into());
        };
        // SAFETY: `local` starts a lent buffer of the registered pool of at least `len` bytes
        // (a command's buffer), which stays allocated and untouched by the queue until the
        // completion (a READ's target waits for data; a WRITE's source is held in the entry);
        // the QP is live.
        let rc = unsafe {
            ffi::fb_post_rdma(
                self.obj.qp,
                (KIND_RDMA << KIND_SHIFT) | e as u64,
                write as i32,
                local.cast(),
                len as u32,
                lkey,
                k.address,
                k.key,
            )
        };
        if rc != 0 {
            self.break_queue(format!("post RDMA operation: errno {rc}"));
        } else {
            self.rdma_out += 1;
        }
    }

    /// Writes entry `e`'s data to the host (or waits for send queue room).
    fn post_write(&mut self, e: usize) {
        if self.broken.is_some() {
            return;
        }
        if self.sq_full() {
            self.write_wait.push_back(e as u16);
            return;
        }
        let len = self.entries[e].len;
        let local = self.entries[e]
            .out
            .as_mut()
            .expect("data to send")
            .as_mut_ptr();
        self.post_rdma(e, true, local, len);
    }

    /// Posts the work that waited for send queue room, oldest first.
    fn drain_waits(&mut self) {
        while !self.sq_full() && self.broken.is_none() {
            if let Some(c) = self.cqe_wait.pop_front() {
                self.send_now(&c);
            } else if let Some(e) = self.write_wait.pop_front() {
                self.post_write(e as usize);
            } else {
                break;
            }
        }
    }

    fn entry_of(&self, cid: u16) -> Option<usize> {
        match self.by_cid[cid as usize] {
            0 => None,
            e => Some(e as usize - 1),
        }
    }

    fn free_entry(&mut self, e: usize) {
        let en = &mut self.entries[e];
        en.used = false;
        let cid = en.cid;
        if let Some(b) = en.out.take() {
            self.release_buf(b);
        }
        self.by_cid[cid as usize] = 0;
        self.free.push(e as u16);
    }

    /// Starts moving `len` bytes of `buf` to the host for command `cid`.
    fn start_to_host(&mut self, cid: u16, buf: AlignedBuf, len: usize) {
        let Some(e) = self.entry_of(cid) else {
            self.release_buf(buf);
            return;
        };
        let en = &mut self.entries[e];
        match en.keyed {
            Some(k) if (k.length as usize) >= len && len > 0 => {
                en.mv = Move::ToHost;
                en.len = len;
                en.out = Some(buf);
                self.post_write(e);
            }
            k => {
                en.fail = Some(if k.is_none() {
                    Status::SGL_DESCRIPTOR_TYPE_INVALID
                } else {
                    Status::DATA_SGL_LENGTH_INVALID
                });
                self.release_buf(buf);
            }
        }
    }
}

impl Transport for Wire {
    fn send_cqe(&mut self, cqe: &Cqe) {
        if self.bypass {
            return self.post_cqe(cqe);
        }
        let Some(e) = self.entry_of(cqe.cid) else {
            return self.post_cqe(cqe);
        };
        let en = &mut self.entries[e];
        let mut cqe = *cqe;
        if let Some(s) = en.fail.take()
            && cqe.status.is_success()
        {
            cqe.status = s;
        }
        if en.mv == Move::ToHost {
            // Sent once the data is written.
            en.cqe = Some(cqe);
            return;
        }
        self.free_entry(e);
        self.post_cqe(&cqe);
    }

    fn send_read_data(&mut self, cid: u16, buf: AlignedBuf, len: usize) {
        self.start_to_host(cid, buf, len);
    }

    fn data_buf(&mut self, len: usize) -> AlignedBuf {
        // SAFETY: the QP is live; the pool registers in its protection domain only.
        match unsafe { self.obj.pool.get(self.obj.qp, len) } {
            Some(b) => b,
            None => {
                // Not registered: an RDMA operation on it breaks the queue with a clear
                // reason rather than move data with a wrong key.
                tracing::debug!(peer = %self.peer, len, "memory registration failed");
                bufpool::get(len)
            }
        }
    }

    fn release_buf(&mut self, buf: AlignedBuf) {
        if let Err(b) = self.obj.pool.put(buf) {
            bufpool::put(b);
        }
    }

    fn send_data(&mut self, cid: u16, data: &[u8]) {
        let mut b = self.data_buf(data.len());
        b.as_mut_slice()[..data.len()].copy_from_slice(data);
        self.start_to_host(cid, b, data.len());
    }

    fn request_data(&mut self, cid: u16, ttag: u16, len: usize) {
        let Some(e) = self.entry_of(cid) else { return };
        let en = &mut self.entries[e];
        en.mv = Move::FromHost { ttag };
        en.len = len;
        self.fetch.push_back(e as u16);
    }

    fn sequence_error(&mut self) {
        self.break_queue("more commands outstanding than the queue has entries".into());
    }

    fn connect_refused(&mut self, field: &str, value: &dyn std::fmt::Debug, why: &str) {
        self.admission
            .log_connect_refused(&self.peer, field, value, why);
    }

    fn connected(&mut self) {}
}

/// The poller of one NVMe/RDMA queue.
pub struct RdmaConn {
    // The watches are declared (so dropped) before `wire`, which closes their fds.
    cq_watch: FdWatch,
    cm_watch: FdWatch,
    queue: NvmeQueue,
    wire: Wire,
    disconnected: bool,
    finished: bool,
}

impl RdmaConn {
    /// Takes over a connect request on the calling reactor: moves its id to an event channel
    /// of its own, creates the queue pair and its memory regions, posts the receive buffers
    /// and accepts with the NVMe/RDMA reply (CRQSIZE). On error the caller rejects.
    pub fn accept(
        target: Arc<Target>,
        port: Arc<Port>,
        reactor: ReactorHandle,
        admission: Arc<Admission>,
        r: &Request,
    ) -> std::io::Result<RdmaConn> {
        let err = |rc: i32| std::io::Error::from_raw_os_error(rc);
        let entries = usize::from(r.req.entries());
        let mut obj = QpObjects {
            ch: std::ptr::null_mut(),
            id: r.id,
            qp: std::ptr::null_mut(),
            regions: Vec::new(),
            // Two buffers per command at most (Compare), and admin data.
            pool: RegPool::new(2 * entries + 8, false),
            foreign: Vec::new(),
        };
        let mut ch_fd = 0;
        // SAFETY: out-pointers to locals.
        let rc = unsafe { ffi::fb_channel_create(&mut obj.ch, &mut ch_fd) };
        if rc != 0 {
            drop_without_id(obj);
            return Err(err(rc));
        }
        // SAFETY: the id and channel are live; the listener acknowledged the request event.
        let rc = unsafe { ffi::fb_migrate(obj.id, obj.ch) };
        if rc != 0 {
            // The id stays with the caller (it rejects it): free only the channel.
            drop_without_id(obj);
            return Err(err(rc));
        }
        let max_reads = r.initiator_depth.clamp(1, MAX_READS);
        let mut cc_fd = 0;
        // Send queue: per command an RDMA operation and a SEND at most; more (SENDs whose
        // completion is not reaped yet) wait for room.
        let sq_depth = 2 * entries + 8;
        // SAFETY: the id is live; out-pointers to locals.
        let rc = unsafe {
            ffi::fb_qp_create(
                obj.id,
                sq_depth as u32,
                entries as u32,
                MAX_INLINE,
                &mut obj.qp,
                &mut cc_fd,
            )
        };
        // The caller rejects and destroys the id: a failed setup frees everything else.
        let fail = |obj: QpObjects, e: std::io::Error| {
            drop_without_id(obj);
            Err(e)
        };
        if rc != 0 {
            return fail(obj, err(rc));
        }
        match Region::new(obj.qp, entries * CAPSULE_MAX) {
            Ok(r) => obj.regions.push(r),
            Err(e) => return fail(obj, e),
        }
        // SAFETY: both fds belong to objects `obj` keeps open for as long as the watches live
        // (the watches are fields dropped before `wire`).
        let (cq_fd, cm_fd) =
            unsafe { (BorrowedFd::borrow_raw(cc_fd), BorrowedFd::borrow_raw(ch_fd)) };
        let cq_watch = match FdWatch::new(cq_fd, libc::POLLIN as u32) {
            Ok(w) => w,
            Err(e) => return fail(obj, std::io::Error::other(e)),
        };
        let cm_watch = match FdWatch::new(cm_fd, libc::POLLIN as u32) {
            Ok(w) => w,
            Err(e) => return fail(obj, std::io::Error::other(e)),
        };
        // SAFETY: the id is live.
        let peer = unsafe { ffi::peer(obj.id) };
        let mut wire = Wire {
            obj,
            peer: peer.clone(),
            admission,
            entries: (0..entries)
                .map(|_| Entry {
                    used: false,
                    cid: 0,
                    keyed: None,
                    mv: Move::Idle,
                    len: 0,
                    out: None,
                    cqe: None,
                    fail: None,
                })
                .collect(),
            free: (0..entries as u16).rev().collect(),
            by_cid: vec![0u16; 1 << 16].into_boxed_slice(),
            reads_out: 0,
            max_reads,
            fetch: VecDeque::with_capacity(entries),
            sends_out: 0,
            rdma_out: 0,
            sq_depth,
            cqe_wait: VecDeque::with_capacity(entries),
            write_wait: VecDeque::with_capacity(entries),
            bypass: false,
            broken: None,
        };
        for i in 0..entries {
            wire.post_recv(i);
        }
        if let Some(why) = wire.broken.take() {
            drop((cq_watch, cm_watch));
            return fail(wire.obj, std::io::Error::other(why));
        }
        let rep = cm_reply(entries as u16);
        // SAFETY: the QP is live; the private data is copied by rdma_accept.
        let rc = unsafe {
            ffi::fb_accept(
                wire.obj.qp,
                rep.as_ptr().cast(),
                rep.len() as u8,
                0,
                max_reads,
            )
        };
        if rc != 0 {
            drop((cq_watch, cm_watch));
            return fail(wire.obj, err(rc));
        }
        tracing::debug!(peer = %peer, qid = r.req.qid, entries, max_reads, "NVMe/RDMA queue accepted");
        Ok(RdmaConn {
            queue: NvmeQueue::new(target, reactor, peer)
                .with_keyed_sgl()
                .with_port(port),
            wire,
            cq_watch,
            cm_watch,
            disconnected: false,
            finished: false,
        })
    }

    fn cm_events(&mut self) -> usize {
        let mut n = 0;
        loop {
            // SAFETY: a zeroed plain C struct the shim fills.
            let mut ev: ffi::CmEvent = unsafe { std::mem::zeroed() };
            // SAFETY: the channel is live; `ev` is a valid out-pointer.
            if unsafe { ffi::fb_get_event(self.wire.obj.ch, &mut ev) } != 0 {
                break;
            }
            n += 1;
            match ev.event {
                ffi::event::ESTABLISHED => {}
                ffi::event::DISCONNECTED
                | ffi::event::TIMEWAIT_EXIT
                | ffi::event::DEVICE_REMOVAL
                | ffi::event::CONNECT_ERROR
                | ffi::event::UNREACHABLE
                | ffi::event::REJECTED => {
                    self.disconnected = true;
                    self.queue.close("host disconnected");
                }
                e => {
                    tracing::debug!(peer = %self.wire.peer, event = %ffi::event_name(e), "RDMA CM event")
                }
            }
        }
        n
    }

    /// Polls the CQ until it is empty; returns the completions handled.
    fn poll_cq(&mut self) -> usize {
        let mut total = 0;
        let mut wc = [ffi::WorkCompletion::default(); 16];
        loop {
            // SAFETY: the QP is live; `wc` has room for 16 completions.
            let n = unsafe { ffi::fb_poll_cq(self.wire.obj.qp, wc.len() as i32, wc.as_mut_ptr()) };
            if n <= 0 {
                break;
            }
            for c in &wc[..n as usize] {
                self.completion(c);
            }
            self.wire.drain_waits();
            self.start_fetches();
            total += n as usize;
        }
        total
    }

    fn completion(&mut self, c: &ffi::WorkCompletion) {
        let kind = c.wr_id >> KIND_SHIFT;
        let idx = (c.wr_id & ((1 << KIND_SHIFT) - 1)) as usize;
        if kind == KIND_SEND {
            self.wire.sends_out -= 1;
        } else if kind == KIND_RDMA {
            self.wire.rdma_out -= 1;
            if self.wire.entries[idx].mv != Move::ToHost {
                self.wire.reads_out -= 1;
            }
        }
        if c.status != 0 {
            // Flushed work after a failure or a disconnect: only the first is news.
            if !self.queue.is_closing() {
                let what = match kind {
                    KIND_RECV => "receive",
                    KIND_SEND => "send",
                    _ => "RDMA transfer",
                };
                self.wire
                    .break_queue(format!("{what} failed: {}", ffi::wc_status(c.status)));
            }
            return;
        }
        match kind {
            KIND_RECV => self.capsule(idx, c.byte_len as usize),
            KIND_RDMA => self.rdma_done(idx),
            _ => {}
        }
    }

    fn capsule(&mut self, i: usize, len: usize) {
        if self.queue.is_closing() || self.wire.broken.is_some() {
            return;
        }
        let start = i * CAPSULE_MAX;
        let rx = &self.wire.obj.regions[0].buf.as_slice()[start..start + len.min(CAPSULE_MAX)];
        let (sqe, icd_len, desc) = match parse_capsule(&rx[..len.min(rx.len())]) {
            Ok(x) => x,
            Err(e) => {
                self.wire
                    .break_queue(format!("malformed command capsule: {e:?}"));
                return;
            }
        };
        let icd = (icd_len > 0).then(|| {
            let mut b = bufpool::get(icd_len);
            b.as_mut_slice()[..icd_len].copy_from_slice(&rx[64..64 + icd_len]);
            b
        });
        // The capsule is copied out: the buffer takes the next one.
        self.wire.post_recv(i);
        let cid = sqe.cid();
        if self.wire.entry_of(cid).is_some() {
            // A CID already outstanding: refused without touching the running command's state.
            if let Some(b) = icd {
                bufpool::put(b);
            }
            self.wire.bypass = true;
            self.queue
                .refuse_capsule(&mut self.wire, cid, Status::COMMAND_ID_CONFLICT);
            self.wire.bypass = false;
            return;
        }
        let Some(e) = self.wire.free.pop() else {
            if let Some(b) = icd {
                bufpool::put(b);
            }
            self.wire.sequence_error();
            return;
        };
        let en = &mut self.wire.entries[e as usize];
        en.used = true;
        en.cid = cid;
        en.keyed = match desc {
            DataDesc::Keyed(k) => Some(k),
            DataDesc::Capsule => None,
        };
        en.mv = Move::Idle;
        en.cqe = None;
        en.fail = None;
        self.wire.by_cid[cid as usize] = e + 1;
        self.queue.command(&mut self.wire, sqe, icd, icd_len);
        self.start_fetches();
    }

    /// Posts the RDMA READs of the host data commands wait for, in order, while the initiator
    /// depth and the send queue allow.
    fn start_fetches(&mut self) {
        while let Some(&e) = self.wire.fetch.front() {
            if self.wire.broken.is_some()
                || self.wire.reads_out >= self.wire.max_reads
                || self.wire.sq_full()
            {
                return;
            }
            self.wire.fetch.pop_front();
            let e = usize::from(e);
            let en = &self.wire.entries[e];
            let Move::FromHost { ttag } = en.mv else {
                continue;
            };
            let (cid, len) = (en.cid, en.len);
            // The whole transfer, into the command's (registered) buffer.
            let Some(dst) = self.queue.transfer_buf(ttag, cid) else {
                self.wire.entries[e].mv = Move::Idle;
                continue;
            };
            debug_assert_eq!(dst.len(), len);
            let local = dst.as_mut_ptr();
            self.wire.reads_out += 1;
            self.wire.post_rdma(e, false, local, len);
        }
    }

    fn rdma_done(&mut self, e: usize) {
        let en = &mut self.wire.entries[e];
        match std::mem::replace(&mut en.mv, Move::Idle) {
            Move::FromHost { ttag } => {
                let (cid, len) = (en.cid, en.len);
                // The data is in the command's buffer, unless the queue stopped waiting for it.
                if self.queue.transfer_buf(ttag, cid).is_some()
                    && self.queue.advance_transfer(ttag, len)
                {
                    self.queue.data_received(&mut self.wire, ttag);
                }
            }
            Move::ToHost => {
                if let Some(b) = en.out.take() {
                    self.wire.release_buf(b);
                }
                if let Some(cqe) = self.wire.entries[e].cqe.take() {
                    self.wire.free_entry(e);
                    self.wire.post_cqe(&cqe);
                }
            }
            Move::Idle => {}
        }
    }

    fn work(&mut self) -> usize {
        if self.cq_watch.take() > 0 {
            // SAFETY: the QP is live; takes and acknowledges the channel's events.
            unsafe { ffi::fb_cq_events(self.wire.obj.qp) };
        }
        let mut n = self.poll_cq();
        if let Some(why) = self.wire.broken.clone() {
            self.queue.close(&why);
        }
        n += self.queue.complete(&mut self.wire);
        n
    }
}

impl Drop for RdmaConn {
    fn drop(&mut self) {
        // The queue pair goes before the NVMe queue frees its command buffers: no RDMA
        // operation can still reach them (the rest goes with `wire`).
        // SAFETY: the QP is live; destroying it twice is a no-op in the shim.
        unsafe { ffi::fb_qp_destroy_qp(self.wire.obj.qp) };
    }
}

impl Poller for RdmaConn {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        let mut n = 0;
        if self.cm_watch.take() > 0 {
            n += self.cm_events();
        }
        n += self.queue.service();
        n += self.work();
        if self.queue.is_closing()
            && self.queue.in_flight() == 0
            && (self.wire.rdma_out == 0
                && self.wire.sends_out == 0
                && self.wire.cqe_wait.is_empty()
                || self.disconnected
                || self.wire.broken.is_some())
        {
            if !self.disconnected {
                // SAFETY: the id is live.
                unsafe { ffi::fb_disconnect(self.wire.obj.id) };
            }
            self.finished = true;
        }
        n
    }

    fn wake(&self) -> Wake {
        if self.finished {
            return Wake::Event;
        }
        let mut w = self.queue.wake();
        if self.wire.broken.is_some() && !self.queue.is_closing() {
            w = Wake::Immediate;
        }
        if self.queue.is_closing() && self.queue.in_flight() == 0 {
            w = Wake::Immediate;
        }
        w
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.finished {
            return false;
        }
        // SAFETY: the QP is live.
        unsafe { ffi::fb_req_notify(self.wire.obj.qp) };
        self.work() > 0
    }

    fn in_flight(&self) -> usize {
        if self.finished {
            0
        } else {
            self.queue.in_flight()
        }
    }

    fn stop(&mut self) {
        self.queue.close("shutdown");
    }

    fn is_done(&self) -> bool {
        self.finished
    }
}
