//! One NVMe/TCP connection = one NVMe queue, served by one reactor (NVMe/TCP transport 1.0 §3).
//!
//! The connection owns the wire: it reads the socket when the reactor reports it readable,
//! decodes PDUs with [`PduDecoder`], answers ICReq, hands each command capsule to its
//! [`NvmeQueue`] (which does everything NVMe: Connect, slots, admin and I/O commands on bdev
//! channels, completions) and moves command data for it: R2T and H2CData into the command's
//! buffer, C2HData straight from a read's buffer ([`super::send`]). It enforces the ICReq and
//! Connect deadlines of its listener's admission. Any protocol violation the codec reports ends
//! the connection with a C2HTermReq; command-level errors complete the command with an NVMe
//! status. Nothing a host sends can stop other connections.

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Instant;

use ferroblk_bdev::reactor::{Poller, ReactorHandle};
use ferroblk_bdev::uring::FdWatch;
use ferroblk_bdev::{AlignedBuf, Wake, bufpool};

use super::admission::{Stage, Ticket};
use super::pdu::{
    DIGEST_LEN, DataDigest, Decoded, Fes, IcResp, Negotiated, PduDecoder, PduError, PduHeader, R2t,
};
use super::send::{Flushed, MAX_H2C_DATA, SendStream};
use crate::queue::{DataError, NvmeQueue, Transport};
use crate::spec::{Cqe, Status};
use crate::subsystem::admin::{IN_CAPSULE_DATA, QUEUE_ENTRIES};
use crate::subsystem::{Port, Target};

/// Receive buffer of a connected queue.
const RX_CAPACITY: usize = 256 * 1024;
/// Receive buffer of a connection that has not completed Connect: room for an ICReq and a
/// Connect capsule with its data. A larger PDU grows it, within the decoder's limits.
const RX_HANDSHAKE: usize = 2048;
/// Pending response bytes above which the connection stops reading new commands.
const TX_HIGH_WATER: usize = 8 << 20;

/// Data bytes still to come of an H2CData PDU above which they are received straight into the
/// command's buffer rather than through the receive buffer.
const DIRECT_RECV_MIN: usize = 16 * 1024;

/// An H2CData PDU whose header has been taken: its data goes into the command's buffer as it
/// arrives (copied from the receive buffer, or received there directly), then its data digest,
/// if any, is checked.
#[derive(Clone, Copy)]
struct RxData {
    ttag: u16,
    cid: u16,
    /// Data bytes of the PDU still to come.
    left: usize,
    /// The running data digest, when one follows the data.
    digest: Option<DataDigest>,
    last: bool,
    /// The command's whole transfer is in its buffer (this PDU brought its last bytes).
    complete: bool,
}

/// The transport side the queue talks to: the send stream, and the admission ticket.
struct Wire {
    /// The socket and the handshake stage, shared with the listener's admission gate.
    ticket: Arc<Ticket>,
    /// When ICReq, then Connect, must have arrived; `None` once Connect succeeded.
    handshake_deadline: Option<Instant>,
    send: SendStream,
    peer: String,
}

impl Transport for Wire {
    fn send_cqe(&mut self, cqe: &Cqe) {
        self.send.capsule_resp(cqe);
    }

    fn send_read_data(&mut self, cid: u16, buf: AlignedBuf, len: usize) {
        self.send.read_data(cid, buf, len);
    }

    fn send_data(&mut self, cid: u16, data: &[u8]) {
        self.send.data(cid, data);
    }

    /// One R2T for the whole transfer; the host splits it in H2CData PDUs of at most
    /// MAXH2CDATA.
    fn request_data(&mut self, cid: u16, ttag: u16, len: usize) {
        self.send.r2t(&R2t {
            cccid: cid,
            ttag,
            r2to: 0,
            r2tl: len as u32,
        });
    }

    fn sequence_error(&mut self) {
        self.send.term_req(Fes::PDU_SEQUENCE_ERROR, 0);
    }

    fn connect_refused(&mut self, field: &str, value: &dyn std::fmt::Debug, why: &str) {
        self.ticket
            .admission()
            .log_connect_refused(&self.peer, field, value, why);
    }

    /// No more deadline, never evicted, and the send buffers a queue needs.
    fn connected(&mut self) {
        self.ticket.advance(Stage::Identified);
        self.handshake_deadline = None;
        self.send.reserve(usize::from(QUEUE_ENTRIES));
    }
}

