//! The NVMe/RDMA engine: one RDMA reliable-connected queue pair carrying one NVMe queue, host
//! side (NVMe-oF 1.1 §7.3), on the target's rdma-core shim ([`crate::transport::rdma`]'s
//! `ffi`, `verbs`, `regpool` and [`wire`]).
//!
//! Connect: an RDMA CM id on an event channel of its own resolves the controller's address
//! and route, the queue pair and its memory regions are created, every receive buffer is
//! posted, and the CM connect carries the NVMe/RDMA private data (RECFMT 0, QID, HRQSIZE =
//! the receive buffers, HSQSIZE = the SQ size, 0's based). A reject's private data names the
//! field the controller refused ([`reject_reason`]); the accept's carries CRQSIZE, which
//! bounds the commands in flight.
//!
//! Per command (the CID is the slot index, as on NVMe/TCP):
//!
//! - the SQE (and in-capsule data: writes up to the controller's IOCCSZ, I/O queues only) is
//!   written into the slot's capsule buffer, one registered region for all slots, and sent by
//!   one SEND;
//! - other data is named by a Keyed SGL Data Block: the caller's memory when it lies in a
//!   range registered with [`super::IoQueue::register_memory`] (no copy; a vector, or a list
//!   of one segment), else a buffer of the queue's registered pool ([`RegPool`]: registered
//!   once, lent again) that write data is copied into and read data out of. The controller
//!   moves the data by RDMA READ / WRITE; nothing is registered per command;
//! - the response (a CQE) lands in one of the pre-posted receive buffers, which is posted
//!   again at once. A command completes when both its response and its SEND's completion are
//!   in (the capsule buffer is free again only then).
//!
//! Completions come from a completion channel: [`Engine::arm`] asks for a notification, and
//! [`Engine::wait`] sleeps in `poll(2)` on it (and on the CM channel, so a disconnect wakes
//! it): an idle queue costs no CPU. A failed work request, a response for a CID not in flight
//! or a disconnect tears the queue down: the queue pair goes first (the controller can no
//! longer reach any buffer), then every command in flight completes with Host Pathing Error
//! and its buffer.
//!
//! Keys are not invalidated per command (no memory windows or fast registration): a
//! controller keeps access to the registered memory it was once told about until the queue
//! goes. The queue trusts its controller that far, as with any registered buffer pool.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use ferroblk_bdev::{AlignedBuf, bufpool};

use super::error::{Error, RejectReason};
use super::queue::{
    CmdData, Completion, Engine, QueueParams, QueueStats, Xfer, lost_cqe, poll_fds, transfer_len,
};
use crate::spec::command::{KeyedSglDescriptor, SglDescriptor, Sqe, sgl_subtype};
use crate::spec::completion::Cqe;
use crate::transport::rdma::ffi;
use crate::transport::rdma::regpool::RegPool;
use crate::transport::rdma::verbs::{QpObjects, Region};
use crate::transport::rdma::wire::{self, CmRequest, RejectStatus};

/// Most in-capsule data a command capsule carries, whatever the controller's IOCCSZ allows.
const MAX_IN_CAPSULE: usize = 16 * 1024;
/// RDMA READs the controller may have outstanding against this queue (host write data); the
/// shim lowers it to what the device allows (`max_qp_rd_atom`).
const RESPONDER_RESOURCES: u8 = 16;
/// Empty steps between looks at the CM channel (a disconnect also wakes `wait`).
const CM_CHECK_EVERY: u32 = 1024;

const KIND_SHIFT: u32 = 60;
const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;

/// Why the controller refused a connect, from the REJECTED event's private data and status.
pub(crate) fn reject_reason(private_data: &[u8], status: i32) -> String {
    match RejectStatus::from_private_data(private_data) {
        Some(s) => format!(
            "the controller rejected the connect: invalid {} (NVMe/RDMA reject status {})",
            s.field(),
            s as u16
        ),
        None => format!(
            "the connect was rejected (RDMA CM status {status}, no NVMe/RDMA reject data: no \
             NVMe/RDMA controller listens there?)"
        ),
    }
}

