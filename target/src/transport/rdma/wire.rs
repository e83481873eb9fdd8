//! What an NVMe/RDMA host sends that is not an NVMe command: the RDMA CM private data of its
//! connect request (NVMe-oF 1.1 §7.3.1; Linux's `struct nvme_rdma_cm_req`), and the command
//! capsules it SENDs (§7.3.2: an SQE, then in-capsule data). Pure functions, so hostile input
//! is tested (and fuzzed) without an RDMA device.

use crate::spec::command::{KeyedSglDescriptor, Sqe};
use crate::spec::wire::{get_u16, put_u16};
use crate::subsystem::admin::{IN_CAPSULE_DATA, QUEUE_ENTRIES};

/// Record Format of the private data (RECFMT): 0h, NVMe-oF 1.0.
pub const RECFMT: u16 = 0;

/// Reject reasons (the `STS` of the CM reject private data; NVMe-oF 1.1 Figure 48).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectStatus {
    /// 1h Invalid private data length.
    InvalidLength = 1,
    /// 2h Invalid RECFMT.
    InvalidRecfmt = 2,
    /// 3h Invalid QID.
    InvalidQid = 3,
    /// 4h Invalid HSQSIZE.
    InvalidHsqsize = 4,
    /// 5h Invalid HRQSIZE.
    InvalidHrqsize = 5,
    /// 6h No resources.
    NoResources = 6,
}

impl RejectStatus {
    /// The reject's private data: RECFMT, STS (`struct nvme_rdma_cm_rej`).
    pub fn private_data(self) -> [u8; 4] {
        let mut b = [0u8; 4];
        put_u16(&mut b, 0, RECFMT);
        put_u16(&mut b, 2, self as u16);
        b
    }

    /// The status of a reject's private data (host side); `None` for private data that is not
    /// an NVMe/RDMA reject (too short, another RECFMT, an unknown status).
    pub fn from_private_data(b: &[u8]) -> Option<RejectStatus> {
        if b.len() < 4 || get_u16(b, 0) != RECFMT {
            return None;
        }
        Some(match get_u16(b, 2) {
            1 => RejectStatus::InvalidLength,
            2 => RejectStatus::InvalidRecfmt,
            3 => RejectStatus::InvalidQid,
            4 => RejectStatus::InvalidHsqsize,
            5 => RejectStatus::InvalidHrqsize,
            6 => RejectStatus::NoResources,
            _ => return None,
        })
    }

    /// The field it names, for the log.
    pub fn field(self) -> &'static str {
        match self {
            RejectStatus::InvalidLength => "private data length",
            RejectStatus::InvalidRecfmt => "RECFMT",
            RejectStatus::InvalidQid => "QID",
            RejectStatus::InvalidHsqsize => "HSQSIZE",
            RejectStatus::InvalidHrqsize => "HRQSIZE",
            RejectStatus::NoResources => "resources",
        }
    }
}

/// The connect request's private data (NVMe-oF 1.1 Figure 46), checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmRequest {
    /// Queue identifier (0: admin).
    pub qid: u16,
    /// Host receive queue size: responses the host can take at once.
    pub hrqsize: u16,
    /// Host send queue size (0's based): command capsules the host may have outstanding.
    pub hsqsize: u16,
}

impl CmRequest {
    /// Bytes the host sends (RECFMT, QID, HRQSIZE, HSQSIZE, then reserved to 32).
    pub const LEN: usize = 32;
    /// Bytes that carry fields.
    pub const FIELDS: usize = 8;

    /// Parses and checks the private data: the format, the queue identifier, and queue sizes
    /// within what a queue of this target takes ([`QUEUE_ENTRIES`]).
    pub fn parse(b: &[u8]) -> Result<CmRequest, RejectStatus> {
        if b.len() < Self::FIELDS {
            return Err(RejectStatus::InvalidLength);
        }
        if get_u16(b, 0) != RECFMT {
            return Err(RejectStatus::InvalidRecfmt);
        }
        let r = CmRequest {
            qid: get_u16(b, 2),
            hrqsize: get_u16(b, 4),
            hsqsize: get_u16(b, 6),
        };
        if r.qid == u16::MAX {
            return Err(RejectStatus::InvalidQid);
        }
        if r.hsqsize == 0 || r.hsqsize >= QUEUE_ENTRIES {
            return Err(RejectStatus::InvalidHsqsize);
        }
        if r.hrqsize == 0 || r.hrqsize > QUEUE_ENTRIES {
            return Err(RejectStatus::InvalidHrqsize);
        }
        Ok(r)
    }