/// The poller of one connection.
pub struct TcpConn {
    queue: NvmeQueue,
    wire: Wire,
    /// The socket's readability (and hang-up), watched for the connection's life.
    read_watch: FdWatch,
    /// The socket's writability, armed while a send waits for room.
    write_watch: FdWatch,
    readable: bool,
    rx: Vec<u8>,
    /// The H2CData PDU whose header was taken and whose data is arriving.
    rx_data: Option<RxData>,
    decoder: PduDecoder,
    /// ICReq/ICResp done.
    established: bool,
    finished: bool,
}

impl TcpConn {
    /// Takes over an admitted connection on the calling reactor. Until Connect succeeds it
    /// holds only small buffers (a host that connects and sends nothing costs little), and is
    /// closed if ICReq or Connect misses its deadline.
    pub fn new(
        target: Arc<Target>,
        port: Arc<Port>,
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
        let read_watch = FdWatch::new(sock.as_fd(), (libc::POLLIN | libc::POLLRDHUP) as u32)
            .map_err(std::io::Error::other)?;
        let write_watch =
            FdWatch::once(sock.as_fd(), libc::POLLOUT as u32).map_err(std::io::Error::other)?;
        let handshake_deadline = Some(Instant::now() + ticket.admission().limits().ic_timeout);
        Ok(TcpConn {
            queue: NvmeQueue::new(target, reactor, peer.clone()).with_port(port),
            wire: Wire {
                ticket,
                handshake_deadline,
                send: SendStream::new(),
                peer,
            },
            read_watch,
            write_watch,
            readable: true,
            rx: Vec::with_capacity(RX_HANDSHAKE),
            rx_data: None,
            decoder: PduDecoder::controller(IN_CAPSULE_DATA),
            established: false,
            finished: false,
        })
    }

    fn close(&mut self, why: &str) {
        let why = if !self.queue.is_connected() && self.wire.ticket.evicted() {
            "evicted for a newcomer"
        } else {
            why
        };
        self.queue.close(why);
    }

    /// Ends the connection with a C2HTermReq carrying `fes`.
    fn fatal(&mut self, fes: Fes) {
        self.wire.send.term_req(fes, 0);
        self.close("fatal protocol error");
    }

    fn flush_tx(&mut self) -> usize {
        match self.wire.send.flush(self.wire.ticket.sock.as_raw_fd()) {
            Flushed::Sent { bytes, blocked } => {
                if blocked {
                    self.write_watch.arm();
                }
                bytes
            }
            Flushed::Failed(e) => {
                tracing::debug!(peer = %self.queue.peer(), error = %e, "send failed");
                self.close("send failed");
                0
            }
        }
    }

    /// Closes a connection whose ICReq or Connect is late, or that admission evicted.
    fn check_handshake(&mut self) {
        let Some(d) = self.wire.handshake_deadline else {
            return;
        };
        if self.queue.is_closing() {
            return;
        }
        if self.wire.ticket.evicted() {
            // Counted by the gate; the socket is shut down already.
            self.close("evicted for a newcomer");
        } else if Instant::now() > d {
            self.wire.ticket.admission().note_timed_out();
            self.close(if self.established {
                "no Connect before the deadline"
            } else {
                "no ICReq before the deadline"
            });
        }
    }

    // ---------------------------------------------------------------- receiving

    fn read_socket(&mut self) -> usize {
        let mut total = 0;
        while self.readable && !self.queue.is_closing() {
            if let Some(d) = self.rx_data
                && self.rx.is_empty()
                && d.left >= DIRECT_RECV_MIN
            {
                total += self.recv_direct(d);
                continue;
            }
            if self.rx.len() == self.rx.capacity() {
                break; // full: the parser must consume first
            }
            let len = self.rx.len();
            let spare = self.rx.capacity() - len;
            // SAFETY: `len` is within the vector's allocation.
            let spare_ptr = unsafe { self.rx.as_mut_ptr().add(len) };
            // SAFETY: the vector's spare capacity, `spare` bytes after its length.
            let Some(n) = (unsafe { self.recv_into(spare_ptr, spare) }) else {
                break;
            };
            // SAFETY: the kernel initialised `n` bytes after `len`.
            unsafe { self.rx.set_len(len + n) };
            total += n;
        }
        total
    }

