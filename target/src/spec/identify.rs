//! Identify data structures (NVMe Base 2.0 §5.17.2; NVM Command Set 1.0 §4.1.5; NVMe-oF 1.1
//! §4.1 for the fabrics fields of Identify Controller).
//!
//! Each structure has public fields named as in the spec, an encoder that fills a 4096-byte
//! buffer at the spec's byte offsets (reserved bytes zero) and a parser for the initiator.

use super::fabrics::{NQN_FIELD_LEN, Version};
use super::wire::{
    get_str, get_u16, get_u32, get_u64, get_u128, put_ascii, put_nqn, put_u16, put_u32, put_u64,
    put_u128,
};

/// Size of every Identify data structure in bytes.
pub const IDENTIFY_LEN: usize = 4096;

/// Controller Multi-Path I/O and Namespace Sharing Capabilities (CMIC, byte 76).
pub mod cmic {
    /// Bit 0: the subsystem may contain more than one port.
    pub const MULTI_PORT: u8 = 1 << 0;
    /// Bit 1: the subsystem may contain more than one controller.
    pub const MULTI_CONTROLLER: u8 = 1 << 1;
    /// Bit 3: Asymmetric Namespace Access Reporting.
    pub const ANA_REPORTING: u8 = 1 << 3;
}

/// Optional Asynchronous Events Supported (OAES, bytes 95:92).
pub mod oaes {
    /// Bit 8: Namespace Attribute Notices.
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    /// Bit 11: Asymmetric Namespace Access Change Notices.
    pub const ANA_CHANGE: u32 = 1 << 11;
    /// Bit 31: Discovery Log Page Change Notices (NVMe-oF 1.1).
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
}

/// Asymmetric Namespace Access Capabilities (ANACAP, byte 343).
pub mod anacap {
    /// Bit 0: reports ANA Optimized.
    pub const OPTIMIZED: u8 = 1 << 0;
    /// Bit 1: reports ANA Non-Optimized.
    pub const NON_OPTIMIZED: u8 = 1 << 1;
    /// Bit 2: reports ANA Inaccessible.
    pub const INACCESSIBLE: u8 = 1 << 2;
    /// Bit 3: reports ANA Persistent Loss.
    pub const PERSISTENT_LOSS: u8 = 1 << 3;
    /// Bit 4: reports ANA Change.
    pub const CHANGE: u8 = 1 << 4;
    /// Bit 6: a namespace's ANAGRPID does not change while it is attached.
    pub const GRPID_NOT_CHANGED: u8 = 1 << 6;
}

/// Optional Admin Command Support (OACS, bytes 257:256).
pub mod oacs {
    /// Bit 0: Security Send/Receive.
    pub const SECURITY: u16 = 1 << 0;
    /// Bit 1: Format NVM.
    pub const FORMAT_NVM: u16 = 1 << 1;
    /// Bit 2: Firmware Commit/Download.
    pub const FIRMWARE: u16 = 1 << 2;
    /// Bit 3: Namespace Management.
    pub const NAMESPACE_MANAGEMENT: u16 = 1 << 3;
}

/// Log Page Attributes (LPA, byte 261).
pub mod lpa {
    /// Bit 0: SMART / Health log page per namespace.
    pub const SMART_PER_NAMESPACE: u8 = 1 << 0;
    /// Bit 1: Commands Supported and Effects log page.
    pub const COMMANDS_EFFECTS: u8 = 1 << 1;
    /// Bit 2: extended Get Log Page (NUMDU, LPOL/LPOU).
    pub const EXTENDED_DATA: u8 = 1 << 2;
}

/// Optional NVM Command Support (ONCS, bytes 521:520).
pub mod oncs {
    /// Bit 0: Compare.
    pub const COMPARE: u16 = 1 << 0;
    /// Bit 1: Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Bit 2: Dataset Management.
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    /// Bit 3: Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Bit 4: Save field in Set Features and Select field in Get Features.
    pub const SAVE_SELECT: u16 = 1 << 4;
    /// Bit 5: Reservations.
    pub const RESERVATIONS: u16 = 1 << 5;
    /// Bit 7: Verify.
    pub const VERIFY: u16 = 1 << 7;
}

