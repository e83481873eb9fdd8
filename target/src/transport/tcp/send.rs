//! The send side of one NVMe/TCP connection: a byte stream of PDU headers, digests and small
//! payloads (`tx`), with read data interleaved straight from the read's buffer (no copy), sent
//! by `sendmsg` with many iovecs at once and never blocking.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use ferroblk_bdev::{AlignedBuf, bufpool};

use super::pdu::{
    C2hData, DataDigest, FatalError, Fes, IcResp, MAX_HEADER_LEN, Negotiated, PduEncoder, R2t, Role,
};
use crate::spec::Cqe;

/// Most data bytes per H2CData (and C2HData) PDU: the MAXH2CDATA the target offers.
pub const MAX_H2C_DATA: u32 = 128 * 1024;
/// Send buffer reserved once Connect succeeds.
const TX_CAPACITY: usize = 64 * 1024;
/// iovecs one `sendmsg` takes at most.
const TX_IOVECS: usize = 64;

/// One C2HData PDU's data, sent from the read's buffer.
struct TxData {
    /// The position in `tx` after which it goes (its PDU header ends there).
    at: usize,
    /// The data: `len` bytes inside the buffer held by this part or, for all but the last part
    /// of a transfer, by a later part of the same transfer (FIFO: it outlives this one).
    ptr: *const u8,
    len: usize,
    sent: usize,
    /// The buffer, on the transfer's last part; back to the pool once that part is sent.
    buf: Option<AlignedBuf>,
}

/// What [`SendStream::flush`] did.
pub enum Flushed {
    /// Sent what it could.
    Sent {
        /// Bytes sent.
        bytes: usize,
        /// Whether the socket's buffer is full with bytes still queued.
        blocked: bool,
    },
    /// The socket failed: the connection is over (everything queued was dropped).
    Failed(std::io::Error),
}

/// A connection's outgoing PDUs. See the module documentation.
pub struct SendStream {
    encoder: PduEncoder,
    ddgst: bool,
    /// The stream's own bytes (PDU headers, digests, small payloads); sent from `tx_off`.
    tx: Vec<u8>,
    tx_off: usize,
    /// Read data sent from the read's buffer, each part between `tx[..at]` and `tx[at..]` for
    /// its `at`, in order.
    tx_data: VecDeque<TxData>,
    /// Bytes of `tx_data` not yet sent.
    tx_data_bytes: usize,
    scratch: [u8; MAX_HEADER_LEN],
}

impl SendStream {
    /// A stream before the ICReq/ICResp exchange.
    pub fn new() -> SendStream {
        SendStream {
            encoder: PduEncoder::new(Role::Controller),
            ddgst: false,
            tx: Vec::new(),
            tx_off: 0,
            tx_data: VecDeque::new(),
            tx_data_bytes: 0,
            scratch: [0; MAX_HEADER_LEN],
        }
    }

    /// Encodes with what ICReq/ICResp negotiated (digests) from now on.
    pub fn establish(&mut self, neg: &Negotiated) {
        self.encoder = PduEncoder::established(Role::Controller, neg);
        self.ddgst = neg.ddgst;
    }

    /// Reserves what a connected queue needs, so that sending allocates nothing per command.
    pub fn reserve(&mut self, queue_entries: usize) {
        self.tx.reserve(TX_CAPACITY);
        self.tx_data.reserve(4 * queue_entries);
    }

    /// Bytes queued to send.
    pub fn pending(&self) -> usize {
        self.tx.len() - self.tx_off + self.tx_data_bytes
    }

    fn push_header(&mut self, n: usize) {
        self.tx.extend_from_slice(&self.scratch[..n]);
    }

    /// Queues an ICResp.
    pub fn ic_resp(&mut self, r: &IcResp) {
        let n = self.encoder.ic_resp(r, &mut self.scratch);
        self.push_header(n);
    }

    /// Queues a CapsuleResp.
    pub fn capsule_resp(&mut self, cqe: &Cqe) {
        let n = self.encoder.capsule_resp(cqe, &mut self.scratch);
        self.push_header(n);
    }

    /// Queues an R2T.
    pub fn r2t(&mut self, r: &R2t) {
        let n = self.encoder.r2t(r, &mut self.scratch);
        self.push_header(n);
    }

    /// Queues a C2HTermReq with `fes` and `fei`.
    pub fn term_req(&mut self, fes: Fes, fei: u32) {
        let n = self.encoder.term_req(fes, fei, &[], &mut self.scratch);
        self.push_header(n);
    }

    /// Queues the C2HTermReq for a fatal error the decoder found in `received`.
    pub fn term_req_for(&mut self, err: &FatalError, received: &[u8]) {
        let n = self.encoder.term_req_for(err, received, &mut self.scratch);
        self.push_header(n);
    }