    /// The private data a host sends (RECFMT 0, the fields, zeroes to [`CmRequest::LEN`]).
    pub fn to_bytes(&self) -> [u8; CmRequest::LEN] {
        let mut b = [0u8; CmRequest::LEN];
        put_u16(&mut b, 0, RECFMT);
        put_u16(&mut b, 2, self.qid);
        put_u16(&mut b, 4, self.hrqsize);
        put_u16(&mut b, 6, self.hsqsize);
        b
    }

    /// Command capsules the host may have outstanding (HSQSIZE + 1): the receive buffers the
    /// queue posts, and its controller receive queue size (CRQSIZE).
    pub fn entries(&self) -> u16 {
        self.hsqsize + 1
    }
}

/// The accept's private data (NVMe-oF 1.1 Figure 47; `struct nvme_rdma_cm_rep`): RECFMT,
/// CRQSIZE (the receive buffers posted for the queue).
pub fn cm_reply(crqsize: u16) -> [u8; 32] {
    let mut b = [0u8; 32];
    put_u16(&mut b, 0, RECFMT);
    put_u16(&mut b, 2, crqsize);
    b
}

/// The controller receive queue size (CRQSIZE) of an accept's private data (host side); `None`
/// if it is too short or of another format.
pub fn parse_reply(b: &[u8]) -> Option<u16> {
    (b.len() >= 4 && get_u16(b, 0) == RECFMT).then(|| get_u16(b, 2))
}

/// Bytes of one receive buffer: a command capsule with the most in-capsule data we take.
pub const CAPSULE_MAX: usize = Sqe::LEN + IN_CAPSULE_DATA as usize;

/// Why a received capsule is not a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapsuleError {
    /// Shorter than an SQE.
    Short(usize),
    /// Longer than a capsule may be.
    Long(usize),
}

/// How a command's data moves, from its SGL1 and the capsule around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDesc {
    /// No data, or data in the capsule (an SGL Data Block with offset, handled by the queue).
    Capsule,
    /// Host memory named by a Keyed SGL Data Block: moved by RDMA READ / WRITE.
    Keyed(KeyedSglDescriptor),
}

