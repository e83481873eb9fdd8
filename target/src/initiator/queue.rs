//! The transport seam of the initiator: one NVMe queue, whatever carries it.
//!
//! What is NVMe is written once, here and above: the command and completion types, the
//! blocking form of a command (`execute`: submit, make progress, wait, until that command
//! completes, a timeout tearing the queue down), the split between internal commands
//! (Connect, Property Get ...) and the caller's, and in [`super::controller`] / [`super::io`]
//! everything from Connect to the I/O commands. An [`Engine`] moves capsules and data and
//! keeps the command slots (the CID is the slot index on both transports):
//!
//! - NVMe/TCP ([`super::tcp`]): PDUs over one socket.
//! - NVMe/RDMA (`super::rdma`, cargo feature `rdma`): capsules by SEND, completions in
//!   pre-posted RECVs, data by the controller's RDMA READ / WRITE of registered memory.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroblk_bdev::SgList;

use super::error::{Error, RejectReason, Rejected};
use super::tcp::TcpQueue;
use crate::spec::command::Sqe;
use crate::spec::completion::Cqe;
use crate::spec::status::{Status, path};
use crate::subsystem::Trtype;
use crate::transport::tcp::pdu::Negotiated;

/// Largest queue depth (commands in flight); the CID is the slot index.
pub const MAX_DEPTH: u16 = 4096;

/// Which way a command's data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xfer {
    /// No data (Flush, Keep Alive, Write Zeroes, Property Get ...).
    None,
    /// Host to controller: in-capsule if it fits, else after an R2T by H2CData.
    ToController,
    /// Controller to host, by C2HData.
    FromController,
}

/// A command's data: a vector the queue owns until completion, or a bdev request's
/// scatter-gather list, sent from and received into its segments without a copy.
#[derive(Debug)]
pub enum CmdData {
    /// An owned buffer.
    Vec(Vec<u8>),
    /// Segments the caller keeps valid until the list comes back ([`SgList`]'s contract).
    Sg(SgList),
}

impl CmdData {
    pub(super) fn len(&self) -> usize {
        match self {
            CmdData::Vec(v) => v.len(),
            CmdData::Sg(s) => s.total_len(),
        }
    }
}

/// A finished command: its tag, its completion queue entry, its buffer.
#[derive(Debug)]
pub struct Completion {
    /// The tag given at submission.
    pub tag: u64,
    /// The completion. For a C2HData with the SUCCESS flag (no CapsuleResp) the initiator
    /// synthesizes a successful entry; for commands lost with the connection the status is
    /// Host Pathing Error; for a data digest mismatch Transient Transport Error.
    pub cqe: Cqe,
    /// The buffer given at submission (read data in it for reads); empty for a command
    /// submitted with a scatter-gather list.
    pub buf: Vec<u8>,
    /// The scatter-gather list given at submission ([`CmdData::Sg`]); empty otherwise.
    pub sg: SgList,
    /// The command's opcode.
    pub opcode: u8,
    pub(super) internal: bool,
    /// Failed locally with the connection (no answer from the controller).
    pub(super) lost: bool,
}

impl Completion {
    /// The command's status.
    pub fn status(&self) -> Status {
        self.cqe.status
    }

    /// `Ok` with the CQE on success, else the status as [`Error::Command`].
    pub fn result(&self) -> Result<&Cqe, Error> {
        if self.cqe.status.is_success() {
            Ok(&self.cqe)
        } else {
            Err(Error::Command {
                opcode: self.opcode,
                status: self.cqe.status,
            })
        }
    }
}

/// Counters of one queue (what went over the wire), for tests and tools. The PDU counters are
/// NVMe/TCP's; `in_capsule`, `commands` count on both transports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Command capsules queued.
    pub commands: u64,
    /// Of those, capsules that carried their write data (in-capsule).
    pub in_capsule: u64,
    /// R2T PDUs received.
    pub r2ts: u64,
    /// H2CData PDUs queued.
    pub h2c_pdus: u64,
    /// C2HData PDUs received.
    pub c2h_pdus: u64,
    /// Commands completed by a C2HData with the SUCCESS flag (no CapsuleResp).
    pub c2h_success: u64,
    /// CapsuleResp PDUs received.
    pub capsule_resps: u64,
    /// C2HData digests that did not match.
    pub data_digest_errors: u64,
    /// NVMe/RDMA: commands whose data the controller moved by RDMA READ / WRITE (a Keyed SGL
    /// Data Block).
    pub keyed: u64,
    /// NVMe/RDMA: of those, commands whose data was copied through a registered buffer of the
    /// queue (the caller's memory was not registered, or was a list of several segments).
    pub bounced: u64,
}

/// Host Pathing Error: the status of commands lost with their connection.
pub const HOST_PATHING_ERROR: Status = Status::path(path::HOST_PATHING_ERROR);

