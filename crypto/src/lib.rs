//! # ferroblk-crypto
//!
//! Encryption bdevs that stack on any ferroblk bdev: AES-256-XTS (length-preserving, dm-crypt
//! compatible) and AES-256-GCM (authenticated, tags in a metadata region), plus per-volume key
//! handling (key files, keys over the RPC, zeroized on drop, never logged).
//!
//! ## Architecture
//! Nothing is implemented here yet: the transforms issue adds the `crypt` bdev kinds. They will
//! follow the stacked-bdev pattern of `ferroblk_bdev` (see its `inject` module): a channel that owns
//! its base's channel and encrypts writes into its own buffers, never the caller's.
