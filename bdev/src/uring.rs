//! One io_uring per thread, shared by every user on that thread (as SPDK's uring bdev does):
//! the file bdev channels of a reactor and the reactor's own wake-ups.
//!
//! Each user registers as a *client* and gets a token; a submission's `user_data` is
//! `token << 32 | slot`. Whoever reaps the completion queue routes each completion to its
//! client's queue, which the client drains in its own `poll`. Everything here is single-threaded
//! (`Rc`, `RefCell`): no lock, no atomic on the hot path.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::time::Duration;

use io_uring::{IoUring, squeue, types};

use crate::error::BdevError;

/// Submission queue entries of a thread's ring.
const SQ_ENTRIES: u32 = 1024;

/// The slot in which [`RingClient::cancel`]'s own completion is routed.
pub const CANCEL_SLOT: u32 = u32::MAX;

struct Client {
    cqes: VecDeque<(u32, i32, u32)>,
    live: bool,
    /// Bumped each time the entry is reused, so a late completion for a dropped client (a
    /// multishot poll still armed) is never routed to its successor.
    generation: u16,
}

struct RingInner {
    ring: RefCell<IoUring>,
    /// Set when a reactor runs on this thread: it alone reaps the completion queue, once per
    /// turn of its loop, and clients only take what it routed to them.
    driven: Cell<bool>,
    clients: RefCell<Vec<Client>>,
    unsubmitted: Cell<u32>,
    routed: Cell<usize>,
    in_flight: Cell<usize>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<RingInner>>> = const { RefCell::new(None) };
}

/// The calling thread's io_uring.
#[derive(Clone)]
pub struct ThreadRing {
    inner: Rc<RingInner>,
}

impl ThreadRing {
    /// The ring of the calling thread, created on first use.
    pub fn current() -> Result<ThreadRing, BdevError> {
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(inner) = &*c {
                return Ok(ThreadRing {
                    inner: inner.clone(),
                });
            }
            // COOP_TASKRUN: the kernel does not interrupt the thread to post completions that
            // need task work (socket polls); TASKRUN_FLAG tells us when such work waits, so
            // `reap` enters the kernel only then. Older kernels get the plain ring.
            let ring = IoUring::builder()
                .setup_cqsize(SQ_ENTRIES * 4)
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .build(SQ_ENTRIES)
                .or_else(|_| {
                    IoUring::builder()
                        .setup_cqsize(SQ_ENTRIES * 4)
                        .build(SQ_ENTRIES)
                })
                .map_err(BdevError::Uring)?;
            let inner = Rc::new(RingInner {
                ring: RefCell::new(ring),
                driven: Cell::new(false),
                clients: RefCell::new(Vec::new()),
                unsubmitted: Cell::new(0),
                routed: Cell::new(0),
                in_flight: Cell::new(0),
            });
            *c = Some(inner.clone());
            Ok(ThreadRing { inner })
        })
    }

    /// Registers a client whose completions queue up to `capacity` entries without allocating.
    pub fn register(&self, capacity: usize) -> RingClient {
        let mut clients = self.inner.clients.borrow_mut();
        let index = match clients.iter().position(|c| !c.live) {
            Some(i) => {
                let c = &mut clients[i];
                c.cqes = VecDeque::with_capacity(capacity);
                c.live = true;
                c.generation = c.generation.wrapping_add(1);
                i
            }
            None => {
                clients.push(Client {
                    cqes: VecDeque::with_capacity(capacity),
                    live: true,
                    generation: 0,
                });
                clients.len() - 1
            }
        };
        assert!(index < 1 << 16, "too many io_uring clients on one thread");
        RingClient {
            ring: self.clone(),
            token: u32::from(clients[index].generation) << 16 | index as u32,
            index,
        }
    }

    /// Passes pushed submissions to the kernel, if any (one system call per batch).
    pub fn flush(&self) {
        if self.inner.unsubmitted.get() > 0 {
            let r = self.inner.ring.borrow().submit();
            match r {
                Ok(n) => {
                    let left = self.inner.unsubmitted.get().saturating_sub(n as u32);
                    self.inner.unsubmitted.set(left);
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => tracing::error!(error = %e, "io_uring submit failed"),
            }
        }
    }

    /// Makes the calling thread's reactor the one reaper of this ring: from now on
    /// [`RingClient::poll`] only takes what the reactor routed.
    pub fn set_driven(&self) {
        self.inner.driven.set(true);
    }

    /// Routes every completion in the queue to its client; returns how many. A reactor calls
    /// this once per turn (and after it slept); code not run by a reactor uses
    /// [`RingClient::poll`] or [`ThreadRing::wait`].
    pub fn reap(&self) -> usize {
        let mut ring = self.inner.ring.borrow_mut();
        if ring.submission().taskrun() {
            // Completions wait on task work: one system call runs it.
            let _ = ring.submitter().submit();
        }
        let mut clients = self.inner.clients.borrow_mut();
        let mut n = 0;
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            let token = (ud >> 32) as u32;
            if let Some(c) = clients.get_mut((token & 0xffff) as usize)
                && c.live
                && c.generation == (token >> 16) as u16
            {
                c.cqes.push_back((ud as u32, cqe.result(), cqe.flags()));
                n += 1;
            }
        }
        self.inner.routed.set(self.inner.routed.get() + n);
        n
    }

    /// Completions routed to clients and not yet taken by them. A reactor must not sleep while
    /// this is non-zero.
    pub fn routed_pending(&self) -> usize {
        self.inner.routed.get()
    }

    /// Operations submitted to the kernel and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.get()
    }

    /// Submits pending entries and sleeps until at least one completion arrives or `timeout`
    /// passes; then routes completions.
    pub fn wait(&self, timeout: Option<Duration>) {
        {
            let ring = self.inner.ring.borrow();
            let submitter = ring.submitter();
            let r = match timeout {
                Some(t) => {
                    let ts = types::Timespec::from(t);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    submitter.submit_with_args(1, &args)
                }
                None => submitter.submit_and_wait(1),
            };
            match r {
                Ok(_) => self.inner.unsubmitted.set(0),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {
                    self.inner.unsubmitted.set(0)
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => tracing::error!(error = %e, "io_uring wait failed"),
            }
        }
        self.reap();
    }
}

