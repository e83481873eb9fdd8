//! NVMe/RDMA (NVMe-oF 1.1 §7.3): the NVMe queue over an RDMA reliable-connected queue pair,
//! on rdma-core (RoCE v2, InfiniBand, iWARP; soft-RoCE `rdma_rxe` in the tests).
//!
//! - [`wire`]: pure parsing and checks of what a host sends besides NVMe commands: the RDMA
//!   CM private data of its connect request (RECFMT, QID, HRQSIZE, HSQSIZE), the reply
//!   (CRQSIZE) and reject formats, and received command capsules (SQE, in-capsule data, Keyed
//!   SGL Data Block).
//! - [`listener`]: one thread per listening address on its RDMA CM event channel; checks
//!   connect requests and hands them to reactors round-robin.
//! - [`conn`]: one queue pair = one [`crate::queue::NvmeQueue`], a poller on one reactor:
//!   capsules by SEND/RECV, host data by RDMA READ / WRITE, completions from a completion
//!   channel watched by the reactor (spin while busy, sleep when idle).
//! - `regpool`: the registered command buffers of a queue pair (registered once, lent again).
//! - `verbs`: a queue pair's verbs and CM objects, destroyed in order.
//! - `ffi`: the rdma-core calls, through a C shim (see its documentation for why).
//!
//! The initiator's RDMA transport (`crate::initiator`) uses `ffi`, `regpool`, `verbs` and
//! [`wire`] too (the host's halves of the private data are there).

// The queue pairs and the listener use rdma-core (cargo feature `rdma`); the wire formats are
// pure and always built (the fuzz targets and unit tests use them).
#[cfg(feature = "rdma")]
pub mod conn;
#[cfg(feature = "rdma")]
pub(crate) mod ffi;
#[cfg(feature = "rdma")]
pub mod listener;
#[cfg(feature = "rdma")]
pub(crate) mod regpool;
#[cfg(feature = "rdma")]
pub(crate) mod verbs;
pub mod wire;
