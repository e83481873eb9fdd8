//! Initiator tests: against this crate's own NVMe/TCP target in-process (interoperability
//! with a full controller), and against a scripted fake controller for the protocol paths a
//! well-behaved target rarely takes (C2HData split with SUCCESS, several R2Ts, small
//! MAXH2CDATA, digest mismatches, protocol violations, termination requests).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferroblk_bdev::BlockSize;
use ferroblk_bdev::malloc::MallocBdev;
use ferroblk_bdev::reactor::{ReactorConfig, Reactors};

use super::queue::{Queue, QueueParams};
use super::*;
use crate::spec::command::{DsmRange, IoOpcode, Sqe};
use crate::spec::fabrics::DISCOVERY_NQN;
use crate::spec::log::trtype;
use crate::spec::status::Status;
use crate::spec::{Cqe, identify::cntrltype};
use crate::subsystem::{ListenerSpec, SubsystemSpec, Target};
use crate::transport::tcp::listener::Listener;
use crate::transport::tcp::pdu::{
    C2hData, Decoded, Fes, IcResp, Negotiated, PduDecoder, PduEncoder, PduHeader, R2t, Role,
};

const T: Duration = Duration::from_secs(10);

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

// ------------------------------------------------------------ our own target, in-process ---

const NQN: &str = "nqn.2026-11.io.ferroblk:initiator-test";
const BLOCKS: u64 = 16 * 1024;

struct OwnTarget {
    listener: Option<Listener>,
    reactors: Option<Reactors>,
    addr: SocketAddr,
}

impl OwnTarget {
    fn start() -> OwnTarget {
        let reactors = Reactors::start(&ReactorConfig {
            cpus: vec![None, None],
            idle_poll: Duration::from_micros(50),
        })
        .expect("reactors");
        let target = Arc::new(Target::new());
        let s = target
            .add_subsystem(&SubsystemSpec {
                nqn: NQN.into(),
                serial: None,
                model: "initiator test".into(),
                allow_any_host: true,
                hosts: vec![],
                namespace: vec![],
            })
            .expect("subsystem");
        let bdev = MallocBdev::new("m0", BlockSize::B512, BLOCKS, BLOCKS).expect("malloc bdev");
        s.add_namespace(1, Arc::new(bdev), None).expect("namespace");
        let spec = ListenerSpec::new("127.0.0.1", free_port());
        let addr = SocketAddr::from(([127, 0, 0, 1], spec.port));
        let listener = Listener::start(spec.clone(), target.clone(), reactors.handles().to_vec())
            .expect("listener");
        target.add_listener(spec);
        OwnTarget {
            listener: Some(listener),
            reactors: Some(reactors),
            addr,
        }
    }
}

impl Drop for OwnTarget {
    fn drop(&mut self) {
        drop(self.listener.take());
        if let Some(r) = self.reactors.take() {
            r.shutdown(Duration::from_secs(5));
        }
    }
}

#[test]
fn discovery_log_of_own_target_lists_the_subsystem() {
    let t = OwnTarget::start();
    let ctrl = Controller::connect(&ConnectOptions::discovery(t.addr)).expect("connect");
    assert!(ctrl.is_discovery());
    assert_eq!(ctrl.identify().cntrltype, cntrltype::DISCOVERY);
    let log = ctrl.discovery_log().expect("discovery log");
    let e = log
        .entries
        .iter()
        .find(|e| e.subnqn == NQN)
        .expect("the subsystem is listed");
    assert_eq!(e.trtype, trtype::TCP);
    assert_eq!(e.trsvcid, t.addr.port().to_string());
    assert!(
        ctrl.connect_io_queue(1, &IoQueueOptions::default())
            .is_err()
    );
    ctrl.shutdown().expect("shutdown");
}

