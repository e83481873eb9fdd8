//! A reactor's channel on an RBD image, and the hand-off that brings librbd's completions back
//! to it.
//!
//! librbd completes requests on its own threads. Each channel owns a [`Handoff`]: one slot per
//! request it may have in flight and an intrusive lock-free stack of finished slots. librbd's
//! callback stores the result in the request's slot and pushes the slot (one compare-and-swap).
//! The channel's `poll` takes the whole stack with one swap. A reactor that is about to sleep
//! arms the hand-off (in `wake`); the first push after that disarms it and writes the channel's
//! eventfd, which the reactor watches ([`FdWatch`]), so the sleeping reactor wakes. Completions
//! that arrive while the reactor polls cost no system call on either side. No thread blocks per
//! request and nothing is allocated per request on our side (librbd allocates its completion
//! object).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

use ferroblk_bdev::uring::FdWatch;
use ferroblk_bdev::{BdevError, ChannelOps, IoCompletion, IoRequest, IoStatus, IoType, Wake};

use crate::ffi;
use crate::image::Image;

/// Requests a channel lets in flight.
pub const RBD_CHANNEL_DEPTH: usize = 256;

/// The empty stack.
const EMPTY: u32 = u32::MAX;

/// One request's place in the hand-off; librbd's callback argument points at it.
struct Slot {
    /// The hand-off it belongs to.
    handoff: *const Handoff,
    /// Its index.
    index: u32,
    /// The next finished slot below it on the stack.
    next: AtomicU32,
    /// librbd's return value (negative errno on failure).
    result: AtomicI64,
}

/// What librbd's threads and the channel's reactor share.
struct Handoff {
    slots: Box<[Slot]>,
    /// Top of the stack of finished slots, [`EMPTY`] when none.
    head: AtomicU32,
    /// Set by the reactor before it sleeps: the next push writes the eventfd.
    armed: AtomicBool,
    /// Written by the first push after the reactor armed the hand-off; watched by the reactor.
    eventfd: OwnedFd,
}

// SAFETY: `Slot::handoff` points at the `Handoff` holding the slot, which stays allocated while
// any request is in flight (each holds a strong count, see `submit`); everything else is atomic
// or immutable after construction.
unsafe impl Send for Handoff {}
// SAFETY: as above.
unsafe impl Sync for Handoff {}

impl Handoff {
    fn new(depth: usize) -> Result<Arc<Handoff>, BdevError> {
        let eventfd = ferroblk_bdev::eventfd::new().map_err(|source| BdevError::Io {
            op: "create the completion eventfd of",
            path: "rbd channel".into(),
            source,
        })?;
        let h = Arc::new_cyclic(|me| Handoff {
            slots: (0..depth)
                .map(|i| Slot {
                    handoff: me.as_ptr(),
                    index: i as u32,
                    next: AtomicU32::new(EMPTY),
                    result: AtomicI64::new(0),
                })
                .collect(),
            head: AtomicU32::new(EMPTY),
            armed: AtomicBool::new(false),
            eventfd,
        });
        debug_assert!(
            h.slots
                .iter()
                .all(|s| std::ptr::eq(s.handoff, Arc::as_ptr(&h)))
        );
        Ok(h)
    }

    /// Publishes a finished slot (any thread).
    fn push(&self, slot: &Slot) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            slot.next.store(head, Ordering::Relaxed);
            // Release: the slot's result and link are visible to the `take` that sees it. SeqCst
            // orders it against the reactor's emptiness check before it sleeps.
            match self.head.compare_exchange_weak(
                head,
                slot.index,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        // SeqCst, after the push: either the reactor's `arm` comes first and this sees it, or
        // this push comes first and the reactor's emptiness check after arming sees it.
        if self.armed.load(Ordering::SeqCst) && self.armed.swap(false, Ordering::SeqCst) {
            ferroblk_bdev::eventfd::signal(self.eventfd.as_fd());
        }
    }

