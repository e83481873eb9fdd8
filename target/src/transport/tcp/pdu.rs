//! The NVMe/TCP PDU codec (NVMe/TCP Transport Specification 1.0 §3.6, "PDU formats"; the same
//! text is NVMe-oF 1.1 §7.4).
//!
//! Every PDU starts with an 8-byte common header (CH): PDU-type, FLAGS, HLEN, PDO, PLEN. The
//! PDU-specific header (PSH) follows up to HLEN; then, if HDGSTF is set, a 4-byte header
//! digest; then padding up to PDO; then PDU data; then, if DDGSTF is set, a 4-byte data digest.
//! Digests are CRC32C (Castagnoli), stored little-endian; the header digest covers the HLEN
//! header bytes, the data digest the data bytes only (not the padding).
//!
//! ```text
//! 0      8            HLEN     +4         PDO                    PLEN-4    PLEN
//! | CH   | PSH        | HDGST  | PAD      | DATA                 | DDGST  |
//! ```
//!
//! # Decoding
//! [`PduDecoder`] looks at the bytes a connection has received so far and answers
//! [`Decoded::NeedMore`] (how many more bytes it needs at least) or [`Decoded::Ready`] with a
//! [`PduLayout`]: the parsed header and where the data is, so the connection can consume PLEN
//! bytes. It never asks for more bytes than the negotiated limits allow, so a hostile PLEN
//! cannot make the connection buffer gigabytes. Fields are validated in the order they appear
//! (the lowest incorrect field is reported, NVMe-oF 1.1 §7.4.7); each failure is a
//! [`FatalError`] carrying the Fatal Error Status ([`Fes`]), the Fatal Error Information (byte
//! offset of the bad field for [`Fes::INVALID_HEADER_FIELD`] and [`Fes::UNSUPPORTED_PARAMETER`])
//! and how much of the offending header to echo back in the termination request.
//!
//! Two outcomes are not fatal errors: a termination request with an invalid length is answered
//! by closing without a reply ([`PduError::Close`], §7.4.7), and a data digest mismatch is a
//! command error ([`PduError::DataDigest`]: the command completes with Transient Transport
//! Error and the connection continues, as SPDK and the Linux host do).
//!
//! For zero-copy receive, [`PduDecoder::decode_header`] validates only the header; the data can
//! then be received straight into a pooled buffer and checked with [`DataDigest`].
//!
//! # Encoding
//! [`PduEncoder`] writes a PDU's header (CH, PSH, header digest, padding up to PDO) into a
//! caller's buffer and returns its length; the caller sends the header, the payload and
//! [`DataDigest`]'s trailer with one writev, without copying the payload.

use std::fmt;
use std::ops::Range;

use crate::spec::command::Sqe;
use crate::spec::completion::Cqe;
use crate::spec::wire::{align_up, get_u16, get_u32, put_u16, put_u32};

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// HLEN and PLEN of ICReq and ICResp.
pub const IC_PDU_LEN: usize = 128;
/// HLEN of H2CTermReq and C2HTermReq.
pub const TERM_REQ_HLEN: usize = 24;
/// Most bytes of the offending PDU's header a termination request carries.
pub const TERM_REQ_MAX_DATA: usize = 128;
/// Largest PLEN of a termination request (§3.6.2.4: 152 bytes).
pub const TERM_REQ_MAX_PLEN: usize = TERM_REQ_HLEN + TERM_REQ_MAX_DATA;
/// HLEN of CapsuleCmd (CH + 64-byte SQE).
pub const CAPSULE_CMD_HLEN: usize = 72;
/// HLEN of CapsuleResp (CH + 16-byte CQE).
pub const CAPSULE_RESP_HLEN: usize = 24;
/// HLEN of H2CData and C2HData.
pub const DATA_HLEN: usize = 24;
/// HLEN of R2T.
pub const R2T_HLEN: usize = 24;
/// Largest HPDA/CPDA value (alignment (31 + 1) × 4 = 128 bytes).
pub const MAX_PDA: u8 = 31;
/// Smallest MAXH2CDATA a controller may announce.
pub const MIN_MAXH2CDATA: u32 = 4096;
/// The only PDU Format Version defined (PFV 0, NVMe/TCP 1.0).
pub const PFV_1_0: u16 = 0;
/// Largest header region any encoder writes (a termination request with its echoed header);
/// a buffer of this size fits every PDU header.
pub const MAX_HEADER_LEN: usize = TERM_REQ_MAX_PLEN;

/// PDU-type values (§3.6.1, Figure 9). Even values flow host to controller, odd values
/// controller to host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    /// 00h Initialize Connection Request.
    IcReq = 0x00,
    /// 01h Initialize Connection Response.
    IcResp = 0x01,
    /// 02h Host to Controller Terminate Connection Request.
    H2cTermReq = 0x02,
    /// 03h Controller to Host Terminate Connection Request.
    C2hTermReq = 0x03,
    /// 04h Command Capsule.
    CapsuleCmd = 0x04,
    /// 05h Response Capsule.
    CapsuleResp = 0x05,
    /// 06h Host to Controller Data.
    H2cData = 0x06,
    /// 07h Controller to Host Data.
    C2hData = 0x07,
    /// 09h Ready to Transfer.
    R2t = 0x09,
}