fn own_target_round_trip(hdgst: bool, ddgst: bool) {
    let t = OwnTarget::start();
    let mut opts = ConnectOptions::new(t.addr, NQN);
    opts.hdr_digest = hdgst;
    opts.data_digest = ddgst;
    let ctrl = Controller::connect(&opts).expect("connect");
    assert_eq!(ctrl.digests(), (hdgst, ddgst));
    assert_eq!(ctrl.identify().subnqn, NQN);
    assert_eq!(ctrl.active_namespaces().expect("ns list"), vec![1]);
    let ns = ctrl.namespace(1).expect("identify ns");
    assert_eq!((ns.block_size, ns.blocks), (512, BLOCKS));
    let (nsq, ncq) = ctrl.set_number_of_queues(2).expect("set features");
    assert!(nsq >= 2 && ncq >= 2);
    ctrl.keep_alive().expect("keep alive");

    let io = IoQueueOptions {
        depth: 32,
        max_data: 1 << 20,
        disable_sq_flow_control: false,
    };
    let mut q1 = ctrl.connect_io_queue(1, &io).expect("io queue 1");
    let mut q2 = ctrl.connect_io_queue(2, &io).expect("io queue 2");
    assert_eq!(q1.digests(), (hdgst, ddgst));

    // Blocking: an in-capsule write, and a 1 MiB one that goes by R2T in MAXH2CDATA pieces.
    for (slba, len) in [(0u64, 4096usize), (1024, 1 << 20)] {
        let nlb = (len / 512) as u32;
        let mut w = pattern(slba + 1, len);
        q1.write(1, slba, nlb, &mut w).expect("write");
        let mut r = vec![0u8; len];
        q2.read(1, slba, nlb, &mut r).expect("read");
        assert!(r == w, "data read back at {slba}");
    }
    assert!(q1.max_in_capsule() >= 4096);
    let st = q1.stats();
    // In the capsule: the Connect data and the 4 KiB write.
    assert_eq!(st.in_capsule, 2, "{st:?}");
    assert_eq!(st.r2ts, 1, "{st:?}");
    let pieces = (1usize << 20).div_ceil(q1.max_h2c_data() as usize) as u64;
    assert_eq!(st.h2c_pdus, pieces, "1 MiB in MAXH2CDATA pieces: {st:?}");

    // Poll style: the whole depth in flight, writes then reads, completions in any order.
    let depth = q1.depth();
    for (i, slot) in (0..depth as u64).map(|i| (i, 4096 + i * 16)) {
        let buf = pattern(1000 + i, 8192);
        q1.submit(
            IoCommand::Write {
                nsid: 1,
                slba: slot,
                nlb: 16,
                fua: false,
            },
            buf,
            i,
        )
        .expect("submit");
    }
    let r = q1.submit(IoCommand::Flush { nsid: 1 }, Vec::new(), 99);
    assert_eq!(r.unwrap_err().reason, RejectReason::Full);
    let mut done = Vec::new();
    while done.len() < depth {
        q1.wait(Some(T)).expect("wait");
        q1.poll(&mut done).expect("poll");
    }
    assert!(done.iter().all(|c| c.status().is_success()));
    done.clear();
    for i in 0..depth as u64 {
        let read = IoCommand::Read {
            nsid: 1,
            slba: 4096 + i * 16,
            nlb: 16,
        };
        q2.submit(read, vec![0u8; 8192], i).expect("submit read");
    }
    while done.len() < depth {
        q2.wait(Some(T)).expect("wait");
        q2.poll(&mut done).expect("poll");
    }
    for c in &done {
        c.result().expect("read");
        assert!(c.buf == pattern(1000 + c.tag, 8192), "tag {}", c.tag);
    }

    q1.flush(1).expect("flush");
    q1.write_zeroes(1, 1024, 64, false).expect("write zeroes");
    let mut r = vec![0xffu8; 64 * 512];
    q2.read(1, 1024, 64, &mut r).expect("read zeroes");
    assert!(r.iter().all(|&b| b == 0));
    q2.deallocate(
        1,
        &[DsmRange {
            cattr: 0,
            nlb: 128,
            slba: 2048,
        }],
    )
    .expect("deallocate");

    // A failed command is a typed status; the queue goes on.
    let mut r = vec![0u8; 512];
    let e = q1.read(1, BLOCKS, 1, &mut r).unwrap_err();
    assert_eq!(e.status(), Some(Status::LBA_OUT_OF_RANGE), "{e}");
    assert_eq!(r.len(), 512, "the buffer comes back on failure");
    q1.read(1, 0, 1, &mut r).expect("still usable");

    // More read data than the socket buffers hold, not taken by the host for a while: the
    // target's sends stop half way (EAGAIN) and resume from the middle of a PDU's data.
    const BIG: usize = 512 << 10;
    let n_big = 12u64;
    for i in 0..n_big {
        let mut w = pattern(5000 + i, BIG);
        q1.write(1, i * 1024, 1024, &mut w).expect("big write");
    }
    done.clear();
    let reads = (depth as u64).min(48);
    for t in 0..reads {
        let read = IoCommand::Read {
            nsid: 1,
            slba: (t % n_big) * 1024,
            nlb: 1024,
        };
        q2.submit(read, vec![0u8; BIG], t).expect("submit big read");
    }
    std::thread::sleep(Duration::from_millis(300));
    while done.len() < reads as usize {
        q2.wait(Some(T)).expect("wait");
        q2.poll(&mut done).expect("poll");
    }
    for c in &done {
        c.result().expect("big read");
        assert!(
            c.buf == pattern(5000 + c.tag % n_big, BIG),
            "big read {}",
            c.tag
        );
    }

    q1.disconnect().expect("disconnect 1");
    q2.disconnect().expect("disconnect 2");
    ctrl.shutdown().expect("shutdown");
}

