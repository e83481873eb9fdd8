//! The vhost-user wire protocol (QEMU `docs/interop/vhost-user.rst`): message header, payloads,
//! and file-descriptor passing over the Unix socket.
//!
//! Every message is `u32 request, u32 flags, u32 size` followed by `size` bytes of payload; file
//! descriptors travel as `SCM_RIGHTS` ancillary data with the header. Everything read from the
//! socket is untrusted: sizes are bounded and payloads are parsed field by field.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Protocol version in the low bits of `flags`.
pub const VERSION: u32 = 0x1;
/// Flag: this message is a reply.
pub const FLAG_REPLY: u32 = 1 << 2;
/// Flag: the sender wants an acknowledgement (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 1 << 3;
/// Largest payload accepted (a memory table is 8 + 8 * 32 bytes; config space is small).
pub const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors accepted with one message.
pub const MAX_FDS: usize = 8;
/// Regions of a `SET_MEM_TABLE` message.
pub const MAX_MEM_REGIONS: usize = 8;

/// Front-end requests (`VHOST_USER_*`).
#[allow(missing_docs)]
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Back-end requests sent on the back-end channel.
pub mod backend_req {
    /// The device configuration space changed (a resize).
    pub const CONFIG_CHANGE_MSG: u32 = 2;
}

/// Protocol feature bits (`VHOST_USER_PROTOCOL_F_*`).
#[allow(missing_docs)]
pub mod pf {
    pub const MQ: u64 = 1 << 0;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const RESET_DEVICE: u64 = 1 << 13;
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
}

/// `VHOST_USER_F_PROTOCOL_FEATURES`, a virtio feature bit owned by vhost-user.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Request code.
    pub request: u32,
    /// Flags (version, reply, need-reply).
    pub flags: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Attached descriptors.
    pub fds: Vec<OwnedFd>,
}

/// A malformed message or a broken socket; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed.
    #[error("socket")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("front-end disconnected")]
    Closed,
    /// A message broke the protocol.
    #[error("bad message {request}: {reason}")]
    Bad {
        /// Request code.
        request: u32,
        /// What is wrong.
        reason: String,
    },
}

impl Message {
    /// A `Bad` error for this message.
    pub fn bad(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Bad {
            request: self.request,
            reason: reason.into(),
        }
    }

    /// Whether the front-end asked for an acknowledgement.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Reads a little-endian u32 at `off` of the payload.
    pub fn u32_at(&self, off: usize) -> Result<u32, ProtocolError> {
        self.payload
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| self.bad(format!("payload too short for u32 at {off}")))
    }

    /// Reads a little-endian u64 at `off` of the payload.
    pub fn u64_at(&self, off: usize) -> Result<u64, ProtocolError> {
        self.payload
            .get(off..off + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| self.bad(format!("payload too short for u64 at {off}")))
    }

    /// Requires the payload to be exactly `n` bytes.
    pub fn expect_len(&self, n: usize) -> Result<(), ProtocolError> {
        if self.payload.len() != n {
            return Err(self.bad(format!(
                "payload is {} bytes, expected {n}",
                self.payload.len()
            )));
        }
        Ok(())
    }

    /// Takes the single attached descriptor.
    pub fn take_fd(&mut self) -> Result<OwnedFd, ProtocolError> {
        if self.fds.len() != 1 {
            return Err(self.bad(format!(
                "expected 1 file descriptor, got {}",
                self.fds.len()
            )));
        }
        Ok(self.fds.remove(0))
    }
}

/// Receives one message (blocking).
pub fn recv(sock: &UnixStream) -> Result<Message, ProtocolError> {
    let mut hdr = [0u8; 12];
    let fds = recv_with_fds(sock, &mut hdr)?;
    let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
    if flags & 0x3 != VERSION {
        return Err(ProtocolError::Bad {
            request,
            reason: format!("unsupported protocol version in flags {flags:#x}"),
        });
    }
    if size > MAX_PAYLOAD {
        return Err(ProtocolError::Bad {
            request,
            reason: format!("payload of {size} bytes is too large"),
        });
    }
    let mut payload = vec![0u8; size];
    read_exact(sock, &mut payload)?;
    Ok(Message {
        request,
        flags,
        payload,
        fds,
    })
}

