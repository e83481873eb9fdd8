//! Fuzz target bodies (not a public API): the NVMe/TCP PDU decoder, the NVMe/RDMA connect
//! private data and capsule parsers, NVMe admin, Fabrics and I/O commands sent to a live
//! target over loopback, and a hostile controller's byte stream against the initiator. Called by the cargo-fuzz targets in
//! `fuzz/` and replayed over the checked-in corpus by the tests below.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ferroblk_bdev::fuzzing::background_panics;
use ferroblk_bdev::malloc::MallocBdev;
use ferroblk_bdev::reactor::{ReactorConfig, Reactors};
use ferroblk_bdev::{Bdev, BlockSize};

use crate::spec::command::{
    AdminOpcode, GetLogPage, Identify, IoOpcode, ReadWrite, SglDescriptor, Sqe,
};
use crate::spec::fabrics::{ConnectCommand, ConnectData, PropertyGet, PropertySet};
use crate::spec::features::SetFeatures;
use crate::subsystem::{ListenerSpec, SubsystemSpec, Target};
use crate::transport::tcp::listener::Listener;
use crate::transport::tcp::pdu::{
    CH_LEN, DataDigest, Decoded, H2cData, IcReq, MAX_HEADER_LEN, Negotiated, PduDecoder,
    PduEncoder, PduError, PduHeader, Role, TERM_REQ_MAX_DATA, TERM_REQ_MAX_PLEN,
};

// ------------------------------------------------------------------------------------ tcp_pdu

/// Feeds arbitrary bytes to the NVMe/TCP PDU decoder, as a controller and as a host, before and
/// after the connection is established, with and without digests and with any PDU data
/// alignment. The decoder must never panic and must keep its promises: `NeedMore` asks for at
/// least one byte, a decoded PDU lies within the buffer, a fatal error echoes at most the bytes
/// it was given and always yields an encodable termination request.
///
/// The first input byte selects the configuration: bit 0 role (controller/host), bit 1
/// established, bit 2 header digests, bit 3 data digests, bits 7:4 the PDA (0..15) of both
/// directions. An ICReq/ICResp decoded before establishment establishes the decoder with that
/// configuration, so the fuzzer can cross the state change.
pub fn tcp_pdu(input: &[u8]) {
    let Some((&cfg, mut buf)) = input.split_first() else {
        return;
    };
    let role = if cfg & 1 == 0 {
        Role::Controller
    } else {
        Role::Host
    };
    let n = Negotiated {
        hdgst: cfg & 4 != 0,
        ddgst: cfg & 8 != 0,
        hpda: cfg >> 4,
        cpda: cfg >> 4,
        maxh2cdata: 16 * 1024,
        maxr2t: 0,
    };
    let mut d = match role {
        Role::Controller => PduDecoder::controller(8192),
        Role::Host => PduDecoder::host(64 * 1024),
    };
    if cfg & 2 != 0 {
        d.establish(n);
    }
    let _ = d.decode_header(buf);
    loop {
        match d.decode(buf) {
            Ok(Decoded::NeedMore(need)) => {
                assert!(need >= 1);
                return;
            }
            Ok(Decoded::Ready(l)) => {
                assert!(l.plen >= CH_LEN && l.plen <= buf.len());
                assert!(l.header_len <= l.plen);
                assert!(l.data.start <= l.data.end && l.data.end <= l.plen);
                if matches!(l.header, PduHeader::IcReq(_) | PduHeader::IcResp(_)) {
                    d.establish(n);
                }
                buf = &buf[l.plen..];
            }
            Err(PduError::DataDigest(l)) => {
                assert!(l.plen <= buf.len());
                buf = &buf[l.plen..];
            }
            Err(PduError::Fatal(f)) => {
                assert!(f.echo_len <= buf.len() && f.echo_len <= TERM_REQ_MAX_DATA);
                let mut out = [0u8; MAX_HEADER_LEN];
                let len = PduEncoder::new(role).term_req_for(&f, buf, &mut out);
                assert!(len <= TERM_REQ_MAX_PLEN);
                return;
            }
            Err(PduError::Close) => return,
        }
    }
}