impl PduType {
    /// The type of a raw PDU-type byte, or `None` for a reserved value.
    pub const fn from_u8(v: u8) -> Option<PduType> {
        Some(match v {
            0x00 => PduType::IcReq,
            0x01 => PduType::IcResp,
            0x02 => PduType::H2cTermReq,
            0x03 => PduType::C2hTermReq,
            0x04 => PduType::CapsuleCmd,
            0x05 => PduType::CapsuleResp,
            0x06 => PduType::H2cData,
            0x07 => PduType::C2hData,
            0x09 => PduType::R2t,
            _ => return None,
        })
    }

    /// The HLEN every PDU of this type has.
    pub const fn hlen(self) -> usize {
        match self {
            PduType::IcReq | PduType::IcResp => IC_PDU_LEN,
            PduType::H2cTermReq | PduType::C2hTermReq => TERM_REQ_HLEN,
            PduType::CapsuleCmd => CAPSULE_CMD_HLEN,
            PduType::CapsuleResp => CAPSULE_RESP_HLEN,
            PduType::H2cData | PduType::C2hData => DATA_HLEN,
            PduType::R2t => R2T_HLEN,
        }
    }

    /// Which side receives this type.
    pub const fn receiver(self) -> Role {
        if self as u8 & 1 == 0 {
            Role::Controller
        } else {
            Role::Host
        }
    }

    /// The FLAGS bits this type may carry (§3.6.1, Figure 10 and each PDU's figure).
    pub const fn allowed_flags(self) -> u8 {
        match self {
            PduType::IcReq | PduType::IcResp | PduType::H2cTermReq | PduType::C2hTermReq => 0,
            PduType::CapsuleCmd => flags::HDGSTF | flags::DDGSTF,
            PduType::CapsuleResp | PduType::R2t => flags::HDGSTF,
            PduType::H2cData => flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU,
            PduType::C2hData => flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU | flags::SUCCESS,
        }
    }

    /// Whether this type may carry data framed by PDO (and a data digest). Termination
    /// requests carry the offending header right after HLEN, never digested.
    pub const fn carries_data(self) -> bool {
        matches!(
            self,
            PduType::CapsuleCmd | PduType::H2cData | PduType::C2hData
        )
    }

    /// Whether this type is a termination request.
    pub const fn is_term_req(self) -> bool {
        matches!(self, PduType::H2cTermReq | PduType::C2hTermReq)
    }

    /// Whether this type is part of the connection initialization exchange.
    pub const fn is_ic(self) -> bool {
        matches!(self, PduType::IcReq | PduType::IcResp)
    }
}

/// FLAGS bits of the common header (§3.6.1, Figure 10; data PDUs §3.6.2.7–8).
pub mod flags {
    /// Bit 0: a header digest follows the header.
    pub const HDGSTF: u8 = 1 << 0;
    /// Bit 1: a data digest follows the data.
    pub const DDGSTF: u8 = 1 << 1;
    /// Bit 2 (H2CData, C2HData): the last data PDU of the transfer.
    pub const LAST_PDU: u8 = 1 << 2;
    /// Bit 3 (C2HData): the command succeeded and no CapsuleResp follows; only with LAST_PDU.
    pub const SUCCESS: u8 = 1 << 3;
}

/// Which end of the connection a codec works for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The NVMe controller (target): receives ICReq, CapsuleCmd, H2CData, H2CTermReq.
    Controller,
    /// The host (initiator): receives ICResp, CapsuleResp, C2HData, R2T, C2HTermReq.
    Host,
}

impl Role {
    /// The termination request this side sends.
    pub const fn term_req_type(self) -> PduType {
        match self {
            Role::Controller => PduType::C2hTermReq,
            Role::Host => PduType::H2cTermReq,
        }
    }
}

/// Fatal Error Status of a termination request (§3.6.2.4, Figure 16).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fes(pub u16);

impl Fes {
    /// 01h Invalid PDU Header Field: FEI is the byte offset of the field.
    pub const INVALID_HEADER_FIELD: Fes = Fes(0x01);
    /// 02h PDU Sequence Error: a PDU arrived that is not allowed at this point.
    pub const PDU_SEQUENCE_ERROR: Fes = Fes(0x02);
    /// 03h Header Digest Error.
    pub const HEADER_DIGEST_ERROR: Fes = Fes(0x03);
    /// 04h Data Transfer Out of Range: data outside the command's buffer or not where the R2T
    /// asked for it.
    pub const DATA_TRANSFER_OUT_OF_RANGE: Fes = Fes(0x04);
    /// 05h Data Transfer Limit Exceeded: more data in one PDU than MAXH2CDATA or the in-capsule
    /// limit.
    pub const DATA_TRANSFER_LIMIT_EXCEEDED: Fes = Fes(0x05);
    /// 05h under its NVMe-oF 1.1 name, R2T Limit Exceeded: more outstanding R2Ts than MAXR2T.
    pub const R2T_LIMIT_EXCEEDED: Fes = Fes(0x05);
    /// 06h Unsupported Parameter: FEI is the byte offset of the parameter (ICReq PFV, for
    /// example).
    pub const UNSUPPORTED_PARAMETER: Fes = Fes(0x06);

    /// The spec's name of this status.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0x01 => "Invalid PDU Header Field",
            0x02 => "PDU Sequence Error",
            0x03 => "Header Digest Error",
            0x04 => "Data Transfer Out of Range",
            0x05 => "Data Transfer Limit Exceeded",
            0x06 => "Unsupported Parameter",
            _ => "Reserved",
        }
    }

    /// Whether FEI carries a field offset for this status.
    pub const fn has_field_offset(self) -> bool {
        matches!(self.0, 0x01 | 0x06)
    }
}