/// One user's access to its thread's ring.
pub struct RingClient {
    ring: ThreadRing,
    token: u32,
    index: usize,
}

impl RingClient {
    /// The shared ring.
    pub fn ring(&self) -> &ThreadRing {
        &self.ring
    }

    /// Queues `sqe` with `slot` in its user data; flushes the queue once if it is full. Returns
    /// false when the ring stays full (the caller hands its request back).
    ///
    /// # Safety
    /// Every buffer, iovec array and file descriptor the entry refers to must stay valid until
    /// its completion is taken from [`RingClient::take`].
    pub unsafe fn push(&self, sqe: squeue::Entry, slot: u32) -> bool {
        let sqe = sqe.user_data(u64::from(self.token) << 32 | u64::from(slot));
        for attempt in 0..2 {
            {
                let mut ring = self.ring.inner.ring.borrow_mut();
                // SAFETY: the caller keeps every resource of the entry alive until completion.
                if unsafe { ring.submission().push(&sqe) }.is_ok() {
                    drop(ring);
                    let i = &self.ring.inner;
                    i.unsubmitted.set(i.unsubmitted.get() + 1);
                    i.in_flight.set(i.in_flight.get() + 1);
                    return true;
                }
            }
            if attempt == 0 {
                self.ring.flush();
            }
        }
        false
    }

    /// Asks the kernel to cancel this client's pending request(s) in `slot` (an armed
    /// multishot poll, say: the kernel holds a reference to the polled file until the poll ends,
    /// so a socket closed with its poll still armed would stay allocated until the ring is
    /// destroyed). The cancel's own completion is routed with slot [`CANCEL_SLOT`]; after the
    /// client is dropped both completions are discarded. Returns false when the ring is full.
    pub fn cancel(&self, slot: u32) -> bool {
        let target = u64::from(self.token) << 32 | u64::from(slot);
        let sqe = io_uring::opcode::AsyncCancel::new(target).build();
        // SAFETY: a cancel refers to no buffer and no descriptor.
        let pushed = unsafe { self.push(sqe, CANCEL_SLOT) };
        self.ring.flush();
        pushed
    }

    /// Takes this client's routed completions, calling `f(slot, result, flags)` for each.
    pub fn take(&self, mut f: impl FnMut(u32, i32, u32)) -> usize {
        let i = &self.ring.inner;
        // Take the queue out to run `f` without holding the borrow (f may push new entries).
        let mut q = std::mem::take(&mut i.clients.borrow_mut()[self.index].cqes);
        let n = q.len();
        for (slot, res, flags) in q.drain(..) {
            f(slot, res, flags);
        }
        let mut clients = i.clients.borrow_mut();
        let c = &mut clients[self.index];
        // Completions routed while `f` ran stay queued, after the ones just taken.
        q.append(&mut c.cqes);
        c.cqes = q;
        drop(clients);
        i.routed.set(i.routed.get() - n);
        i.in_flight.set(i.in_flight.get().saturating_sub(n));
        n
    }

