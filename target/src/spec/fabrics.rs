//! Fabrics commands and controller properties (NVMe-oF 1.1 §3 "Fabrics Command Set"; NVMe Base
//! 2.0 §3.1.4 "Controller Properties").
//!
//! Over fabrics a host reaches the controller's registers (CAP, VS, CC, CSTS) with Property
//! Get/Set instead of MMIO, and creates each queue with a Connect command whose 1024-byte data
//! names the host and the subsystem.

use super::command::{AdminOpcode, SglDescriptor, Sqe};
use super::completion::Cqe;
use super::status::Status;
use super::wire::{get_u16, get_u32, get_u64, put_nqn, put_u16, put_u32, put_u64};

/// Fabrics Command Type (FCTYPE, SQE byte 04; NVMe-oF 1.1 Figure 19).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FabricsType {
    /// 00h Property Set.
    PropertySet = 0x00,
    /// 01h Connect.
    Connect = 0x01,
    /// 04h Property Get.
    PropertyGet = 0x04,
    /// 05h Authentication Send.
    AuthenticationSend = 0x05,
    /// 06h Authentication Receive.
    AuthenticationReceive = 0x06,
    /// 08h Disconnect (tears down an I/O queue).
    Disconnect = 0x08,
}

impl FabricsType {
    /// The command type of a raw FCTYPE, or `None` for an unknown value.
    pub const fn from_u8(v: u8) -> Option<FabricsType> {
        Some(match v {
            0x00 => FabricsType::PropertySet,
            0x01 => FabricsType::Connect,
            0x04 => FabricsType::PropertyGet,
            0x05 => FabricsType::AuthenticationSend,
            0x06 => FabricsType::AuthenticationReceive,
            0x08 => FabricsType::Disconnect,
            _ => return None,
        })
    }
}

/// Size of an NQN field in Connect data, Identify Controller and the discovery log (bytes).
pub const NQN_FIELD_LEN: usize = 256;
/// Longest NQN in bytes, not counting the terminating NUL (NVMe Base 2.0 §4.5).
pub const NQN_MAX_LEN: usize = 223;
/// The well-known NQN of a discovery subsystem (NVMe-oF 1.1 §5).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Connect command (NVMe-oF 1.1 §3.3, Figure 20): RECFMT bytes 41:40, QID 43:42, SQSIZE 45:44
/// (0's based), CATTR 46, KATO 51:48 (milliseconds, admin queue only). The 1024-byte
/// [`ConnectData`] travels in capsule or by R2T.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnectCommand {
    /// Record Format (0 is the only defined format).
    pub recfmt: u16,
    /// Queue Identifier: 0 creates the admin queue, otherwise an I/O queue.
    pub qid: u16,
    /// Submission Queue Size, 0's based (a value of 31 means 32 entries).
    pub sqsize: u16,
    /// Connect Attributes (bit 2: disable SQ flow control; bits 1:0 queue priority).
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds (0: disabled).
    pub kato: u32,
    /// Where the Connect data is.
    pub sgl1: SglDescriptor,
}

/// Connect Attributes bit 2: the host disables SQ flow control (SQHD reported as FFFFh).
pub const CATTR_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;

impl ConnectCommand {
    /// SQE byte offset of RECFMT.
    pub const OFFSET_RECFMT: u16 = 40;
    /// SQE byte offset of QID.
    pub const OFFSET_QID: u16 = 42;
    /// SQE byte offset of SQSIZE.
    pub const OFFSET_SQSIZE: u16 = 44;
    /// SQE byte offset of CATTR.
    pub const OFFSET_CATTR: u16 = 46;
    /// SQE byte offset of KATO.
    pub const OFFSET_KATO: u16 = 48;

    /// Decodes a Connect SQE (the caller checked OPC 7Fh and FCTYPE 01h).
    pub fn from_sqe(s: &Sqe) -> ConnectCommand {
        let b = s.as_bytes();
        let at = usize::from;
        ConnectCommand {
            recfmt: get_u16(b, at(Self::OFFSET_RECFMT)),
            qid: get_u16(b, at(Self::OFFSET_QID)),
            sqsize: get_u16(b, at(Self::OFFSET_SQSIZE)),
            cattr: b[at(Self::OFFSET_CATTR)],
            kato: get_u32(b, at(Self::OFFSET_KATO)),
            sgl1: s.sgl1(),
        }
    }

