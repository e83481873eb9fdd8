//! Log pages (NVMe Base 2.0 §5.16.1; NVMe-oF 1.1 §5.3 for the Discovery log page).
//!
//! Encoders write a whole page; Get Log Page returns the requested window of it (offset and
//! length from [`super::command::GetLogPage`]), which the caller slices out.

use super::fabrics::NQN_FIELD_LEN;
use super::status::Status;
use super::wire::{
    get_str, get_u16, get_u32, get_u64, put_ascii, put_nqn, put_u16, put_u32, put_u64, put_u128,
};

/// Log Page Identifiers (NVMe Base 2.0 Figure 202).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LogPageId {
    /// 01h Error Information.
    ErrorInformation = 0x01,
    /// 02h SMART / Health Information.
    SmartHealth = 0x02,
    /// 03h Firmware Slot Information.
    FirmwareSlot = 0x03,
    /// 04h Changed Namespace List.
    ChangedNamespaceList = 0x04,
    /// 05h Commands Supported and Effects.
    CommandsEffects = 0x05,
    /// 0Ch Asymmetric Namespace Access.
    AsymmetricNamespaceAccess = 0x0c,
    /// 70h Discovery (discovery controllers only).
    Discovery = 0x70,
}

impl LogPageId {
    /// The log page of a raw LID, or `None` for one this crate does not name.
    pub const fn from_u8(v: u8) -> Option<LogPageId> {
        Some(match v {
            0x01 => LogPageId::ErrorInformation,
            0x02 => LogPageId::SmartHealth,
            0x03 => LogPageId::FirmwareSlot,
            0x04 => LogPageId::ChangedNamespaceList,
            0x05 => LogPageId::CommandsEffects,
            0x0c => LogPageId::AsymmetricNamespaceAccess,
            0x70 => LogPageId::Discovery,
            _ => return None,
        })
    }
}

/// One Error Information log entry (NVMe Base 2.0 Figure 205), 64 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ErrorLogEntry {
    /// Error Count: unique, incrementing identifier of the error (bytes 7:0; 0 = empty entry).
    pub error_count: u64,
    /// Submission Queue ID (bytes 9:8).
    pub sqid: u16,
    /// Command ID (bytes 11:10).
    pub cid: u16,
    /// Status of the completion (bytes 13:12, phase tag bit 0 as completed).
    pub status: Status,
    /// Parameter Error Location (bytes 15:14): byte in bits 7:0, bit in 10:8; FFFFh if none.
    pub parameter_error_location: u16,
    /// First LBA that experienced the error (bytes 23:16).
    pub lba: u64,
    /// Namespace (bytes 27:24).
    pub nsid: u32,
    /// Transport Type (byte 29; [`trtype`]).
    pub trtype: u8,
    /// Command Specific Information (bytes 39:32).
    pub command_specific: u64,
}

impl ErrorLogEntry {
    /// Entry size in bytes.
    pub const LEN: usize = 64;

    /// Writes the entry at `out[..64]`.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..Self::LEN];
        b.fill(0);
        put_u64(b, 0, self.error_count);
        put_u16(b, 8, self.sqid);
        put_u16(b, 10, self.cid);
        put_u16(b, 12, self.status.to_cqe_status(false));
        put_u16(b, 14, self.parameter_error_location);
        put_u64(b, 16, self.lba);
        put_u32(b, 24, self.nsid);
        b[29] = self.trtype;
        put_u64(b, 32, self.command_specific);
    }
}

