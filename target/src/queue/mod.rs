//! The transport-independent NVMe queue: what one submission/completion queue pair of a
//! controller does whatever carries its capsules (NVMe-oF 1.1 §2–3; Linux's nvmet `core.c` and
//! SPDK's `ctrlr.c` keep the same split).
//!
//! A transport (NVMe/TCP's connection today; RDMA next) owns the wire: it decodes capsules and
//! hands each command to [`NvmeQueue::command`], moves command data when the queue asks
//! ([`Transport::request_data`], then [`NvmeQueue::receive_data`] / [`NvmeQueue::data_received`]),
//! and sends what the queue gives it through [`Transport`]: completion entries, read data,
//! admin data. The queue owns everything else:
//!
//! - command slots (the CID → slot table; a slot index is the transfer tag), SQ head and SQ
//!   flow control, queue-full and CID-conflict checks;
//! - Fabrics commands: [`connect`] (an admin queue creates a controller, an I/O queue joins
//!   one), Property Get/Set, Disconnect;
//! - admin commands ([`crate::subsystem::admin`]), asynchronous event requests, keep-alive and
//!   controller teardown;
//! - NVM I/O commands ([`io`]): the checks made before any data is asked for (a write to a
//!   missing namespace or out-of-range LBA fails before R2T), the mapping onto requests on this
//!   reactor's bdev channels (one per namespace), retries when a channel is full, and their
//!   completions.
//!
//! Buffers for command data come from the transport ([`Transport::data_buf`]: the reactor's
//! pool, [`ferroblk_bdev::bufpool`], or registered memory for RDMA) and go back to it
//! ([`Transport::release_buf`]); a transport takes a read's buffer back once it has sent it.

pub mod connect;
pub mod io;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ferroblk_bdev::reactor::ReactorHandle;
use ferroblk_bdev::{AlignedBuf, Channel, IoCompletion, IoRequest, Wake, bufpool};

use crate::spec::command::{
    AdminOpcode, DsmRange, IoOpcode, SglDescriptor, Sqe, sgl_subtype, sgl_type,
};
use crate::spec::fabrics::FabricsType;
use crate::spec::{Cqe, Status};
use crate::subsystem::admin::{self, AER_SLOTS, AdminOutcome, MAX_TRANSFER};
use crate::subsystem::{Controller, Namespace, Port, Target};

/// What the queue asks of the transport that carries it.
pub trait Transport {
    /// Sends a completion queue entry (SQ head and SQ identifier already filled in).
    fn send_cqe(&mut self, cqe: &Cqe);
    /// Sends the first `len` bytes of `buf` to the host as command `cid`'s data, then gives
    /// `buf` back ([`release_buf`](Self::release_buf)).
    fn send_read_data(&mut self, cid: u16, buf: AlignedBuf, len: usize);
    /// A buffer of at least `len` bytes for command data (contents unspecified): the
    /// reactor's pool, unless the transport needs memory of its own (RDMA: registered).
    fn data_buf(&mut self, len: usize) -> AlignedBuf {
        bufpool::get(len)
    }
    /// Takes back a buffer of command data the queue is done with (from
    /// [`data_buf`](Self::data_buf), or in-capsule data the transport gave).
    fn release_buf(&mut self, buf: AlignedBuf) {
        bufpool::put(buf);
    }
    /// Sends a small payload (an admin command's data) to the host.
    fn send_data(&mut self, cid: u16, data: &[u8]);
    /// Asks the host for command `cid`'s `len` bytes of data, for the transfer tagged `ttag`
    /// (NVMe/TCP: an R2T). The data comes back through [`NvmeQueue::receive_data`].
    fn request_data(&mut self, cid: u16, ttag: u16, len: usize);
    /// The host broke the queue's protocol (more commands outstanding than the queue has
    /// entries): end the connection with a transport-level error.
    fn sequence_error(&mut self);
    /// A Connect was refused: `field` had `value`, refused because `why` (for the log).
    fn connect_refused(&mut self, field: &str, value: &dyn std::fmt::Debug, why: &str);
    /// Connect succeeded: the connection is a queue now (no more handshake deadline; reserve
    /// what serving it needs).
    fn connected(&mut self);
}