    /// Whether completions are waiting for this client.
    pub fn has_completions(&self) -> bool {
        !self.ring.inner.clients.borrow()[self.index].cqes.is_empty()
    }

    /// Takes this client's completions (a channel's `poll`). On a thread no reactor drives, it
    /// first flushes submissions and routes completions itself.
    pub fn poll(&self, f: impl FnMut(u32, i32, u32)) -> usize {
        if !self.ring.inner.driven.get() {
            self.ring.flush();
            self.ring.reap();
        }
        self.take(f)
    }
}

/// Blocks the calling thread (a control thread: an accept loop, a vhost-user connection) until
/// `fd` is readable, has an error or hang-up to report, or `timeout` passes: `poll(2)`, not a
/// reactor's ring. Returns whether something was reported (false on timeout or interruption).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd for a descriptor the borrow keeps open during the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Readiness of one file descriptor (a socket, an eventfd), watched by a poll on the calling
/// thread's ring: the one way fronts and bdevs wait for an fd on a reactor.
///
/// A *persistent* watch ([`FdWatch::new`]) is a multishot poll, armed at once and re-armed
/// whenever the kernel ends it; a *one-shot* watch ([`FdWatch::once`]) is armed by
/// [`FdWatch::arm`] and reports once (a socket's POLLOUT while a send waits). A reactor with no
/// other work sleeps until a watched fd is ready. Dropping the watch cancels its poll (the
/// kernel holds a reference to the polled file while a poll is armed, so a closed socket would
/// otherwise stay allocated until the ring is destroyed).
///
/// The owner keeps the fd open for as long as the watch exists.
pub struct FdWatch {
    client: RingClient,
    fd: i32,
    events: u32,
    multishot: bool,
    armed: Cell<bool>,
}

/// The slot of a watch's poll in its client.
const WATCH_SLOT: u32 = 0;

impl FdWatch {
    /// Watches `fd` for `events` (`libc::POLLIN as u32`, ...) until dropped.
    pub fn new(fd: BorrowedFd<'_>, events: u32) -> Result<FdWatch, BdevError> {
        let w = FdWatch::with(fd, events, true)?;
        w.arm();
        Ok(w)
    }

    /// A watch that reports `events` once per [`arm`](Self::arm).
    pub fn once(fd: BorrowedFd<'_>, events: u32) -> Result<FdWatch, BdevError> {
        FdWatch::with(fd, events, false)
    }

    fn with(fd: BorrowedFd<'_>, events: u32, multishot: bool) -> Result<FdWatch, BdevError> {
        Ok(FdWatch {
            client: ThreadRing::current()?.register(4),
            fd: fd.as_raw_fd(),
            events,
            multishot,
            armed: Cell::new(false),
        })
    }

    /// Arms the poll unless it is armed; submits at once.
    pub fn arm(&self) {
        if self.armed.get() {
            return;
        }
        let sqe = io_uring::opcode::PollAdd::new(types::Fd(self.fd), self.events)
            .multi(self.multishot)
            .build();
        // SAFETY: a poll refers to no memory; the fd is kept open by the watch's owner (see the
        // type's doc), and a completion after the watch is dropped is discarded by the client
        // generation check.
        if unsafe { self.client.push(sqe, WATCH_SLOT) } {
            self.armed.set(true);
            self.client.ring().flush();
        } else {
            tracing::error!(fd = self.fd, "io_uring full: cannot arm an fd watch");
        }
    }

    /// Whether the poll is armed.
    pub fn is_armed(&self) -> bool {
        self.armed.get()
    }

    /// How many readiness reports arrived since the last call (0: none). A persistent watch
    /// whose poll the kernel ended is re-armed here.
    pub fn take(&self) -> usize {
        let mut ended = None;
        let n = self.client.poll(|slot, res, flags| {
            if slot == WATCH_SLOT && !io_uring::cqueue::more(flags) {
                ended = Some(res);
            }
        });
        match ended {
            None => {}
            Some(res) if res < 0 && res != -libc::ECANCELED => {
                // A poll the kernel refuses (a closed fd) would fail again: leave it disarmed;
                // the owner sees the fd's own error when it next uses it.
                self.armed.set(false);
                tracing::warn!(fd = self.fd, error = res, "fd watch ended with an error");
            }
            Some(_) => {
                self.armed.set(false);
                if self.multishot {
                    self.arm();
                }
            }
        }
        n
    }
}

