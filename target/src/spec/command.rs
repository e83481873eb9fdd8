//! Submission queue entries and the commands the target parses (NVMe Base 2.0 §4.2 "Submission
//! Queue Entry", §5 Admin Command Set; NVM Command Set 1.0 §3 I/O commands; NVMe-oF 1.1 §2.2
//! capsules and SGLs).
//!
//! An [`Sqe`] owns a copy of the 64 bytes it was parsed from: the transport copies the command
//! out of its receive buffer once, so every field read later sees the same value. The typed
//! views ([`Identify`], [`GetLogPage`], [`ReadWrite`] ...) decode the command dwords of one
//! command; each has `from_sqe` (target side) and `to_sqe` (initiator side).

use super::fabrics::FabricsType;
use super::wire::{get_u32, get_u64, put_u16, put_u32, put_u64};

/// Admin command opcodes (NVMe Base 2.0 Figure 28; NVMe-oF 1.1 Figure 19 for Fabrics 7Fh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AdminOpcode {
    /// 00h Delete I/O Submission Queue (not used over fabrics).
    DeleteIoSq = 0x00,
    /// 01h Create I/O Submission Queue (not used over fabrics).
    CreateIoSq = 0x01,
    /// 02h Get Log Page.
    GetLogPage = 0x02,
    /// 04h Delete I/O Completion Queue (not used over fabrics).
    DeleteIoCq = 0x04,
    /// 05h Create I/O Completion Queue (not used over fabrics).
    CreateIoCq = 0x05,
    /// 06h Identify.
    Identify = 0x06,
    /// 08h Abort.
    Abort = 0x08,
    /// 09h Set Features.
    SetFeatures = 0x09,
    /// 0Ah Get Features.
    GetFeatures = 0x0a,
    /// 0Ch Asynchronous Event Request.
    AsyncEventRequest = 0x0c,
    /// 0Dh Namespace Management.
    NamespaceManagement = 0x0d,
    /// 10h Firmware Commit.
    FirmwareCommit = 0x10,
    /// 11h Firmware Image Download.
    FirmwareImageDownload = 0x11,
    /// 15h Namespace Attachment.
    NamespaceAttachment = 0x15,
    /// 18h Keep Alive.
    KeepAlive = 0x18,
    /// 19h Directive Send.
    DirectiveSend = 0x19,
    /// 1Ah Directive Receive.
    DirectiveReceive = 0x1a,
    /// 7Fh Fabrics command; the command type is in FCTYPE ([`super::fabrics::FabricsType`]).
    Fabrics = 0x7f,
    /// 80h Format NVM.
    FormatNvm = 0x80,
    /// 81h Security Send.
    SecuritySend = 0x81,
    /// 82h Security Receive.
    SecurityReceive = 0x82,
}

impl AdminOpcode {
    /// The opcode of a raw value, or `None` for an opcode this crate does not name.
    pub const fn from_u8(v: u8) -> Option<AdminOpcode> {
        use AdminOpcode::*;
        Some(match v {
            0x00 => DeleteIoSq,
            0x01 => CreateIoSq,
            0x02 => GetLogPage,
            0x04 => DeleteIoCq,
            0x05 => CreateIoCq,
            0x06 => Identify,
            0x08 => Abort,
            0x09 => SetFeatures,
            0x0a => GetFeatures,
            0x0c => AsyncEventRequest,
            0x0d => NamespaceManagement,
            0x10 => FirmwareCommit,
            0x11 => FirmwareImageDownload,
            0x15 => NamespaceAttachment,
            0x18 => KeepAlive,
            0x19 => DirectiveSend,
            0x1a => DirectiveReceive,
            0x7f => Fabrics,
            0x80 => FormatNvm,
            0x81 => SecuritySend,
            0x82 => SecurityReceive,
            _ => return None,
        })
    }
}

/// NVM command set I/O opcodes (NVM Command Set 1.0 Figure 17; NVMe-oF: 7Fh is a Fabrics
/// command on any queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoOpcode {
    /// 00h Flush.
    Flush = 0x00,
    /// 01h Write.
    Write = 0x01,
    /// 02h Read.
    Read = 0x02,
    /// 04h Write Uncorrectable.
    WriteUncorrectable = 0x04,
    /// 05h Compare.
    Compare = 0x05,
    /// 08h Write Zeroes.
    WriteZeroes = 0x08,
    /// 09h Dataset Management.
    DatasetManagement = 0x09,
    /// 0Ch Verify.
    Verify = 0x0c,
    /// 0Dh Reservation Register.
    ReservationRegister = 0x0d,
    /// 0Eh Reservation Report.
    ReservationReport = 0x0e,
    /// 11h Reservation Acquire.
    ReservationAcquire = 0x11,
    /// 15h Reservation Release.
    ReservationRelease = 0x15,
    /// 7Fh Fabrics command.
    Fabrics = 0x7f,
}

impl IoOpcode {
    /// The opcode of a raw value, or `None` for an opcode this crate does not name.
    pub const fn from_u8(v: u8) -> Option<IoOpcode> {
        use IoOpcode::*;
        Some(match v {
            0x00 => Flush,
            0x01 => Write,
            0x02 => Read,
            0x04 => WriteUncorrectable,
            0x05 => Compare,
            0x08 => WriteZeroes,
            0x09 => DatasetManagement,
            0x0c => Verify,
            0x0d => ReservationRegister,
            0x0e => ReservationReport,
            0x11 => ReservationAcquire,
            0x15 => ReservationRelease,
            0x7f => Fabrics,
            _ => return None,
        })
    }