/// What a queue is created with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueParams {
    /// Queue identifier (0: admin).
    pub qid: u16,
    /// Commands in flight at most (the SQ has `depth + 1` entries).
    pub depth: u16,
    /// Ask for header digests.
    pub hdgst: bool,
    /// Ask for data digests.
    pub ddgst: bool,
    /// Largest buffer a command may carry (also bounds one C2HData PDU).
    pub max_data: usize,
    /// Largest in-capsule data (0: always R2T).
    pub max_in_capsule: usize,
}

/// What moves one queue's capsules and data. See the module documentation.
pub(crate) trait Engine: Send + Debug {
    /// The queue's parameters.
    fn params(&self) -> &QueueParams;
    /// The queue's counters.
    fn stats(&self) -> QueueStats;
    /// Commands in flight.
    fn in_flight(&self) -> usize;
    /// Whether the connection is gone.
    fn is_dead(&self) -> bool;
    /// The fd that becomes readable when the queue has something to do (NVMe/TCP: the socket;
    /// NVMe/RDMA: the completion channel, once [`Engine::arm`]ed).
    fn fd(&self) -> RawFd;
    /// Whether the next [`Engine::step`] has work without waiting (NVMe/TCP: bytes to send;
    /// NVMe/RDMA: completions found while arming, not yet taken).
    fn has_tx(&self) -> bool;
    /// Queues `sqe` (its CID and SGL1 are overwritten) with `data`, `data.len()` bytes in
    /// direction `xfer`; `internal` commands are the blocking helpers' own.
    fn submit_inner(
        &mut self,
        sqe: Sqe,
        xfer: Xfer,
        data: CmdData,
        tag: u64,
        internal: bool,
    ) -> Result<(), (RejectReason, CmdData)>;
    /// Makes progress without blocking. On a fatal error every command in flight completes
    /// with [`HOST_PATHING_ERROR`] and the queue is dead.
    fn step(&mut self) -> Result<(), Error>;
    /// Finished commands not yet taken.
    fn done(&mut self) -> &mut Vec<Completion>;
    /// Blocks until there may be something to do or `timeout` passes (`None`: forever).
    fn wait(&mut self, timeout: Option<Duration>) -> Result<(), Error>;
    /// Tears the queue down after `e` (commands in flight complete with Host Pathing Error).
    fn fail(&mut self, e: Error) -> Error;
    /// Asks for a wake-up through [`Engine::fd`] at the next completion; `true` if work
    /// arrived meanwhile (poll again rather than sleep).
    fn arm(&mut self) -> bool {
        false
    }
    /// What the NVMe/TCP connection initialization settled (`None` on other transports).
    fn negotiated(&self) -> Option<Negotiated> {
        None
    }
    /// Registers caller memory for zero-copy transfers (a no-op where nothing is registered).
    ///
    /// # Safety
    /// See [`super::IoQueue::register_memory`].
    unsafe fn register(&mut self, _ptr: *const u8, _len: usize) -> Result<(), Error> {
        Ok(())
    }
    /// Forgets every registration of [`Engine::register`].
    fn deregister_all(&mut self) {}
    /// What another thread uses to end this queue's connection.
    fn abort_token(&self) -> AbortToken {
        AbortToken::Socket(self.fd())
    }
}

/// What another thread uses to end a queue's connection, so that its owner, maybe asleep on
/// it, wakes and sees the queue fail: a socket is shut down; an RDMA queue pair is
/// disconnected (its outstanding work requests then complete with flush errors, which
/// raise a completion event).
#[derive(Clone, Copy, Debug)]
pub enum AbortToken {
    /// An NVMe/TCP connection's socket.
    Socket(RawFd),
    /// An NVMe/RDMA queue pair's connection.
    #[cfg(feature = "rdma")]
    Rdma(*mut crate::transport::rdma::ffi::CmId),
}

// SAFETY: the token is a descriptor number or a CM id pointer, used only through `abort`,
// whose contract makes the caller keep the queue alive; rdma-core's connection calls may be
// made from any thread.
unsafe impl Send for AbortToken {}

impl AbortToken {
    /// Ends the connection.
    ///
    /// # Safety
    /// The queue the token came from must not have been closed yet (its descriptor or CM id
    /// is still its own).
    pub unsafe fn abort(self) {
        match self {
            // SAFETY: an open socket of a live queue (the contract); shutdown(2) only changes
            // the connection's state.
            AbortToken::Socket(fd) => unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            },
            // SAFETY: a live queue's CM id (the contract); rdma_disconnect moves its QP to the
            // error state, which is safe while the owner polls it.
            #[cfg(feature = "rdma")]
            AbortToken::Rdma(id) => unsafe {
                crate::transport::rdma::ffi::fb_disconnect(id);
            },
        }
    }
}