/// Valid PDU streams for [`tcp_pdu`]: an ICReq then a command capsule with in-capsule data.
pub fn tcp_pdu_seeds() -> Vec<Vec<u8>> {
    let req = IcReq {
        pfv: 0,
        hpda: 0,
        hdgst: true,
        ddgst: true,
        maxr2t: 0,
    };
    let mut out = [0u8; 256];
    let mut s = vec![0x0c];
    let n = PduEncoder::new(Role::Host).ic_req(&req, &mut out);
    s.extend_from_slice(&out[..n]);
    let neg = Negotiated {
        hdgst: true,
        ddgst: true,
        hpda: 0,
        cpda: 0,
        maxh2cdata: 16 * 1024,
        maxr2t: 0,
    };
    let enc = PduEncoder::established(Role::Host, &neg);
    let data = [0x5a; 512];
    let w = ReadWrite {
        nsid: 1,
        slba: 0,
        nlb: 1,
        ..Default::default()
    }
    .to_sqe(IoOpcode::Write, 1, &SglDescriptor::in_capsule(0, 512));
    let n = enc.capsule_cmd(&w, 512, &mut out);
    s.extend_from_slice(&out[..n]);
    s.extend_from_slice(&data);
    s.extend_from_slice(&DataDigest::of(&[&data]).to_le_bytes());
    vec![vec![0x00], s]
}

// --------------------------------------------------------------------------------- nvmf_admin

/// The subsystem NQN of the live target.
pub const FUZZ_NQN: &str = "nqn.2026-12.io.ferroblk:fuzz";
/// The host NQN the seeds use.
const FUZZ_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:f0220000-0000-4000-8000-000000000001";
/// A Connect data CNTLID that the harness replaces with the controller it made for an I/O
/// queue (see [`nvmf_admin`]).
const LIVE_CNTLID: u16 = 0xfffe;
/// The command identifier of the harness's closing command.
const MARKER_CID: u16 = 0xffff;
/// Longest input used.
const NVMF_MAX_INPUT: usize = 64 << 10;

/// A live target: one reactor, one subsystem admitting any host with a 1 MiB namespace of
/// 512-byte blocks and a 1 MiB one of 4 KiB blocks, a listener on loopback.
struct LiveTarget {
    addr: SocketAddr,
    _listener: Listener,
    _reactors: Reactors,
}

/// The address of the process's live target, started on first use and kept (reachable, so
/// that LeakSanitizer does not count it) for the process's lifetime.
fn target_addr() -> SocketAddr {
    static LIVE: OnceLock<Mutex<LiveTarget>> = OnceLock::new();
    let live = LIVE.get_or_init(|| {
        let reactors = Reactors::start(&ReactorConfig {
            cpus: vec![None],
            idle_poll: Duration::from_micros(50),
        })
        .expect("reactor");
        let target = Arc::new(Target::new());
        let subsystem = target
            .add_subsystem(&SubsystemSpec {
                nqn: FUZZ_NQN.into(),
                serial: None,
                model: "fuzz".into(),
                allow_any_host: true,
                hosts: vec![],
                namespace: vec![],
            })
            .expect("subsystem");
        for (nsid, bs) in [(1, BlockSize::B512), (2, BlockSize::B4096)] {
            let blocks = (1 << 20) >> bs.shift();
            let bdev: Arc<dyn Bdev> =
                Arc::new(MallocBdev::new("fuzz", bs, blocks, blocks).expect("malloc"));
            subsystem
                .add_namespace(nsid, bdev, None)
                .expect("namespace");
        }
        let listener = Listener::start(
            ListenerSpec::new("127.0.0.1", 0),
            target,
            reactors.handles().to_vec(),
        )
        .expect("listener");
        Mutex::new(LiveTarget {
            addr: listener.local_addr(),
            _listener: listener,
            _reactors: reactors,
        })
    });
    live.lock().expect("live target").addr
}

/// A host connection: the socket and the codec state after the ICReq/ICResp exchange.
struct HostConn {
    s: TcpStream,
    enc: PduEncoder,
    dec: PduDecoder,
    ddgst: bool,
    rx: Vec<u8>,
}