    /// Data direction from the opcode's low bits (NVMe Base 2.0 Figure 27: 01b host to
    /// controller, 10b controller to host, 11b bidirectional).
    pub const fn transfers_to_controller(op: u8) -> bool {
        op & 1 != 0
    }

    /// Whether the opcode's data flows from the controller to the host.
    pub const fn transfers_to_host(op: u8) -> bool {
        op & 2 != 0
    }
}

/// PRP or SGL for Data Transfer (PSDT, CDW0 bits 15:14). Fabrics require SGLs (NVMe-oF 1.1
/// §2.2: PSDT 01b or 10b; hosts use 01b).
pub mod psdt {
    /// 00b: PRPs (not allowed over fabrics).
    pub const PRP: u8 = 0;
    /// 01b: SGLs, MPTR the address of a contiguous buffer.
    pub const SGL_MPTR_CONTIGUOUS: u8 = 1;
    /// 10b: SGLs, MPTR the address of an SGL segment.
    pub const SGL_MPTR_SGL: u8 = 2;
}

/// SGL Descriptor Type values (NVMe Base 2.0 Figure 117; the type is bits 7:4 of the SGL
/// Identifier byte).
pub mod sgl_type {
    /// 0h SGL Data Block descriptor.
    pub const DATA_BLOCK: u8 = 0x0;
    /// 1h SGL Bit Bucket descriptor.
    pub const BIT_BUCKET: u8 = 0x1;
    /// 2h SGL Segment descriptor.
    pub const SEGMENT: u8 = 0x2;
    /// 3h SGL Last Segment descriptor.
    pub const LAST_SEGMENT: u8 = 0x3;
    /// 4h Keyed SGL Data Block descriptor (RDMA).
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    /// 5h Transport SGL Data Block descriptor (NVMe/TCP: data moved by R2T/H2CData/C2HData).
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
    /// Fh Vendor Specific.
    pub const VENDOR_SPECIFIC: u8 = 0xf;
}

/// SGL Descriptor Sub Type values (NVMe Base 2.0 Figure 118; bits 3:0 of the SGL Identifier).
pub mod sgl_subtype {
    /// 0h Address: the Address field is a memory address.
    pub const ADDRESS: u8 = 0x0;
    /// 1h Offset: the Address field is an offset into the in-capsule data (NVMe-oF 1.1 §2.2).
    pub const OFFSET: u8 = 0x1;
    /// Ah Transport specific (NVMe/TCP Transport SGL Data Block).
    pub const TRANSPORT_SPECIFIC: u8 = 0xa;
    /// Fh Invalidate Key: a Keyed SGL Data Block whose key the controller may invalidate with
    /// its response (NVMe-oF 1.1 §7.3.2, RDMA Send with Invalidate).
    pub const INVALIDATE_KEY: u8 = 0xf;
}

/// A Keyed SGL Data Block descriptor (NVMe Base 2.0 Figure 122; the RDMA transport's way to
/// name host memory): bytes 7:0 Address, 10:8 Length, 14:11 Key, 15 SGL Identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedSglDescriptor {
    /// Host memory address.
    pub address: u64,
    /// Length in bytes (24 bits).
    pub length: u32,
    /// The remote key (RDMA rkey) of the host's memory region.
    pub key: u32,
    /// Descriptor sub type ([`sgl_subtype::ADDRESS`] or [`sgl_subtype::INVALIDATE_KEY`]).
    pub subtype: u8,
}

impl KeyedSglDescriptor {
    /// Decodes 16 bytes, or `None` if the SGL Identifier is not a Keyed SGL Data Block with
    /// the Address or Invalidate Key sub type.
    pub fn parse(b: &[u8; 16]) -> Option<KeyedSglDescriptor> {
        let (ty, subtype) = (b[15] >> 4, b[15] & 0xf);
        if ty != sgl_type::KEYED_DATA_BLOCK
            || !matches!(subtype, sgl_subtype::ADDRESS | sgl_subtype::INVALIDATE_KEY)
        {
            return None;
        }
        Some(KeyedSglDescriptor {
            address: get_u64(b, 0),
            length: u32::from_le_bytes([b[8], b[9], b[10], 0]),
            key: get_u32(b, 11),
            subtype,
        })
    }

    /// Encodes into 16 bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u64(&mut b, 0, self.address);
        b[8..11].copy_from_slice(&self.length.to_le_bytes()[..3]);
        put_u32(&mut b, 11, self.key);
        b[15] = (sgl_type::KEYED_DATA_BLOCK << 4) | (self.subtype & 0xf);
        b
    }
}

/// An SGL descriptor as found in SGL1 of the DPTR field (NVMe Base 2.0 §4.1.2, Figure 116):
/// Address bytes 07:00, Length 11:08, bytes 14:12 reserved, SGL Identifier byte 15 (type in
/// bits 7:4, sub type in 3:0). Keyed descriptors (RDMA) use a different layout and are not
/// decoded here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SglDescriptor {
    /// Address, or offset into the in-capsule data for sub type [`sgl_subtype::OFFSET`].
    pub address: u64,
    /// Length in bytes.
    pub length: u32,
    /// Descriptor type ([`sgl_type`]).
    pub sgl_type: u8,
    /// Descriptor sub type ([`sgl_subtype`]).
    pub subtype: u8,
}

