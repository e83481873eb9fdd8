//! Hostile NVMe/RDMA commands against a real `NvmeQueue` in keyed-SGL mode (what the RDMA
//! transport's queue pair poller drives), on a real reactor with a malloc namespace; the
//! transport is a recorder, so no RDMA device is needed: Keyed SGL Data Blocks whose length is not the
//! command's, descriptors of another transport, and a host with more commands outstanding
//! than its queue has entries.

mod common;

use std::sync::Arc;

use ferroblk_bdev::reactor::ReactorHandle;
use ferroblk_bdev::{AlignedBuf, bufpool};

use ferroblk_target::queue::{NvmeQueue, Transport};
use ferroblk_target::spec::command::{
    IoOpcode, KeyedSglDescriptor, ReadWrite, SglDescriptor, Sqe, sgl_subtype,
};
use ferroblk_target::spec::fabrics::{ConnectCommand, ConnectData};
use ferroblk_target::spec::features::SetFeatures;
use ferroblk_target::spec::{Cqe, Status};
use ferroblk_target::subsystem::Target;

const NQN: &str = "nqn.2026-11.io.ferroblk:rdma-hostile";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

/// What the queue asked of its transport.
#[derive(Default)]
struct Recorder {
    cqes: Vec<Cqe>,
    requested: Vec<(u16, u16, usize)>,
    sequence_error: bool,
}

impl Transport for Recorder {
    fn send_cqe(&mut self, cqe: &Cqe) {
        self.cqes.push(*cqe);
    }
    fn send_read_data(&mut self, _cid: u16, buf: AlignedBuf, _len: usize) {
        bufpool::put(buf);
    }
    fn send_data(&mut self, _cid: u16, _data: &[u8]) {}
    fn request_data(&mut self, cid: u16, ttag: u16, len: usize) {
        self.requested.push((cid, ttag, len));
    }
    fn sequence_error(&mut self) {
        self.sequence_error = true;
    }
    fn connect_refused(&mut self, _: &str, _: &dyn std::fmt::Debug, _: &str) {}
    fn connected(&mut self) {}
}

fn keyed(len: u32) -> [u8; 16] {
    KeyedSglDescriptor {
        address: 0x10_0000,
        length: len,
        key: 0x1234,
        subtype: sgl_subtype::INVALIDATE_KEY,
    }
    .to_bytes()
}

fn with_sgl(sqe: Sqe, sgl: [u8; 16]) -> Sqe {
    let mut b = *sqe.as_bytes();
    b[24..40].copy_from_slice(&sgl);
    Sqe::from_bytes(b)
}

fn rw(opc: IoOpcode, cid: u16, nlb: u32, sgl: [u8; 16]) -> Sqe {
    let c = ReadWrite {
        nsid: 1,
        slba: 0,
        nlb,
        ..ReadWrite::default()
    };
    with_sgl(
        c.to_sqe(opc, cid, &SglDescriptor::transport_data_block(0)),
        sgl,
    )
}

/// Connects queue `qid` (SQSIZE `sqsize`, 0's based) as an RDMA host does: the Connect data
/// by a Keyed SGL Data Block, fetched, then delivered.
fn connect(q: &mut NvmeQueue, t: &mut Recorder, qid: u16, sqsize: u16, cntlid: u16) -> Cqe {
    let sqe = ConnectCommand {
        recfmt: 0,
        qid,
        sqsize,
        cattr: 0,
        kato: 0,
        sgl1: SglDescriptor::in_capsule(0, 0),
    }
    .to_sqe(0x100);
    q.command(t, with_sgl(sqe, keyed(ConnectData::LEN as u32)), None, 0);
    let (cid, ttag, len) = t.requested.pop().expect("Connect data fetched");
    assert_eq!((cid, len), (0x100, ConnectData::LEN));
    let data = ConnectData {
        hostid: [7; 16],
        cntlid,
        subnqn: NQN.into(),
        hostnqn: HOST.into(),
    }
    .to_bytes();
    assert_eq!(q.receive_data(ttag, cid, 0, &data), Ok(true));
    q.data_received(t, ttag);
    t.cqes.pop().expect("Connect answered")
}