/// One NVMe queue on one transport connection; with an eventfd signalled after every
/// [`Queue::execute`], so that a thread waiting on the queue (the admin thread's Asynchronous
/// Event Request) wakes although the transport's data, or its wake-up, was taken by someone
/// else.
#[derive(Debug)]
pub(crate) struct Queue(Box<dyn Engine>, Option<Arc<OwnedFd>>);

impl Queue {
    /// Connects a queue to `addr` over `trtype` (NVMe/TCP: ICReq/ICResp; NVMe/RDMA: the RDMA
    /// CM connect with its private data). No NVMe command has been sent yet: the caller sends
    /// Connect next.
    pub(crate) fn connect(
        trtype: Trtype,
        addr: SocketAddr,
        params: QueueParams,
        timeout: Duration,
    ) -> Result<Queue, Error> {
        if params.depth == 0 || params.depth > MAX_DEPTH {
            return Err(Error::Invalid("queue depth must be 1..=4096"));
        }
        Ok(match trtype {
            Trtype::Tcp => Queue(Box::new(TcpQueue::connect(addr, params, timeout)?), None),
            #[cfg(feature = "rdma")]
            Trtype::Rdma => Queue(
                Box::new(super::rdma::RdmaQueue::connect(addr, params, timeout)?),
                None,
            ),
            #[cfg(not(feature = "rdma"))]
            Trtype::Rdma => {
                return Err(Error::Unsupported(
                    "NVMe/RDMA (built without the `rdma` feature)",
                ));
            }
        })
    }

    /// The engine, for what is not wrapped here.
    pub(crate) fn engine(&mut self) -> &mut dyn Engine {
        &mut *self.0
    }

    /// What the NVMe/TCP connection initialization settled (defaults on NVMe/RDMA: no
    /// digests, no MAXH2CDATA).
    pub(crate) fn negotiated(&self) -> Negotiated {
        self.0.negotiated().unwrap_or_default()
    }

    /// The queue's parameters.
    pub(crate) fn params(&self) -> &QueueParams {
        self.0.params()
    }

    /// The queue's counters.
    pub(crate) fn stats(&self) -> QueueStats {
        self.0.stats()
    }

    /// Commands in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.0.in_flight()
    }

    /// Whether the connection is gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.0.is_dead()
    }

    /// See [`Engine::fd`].
    pub(crate) fn fd(&self) -> RawFd {
        self.0.fd()
    }

    /// See [`AbortToken`].
    pub(crate) fn abort_token(&self) -> AbortToken {
        self.0.abort_token()
    }

    /// Whether work waits for the next step.
    pub(crate) fn has_tx(&self) -> bool {
        self.0.has_tx()
    }

    /// Queues command `sqe` (its CID and SGL1 are overwritten) with `buf` as its data,
    /// `buf.len()` bytes in direction `xfer`.
    pub(crate) fn submit(
        &mut self,
        sqe: Sqe,
        xfer: Xfer,
        buf: Vec<u8>,
        tag: u64,
    ) -> Result<(), Rejected> {
        self.submit_data(sqe, xfer, CmdData::Vec(buf), tag)
            .map_err(|(reason, d)| Rejected {
                reason,
                buf: match d {
                    CmdData::Vec(v) => v,
                    CmdData::Sg(_) => unreachable!("submitted a vector"),
                },
            })
    }

    /// [`Queue::submit`] with either kind of data; a refused command hands its data back.
    pub(crate) fn submit_data(
        &mut self,
        sqe: Sqe,
        xfer: Xfer,
        data: CmdData,
        tag: u64,
    ) -> Result<(), (RejectReason, CmdData)> {
        self.0.submit_inner(sqe, xfer, data, tag, false)
    }

    /// Moves finished commands to `out` (internal ones stay), then returns how many.
    pub(crate) fn take_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let done = self.0.done();
        let before = out.len();
        if done.iter().all(|c| !c.internal) {
            out.append(done);
        } else {
            let mut i = 0;
            while i < done.len() {
                if done[i].internal {
                    i += 1;
                } else {
                    out.push(done.remove(i));
                }
            }
        }
        out.len() - before
    }

    /// Makes progress without blocking (see [`Engine::step`]).
    pub(crate) fn step(&mut self) -> Result<(), Error> {
        self.0.step()
    }

    /// Submits `sqe` and waits for its completion (see [`execute`]).
    pub(crate) fn execute(
        &mut self,
        sqe: Sqe,
        xfer: Xfer,
        buf: Vec<u8>,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Completion, Error> {
        let r = execute(&mut *self.0, sqe, xfer, buf, timeout, what);
        // Always (a blocking command is rare): besides completions left behind for the
        // waiter, this command's steps may have taken the wake-up the waiter sleeps on (an
        // RDMA completion channel's event, which then needs arming again).
        if let Some(fd) = &self.1 {
            ferroblk_bdev::eventfd::signal(fd.as_fd());
        }
        r
    }

    /// Signals `fd` after every [`Queue::execute`].
    pub(crate) fn set_notify(&mut self, fd: Arc<OwnedFd>) {
        self.1 = Some(fd);
    }

    /// Blocks until there may be something to do or `timeout` passes.
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        self.0.wait(timeout)
    }

    /// See [`Engine::arm`].
    pub(crate) fn arm(&mut self) -> bool {
        self.0.arm()
    }

    /// Closes the connection (commands in flight complete with Host Pathing Error).
    pub(crate) fn close(&mut self) {
        let _ = self.0.fail(Error::Disconnected);
    }
}

