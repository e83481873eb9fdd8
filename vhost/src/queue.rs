//! One virtio-blk virtqueue served by one reactor (virtio 1.2 §5.2.6).
//!
//! The poller takes available chains, has [`crate::blk::parse_request`] validate each and say
//! what to do, turns each into one bdev request whose buffers are the guest's own memory (no
//! copy), submits it to the reactor's channel, and on completion writes the status byte,
//! publishes the used entry and signals the guest unless it asked not to be. Bad requests
//! complete with `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`; a driver that breaks the ring
//! itself gets its queue stopped (the device needs a reset), and nothing else is affected.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use ferroblk_bdev::eventfd;
use ferroblk_bdev::reactor::Poller;
use ferroblk_bdev::uring::FdWatch;
use ferroblk_bdev::{Channel, IoCompletion, IoRequest, IoSeg, IoStatus, IoType, SgList, Wake};

use crate::blk::{self, Action};
use crate::inflight::InflightQueue;
use crate::memory::GuestMemory;
use crate::spec::{ID_BYTES, S_IOERR, S_OK, S_UNSUPP};
use crate::virtq::{Buf, QueueError, SplitQueue};

/// Chain heads taken from the available ring at once (see `VqPoller::poll`).
const POP_BATCH: usize = 32;

/// Maps a bdev status to the virtio-blk status byte (the one place this happens).
pub fn to_virtio_status(s: IoStatus) -> u8 {
    match s {
        IoStatus::Success => S_OK,
        IoStatus::Unsupported => S_UNSUPP,
        _ => S_IOERR,
    }
}

/// What the queue needs to know about the disk.
#[derive(Clone, Debug)]
pub struct BlkParams {
    /// log2 of the bdev's block size.
    pub block_shift: u32,
    /// Serial number answered to GET_ID (zero-padded).
    pub serial: [u8; ID_BYTES],
    /// Most data segments per request.
    pub max_segments: usize,
    /// Write-zeroes with the unmap flag may deallocate (unmapped blocks read as zeroes).
    pub unmap_zeroes: bool,
    /// The guest's cache mode (CONFIG_WCE): when false, each write is made durable (a flush
    /// follows it) before it completes.
    pub writeback: Arc<AtomicBool>,
    /// The bdev has a volatile cache (so write-through needs the flush).
    pub volatile_cache: bool,
    /// The export is read-only (VIRTIO_BLK_F_RO): writes, discards and write-zeroes fail
    /// here, whatever the driver does with the feature bit.
    pub read_only: bool,
}

/// Shared between the control thread and the queue's poller.
#[derive(Default)]
pub struct QueueCtl {
    stop: AtomicBool,
    result: Mutex<Option<mpsc::SyncSender<u16>>>,
    /// Set when the driver broke the ring.
    pub broken: AtomicBool,
    /// The front-end's vring error eventfd (SET_VRING_ERR), signalled when the ring breaks.
    pub err_fd: Mutex<Option<OwnedFd>>,
    /// A new call eventfd for the running poller (SET_VRING_CALL), taken before its next
    /// notification; `call_changed` says one is waiting, so the poller looks at the lock only
    /// then.
    new_call: Mutex<Option<Option<OwnedFd>>>,
    call_changed: AtomicBool,
    /// `1 << 16 | last_avail` once the poller has seen the stop request and taken its last
    /// head (0 before): the ring's base for the front-end even while requests still drain.
    stopped_at: AtomicU32,
}

impl QueueCtl {
    /// Asks the poller to stop taking requests; once everything in flight has completed it
    /// sends its `last_avail` index on the returned channel.
    pub fn request_stop(&self) -> mpsc::Receiver<u16> {
        let (tx, rx) = mpsc::sync_channel(1);
        *self.result.lock().expect("ctl lock") = Some(tx);
        self.stop.store(true, Ordering::Release);
        rx
    }

    /// The available index the poller stopped taking heads at, once it has seen
    /// [`request_stop`](Self::request_stop).
    pub fn stopped_at(&self) -> Option<u16> {
        let v = self.stopped_at.load(Ordering::Acquire);
        (v != 0).then_some(v as u16)
    }