/// Where a command slot is in its life.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotState {
    Free,
    /// Its data is to be requested from the host once the connection's budget for data
    /// waited on ([`AWAIT_DATA_BUDGET`]) has room.
    AwaitBudget,
    /// Data requested from the host; not yet all there.
    AwaitData,
    /// Running: bdev requests in flight (or about to be).
    Exec,
}

/// One outstanding command.
pub(crate) struct Slot {
    pub(crate) state: SlotState,
    pub(crate) cid: u16,
    pub(crate) sqe: Sqe,
    /// Command data (host-to-controller, or read into for controller-to-host).
    pub(crate) buf: Option<AlignedBuf>,
    /// Data length of the command.
    pub(crate) len: usize,
    /// Host-to-controller bytes received so far.
    pub(crate) got: usize,
    /// Bdev requests still in flight.
    pub(crate) pending: u32,
    /// First error status seen.
    pub(crate) status: Status,
    /// Data the host sent with a Compare, kept to check against the read.
    pub(crate) compare: Option<AlignedBuf>,
    /// A FUA write: flush this namespace after the write completes.
    pub(crate) flush_nsid: Option<u32>,
}

/// This reactor's channel to one namespace.
pub(crate) struct NsChan {
    pub(crate) ns: Arc<Namespace>,
    pub(crate) ch: Channel,
    /// The namespace left the subsystem (or was replaced): the channel stays only until the
    /// commands already accepted for it are done; new commands are refused.
    pub(crate) draining: bool,
}

/// What Connect bound the queue to.
pub(crate) struct Bound {
    pub(crate) qid: u16,
    pub(crate) ctrl: Arc<Controller>,
    /// Channels by NSID (I/O queues only).
    pub(crate) ns: Vec<Option<NsChan>>,
    pub(crate) ns_gen: u64,
}

/// Why [`NvmeQueue::receive_data`] refused data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataError {
    /// No transfer with this tag and CID waits for data.
    NoTransfer,
    /// The data is not the next part of the transfer, or runs past its end.
    OutOfRange,
}

/// Bytes of host-to-controller data one connection may have requested (R2T, RDMA READ) and
/// not yet received: the buffers a host can make the target hold by not sending its write
/// data. Further writes wait, in order, for room (their data is asked for then).
pub const AWAIT_DATA_BUDGET: usize = 16 << 20;

/// One NVMe queue's state, transport apart. See the module documentation.
pub struct NvmeQueue {
    pub(crate) target: Arc<Target>,
    pub(crate) reactor: ReactorHandle,
    pub(crate) peer: String,
    pub(crate) bound: Option<Bound>,
    pub(crate) slots: Vec<Slot>,
    /// Indices of free slots (reused last-freed first).
    free: Vec<u16>,
    /// Slots in use.
    active: usize,
    /// One bit per CID in use (8 KiB, from the first command after Connect; before it a queue
    /// has at most its Connect outstanding).
    cids: Vec<u64>,
    pub(crate) done: Vec<IoCompletion>,
    /// Requests a full channel handed back, by NSID, retried first and in order.
    pub(crate) retry: VecDeque<(u32, IoRequest)>,
    sqhd: u16,
    pub(crate) sqsize: u16,
    pub(crate) flow_control: bool,
    /// CIDs of outstanding Asynchronous Event Requests (admin queue).
    aers: Vec<u16>,
    /// Bytes of data requested from the host and not yet all received (slots in
    /// `AwaitData`), at most [`AWAIT_DATA_BUDGET`] unless one command alone is larger.
    await_bytes: usize,
    /// Slots in `AwaitBudget`, in arrival order.
    await_budget: VecDeque<u16>,
    closing: bool,
    /// The transport names host memory with Keyed SGL Data Blocks (RDMA) rather than
    /// Transport SGL Data Blocks (TCP).
    keyed_sgl: bool,
    /// The listener the connection came in on (its ANA states); `None` for a queue made
    /// without one.
    pub(crate) port: Option<Arc<Port>>,
}