impl Drop for FdWatch {
    fn drop(&mut self) {
        if self.armed.get() && !self.client.cancel(WATCH_SLOT) {
            tracing::warn!(
                fd = self.fd,
                "io_uring full: an fd watch stays armed, keeping its file until the thread's ring is gone"
            );
        }
    }
}

impl Drop for RingClient {
    fn drop(&mut self) {
        let mut clients = self.ring.inner.clients.borrow_mut();
        let c = &mut clients[self.index];
        let left = c.cqes.len();
        c.cqes.clear();
        c.live = false;
        drop(clients);
        let i = &self.ring.inner;
        i.routed.set(i.routed.get() - left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

    /// Reaps until `n` completions are routed to `client` (or a second passes).
    fn take_n(client: &RingClient, n: usize) -> Vec<(u32, i32, u32)> {
        let mut got = Vec::new();
        let t = std::time::Instant::now();
        while got.len() < n && t.elapsed() < Duration::from_secs(1) {
            client.ring().wait(Some(Duration::from_millis(10)));
            client.poll(|s, r, f| got.push((s, r, f)));
        }
        got
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd has no memory preconditions; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn kick(fd: &OwnedFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd.
        unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Waits until `w` reports (or a second passes); returns how many reports.
    fn wait_watch(w: &FdWatch) -> usize {
        let t = std::time::Instant::now();
        loop {
            let n = w.take();
            if n > 0 || t.elapsed() > Duration::from_secs(1) {
                return n;
            }
            ThreadRing::current()
                .unwrap()
                .wait(Some(Duration::from_millis(10)));
        }
    }

    #[test]
    fn fd_watch_reports_readiness_until_dropped() {
        let fd = eventfd();
        let w = FdWatch::new(fd.as_fd(), libc::POLLIN as u32).unwrap();
        assert!(w.is_armed());
        assert_eq!(w.take(), 0, "nothing written yet");
        kick(&fd);
        assert_eq!(wait_watch(&w), 1);
        assert!(w.is_armed(), "a persistent watch stays armed");
        // Level-triggered: drain the counter, then a second write reports again.
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from the non-blocking eventfd.
        unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        kick(&fd);
        assert!(wait_watch(&w) >= 1);
        drop(w);
        // The cancel's completions go to a dropped client: nothing is left routed.
        let ring = ThreadRing::current().unwrap();
        ring.wait(Some(Duration::from_millis(20)));
        assert_eq!(ring.routed_pending(), 0);
    }

    #[test]
    fn one_shot_watch_reports_once_per_arm() {
        let fd = eventfd();
        kick(&fd);
        let w = FdWatch::once(fd.as_fd(), libc::POLLIN as u32).unwrap();
        assert!(!w.is_armed());
        w.arm();
        assert_eq!(wait_watch(&w), 1);
        assert!(!w.is_armed(), "reported once, then disarmed");
        ThreadRing::current()
            .unwrap()
            .wait(Some(Duration::from_millis(20)));
        assert_eq!(w.take(), 0, "no second report without arm");
        w.arm();
        assert_eq!(wait_watch(&w), 1);
    }

    #[test]
    fn cancel_ends_an_armed_multishot_poll() {
        let ring = ThreadRing::current().unwrap();
        let client = ring.register(8);
        // SAFETY: eventfd has no memory preconditions; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sqe = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build();
        // SAFETY: the eventfd outlives the poll (cancelled below before `fd` drops).
        assert!(unsafe { client.push(sqe, 7) });
        ring.flush();
        // The poll is armed: a write fires it and it stays armed (CQE_F_MORE).
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd.
        unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let fired = take_n(&client, 1);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].0, 7);
        assert!(
            io_uring::cqueue::more(fired[0].2),
            "multishot poll stays armed"
        );
        // Cancel: the poll ends with -ECANCELED and the cancel itself succeeds.
        assert!(client.cancel(7));
        let mut done = take_n(&client, 2);
        done.sort_by_key(|c| c.0);
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!((done[0].0, done[0].1), (7, -libc::ECANCELED));
        assert!(!io_uring::cqueue::more(done[0].2), "the poll has ended");
        assert_eq!((done[1].0, done[1].1), (CANCEL_SLOT, 0));
    }
}