/// Volatile Write Cache (VWC, byte 525).
pub mod vwc {
    /// Bit 0: a volatile write cache is present.
    pub const PRESENT: u8 = 1 << 0;
    /// Bits 2:1 = 11b: Flush with NSID FFFFFFFFh is supported.
    pub const FLUSH_BROADCAST_SUPPORTED: u8 = 0b11 << 1;
    /// Bits 2:1 = 10b: Flush with NSID FFFFFFFFh is not supported.
    pub const FLUSH_BROADCAST_UNSUPPORTED: u8 = 0b10 << 1;
}

/// SGL Support (SGLS, bytes 539:536).
pub mod sgls {
    /// Bits 1:0 = 01b: SGLs supported, no alignment requirement.
    pub const SUPPORTED: u32 = 1;
    /// Bit 2: Keyed SGL Data Block descriptor (RDMA).
    pub const KEYED_DATA_BLOCK: u32 = 1 << 2;
    /// Bit 20: the Address field may be an offset (in-capsule data).
    pub const OFFSET: u32 = 1 << 20;
    /// Bit 21: Transport SGL Data Block descriptor.
    pub const TRANSPORT_DATA_BLOCK: u32 = 1 << 21;
}

/// Controller Type (CNTRLTYPE, byte 111).
pub mod cntrltype {
    /// 1h I/O controller.
    pub const IO: u8 = 1;
    /// 2h Discovery controller.
    pub const DISCOVERY: u8 = 2;
    /// 3h Administrative controller.
    pub const ADMIN: u8 = 3;
}

/// Fabrics Controller Attributes (FCATT, byte 1802).
pub mod fcatt {
    /// Bit 0: static controller model (clear: dynamic).
    pub const STATIC_CONTROLLER_MODEL: u8 = 1 << 0;
}

/// Identify Controller data structure (CNS 01h; NVMe Base 2.0 Figure 275, NVMe-oF 1.1 Figure
/// 28 for bytes 2047:1792).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IdentifyController {
    /// PCI Vendor ID (bytes 1:0).
    pub vid: u16,
    /// PCI Subsystem Vendor ID (bytes 3:2).
    pub ssvid: u16,
    /// Serial Number, ASCII (bytes 23:4).
    pub sn: String,
    /// Model Number, ASCII (bytes 63:24).
    pub mn: String,
    /// Firmware Revision, ASCII (bytes 71:64).
    pub fr: String,
    /// Recommended Arbitration Burst (byte 72).
    pub rab: u8,
    /// IEEE OUI Identifier (bytes 75:73).
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities ([`cmic`], byte 76).
    pub cmic: u8,
    /// Maximum Data Transfer Size, 2^MDTS units of CAP.MPSMIN; 0 = no limit (byte 77).
    pub mdts: u8,
    /// Controller ID (bytes 79:78).
    pub cntlid: u16,
    /// Version (bytes 83:80).
    pub ver: Version,
    /// RTD3 Resume Latency, µs (bytes 87:84).
    pub rtd3r: u32,
    /// RTD3 Entry Latency, µs (bytes 91:88).
    pub rtd3e: u32,
    /// Optional Asynchronous Events Supported (bytes 95:92; bit 8 namespace attribute notices,
    /// bit 31 discovery log page change).
    pub oaes: u32,
    /// Controller Attributes (bytes 99:96).
    pub ctratt: u32,
    /// Controller Type ([`cntrltype`], byte 111).
    pub cntrltype: u8,
    /// Optional Admin Command Support ([`oacs`], bytes 257:256).
    pub oacs: u16,
    /// Abort Command Limit, 0's based (byte 258).
    pub acl: u8,
    /// Asynchronous Event Request Limit, 0's based (byte 259).
    pub aerl: u8,
    /// Firmware Updates (byte 260).
    pub frmw: u8,
    /// Log Page Attributes ([`lpa`], byte 261).
    pub lpa: u8,
    /// Error Log Page Entries, 0's based (byte 262).
    pub elpe: u8,
    /// Number of Power States Support, 0's based (byte 263).
    pub npss: u8,
    /// Keep Alive Support: granularity in 100 ms units, 0 = unsupported (bytes 321:320).
    pub kas: u16,
    /// ANA Transition Time in seconds (byte 342).
    pub anatt: u8,
    /// Asymmetric Namespace Access Capabilities ([`anacap`], byte 343).
    pub anacap: u8,
    /// ANA Group Identifier Maximum (bytes 347:344).
    pub anagrpmax: u32,
    /// Number of ANA Group Identifiers (bytes 351:348).
    pub nanagrpid: u32,
    /// Submission Queue Entry Size: required 3:0, maximum 7:4, log2 bytes (byte 512).
    pub sqes: u8,
    /// Completion Queue Entry Size (byte 513).
    pub cqes: u8,
    /// Maximum Outstanding Commands (bytes 515:514).
    pub maxcmd: u16,
    /// Number of Namespaces: the largest valid NSID (bytes 519:516).
    pub nn: u32,
    /// Optional NVM Command Support ([`oncs`], bytes 521:520).
    pub oncs: u16,
    /// Fused Operation Support (bytes 523:522; bit 0 Compare and Write).
    pub fuses: u16,
    /// Format NVM Attributes (byte 524).
    pub fna: u8,
    /// Volatile Write Cache ([`vwc`], byte 525).
    pub vwc: u8,
    /// Atomic Write Unit Normal, 0's based blocks (bytes 527:526).
    pub awun: u16,
    /// Atomic Write Unit Power Fail, 0's based blocks (bytes 529:528).
    pub awupf: u16,
    /// SGL Support ([`sgls`], bytes 539:536).
    pub sgls: u32,
    /// Maximum Number of Allowed Namespaces (bytes 543:540).
    pub mnan: u32,
    /// NVM Subsystem NVMe Qualified Name (bytes 1023:768).
    pub subnqn: String,
    /// I/O Queue Command Capsule Supported Size in 16-byte units, at least 4 (bytes 1795:1792).
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size in 16-byte units, at least 1 (bytes
    /// 1799:1796).
    pub iorcsz: u32,
    /// In Capsule Data Offset in 16-byte units (bytes 1801:1800; 0 for NVMe/TCP).
    pub icdoff: u16,
    /// Fabrics Controller Attributes ([`fcatt`], byte 1802).
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors, 0 = no limit (byte 1803).
    pub msdbd: u8,
    /// Optional Fabric Commands Support (bytes 1805:1804; bit 0 Disconnect).
    pub ofcs: u16,
}

