//! I/O queues: the NVM command set over one NVMe/TCP connection or NVMe/RDMA queue pair (NVM
//! Command Set 1.0 §3.2).
//!
//! Two ways to drive an [`IoQueue`]:
//!
//! - poll style, for load generators and reactors: [`IoQueue::submit`] queues a command with
//!   its buffer and a tag (nothing is written yet), [`IoQueue::poll`] writes every queued
//!   capsule with one `writev`, reads what arrived and appends finished commands to the
//!   caller's vector. Neither blocks; [`IoQueue::wait`] sleeps until the socket has something
//!   (or use [`IoQueue::as_raw_fd`] with your own `epoll`). A full queue hands the request back
//!   ([`Rejected`]) instead of allocating.
//! - blocking, for tools and tests: [`IoQueue::read`], [`IoQueue::write`], [`IoQueue::flush`],
//!   [`IoQueue::write_zeroes`], [`IoQueue::deallocate`], [`IoQueue::execute`]. They may be
//!   mixed with the poll style: completions of other commands found while blocking are kept
//!   for the next `poll`.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use ferroblk_bdev::SgList;

use super::error::{Error, RejectReason, Rejected};
use super::queue::{AbortToken, CmdData, Completion, Queue, QueueStats, Xfer};
use crate::spec::command::{
    DatasetManagement, DsmRange, IoOpcode, ReadWrite, SglDescriptor, Sqe, WriteZeroes,
};
use crate::spec::fabrics::Disconnect;
use crate::subsystem::Trtype;

/// An NVM command. Commands with data take it from (or put it into) the buffer submitted with
/// them: the whole buffer is the transfer, so its length must be `nlb` × the block size for
/// Read and Write and `nr` × 16 for Dataset Management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoCommand {
    /// Read `nlb` blocks from `slba`.
    Read {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of blocks (1..=65536).
        nlb: u32,
    },
    /// Write `nlb` blocks at `slba`.
    Write {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of blocks (1..=65536).
        nlb: u32,
        /// Force Unit Access.
        fua: bool,
    },
    /// Flush the volatile write cache.
    Flush {
        /// Namespace (FFFFFFFFh: all).
        nsid: u32,
    },
    /// Write Zeroes.
    WriteZeroes {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of blocks (1..=65536).
        nlb: u32,
        /// Deallocate allowed.
        deac: bool,
    },
    /// Dataset Management with the Deallocate attribute; the ranges ([`encode_ranges`]) are
    /// the buffer.
    Deallocate {
        /// Namespace.
        nsid: u32,
        /// Number of ranges in the buffer (1..=256).
        nr: u32,
    },
}

impl IoCommand {
    /// The command's SQE (CID and SGL are set at submission) and data direction.
    pub fn to_sqe(&self) -> (Sqe, Xfer) {
        let sgl = SglDescriptor::default();
        match *self {
            IoCommand::Read { nsid, slba, nlb } => (
                ReadWrite {
                    nsid,
                    slba,
                    nlb,
                    ..ReadWrite::default()
                }
                .to_sqe(IoOpcode::Read, 0, &sgl),
                Xfer::FromController,
            ),
            IoCommand::Write {
                nsid,
                slba,
                nlb,
                fua,
            } => (
                ReadWrite {
                    nsid,
                    slba,
                    nlb,
                    fua,
                    ..ReadWrite::default()
                }
                .to_sqe(IoOpcode::Write, 0, &sgl),
                Xfer::ToController,
            ),
            IoCommand::Flush { nsid } => {
                let mut s = Sqe::new(IoOpcode::Flush as u8, 0);
                s.set_nsid(nsid);
                (s, Xfer::None)
            }
            IoCommand::WriteZeroes {
                nsid,
                slba,
                nlb,
                deac,
            } => (
                WriteZeroes {
                    nsid,
                    slba,
                    nlb,
                    deac,
                    fua: false,
                }
                .to_sqe(0),
                Xfer::None,
            ),
            IoCommand::Deallocate { nsid, nr } => (
                DatasetManagement {
                    nsid,
                    nr,
                    idr: false,
                    idw: false,
                    ad: true,
                }
                .to_sqe(0, &sgl),
                Xfer::ToController,
            ),
        }
    }
}

/// The Dataset Management data for `ranges` (16 bytes each, NVM Command Set 1.0 Figure 39).
pub fn encode_ranges(ranges: &[DsmRange]) -> Vec<u8> {
    let mut v = vec![0u8; ranges.len() * DsmRange::LEN];
    for (r, out) in ranges.iter().zip(v.chunks_exact_mut(DsmRange::LEN)) {
        r.write_to(out);
    }
    v
}

