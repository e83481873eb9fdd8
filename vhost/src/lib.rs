//! # ferroblk-vhost
//!
//! The vhost-user-blk front: VMs attach ferroblk volumes as virtio-blk disks (virtio 1.2 §5.2).
//!
//! ## Architecture
//! Nothing is implemented here yet: the vhost-user issue adds the backend. Each virtqueue will be
//! a poller on one `ferroblk_bdev` reactor, submitting guest buffers as scatter-gather lists to that
//! reactor's bdev channel. This crate never imports `ferroblk-target`; both fronts speak only to
//! `ferroblk-bdev`.