impl fmt::Debug for Fes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fes({:#04x} {})", self.0, self.name())
    }
}

impl fmt::Display for Fes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The common header (§3.6.1, Figure 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonHeader {
    /// PDU-type byte (raw: it may be reserved).
    pub pdu_type: u8,
    /// FLAGS ([`flags`]).
    pub flags: u8,
    /// Header Length: CH + PSH, without the header digest.
    pub hlen: u8,
    /// PDU Data Offset: where the data starts, from the first byte of the PDU; 0 if none.
    pub pdo: u8,
    /// PDU Length: the whole PDU including digests and padding.
    pub plen: u32,
}

impl CommonHeader {
    /// Decodes the first 8 bytes of `b`.
    pub fn parse(b: &[u8]) -> CommonHeader {
        CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: get_u32(b, 4),
        }
    }

    /// Writes the header at `out[..8]`.
    pub fn write_to(&self, out: &mut [u8]) {
        out[0] = self.pdu_type;
        out[1] = self.flags;
        out[2] = self.hlen;
        out[3] = self.pdo;
        put_u32(out, 4, self.plen);
    }
}

/// DGST byte of ICReq/ICResp: bit 0 header digest, bit 1 data digest.
const DGST_HDGST: u8 = 1 << 0;
const DGST_DDGST: u8 = 1 << 1;

/// ICReq PSH (§3.6.2.2, Figure 12): PFV bytes 9:8, HPDA byte 10, DGST byte 11, MAXR2T bytes
/// 15:12.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IcReq {
    /// PDU Format Version (0).
    pub pfv: u16,
    /// Host PDU Data Alignment: C2H data must start at a multiple of (HPDA + 1) × 4 bytes.
    pub hpda: u8,
    /// The host asks for header digests.
    pub hdgst: bool,
    /// The host asks for data digests.
    pub ddgst: bool,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// ICResp PSH (§3.6.2.3, Figure 13): PFV bytes 9:8, CPDA byte 10, DGST byte 11, MAXH2CDATA
/// bytes 15:12.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IcResp {
    /// PDU Format Version (0).
    pub pfv: u16,
    /// Controller PDU Data Alignment: H2C data (and in-capsule data) must start at a multiple
    /// of (CPDA + 1) × 4 bytes.
    pub cpda: u8,
    /// Header digests are enabled.
    pub hdgst: bool,
    /// Data digests are enabled.
    pub ddgst: bool,
    /// Most data bytes in one H2CData PDU (at least 4096, a multiple of 4).
    pub maxh2cdata: u32,
}

/// H2CTermReq/C2HTermReq PSH (§3.6.2.4–5, Figure 15): FES bytes 9:8, FEI bytes 13:10. The data
/// (bytes HLEN..PLEN) is the header of the PDU in error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal Error Status.
    pub fes: Fes,
    /// Fatal Error Information.
    pub fei: u32,
}

/// CapsuleCmd PSH (§3.6.2.6): the SQE; in-capsule data at PDO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsuleCmd {
    /// The command.
    pub sqe: Sqe,
}

/// CapsuleResp PSH (§3.6.2.7): the CQE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsuleResp {
    /// The completion.
    pub cqe: Cqe,
}

/// H2CData PSH (§3.6.2.8, Figure 19): CCCID bytes 9:8, TTAG 11:10, DATAO 15:12, DATAL 19:16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct H2cData {
    /// Command Capsule CID of the command the data belongs to.
    pub cccid: u16,
    /// Transfer Tag from the R2T this PDU answers.
    pub ttag: u16,
    /// Data Offset within the command's data.
    pub datao: u32,
    /// Data Length of this PDU.
    pub datal: u32,
    /// LAST_PDU: the last H2CData for the R2T.
    pub last: bool,
}

/// C2HData PSH (§3.6.2.9, Figure 20): CCCID bytes 9:8, bytes 11:10 reserved, DATAO 15:12,
/// DATAL 19:16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct C2hData {
    /// Command Capsule CID.
    pub cccid: u16,
    /// Data Offset within the command's data.
    pub datao: u32,
    /// Data Length of this PDU.
    pub datal: u32,
    /// LAST_PDU: the last C2HData of the command.
    pub last: bool,
    /// SUCCESS: the command completed successfully and no CapsuleResp follows (requires
    /// `last`).
    pub success: bool,
}

/// R2T PSH (§3.6.2.10, Figure 21): CCCID bytes 9:8, TTAG 11:10, R2TO 15:12, R2TL 19:16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct R2t {
    /// Command Capsule CID.
    pub cccid: u16,
    /// Transfer Tag the host echoes in its H2CData PDUs.
    pub ttag: u16,
    /// R2T Offset: where in the command's data the requested range starts.
    pub r2to: u32,
    /// R2T Length: how many bytes the controller is ready for.
    pub r2tl: u32,
}

/// A parsed PDU header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PduHeader {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq.
    H2cTermReq(TermReq),
    /// C2HTermReq.
    C2hTermReq(TermReq),
    /// CapsuleCmd.
    CapsuleCmd(CapsuleCmd),
    /// CapsuleResp.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2cData(H2cData),
    /// C2HData.
    C2hData(C2hData),
    /// R2T.
    R2t(R2t),
}

