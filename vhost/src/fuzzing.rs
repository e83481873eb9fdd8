//! Fuzz target bodies (not a public API): the vhost-user control connection of a live export,
//! and descriptor-chain walking plus virtio-blk request parsing of a queue poller. Called by the
//! cargo-fuzz targets in `fuzz/` and replayed over the checked-in corpus by the tests below.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use ferroblk_bdev::fuzzing::background_panics;
use ferroblk_bdev::malloc::MallocBdev;
use ferroblk_bdev::reactor::{Poller, ReactorConfig, Reactors};
use ferroblk_bdev::{Bdev, BlockSize};

use crate::memory::{GuestMemory, RegionDesc, memfd};
use crate::protocol::{self, FLAG_NEED_REPLY, req};
use crate::queue::{BlkParams, QueueCtl, VqPoller};
use crate::spec::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, ID_BYTES};
use crate::virtq::{RingAddrs, SplitQueue};
use crate::{VhostExport, VhostSpec};

// ---------------------------------------------------------------------------------- vhost_msg

/// Size of the memfd sent as guest memory with a message.
const MSG_MEM: u64 = 1 << 20;
/// Longest input used (keeps every reply within the socket buffer: nothing blocks).
const MSG_MAX_INPUT: usize = 16 << 10;

/// A live export of a 1 MiB malloc bdev with two queues on one reactor.
struct LiveExport {
    socket: PathBuf,
    _export: VhostExport,
    _reactors: Reactors,
}

/// The socket of the process's live export, started on first use and kept (reachable, so
/// that LeakSanitizer does not count it) for the process's lifetime.
fn export_socket() -> PathBuf {
    static LIVE: OnceLock<Mutex<LiveExport>> = OnceLock::new();
    let live = LIVE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferroblk-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let socket = dir.join("vhost.sock");
        let reactors = Reactors::start(&ReactorConfig {
            cpus: vec![None],
            idle_poll: Duration::from_micros(50),
        })
        .expect("reactor");
        let bdev: Arc<dyn Bdev> =
            Arc::new(MallocBdev::new("fuzz", BlockSize::B512, 2048, 2048).expect("malloc"));
        let export = VhostExport::start(
            VhostSpec {
                socket: socket.clone(),
                bdev: "fuzz".into(),
                num_queues: 2,
                read_only: false,
                serial: None,
            },
            bdev,
            reactors.handles().to_vec(),
        )
        .expect("export");
        Mutex::new(LiveExport {
            socket,
            _export: export,
            _reactors: reactors,
        })
    });
    live.lock().expect("live export").socket.clone()
}

fn eventfd() -> OwnedFd {
    ferroblk_bdev::eventfd::new().expect("eventfd")
}