    fn parse(&mut self) -> usize {
        let mut pos = 0;
        let mut handled = 0;
        while !self.queue.is_closing() {
            // A host that does not read its responses gets no more commands taken until it
            // does (at a PDU boundary): commands that complete at once, pipelined, would
            // otherwise grow the send buffer without bound in one poll.
            if self.rx_data.is_none() && self.wire.send.pending() >= TX_HIGH_WATER {
                break;
            }
            if let Some(d) = self.rx_data {
                // Data of the H2CData PDU in progress, then its digest.
                let avail = self.rx.len() - pos;
                if d.left > 0 {
                    let n = d.left.min(avail);
                    if n == 0 {
                        break;
                    }
                    let dst = self
                        .queue
                        .transfer_buf(d.ttag, d.cid)
                        .expect("checked when the header arrived");
                    dst[..n].copy_from_slice(&self.rx[pos..pos + n]);
                    pos += n;
                    self.data_arrived(n);
                } else {
                    if avail < DIGEST_LEN {
                        break;
                    }
                    let ok = d
                        .digest
                        .is_none_or(|g| g.matches(&self.rx[pos..pos + DIGEST_LEN]));
                    pos += DIGEST_LEN;
                    self.data_done(ok);
                    handled += 1;
                }
                continue;
            }
            if let Ok(Decoded::Ready(l)) = self.decoder.decode_header(&self.rx[pos..])
                && let PduHeader::H2cData(h) = l.header
            {
                // An H2CData PDU: its data goes to the command's buffer as it arrives, once the
                // header (and padding) is in.
                if self.rx.len() - pos < l.data.start {
                    break;
                }
                pos += l.data.start;
                let (off, len) = (h.datao as usize, h.datal as usize);
                match self.queue.check_transfer(h.ttag, h.cccid, off, len) {
                    // An H2CData for no outstanding R2T (§3.6.2.8).
                    Err(DataError::NoTransfer) => self.fatal(Fes::PDU_SEQUENCE_ERROR),
                    Err(DataError::OutOfRange) => self.fatal(Fes::DATA_TRANSFER_OUT_OF_RANGE),
                    Ok(()) => {
                        self.rx_data = Some(RxData {
                            ttag: h.ttag,
                            cid: h.cccid,
                            left: len,
                            digest: l.data_digest.then(DataDigest::new),
                            last: h.last,
                            complete: false,
                        });
                    }
                }
                continue;
            }
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
                    // Not fatal: the command fails with Transient Transport Error. A new
                    // command never started; existing slots are not touched. (H2CData PDUs do
                    // not get here: their data is taken as it arrives, above, and its digest
                    // checked in `data_done`.)
                    tracing::warn!(peer = %self.queue.peer(), "data digest mismatch");
                    if let PduHeader::CapsuleCmd(c) = l.header {
                        let status = Status::TRANSIENT_TRANSPORT_ERROR;
                        self.queue
                            .refuse_capsule(&mut self.wire, c.sqe.cid(), status);
                    }
                    pos += l.plen;
                }
                Err(PduError::Fatal(f)) => {
                    tracing::warn!(peer = %self.queue.peer(), fes = %f.fes, fei = f.fei, "fatal NVMe/TCP error");
                    self.wire.send.term_req_for(&f, &self.rx[pos..]);
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

    /// Receives the data of the H2CData PDU in progress straight into the command's buffer.
    fn recv_direct(&mut self, d: RxData) -> usize {
        let dst = self
            .queue
            .transfer_buf(d.ttag, d.cid)
            .expect("checked when the header arrived");
        let want = d.left.min(dst.len());
        let buf = dst.as_mut_ptr();
        // SAFETY: `want` bytes of the command's buffer, which stays in its slot (the slot waits
        // for this data) while the socket is read.
        match unsafe { self.recv_into(buf, want) } {
            Some(n) if n > 0 => {
                self.data_arrived(n);
                n
            }
            _ => 0,
        }
    }

    /// One non-blocking `recv` of at most `len` bytes into `buf`: the bytes received (0 when
    /// interrupted: try again), or `None` when there is nothing now or the connection is
    /// closing. A short read drained the socket: whatever arrives next is reported by the read
    /// watch (a new readiness for every arrival), so the `recv` that would only say EAGAIN is
    /// saved.
    ///
    /// # Safety
    /// `buf` is valid for writes of `len` bytes.
    unsafe fn recv_into(&mut self, buf: *mut u8, len: usize) -> Option<usize> {
        let fd = self.wire.ticket.sock.as_raw_fd();
        // SAFETY: the caller's promise on `buf` and `len`.
        let n = unsafe { libc::recv(fd, buf.cast(), len, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => self.readable = false,
                std::io::ErrorKind::Interrupted => return Some(0),
                _ => self.close("receive failed"),
            }
            return None;
        }
        if n == 0 {
            self.close("host closed the connection");
            return None;
        }
        let n = n as usize;
        if n < len {
            self.readable = false;
        }
        Some(n)
    }

    /// `n` more data bytes of the H2CData PDU in progress are in the command's buffer (just
    /// after those before them).
    fn data_arrived(&mut self, n: usize) {
        let d = self.rx_data.as_mut().expect("a PDU in progress");
        if let Some(g) = d.digest.as_mut() {
            let dst = self
                .queue
                .transfer_buf(d.ttag, d.cid)
                .expect("checked when the header arrived");
            g.update(&dst[..n]);
        }
        d.left -= n;
        d.complete = self.queue.advance_transfer(d.ttag, n);
        if d.left == 0 && d.digest.is_none() {
            self.data_done(true);
        }
    }

    /// The H2CData PDU in progress has ended, its data digest matching (or absent) if
    /// `digest_ok`.
    fn data_done(&mut self, digest_ok: bool) {
        let d = self.rx_data.take().expect("a PDU in progress");
        if !digest_ok {
            // Not fatal: the command fails with Transient Transport Error once the rest of
            // its data (further PDUs of the R2T the host still sends) has come in.
            tracing::warn!(peer = %self.queue.peer(), "data digest mismatch");
            self.queue
                .poison_transfer(d.ttag, d.cid, Status::TRANSIENT_TRANSPORT_ERROR);
        }
        match (d.complete, d.last) {
            (true, true) => self.queue.data_received(&mut self.wire, d.ttag),
            (false, false) => {}
            // All the data but not marked the last PDU, or marked the last PDU of an R2T
            // (one per command, for all its data) before all of it came (§3.6.2.8).
            (true, false) | (false, true) => self.fatal(Fes::PDU_SEQUENCE_ERROR),
        }
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
                self.wire.send.ic_resp(&resp);
                let neg = Negotiated::from_exchange(&req, &resp);
                self.decoder.establish(neg);
                self.wire.send.establish(&neg);
                self.established = true;
                // Now the Connect's deadline (NVMe-oF 1.1 §3.3: Connect is the first command).
                let t = &mut self.wire;
                t.ticket.advance(Stage::Initialized);
                t.handshake_deadline =
                    Some(Instant::now() + t.ticket.admission().limits().connect_timeout);
            }
            PduHeader::H2cTermReq(t) => {
                tracing::info!(peer = %self.queue.peer(), fes = %t.fes, "host terminated the connection");
                self.close("H2CTermReq");
            }
            PduHeader::CapsuleCmd(c) => {
                let icd = data.len();
                let mut buf = None;
                if icd > 0 {
                    let mut b = bufpool::get(icd);
                    b.as_mut_slice()[..icd].copy_from_slice(&self.rx[data]);
                    buf = Some(b);
                }
                self.queue.command(&mut self.wire, c.sqe, buf, icd);
                if self.queue.is_connected() && self.rx.capacity() < RX_CAPACITY {
                    // Connect succeeded: the full-size receive buffer a queue needs, so that
                    // serving it allocates nothing per command.
                    self.rx.reserve_exact(RX_CAPACITY - self.rx.len());
                }
            }
            // PDUs only a host receives: the decoder already refuses them for a controller.
            _ => self.fatal(Fes::INVALID_HEADER_FIELD),
        }
    }
}

