//! One NVMe/TCP connection = one NVMe queue, served by one reactor (NVMe/TCP transport 1.0 §3).
//!
//! The poller reads the socket when io_uring reports it readable, decodes PDUs with
//! [`PduDecoder`], turns commands into bdev requests on its own channels, and writes responses
//! (C2HData, R2T, CapsuleResp) into a send buffer flushed without blocking. Any protocol
//! violation the codec reports ends the connection with a C2HTermReq; command-level errors
//! complete the command with an NVMe status. Nothing a host sends can stop other connections.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ferroblk_bdev::reactor::{Poller, ReactorHandle};
use ferroblk_bdev::uring::{RingClient, ThreadRing};
use ferroblk_bdev::{AlignedBuf, Caps, Channel, IoCompletion, IoRequest, IoType, SgList, Wake};
use io_uring::{opcode, types};

use super::admission::{Stage, Ticket};
use super::pdu::{
    C2hData, Decoded, IcResp, MAX_HEADER_LEN, Negotiated, PduDecoder, PduEncoder, PduError,
    PduHeader, R2t, Role,
};
use crate::spec::command::{
    AdminOpcode, DatasetManagement, DsmRange, IoOpcode, ReadWrite, SglDescriptor, Sqe, WriteZeroes,
    sgl_subtype, sgl_type,
};
use crate::spec::fabrics::{ConnectCommand, ConnectData, ConnectResponse, FabricsType};
use crate::spec::{Cqe, Status, to_nvme_status};
use crate::subsystem::admin::{
    self, AER_SLOTS, AdminOutcome, IN_CAPSULE_DATA, MAX_TRANSFER, QUEUE_ENTRIES,
};
use crate::subsystem::{Controller, Namespace, Target};

/// Most data bytes per H2CData PDU the target accepts (MAXH2CDATA).
pub const MAX_H2C_DATA: u32 = 128 * 1024;
const RX_CAPACITY: usize = 256 * 1024;
/// Receive buffer of a connection that has not completed Connect: room for an ICReq and a
/// Connect capsule with its data. A larger PDU grows it, within the decoder's limits.
const RX_HANDSHAKE: usize = 2048;
/// Send buffer reserved once Connect succeeds.
const TX_CAPACITY: usize = 64 * 1024;
/// Pending response bytes above which the connection stops reading new commands.
const TX_HIGH_WATER: usize = 8 << 20;
const POLL_READ: u32 = 0;
const POLL_WRITE: u32 = 1;

/// A bounded free list of aligned buffers by power-of-two size class (4 KiB .. 1 MiB).
struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
}

impl BufPool {
    fn new() -> BufPool {
        BufPool {
            classes: (0..=8).map(|_| Vec::new()).collect(),
        }
    }

    fn class(len: usize) -> usize {
        (len.max(4096).next_power_of_two().trailing_zeros() - 12) as usize
    }

