//! # ferroblk-bdev
//!
//! The block device layer of ferroblk and the engine that drives it.
//!
//! ## Architecture (read this first)
//! - [`reactor`]: thread-per-core reactors. Each pinned thread runs its [`reactor::Poller`]s to
//!   completion and takes work only as messages; it spins while busy and sleeps in
//!   `io_uring_enter` when idle.
//! - [`uring`]: one io_uring per thread, shared by every file channel and the reactor's own
//!   wake-ups on that thread; the reactor alone reaps it and routes each completion to its
//!   client. [`uring::FdWatch`] is the one way fronts and bdevs wait for an fd (socket, kick or
//!   completion eventfd) on a reactor.
//! - [`bufpool`]: one buffer pool per reactor (size classes 4 KiB–1 MiB, a byte budget per
//!   class), shared by the NVMe-oF queues and the transforms.
//! - [`bdev`]: the API. [`Bdev`] is the control plane (name, geometry, resize, listeners), shared
//!   by all reactors; [`Channel`] is the data plane, one per reactor per bdev, owned by that
//!   reactor and never shared. A request ([`IoRequest`]) owns its scatter-gather buffers
//!   ([`SgList`]) until its completion ([`IoCompletion`]) hands them back. A full channel hands
//!   the request back (back-pressure) instead of queueing or allocating.
//! - Base bdevs: [`malloc`] (RAM, and `null`), [`file`] (regular file or block device over
//!   io_uring). Stacked bdevs: [`inject`] (`error`, `delay`), [`crc`] (per-block CRC32C),
//!   [`compress`], [`mirror`] (RAID-1 over several bases); a stacked channel owns its base's
//!   channel.
//! - [`stacked`]: plumbing every stacked bdev uses (request slot table, striped try-locks, the
//!   base channel with its retry queue, formatting helpers); [`mdregion`]: the layout, header,
//!   locking and channel of stacked bdevs that keep an entry per block in a metadata region at
//!   the end of their base (`crc` here, `crypt_gcm` in ferroblk-crypto).
//! - [`decl`]: one [`BdevKind`] per kind of bdev (declaration, checks, constructor) and the
//!   [`Kinds`] list that parses a declaration; [`registry`]: the daemon's bdevs by name; [`sync`]: blocking I/O for the control plane and tests.
//! - `conformance` (feature `conformance`): the checks every bdev passes; `testing` (same
//!   feature): helpers for bdev tests (bases, data patterns, tampering, concurrent writers).
//!
//! Flow of one request: a front (vhost queue, NVMe queue, perf job) running as a poller on
//! reactor R calls `Channel::submit` on R's channel of the bdev; the layer validates it and
//! passes it down the stack; the base completes it (at once for RAM, through R's io_uring for a
//! file); the front's next `Channel::poll` returns the completion with its status.

pub mod bdev;
pub mod buf;
pub mod bufpool;
pub mod checksum;
pub mod compress;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod crc;
pub mod decl;
pub mod error;
pub mod eventfd;
pub mod file;
#[doc(hidden)]
pub mod fuzzing;
pub mod inject;
pub mod integrity;
pub mod malloc;
pub mod mdregion;
pub mod mirror;
pub mod reactor;
pub mod registry;
pub mod split;
pub mod stacked;
pub mod sync;
#[cfg(any(test, feature = "conformance"))]
pub mod testing;
pub mod types;
pub mod unix;
pub mod uring;

pub use bdev::{
    Bdev, BdevEvent, BdevInfo, BdevStats, Channel, ChannelOps, IoCompletion, IoRequest, Wake,
};
pub use buf::{AlignedBuf, IoSeg, SgList};
pub use decl::{BdevDecl, BdevKind, ByteSize, Kinds};
pub use error::BdevError;
pub use registry::BdevRegistry;
pub use types::{
    BlockSize, Caps, Geometry, IoStatus, IoType, MAX_EXPORT_IO_BYTES, MAX_EXPORT_SEGMENTS,
};
