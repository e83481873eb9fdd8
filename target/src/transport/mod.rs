//! NVMe-oF transports: the wire under a [`crate::queue::NvmeQueue`], which holds everything
//! NVMe. Only NVMe/TCP exists so far ([`tcp`]); its PDU codec is pure (no sockets), so the
//! connection and the initiator share it.

pub mod tcp;
