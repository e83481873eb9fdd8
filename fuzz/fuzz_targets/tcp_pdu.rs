//! Feeds arbitrary bytes to the NVMe/TCP PDU decoder, as a controller and as a host, before and
//! after establishment, with any digests and PDA. Body: `ferroblk_target::fuzzing::tcp_pdu`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferroblk_target::fuzzing::tcp_pdu(data));