impl PduHeader {
    /// The PDU type.
    pub const fn pdu_type(&self) -> PduType {
        match self {
            PduHeader::IcReq(_) => PduType::IcReq,
            PduHeader::IcResp(_) => PduType::IcResp,
            PduHeader::H2cTermReq(_) => PduType::H2cTermReq,
            PduHeader::C2hTermReq(_) => PduType::C2hTermReq,
            PduHeader::CapsuleCmd(_) => PduType::CapsuleCmd,
            PduHeader::CapsuleResp(_) => PduType::CapsuleResp,
            PduHeader::H2cData(_) => PduType::H2cData,
            PduHeader::C2hData(_) => PduType::C2hData,
            PduHeader::R2t(_) => PduType::R2t,
        }
    }
}

/// What the ICReq/ICResp exchange settled (§3.3): digests, alignments and sizes, used by both
/// the decoder and the encoder of each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Header digests on every PDU that has them.
    pub hdgst: bool,
    /// Data digests on every PDU with data.
    pub ddgst: bool,
    /// Host PDU Data Alignment (from ICReq): where C2H data starts.
    pub hpda: u8,
    /// Controller PDU Data Alignment (from ICResp): where H2C and in-capsule data starts.
    pub cpda: u8,
    /// Most data bytes per H2CData PDU (from ICResp).
    pub maxh2cdata: u32,
    /// Most outstanding R2Ts per command, 0's based (from ICReq).
    pub maxr2t: u32,
}

impl Negotiated {
    /// The settings of a completed exchange: the controller's answer decides the digests.
    pub const fn from_exchange(req: &IcReq, resp: &IcResp) -> Negotiated {
        Negotiated {
            hdgst: resp.hdgst,
            ddgst: resp.ddgst,
            hpda: req.hpda,
            cpda: resp.cpda,
            maxh2cdata: resp.maxh2cdata,
            maxr2t: req.maxr2t,
        }
    }
}

/// Byte alignment of a PDA value: (PDA + 1) × 4.
const fn pda_align(pda: u8) -> usize {
    (pda as usize + 1) * 4
}

/// The outcome of decoding a buffer that may hold only part of a PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// At least this many more bytes are needed (never 0).
    NeedMore(usize),
    /// A complete, validated header or PDU.
    Ready(T),
}

/// Where everything of one PDU is, from its first byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PduLayout {
    /// The parsed header.
    pub header: PduHeader,
    /// Bytes of header plus header digest (HLEN, + 4 with HDGSTF).
    pub header_len: usize,
    /// The data: PDO..PDO+DATAL for data PDUs (in-capsule data, H2CData, C2HData), HLEN..PLEN
    /// for termination requests (the echoed header); empty (`header_len..header_len`) if none.
    pub data: Range<usize>,
    /// Whether a data digest follows the data (at `data.end`).
    pub data_digest: bool,
    /// PDU Length: bytes to consume.
    pub plen: usize,
}

/// A fatal protocol error: send a termination request with this status, then close
/// (§3.6.2.4, §3.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatalError {
    /// Fatal Error Status.
    pub fes: Fes,
    /// Fatal Error Information (field byte offset, or 0 where reserved).
    pub fei: u32,
    /// How many bytes at the start of the received buffer (the offending header) to echo in
    /// the termination request's data (at most [`TERM_REQ_MAX_DATA`]).
    pub echo_len: usize,
}

/// Why a PDU cannot be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// Send a termination request ([`PduEncoder::term_req`]) and close the connection.
    #[error("fatal NVMe/TCP error: {} (FEI {})", .0.fes, .0.fei)]
    Fatal(FatalError),
    /// A termination request with an invalid length: close without replying (NVMe-oF 1.1
    /// §7.4.7).
    #[error("malformed termination request")]
    Close,
    /// The data digest does not match: not fatal. Consume `plen` bytes and complete the
    /// command with Transient Transport Error (host: fail the command).
    #[error("data digest mismatch in {:?}", .0.header.pdu_type())]
    DataDigest(PduLayout),
}

impl PduError {
    /// Whether the connection must end.
    pub const fn is_fatal(&self) -> bool {
        !matches!(self, PduError::DataDigest(_))
    }
}

/// CRC32C of a PDU header (the header digest).
#[inline]
pub fn header_digest(header: &[u8]) -> u32 {
    ferroblk_bdev::checksum::crc32c(header)
}

/// An incremental CRC32C over PDU data that may be scattered over several buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataDigest(u32);

impl DataDigest {
    /// A digest over no bytes yet.
    pub const fn new() -> DataDigest {
        DataDigest(0)
    }

    /// The digest of `parts` in order.
    pub fn of(parts: &[&[u8]]) -> u32 {
        let mut d = DataDigest::new();
        for p in parts {
            d.update(p);
        }
        d.value()
    }

    /// Adds the next bytes.
    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        self.0 = ferroblk_bdev::checksum::crc32c_append(self.0, data);
    }

    /// The CRC32C so far.
    pub const fn value(&self) -> u32 {
        self.0
    }

    /// The 4 bytes to send after the data.
    pub const fn trailer(&self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    /// Whether the received trailer matches.
    pub fn matches(&self, trailer: &[u8]) -> bool {
        trailer.len() == DIGEST_LEN && get_u32(trailer, 0) == self.0
    }
}

/// Decodes the PDUs one side receives.
#[derive(Clone, Debug)]
pub struct PduDecoder {
    role: Role,
    negotiated: Option<Negotiated>,
    max_in_capsule: u32,
    max_c2h_data: u32,
}