#[test]
fn own_target_round_trip_without_digests() {
    own_target_round_trip(false, false);
}

#[test]
fn own_target_round_trip_with_digests() {
    own_target_round_trip(true, true);
}

#[test]
fn connect_to_unknown_subsystem_is_a_typed_error() {
    let t = OwnTarget::start();
    let e = Controller::connect(&ConnectOptions::new(t.addr, "nqn.2026-11.io.ferroblk:nope"))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ConnectInvalidParameters { in_data: true, .. } | Error::Command { .. }
        ),
        "{e:?}"
    );
}

// ----------------------------------------------------------------- scripted fake target ---

/// The controller end of one connection, driven by a test script.
struct Fake {
    sock: TcpStream,
    dec: PduDecoder,
    enc: PduEncoder,
    buf: Vec<u8>,
}

/// A received PDU: its header and its data.
struct Got {
    header: PduHeader,
    data: Vec<u8>,
}

impl Fake {
    /// Accepts one connection and answers its ICReq with `resp`.
    fn accept(l: &TcpListener, resp: IcResp) -> Fake {
        let (sock, _) = l.accept().expect("accept");
        sock.set_read_timeout(Some(T)).expect("timeout");
        let mut f = Fake {
            sock,
            dec: PduDecoder::controller(64 * 1024),
            enc: PduEncoder::new(Role::Controller),
            buf: Vec::new(),
        };
        let req = match f.recv().header {
            PduHeader::IcReq(r) => r,
            h => panic!("expected ICReq, got {h:?}"),
        };
        let mut out = [0u8; 256];
        let n = f.enc.ic_resp(&resp, &mut out);
        f.send(&out[..n]);
        let neg = Negotiated::from_exchange(&req, &resp);
        f.dec.establish(neg);
        f.enc = PduEncoder::established(Role::Controller, &neg);
        f
    }