    /// Takes every finished slot (the reactor): the top of the stack, linked through `next`.
    fn take(&self) -> u32 {
        if self.head.load(Ordering::Relaxed) == EMPTY {
            return EMPTY;
        }
        self.head.swap(EMPTY, Ordering::SeqCst)
    }

    fn is_empty(&self) -> bool {
        self.head.load(Ordering::SeqCst) == EMPTY
    }

    /// The reactor may sleep: the next push wakes it. Returns whether the stack is still empty
    /// (if not, the reactor must not sleep: a push may have come before the arming).
    fn arm(&self) -> bool {
        self.armed.store(true, Ordering::SeqCst);
        self.is_empty()
    }

    /// Empties the eventfd's counter so that it reports again on the next write.
    fn drain_eventfd(&self) {
        ferroblk_bdev::eventfd::drain(self.eventfd.as_fd());
    }
}

/// librbd's completion callback (a librbd thread).
unsafe extern "C" fn complete(c: ffi::rbd_completion_t, arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the `Slot` given at submission; its hand-off is kept alive by the strong
    // count the submission took, released below after the last use.
    let slot = unsafe { &*(arg as *const Slot) };
    // SAFETY: `c` is the live completion librbd calls us with; we release it once, here.
    let r = unsafe {
        let r = ffi::rbd_aio_get_return_value(c);
        ffi::rbd_aio_release(c);
        r
    };
    slot.result.store(r as i64, Ordering::Relaxed);
    let handoff = slot.handoff;
    // SAFETY: as above: the hand-off is alive until the decrement below.
    unsafe { (*handoff).push(slot) };
    // SAFETY: gives back the strong count `submit` took for this request.
    unsafe { Arc::decrement_strong_count(handoff) };
}

/// One reactor's channel on an image.
pub(crate) struct RbdChannel {
    // Declared first: its poll is cancelled before the eventfd may close.
    watch: FdWatch,
    image: Arc<Image>,
    handoff: Arc<Handoff>,
    /// The request in each slot while librbd has it.
    reqs: Vec<Option<IoRequest>>,
    free: Vec<u32>,
    shift: u32,
    /// Completions decided without librbd (a submission it refused).
    failed: Vec<IoCompletion>,
}

impl RbdChannel {
    pub(crate) fn new(image: Arc<Image>, shift: u32) -> Result<RbdChannel, BdevError> {
        let handoff = Handoff::new(RBD_CHANNEL_DEPTH)?;
        let watch = FdWatch::new(handoff.eventfd.as_fd(), libc::POLLIN as u32)?;
        Ok(RbdChannel {
            watch,
            image,
            handoff,
            reqs: (0..RBD_CHANNEL_DEPTH).map(|_| None).collect(),
            free: (0..RBD_CHANNEL_DEPTH as u32).rev().collect(),
            shift,
            failed: Vec::with_capacity(RBD_CHANNEL_DEPTH),
        })
    }

    fn in_flight(&self) -> usize {
        RBD_CHANNEL_DEPTH - self.free.len()
    }