/// SMART / Health Information log page (NVMe Base 2.0 Figure 207), 512 bytes. Data units are
/// thousands of 512-byte units, rounded up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SmartLog {
    /// Critical Warning bits (byte 0).
    pub critical_warning: u8,
    /// Composite Temperature in kelvins (bytes 2:1).
    pub composite_temperature: u16,
    /// Available Spare, percent (byte 3).
    pub available_spare: u8,
    /// Available Spare Threshold, percent (byte 4).
    pub available_spare_threshold: u8,
    /// Percentage Used (byte 5).
    pub percentage_used: u8,
    /// Data Units Read (bytes 47:32).
    pub data_units_read: u128,
    /// Data Units Written (bytes 63:48).
    pub data_units_written: u128,
    /// Host Read Commands (bytes 79:64).
    pub host_read_commands: u128,
    /// Host Write Commands (bytes 95:80).
    pub host_write_commands: u128,
    /// Controller Busy Time in minutes (bytes 111:96).
    pub controller_busy_time: u128,
    /// Power Cycles (bytes 127:112).
    pub power_cycles: u128,
    /// Power On Hours (bytes 143:128).
    pub power_on_hours: u128,
    /// Unsafe Shutdowns (bytes 159:144).
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors (bytes 175:160).
    pub media_errors: u128,
    /// Number of Error Information Log Entries (bytes 191:176).
    pub num_error_log_entries: u128,
}

impl SmartLog {
    /// Page size in bytes.
    pub const LEN: usize = 512;

    /// Data units (thousands of 512-byte units, rounded up) for `bytes` transferred.
    pub const fn data_units(bytes: u128) -> u128 {
        bytes.div_ceil(512 * 1000)
    }

    /// Writes the page at `out[..512]`.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..Self::LEN];
        b.fill(0);
        b[0] = self.critical_warning;
        put_u16(b, 1, self.composite_temperature);
        b[3] = self.available_spare;
        b[4] = self.available_spare_threshold;
        b[5] = self.percentage_used;
        put_u128(b, 32, self.data_units_read);
        put_u128(b, 48, self.data_units_written);
        put_u128(b, 64, self.host_read_commands);
        put_u128(b, 80, self.host_write_commands);
        put_u128(b, 96, self.controller_busy_time);
        put_u128(b, 112, self.power_cycles);
        put_u128(b, 128, self.power_on_hours);
        put_u128(b, 144, self.unsafe_shutdowns);
        put_u128(b, 160, self.media_errors);
        put_u128(b, 176, self.num_error_log_entries);
    }
}

/// Writes the Changed Namespace List log page (NVMe Base 2.0 §5.16.1.5) into `out[..4096]`:
/// up to 1024 NSIDs; if more changed, the first entry is FFFFFFFFh and the rest zero.
pub fn write_changed_ns_list(nsids: &[u32], out: &mut [u8]) {
    let b = &mut out[..4096];
    b.fill(0);
    if nsids.len() > 1024 {
        put_u32(b, 0, 0xffff_ffff);
        return;
    }
    for (i, n) in nsids.iter().enumerate() {
        put_u32(b, 4 * i, *n);
    }
}

/// Transport Type (TRTYPE; NVMe-oF 1.1 Figure 38).
pub mod trtype {
    /// 1h RDMA.
    pub const RDMA: u8 = 1;
    /// 2h Fibre Channel.
    pub const FC: u8 = 2;
    /// 3h TCP.
    pub const TCP: u8 = 3;
    /// FEh Intra-host (loopback).
    pub const INTRA_HOST: u8 = 0xfe;
}

/// RDMA Transport Specific Address Subtype (TSAS; NVMe-oF 1.1 Figure 40): byte 0 RDMA_QPTYPE,
/// byte 1 RDMA_PRTYPE, byte 2 RDMA_CMS, bytes 9:8 RDMA_PKEY.
pub mod rdma_tsas {
    /// RDMA_QPTYPE 1h: Reliable Connected.
    pub const QPTYPE_RELIABLE_CONNECTED: u8 = 1;
    /// RDMA_PRTYPE 1h: no provider specified.
    pub const PRTYPE_NOT_SPECIFIED: u8 = 1;
    /// RDMA_CMS 1h: RDMA_IP_CM (the RDMA connection manager over IP addresses).
    pub const CMS_RDMA_CM: u8 = 1;
}

