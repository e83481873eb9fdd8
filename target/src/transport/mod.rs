//! NVMe-oF transports. Only NVMe/TCP exists so far ([`tcp`]); its PDU codec is pure (no
//! sockets), so the connection state machine and the initiator can share it.

pub mod tcp;
