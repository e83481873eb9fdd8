//! NVMe/TCP (NVMe/TCP Transport Specification 1.0).
//!
//! - [`pdu`]: the PDU codec: an incremental decoder that validates everything a hostile peer
//!   can get wrong and answers with the fatal error status to send in a termination request,
//!   and encoders that write PDU headers into a caller's buffer so payloads go out by writev.
//! - [`conn`]: one connection = one NVMe queue, a poller on one reactor: ICReq/ICResp, command
//!   slots, in-capsule data and R2T/H2CData, C2HData, CapsuleResp, keep-alive, termination.
//! - [`listener`]: accept threads handing connections to reactors round-robin.
//! - [`admission`]: who gets a connection slot, handshake deadlines, and rate-limited counts
//!   of connections turned away.

pub mod admission;
pub mod conn;
pub mod listener;
pub mod pdu;
pub mod send;