impl PduDecoder {
    /// A controller's decoder before the ICReq: only ICReq and H2CTermReq are accepted.
    /// `max_in_capsule` bounds in-capsule data (IOCCSZ × 16 − 64 of the queue; the admin
    /// queue allows 8 KiB of capsule).
    pub const fn controller(max_in_capsule: u32) -> PduDecoder {
        PduDecoder {
            role: Role::Controller,
            negotiated: None,
            max_in_capsule,
            max_c2h_data: 0,
        }
    }

    /// A host's decoder before the ICResp: only ICResp and C2HTermReq are accepted.
    /// `max_c2h_data` bounds DATAL of one C2HData PDU.
    pub const fn host(max_c2h_data: u32) -> PduDecoder {
        PduDecoder {
            role: Role::Host,
            negotiated: None,
            max_in_capsule: 0,
            max_c2h_data,
        }
    }

    /// The side this decoder works for.
    pub const fn role(&self) -> Role {
        self.role
    }

    /// The settings in force, once established.
    pub const fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Enters the established state after the ICReq/ICResp exchange: from now on IC PDUs are a
    /// sequence error and digests, alignment and sizes follow `n`.
    pub fn establish(&mut self, n: Negotiated) {
        self.negotiated = Some(n);
    }

    /// Changes the in-capsule data limit (once Connect tells whether this is the admin queue).
    pub fn set_max_in_capsule(&mut self, v: u32) {
        self.max_in_capsule = v;
    }

    /// Changes the C2HData limit.
    pub fn set_max_c2h_data(&mut self, v: u32) {
        self.max_c2h_data = v;
    }