    /// Encodes into a Connect SQE with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(AdminOpcode::Fabrics as u8, cid);
        s.set_fctype(FabricsType::Connect as u8);
        s.set_sgl1(&self.sgl1);
        let mut b = *s.as_bytes();
        let at = usize::from;
        put_u16(&mut b, at(Self::OFFSET_RECFMT), self.recfmt);
        put_u16(&mut b, at(Self::OFFSET_QID), self.qid);
        put_u16(&mut b, at(Self::OFFSET_SQSIZE), self.sqsize);
        b[at(Self::OFFSET_CATTR)] = self.cattr;
        put_u32(&mut b, at(Self::OFFSET_KATO), self.kato);
        Sqe::from_bytes(b)
    }
}

/// Connect command data (NVMe-oF 1.1 Figure 22), 1024 bytes: HOSTID 15:00, CNTLID 17:16,
/// SUBNQN 511:256, HOSTNQN 767:512; the rest reserved.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnectData {
    /// Host Identifier (a UUID in the NVMe-oF 128-bit format).
    pub hostid: [u8; 16],
    /// Controller ID: FFFFh asks for any controller (dynamic model), FFFEh for any controller
    /// in the static model; a specific value joins an existing controller (I/O queues).
    pub cntlid: u16,
    /// NVM Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
}

/// Why Connect data was rejected. [`ConnectDataError::ipo`] is the Invalid Parameter Offset to
/// report in a Connect Invalid Parameters response (with IATTR bit 0 set: data, not SQE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectDataError {
    /// Fewer than 1024 bytes were supplied (a Data SGL Length problem, not a parameter).
    #[error("connect data is {0} bytes, 1024 required")]
    TooShort(usize),
    /// An NQN field has no terminating NUL within its 256 bytes, is longer than 223 bytes, is
    /// empty (SUBNQN only), or is not UTF-8.
    #[error("invalid NQN at connect data offset {0}")]
    InvalidNqn(u16),
}

impl ConnectDataError {
    /// The byte offset of the offending field in the Connect data, if it is a parameter.
    pub const fn ipo(&self) -> Option<u16> {
        match self {
            ConnectDataError::TooShort(_) => None,
            ConnectDataError::InvalidNqn(off) => Some(*off),
        }
    }
}

impl ConnectData {
    /// Size of the Connect data in bytes.
    pub const LEN: usize = 1024;
    /// Byte offset of HOSTID (16 bytes).
    pub const OFFSET_HOSTID: u16 = 0;
    /// Byte offset of CNTLID.
    pub const OFFSET_CNTLID: u16 = 16;
    /// Byte offset of SUBNQN.
    pub const OFFSET_SUBNQN: u16 = 256;
    /// Byte offset of HOSTNQN.
    pub const OFFSET_HOSTNQN: u16 = 512;

    /// Parses and validates the data a host sent.
    pub fn parse(b: &[u8]) -> Result<ConnectData, ConnectDataError> {
        if b.len() < Self::LEN {
            return Err(ConnectDataError::TooShort(b.len()));
        }
        let mut hostid = [0u8; 16];
        let hostid_at = usize::from(Self::OFFSET_HOSTID);
        hostid.copy_from_slice(&b[hostid_at..hostid_at + 16]);
        Ok(ConnectData {
            hostid,
            cntlid: get_u16(b, usize::from(Self::OFFSET_CNTLID)),
            subnqn: parse_nqn(b, Self::OFFSET_SUBNQN, false)?,
            // Empty where the host has no NQN (SPDK's initiator without one): whether that is
            // acceptable is the subsystem's decision (any host allowed, or a host list).
            hostnqn: parse_nqn(b, Self::OFFSET_HOSTNQN, true)?,
        })
    }

    /// Encodes the data (NQNs truncated to 223 bytes).
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let at = usize::from;
        b[at(Self::OFFSET_HOSTID)..at(Self::OFFSET_HOSTID) + 16].copy_from_slice(&self.hostid);
        put_u16(&mut b, at(Self::OFFSET_CNTLID), self.cntlid);
        put_nqn(
            &mut b,
            at(Self::OFFSET_SUBNQN),
            NQN_MAX_LEN + 1,
            &self.subnqn,
        );
        put_nqn(
            &mut b,
            at(Self::OFFSET_HOSTNQN),
            NQN_MAX_LEN + 1,
            &self.hostnqn,
        );
        b
    }
}