/// Address Family (ADRFAM; NVMe-oF 1.1 Figure 38).
pub mod adrfam {
    /// 1h IPv4.
    pub const IPV4: u8 = 1;
    /// 2h IPv6.
    pub const IPV6: u8 = 2;
    /// 3h InfiniBand.
    pub const IB: u8 = 3;
    /// 4h Fibre Channel.
    pub const FC: u8 = 4;
    /// FEh Intra-host.
    pub const INTRA_HOST: u8 = 0xfe;
}

/// Subsystem Type (SUBTYPE; NVMe-oF 1.1 Figure 38).
pub mod subtype {
    /// 1h Referral to another discovery service.
    pub const DISCOVERY_REFERRAL: u8 = 1;
    /// 2h NVM subsystem.
    pub const NVME: u8 = 2;
    /// 3h The current discovery subsystem.
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// Transport Requirements (TREQ; NVMe-oF 1.1 Figure 38).
pub mod treq {
    /// Bits 1:0 = 00b: secure channel not specified.
    pub const SECURE_CHANNEL_NOT_SPECIFIED: u8 = 0;
    /// Bits 1:0 = 01b: secure channel required.
    pub const SECURE_CHANNEL_REQUIRED: u8 = 1;
    /// Bits 1:0 = 10b: secure channel not required.
    pub const SECURE_CHANNEL_NOT_REQUIRED: u8 = 2;
    /// Bit 2: SQ flow control may be disabled.
    pub const DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;
}

/// NVMe/TCP Transport Specific Address Subtype (TSAS byte 0, SECTYPE; NVMe/TCP 1.0 §6).
pub mod tcp_sectype {
    /// 0h No security.
    pub const NONE: u8 = 0;
    /// 1h TLS 1.2.
    pub const TLS_1_2: u8 = 1;
    /// 2h TLS 1.3.
    pub const TLS_1_3: u8 = 2;
}

/// The controller ID a discovery entry gives for the dynamic controller model.
pub const CNTLID_DYNAMIC: u16 = 0xffff;
/// The controller ID for "any controller" in the static controller model.
pub const CNTLID_STATIC_ANY: u16 = 0xfffe;

/// Discovery Log Page header (NVMe-oF 1.1 Figure 37), 1024 bytes, followed by NUMREC entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DiscoveryLogHeader {
    /// Generation Counter: changes whenever the log changes (bytes 7:0).
    pub genctr: u64,
    /// Number of Records (bytes 15:8).
    pub numrec: u64,
    /// Record Format (bytes 17:16; 0).
    pub recfmt: u16,
}

impl DiscoveryLogHeader {
    /// Header size in bytes.
    pub const LEN: usize = 1024;

    /// Writes the header at `out[..1024]`.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..Self::LEN];
        b.fill(0);
        put_u64(b, 0, self.genctr);
        put_u64(b, 8, self.numrec);
        put_u16(b, 16, self.recfmt);
    }

    /// Decodes a header; `None` if `b` is shorter than 1024 bytes.
    pub fn parse(b: &[u8]) -> Option<DiscoveryLogHeader> {
        let b = b.get(..Self::LEN)?;
        Some(DiscoveryLogHeader {
            genctr: get_u64(b, 0),
            numrec: get_u64(b, 8),
            recfmt: get_u16(b, 16),
        })
    }
}

