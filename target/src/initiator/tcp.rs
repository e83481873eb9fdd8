//! The NVMe/TCP engine: one NVMe/TCP connection carrying one NVMe queue, host side (NVMe/TCP
//! Transport Specification 1.0 §3.3 "Connection initialization", §3.4 "Data transfer").
//!
//! [`TcpQueue`] is a non-blocking state machine over a non-blocking socket (an [`Engine`]).
//! `submit` encodes a command capsule into the transmit queue (no syscall); `step` writes what
//! it can with one `writev`, reads what has arrived, decodes PDUs with the shared
//! [`PduDecoder`](crate::transport::tcp::pdu::PduDecoder), answers R2Ts with H2CData and
//! completes commands; `wait` is `poll(2)` on the socket. Admin and I/O queues are the same
//! engine.
//!
//! Buffers: a command owns its `Vec<u8>` from submit to completion; write data is sent from it
//! with `writev` (headers and digests are the only bytes copied) and read data lands in it,
//! straight from the socket when a C2HData PDU carries more than [`DIRECT_READ_MIN`] bytes
//! still to come. The command identifier (CID) is the command's slot index.
//!
//! State per command slot: free, or in flight with its buffer, its direction, how much C2H
//! data arrived and how many transmit items still reference its buffer. A completion that
//! arrives while H2CData of the same command is still queued for sending (a controller that
//! failed the command early) is held until those bytes are out, so the buffer is never handed
//! back while the socket may still read it.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use ferroblk_bdev::SgList;

use super::error::{Error, RejectReason};
use super::queue::{
    CmdData, Completion, Engine, QueueParams, QueueStats, Xfer, lost_cqe, poll_fds, transfer_len,
    wait_until,
};
use crate::spec::command::{SglDescriptor, Sqe};
use crate::spec::completion::Cqe;
use crate::spec::status::Status;
use crate::transport::tcp::pdu::{
    DIGEST_LEN, DataDigest, Decoded, Fes, H2cData, IcReq, MAX_HEADER_LEN, Negotiated, PduDecoder,
    PduEncoder, PduError, PduHeader, PduLayout, Role,
};

/// Bytes of the receive buffer: many CapsuleResps per `read`.
const RX_BUF_LEN: usize = 64 * 1024;
/// C2H data still expected above this size is read straight into the command's buffer when
/// the receive buffer is empty, skipping one copy.
pub const DIRECT_READ_MIN: usize = 8 * 1024;
/// Most iovecs one `writev` takes from the transmit queue.
const MAX_IOV: usize = 64;
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    internal: bool,
    tag: u64,
    opcode: u8,
    to_host: bool,
    to_ctrl: bool,
    in_capsule: bool,
    buf: Vec<u8>,
    /// The command's segments when it was submitted with a list (then `buf` is empty).
    sg: Option<SgList>,
    /// Transmit items that still reference `buf`.
    tx_refs: u32,
    /// A C2HData of this command failed its data digest.
    digest_error: bool,
    /// A completion held back until `tx_refs` drops to 0.
    held: Option<Cqe>,
}

impl Slot {
    /// Bytes of the command's data.
    fn data_len(&self) -> usize {
        match &self.sg {
            Some(sg) => sg.total_len(),
            None => self.buf.len(),
        }
    }

    /// Calls `f` on the data bytes `start..end` in order, one contiguous piece at a time, until
    /// it returns `false`.
    fn pieces<'a>(&'a self, start: usize, end: usize, mut f: impl FnMut(&'a [u8]) -> bool) {
        let Some(sg) = &self.sg else {
            f(&self.buf[start..end]);
            return;
        };
        let mut off = 0;
        for seg in sg.segments() {
            let (lo, hi) = (off, off + seg.len);
            off = hi;
            if hi <= start {
                continue;
            }
            if lo >= end {
                return;
            }
            let a = start.max(lo) - lo;
            let b = end.min(hi) - lo;
            // SAFETY: the slot owns `sg` from submission until `finish_as` hands it back, and
            // SgList's constructors make their callers keep every segment valid for reads and
            // writes of its length for that whole time; `a..b` lies inside this segment.
            let piece = unsafe { std::slice::from_raw_parts(seg.base.add(a), b - a) };
            if !f(piece) {
                return;
            }
        }
    }