    fn recv(&mut self) -> Got {
        loop {
            match self.dec.decode(&self.buf).expect("valid PDU from the host") {
                Decoded::Ready(l) => {
                    let got = Got {
                        header: l.header,
                        data: self.buf[l.data.clone()].to_vec(),
                    };
                    self.buf.drain(..l.plen);
                    return got;
                }
                Decoded::NeedMore(_) => {
                    let mut chunk = [0u8; 65536];
                    let n = self.sock.read(&mut chunk).expect("read");
                    assert!(n > 0, "host closed");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    fn recv_cmd(&mut self) -> (Sqe, Vec<u8>) {
        match self.recv() {
            Got {
                header: PduHeader::CapsuleCmd(c),
                data,
            } => (c.sqe, data),
            g => panic!("expected a command, got {:?}", g.header),
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.sock.write_all(b).expect("write");
    }

    fn resp(&mut self, cid: u16, status: Status) {
        let mut out = [0u8; 64];
        let n = self.enc.capsule_resp(&Cqe::new(cid, status), &mut out);
        self.send(&out[..n]);
    }

    fn c2h(&mut self, h: C2hData, data: &[u8], ddgst: bool) {
        let mut out = [0u8; 256];
        let n = self.enc.c2h_data(&h, &mut out);
        let mut v = out[..n].to_vec();
        v.extend_from_slice(data);
        if ddgst {
            v.extend_from_slice(&crate::transport::tcp::pdu::DataDigest::of(&[data]).to_le_bytes());
        }
        self.send(&v);
    }

    fn r2t(&mut self, r: R2t) {
        let mut out = [0u8; 64];
        let n = self.enc.r2t(&r, &mut out);
        self.send(&out[..n]);
    }
}

fn ic_resp(ddgst: bool, maxh2cdata: u32) -> IcResp {
    IcResp {
        pfv: 0,
        cpda: 0,
        hdgst: ddgst,
        ddgst,
        maxh2cdata,
    }
}

/// Runs `script` as the controller of one connection; returns the host's queue.
fn with_fake(
    params: QueueParams,
    resp: IcResp,
    script: impl FnOnce(Fake) + Send + 'static,
) -> (Queue, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = std::thread::spawn(move || script(Fake::accept(&l, resp)));
    let q = Queue::connect(Trtype::Tcp, addr, params, T).expect("connect");
    (q, h)
}

fn params(max_in_capsule: usize, digests: bool) -> QueueParams {
    QueueParams {
        qid: 1,
        depth: 4,
        hdgst: digests,
        ddgst: digests,
        max_data: 1 << 20,
        max_in_capsule,
    }
}

fn read_sqe(nlb: u32) -> Sqe {
    IoCommand::Read {
        nsid: 1,
        slba: 0,
        nlb,
    }
    .to_sqe()
    .0
}

fn write_sqe(nlb: u32) -> Sqe {
    IoCommand::Write {
        nsid: 1,
        slba: 0,
        nlb,
        fua: false,
    }
    .to_sqe()
    .0
}

#[test]
fn c2h_data_in_pieces_with_success_flag_needs_no_capsule_resp() {
    for digests in [false, true] {
        let data = pattern(7, 12288);
        let d2 = data.clone();
        let (mut q, h) = with_fake(params(0, digests), ic_resp(digests, 4096), move |mut f| {
            let (sqe, _) = f.recv_cmd();
            assert_eq!(sqe.sgl1().length, 12288);
            for (i, part) in d2.chunks(4096).enumerate() {
                let last = i == 2;
                let h = C2hData {
                    cccid: sqe.cid(),
                    datao: (i * 4096) as u32,
                    datal: 4096,
                    last,
                    success: last,
                };
                f.c2h(h, part, digests);
            }
        });
        let c = q
            .execute(
                read_sqe(24),
                Xfer::FromController,
                vec![0; 12288],
                T,
                "read",
            )
            .expect("read");
        assert!(c.status().is_success());
        assert!(c.buf == data);
        h.join().expect("script");
    }
}

#[test]
fn large_c2h_data_lands_straight_in_the_buffer() {
    let data = pattern(8, 256 * 1024);
    let d2 = data.clone();
    let (mut q, h) = with_fake(params(0, true), ic_resp(true, 4096), move |mut f| {
        let (sqe, _) = f.recv_cmd();
        let h = C2hData {
            cccid: sqe.cid(),
            datao: 0,
            datal: d2.len() as u32,
            last: true,
            success: false,
        };
        f.c2h(h, &d2, true);
        f.resp(sqe.cid(), Status::SUCCESS);
    });
    let c = q
        .execute(
            read_sqe(512),
            Xfer::FromController,
            vec![0; 256 * 1024],
            T,
            "read",
        )
        .expect("read");
    c.result().expect("success");
    assert!(c.buf == data);
    h.join().expect("script");
}

#[test]
fn writes_follow_r2ts_in_maxh2cdata_pieces() {
    for digests in [false, true] {
        let data = pattern(9, 10240);
        let d2 = data.clone();
        let (mut q, h) = with_fake(params(0, digests), ic_resp(digests, 4096), move |mut f| {
            let (sqe, icd) = f.recv_cmd();
            assert!(icd.is_empty(), "no in-capsule data when it does not fit");
            assert!(sqe.sgl1().is_transport_data_block());
            let mut got = vec![0u8; 10240];
            // Two R2Ts: 0..6144 then 6144..10240, each answered in pieces of MAXH2CDATA.
            for (ttag, (r2to, r2tl)) in [(5u16, (0u32, 6144u32)), (6, (6144, 4096))] {
                f.r2t(R2t {
                    cccid: sqe.cid(),
                    ttag,
                    r2to,
                    r2tl,
                });
                let mut off = r2to;
                loop {
                    let g = f.recv();
                    let PduHeader::H2cData(h) = g.header else {
                        panic!("expected H2CData, got {:?}", g.header)
                    };
                    assert_eq!((h.cccid, h.ttag, h.datao), (sqe.cid(), ttag, off));
                    assert!(h.datal <= 4096);
                    got[off as usize..(off + h.datal) as usize].copy_from_slice(&g.data);
                    off += h.datal;
                    assert_eq!(h.last, off == r2to + r2tl);
                    if h.last {
                        break;
                    }
                }
            }
            assert!(got == d2);
            f.resp(sqe.cid(), Status::SUCCESS);
        });
        let c = q
            .execute(write_sqe(20), Xfer::ToController, data, T, "write")
            .expect("write");
        c.result().expect("success");
        h.join().expect("script");
    }
}

#[test]
fn small_writes_carry_their_data_in_the_capsule() {
    let data = pattern(10, 4096);
    let d2 = data.clone();
    let (mut q, h) = with_fake(params(8192, true), ic_resp(true, 4096), move |mut f| {
        let (sqe, icd) = f.recv_cmd();
        assert!(sqe.sgl1().is_in_capsule());
        assert!(icd == d2);
        f.resp(sqe.cid(), Status::SUCCESS);
    });
    q.execute(write_sqe(8), Xfer::ToController, data, T, "write")
        .expect("write")
        .result()
        .expect("success");
    h.join().expect("script");
}

#[test]
fn data_digest_mismatch_fails_only_that_command() {
    let (mut q, h) = with_fake(params(0, true), ic_resp(true, 4096), move |mut f| {
        let (sqe, _) = f.recv_cmd();
        let data = pattern(11, 512);
        let mut out = [0u8; 256];
        let n = f.enc.c2h_data(
            &C2hData {
                cccid: sqe.cid(),
                datao: 0,
                datal: 512,
                last: true,
                success: false,
            },
            &mut out,
        );
        let mut v = out[..n].to_vec();
        v.extend_from_slice(&data);
        v.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        f.send(&v);
        f.resp(sqe.cid(), Status::SUCCESS);
        let (sqe, _) = f.recv_cmd();
        f.resp(sqe.cid(), Status::SUCCESS);
    });
    let c = q
        .execute(read_sqe(1), Xfer::FromController, vec![0; 512], T, "read")
        .expect("completes");
    assert_eq!(c.status(), Status::TRANSIENT_TRANSPORT_ERROR);
    let flush = IoCommand::Flush { nsid: 1 }.to_sqe().0;
    q.execute(flush, Xfer::None, Vec::new(), T, "flush")
        .expect("the connection survives")
        .result()
        .expect("success");
    h.join().expect("script");
}

#[test]
fn unknown_cid_terminates_the_connection_and_fails_what_is_in_flight() {
    let (mut q, h) = with_fake(params(0, false), ic_resp(false, 4096), move |mut f| {
        let (sqe, _) = f.recv_cmd();
        f.resp(sqe.cid() + 3, Status::SUCCESS);
        match f.recv().header {
            PduHeader::H2cTermReq(t) => assert_eq!(t.fes, Fes::INVALID_HEADER_FIELD),
            h => panic!("expected H2CTermReq, got {h:?}"),
        }
    });
    q.submit(read_sqe(1), Xfer::FromController, vec![0; 512], 42)
        .expect("submit");
    let mut done = Vec::new();
    let e = loop {
        match q.step() {
            Ok(()) => q.wait(Some(T)).expect("wait"),
            Err(e) => break e,
        }
    };
    assert!(matches!(e, Error::Protocol { .. }), "{e:?}");
    q.take_completions(&mut done);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].tag, done[0].status()), (42, HOST_PATHING_ERROR));
    assert_eq!(done[0].buf.len(), 512, "the buffer comes back");
    assert!(q.is_dead());
    let r = q.submit(read_sqe(1), Xfer::FromController, vec![0; 512], 43);
    assert_eq!(r.unwrap_err().reason, RejectReason::Disconnected);
    h.join().expect("script");
}

#[test]
fn c2h_term_req_is_reported_with_its_status() {
    let (mut q, h) = with_fake(params(0, false), ic_resp(false, 4096), move |mut f| {
        let _ = f.recv_cmd();
        let mut out = [0u8; 256];
        let n = f
            .enc
            .term_req(Fes::PDU_SEQUENCE_ERROR, 0, &[4, 0, 72, 0], &mut out);
        f.send(&out[..n]);
    });
    let flush = IoCommand::Flush { nsid: 1 }.to_sqe().0;
    let e = q
        .execute(flush, Xfer::None, Vec::new(), T, "flush")
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Terminated {
                fes: Fes::PDU_SEQUENCE_ERROR,
                ..
            }
        ),
        "{e:?}"
    );
    h.join().expect("script");
}