impl SglDescriptor {
    /// Descriptor size in bytes.
    pub const LEN: usize = 16;

    /// An SGL Data Block with Offset sub type: `len` bytes of in-capsule data at `offset` from
    /// the start of the in-capsule data (how NVMe/TCP hosts describe in-capsule data).
    pub const fn in_capsule(offset: u64, len: u32) -> SglDescriptor {
        SglDescriptor {
            address: offset,
            length: len,
            sgl_type: sgl_type::DATA_BLOCK,
            subtype: sgl_subtype::OFFSET,
        }
    }

    /// A Transport SGL Data Block of `len` bytes: the data moves in H2CData (after R2T) or
    /// C2HData PDUs (NVMe/TCP 1.0 §3.3.5).
    pub const fn transport_data_block(len: u32) -> SglDescriptor {
        SglDescriptor {
            address: 0,
            length: len,
            sgl_type: sgl_type::TRANSPORT_DATA_BLOCK,
            subtype: sgl_subtype::TRANSPORT_SPECIFIC,
        }
    }

    /// Whether this describes in-capsule data.
    pub const fn is_in_capsule(&self) -> bool {
        self.sgl_type == sgl_type::DATA_BLOCK && self.subtype == sgl_subtype::OFFSET
    }

    /// Whether this is an NVMe/TCP Transport SGL Data Block.
    pub const fn is_transport_data_block(&self) -> bool {
        self.sgl_type == sgl_type::TRANSPORT_DATA_BLOCK
            && self.subtype == sgl_subtype::TRANSPORT_SPECIFIC
    }

    /// Decodes 16 bytes.
    pub fn parse(b: &[u8; 16]) -> SglDescriptor {
        SglDescriptor {
            address: get_u64(b, 0),
            length: get_u32(b, 8),
            sgl_type: b[15] >> 4,
            subtype: b[15] & 0xf,
        }
    }

    /// Encodes into 16 bytes (reserved bytes zero).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u64(&mut b, 0, self.address);
        put_u32(&mut b, 8, self.length);
        b[15] = (self.sgl_type << 4) | (self.subtype & 0xf);
        b
    }
}

/// A 64-byte submission queue entry (NVMe Base 2.0 Figure 88 "Common Command Format"; over
/// fabrics the command capsule's SQE, NVMe-oF 1.1 §2.2).
///
/// | bytes | field |
/// |-------|-------|
/// | 03:00 | CDW0: OPC 7:0, FUSE 9:8, PSDT 15:14, CID 31:16 |
/// | 07:04 | NSID (Fabrics commands: byte 4 is FCTYPE) |
/// | 15:08 | CDW2, CDW3 |
/// | 23:16 | MPTR |
/// | 39:24 | DPTR (SGL1 over fabrics) |
/// | 63:40 | CDW10–CDW15 |
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe([u8; 64]);

impl Sqe {
    /// Entry size in bytes.
    pub const LEN: usize = 64;

    /// An all-zero entry.
    pub const fn zeroed() -> Sqe {
        Sqe([0; 64])
    }

    /// An entry with opcode `opc` and command identifier `cid`; SGLs selected (PSDT 01b) as
    /// fabrics require.
    pub fn new(opc: u8, cid: u16) -> Sqe {
        let mut s = Sqe::zeroed();
        s.set_opc(opc);
        s.set_cid(cid);
        s.set_psdt(psdt::SGL_MPTR_CONTIGUOUS);
        s
    }

    /// Copies an entry out of `b`.
    pub const fn from_bytes(b: [u8; 64]) -> Sqe {
        Sqe(b)
    }

