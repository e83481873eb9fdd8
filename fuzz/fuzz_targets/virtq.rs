//! Runs a virtio-blk queue poller over guest memory (rings, descriptors, indirect tables,
//! request headers) laid out by the input. Body: `ferroblk_vhost::fuzzing::virtq`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferroblk_vhost::fuzzing::virtq(data));