/// One Discovery Log Page entry (NVMe-oF 1.1 Figure 38), 1024 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryLogEntry {
    /// Transport Type ([`trtype`], byte 0).
    pub trtype: u8,
    /// Address Family ([`adrfam`], byte 1).
    pub adrfam: u8,
    /// Subsystem Type ([`subtype`], byte 2).
    pub subtype: u8,
    /// Transport Requirements ([`treq`], byte 3).
    pub treq: u8,
    /// Port ID (bytes 5:4).
    pub portid: u16,
    /// Controller ID (bytes 7:6; [`CNTLID_DYNAMIC`]).
    pub cntlid: u16,
    /// Admin Max SQ Size (bytes 9:8; at least 32).
    pub asqsz: u16,
    /// Entry Flags (bytes 11:10).
    pub eflags: u16,
    /// Transport Service Identifier: for TCP the port number as ASCII (bytes 63:32).
    pub trsvcid: String,
    /// NVM Subsystem Qualified Name (bytes 511:256).
    pub subnqn: String,
    /// Transport Address: for TCP the IP address as ASCII (bytes 767:512).
    pub traddr: String,
    /// Transport Specific Address Subtype (bytes 1023:768); for TCP byte 0 is
    /// [`tcp_sectype`].
    pub tsas: [u8; 256],
}

impl Default for DiscoveryLogEntry {
    fn default() -> DiscoveryLogEntry {
        DiscoveryLogEntry {
            trtype: 0,
            adrfam: 0,
            subtype: 0,
            treq: 0,
            portid: 0,
            cntlid: 0,
            asqsz: 0,
            eflags: 0,
            trsvcid: String::new(),
            subnqn: String::new(),
            traddr: String::new(),
            tsas: [0; 256],
        }
    }
}

impl DiscoveryLogEntry {
    /// Entry size in bytes.
    pub const LEN: usize = 1024;

    /// Writes the entry at `out[..1024]`. TRSVCID and TRADDR are ASCII strings padded with
    /// spaces (NVMe Base §1.5 convention); SUBNQN is NUL-padded.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..Self::LEN];
        b.fill(0);
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        put_u16(b, 4, self.portid);
        put_u16(b, 6, self.cntlid);
        put_u16(b, 8, self.asqsz);
        put_u16(b, 10, self.eflags);
        put_ascii(b, 32, 32, &self.trsvcid);
        put_nqn(b, 256, NQN_FIELD_LEN, &self.subnqn);
        put_ascii(b, 512, 256, &self.traddr);
        b[768..1024].copy_from_slice(&self.tsas);
    }

    /// Decodes an entry; `None` if `b` is shorter than 1024 bytes.
    pub fn parse(b: &[u8]) -> Option<DiscoveryLogEntry> {
        let b = b.get(..Self::LEN)?;
        let mut tsas = [0u8; 256];
        tsas.copy_from_slice(&b[768..1024]);
        Some(DiscoveryLogEntry {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: get_u16(b, 4),
            cntlid: get_u16(b, 6),
            asqsz: get_u16(b, 8),
            eflags: get_u16(b, 10),
            trsvcid: get_str(b, 32, 32),
            subnqn: get_str(b, 256, NQN_FIELD_LEN),
            traddr: get_str(b, 512, 256),
            tsas,
        })
    }
}

/// Encodes a whole discovery log page: header then entries.
pub fn discovery_log_page(genctr: u64, entries: &[DiscoveryLogEntry]) -> Vec<u8> {
    let mut v = vec![0u8; DiscoveryLogHeader::LEN + entries.len() * DiscoveryLogEntry::LEN];
    DiscoveryLogHeader {
        genctr,
        numrec: entries.len() as u64,
        recfmt: 0,
    }
    .write_to(&mut v);
    for (i, e) in entries.iter().enumerate() {
        let off = DiscoveryLogHeader::LEN + i * DiscoveryLogEntry::LEN;
        e.write_to(&mut v[off..]);
    }
    v
}

/// Bytes of the Asymmetric Namespace Access log page header (NVMe Base 2.0 Figure 206).
pub const ANA_LOG_HEADER_LEN: usize = 16;
/// Bytes of an ANA Group Descriptor before its NSID list (Figure 207).
pub const ANA_GROUP_DESCRIPTOR_LEN: usize = 32;
/// Offset of ANAGRPID in Identify Namespace (bytes 95:92).
pub const IDENTIFY_NS_ANAGRPID: usize = 92;

