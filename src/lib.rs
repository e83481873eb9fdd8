//! The parts of the ferroblk daemon that other programs reuse: the configuration file
//! ([`config`]) and the one list of bdev kinds it parses declarations with ([`decl`]). The fio
//! engine (`fio/`) builds a configuration's bdev chain in-process through them, exactly as the
//! daemon does.

pub mod config;
pub mod decl;