    /// Decodes a whole PDU from the start of `buf`: [`Decoded::Ready`] once all PLEN bytes are
    /// in `buf` and every check, including the data digest, passed.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded<PduLayout>, PduError> {
        let layout = match self.decode_header(buf)? {
            Decoded::NeedMore(n) => return Ok(Decoded::NeedMore(n)),
            Decoded::Ready(l) => l,
        };
        if buf.len() < layout.plen {
            return Ok(Decoded::NeedMore(layout.plen - buf.len()));
        }
        if layout.data_digest {
            let mut d = DataDigest::new();
            d.update(&buf[layout.data.clone()]);
            if !d.matches(&buf[layout.data.end..layout.data.end + DIGEST_LEN]) {
                return Err(PduError::DataDigest(layout));
            }
        }
        Ok(Decoded::Ready(layout))
    }

    /// Decodes and validates the header at the start of `buf` (CH, PSH, header digest);
    /// [`Decoded::Ready`] as soon as the header and its digest are in `buf`. The data may not
    /// have arrived yet; its digest is not checked.
    pub fn decode_header(&self, buf: &[u8]) -> Result<Decoded<PduLayout>, PduError> {
        if buf.len() < CH_LEN {
            return Ok(Decoded::NeedMore(CH_LEN - buf.len()));
        }
        let ch = CommonHeader::parse(buf);
        let plen = ch.plen as usize;
        let hlen = usize::from(ch.hlen);
        let pdo = usize::from(ch.pdo);
        // Echo the offending header: HLEN bytes when HLEN is plausible, else the CH.
        let echo = if (CH_LEN..=plen).contains(&hlen) {
            hlen
        } else {
            CH_LEN
        }
        .min(TERM_REQ_MAX_DATA)
        .min(buf.len());
        let fatal = |fes: Fes, fei: u32| {
            Err(PduError::Fatal(FatalError {
                fes,
                fei,
                echo_len: echo,
            }))
        };
        let ihf = |fei: u32| fatal(Fes::INVALID_HEADER_FIELD, fei);

        // PDU-type (byte 0): known, meant for this side, allowed in this state.
        let Some(ty) = PduType::from_u8(ch.pdu_type) else {
            return ihf(0);
        };
        if ty.receiver() != self.role {
            return ihf(0);
        }
        let neg = self.negotiated;
        if ty.is_term_req() {
            if !(TERM_REQ_HLEN..=TERM_REQ_MAX_PLEN).contains(&plen) {
                return Err(PduError::Close);
            }
        } else if ty.is_ic() == neg.is_some() {
            return fatal(Fes::PDU_SEQUENCE_ERROR, 0);
        }
        let neg = neg.unwrap_or_default();

        // FLAGS (byte 1): only defined bits; digests present exactly when negotiated.
        if ch.flags & !ty.allowed_flags() != 0 {
            return ihf(1);
        }
        let has_hdgst = ch.flags & flags::HDGSTF != 0;
        let hdgst_expected = neg.hdgst && ty.allowed_flags() & flags::HDGSTF != 0;
        if has_hdgst != hdgst_expected {
            return ihf(1);
        }
        let header_len = hlen + if has_hdgst { DIGEST_LEN } else { 0 };
        let has_data = ty.carries_data() && plen > header_len;
        let has_ddgst = ch.flags & flags::DDGSTF != 0;
        if has_ddgst != (neg.ddgst && has_data) {
            return ihf(1);
        }
        if ty == PduType::C2hData && ch.flags & (flags::SUCCESS | flags::LAST_PDU) == flags::SUCCESS
        {
            return ihf(1);
        }

        // HLEN (byte 2).
        if hlen != ty.hlen() {
            return ihf(2);
        }

        // PDO (byte 3): 0 without data; with data inside the PDU, after the header digest, on
        // the receiver's alignment.
        let rx_pda = match self.role {
            Role::Controller => neg.cpda,
            Role::Host => neg.hpda,
        };
        if ty.carries_data() {
            if (has_data || pdo != 0)
                && (pdo < header_len || pdo > plen || pdo % pda_align(rx_pda) != 0)
            {
                return ihf(3);
            }
        } else if !ty.is_term_req() && pdo != 0 {
            return ihf(3);
        }

        // PLEN (bytes 7:4).
        let mut data = header_len..header_len;
        match ty {
            PduType::IcReq | PduType::IcResp => {
                if plen != IC_PDU_LEN {
                    return ihf(4);
                }
            }
            PduType::CapsuleResp | PduType::R2t => {
                if plen != header_len {
                    return ihf(4);
                }
            }
            PduType::H2cTermReq | PduType::C2hTermReq => data = hlen..plen,
            PduType::CapsuleCmd | PduType::H2cData | PduType::C2hData => {
                if plen < header_len {
                    return ihf(4);
                }
                if has_data {
                    let ddgst = if has_ddgst { DIGEST_LEN } else { 0 };
                    let Some(len) = (plen - pdo).checked_sub(ddgst).filter(|&l| l > 0) else {
                        return ihf(4);
                    };
                    let limit = match ty {
                        PduType::CapsuleCmd => self.max_in_capsule,
                        PduType::H2cData => neg.maxh2cdata,
                        _ => self.max_c2h_data,
                    };
                    if len > limit as usize {
                        return fatal(Fes::DATA_TRANSFER_LIMIT_EXCEEDED, 0);
                    }
                    data = pdo..pdo + len;
                }
            }
        }

        // The header (and its digest) must be complete from here on.
        if buf.len() < header_len {
            return Ok(Decoded::NeedMore(header_len - buf.len()));
        }
        if has_hdgst && header_digest(&buf[..hlen]) != get_u32(buf, hlen) {
            return fatal(Fes::HEADER_DIGEST_ERROR, 0);
        }

        // PDU-specific header fields.
        let b = &buf[..hlen];
        let header = match ty {
            PduType::IcReq => {
                let r = IcReq {
                    pfv: get_u16(b, 8),
                    hpda: b[10],
                    hdgst: b[11] & DGST_HDGST != 0,
                    ddgst: b[11] & DGST_DDGST != 0,
                    maxr2t: get_u32(b, 12),
                };
                if r.pfv != PFV_1_0 {
                    return fatal(Fes::UNSUPPORTED_PARAMETER, 8);
                }
                if r.hpda > MAX_PDA {
                    return ihf(10);
                }
                PduHeader::IcReq(r)
            }
            PduType::IcResp => {
                let r = IcResp {
                    pfv: get_u16(b, 8),
                    cpda: b[10],
                    hdgst: b[11] & DGST_HDGST != 0,
                    ddgst: b[11] & DGST_DDGST != 0,
                    maxh2cdata: get_u32(b, 12),
                };
                if r.pfv != PFV_1_0 {
                    return fatal(Fes::UNSUPPORTED_PARAMETER, 8);
                }
                if r.cpda > MAX_PDA {
                    return ihf(10);
                }
                if r.maxh2cdata < MIN_MAXH2CDATA || !r.maxh2cdata.is_multiple_of(4) {
                    return ihf(12);
                }
                PduHeader::IcResp(r)
            }
            PduType::H2cTermReq | PduType::C2hTermReq => {
                let t = TermReq {
                    fes: Fes(get_u16(b, 8)),
                    fei: get_u32(b, 10),
                };
                if ty == PduType::H2cTermReq {
                    PduHeader::H2cTermReq(t)
                } else {
                    PduHeader::C2hTermReq(t)
                }
            }
            PduType::CapsuleCmd => PduHeader::CapsuleCmd(CapsuleCmd {
                sqe: Sqe::parse(&b[CH_LEN..]).expect("HLEN is 72"),
            }),
            PduType::CapsuleResp => {
                let mut c = [0u8; 16];
                c.copy_from_slice(&b[CH_LEN..CH_LEN + 16]);
                PduHeader::CapsuleResp(CapsuleResp {
                    cqe: Cqe::parse(&c),
                })
            }
            PduType::H2cData | PduType::C2hData => {
                let (cccid, ttag, datao, datal) = (
                    get_u16(b, 8),
                    get_u16(b, 10),
                    get_u32(b, 12),
                    get_u32(b, 16),
                );
                if datal == 0 || datal as usize != data.len() {
                    return ihf(16);
                }
                let last = ch.flags & flags::LAST_PDU != 0;
                if ty == PduType::H2cData {
                    PduHeader::H2cData(H2cData {
                        cccid,
                        ttag,
                        datao,
                        datal,
                        last,
                    })
                } else {
                    PduHeader::C2hData(C2hData {
                        cccid,
                        datao,
                        datal,
                        last,
                        success: ch.flags & flags::SUCCESS != 0,
                    })
                }
            }
            PduType::R2t => {
                let r = R2t {
                    cccid: get_u16(b, 8),
                    ttag: get_u16(b, 10),
                    r2to: get_u32(b, 12),
                    r2tl: get_u32(b, 16),
                };
                if r.r2tl == 0 {
                    return ihf(16);
                }
                PduHeader::R2t(r)
            }
        };
        Ok(Decoded::Ready(PduLayout {
            header,
            header_len,
            data_digest: has_ddgst,
            data,
            plen,
        }))
    }
}