    /// Starts the request in slot `i` on librbd; a negative errno if librbd refused it.
    fn start(&mut self, i: u32) -> i32 {
        let slot: *const Slot = &self.handoff.slots[i as usize];
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `slot` lives in the hand-off, which the callback keeps alive (strong count
        // taken below before librbd can call it); `c` is a valid out-pointer.
        let r = unsafe { ffi::rbd_aio_create_completion(slot as *mut _, complete, &mut c) };
        if r < 0 {
            return r;
        }
        // SAFETY: one strong count per request in flight, given back by `complete`.
        unsafe { Arc::increment_strong_count(Arc::as_ptr(&self.handoff)) };
        let io = self.reqs[i as usize]
            .as_ref()
            .expect("slot holds a request");
        let off = io.offset_blocks << self.shift;
        let len = u64::from(io.num_blocks) << self.shift;
        let img = self.image.raw();
        let segs = io.bufs.segments();
        // The iovec array lives in the request, which stays in its slot (not moved) until the
        // completion is taken; `IoSeg` is laid out as `struct iovec`.
        let iov = segs.as_ptr().cast::<libc::iovec>();
        let iovcnt = segs.len() as i32;
        // SAFETY: the image is open while the channel holds it; the request's buffers and
        // segment list stay valid and untouched until its completion is taken (it owns them
        // and stays in `reqs`).
        let r = unsafe {
            match io.io_type {
                IoType::Read => ffi::rbd_aio_readv(img, iov, iovcnt, off, c),
                IoType::Write => ffi::rbd_aio_writev(img, iov, iovcnt, off, c),
                IoType::Unmap => ffi::rbd_aio_discard(img, off, len, c),
                IoType::WriteZeroes => ffi::rbd_aio_write_zeroes(img, off, len as usize, c, 0, 0),
                IoType::Flush => ffi::rbd_aio_flush(img, c),
            }
        };
        if r < 0 {
            // librbd did not take it: the callback will not run.
            // SAFETY: the completion is ours alone; the count taken above goes back.
            unsafe {
                ffi::rbd_aio_release(c);
                Arc::decrement_strong_count(Arc::as_ptr(&self.handoff));
            }
        }
        r
    }
}

/// The status a librbd result maps to.
fn status(r: i64) -> IoStatus {
    if r >= 0 {
        IoStatus::Success
    } else if r == -i64::from(libc::EROFS) {
        IoStatus::ReadOnly
    } else if r == -i64::from(libc::ENOSPC) || r == -i64::from(libc::EDQUOT) {
        IoStatus::NoSpace
    } else {
        // A timeout (the cluster is unreachable) or an OSD error.
        IoStatus::MediaError
    }
}

impl ChannelOps for RbdChannel {
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        let Some(i) = self.free.pop() else {
            return Err(io);
        };
        self.reqs[i as usize] = Some(io);
        let r = self.start(i);
        if r < 0 {
            let io = self.reqs[i as usize].take().expect("slot holds a request");
            self.free.push(i);
            tracing::debug!(error = %ffi::errno(r.into()), "librbd refused a request");
            self.failed.push(io.complete(IoStatus::MediaError));
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let start = done.len();
        done.append(&mut self.failed);
        if self.watch.take() > 0 {
            self.handoff.drain_eventfd();
        }
        let mut i = self.handoff.take();
        while i != EMPTY {
            let slot = &self.handoff.slots[i as usize];
            let next = slot.next.load(Ordering::Relaxed);
            let r = slot.result.load(Ordering::Relaxed);
            let io = self.reqs[i as usize]
                .take()
                .expect("finished slot holds a request");
            let st = status(r);
            if !st.is_ok() {
                tracing::debug!(error = %ffi::errno(r), io_type = ?io.io_type, "rbd request failed");
                if matches!(
                    io.io_type,
                    IoType::Write | IoType::Unmap | IoType::WriteZeroes
                ) {
                    self.image.write_failed();
                }
            }
            done.push(io.complete(st));
            self.free.push(i);
            i = next;
        }
        done.len() - start
    }

    fn wake(&self) -> Wake {
        if !self.failed.is_empty() || !self.handoff.arm() {
            Wake::Immediate
        } else {
            Wake::Event
        }
    }
}

impl Drop for RbdChannel {
    fn drop(&mut self) {
        // librbd still writes into (or reads from) the buffers of requests in flight: wait for
        // them (bounded by the cluster's op_timeout) before the buffers go.
        let mut waited = false;
        while self.in_flight() > 0 {
            waited = true;
            let mut sink = Vec::new();
            if self.poll(&mut sink) == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        if waited {
            tracing::debug!("rbd channel closed after its requests in flight finished");
        }
    }
}
