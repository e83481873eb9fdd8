//! The NVMe-oF host (initiator): connect to a controller, run admin commands, drive I/O
//! queues, over NVMe/TCP or NVMe/RDMA ([`ConnectOptions::trtype`]; RDMA with the cargo feature
//! `rdma`). It speaks to any controller (Linux nvmet, SPDK, ours) with the target's own codecs
//! ([`crate::transport::tcp::pdu`] in [`Role::Host`], [`crate::transport::rdma::wire`]) and the
//! structures of [`crate::spec`].
//!
//! ## Architecture
//! What flows in: commands from the caller (admin requests as method calls, I/O as
//! [`IoCommand`]s with an owned buffer, or a bdev request's scatter-gather list lent with
//! [`IoQueue::submit_sg`], and a tag). What flows out: capsules and data on one transport
//! connection per queue (a TCP connection or an RDMA queue pair), and [`Completion`]s (tag,
//! CQE, the buffer or list back).
//!
//! - `queue` (private): the transport seam. One NVMe queue over an `Engine`, and what is the
//!   same on every transport: the command and completion types, the blocking form of a
//!   command (submit, progress, wait, a timeout tearing the queue down), internal commands
//!   kept apart from the caller's.
//! - `tcp` (private): the NVMe/TCP engine. ICReq/ICResp, CID slots (the CID is the slot
//!   index), capsule encoding with in-capsule data up to IOCCSZ, R2T → H2CData in MAXH2CDATA
//!   chunks, C2HData reassembly straight into the command's buffer (LAST_PDU / SUCCESS),
//!   digests, a `writev` transmit queue, fatal errors → H2CTermReq, close, every command in
//!   flight completed with Host Pathing Error. Non-blocking; it waits with `poll(2)`.
//! - `rdma` (private, feature `rdma`): the NVMe/RDMA engine. RDMA CM connect with the
//!   NVMe/RDMA private data, capsules by SEND, CQEs in pre-posted RECVs, Keyed SGL Data Blocks
//!   over registered memory ([`IoQueue::register_memory`], else a registered pool), a
//!   completion channel to sleep on.
//! - [`controller`]: [`Controller`] owns the admin queue (behind a mutex shared with the
//!   keep-alive thread): Connect, Property Get/Set, CC.EN / CSTS.RDY, Identify, Set Features
//!   Number of Queues, Get Log Page and the discovery log, shutdown with CC.SHN. It creates
//!   I/O queues but does not own them.
//! - [`io`]: [`IoQueue`], owned by one thread: `submit` + `poll` (non-blocking, no
//!   allocation per command) or the blocking helpers (`read`, `write`, `flush`,
//!   `write_zeroes`, `deallocate`).
//!
//! No async runtime: a load generator keeps one [`IoQueue`] per thread and spins on `poll`
//! (or sleeps in [`IoQueue::wait`]); the admin side blocks.
//!
//! ```no_run
//! use ferroblk_target::initiator::{ConnectOptions, Controller, IoCommand, IoQueueOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let opts = ConnectOptions::new("127.0.0.1:4420".parse().unwrap(), "nqn.2024-01.io.example:vol0");
//! let ctrl = Controller::connect(&opts)?;
//! let ns = ctrl.namespace(ctrl.active_namespaces()?[0])?;
//! ctrl.set_number_of_queues(1)?;
//! let mut q = ctrl.connect_io_queue(1, &IoQueueOptions::default())?;
//!
//! // Blocking.
//! let mut buf = vec![0xa5u8; ns.block_size as usize];
//! q.write(ns.nsid, 0, 1, &mut buf)?;
//! q.read(ns.nsid, 0, 1, &mut buf)?;
//!
//! // Poll style.
//! let cmd = IoCommand::Read { nsid: ns.nsid, slba: 0, nlb: 1 };
//! q.submit(cmd, buf, 7)?; // a full queue hands the buffer back in the error
//! let mut done = Vec::new();
//! while done.is_empty() {
//!     q.wait(None)?;
//!     q.poll(&mut done)?;
//! }
//! done[0].result()?;
//!
//! q.disconnect()?;
//! ctrl.shutdown()?;
//! # Ok(())
//! # }
//! ```

pub mod controller;
mod error;
pub mod io;
pub(crate) mod queue;
#[cfg(feature = "rdma")]
mod rdma;
mod tcp;

#[cfg(test)]
mod tests;

pub use crate::subsystem::Trtype;
pub use controller::{
    AdminEvent, ConnectOptions, Controller, DiscoveryLog, IoQueueOptions, Namespace, uuid_string,
};
pub use error::{Error, RejectReason, Rejected};
pub use io::{IoCommand, IoQueue, encode_ranges};
pub use queue::{AbortToken, CmdData, Completion, HOST_PATHING_ERROR, MAX_DEPTH, QueueStats, Xfer};
pub use tcp::DIRECT_READ_MIN;

#[cfg(doc)]
use crate::transport::tcp::pdu::Role;
