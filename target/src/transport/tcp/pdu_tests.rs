//! Tests of the PDU codec: digests against known CRC32C values, a round trip of every PDU
//! type, every hostile header a peer can send with its FES/FEI, partial buffers at every split
//! point, and a deterministic random/mutation run that must never panic.

use super::*;
use crate::spec::command::{IoOpcode, ReadWrite, SglDescriptor};
use crate::spec::status::Status;

const MAXH2CDATA: u32 = 64 * 1024;
const MAX_ICD: u32 = 8192;

fn neg(hdgst: bool, ddgst: bool) -> Negotiated {
    Negotiated {
        hdgst,
        ddgst,
        hpda: 0,
        cpda: 0,
        maxh2cdata: MAXH2CDATA,
        maxr2t: 0,
    }
}

fn ctrl_dec(n: Option<Negotiated>) -> PduDecoder {
    let mut d = PduDecoder::controller(MAX_ICD);
    if let Some(n) = n {
        d.establish(n);
    }
    d
}

fn host_dec(n: Option<Negotiated>) -> PduDecoder {
    let mut d = PduDecoder::host(1 << 20);
    if let Some(n) = n {
        d.establish(n);
    }
    d
}

/// Header from an encoder, then the data and its digest when the header says so.
fn pdu(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = header.to_vec();
    v.extend_from_slice(data);
    if !data.is_empty() && header[1] & flags::DDGSTF != 0 {
        v.extend_from_slice(&DataDigest::new().tap(data).trailer());
    }
    v
}

trait Tap {
    fn tap(self, data: &[u8]) -> Self;
}

impl Tap for DataDigest {
    fn tap(mut self, data: &[u8]) -> Self {
        self.update(data);
        self
    }
}

fn encode(f: impl FnOnce(&mut [u8]) -> usize) -> Vec<u8> {
    let mut out = [0xeeu8; MAX_HEADER_LEN];
    let n = f(&mut out);
    out[..n].to_vec()
}

fn ready(d: &PduDecoder, buf: &[u8]) -> PduLayout {
    match d.decode(buf) {
        Ok(Decoded::Ready(l)) => {
            assert_eq!(l.plen, buf.len(), "PLEN covers the PDU");
            l
        }
        other => panic!("expected a PDU, got {other:?}"),
    }
}

