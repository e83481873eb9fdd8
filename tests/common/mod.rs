//! Helpers shared by the integration tests (`mod common;` in `tests/*.rs`).

// Each test binary uses only part of these helpers.
#![allow(dead_code)]

pub mod daemon;
pub mod guest;
pub mod lab;
pub mod qsd;