/// Writes the headers of the PDUs one side sends.
///
/// Every method writes into the front of `out` and returns the number of bytes written: the
/// bytes to send before the payload (for data PDUs this is PDO). `out` must hold the header:
/// [`MAX_HEADER_LEN`] bytes always suffice; a shorter buffer panics.
#[derive(Clone, Copy, Debug)]
pub struct PduEncoder {
    role: Role,
    hdgst: bool,
    ddgst: bool,
    tx_pda: u8,
}

impl PduEncoder {
    /// The encoder of `role` before the exchange: no digests, no padding (IC PDUs and
    /// termination requests).
    pub const fn new(role: Role) -> PduEncoder {
        PduEncoder {
            role,
            hdgst: false,
            ddgst: false,
            tx_pda: 0,
        }
    }

    /// The encoder of `role` once the exchange settled `n`: data PDUs are aligned to the
    /// peer's requirement (HPDA for the controller, CPDA for the host).
    pub const fn established(role: Role, n: &Negotiated) -> PduEncoder {
        PduEncoder {
            role,
            hdgst: n.hdgst,
            ddgst: n.ddgst,
            tx_pda: match role {
                Role::Controller => n.hpda,
                Role::Host => n.cpda,
            },
        }
    }

    fn header_len(&self, hlen: usize) -> usize {
        hlen + if self.hdgst { DIGEST_LEN } else { 0 }
    }

    /// Writes CH, seals the header digest if enabled, zeroes the padding up to `pdo`.
    fn finish(&self, out: &mut [u8], ch: CommonHeader, pdo_or_end: usize) -> usize {
        let hlen = usize::from(ch.hlen);
        ch.write_to(out);
        let mut end = hlen;
        if ch.flags & flags::HDGSTF != 0 {
            let d = header_digest(&out[..hlen]);
            put_u32(out, hlen, d);
            end += DIGEST_LEN;
        }
        if pdo_or_end > end {
            out[end..pdo_or_end].fill(0);
        }
        pdo_or_end.max(end)
    }

    fn check_room(out: &[u8], need: usize) {
        assert!(
            out.len() >= need,
            "PDU header buffer of {} bytes, {need} needed",
            out.len()
        );
    }

    /// ICReq (host, §3.6.2.2). IC PDUs never carry digests.
    pub fn ic_req(&self, r: &IcReq, out: &mut [u8]) -> usize {
        Self::check_room(out, IC_PDU_LEN);
        out[..IC_PDU_LEN].fill(0);
        put_u16(out, 8, r.pfv);
        out[10] = r.hpda;
        out[11] = dgst_byte(r.hdgst, r.ddgst);
        put_u32(out, 12, r.maxr2t);
        self.finish(out, ic_ch(PduType::IcReq), IC_PDU_LEN)
    }

    /// ICResp (controller, §3.6.2.3).
    pub fn ic_resp(&self, r: &IcResp, out: &mut [u8]) -> usize {
        Self::check_room(out, IC_PDU_LEN);
        out[..IC_PDU_LEN].fill(0);
        put_u16(out, 8, r.pfv);
        out[10] = r.cpda;
        out[11] = dgst_byte(r.hdgst, r.ddgst);
        put_u32(out, 12, r.maxh2cdata);
        self.finish(out, ic_ch(PduType::IcResp), IC_PDU_LEN)
    }

    /// The side this encoder works for.
    pub const fn role(&self) -> Role {
        self.role
    }

    /// A termination request (§3.6.2.4–5): C2HTermReq from a controller, H2CTermReq from a
    /// host. `offending` is the header of the PDU in error; at most 128 bytes of it are copied.
    /// The whole PDU is written to `out`; termination requests are never digested. FEI is
    /// zeroed for statuses that do not define it.
    pub fn term_req(&self, fes: Fes, fei: u32, offending: &[u8], out: &mut [u8]) -> usize {
        let role = self.role;
        let echo = &offending[..offending.len().min(TERM_REQ_MAX_DATA)];
        let plen = TERM_REQ_HLEN + echo.len();
        Self::check_room(out, plen);
        out[..TERM_REQ_HLEN].fill(0);
        put_u16(out, 8, fes.0);
        put_u32(out, 10, if fes.has_field_offset() { fei } else { 0 });
        out[TERM_REQ_HLEN..plen].copy_from_slice(echo);
        CommonHeader {
            pdu_type: role.term_req_type() as u8,
            flags: 0,
            hlen: TERM_REQ_HLEN as u8,
            pdo: 0,
            plen: plen as u32,
        }
        .write_to(out);
        plen
    }

    /// The termination request answering `err`, found in the received bytes `received` (the
    /// buffer the decoder was given).
    pub fn term_req_for(&self, err: &FatalError, received: &[u8], out: &mut [u8]) -> usize {
        let echo = &received[..err.echo_len.min(received.len())];
        self.term_req(err.fes, err.fei, echo, out)
    }

