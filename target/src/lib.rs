//! # ferroblk-target
//!
//! The NVMe-oF front: NVMe/TCP transport, subsystems, discovery, and the initiator (host side).
//!
//! ## Architecture (read this first)
//! What flows in is bytes from a TCP socket; what flows out is bdev requests
//! (`ferroblk_bdev::IoRequest`) and, in the other direction, bytes back to the socket. The
//! layers, from the wire inwards:
//!
//! - [`spec`]: NVMe Base 2.0, NVM Command Set 1.0 and NVMe-oF 1.1 data structures and
//!   constants: the 64-byte SQE and its commands' fields, the 16-byte CQE and its [`Status`]
//!   (with the one mapping from a bdev `IoStatus`), Connect/Property/Disconnect, CAP/VS/CC/CSTS,
//!   Identify Controller/Namespace, namespace lists, Error/SMART/Changed Namespace/Discovery log
//!   pages. Plain data: encoders write spec byte offsets into buffers, parsers read what a
//!   target (or the initiator) must read. No I/O, no state, no unsafe code.
//! - [`transport::tcp`]: NVMe/TCP. [`transport::tcp::pdu`] is the PDU codec: an incremental
//!   decoder over the bytes received so far that validates every header field a hostile host
//!   controls and answers with the fatal error status for a termination request, and encoders
//!   that write PDU headers into a caller's buffer so payloads leave by writev without copies.
//!   The codec serves both roles; the initiator reuses it.
//!
//! Still to come (nothing below exists yet):
//! - the NVMe/TCP connection state machine in `transport/tcp/`: one connection is one NVMe
//!   queue driven by one `ferroblk_bdev` reactor (assigned at accept). It owns the receive
//!   buffer and the [`transport::tcp::pdu::PduDecoder`], answers ICReq, keeps per-command
//!   slots (in-capsule data and H2CData received into pooled buffers, R2T scheduling within
//!   MAXR2T, C2HData segmentation honoring HPDA, CapsuleResp or C2HData SUCCESS), checks
//!   what the codec cannot (TTAG/CCCID/DATAO against the outstanding R2T → PDU Sequence Error or
//!   Data Transfer Out of Range) and turns commands into bdev requests. A `Transport` trait
//!   lets RDMA join later.
//! - `subsystem/`: subsystems, namespaces (bdev + NSID + NGUID), the host ACL, controllers
//!   (CC/CSTS, features, AER slots, keep-alive timer) living with the admin queue's reactor,
//!   the discovery subsystem and its log, and the admin command handlers built on [`spec`].
//!   I/O queues read namespace maps as snapshots updated by message.
//! - `initiator/`: the host side (connect, admin and I/O queues) over the same codec, shared by
//!   the perf tool and a remote bdev.
//!
//! This crate never imports `ferroblk-vhost`; both fronts speak only to `ferroblk-bdev`.

pub mod spec;
pub mod subsystem;
pub mod transport;

pub use spec::{Cqe, Sqe, Status};