fn fatal(d: &PduDecoder, buf: &[u8]) -> FatalError {
    match d.decode(buf) {
        Err(PduError::Fatal(f)) => {
            assert!(f.echo_len <= buf.len() && f.echo_len <= TERM_REQ_MAX_DATA);
            assert!(f.echo_len >= CH_LEN);
            f
        }
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

fn read_sqe(cid: u16, len: u32) -> Sqe {
    ReadWrite {
        nsid: 1,
        slba: 8,
        nlb: len / 512,
        ..ReadWrite::default()
    }
    .to_sqe(
        IoOpcode::Read,
        cid,
        &SglDescriptor::transport_data_block(len),
    )
}

fn write_sqe(cid: u16, len: u32) -> Sqe {
    ReadWrite {
        nsid: 1,
        slba: 8,
        nlb: len / 512,
        ..ReadWrite::default()
    }
    .to_sqe(IoOpcode::Write, cid, &SglDescriptor::in_capsule(0, len))
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// Digests

/// Bitwise CRC32C (reflected polynomial 0x82F63B78), the oracle for the crate.
fn crc32c_reference(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn crc32c_matches_known_check_values() {
    assert_eq!(header_digest(b"123456789"), 0xe306_9283);
    assert_eq!(DataDigest::of(&[b"1234", b"", b"56789"]), 0xe306_9283);
    assert_eq!(
        DataDigest::new().tap(b"123456789").trailer(),
        [0x83, 0x92, 0x06, 0xe3],
        "digests are sent little-endian"
    );
    // RFC 3720 (iSCSI) B.4 test vectors.
    assert_eq!(header_digest(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(header_digest(&[0xffu8; 32]), 0x62a8_ab43);
    let inc: Vec<u8> = (0..32).collect();
    assert_eq!(header_digest(&inc), 0x46dd_794e);
    let mut rng = Rng(7);
    for len in [0usize, 1, 3, 8, 63, 64, 65, 1000, 4096] {
        let buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert_eq!(header_digest(&buf), crc32c_reference(&buf), "len {len}");
        let (a, b) = buf.split_at(len / 3);
        assert_eq!(DataDigest::of(&[a, b]), crc32c_reference(&buf));
    }
}

#[test]
fn header_digest_is_sealed_over_hlen_bytes() {
    let enc = PduEncoder::established(Role::Controller, &neg(true, false));
    let cqe = Cqe::new(9, Status::SUCCESS);
    let b = encode(|o| enc.capsule_resp(&cqe, o));
    assert_eq!(b.len(), 28);
    assert_eq!(b[1], flags::HDGSTF);
    assert_eq!(get_u32(&b, 4), 28, "PLEN counts the digest");
    assert_eq!(get_u32(&b, 24), crc32c_reference(&b[..24]));
}

// ---------------------------------------------------------------------------------------------
// Round trips of every PDU type

#[test]
fn ic_req_and_ic_resp_round_trip() {
    let req = IcReq {
        pfv: 0,
        hpda: 3,
        hdgst: true,
        ddgst: true,
        maxr2t: 15,
    };
    let b = encode(|o| PduEncoder::new(Role::Host).ic_req(&req, o));
    assert_eq!(b.len(), 128);
    assert_eq!(&b[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
    assert_eq!((b[10], b[11]), (3, 0b11), "HPDA byte 10, DGST byte 11");
    assert_eq!(get_u32(&b, 12), 15, "MAXR2T bytes 15:12");
    assert!(b[16..].iter().all(|&x| x == 0));
    let l = ready(&ctrl_dec(None), &b);
    assert_eq!(l.header, PduHeader::IcReq(req));
    assert!(l.data.is_empty());

    let resp = IcResp {
        pfv: 0,
        cpda: 1,
        hdgst: true,
        ddgst: false,
        maxh2cdata: MAXH2CDATA,
    };
    let b = encode(|o| PduEncoder::new(Role::Controller).ic_resp(&resp, o));
    assert_eq!(&b[..4], &[1, 0, 128, 0]);
    assert_eq!((b[10], b[11]), (1, 0b01), "CPDA byte 10, DGST byte 11");
    assert_eq!(get_u32(&b, 12), MAXH2CDATA);
    let l = ready(&host_dec(None), &b);
    assert_eq!(l.header, PduHeader::IcResp(resp));
    let n = Negotiated::from_exchange(&req, &resp);
    assert_eq!((n.hdgst, n.ddgst, n.hpda, n.cpda), (true, false, 3, 1));
}

#[test]
fn capsule_cmd_round_trips_with_and_without_in_capsule_data() {
    for (hdgst, ddgst, cpda) in [
        (false, false, 0),
        (true, false, 0),
        (false, true, 0),
        (true, true, 0),
        (true, true, 7),
        (false, false, 31),
    ] {
        let n = Negotiated {
            cpda,
            ..neg(hdgst, ddgst)
        };
        let enc = PduEncoder::established(Role::Host, &n);
        let dec = ctrl_dec(Some(n));

        let sqe = read_sqe(0x1234, 4096);
        let b = encode(|o| enc.capsule_cmd(&sqe, 0, o));
        assert_eq!(b.len(), 72 + if hdgst { 4 } else { 0 });
        assert_eq!(b[3], 0, "no data: PDO 0");
        let l = ready(&dec, &b);
        assert_eq!(l.header, PduHeader::CapsuleCmd(CapsuleCmd { sqe }));
        assert!(l.data.is_empty());
        assert!(!l.data_digest);

        let icd = data(1000);
        let sqe = write_sqe(7, 1000);
        let h = encode(|o| enc.capsule_cmd(&sqe, 1000, o));
        let pdo = usize::from(h[3]);
        assert_eq!(h.len(), pdo, "the encoder returns PDO");
        assert_eq!(pdo % ((usize::from(cpda) + 1) * 4), 0);
        assert!(pdo >= 72 + if hdgst { 4 } else { 0 });
        let b = pdu(&h, &icd);
        assert_eq!(
            get_u32(&b, 4) as usize,
            pdo + 1000 + if ddgst { 4 } else { 0 }
        );
        let l = ready(&dec, &b);
        assert_eq!(l.header, PduHeader::CapsuleCmd(CapsuleCmd { sqe }));
        assert_eq!(&b[l.data.clone()], &icd[..]);
        assert_eq!(l.data_digest, ddgst);
        assert_eq!(l.data.start, pdo);
    }
}

#[test]
fn capsule_resp_round_trip() {
    for hdgst in [false, true] {
        let n = neg(hdgst, true);
        let cqe = Cqe {
            dw0: 0x55,
            sqhd: 3,
            sqid: 1,
            cid: 0x42,
            status: Status::LBA_OUT_OF_RANGE,
            ..Cqe::default()
        };
        let b = encode(|o| PduEncoder::established(Role::Controller, &n).capsule_resp(&cqe, o));
        assert_eq!(&b[8..24], &cqe.to_bytes());
        let l = ready(&host_dec(Some(n)), &b);
        assert_eq!(l.header, PduHeader::CapsuleResp(CapsuleResp { cqe }));
    }
}

#[test]
fn h2c_data_round_trip() {
    for (hdgst, ddgst) in [(false, false), (true, true), (false, true)] {
        let n = Negotiated {
            cpda: 1,
            ..neg(hdgst, ddgst)
        };
        let h = H2cData {
            cccid: 3,
            ttag: 9,
            datao: 8192,
            datal: 4096,
            last: true,
        };
        let hdr = encode(|o| PduEncoder::established(Role::Host, &n).h2c_data(&h, o));
        assert_eq!(&hdr[8..20], &[3, 0, 9, 0, 0, 0x20, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(hdr[1] & flags::LAST_PDU, flags::LAST_PDU);
        let payload = data(4096);
        let b = pdu(&hdr, &payload);
        let l = ready(&ctrl_dec(Some(n)), &b);
        assert_eq!(l.header, PduHeader::H2cData(h));
        assert_eq!(&b[l.data.clone()], &payload[..]);
    }
}

#[test]
fn c2h_data_round_trip_with_last_and_success() {
    for (hdgst, ddgst, hpda) in [(false, false, 0), (true, true, 7), (true, false, 2)] {
        let n = Negotiated {
            hpda,
            ..neg(hdgst, ddgst)
        };
        let enc = PduEncoder::established(Role::Controller, &n);
        for (last, success) in [(false, false), (true, false), (true, true)] {
            let h = C2hData {
                cccid: 0xabcd,
                datao: 512,
                datal: 3000,
                last,
                success,
            };
            let hdr = encode(|o| enc.c2h_data(&h, o));
            let pdo = usize::from(hdr[3]);
            assert_eq!(hdr.len(), pdo);
            assert_eq!(pdo % ((usize::from(hpda) + 1) * 4), 0, "PDO honors HPDA");
            assert!(
                hdr[24 + if hdgst { 4 } else { 0 }..]
                    .iter()
                    .all(|&x| x == 0),
                "padding is zero"
            );
            assert_eq!(&hdr[10..12], &[0, 0], "C2HData bytes 11:10 reserved");
            let payload = data(3000);
            let b = pdu(&hdr, &payload);
            let l = ready(&host_dec(Some(n)), &b);
            assert_eq!(l.header, PduHeader::C2hData(h));
            assert_eq!(&b[l.data.clone()], &payload[..]);
        }
    }
}

#[test]
fn c2h_data_padding_for_hpda_7_with_header_digest() {
    let n = Negotiated {
        hpda: 7,
        ..neg(true, true)
    };
    let h = C2hData {
        cccid: 1,
        datao: 0,
        datal: 100,
        last: true,
        success: true,
    };
    let hdr = encode(|o| PduEncoder::established(Role::Controller, &n).c2h_data(&h, o));
    assert_eq!(hdr.len(), 32, "24 + 4 digest, aligned to (7 + 1) * 4");
    assert_eq!(hdr[3], 32);
    assert_eq!(get_u32(&hdr, 4), 32 + 100 + 4);
    assert_eq!(
        hdr[1],
        flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU | flags::SUCCESS
    );
    assert_eq!(get_u32(&hdr, 24), crc32c_reference(&hdr[..24]));
    assert_eq!(&hdr[28..32], &[0, 0, 0, 0]);
}

#[test]
fn r2t_round_trip() {
    for hdgst in [false, true] {
        let n = neg(hdgst, false);
        let r = R2t {
            cccid: 5,
            ttag: 2,
            r2to: 0,
            r2tl: 131_072,
        };
        let b = encode(|o| PduEncoder::established(Role::Controller, &n).r2t(&r, o));
        assert_eq!(&b[8..20], &[5, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        let l = ready(&host_dec(Some(n)), &b);
        assert_eq!(l.header, PduHeader::R2t(r));
    }
}

#[test]
fn term_reqs_round_trip_in_both_directions() {
    let offending: Vec<u8> = (0..200).map(|i| i as u8).collect();
    for established in [None, Some(neg(true, true))] {
        let b = encode(|o| {
            PduEncoder::new(Role::Controller).term_req(Fes::INVALID_HEADER_FIELD, 3, &offending, o)
        });
        assert_eq!(b.len(), 152, "24 + at most 128 echoed bytes");
        assert_eq!(&b[..4], &[3, 0, 24, 0]);
        assert_eq!(&b[8..14], &[1, 0, 3, 0, 0, 0], "FES 9:8, FEI 13:10");
        let l = ready(&host_dec(established), &b);
        assert_eq!(
            l.header,
            PduHeader::C2hTermReq(TermReq {
                fes: Fes::INVALID_HEADER_FIELD,
                fei: 3
            })
        );
        assert_eq!(&b[l.data.clone()], &offending[..128]);

        let b = encode(|o| {
            PduEncoder::new(Role::Host).term_req(Fes::HEADER_DIGEST_ERROR, 77, &offending[..24], o)
        });
        let l = ready(&ctrl_dec(established), &b);
        assert_eq!(
            l.header,
            PduHeader::H2cTermReq(TermReq {
                fes: Fes::HEADER_DIGEST_ERROR,
                fei: 0
            }),
            "FEI is reserved for a header digest error"
        );
        assert_eq!(l.data, 24..48);
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile headers: each gets its FES and FEI

/// A valid CapsuleCmd with 512 bytes of in-capsule data under `n`.
fn capsule_with_data(n: &Negotiated) -> Vec<u8> {
    let enc = PduEncoder::established(Role::Host, n);
    let h = encode(|o| enc.capsule_cmd(&write_sqe(1, 512), 512, o));
    pdu(&h, &data(512))
}

fn h2c(n: &Negotiated, datal: u32) -> Vec<u8> {
    let enc = PduEncoder::established(Role::Host, n);
    let h = H2cData {
        cccid: 1,
        ttag: 1,
        datao: 0,
        datal,
        last: true,
    };
    let hdr = encode(|o| enc.h2c_data(&h, o));
    pdu(&hdr, &data(datal as usize))
}

fn set_plen(b: &mut [u8], plen: usize) {
    put_u32(b, 4, plen as u32);
}

fn assert_fes(d: &PduDecoder, b: &[u8], fes: Fes, fei: u32, case: &str) {
    let f = fatal(d, b);
    assert_eq!((f.fes, f.fei), (fes, fei), "{case}");
    // The termination request built from it is what the peer decodes.
    let enc = PduEncoder::new(d.role());
    let t = encode(|o| enc.term_req_for(&f, b, o));
    let peer = match d.role() {
        Role::Controller => host_dec(None),
        Role::Host => ctrl_dec(None),
    };
    let l = ready(&peer, &t);
    let expected = TermReq {
        fes,
        fei: if fes.has_field_offset() { fei } else { 0 },
    };
    match l.header {
        PduHeader::C2hTermReq(t) | PduHeader::H2cTermReq(t) => assert_eq!(t, expected, "{case}"),
        h => panic!("{case}: {h:?}"),
    }
    assert_eq!(
        &t[l.data.clone()],
        &b[..f.echo_len],
        "{case}: echoes the header"
    );
}

const IHF: Fes = Fes::INVALID_HEADER_FIELD;

#[test]
fn unknown_or_misdirected_pdu_type_is_invalid_header_field_0() {
    let n = neg(false, false);
    let d = ctrl_dec(Some(n));
    for ty in [0x08u8, 0x0a, 0x0b, 0x7f, 0xff] {
        let mut b = capsule_with_data(&n);
        b[0] = ty;
        assert_fes(&d, &b, IHF, 0, &format!("type {ty:#x}"));
    }
    // Controller-to-host PDUs sent to the controller, and the reverse.
    let resp =
        encode(|o| PduEncoder::established(Role::Controller, &n).capsule_resp(&Cqe::default(), o));
    assert_fes(&d, &resp, IHF, 0, "CapsuleResp to a controller");
    assert_fes(
        &host_dec(Some(n)),
        &capsule_with_data(&n),
        IHF,
        0,
        "CapsuleCmd to a host",
    );
    let icreq = encode(|o| PduEncoder::new(Role::Host).ic_req(&IcReq::default(), o));
    assert_fes(&host_dec(None), &icreq, IHF, 0, "ICReq to a host");
}

#[test]
fn pdus_out_of_sequence_are_pdu_sequence_errors() {
    let n = neg(false, false);
    let icreq = encode(|o| PduEncoder::new(Role::Host).ic_req(&IcReq::default(), o));
    let seq = Fes::PDU_SEQUENCE_ERROR;
    assert_fes(&ctrl_dec(Some(n)), &icreq, seq, 0, "second ICReq");
    assert_fes(
        &ctrl_dec(None),
        &capsule_with_data(&n),
        seq,
        0,
        "command first",
    );
    assert_fes(&ctrl_dec(None), &h2c(&n, 64), seq, 0, "data first");
    let resp = encode(|o| {
        PduEncoder::new(Role::Controller).ic_resp(
            &IcResp {
                maxh2cdata: MAXH2CDATA,
                ..IcResp::default()
            },
            o,
        )
    });
    assert_fes(&host_dec(Some(n)), &resp, seq, 0, "second ICResp");
    let r2t = encode(|o| {
        PduEncoder::new(Role::Controller).r2t(
            &R2t {
                r2tl: 1,
                ..R2t::default()
            },
            o,
        )
    });
    assert_fes(&host_dec(None), &r2t, seq, 0, "R2T before ICResp");
}

#[test]
fn flags_errors_are_invalid_header_field_1() {
    let plain = neg(false, false);
    let digests = neg(true, true);
    let d_plain = ctrl_dec(Some(plain));
    let d_dig = ctrl_dec(Some(digests));

    let mut b = capsule_with_data(&plain);
    b[1] |= 0x10;
    assert_fes(&d_plain, &b, IHF, 1, "reserved flag bit");
    let mut b = capsule_with_data(&plain);
    b[1] |= flags::LAST_PDU;
    assert_fes(&d_plain, &b, IHF, 1, "LAST_PDU on a CapsuleCmd");
    assert_fes(
        &d_plain,
        &capsule_with_data(&neg(true, false)),
        IHF,
        1,
        "HDGSTF not negotiated",
    );
    assert_fes(
        &d_plain,
        &capsule_with_data(&neg(false, true)),
        IHF,
        1,
        "DDGSTF not negotiated",
    );
    assert_fes(
        &d_dig,
        &capsule_with_data(&neg(false, true)),
        IHF,
        1,
        "header digest missing",
    );
    assert_fes(
        &d_dig,
        &capsule_with_data(&neg(true, false)),
        IHF,
        1,
        "data digest missing",
    );

    // DDGSTF without data.
    let mut b = encode(|o| {
        PduEncoder::established(Role::Host, &digests).capsule_cmd(&read_sqe(1, 512), 0, o)
    });
    b[1] |= flags::DDGSTF;
    assert_fes(&d_dig, &b, IHF, 1, "DDGSTF on a PDU without data");

    // Digest flags on PDUs that never carry digests.
    let mut b = encode(|o| PduEncoder::new(Role::Host).ic_req(&IcReq::default(), o));
    b[1] = flags::HDGSTF;
    assert_fes(&ctrl_dec(None), &b, IHF, 1, "HDGSTF on ICReq");
    let mut b = encode(|o| PduEncoder::new(Role::Host).term_req(Fes(1), 0, &[0; 8], o));
    b[1] = flags::HDGSTF;
    assert_fes(&d_dig, &b, IHF, 1, "HDGSTF on H2CTermReq");

    // SUCCESS without LAST_PDU (host side).
    let enc = PduEncoder::established(Role::Controller, &plain);
    let h = C2hData {
        cccid: 1,
        datao: 0,
        datal: 16,
        last: true,
        success: true,
    };
    let mut b = pdu(&encode(|o| enc.c2h_data(&h, o)), &data(16));
    b[1] &= !flags::LAST_PDU;
    assert_fes(
        &host_dec(Some(plain)),
        &b,
        IHF,
        1,
        "SUCCESS without LAST_PDU",
    );
}

#[test]
fn wrong_hlen_is_invalid_header_field_2() {
    let n = neg(false, false);
    let mut b = capsule_with_data(&n);
    b[2] = 71;
    assert_fes(&ctrl_dec(Some(n)), &b, IHF, 2, "CapsuleCmd HLEN 71");
    let mut b = h2c(&n, 64);
    b[2] = 28;
    assert_fes(&ctrl_dec(Some(n)), &b, IHF, 2, "H2CData HLEN 28");
    let mut b = encode(|o| PduEncoder::new(Role::Host).ic_req(&IcReq::default(), o));
    b[2] = 127;
    assert_fes(&ctrl_dec(None), &b, IHF, 2, "ICReq HLEN 127");
}

#[test]
fn bad_pdo_is_invalid_header_field_3() {
    let n = neg(false, false);
    let d = ctrl_dec(Some(n));
    let cases: [(u8, &str); 4] = [
        (74, "not dword aligned"),
        (64, "inside the header"),
        (0, "zero with data"),
        (255, "not dword aligned, past the header"),
    ];
    for (pdo, case) in cases {
        let mut b = capsule_with_data(&n);
        b[3] = pdo;
        assert_fes(&d, &b, IHF, 3, case);
    }
    // 8 bytes of in-capsule data: PLEN 80, PDO 84 is aligned but outside the PDU.
    let small = pdu(
        &encode(|o| PduEncoder::established(Role::Host, &n).capsule_cmd(&write_sqe(1, 8), 8, o)),
        &data(8),
    );
    assert_eq!(small.len(), 80);
    let mut b = small.clone();
    b[3] = 84;
    assert_fes(&d, &b, IHF, 3, "beyond PLEN");
    // CPDA 1: data must start on 8 bytes; 76 is dword aligned only.
    let strict = Negotiated { cpda: 1, ..n };
    let mut b = capsule_with_data(&n);
    let plen = b.len();
    b.splice(72..72, [0u8; 4]);
    b[3] = 76;
    set_plen(&mut b, plen + 4);
    assert_fes(&ctrl_dec(Some(strict)), &b, IHF, 3, "PDO not honoring CPDA");
    assert!(
        matches!(ctrl_dec(Some(n)).decode(&b), Ok(Decoded::Ready(_))),
        "fine with CPDA 0"
    );

    let mut b = encode(|o| PduEncoder::new(Role::Host).ic_req(&IcReq::default(), o));
    b[3] = 8;
    assert_fes(&ctrl_dec(None), &b, IHF, 3, "PDO on ICReq");
    let mut b = encode(|o| {
        PduEncoder::established(Role::Controller, &n).r2t(
            &R2t {
                r2tl: 1,
                ..R2t::default()
            },
            o,
        )
    });
    b[3] = 24;
    assert_fes(&host_dec(Some(n)), &b, IHF, 3, "PDO on R2T");
    // HPDA on the host side.
    let hn = Negotiated { hpda: 3, ..n };
    let h = C2hData {
        cccid: 1,
        datao: 0,
        datal: 16,
        last: true,
        success: false,
    };
    let b = pdu(
        &encode(|o| PduEncoder::established(Role::Controller, &n).c2h_data(&h, o)),
        &data(16),
    );
    assert_fes(&host_dec(Some(hn)), &b, IHF, 3, "PDO not honoring HPDA");
}

#[test]
fn bad_plen_is_invalid_header_field_4() {
    let plain = neg(false, false);
    let d = ctrl_dec(Some(plain));
    let mut b = capsule_with_data(&plain);
    b[3] = 0;
    set_plen(&mut b, 60);
    assert_fes(&d, &b, IHF, 4, "PLEN smaller than HLEN");

    let hd = neg(true, false);
    let mut b =
        encode(|o| PduEncoder::established(Role::Host, &hd).capsule_cmd(&read_sqe(1, 8), 0, o));
    set_plen(&mut b, 74);
    assert_fes(
        &ctrl_dec(Some(hd)),
        &b,
        IHF,
        4,
        "PLEN smaller than HLEN + HDGST",
    );

    let dd = neg(false, true);
    let mut b = capsule_with_data(&dd);
    set_plen(&mut b, 72 + 4);
    assert_fes(
        &ctrl_dec(Some(dd)),
        &b,
        IHF,
        4,
        "PLEN holds only the data digest",
    );

    let mut b = encode(|o| PduEncoder::new(Role::Host).ic_req(&IcReq::default(), o));
    set_plen(&mut b, 129);
    assert_fes(&ctrl_dec(None), &b, IHF, 4, "ICReq PLEN 129");

    let mut b = encode(|o| {
        PduEncoder::established(Role::Controller, &plain).capsule_resp(&Cqe::default(), o)
    });
    set_plen(&mut b, 28);
    assert_fes(&host_dec(Some(plain)), &b, IHF, 4, "CapsuleResp with data");
}

#[test]
fn data_beyond_limits_is_data_transfer_limit_exceeded() {
    let n = neg(true, true);
    let lim = Fes::DATA_TRANSFER_LIMIT_EXCEEDED;
    // The limit is enforced from the header alone, before the data arrives.
    let mut b = capsule_with_data(&n);
    set_plen(&mut b, 76 + MAX_ICD as usize + 1 + 4);
    assert_fes(
        &ctrl_dec(Some(n)),
        &b[..76],
        lim,
        0,
        "in-capsule data over the limit",
    );
    let mut d = ctrl_dec(Some(n));
    d.set_max_in_capsule(256);
    assert_fes(
        &d,
        &capsule_with_data(&n),
        lim,
        0,
        "in-capsule data over a smaller limit",
    );

    let mut b = h2c(&n, 64);
    set_plen(&mut b, 28 + MAXH2CDATA as usize + 1 + 4);
    put_u32(&mut b, 16, MAXH2CDATA + 1);
    assert_fes(&ctrl_dec(Some(n)), &b, lim, 0, "H2CData over MAXH2CDATA");
    let mut b = h2c(&n, 64);
    set_plen(&mut b, u32::MAX as usize);
    assert_fes(&ctrl_dec(Some(n)), &b[..28], lim, 0, "PLEN 4 GiB");

    let mut hd = host_dec(Some(n));
    hd.set_max_c2h_data(32);
    let h = C2hData {
        cccid: 1,
        datao: 0,
        datal: 64,
        last: false,
        success: false,
    };
    let b = pdu(
        &encode(|o| PduEncoder::established(Role::Controller, &n).c2h_data(&h, o)),
        &data(64),
    );
    assert_fes(&hd, &b, lim, 0, "C2HData over the host's limit");
}

#[test]
fn data_length_fields_must_match_plen() {
    let n = neg(false, true);
    let d = ctrl_dec(Some(n));
    let mut b = h2c(&n, 64);
    put_u32(&mut b, 16, 63);
    assert_fes(&d, &b, IHF, 16, "DATAL smaller than the data");
    let mut b = encode(|o| {
        PduEncoder::established(Role::Host, &neg(false, false)).h2c_data(
            &H2cData {
                datal: 1,
                ..H2cData::default()
            },
            o,
        )
    });
    put_u32(&mut b, 16, 0);
    set_plen(&mut b, 24);
    b[3] = 0;
    assert_fes(
        &ctrl_dec(Some(neg(false, false))),
        &b,
        IHF,
        16,
        "H2CData without data",
    );
    let mut b = encode(|o| PduEncoder::established(Role::Controller, &n).r2t(&R2t::default(), o));
    put_u32(&mut b, 16, 0);
    assert_fes(&host_dec(Some(n)), &b, IHF, 16, "R2T of length 0");
}

#[test]
fn header_digest_mismatch_is_header_digest_error() {
    let n = neg(true, false);
    let d = ctrl_dec(Some(n));
    let good = capsule_with_data(&n);
    for byte in [8usize, 40, 71, 72, 75] {
        let mut b = good.clone();
        b[byte] ^= 0x01;
        assert_fes(
            &d,
            &b,
            Fes::HEADER_DIGEST_ERROR,
            0,
            &format!("flip byte {byte}"),
        );
    }
    let h = fatal(&d, &{
        let mut b = good.clone();
        b[20] ^= 0x80;
        b
    });
    assert_eq!(h.echo_len, 72, "the whole header is echoed");
}

#[test]
fn data_digest_mismatch_is_a_command_error_not_fatal() {
    let n = neg(false, true);
    let d = ctrl_dec(Some(n));
    let mut b = capsule_with_data(&n);
    let last = b.len() - 1;
    b[100] ^= 0xff;
    match d.decode(&b) {
        Err(e @ PduError::DataDigest(_)) => {
            assert!(!e.is_fatal());
            let PduError::DataDigest(l) = e else {
                unreachable!()
            };
            assert_eq!(l.plen, b.len(), "the connection can skip the PDU");
            let PduHeader::CapsuleCmd(c) = l.header else {
                panic!()
            };
            assert_eq!(c.sqe.cid(), 1, "and fail its command");
        }
        other => panic!("{other:?}"),
    }
    b[100] ^= 0xff;
    b[last] ^= 1;
    assert!(
        matches!(d.decode(&b), Err(PduError::DataDigest(_))),
        "digest byte itself"
    );
    // decode_header does not look at the data.
    assert!(matches!(d.decode_header(&b), Ok(Decoded::Ready(_))));
}

#[test]
fn ic_parameters_are_checked() {
    let enc = PduEncoder::new(Role::Host);
    let b = encode(|o| {
        enc.ic_req(
            &IcReq {
                pfv: 1,
                ..IcReq::default()
            },
            o,
        )
    });
    assert_fes(
        &ctrl_dec(None),
        &b,
        Fes::UNSUPPORTED_PARAMETER,
        8,
        "ICReq PFV 1",
    );
    let b = encode(|o| {
        enc.ic_req(
            &IcReq {
                hpda: 32,
                ..IcReq::default()
            },
            o,
        )
    });
    assert_fes(&ctrl_dec(None), &b, IHF, 10, "ICReq HPDA 32");

    let enc = PduEncoder::new(Role::Controller);
    let ok = IcResp {
        maxh2cdata: MIN_MAXH2CDATA,
        ..IcResp::default()
    };
    assert!(matches!(
        host_dec(None).decode(&encode(|o| enc.ic_resp(&ok, o))),
        Ok(Decoded::Ready(_))
    ));
    let b = encode(|o| enc.ic_resp(&IcResp { pfv: 2, ..ok }, o));
    assert_fes(
        &host_dec(None),
        &b,
        Fes::UNSUPPORTED_PARAMETER,
        8,
        "ICResp PFV 2",
    );
    let b = encode(|o| enc.ic_resp(&IcResp { cpda: 40, ..ok }, o));
    assert_fes(&host_dec(None), &b, IHF, 10, "ICResp CPDA 40");
    for m in [0, 4095, 4098] {
        let b = encode(|o| {
            enc.ic_resp(
                &IcResp {
                    maxh2cdata: m,
                    ..ok
                },
                o,
            )
        });
        assert_fes(&host_dec(None), &b, IHF, 12, &format!("MAXH2CDATA {m}"));
    }
}

#[test]
fn malformed_term_req_length_closes_without_reply() {
    let n = neg(true, true);
    let mut b = encode(|o| PduEncoder::new(Role::Host).term_req(Fes(2), 0, &[0; 16], o));
    for plen in [0usize, 23, 153, 1 << 20] {
        set_plen(&mut b, plen);
        assert_eq!(
            ctrl_dec(Some(n)).decode(&b),
            Err(PduError::Close),
            "PLEN {plen}"
        );
        assert_eq!(ctrl_dec(None).decode(&b[..8]), Err(PduError::Close));
    }
}

#[test]
fn lowest_incorrect_field_is_reported_first() {
    let n = neg(false, false);
    let mut b = capsule_with_data(&n);
    b[1] = 0x80; // flags
    b[2] = 10; // hlen
    b[3] = 3; // pdo
    assert_fes(&ctrl_dec(Some(n)), &b, IHF, 1, "flags before HLEN and PDO");
    b[1] = 0;
    assert_fes(&ctrl_dec(Some(n)), &b, IHF, 2, "HLEN before PDO");
}

// ---------------------------------------------------------------------------------------------
// Partial buffers

/// The PDUs a controller receives on one connection: ICReq, then (established with digests and
/// CPDA 3) commands, data and a termination request.
fn controller_stream() -> (Vec<u8>, Vec<Vec<u8>>, Negotiated) {
    let req = IcReq {
        pfv: 0,
        hpda: 1,
        hdgst: true,
        ddgst: true,
        maxr2t: 0,
    };
    let ic = encode(|o| PduEncoder::new(Role::Host).ic_req(&req, o));
    let n = Negotiated {
        cpda: 3,
        ..neg(true, true)
    };
    let enc = PduEncoder::established(Role::Host, &n);
    let mut rest = vec![
        pdu(
            &encode(|o| enc.capsule_cmd(&write_sqe(1, 700), 700, o)),
            &data(700),
        ),
        encode(|o| enc.capsule_cmd(&read_sqe(2, 4096), 0, o)),
    ];
    rest.push(pdu(
        &encode(|o| {
            enc.h2c_data(
                &H2cData {
                    cccid: 3,
                    ttag: 1,
                    datao: 0,
                    datal: 333,
                    last: true,
                },
                o,
            )
        }),
        &data(333),
    ));
    rest.push(encode(|o| enc.term_req(Fes(2), 0, &rest[1][..72], o)));
    (ic, rest, n)
}

fn assert_needs_more_at_every_split(d: &PduDecoder, p: &[u8]) {
    let header_len = match d.decode_header(p) {
        Ok(Decoded::Ready(l)) => l.header_len,
        other => panic!("{other:?}"),
    };
    for k in 0..p.len() {
        match d.decode(&p[..k]) {
            Ok(Decoded::NeedMore(n)) => {
                assert!(n >= 1);
                assert!(k + n <= p.len(), "never asks past the PDU: k={k} n={n}");
            }
            other => panic!("prefix {k} of {}: {other:?}", p.len()),
        }
        match d.decode_header(&p[..k]) {
            Ok(Decoded::NeedMore(n)) => assert!(k < header_len && k + n <= header_len),
            Ok(Decoded::Ready(l)) => {
                assert!(k >= header_len);
                assert_eq!(l.header_len, header_len);
            }
            Err(e) => panic!("header prefix {k}: {e:?}"),
        }
    }
    assert!(matches!(d.decode(p), Ok(Decoded::Ready(_))));
}

#[test]
fn every_split_point_of_every_pdu_needs_more() {
    let (ic, rest, n) = controller_stream();
    assert_needs_more_at_every_split(&ctrl_dec(None), &ic);
    let d = ctrl_dec(Some(n));
    for p in &rest {
        assert_needs_more_at_every_split(&d, p);
    }
    // Host side: ICResp, then responses and data with HPDA padding.
    let resp = IcResp {
        maxh2cdata: MAXH2CDATA,
        hdgst: true,
        ddgst: true,
        ..IcResp::default()
    };
    assert_needs_more_at_every_split(
        &host_dec(None),
        &encode(|o| PduEncoder::new(Role::Controller).ic_resp(&resp, o)),
    );
    let hn = Negotiated {
        hpda: 5,
        ..neg(true, true)
    };
    let enc = PduEncoder::established(Role::Controller, &hn);
    let hd = host_dec(Some(hn));
    let c2h = C2hData {
        cccid: 9,
        datao: 0,
        datal: 77,
        last: true,
        success: true,
    };
    assert_needs_more_at_every_split(&hd, &pdu(&encode(|o| enc.c2h_data(&c2h, o)), &data(77)));
    assert_needs_more_at_every_split(&hd, &encode(|o| enc.capsule_resp(&Cqe::default(), o)));
    assert_needs_more_at_every_split(
        &hd,
        &encode(|o| {
            enc.r2t(
                &R2t {
                    r2tl: 4096,
                    ..R2t::default()
                },
                o,
            )
        }),
    );
}

/// Feeds `stream` to a receive buffer `chunk` bytes at a time, consuming PDUs as they
/// complete; returns the headers in order.
fn feed(stream: &[u8], ic_len: usize, n: Negotiated, chunk: usize) -> Vec<PduHeader> {
    let mut d = ctrl_dec(None);
    let mut rx: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut consumed = 0;
    for piece in stream.chunks(chunk) {
        rx.extend_from_slice(piece);
        loop {
            match d.decode(&rx) {
                Ok(Decoded::NeedMore(_)) => break,
                Ok(Decoded::Ready(l)) => {
                    out.push(l.header);
                    rx.drain(..l.plen);
                    consumed += l.plen;
                    if consumed == ic_len {
                        d.establish(n);
                    }
                }
                Err(e) => panic!("chunk {chunk}: {e:?}"),
            }
        }
    }
    assert!(rx.is_empty());
    out
}

#[test]
fn a_stream_decodes_the_same_whatever_the_chunking() {
    let (ic, rest, n) = controller_stream();
    let mut stream = ic.clone();
    for p in &rest {
        stream.extend_from_slice(p);
    }
    let whole = feed(&stream, ic.len(), n, stream.len());
    assert_eq!(whole.len(), 1 + rest.len());
    assert_eq!(whole[0].pdu_type(), PduType::IcReq);
    assert_eq!(whole[4].pdu_type(), PduType::H2cTermReq);
    for chunk in 1..=19 {
        assert_eq!(feed(&stream, ic.len(), n, chunk), whole, "chunk {chunk}");
    }
}

// ---------------------------------------------------------------------------------------------
// Random and mutated input never panics

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// How often each outcome was seen: NeedMore, Ready, Fatal (by FES), Close, DataDigest.
#[derive(Default, Debug)]
struct Outcomes {
    need_more: usize,
    ready: usize,
    fatal: [usize; 7],
    close: usize,
    data_digest: usize,
}

/// Decodes PDUs from `buf` until it needs more or fails, checking the decoder's promises.
fn decode_all(d: &PduDecoder, mut buf: &[u8], seen: &mut Outcomes) {
    loop {
        match d.decode(buf) {
            Ok(Decoded::NeedMore(n)) => {
                assert!(n >= 1);
                seen.need_more += 1;
                return;
            }
            Ok(Decoded::Ready(l)) => {
                assert!(l.plen <= buf.len() && l.plen >= CH_LEN);
                assert!(l.header_len <= l.plen);
                assert!(l.data.start <= l.data.end && l.data.end <= l.plen);
                seen.ready += 1;
                buf = &buf[l.plen..];
            }
            Err(PduError::Fatal(f)) => {
                assert!(f.echo_len <= buf.len() && f.echo_len <= TERM_REQ_MAX_DATA);
                let mut out = [0u8; MAX_HEADER_LEN];
                let n = PduEncoder::new(d.role()).term_req_for(&f, buf, &mut out);
                assert!(n <= TERM_REQ_MAX_PLEN);
                seen.fatal[usize::from(f.fes.0).min(6)] += 1;
                return;
            }
            Err(PduError::Close) => {
                seen.close += 1;
                return;
            }
            Err(PduError::DataDigest(l)) => {
                assert!(l.plen <= buf.len());
                seen.data_digest += 1;
                buf = &buf[l.plen..];
            }
        }
    }
}

fn decoders() -> Vec<PduDecoder> {
    let mut v = vec![ctrl_dec(None), host_dec(None)];
    for (h, dd, pda) in [
        (false, false, 0),
        (true, true, 0),
        (true, false, 3),
        (false, true, 31),
    ] {
        let n = Negotiated {
            hpda: pda,
            cpda: pda,
            ..neg(h, dd)
        };
        v.push(ctrl_dec(Some(n)));
        v.push(host_dec(Some(n)));
    }
    v
}

fn valid_corpus() -> Vec<Vec<u8>> {
    let (ic, mut rest, _) = controller_stream();
    rest.push(ic);
    let n = neg(true, true);
    let enc = PduEncoder::established(Role::Controller, &n);
    rest.push(encode(|o| enc.capsule_resp(&Cqe::default(), o)));
    rest.push(encode(|o| {
        enc.r2t(
            &R2t {
                r2tl: 9,
                ..R2t::default()
            },
            o,
        )
    }));
    rest.push(pdu(
        &encode(|o| {
            enc.c2h_data(
                &C2hData {
                    cccid: 1,
                    datao: 0,
                    datal: 40,
                    last: true,
                    success: false,
                },
                o,
            )
        }),
        &data(40),
    ));
    rest.push(capsule_with_data(&neg(false, false)));
    rest.push(h2c(&neg(false, false), 100));
    rest
}

#[test]
fn random_and_mutated_input_never_panics() {
    let decoders = decoders();
    let corpus = valid_corpus();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seen = Outcomes::default();
    for i in 0..200_000 {
        let buf: Vec<u8> = if i % 2 == 0 {
            let len = rng.below(320);
            let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Bias towards plausible headers so the checks past the type are reached.
            if len >= 8 && rng.below(2) == 0 {
                b[0] = rng.below(10) as u8;
                b[2] = [24u8, 72, 128][rng.below(3)];
                b[3] = [0u8, 24, 28, 72, 76, 128][rng.below(6)];
                put_u32(&mut b, 4, rng.below(len + 8) as u32);
            }
            b
        } else {
            let mut b = corpus[rng.below(corpus.len())].clone();
            for _ in 0..=rng.below(3) {
                match rng.below(4) {
                    0 if !b.is_empty() => {
                        let at = rng.below(b.len().min(160));
                        b[at] ^= 1 << rng.below(8);
                    }
                    1 if !b.is_empty() => {
                        let at = rng.below(b.len().min(160));
                        b[at] = rng.next() as u8;
                    }
                    2 => b.truncate(rng.below(b.len() + 1)),
                    _ => {
                        let extra = rng.below(64);
                        b.extend((0..extra).map(|_| rng.next() as u8));
                    }
                }
            }
            b
        };
        let d = &decoders[rng.below(decoders.len())];
        decode_all(d, &buf, &mut seen);
        let _ = d.decode_header(&buf);
    }
    // The run reached every outcome, so it exercised the checks, not only the type byte.
    assert!(
        seen.need_more > 0 && seen.ready > 0 && seen.close > 0,
        "{seen:?}"
    );
    assert!(seen.data_digest > 0, "{seen:?}");
    for fes in [1, 2, 3, 5, 6] {
        assert!(seen.fatal[fes] > 0, "FES {fes} never seen: {seen:?}");
    }
}