    /// Queues the header of a C2HData PDU carrying `chunk` bytes at offset `off`.
    fn c2h_header(&mut self, cid: u16, off: usize, chunk: usize, last: bool) {
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

    /// Queues C2HData PDUs for the first `len` bytes of a read's buffer, sent from the buffer
    /// itself; the buffer goes back to the reactor's pool once sent.
    pub fn read_data(&mut self, cid: u16, buf: AlignedBuf, len: usize) {
        let base = buf.as_slice().as_ptr();
        let mut buf = Some(buf);
        let mut off = 0;
        while off < len {
            let chunk = (len - off).min(MAX_H2C_DATA as usize);
            let last = off + chunk == len;
            self.c2h_header(cid, off, chunk, last);
            // SAFETY: `off + chunk <= len <= buf.len()`: inside the buffer.
            let ptr = unsafe { base.add(off) };
            let digest = self.ddgst.then(|| {
                // SAFETY: the chunk is inside the live buffer (`buf` is still held here).
                let part = unsafe { std::slice::from_raw_parts(ptr, chunk) };
                DataDigest::of(&[part])
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
            bufpool::put(b); // len == 0: nothing was queued
        }
    }

    /// Queues C2HData PDUs carrying a copy of `data` (admin payloads).
    pub fn data(&mut self, cid: u16, data: &[u8]) {
        let mut off = 0;
        while off < data.len() {
            let chunk = (data.len() - off).min(MAX_H2C_DATA as usize);
            let last = off + chunk == data.len();
            self.c2h_header(cid, off, chunk, last);
            let part = &data[off..off + chunk];
            self.tx.extend_from_slice(part);
            if self.ddgst {
                let d = DataDigest::of(&[part]);
                self.tx.extend_from_slice(&d.to_le_bytes());
            }
            off += chunk;
        }
    }

    /// Sends what is queued on `fd` (non-blocking) until done or the socket is full.
    pub fn flush(&mut self, fd: RawFd) -> Flushed {
        let mut sent = 0;
        while self.pending() > 0 {
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
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => {
                        return Flushed::Sent {
                            bytes: sent,
                            blocked: true,
                        };
                    }
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.clear();
                        return Flushed::Failed(e);
                    }
                }
            }
            self.advance(n as usize);
            sent += n as usize;
        }
        Flushed::Sent {
            bytes: sent,
            blocked: false,
        }
    }

    /// Moves the stream `n` sent bytes forward, returning finished buffers to the pool.
    fn advance(&mut self, mut n: usize) {
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
                bufpool::put(b);
            }
        }
        if self.pending() == 0 {
            self.tx.clear();
            self.tx_off = 0;
        } else if self.tx_off >= TX_CAPACITY / 2 && 2 * self.tx_off >= self.tx.len() {
            // A stream that never empties (a host reading as fast as responses come, a read's
            // data always queued) would otherwise keep every byte it ever sent: drop the sent
            // part once it is at least half of `tx` (amortized: the bytes moved are fewer
            // than those dropped). Every part's position is at or after `tx_off`.
            let off = self.tx_off;
            self.tx.drain(..off);
            self.tx_off = 0;
            for d in self.tx_data.iter_mut() {
                debug_assert!(d.at >= off);
                d.at -= off;
            }
        }
    }

    /// Forgets everything queued to send (the connection is closing on a send error).
    pub fn clear(&mut self) {
        self.tx.clear();
        self.tx_off = 0;
        while let Some(d) = self.tx_data.pop_front() {
            if let Some(b) = d.buf {
                bufpool::put(b);
            }
        }
        self.tx_data_bytes = 0;
    }
}

impl Default for SendStream {
    fn default() -> SendStream {
        SendStream::new()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;
    use crate::transport::tcp::pdu::{Decoded, IcReq, PduDecoder, PduHeader};

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into a live two-int array.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: two new descriptors nothing else owns.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_stream_that_never_empties_keeps_its_buffer_bounded_and_its_bytes_in_order() {
        let (ours, peer) = socketpair();
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        };
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            hdgst: false,
            ddgst: false,
            maxh2cdata: MAX_H2C_DATA,
        };
        let neg = Negotiated::from_exchange(&req, &resp);
        let mut s = SendStream::new();
        s.establish(&neg);
        s.reserve(32);
        let mut dec = PduDecoder::host(1 << 20);
        dec.establish(neg);
        let (mut rx, mut next_cid, mut max_tx) = (Vec::new(), 0u32, 0usize);
        let queue = |s: &mut SendStream, round: u32| {
            let cid = round as u16;
            s.capsule_resp(&Cqe::new(cid, crate::spec::Status::SUCCESS));
            let mut b = bufpool::get(4096);
            b.as_mut_slice().fill(cid as u8);
            s.read_data(cid, b, 4096);
            matches!(
                s.flush(ours.as_raw_fd()),
                Flushed::Sent { blocked: true, .. }
            )
        };
        // First the socket fills up; from then on each round queues a response and a read's
        // data and lets the peer read a little less than that: the stream never empties.
        let mut round = 0u32;
        while !queue(&mut s, round) {
            round += 1;
        }
        for _ in 0..20_000 {
            round += 1;
            queue(&mut s, round);
            max_tx = max_tx.max(s.tx.len());
            let mut chunk = [0u8; 4000];
            // SAFETY: reads into a live buffer of its length.
            let n = unsafe {
                libc::recv(
                    peer.as_raw_fd(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                rx.extend_from_slice(&chunk[..n as usize]);
            }
            while let Ok(Decoded::Ready(l)) = dec.decode(&rx) {
                match l.header {
                    PduHeader::CapsuleResp(r) => {
                        assert_eq!(r.cqe.cid, next_cid as u16, "responses in order");
                    }
                    PduHeader::C2hData(d) => {
                        assert_eq!(d.cccid, next_cid as u16);
                        assert!(rx[l.data.clone()].iter().all(|&x| x == next_cid as u8));
                        next_cid += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
                rx.drain(..l.plen);
            }
        }
        assert!(s.pending() > 0, "the stream never emptied");
        assert!(
            next_cid > 100,
            "the peer read the stream ({next_cid} reads)"
        );
        assert!(
            max_tx <= 4 * TX_CAPACITY,
            "the send buffer grew to {max_tx} bytes"
        );
    }
}
