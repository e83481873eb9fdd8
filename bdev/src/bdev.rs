//! The bdev API: the control-plane [`Bdev`] shared by every reactor, and the data-plane
//! [`Channel`] that one reactor owns.
//!
//! A bdev implementation provides [`ChannelOps`]; [`Channel`] wraps it with what every bdev
//! shares: range and shape validation (so drivers see only well-formed requests), capability
//! checks, splitting of requests larger than the bdev takes ([`crate::split`]), per-channel
//! statistics, and an in-flight count. Rejected requests complete through the
//! same `poll` as every other request, with a status; nothing is rejected by panic or by
//! dropping the request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::buf::SgList;
use crate::error::BdevError;
use crate::split::{CHILD_TAG, Splitter};
use crate::types::{BlockSize, Caps, Geometry, IoStatus, IoType};

/// One I/O request. It owns its buffers until its completion hands them back.
#[derive(Debug)]
pub struct IoRequest {
    /// The operation.
    pub io_type: IoType,
    /// First logical block (ignored for flush).
    pub offset_blocks: u64,
    /// Number of logical blocks (zero for flush).
    pub num_blocks: u32,
    /// Data buffers: exactly `num_blocks * block_size` bytes for read and write, empty otherwise.
    pub bufs: SgList,
    /// The submitter's cookie, returned in the completion. Its top bit
    /// ([`crate::split::CHILD_TAG`]) is the layer's: a request that sets it is rejected.
    pub tag: u64,
}

impl IoRequest {
    /// A read of `num_blocks` blocks at `offset_blocks` into `bufs`.
    pub fn read(offset_blocks: u64, num_blocks: u32, bufs: SgList, tag: u64) -> IoRequest {
        IoRequest {
            io_type: IoType::Read,
            offset_blocks,
            num_blocks,
            bufs,
            tag,
        }
    }

    /// A write of `bufs` to `num_blocks` blocks at `offset_blocks`.
    pub fn write(offset_blocks: u64, num_blocks: u32, bufs: SgList, tag: u64) -> IoRequest {
        IoRequest {
            io_type: IoType::Write,
            offset_blocks,
            num_blocks,
            bufs,
            tag,
        }
    }

    /// A request without data (flush, unmap, write-zeroes).
    pub fn no_data(io_type: IoType, offset_blocks: u64, num_blocks: u32, tag: u64) -> IoRequest {
        IoRequest {
            io_type,
            offset_blocks,
            num_blocks,
            bufs: SgList::empty(),
            tag,
        }
    }

    /// Completes this request with `status`, handing its buffers back.
    pub fn complete(self, status: IoStatus) -> IoCompletion {
        IoCompletion {
            tag: self.tag,
            status,
            bufs: self.bufs,
        }
    }
}

/// The completion of one request.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's cookie.
    pub tag: u64,
    /// The outcome.
    pub status: IoStatus,
    /// The request's buffers, handed back (filled for a successful read).
    pub bufs: SgList,
}

/// What wakes a sleeping reactor for a poller or channel with nothing to do right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// An event wakes the reactor: a completion on the reactor's io_uring or an eventfd. Also what
    /// an idle poller returns.
    Event,
    /// Work is ready now: do not sleep.
    Immediate,
    /// Poll again at this instant (a timer, such as a delay bdev's).
    At(Instant),
}

/// How long a channel waiting on another reactor's channel (a lock it holds, a checkpoint
/// it runs) sleeps before it looks again: no event tells it when that channel is done, and
/// spinning would cost a core for as long as the wait lasts.
pub const CROSS_CHANNEL_WAIT: Duration = Duration::from_micros(50);

impl Wake {
    /// The more urgent of two wake-ups.
    pub fn min(self, other: Wake) -> Wake {
        match (self, other) {
            (Wake::Immediate, _) | (_, Wake::Immediate) => Wake::Immediate,
            (Wake::At(a), Wake::At(b)) => Wake::At(a.min(b)),
            (Wake::At(a), Wake::Event) | (Wake::Event, Wake::At(a)) => Wake::At(a),
            (Wake::Event, Wake::Event) => Wake::Event,
        }
    }
}