    /// The longest contiguous run of data bytes from `pos`, at most up to `end`.
    fn piece_mut(&mut self, pos: usize, end: usize) -> &mut [u8] {
        let Some(sg) = &self.sg else {
            return &mut self.buf[pos..end];
        };
        let mut off = 0;
        for seg in sg.segments() {
            if pos < off + seg.len {
                let a = pos - off;
                let b = (end - off).min(seg.len);
                // SAFETY: as in `pieces`: the segment is valid for writes of its length while
                // the slot owns the list, `a..b` lies inside it, and `&mut self` makes this the
                // queue's only reference to those bytes.
                return unsafe { std::slice::from_raw_parts_mut(seg.base.add(a), b - a) };
            }
            off += seg.len;
        }
        &mut []
    }

    /// Copies `src` into the data at `pos`.
    fn copy_in(&mut self, pos: usize, src: &[u8]) {
        match &mut self.sg {
            Some(sg) => {
                sg.copy_from_slice(pos, src);
            }
            None => self.buf[pos..pos + src.len()].copy_from_slice(src),
        }
    }
}

enum TxKind {
    /// A PDU header (or a whole small PDU).
    Header {
        bytes: [u8; MAX_HEADER_LEN],
        len: u16,
    },
    /// Data from a command's buffer.
    Data { slot: u16, start: usize, end: usize },
    /// A data digest trailer.
    Digest([u8; DIGEST_LEN]),
}

struct TxItem {
    kind: TxKind,
    /// The first item of a PDU (a termination request may be sent before it).
    pdu_start: bool,
}

#[derive(Clone, Copy)]
enum RxState {
    /// Waiting for (the rest of) a PDU header.
    Header,
    /// Receiving C2HData bytes `pos..end` of slot `slot`.
    Data {
        slot: u16,
        pos: usize,
        end: usize,
        digest: Option<DataDigest>,
        last: bool,
        success: bool,
    },
    /// Waiting for the data digest of a C2HData.
    Trailer {
        slot: u16,
        digest: DataDigest,
        last: bool,
        success: bool,
    },
}

/// One connection, one queue. See the module documentation.
pub(crate) struct TcpQueue {
    sock: TcpStream,
    params: QueueParams,
    enc: PduEncoder,
    dec: PduDecoder,
    ic_req: IcReq,
    neg: Option<Negotiated>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: usize,
    rx: Box<[u8]>,
    rx_lo: usize,
    rx_hi: usize,
    rx_state: RxState,
    tx: VecDeque<TxItem>,
    /// Bytes of the front transmit item already written.
    tx_off: usize,
    done: Vec<Completion>,
    dead: bool,
    stats: QueueStats,
}