/// An enabled controller with one I/O queue granted, and a connected keyed I/O queue with
/// `sqsize + 1` entries, on reactor `r` (run there).
fn io_queue(target: Arc<Target>, r: ReactorHandle, sqsize: u16) -> (NvmeQueue, NvmeQueue) {
    let mut admin = NvmeQueue::new(target.clone(), r.clone(), "admin".into()).with_keyed_sgl();
    let mut t = Recorder::default();
    let c = connect(&mut admin, &mut t, 0, 31, 0xffff);
    assert!(c.status.is_success(), "{c:?}");
    let cntlid = c.dw0 as u16;
    let en = common::cc_enable(1);
    admin.command(&mut t, en, None, 0);
    let nq = SetFeatures {
        fid: 7,
        cdw11: 0,
        ..SetFeatures::default()
    }
    .to_sqe(2);
    admin.command(&mut t, nq, None, 0);
    assert!(t.cqes.iter().all(|c| c.status.is_success()));
    let mut io = NvmeQueue::new(target, r, "io".into()).with_keyed_sgl();
    let c = connect(&mut io, &mut t, 1, sqsize, cntlid);
    assert!(c.status.is_success(), "{c:?}");
    (admin, io)
}

/// Runs `f` on a reactor of a target exporting a 1 MiB malloc namespace.
fn on_target(f: impl FnOnce(Arc<Target>, ReactorHandle) + Send + 'static) {
    let (reactors, target, _) = common::target_on(NQN, common::malloc_1m());
    let r = reactors.handles()[0].clone();
    let r2 = r.clone();
    r.call(move |_| f(target, r2))
        .expect("reactor ran the test");
    reactors.shutdown(std::time::Duration::from_secs(5));
}

#[test]
fn keyed_sgl_length_other_than_the_commands_is_refused_before_any_transfer() {
    on_target(|target, r| {
        let (_admin, mut io) = io_queue(target, r, 31);
        let mut t = Recorder::default();
        // A 1-block write whose SGL claims 2 blocks, and one claiming the 24-bit maximum.
        io.command(&mut t, rw(IoOpcode::Write, 1, 1, keyed(8192)), None, 0);
        io.command(&mut t, rw(IoOpcode::Write, 2, 1, keyed(0xff_ffff)), None, 0);
        // A 2-block read whose SGL has room for one.
        io.command(&mut t, rw(IoOpcode::Read, 3, 2, keyed(4096)), None, 0);
        assert!(t.requested.is_empty(), "no data fetched for a bad SGL");
        let got: Vec<_> = t.cqes.iter().map(|c| (c.cid, c.status)).collect();
        assert_eq!(
            got,
            [
                (1, Status::DATA_SGL_LENGTH_INVALID),
                (2, Status::DATA_SGL_LENGTH_INVALID),
                (3, Status::DATA_SGL_LENGTH_INVALID)
            ]
        );
        // The queue still serves a well-formed write.
        io.command(&mut t, rw(IoOpcode::Write, 4, 1, keyed(4096)), None, 0);
        assert_eq!(t.requested.len(), 1);
        assert_eq!(t.requested[0].2, 4096);
        assert!(!io.is_closing());
    });
}

#[test]
fn another_transports_descriptor_is_refused_on_a_keyed_queue() {
    on_target(|target, r| {
        let (_admin, mut io) = io_queue(target, r, 31);
        let mut t = Recorder::default();
        let tcp = SglDescriptor::transport_data_block(4096).to_bytes();
        io.command(&mut t, rw(IoOpcode::Write, 1, 1, tcp), None, 0);
        assert!(t.requested.is_empty());
        assert_eq!(t.cqes[0].status, Status::SGL_DESCRIPTOR_TYPE_INVALID);
    });
}

#[test]
fn more_commands_outstanding_than_queue_entries_end_the_queue() {
    on_target(|target, r| {
        // Four entries: four writes waiting for their data fill the queue.
        let (_admin, mut io) = io_queue(target, r, 3);
        let mut t = Recorder::default();
        for cid in 0..4 {
            io.command(&mut t, rw(IoOpcode::Write, cid, 1, keyed(4096)), None, 0);
        }
        assert_eq!(t.requested.len(), 4);
        assert!(!t.sequence_error);
        io.command(&mut t, rw(IoOpcode::Write, 4, 1, keyed(4096)), None, 0);
        assert!(t.sequence_error, "the transport is told to end the queue");
        assert!(io.is_closing());
    });
}