impl NvmeQueue {
    /// A queue not yet connected; `peer` names the host in logs.
    pub fn new(target: Arc<Target>, reactor: ReactorHandle, peer: String) -> NvmeQueue {
        NvmeQueue {
            target,
            reactor,
            peer,
            bound: None,
            slots: Vec::new(),
            free: Vec::new(),
            active: 0,
            cids: Vec::new(),
            done: Vec::new(),
            retry: VecDeque::new(),
            sqhd: 0,
            sqsize: admin::QUEUE_ENTRIES,
            flow_control: true,
            aers: Vec::new(),
            await_bytes: 0,
            await_budget: VecDeque::new(),
            closing: false,
            keyed_sgl: false,
            port: None,
        }
    }

    /// A queue whose connection came in on listener `port`: its controller reports and
    /// enforces that port's ANA states.
    pub fn with_port(mut self, port: Arc<Port>) -> NvmeQueue {
        self.port = Some(port);
        self
    }

    /// A queue whose transport names host memory with Keyed SGL Data Blocks (NVMe/RDMA)
    /// instead of Transport SGL Data Blocks (NVMe/TCP).
    pub fn with_keyed_sgl(mut self) -> NvmeQueue {
        self.keyed_sgl = true;
        self
    }

    /// The data length SGL1 of `sqe` describes: a Keyed SGL Data Block's 24-bit length on a
    /// keyed transport, the 32-bit Length of any other descriptor.
    pub(crate) fn sgl_len(&self, sqe: &Sqe) -> usize {
        match sqe.keyed_sgl1() {
            Some(k) if self.keyed_sgl => k.length as usize,
            _ => sqe.sgl1().length as usize,
        }
    }

    /// Whether SGL1 of `sqe` names host memory the way this queue's transport moves it.
    fn is_transport_sgl(&self, sqe: &Sqe) -> bool {
        if self.keyed_sgl {
            sqe.keyed_sgl1().is_some()
        } else {
            sqe.sgl1().sgl_type == sgl_type::TRANSPORT_DATA_BLOCK
        }
    }

    /// The host, as given to [`new`](Self::new).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether Connect succeeded.
    pub fn is_connected(&self) -> bool {
        self.bound.is_some()
    }

    /// Whether the queue is closing: it takes no new command and finishes what runs.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Closes the queue (idempotent): an admin queue's controller leaves its subsystem.
    pub fn close(&mut self, why: &str) {
        if self.closing {
            return;
        }
        // Connections that never identified themselves are counted and reported by the
        // transport's admission, not logged one by one.
        if self.bound.is_some() {
            tracing::info!(peer = %self.peer, reason = why, "NVMe queue closing");
        } else {
            tracing::debug!(peer = %self.peer, reason = why, "NVMe queue closing");
        }
        self.closing = true;
        self.remove_controller();
    }

    fn remove_controller(&self) {
        if let Some(b) = &self.bound
            && b.qid == 0
        {
            b.ctrl.subsystem.remove_controller(b.ctrl.cntlid);
        }
    }

    /// Bdev requests in flight or waiting to be retried.
    pub fn in_flight(&self) -> usize {
        self.bound.as_ref().map_or(0, |b| {
            b.ns.iter()
                .flatten()
                .map(|n| n.ch.in_flight())
                .sum::<usize>()
        }) + self.retry.len()
    }

    /// What would wake the reactor for this queue.
    pub fn wake(&self) -> Wake {
        let mut w = Wake::Event;
        if let Some(b) = &self.bound {
            for n in b.ns.iter().flatten() {
                w = w.min(n.ch.wake());
            }
            if b.qid == 0
                && let Some(d) = b.ctrl.keep_alive_deadline()
            {
                w = w.min(Wake::At(d));
            }
            if b.qid == 0 && !self.aers.is_empty() && b.ctrl.has_events() {
                w = Wake::Immediate;
            }
        }
        if !self.retry.is_empty() || (self.closing && self.in_flight() == 0) {
            w = Wake::Immediate;
        }
        w
    }