impl TcpQueue {
    /// Connects to `addr` and performs the ICReq/ICResp exchange (§3.3). No NVMe command has
    /// been sent yet: the caller sends Connect next.
    pub(crate) fn connect(
        addr: SocketAddr,
        params: QueueParams,
        timeout: Duration,
    ) -> Result<TcpQueue, Error> {
        let deadline = Instant::now() + timeout;
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        let depth = usize::from(params.depth);
        let max_c2h = u32::try_from(params.max_data).unwrap_or(u32::MAX);
        let mut q = TcpQueue {
            sock,
            params,
            enc: PduEncoder::new(Role::Host),
            dec: PduDecoder::host(max_c2h),
            ic_req: IcReq {
                pfv: crate::transport::tcp::pdu::PFV_1_0,
                // Linux nvmet rejects any HPDA but 0; we have no alignment needs either.
                hpda: 0,
                hdgst: params.hdgst,
                ddgst: params.ddgst,
                // One outstanding R2T per command (0's based).
                maxr2t: 0,
            },
            neg: None,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..params.depth).rev().collect(),
            in_flight: 0,
            rx: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            rx_lo: 0,
            rx_hi: 0,
            rx_state: RxState::Header,
            tx: VecDeque::with_capacity(depth * 4),
            tx_off: 0,
            done: Vec::with_capacity(depth),
            dead: false,
            stats: QueueStats::default(),
        };
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = q.enc.ic_req(&q.ic_req, &mut hdr);
        q.push_header(&hdr[..n], true);
        while q.neg.is_none() {
            q.step()?;
            if q.neg.is_some() {
                break;
            }
            wait_until(&mut q, deadline, "ICResp")?;
        }
        Ok(q)
    }

    fn push_header(&mut self, b: &[u8], pdu_start: bool) {
        let mut bytes = [0u8; MAX_HEADER_LEN];
        bytes[..b.len()].copy_from_slice(b);
        self.tx.push_back(TxItem {
            kind: TxKind::Header {
                bytes,
                len: b.len() as u16,
            },
            pdu_start,
        });
    }

    /// Queues `buf[start..end]` of `slot`, and its data digest if negotiated.
    fn push_data(&mut self, slot: u16, start: usize, end: usize) {
        let s = &mut self.slots[usize::from(slot)];
        s.tx_refs += 1;
        let digest = self.neg.is_some_and(|n| n.ddgst).then(|| {
            let mut d = DataDigest::new();
            s.pieces(start, end, |p| {
                d.update(p);
                true
            });
            d.value()
        });
        self.tx.push_back(TxItem {
            kind: TxKind::Data { slot, start, end },
            pdu_start: false,
        });
        if let Some(d) = digest {
            self.tx.push_back(TxItem {
                kind: TxKind::Digest(d.to_le_bytes()),
                pdu_start: false,
            });
        }
    }

    /// Writes as much of the transmit queue as the socket takes.
    fn flush(&mut self) -> Result<(), Error> {
        while !self.tx.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for item in self.tx.iter() {
                if n == MAX_IOV {
                    break;
                }
                let skip = if n == 0 { self.tx_off } else { 0 };
                let bytes: &[u8] = match &item.kind {
                    TxKind::Header { bytes, len } => &bytes[..usize::from(*len)],
                    TxKind::Data { slot, start, end } => {
                        // A scatter-gather command's range may span several segments: one
                        // iovec each (a partly sent range resumes at `tx_off`).
                        self.slots[usize::from(*slot)].pieces(start + skip, *end, |p| {
                            iov[n] = IoSlice::new(p);
                            n += 1;
                            n < MAX_IOV
                        });
                        continue;
                    }
                    TxKind::Digest(d) => d,
                };
                iov[n] = IoSlice::new(&bytes[skip..]);
                n += 1;
            }
            let written = match (&self.sock).write_vectored(&iov[..n]) {
                Ok(0) => return Err(Error::Closed),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Io(e)),
            };
            self.advance_tx(written);
        }
        Ok(())
    }

    /// Drops `written` bytes from the front of the transmit queue.
    fn advance_tx(&mut self, mut written: usize) {
        while written > 0 {
            let front = self.tx.front().expect("written bytes came from the queue");
            let len = match &front.kind {
                TxKind::Header { len, .. } => usize::from(*len),
                TxKind::Data { start, end, .. } => end - start,
                TxKind::Digest(_) => DIGEST_LEN,
            } - self.tx_off;
            if written < len {
                self.tx_off += written;
                return;
            }
            written -= len;
            self.tx_off = 0;
            let item = self.tx.pop_front().expect("front exists");
            if let TxKind::Data { slot, .. } = item.kind {
                let s = &mut self.slots[usize::from(slot)];
                s.tx_refs -= 1;
                if s.tx_refs == 0
                    && let Some(cqe) = s.held.take()
                {
                    self.finish(slot, cqe);
                }
            }
        }
    }

    /// Reads from the socket into the receive buffer; `false` if nothing was available.
    fn fill(&mut self) -> Result<bool, Error> {
        if self.rx_lo == self.rx_hi {
            self.rx_lo = 0;
            self.rx_hi = 0;
        } else if self.rx_hi == self.rx.len() || self.rx.len() - self.rx_hi < MAX_HEADER_LEN {
            self.rx.copy_within(self.rx_lo..self.rx_hi, 0);
            self.rx_hi -= self.rx_lo;
            self.rx_lo = 0;
        }
        debug_assert!(
            self.rx_hi < self.rx.len(),
            "a PDU header never fills the buffer"
        );
        loop {
            match (&self.sock).read(&mut self.rx[self.rx_hi..]) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => {
                    self.rx_hi += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// Handles every complete PDU that has arrived.
    fn receive(&mut self) -> Result<(), Error> {
        loop {
            let avail = self.rx_hi - self.rx_lo;
            match self.rx_state {
                RxState::Header => {
                    let decoded = self.dec.decode_header(&self.rx[self.rx_lo..self.rx_hi]);
                    let layout = match decoded {
                        Ok(Decoded::Ready(l)) => l,
                        Ok(Decoded::NeedMore(_)) => {
                            if !self.fill()? {
                                return Ok(());
                            }
                            continue;
                        }
                        Err(PduError::Fatal(f)) => {
                            self.send_term_req(f.fes, f.fei, f.echo_len);
                            return Err(Error::Pdu(PduError::Fatal(f)));
                        }
                        Err(e) => return Err(Error::Pdu(e)),
                    };
                    // Small PDUs are handled whole; C2HData once its header and padding are in.
                    let need = match layout.header {
                        PduHeader::C2hData(_) => layout.data.start,
                        _ => layout.plen,
                    };
                    if avail < need {
                        if !self.fill()? {
                            return Ok(());
                        }
                        continue;
                    }
                    self.handle_pdu(&layout)?;
                    self.rx_lo += need;
                }
                RxState::Data {
                    slot,
                    pos,
                    end,
                    mut digest,
                    last,
                    success,
                } => {
                    let s = &mut self.slots[usize::from(slot)];
                    let want = end - pos;
                    let n = if avail > 0 {
                        let n = want.min(avail);
                        s.copy_in(pos, &self.rx[self.rx_lo..self.rx_lo + n]);
                        self.rx_lo += n;
                        n
                    } else if want >= DIRECT_READ_MIN {
                        match (&self.sock).read(s.piece_mut(pos, end)) {
                            Ok(0) => return Err(Error::Closed),
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(Error::Io(e)),
                        }
                    } else {
                        if !self.fill()? {
                            return Ok(());
                        }
                        continue;
                    };
                    if let Some(d) = digest.as_mut() {
                        s.pieces(pos, pos + n, |p| {
                            d.update(p);
                            true
                        });
                    }
                    let pos = pos + n;
                    self.rx_state = if pos < end {
                        RxState::Data {
                            slot,
                            pos,
                            end,
                            digest,
                            last,
                            success,
                        }
                    } else if let Some(digest) = digest {
                        RxState::Trailer {
                            slot,
                            digest,
                            last,
                            success,
                        }
                    } else {
                        self.data_done(slot, last, success);
                        RxState::Header
                    };
                }
                RxState::Trailer {
                    slot,
                    digest,
                    last,
                    success,
                } => {
                    if avail < DIGEST_LEN {
                        if !self.fill()? {
                            return Ok(());
                        }
                        continue;
                    }
                    let trailer = &self.rx[self.rx_lo..self.rx_lo + DIGEST_LEN];
                    if !digest.matches(trailer) {
                        // A data digest error fails the command, not the connection
                        // (NVMe/TCP 1.0 §3.6.2.9 / the codec's `PduError::DataDigest`).
                        self.slots[usize::from(slot)].digest_error = true;
                        self.stats.data_digest_errors += 1;
                    }
                    self.rx_lo += DIGEST_LEN;
                    self.data_done(slot, last, success);
                    self.rx_state = RxState::Header;
                }
            }
        }
    }

    /// The end of a C2HData PDU's data: with SUCCESS the command is complete (§3.6.2.9: no
    /// CapsuleResp follows).
    fn data_done(&mut self, slot: u16, last: bool, success: bool) {
        if last && success {
            let s = &self.slots[usize::from(slot)];
            let status = if s.digest_error {
                Status::TRANSIENT_TRANSPORT_ERROR
            } else {
                Status::SUCCESS
            };
            let cqe = Cqe {
                cid: slot,
                sqid: self.params.qid,
                status,
                sqhd: 0xffff,
                ..Cqe::default()
            };
            self.stats.c2h_success += 1;
            self.complete(slot, cqe);
        }
    }

    /// Acts on one validated PDU whose bytes (its header, for C2HData) are in the receive
    /// buffer at `rx_lo`. Does not consume them.
    fn handle_pdu(&mut self, l: &PduLayout) -> Result<(), Error> {
        match l.header {
            PduHeader::IcResp(r) => {
                if (r.hdgst && !self.ic_req.hdgst) || (r.ddgst && !self.ic_req.ddgst) {
                    return Err(Error::Negotiation(
                        "ICResp enabled a digest the host did not request",
                    ));
                }
                let n = Negotiated::from_exchange(&self.ic_req, &r);
                self.dec.establish(n);
                self.enc = PduEncoder::established(Role::Host, &n);
                self.neg = Some(n);
                Ok(())
            }
            PduHeader::C2hTermReq(t) => Err(Error::Terminated {
                fes: t.fes,
                fei: t.fei,
            }),
            PduHeader::CapsuleResp(r) => {
                let cid = r.cqe.cid;
                match self.slots.get(usize::from(cid)) {
                    Some(s) if s.busy && s.held.is_none() => {}
                    // CID at byte 12 of the CQE, byte 20 of the PDU.
                    _ => return Err(self.violation(Fes::INVALID_HEADER_FIELD, 20, l, "CID")),
                }
                let mut cqe = r.cqe;
                if self.slots[usize::from(cid)].digest_error && cqe.status.is_success() {
                    cqe.status = Status::TRANSIENT_TRANSPORT_ERROR;
                }
                self.stats.capsule_resps += 1;
                self.complete(cid, cqe);
                Ok(())
            }
            PduHeader::C2hData(d) => {
                self.stats.c2h_pdus += 1;
                let ok_slot = matches!(
                    self.slots.get(usize::from(d.cccid)),
                    Some(s) if s.busy && s.to_host && s.held.is_none()
                );
                if !ok_slot {
                    return Err(self.violation(Fes::INVALID_HEADER_FIELD, 8, l, "C2HData CCCID"));
                }
                let len = self.slots[usize::from(d.cccid)].data_len();
                let (start, datal) = (d.datao as usize, d.datal as usize);
                if start.checked_add(datal).is_none_or(|end| end > len) {
                    return Err(self.violation(
                        Fes::DATA_TRANSFER_OUT_OF_RANGE,
                        0,
                        l,
                        "C2HData outside the command's buffer",
                    ));
                }
                self.rx_state = RxState::Data {
                    slot: d.cccid,
                    pos: start,
                    end: start + datal,
                    digest: l.data_digest.then(DataDigest::new),
                    last: d.last,
                    success: d.success,
                };
                Ok(())
            }
            PduHeader::R2t(r) => {
                self.stats.r2ts += 1;
                let ok_slot = matches!(
                    self.slots.get(usize::from(r.cccid)),
                    Some(s) if s.busy && s.to_ctrl && !s.in_capsule && s.held.is_none()
                );
                if !ok_slot {
                    return Err(self.violation(Fes::INVALID_HEADER_FIELD, 8, l, "R2T CCCID"));
                }
                let len = self.slots[usize::from(r.cccid)].data_len();
                let (start, r2tl) = (r.r2to as usize, r.r2tl as usize);
                if start.checked_add(r2tl).is_none_or(|end| end > len) {
                    return Err(self.violation(
                        Fes::DATA_TRANSFER_OUT_OF_RANGE,
                        0,
                        l,
                        "R2T outside the command's buffer",
                    ));
                }
                // §3.4.1: answer with H2CData PDUs of at most MAXH2CDATA bytes, the last of
                // the R2T with LAST_PDU.
                let chunk = self.neg.unwrap_or_default().maxh2cdata as usize;
                let end = start + r2tl;
                let mut off = start;
                while off < end {
                    let n = chunk.min(end - off);
                    let mut hdr = [0u8; MAX_HEADER_LEN];
                    let h = H2cData {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        datao: off as u32,
                        datal: n as u32,
                        last: off + n == end,
                    };
                    let hl = self.enc.h2c_data(&h, &mut hdr);
                    self.push_header(&hdr[..hl], true);
                    self.push_data(r.cccid, off, off + n);
                    self.stats.h2c_pdus += 1;
                    off += n;
                }
                Ok(())
            }
            // The decoder only lets through what a host receives.
            PduHeader::IcReq(_)
            | PduHeader::H2cTermReq(_)
            | PduHeader::CapsuleCmd(_)
            | PduHeader::H2cData(_) => Err(self.violation(Fes::INVALID_HEADER_FIELD, 0, l, "PDU")),
        }
    }

    /// A well-formed PDU that breaks the queue's state: terminate with `fes`.
    fn violation(&mut self, fes: Fes, fei: u32, l: &PduLayout, what: &'static str) -> Error {
        self.send_term_req(fes, fei, l.header_len.min(128));
        Error::Protocol { what, fes }
    }

    /// A command finished: hand it out, or hold it while its data is still being sent.
    fn complete(&mut self, slot: u16, cqe: Cqe) {
        let s = &mut self.slots[usize::from(slot)];
        if s.tx_refs > 0 {
            s.held = Some(cqe);
        } else {
            self.finish(slot, cqe);
        }
    }

    fn finish(&mut self, slot: u16, cqe: Cqe) {
        self.finish_as(slot, cqe, false);
    }

    fn finish_as(&mut self, slot: u16, cqe: Cqe, lost: bool) {
        let s = &mut self.slots[usize::from(slot)];
        s.busy = false;
        self.done.push(Completion {
            tag: s.tag,
            cqe,
            buf: std::mem::take(&mut s.buf),
            sg: s.sg.take().unwrap_or_default(),
            opcode: s.opcode,
            internal: s.internal,
            lost,
        });
        self.free.push(slot);
        self.in_flight -= 1;
    }

    /// Best effort H2CTermReq echoing the `echo_len` bytes at `rx_lo` (§3.6.2.4), if the
    /// transmit stream is at a PDU boundary (else the request would land inside a PDU).
    fn send_term_req(&mut self, fes: Fes, fei: u32, echo_len: usize) {
        let at_boundary = self.tx_off == 0 && self.tx.front().is_none_or(|i| i.pdu_start);
        if !at_boundary {
            return;
        }
        let echo_end = (self.rx_lo + echo_len).min(self.rx_hi);
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = self
            .enc
            .term_req(fes, fei, &self.rx[self.rx_lo..echo_end], &mut out);
        let _ = (&self.sock).write(&out[..n]);
    }
}

impl Engine for TcpQueue {
    fn negotiated(&self) -> Option<Negotiated> {
        self.neg
    }

    /// The queue's parameters.
    fn params(&self) -> &QueueParams {
        &self.params
    }

    /// The queue's counters.
    fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Commands in flight.
    fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the connection is gone.
    fn is_dead(&self) -> bool {
        self.dead
    }

    /// The socket, for an external `poll`/`epoll`.
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether bytes are waiting to be written.
    fn has_tx(&self) -> bool {
        !self.tx.is_empty()
    }

    fn submit_inner(
        &mut self,
        mut sqe: Sqe,
        xfer: Xfer,
        buf: CmdData,
        tag: u64,
        internal: bool,
    ) -> Result<(), (RejectReason, CmdData)> {
        let len = match transfer_len(self.dead, xfer, &buf, &self.params) {
            Ok(len) => len,
            Err(reason) => return Err((reason, buf)),
        };
        let Some(cid) = self.free.pop() else {
            return Err((RejectReason::Full, buf));
        };
        let in_capsule = xfer == Xfer::ToController && len <= self.params.max_in_capsule;
        // NVMe/TCP 1.0 §3.3.5: in-capsule data is an SGL Data Block with the Offset sub type;
        // anything else is a Transport SGL Data Block moved by R2T/H2CData or C2HData; a
        // command without data carries a zero-length Transport SGL Data Block.
        let sgl = if in_capsule {
            SglDescriptor::in_capsule(0, len as u32)
        } else {
            SglDescriptor::transport_data_block(len as u32)
        };
        sqe.set_cid(cid);
        sqe.set_sgl1(&sgl);
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let icd = if in_capsule { len as u32 } else { 0 };
        let n = self.enc.capsule_cmd(&sqe, icd, &mut hdr);
        self.push_header(&hdr[..n], true);
        let s = &mut self.slots[usize::from(cid)];
        let (buf, sg) = match buf {
            CmdData::Vec(v) => (v, None),
            CmdData::Sg(l) => (Vec::new(), Some(l)),
        };
        *s = Slot {
            busy: true,
            internal,
            tag,
            opcode: sqe.opc(),
            to_host: xfer == Xfer::FromController,
            to_ctrl: xfer == Xfer::ToController,
            in_capsule,
            buf,
            sg,
            tx_refs: 0,
            digest_error: false,
            held: None,
        };
        if in_capsule {
            self.push_data(cid, 0, len);
            self.stats.in_capsule += 1;
        }
        self.stats.commands += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// Makes progress without blocking: writes queued bytes, reads and handles arrived PDUs,
    /// writes H2CData the R2Ts asked for. On a fatal error every command in flight completes
    /// with [`HOST_PATHING_ERROR`] and the queue is dead.
    fn step(&mut self) -> Result<(), Error> {
        if self.dead {
            return Err(Error::Disconnected);
        }
        let r = self
            .flush()
            .and_then(|()| self.receive())
            .and_then(|()| self.flush());
        r.map_err(|e| self.fail(e))
    }

    /// Blocks until the socket is readable (or writable, with bytes queued) or `timeout`
    /// passes (`None`: forever).
    fn wait(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        if self.dead {
            return Err(Error::Disconnected);
        }
        let mut events = libc::POLLIN;
        if !self.tx.is_empty() {
            events |= libc::POLLOUT;
        }
        poll_fds(&[(self.sock.as_raw_fd(), events)], timeout).map(|_| ())
    }

    /// Tears the queue down after `e`: closes the socket, completes every command in flight
    /// with Host Pathing Error (their buffers go back to the caller), returns `e`.
    fn fail(&mut self, e: Error) -> Error {
        if self.dead {
            return e;
        }
        self.dead = true;
        let _ = self.sock.shutdown(Shutdown::Both);
        self.tx.clear();
        self.tx_off = 0;
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.busy {
                s.tx_refs = 0;
                s.held = None;
                let cqe = lost_cqe(i as u16, self.params.qid);
                self.finish_as(i as u16, cqe, true);
            }
        }
        e
    }

    fn done(&mut self) -> &mut Vec<Completion> {
        &mut self.done
    }
}

impl Drop for TcpQueue {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl std::fmt::Debug for TcpQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpQueue")
            .field("qid", &self.params.qid)
            .field("depth", &self.params.depth)
            .field("in_flight", &self.in_flight)
            .field("negotiated", &self.neg)
            .field("dead", &self.dead)
            .finish()
    }
}
