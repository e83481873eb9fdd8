//! # ferroblk-rbd
//!
//! The `rbd` bdev: a volume on a Ceph RBD image, through librbd and librados (Debian 12, Ceph
//! 16.2), kept in its own crate so that `ferroblk-bdev` links no C library.
//!
//! ## Architecture (read this first)
//! - `ffi`: the ~20 librados/librbd functions used, declared by hand from the C headers.
//! - [`cluster`]: connections (`rados_t`) to a cluster, `connections` of them per distinct set
//!   of cluster settings, shared by the images that declare it, connected with bounded timeouts;
//!   `rbd_cache = false` always, so a flush is durable in the cluster.
//! - [`image`]: one open image (I/O context and librbd handle); open, create and resize block the
//!   calling thread and run on the control plane only.
//! - [`bdev`]: [`RbdBdev`], the control plane (geometry, grow-only resize that notifies the
//!   bdev's listeners and so every export; librbd's header watch grows it when the image is
//!   grown elsewhere).
//! - `channel`: each reactor's channel. Reads, writes, discards, write-zeroes and flushes go to
//!   `rbd_aio_*` with the request's own segments (no copy); librbd's threads hand completions
//!   back through a per-channel lock-free stack, and an eventfd that the reactor watches,
//!   written only when the reactor was about to sleep; no thread blocks per request and the
//!   reactor's hot path takes no lock.
//! - [`decl`]: `kind = "rbd"` ([`RbdKind`]), added to a program's kinds by [`add_kinds`].
//! - `testing` (feature `testing`): a real single-node Ceph cluster for tests and benchmarks.
//!
//! A cluster that goes away: requests fail with an I/O error after `op_timeout_secs`
//! (`rados_osd_op_timeout`); the reactor never waits on the cluster; once the cluster is back,
//! new requests succeed. A writable image takes its exclusive lock at open (librbd's own
//! acquisition on the first write waits, unbounded, for a header watch that a cluster gone away
//! broke), and rebuilds its object map once the cluster is back after a write failed (librbd
//! leaves it stale in the cluster). Closing is bounded (`op_timeout_secs +
//! connect_timeout_secs`, then left to finish in the background).

pub mod bdev;
mod channel;
pub mod cluster;
pub mod decl;
mod ffi;
pub mod image;
#[cfg(feature = "testing")]
pub mod testing;

pub use bdev::RbdBdev;
pub use channel::RBD_CHANNEL_DEPTH;
pub use decl::{RbdDecl, RbdKind, add_kinds};
