//! Parses arbitrary text as the daemon's configuration file. The loader lives in the `ferroblk`
//! binary crate, so its two files are compiled in here. Body: `config::fuzz_parse`.

#![no_main]
// Only the loader is used of the daemon's files.
#![allow(dead_code)]

#[path = "../../src/config.rs"]
mod config;
#[path = "../../src/decl.rs"]
mod decl;

libfuzzer_sys::fuzz_target!(|data: &[u8]| config::fuzz_parse(data));