/// What the controller sent.
enum Answer {
    /// A PDU (its data is not kept).
    Pdu(PduHeader),
    /// The connection ended (closed or reset).
    End,
}

impl HostConn {
    fn open(addr: SocketAddr, hdgst: bool, ddgst: bool, hpda: u8) -> HostConn {
        let s = TcpStream::connect(addr).expect("connect to the target");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut c = HostConn {
            s,
            enc: PduEncoder::new(Role::Host),
            dec: PduDecoder::host(1 << 20),
            ddgst: false,
            rx: Vec::new(),
        };
        let req = IcReq {
            pfv: 0,
            hpda,
            hdgst,
            ddgst,
            maxr2t: 0,
        };
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = c.enc.ic_req(&req, &mut out);
        c.s.write_all(&out[..n]).expect("send ICReq");
        let Answer::Pdu(PduHeader::IcResp(resp)) = c.recv() else {
            panic!("no ICResp to a valid ICReq");
        };
        let neg = Negotiated::from_exchange(&req, &resp);
        c.dec.establish(neg);
        c.enc = PduEncoder::established(Role::Host, &neg);
        c.ddgst = neg.ddgst;
        c
    }

    /// The next PDU from the controller. A PDU that the host decoder refuses is a bug of the
    /// controller's encoder.
    fn recv(&mut self) -> Answer {
        loop {
            match self.dec.decode(&self.rx) {
                Ok(Decoded::Ready(l)) => {
                    self.rx.drain(..l.plen);
                    return Answer::Pdu(l.header);
                }
                Ok(Decoded::NeedMore(_)) => {}
                Err(PduError::DataDigest(_)) => panic!("the controller sent a bad data digest"),
                Err(PduError::Fatal(f)) => panic!("the controller sent a malformed PDU: {f:?}"),
                Err(PduError::Close) => panic!("the controller sent a malformed C2HTermReq"),
            }
            let mut buf = [0u8; 65536];
            match self.s.read(&mut buf) {
                Ok(0) => return Answer::End,
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Answer::End,
                // libFuzzer's timer signals interrupt the read.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("the target neither answers nor closes the connection: {e}"),
            }
        }
    }

    /// Sends a command capsule with in-capsule `data`; false if the connection is gone.
    fn capsule(&mut self, sqe: &Sqe, data: &[u8]) -> bool {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = self.enc.capsule_cmd(sqe, data.len() as u32, &mut out);
        self.send_pdu(&out[..n], data)
    }

    fn send_pdu(&mut self, header: &[u8], data: &[u8]) -> bool {
        let mut pdu = Vec::with_capacity(header.len() + data.len() + 4);
        pdu.extend_from_slice(header);
        pdu.extend_from_slice(data);
        if self.ddgst && !data.is_empty() {
            pdu.extend_from_slice(&DataDigest::of(&[data]).to_le_bytes());
        }
        self.s.write_all(&pdu).is_ok()
    }

    /// Sends `sqe` and waits for its completion (skipping data and other completions).
    fn command(&mut self, sqe: &Sqe, data: &[u8]) -> Option<crate::spec::Cqe> {
        if !self.capsule(sqe, data) {
            return None;
        }
        loop {
            match self.recv() {
                Answer::Pdu(PduHeader::CapsuleResp(r)) if r.cqe.cid == sqe.cid() => {
                    return Some(r.cqe);
                }
                Answer::Pdu(_) => {}
                Answer::End => return None,
            }
        }
    }
}

/// Connect data for the fuzz subsystem.
fn connect_data(cntlid: u16) -> [u8; 1024] {
    ConnectData {
        hostid: [0x42; 16],
        cntlid,
        subnqn: FUZZ_NQN.into(),
        hostnqn: FUZZ_HOST.into(),
    }
    .to_bytes()
}

/// A Connect SQE for queue `qid`.
fn connect_sqe(qid: u16, cid: u16) -> Sqe {
    ConnectCommand {
        recfmt: 0,
        qid,
        sqsize: 31,
        cattr: 0,
        kato: 0,
        sgl1: SglDescriptor::in_capsule(0, 1024),
    }
    .to_sqe(cid)
}