impl IdentifyController {
    /// Writes the structure into `out[..4096]` (reserved bytes zeroed).
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..IDENTIFY_LEN];
        b.fill(0);
        put_u16(b, 0, self.vid);
        put_u16(b, 2, self.ssvid);
        put_ascii(b, 4, 20, &self.sn);
        put_ascii(b, 24, 40, &self.mn);
        put_ascii(b, 64, 8, &self.fr);
        b[72] = self.rab;
        b[73..76].copy_from_slice(&self.ieee);
        b[76] = self.cmic;
        b[77] = self.mdts;
        put_u16(b, 78, self.cntlid);
        put_u32(b, 80, self.ver.0);
        put_u32(b, 84, self.rtd3r);
        put_u32(b, 88, self.rtd3e);
        put_u32(b, 92, self.oaes);
        put_u32(b, 96, self.ctratt);
        b[111] = self.cntrltype;
        put_u16(b, 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        b[263] = self.npss;
        put_u16(b, 320, self.kas);
        b[342] = self.anatt;
        b[343] = self.anacap;
        put_u32(b, 344, self.anagrpmax);
        put_u32(b, 348, self.nanagrpid);
        b[512] = self.sqes;
        b[513] = self.cqes;
        put_u16(b, 514, self.maxcmd);
        put_u32(b, 516, self.nn);
        put_u16(b, 520, self.oncs);
        put_u16(b, 522, self.fuses);
        b[524] = self.fna;
        b[525] = self.vwc;
        put_u16(b, 526, self.awun);
        put_u16(b, 528, self.awupf);
        put_u32(b, 536, self.sgls);
        put_u32(b, 540, self.mnan);
        put_nqn(b, 768, NQN_FIELD_LEN, &self.subnqn);
        put_u32(b, 1792, self.ioccsz);
        put_u32(b, 1796, self.iorcsz);
        put_u16(b, 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        put_u16(b, 1804, self.ofcs);
    }

    /// The encoded structure.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; IDENTIFY_LEN];
        self.write_to(&mut v);
        v
    }

    /// Decodes a structure (initiator side); `None` if `b` is shorter than 4096 bytes.
    pub fn parse(b: &[u8]) -> Option<IdentifyController> {
        let b = b.get(..IDENTIFY_LEN)?;
        Some(IdentifyController {
            vid: get_u16(b, 0),
            ssvid: get_u16(b, 2),
            sn: get_str(b, 4, 20),
            mn: get_str(b, 24, 40),
            fr: get_str(b, 64, 8),
            rab: b[72],
            ieee: [b[73], b[74], b[75]],
            cmic: b[76],
            mdts: b[77],
            cntlid: get_u16(b, 78),
            ver: Version(get_u32(b, 80)),
            rtd3r: get_u32(b, 84),
            rtd3e: get_u32(b, 88),
            oaes: get_u32(b, 92),
            ctratt: get_u32(b, 96),
            cntrltype: b[111],
            oacs: get_u16(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            npss: b[263],
            kas: get_u16(b, 320),
            anatt: b[342],
            anacap: b[343],
            anagrpmax: get_u32(b, 344),
            nanagrpid: get_u32(b, 348),
            sqes: b[512],
            cqes: b[513],
            maxcmd: get_u16(b, 514),
            nn: get_u32(b, 516),
            oncs: get_u16(b, 520),
            fuses: get_u16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: get_u16(b, 526),
            awupf: get_u16(b, 528),
            sgls: get_u32(b, 536),
            mnan: get_u32(b, 540),
            subnqn: get_str(b, 768, NQN_FIELD_LEN),
            ioccsz: get_u32(b, 1792),
            iorcsz: get_u32(b, 1796),
            icdoff: get_u16(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
            ofcs: get_u16(b, 1804),
        })
    }
}

/// An LBA Format (NVM Command Set 1.0 Figure 98): MS bits 15:0, LBADS 23:16, RP 25:24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbaFormat {
    /// Metadata Size in bytes per block.
    pub ms: u16,
    /// LBA Data Size as a power of two (9 = 512 bytes, 12 = 4096 bytes).
    pub lbads: u8,
    /// Relative Performance (0 best .. 3 degraded).
    pub rp: u8,
}

