//! Completion queue entries (NVMe Base 2.0 §4.2.1 "Common Completion Queue Entry", Figure 90;
//! over fabrics the response capsule's CQE, NVMe-oF 1.1 §2.3).

use super::status::Status;
use super::wire::{get_u16, get_u32, put_u16, put_u32};

/// A 16-byte completion queue entry.
///
/// | bytes | field |
/// |-------|-------|
/// | 03:00 | DW0, command specific |
/// | 07:04 | DW1, command specific |
/// | 09:08 | SQ Head Pointer (SQHD) |
/// | 11:10 | SQ Identifier (SQID) |
/// | 13:12 | Command Identifier (CID) |
/// | 15:14 | Status Field with the Phase Tag in bit 0 ([`Status::to_cqe_status`]) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cqe {
    /// Command specific DW0 (Connect: CNTLID; Property Get: value low; Get Features: value).
    pub dw0: u32,
    /// Command specific DW1 (Property Get: value high).
    pub dw1: u32,
    /// Submission Queue Head Pointer.
    pub sqhd: u16,
    /// Submission Queue Identifier.
    pub sqid: u16,
    /// Command Identifier of the completed command.
    pub cid: u16,
    /// The completion status.
    pub status: Status,
    /// Phase Tag (P). Reserved over fabrics.
    pub phase: bool,
}

impl Cqe {
    /// Entry size in bytes.
    pub const LEN: usize = 16;

    /// A completion of command `cid` with `status` and zero DW0/DW1.
    pub fn new(cid: u16, status: Status) -> Cqe {
        Cqe {
            cid,
            status,
            ..Cqe::default()
        }
    }

    /// A completion with command specific DW0 (Get Features, Set Features, AER, Connect).
    pub fn with_dw0(cid: u16, status: Status, dw0: u32) -> Cqe {
        Cqe {
            dw0,
            ..Cqe::new(cid, status)
        }
    }

    /// The 64-bit value in DW1:DW0 (Property Get).
    pub fn value64(&self) -> u64 {
        u64::from(self.dw0) | u64::from(self.dw1) << 32
    }

    /// Encodes the entry.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        self.write_to(&mut b);
        b
    }

    /// Writes the entry at `out[..16]`.
    pub fn write_to(&self, out: &mut [u8]) {
        put_u32(out, 0, self.dw0);
        put_u32(out, 4, self.dw1);
        put_u16(out, 8, self.sqhd);
        put_u16(out, 10, self.sqid);
        put_u16(out, 12, self.cid);
        put_u16(out, 14, self.status.to_cqe_status(self.phase));
    }

    /// Decodes 16 bytes.
    pub fn parse(b: &[u8; 16]) -> Cqe {
        let (status, phase) = Status::from_cqe_status(get_u16(b, 14));
        Cqe {
            dw0: get_u32(b, 0),
            dw1: get_u32(b, 4),
            sqhd: get_u16(b, 8),
            sqid: get_u16(b, 10),
            cid: get_u16(b, 12),
            status,
            phase,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cqe_fields_are_at_spec_offsets() {
        let c = Cqe {
            dw0: 0x0403_0201,
            dw1: 0x0807_0605,
            sqhd: 0x0a09,
            sqid: 0x0c0b,
            cid: 0x0e0d,
            status: Status::INVALID_FIELD,
            phase: true,
        };
        let b = c.to_bytes();
        assert_eq!(
            &b[..14],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 0xa, 0xb, 0xc, 0xd, 0xe]
        );
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), 0x8005);
        assert_eq!(Cqe::parse(&b), c);
        assert_eq!(c.value64(), 0x0807_0605_0403_0201);
    }
}
