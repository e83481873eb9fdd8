//! # ferroblk-crypto
//!
//! Encryption bdevs that stack on any ferroblk bdev: AES-256-XTS (length-preserving, on-disk
//! compatible with dm-crypt's `aes-xts-plain64`) and AES-256-GCM (authenticated, nonces and tags
//! in a metadata region), plus per-volume key handling.
//!
//! ## Architecture (read this first)
//! What flows in: requests on the encryption bdev's [`Channel`](ferroblk_bdev::Channel), in
//! plaintext. What flows out: requests on the base bdev's channel, in ciphertext. Both bdevs
//! follow the stacked-bdev pattern of `ferroblk_bdev::inject`: the bdev ([`XtsBdev`],
//! [`GcmBdev`]) is the shared control plane; each reactor opens its own channel, which owns its
//! base's channel.
//!
//! - [`key`]: [`Key`] (32 or 64 bytes, zeroized on drop, `Debug` redacted) from a key file (hex
//!   or raw, mode 0600 or stricter) or hex; [`KeyHex`] carries `key_hex` through serde.
//! - [`xts`]: [`XtsCipher`] (one data unit per logical block; a fused one-pass VAES + AVX-512
//!   or AES-NI transform chosen at run time, the `aes` crate elsewhere) and [`XtsBdev`]. The
//!   module documentation states the dm-crypt convention and the `dmsetup` table line that
//!   opens a ferroblk volume.
//! - [`gcm`]: [`GcmBdev`]: on-disk layout (header with key check value, data, metadata region at
//!   the end), per-block nonce and tag, LBA and volume id as AAD; the cipher is a fused
//!   one-pass VAES + VPCLMULQDQ or AES-NI + PCLMULQDQ engine chosen at run time (`gcm/x86.rs`),
//!   the `aes-gcm` crate elsewhere. The metadata region itself
//!   (layout, header framing, formatting, the channel with its metadata read-modify-write under
//!   striped locks shared by all channels) is `ferroblk_bdev::mdregion`, shared with the `crc`
//!   bdev; `gcm` supplies the header fields and what an entry is.
//! - `common`: per-channel state that both use: the channel's share of its reactor's buffer
//!   pool (`ferroblk_bdev::bufpool`; at most [`SMALL_BUFS`](common::SMALL_BUFS) × 16 KiB and
//!   [`LARGE_BUFS`](common::LARGE_BUFS) × 128 KiB at a time, no allocation per request once the
//!   reactor's pool is warm), per-block access to a scatter-gather list (each block
//!   copied once into a one-block channel buffer, transformed there, copied back once). The
//!   request slot table and the base channel with its retry queue are `ferroblk_bdev::stacked`'s.
//! - [`decl`]: the kinds [`CryptXtsKind`] and [`CryptGcmKind`] with their declaration
//!   [`CryptDecl`] (`deny_unknown_fields`), added to a program's kinds by
//!   [`decl::add_kinds`]; [`error`]: [`CryptoError`].
//!
//! Rules both channels keep:
//! - A write is encrypted into a pool buffer, never in the caller's buffer; a read is decrypted
//!   block by block in the channel's own buffer after the base completes, and each result is
//!   copied back to the caller's buffer once (for GCM, only once its tag has checked). The
//!   caller's buffer may be guest memory that the guest changes at any moment: it is reached
//!   only through raw copies, never as a `&[u8]`, and the ciphers never run over it.
//! - A request that finds no pool buffer or slot is handed back (back-pressure); a base request
//!   the base refuses after its request was accepted waits in a retry queue of the channel.
//! - Keys never appear in `Debug`, errors or logs; the ciphers keep their round keys only, and
//!   those are zeroized on drop too.
//!
//! Which to use: XTS when the volume must open with dm-crypt, or when capacity must be the
//! base's exactly; GCM when tampering must be detected (0.8% of the base goes to metadata, and a
//! write costs a metadata read-modify-write).

pub mod common;
pub mod decl;
pub mod error;
pub mod gcm;
pub mod key;
#[cfg(test)]
mod testing;
pub mod xts;

pub use decl::{CryptDecl, CryptGcmKind, CryptXtsKind, GcmDecl, XtsDecl};
pub use error::CryptoError;
pub use gcm::{GcmBdev, GcmLayout};
pub use key::{Key, KeyError, KeyHex};
pub use xts::{XtsBdev, XtsCipher};