impl LbaFormat {
    /// A format of `block_size` bytes (a power of two) without metadata.
    pub const fn with_block_size(block_size: u32) -> LbaFormat {
        LbaFormat {
            ms: 0,
            lbads: block_size.trailing_zeros() as u8,
            rp: 0,
        }
    }

    /// The dword value.
    pub const fn to_u32(&self) -> u32 {
        self.ms as u32 | (self.lbads as u32) << 16 | ((self.rp & 3) as u32) << 24
    }

    /// Decodes a dword.
    pub const fn from_u32(v: u32) -> LbaFormat {
        LbaFormat {
            ms: v as u16,
            lbads: (v >> 16) as u8,
            rp: ((v >> 24) & 3) as u8,
        }
    }
}

/// Namespace Features (NSFEAT, byte 24).
pub mod nsfeat {
    /// Bit 0: thin provisioning (NCAP may be less than NSZE).
    pub const THIN_PROVISIONING: u8 = 1 << 0;
    /// Bit 1: NAWUN/NAWUPF/NACWU are defined.
    pub const NAMESPACE_ATOMICS: u8 = 1 << 1;
    /// Bit 2: Deallocated or Unwritten Logical Block error supported.
    pub const DEALLOCATED_ERROR: u8 = 1 << 2;
    /// Bit 4: NPWG, NPWA, NPDG, NPDA and NOWS are defined.
    pub const OPTIMAL_PERFORMANCE: u8 = 1 << 4;
}

/// Deallocate Logical Block Features (DLFEAT, byte 33).
pub mod dlfeat {
    /// Bits 2:0 = 001b: deallocated blocks read as zeroes.
    pub const READ_ZEROES: u8 = 0b001;
    /// Bit 3: Write Zeroes supports the Deallocate bit.
    pub const WRITE_ZEROES_DEALLOCATE: u8 = 1 << 3;
}