    /// Copies an entry out of the first 64 bytes of `b`, or `None` if `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<Sqe> {
        let mut s = [0u8; 64];
        s.copy_from_slice(b.get(..64)?);
        Some(Sqe(s))
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }

    /// Command Dword `n` (0..=15).
    #[inline]
    pub fn cdw(&self, n: usize) -> u32 {
        get_u32(&self.0, n * 4)
    }

    /// Sets Command Dword `n` (0..=15).
    #[inline]
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        put_u32(&mut self.0, n * 4, v);
    }

    /// Opcode (OPC, CDW0 bits 7:0).
    #[inline]
    pub fn opc(&self) -> u8 {
        self.0[0]
    }

    /// OPC as an admin opcode (NVMe Base 2.0 Figure 28), or `None` for one the target does not
    /// know.
    #[inline]
    pub fn admin_opcode(&self) -> Option<AdminOpcode> {
        AdminOpcode::from_u8(self.opc())
    }

    /// OPC as an NVM I/O opcode (NVM Command Set 1.0 Figure 18), or `None` for one the target
    /// does not know.
    #[inline]
    pub fn io_opcode(&self) -> Option<IoOpcode> {
        IoOpcode::from_u8(self.opc())
    }

    /// For a Fabrics command (OPC 7Fh), its command type (NVMe-oF 1.1 Figure 20); `None` for
    /// any other command or an unknown FCTYPE.
    #[inline]
    pub fn fabrics_type(&self) -> Option<FabricsType> {
        if self.admin_opcode() == Some(AdminOpcode::Fabrics) {
            FabricsType::from_u8(self.fctype())
        } else {
            None
        }
    }

    /// Sets the opcode.
    pub fn set_opc(&mut self, opc: u8) {
        self.0[0] = opc;
    }

    /// Fused Operation (FUSE, CDW0 bits 9:8): 00b normal, 01b first, 10b second.
    #[inline]
    pub fn fuse(&self) -> u8 {
        self.0[1] & 3
    }

    /// PRP or SGL for Data Transfer (PSDT, CDW0 bits 15:14; [`psdt`]).
    #[inline]
    pub fn psdt(&self) -> u8 {
        self.0[1] >> 6
    }

    /// Sets PSDT.
    pub fn set_psdt(&mut self, v: u8) {
        self.0[1] = (self.0[1] & 0x3f) | (v << 6);
    }

    /// Command Identifier (CID, CDW0 bits 31:16).
    #[inline]
    pub fn cid(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }

    /// Sets the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        put_u16(&mut self.0, 2, cid);
    }

    /// Namespace Identifier (NSID, bytes 07:04).
    #[inline]
    pub fn nsid(&self) -> u32 {
        self.cdw(1)
    }

    /// Sets the namespace identifier.
    pub fn set_nsid(&mut self, nsid: u32) {
        self.set_cdw(1, nsid);
    }

    /// Fabrics Command Type (FCTYPE, byte 04 of a Fabrics command; NVMe-oF 1.1 Figure 20).
    #[inline]
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }

    /// Sets FCTYPE (byte 04).
    pub fn set_fctype(&mut self, v: u8) {
        self.0[4] = v;
    }

    /// Metadata Pointer (MPTR, bytes 23:16).
    pub fn mptr(&self) -> u64 {
        get_u64(&self.0, 16)
    }

    /// The first SGL descriptor (SGL1, bytes 39:24).
    pub fn sgl1(&self) -> SglDescriptor {
        let mut d = [0u8; 16];
        d.copy_from_slice(&self.0[24..40]);
        SglDescriptor::parse(&d)
    }

    /// SGL1 as a Keyed SGL Data Block, if it is one.
    pub fn keyed_sgl1(&self) -> Option<KeyedSglDescriptor> {
        let mut d = [0u8; 16];
        d.copy_from_slice(&self.0[24..40]);
        KeyedSglDescriptor::parse(&d)
    }

    /// Sets SGL1.
    pub fn set_sgl1(&mut self, d: &SglDescriptor) {
        self.0[24..40].copy_from_slice(&d.to_bytes());
    }

    /// Sets SGL1 to a Keyed SGL Data Block (NVMe/RDMA host memory).
    pub fn set_keyed_sgl1(&mut self, d: &KeyedSglDescriptor) {
        self.0[24..40].copy_from_slice(&d.to_bytes());
    }

    /// CDW10.
    #[inline]
    pub fn cdw10(&self) -> u32 {
        self.cdw(10)
    }

    /// CDW11.
    #[inline]
    pub fn cdw11(&self) -> u32 {
        self.cdw(11)
    }

    /// CDW12.
    #[inline]
    pub fn cdw12(&self) -> u32 {
        self.cdw(12)
    }

    /// CDW13.
    #[inline]
    pub fn cdw13(&self) -> u32 {
        self.cdw(13)
    }

    /// CDW14.
    #[inline]
    pub fn cdw14(&self) -> u32 {
        self.cdw(14)
    }

    /// CDW15.
    #[inline]
    pub fn cdw15(&self) -> u32 {
        self.cdw(15)
    }
}

impl Default for Sqe {
    fn default() -> Sqe {
        Sqe::zeroed()
    }
}

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqe")
            .field("opc", &format_args!("{:#04x}", self.opc()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("sgl1", &self.sgl1())
            .field(
                "cdw10_15",
                &[
                    self.cdw10(),
                    self.cdw11(),
                    self.cdw12(),
                    self.cdw13(),
                    self.cdw14(),
                    self.cdw15(),
                ],
            )
            .finish()
    }
}

/// Controller or Namespace Structure values of Identify (CNS, CDW10 bits 7:0; NVMe Base 2.0
/// Figure 273).
pub mod cns {
    /// 00h Identify Namespace data structure for NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// 01h Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// 02h Active Namespace ID list (NSIDs greater than NSID).
    pub const ACTIVE_NAMESPACE_LIST: u8 = 0x02;
    /// 03h Namespace Identification Descriptor list for NSID.
    pub const NAMESPACE_ID_DESCRIPTORS: u8 = 0x03;
    /// 05h I/O Command Set specific Identify Namespace.
    pub const CSI_NAMESPACE: u8 = 0x05;
    /// 06h I/O Command Set specific Identify Controller.
    pub const CSI_CONTROLLER: u8 = 0x06;
}

/// Identify (admin 06h; NVMe Base 2.0 §5.17): CDW10 CNS 7:0, CNTID 31:16; CDW11 CNSSID 15:0,
/// CSI 31:24. The data (4096 bytes) flows to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Identify {
    /// Controller or Namespace Structure ([`cns`]).
    pub cns: u8,
    /// Controller Identifier (for controller lists).
    pub cntid: u16,
    /// Namespace identifier from the SQE.
    pub nsid: u32,
    /// CNS Specific Identifier.
    pub cnssid: u16,
    /// Command Set Identifier.
    pub csi: u8,
}