#[test]
fn statuses_are_typed_errors_and_cids_are_reused() {
    let (mut q, h) = with_fake(params(0, false), ic_resp(false, 4096), move |mut f| {
        let mut cids: Vec<u16> = (0..4).map(|_| f.recv_cmd().0.cid()).collect();
        let mut sorted = cids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4, "distinct CIDs in flight");
        cids.reverse();
        for cid in cids {
            f.resp(cid, Status::LBA_OUT_OF_RANGE);
        }
        let (sqe, _) = f.recv_cmd();
        f.resp(sqe.cid(), Status::SUCCESS);
    });
    let flush = |_| IoCommand::Flush { nsid: 1 }.to_sqe().0;
    for tag in 0..4 {
        q.submit(flush(()), Xfer::None, Vec::new(), tag)
            .expect("submit");
    }
    let full = q
        .submit(flush(()), Xfer::None, vec![1, 2, 3], 9)
        .unwrap_err();
    assert_eq!(full.reason, RejectReason::Full);
    assert_eq!(full.buf, vec![1, 2, 3]);
    let mut done = Vec::new();
    while done.len() < 4 {
        q.step().expect("step");
        q.take_completions(&mut done);
        if done.len() < 4 {
            q.wait(Some(T)).expect("wait");
        }
    }
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, vec![0, 1, 2, 3]);
    let e = done[0].result().unwrap_err();
    assert_eq!(e.status(), Some(Status::LBA_OUT_OF_RANGE));
    assert!(!e.is_fatal());
    assert_eq!(done[0].opcode, IoOpcode::Flush as u8);
    q.execute(flush(()), Xfer::None, Vec::new(), T, "flush")
        .expect("slots were freed")
        .result()
        .expect("success");
    h.join().expect("script");
}

