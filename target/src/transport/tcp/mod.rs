//! NVMe/TCP (NVMe/TCP Transport Specification 1.0).
//!
//! - [`pdu`]: the PDU codec: an incremental decoder that validates everything a hostile peer
//!   can get wrong and answers with the fatal error status to send in a termination request,
//!   and encoders that write PDU headers into a caller's buffer so payloads go out by writev.
//!
//! Still to come here: the connection state machine (ICReq/ICResp exchange, command slots,
//! R2T scheduling, C2HData segmentation, keep-alive) on top of a reactor's io_uring.

pub mod pdu;