/// Sends a sequence of fuzz-chosen vhost-user messages to a live export, as a front-end, then
/// closes its side; the export must answer or drop the connection, never panic or hang, and
/// serve the next front-end.
///
/// The input is a sequence of records `request (u8) | ctl (u8) | len (u16 LE) | payload`:
/// ctl bit 0 sets NEED_REPLY; bits 1-2 attach descriptors (none, a 1 MiB memfd, an eventfd,
/// two eventfds); bit 3 sends `payload` as raw bytes on the socket instead of a message (bad
/// headers, oversized sizes, torn messages). Returns whether the export took every message
/// (it closed the connection only at the end of the input).
pub fn vhost_msg(data: &[u8]) -> bool {
    let data = &data[..data.len().min(MSG_MAX_INPUT)];
    let before = background_panics();
    let sock = UnixStream::connect(export_socket()).expect("connect to the export");
    let mut rest = data;
    while rest.len() >= 4 {
        let request = u32::from(rest[0]);
        let ctl = rest[1];
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let payload = &rest[4..4 + len];
        rest = &rest[4 + len..];
        let fds: Vec<OwnedFd> = match (ctl >> 1) & 3 {
            0 => vec![],
            1 => vec![memfd("fuzz-guest", MSG_MEM).expect("memfd")],
            2 => vec![eventfd()],
            _ => vec![eventfd(), eventfd()],
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = if ctl & 8 != 0 {
            send_raw(&sock, payload, &raw)
        } else {
            let flags = if ctl & 1 != 0 { FLAG_NEED_REPLY } else { 0 };
            protocol::send(&sock, request, flags, payload, &raw)
        };
        if sent.is_err() {
            break; // the export closed the connection
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    // An export that drops the connection on a bad message leaves the rest unread: the socket
    // is then reset rather than closed.
    let clean = loop {
        match (&sock).read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break false,
            // libFuzzer's timer signals interrupt the read.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("the export neither answers nor closes the connection: {e}"),
        }
    };
    assert_eq!(background_panics(), before, "a background thread panicked");
    clean
}

/// Sends raw bytes with descriptors attached to the first of them (bypassing
/// [`protocol::send`]'s framing), never raising SIGPIPE.
fn send_raw(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: a zeroed msghdr is valid; every pointer set below is live during sendmsg.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            msg.msg_control = cbuf.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure computation.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
            // SAFETY: the control buffer (64 bytes) holds one header and the (at most two)
            // descriptors; CMSG_FIRSTHDR points into it since msg_controllen is set.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
            }
        }
        // SAFETY: sendmsg reads only the buffers described by `msg`, live for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// One record of a [`vhost_msg`] input.
fn msg_record(out: &mut Vec<u8>, request: u32, ctl: u8, payload: &[u8]) {
    out.push(request as u8);
    out.push(ctl);
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Valid front-end sessions for [`vhost_msg`]: the QEMU start-up sequence up to a started
/// queue, a multi-slot memory set-up, and the config space.
pub fn vhost_msg_seeds() -> Vec<Vec<u8>> {
    let u64s = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut start = Vec::new();
    msg_record(&mut start, req::GET_FEATURES, 0, &[]);
    msg_record(
        &mut start,
        req::SET_FEATURES,
        0,
        &u64s(&[1 << 32 | 1 << 30]),
    );
    msg_record(&mut start, req::GET_PROTOCOL_FEATURES, 0, &[]);
    msg_record(&mut start, req::SET_PROTOCOL_FEATURES, 0, &u64s(&[0x3209]));
    msg_record(&mut start, req::SET_OWNER, 0, &[]);
    msg_record(&mut start, req::GET_QUEUE_NUM, 0, &[]);
    let mut config = vec![0u8; 12 + 60];
    config[4] = 60;
    msg_record(&mut start, req::GET_CONFIG, 0, &config);
    let mut table = u64s(&[1]);
    table.extend(u64s(&[0, MSG_MEM, 0x7000_0000, 0]));
    msg_record(&mut start, req::SET_MEM_TABLE, 1 | 2, &table);
    msg_record(&mut start, req::SET_VRING_NUM, 1, &u64s(&[16 << 32]));
    msg_record(
        &mut start,
        req::SET_VRING_ADDR,
        1,
        &u64s(&[0, 0x7000_0000, 0x7000_1000, 0x7000_2000, 0]),
    );
    msg_record(&mut start, req::SET_VRING_BASE, 1, &u64s(&[0]));
    msg_record(&mut start, req::SET_VRING_CALL, 4, &u64s(&[0]));
    msg_record(&mut start, req::SET_VRING_KICK, 4, &u64s(&[0]));
    msg_record(&mut start, req::SET_VRING_ENABLE, 1, &u64s(&[1 << 32]));
    msg_record(&mut start, req::GET_VRING_BASE, 0, &u64s(&[0]));

    let mut slots = Vec::new();
    msg_record(&mut slots, req::SET_PROTOCOL_FEATURES, 0, &u64s(&[0xb209]));
    msg_record(&mut slots, req::GET_MAX_MEM_SLOTS, 0, &[]);
    msg_record(
        &mut slots,
        req::ADD_MEM_REG,
        1 | 2,
        &u64s(&[0, 0x1_0000_0000, MSG_MEM, 0x7000_0000, 0]),
    );
    msg_record(
        &mut slots,
        req::REM_MEM_REG,
        1,
        &u64s(&[0, 0x1_0000_0000, MSG_MEM, 0x7000_0000, 0]),
    );
    msg_record(
        &mut slots,
        req::GET_INFLIGHT_FD,
        0,
        &u64s(&[0, 0, 16 << 16 | 2]),
    );
    msg_record(&mut slots, req::RESET_DEVICE, 1, &[]);

    let mut raw = Vec::new();
    msg_record(&mut raw, 0, 8, &[1, 0, 0, 0, 1, 0, 0, 0, 0, 0x10, 0, 0]);
    vec![start, slots, raw]
}

// -------------------------------------------------------------------------------------- virtq

/// Guest address (and front-end address) of the fuzzed guest memory.
const VQ_BASE: u64 = 0x1_0000;
/// Size of the fuzzed guest memory.
const VQ_MEM: u64 = 64 << 10;
/// Offset of the used ring in it (after the largest descriptor table and available ring).
const VQ_USED: u64 = 0x1000;

/// Runs a virtio-blk queue poller over guest memory laid out by the input: the descriptor
/// table at offset 0, the available ring after it, the used ring at 4 KiB, and everything else
/// (descriptors, indirect tables, headers, data) where the input puts it.
///
/// Byte 0 configures: bits 0-2 log2 of the queue size (at most 32), bit 3 EVENT_IDX, bit 4
/// INDIRECT_DESC, bit 5 4 KiB blocks (else 512), bit 6 write-through with a volatile cache,
/// bit 7 a read-only export.
/// The rest is copied to guest memory from offset 0. The poller must take every chain the
/// driver made available without panicking or touching memory outside the guest's (the fuzz
/// build runs under AddressSanitizer), and stop cleanly. (The used ring is not checked: a
/// hostile driver may point buffers at it, so its contents prove nothing.)
pub fn virtq(data: &[u8]) {
    let Some((&cfg, image)) = data.split_first() else {
        return;
    };
    let size = 1u16 << (cfg & 7).min(5);
    let bs = if cfg & 0x20 != 0 {
        BlockSize::B4096
    } else {
        BlockSize::B512
    };
    let fd = memfd("fuzz-virtq", VQ_MEM).expect("memfd");
    let n = image.len().min(VQ_MEM as usize);
    // SAFETY: writes `n` bytes from the input to a descriptor we own.
    let w = unsafe { libc::pwrite(fd.as_raw_fd(), image.as_ptr().cast(), n, 0) };
    assert_eq!(w, n as isize, "writing guest memory");
    let d = RegionDesc {
        guest_phys_addr: VQ_BASE,
        memory_size: VQ_MEM,
        user_addr: VQ_BASE,
        mmap_offset: 0,
    };
    let mem = Arc::new(GuestMemory::new(&[d], &[fd]).expect("guest memory"));
    let addrs = RingAddrs {
        desc: VQ_BASE,
        avail: VQ_BASE + 16 * u64::from(size),
        used: VQ_BASE + VQ_USED,
    };
    let q = SplitQueue::new(&mem, size, addrs, cfg & 8 != 0, cfg & 0x10 != 0).expect("layout");
    let bdev: Arc<dyn Bdev> =
        Arc::new(MallocBdev::new("fuzz", bs, (1 << 20) >> bs.shift(), 0).expect("malloc"));
    let ctl = Arc::new(QueueCtl::default());
    let mut serial = [0u8; ID_BYTES];
    serial[..4].copy_from_slice(b"FUZZ");
    let mut p = VqPoller::new(
        0,
        q,
        mem.clone(),
        bdev.open_channel().expect("channel"),
        eventfd(),
        Some(eventfd()),
        None,
        ctl.clone(),
        BlkParams {
            block_shift: bs.shift(),
            serial,
            max_segments: 8,
            unmap_zeroes: true,
            writeback: Arc::new(AtomicBool::new(cfg & 0x40 == 0)),
            volatile_cache: true,
            read_only: cfg & 0x80 != 0,
        },
    )
    .expect("poller");
    for _ in 0..64 {
        let work = p.poll();
        if work == 0 && p.in_flight() == 0 {
            break;
        }
    }
    let stopped: mpsc::Receiver<u16> = ctl.request_stop();
    for _ in 0..1000 {
        p.poll();
        if stopped.try_recv().is_ok() {
            return;
        }
    }
    panic!("the poller does not stop");
}

/// Writes a descriptor into a [`virtq`] input image.
fn put_desc(img: &mut [u8], table_off: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let e = &mut img[table_off + 16 * usize::from(i)..][..16];
    e[0..8].copy_from_slice(&addr.to_le_bytes());
    e[8..12].copy_from_slice(&len.to_le_bytes());
    e[12..14].copy_from_slice(&flags.to_le_bytes());
    e[14..16].copy_from_slice(&next.to_le_bytes());
}

/// Valid driver states for [`virtq`]: a write, a read, a flush, GET_ID, discard and
/// write-zeroes, and an indirect read, on a 16-entry queue.
pub fn virtq_seeds() -> Vec<Vec<u8>> {
    let gpa = |off: u64| VQ_BASE + off;
    let mut seeds = Vec::new();
    for cfg in [0x04u8, 0x1c, 0x24 | 0x40] {
        let size = 1u16 << (cfg & 7);
        let avail = 16 * usize::from(size);
        let mut img = vec![0u8; 0x4000];
        // Headers at 0x2000 (16 bytes each), status bytes at 0x2f00, data at 0x3000.
        let hdr = |img: &mut Vec<u8>, k: usize, t: u32, sector: u64| {
            let o = 0x2000 + 16 * k;
            img[o..o + 4].copy_from_slice(&t.to_le_bytes());
            img[o + 8..o + 16].copy_from_slice(&sector.to_le_bytes());
            gpa(o as u64)
        };
        let bytes: u32 = if cfg & 0x20 != 0 { 4096 } else { 512 };
        let data_len = bytes;
        let mut heads = Vec::new();
        let mut next = 0u16;
        let mut chain = |img: &mut Vec<u8>, bufs: &[(u64, u32, bool)]| {
            let head = next;
            for (k, &(a, l, w)) in bufs.iter().enumerate() {
                let last = k + 1 == bufs.len();
                let flags = if w { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                put_desc(img, 0, next, a, l, flags, next + 1);
                next += 1;
            }
            heads.push(head);
        };
        let status = |k: u64| gpa(0x2f00 + k);
        let h = hdr(&mut img, 0, crate::spec::T_OUT, 8);
        chain(
            &mut img,
            &[
                (h, 16, false),
                (gpa(0x3000), data_len, false),
                (status(0), 1, true),
            ],
        );
        let h = hdr(&mut img, 1, crate::spec::T_IN, 8);
        chain(
            &mut img,
            &[
                (h, 16, false),
                (gpa(0x3000), data_len, true),
                (status(1), 1, true),
            ],
        );
        let h = hdr(&mut img, 2, crate::spec::T_FLUSH, 0);
        chain(&mut img, &[(h, 16, false), (status(2), 1, true)]);
        let h = hdr(&mut img, 3, crate::spec::T_GET_ID, 0);
        chain(
            &mut img,
            &[
                (h, 16, false),
                (gpa(0x2c00), 20, true),
                (status(3), 1, true),
            ],
        );
        let h = hdr(&mut img, 4, crate::spec::T_WRITE_ZEROES, 0);
        let seg = 0x2000 + 16 * 5;
        img[seg..seg + 8].copy_from_slice(&8u64.to_le_bytes());
        img[seg + 8..seg + 12].copy_from_slice(&8u32.to_le_bytes());
        img[seg + 12..seg + 16].copy_from_slice(&1u32.to_le_bytes());
        chain(&mut img, &[(h, 32, false), (status(4), 1, true)]);
        if cfg & 0x10 != 0 {
            // An indirect table at 0x2800: header, data, status.
            let h = hdr(&mut img, 6, crate::spec::T_IN, 0);
            put_desc(&mut img, 0x2800, 0, h, 16, DESC_F_NEXT, 1);
            put_desc(
                &mut img,
                0x2800,
                1,
                gpa(0x3000),
                data_len,
                DESC_F_WRITE | DESC_F_NEXT,
                2,
            );
            put_desc(&mut img, 0x2800, 2, status(6), 1, DESC_F_WRITE, 0);
            put_desc(&mut img, 0, next, gpa(0x2800), 48, DESC_F_INDIRECT, 0);
            heads.push(next);
        }
        for (k, &h) in heads.iter().enumerate() {
            img[avail + 4 + 2 * k..][..2].copy_from_slice(&h.to_le_bytes());
        }
        img[avail + 2..avail + 4].copy_from_slice(&(heads.len() as u16).to_le_bytes());
        img[0x3000..0x3000 + 8].copy_from_slice(b"FUZZDATA");
        let mut s = vec![cfg];
        s.extend_from_slice(&img);
        while s.last() == Some(&0) {
            s.pop();
        }
        seeds.push(s);
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroblk_bdev::fuzzing::replay;

    #[test]
    fn vhost_msg_corpus_replays() {
        replay("vhost_msg", &vhost_msg_seeds(), |d| {
            vhost_msg(d);
        });
    }

    #[test]
    fn vhost_msg_seeds_are_valid_sessions() {
        // The fuzzer starts from sessions the export accepts to the end (a started queue, the
        // memory slots, the inflight region), not from ones it rejects at the first message.
        let seeds = vhost_msg_seeds();
        for s in &seeds[..seeds.len() - 1] {
            assert!(vhost_msg(s), "seed rejected");
        }
    }

    #[test]
    fn virtq_corpus_replays() {
        replay("virtq", &virtq_seeds(), virtq);
    }
}