impl Identify {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> Identify {
        let (c10, c11) = (s.cdw10(), s.cdw11());
        Identify {
            cns: c10 as u8,
            cntid: (c10 >> 16) as u16,
            nsid: s.nsid(),
            cnssid: c11 as u16,
            csi: (c11 >> 24) as u8,
        }
    }

    /// Encodes into a command with identifier `cid` whose 4096 bytes arrive by C2HData.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(AdminOpcode::Identify as u8, cid);
        s.set_nsid(self.nsid);
        s.set_cdw(10, u32::from(self.cns) | u32::from(self.cntid) << 16);
        s.set_cdw(11, u32::from(self.cnssid) | u32::from(self.csi) << 24);
        s.set_sgl1(&SglDescriptor::transport_data_block(4096));
        s
    }
}

/// Get Log Page (admin 02h; NVMe Base 2.0 §5.16): CDW10 LID 7:0, LSP 14:8, RAE 15, NUMDL
/// 31:16; CDW11 NUMDU 15:0, LSI 31:16; CDW12/13 LPOL/LPOU (byte offset); CDW14 CSI 31:24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GetLogPage {
    /// Log Page Identifier ([`super::log::LogPageId`]).
    pub lid: u8,
    /// Log Specific Parameter (7 bits).
    pub lsp: u8,
    /// Retain Asynchronous Event: if clear, reading the page clears the pending event.
    pub rae: bool,
    /// Number of dwords to return (NUMD is 0's based on the wire; this is the count).
    pub numd: u32,
    /// Log Specific Identifier.
    pub lsi: u16,
    /// Log Page Offset in bytes (dword aligned unless the controller supports otherwise).
    pub offset: u64,
    /// Namespace identifier from the SQE.
    pub nsid: u32,
}

impl GetLogPage {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> GetLogPage {
        let (c10, c11) = (s.cdw10(), s.cdw11());
        let numd0 = (c10 >> 16) | (c11 & 0xffff) << 16;
        GetLogPage {
            lid: c10 as u8,
            lsp: ((c10 >> 8) & 0x7f) as u8,
            rae: c10 & (1 << 15) != 0,
            numd: numd0.wrapping_add(1),
            lsi: (c11 >> 16) as u16,
            offset: u64::from(s.cdw12()) | u64::from(s.cdw13()) << 32,
            nsid: s.nsid(),
        }
    }

    /// Bytes requested.
    pub fn len_bytes(&self) -> u64 {
        // NUMD 0's based 32 bits: 0xffff_ffff + 1 wraps to 0, meaning 2^32 dwords.
        let d = if self.numd == 0 {
            1u64 << 32
        } else {
            u64::from(self.numd)
        };
        d * 4
    }

    /// Encodes into a command with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(AdminOpcode::GetLogPage as u8, cid);
        let numd0 = self.numd.wrapping_sub(1);
        s.set_nsid(self.nsid);
        s.set_cdw(
            10,
            u32::from(self.lid)
                | u32::from(self.lsp & 0x7f) << 8
                | u32::from(self.rae) << 15
                | (numd0 & 0xffff) << 16,
        );
        s.set_cdw(11, numd0 >> 16 | u32::from(self.lsi) << 16);
        s.set_cdw(12, self.offset as u32);
        s.set_cdw(13, (self.offset >> 32) as u32);
        s.set_sgl1(&SglDescriptor::transport_data_block(
            self.len_bytes().min(u64::from(u32::MAX)) as u32,
        ));
        s
    }
}

/// Read, Write and Compare (NVM Command Set 1.0 §3.2.6/§3.2.3/§3.2.1): CDW10–11 SLBA; CDW12
/// NLB 15:0 (0's based), DTYPE 23:20, PRINFO 29:26, FUA 30, LR 31; CDW13 DSM; CDW14 reference
/// tag; CDW15 application tag and mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReadWrite {
    /// Namespace identifier.
    pub nsid: u32,
    /// Starting LBA.
    pub slba: u64,
    /// Number of logical blocks (1..=65536; the wire field is 0's based).
    pub nlb: u32,
    /// Force Unit Access.
    pub fua: bool,
    /// Limited Retry.
    pub lr: bool,
    /// Protection Information field (4 bits).
    pub prinfo: u8,
    /// Directive Type (4 bits).
    pub dtype: u8,
    /// Dataset Management hints (CDW13 bits 7:0).
    pub dsm: u8,
}

impl ReadWrite {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> ReadWrite {
        let c12 = s.cdw12();
        ReadWrite {
            nsid: s.nsid(),
            slba: u64::from(s.cdw10()) | u64::from(s.cdw11()) << 32,
            nlb: (c12 & 0xffff) + 1,
            fua: c12 & (1 << 30) != 0,
            lr: c12 & (1 << 31) != 0,
            prinfo: ((c12 >> 26) & 0xf) as u8,
            dtype: ((c12 >> 20) & 0xf) as u8,
            dsm: s.cdw13() as u8,
        }
    }