/// The data path a bdev implements for one reactor. Requests reaching it were validated by
/// [`Channel`]: the type is supported, the range is inside the bdev, read/write buffers hold
/// exactly the blocks asked for, and a read or write fits the bdev's maximum transfer and
/// segment count (larger ones reach it as several requests).
pub trait ChannelOps {
    /// Starts a request, or hands it back untouched when the channel is full (back-pressure: the
    /// caller retries after a completion).
    fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest>;

    /// Appends finished requests to `done`; returns how many it appended.
    fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize;

    /// What wakes the reactor for this channel's in-flight requests.
    fn wake(&self) -> Wake {
        Wake::Event
    }
}

/// A reactor's handle on one bdev: submit requests, poll completions. Owned by one thread.
///
/// A read or write of any size and segment count up to the request format's limits is
/// accepted: one larger than the bdev's maximum transfer or segment count is split into
/// children that fit, and completes once, when they all have.
pub struct Channel {
    info: Arc<BdevInfo>,
    // Declared before `split`: dropped first, so the bdev is done with child requests before
    // the parents' buffers they point into are released.
    ops: Box<dyn ChannelOps>,
    split: Splitter,
    /// Completions ready without the bdev: rejected requests, finished split requests.
    ready: VecDeque<IoCompletion>,
    stats: Arc<ChannelStats>,
    /// Requests of the submitter in flight (a split request counts once).
    in_flight: usize,
    /// Requests in flight in `ops` (a split request counts each child).
    ops_in_flight: usize,
    depth: usize,
    /// Requests submitted, for latency sampling (one in [`LATENCY_SAMPLE_EVERY`]).
    sample_tick: u32,
    /// Sampled requests in flight: tag and submission time.
    samples: [Option<(u64, Instant)>; LATENCY_SAMPLES],
    /// How many of `samples` are in use.
    sampled: usize,
}

/// One request in this many has its latency measured (two clock reads), so the histogram costs
/// the hot path a counter and a compare, not a clock read per request.
pub const LATENCY_SAMPLE_EVERY: u32 = 64;

/// Most sampled requests in flight on one channel at once.
const LATENCY_SAMPLES: usize = 4;

/// Buckets of the latency histogram: bucket `b` counts latencies below 2^b µs (`b` <
/// `LATENCY_BUCKETS - 1`); the last counts the rest.
pub const LATENCY_BUCKETS: usize = 24;

