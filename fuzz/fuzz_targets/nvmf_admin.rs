//! Sends fuzz-chosen command capsules and H2CData PDUs (Connect, Property Get/Set, admin and
//! I/O commands) to a live NVMe/TCP target over loopback. Body:
//! `ferroblk_target::fuzzing::nvmf_admin`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferroblk_target::fuzzing::nvmf_admin(data);
});
