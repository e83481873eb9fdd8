//! NVMe Base, NVM Command Set and NVMe-oF data structures and constants.
//!
//! References: NVM Express Base Specification 2.0 ("NVMe Base"), NVM Command Set Specification
//! 1.0, NVM Express over Fabrics 1.1 ("NVMe-oF"). Names follow the specifications (`cntlid`,
//! `sqhd`, `ioccsz` ...) so a field can be looked up by its name; every structure documents its
//! figure and byte offsets, and its tests assert those offsets.
//!
//! Everything here is plain data: builders that serialize into byte buffers with explicit
//! little-endian offsets ([`wire`]), and parsers for what the target must read (SQEs, Connect
//! data, feature values, DSM ranges) and what the initiator reads (CQEs, Identify, the
//! discovery log). No I/O and no unsafe code.
//!
//! - [`command`]: the 64-byte [`Sqe`], SGL descriptors, opcodes, and typed views of the admin
//!   and I/O commands.
//! - [`completion`]: the 16-byte [`Cqe`].
//! - [`status`]: [`Status`] (SCT/SC/DNR/More) and the mapping from bdev statuses.
//! - [`fabrics`]: Connect, Property Get/Set, Disconnect; CAP/VS/CC/CSTS.
//! - [`features`]: Set/Get Features and feature values.
//! - [`identify`]: Identify Controller, Identify Namespace, descriptor and namespace lists.
//! - [`log`]: Error, SMART/Health, Changed Namespace List and Discovery log pages.

pub mod command;
pub mod completion;
pub mod fabrics;
pub mod features;
pub mod identify;
pub mod log;
pub mod status;
pub mod wire;

pub use command::{AdminOpcode, IoOpcode, SglDescriptor, Sqe};
pub use completion::Cqe;
pub use fabrics::FabricsType;
pub use status::{Status, StatusCodeType, from_nvme_status, to_nvme_status};