    /// Hands the running poller a new call eventfd (or none), without stopping the ring: the
    /// poller switches before its next notification and closes the old one. A notification it
    /// is sending to the old one meanwhile may be missed by the driver, so the caller also
    /// signals the new one once (a spurious interrupt only makes the driver look at the used
    /// ring).
    pub fn replace_call(&self, call: Option<OwnedFd>) {
        *self.new_call.lock().expect("ctl lock") = Some(call);
        self.call_changed.store(true, Ordering::Release);
    }
}

struct Slot {
    active: bool,
    /// A write in write-through mode: flush before completing.
    flush_after: bool,
    status: *mut u8,
    written: u32,
    segs: Vec<IoSeg>,
}

/// What the poller does with one chain.
enum Step {
    Submit(IoRequest),
    Done(u8),
}

/// The poller of one virtqueue.
pub struct VqPoller {
    q: SplitQueue,
    /// Declared before `mem`: fields drop in order, and the channel waits for the kernel's
    /// I/O into guest memory before the memory may be unmapped.
    ch: Channel,
    mem: Arc<GuestMemory>,
    /// Readiness of `kick` (declared first: dropping it ends the poll on the kick's file).
    kick_watch: FdWatch,
    kick: OwnedFd,
    call: Option<OwnedFd>,
    slots: Vec<Slot>,
    chain: Vec<Buf>,
    done: Vec<IoCompletion>,
    inflight: Option<InflightQueue>,
    resubmit: VecDeque<u16>,
    /// Requests the channel handed back (full), retried first, in order.
    pending: VecDeque<IoRequest>,
    ctl: Arc<QueueCtl>,
    params: BlkParams,
    finished: bool,
    to_notify: bool,
    /// Whether the driver has been asked to kick (only while the reactor sleeps).
    kicks_enabled: bool,
    index: u16,
}