    /// Encodes into a command of opcode `opc` ([`IoOpcode::Read`], [`IoOpcode::Write`],
    /// [`IoOpcode::Compare`]) whose data is described by `sgl`.
    pub fn to_sqe(&self, opc: IoOpcode, cid: u16, sgl: &SglDescriptor) -> Sqe {
        let mut s = Sqe::new(opc as u8, cid);
        s.set_nsid(self.nsid);
        s.set_cdw(10, self.slba as u32);
        s.set_cdw(11, (self.slba >> 32) as u32);
        s.set_cdw(
            12,
            (self.nlb.wrapping_sub(1) & 0xffff)
                | u32::from(self.dtype & 0xf) << 20
                | u32::from(self.prinfo & 0xf) << 26
                | u32::from(self.fua) << 30
                | u32::from(self.lr) << 31,
        );
        s.set_cdw(13, u32::from(self.dsm));
        s.set_sgl1(sgl);
        s
    }
}

/// Write Zeroes (NVM Command Set 1.0 §3.2.8): CDW10–11 SLBA; CDW12 NLB 15:0 (0's based),
/// DEAC 25, PRINFO 29:26, FUA 30, LR 31.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WriteZeroes {
    /// Namespace identifier.
    pub nsid: u32,
    /// Starting LBA.
    pub slba: u64,
    /// Number of logical blocks (1..=65536).
    pub nlb: u32,
    /// Deallocate: the blocks may be deallocated instead of written.
    pub deac: bool,
    /// Force Unit Access.
    pub fua: bool,
}

impl WriteZeroes {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> WriteZeroes {
        let c12 = s.cdw12();
        WriteZeroes {
            nsid: s.nsid(),
            slba: u64::from(s.cdw10()) | u64::from(s.cdw11()) << 32,
            nlb: (c12 & 0xffff) + 1,
            deac: c12 & (1 << 25) != 0,
            fua: c12 & (1 << 30) != 0,
        }
    }

    /// Encodes into a command with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(IoOpcode::WriteZeroes as u8, cid);
        s.set_nsid(self.nsid);
        s.set_cdw(10, self.slba as u32);
        s.set_cdw(11, (self.slba >> 32) as u32);
        s.set_cdw(
            12,
            (self.nlb.wrapping_sub(1) & 0xffff)
                | u32::from(self.deac) << 25
                | u32::from(self.fua) << 30,
        );
        s
    }
}

/// Dataset Management (NVM Command Set 1.0 §3.2.3): CDW10 NR 7:0 (0's based number of
/// ranges); CDW11 IDR 0, IDW 1, AD 2. The ranges (16 bytes each, [`DsmRange`]) are the data,
/// host to controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatasetManagement {
    /// Namespace identifier.
    pub nsid: u32,
    /// Number of ranges (1..=256).
    pub nr: u32,
    /// Integral Dataset for Read.
    pub idr: bool,
    /// Integral Dataset for Write.
    pub idw: bool,
    /// Attribute – Deallocate.
    pub ad: bool,
}

impl DatasetManagement {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> DatasetManagement {
        let c11 = s.cdw11();
        DatasetManagement {
            nsid: s.nsid(),
            nr: (s.cdw10() & 0xff) + 1,
            idr: c11 & 1 != 0,
            idw: c11 & 2 != 0,
            ad: c11 & 4 != 0,
        }
    }

    /// Bytes of range data the command carries.
    pub fn data_len(&self) -> usize {
        self.nr as usize * DsmRange::LEN
    }

    /// Encodes into a command whose range data is described by `sgl`.
    pub fn to_sqe(&self, cid: u16, sgl: &SglDescriptor) -> Sqe {
        let mut s = Sqe::new(IoOpcode::DatasetManagement as u8, cid);
        s.set_nsid(self.nsid);
        s.set_cdw(10, self.nr.wrapping_sub(1) & 0xff);
        s.set_cdw(
            11,
            u32::from(self.idr) | u32::from(self.idw) << 1 | u32::from(self.ad) << 2,
        );
        s.set_sgl1(sgl);
        s
    }
}

/// One Dataset Management range (NVM Command Set 1.0 Figure 39): Context Attributes bytes
/// 03:00, Length in logical blocks 07:04, Starting LBA 15:08.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DsmRange {
    /// Context Attributes.
    pub cattr: u32,
    /// Length in logical blocks (not 0's based; 0 is an empty range).
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}

impl DsmRange {
    /// Range size in bytes.
    pub const LEN: usize = 16;

    /// Parses the first `count` ranges of `data`; `None` if `data` is shorter than that.
    pub fn parse_list(data: &[u8], count: usize) -> Option<impl Iterator<Item = DsmRange> + '_> {
        let bytes = data.get(..count.checked_mul(Self::LEN)?)?;
        Some(bytes.chunks_exact(Self::LEN).map(|r| DsmRange {
            cattr: get_u32(r, 0),
            nlb: get_u32(r, 4),
            slba: get_u64(r, 8),
        }))
    }

    /// Writes this range at `out[..16]`.
    pub fn write_to(&self, out: &mut [u8]) {
        put_u32(out, 0, self.cattr);
        put_u32(out, 4, self.nlb);
        put_u64(out, 8, self.slba);
    }
}

/// Abort (admin 08h; NVMe Base 2.0 §5.1): CDW10 SQID 15:0, CID 31:16. Completion DW0 bit 0
/// set means the command was not aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Abort {
    /// Submission queue of the command to abort.
    pub sqid: u16,
    /// Command identifier to abort.
    pub cid: u16,
}