/// Identify Namespace data structure for the NVM command set (CNS 00h; NVM Command Set 1.0
/// Figure 97).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IdentifyNamespace {
    /// Namespace Size in logical blocks (bytes 7:0).
    pub nsze: u64,
    /// Namespace Capacity in logical blocks (bytes 15:8).
    pub ncap: u64,
    /// Namespace Utilization in logical blocks (bytes 23:16).
    pub nuse: u64,
    /// Namespace Features ([`nsfeat`], byte 24).
    pub nsfeat: u8,
    /// Formatted LBA Size (byte 26): format index in bits 3:0 (and 6:5 for index ≥ 16).
    pub flbas: u8,
    /// Metadata Capabilities (byte 27).
    pub mc: u8,
    /// End-to-end Data Protection Capabilities (byte 28).
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings (byte 29).
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities (byte 30; bit 0 shared).
    pub nmic: u8,
    /// Reservation Capabilities (byte 31).
    pub rescap: u8,
    /// Deallocate Logical Block Features ([`dlfeat`], byte 33).
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal, 0's based (bytes 35:34).
    pub nawun: u16,
    /// Namespace Atomic Write Unit Power Fail, 0's based (bytes 37:36).
    pub nawupf: u16,
    /// Namespace Optimal I/O Boundary in blocks (bytes 47:46).
    pub noiob: u16,
    /// NVM Capacity in bytes (bytes 63:48).
    pub nvmcap: u128,
    /// Namespace Preferred Write Granularity, 0's based blocks (bytes 65:64).
    pub npwg: u16,
    /// Namespace Preferred Write Alignment, 0's based (bytes 67:66).
    pub npwa: u16,
    /// Namespace Preferred Deallocate Granularity, 0's based (bytes 69:68).
    pub npdg: u16,
    /// Namespace Preferred Deallocate Alignment, 0's based (bytes 71:70).
    pub npda: u16,
    /// Namespace Optimal Write Size, 0's based (bytes 73:72).
    pub nows: u16,
    /// ANA Group Identifier (bytes 95:92).
    pub anagrpid: u32,
    /// Namespace Attributes (byte 99; bit 0 write protected).
    pub nsattr: u8,
    /// Namespace Globally Unique Identifier (bytes 119:104).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (bytes 127:120).
    pub eui64: [u8; 8],
    /// LBA Formats (LBAF0 at bytes 131:128, up to 64); NLBAF (byte 25) is `len - 1`.
    pub lbaf: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    /// Most LBA formats a namespace can list.
    pub const MAX_LBAF: usize = 64;

    /// Writes the structure into `out[..4096]` (reserved bytes zeroed).
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..IDENTIFY_LEN];
        b.fill(0);
        put_u64(b, 0, self.nsze);
        put_u64(b, 8, self.ncap);
        put_u64(b, 16, self.nuse);
        b[24] = self.nsfeat;
        let n = self.lbaf.len().min(Self::MAX_LBAF);
        b[25] = n.saturating_sub(1) as u8;
        b[26] = self.flbas;
        b[27] = self.mc;
        b[28] = self.dpc;
        b[29] = self.dps;
        b[30] = self.nmic;
        b[31] = self.rescap;
        b[33] = self.dlfeat;
        put_u16(b, 34, self.nawun);
        put_u16(b, 36, self.nawupf);
        put_u16(b, 46, self.noiob);
        put_u128(b, 48, self.nvmcap);
        put_u16(b, 64, self.npwg);
        put_u16(b, 66, self.npwa);
        put_u16(b, 68, self.npdg);
        put_u16(b, 70, self.npda);
        put_u16(b, 72, self.nows);
        put_u32(b, 92, self.anagrpid);
        b[99] = self.nsattr;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        for (i, f) in self.lbaf.iter().take(n).enumerate() {
            put_u32(b, 128 + 4 * i, f.to_u32());
        }
    }

    /// The encoded structure.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; IDENTIFY_LEN];
        self.write_to(&mut v);
        v
    }

    /// Decodes a structure; `None` if `b` is shorter than 4096 bytes.
    pub fn parse(b: &[u8]) -> Option<IdentifyNamespace> {
        let b = b.get(..IDENTIFY_LEN)?;
        let n = (usize::from(b[25]) + 1).min(Self::MAX_LBAF);
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&b[120..128]);
        Some(IdentifyNamespace {
            nsze: get_u64(b, 0),
            ncap: get_u64(b, 8),
            nuse: get_u64(b, 16),
            nsfeat: b[24],
            flbas: b[26],
            mc: b[27],
            dpc: b[28],
            dps: b[29],
            nmic: b[30],
            rescap: b[31],
            dlfeat: b[33],
            nawun: get_u16(b, 34),
            nawupf: get_u16(b, 36),
            noiob: get_u16(b, 46),
            nvmcap: get_u128(b, 48),
            npwg: get_u16(b, 64),
            npwa: get_u16(b, 66),
            npdg: get_u16(b, 68),
            npda: get_u16(b, 70),
            nows: get_u16(b, 72),
            anagrpid: get_u32(b, 92),
            nsattr: b[99],
            nguid,
            eui64,
            lbaf: (0..n)
                .map(|i| LbaFormat::from_u32(get_u32(b, 128 + 4 * i)))
                .collect(),
        })
    }

    /// The LBA format in use (FLBAS index), if listed.
    pub fn current_lbaf(&self) -> Option<LbaFormat> {
        let idx = usize::from(self.flbas & 0xf) | usize::from((self.flbas >> 5) & 3) << 4;
        self.lbaf.get(idx).copied()
    }
}