/// Submits `sqe` on `e` and waits for its completion; other commands' completions found
/// meanwhile stay queued for the next take. A timeout tears the queue down (the command's
/// buffer cannot be reclaimed otherwise).
pub(super) fn execute<E: Engine + ?Sized>(
    e: &mut E,
    sqe: Sqe,
    xfer: Xfer,
    buf: Vec<u8>,
    timeout: Duration,
    what: &'static str,
) -> Result<Completion, Error> {
    e.submit_inner(sqe, xfer, CmdData::Vec(buf), 0, true)
        .map_err(|(reason, _)| match reason {
            RejectReason::Disconnected => Error::Disconnected,
            RejectReason::Full => Error::Invalid("no free command slot"),
            RejectReason::TooLarge => Error::Invalid("buffer larger than the queue allows"),
            RejectReason::BadBuffer => Error::Invalid("buffer does not match the command"),
        })?;
    let deadline = Instant::now() + timeout;
    let result = loop {
        let stepped = e.step();
        // A real completion counts even if the connection failed right after it (a
        // controller that answers Disconnect and closes, for example).
        if let Some(i) = e.done().iter().position(|c| c.internal && !c.lost) {
            break Ok(e.done().remove(i));
        }
        if let Err(err) = stepped {
            break Err(err);
        }
        if let Err(err) = wait_until(e, deadline, what) {
            break Err(err);
        }
    };
    if result.is_err() {
        // The command was failed with the queue; its completion is of no use.
        e.done().retain(|c| !c.internal);
    }
    result
}

/// Waits for `e` until `deadline`; past it, tears the queue down.
pub(super) fn wait_until<E: Engine + ?Sized>(
    e: &mut E,
    deadline: Instant,
    what: &'static str,
) -> Result<(), Error> {
    let now = Instant::now();
    if now >= deadline {
        return Err(e.fail(Error::Timeout(what)));
    }
    e.wait(Some(deadline - now))
}

/// The completion of command `cid` of queue `sqid` lost with its connection.
pub(super) fn lost_cqe(cid: u16, sqid: u16) -> Cqe {
    Cqe {
        cid,
        sqid,
        status: HOST_PATHING_ERROR,
        ..Cqe::default()
    }
}

/// `poll(2)` on up to two `(fd, events)`; returns a bit per fd that has an event (bit i: the
/// i-th). An interrupted wait returns 0.
pub(super) fn poll_fds(fds: &[(RawFd, i16)], timeout: Option<Duration>) -> Result<u32, Error> {
    let mut p = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 2];
    for (slot, &(fd, events)) in p.iter_mut().zip(fds) {
        slot.fd = fd;
        slot.events = events;
    }
    let ms = timeout.map_or(-1, |t| {
        // Round up so a sub-millisecond wait does not spin.
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    });
    let n = fds.len().min(p.len());
    // SAFETY: `p` holds `n` initialised pollfds on the stack; poll only writes their `revents`.
    let rc = unsafe { libc::poll(p.as_mut_ptr(), n as libc::nfds_t, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::Io(e));
        }
        return Ok(0);
    }
    Ok(p[..n]
        .iter()
        .enumerate()
        .filter(|(_, x)| x.revents != 0)
        .fold(0, |m, (i, _)| m | (1 << i)))
}

/// The bytes a command moves, or why a queue refuses it: gone, data beyond the queue's
/// maximum, or no data for a command that moves some.
pub(super) fn transfer_len(
    dead: bool,
    xfer: Xfer,
    data: &CmdData,
    params: &QueueParams,
) -> Result<usize, RejectReason> {
    if dead {
        return Err(RejectReason::Disconnected);
    }
    let len = match xfer {
        Xfer::None => 0,
        Xfer::ToController | Xfer::FromController => data.len(),
    };
    if len > params.max_data || len > u32::MAX as usize {
        return Err(RejectReason::TooLarge);
    }
    if xfer != Xfer::None && len == 0 {
        return Err(RejectReason::BadBuffer);
    }
    Ok(len)
}