/// Reads a NUL-terminated UTF-8 NQN from the 256-byte field at `off` (empty only if
/// `allow_empty`).
fn parse_nqn(b: &[u8], off: u16, allow_empty: bool) -> Result<String, ConnectDataError> {
    let field = &b[off as usize..off as usize + NQN_FIELD_LEN];
    let len = field
        .iter()
        .position(|&c| c == 0)
        .ok_or(ConnectDataError::InvalidNqn(off))?;
    if (len == 0 && !allow_empty) || len > NQN_MAX_LEN {
        return Err(ConnectDataError::InvalidNqn(off));
    }
    std::str::from_utf8(&field[..len])
        .map(str::to_owned)
        .map_err(|_| ConnectDataError::InvalidNqn(off))
}

/// Connect response DW0 (NVMe-oF 1.1 Figure 21).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectResponse {
    /// Success: CNTLID in bytes 1:0, AUTHREQ in bytes 3:2.
    Success {
        /// The controller the queue belongs to.
        cntlid: u16,
        /// Authentication Requirements (0: none).
        authreq: u16,
    },
    /// Connect Invalid Parameters: IPO in bytes 1:0, IATTR in byte 2 (bit 0: the parameter
    /// is in the Connect data rather than the SQE).
    InvalidParameters {
        /// Whether the invalid parameter is in the Connect data.
        in_data: bool,
        /// Byte offset of the invalid parameter in the SQE or the data.
        ipo: u16,
    },
}

impl ConnectResponse {
    /// The completion DW0.
    pub const fn to_dw0(&self) -> u32 {
        match *self {
            ConnectResponse::Success { cntlid, authreq } => cntlid as u32 | (authreq as u32) << 16,
            ConnectResponse::InvalidParameters { in_data, ipo } => {
                ipo as u32 | (in_data as u32) << 16
            }
        }
    }

    /// The completion for Connect command `cid`: success, or Connect Invalid Parameters. The
    /// caller sets SQHD (FFFFh when SQ flow control is disabled).
    pub fn to_cqe(&self, cid: u16) -> Cqe {
        let status = match self {
            ConnectResponse::Success { .. } => Status::SUCCESS,
            ConnectResponse::InvalidParameters { .. } => Status::CONNECT_INVALID_PARAMETERS,
        };
        Cqe::with_dw0(cid, status, self.to_dw0())
    }

    /// Decodes the DW0 of a Connect completion with `status`.
    pub fn from_cqe(c: &Cqe) -> Option<ConnectResponse> {
        if c.status.is_success() {
            Some(ConnectResponse::Success {
                cntlid: c.dw0 as u16,
                authreq: (c.dw0 >> 16) as u16,
            })
        } else if c.status.sct == Status::CONNECT_INVALID_PARAMETERS.sct
            && c.status.sc == Status::CONNECT_INVALID_PARAMETERS.sc
        {
            Some(ConnectResponse::InvalidParameters {
                in_data: (c.dw0 >> 16) & 1 != 0,
                ipo: c.dw0 as u16,
            })
        } else {
            None
        }
    }
}

/// Size of a property access (ATTRIB bits 2:0, NVMe-oF 1.1 Figures 27/29).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropertySize {
    /// 000b: 4 bytes.
    Four,
    /// 001b: 8 bytes.
    Eight,
}

impl PropertySize {
    /// The size of ATTRIB, or `None` for a reserved value.
    pub const fn from_attrib(attrib: u8) -> Option<PropertySize> {
        match attrib & 7 {
            0 => Some(PropertySize::Four),
            1 => Some(PropertySize::Eight),
            _ => None,
        }
    }

    /// The ATTRIB value.
    pub const fn to_attrib(self) -> u8 {
        match self {
            PropertySize::Four => 0,
            PropertySize::Eight => 1,
        }
    }

    /// Bytes accessed.
    pub const fn bytes(self) -> u32 {
        match self {
            PropertySize::Four => 4,
            PropertySize::Eight => 8,
        }
    }
}

