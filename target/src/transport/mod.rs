//! NVMe-oF transports: the wire under a [`crate::queue::NvmeQueue`], which holds everything
//! NVMe. NVMe/TCP ([`tcp`]; its PDU codec is pure (no sockets), so the connection and the
//! initiator share it) and NVMe/RDMA ([`rdma`], target side only).

pub mod rdma;
pub mod tcp;