/// One I/O queue (submission/completion queue pair) on its own connection. See the module
/// documentation. Dropping it closes the connection; [`IoQueue::disconnect`] sends the Fabrics
/// Disconnect first when the controller supports it.
#[derive(Debug)]
pub struct IoQueue {
    q: Queue,
    trtype: Trtype,
    disconnect_supported: bool,
    timeout: Duration,
}

impl IoQueue {
    pub(crate) fn new(
        q: Queue,
        trtype: Trtype,
        disconnect_supported: bool,
        timeout: Duration,
    ) -> IoQueue {
        IoQueue {
            q,
            trtype,
            disconnect_supported,
            timeout,
        }
    }

    /// Queue identifier.
    pub fn qid(&self) -> u16 {
        self.q.params().qid
    }

    /// Commands that can be in flight at once.
    pub fn depth(&self) -> usize {
        usize::from(self.q.params().depth)
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.q.in_flight()
    }

    /// Largest buffer one command may carry.
    pub fn max_data(&self) -> usize {
        self.q.params().max_data
    }

    /// Largest write sent as in-capsule data (larger writes wait for an R2T).
    pub fn max_in_capsule(&self) -> usize {
        self.q.params().max_in_capsule
    }

    /// The transport.
    pub fn trtype(&self) -> Trtype {
        self.trtype
    }

    /// Whether header and data digests are in force.
    pub fn digests(&self) -> (bool, bool) {
        let n = self.q.negotiated();
        (n.hdgst, n.ddgst)
    }

    /// The MAXH2CDATA the controller announced (NVMe/TCP; 0 on NVMe/RDMA).
    pub fn max_h2c_data(&self) -> u32 {
        self.q.negotiated().maxh2cdata
    }

    /// What went over the wire so far.
    pub fn stats(&self) -> QueueStats {
        self.q.stats()
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        !self.q.is_dead()
    }

    /// Queues `cmd` with `buf` (see [`IoCommand`] for what the buffer must hold) and `tag`,
    /// which comes back in its [`Completion`]. Nothing is sent until [`IoQueue::poll`]. A full
    /// or disconnected queue hands the buffer back.
    #[inline]
    pub fn submit(&mut self, cmd: IoCommand, buf: Vec<u8>, tag: u64) -> Result<(), Rejected> {
        let (sqe, xfer) = cmd.to_sqe();
        self.q.submit(sqe, xfer, buf, tag)
    }

    /// [`IoQueue::submit`] with the data in a bdev request's scatter-gather list: written
    /// from its segments and read into them, without a copy. The list's length is the
    /// transfer. A full or disconnected queue hands the list back with the reason.
    #[inline]
    pub fn submit_sg(
        &mut self,
        cmd: IoCommand,
        sg: SgList,
        tag: u64,
    ) -> Result<(), (RejectReason, SgList)> {
        let (sqe, xfer) = cmd.to_sqe();
        self.q
            .submit_data(sqe, xfer, CmdData::Sg(sg), tag)
            .map_err(|(r, d)| match d {
                CmdData::Sg(l) => (r, l),
                CmdData::Vec(_) => unreachable!("submitted a list"),
            })
    }

    /// Queues any command (vendor specific, Compare ...): its CID and SGL1 are set here.
    pub fn submit_raw(
        &mut self,
        sqe: Sqe,
        xfer: Xfer,
        buf: Vec<u8>,
        tag: u64,
    ) -> Result<(), Rejected> {
        self.q.submit(sqe, xfer, buf, tag)
    }

    /// Sends what is queued, handles what arrived, and appends finished commands to `out`
    /// (returns how many). Never blocks. On `Err` the connection is gone and `out` has still
    /// received every command that was in flight, with [`super::HOST_PATHING_ERROR`] and its
    /// buffer.
    #[inline]
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, Error> {
        let r = self.q.step();
        let n = self.q.take_completions(out);
        r.map(|()| n)
    }

