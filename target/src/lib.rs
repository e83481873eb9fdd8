//! # ferroblk-target
//!
//! The NVMe-oF front: NVMe/TCP transport, subsystems, discovery, and the initiator (host side).
//!
//! ## Architecture
//! Nothing is implemented here yet: the NVMe/TCP issue adds `spec/`, `subsystem/`, `transport/`
//! and `initiator/`. One connection is one NVMe queue served by one `ferroblk_bdev` reactor. This
//! crate never imports `ferroblk-vhost`; both fronts speak only to `ferroblk-bdev`.