/// Sets CC.EN on the controller of an admin connection.
fn enable(c: &mut HostConn) -> bool {
    let ps = PropertySet {
        attrib: 2,
        ofst: 0x14,
        value: 0x0046_0001,
    }
    .to_sqe(MARKER_CID - 1);
    c.command(&ps, &[]).is_some_and(|q| q.status.is_success())
}

/// Sends a sequence of fuzz-chosen command capsules and H2CData PDUs to a live NVMe/TCP target
/// (a real subsystem with malloc namespaces, behind a real listener and connection poller),
/// then one closing Keep Alive, and reads every answer. The controller must answer it or end
/// the connection, never panic, hang or send a PDU the host decoder refuses.
///
/// Byte 0: bit 0 header digests, bit 1 data digests, bits 2-3 HPDA; bit 4 first makes an
/// enabled controller on another connection, so that this one can connect an I/O queue to it
/// (a Connect data CNTLID of FFFEh is replaced by that controller's ID). Then records, each a
/// kind byte and a body: an even kind is a capsule `SQE (64 bytes) | len (u16 LE) | in-capsule
/// data`; an odd kind an H2CData `CCCID (u16) | TTAG (u16) | DATAO (u32) | len (u16) | data`,
/// LAST_PDU if kind bit 1 is set. Returns whether the closing command was answered.
pub fn nvmf_admin(data: &[u8]) -> bool {
    let data = &data[..data.len().min(NVMF_MAX_INPUT)];
    let Some((&cfg, mut rest)) = data.split_first() else {
        return false;
    };
    let before = background_panics();
    let addr = target_addr();
    let mut live_cntlid = None;
    let mut admin = None;
    if cfg & 0x10 != 0 {
        let mut a = HostConn::open(addr, false, false, 0);
        let c = a
            .command(&connect_sqe(0, 1), &connect_data(0xffff))
            .expect("admin Connect is answered");
        assert!(c.status.is_success(), "admin Connect: {:?}", c.status);
        live_cntlid = Some(c.dw0 as u16);
        assert!(enable(&mut a), "enabling the controller");
        admin = Some(a);
    }
    let mut c = HostConn::open(addr, cfg & 1 != 0, cfg & 2 != 0, (cfg >> 2) & 3);
    let mut open = true;
    while open && !rest.is_empty() {
        let kind = rest[0];
        rest = &rest[1..];
        if kind & 1 == 0 {
            let Some(sqe) = Sqe::parse(rest) else { break };
            rest = &rest[64..];
            let (len, body) = take_len(&mut rest);
            let mut body = body.to_vec();
            if let Some(id) = live_cntlid
                && body.len() == 1024
                && body[16..18] == LIVE_CNTLID.to_le_bytes()
            {
                body[16..18].copy_from_slice(&id.to_le_bytes());
            }
            debug_assert_eq!(len, body.len());
            open = c.capsule(&sqe, &body);
        } else {
            if rest.len() < 8 {
                break;
            }
            let h = H2cData {
                cccid: u16::from_le_bytes([rest[0], rest[1]]),
                ttag: u16::from_le_bytes([rest[2], rest[3]]),
                datao: u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]),
                datal: 0,
                last: kind & 2 != 0,
            };
            rest = &rest[8..];
            let (len, body) = take_len(&mut rest);
            if len == 0 {
                continue; // a data PDU carries data
            }
            let h = H2cData {
                datal: len as u32,
                ..h
            };
            let mut out = [0u8; MAX_HEADER_LEN];
            let n = c.enc.h2c_data(&h, &mut out);
            open = c.send_pdu(&out[..n], body);
        }
    }
    let marker = Sqe::new(AdminOpcode::KeepAlive as u8, MARKER_CID);
    let answered = open && c.command(&marker, &[]).is_some();
    drop(c);
    drop(admin);
    assert_eq!(background_panics(), before, "a background thread panicked");
    answered
}

/// Takes `len (u16 LE) | bytes` (clamped to what is left) off the front of `rest`.
fn take_len<'a>(rest: &mut &'a [u8]) -> (usize, &'a [u8]) {
    if rest.len() < 2 {
        *rest = &[];
        return (0, &[]);
    }
    let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
    let body = &rest[2..2 + len];
    *rest = &rest[2 + len..];
    (len, body)
}