/// Property Get (NVMe-oF 1.1 §3.5, Figure 27): ATTRIB byte 40, OFST bytes 47:44. The value
/// returns in completion DW0 (and DW1 for 8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertyGet {
    /// Raw ATTRIB byte (size in bits 2:0; see [`PropertySize::from_attrib`]).
    pub attrib: u8,
    /// Property offset ([`property`]).
    pub ofst: u32,
}

impl PropertyGet {
    /// Decodes the SQE.
    pub fn from_sqe(s: &Sqe) -> PropertyGet {
        PropertyGet {
            attrib: s.as_bytes()[40],
            ofst: get_u32(s.as_bytes(), 44),
        }
    }

    /// Encodes into an SQE with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut b = *Sqe::new(AdminOpcode::Fabrics as u8, cid).as_bytes();
        b[4] = FabricsType::PropertyGet as u8;
        b[40] = self.attrib;
        put_u32(&mut b, 44, self.ofst);
        Sqe::from_bytes(b)
    }
}

/// Property Set (NVMe-oF 1.1 §3.6, Figure 29): ATTRIB byte 40, OFST bytes 47:44, VALUE bytes
/// 55:48.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PropertySet {
    /// Raw ATTRIB byte.
    pub attrib: u8,
    /// Property offset ([`property`]).
    pub ofst: u32,
    /// Value (the low 4 bytes for a 4-byte property).
    pub value: u64,
}

impl PropertySet {
    /// Decodes the SQE.
    pub fn from_sqe(s: &Sqe) -> PropertySet {
        let b = s.as_bytes();
        PropertySet {
            attrib: b[40],
            ofst: get_u32(b, 44),
            value: get_u64(b, 48),
        }
    }

    /// Encodes into an SQE with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut b = *Sqe::new(AdminOpcode::Fabrics as u8, cid).as_bytes();
        b[4] = FabricsType::PropertySet as u8;
        b[40] = self.attrib;
        put_u32(&mut b, 44, self.ofst);
        put_u64(&mut b, 48, self.value);
        Sqe::from_bytes(b)
    }
}

/// Disconnect (NVMe-oF 1.1a/NVMe 2.0 Fabrics, FCTYPE 08h): RECFMT bytes 41:40. Deletes the I/O
/// queue it is sent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Record Format (0).
    pub recfmt: u16,
}

impl Disconnect {
    /// Decodes the SQE.
    pub fn from_sqe(s: &Sqe) -> Disconnect {
        Disconnect {
            recfmt: get_u16(s.as_bytes(), 40),
        }
    }

    /// Encodes into an SQE with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut b = *Sqe::new(AdminOpcode::Fabrics as u8, cid).as_bytes();
        b[4] = FabricsType::Disconnect as u8;
        put_u16(&mut b, 40, self.recfmt);
        Sqe::from_bytes(b)
    }
}

/// Property offsets (NVMe Base 2.0 Figure 35; over fabrics only CAP, VS, CC, CSTS and NSSR are
/// defined, NVMe-oF 1.1 §3.4).
pub mod property {
    /// 00h Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// 08h Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// 0Ch Interrupt Mask Set (reserved over fabrics).
    pub const INTMS: u32 = 0x0c;
    /// 10h Interrupt Mask Clear (reserved over fabrics).
    pub const INTMC: u32 = 0x10;
    /// 14h Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// 1Ch Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1c;
    /// 20h NVM Subsystem Reset (4 bytes).
    pub const NSSR: u32 = 0x20;
    /// 24h Admin Queue Attributes (reserved over fabrics).
    pub const AQA: u32 = 0x24;
    /// 28h Admin Submission Queue Base Address (reserved over fabrics).
    pub const ASQ: u32 = 0x28;
    /// 30h Admin Completion Queue Base Address (reserved over fabrics).
    pub const ACQ: u32 = 0x30;
}