/// The bucket of a latency of `ns` nanoseconds.
#[inline]
pub fn latency_bucket(ns: u64) -> usize {
    let us = ns / 1000;
    ((u64::BITS - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

impl Channel {
    /// Wraps a bdev's channel implementation. `depth` bounds the requests the layer lets in
    /// flight at once; the implementation must accept at least that many.
    pub fn new(info: Arc<BdevInfo>, ops: Box<dyn ChannelOps>, depth: usize) -> Channel {
        let stats = Arc::new(ChannelStats::default());
        info.stats
            .lock()
            .expect("stats lock")
            .live
            .push(stats.clone());
        let g = info.geometry();
        let split = Splitter::new(
            depth,
            g.max_transfer_blocks,
            g.max_segments,
            g.block_size.shift(),
        );
        Channel {
            info,
            ops,
            split,
            ready: VecDeque::with_capacity(depth),
            stats,
            in_flight: 0,
            ops_in_flight: 0,
            depth,
            sample_tick: 0,
            samples: [None; LATENCY_SAMPLES],
            sampled: 0,
        }
    }

    /// The bdev's shared information.
    pub fn info(&self) -> &Arc<BdevInfo> {
        &self.info
    }

    /// Requests submitted and not yet polled back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Most requests in flight at once.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Submits a request. A malformed request is accepted and completes with an error status;
    /// `Err` hands the request back untouched when the channel is full.
    #[inline]
    pub fn submit(&mut self, io: IoRequest) -> Result<(), IoRequest> {
        if self.in_flight >= self.depth {
            return Err(io);
        }
        let status = self.validate(&io);
        if status != IoStatus::Success {
            self.stats.add(&self.stats.rejected, 1);
            self.in_flight += 1;
            self.ready.push_back(io.complete(status));
            return Ok(());
        }
        let t = io.io_type as usize;
        let bytes = self.info.block_size.to_bytes(u64::from(io.num_blocks));
        let tag = io.tag;
        if self.split.needs_split(&io) {
            self.ops_in_flight += self.split.start(io, &mut *self.ops, &mut self.ready);
        } else {
            self.ops.submit(io)?;
            self.ops_in_flight += 1;
        }
        self.in_flight += 1;
        self.stats.add(&self.stats.ops[t], 1);
        self.stats.add(&self.stats.bytes[t], bytes);
        self.sample_tick = self.sample_tick.wrapping_add(1);
        if self.sample_tick.is_multiple_of(LATENCY_SAMPLE_EVERY) && self.sampled < LATENCY_SAMPLES {
            self.start_sample(tag);
        }
        Ok(())
    }

    /// Starts measuring the latency of the request tagged `tag`.
    #[cold]
    fn start_sample(&mut self, tag: u64) {
        if let Some(s) = self.samples.iter_mut().find(|s| s.is_none()) {
            *s = Some((tag, Instant::now()));
            self.sampled += 1;
        }
    }

    /// Ends the samples among `done` and counts their latencies.
    #[cold]
    fn end_samples(&mut self, done: &[IoCompletion]) {
        for c in done {
            for s in &mut self.samples {
                if let Some((tag, at)) = *s
                    && tag == c.tag
                {
                    let ns = at.elapsed().as_nanos() as u64;
                    let st = &self.stats;
                    st.add(&st.latency[latency_bucket(ns)], 1);
                    st.add(&st.latency_sum_ns, ns);
                    *s = None;
                    self.sampled -= 1;
                    break;
                }
            }
            if self.sampled == 0 {
                return;
            }
        }
    }

    #[inline]
    fn validate(&self, io: &IoRequest) -> IoStatus {
        let info = &*self.info;
        if io.tag & CHILD_TAG != 0 {
            return IoStatus::InvalidRequest;
        }
        if !info.caps.contains(io.io_type.cap()) {
            return IoStatus::Unsupported;
        }
        if info.read_only.load(Ordering::Relaxed) != 0 && io.io_type.is_write() {
            return IoStatus::ReadOnly;
        }
        if io.io_type.has_range() {
            if io.num_blocks == 0 {
                return IoStatus::InvalidRequest;
            }
            let count = info.block_count.load(Ordering::Relaxed);
            match io.offset_blocks.checked_add(u64::from(io.num_blocks)) {
                Some(end) if end <= count => {}
                _ => return IoStatus::InvalidRange,
            }
        }
        if io.io_type.has_data() {
            let want = info.block_size.to_bytes(u64::from(io.num_blocks));
            if io.bufs.segments().iter().map(|s| s.len as u64).sum::<u64>() != want {
                return IoStatus::InvalidRequest;
            }
        } else if !io.bufs.segments().is_empty() {
            return IoStatus::InvalidRequest;
        }
        IoStatus::Success
    }

    /// Appends finished requests to `done`; returns how many.
    #[inline]
    pub fn poll(&mut self, done: &mut Vec<IoCompletion>) -> usize {
        let start = done.len();
        done.extend(self.ready.drain(..));
        let from_ops = done.len();
        self.ops.poll(done);
        self.ops_in_flight -= done.len() - from_ops;
        if self.split.active() {
            let mut i = from_ops;
            while i < done.len() {
                if done[i].tag & CHILD_TAG != 0 {
                    let c = done.swap_remove(i);
                    self.ops_in_flight += self.split.child_done(c, &mut *self.ops, &mut self.ready);
                } else {
                    i += 1;
                }
            }
            if self.split.has_stalled() {
                self.ops_in_flight += self.split.retry_stalled(&mut *self.ops, &mut self.ready);
            }
            done.extend(self.ready.drain(..));
        }
        let n = done.len() - start;
        self.in_flight -= n;
        if self.sampled > 0 {
            self.end_samples(&done[start..]);
        }
        // The same one pass over the completions as a plain error count: a success costs a
        // compare, an error one counter update in its status's slot.
        for c in &done[start..] {
            if !c.status.is_ok() {
                self.stats
                    .add(&self.stats.errors_by_status[c.status as usize], 1);
            }
        }
        n
    }

    /// What wakes the reactor for this channel.
    pub fn wake(&self) -> Wake {
        if !self.ready.is_empty() || (self.split.has_stalled() && self.ops_in_flight == 0) {
            Wake::Immediate
        } else if self.in_flight == 0 {
            Wake::Event
        } else {
            self.ops.wake()
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if let Ok(mut s) = self.info.stats.lock() {
            s.retire(&self.stats);
        }
    }
}

/// Counters of one channel. Only the owning reactor writes them (plain load + store, no atomic
/// read-modify-write on the hot path); readers sum them.
#[derive(Default, Debug)]
pub struct ChannelStats {
    ops: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    /// Requests completed with an error, by [`IoStatus`] (the `Success` slot stays zero).
    errors_by_status: [AtomicU64; IoStatus::ALL.len()],
    rejected: AtomicU64,
    /// Sampled latencies, by [`latency_bucket`].
    latency: [AtomicU64; LATENCY_BUCKETS],
    /// Sum of the sampled latencies, in nanoseconds.
    latency_sum_ns: AtomicU64,
}

impl ChannelStats {
    #[inline]
    fn add(&self, counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
}

/// Totals of a bdev's counters over all its channels, live and closed.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BdevStats {
    /// Requests passed to the bdev, by type (read, write, flush, unmap, write_zeroes).
    pub ops: [u64; 5],
    /// Bytes addressed, by type.
    pub bytes: [u64; 5],
    /// Requests that completed with an error status (including rejected ones).
    pub errors: u64,
    /// The same by status, indexed by `IoStatus as usize` (see [`IoStatus::ALL`]).
    pub errors_by_status: [u64; IoStatus::ALL.len()],
    /// Requests the layer rejected before the bdev saw them (range, shape, capability).
    pub rejected: u64,
    /// Latencies of sampled requests (one in [`LATENCY_SAMPLE_EVERY`], submit to completion
    /// on the channel), by [`latency_bucket`].
    pub latency: [u64; LATENCY_BUCKETS],
    /// Sum of the sampled latencies, in nanoseconds.
    pub latency_sum_ns: u64,
}

impl BdevStats {
    fn add(&mut self, c: &ChannelStats) {
        for i in 0..5 {
            self.ops[i] += c.ops[i].load(Ordering::Relaxed);
            self.bytes[i] += c.bytes[i].load(Ordering::Relaxed);
        }
        for (sum, c) in self.errors_by_status.iter_mut().zip(&c.errors_by_status) {
            let n = c.load(Ordering::Relaxed);
            *sum += n;
            self.errors += n;
        }
        self.rejected += c.rejected.load(Ordering::Relaxed);
        for (sum, c) in self.latency.iter_mut().zip(&c.latency) {
            *sum += c.load(Ordering::Relaxed);
        }
        self.latency_sum_ns += c.latency_sum_ns.load(Ordering::Relaxed);
    }

    /// The counters as JSON, keyed by I/O type name.
    pub fn to_json(&self) -> serde_json::Value {
        let mut ops = serde_json::Map::new();
        let mut bytes = serde_json::Map::new();
        for t in IoType::ALL {
            ops.insert(t.name().into(), self.ops[t as usize].into());
            bytes.insert(t.name().into(), self.bytes[t as usize].into());
        }
        serde_json::json!({ "ops": ops, "bytes": bytes, "errors": self.errors, "rejected": self.rejected })
    }
}

#[derive(Default)]
struct StatsSet {
    live: Vec<Arc<ChannelStats>>,
    retired: BdevStats,
}

impl StatsSet {
    fn retire(&mut self, c: &Arc<ChannelStats>) {
        self.retired.add(c);
        self.live.retain(|x| !Arc::ptr_eq(x, c));
    }
}

/// A notification to a bdev's users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BdevEvent {
    /// The block count changed.
    Resized {
        /// Blocks before.
        old_blocks: u64,
        /// Blocks now.
        new_blocks: u64,
    },
}

type Listener = Box<dyn Fn(&BdevEvent) + Send + Sync>;

/// The part of a bdev every layer and front reads: name, geometry, statistics, listeners.
pub struct BdevInfo {
    name: String,
    kind: &'static str,
    block_size: BlockSize,
    block_count: AtomicU64,
    buf_align: u32,
    max_transfer_blocks: u32,
    max_segments: u32,
    caps: Caps,
    read_only: AtomicU64,
    stats: Mutex<StatsSet>,
    listeners: Mutex<Vec<(u64, Listener)>>,
    next_listener: AtomicU64,
}

impl std::fmt::Debug for BdevInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevInfo")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("geometry", &self.geometry())
            .finish()
    }
}

/// Builds a [`BdevInfo`].
pub struct BdevInfoBuilder {
    info: BdevInfo,
}

impl BdevInfoBuilder {
    /// Alignment data buffers need for the fastest path (default 1: none).
    pub fn buf_align(mut self, align: u32) -> Self {
        self.info.buf_align = align;
        self
    }

    /// Largest transfer in blocks (default: 16 MiB worth).
    pub fn max_transfer_blocks(mut self, blocks: u32) -> Self {
        self.info.max_transfer_blocks = blocks;
        self
    }

    /// Most segments per request (default 256).
    pub fn max_segments(mut self, segs: u32) -> Self {
        self.info.max_segments = segs;
        self
    }

    /// Rejects writes, unmaps and write-zeroes with [`IoStatus::ReadOnly`].
    pub fn read_only(self, ro: bool) -> Self {
        self.info.read_only.store(u64::from(ro), Ordering::Relaxed);
        self
    }

    /// The finished, shareable info.
    pub fn build(self) -> Arc<BdevInfo> {
        Arc::new(self.info)
    }
}

impl BdevInfo {
    /// Starts building the info of bdev `name` of kind `kind`.
    pub fn builder(
        name: &str,
        kind: &'static str,
        block_size: BlockSize,
        block_count: u64,
        caps: Caps,
    ) -> BdevInfoBuilder {
        BdevInfoBuilder {
            info: BdevInfo {
                name: name.to_string(),
                kind,
                block_size,
                block_count: AtomicU64::new(block_count),
                buf_align: 1,
                max_transfer_blocks: (16 << 20) >> block_size.shift(),
                max_segments: 256,
                caps,
                read_only: AtomicU64::new(0),
                stats: Mutex::new(StatsSet::default()),
                listeners: Mutex::new(Vec::new()),
                next_listener: AtomicU64::new(1),
            },
        }
    }

    /// The bdev's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bdev's kind (`malloc`, `file`, ...).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Logical block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Current number of blocks.
    pub fn block_count(&self) -> u64 {
        self.block_count.load(Ordering::Acquire)
    }

    /// Capabilities.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Whether writes are rejected.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed) != 0
    }

    /// The geometry now.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            block_size: self.block_size,
            block_count: self.block_count(),
            buf_align: self.buf_align,
            max_transfer_blocks: self.max_transfer_blocks,
            max_segments: self.max_segments,
            caps: self.caps,
        }
    }

    /// Sets the block count and notifies every listener (used by `resize` implementations and by
    /// stacked bdevs following their base).
    pub fn set_block_count(&self, new_blocks: u64) {
        let old_blocks = self.block_count.swap(new_blocks, Ordering::AcqRel);
        if old_blocks != new_blocks {
            tracing::info!(bdev = %self.name, old_blocks, new_blocks, "bdev resized");
            let ev = BdevEvent::Resized {
                old_blocks,
                new_blocks,
            };
            for (_, l) in self.listeners.lock().expect("listeners lock").iter() {
                l(&ev);
            }
        }
    }

    /// Calls `f` on every event of this bdev until [`BdevInfo::unsubscribe`]; returns its id.
    pub fn subscribe(&self, f: impl Fn(&BdevEvent) + Send + Sync + 'static) -> u64 {
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        self.listeners
            .lock()
            .expect("listeners lock")
            .push((id, Box::new(f)));
        id
    }

    /// Stops a subscription.
    pub fn unsubscribe(&self, id: u64) {
        self.listeners
            .lock()
            .expect("listeners lock")
            .retain(|(i, _)| *i != id);
    }

    /// Totals of the counters over all channels, live and closed.
    pub fn stats(&self) -> BdevStats {
        let s = self.stats.lock().expect("stats lock");
        let mut total = s.retired.clone();
        for c in &s.live {
            total.add(c);
        }
        total
    }

    /// Channels open now.
    pub fn open_channels(&self) -> usize {
        self.stats.lock().expect("stats lock").live.len()
    }
}

