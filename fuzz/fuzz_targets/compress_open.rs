//! Opens a compress bdev over a base whose first blocks (superblock, chunk map, data) come from
//! the input: it must fail cleanly or give a working volume. Body:
//! `ferroblk_bdev::fuzzing::compress_open`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferroblk_bdev::fuzzing::compress_open(data));