/// Controller Capabilities (CAP, NVMe Base 2.0 §3.1.4.1, Figure 36).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cap {
    /// Maximum Queue Entries Supported, 0's based (bits 15:0).
    pub mqes: u16,
    /// Contiguous Queues Required (bit 16; set over fabrics).
    pub cqr: bool,
    /// Arbitration Mechanism Supported (bits 18:17).
    pub ams: u8,
    /// Timeout in 500 ms units, worst time to CSTS.RDY after CC.EN changes (bits 31:24).
    pub to: u8,
    /// Doorbell Stride (bits 35:32; 0 over fabrics).
    pub dstrd: u8,
    /// NVM Subsystem Reset Supported (bit 36).
    pub nssrs: bool,
    /// Command Sets Supported (bits 44:37; bit 0 of this field = NVM command set).
    pub css: u8,
    /// Boot Partition Support (bit 45).
    pub bps: bool,
    /// Memory Page Size Minimum, 2^(12 + MPSMIN) (bits 51:48).
    pub mpsmin: u8,
    /// Memory Page Size Maximum, 2^(12 + MPSMAX) (bits 55:52).
    pub mpsmax: u8,
}

/// CAP.CSS bit 0: the NVM command set.
pub const CAP_CSS_NVM: u8 = 1 << 0;
/// CAP.CSS bit 7: no I/O command set (discovery and administrative controllers).
pub const CAP_CSS_NO_IO: u8 = 1 << 7;

impl Cap {
    /// The 64-bit property value.
    pub const fn to_u64(&self) -> u64 {
        self.mqes as u64
            | (self.cqr as u64) << 16
            | ((self.ams & 3) as u64) << 17
            | (self.to as u64) << 24
            | ((self.dstrd & 0xf) as u64) << 32
            | (self.nssrs as u64) << 36
            | (self.css as u64) << 37
            | (self.bps as u64) << 45
            | ((self.mpsmin & 0xf) as u64) << 48
            | ((self.mpsmax & 0xf) as u64) << 52
    }

    /// Decodes a property value.
    pub const fn from_u64(v: u64) -> Cap {
        Cap {
            mqes: v as u16,
            cqr: v & (1 << 16) != 0,
            ams: ((v >> 17) & 3) as u8,
            to: (v >> 24) as u8,
            dstrd: ((v >> 32) & 0xf) as u8,
            nssrs: v & (1 << 36) != 0,
            css: (v >> 37) as u8,
            bps: v & (1 << 45) != 0,
            mpsmin: ((v >> 48) & 0xf) as u8,
            mpsmax: ((v >> 52) & 0xf) as u8,
        }
    }
}

/// Version (VS, NVMe Base 2.0 Figure 37; also Identify Controller VER): MJR 31:16, MNR 15:8,
/// TER 7:0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version(pub u32);

impl Version {
    /// NVMe 1.3.
    pub const V1_3: Version = Version::new(1, 3, 0);
    /// NVMe 1.4.
    pub const V1_4: Version = Version::new(1, 4, 0);
    /// NVMe 2.0.
    pub const V2_0: Version = Version::new(2, 0, 0);

    /// Major, minor and tertiary version.
    pub const fn new(mjr: u16, mnr: u8, ter: u8) -> Version {
        Version((mjr as u32) << 16 | (mnr as u32) << 8 | ter as u32)
    }
}

/// Controller Configuration (CC, NVMe Base 2.0 Figure 41).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cc {
    /// Enable (bit 0).
    pub en: bool,
    /// I/O Command Set Selected (bits 6:4; 000b NVM, 110b all supported, 111b admin only).
    pub css: u8,
    /// Memory Page Size, 2^(12 + MPS) (bits 10:7).
    pub mps: u8,
    /// Arbitration Mechanism Selected (bits 13:11).
    pub ams: u8,
    /// Shutdown Notification (bits 15:14; 01b normal, 10b abrupt).
    pub shn: u8,
    /// I/O Submission Queue Entry Size, 2^n bytes (bits 19:16; 6 = 64 bytes).
    pub iosqes: u8,
    /// I/O Completion Queue Entry Size, 2^n bytes (bits 23:20; 4 = 16 bytes).
    pub iocqes: u8,
}

impl Cc {
    /// Decodes a property value (reserved bits ignored).
    pub const fn from_u32(v: u32) -> Cc {
        Cc {
            en: v & 1 != 0,
            css: ((v >> 4) & 7) as u8,
            mps: ((v >> 7) & 0xf) as u8,
            ams: ((v >> 11) & 7) as u8,
            shn: ((v >> 14) & 3) as u8,
            iosqes: ((v >> 16) & 0xf) as u8,
            iocqes: ((v >> 20) & 0xf) as u8,
        }
    }