fn read_exact(sock: &UnixStream, mut buf: &mut [u8]) -> Result<(), ProtocolError> {
    use std::io::Read;
    let mut s = sock;
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes, collecting descriptors sent with the first of them.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> Result<Vec<OwnedFd>, ProtocolError> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        // Room for MAX_FDS descriptors (CMSG_SPACE of 8 ints is 48 bytes; 64 is ample).
        let mut cbuf = [0u64; 8];
        // SAFETY: a zeroed msghdr is valid; the pointers set below are live for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: recvmsg writes only into the iovec's buffer and the control buffer, both valid
        // for the lengths given.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        // Take ownership of every descriptor received, even if we then reject the message.
        // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel just filled.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` points into `cbuf` (checked non-null by the loop).
            let c = unsafe { &*cmsg };
            if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is a pure computation.
                let data_len = c.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
                let count = data_len / std::mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at `count` descriptors inside this header.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: reading the i-th descriptor of the array; unaligned-safe read.
                    let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                    // SAFETY: the kernel installed this descriptor for us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(ProtocolError::Bad {
                request: 0,
                reason: "too many file descriptors".into(),
            });
        }
        if n == 0 {
            return Err(ProtocolError::Closed);
        }
        got += n as usize;
        if fds.len() > MAX_FDS {
            return Err(ProtocolError::Bad {
                request: 0,
                reason: "too many file descriptors".into(),
            });
        }
    }
    Ok(fds)
}

/// Sends a message with optional descriptors.
pub fn send(
    sock: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&request.to_le_bytes());
    hdr[4..8].copy_from_slice(&(flags | VERSION).to_le_bytes());
    hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut iov = [
        libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    let mut cbuf = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; every pointer set below is live during sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = if payload.is_empty() { 1 } else { 2 };
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        assert!(
            space <= std::mem::size_of_val(&cbuf),
            "too many descriptors to send"
        );
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is large enough (asserted) and CMSG_FIRSTHDR of it is
        // non-null; the writes stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    let total = hdr.len() + payload.len();
    // SAFETY: sendmsg reads the iovecs and control buffer set up above.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < total {
        // The rest without descriptors (rare: a full socket buffer).
        use std::io::Write;
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&hdr);
        all.extend_from_slice(payload);
        (&*sock).write_all(&all[n as usize..])?;
    }
    Ok(())
}

/// Sends the reply to `m` with `payload`.
pub fn reply(sock: &UnixStream, m: &Message, payload: &[u8]) -> io::Result<()> {
    send(sock, m.request, FLAG_REPLY, payload, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send(
            &a,
            req::SET_VRING_KICK,
            0,
            &7u64.to_le_bytes(),
            &[f.as_raw_fd()],
        )
        .unwrap();
        let mut m = recv(&b).unwrap();
        assert_eq!(m.request, req::SET_VRING_KICK);
        assert_eq!(m.u64_at(0).unwrap(), 7);
        assert!(m.take_fd().is_ok());
        assert!(m.u64_at(4).is_err());
    }

    #[test]
    fn oversized_and_wrong_version_messages_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write;
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&req::GET_CONFIG.to_le_bytes());
        hdr.extend_from_slice(&VERSION.to_le_bytes());
        hdr.extend_from_slice(&(1u32 << 30).to_le_bytes());
        (&a).write_all(&hdr).unwrap();
        assert!(matches!(recv(&b), Err(ProtocolError::Bad { .. })));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        assert!(matches!(recv(&b), Err(ProtocolError::Bad { .. })));
        drop(a);
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 0, 0]).unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(ProtocolError::Closed)));
    }
}
