//! # ferroblk-target
//!
//! The NVMe-oF front: NVMe/TCP and NVMe/RDMA transports, subsystems, discovery, and the
//! initiator (host side, NVMe/TCP).
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
//! - [`subsystem`]: subsystems, namespaces (bdev + NSID + stable NGUID/UUID), the host
//!   allow-list, controllers (CC/CSTS, features, AER slots, keep-alive) and the discovery
//!   subsystem and its log; [`subsystem::admin`] runs the admin commands.
//! - [`queue`]: the transport-independent NVMe queue, [`queue::NvmeQueue`]: CID slots, SQ head
//!   and flow control, Fabrics Connect ([`queue::connect`]), admin commands, asynchronous
//!   events, keep-alive, and NVM I/O commands on the reactor's bdev channels ([`queue::io`]).
//!   A transport feeds it commands and data and implements [`queue::Transport`] (send a CQE,
//!   send read data, ask the host for write data).
//! - [`transport::tcp::conn`]: one NVMe/TCP connection = one [`queue::NvmeQueue`], a poller on
//!   one reactor: socket reads, ICReq/ICResp, capsules and H2CData into the queue, R2T,
//!   C2HTermReq on fatal errors; [`transport::tcp::send`] is its zero-copy send stream;
//!   [`transport::tcp::listener`] hands connections to reactors round-robin;
//!   [`transport::tcp::admission`] bounds their number, gives ICReq and Connect deadlines, and
//!   evicts unidentified connections to make room for new hosts.
//! - [`transport::rdma`]: NVMe/RDMA on rdma-core: an RDMA CM listener thread, one queue pair
//!   per [`queue::NvmeQueue`] on a reactor (capsules by SEND/RECV, data by RDMA READ/WRITE,
//!   completions from a completion channel), and pure parsers of the connect private data and
//!   capsules ([`transport::rdma::wire`]).
//! - [`initiator`]: the host side over the same codec (connect, admin, I/O queues with a
//!   non-blocking submit/poll API), used by `ferroblk perf nvmf`, the tests and [`remote`].
//! - [`remote`]: the `nvmf` bdev, a remote NVMe/TCP namespace over one or several paths
//!   through the initiator (a bdev kind that lives here so `ferroblk-bdev` never depends on a
//!   front).
//!
//! Write data goes into the command's buffer as it arrives: what came with earlier bytes is
//! copied once from the receive buffer, the rest of a large H2CData PDU is received there
//! directly.
//!
//! This crate never imports `ferroblk-vhost`; both fronts speak only to `ferroblk-bdev`.

#[doc(hidden)]
pub mod fuzzing;
pub mod initiator;
pub mod queue;
pub mod remote;
pub mod spec;
pub mod subsystem;
pub mod transport;

pub use spec::{Cqe, Sqe, Status};