/// ANA states (NVMe Base 2.0 §8.1.3, Figure 207 byte 16 bits 3:0).
pub mod ana_state {
    /// 01h ANA Optimized.
    pub const OPTIMIZED: u8 = 0x01;
    /// 02h ANA Non-Optimized.
    pub const NON_OPTIMIZED: u8 = 0x02;
    /// 03h ANA Inaccessible.
    pub const INACCESSIBLE: u8 = 0x03;
    /// 04h ANA Persistent Loss.
    pub const PERSISTENT_LOSS: u8 = 0x04;
    /// 0Fh ANA Change.
    pub const CHANGE: u8 = 0x0f;
}

/// Log Specific Parameter bit 0 of the ANA log page: Return Groups Only (RGO; NVMe Base 2.0
/// §5.16.1.12): the group descriptors without their NSID lists.
pub const ANA_LSP_RGO: u8 = 1 << 0;

/// One ANA Group Descriptor (NVMe Base 2.0 Figure 207) as the controller reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroupDescriptor {
    /// ANA Group ID (bytes 3:0; never 0).
    pub anagrpid: u32,
    /// Change Count of this group (bytes 15:8).
    pub chgcnt: u64,
    /// ANA State ([`ana_state`], byte 16 bits 3:0).
    pub state: u8,
    /// NSIDs of the group's attached namespaces, ascending (left out with RGO).
    pub nsids: Vec<u32>,
}

/// Encodes the Asymmetric Namespace Access log page (LID 0Ch; NVMe Base 2.0 §5.16.1.12,
/// Figures 206 and 207): the header (Change Count bytes 7:0, Number of ANA Group Descriptors
/// bytes 9:8) then each group's descriptor followed, unless `rgo`, by its NSID list.
pub fn ana_log_page(chgcnt: u64, groups: &[AnaGroupDescriptor], rgo: bool) -> Vec<u8> {
    let nsids = |g: &AnaGroupDescriptor| if rgo { 0 } else { g.nsids.len() };
    let len = ANA_LOG_HEADER_LEN
        + groups
            .iter()
            .map(|g| ANA_GROUP_DESCRIPTOR_LEN + 4 * nsids(g))
            .sum::<usize>();
    let mut v = vec![0u8; len];
    put_u64(&mut v, 0, chgcnt);
    put_u16(&mut v, 8, groups.len() as u16);
    let mut off = ANA_LOG_HEADER_LEN;
    for g in groups {
        let n = nsids(g);
        put_u32(&mut v, off, g.anagrpid);
        put_u32(&mut v, off + 4, n as u32);
        put_u64(&mut v, off + 8, g.chgcnt);
        v[off + 16] = g.state & 0x0f;
        off += ANA_GROUP_DESCRIPTOR_LEN;
        for nsid in &g.nsids[..n] {
            put_u32(&mut v, off, *nsid);
            off += 4;
        }
    }
    v
}