    /// Work that does not wait for the host, run before the transport reads new commands:
    /// controller teardown and keep-alive expiry, namespace changes, requests to retry.
    pub fn service(&mut self) -> usize {
        if let Some(b) = &self.bound
            && b.ctrl.dead.load(Ordering::Acquire)
        {
            self.close("controller torn down");
        }
        if let Some(b) = &self.bound
            && b.qid == 0
            && let Some(deadline) = b.ctrl.keep_alive_deadline()
            && Instant::now() > deadline
            && !self.closing
        {
            tracing::warn!(peer = %self.peer, cntlid = b.ctrl.cntlid, "keep-alive timeout");
            self.close("keep-alive timeout");
        }
        self.refresh_namespaces();
        self.resubmit()
    }

    /// Work after the transport took new commands: bdev completions, asynchronous events.
    pub fn complete<T: Transport>(&mut self, t: &mut T) -> usize {
        let n = self.reap(t);
        self.deliver_events(t);
        n
    }

    // ------------------------------------------------------------------ commands

    fn advance_sqhd(&mut self) {
        self.sqhd = (self.sqhd + 1) % self.sqsize.max(1);
    }

    /// Sends `cqe` with this queue's SQ head and identifier.
    pub(crate) fn send_cqe<T: Transport>(&self, t: &mut T, mut cqe: Cqe) {
        cqe.sqhd = if self.flow_control { self.sqhd } else { 0xffff };
        cqe.sqid = self.bound.as_ref().map_or(0, |b| b.qid);
        t.send_cqe(&cqe);
    }

    /// A command whose capsule arrived damaged (NVMe/TCP: a data digest mismatch): it never
    /// started, and completes with `status`.
    pub fn refuse_capsule<T: Transport>(&mut self, t: &mut T, cid: u16, status: Status) {
        self.advance_sqhd();
        self.send_cqe(t, Cqe::new(cid, status));
    }

    /// Marks transfer `ttag` (command `cid`) failed with `status` (a data digest error in one
    /// of its PDUs) without ending it: the host still sends the rest of the transfer's data,
    /// which is taken as usual; then the command completes with `status` instead of running.
    pub fn poison_transfer(&mut self, ttag: u16, cid: u16, status: Status) {
        if let Some(s) = self
            .slots
            .get_mut(ttag as usize)
            .filter(|s| s.state == SlotState::AwaitData && s.cid == cid)
            && s.status.is_success()
        {
            s.status = status;
        }
    }

    /// Whether a command with this CID is outstanding.
    fn cid_in_use(&self, cid: u16) -> bool {
        if self.cids.is_empty() {
            return self
                .slots
                .iter()
                .any(|s| s.state != SlotState::Free && s.cid == cid);
        }
        self.cids[usize::from(cid) / 64] & (1 << (cid % 64)) != 0
    }

    fn mark_cid(&mut self, cid: u16, used: bool) {
        if self.cids.is_empty() {
            if self.bound.is_none() {
                return;
            }
            // Connected: from now on CIDs are tracked in the bitmap.
            self.cids = vec![0; (usize::from(u16::MAX) + 1) / 64];
            for s in self.slots.iter().filter(|s| s.state != SlotState::Free) {
                self.cids[usize::from(s.cid) / 64] |= 1 << (s.cid % 64);
            }
        }
        let (w, bit) = (usize::from(cid) / 64, 1u64 << (cid % 64));
        if used {
            self.cids[w] |= bit;
        } else {
            self.cids[w] &= !bit;
        }
    }

    fn free_slot<T: Transport>(&mut self, t: &mut T, i: usize) {
        let s = &mut self.slots[i];
        debug_assert!(s.state != SlotState::Free);
        let was = s.state;
        s.state = SlotState::Free;
        match was {
            SlotState::AwaitData => self.await_bytes -= self.slots[i].len,
            SlotState::AwaitBudget => self.await_budget.retain(|&w| usize::from(w) != i),
            _ => {}
        }
        let s = &mut self.slots[i];
        let cid = s.cid;
        if let Some(b) = s.buf.take() {
            t.release_buf(b);
        }
        if let Some(b) = s.compare.take() {
            t.release_buf(b);
        }
        self.free.push(i as u16);
        self.active -= 1;
        self.mark_cid(cid, false);
        if was == SlotState::AwaitData {
            self.grant_data(t);
        }
    }

