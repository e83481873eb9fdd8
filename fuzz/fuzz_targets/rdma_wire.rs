//! Feeds arbitrary bytes to the NVMe/RDMA connect private data and command capsule parsers.
//! Body: `ferroblk_target::fuzzing::rdma_wire`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferroblk_target::fuzzing::rdma_wire(data));