/// One command slot.
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    internal: bool,
    tag: u64,
    opcode: u8,
    /// Read data to copy from `bounce` into the caller's data at completion.
    copy_out: bool,
    len: usize,
    data: Option<CmdData>,
    /// The queue's registered buffer standing in for the caller's memory.
    bounce: Option<AlignedBuf>,
    /// The SEND of the capsule completed.
    sent: bool,
    /// The response, once in (held until `sent`).
    cqe: Option<Cqe>,
}

/// The command slots and what completes them: transport bookkeeping without a device, so the
/// protocol checks are unit-tested.
#[derive(Debug)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: usize,
}

impl Slots {
    fn new(depth: u16) -> Slots {
        Slots {
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..depth).rev().collect(),
            in_flight: 0,
        }
    }

    /// Keeps at most `n` commands in flight (the controller's CRQSIZE).
    fn limit(&mut self, n: usize) {
        self.free.retain(|&c| usize::from(c) < n);
    }

    /// The SEND of `cid`'s capsule completed: `true` if the command is complete.
    fn on_send(&mut self, cid: u16) -> Result<bool, Error> {
        match self.slots.get_mut(usize::from(cid)) {
            Some(s) if s.busy && !s.sent => {
                s.sent = true;
                Ok(s.cqe.is_some())
            }
            _ => Err(Error::Violation("a SEND completion for no command")),
        }
    }

    /// A response arrived: `true` if its command is complete.
    fn on_response(&mut self, cqe: Cqe) -> Result<bool, Error> {
        match self.slots.get_mut(usize::from(cqe.cid)) {
            Some(s) if s.busy && s.cqe.is_none() => {
                s.cqe = Some(cqe);
                Ok(s.sent)
            }
            _ => Err(Error::Violation(
                "a completion for a command identifier not in flight",
            )),
        }
    }
}

/// A range of caller memory registered for remote access.
#[derive(Debug)]
struct UserReg {
    start: usize,
    end: usize,
    mr: *mut ffi::Mr,
    rkey: u32,
}

/// One queue pair, one queue. See the module documentation.
pub(crate) struct RdmaQueue {
    obj: QpObjects,
    params: QueueParams,
    /// Bytes of one capsule buffer (SQE + in-capsule data).
    cap_len: usize,
    /// Receive buffers posted (HRQSIZE).
    nrecv: usize,
    slots: Slots,
    done: Vec<Completion>,
    user: Vec<UserReg>,
    cc_fd: RawFd,
    ch_fd: RawFd,
    armed: bool,
    cm_pending: bool,
    empty_steps: u32,
    dead: bool,
    stats: QueueStats,
}

// SAFETY: the verbs and CM objects behind the raw pointers are not tied to a thread (rdma-core
// locks what it shares); the queue is used by one thread at a time (`&mut self` for
// everything that touches them, or a mutex around the admin queue).
unsafe impl Send for RdmaQueue {}

impl std::fmt::Debug for RdmaQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaQueue")
            .field("qid", &self.params.qid)
            .field("depth", &self.params.depth)
            .field("in_flight", &self.slots.in_flight)
            .field("dead", &self.dead)
            .finish()
    }
}