    /// Asks the host for the data of the commands waiting for budget, in order, while it has
    /// room (the first always gets it when nothing is requested).
    fn grant_data<T: Transport>(&mut self, t: &mut T) {
        while let Some(&w) = self.await_budget.front() {
            let i = usize::from(w);
            let len = self.slots[i].len;
            if self.await_bytes > 0 && self.await_bytes + len > AWAIT_DATA_BUDGET {
                return;
            }
            self.await_budget.pop_front();
            self.await_bytes += len;
            let s = &mut self.slots[i];
            s.buf = Some(t.data_buf(len));
            s.state = SlotState::AwaitData;
            let cid = s.cid;
            t.request_data(cid, w, len);
        }
    }

    fn alloc_slot(&mut self, cid: u16, sqe: Sqe) -> usize {
        let i = match self.free.pop() {
            Some(i) => usize::from(i),
            None => {
                self.slots.push(Slot {
                    state: SlotState::Free,
                    cid: 0,
                    sqe,
                    buf: None,
                    len: 0,
                    got: 0,
                    pending: 0,
                    status: Status::SUCCESS,
                    compare: None,
                    flush_nsid: None,
                });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[i];
        s.state = SlotState::Exec;
        s.cid = cid;
        s.sqe = sqe;
        s.len = 0;
        s.got = 0;
        s.pending = 0;
        s.status = Status::SUCCESS;
        s.flush_nsid = None;
        self.active += 1;
        self.mark_cid(cid, true);
        i
    }

    /// Takes a new command, with its in-capsule data (`icd`, `icd_len` bytes) if it carried
    /// any: checks it, then runs it or asks the host for its data.
    pub fn command<T: Transport>(
        &mut self,
        t: &mut T,
        sqe: Sqe,
        icd: Option<AlignedBuf>,
        icd_len: usize,
    ) {
        let cid = sqe.cid();
        self.advance_sqhd();
        if self.cid_in_use(cid) {
            return self.refuse_command(t, cid, None, icd, Status::COMMAND_ID_CONFLICT);
        }
        let active = self.active;
        if active >= usize::from(self.sqsize) {
            // More commands outstanding than the queue has entries: the host ignores SQ flow
            // control. End the connection rather than grow without bound.
            if let Some(b) = icd {
                t.release_buf(b);
            }
            tracing::warn!(peer = %self.peer, active, "host overflows its submission queue");
            t.sequence_error();
            self.close("submission queue overflow");
            return;
        }
        let is_connect = sqe.fabrics_type() == Some(FabricsType::Connect);
        if self.bound.is_none() != is_connect || (is_connect && active > 0) {
            // Nothing but Connect before Connect, no second Connect, and not a second one
            // while the first still waits for its data (each would bind a controller).
            return self.refuse_command(t, cid, None, icd, Status::COMMAND_SEQUENCE_ERROR);
        }
        if let Some(status) = self.check_before_data(&sqe) {
            return self.refuse_command(t, cid, None, icd, status);
        }
        let mut want = self.data_in_len(&sqe);
        let i = self.alloc_slot(cid, sqe);
        let sgl: SglDescriptor = sqe.sgl1();
        let sgl_len = self.sgl_len(&sqe);
        // Dataset Management may describe a larger buffer than its NR ranges need (Linux sends
        // a whole page of ranges): take the buffer and use the first NR ranges.
        if self.is_io_queue()
            && sqe.io_opcode() == Some(IoOpcode::DatasetManagement)
            && sgl_len >= want
            && sgl_len <= 256 * DsmRange::LEN
        {
            want = sgl_len;
        }
        if want == 0 {
            if let Some(b) = icd {
                t.release_buf(b);
            }
            self.execute(t, i);
            return;
        }
        if want > MAX_TRANSFER || sgl_len != want {
            tracing::debug!(peer = %self.peer, opc = sqe.opc(), want, sgl_len, icd_len,
                "data length does not match the command");
            return self.refuse_command(t, cid, Some(i), icd, Status::DATA_SGL_LENGTH_INVALID);
        }
        self.slots[i].len = want;
        if icd_len > 0 {
            // In-capsule data: SGL Data Block with an offset address (NVMe/TCP §3.3.3.1).
            if sgl.sgl_type != sgl_type::DATA_BLOCK
                || sgl.subtype != sgl_subtype::OFFSET
                || icd_len != want
                || sgl.address != 0
            {
                let status = Status::SGL_DESCRIPTOR_TYPE_INVALID;
                return self.refuse_command(t, cid, Some(i), icd, status);
            }
            self.slots[i].buf = icd;
            self.slots[i].got = want;
            self.execute(t, i);
            return;
        }
        if !self.is_transport_sgl(&sqe) {
            let status = Status::SGL_DESCRIPTOR_TYPE_INVALID;
            return self.refuse_command(t, cid, Some(i), None, status);
        }
        // Ask for the data, all of it in one transfer, once the budget has room.
        self.slots[i].state = SlotState::AwaitBudget;
        self.await_budget.push_back(i as u16);
        self.grant_data(t);
    }

    /// Checks that transfer `ttag` of command `cid` waits for `len` bytes at `offset` (the next
    /// bytes it expects, inside its length), before any of them is taken.
    pub fn check_transfer(
        &self,
        ttag: u16,
        cid: u16,
        offset: usize,
        len: usize,
    ) -> Result<(), DataError> {
        let s = self
            .slots
            .get(ttag as usize)
            .filter(|s| s.state == SlotState::AwaitData && s.cid == cid)
            .ok_or(DataError::NoTransfer)?;
        if offset != s.got || offset + len > s.len {
            return Err(DataError::OutOfRange);
        }
        Ok(())
    }

    /// The part of transfer `ttag`'s buffer still to be filled (from the bytes received so
    /// far to its end), for a transport that receives into it directly; then
    /// [`advance_transfer`](Self::advance_transfer). `None` if the transfer does not wait for
    /// data.
    pub fn transfer_buf(&mut self, ttag: u16, cid: u16) -> Option<&mut [u8]> {
        let s = self
            .slots
            .get_mut(ttag as usize)
            .filter(|s| s.state == SlotState::AwaitData && s.cid == cid)?;
        let (got, len) = (s.got, s.len);
        Some(&mut s.buf.as_mut()?.as_mut_slice()[got..len])
    }

    /// Records that `n` more bytes of transfer `ttag` are in its buffer; returns whether it is
    /// complete, after which the transport calls [`data_received`](Self::data_received).
    pub fn advance_transfer(&mut self, ttag: u16, n: usize) -> bool {
        let s = &mut self.slots[ttag as usize];
        debug_assert!(s.state == SlotState::AwaitData && s.got + n <= s.len);
        s.got += n;
        s.got == s.len
    }

    /// Stores `data` at `offset` of transfer `ttag` (command `cid`): [`check_transfer`], a
    /// copy into [`transfer_buf`], [`advance_transfer`].
    ///
    /// [`check_transfer`]: Self::check_transfer
    /// [`transfer_buf`]: Self::transfer_buf
    /// [`advance_transfer`]: Self::advance_transfer
    pub fn receive_data(
        &mut self,
        ttag: u16,
        cid: u16,
        offset: usize,
        data: &[u8],
    ) -> Result<bool, DataError> {
        self.check_transfer(ttag, cid, offset, data.len())?;
        let dst = self.transfer_buf(ttag, cid).ok_or(DataError::NoTransfer)?;
        dst[..data.len()].copy_from_slice(data);
        Ok(self.advance_transfer(ttag, data.len()))
    }

    /// All of transfer `ttag`'s data arrived: the command runs.
    pub fn data_received<T: Transport>(&mut self, t: &mut T, ttag: u16) {
        let i = ttag as usize;
        debug_assert!(self.slots[i].got == self.slots[i].len);
        let poisoned = self.slots[i].status;
        if !poisoned.is_success() {
            // See `poison_transfer`: the data is in, and it is not to be trusted.
            return self.complete_slot(t, i, poisoned, 0, 0);
        }
        self.slots[i].state = SlotState::Exec;
        self.await_bytes -= self.slots[i].len;
        self.execute(t, i);
        self.grant_data(t);
    }

    /// Ends command `cid` before it runs: its in-capsule data goes back to the pool, the slot it
    /// took (if any) is freed, and the host gets `status`.
    fn refuse_command<T: Transport>(
        &mut self,
        t: &mut T,
        cid: u16,
        slot: Option<usize>,
        icd: Option<AlignedBuf>,
        status: Status,
    ) {
        if let Some(b) = icd {
            t.release_buf(b);
        }
        if let Some(i) = slot {
            self.free_slot(t, i);
        }
        self.send_cqe(t, Cqe::new(cid, status));
    }

    pub(crate) fn complete_slot<T: Transport>(
        &mut self,
        t: &mut T,
        i: usize,
        status: Status,
        dw0: u32,
        dw1: u32,
    ) {
        let cid = self.slots[i].cid;
        self.free_slot(t, i);
        self.send_cqe(
            t,
            Cqe {
                dw0,
                dw1,
                sqhd: 0,
                sqid: 0,
                cid,
                status,
                phase: false,
            },
        );
    }

    fn execute<T: Transport>(&mut self, t: &mut T, i: usize) {
        let sqe = self.slots[i].sqe;
        let opc = sqe.admin_opcode();
        if opc == Some(AdminOpcode::Fabrics) {
            return self.fabrics(t, i, sqe);
        }
        let Some(b) = &self.bound else {
            return self.complete_slot(t, i, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
        };
        if b.qid != 0 {
            return self.io_command(t, i, sqe);
        }
        let ctrl = b.ctrl.clone();
        let cc_en = crate::spec::fabrics::Cc::from_u32(ctrl.cc.load(Ordering::Acquire)).en;
        if !cc_en && opc != Some(AdminOpcode::KeepAlive) {
            return self.complete_slot(t, i, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
        }
        match admin::execute(&ctrl, &self.target, &sqe) {
            AdminOutcome::Done {
                status,
                dw0,
                dw1,
                data,
            } => {
                if let Some(d) = data
                    && status.is_success()
                {
                    let n = d.len().min(self.sgl_len(&sqe));
                    if n > 0 {
                        t.send_data(sqe.cid(), &d[..n]);
                    }
                }
                self.complete_slot(t, i, status, dw0, dw1);
            }
            AdminOutcome::Aer => {
                let cid = sqe.cid();
                self.free_slot(t, i);
                if self.aers.len() >= AER_SLOTS {
                    let status = Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED;
                    self.send_cqe(t, Cqe::new(cid, status));
                } else {
                    self.aers.push(cid);
                }
            }
        }
    }

    fn fabrics<T: Transport>(&mut self, t: &mut T, i: usize, sqe: Sqe) {
        match sqe.fabrics_type() {
            Some(FabricsType::Connect) => self.connect(t, i, sqe),
            Some(ft @ (FabricsType::PropertyGet | FabricsType::PropertySet))
                if self.bound.as_ref().is_some_and(|b| b.qid == 0) =>
            {
                let ctrl = self.bound.as_ref().expect("admin queue").ctrl.clone();
                let out = if ft == FabricsType::PropertyGet {
                    admin::property_get(&ctrl, &sqe)
                } else {
                    admin::property_set(&ctrl, &sqe)
                };
                if let AdminOutcome::Done {
                    status, dw0, dw1, ..
                } = out
                {
                    self.complete_slot(t, i, status, dw0, dw1);
                }
            }
            Some(FabricsType::Disconnect) => {
                self.complete_slot(t, i, Status::SUCCESS, 0, 0);
                self.close("Disconnect");
            }
            _ => self.complete_slot(t, i, Status::INVALID_FIELD, 0, 0),
        }
    }

    fn deliver_events<T: Transport>(&mut self, t: &mut T) {
        let Some(b) = &self.bound else { return };
        if b.qid != 0 || self.aers.is_empty() {
            return;
        }
        let ctrl = b.ctrl.clone();
        while !self.aers.is_empty() {
            let Some(ev) = ctrl.take_event() else { break };
            let cid = self.aers.remove(0);
            self.send_cqe(t, Cqe::with_dw0(cid, Status::SUCCESS, ev.to_dw0()));
        }
    }

    /// Whether this is a connected I/O queue.
    pub(crate) fn is_io_queue(&self) -> bool {
        self.bound.as_ref().is_some_and(|b| b.qid != 0)
    }
}

impl Drop for NvmeQueue {
    fn drop(&mut self) {
        self.remove_controller();
    }
}