impl Poller for TcpConn {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        // Socket readiness, routed by the reactor this turn. A readiness report means: read
        // until the socket says EAGAIN.
        if self.read_watch.take() > 0 {
            self.readable = true;
        }
        self.write_watch.take();
        self.check_handshake();
        let mut work = self.queue.service();
        // A host that stops reading its responses stops being read (bounded send buffer).
        if !self.queue.is_closing() && self.wire.send.pending() < TX_HIGH_WATER {
            work += self.read_socket();
            work += self.parse();
        }
        work += self.queue.complete(&mut self.wire);
        if self.wire.send.pending() > 0 && !self.write_watch.is_armed() {
            work += self.flush_tx().min(1);
        }
        if self.queue.is_closing() && self.queue.in_flight() == 0 {
            let _ = self.flush_tx();
            let _ = self.wire.ticket.sock.shutdown(std::net::Shutdown::Both);
            self.finished = true;
        }
        work
    }

    fn wake(&self) -> Wake {
        if self.finished {
            return Wake::Event;
        }
        let mut w = self.queue.wake();
        if let Some(d) = self.wire.handshake_deadline
            && !self.queue.is_closing()
        {
            w = w.min(Wake::At(d));
        }
        if self.wire.send.pending() > 0 && !self.write_watch.is_armed() {
            w = Wake::Immediate;
        }
        w
    }

    fn in_flight(&self) -> usize {
        if self.finished {
            0
        } else {
            self.queue.in_flight()
        }
    }

    fn stop(&mut self) {
        self.close("shutdown");
    }

    fn is_done(&self) -> bool {
        self.finished
    }
}
