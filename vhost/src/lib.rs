//! # ferroblk-vhost
//!
//! The vhost-user-blk front: VMs (QEMU, cloud-hypervisor) attach ferroblk volumes as virtio-blk
//! disks (virtio 1.2 §5.2), served straight from guest memory.
//!
//! ## Architecture (read this first)
//! - [`device`]: one [`VhostExport`] per Unix socket. Its control thread accepts one front-end
//!   at a time and speaks the vhost-user protocol ([`protocol`]): features, memory table,
//!   vrings, config space, inflight region, back-end channel. It owns the connection state.
//! - [`queue`]: each started virtqueue is a [`queue::VqPoller`] on reactor `queue % reactors`,
//!   with its own channel of the bdev. It pops chains, has [`blk::parse_request`] (a pure
//!   function of a descriptor chain) validate them and say what to do, submits one bdev request
//!   per virtio request with the guest's buffers as the scatter-gather list (no copy), and
//!   completes them on the used ring.
//! - [`spec`]: the virtio constants (feature bits, descriptor flags, virtio-blk request types
//!   and status bytes) that the other modules import.
//! - [`virtq`]: the split ring, hardened against hostile drivers; [`memory`]: the guest memory
//!   map with bounds-checked translation; [`inflight`]: INFLIGHT_SHMFD tracking so a restarted
//!   daemon resubmits what its predecessor had in flight. A front-end's descriptor is mapped
//!   only after `fstat` shows its file covers the whole range (a mapping past the end of a
//!   memfd would raise SIGBUS on first touch and take every tenant down): a region that does
//!   not fit fails its message, and the connection is dropped.
//! - Guest memory is reached only through raw pointers from those translations, read and
//!   written with volatile accesses (`virtq`'s `unsafe` accessors, each with its `# Safety`
//!   contract) or copied once; it is never a `&[u8]`, here or in the bdev layers it is handed
//!   to as a scatter-gather list.
//!
//! Why not the `vhost` / `vhost-user-backend` crates: the back-end crate runs its own worker
//! threads (against the reactor model) and does not track inflight I/O, and the `vhost` crate's
//! back-end channel cannot send `CONFIG_CHANGE_MSG`, which a live resize needs. The protocol
//! subset a block back-end needs is small; it lives in [`protocol`].
//!
//! This crate never imports `ferroblk-target`; both fronts speak only to `ferroblk-bdev`.

pub mod blk;
pub mod device;
#[doc(hidden)]
pub mod fuzzing;
pub mod inflight;
pub mod memory;
pub mod protocol;
pub mod queue;
pub mod spec;
pub mod virtq;

pub use device::{ExportError, VhostExport, VhostSpec};