impl Abort {
    /// Decodes the command dwords.
    pub fn from_sqe(s: &Sqe) -> Abort {
        let c10 = s.cdw10();
        Abort {
            sqid: c10 as u16,
            cid: (c10 >> 16) as u16,
        }
    }

    /// Encodes into a command with identifier `cid`.
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(AdminOpcode::Abort as u8, cid);
        s.set_cdw(10, u32::from(self.sqid) | u32::from(self.cid) << 16);
        s
    }
}

/// Asynchronous Event Type (completion DW0 bits 2:0 of an Asynchronous Event Request; NVMe Base
/// 2.0 Figure 146).
pub mod async_event_type {
    /// 0h Error status.
    pub const ERROR: u8 = 0;
    /// 1h SMART / Health status.
    pub const SMART_HEALTH: u8 = 1;
    /// 2h Notice.
    pub const NOTICE: u8 = 2;
    /// 6h I/O Command specific status.
    pub const IO_COMMAND_SPECIFIC: u8 = 6;
    /// 7h Vendor specific.
    pub const VENDOR_SPECIFIC: u8 = 7;
}

/// Asynchronous Event Information for Notice events (NVMe Base 2.0 Figure 150; F0h from
/// NVMe-oF 1.1 §5.3).
pub mod async_event_notice {
    /// 00h Namespace Attribute Changed (read the Changed Namespace List log page).
    pub const NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
    /// 01h Firmware Activation Starting.
    pub const FIRMWARE_ACTIVATION_STARTING: u8 = 0x01;
    /// 03h Asymmetric Namespace Access Change.
    pub const ANA_CHANGE: u8 = 0x03;
    /// F0h Discovery Log Page Change.
    pub const DISCOVERY_LOG_PAGE_CHANGE: u8 = 0xf0;
}

/// The completion DW0 of an Asynchronous Event Request (NVMe Base 2.0 Figure 145): type 2:0,
/// information 15:8, associated log page 23:16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AsyncEvent {
    /// Asynchronous Event Type ([`async_event_type`]).
    pub event_type: u8,
    /// Asynchronous Event Information.
    pub info: u8,
    /// Log Page Identifier the host reads to clear the event.
    pub log_page: u8,
}

impl AsyncEvent {
    /// The completion DW0.
    pub const fn to_dw0(&self) -> u32 {
        (self.event_type as u32 & 7) | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }

    /// Decodes a completion DW0.
    pub const fn from_dw0(dw0: u32) -> AsyncEvent {
        AsyncEvent {
            event_type: (dw0 & 7) as u8,
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_common_fields_are_at_spec_offsets() {
        let mut s = Sqe::new(0x02, 0xbeef);
        s.set_nsid(7);
        s.set_sgl1(&SglDescriptor::transport_data_block(8192));
        s.set_cdw(10, 0x1122_3344);
        let b = s.as_bytes();
        assert_eq!(b[0], 0x02);
        assert_eq!(b[1], 0x40, "PSDT 01b in bits 15:14 of CDW0");
        assert_eq!(&b[2..4], &[0xef, 0xbe]);
        assert_eq!(&b[4..8], &[7, 0, 0, 0]);
        assert_eq!(&b[32..36], &8192u32.to_le_bytes(), "SGL1 length at byte 32");
        assert_eq!(b[39], 0x5a, "Transport SGL Data Block, transport specific");
        assert_eq!(&b[40..44], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(s.psdt(), psdt::SGL_MPTR_CONTIGUOUS);
        assert_eq!(Sqe::parse(b).unwrap(), s);
        assert_eq!(Sqe::parse(&b[..63]), None);
    }

    #[test]
    fn keyed_sgl_has_a_24_bit_length_and_a_key() {
        let d = KeyedSglDescriptor {
            address: 0x1122_3344_5566_7788,
            length: 0x12_3456,
            key: 0xdead_beef,
            subtype: sgl_subtype::INVALIDATE_KEY,
        };
        let b = d.to_bytes();
        assert_eq!(&b[8..11], &[0x56, 0x34, 0x12], "Length, bytes 10:8");
        assert_eq!(
            &b[11..15],
            &0xdead_beefu32.to_le_bytes(),
            "Key, bytes 14:11"
        );
        assert_eq!(b[15], 0x4f, "SGL Identifier");
        assert_eq!(KeyedSglDescriptor::parse(&b), Some(d));
        let mut other = b;
        other[15] = 0x41; // keyed, offset sub type: not a keyed data block we take
        assert_eq!(KeyedSglDescriptor::parse(&other), None);
        assert_eq!(
            KeyedSglDescriptor::parse(&SglDescriptor::in_capsule(0, 8).to_bytes()),
            None
        );
    }

    #[test]
    fn in_capsule_sgl_identifier_is_01h() {
        let d = SglDescriptor::in_capsule(0, 4096);
        assert_eq!(d.to_bytes()[15], 0x01);
        assert!(d.is_in_capsule());
        assert!(!d.is_transport_data_block());
        assert_eq!(SglDescriptor::parse(&d.to_bytes()), d);
    }

    #[test]
    fn read_write_round_trip_and_zero_based_nlb() {
        let rw = ReadWrite {
            nsid: 1,
            slba: 0x1_0000_0002,
            nlb: 65536,
            fua: true,
            lr: false,
            prinfo: 0xa,
            dtype: 0,
            dsm: 3,
        };
        let s = rw.to_sqe(IoOpcode::Write, 9, &SglDescriptor::in_capsule(0, 512));
        assert_eq!(s.cdw12() & 0xffff, 0xffff);
        assert_eq!(s.cdw10(), 2);
        assert_eq!(s.cdw11(), 1);
        assert_eq!(ReadWrite::from_sqe(&s), rw);
        assert!(IoOpcode::transfers_to_controller(IoOpcode::Write as u8));
        assert!(IoOpcode::transfers_to_host(IoOpcode::Read as u8));
        assert!(!IoOpcode::transfers_to_host(IoOpcode::Flush as u8));
    }

    #[test]
    fn get_log_page_numd_spans_two_dwords() {
        let g = GetLogPage {
            lid: 0x70,
            lsp: 0,
            rae: true,
            numd: 0x0003_0000,
            lsi: 0,
            offset: 0x1_0000_0400,
            nsid: 0,
        };
        let s = g.to_sqe(1);
        assert_eq!(s.cdw10() >> 16, 0xffff);
        assert_eq!(s.cdw11() & 0xffff, 2);
        assert_eq!(GetLogPage::from_sqe(&s), g);
        assert_eq!(g.len_bytes(), 0x0003_0000 * 4);
    }

    #[test]
    fn identify_dsm_abort_write_zeroes_round_trip() {
        let id = Identify {
            cns: cns::NAMESPACE_ID_DESCRIPTORS,
            cntid: 3,
            nsid: 5,
            cnssid: 0,
            csi: 0,
        };
        assert_eq!(Identify::from_sqe(&id.to_sqe(4)), id);
        let dsm = DatasetManagement {
            nsid: 1,
            nr: 256,
            idr: false,
            idw: true,
            ad: true,
        };
        let s = dsm.to_sqe(2, &SglDescriptor::in_capsule(0, 4096));
        assert_eq!(s.cdw10(), 0xff);
        assert_eq!(DatasetManagement::from_sqe(&s), dsm);
        assert_eq!(dsm.data_len(), 4096);
        let a = Abort { sqid: 1, cid: 77 };
        assert_eq!(Abort::from_sqe(&a.to_sqe(3)), a);
        let wz = WriteZeroes {
            nsid: 1,
            slba: 10,
            nlb: 8,
            deac: true,
            fua: false,
        };
        assert_eq!(WriteZeroes::from_sqe(&wz.to_sqe(3)), wz);
    }

    #[test]
    fn dsm_ranges_parse_at_their_offsets() {
        let mut data = [0u8; 48];
        DsmRange {
            cattr: 1,
            nlb: 8,
            slba: 100,
        }
        .write_to(&mut data[16..]);
        assert_eq!(&data[20..24], &8u32.to_le_bytes());
        assert_eq!(&data[24..32], &100u64.to_le_bytes());
        let r: Vec<_> = DsmRange::parse_list(&data, 3).unwrap().collect();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].slba, 100);
        assert_eq!(r[1].nlb, 8);
        assert!(DsmRange::parse_list(&data, 4).is_none());
        assert!(DsmRange::parse_list(&data, usize::MAX).is_none());
    }

    #[test]
    fn async_event_dw0_layout() {
        let e = AsyncEvent {
            event_type: async_event_type::NOTICE,
            info: async_event_notice::DISCOVERY_LOG_PAGE_CHANGE,
            log_page: 0x70,
        };
        assert_eq!(e.to_dw0(), 0x0070_f002);
        assert_eq!(AsyncEvent::from_dw0(e.to_dw0()), e);
    }

    #[test]
    fn opcodes_decode() {
        for v in 0..=255u8 {
            if let Some(op) = AdminOpcode::from_u8(v) {
                assert_eq!(op as u8, v);
            }
            if let Some(op) = IoOpcode::from_u8(v) {
                assert_eq!(op as u8, v);
            }
        }
        assert_eq!(AdminOpcode::from_u8(0x18), Some(AdminOpcode::KeepAlive));
        assert_eq!(IoOpcode::from_u8(0x09), Some(IoOpcode::DatasetManagement));
        assert_eq!(IoOpcode::from_u8(0x03), None);
    }

    #[test]
    fn typed_opcode_accessors_read_opc_and_fctype() {
        let mut s = Sqe::new(AdminOpcode::Fabrics as u8, 1);
        s.set_fctype(FabricsType::PropertyGet as u8);
        assert_eq!(s.admin_opcode(), Some(AdminOpcode::Fabrics));
        assert_eq!(s.fabrics_type(), Some(FabricsType::PropertyGet));
        s.set_fctype(0x02);
        assert_eq!(s.fabrics_type(), None, "unknown FCTYPE");
        // FCTYPE is byte 04 of any command: it names a Fabrics type only under OPC 7Fh.
        let mut w = Sqe::new(IoOpcode::Write as u8, 2);
        w.set_fctype(FabricsType::Connect as u8);
        assert_eq!(w.io_opcode(), Some(IoOpcode::Write));
        assert_eq!(w.fabrics_type(), None);
        assert_eq!(Sqe::new(0x03, 3).io_opcode(), None);
        assert_eq!(Sqe::new(0x03, 3).admin_opcode(), None);
    }
}