    /// The property value.
    pub const fn to_u32(&self) -> u32 {
        self.en as u32
            | ((self.css & 7) as u32) << 4
            | ((self.mps & 0xf) as u32) << 7
            | ((self.ams & 7) as u32) << 11
            | ((self.shn & 3) as u32) << 14
            | ((self.iosqes & 0xf) as u32) << 16
            | ((self.iocqes & 0xf) as u32) << 20
    }
}

/// Shutdown Status values (CSTS.SHST).
pub mod shst {
    /// 00b Normal operation.
    pub const NORMAL: u8 = 0;
    /// 01b Shutdown processing occurring.
    pub const OCCURRING: u8 = 1;
    /// 10b Shutdown processing complete.
    pub const COMPLETE: u8 = 2;
}

/// Controller Status (CSTS, NVMe Base 2.0 Figure 42).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Csts {
    /// Ready (bit 0).
    pub rdy: bool,
    /// Controller Fatal Status (bit 1).
    pub cfs: bool,
    /// Shutdown Status (bits 3:2, [`shst`]).
    pub shst: u8,
    /// NVM Subsystem Reset Occurred (bit 4).
    pub nssro: bool,
    /// Processing Paused (bit 5).
    pub pp: bool,
}

impl Csts {
    /// The property value.
    pub const fn to_u32(&self) -> u32 {
        self.rdy as u32
            | (self.cfs as u32) << 1
            | ((self.shst & 3) as u32) << 2
            | (self.nssro as u32) << 4
            | (self.pp as u32) << 5
    }

