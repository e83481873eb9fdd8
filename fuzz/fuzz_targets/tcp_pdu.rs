//! Feeds arbitrary bytes to the NVMe/TCP PDU decoder, as a controller and as a host, before and
//! after the connection is established, with and without digests and with any PDU data
//! alignment. The decoder must never panic and must keep its promises: `NeedMore` asks for at
//! least one byte, a decoded PDU lies within the buffer, a fatal error echoes at most the bytes
//! it was given and always yields an encodable termination request.
//!
//! The first input byte selects the configuration: bit 0 role (controller/host), bit 1
//! established, bit 2 header digests, bit 3 data digests, bits 7:4 the PDA (0..15) of both
//! directions. An ICReq/ICResp decoded before establishment establishes the decoder with that
//! configuration, so the fuzzer can cross the state change.

#![no_main]

use ferroblk_target::transport::tcp::pdu::{
    CH_LEN, Decoded, MAX_HEADER_LEN, Negotiated, PduDecoder, PduEncoder, PduError, PduHeader, Role,
    TERM_REQ_MAX_DATA, TERM_REQ_MAX_PLEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
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
});