/// Waits for the next CM event on `ch` until `deadline`: `want`, or an error naming what came.
fn wait_event(
    ch: *mut ffi::EventChannel,
    ch_fd: RawFd,
    want: u32,
    deadline: Instant,
) -> Result<ffi::CmEvent, Error> {
    loop {
        // SAFETY: a zeroed plain C struct the shim fills.
        let mut ev: ffi::CmEvent = unsafe { std::mem::zeroed() };
        // SAFETY: the channel is live; `ev` is a valid out-pointer.
        let rc = unsafe { ffi::fb_get_event(ch, &mut ev) };
        if rc == 0 {
            if ev.event == want {
                return Ok(ev);
            }
            if ev.event == ffi::event::REJECTED {
                let n = usize::from(ev.private_data_len).min(ev.private_data.len());
                return Err(Error::Rdma(reject_reason(&ev.private_data[..n], ev.status)));
            }
            return Err(Error::Rdma(format!(
                "{} (status {}) while waiting for {}",
                ffi::event_name(ev.event),
                ev.status,
                ffi::event_name(want)
            )));
        }
        if rc != libc::EAGAIN {
            return Err(Error::Io(std::io::Error::from_raw_os_error(rc)));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout("the RDMA connection manager"));
        }
        poll_fds(&[(ch_fd, libc::POLLIN)], Some(deadline - now))?;
    }
}

