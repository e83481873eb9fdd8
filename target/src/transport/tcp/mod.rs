//! NVMe/TCP (NVMe/TCP Transport Specification 1.0).
//!
//! - [`pdu`]: the PDU codec: an incremental decoder that validates everything a hostile peer
//!   can get wrong and answers with the fatal error status to send in a termination request,
//!   and encoders that write PDU headers into a caller's buffer so payloads go out by writev.
//! - [`conn`]: one connection = one [`crate::queue::NvmeQueue`], a poller on one reactor:
//!   socket reads, ICReq/ICResp, capsules and in-capsule data, R2T/H2CData, termination.
//! - [`send`]: the connection's send stream (headers, digests, read data from the read's
//!   buffer by `sendmsg`).
//! - [`listener`]: accept threads handing connections to reactors round-robin.
//! - [`admission`]: who gets a connection slot, handshake deadlines, and rate-limited counts
//!   of connections turned away.

pub mod admission;
pub mod conn;
pub mod listener;
pub mod pdu;
pub mod send;