/// The ANA state (Figure 207, byte 16 bits 3:0) that the ANA log page `page` gives namespace
/// `nsid`, found in the NSID list of its group (the page as read without RGO). `None` if the
/// page does not list it or is cut short.
pub fn ana_state_of(page: &[u8], nsid: u32) -> Option<u8> {
    if page.len() < ANA_LOG_HEADER_LEN {
        return None;
    }
    let ngrps = get_u16(page, 8);
    let mut off = ANA_LOG_HEADER_LEN;
    for _ in 0..ngrps {
        let desc = page.get(off..off + ANA_GROUP_DESCRIPTOR_LEN)?;
        let nnsid = get_u32(desc, 4) as usize;
        let state = desc[16] & 0x0f;
        let list = off + ANA_GROUP_DESCRIPTOR_LEN;
        let ids = page.get(list..list.checked_add(nnsid.checked_mul(4)?)?)?;
        if ids.chunks_exact(4).any(|b| get_u32(b, 0) == nsid) {
            return Some(state);
        }
        off = list + nnsid * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ana_log_page_layout_with_and_without_rgo() {
        let groups = [
            AnaGroupDescriptor {
                anagrpid: 1,
                chgcnt: 5,
                state: ana_state::OPTIMIZED,
                nsids: vec![1, 3],
            },
            AnaGroupDescriptor {
                anagrpid: 7,
                chgcnt: 6,
                state: ana_state::INACCESSIBLE,
                nsids: vec![2],
            },
        ];
        let p = ana_log_page(9, &groups, false);
        assert_eq!(p.len(), 16 + 32 + 8 + 32 + 4);
        assert_eq!(&p[0..8], &9u64.to_le_bytes(), "CHGCNT");
        assert_eq!(&p[8..10], &[2, 0], "NGRPS");
        assert!(p[10..16].iter().all(|&b| b == 0), "reserved");
        assert_eq!(&p[16..20], &[1, 0, 0, 0], "ANAGRPID");
        assert_eq!(&p[20..24], &[2, 0, 0, 0], "NNSID");
        assert_eq!(&p[24..32], &5u64.to_le_bytes(), "group CHGCNT");
        assert_eq!(p[32], 0x01, "ANA state");
        assert!(p[33..48].iter().all(|&b| b == 0), "reserved");
        assert_eq!(&p[48..56], &[1, 0, 0, 0, 3, 0, 0, 0], "NSID list");
        assert_eq!(&p[56..60], &[7, 0, 0, 0]);
        assert_eq!(p[72], 0x03);
        assert_eq!(&p[88..92], &[2, 0, 0, 0]);
        assert_eq!(ana_state_of(&p, 3), Some(ana_state::OPTIMIZED));
        assert_eq!(ana_state_of(&p, 2), Some(ana_state::INACCESSIBLE));
        let r = ana_log_page(9, &groups, true);
        assert_eq!(r.len(), 16 + 2 * 32, "RGO: descriptors only");
        assert_eq!(&r[20..24], &[0, 0, 0, 0], "RGO: NNSID 0");
        assert_eq!(
            &r[48..52],
            &[7, 0, 0, 0],
            "second descriptor follows at once"
        );
        assert_eq!(r[64], 0x03);
    }

    #[test]
    fn ana_state_is_found_in_its_groups_nsid_list() {
        // Two groups: 1 (optimized) with NSIDs 3 and 4, 2 (inaccessible) with NSID 1.
        let mut p = vec![0u8; ANA_LOG_HEADER_LEN + 2 * ANA_GROUP_DESCRIPTOR_LEN + 12];
        p[8] = 2;
        let g1 = ANA_LOG_HEADER_LEN;
        p[g1] = 1;
        p[g1 + 4] = 2;
        p[g1 + 16] = 0x01;
        p[g1 + 32] = 3;
        p[g1 + 36] = 4;
        let g2 = g1 + 40;
        p[g2] = 2;
        p[g2 + 4] = 1;
        p[g2 + 16] = 0x03;
        p[g2 + 32] = 1;
        assert_eq!(ana_state_of(&p, 4), Some(0x01));
        assert_eq!(ana_state_of(&p, 1), Some(0x03));
        assert_eq!(ana_state_of(&p, 2), None);
        assert_eq!(ana_state_of(&p[..g2 + 8], 1), None, "cut short");
    }

    #[test]
    fn error_log_entry_layout() {
        let e = ErrorLogEntry {
            error_count: 3,
            sqid: 1,
            cid: 0x22,
            status: Status::LBA_OUT_OF_RANGE,
            parameter_error_location: 0xffff,
            lba: 0x1000,
            nsid: 1,
            trtype: trtype::TCP,
            command_specific: 0,
        };
        let mut b = [0xaau8; 64];
        e.write_to(&mut b);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[8..10], &[1, 0]);
        assert_eq!(&b[10..12], &[0x22, 0]);
        assert_eq!(
            u16::from_le_bytes([b[12], b[13]]),
            Status::LBA_OUT_OF_RANGE.to_cqe_status(false)
        );
        assert_eq!(&b[14..16], &[0xff, 0xff]);
        assert_eq!(&b[16..24], &0x1000u64.to_le_bytes());
        assert_eq!(&b[24..28], &[1, 0, 0, 0]);
        assert_eq!(b[29], 3);
        assert!(b[40..].iter().all(|&c| c == 0));
    }

    #[test]
    fn smart_log_layout() {
        let s = SmartLog {
            composite_temperature: 300,
            available_spare: 100,
            available_spare_threshold: 10,
            data_units_read: SmartLog::data_units(512_001),
            data_units_written: 7,
            host_read_commands: 9,
            power_on_hours: 1,
            num_error_log_entries: 2,
            ..SmartLog::default()
        };
        let mut b = [0xaau8; 512];
        s.write_to(&mut b);
        assert_eq!(b[0], 0);
        assert_eq!(&b[1..3], &300u16.to_le_bytes());
        assert_eq!((b[3], b[4]), (100, 10));
        assert_eq!(b[32], 2, "512001 bytes round up to 2 data units");
        assert_eq!(b[48], 7);
        assert_eq!(b[64], 9);
        assert_eq!(b[128], 1);
        assert_eq!(b[176], 2);
        assert!(b[192..].iter().all(|&c| c == 0));
    }

    #[test]
    fn changed_namespace_list_overflow() {
        let mut b = vec![0xaau8; 4096];
        write_changed_ns_list(&[3, 9], &mut b);
        assert_eq!(&b[..12], &[3, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        let many: Vec<u32> = (1..=1025).collect();
        write_changed_ns_list(&many, &mut b);
        assert_eq!(&b[..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }

    #[test]
    fn discovery_log_layout_and_round_trip() {
        let mut tsas = [0u8; 256];
        tsas[0] = tcp_sectype::NONE;
        let e = DiscoveryLogEntry {
            trtype: trtype::TCP,
            adrfam: adrfam::IPV4,
            subtype: subtype::NVME,
            treq: treq::SECURE_CHANNEL_NOT_REQUIRED | treq::DISABLE_SQ_FLOW_CONTROL,
            portid: 1,
            cntlid: CNTLID_DYNAMIC,
            asqsz: 32,
            eflags: 0,
            trsvcid: "4420".into(),
            subnqn: "nqn.2024-01.io.ferroblk:vol0".into(),
            traddr: "127.0.0.1".into(),
            tsas,
        };
        let page = discovery_log_page(42, std::slice::from_ref(&e));
        assert_eq!(page.len(), 2048);
        assert_eq!(&page[0..8], &42u64.to_le_bytes(), "GENCTR");
        assert_eq!(&page[8..16], &1u64.to_le_bytes(), "NUMREC");
        let b = &page[1024..];
        assert_eq!(&b[0..4], &[3, 1, 2, 6], "TRTYPE ADRFAM SUBTYPE TREQ");
        assert_eq!(&b[4..6], &[1, 0], "PORTID");
        assert_eq!(&b[6..8], &[0xff, 0xff], "CNTLID");
        assert_eq!(&b[8..10], &[32, 0], "ASQSZ");
        assert_eq!(&b[32..36], b"4420", "TRSVCID");
        assert_eq!(b[36], b' ');
        assert_eq!(&b[256..260], b"nqn.", "SUBNQN");
        assert_eq!(&b[512..521], b"127.0.0.1", "TRADDR");
        assert_eq!(b[768], 0, "TSAS SECTYPE");
        let h = DiscoveryLogHeader::parse(&page).unwrap();
        assert_eq!((h.genctr, h.numrec), (42, 1));
        assert_eq!(DiscoveryLogEntry::parse(b).unwrap(), e);
        assert_eq!(LogPageId::from_u8(0x70), Some(LogPageId::Discovery));
    }
}