impl VqPoller {
    /// Creates the poller on the calling reactor: opens `ch` beforehand, arms the kick fd,
    /// and prepares inflight recovery.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u16,
        mut q: SplitQueue,
        mem: Arc<GuestMemory>,
        ch: Channel,
        kick: OwnedFd,
        call: Option<OwnedFd>,
        mut inflight: Option<InflightQueue>,
        ctl: Arc<QueueCtl>,
        params: BlkParams,
    ) -> Result<VqPoller, String> {
        // The poller drains the kick counter after each readiness report; two reports can cover
        // one count, and a blocking read of an empty eventfd would stall the reactor (and every
        // queue on it) for good. The front-end only writes its kick eventfd, which never blocks.
        set_nonblocking(&kick).map_err(|e| format!("kick fd cannot be made non-blocking: {e}"))?;
        let kick_watch =
            FdWatch::new(kick.as_fd(), libc::POLLIN as u32).map_err(|e| e.to_string())?;
        let size = q.size();
        let mut resubmit = VecDeque::with_capacity(POP_BATCH);
        if let Some(inf) = inflight.as_mut() {
            let used = q.guest_used_idx();
            let heads = inf.recover(used);
            q.used_idx = used;
            // The heads taken are on the used ring, marked, or — taken in a batch but not yet
            // started when the process died — the last ones taken (a batch marks its heads in
            // order), which the driver still offers at `used + marked`: continue there.
            q.set_last_avail(used.wrapping_add(heads.len() as u16));
            if !heads.is_empty() {
                tracing::info!(
                    queue = index,
                    count = heads.len(),
                    "resubmitting inflight requests"
                );
            }
            resubmit.extend(heads);
        }
        let slots = (0..size)
            .map(|_| Slot {
                active: false,
                flush_after: false,
                status: std::ptr::null_mut(),
                written: 0,
                segs: Vec::with_capacity(params.max_segments.min(1024)),
            })
            .collect();
        let p = VqPoller {
            q,
            mem,
            ch,
            kick_watch,
            kick,
            call,
            slots,
            chain: Vec::with_capacity(size as usize),
            done: Vec::with_capacity(size as usize),
            inflight,
            resubmit,
            pending: VecDeque::new(),
            ctl,
            params,
            finished: false,
            to_notify: false,
            kicks_enabled: true,
            index,
        };
        Ok(p)
    }

    /// The queue's `last_avail` index.
    pub fn last_avail(&self) -> u16 {
        self.q.last_avail()
    }

    fn drain_kicks(&mut self) -> usize {
        let n = self.kick_watch.take();
        if n > 0 {
            eventfd::drain(self.kick.as_fd());
        }
        n
    }

    fn signal(&mut self) {
        self.q.publish_used();
        if self.to_notify {
            self.to_notify = false;
            if !self.q.needs_notification() {
                return;
            }
            if self.ctl.call_changed.load(Ordering::Acquire) {
                self.ctl.call_changed.store(false, Ordering::Relaxed);
                if let Some(c) = self.ctl.new_call.lock().expect("ctl lock").take() {
                    self.call = c;
                }
            }
            if let Some(c) = &self.call {
                eventfd::signal(c.as_fd());
            }
        }
    }

    fn break_queue(&mut self, e: QueueError) {
        if !self.ctl.broken.swap(true, Ordering::AcqRel) {
            tracing::error!(queue = self.index, error = %e, "virtqueue broken by the driver; it needs a reset");
            // Tell the front-end (vhost-user's vring error notification); the device stays
            // stopped until it is reset, and every other queue and disk carries on.
            if let Some(fd) = &*self.ctl.err_fd.lock().expect("ctl lock") {
                eventfd::signal(fd.as_fd());
            }
        }
    }

    /// Completes `head` with `status`.
    #[inline]
    fn complete(&mut self, head: u16, status: u8) {
        let slot = &mut self.slots[head as usize];
        if !slot.active {
            return;
        }
        slot.active = false;
        // SAFETY: `status` was validated as a writable byte of guest memory, mapped by `mem`.
        unsafe { std::ptr::write_volatile(slot.status, status) };
        let written = if status == S_OK { slot.written } else { 1 };
        match self.inflight.as_mut() {
            // With inflight tracking each completion is published on its own (the recovery
            // protocol follows `used.idx` one head at a time).
            Some(inf) => {
                inf.begin_complete(head);
                self.q.push_used(head, written);
                inf.end_complete(head, self.q.used_idx);
            }
            // Otherwise completions are published in batches (see `signal`).
            None => self.q.push_used_deferred(head, written),
        }
        self.to_notify = true;
    }

    /// Turns the chain at `head` into a request ([`blk::parse_request`]) and claims its slot.
    fn parse(&mut self, head: u16) -> Result<Step, QueueError> {
        self.q.read_chain(&self.mem, head, &mut self.chain)?;
        let slot = &mut self.slots[head as usize];
        // Checked before parsing: the segments of a slot in flight belong to its request.
        if slot.active {
            return Err(QueueError::Driver(format!(
                "chain {head} is already in flight"
            )));
        }
        let parsed = blk::parse_request(&self.chain, &self.params, &mut slot.segs)
            .map_err(|e| QueueError::Driver(format!("chain {head} {e}")))?;
        slot.status = parsed.status;
        slot.active = true;
        slot.written = 1;
        Ok(match parsed.action {
            Action::Complete(status) => Step::Done(status),
            Action::GetId { len } => {
                blk::write_id(&slot.segs, &self.params.serial[..len]);
                slot.written = len as u32 + 1;
                Step::Done(S_OK)
            }
            Action::Submit {
                io_type,
                offset_blocks,
                num_blocks,
                written,
            } => {
                let tag = u64::from(head);
                slot.written = written;
                if !matches!(io_type, IoType::Read | IoType::Write) {
                    return Ok(Step::Submit(IoRequest::no_data(
                        io_type,
                        offset_blocks,
                        num_blocks,
                        tag,
                    )));
                }
                let bufs = if slot.segs.len() <= ferroblk_bdev::buf::INLINE_SEGS {
                    // SAFETY: every segment is mapped guest memory kept alive by `self.mem`
                    // until the request completes (the poller drains before it is dropped).
                    unsafe { SgList::from_raw(&slot.segs) }
                } else {
                    // SAFETY: as above.
                    unsafe { SgList::from_raw_vec(std::mem::take(&mut slot.segs)) }
                };
                slot.flush_after = blk::flush_after(io_type, &self.params);
                Step::Submit(IoRequest {
                    io_type,
                    offset_blocks,
                    num_blocks,
                    bufs,
                    tag,
                })
            }
        })
    }

    /// Takes one head through parse and submit. Returns false if the channel is full (the
    /// request is kept in `pending`).
    fn start(&mut self, head: u16) -> bool {
        if let Some(inf) = self.inflight.as_mut() {
            inf.mark(head);
        }
        match self.parse(head) {
            // `parse` fails before it claims the slot: a slot that is active belongs to a
            // request still in flight (a driver offering the same head twice), and stays so.
            Err(e) => {
                self.break_queue(e);
                true
            }
            Ok(Step::Done(status)) => {
                self.complete(head, status);
                true
            }
            Ok(Step::Submit(io)) => self.submit(io),
        }
    }

    fn submit(&mut self, io: IoRequest) -> bool {
        match self.ch.submit(io) {
            Ok(()) => true,
            Err(io) => {
                self.pending.push_back(io);
                false
            }
        }
    }

    fn reap(&mut self) -> usize {
        let n = self.ch.poll(&mut self.done);
        if n > 0 {
            let mut done = std::mem::take(&mut self.done);
            for c in done.drain(..) {
                let head = c.tag as u16;
                if c.bufs.segments().len() > ferroblk_bdev::buf::INLINE_SEGS {
                    self.slots[head as usize].segs = c.bufs.into_vec();
                }
                let slot = &mut self.slots[head as usize];
                if slot.flush_after && c.status.is_ok() {
                    slot.flush_after = false;
                    let flush = IoRequest::no_data(IoType::Flush, 0, 0, u64::from(head));
                    if let Err(io) = self.ch.submit(flush) {
                        self.pending.push_back(io);
                    }
                    continue;
                }
                slot.flush_after = false;
                self.complete(head, to_virtio_status(c.status));
            }
            self.done = done;
        }
        n
    }
}

