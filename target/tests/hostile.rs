//! Hostile hosts against a live target on loopback: each bad connection gets the spec's answer
//! (a C2HTermReq and close, or an NVMe status), and a well-behaved host keeps working
//! throughout. Also the connection limit: a host opening more connections than a listener takes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferroblk_target::spec::command::{
    AdminOpcode, GetLogPage, IoOpcode, ReadWrite, SglDescriptor, Sqe,
};
use ferroblk_target::spec::fabrics::{ConnectCommand, ConnectData};
use ferroblk_target::spec::log::LogPageId;
use ferroblk_target::spec::{Cqe, Status};
use ferroblk_target::subsystem::admin::MAX_TRANSFER;
use ferroblk_target::transport::tcp::listener::MAX_CONNECTIONS;
use ferroblk_target::transport::tcp::pdu::{
    DataDigest, Decoded, Fes, H2cData, IcReq, IcResp, Negotiated, PduDecoder, PduEncoder,
    PduHeader, Role,
};

const NQN: &str = "nqn.2026-11.io.ferroblk:hostile";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

/// A minimal host built on the codec.
struct Host {
    s: TcpStream,
    dec: PduDecoder,
    enc: PduEncoder,
    rx: Vec<u8>,
    ddgst: bool,
}

impl Host {
    fn new(addr: SocketAddr) -> Host {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Host {
            s,
            dec: PduDecoder::host(1 << 20),
            enc: PduEncoder::new(Role::Host),
            rx: Vec::new(),
            ddgst: false,
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// The next PDU, or None when the target closed the connection.
    fn recv(&mut self) -> Option<(PduHeader, Vec<u8>)> {
        loop {
            if let Ok(Decoded::Ready(l)) = self.dec.decode(&self.rx) {
                let data = self.rx[l.data.clone()].to_vec();
                self.rx.drain(..l.plen);
                return Some((l.header, data));
            }
            let mut buf = [0u8; 65536];
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn ic(&mut self, hdgst: bool, ddgst: bool) {
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            hdgst,
            ddgst,
            maxr2t: 0,
        };
        let mut out = [0u8; 256];
        let n = self.enc.ic_req(&req, &mut out);
        self.send(&out[..n]);
        let Some((PduHeader::IcResp(resp), _)) = self.recv() else {
            panic!("no ICResp");
        };
        let n = Negotiated::from_exchange(&req, &IcResp { ..resp });
        self.dec.establish(n);
        self.enc = PduEncoder::established(Role::Host, &n);
        self.ddgst = n.ddgst;
    }

    fn command(&mut self, sqe: &Sqe, data: &[u8]) -> (Cqe, Vec<u8>) {
        let mut out = [0u8; 256];
        let n = self.enc.capsule_cmd(sqe, data.len() as u32, &mut out);
        let mut pdu = out[..n].to_vec();
        pdu.extend_from_slice(data);
        if self.ddgst && !data.is_empty() {
            pdu.extend_from_slice(&DataDigest::of(&[data]).to_le_bytes());
        }
        self.send(&pdu);
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Some((PduHeader::C2hData(_), d)) => got.extend(d),
                Some((PduHeader::CapsuleResp(r), _)) => return (r.cqe, got),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn connect(&mut self, qid: u16, cntlid: u16) -> Cqe {
        let sqe = connect_sqe(1, qid, SglDescriptor::in_capsule(0, 1024));
        self.command(&sqe, &connect_data(NQN, cntlid).to_bytes()).0
    }

    /// Expects a C2HTermReq with `fes`, then the connection closing.
    fn expect_term(&mut self, fes: Fes) {
        match self.recv() {
            Some((PduHeader::C2hTermReq(t), _)) => assert_eq!(t.fes, fes),
            other => panic!("expected C2HTermReq {fes}, got {other:?}"),
        }
        assert!(
            self.recv().is_none(),
            "connection closed after the termination request"
        );
    }
}

/// A Connect command (CID `cid`, queue `qid`, no keep-alive) with `sgl` for its data.
fn connect_sqe(cid: u16, qid: u16, sgl: SglDescriptor) -> Sqe {
    ConnectCommand {
        recfmt: 0,
        qid,
        sqsize: 31,
        cattr: 0,
        kato: 0,
        sgl1: sgl,
    }
    .to_sqe(cid)
}

/// Connect data of host [`HOST`] for subsystem `subnqn`, controller `cntlid`.
fn connect_data(subnqn: &str, cntlid: u16) -> ConnectData {
    ConnectData {
        hostid: [7; 16],
        cntlid,
        subnqn: subnqn.into(),
        hostnqn: HOST.into(),
    }
}

/// A host's admin queue (controller enabled, CC.EN = 1) and one I/O queue on it, with both
/// digests on the I/O queue when `digests`.
fn enabled_controller(addr: SocketAddr, digests: bool) -> (Host, Host) {
    let mut a = Host::new(addr);
    a.ic(false, false);
    let c = a.connect(0, 0xffff);
    assert!(c.status.is_success(), "{:?}", c.status);
    let cntlid = c.dw0 as u16;
    let ps = common::cc_enable(2);
    assert!(a.command(&ps, &[]).0.status.is_success());
    let mut q = Host::new(addr);
    q.ic(digests, digests);
    assert!(q.connect(1, cntlid).status.is_success());
    (a, q)
}

/// A well-behaved host: admin + one I/O queue, a write and a read-back.
fn good_host_round_trip(addr: SocketAddr, pattern: u8) {
    let (_a, mut q) = enabled_controller(addr, true);
    let data = vec![pattern; 4096];
    let rw = ReadWrite {
        nsid: 1,
        slba: 7,
        nlb: 1,
        ..Default::default()
    };
    let w = rw.to_sqe(IoOpcode::Write, 3, &SglDescriptor::in_capsule(0, 4096));
    assert!(q.command(&w, &data).0.status.is_success());
    let r = rw.to_sqe(
        IoOpcode::Read,
        4,
        &SglDescriptor::transport_data_block(4096),
    );
    let (c, back) = q.command(&r, &[]);
    assert!(c.status.is_success());
    assert_eq!(back, data);
}

#[test]
fn hostile_hosts_get_the_spec_answer_and_others_keep_working() {
    let r = common::rig(NQN, common::malloc_1m());
    good_host_round_trip(r.addr, 1);

    // Unknown PDU type.
    let mut h = Host::new(r.addr);
    h.send(&[0x7f, 0, 8, 0, 8, 0, 0, 0]);
    h.expect_term(Fes::INVALID_HEADER_FIELD);

    // A command before the connection is initialised (no ICReq).
    let mut h = Host::new(r.addr);
    let mut out = [0u8; 256];
    let n = h.enc.capsule_cmd(&Sqe::new(6, 1), 0, &mut out);
    h.send(&out[..n]);
    h.expect_term(Fes::PDU_SEQUENCE_ERROR);

    // PLEN smaller than the header.
    let mut h = Host::new(r.addr);
    h.ic(false, false);
    let mut bad = [0u8; 72];
    bad[0] = 4; // CapsuleCmd
    bad[2] = 72;
    bad[4..8].copy_from_slice(&16u32.to_le_bytes());
    h.send(&bad);
    h.expect_term(Fes::INVALID_HEADER_FIELD);

    // Header digest mismatch.
    let mut h = Host::new(r.addr);
    h.ic(true, false);
    let n = h.enc.capsule_cmd(&Sqe::new(6, 1), 0, &mut out);
    out[n - 1] ^= 0xff;
    h.send(&out[..n]);
    h.expect_term(Fes::HEADER_DIGEST_ERROR);

    // Oversized in-capsule data.
    let mut h = Host::new(r.addr);
    h.ic(false, false);
    let big = vec![0u8; 64 * 1024];
    let n = h
        .enc
        .capsule_cmd(&Sqe::new(1, 1), big.len() as u32, &mut out);
    let mut pdu = out[..n].to_vec();
    pdu.extend_from_slice(&big);
    h.send(&pdu);
    h.expect_term(Fes::DATA_TRANSFER_LIMIT_EXCEEDED);

    // Truncated PDU, then the host goes away.
    let mut h = Host::new(r.addr);
    h.ic(false, false);
    let n = h.enc.capsule_cmd(&Sqe::new(6, 1), 0, &mut out);
    h.send(&out[..n / 2]);
    drop(h);

    // Commands before Connect, unknown opcodes, bad SGL lengths, unknown namespaces: statuses.
    let mut h = Host::new(r.addr);
    h.ic(false, false);
    let (c, _) = h.command(&Sqe::new(AdminOpcode::Identify as u8, 9), &[]);
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR);
    let mut a = Host::new(r.addr);
    a.ic(false, false);
    let cntlid = a.connect(0, 0xffff).dw0 as u16;
    let mut q = Host::new(r.addr);
    q.ic(false, false);
    assert!(q.connect(1, cntlid).status.is_success());
    let (c, _) = q.command(&Sqe::new(0x7e, 10), &[]);
    assert_eq!(c.status, Status::INVALID_OPCODE);
    let rw = ReadWrite {
        nsid: 1,
        slba: 0,
        nlb: 2,
        ..Default::default()
    };
    let w = rw.to_sqe(IoOpcode::Write, 11, &SglDescriptor::in_capsule(0, 4096));
    let (c, _) = q.command(&w, &[0u8; 4096]);
    assert_eq!(c.status, Status::DATA_SGL_LENGTH_INVALID);
    let mut rw9 = rw;
    rw9.nsid = 9;
    let rd = rw9.to_sqe(
        IoOpcode::Read,
        12,
        &SglDescriptor::transport_data_block(8192),
    );
    assert_eq!(q.command(&rd, &[]).0.status, Status::INVALID_NAMESPACE);
    let far = ReadWrite {
        nsid: 1,
        slba: 10_000,
        nlb: 1,
        ..Default::default()
    };
    let rd = far.to_sqe(
        IoOpcode::Read,
        13,
        &SglDescriptor::transport_data_block(4096),
    );
    assert_eq!(q.command(&rd, &[]).0.status, Status::LBA_OUT_OF_RANGE);
    // An I/O queue for a controller that does not exist.
    let mut q2 = Host::new(r.addr);
    q2.ic(false, false);
    assert!(!q2.connect(1, 999).status.is_success());

    // A host ignoring SQ flow control: writes that wait for data (R2T) pile up beyond the
    // queue's 32 entries; the connection ends instead of the target growing without bound.
    let mut q3 = Host::new(r.addr);
    q3.ic(false, false);
    let mut a3 = Host::new(r.addr);
    a3.ic(false, false);
    let cntlid = a3.connect(0, 0xffff).dw0 as u16;
    assert!(q3.connect(1, cntlid).status.is_success());
    let w = ReadWrite {
        nsid: 1,
        slba: 0,
        nlb: 1,
        ..Default::default()
    };
    let mut flood = Vec::new();
    for cid in 100..140u16 {
        let sqe = w.to_sqe(
            IoOpcode::Write,
            cid,
            &SglDescriptor::transport_data_block(4096),
        );
        let n = q3.enc.capsule_cmd(&sqe, 0, &mut out);
        flood.extend_from_slice(&out[..n]);
    }
    q3.send(&flood);
    let mut r2ts = 0;
    loop {
        match q3.recv() {
            Some((PduHeader::R2t(_), _)) => r2ts += 1,
            Some((PduHeader::C2hTermReq(t), _)) => {
                assert_eq!(t.fes, Fes::PDU_SEQUENCE_ERROR);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        r2ts, 32,
        "one R2T per queue entry, then the connection ends"
    );

    good_host_round_trip(r.addr, 2);
}

#[test]
fn a_host_opening_too_many_connections_is_bounded() {
    let r = common::rig(NQN, common::malloc_1m());
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 50 {
        if let Ok(s) = TcpStream::connect(r.addr) {
            held.push(s);
        }
    }
    // Connections beyond the limit are closed at once by the target.
    let mut closed = 0;
    for s in held.iter_mut().rev().take(50) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= 40,
        "only {closed} of the excess connections were closed"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    good_host_round_trip(r.addr, 3);
}

/// A bdev that lets only `depth` requests into each channel (the rest are handed back, as a
/// full device does), and completes nothing while its gate is shut: an I/O queue deeper than
/// that keeps commands waiting in the connection's retry queue for as long as the test wants.
struct Shallow {
    base: Arc<dyn ferroblk_bdev::Bdev>,
    depth: usize,
    open: Arc<AtomicBool>,
}

struct ShallowChannel {
    base: ferroblk_bdev::Channel,
    open: Arc<AtomicBool>,
}

impl ferroblk_bdev::bdev::ChannelOps for ShallowChannel {
    fn submit(&mut self, io: ferroblk_bdev::IoRequest) -> Result<(), ferroblk_bdev::IoRequest> {
        self.base.submit(io)
    }
    fn poll(&mut self, done: &mut Vec<ferroblk_bdev::IoCompletion>) -> usize {
        if !self.open.load(Ordering::Acquire) {
            return 0;
        }
        self.base.poll(done)
    }
    fn wake(&self) -> ferroblk_bdev::Wake {
        if self.open.load(Ordering::Acquire) {
            self.base.wake()
        } else {
            // Look at the gate again soon.
            ferroblk_bdev::Wake::At(Instant::now() + Duration::from_millis(1))
        }
    }
}

impl ferroblk_bdev::Bdev for Shallow {
    fn info(&self) -> &Arc<ferroblk_bdev::BdevInfo> {
        self.base.info()
    }
    fn open_channel(&self) -> Result<ferroblk_bdev::Channel, ferroblk_bdev::BdevError> {
        let base = self.base.open_channel()?;
        Ok(ferroblk_bdev::Channel::new(
            self.base.info().clone(),
            Box::new(ShallowChannel {
                base,
                open: self.open.clone(),
            }),
            self.depth,
        ))
    }
}

#[test]
fn removing_a_namespace_with_commands_waiting_for_its_channel_completes_them() {
    let open = Arc::new(AtomicBool::new(false));
    let shallow = Arc::new(Shallow {
        base: common::malloc_1m(),
        depth: 2,
        open: open.clone(),
    });
    let r = common::rig(NQN, shallow);
    let (addr, s) = (r.addr, r.subsystem.clone());

    let (_a, mut q) = enabled_controller(addr, false);
    let read = |cid: u16, nsid: u32| {
        ReadWrite {
            nsid,
            slba: 0,
            nlb: 1,
            ..Default::default()
        }
        .to_sqe(
            IoOpcode::Read,
            cid,
            &SglDescriptor::transport_data_block(4096),
        )
    };

    // 16 writes at once: 2 in the channel, 14 waiting for room, none completing while the
    // gate is shut. Then a read of a namespace that does not exist: the queue takes commands
    // in order, so its refusal says every write before it was accepted.
    const N: u16 = 16;
    let mut pdus = Vec::new();
    let mut out = [0u8; 256];
    for cid in 0..N {
        let rw = ReadWrite {
            nsid: 1,
            slba: u64::from(cid),
            nlb: 1,
            ..Default::default()
        };
        let sqe = rw.to_sqe(IoOpcode::Write, cid, &SglDescriptor::in_capsule(0, 4096));
        let n = q.enc.capsule_cmd(&sqe, 4096, &mut out);
        pdus.extend_from_slice(&out[..n]);
        pdus.extend_from_slice(&[cid as u8; 4096]);
    }
    let n = q.enc.capsule_cmd(&read(40, 7), 0, &mut out);
    pdus.extend_from_slice(&out[..n]);
    q.send(&pdus);
    match q.recv() {
        Some((PduHeader::CapsuleResp(r), _)) if r.cqe.cid == 40 => {
            assert_eq!(r.cqe.status, Status::INVALID_NAMESPACE)
        }
        other => panic!("expected the marker's refusal first, got {other:?}"),
    }

    // The namespace goes away while the writes wait. A new command for it is refused, not
    // run on the removed bdev, and answered before any of the held writes.
    assert!(s.remove_namespace(1).is_some());
    let n = q.enc.capsule_cmd(&read(50, 1), 0, &mut out);
    q.send(&out[..n]);
    match q.recv() {
        Some((PduHeader::CapsuleResp(r), _)) if r.cqe.cid == 50 => {
            assert_eq!(r.cqe.status, Status::INVALID_NAMESPACE)
        }
        other => panic!("expected the refusal while the writes are held, got {other:?}"),
    }

    // Every accepted command still gets its answer (they were accepted for that namespace),
    // and the reactor keeps serving.
    open.store(true, Ordering::Release);
    let mut answered = std::collections::HashSet::new();
    while answered.len() < N as usize {
        match q.recv() {
            Some((PduHeader::CapsuleResp(r), _)) => {
                assert!(r.cqe.status.is_success(), "{:?}", r.cqe.status);
                assert!(
                    answered.insert(r.cqe.cid),
                    "cid {} answered twice",
                    r.cqe.cid
                );
            }
            other => panic!(
                "after {} answers: expected a response, got {other:?}",
                answered.len()
            ),
        }
    }
    assert_eq!(
        q.command(&read(99, 1), &[]).0.status,
        Status::INVALID_NAMESPACE
    );
}

#[test]
fn a_write_that_cannot_run_fails_without_asking_for_its_data() {
    let r = common::rig(NQN, common::malloc_1m());
    let (_a, mut q) = enabled_controller(r.addr, false);
    let blocks = 256; // malloc_1m: 256 blocks of 4 KiB
    // Data by R2T (no in-capsule data): `command` fails the test on any R2T.
    let write = |cid: u16, nsid: u32, slba: u64, nlb: u32, len: u32| {
        ReadWrite {
            nsid,
            slba,
            nlb,
            ..Default::default()
        }
        .to_sqe(
            IoOpcode::Write,
            cid,
            &SglDescriptor::transport_data_block(len),
        )
    };
    // A namespace that does not exist has no block size: neither 512-byte nor 4 KiB blocks
    // are asked for.
    let cases = [
        (
            write(16, 2, 0, 1, 512),
            Status::INVALID_NAMESPACE,
            "no namespace 2, 512-byte transfer",
        ),
        (
            write(10, 2, 0, 1, 4096),
            Status::INVALID_NAMESPACE,
            "no namespace 2, 4 KiB transfer",
        ),
        (
            write(11, 1, blocks, 1, 4096),
            Status::LBA_OUT_OF_RANGE,
            "past the end",
        ),
        (
            write(12, 1, blocks - 1, 2, 8192),
            Status::LBA_OUT_OF_RANGE,
            "across the end",
        ),
        (
            write(13, 1, u64::MAX, 1, 4096),
            Status::LBA_OUT_OF_RANGE,
            "SLBA + NLB overflows",
        ),
    ];
    for (sqe, status, what) in cases {
        let (c, data) = q.command(&sqe, &[]);
        assert_eq!(c.status, status, "{what}");
        assert!(data.is_empty());
    }
    // A Compare on a missing namespace, with in-capsule data: refused the same way.
    let cmp = ReadWrite {
        nsid: 9,
        slba: 0,
        nlb: 1,
        ..Default::default()
    }
    .to_sqe(IoOpcode::Compare, 14, &SglDescriptor::in_capsule(0, 4096));
    assert_eq!(
        q.command(&cmp, &[0u8; 4096]).0.status,
        Status::INVALID_NAMESPACE
    );
    // The last block is writable by R2T on the same queue, and the target still serves.
    let w = write(15, 1, blocks - 1, 1, 4096);
    let mut out = [0u8; 256];
    let n = q.enc.capsule_cmd(&w, 0, &mut out);
    q.send(&out[..n]);
    let Some((PduHeader::R2t(r2t), _)) = q.recv() else {
        panic!("a valid write asks for its data");
    };
    assert_eq!((r2t.cccid, r2t.r2tl), (15, 4096));
    let h = H2cData {
        cccid: 15,
        ttag: r2t.ttag,
        datao: 0,
        datal: 4096,
        last: true,
    };
    let n = q.enc.h2c_data(&h, &mut out);
    q.send(&out[..n]);
    q.send(&[6u8; 4096]);
    match q.recv() {
        Some((PduHeader::CapsuleResp(c), _)) => assert!(c.cqe.status.is_success()),
        other => panic!("expected the write's completion, got {other:?}"),
    }
    good_host_round_trip(r.addr, 4);
}

#[test]
fn get_log_page_with_a_huge_numd_allocates_nothing_of_that_size() {
    let r = common::rig(NQN, common::malloc_1m());
    let (mut a, _q) = enabled_controller(r.addr, false);
    let smart = |numd: u32, sgl_len: u32| {
        let mut sqe = GetLogPage {
            lid: LogPageId::SmartHealth as u8,
            numd,
            nsid: 0xffff_ffff,
            ..Default::default()
        }
        .to_sqe(20);
        sqe.set_sgl1(&SglDescriptor::transport_data_block(sgl_len));
        sqe
    };
    // NUMD 0 is 2^32 dwords (16 GiB): beyond MDTS, refused before any allocation.
    let (c, data) = a.command(&smart(0, 4096), &[]);
    assert_eq!(c.status, Status::INVALID_FIELD);
    assert!(data.is_empty());
    let just_over = (MAX_TRANSFER / 4 + 1) as u32;
    assert_eq!(
        a.command(&smart(just_over, u32::MAX), &[]).0.status,
        Status::INVALID_FIELD
    );
    // Within MDTS: the transfer is the smaller of NUMD and the host's buffer; past the end
    // of the 512-byte log, zeroes.
    let (c, data) = a.command(&smart(1024, 512), &[]);
    assert!(c.status.is_success(), "{:?}", c.status);
    assert_eq!(data.len(), 512);
    let (c, data) = a.command(&smart(1024, 4096), &[]);
    assert!(c.status.is_success(), "{:?}", c.status);
    assert_eq!(data.len(), 4096);
    assert!(data[512..].iter().all(|&b| b == 0));
}

#[test]
fn h2c_data_whose_last_flag_disagrees_with_the_data_ends_the_connection() {
    let r = common::rig(NQN, common::malloc_1m());
    // (bytes sent in the one H2CData PDU of an 8 KiB R2T, its LAST_PDU flag)
    for (datal, last, what) in [
        (4096, true, "marked the last PDU with half the data"),
        (8192, false, "all the data, not marked the last PDU"),
    ] {
        let (_a, mut q) = enabled_controller(r.addr, false);
        let w = ReadWrite {
            nsid: 1,
            slba: 0,
            nlb: 2,
            ..Default::default()
        }
        .to_sqe(
            IoOpcode::Write,
            7,
            &SglDescriptor::transport_data_block(8192),
        );
        let mut out = [0u8; 256];
        let n = q.enc.capsule_cmd(&w, 0, &mut out);
        q.send(&out[..n]);
        let Some((PduHeader::R2t(r2t), _)) = q.recv() else {
            panic!("a valid write asks for its data");
        };
        assert_eq!(r2t.r2tl, 8192);
        let h = H2cData {
            cccid: 7,
            ttag: r2t.ttag,
            datao: 0,
            datal,
            last,
        };
        let n = q.enc.h2c_data(&h, &mut out);
        q.send(&out[..n]);
        q.send(&vec![9u8; datal as usize]);
        match q.recv() {
            Some((PduHeader::C2hTermReq(t), _)) => {
                assert_eq!(t.fes, Fes::PDU_SEQUENCE_ERROR, "{what}")
            }
            other => panic!("{what}: expected C2HTermReq, got {other:?}"),
        }
    }
    good_host_round_trip(r.addr, 3);
}

#[test]
fn a_data_digest_error_in_one_pdu_of_a_transfer_fails_the_command_not_the_connection() {
    let r = common::rig(NQN, common::malloc_1m());
    let (_a, mut q) = enabled_controller(r.addr, true);
    let w = ReadWrite {
        nsid: 1,
        slba: 8,
        nlb: 2,
        ..Default::default()
    }
    .to_sqe(
        IoOpcode::Write,
        21,
        &SglDescriptor::transport_data_block(8192),
    );
    let mut out = [0u8; 256];
    let n = q.enc.capsule_cmd(&w, 0, &mut out);
    q.send(&out[..n]);
    let Some((PduHeader::R2t(r2t), _)) = q.recv() else {
        panic!("a valid write asks for its data");
    };
    // The R2T's data in two PDUs; the first one's data digest is wrong.
    let data = [0x5au8; 4096];
    for (k, bad) in [(0u32, true), (1, false)] {
        let h = H2cData {
            cccid: 21,
            ttag: r2t.ttag,
            datao: k * 4096,
            datal: 4096,
            last: k == 1,
        };
        let n = q.enc.h2c_data(&h, &mut out);
        let mut pdu = out[..n].to_vec();
        pdu.extend_from_slice(&data);
        let digest = DataDigest::of(&[&data[..]]) ^ u32::from(bad);
        pdu.extend_from_slice(&digest.to_le_bytes());
        q.send(&pdu);
    }
    match q.recv() {
        Some((PduHeader::CapsuleResp(c), _)) => {
            assert_eq!(
                (c.cqe.cid, c.cqe.status),
                (21, Status::TRANSIENT_TRANSPORT_ERROR)
            )
        }
        other => panic!("expected the write's failure, got {other:?}"),
    }
    // The connection serves the next command.
    let read = ReadWrite {
        nsid: 1,
        slba: 8,
        nlb: 1,
        ..Default::default()
    }
    .to_sqe(
        IoOpcode::Read,
        22,
        &SglDescriptor::transport_data_block(4096),
    );
    let (c, got) = q.command(&read, &[]);
    assert!(c.status.is_success(), "{:?}", c.status);
    assert_eq!(got.len(), 4096);
    good_host_round_trip(r.addr, 5);
}

#[test]
fn a_second_connect_on_one_connection_binds_no_second_controller() {
    let r = common::rig(NQN, common::malloc_1m());
    let mut h = Host::new(r.addr);
    h.ic(false, false);
    let cd = connect_data(NQN, 0xffff);
    let connect = |cid: u16, sgl: SglDescriptor| connect_sqe(cid, 0, sgl);
    // Connect 1 asks for its data by R2T and waits for it.
    let mut out = [0u8; 256];
    let n = h.enc.capsule_cmd(
        &connect(1, SglDescriptor::transport_data_block(1024)),
        0,
        &mut out,
    );
    h.send(&out[..n]);
    let Some((PduHeader::R2t(r2t), _)) = h.recv() else {
        panic!("Connect without in-capsule data asks for it");
    };
    // Connect 2, with its data, meanwhile: refused.
    let (c, _) = h.command(
        &connect(2, SglDescriptor::in_capsule(0, 1024)),
        &cd.to_bytes(),
    );
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR);
    // Connect 1's data: it binds the one controller.
    let hd = H2cData {
        cccid: 1,
        ttag: r2t.ttag,
        datao: 0,
        datal: 1024,
        last: true,
    };
    let n = h.enc.h2c_data(&hd, &mut out);
    h.send(&out[..n]);
    h.send(&cd.to_bytes());
    match h.recv() {
        Some((PduHeader::CapsuleResp(c), _)) => assert!(c.cqe.status.is_success()),
        other => panic!("expected Connect 1's completion, got {other:?}"),
    }
    assert_eq!(r.subsystem.controllers().len(), 1);
    // And once connected, another Connect is refused.
    let (c, _) = h.command(
        &connect(3, SglDescriptor::in_capsule(0, 1024)),
        &cd.to_bytes(),
    );
    assert_eq!(c.status, Status::COMMAND_SEQUENCE_ERROR);
    assert_eq!(r.subsystem.controllers().len(), 1);
}

#[test]
fn the_write_cache_is_always_reported_and_turning_it_off_makes_every_write_durable() {
    let m = common::malloc_1m();
    let r = common::rig(NQN, m.clone());
    let (mut a, mut q) = enabled_controller(r.addr, false);
    // Identify Controller: VWC present even with only a cache-less (malloc) namespace, so a
    // host flushes namespaces with a cache added later.
    let mut id = Sqe::new(AdminOpcode::Identify as u8, 30);
    id.set_cdw(10, 1); // CNS 01h: Identify Controller
    id.set_sgl1(&SglDescriptor::transport_data_block(4096));
    let (c, data) = a.command(&id, &[]);
    assert!(c.status.is_success(), "{:?}", c.status);
    let ic = ferroblk_target::spec::identify::IdentifyController::parse(&data).unwrap();
    assert_eq!(ic.vwc & 1, 1, "VWC present");

    let flushes = || m.info().stats().ops[ferroblk_bdev::IoType::Flush as usize];
    let write = |cid: u16| {
        ReadWrite {
            nsid: 1,
            slba: u64::from(cid),
            nlb: 1,
            ..Default::default()
        }
        .to_sqe(IoOpcode::Write, cid, &SglDescriptor::in_capsule(0, 4096))
    };
    let before = flushes();
    assert!(q.command(&write(1), &[1u8; 4096]).0.status.is_success());
    assert_eq!(flushes(), before, "write-back: no flush per write");
    // Set Features, Volatile Write Cache (06h), WCE = 0.
    let mut sf = Sqe::new(AdminOpcode::SetFeatures as u8, 31);
    sf.set_cdw(10, 0x06);
    sf.set_cdw(11, 0);
    assert!(a.command(&sf, &[]).0.status.is_success());
    assert!(q.command(&write(2), &[2u8; 4096]).0.status.is_success());
    assert_eq!(
        flushes(),
        before + 1,
        "write-through: the write was flushed"
    );
}

#[test]
fn a_discovery_controller_without_keep_alive_gets_one() {
    use ferroblk_target::spec::fabrics::DISCOVERY_NQN;
    let r = common::rig(NQN, common::malloc_1m());
    let mut h = Host::new(r.addr);
    h.ic(false, false);
    let cd = connect_data(DISCOVERY_NQN, 0xffff);
    let sqe = connect_sqe(1, 0, SglDescriptor::in_capsule(0, 1024));
    assert!(h.command(&sqe, &cd.to_bytes()).0.status.is_success());
    let disc = r.target.subsystem(DISCOVERY_NQN).unwrap();
    let c = disc.controllers();
    assert_eq!(c.len(), 1);
    assert_eq!(
        c[0].kato_ms.load(std::sync::atomic::Ordering::Relaxed),
        120_000,
        "a silent discovery connection must not hold its listener slot forever"
    );
}

#[test]
fn a_host_that_never_sends_write_data_holds_at_most_the_budget() {
    use ferroblk_target::queue::AWAIT_DATA_BUDGET;
    // 1 MiB writes by R2T on a 32 MiB namespace; the host sends none of their data.
    let big = Arc::new(
        ferroblk_bdev::malloc::MallocBdev::new("m", ferroblk_bdev::BlockSize::B4096, 8192, 0)
            .unwrap(),
    );
    let r = common::rig(NQN, big);
    let (_a, mut q) = enabled_controller(r.addr, false);
    const MIB: u32 = 1 << 20;
    let granted = AWAIT_DATA_BUDGET / MIB as usize;
    let n = granted as u16 + 8;
    let mut pdus = Vec::new();
    let mut out = [0u8; 256];
    for cid in 0..n {
        let w = ReadWrite {
            nsid: 1,
            slba: u64::from(cid) * 256,
            nlb: 256,
            ..Default::default()
        }
        .to_sqe(
            IoOpcode::Write,
            cid,
            &SglDescriptor::transport_data_block(MIB),
        );
        let k = q.enc.capsule_cmd(&w, 0, &mut out);
        pdus.extend_from_slice(&out[..k]);
    }
    // A command that completes at once, after them: once its answer is in, every write before
    // it was taken, and only the budget's worth of them got an R2T.
    let mut flush = Sqe::new(IoOpcode::Flush as u8, 100);
    flush.set_nsid(1);
    let k = q.enc.capsule_cmd(&flush, 0, &mut out);
    pdus.extend_from_slice(&out[..k]);
    q.send(&pdus);
    let mut r2ts = Vec::new();
    loop {
        match q.recv() {
            Some((PduHeader::R2t(t), _)) => r2ts.push(t),
            Some((PduHeader::CapsuleResp(c), _)) if c.cqe.cid == 100 => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(r2ts.len(), granted, "R2Ts beyond the budget");
    // The data of the first write: it completes, and the next waiting write gets its R2T.
    let first = r2ts[0];
    let data = vec![0x11u8; MIB as usize];
    for (k, chunk) in data.chunks(128 * 1024).enumerate() {
        let h = H2cData {
            cccid: first.cccid,
            ttag: first.ttag,
            datao: (k * 128 * 1024) as u32,
            datal: chunk.len() as u32,
            last: (k + 1) * 128 * 1024 >= data.len(),
        };
        let m = q.enc.h2c_data(&h, &mut out);
        q.send(&out[..m]);
        q.send(chunk);
    }
    let (mut done, mut next) = (false, None);
    while !done || next.is_none() {
        match q.recv() {
            Some((PduHeader::CapsuleResp(c), _)) => {
                assert_eq!(c.cqe.cid, first.cccid);
                assert!(c.cqe.status.is_success(), "{:?}", c.cqe.status);
                done = true;
            }
            Some((PduHeader::R2t(t), _)) => next = Some(t.cccid),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        next,
        Some(granted as u16),
        "the first waiting write, in order"
    );
}