    /// Decodes a property value.
    pub const fn from_u32(v: u32) -> Csts {
        Csts {
            rdy: v & 1 != 0,
            cfs: v & 2 != 0,
            shst: ((v >> 2) & 3) as u8,
            nssro: v & (1 << 4) != 0,
            pp: v & (1 << 5) != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_data() -> ConnectData {
        ConnectData {
            hostid: [0xab; 16],
            cntlid: 0xffff,
            subnqn: "nqn.2024-01.io.ferroblk:vol0".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100".into(),
        }
    }

    #[test]
    fn connect_data_fields_at_spec_offsets() {
        let d = connect_data();
        let b = d.to_bytes();
        assert_eq!(&b[..16], &[0xab; 16]);
        assert_eq!(&b[16..18], &[0xff, 0xff]);
        assert_eq!(&b[256..260], b"nqn.");
        assert_eq!(b[256 + d.subnqn.len()], 0);
        assert_eq!(&b[512..516], b"nqn.");
        assert!(b[768..].iter().all(|&x| x == 0));
        assert_eq!(ConnectData::parse(&b).unwrap(), d);
    }

    #[test]
    fn connect_data_rejects_unterminated_or_empty_nqns_with_their_offset() {
        let mut b = connect_data().to_bytes();
        b[512..768].fill(b'a');
        let e = ConnectData::parse(&b).unwrap_err();
        assert_eq!(e, ConnectDataError::InvalidNqn(512));
        assert_eq!(e.ipo(), Some(512));
        let mut b = connect_data().to_bytes();
        b[256] = 0;
        assert_eq!(
            ConnectData::parse(&b).unwrap_err(),
            ConnectDataError::InvalidNqn(256)
        );
        let mut b = connect_data().to_bytes();
        b[512] = 0;
        assert_eq!(
            ConnectData::parse(&b).unwrap().hostnqn,
            "",
            "an empty host NQN is the subsystem's to judge"
        );
        let mut b = connect_data().to_bytes();
        b[256..256 + 224].fill(b'n');
        b[256 + 224] = 0;
        assert_eq!(
            ConnectData::parse(&b).unwrap_err(),
            ConnectDataError::InvalidNqn(256),
            "224 bytes is longer than an NQN may be"
        );
        let mut b = connect_data().to_bytes();
        b[260] = 0xff;
        assert!(ConnectData::parse(&b).is_err(), "not UTF-8");
        assert_eq!(
            ConnectData::parse(&[0u8; 1023]).unwrap_err().ipo(),
            None,
            "short data is an SGL length error"
        );
    }

    #[test]
    fn connect_command_layout() {
        let c = ConnectCommand {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: CATTR_DISABLE_SQ_FLOW_CONTROL,
            kato: 0,
            sgl1: SglDescriptor::in_capsule(0, 1024),
        };
        let s = c.to_sqe(0x10);
        let b = s.as_bytes();
        assert_eq!(b[0], 0x7f);
        assert_eq!(b[4], 0x01);
        assert_eq!(&b[42..44], &[3, 0]);
        assert_eq!(&b[44..46], &[127, 0]);
        assert_eq!(b[46], 4);
        assert_eq!(ConnectCommand::from_sqe(&s), c);
        let admin = ConnectCommand {
            kato: 120_000,
            qid: 0,
            ..c
        };
        assert_eq!(
            &admin.to_sqe(1).as_bytes()[48..52],
            &120_000u32.to_le_bytes()
        );
    }

    #[test]
    fn connect_response_dw0() {
        let ok = ConnectResponse::Success {
            cntlid: 0x12,
            authreq: 0,
        };
        let cqe = ok.to_cqe(5);
        assert_eq!(cqe.dw0, 0x12);
        assert!(cqe.status.is_success());
        assert_eq!(ConnectResponse::from_cqe(&cqe), Some(ok));
        let bad = ConnectResponse::InvalidParameters {
            in_data: true,
            ipo: ConnectData::OFFSET_SUBNQN,
        };
        let cqe = bad.to_cqe(5);
        assert_eq!(cqe.dw0, 0x0001_0100);
        assert_eq!(cqe.status, Status::CONNECT_INVALID_PARAMETERS);
        assert_eq!(ConnectResponse::from_cqe(&cqe), Some(bad));
        assert_eq!(
            ConnectResponse::from_cqe(&Cqe::new(5, Status::CONNECT_INVALID_HOST)),
            None
        );
    }

    #[test]
    fn property_commands_layout() {
        let g = PropertyGet {
            attrib: PropertySize::Eight.to_attrib(),
            ofst: property::CAP,
        };
        let s = g.to_sqe(1);
        assert_eq!(s.fctype(), FabricsType::PropertyGet as u8);
        assert_eq!(s.as_bytes()[40], 1);
        assert_eq!(PropertyGet::from_sqe(&s), g);
        let p = PropertySet {
            attrib: 0,
            ofst: property::CC,
            value: 0x46_0001,
        };
        let s = p.to_sqe(2);
        assert_eq!(&s.as_bytes()[44..48], &0x14u32.to_le_bytes());
        assert_eq!(&s.as_bytes()[48..52], &0x46_0001u32.to_le_bytes());
        assert_eq!(PropertySet::from_sqe(&s), p);
        assert_eq!(PropertySize::from_attrib(2), None);
        let d = Disconnect { recfmt: 0 };
        assert_eq!(d.to_sqe(3).fctype(), 0x08);
        assert_eq!(Disconnect::from_sqe(&d.to_sqe(3)), d);
    }

    #[test]
    fn registers_bit_layout() {
        let cap = Cap {
            mqes: 127,
            cqr: true,
            to: 30,
            css: CAP_CSS_NVM,
            ..Cap::default()
        };
        let v = cap.to_u64();
        assert_eq!(v & 0xffff, 127);
        assert_ne!(v & (1 << 16), 0);
        assert_eq!((v >> 24) & 0xff, 30);
        assert_ne!(v & (1 << 37), 0, "CSS bit 0 is CAP bit 37");
        assert_eq!(Cap::from_u64(v), cap);
        assert_eq!(Version::new(1, 3, 0).0, 0x0001_0300);
        let cc = Cc::from_u32(0x0046_0001);
        assert!(cc.en);
        assert_eq!((cc.iosqes, cc.iocqes), (6, 4));
        assert_eq!(cc.to_u32(), 0x0046_0001);
        let shutdown = Cc::from_u32(1 << 14);
        assert_eq!(shutdown.shn, 1);
        let csts = Csts {
            rdy: true,
            shst: shst::COMPLETE,
            ..Csts::default()
        };
        assert_eq!(csts.to_u32(), 0b1001);
        assert_eq!(Csts::from_u32(0b1001), csts);
        assert_eq!(FabricsType::from_u8(4), Some(FabricsType::PropertyGet));
        assert_eq!(FabricsType::from_u8(2), None);
    }
}