    /// CapsuleCmd header (host, §3.6.2.6) for a command with `icd_len` bytes of in-capsule
    /// data. Returns PDO (or the header length without data); send the data and, with data
    /// digests, the [`DataDigest`] trailer after it.
    pub fn capsule_cmd(&self, sqe: &Sqe, icd_len: u32, out: &mut [u8]) -> usize {
        let (pdo, plen, fl) = self.data_framing(CAPSULE_CMD_HLEN, icd_len);
        Self::check_room(out, pdo.max(self.header_len(CAPSULE_CMD_HLEN)));
        out[CH_LEN..CAPSULE_CMD_HLEN].copy_from_slice(sqe.as_bytes());
        let ch = CommonHeader {
            pdu_type: PduType::CapsuleCmd as u8,
            flags: fl,
            hlen: CAPSULE_CMD_HLEN as u8,
            pdo: pdo as u8,
            plen,
        };
        self.finish(out, ch, pdo)
    }

    /// CapsuleResp (controller, §3.6.2.7).
    pub fn capsule_resp(&self, cqe: &Cqe, out: &mut [u8]) -> usize {
        let len = self.header_len(CAPSULE_RESP_HLEN);
        Self::check_room(out, len);
        cqe.write_to(&mut out[CH_LEN..]);
        let ch = CommonHeader {
            pdu_type: PduType::CapsuleResp as u8,
            flags: self.hdgst_flag(),
            hlen: CAPSULE_RESP_HLEN as u8,
            pdo: 0,
            plen: len as u32,
        };
        self.finish(out, ch, 0)
    }

    /// H2CData header (host, §3.6.2.8). Returns PDO; `h.datal` bytes of data follow.
    pub fn h2c_data(&self, h: &H2cData, out: &mut [u8]) -> usize {
        debug_assert!(h.datal > 0, "data PDUs carry data");
        let (pdo, plen, mut fl) = self.data_framing(DATA_HLEN, h.datal);
        Self::check_room(out, pdo.max(self.header_len(DATA_HLEN)));
        if h.last {
            fl |= flags::LAST_PDU;
        }
        out[CH_LEN..DATA_HLEN].fill(0);
        put_u16(out, 8, h.cccid);
        put_u16(out, 10, h.ttag);
        put_u32(out, 12, h.datao);
        put_u32(out, 16, h.datal);
        let ch = data_ch(PduType::H2cData, fl, pdo, plen);
        self.finish(out, ch, pdo)
    }

    /// C2HData header (controller, §3.6.2.9). Returns PDO; `h.datal` bytes of data follow.
    /// SUCCESS is only valid with LAST_PDU.
    pub fn c2h_data(&self, h: &C2hData, out: &mut [u8]) -> usize {
        debug_assert!(h.datal > 0, "data PDUs carry data");
        debug_assert!(!h.success || h.last, "SUCCESS requires LAST_PDU");
        let (pdo, plen, mut fl) = self.data_framing(DATA_HLEN, h.datal);
        Self::check_room(out, pdo.max(self.header_len(DATA_HLEN)));
        if h.last {
            fl |= flags::LAST_PDU;
        }
        if h.success {
            fl |= flags::SUCCESS;
        }
        out[CH_LEN..DATA_HLEN].fill(0);
        put_u16(out, 8, h.cccid);
        put_u32(out, 12, h.datao);
        put_u32(out, 16, h.datal);
        let ch = data_ch(PduType::C2hData, fl, pdo, plen);
        self.finish(out, ch, pdo)
    }

    /// R2T (controller, §3.6.2.10).
    pub fn r2t(&self, r: &R2t, out: &mut [u8]) -> usize {
        let len = self.header_len(R2T_HLEN);
        Self::check_room(out, len);
        out[CH_LEN..R2T_HLEN].fill(0);
        put_u16(out, 8, r.cccid);
        put_u16(out, 10, r.ttag);
        put_u32(out, 12, r.r2to);
        put_u32(out, 16, r.r2tl);
        let ch = CommonHeader {
            pdu_type: PduType::R2t as u8,
            flags: self.hdgst_flag(),
            hlen: R2T_HLEN as u8,
            pdo: 0,
            plen: len as u32,
        };
        self.finish(out, ch, 0)
    }

    fn hdgst_flag(&self) -> u8 {
        if self.hdgst { flags::HDGSTF } else { 0 }
    }

    /// PDO, PLEN and digest flags of a PDU with HLEN `hlen` carrying `len` data bytes.
    fn data_framing(&self, hlen: usize, len: u32) -> (usize, u32, u8) {
        let header_len = self.header_len(hlen);
        if len == 0 {
            return (0, header_len as u32, self.hdgst_flag());
        }
        let pdo = align_up(header_len, pda_align(self.tx_pda));
        let ddgst = if self.ddgst { DIGEST_LEN } else { 0 };
        let fl = self.hdgst_flag() | if self.ddgst { flags::DDGSTF } else { 0 };
        let plen = (pdo + ddgst) as u32 + len;
        (pdo, plen, fl)
    }
}

fn dgst_byte(hdgst: bool, ddgst: bool) -> u8 {
    (if hdgst { DGST_HDGST } else { 0 }) | if ddgst { DGST_DDGST } else { 0 }
}

fn ic_ch(ty: PduType) -> CommonHeader {
    CommonHeader {
        pdu_type: ty as u8,
        flags: 0,
        hlen: IC_PDU_LEN as u8,
        pdo: 0,
        plen: IC_PDU_LEN as u32,
    }
}

fn data_ch(ty: PduType, fl: u8, pdo: usize, plen: u32) -> CommonHeader {
    CommonHeader {
        pdu_type: ty as u8,
        flags: fl,
        hlen: DATA_HLEN as u8,
        pdo: pdo as u8,
        plen,
    }
}

#[cfg(test)]
#[path = "pdu_tests.rs"]
mod tests;