/// Parses a received capsule of `len` bytes: the SQE, the in-capsule data length, and how the
/// command's data moves. A keyed descriptor longer than the largest transfer is refused here
/// (the queue then checks its length against the command's).
pub fn parse_capsule(b: &[u8]) -> Result<(Sqe, usize, DataDesc), CapsuleError> {
    if b.len() < Sqe::LEN {
        return Err(CapsuleError::Short(b.len()));
    }
    if b.len() > CAPSULE_MAX {
        return Err(CapsuleError::Long(b.len()));
    }
    let sqe = Sqe::parse(b).expect("64 bytes checked");
    let icd = b.len() - Sqe::LEN;
    let desc = match sqe.keyed_sgl1() {
        Some(k) if icd == 0 => DataDesc::Keyed(k),
        _ => DataDesc::Capsule,
    };
    Ok((sqe, icd, desc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::command::{SglDescriptor, sgl_subtype};

    fn req(recfmt: u16, qid: u16, hrq: u16, hsq: u16) -> [u8; 32] {
        let mut b = [0u8; 32];
        put_u16(&mut b, 0, recfmt);
        put_u16(&mut b, 2, qid);
        put_u16(&mut b, 4, hrq);
        put_u16(&mut b, 6, hsq);
        b
    }

    #[test]
    fn linux_admin_and_io_queue_requests_parse() {
        // nvme-rdma: admin queue HRQSIZE 32, HSQSIZE 31; I/O queue 128 / 127.
        let a = CmRequest::parse(&req(0, 0, 32, 31)).unwrap();
        assert_eq!((a.qid, a.entries()), (0, 32));
        let io = CmRequest::parse(&req(0, 3, 128, 127)).unwrap();
        assert_eq!((io.qid, io.hrqsize, io.entries()), (3, 128, 128));
    }

    #[test]
    fn bad_private_data_names_its_field() {
        assert_eq!(CmRequest::parse(&[0; 7]), Err(RejectStatus::InvalidLength));
        assert_eq!(CmRequest::parse(&[]), Err(RejectStatus::InvalidLength));
        assert_eq!(
            CmRequest::parse(&req(1, 0, 32, 31)),
            Err(RejectStatus::InvalidRecfmt)
        );
        assert_eq!(
            CmRequest::parse(&req(0, 0xffff, 32, 31)),
            Err(RejectStatus::InvalidQid)
        );
        assert_eq!(
            CmRequest::parse(&req(0, 1, 32, 0)),
            Err(RejectStatus::InvalidHsqsize)
        );
        let too_deep = req(0, 1, 128, QUEUE_ENTRIES);
        assert_eq!(
            CmRequest::parse(&too_deep),
            Err(RejectStatus::InvalidHsqsize)
        );
        let big_rq = req(0, 1, QUEUE_ENTRIES + 1, 31);
        assert_eq!(CmRequest::parse(&big_rq), Err(RejectStatus::InvalidHrqsize));
        assert_eq!(
            CmRequest::parse(&req(0, 1, 0, 31)),
            Err(RejectStatus::InvalidHrqsize)
        );
    }

    #[test]
    fn reply_and_reject_follow_the_linux_layout() {
        assert_eq!(&cm_reply(128)[..4], &[0, 0, 128, 0]);
        assert_eq!(RejectStatus::InvalidHsqsize.private_data(), [0, 0, 4, 0]);
    }

    #[test]
    fn host_private_data_round_trips() {
        let r = CmRequest {
            qid: 2,
            hrqsize: 128,
            hsqsize: 127,
        };
        assert_eq!(CmRequest::parse(&r.to_bytes()), Ok(r));
        assert_eq!(parse_reply(&cm_reply(128)), Some(128));
        assert_eq!(parse_reply(&[1, 0, 128, 0]), None);
        assert_eq!(parse_reply(&[0, 0]), None);
        for s in [RejectStatus::InvalidHsqsize, RejectStatus::NoResources] {
            assert_eq!(RejectStatus::from_private_data(&s.private_data()), Some(s));
        }
        // Not an NVMe/RDMA reject (rping's, a consumer reject without private data).
        assert_eq!(RejectStatus::from_private_data(&[]), None);
        assert_eq!(RejectStatus::from_private_data(&[0, 0, 99, 0]), None);
    }

    #[test]
    fn capsules_shorter_than_an_sqe_or_longer_than_a_buffer_are_refused() {
        assert_eq!(
            parse_capsule(&[0; 63]).unwrap_err(),
            CapsuleError::Short(63)
        );
        let big = vec![0u8; CAPSULE_MAX + 1];
        assert_eq!(
            parse_capsule(&big).unwrap_err(),
            CapsuleError::Long(CAPSULE_MAX + 1)
        );
    }

    #[test]
    fn keyed_and_in_capsule_data_are_told_apart() {
        let mut sqe = Sqe::zeroed();
        let k = KeyedSglDescriptor {
            address: 0x1000,
            length: 4096,
            key: 7,
            subtype: sgl_subtype::ADDRESS,
        };
        let mut b = vec![0u8; 64];
        b[24..40].copy_from_slice(&k.to_bytes());
        let (_, icd, d) = parse_capsule(&b).unwrap();
        assert_eq!((icd, d), (0, DataDesc::Keyed(k)));
        sqe.set_sgl1(&SglDescriptor::in_capsule(0, 512));
        let mut b = sqe.as_bytes().to_vec();
        b.extend_from_slice(&[0u8; 512]);
        let (_, icd, d) = parse_capsule(&b).unwrap();
        assert_eq!((icd, d), (512, DataDesc::Capsule));
    }
}