/// Appends a capsule record to a [`nvmf_admin`] input.
fn capsule_record(out: &mut Vec<u8>, sqe: &Sqe, data: &[u8]) {
    out.push(0);
    out.extend_from_slice(sqe.as_bytes());
    out.extend_from_slice(&(data.len() as u16).to_le_bytes());
    out.extend_from_slice(data);
}

/// Appends an H2CData record (LAST_PDU) to a [`nvmf_admin`] input.
fn h2c_record(out: &mut Vec<u8>, cccid: u16, ttag: u16, datao: u32, data: &[u8]) {
    out.push(3);
    out.extend_from_slice(&cccid.to_le_bytes());
    out.extend_from_slice(&ttag.to_le_bytes());
    out.extend_from_slice(&datao.to_le_bytes());
    out.extend_from_slice(&(data.len() as u16).to_le_bytes());
    out.extend_from_slice(data);
}

/// Valid host sessions for [`nvmf_admin`]: the Linux admin queue bring-up (Connect, property
/// reads, CC.EN, Identify, Get Log Page, Set Features, Keep Alive), and an I/O queue with
/// writes in capsule and by R2T/H2CData, reads, flush and write zeroes, with digests.
pub fn nvmf_admin_seeds() -> Vec<Vec<u8>> {
    let mut admin = vec![0x00];
    capsule_record(&mut admin, &connect_sqe(0, 1), &connect_data(0xffff));
    for (cid, ofst, attrib) in [(2u16, 0x00u32, 1u8), (3, 0x08, 0), (4, 0x1c, 0)] {
        capsule_record(&mut admin, &PropertyGet { attrib, ofst }.to_sqe(cid), &[]);
    }
    let en = PropertySet {
        attrib: 2,
        ofst: 0x14,
        value: 0x0046_0001,
    };
    capsule_record(&mut admin, &en.to_sqe(5), &[]);
    for (cid, cns, nsid) in [(6u16, 1u8, 0u32), (7, 2, 0), (8, 0, 1), (9, 3, 1)] {
        let id = Identify {
            cns,
            cntid: 0,
            nsid,
            cnssid: 0,
            csi: 0,
        };
        capsule_record(&mut admin, &id.to_sqe(cid), &[]);
    }
    for (cid, lid) in [(10u16, 0x02u8), (11, 0x04), (12, 0x0c)] {
        let mut sqe = GetLogPage {
            lid,
            numd: 128,
            ..Default::default()
        }
        .to_sqe(cid);
        sqe.set_sgl1(&SglDescriptor::transport_data_block(512));
        capsule_record(&mut admin, &sqe, &[]);
    }
    let nq = SetFeatures {
        fid: 0x07,
        sv: false,
        nsid: 0,
        cdw11: 0x0003_0003,
        cdw12: 0,
    };
    capsule_record(&mut admin, &nq.to_sqe(13), &[]);
    capsule_record(
        &mut admin,
        &Sqe::new(AdminOpcode::AsyncEventRequest as u8, 14),
        &[],
    );
    capsule_record(&mut admin, &Sqe::new(AdminOpcode::KeepAlive as u8, 15), &[]);

    let mut io = vec![0x13];
    capsule_record(&mut io, &connect_sqe(1, 1), &connect_data(LIVE_CNTLID));
    let rw = |nsid: u32, slba: u64, nlb: u32| ReadWrite {
        nsid,
        slba,
        nlb,
        ..Default::default()
    };
    let data = vec![0x3c; 1024];
    // First, so that its R2T takes slot 0 (TTAG 0) whatever the timing.
    capsule_record(
        &mut io,
        &rw(2, 1, 1).to_sqe(
            IoOpcode::Write,
            3,
            &SglDescriptor::transport_data_block(4096),
        ),
        &[],
    );
    h2c_record(&mut io, 3, 0, 0, &[0xc3; 4096]);
    capsule_record(
        &mut io,
        &rw(1, 2, 2).to_sqe(IoOpcode::Write, 2, &SglDescriptor::in_capsule(0, 1024)),
        &data,
    );
    capsule_record(
        &mut io,
        &rw(1, 2, 2).to_sqe(
            IoOpcode::Read,
            4,
            &SglDescriptor::transport_data_block(1024),
        ),
        &[],
    );
    capsule_record(
        &mut io,
        &rw(1, 2, 2).to_sqe(IoOpcode::Compare, 5, &SglDescriptor::in_capsule(0, 1024)),
        &data,
    );
    let mut flush = Sqe::new(IoOpcode::Flush as u8, 6);
    flush.set_nsid(1);
    capsule_record(&mut io, &flush, &[]);
    let mut wz = Sqe::new(IoOpcode::WriteZeroes as u8, 7);
    wz.set_nsid(2);
    wz.set_cdw(10, 3);
    wz.set_cdw(12, 1);
    capsule_record(&mut io, &wz, &[]);
    vec![admin, io]
}

