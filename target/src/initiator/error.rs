//! The initiator's errors: transport failures, protocol violations by the controller, and
//! command completions with a non-success status ([`Error::Command`]).

use std::io;

use crate::spec::Status;
use crate::transport::tcp::pdu::{Fes, PduError};

/// Why an initiator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed (socket connect, read or write; verbs calls).
    #[error("connection I/O error")]
    Io(#[source] io::Error),
    /// The controller closed the connection.
    #[error("the controller closed the connection")]
    Closed,
    /// The queue was already torn down by an earlier error; submit on a new queue.
    #[error("the queue is no longer connected")]
    Disconnected,
    /// A PDU from the controller failed the codec's checks; a termination request was sent
    /// (when the stream was at a PDU boundary) and the connection closed.
    #[error("invalid PDU from the controller")]
    Pdu(#[source] PduError),
    /// A well-formed PDU that does not fit the queue's state (unknown CCCID, data outside the
    /// command's buffer, R2T for a read ...). The connection was terminated with `fes`.
    #[error("protocol violation by the controller ({fes}): {what}")]
    Protocol {
        /// What was wrong.
        what: &'static str,
        /// The Fatal Error Status sent in the H2CTermReq.
        fes: Fes,
    },
    /// The controller sent a C2HTermReq.
    #[error("the controller terminated the connection: {fes} (FEI {fei:#x})")]
    Terminated {
        /// Fatal Error Status.
        fes: Fes,
        /// Fatal Error Information.
        fei: u32,
    },
    /// The ICResp settled something the host did not ask for.
    #[error("connection initialization failed: {0}")]
    Negotiation(&'static str),
    /// A command completed with a non-success status (the CQE's Status field).
    #[error("command {opcode:#04x} failed: {status}")]
    Command {
        /// The command's opcode.
        opcode: u8,
        /// The status the controller returned.
        status: Status,
    },
    /// Connect was rejected with Connect Invalid Parameters; `ipo` locates the parameter.
    #[error(
        "Connect rejected: invalid parameter at byte {ipo} of the {}",
        if *in_data { "Connect data" } else { "command" }
    )]
    ConnectInvalidParameters {
        /// The parameter is in the Connect data (else in the SQE).
        in_data: bool,
        /// Byte offset of the parameter.
        ipo: u16,
    },
    /// Connect succeeded but the controller requires in-band authentication (AUTHREQ), which
    /// this initiator does not implement.
    #[error("the controller requires authentication (AUTHREQ {0:#x})")]
    AuthenticationRequired(u16),
    /// The controller reported a fatal status (CSTS.CFS) or never became ready.
    #[error("controller not ready: {0}")]
    NotReady(&'static str),
    /// No answer in time. The queue is torn down: the command's buffer is lost with it.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A caller-side problem (buffer larger than the queue allows, bad argument ...).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The RDMA connection manager refused or failed the connection (NVMe/RDMA): `why` names
    /// the step, or the field of the private data the controller's reject named.
    #[error("NVMe/RDMA connection failed: {0}")]
    Rdma(String),
    /// The controller broke the transport's rules in a way that ends the queue (NVMe/RDMA: a
    /// completion for a command identifier not in flight, a short response).
    #[error("protocol violation by the controller: {0}")]
    Violation(&'static str),
    /// This build cannot do what was asked (a transport compiled out).
    #[error("not supported by this build: {0}")]
    Unsupported(&'static str),
    /// A data structure returned by the controller could not be parsed.
    #[error("malformed {0} returned by the controller")]
    Malformed(&'static str),
}

impl Error {
    /// The NVMe status of a failed command, if this is one.
    pub fn status(&self) -> Option<Status> {
        match self {
            Error::Command { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the error ended the queue (everything but a command status).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Error::Command { .. } | Error::Invalid(_) | Error::Malformed(_) | Error::Unsupported(_)
        )
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// Why [`IoQueue::submit`](super::IoQueue::submit) handed a request back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Every command slot is in use: poll for completions, then submit again.
    #[error("queue full")]
    Full,
    /// The queue was torn down.
    #[error("queue disconnected")]
    Disconnected,
    /// The buffer is larger than the queue's maximum data length.
    #[error("buffer larger than the queue's maximum transfer")]
    TooLarge,
    /// The command cannot carry this buffer (a Flush with data, an empty Read ...).
    #[error("buffer does not match the command")]
    BadBuffer,
}

/// A request the queue did not accept, with its buffer handed back (no allocation, no loss).
#[derive(Debug, thiserror::Error)]
#[error("request rejected: {reason}")]
pub struct Rejected {
    /// Why.
    pub reason: RejectReason,
    /// The caller's buffer, unchanged.
    pub buf: Vec<u8>,
}