#[test]
fn discovery_nqn_is_the_well_known_one() {
    let o = ConnectOptions::discovery("127.0.0.1:8009".parse().expect("addr"));
    assert_eq!(o.subnqn, DISCOVERY_NQN);
    assert!(o.hostnqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
    assert_eq!(
        o.hostnqn.len(),
        "nqn.2014-08.org.nvmexpress:uuid:".len() + 36
    );
    assert_ne!(ConnectOptions::discovery(o.addr).hostid, o.hostid);
}

/// Runs `sg` as the data of `sqe` on `q` and waits for its completion.
fn run_sg(q: &mut Queue, sqe: Sqe, xfer: Xfer, sg: ferroblk_bdev::SgList) -> Completion {
    q.submit_data(sqe, xfer, super::queue::CmdData::Sg(sg), 9)
        .map_err(|(r, _)| r)
        .expect("submit");
    let mut out = Vec::new();
    loop {
        // The fake controller may close right after its last PDU: the completion counts.
        let r = q.step();
        if q.take_completions(&mut out) > 0 {
            return out.pop().unwrap();
        }
        r.expect("step");
        q.wait(Some(T)).expect("wait");
    }
}

/// Uneven segments (not block multiples) over one buffer of `len` bytes.
fn uneven(data: &[u8]) -> ferroblk_bdev::SgList {
    let mut b = ferroblk_bdev::AlignedBuf::new(data.len());
    b.as_mut_slice().copy_from_slice(data);
    let a = 1000;
    let c = 3000;
    ferroblk_bdev::SgList::from_buf_split(b, &[a, c, data.len() - a - c])
}

#[test]
fn scatter_gather_writes_leave_from_their_segments_in_r2t_pieces() {
    for digests in [false, true] {
        let data = pattern(21, 10240);
        let d2 = data.clone();
        let (mut q, h) = with_fake(params(0, digests), ic_resp(digests, 4096), move |mut f| {
            let (sqe, _) = f.recv_cmd();
            f.r2t(R2t {
                cccid: sqe.cid(),
                ttag: 1,
                r2to: 0,
                r2tl: 10240,
            });
            let mut got = Vec::new();
            loop {
                let g = f.recv();
                let PduHeader::H2cData(h) = g.header else {
                    panic!("expected H2CData, got {:?}", g.header)
                };
                got.extend_from_slice(&g.data);
                if h.last {
                    break;
                }
            }
            assert!(got == d2, "the segments' bytes, in order");
            f.resp(sqe.cid(), Status::SUCCESS);
        });
        let c = run_sg(&mut q, write_sqe(20), Xfer::ToController, uneven(&data));
        c.result().expect("success");
        assert!(c.buf.is_empty());
        assert_eq!(c.sg.total_len(), 10240, "the list comes back");
        h.join().expect("script");
    }
}

#[test]
fn scatter_gather_reads_land_in_their_segments() {
    for (digests, len) in [(false, 12288usize), (true, 12288), (true, 256 * 1024)] {
        let data = pattern(22 + len as u64, len);
        let d2 = data.clone();
        let (mut q, h) = with_fake(params(0, digests), ic_resp(digests, 4096), move |mut f| {
            let (sqe, _) = f.recv_cmd();
            // Pieces that end inside segments; the large one is read straight off the socket.
            let piece = if d2.len() > 65536 { d2.len() } else { 2500 };
            let mut off = 0;
            while off < d2.len() {
                let n = piece.min(d2.len() - off);
                let last = off + n == d2.len();
                let h = C2hData {
                    cccid: sqe.cid(),
                    datao: off as u32,
                    datal: n as u32,
                    last,
                    success: last,
                };
                f.c2h(h, &d2[off..off + n], digests);
                off += n;
            }
        });
        let sg = uneven(&vec![0u8; len]);
        let c = run_sg(
            &mut q,
            read_sqe((len / 512) as u32),
            Xfer::FromController,
            sg,
        );
        assert!(c.status().is_success(), "{:?}", c.status());
        let mut back = vec![0u8; len];
        c.sg.copy_to_slice(0, &mut back);
        assert!(
            back == data,
            "read data in the segments (digests {digests}, {len})"
        );
        h.join().expect("script");
    }
}