    fn get(&mut self, len: usize) -> AlignedBuf {
        let c = Self::class(len);
        self.classes[c]
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(4096 << c))
    }

    fn put(&mut self, b: AlignedBuf) {
        let c = Self::class(b.len());
        if c < self.classes.len() && self.classes[c].len() < 256 && b.len() == 4096 << c {
            self.classes[c].push(b);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// R2T sent; H2CData expected.
    AwaitData,
    /// Bdev requests in flight.
    Exec,
}

struct Slot {
    state: SlotState,
    cid: u16,
    sqe: Sqe,
    /// Command data (host-to-controller, or read into for controller-to-host).
    buf: Option<AlignedBuf>,
    /// Data length of the command.
    len: usize,
    /// H2C bytes received so far.
    got: usize,
    /// Bdev requests still in flight.
    pending: u32,
    /// First error status seen.
    status: Status,
    /// Data the host sent with a Compare, kept to check against the read.
    compare: Option<AlignedBuf>,
    /// A FUA write: flush this namespace after the write completes.
    flush_nsid: Option<u32>,
}

struct NsChan {
    ns: Arc<Namespace>,
    ch: Channel,
    /// The namespace left the subsystem (or was replaced): the channel stays only until the
    /// commands already accepted for it are done; new commands are refused.
    draining: bool,
}

struct Queue {
    qid: u16,
    ctrl: Arc<Controller>,
    ns: Vec<Option<NsChan>>,
    ns_gen: u64,
}

/// One C2HData PDU's data, sent from the read's buffer.
struct TxData {
    /// The position in `TcpConn::tx` after which it goes (its PDU header ends there).
    at: usize,
    /// The data: `len` bytes inside the buffer held by this part or, for all but the last part
    /// of a transfer, by a later part of the same transfer (FIFO: it outlives this one).
    ptr: *const u8,
    len: usize,
    sent: usize,
    /// The buffer, on the transfer's last part; back to the pool once that part is sent.
    buf: Option<AlignedBuf>,
}

/// iovecs one `sendmsg` takes at most.
const TX_IOVECS: usize = 64;

/// The poller of one connection.
pub struct TcpConn {
    target: Arc<Target>,
    reactor: ReactorHandle,
    /// The socket and the handshake stage, shared with the listener's admission gate.
    ticket: Arc<Ticket>,
    /// When ICReq, then Connect, must have arrived; `None` once Connect succeeded.
    handshake_deadline: Option<Instant>,
    client: RingClient,
    readable: bool,
    write_armed: bool,
    rx: Vec<u8>,
    /// The send stream's own bytes (PDU headers, digests, small payloads); sent from `tx_off`.
    tx: Vec<u8>,
    tx_off: usize,
    /// Read data sent straight from the read's buffer (no copy into `tx`), each part between
    /// `tx[..at]` and `tx[at..]` for its `at`, in order.
    tx_data: VecDeque<TxData>,
    /// Bytes of `tx_data` not yet sent.
    tx_data_bytes: usize,
    decoder: PduDecoder,
    encoder: PduEncoder,
    established: bool,
    queue: Option<Queue>,
    slots: Vec<Slot>,
    done: Vec<IoCompletion>,
    retry: VecDeque<(u32, IoRequest)>,
    pool: BufPool,
    sqhd: u16,
    sqsize: u16,
    flow_control: bool,
    aers: Vec<u16>,
    closing: bool,
    finished: bool,
    peer: String,
    scratch: [u8; MAX_HEADER_LEN],
}

impl TcpConn {
    /// Takes over an admitted connection on the calling reactor. Until Connect succeeds it
    /// holds only small buffers (a host that connects and sends nothing costs little), and is
    /// closed if ICReq or Connect misses its deadline.
    pub fn new(
        target: Arc<Target>,
        reactor: ReactorHandle,
        ticket: Arc<Ticket>,
    ) -> std::io::Result<TcpConn> {
        let sock: &TcpStream = &ticket.sock;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let ring = ThreadRing::current().map_err(std::io::Error::other)?;
        let client = ring.register(16);
        let handshake_deadline = Some(Instant::now() + ticket.admission().limits().ic_timeout);
        let c = TcpConn {
            target,
            reactor,
            ticket,
            handshake_deadline,
            client,
            readable: true,
            write_armed: false,
            rx: Vec::with_capacity(RX_HANDSHAKE),
            tx: Vec::new(),
            tx_off: 0,
            tx_data: VecDeque::new(),
            tx_data_bytes: 0,
            decoder: PduDecoder::controller(IN_CAPSULE_DATA),
            encoder: PduEncoder::new(Role::Controller),
            established: false,
            queue: None,
            slots: Vec::new(),
            done: Vec::new(),
            retry: VecDeque::new(),
            pool: BufPool::new(),
            sqhd: 0,
            sqsize: QUEUE_ENTRIES,
            flow_control: true,
            aers: Vec::new(),
            closing: false,
            finished: false,
            peer,
            scratch: [0; MAX_HEADER_LEN],
        };
        c.arm(POLL_READ, (libc::POLLIN | libc::POLLRDHUP) as u32, true);
        Ok(c)
    }

    fn arm(&self, slot: u32, events: u32, multi: bool) {
        let sqe = opcode::PollAdd::new(types::Fd(self.ticket.sock.as_raw_fd()), events)
            .multi(multi)
            .build();
        // SAFETY: a poll on the connection's socket, kept open by this poller's ticket (the
        // accept thread may hold the ticket too, never closing it); a late completion after
        // the poller is gone is discarded by the client generation check.
        unsafe { self.client.push(sqe, slot) };
        self.client.ring().flush();
    }

    fn close(&mut self, why: &str) {
        if !self.closing {
            // Connections that never identified themselves are counted and reported by the
            // listener's admission, not logged one by one.
            if self.queue.is_some() {
                tracing::info!(peer = %self.peer, reason = why, "NVMe/TCP connection closing");
            } else {
                let why = if self.ticket.evicted() {
                    "evicted for a newcomer"
                } else {
                    why
                };
                tracing::debug!(peer = %self.peer, reason = why, "NVMe/TCP connection closing");
            }
            self.closing = true;
            if let Some(q) = &self.queue
                && q.qid == 0
            {
                q.ctrl.subsystem.remove_controller(q.ctrl.cntlid);
            }
        }
    }

    // ---------------------------------------------------------------- sending

    fn push_header(&mut self, n: usize) {
        self.tx.extend_from_slice(&self.scratch[..n]);
    }

    fn send_cqe(&mut self, mut cqe: Cqe) {
        cqe.sqhd = if self.flow_control { self.sqhd } else { 0xffff };
        cqe.sqid = self.queue.as_ref().map_or(0, |q| q.qid);
        let n = self.encoder.capsule_resp(&cqe, &mut self.scratch);
        self.push_header(n);
    }

    /// Queues C2HData PDUs for the first `len` bytes of a read's buffer, sent from the buffer
    /// itself; the buffer goes back to the pool once sent.
    fn send_read_data(&mut self, cid: u16, buf: AlignedBuf, len: usize) {
        let ddgst = self.negotiated().is_some_and(|n| n.ddgst);
        let base = buf.as_slice().as_ptr();
        let mut buf = Some(buf);
        let mut off = 0;
        while off < len {
            let chunk = (len - off).min(MAX_H2C_DATA as usize);
            let last = off + chunk == len;
            self.push_c2h_header(cid, off, chunk, last);
            // SAFETY: `off + chunk <= len <= buf.len()`: inside the buffer.
            let ptr = unsafe { base.add(off) };
            let digest = ddgst.then(|| {
                // SAFETY: the chunk is inside the live buffer (`buf` is still held here).
                let part = unsafe { std::slice::from_raw_parts(ptr, chunk) };
                super::pdu::DataDigest::of(&[part])
            });
            self.tx_data.push_back(TxData {
                at: self.tx.len(),
                ptr,
                len: chunk,
                sent: 0,
                buf: if last { buf.take() } else { None },
            });
            if let Some(d) = digest {
                self.tx.extend_from_slice(&d.to_le_bytes());
            }
            self.tx_data_bytes += chunk;
            off += chunk;
        }
        if let Some(b) = buf {
            self.pool.put(b); // len == 0: nothing was queued
        }
    }

    /// Bytes queued to send.
    fn tx_pending(&self) -> usize {
        self.tx.len() - self.tx_off + self.tx_data_bytes
    }

    /// Queues the header of a C2HData PDU carrying `chunk` bytes at offset `off`.
    fn push_c2h_header(&mut self, cid: u16, off: usize, chunk: usize, last: bool) {
        let h = C2hData {
            cccid: cid,
            datao: off as u32,
            datal: chunk as u32,
            last,
            success: false,
        };
        let pdo = self.encoder.c2h_data(&h, &mut self.scratch);
        self.push_header(pdo);
    }

    fn send_data(&mut self, cid: u16, data: &[u8]) {
        let mut off = 0;
        while off < data.len() {
            let chunk = (data.len() - off).min(MAX_H2C_DATA as usize);
            let last = off + chunk == data.len();
            self.push_c2h_header(cid, off, chunk, last);
            let part = &data[off..off + chunk];
            self.tx.extend_from_slice(part);
            if self.negotiated().is_some_and(|n| n.ddgst) {
                let d = super::pdu::DataDigest::of(&[part]);
                self.tx.extend_from_slice(&d.to_le_bytes());
            }
            off += chunk;
        }
    }

    fn negotiated(&self) -> Option<Negotiated> {
        self.decoder.negotiated().copied()
    }

    fn flush_tx(&mut self) -> usize {
        let mut sent = 0;
        while self.tx_pending() > 0 {
            // The stream from where it stands: `tx` bytes up to each data part, the part, ...,
            // the rest of `tx`.
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; TX_IOVECS];
            let mut n_iov = 0;
            let mut pos = self.tx_off;
            let mut all_parts = true;
            for d in &self.tx_data {
                if n_iov + 2 > TX_IOVECS {
                    all_parts = false;
                    break;
                }
                if pos < d.at {
                    iov[n_iov] = libc::iovec {
                        iov_base: self.tx[pos..d.at].as_ptr() as *mut libc::c_void,
                        iov_len: d.at - pos,
                    };
                    n_iov += 1;
                    pos = d.at;
                }
                iov[n_iov] = libc::iovec {
                    // SAFETY: `sent < len`: inside the part, whose buffer is alive (module
                    // invariant of `TxData`).
                    iov_base: unsafe { d.ptr.add(d.sent) } as *mut libc::c_void,
                    iov_len: d.len - d.sent,
                };
                n_iov += 1;
            }
            if all_parts && n_iov < TX_IOVECS && pos < self.tx.len() {
                iov[n_iov] = libc::iovec {
                    iov_base: self.tx[pos..].as_ptr() as *mut libc::c_void,
                    iov_len: self.tx.len() - pos,
                };
                n_iov += 1;
            }
            // SAFETY: a zeroed msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n_iov as _;
            // SAFETY: every iovec points into `tx` or a live read buffer for its length; the
            // kernel copies the data before returning.
            let n = unsafe {
                libc::sendmsg(
                    self.ticket.sock.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => {
                        if !self.write_armed {
                            self.write_armed = true;
                            self.arm(POLL_WRITE, libc::POLLOUT as u32, false);
                        }
                    }
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.close("send failed");
                        self.drop_tx();
                    }
                }
                break;
            }
            self.advance_tx(n as usize);
            sent += n as usize;
        }
        sent
    }

    /// Moves the stream `n` sent bytes forward, returning finished buffers to the pool.
    fn advance_tx(&mut self, mut n: usize) {
        loop {
            let arena_end = self.tx_data.front().map_or(self.tx.len(), |d| d.at);
            let take = n.min(arena_end - self.tx_off);
            self.tx_off += take;
            n -= take;
            let Some(d) = self.tx_data.front_mut() else {
                break;
            };
            if self.tx_off < d.at {
                break;
            }
            let take = n.min(d.len - d.sent);
            d.sent += take;
            n -= take;
            self.tx_data_bytes -= take;
            if d.sent < d.len {
                break;
            }
            if let Some(d) = self.tx_data.pop_front()
                && let Some(b) = d.buf
            {
                self.pool.put(b);
            }
        }
        if self.tx_pending() == 0 {
            self.tx.clear();
            self.tx_off = 0;
        }
    }

    /// Forgets everything queued to send (the connection is closing on a send error).
    fn drop_tx(&mut self) {
        self.tx.clear();
        self.tx_off = 0;
        while let Some(d) = self.tx_data.pop_front() {
            if let Some(b) = d.buf {
                self.pool.put(b);
            }
        }
        self.tx_data_bytes = 0;
    }

    // ---------------------------------------------------------------- receiving

    fn read_socket(&mut self) -> usize {
        let mut total = 0;
        while self.readable && !self.closing {
            if self.rx.len() == self.rx.capacity() {
                break; // full: the parser must consume first
            }
            let len = self.rx.len();
            let spare = self.rx.capacity() - len;
            // SAFETY: receives into the vector's spare capacity, then sets the length to what
            // the kernel wrote.
            let n = unsafe {
                libc::recv(
                    self.ticket.sock.as_raw_fd(),
                    self.rx.as_mut_ptr().add(len).cast(),
                    spare,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => self.readable = false,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => self.close("receive failed"),
                }
                break;
            }
            if n == 0 {
                self.close("host closed the connection");
                break;
            }
            // SAFETY: the kernel initialised `n` bytes after `len`.
            unsafe { self.rx.set_len(len + n as usize) };
            total += n as usize;
        }
        total
    }

    fn parse(&mut self) -> usize {
        let mut pos = 0;
        let mut handled = 0;
        while !self.closing {
            let r = self.decoder.decode(&self.rx[pos..]);
            match r {
                Ok(Decoded::NeedMore(n)) => {
                    // A PDU larger than the handshake-sized buffer: make room for it (the
                    // decoder never asks for more than the negotiated limits allow).
                    let need = self.rx.len() - pos + n;
                    if need > self.rx.capacity() {
                        self.rx.drain(..pos);
                        pos = 0;
                        self.rx.reserve_exact(need - self.rx.len());
                    }
                    break;
                }
                Ok(Decoded::Ready(l)) => {
                    let data = (pos + l.data.start)..(pos + l.data.end);
                    let plen = l.plen;
                    self.handle_pdu(l.header, data);
                    pos += plen;
                    handled += 1;
                }
                Err(PduError::DataDigest(l)) => {
                    // Not fatal: the command fails with Transient Transport Error.
                    let cid = match l.header {
                        PduHeader::CapsuleCmd(c) => Some(c.sqe.cid()),
                        PduHeader::H2cData(h) => Some(h.cccid),
                        _ => None,
                    };
                    tracing::warn!(peer = %self.peer, "data digest mismatch");
                    match l.header {
                        // A new command: it never started; existing slots are not touched.
                        PduHeader::CapsuleCmd(_) => {
                            if let Some(cid) = cid {
                                self.advance_sqhd();
                                self.send_cqe(Cqe::new(cid, Status::TRANSIENT_TRANSPORT_ERROR));
                            }
                        }
                        // Data for an R2T: fail that command, only if it is the one waiting.
                        PduHeader::H2cData(h) => {
                            let i = h.ttag as usize;
                            if self.slots.get(i).is_some_and(|s| {
                                s.state == SlotState::AwaitData && s.cid == h.cccid
                            }) {
                                self.complete_slot(i, Status::TRANSIENT_TRANSPORT_ERROR, 0, 0);
                            }
                        }
                        _ => {}
                    }
                    pos += l.plen;
                }
                Err(PduError::Fatal(f)) => {
                    tracing::warn!(peer = %self.peer, fes = %f.fes, fei = f.fei, "fatal NVMe/TCP error");
                    let mut out = [0u8; MAX_HEADER_LEN];
                    let n = self.encoder.term_req_for(&f, &self.rx[pos..], &mut out);
                    self.tx.extend_from_slice(&out[..n]);
                    self.close("fatal protocol error");
                    break;
                }
                Err(PduError::Close) => {
                    self.close("malformed termination request");
                    break;
                }
            }
        }
        if pos > 0 {
            self.rx.drain(..pos);
        }
        handled
    }

    fn fatal(&mut self, fes: super::pdu::Fes, fei: u32) {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = self.encoder.term_req(fes, fei, &[], &mut out);
        self.tx.extend_from_slice(&out[..n]);
        self.close("fatal protocol error");
    }

    fn handle_pdu(&mut self, h: PduHeader, data: std::ops::Range<usize>) {
        match h {
            PduHeader::IcReq(req) => {
                let resp = IcResp {
                    pfv: 0,
                    cpda: 0,
                    hdgst: req.hdgst,
                    ddgst: req.ddgst,
                    maxh2cdata: MAX_H2C_DATA,
                };
                let n = self.encoder.ic_resp(&resp, &mut self.scratch);
                self.push_header(n);
                let neg = Negotiated::from_exchange(&req, &resp);
                self.decoder.establish(neg);
                self.encoder = PduEncoder::established(Role::Controller, &neg);
                self.established = true;
                // Now the Connect's deadline (NVMe-oF 1.1 §3.3: Connect is the first command).
                self.ticket.advance(Stage::Initialized);
                self.handshake_deadline =
                    Some(Instant::now() + self.ticket.admission().limits().connect_timeout);
            }
            PduHeader::H2cTermReq(t) => {
                tracing::info!(peer = %self.peer, fes = %t.fes, "host terminated the connection");
                self.close("H2CTermReq");
            }
            PduHeader::CapsuleCmd(c) => {
                let icd = data.len();
                let mut buf = None;
                if icd > 0 {
                    let mut b = self.pool.get(icd);
                    b.as_mut_slice()[..icd].copy_from_slice(&self.rx[data]);
                    buf = Some(b);
                }
                self.on_command(c.sqe, buf, icd);
            }
            PduHeader::H2cData(d) => {
                let i = d.ttag as usize;
                let ok = self
                    .slots
                    .get(i)
                    .is_some_and(|s| s.state == SlotState::AwaitData && s.cid == d.cccid);
                if !ok {
                    // An H2CData for no outstanding R2T (§3.6.2.8).
                    self.fatal(super::pdu::Fes::PDU_SEQUENCE_ERROR, 0);
                    return;
                }
                let s = &mut self.slots[i];
                let (o, l) = (d.datao as usize, d.datal as usize);
                if o != s.got || o + l > s.len {
                    self.fatal(super::pdu::Fes::DATA_TRANSFER_OUT_OF_RANGE, 0);
                    return;
                }
                let buf = s.buf.as_mut().expect("R2T slot has a buffer");
                buf.as_mut_slice()[o..o + l].copy_from_slice(&self.rx[data]);
                s.got += l;
                if s.got == s.len {
                    if !d.last {
                        self.fatal(super::pdu::Fes::PDU_SEQUENCE_ERROR, 0);
                        return;
                    }
                    s.state = SlotState::Exec;
                    self.execute(i);
                }
            }
            // PDUs only a host receives: the decoder already refuses them for a controller.
            _ => self.fatal(super::pdu::Fes::INVALID_HEADER_FIELD, 0),
        }
    }

    // ---------------------------------------------------------------- commands

    fn advance_sqhd(&mut self) {
        self.sqhd = (self.sqhd + 1) % self.sqsize.max(1);
    }

    fn find_slot(&self, cid: u16) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.state != SlotState::Free && s.cid == cid)
    }

    fn free_slot(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.state = SlotState::Free;
        if let Some(b) = s.buf.take() {
            self.pool.put(b);
        }
        if let Some(b) = s.compare.take() {
            self.pool.put(b);
        }
    }

    fn alloc_slot(&mut self, cid: u16, sqe: Sqe) -> usize {
        let i = match self.slots.iter().position(|s| s.state == SlotState::Free) {
            Some(i) => i,
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
        i
    }

    /// Length of host-to-controller data the command carries, if any.
    fn data_in_len(&self, sqe: &Sqe) -> usize {
        let io = self.queue.as_ref().is_some_and(|q| q.qid != 0);
        if sqe.admin_opcode() == Some(AdminOpcode::Fabrics) {
            return if sqe.fabrics_type() == Some(FabricsType::Connect) {
                ConnectData::LEN
            } else {
                0
            };
        }
        if !io {
            return 0;
        }
        match sqe.io_opcode() {
            Some(IoOpcode::Write | IoOpcode::Compare) => {
                let rw = ReadWrite::from_sqe(sqe);
                let bs = self.block_size(rw.nsid).unwrap_or(512);
                rw.nlb as usize * bs
            }
            Some(IoOpcode::DatasetManagement) => DatasetManagement::from_sqe(sqe).data_len(),
            _ => 0,
        }
    }

    /// For an I/O command carrying data (Write, Compare, Dataset Management): the error it
    /// completes with if its namespace is not active or its LBA range does not fit in it (NVM
    /// Command Set 1.0 §3.3.3), so that no data is asked for (R2T) or kept for a command that
    /// cannot run.
    fn check_before_data(&self, sqe: &Sqe) -> Option<Status> {
        let q = self.queue.as_ref().filter(|q| q.qid != 0)?;
        let opc = sqe.io_opcode();
        if !matches!(
            opc,
            Some(IoOpcode::Write | IoOpcode::Compare | IoOpcode::DatasetManagement)
        ) {
            return None;
        }
        let Some(n) =
            q.ns.get(sqe.nsid() as usize)
                .and_then(Option::as_ref)
                .filter(|n| !n.draining)
        else {
            return Some(Status::INVALID_NAMESPACE);
        };
        if opc == Some(IoOpcode::DatasetManagement) {
            return None;
        }
        let rw = ReadWrite::from_sqe(sqe);
        let blocks = n.ns.bdev.info().block_count();
        match rw.slba.checked_add(u64::from(rw.nlb)) {
            Some(end) if end <= blocks => None,
            _ => Some(Status::LBA_OUT_OF_RANGE),
        }
    }

    fn block_size(&self, nsid: u32) -> Option<usize> {
        let q = self.queue.as_ref()?;
        let n = q.ns.get(nsid as usize)?.as_ref()?;
        Some(n.ns.bdev.info().block_size().bytes() as usize)
    }

    fn on_command(&mut self, sqe: Sqe, icd: Option<AlignedBuf>, icd_len: usize) {
        let cid = sqe.cid();
        self.advance_sqhd();
        if self.find_slot(cid).is_some() {
            return self.refuse_command(cid, None, icd, Status::COMMAND_ID_CONFLICT);
        }
        let active = self
            .slots
            .iter()
            .filter(|s| s.state != SlotState::Free)
            .count();
        if active >= usize::from(self.sqsize) {
            // More commands outstanding than the queue has entries: the host ignores SQ flow
            // control. End the connection rather than grow without bound.
            if let Some(b) = icd {
                self.pool.put(b);
            }
            tracing::warn!(peer = %self.peer, active, "host overflows its submission queue");
            self.fatal(super::pdu::Fes::PDU_SEQUENCE_ERROR, 0);
            return;
        }
        let is_connect = sqe.fabrics_type() == Some(FabricsType::Connect);
        if self.queue.is_none() != is_connect {
            // Nothing but Connect before Connect, and no second Connect.
            return self.refuse_command(cid, None, icd, Status::COMMAND_SEQUENCE_ERROR);
        }
        if let Some(status) = self.check_before_data(&sqe) {
            return self.refuse_command(cid, None, icd, status);
        }
        let mut want = self.data_in_len(&sqe);
        let i = self.alloc_slot(cid, sqe);
        let sgl: SglDescriptor = sqe.sgl1();
        // Dataset Management may describe a larger buffer than its NR ranges need (Linux sends
        // a whole page of ranges): take the buffer and use the first NR ranges.
        if self.queue.as_ref().is_some_and(|q| q.qid != 0)
            && sqe.io_opcode() == Some(IoOpcode::DatasetManagement)
            && (sgl.length as usize) >= want
            && (sgl.length as usize) <= 256 * DsmRange::LEN
        {
            want = sgl.length as usize;
        }
        if want == 0 {
            if let Some(b) = icd {
                self.pool.put(b);
            }
            self.execute(i);
            return;
        }
        if want > MAX_TRANSFER || sgl.length as usize != want {
            tracing::debug!(peer = %self.peer, opc = sqe.opc(), want, sgl_len = sgl.length, icd_len,
                "data length does not match the command");
            return self.refuse_command(cid, Some(i), icd, Status::DATA_SGL_LENGTH_INVALID);
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
                return self.refuse_command(cid, Some(i), icd, status);
            }
            self.slots[i].buf = icd;
            self.slots[i].got = want;
            self.execute(i);
            return;
        }
        if sgl.sgl_type != sgl_type::TRANSPORT_DATA_BLOCK {
            return self.refuse_command(cid, Some(i), None, Status::SGL_DESCRIPTOR_TYPE_INVALID);
        }
        // Ask for the data (one R2T for the whole transfer; the host splits it in H2CData PDUs
        // of at most MAXH2CDATA).
        self.slots[i].buf = Some(self.pool.get(want));
        self.slots[i].state = SlotState::AwaitData;
        let r = R2t {
            cccid: cid,
            ttag: i as u16,
            r2to: 0,
            r2tl: want as u32,
        };
        let n = self.encoder.r2t(&r, &mut self.scratch);
        self.push_header(n);
    }

    /// Ends command `cid` before it runs: its in-capsule data goes back to the pool, the slot it
    /// took (if any) is freed, and the host gets `status`.
    fn refuse_command(
        &mut self,
        cid: u16,
        slot: Option<usize>,
        icd: Option<AlignedBuf>,
        status: Status,
    ) {
        if let Some(b) = icd {
            self.pool.put(b);
        }
        if let Some(i) = slot {
            self.free_slot(i);
        }
        self.send_cqe(Cqe::new(cid, status));
    }

    fn complete_slot(&mut self, i: usize, status: Status, dw0: u32, dw1: u32) {
        let cid = self.slots[i].cid;
        self.free_slot(i);
        self.send_cqe(Cqe {
            dw0,
            dw1,
            sqhd: 0,
            sqid: 0,
            cid,
            status,
            phase: false,
        });
    }

    fn execute(&mut self, i: usize) {
        let sqe = self.slots[i].sqe;
        let opc = sqe.admin_opcode();
        if opc == Some(AdminOpcode::Fabrics) {
            return self.fabrics(i, sqe);
        }
        let Some(q) = &self.queue else {
            return self.complete_slot(i, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
        };
        if q.qid == 0 {
            let ctrl = q.ctrl.clone();
            let cc_en = crate::spec::fabrics::Cc::from_u32(ctrl.cc.load(Ordering::Acquire)).en;
            if !cc_en && opc != Some(AdminOpcode::KeepAlive) {
                return self.complete_slot(i, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
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
                        let n = d.len().min(sqe.sgl1().length as usize);
                        if n > 0 {
                            self.send_data(sqe.cid(), &d[..n]);
                        }
                    }
                    self.complete_slot(i, status, dw0, dw1);
                }
                AdminOutcome::Aer => {
                    let cid = sqe.cid();
                    self.free_slot(i);
                    if self.aers.len() >= AER_SLOTS {
                        self.send_cqe(Cqe::new(cid, Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED));
                    } else {
                        self.aers.push(cid);
                    }
                }
            }
            return;
        }
        self.io_command(i, sqe);
    }

    fn fabrics(&mut self, i: usize, sqe: Sqe) {
        match sqe.fabrics_type() {
            Some(FabricsType::Connect) => self.connect(i, sqe),
            Some(ft @ (FabricsType::PropertyGet | FabricsType::PropertySet))
                if self.queue.as_ref().is_some_and(|q| q.qid == 0) =>
            {
                let ctrl = self.queue.as_ref().expect("admin queue").ctrl.clone();
                let out = if ft == FabricsType::PropertyGet {
                    admin::property_get(&ctrl, &sqe)
                } else {
                    admin::property_set(&ctrl, &sqe)
                };
                if let AdminOutcome::Done {
                    status, dw0, dw1, ..
                } = out
                {
                    self.complete_slot(i, status, dw0, dw1);
                }
            }
            Some(FabricsType::Disconnect) => {
                self.complete_slot(i, Status::SUCCESS, 0, 0);
                self.close("Disconnect");
            }
            _ => self.complete_slot(i, Status::INVALID_FIELD, 0, 0),
        }
    }

    /// Fabrics Connect (NVMe-oF 1.1 §3.3): an admin queue creates a controller (dynamic model),
    /// an I/O queue joins one by CNTLID. Every refusal is logged with the field, its value and
    /// why (rate-limited), so an operator sees why a host cannot attach.
    fn connect(&mut self, i: usize, sqe: Sqe) {
        let cmd = ConnectCommand::from_sqe(&sqe);
        let invalid = |ipo: u16, in_data: bool| {
            let c = ConnectResponse::InvalidParameters { in_data, ipo }.to_cqe(sqe.cid());
            (c.status, c.dw0)
        };
        let data = self.slots[i]
            .buf
            .as_ref()
            .map(|b| b.as_slice()[..ConnectData::LEN].to_vec());
        let Some(data) = data else {
            let r = (Status::DATA_SGL_LENGTH_INVALID, 0);
            return self.refuse_connect(i, r, "data", &"none", "Connect carries no data");
        };
        let cd = match ConnectData::parse(&data) {
            Ok(cd) => cd,
            Err(e) => {
                let off = e.ipo().unwrap_or(0);
                let field = if off == ConnectData::OFFSET_SUBNQN {
                    "SUBNQN"
                } else {
                    "HOSTNQN"
                };
                let raw = &data[off as usize..off as usize + 256];
                let raw = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                let value = String::from_utf8_lossy(raw);
                let r = invalid(off, true);
                return self.refuse_connect(i, r, field, &value, &e.to_string());
            }
        };
        if cmd.recfmt != 0 {
            let r = (Status::CONNECT_INCOMPATIBLE_FORMAT, 0);
            return self.refuse_connect(i, r, "RECFMT", &cmd.recfmt, "only format 0 exists");
        }
        let Some(subsys) = self.target.subsystem(&cd.subnqn) else {
            let r = invalid(ConnectData::OFFSET_SUBNQN, true);
            return self.refuse_connect(i, r, "SUBNQN", &cd.subnqn, "no such subsystem");
        };
        // SPDK's initiator without a configured host NQN sends an empty one: acceptable where
        // any host may connect, an invalid parameter where hosts are listed.
        if cd.hostnqn.is_empty() && !subsys.allows_any_host() {
            let r = invalid(ConnectData::OFFSET_HOSTNQN, true);
            let why = "empty host NQN; the subsystem admits listed hosts only";
            return self.refuse_connect(i, r, "HOSTNQN", &cd.hostnqn, why);
        }
        if !subsys.host_allowed(&cd.hostnqn) {
            let r = (Status::CONNECT_INVALID_HOST, 0);
            let why = format!("not on the allow-list of {}", cd.subnqn);
            return self.refuse_connect(i, r, "HOSTNQN", &cd.hostnqn, &why);
        }
        let entries = u32::from(cmd.sqsize) + 1;
        if cmd.sqsize == 0 || entries > u32::from(QUEUE_ENTRIES) {
            let r = invalid(ConnectCommand::OFFSET_SQSIZE, false);
            let why = format!("not in 1..={} (0's based)", QUEUE_ENTRIES - 1);
            return self.refuse_connect(i, r, "SQSIZE", &cmd.sqsize, &why);
        }
        self.sqsize = entries as u16;
        self.flow_control = cmd.cattr & crate::spec::fabrics::CATTR_DISABLE_SQ_FLOW_CONTROL == 0;
        let ctrl = if cmd.qid == 0 {
            match subsys.create_controller(&cd.hostnqn, cd.hostid, cmd.kato, self.reactor.clone()) {
                Ok(c) => c,
                Err(e) => {
                    let r = (Status::CONNECT_CONTROLLER_BUSY, 0);
                    return self.refuse_connect(i, r, "QID", &cmd.qid, e);
                }
            }
        } else {
            let Some(c) = subsys.controller(cd.cntlid) else {
                let r = invalid(ConnectData::OFFSET_CNTLID, true);
                let why = "no such controller in the subsystem";
                return self.refuse_connect(i, r, "CNTLID", &cd.cntlid, why);
            };
            if c.hostnqn != cd.hostnqn {
                let r = invalid(ConnectData::OFFSET_HOSTNQN, true);
                let why = format!("controller {} belongs to host {:?}", c.cntlid, c.hostnqn);
                return self.refuse_connect(i, r, "HOSTNQN", &cd.hostnqn, &why);
            }
            if c.dead.load(Ordering::Acquire) {
                let r = invalid(ConnectData::OFFSET_CNTLID, true);
                let why = "the controller is being torn down";
                return self.refuse_connect(i, r, "CNTLID", &cd.cntlid, why);
            }
            if subsys.discovery || cmd.qid > c.io_queues.load(Ordering::Acquire) {
                let r = invalid(ConnectCommand::OFFSET_QID, false);
                let why = if subsys.discovery {
                    "a discovery controller has no I/O queues".to_owned()
                } else {
                    let n = c.io_queues.load(Ordering::Acquire);
                    format!("above the {n} I/O queues granted")
                };
                return self.refuse_connect(i, r, "QID", &cmd.qid, &why);
            }
            c
        };
        let cntlid = ctrl.cntlid;
        self.queue = Some(Queue {
            qid: cmd.qid,
            ctrl,
            ns: Vec::new(),
            ns_gen: 0,
        });
        self.identified();
        self.refresh_namespaces();
        tracing::info!(peer = %self.peer, subnqn = %cd.subnqn, host = %cd.hostnqn,
            qid = cmd.qid, cntlid, "NVMe/TCP queue connected");
        let c = ConnectResponse::Success { cntlid, authreq: 0 }.to_cqe(sqe.cid());
        self.complete_slot(i, c.status, c.dw0, 0);
    }

    /// Completes a refused Connect with `(status, dw0)` and logs why (rate-limited).
    fn refuse_connect(
        &mut self,
        i: usize,
        (status, dw0): (Status, u32),
        field: &str,
        value: &dyn std::fmt::Debug,
        why: &str,
    ) {
        self.ticket
            .admission()
            .log_connect_refused(&self.peer, field, value, why);
        self.complete_slot(i, status, dw0, 0);
    }

    /// Connect succeeded: no more deadline, never evicted, and the full-size buffers a queue
    /// needs so that serving it allocates nothing per command.
    fn identified(&mut self) {
        self.ticket.advance(Stage::Identified);
        self.handshake_deadline = None;
        self.rx
            .reserve_exact(RX_CAPACITY.saturating_sub(self.rx.len()));
        self.tx.reserve(TX_CAPACITY);
        self.tx_data.reserve(4 * QUEUE_ENTRIES as usize);
        self.done.reserve(QUEUE_ENTRIES as usize);
    }

    /// Opens this reactor's channels for the subsystem's namespaces (I/O queues only).
    fn refresh_namespaces(&mut self) {
        let Some(q) = self.queue.as_mut() else { return };
        if q.qid == 0 {
            return;
        }
        let g = q.ctrl.subsystem.ns_generation();
        if g == q.ns_gen {
            return;
        }
        q.ns_gen = g;
        let list = q.ctrl.subsystem.namespaces();
        let max = list.iter().map(|n| n.nsid as usize).max().unwrap_or(0);
        if q.ns.len() <= max {
            q.ns.resize_with(max + 1, || None);
        }
        for (nsid, slot) in q.ns.iter_mut().enumerate() {
            let want = list.iter().find(|n| n.nsid as usize == nsid);
            let keep = match (slot.as_ref(), want) {
                (Some(have), Some(w)) => Arc::ptr_eq(&have.ns, w),
                (None, None) => true,
                _ => false,
            };
            if keep {
                continue;
            }
            // A removed namespace's channel stays until its requests complete, including those
            // waiting in the retry queue for room in it (they were accepted for this namespace
            // and must not reach a successor with the same nsid, or find no channel at all).
            let waiting = self.retry.iter().any(|(n, _)| *n as usize == nsid);
            if let Some(s) = slot.as_mut()
                && (waiting || s.ch.in_flight() > 0)
            {
                s.draining = true;
                q.ns_gen = 0;
                continue;
            }
            *slot = match want {
                Some(w) => match w.bdev.open_channel() {
                    Ok(ch) => Some(NsChan {
                        ns: w.clone(),
                        ch,
                        draining: false,
                    }),
                    Err(e) => {
                        tracing::error!(nsid, error = %e, "cannot open namespace channel");
                        None
                    }
                },
                None => None,
            };
        }
    }

    fn submit(&mut self, nsid: u32, io: IoRequest) {
        let q = self.queue.as_mut().expect("I/O queue");
        let ch = &mut q.ns[nsid as usize].as_mut().expect("namespace checked").ch;
        if let Err(io) = ch.submit(io) {
            self.retry.push_back((nsid, io));
        }
    }

    fn io_command(&mut self, i: usize, sqe: Sqe) {
        let nsid = sqe.nsid();
        let opc = sqe.io_opcode();
        if !matches!(
            opc,
            Some(
                IoOpcode::Read
                    | IoOpcode::Write
                    | IoOpcode::Flush
                    | IoOpcode::WriteZeroes
                    | IoOpcode::DatasetManagement
                    | IoOpcode::Compare
            )
        ) {
            return self.complete_slot(i, Status::INVALID_OPCODE, 0, 0);
        }
        let q = self.queue.as_ref().expect("I/O queue");
        let ns_ok = |n: u32| {
            q.ns.get(n as usize)
                .is_some_and(|x| x.as_ref().is_some_and(|c| !c.draining))
        };
        if opc == Some(IoOpcode::Flush) && nsid == 0xffff_ffff {
            // Flush every namespace.
            let all: Vec<u32> = (0..q.ns.len() as u32).filter(|&n| ns_ok(n)).collect();
            if all.is_empty() {
                return self.complete_slot(i, Status::SUCCESS, 0, 0);
            }
            self.slots[i].pending = all.len() as u32;
            for n in all {
                self.submit(n, IoRequest::no_data(IoType::Flush, 0, 0, i as u64));
            }
            return;
        }
        if !ns_ok(nsid) {
            return self.complete_slot(i, Status::INVALID_NAMESPACE, 0, 0);
        }
        let bs = self.block_size(nsid).expect("namespace checked");
        let caps = q.ns[nsid as usize]
            .as_ref()
            .expect("checked")
            .ns
            .bdev
            .info()
            .caps();
        let tag = i as u64;
        match opc {
            Some(IoOpcode::Read | IoOpcode::Compare) => {
                let rw = ReadWrite::from_sqe(&sqe);
                let len = rw.nlb as usize * bs;
                if len > MAX_TRANSFER {
                    return self.complete_slot(i, Status::INVALID_FIELD, 0, 0);
                }
                if opc == Some(IoOpcode::Read) && sqe.sgl1().length as usize != len {
                    return self.complete_slot(i, Status::DATA_SGL_LENGTH_INVALID, 0, 0);
                }
                if opc == Some(IoOpcode::Compare) {
                    self.slots[i].compare = self.slots[i].buf.take();
                }
                let buf = self.pool.get(len);
                self.slots[i].len = len;
                self.slots[i].pending = 1;
                let io = IoRequest::read(rw.slba, rw.nlb, SgList::from_buf_prefix(buf, len), tag);
                self.submit(nsid, io);
            }
            Some(IoOpcode::Write) => {
                let rw = ReadWrite::from_sqe(&sqe);
                let len = self.slots[i].len;
                let Some(buf) = self.slots[i].buf.take() else {
                    return self.complete_slot(i, Status::DATA_TRANSFER_ERROR, 0, 0);
                };
                self.slots[i].pending = 1;
                // Force Unit Access: a flush follows once the write has completed, and the
                // command completes after the flush (submitted together, the flush could finish
                // first).
                self.slots[i].flush_nsid = rw.fua.then_some(nsid);
                let io = IoRequest::write(rw.slba, rw.nlb, SgList::from_buf_prefix(buf, len), tag);
                self.submit(nsid, io);
            }
            Some(IoOpcode::Flush) => {
                self.slots[i].pending = 1;
                self.submit(nsid, IoRequest::no_data(IoType::Flush, 0, 0, tag));
            }
            Some(IoOpcode::WriteZeroes) => {
                let wz = WriteZeroes::from_sqe(&sqe);
                let t = if wz.deac && caps.contains(Caps::UNMAP_READS_ZEROES) {
                    IoType::Unmap
                } else {
                    IoType::WriteZeroes
                };
                self.slots[i].pending = 1;
                self.submit(nsid, IoRequest::no_data(t, wz.slba, wz.nlb, tag));
            }
            Some(IoOpcode::DatasetManagement) => {
                let dsm = DatasetManagement::from_sqe(&sqe);
                if !dsm.ad {
                    return self.complete_slot(i, Status::SUCCESS, 0, 0);
                }
                let Some(buf) = self.slots[i].buf.as_ref() else {
                    return self.complete_slot(i, Status::DATA_TRANSFER_ERROR, 0, 0);
                };
                let parsed: Option<Vec<(u64, u32)>> =
                    DsmRange::parse_list(buf.as_slice(), dsm.nr as usize)
                        .map(|it| it.filter(|r| r.nlb > 0).map(|r| (r.slba, r.nlb)).collect());
                let Some(ranges) = parsed else {
                    return self.complete_slot(i, Status::INVALID_FIELD, 0, 0);
                };
                if ranges.is_empty() {
                    return self.complete_slot(i, Status::SUCCESS, 0, 0);
                }
                self.slots[i].pending = ranges.len() as u32;
                for (slba, nlb) in ranges {
                    self.submit(nsid, IoRequest::no_data(IoType::Unmap, slba, nlb, tag));
                }
            }
            _ => self.complete_slot(i, Status::INVALID_OPCODE, 0, 0),
        }
    }

    fn on_completion(&mut self, c: IoCompletion, io_type_hint: IoType) {
        let i = c.tag as usize;
        let s = &mut self.slots[i];
        if s.state != SlotState::Exec {
            return;
        }
        s.pending -= 1;
        if !c.status.is_ok() && s.status.is_success() {
            s.status = to_nvme_status(c.status, io_type_hint);
        }
        if let Some(b) = c.bufs.into_buf() {
            s.buf = Some(b);
        }
        if s.pending > 0 {
            return;
        }
        if let Some(nsid) = s.flush_nsid.take()
            && s.status.is_success()
        {
            s.pending = 1;
            self.submit(nsid, IoRequest::no_data(IoType::Flush, 0, 0, i as u64));
            return;
        }
        let status = s.status;
        let opc = s.sqe.io_opcode();
        let cid = s.cid;
        if status.is_success() && opc == Some(IoOpcode::Read) {
            let len = s.len;
            let buf = s.buf.take().expect("read buffer");
            self.send_read_data(cid, buf, len);
        } else if status.is_success() && opc == Some(IoOpcode::Compare) {
            let len = s.len;
            let same = match (&s.buf, &s.compare) {
                (Some(a), Some(b)) => a.as_slice()[..len] == b.as_slice()[..len],
                _ => false,
            };
            if !same {
                return self.complete_slot(i, Status::COMPARE_FAILURE, 0, 0);
            }
        }
        self.complete_slot(i, status, 0, 0);
    }

    fn reap(&mut self) -> usize {
        let mut n = 0;
        let Some(q) = self.queue.as_mut() else {
            return 0;
        };
        let mut done = std::mem::take(&mut self.done);
        for ns in q.ns.iter_mut().flatten() {
            n += ns.ch.poll(&mut done);
        }
        for c in done.drain(..) {
            let hint =
                self.slots[c.tag as usize]
                    .sqe
                    .io_opcode()
                    .map_or(IoType::Read, |o| match o {
                        IoOpcode::Write | IoOpcode::WriteZeroes | IoOpcode::DatasetManagement => {
                            IoType::Write
                        }
                        _ => IoType::Read,
                    });
            self.on_completion(c, hint);
        }
        self.done = done;
        n
    }

    fn deliver_events(&mut self) {
        let Some(q) = &self.queue else { return };
        if q.qid != 0 || self.aers.is_empty() {
            return;
        }
        let ctrl = q.ctrl.clone();
        while !self.aers.is_empty() {
            let Some(ev) = ctrl.take_event() else { break };
            let cid = self.aers.remove(0);
            self.send_cqe(Cqe::with_dw0(cid, Status::SUCCESS, ev.to_dw0()));
        }
    }

    fn in_flight_io(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| {
            q.ns.iter()
                .flatten()
                .map(|n| n.ch.in_flight())
                .sum::<usize>()
        }) + self.retry.len()
    }
}