    /// Blocks until the queue has something to do (NVMe/TCP: the socket is readable, or
    /// writable with bytes queued; NVMe/RDMA: a completion arrived) or `timeout` passes
    /// (`None`: no limit). Call [`IoQueue::poll`] next.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        self.q.wait(timeout)
    }

    /// For callers that sleep on [`IoQueue::as_raw_fd`] themselves (a reactor): asks for the
    /// fd to become readable at the next completion. Returns `true` if work arrived meanwhile
    /// (poll before sleeping). NVMe/RDMA needs it (the completion channel signals only once
    /// armed); on NVMe/TCP the socket always signals and this returns `false`.
    pub fn arm(&mut self) -> bool {
        self.q.arm()
    }

    /// Registers `len` bytes at `ptr` with the queue's RDMA device, so that buffers inside
    /// them move by the controller's RDMA READ / WRITE without a copy (NVMe/RDMA; a no-op on
    /// NVMe/TCP). Register long-lived buffers once (a load generator's per-slot buffers, a
    /// pool); a buffer outside every registered range is copied through a registered buffer
    /// of the queue instead ([`QueueStats::bounced`]).
    ///
    /// # Safety
    /// The memory stays allocated (not freed, not unmapped) until
    /// [`IoQueue::deregister_memory`] or the queue is dropped: the registration pins the
    /// pages it had when registered, and a buffer submitted later at these addresses is
    /// moved through them.
    pub unsafe fn register_memory(&mut self, ptr: *const u8, len: usize) -> Result<(), Error> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.q.engine().register(ptr, len) }
    }

    /// Forgets every [`IoQueue::register_memory`] range (commands in flight must not use
    /// them: call it with none in flight).
    pub fn deregister_memory(&mut self) {
        self.q.engine().deregister_all();
    }

    /// Whether `poll` has work without waiting: bytes to write (NVMe/TCP: the socket was
    /// full) or completions already in (NVMe/RDMA: found by [`IoQueue::arm`]).
    pub fn has_pending_tx(&self) -> bool {
        self.q.has_tx()
    }

    /// Runs `cmd` and blocks until it completes; returns the completion whatever its status
    /// (the buffer is in it).
    pub fn execute(&mut self, cmd: IoCommand, buf: Vec<u8>) -> Result<Completion, Error> {
        let (sqe, xfer) = cmd.to_sqe();
        self.q.execute(sqe, xfer, buf, self.timeout, "I/O command")
    }

    /// Runs `cmd` with the caller's buffer, which is moved in and back (not copied), even when
    /// the command fails.
    fn execute_with(&mut self, cmd: IoCommand, buf: &mut Vec<u8>) -> Result<(), Error> {
        let mut c = self.execute(cmd, std::mem::take(buf))?;
        *buf = std::mem::take(&mut c.buf);
        c.result().map(|_| ())
    }

    /// Reads `nlb` blocks at `slba` into `buf` (its length is the transfer length).
    pub fn read(&mut self, nsid: u32, slba: u64, nlb: u32, buf: &mut Vec<u8>) -> Result<(), Error> {
        self.execute_with(IoCommand::Read { nsid, slba, nlb }, buf)
    }

    /// Writes `buf` (`nlb` blocks) at `slba`.
    pub fn write(
        &mut self,
        nsid: u32,
        slba: u64,
        nlb: u32,
        buf: &mut Vec<u8>,
    ) -> Result<(), Error> {
        self.execute_with(
            IoCommand::Write {
                nsid,
                slba,
                nlb,
                fua: false,
            },
            buf,
        )
    }

    /// Flush.
    pub fn flush(&mut self, nsid: u32) -> Result<(), Error> {
        self.execute_with(IoCommand::Flush { nsid }, &mut Vec::new())
    }

    /// Write Zeroes over `nlb` blocks at `slba`.
    pub fn write_zeroes(
        &mut self,
        nsid: u32,
        slba: u64,
        nlb: u32,
        deac: bool,
    ) -> Result<(), Error> {
        self.execute_with(
            IoCommand::WriteZeroes {
                nsid,
                slba,
                nlb,
                deac,
            },
            &mut Vec::new(),
        )
    }

    /// Dataset Management, Deallocate, of `ranges` (1..=256).
    pub fn deallocate(&mut self, nsid: u32, ranges: &[DsmRange]) -> Result<(), Error> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(Error::Invalid("Dataset Management takes 1..=256 ranges"));
        }
        let nr = ranges.len() as u32;
        self.execute_with(
            IoCommand::Deallocate { nsid, nr },
            &mut encode_ranges(ranges),
        )
    }

    /// Closes the connection at once: every command in flight completes, at the next
    /// [`IoQueue::poll`], with [`super::HOST_PATHING_ERROR`] and its buffer (to be retried
    /// elsewhere). For a controller that stopped answering.
    pub fn abort(&mut self) {
        self.q.close();
    }

    /// Sends the Fabrics Disconnect when the controller supports it (Identify OFCS bit 0),
    /// then closes the connection. Commands still in flight are lost.
    pub fn disconnect(mut self) -> Result<(), Error> {
        let r = if self.disconnect_supported && !self.q.is_dead() && self.q.in_flight() == 0 {
            let sqe = Disconnect { recfmt: 0 }.to_sqe(0);
            self.q
                .execute(sqe, Xfer::None, Vec::new(), self.timeout, "Disconnect")
                .and_then(|c| c.result().map(|_| ()))
        } else {
            Ok(())
        };
        self.q.close();
        r
    }
}

impl IoQueue {
    /// What another thread uses to end this queue's connection (see [`AbortToken`]).
    pub fn abort_token(&self) -> AbortToken {
        self.q.abort_token()
    }
}

impl AsRawFd for IoQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.q.fd()
    }
}