// ----------------------------------------------------------------------------------- rdma_wire

/// Feeds arbitrary bytes to the NVMe/RDMA parsers of what a host sends besides commands: byte 0
/// bit 0 picks the RDMA CM connect request's private data (clear) or a received command
/// capsule (set); the rest is the input. Accepted private data must describe queue sizes a
/// queue can take; a refusal must encode as a reject; a capsule must be split where its SQE
/// ends, and a keyed descriptor only read from a capsule without in-capsule data.
pub fn rdma_wire(input: &[u8]) {
    use crate::subsystem::admin::QUEUE_ENTRIES;
    use crate::transport::rdma::wire::{
        CAPSULE_MAX, CapsuleError, CmRequest, DataDesc, parse_capsule,
    };
    let Some((&sel, rest)) = input.split_first() else {
        return;
    };
    if sel & 1 == 0 {
        match CmRequest::parse(rest) {
            Ok(r) => {
                assert!(rest.len() >= CmRequest::FIELDS);
                assert!((2..=QUEUE_ENTRIES).contains(&r.entries()));
                assert!(r.hrqsize >= 1 && r.hrqsize <= QUEUE_ENTRIES);
            }
            Err(st) => assert_eq!(st.private_data()[2..], (st as u16).to_le_bytes()),
        }
        return;
    }
    match parse_capsule(rest) {
        Ok((sqe, icd, desc)) => {
            assert_eq!(Sqe::LEN + icd, rest.len());
            assert_eq!(sqe.as_bytes()[..], rest[..Sqe::LEN]);
            if let DataDesc::Keyed(k) = desc {
                assert_eq!(icd, 0);
                assert!(k.length < 1 << 24);
            }
        }
        Err(CapsuleError::Short(n)) => assert!(n < Sqe::LEN && n == rest.len()),
        Err(CapsuleError::Long(n)) => assert!(n > CAPSULE_MAX && n == rest.len()),
    }
}

/// Seeds: Linux's admin and I/O queue connect requests, and capsules with a keyed descriptor
/// and with in-capsule data.
pub fn rdma_wire_seeds() -> Vec<Vec<u8>> {
    use crate::spec::command::{KeyedSglDescriptor, sgl_subtype};
    let req = |qid: u16, hrq: u16, hsq: u16| {
        let mut b = vec![0u8; 33];
        b[3..5].copy_from_slice(&qid.to_le_bytes());
        b[5..7].copy_from_slice(&hrq.to_le_bytes());
        b[7..9].copy_from_slice(&hsq.to_le_bytes());
        b
    };
    let rw = ReadWrite {
        nsid: 1,
        slba: 8,
        nlb: 2,
        ..ReadWrite::default()
    };
    let mut keyed = vec![1u8];
    let mut sqe = rw.to_sqe(IoOpcode::Read, 5, &SglDescriptor::transport_data_block(0));
    let mut b = *sqe.as_bytes();
    b[24..40].copy_from_slice(
        &KeyedSglDescriptor {
            address: 0x7f00_0000_1000,
            length: 8192,
            key: 0x1234_5678,
            subtype: sgl_subtype::INVALIDATE_KEY,
        }
        .to_bytes(),
    );
    keyed.extend_from_slice(&b);
    sqe = rw.to_sqe(IoOpcode::Write, 6, &SglDescriptor::in_capsule(0, 8192));
    let mut icd = vec![1u8];
    icd.extend_from_slice(sqe.as_bytes());
    icd.extend(std::iter::repeat_n(0xa5, 8192));
    vec![req(0, 32, 31), req(1, 128, 127), keyed, icd]
}