impl RdmaQueue {
    /// Connects a queue pair to the NVMe/RDMA controller at `addr` (see the module
    /// documentation). No NVMe command has been sent yet: the caller sends Connect next.
    pub(crate) fn connect(
        addr: std::net::SocketAddr,
        mut params: QueueParams,
        timeout: Duration,
    ) -> Result<RdmaQueue, Error> {
        let deadline = Instant::now() + timeout;
        let ms = |d: Instant| {
            d.saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, i32::MAX as u128) as i32
        };
        let io = |rc: i32| Error::Io(std::io::Error::from_raw_os_error(rc));
        params.max_data = params.max_data.min(bufpool::MAX_POOLED);
        params.max_in_capsule = params.max_in_capsule.min(MAX_IN_CAPSULE);
        let depth = usize::from(params.depth);
        let nrecv = depth + 1;
        let mut obj = QpObjects {
            ch: std::ptr::null_mut(),
            id: std::ptr::null_mut(),
            qp: std::ptr::null_mut(),
            regions: Vec::new(),
            pool: RegPool::new(depth + 8, true),
            foreign: Vec::new(),
        };
        let mut ch_fd = -1;
        // SAFETY: out-pointers to locals / fields.
        let rc = unsafe { ffi::fb_channel_create(&mut obj.ch, &mut ch_fd) };
        if rc != 0 {
            return Err(io(rc));
        }
        // SAFETY: the channel is live; an out-pointer to a field.
        let rc = unsafe { ffi::fb_create_id(obj.ch, &mut obj.id) };
        if rc != 0 {
            return Err(Error::Rdma(format!(
                "no RDMA connection manager id (is there an RDMA device?): {}",
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        let host = CString::new(addr.ip().to_string()).expect("no NUL in an address");
        let port = CString::new(addr.port().to_string()).expect("no NUL in a port");
        // SAFETY: the id is live; the strings are NUL-terminated and outlive the call.
        let rc =
            unsafe { ffi::fb_resolve_addr(obj.id, host.as_ptr(), port.as_ptr(), ms(deadline)) };
        if rc != 0 {
            return Err(Error::Rdma(format!(
                "resolving {addr}: {}",
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        wait_event(obj.ch, ch_fd, ffi::event::ADDR_RESOLVED, deadline)
            .map_err(|e| Error::Rdma(format!("resolving {addr} to an RDMA device: {e}")))?;
        // SAFETY: the id is live and its address resolved.
        let rc = unsafe { ffi::fb_resolve_route(obj.id, ms(deadline)) };
        if rc != 0 {
            return Err(io(rc));
        }
        wait_event(obj.ch, ch_fd, ffi::event::ROUTE_RESOLVED, deadline)
            .map_err(|e| Error::Rdma(format!("route to {addr}: {e}")))?;
        let mut cc_fd = -1;
        // SAFETY: the id is live with its route; out-pointers to a field and a local. One SEND
        // per slot at most is outstanding (a slot is reused only after its SEND completed).
        let rc = unsafe {
            ffi::fb_qp_create(
                obj.id,
                (depth + 1) as u32,
                nrecv as u32,
                0,
                &mut obj.qp,
                &mut cc_fd,
            )
        };
        if rc != 0 {
            return Err(io(rc));
        }
        let cap_len = Sqe::LEN + params.max_in_capsule;
        obj.regions.push(Region::new(obj.qp, depth * cap_len)?);
        obj.regions.push(Region::new(obj.qp, nrecv * Cqe::LEN)?);
        let mut q = RdmaQueue {
            obj,
            params,
            cap_len,
            nrecv,
            slots: Slots::new(params.depth),
            done: Vec::with_capacity(depth),
            user: Vec::new(),
            cc_fd,
            ch_fd,
            armed: false,
            cm_pending: false,
            empty_steps: 0,
            dead: false,
            stats: QueueStats::default(),
        };
        for i in 0..nrecv {
            q.post_recv(i)?;
        }
        let pd = CmRequest {
            qid: params.qid,
            hrqsize: nrecv as u16,
            hsqsize: params.depth,
        }
        .to_bytes();
        // SAFETY: the QP is live; rdma_connect copies the private data.
        let rc = unsafe {
            ffi::fb_connect(
                q.obj.qp,
                pd.as_ptr().cast(),
                pd.len() as u8,
                RESPONDER_RESOURCES,
                0,
            )
        };
        if rc != 0 {
            return Err(io(rc));
        }
        let ev = wait_event(q.obj.ch, ch_fd, ffi::event::ESTABLISHED, deadline)?;
        let n = usize::from(ev.private_data_len).min(ev.private_data.len());
        if let Some(crqsize) = wire::parse_reply(&ev.private_data[..n]) {
            // The controller takes at most CRQSIZE capsules at once.
            q.slots.limit(usize::from(crqsize.max(1)));
        }
        tracing::debug!(%addr, qid = params.qid, depth, "NVMe/RDMA queue connected");
        Ok(q)
    }

    fn post_recv(&mut self, i: usize) -> Result<(), Error> {
        let r = &mut self.obj.regions[1];
        // SAFETY: receive buffer `i` lies inside the registered region; the QP is live.
        let rc = unsafe {
            ffi::fb_post_recv(
                self.obj.qp,
                (KIND_RECV << KIND_SHIFT) | i as u64,
                r.buf.as_mut_ptr().add(i * Cqe::LEN).cast(),
                Cqe::LEN as u32,
                r.lkey,
            )
        };
        if rc != 0 {
            return Err(Error::Rdma(format!(
                "post receive: {}",
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        Ok(())
    }

    /// The registered caller range holding `len` bytes at `ptr`: its remote key.
    fn user_key(&self, ptr: *const u8, len: usize) -> Option<u32> {
        let a = ptr as usize;
        let i = self.user.partition_point(|r| r.start <= a);
        let r = self.user.get(i.checked_sub(1)?)?;
        (a + len <= r.end).then_some(r.rkey)
    }

    /// Where the controller moves `data` from or to: the caller's memory, or a registered
    /// buffer of the queue (filled with the write data). `None` if registration failed.
    fn data_address(
        &mut self,
        data: &CmdData,
        len: usize,
        to_ctrl: bool,
    ) -> Option<(u64, u32, Option<AlignedBuf>)> {
        let direct = match data {
            CmdData::Vec(v) => Some(v.as_ptr()),
            CmdData::Sg(sg) if sg.segments().len() == 1 => Some(sg.segments()[0].base.cast_const()),
            CmdData::Sg(_) => None,
        };
        if let Some(p) = direct
            && let Some(key) = self.user_key(p, len)
        {
            return Some((p as u64, key, None));
        }
        // SAFETY: the QP is live and the pool always registers in its protection domain.
        let mut b = unsafe { self.obj.pool.get(self.obj.qp, len) }?;
        if to_ctrl {
            match data {
                CmdData::Vec(v) => b.as_mut_slice()[..len].copy_from_slice(&v[..len]),
                CmdData::Sg(sg) => {
                    sg.copy_to_slice(0, &mut b.as_mut_slice()[..len]);
                }
            }
        }
        let key = self.obj.pool.rkey(b.as_mut_ptr())?;
        self.stats.bounced += 1;
        Some((b.as_mut_ptr() as u64, key, Some(b)))
    }

    fn release(&mut self, b: AlignedBuf) {
        if let Err(b) = self.obj.pool.put(b) {
            bufpool::put(b);
        }
    }

    /// Hands command `cid` back: read data copied out of its bounce buffer, the buffer
    /// returned to the pool.
    fn finish(&mut self, cid: u16, cqe: Cqe, lost: bool) {
        let s = &mut self.slots.slots[usize::from(cid)];
        s.busy = false;
        let mut data = s.data.take();
        let bounce = s.bounce.take();
        let (len, copy_out, tag, opcode, internal) =
            (s.len, s.copy_out, s.tag, s.opcode, s.internal);
        if let Some(b) = bounce {
            if copy_out && !lost {
                match data.as_mut() {
                    Some(CmdData::Vec(v)) => v[..len].copy_from_slice(&b.as_slice()[..len]),
                    Some(CmdData::Sg(sg)) => {
                        sg.copy_from_slice(0, &b.as_slice()[..len]);
                    }
                    None => {}
                }
            }
            self.release(b);
        }
        let (buf, sg) = match data {
            Some(CmdData::Vec(v)) => (v, Default::default()),
            Some(CmdData::Sg(l)) => (Vec::new(), l),
            None => (Vec::new(), Default::default()),
        };
        self.done.push(Completion {
            tag,
            cqe,
            buf,
            sg,
            opcode,
            internal,
            lost,
        });
        self.slots.free.push(cid);
        self.slots.in_flight -= 1;
    }

    /// Handles one work completion.
    fn completion(&mut self, wc: &ffi::WorkCompletion) -> Result<(), Error> {
        let kind = wc.wr_id >> KIND_SHIFT;
        let idx = (wc.wr_id & ((1 << KIND_SHIFT) - 1)) as usize;
        if wc.status != 0 {
            return Err(Error::Rdma(format!(
                "{} failed: {}",
                if kind == KIND_RECV {
                    "a receive"
                } else {
                    "a SEND"
                },
                ffi::wc_status(wc.status)
            )));
        }
        if kind == KIND_SEND {
            let cid = idx as u16;
            if self.slots.on_send(cid)? {
                let cqe = self.slots.slots[idx].cqe.expect("complete");
                self.finish(cid, cqe, false);
            }
            return Ok(());
        }
        if (wc.byte_len as usize) < Cqe::LEN || idx >= self.nrecv {
            return Err(Error::Violation(
                "a response shorter than a completion entry",
            ));
        }
        let mut b = [0u8; Cqe::LEN];
        b.copy_from_slice(&self.obj.regions[1].buf.as_slice()[idx * Cqe::LEN..][..Cqe::LEN]);
        let cqe = Cqe::parse(&b);
        self.post_recv(idx)?;
        if self.slots.on_response(cqe)? {
            self.finish(cqe.cid, cqe, false);
        }
        Ok(())
    }

    /// Polls the completion queue until it is empty; returns how many completions it held.
    fn poll_cq(&mut self) -> Result<usize, Error> {
        let mut total = 0;
        let mut wc = [ffi::WorkCompletion::default(); 16];
        loop {
            // SAFETY: the CQ is live (the queue pair's objects live until drop); `wc` has room
            // for 16 completions.
            let n = unsafe { ffi::fb_poll_cq(self.obj.qp, wc.len() as i32, wc.as_mut_ptr()) };
            if n < 0 {
                return Err(Error::Rdma("polling the completion queue failed".into()));
            }
            if n == 0 {
                return Ok(total);
            }
            for c in &wc[..n as usize] {
                self.completion(c)?;
            }
            total += n as usize;
        }
    }

    /// Takes pending CM events: a disconnect or device removal ends the queue.
    fn cm_events(&mut self) -> Result<(), Error> {
        loop {
            // SAFETY: a zeroed plain C struct the shim fills.
            let mut ev: ffi::CmEvent = unsafe { std::mem::zeroed() };
            // SAFETY: the channel is live; `ev` is a valid out-pointer.
            if unsafe { ffi::fb_get_event(self.obj.ch, &mut ev) } != 0 {
                return Ok(());
            }
            match ev.event {
                ffi::event::DISCONNECTED
                | ffi::event::DEVICE_REMOVAL
                | ffi::event::TIMEWAIT_EXIT
                | ffi::event::CONNECT_ERROR
                | ffi::event::UNREACHABLE => return Err(Error::Closed),
                e => tracing::debug!(event = %ffi::event_name(e), "RDMA CM event"),
            }
        }
    }

    /// Takes the completion channel's events (non-blocking).
    fn ack_events(&mut self) {
        // SAFETY: the QP's completion channel is live.
        unsafe { ffi::fb_cq_events(self.obj.qp) };
    }
}

impl Engine for RdmaQueue {
    fn params(&self) -> &QueueParams {
        &self.params
    }

    fn stats(&self) -> QueueStats {
        self.stats
    }

    fn in_flight(&self) -> usize {
        self.slots.in_flight
    }

    fn is_dead(&self) -> bool {
        self.dead
    }

    fn fd(&self) -> RawFd {
        self.cc_fd
    }

    fn abort_token(&self) -> super::queue::AbortToken {
        super::queue::AbortToken::Rdma(self.obj.id)
    }

    fn has_tx(&self) -> bool {
        // Nothing waits to be sent (capsules go out at submit), but completions found while
        // arming wait to be taken: poll now rather than sleep.
        !self.done.is_empty()
    }

    fn submit_inner(
        &mut self,
        mut sqe: Sqe,
        xfer: Xfer,
        data: CmdData,
        tag: u64,
        internal: bool,
    ) -> Result<(), (RejectReason, CmdData)> {
        let len = match transfer_len(self.dead, xfer, &data, &self.params) {
            Ok(len) => len,
            Err(reason) => return Err((reason, data)),
        };
        let Some(cid) = self.slots.free.pop() else {
            return Err((RejectReason::Full, data));
        };
        let in_capsule = xfer == Xfer::ToController && len <= self.params.max_in_capsule;
        sqe.set_cid(cid);
        let mut bounce = None;
        if in_capsule {
            // NVMe-oF 1.1 §7.3.2: in-capsule data right after the SQE, an SGL Data Block with
            // the Offset sub type.
            sqe.set_sgl1(&SglDescriptor::in_capsule(0, len as u32));
        } else {
            let (address, key, b) = if xfer == Xfer::None {
                // No data: a zero-length Keyed SGL Data Block, as the Linux host sends.
                (0, 0, None)
            } else {
                match self.data_address(&data, len, xfer == Xfer::ToController) {
                    Some(x) => x,
                    None => {
                        self.slots.free.push(cid);
                        let e = Error::Rdma("registering a data buffer failed".into());
                        tracing::warn!(qid = self.params.qid, error = %e, "NVMe/RDMA queue failed");
                        let _ = self.fail(e);
                        return Err((RejectReason::Disconnected, data));
                    }
                }
            };
            if xfer != Xfer::None {
                self.stats.keyed += 1;
            }
            sqe.set_keyed_sgl1(&KeyedSglDescriptor {
                address,
                length: len as u32,
                key,
                subtype: sgl_subtype::ADDRESS,
            });
            bounce = b;
        }
        let off = usize::from(cid) * self.cap_len;
        let cap = &mut self.obj.regions[0].buf.as_mut_slice()[off..off + self.cap_len];
        cap[..Sqe::LEN].copy_from_slice(sqe.as_bytes());
        if in_capsule {
            let dst = &mut cap[Sqe::LEN..Sqe::LEN + len];
            match &data {
                CmdData::Vec(v) => dst.copy_from_slice(&v[..len]),
                CmdData::Sg(sg) => {
                    sg.copy_to_slice(0, dst);
                }
            }
            self.stats.in_capsule += 1;
        }
        let r = &mut self.obj.regions[0];
        // SAFETY: the capsule lies inside the registered region and stays untouched until the
        // SEND completes (the slot is busy until then); the QP is live (not dead).
        let rc = unsafe {
            ffi::fb_post_send(
                self.obj.qp,
                (KIND_SEND << KIND_SHIFT) | u64::from(cid),
                r.buf.as_mut_ptr().add(off).cast(),
                (Sqe::LEN + if in_capsule { len } else { 0 }) as u32,
                r.lkey,
            )
        };
        if rc != 0 {
            self.slots.free.push(cid);
            if let Some(b) = bounce {
                self.release(b);
            }
            let e = Error::Rdma(format!(
                "post SEND: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
            tracing::warn!(qid = self.params.qid, error = %e, "NVMe/RDMA queue failed");
            let _ = self.fail(e);
            return Err((RejectReason::Disconnected, data));
        }
        self.slots.slots[usize::from(cid)] = Slot {
            busy: true,
            internal,
            tag,
            opcode: sqe.opc(),
            copy_out: xfer == Xfer::FromController && bounce.is_some(),
            len,
            data: Some(data),
            bounce,
            sent: false,
            cqe: None,
        };
        self.slots.in_flight += 1;
        self.stats.commands += 1;
        Ok(())
    }

    fn step(&mut self) -> Result<(), Error> {
        if self.dead {
            return Err(Error::Disconnected);
        }
        let r = self.poll_cq().and_then(|n| {
            if n > 0 {
                if self.armed {
                    // The notification fired for these: take it, re-arm before sleeping.
                    self.ack_events();
                    self.armed = false;
                }
                self.empty_steps = 0;
            } else {
                self.empty_steps = self.empty_steps.wrapping_add(1);
            }
            if self.cm_pending || self.empty_steps % CM_CHECK_EVERY == CM_CHECK_EVERY - 1 {
                self.cm_pending = false;
                self.cm_events()?;
            }
            Ok(())
        });
        r.map_err(|e| self.fail(e))
    }

    fn done(&mut self) -> &mut Vec<Completion> {
        &mut self.done
    }

    fn arm(&mut self) -> bool {
        if self.dead || self.armed {
            return false;
        }
        // A notification that fired after the last step (for completions already taken).
        self.ack_events();
        // SAFETY: the QP's CQ is live.
        unsafe { ffi::fb_req_notify(self.obj.qp) };
        self.armed = true;
        // A completion that arrived before the request raises no notification: look again.
        match self.poll_cq() {
            Ok(0) => false,
            Ok(_) => {
                self.ack_events();
                self.armed = false;
                true
            }
            Err(e) => {
                let _ = self.fail(e);
                true
            }
        }
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        if self.dead {
            return Err(Error::Disconnected);
        }
        if self.arm() {
            return Ok(());
        }
        let ready = poll_fds(
            &[(self.cc_fd, libc::POLLIN), (self.ch_fd, libc::POLLIN)],
            timeout,
        )?;
        if ready & 2 != 0 {
            self.cm_pending = true;
        }
        Ok(())
    }

    fn fail(&mut self, e: Error) -> Error {
        if self.dead {
            return e;
        }
        self.dead = true;
        // SAFETY: the id and QP are live. Disconnecting moves the QP to the error state: it
        // takes no more of the controller's RDMA READs and WRITEs of our memory, before the
        // buffers go back to the caller. It is destroyed only when the queue is dropped: the
        // control thread may disconnect it too meanwhile (`AbortToken`), which reads the id's
        // QP, so it must not be freed under it.
        unsafe { ffi::fb_disconnect(self.obj.id) };
        for i in 0..self.slots.slots.len() {
            if self.slots.slots[i].busy {
                let cqe = lost_cqe(i as u16, self.params.qid);
                self.finish(i as u16, cqe, true);
            }
        }
        e
    }

    unsafe fn register(&mut self, ptr: *const u8, len: usize) -> Result<(), Error> {
        if self.dead {
            return Err(Error::Disconnected);
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the QP is live; the caller keeps the memory allocated while registered.
        let mr = unsafe { ffi::fb_reg_mr_remote(self.obj.qp, ptr.cast_mut().cast(), len) };
        if mr.is_null() {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: a live region just registered.
        let rkey = unsafe { ffi::fb_mr_rkey(mr) };
        let start = ptr as usize;
        let i = self.user.partition_point(|r| r.start <= start);
        self.user.insert(
            i,
            UserReg {
                start,
                end: start + len,
                mr,
                rkey,
            },
        );
        Ok(())
    }

    fn deregister_all(&mut self) {
        if self.slots.in_flight > 0 {
            // In use: they go with the queue.
            self.obj.foreign.extend(self.user.drain(..).map(|r| r.mr));
            return;
        }
        for r in self.user.drain(..) {
            // SAFETY: no command in flight uses the region.
            unsafe { ffi::fb_dereg_mr(r.mr) };
        }
    }
}

impl Drop for RdmaQueue {
    fn drop(&mut self) {
        if !self.dead {
            // SAFETY: the id is live; the objects are freed by `obj` after this.
            unsafe { ffi::fb_disconnect(self.obj.id) };
        }
        // Deregistered after the QP is destroyed and before the protection domain goes.
        self.obj.foreign.extend(self.user.drain(..).map(|r| r.mr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Status;

    fn busy(s: &mut Slots, cid: u16) {
        s.free.retain(|&c| c != cid);
        s.slots[usize::from(cid)].busy = true;
        s.in_flight += 1;
    }

    #[test]
    fn a_command_completes_when_both_its_send_and_its_response_are_in() {
        let mut s = Slots::new(4);
        busy(&mut s, 1);
        busy(&mut s, 2);
        // SEND first, then the response.
        assert!(!s.on_send(1).unwrap());
        assert!(s.on_response(Cqe::new(1, Status::SUCCESS)).unwrap());
        // The response can overtake the SEND's completion.
        assert!(!s.on_response(Cqe::new(2, Status::SUCCESS)).unwrap());
        assert!(s.on_send(2).unwrap());
    }

    #[test]
    fn a_response_for_an_unknown_cid_is_a_violation() {
        let mut s = Slots::new(4);
        busy(&mut s, 0);
        // Free slot, out of range, and a second response for the same command.
        for cid in [3, 4, 0xffff] {
            assert!(matches!(
                s.on_response(Cqe::new(cid, Status::SUCCESS)),
                Err(Error::Violation(_))
            ));
        }
        assert!(!s.on_response(Cqe::new(0, Status::SUCCESS)).unwrap());
        assert!(matches!(
            s.on_response(Cqe::new(0, Status::SUCCESS)),
            Err(Error::Violation(_))
        ));
        assert!(matches!(s.on_send(3), Err(Error::Violation(_))));
    }

    #[test]
    fn crqsize_bounds_the_commands_in_flight() {
        let mut s = Slots::new(8);
        s.limit(3);
        let mut cids: Vec<u16> = s.free.clone();
        cids.sort();
        assert_eq!(cids, [0, 1, 2]);
    }

    #[test]
    fn a_rejected_connect_names_the_refused_field() {
        let r = reject_reason(&RejectStatus::InvalidHsqsize.private_data(), 28);
        assert!(r.contains("invalid HSQSIZE"), "{r}");
        assert!(r.contains("status 4"), "{r}");
        let r = reject_reason(&[], 28);
        assert!(r.contains("no NVMe/RDMA reject data"), "{r}");
    }
}
