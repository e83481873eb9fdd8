//! A hostile NVMe/TCP controller's byte stream against this project's initiator (what a remote
//! target can send the `nvmf` bdev). Body: `ferroblk_target::fuzzing::nvmf_host`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferroblk_target::fuzzing::nvmf_host(data);
});