/// A block device, shared by every reactor (the control plane). Its data path is the
/// [`Channel`] each reactor opens.
pub trait Bdev: Send + Sync {
    /// Name, geometry, stats and listeners.
    fn info(&self) -> &Arc<BdevInfo>;

    /// Opens a channel for the calling thread (a reactor). Channels are not `Send`: each stays on
    /// the thread that opened it.
    fn open_channel(&self) -> Result<Channel, BdevError>;

    /// Changes the number of blocks; users are told through [`BdevInfo::subscribe`].
    fn resize(&self, new_blocks: u64) -> Result<(), BdevError> {
        let _ = new_blocks;
        Err(BdevError::Unsupported {
            what: format!("resize of a {} bdev", self.info().kind()),
        })
    }

    /// The bdevs this one is stacked on.
    fn bases(&self) -> Vec<Arc<dyn Bdev>> {
        Vec::new()
    }

    /// Adds a base at run time (a mirror's new or returning child); returns `describe()`.
    fn add_base(&self, base: Arc<dyn Bdev>) -> Result<serde_json::Value, BdevError> {
        let _ = base;
        Err(BdevError::Unsupported {
            what: format!("adding a base to a {} bdev", self.info().kind()),
        })
    }

    /// Removes the base named `name` at run time; returns `describe()`.
    fn remove_base(&self, name: &str) -> Result<serde_json::Value, BdevError> {
        let _ = name;
        Err(BdevError::Unsupported {
            what: format!("removing a base of a {} bdev", self.info().kind()),
        })
    }

    /// Kind-specific facts for `bdev_list` (paths, settings).
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// A kind-specific control operation over the RPC (`error_inject` for the error bdev, key
    /// operations for encryption bdevs). Unknown operations are unsupported.
    fn control(&self, op: &str, params: serde_json::Value) -> Result<serde_json::Value, BdevError> {
        let _ = params;
        Err(BdevError::Unsupported {
            what: format!("'{op}' on a {} bdev", self.info().kind()),
        })
    }
}

impl dyn Bdev {
    /// Shortcut for `info().name()`.
    pub fn name(&self) -> &str {
        self.info().name()
    }

    /// Shortcut for `info().geometry()`.
    pub fn geometry(&self) -> Geometry {
        self.info().geometry()
    }
}