// ---------------------------------------------------------------------------------- nvmf_host

/// Most bytes of one `nvmf_host` input the fake controller sends.
const HOST_MAX_INPUT: usize = 80 * 1024;

/// A hostile NVMe/TCP controller against this crate's initiator (what a remote target, or a
/// man in the middle, can make the `nvmf` bdev's queues read). The first input byte selects
/// what the host asks for: bit 0 header digests, bit 1 data digests, bit 2 a write (else a
/// read), bit 3 a 64 KiB transfer (else 4 KiB). The rest is the byte stream the controller
/// sends: its first 128 bytes once it has read the ICReq, the others once the command
/// capsule has come; then it takes the host's write data until the host closes. The queue connects (ICResp), runs one
/// command (Fabrics Connect is skipped: a queue takes any command once ICResp is in) and must
/// come back with a completion or an error, without panicking, hanging past its timeout or
/// touching memory outside its buffers. Returns whether the command completed successfully.
pub fn nvmf_host(data: &[u8]) -> bool {
    nvmf_host_within(data, Duration::from_millis(200))
}

/// [`nvmf_host`] with `timeout` for the connection and for the command (the seeds' test
/// gives a loaded machine more time).
fn nvmf_host_within(data: &[u8], timeout: Duration) -> bool {
    use crate::initiator::Xfer;
    use crate::initiator::queue::{Queue, QueueParams};
    use crate::subsystem::Trtype;

    let data = &data[..data.len().min(HOST_MAX_INPUT)];
    let Some((&cfg, stream)) = data.split_first() else {
        return false;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local address");
    let stream = stream.to_vec();
    let controller = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        // Guards only: the host closes the connection when it is done.
        let _ = s.set_read_timeout(Some(4 * timeout));
        let mut icreq = [0u8; 128];
        if s.read_exact(&mut icreq).is_err() {
            return;
        }
        // The ICResp's 128 bytes, then, once the command capsule is in, the rest.
        let (resp, rest) = stream.split_at(stream.len().min(128));
        let _ = s.write_all(resp);
        let mut capsule = [0u8; 72];
        if s.read_exact(&mut capsule).is_ok() {
            let _ = s.write_all(rest);
        }
        // Take what the host sends (write data) until it closes.
        let mut sink = [0u8; 16384];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let len = if cfg & 8 != 0 { 64 * 1024 } else { 4096 };
    let params = QueueParams {
        qid: 1,
        depth: 4,
        hdgst: cfg & 1 != 0,
        ddgst: cfg & 2 != 0,
        max_data: 64 * 1024,
        max_in_capsule: 0,
    };
    let mut ok = false;
    if let Ok(mut q) = Queue::connect(Trtype::Tcp, addr, params, timeout) {
        let write = cfg & 4 != 0;
        let rw = ReadWrite {
            nsid: 1,
            slba: 0,
            nlb: (len / 4096) as u32,
            ..ReadWrite::default()
        };
        let (opc, xfer) = if write {
            (IoOpcode::Write, Xfer::ToController)
        } else {
            (IoOpcode::Read, Xfer::FromController)
        };
        let sqe = rw.to_sqe(opc, 0, &SglDescriptor::transport_data_block(len as u32));
        let r = q.execute(sqe, xfer, vec![0x5a; len], timeout, "fuzz");
        ok = r.is_ok_and(|c| c.cqe.status.is_success());
        q.close();
    }
    controller.join().expect("fake controller");
    ok
}

/// Seeds for [`nvmf_host`]: an ICResp, then a read's data and completion, a write's R2T and
/// completion, with and without digests.
pub fn nvmf_host_seeds() -> Vec<Vec<u8>> {
    use crate::spec::Cqe;
    use crate::transport::tcp::pdu::{C2hData, IcResp, R2t};
    let mut seeds = Vec::new();
    for cfg in [0u8, 3, 4, 7, 8, 12] {
        let (hdgst, ddgst) = (cfg & 1 != 0, cfg & 2 != 0);
        let len: u32 = if cfg & 8 != 0 { 64 * 1024 } else { 4096 };
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            hdgst,
            ddgst,
            maxh2cdata: 16 * 1024,
        };
        let mut enc = PduEncoder::new(Role::Controller);
        let mut out = vec![cfg];
        let mut h = [0u8; MAX_HEADER_LEN];
        let n = enc.ic_resp(&resp, &mut h);
        out.extend_from_slice(&h[..n]);
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            hdgst,
            ddgst,
            maxr2t: 0,
        };
        enc = PduEncoder::established(Role::Controller, &Negotiated::from_exchange(&req, &resp));
        if cfg & 4 != 0 {
            let n = enc.r2t(
                &R2t {
                    cccid: 0,
                    ttag: 1,
                    r2to: 0,
                    r2tl: len,
                },
                &mut h,
            );
            out.extend_from_slice(&h[..n]);
        } else {
            // The data in PDUs of at most 16 KiB.
            let data = vec![0xc3u8; 16 * 1024];
            let mut off = 0;
            while off < len {
                let n_data = (len - off).min(16 * 1024);
                let n = enc.c2h_data(
                    &C2hData {
                        cccid: 0,
                        datao: off,
                        datal: n_data,
                        last: off + n_data == len,
                        success: false,
                    },
                    &mut h,
                );
                out.extend_from_slice(&h[..n]);
                let part = &data[..n_data as usize];
                out.extend_from_slice(part);
                if ddgst {
                    out.extend_from_slice(&DataDigest::of(&[part]).to_le_bytes());
                }
                off += n_data;
            }
        }
        let n = enc.capsule_resp(&Cqe::new(0, crate::spec::Status::SUCCESS), &mut h);
        out.extend_from_slice(&h[..n]);
        seeds.push(out);
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroblk_bdev::fuzzing::replay;

    #[test]
    fn tcp_pdu_corpus_replays() {
        replay("tcp_pdu", &tcp_pdu_seeds(), tcp_pdu);
    }

    #[test]
    fn nvmf_host_corpus_replays() {
        replay("nvmf_host", &nvmf_host_seeds(), |d| {
            nvmf_host(d);
        });
    }

    #[test]
    fn nvmf_host_seeds_complete_their_command() {
        for (i, s) in nvmf_host_seeds().iter().enumerate() {
            assert!(
                nvmf_host_within(s, Duration::from_secs(10)),
                "seed {i} does not reach a successful completion"
            );
        }
    }

    #[test]
    fn rdma_wire_corpus_replays() {
        replay("rdma_wire", &rdma_wire_seeds(), rdma_wire);
    }

    #[test]
    fn nvmf_admin_corpus_replays() {
        replay("nvmf_admin", &nvmf_admin_seeds(), |d| {
            nvmf_admin(d);
        });
    }

    #[test]
    fn get_log_page_beyond_mdts_is_refused_not_allocated() {
        // NUMD 0 asks for 2^32 dwords (16 GiB): the target allocated that much before answering
        // (found by nvmf_admin as an out-of-memory).
        let mut c = HostConn::open(target_addr(), false, false, 0);
        let cq = c
            .command(&connect_sqe(0, 1), &connect_data(0xffff))
            .expect("Connect answered");
        assert!(cq.status.is_success());
        assert!(enable(&mut c));
        let mut sqe = GetLogPage {
            lid: 0x02,
            ..Default::default()
        }
        .to_sqe(2);
        sqe.set_cdw(10, 0x02 | 0xffff << 16);
        sqe.set_cdw(11, 0xffff);
        sqe.set_sgl1(&SglDescriptor::transport_data_block(4096));
        let cq = c.command(&sqe, &[]).expect("Get Log Page answered");
        assert_eq!(cq.status, crate::spec::Status::INVALID_FIELD);
    }

    #[test]
    fn nvmf_admin_seeds_are_valid_sessions() {
        // The fuzzer starts from sessions the controller takes to the end, not from ones it
        // ends at the first command.
        for s in nvmf_admin_seeds() {
            assert!(nvmf_admin(&s), "seed session ended early");
        }
    }
}