/// One Namespace Identification Descriptor (CNS 03h; NVMe Base 2.0 Figure 278): NIDT byte 0,
/// NIDL byte 1, bytes 3:2 reserved, NID from byte 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsIdDescriptor {
    /// NIDT 1h: IEEE Extended Unique Identifier, NIDL 8.
    Eui64([u8; 8]),
    /// NIDT 2h: Namespace Globally Unique Identifier, NIDL 16.
    Nguid([u8; 16]),
    /// NIDT 3h: Namespace UUID, NIDL 16.
    Uuid([u8; 16]),
    /// NIDT 4h: Command Set Identifier, NIDL 1.
    Csi(u8),
}

impl NsIdDescriptor {
    /// Namespace Identifier Type.
    pub const fn nidt(&self) -> u8 {
        match self {
            NsIdDescriptor::Eui64(_) => 1,
            NsIdDescriptor::Nguid(_) => 2,
            NsIdDescriptor::Uuid(_) => 3,
            NsIdDescriptor::Csi(_) => 4,
        }
    }

    /// The identifier bytes.
    pub fn nid(&self) -> &[u8] {
        match self {
            NsIdDescriptor::Eui64(v) => v,
            NsIdDescriptor::Nguid(v) | NsIdDescriptor::Uuid(v) => v,
            NsIdDescriptor::Csi(v) => std::slice::from_ref(v),
        }
    }

    /// Writes the list of descriptors into `out[..4096]`, zero-terminated (a zero NIDT ends
    /// the list). Descriptors that do not fit are left out.
    pub fn write_list(list: &[NsIdDescriptor], out: &mut [u8]) {
        let b = &mut out[..IDENTIFY_LEN];
        b.fill(0);
        let mut off = 0;
        for d in list {
            let nid = d.nid();
            let len = 4 + nid.len();
            // Keep room for the terminating zero header.
            if off + len + 4 > IDENTIFY_LEN {
                break;
            }
            b[off] = d.nidt();
            b[off + 1] = nid.len() as u8;
            b[off + 4..off + len].copy_from_slice(nid);
            off += len;
        }
    }

    /// Parses a descriptor list, stopping at a zero NIDT or the end of `b`. Descriptors of
    /// unknown type or wrong length are skipped.
    pub fn parse_list(b: &[u8]) -> Vec<NsIdDescriptor> {
        let mut out = Vec::new();
        let mut off = 0;
        while off + 4 <= b.len() && b[off] != 0 {
            let (nidt, nidl) = (b[off], usize::from(b[off + 1]));
            let Some(nid) = b.get(off + 4..off + 4 + nidl) else {
                break;
            };
            match (nidt, nidl) {
                (1, 8) => out.push(NsIdDescriptor::Eui64(nid.try_into().expect("8 bytes"))),
                (2, 16) => out.push(NsIdDescriptor::Nguid(nid.try_into().expect("16 bytes"))),
                (3, 16) => out.push(NsIdDescriptor::Uuid(nid.try_into().expect("16 bytes"))),
                (4, 1) => out.push(NsIdDescriptor::Csi(nid[0])),
                _ => {}
            }
            off += 4 + nidl;
        }
        out
    }
}

/// Writes the Active Namespace ID list (CNS 02h; NVMe Base 2.0 §5.17.2.2) into
/// `out[..4096]`: the NSIDs of `nsids` greater than `after`, ascending, at most 1024, the rest
/// zero. `nsids` may be in any order.
pub fn write_active_ns_list(nsids: &[u32], after: u32, out: &mut [u8]) {
    let b = &mut out[..IDENTIFY_LEN];
    b.fill(0);
    let mut ids: Vec<u32> = nsids.iter().copied().filter(|&n| n > after).collect();
    ids.sort_unstable();
    ids.dedup();
    for (i, id) in ids.iter().take(IDENTIFY_LEN / 4).enumerate() {
        put_u32(b, 4 * i, *id);
    }
}