/// Sets `O_NONBLOCK` on the open file description of `fd`.
fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with no memory arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Poller for VqPoller {
    fn poll(&mut self) -> usize {
        if self.finished {
            // Kicks that still arrive are taken and dropped: a watch event left untaken would
            // keep the reactor from sleeping until the control thread removes this poller.
            self.drain_kicks();
            return 0;
        }
        let mut work = self.drain_kicks();
        if self.kicks_enabled {
            // While the reactor polls, the driver need not kick.
            self.kicks_enabled = false;
            self.q.disable_notification();
        }
        let stopping = self.ctl.stop.load(Ordering::Acquire);
        if stopping && self.ctl.stopped_at.load(Ordering::Relaxed) == 0 {
            // No head is taken from here on (those taken already still run).
            self.ctl
                .stopped_at
                .store(1 << 16 | u32::from(self.q.last_avail()), Ordering::Release);
        }
        let broken = self.ctl.broken.load(Ordering::Relaxed);
        while let Some(io) = self.pending.pop_front() {
            match self.ch.submit(io) {
                Ok(()) => work += 1,
                Err(io) => {
                    self.pending.push_front(io);
                    break;
                }
            }
        }
        if self.pending.is_empty() && !broken {
            while let Some(h) = self.resubmit.pop_front() {
                work += 1;
                if !self.start(h) {
                    break;
                }
            }
        }
        if self.pending.is_empty() && !stopping && !broken {
            let mut budget = self.ch.depth().saturating_sub(self.ch.in_flight());
            // In batches: take the heads and prefetch their descriptors, then their headers and
            // next descriptors, then parse and submit. The driver wrote all of these on another
            // core; loading them together overlaps the misses that a one-by-one walk would take
            // in series.
            let mut heads = [0u16; POP_BATCH];
            'batches: while budget > 0 && self.resubmit.is_empty() {
                let want = budget.min(POP_BATCH);
                let (n, res) = self.q.pop_heads(&mut heads[..want]);
                self.q.prefetch_used(n as u16);
                for &h in &heads[..n] {
                    self.q.prefetch_chain(&self.mem, h);
                }
                for (i, &h) in heads[..n].iter().enumerate() {
                    work += 1;
                    if !self.start(h) {
                        // The channel is full: the heads taken after this one start first
                        // on the next poll, in order.
                        self.resubmit.extend(&heads[i + 1..n]);
                        break;
                    }
                    if self.ctl.broken.load(Ordering::Relaxed) {
                        // A chain broke the ring: nothing after it is trusted.
                        break 'batches;
                    }
                }
                if let Err(e) = res {
                    self.break_queue(e);
                    break;
                }
                if !self.resubmit.is_empty() {
                    break;
                }
                budget -= n;
                if n < want {
                    break;
                }
            }
        }
        work += self.reap();
        self.signal();
        if stopping && self.ch.in_flight() == 0 && (self.pending.is_empty() || broken) {
            self.finished = true;
            if let Some(tx) = self.ctl.result.lock().expect("ctl lock").take() {
                let _ = tx.send(self.q.last_avail());
            }
        }
        work
    }

    fn wake(&self) -> Wake {
        if self.finished {
            Wake::Event
        } else if !self.pending.is_empty() || !self.resubmit.is_empty() {
            Wake::Immediate
        } else {
            self.ch.wake()
        }
    }

    fn in_flight(&self) -> usize {
        if self.finished {
            0
        } else {
            self.ch.in_flight()
        }
    }

    fn stop(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.finished || self.ctl.broken.load(Ordering::Relaxed) {
            return false;
        }
        self.kicks_enabled = true;
        self.q.enable_notification()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{
        DESC_F_NEXT, DESC_F_WRITE, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
    };
    use crate::virtq::testing::Driver;
    use ferroblk_bdev::malloc::MallocBdev;
    use ferroblk_bdev::{Bdev, BlockSize};
    use std::os::fd::FromRawFd;

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd has no memory preconditions; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// A blocking eventfd, as a front-end may pass for a kick.
    fn blocking_eventfd() -> OwnedFd {
        // SAFETY: eventfd has no memory preconditions; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    struct Rig {
        d: Driver,
        p: VqPoller,
        /// The front-end's side of the kick eventfd (same open file description).
        kick: OwnedFd,
        bdev: Arc<dyn Bdev>,
        call: OwnedFd,
        ctl: Arc<QueueCtl>,
        next_desc: u16,
    }

    fn rig(bs: BlockSize) -> Rig {
        let d = Driver::new(16);
        let bdev: Arc<dyn Bdev> =
            Arc::new(MallocBdev::new("m", bs, 1 << 20 >> bs.shift(), 0).unwrap());
        let q = SplitQueue::new(&d.mem, 16, d.addrs, true, true).unwrap();
        let call = eventfd();
        let kick = blocking_eventfd();
        let ctl = Arc::new(QueueCtl::default());
        let mut serial = [0u8; ID_BYTES];
        serial[..6].copy_from_slice(b"SER123");
        let p = VqPoller::new(
            0,
            q,
            d.mem.clone(),
            bdev.open_channel().unwrap(),
            kick.try_clone().unwrap(),
            Some(call.try_clone().unwrap()),
            None,
            ctl.clone(),
            BlkParams {
                block_shift: bs.shift(),
                serial,
                max_segments: 16,
                unmap_zeroes: true,
                writeback: Arc::new(AtomicBool::new(true)),
                volatile_cache: false,
                read_only: false,
            },
        )
        .unwrap();
        Rig {
            d,
            p,
            kick,
            bdev,
            call,
            ctl,
            next_desc: 0,
        }
    }

    impl Rig {
        /// Builds a chain of (addr, len, writable) buffers, publishes it, runs the poller until
        /// it completes; returns (status byte, used len).
        fn request(&mut self, bufs: &[(u64, u32, bool)]) -> Option<(u8, u32)> {
            let head = self.next_desc;
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let i = (head + k as u16) % 16;
                let last = k + 1 == bufs.len();
                let flags = if w { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                self.d
                    .set_desc(self.d.addrs.desc, i, addr, len, flags, (i + 1) % 16);
            }
            self.next_desc = (head + bufs.len() as u16) % 16;
            let (before, _, _) = self.d.used(0);
            self.d.publish(head);
            for _ in 0..1000 {
                self.p.poll();
                let (idx, id, len) = self.d.used(before);
                if idx != before {
                    assert_eq!(id, u32::from(head));
                    let &(saddr, slen, _) = bufs.last().unwrap();
                    let st = self.d.read(saddr + u64::from(slen) - 1, 1)[0];
                    return Some((st, len));
                }
            }
            None
        }

        fn header(&mut self, t: u32, sector: u64) -> u64 {
            let a = self.d.alloc(16);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.d.write(a, &h);
            a
        }
    }

    #[test]
    fn draining_an_empty_kick_eventfd_never_blocks_the_reactor() {
        // A front-end's kick eventfd may be blocking. The poller drains it after each readiness
        // report, and two reports can cover one count: the second read must not block.
        let r = rig(BlockSize::B4096);
        // SAFETY: fcntl on a descriptor the rig owns.
        let flags = unsafe { libc::fcntl(r.kick.as_raw_fd(), libc::F_GETFL) };
        assert!(
            flags & libc::O_NONBLOCK != 0,
            "the kick fd is still blocking (a read below would hang)"
        );
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd.
        let n = unsafe { libc::write(r.kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        let mut v = 0u64;
        for expect in [8, -1] {
            // SAFETY: reads 8 bytes into a live u64.
            let n = unsafe { libc::read(r.kick.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            assert_eq!(n, expect);
        }
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EAGAIN)
        );
    }

    #[test]
    fn write_read_flush_and_get_id_round_trip() {
        let mut r = rig(BlockSize::B512);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let buf = r.d.alloc(4096);
        r.d.write(buf, &data);
        let st = r.d.alloc(1);
        let h = r.header(T_OUT, 8);
        // Data split in two descriptors.
        assert_eq!(
            r.request(&[
                (h, 16, false),
                (buf, 1000, false),
                (buf + 1000, 3096, false),
                (st, 1, true)
            ]),
            Some((S_OK, 1))
        );
        let out = r.d.alloc(4096);
        let h = r.header(T_IN, 8);
        assert_eq!(
            r.request(&[(h, 16, false), (out, 4096, true), (st, 1, true)]),
            Some((S_OK, 4097))
        );
        assert_eq!(r.d.read(out, 4096), data);
        let h = r.header(T_FLUSH, 0);
        assert_eq!(r.request(&[(h, 16, false), (st, 1, true)]), Some((S_OK, 1)));
        let id = r.d.alloc(20);
        let h = r.header(T_GET_ID, 0);
        assert_eq!(
            r.request(&[(h, 16, false), (id, 20, true), (st, 1, true)]),
            Some((S_OK, 21))
        );
        assert_eq!(&r.d.read(id, 6), b"SER123");
        // The guest was signalled.
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        let n = unsafe { libc::read(r.call.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        assert!(r.bdev.info().stats().ops[0] >= 1);
    }

    #[test]
    fn bad_requests_complete_with_an_error_status() {
        let mut r = rig(BlockSize::B4096);
        let st = r.d.alloc(1);
        let buf = r.d.alloc(8192);
        // Unknown type.
        let h = r.header(99, 0);
        assert_eq!(
            r.request(&[(h, 16, false), (st, 1, true)]),
            Some((S_UNSUPP, 1))
        );
        // Header too short.
        let h = r.header(T_IN, 0);
        assert_eq!(
            r.request(&[(h, 8, false), (st, 1, true)]).unwrap().0,
            S_IOERR
        );
        // Data buffer outside guest memory.
        let h = r.header(T_IN, 0);
        assert_eq!(
            r.request(&[
                (h, 16, false),
                (0xdead_0000_0000, 4096, true),
                (st, 1, true)
            ])
            .unwrap()
            .0,
            S_IOERR
        );
        // A readable buffer after a writable one.
        let h = r.header(T_OUT, 0);
        assert_eq!(
            r.request(&[
                (h, 16, false),
                (buf, 4096, true),
                (buf, 4096, false),
                (st, 1, true)
            ])
            .unwrap()
            .0,
            S_IOERR
        );
        // Sector not aligned to the 4 KiB block; length not a block multiple.
        let h = r.header(T_IN, 1);
        assert_eq!(
            r.request(&[(h, 16, false), (buf, 4096, true), (st, 1, true)])
                .unwrap()
                .0,
            S_IOERR
        );
        let h = r.header(T_IN, 0);
        assert_eq!(
            r.request(&[(h, 16, false), (buf, 512, true), (st, 1, true)])
                .unwrap()
                .0,
            S_IOERR
        );
        // Beyond the end of the disk, and a sector number that overflows.
        let h = r.header(T_IN, (1 << 20) / 512);
        assert_eq!(
            r.request(&[(h, 16, false), (buf, 4096, true), (st, 1, true)])
                .unwrap()
                .0,
            S_IOERR
        );
        let h = r.header(T_IN, u64::MAX - 7);
        assert_eq!(
            r.request(&[(h, 16, false), (buf, 4096, true), (st, 1, true)])
                .unwrap()
                .0,
            S_IOERR
        );
        // Discard with flags is unsupported; write-zeroes zeroes.
        let seg = r.d.alloc(16);
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&8u64.to_le_bytes());
        s[8..12].copy_from_slice(&8u32.to_le_bytes());
        s[12..16].copy_from_slice(&1u32.to_le_bytes());
        r.d.write(seg, &s);
        let h = r.header(T_DISCARD, 0);
        assert_eq!(
            r.request(&[(h, 16, false), (seg, 16, false), (st, 1, true)])
                .unwrap()
                .0,
            S_UNSUPP
        );
        r.d.write(buf, &[0xAB; 4096]);
        let h = r.header(T_OUT, 8);
        assert_eq!(
            r.request(&[(h, 16, false), (buf, 4096, false), (st, 1, true)])
                .unwrap()
                .0,
            S_OK
        );
        let h = r.header(T_WRITE_ZEROES, 0);
        assert_eq!(
            r.request(&[(h, 16, false), (seg, 16, false), (st, 1, true)])
                .unwrap()
                .0,
            S_OK
        );
        let h = r.header(T_IN, 8);
        assert_eq!(
            r.request(&[(h, 16, false), (buf, 4096, true), (st, 1, true)])
                .unwrap()
                .0,
            S_OK
        );
        assert!(r.d.read(buf, 4096).iter().all(|&b| b == 0));
        // Still healthy.
        assert!(!r.ctl.broken.load(Ordering::Relaxed));
    }

    #[test]
    fn a_chain_without_status_byte_breaks_only_this_queue() {
        let mut r = rig(BlockSize::B512);
        let err = eventfd();
        *r.ctl.err_fd.lock().unwrap() = Some(err.try_clone().unwrap());
        let h = r.header(T_IN, 0);
        let buf = r.d.alloc(512);
        // Last descriptor is readable: no place for the status.
        assert_eq!(r.request(&[(h, 16, false), (buf, 512, false)]), None);
        assert!(r.ctl.broken.load(Ordering::Relaxed));
        // The front-end was told through its vring error eventfd.
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        let n = unsafe { libc::read(err.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        // A second queue on the same bdev keeps working.
        let mut other = rig(BlockSize::B512);
        let st = other.d.alloc(1);
        let h = other.header(T_FLUSH, 0);
        assert_eq!(
            other.request(&[(h, 16, false), (st, 1, true)]),
            Some((S_OK, 1))
        );
    }

    #[test]
    fn stop_drains_and_reports_last_avail() {
        let mut r = rig(BlockSize::B512);
        let st = r.d.alloc(1);
        let h = r.header(T_FLUSH, 0);
        r.request(&[(h, 16, false), (st, 1, true)]).unwrap();
        let rx = r.ctl.request_stop();
        r.p.poll();
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(r.p.in_flight(), 0);
    }
}
