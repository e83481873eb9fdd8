//! Sends fuzz-chosen vhost-user messages (with memfds and eventfds attached, or raw bytes) to a
//! live vhost-user-blk export as a front-end. Body: `ferroblk_vhost::fuzzing::vhost_msg`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferroblk_vhost::fuzzing::vhost_msg(data);
});