/// Parses a namespace list (Active Namespace ID list, Changed Namespace List): NSIDs up to the
/// first zero.
pub fn parse_ns_list(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> IdentifyController {
        IdentifyController {
            vid: 0x1b36,
            ssvid: 0x1af4,
            sn: "FB0123456789".into(),
            mn: "ferroblk".into(),
            fr: "0.1.0".into(),
            rab: 6,
            ieee: [0x11, 0x22, 0x33],
            cmic: cmic::MULTI_CONTROLLER,
            mdts: 5,
            cntlid: 0x0102,
            ver: Version::V1_4,
            oaes: 1 << 8,
            cntrltype: cntrltype::IO,
            acl: 3,
            aerl: 3,
            frmw: 0x02,
            lpa: lpa::EXTENDED_DATA,
            elpe: 127,
            npss: 1,
            kas: 10,
            anatt: 10,
            anacap: anacap::OPTIMIZED | anacap::INACCESSIBLE,
            anagrpmax: 32,
            nanagrpid: 31,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 128,
            nn: 32,
            oncs: oncs::DATASET_MANAGEMENT | oncs::WRITE_ZEROES,
            fuses: 1,
            fna: 0x04,
            vwc: vwc::PRESENT | vwc::FLUSH_BROADCAST_SUPPORTED,
            awun: 7,
            awupf: 3,
            sgls: sgls::SUPPORTED | sgls::OFFSET | sgls::TRANSPORT_DATA_BLOCK,
            subnqn: "nqn.2024-01.io.ferroblk:vol0".into(),
            ioccsz: 260,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
            ofcs: 1,
            ..IdentifyController::default()
        }
    }

    #[test]
    fn identify_controller_fields_at_spec_offsets() {
        let b = controller().to_vec();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..2], &[0x36, 0x1b], "VID");
        assert_eq!(&b[2..4], &[0xf4, 0x1a], "SSVID");
        assert_eq!(&b[4..24], b"FB0123456789        ", "SN, space padded");
        assert_eq!(&b[24..32], b"ferroblk");
        assert!(b[32..64].iter().all(|&c| c == b' '), "MN padding");
        assert_eq!(&b[64..72], b"0.1.0   ", "FR");
        assert_eq!(b[72], 6, "RAB");
        assert_eq!(&b[73..76], &[0x11, 0x22, 0x33], "IEEE");
        assert_eq!(b[76], 2, "CMIC");
        assert_eq!(b[77], 5, "MDTS");
        assert_eq!(&b[78..80], &[0x02, 0x01], "CNTLID");
        assert_eq!(&b[80..84], &[0, 4, 1, 0], "VER 1.4");
        assert_eq!(&b[92..96], &[0, 1, 0, 0], "OAES");
        assert_eq!(b[111], 1, "CNTRLTYPE");
        assert_eq!((b[258], b[259]), (3, 3), "ACL, AERL");
        assert_eq!(b[260], 2, "FRMW");
        assert_eq!(b[261], 4, "LPA");
        assert_eq!(b[262], 127, "ELPE");
        assert_eq!(b[263], 1, "NPSS");
        assert_eq!(&b[320..322], &[10, 0], "KAS");
        assert_eq!((b[342], b[343]), (10, 0x05), "ANATT, ANACAP");
        assert_eq!(&b[344..348], &32u32.to_le_bytes(), "ANAGRPMAX");
        assert_eq!(&b[348..352], &31u32.to_le_bytes(), "NANAGRPID");
        assert_eq!((b[512], b[513]), (0x66, 0x44), "SQES, CQES");
        assert_eq!(&b[514..516], &[128, 0], "MAXCMD");
        assert_eq!(&b[516..520], &[32, 0, 0, 0], "NN");
        assert_eq!(&b[520..522], &[0x0c, 0], "ONCS");
        assert_eq!(&b[522..524], &[1, 0], "FUSES");
        assert_eq!(b[524], 4, "FNA");
        assert_eq!(b[525], 7, "VWC");
        assert_eq!(&b[526..528], &[7, 0], "AWUN");
        assert_eq!(&b[528..530], &[3, 0], "AWUPF");
        assert_eq!(&b[536..540], &[1, 0, 0x30, 0], "SGLS");
        assert_eq!(&b[768..772], b"nqn.", "SUBNQN");
        assert_eq!(b[768 + 28], 0);
        assert_eq!(&b[1792..1796], &260u32.to_le_bytes(), "IOCCSZ");
        assert_eq!(&b[1796..1800], &1u32.to_le_bytes(), "IORCSZ");
        assert_eq!(&b[1800..1802], &[0, 0], "ICDOFF");
        assert_eq!((b[1802], b[1803]), (0, 1), "FCATT, MSDBD");
        assert_eq!(&b[1804..1806], &[1, 0], "OFCS");
        assert!(b[2048..].iter().all(|&c| c == 0));
        assert_eq!(IdentifyController::parse(&b).unwrap(), controller());
        assert!(IdentifyController::parse(&b[..4095]).is_none());
    }

    #[test]
    fn identify_namespace_fields_at_spec_offsets() {
        let ns = IdentifyNamespace {
            nsze: 0x10_0000,
            ncap: 0x10_0000,
            nuse: 0x8_0000,
            nsfeat: nsfeat::THIN_PROVISIONING,
            flbas: 1,
            nmic: 1,
            dlfeat: dlfeat::READ_ZEROES | dlfeat::WRITE_ZEROES_DEALLOCATE,
            nvmcap: 1 << 33,
            anagrpid: 3,
            nguid: [0x5a; 16],
            eui64: [0xe0; 8],
            lbaf: vec![
                LbaFormat::with_block_size(512),
                LbaFormat::with_block_size(4096),
            ],
            ..IdentifyNamespace::default()
        };
        let b = ns.to_vec();
        assert_eq!(&b[0..8], &0x10_0000u64.to_le_bytes(), "NSZE");
        assert_eq!(&b[8..16], &0x10_0000u64.to_le_bytes(), "NCAP");
        assert_eq!(&b[16..24], &0x8_0000u64.to_le_bytes(), "NUSE");
        assert_eq!(b[24], 1, "NSFEAT");
        assert_eq!(b[25], 1, "NLBAF is 0's based");
        assert_eq!(b[26], 1, "FLBAS");
        assert_eq!(b[30], 1, "NMIC");
        assert_eq!(b[33], 9, "DLFEAT");
        assert_eq!(b[48 + 4], 2, "NVMCAP 2^33 bytes");
        assert_eq!(&b[92..96], &[3, 0, 0, 0], "ANAGRPID");
        assert_eq!(&b[104..120], &[0x5a; 16], "NGUID");
        assert_eq!(&b[120..128], &[0xe0; 8], "EUI64");
        assert_eq!(&b[128..132], &[0, 0, 9, 0], "LBAF0 LBADS 9");
        assert_eq!(&b[132..136], &[0, 0, 12, 0], "LBAF1 LBADS 12");
        let back = IdentifyNamespace::parse(&b).unwrap();
        assert_eq!(back, ns);
        assert_eq!(back.current_lbaf().unwrap().lbads, 12);
    }

    #[test]
    fn namespace_id_descriptor_list() {
        let list = [
            NsIdDescriptor::Eui64([1; 8]),
            NsIdDescriptor::Nguid([2; 16]),
            NsIdDescriptor::Uuid([3; 16]),
            NsIdDescriptor::Csi(0),
        ];
        let mut b = vec![0xffu8; 4096];
        NsIdDescriptor::write_list(&list, &mut b);
        assert_eq!(&b[0..4], &[1, 8, 0, 0], "NIDT 1 NIDL 8");
        assert_eq!(&b[4..12], &[1; 8]);
        assert_eq!(&b[12..16], &[2, 16, 0, 0], "NIDT 2 NIDL 16");
        assert_eq!(&b[32..36], &[3, 16, 0, 0], "NIDT 3 NIDL 16");
        assert_eq!(&b[36..52], &[3; 16]);
        assert_eq!(&b[52..56], &[4, 1, 0, 0], "NIDT 4 NIDL 1");
        assert_eq!(b[56], 0);
        assert!(b[57..].iter().all(|&c| c == 0), "terminated and zeroed");
        assert_eq!(NsIdDescriptor::parse_list(&b), list);
    }

    #[test]
    fn active_namespace_list_is_ascending_above_nsid() {
        let mut b = vec![0xffu8; 4096];
        write_active_ns_list(&[7, 2, 5, 1, 5], 1, &mut b);
        assert_eq!(&b[..16], &[2, 0, 0, 0, 5, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_ns_list(&b), vec![2, 5, 7]);
        let many: Vec<u32> = (1..=2000).collect();
        write_active_ns_list(&many, 0, &mut b);
        assert_eq!(parse_ns_list(&b).len(), 1024);
        assert_eq!(&b[4092..4096], &1024u32.to_le_bytes());
    }
}