impl Poller for TcpConn {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        let mut work = 0;
        let mut rearm = false;
        let mut readable = false;
        let mut writable = false;
        // Route socket readiness now (running pending task work if the ring says some waits):
        // a spinning reactor would otherwise see it only when it next enters the kernel.
        self.client.ring().reap();
        self.client.take(|slot, _res, flags| match slot {
            POLL_READ => {
                readable = true;
                if !io_uring::cqueue::more(flags) {
                    rearm = true;
                }
            }
            _ => writable = true,
        });
        if rearm && !self.closing {
            self.arm(POLL_READ, (libc::POLLIN | libc::POLLRDHUP) as u32, true);
        }
        if writable {
            self.write_armed = false;
        }
        // A readiness report means: read until the socket says EAGAIN.
        if readable {
            self.readable = true;
        }
        if let Some(q) = &self.queue
            && q.ctrl.dead.load(Ordering::Acquire)
            && !self.closing
        {
            self.close("controller torn down");
        }
        if let Some(q) = &self.queue
            && q.qid == 0
            && let Some(deadline) = q.ctrl.keep_alive_deadline()
            && Instant::now() > deadline
        {
            tracing::warn!(peer = %self.peer, cntlid = q.ctrl.cntlid, "keep-alive timeout");
            self.close("keep-alive timeout");
        }
        if let Some(d) = self.handshake_deadline
            && !self.closing
        {
            if self.ticket.evicted() {
                // Counted by the gate; the socket is shut down already.
                self.close("evicted for a newcomer");
            } else if Instant::now() > d {
                self.ticket.admission().note_timed_out();
                self.close(if self.established {
                    "no Connect before the deadline"
                } else {
                    "no ICReq before the deadline"
                });
            }
        }
        self.refresh_namespaces();
        while let Some((nsid, io)) = self.retry.pop_front() {
            let q = self.queue.as_mut().expect("I/O queue");
            let ch = &mut q.ns[nsid as usize].as_mut().expect("namespace").ch;
            if let Err(io) = ch.submit(io) {
                self.retry.push_front((nsid, io));
                break;
            }
            work += 1;
        }
        // A host that stops reading its responses stops being read (bounded send buffer).
        if !self.closing && self.tx_pending() < TX_HIGH_WATER {
            work += self.read_socket();
            work += self.parse();
        }
        work += self.reap();
        self.deliver_events();
        if self.tx_pending() > 0 && !self.write_armed {
            work += self.flush_tx().min(1);
        }
        if self.closing && self.in_flight_io() == 0 {
            let _ = self.flush_tx();
            let _ = self.ticket.sock.shutdown(std::net::Shutdown::Both);
            self.finished = true;
        }
        work
    }

    fn wake(&self) -> Wake {
        if self.finished {
            return Wake::Event;
        }
        let mut w = Wake::Event;
        if let Some(d) = self.handshake_deadline
            && !self.closing
        {
            w = Wake::At(d);
        }
        if let Some(q) = &self.queue {
            for n in q.ns.iter().flatten() {
                w = w.min(n.ch.wake());
            }
            if q.qid == 0
                && let Some(d) = q.ctrl.keep_alive_deadline()
            {
                w = w.min(Wake::At(d));
            }
            if q.qid == 0 && !self.aers.is_empty() && q.ctrl.has_events() {
                w = Wake::Immediate;
            }
        }
        if !self.retry.is_empty() || (self.closing && self.in_flight_io() == 0) {
            w = Wake::Immediate;
        }
        if self.tx_pending() > 0 && !self.write_armed {
            w = Wake::Immediate;
        }
        w
    }

    fn in_flight(&self) -> usize {
        if self.finished {
            0
        } else {
            self.in_flight_io()
        }
    }

    fn stop(&mut self) {
        self.close("shutdown");
    }

    fn is_done(&self) -> bool {
        self.finished
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        // The armed polls hold the socket's file: end them, or every closed connection would
        // keep its socket allocated until the reactor's ring goes away.
        let mut cancelled = self.client.cancel(POLL_READ);
        if self.write_armed {
            cancelled &= self.client.cancel(POLL_WRITE);
        }
        if !cancelled {
            tracing::warn!(peer = %self.peer, "io_uring full: a closed connection's poll stays armed, keeping its socket until the reactor exits");
        }
        if let Some(q) = &self.queue
            && q.qid == 0
        {
            q.ctrl.subsystem.remove_controller(q.ctrl.cntlid);
        }
    }
}
