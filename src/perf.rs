//! `ferroblk perf bdev`: drives a configured bdev chain from N reactors at a queue depth (like
//! SPDK's bdevperf) and reports IOPS, MiB/s, mean/p99/p99.9 latency and CPU time per I/O.
//!
//! Each reactor runs one job as a poller on its own channel: `qd` requests in flight, each with
//! a preallocated buffer that moves into the request and back (no allocation per I/O).
//! Latencies are taken with the CPU's time-stamp counter and kept in a log-linear histogram.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ferroblk_bdev::reactor::{Poller, Reactors};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{
    AlignedBuf, Bdev, BdevRegistry, Channel, IoCompletion, IoRequest, SgList, Wake,
};
use serde::Serialize;

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random mix (see `--mix`).
    Randrw,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Sequential mix.
    Rw,
}

impl Pattern {
    pub(crate) fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }

    /// Percentage of reads.
    pub(crate) fn read_pct(self, mix: u32) -> u32 {
        match self {
            Pattern::Randread | Pattern::Read => 100,
            Pattern::Randwrite | Pattern::Write => 0,
            Pattern::Randrw | Pattern::Rw => mix,
        }
    }
}

/// A job's parameters.
#[derive(Clone, Debug, Serialize)]
pub struct JobSpec {
    /// Requests kept in flight per reactor.
    pub qd: usize,
    /// Bytes per request.
    pub io_size: usize,
    /// Access pattern.
    pub pattern: Pattern,
    /// Read percentage for mixes.
    pub mix: u32,
    /// Measured run time.
    pub time: Duration,
    /// Unmeasured run time before it (`perf bdev --ramp`).
    pub ramp: Duration,
    /// Compressible percentage of the written data (fio's `buffer_compress_percentage`);
    /// `None`: the repeating byte ramp 0, 1, .., 255.
    pub compress_pct: Option<u32>,
}

/// Job options shared by the client benchmarks (`perf vhost`, `perf nvmf`): one thread per
/// queue, each keeping `qd` requests in flight.
#[derive(clap::Args, Debug)]
pub struct ClientJobArgs {
    /// Queues, one connection or virtqueue and one client thread each (default: one per --cpus
    /// entry, else 1).
    #[arg(long)]
    pub queues: Option<usize>,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Bytes per request (a multiple of the device's block size; K/M suffixes accepted).
    #[arg(long, default_value = "4096")]
    pub bs: String,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    pub rw: Pattern,
    /// Read percentage for randrw / rw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub mix: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub time: f64,
    /// CPUs to pin the queue threads to (comma-separated; queue i runs on entry i mod len).
    #[arg(long, value_delimiter = ',')]
    pub cpus: Option<Vec<usize>>,
    /// Sleep until something arrives (the completion eventfd, poll(2) on the socket) instead of
    /// spinning: measures wake-up latency too.
    #[arg(long)]
    pub wait: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A client benchmark's validated job: the spec, the CPUs and the number of queues.
pub struct ClientJob {
    /// What each queue runs.
    pub spec: JobSpec,
    /// Where the queue threads are pinned (queue i on entry i mod len; empty: not pinned).
    pub cpus: Vec<usize>,
    /// Queues (threads).
    pub queues: usize,
}

impl ClientJobArgs {
    /// Checks the options; `max_qd` is the largest depth the transport can keep in flight.
    pub fn job(&self, max_qd: usize) -> anyhow::Result<ClientJob> {
        let io_size = ferroblk_bdev::types::parse_size(&self.bs)
            .ok_or_else(|| anyhow::anyhow!("--bs {} is not a size", self.bs))?
            as usize;
        if self.qd == 0 || self.qd > max_qd {
            anyhow::bail!("--qd must be between 1 and {max_qd}");
        }
        if !(self.time > 0.0 && self.time < 86_400.0) {
            anyhow::bail!("--time must be between 0 and 86400 seconds");
        }
        let cpus = self.cpus.clone().unwrap_or_default();
        if let Some(&c) = cpus.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
            anyhow::bail!("--cpus {c} is out of range");
        }
        let queues = self.queues.unwrap_or(cpus.len().max(1));
        if queues == 0 || queues > 1024 {
            anyhow::bail!("--queues must be between 1 and 1024");
        }
        Ok(ClientJob {
            spec: JobSpec {
                qd: self.qd,
                io_size,
                pattern: self.rw,
                mix: self.mix,
                time: Duration::from_secs_f64(self.time),
                ramp: Duration::ZERO,
                compress_pct: None,
            },
            cpus,
            queues,
        })
    }
}

/// Runs each job on its own scoped thread named `{prefix}-{index}` and collects the results in
/// job order (a panicking thread is an error, not a panic here).
pub fn run_queue_threads<J: Send>(
    prefix: &str,
    jobs: Vec<J>,
    run: impl Fn(J) -> anyhow::Result<JobResult> + Sync,
) -> Vec<anyhow::Result<JobResult>> {
    let run = &run;
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .enumerate()
            .map(|(index, job)| {
                std::thread::Builder::new()
                    .name(format!("{prefix}-{index}"))
                    .spawn_scoped(s, move || run(job))
                    .expect("spawn a queue thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a queue thread panicked")))
            })
            .collect()
    })
}

/// Fills `buf` with the data jobs write: with `compress_pct = Some(p)`, every 4 KiB piece is
/// `100 - p` % pseudo-random bytes followed by zeroes (like fio's `buffer_compress_percentage`,
/// so lz4 or zstd shrink it to about `100 - p` %); else the byte ramp 0, 1, .., 255.
pub fn fill_pattern(buf: &mut [u8], compress_pct: Option<u32>, seed: u64) {
    let Some(p) = compress_pct else {
        buf.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        return;
    };
    let mut rng = seed | 1;
    for piece in buf.chunks_mut(4096) {
        let random = piece.len() * (100 - p.min(100) as usize) / 100;
        let (r, z) = piece.split_at_mut(random);
        for w in r.chunks_mut(8) {
            let v = next_rand(&mut rng).to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
        z.fill(0);
    }
}

/// Exact values below 16, then 16 sub-buckets for each power of two from 2^4 to 2^63.
const BUCKETS: usize = 16 + 60 * 16;

/// Log-linear histogram: exact below 16, then 16 sub-buckets per power of two (≤ 6.25% error).
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    n: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            n: 0,
            sum: 0,
        }
    }
}

impl Histogram {
    #[inline]
    fn index(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let h = 63 - v.leading_zeros() as usize;
        let sub = ((v >> (h - 4)) & 15) as usize;
        (h - 3) * 16 + sub
    }

    fn lower_bound(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let h = i / 16 + 3;
        if h > 63 {
            return u64::MAX;
        }
        let sub = (i % 16) as u64;
        (1u64 << h) | (sub << (h - 4))
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v).min(BUCKETS - 1)] += 1;
        self.n += 1;
        self.sum += u128::from(v);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.n += o.n;
        self.sum += o.sum;
    }

    /// Mean value.
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum as f64 / self.n as f64
        }
    }

    /// Value at quantile `q` (0..1), as the midpoint of its bucket.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let target = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                let lo = Self::lower_bound(i) as f64;
                let hi = Self::lower_bound(i + 1) as f64;
                return (lo + hi) / 2.0;
            }
        }
        Self::lower_bound(BUCKETS - 1) as f64
    }
}

/// Where a perf job's next I/O goes and whether it reads: `perf bdev`, `perf nvmf` and
/// `perf vhost` pick alike, from the job's pattern and read mix.
pub(crate) struct Picker {
    rng: u64,
    seq: u64,
    ios: u64,
    random: bool,
    read_pct: u32,
}

impl Picker {
    /// The picker of job `index` (reactor or queue) over a volume of `ios` I/Os of the job's
    /// size: its own random sequence, and its own start for sequential patterns.
    pub(crate) fn new(spec: &JobSpec, index: usize, ios: u64) -> Picker {
        Picker {
            rng: 0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1),
            seq: (index as u64) * (ios / 16 + 1),
            ios,
            random: spec.pattern.random(),
            read_pct: spec.pattern.read_pct(spec.mix),
        }
    }

    /// The next I/O: its index in I/O-size units, and whether it is a read.
    #[inline]
    pub(crate) fn next(&mut self) -> (u64, bool) {
        let r = next_rand(&mut self.rng);
        let idx = if self.random {
            (r >> 16) % self.ios
        } else {
            self.seq = (self.seq + 1) % self.ios;
            self.seq
        };
        let read =
            self.read_pct == 100 || (self.read_pct > 0 && (r % 100) < u64::from(self.read_pct));
        (idx, read)
    }
}

/// Pins the calling load thread (queue `index`) to `cpu`, if given, then waits at `start` for
/// the others. Every thread reaches the barrier, even one whose pinning failed, so that none
/// waits forever.
pub(crate) fn pin_and_wait(
    cpu: Option<usize>,
    start: &std::sync::Barrier,
    index: usize,
) -> anyhow::Result<()> {
    let pinned = cpu.map_or(Ok(()), ferroblk_bdev::reactor::pin_to_cpu);
    start.wait();
    if let (Err(e), Some(cpu)) = (pinned, cpu) {
        return Err(anyhow::Error::new(e).context(format!("pin queue {index} to CPU {cpu}")));
    }
    Ok(())
}

/// xorshift64*: the offsets and read/write choices of every perf job.
#[inline]
pub(crate) fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A cheap monotonic tick source: the TSC on x86_64, the clock elsewhere.
#[inline]
pub(crate) fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions and exists on every x86_64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static T0: OnceLock<Instant> = OnceLock::new();
        T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(crate) fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one reactor's job measured.
#[derive(Clone)]
pub struct JobResult {
    /// Reactor index.
    pub reactor: usize,
    /// CPU the reactor is pinned to.
    pub cpu: Option<usize>,
    /// Completed requests.
    pub ios: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Wall time of the measured window.
    pub elapsed: Duration,
    /// Reactor thread CPU time in the window.
    pub cpu_ns: u64,
    /// Latency in ticks.
    pub hist: Histogram,
    /// Nanoseconds per tick.
    pub ns_per_tick: f64,
}

struct PerfJob {
    ch: Channel,
    spec: JobSpec,
    blocks_per_io: u32,
    bufs: Vec<Option<AlignedBuf>>,
    started_at: Vec<u64>,
    free: Vec<u32>,
    picker: Picker,
    done: Vec<IoCompletion>,
    hist: Histogram,
    ios: u64,
    errors: u64,
    start: Instant,
    start_tick: u64,
    start_cpu: u64,
    deadline: Instant,
    /// End of the unmeasured ramp, while it lasts.
    ramp_until: Option<Instant>,
    stopping: bool,
    report: Option<mpsc::Sender<JobResult>>,
    reactor: usize,
    cpu: Option<usize>,
}

impl PerfJob {
    fn finish(&mut self) {
        let Some(tx) = self.report.take() else { return };
        let elapsed = self.start.elapsed();
        let end_tick = ticks();
        let ns_per_tick = elapsed.as_nanos() as f64 / (end_tick - self.start_tick).max(1) as f64;
        let _ = tx.send(JobResult {
            reactor: self.reactor,
            cpu: self.cpu,
            ios: self.ios,
            errors: self.errors,
            bytes: self.ios * self.spec.io_size as u64,
            elapsed,
            cpu_ns: thread_cpu_ns() - self.start_cpu,
            hist: self.hist.clone(),
            ns_per_tick,
        });
    }
}

impl Poller for PerfJob {
    #[inline]
    fn poll(&mut self) -> usize {
        if self.report.is_none() {
            return 0;
        }
        let mut work = 0;
        if !self.stopping {
            while let Some(slot) = self.free.pop() {
                let (idx, read) = self.picker.next();
                let buf = self.bufs[slot as usize]
                    .take()
                    .expect("free slot has its buffer");
                let off = idx * u64::from(self.blocks_per_io);
                let bufs = SgList::from_buf(buf);
                let io = if read {
                    IoRequest::read(off, self.blocks_per_io, bufs, u64::from(slot))
                } else {
                    IoRequest::write(off, self.blocks_per_io, bufs, u64::from(slot))
                };
                self.started_at[slot as usize] = ticks();
                if let Err(io) = self.ch.submit(io) {
                    self.bufs[slot as usize] = io.bufs.into_buf();
                    self.free.push(slot);
                    break;
                }
                work += 1;
            }
        }
        let n = self.ch.poll(&mut self.done);
        if n > 0 {
            let now = ticks();
            for c in self.done.drain(..) {
                let slot = c.tag as usize;
                self.hist.record(now.wrapping_sub(self.started_at[slot]));
                if !c.status.is_ok() {
                    self.errors += 1;
                }
                self.ios += 1;
                self.bufs[slot] = c.bufs.into_buf();
                self.free.push(slot as u32);
            }
            work += n;
        }
        if let Some(r) = self.ramp_until {
            let now = Instant::now();
            if now >= r {
                // The measured window starts now.
                self.ramp_until = None;
                self.hist = Histogram::default();
                self.ios = 0;
                self.errors = 0;
                self.start = now;
                self.start_tick = ticks();
                self.start_cpu = thread_cpu_ns();
                self.deadline = now + self.spec.time;
            }
        } else if !self.stopping && Instant::now() >= self.deadline {
            self.stopping = true;
        }
        if self.stopping && self.ch.in_flight() == 0 {
            self.finish();
        }
        work
    }

    fn wake(&self) -> Wake {
        if self.report.is_none() {
            Wake::Event
        } else if self.stopping {
            self.ch.wake()
        } else {
            Wake::At(self.ramp_until.unwrap_or(self.deadline)).min(self.ch.wake())
        }
    }

    fn in_flight(&self) -> usize {
        self.ch.in_flight()
    }

    fn stop(&mut self) {
        self.stopping = true;
    }
}

/// Writes the whole of `bdev` once, from the calling thread, with the byte pattern the jobs
/// write (`perf bdev --prefill`).
pub fn prefill(bdev: &Arc<dyn Bdev>, compress_pct: Option<u32>) -> anyhow::Result<()> {
    let info = bdev.info().clone();
    let bs = info.block_size().bytes() as usize;
    let chunk = u64::from(info.geometry().max_transfer_blocks)
        .min((1 << 20) / bs as u64)
        .max(1);
    let mut data = vec![0u8; chunk as usize * bs];
    fill_pattern(&mut data, compress_pct, 0x5EED);
    let mut ch = SyncChannel::new(bdev.open_channel()?);
    let mut lba = 0;
    while lba < info.block_count() {
        let n = chunk.min(info.block_count() - lba);
        let st = ch.write(lba, &data[..n as usize * bs]);
        if !st.is_ok() {
            anyhow::bail!("prefill: write of blocks {lba}..{} failed: {st:?}", lba + n);
        }
        lba += n;
    }
    Ok(())
}

/// The outcome of a whole run.
pub struct RunResult {
    /// Per reactor.
    pub jobs: Vec<JobResult>,
    /// Whole-process CPU time during the run (reactors, kernel workers of the process).
    pub process_cpu_ns: u64,
    /// Wall time of the run.
    pub wall: Duration,
}

/// Runs `spec` against bdev `name` on every reactor.
pub fn run(
    registry: &BdevRegistry,
    reactors: &Reactors,
    name: &str,
    spec: &JobSpec,
) -> anyhow::Result<RunResult> {
    let bdev = registry
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("no bdev named '{name}' in the configuration"))?;
    let bs = bdev.info().block_size().bytes() as usize;
    if spec.io_size == 0 || !spec.io_size.is_multiple_of(bs) {
        anyhow::bail!(
            "--bs {} is not a multiple of the bdev's block size {bs}",
            spec.io_size
        );
    }
    let blocks_per_io = (spec.io_size / bs) as u32;
    let ios_in_bdev = bdev.info().block_count() / u64::from(blocks_per_io);
    if ios_in_bdev == 0 {
        anyhow::bail!("--bs {} is larger than the bdev", spec.io_size);
    }
    let (tx, rx) = mpsc::channel();
    let cpu0 = process_cpu_ns();
    let t0 = Instant::now();
    for h in reactors.handles() {
        let bdev = bdev.clone();
        let tx = tx.clone();
        let spec = spec.clone();
        let (reactor, cpu) = (h.id(), h.cpu());
        let (etx, erx) = mpsc::sync_channel(1);
        h.send(move |core| {
            let ch = match bdev.open_channel() {
                Ok(c) => c,
                Err(e) => {
                    let _ = etx.send(Err(e.to_string()));
                    return;
                }
            };
            if spec.qd > ch.depth() {
                let _ = etx.send(Err(format!(
                    "--qd {} exceeds the channel depth {} of this bdev",
                    spec.qd,
                    ch.depth()
                )));
                return;
            }
            let qd = spec.qd;
            let (time, ramp) = (spec.time, spec.ramp);
            let mut seed = 0x0DD5_EED5 ^ (reactor as u64 + 1);
            let mut job = PerfJob {
                ch,
                blocks_per_io,
                bufs: (0..qd)
                    .map(|_| {
                        let mut b = AlignedBuf::new(spec.io_size);
                        fill_pattern(b.as_mut_slice(), spec.compress_pct, next_rand(&mut seed));
                        Some(b)
                    })
                    .collect(),
                started_at: vec![0; qd],
                free: (0..qd as u32).collect(),
                picker: Picker::new(&spec, reactor, ios_in_bdev),
                done: Vec::with_capacity(qd),
                hist: Histogram::default(),
                ios: 0,
                errors: 0,
                start: Instant::now(),
                start_tick: 0,
                start_cpu: 0,
                deadline: Instant::now(),
                ramp_until: None,
                stopping: false,
                report: Some(tx),
                reactor,
                cpu,
                spec,
            };
            job.start = Instant::now();
            job.start_tick = ticks();
            job.start_cpu = thread_cpu_ns();
            job.deadline = job.start + time;
            if !ramp.is_zero() {
                job.ramp_until = Some(job.start + ramp);
            }
            core.add_poller(Box::new(job));
            let _ = etx.send(Ok(()));
        });
        erx.recv()
            .map_err(|_| anyhow::anyhow!("reactor {reactor} exited"))?
            .map_err(|e| anyhow::anyhow!("reactor {reactor}: {e}"))?;
    }
    drop(tx);
    // The process CPU and wall windows start when the jobs' ramps end (they started together).
    let (mut cpu0, mut t0) = (cpu0, t0);
    if !spec.ramp.is_zero() {
        std::thread::sleep(spec.ramp);
        cpu0 = process_cpu_ns();
        t0 = Instant::now();
    }
    let mut jobs: Vec<JobResult> = Vec::new();
    for _ in 0..reactors.len() {
        jobs.push(
            rx.recv_timeout(spec.time + spec.ramp + Duration::from_secs(60))
                .map_err(|_| anyhow::anyhow!("a perf job did not finish"))?,
        );
    }
    jobs.sort_by_key(|j| j.reactor);
    Ok(RunResult {
        jobs,
        process_cpu_ns: process_cpu_ns() - cpu0,
        wall: t0.elapsed(),
    })
}

fn fmt_row(label: &str, cpu: &str, j: &JobResult) -> String {
    let secs = j.elapsed.as_secs_f64();
    let us = |ticks: f64| ticks * j.ns_per_tick / 1000.0;
    format!(
        "{label:<8} {cpu:>4} {:>12.0} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>10.0}",
        j.ios as f64 / secs,
        j.bytes as f64 / secs / (1 << 20) as f64,
        us(j.hist.mean()),
        us(j.hist.quantile(0.99)),
        us(j.hist.quantile(0.999)),
        j.cpu_ns as f64 / j.ios.max(1) as f64,
    )
}

impl RunResult {
    /// Every job summed into one row: counters added, latency histograms merged, the longest
    /// window, the mean tick length.
    pub(crate) fn total(&self) -> JobResult {
        let mut t = JobResult {
            reactor: 0,
            cpu: None,
            ios: 0,
            errors: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            cpu_ns: 0,
            hist: Histogram::default(),
            ns_per_tick: 0.0,
        };
        for j in &self.jobs {
            t.hist.merge(&j.hist);
            t.ios += j.ios;
            t.bytes += j.bytes;
            t.errors += j.errors;
            t.cpu_ns += j.cpu_ns;
            t.elapsed = t.elapsed.max(j.elapsed);
            t.ns_per_tick += j.ns_per_tick / self.jobs.len() as f64;
        }
        t
    }

    /// One JSON object per job; `key` names the job's index (`reactor`, `queue`).
    pub(crate) fn json_rows(&self, key: &str) -> Vec<serde_json::Value> {
        self.jobs
            .iter()
            .map(|j| {
                let mut v = serde_json::json!({
                    "cpu": j.cpu, "ios": j.ios, "errors": j.errors,
                    "iops": j.ios as f64 / j.elapsed.as_secs_f64(),
                    "mean_us": j.hist.mean() * j.ns_per_tick / 1000.0,
                    "p99_us": j.hist.quantile(0.99) * j.ns_per_tick / 1000.0,
                    "cpu_ns_per_io": j.cpu_ns as f64 / j.ios.max(1) as f64,
                });
                v[key] = j.reactor.into();
                v
            })
            .collect()
    }

    /// The keys every perf command's JSON shares: ios, errors, iops, mib_s, mean/p99/p99.9 latency,
    /// `<cpu_key>` (CPU of the job threads per I/O) and the process CPU per I/O.
    pub(crate) fn json_summary(&self, cpu_key: &str) -> serde_json::Map<String, serde_json::Value> {
        let t = self.total();
        let secs = t.elapsed.as_secs_f64();
        let us = |ticks: f64| ticks * t.ns_per_tick / 1000.0;
        let per_io = |ns: u64| ns as f64 / t.ios.max(1) as f64;
        let mut m = serde_json::Map::new();
        m.insert("ios".into(), t.ios.into());
        m.insert("errors".into(), t.errors.into());
        m.insert("iops".into(), (t.ios as f64 / secs).into());
        m.insert(
            "mib_s".into(),
            (t.bytes as f64 / secs / (1 << 20) as f64).into(),
        );
        m.insert("mean_us".into(), us(t.hist.mean()).into());
        m.insert("p99_us".into(), us(t.hist.quantile(0.99)).into());
        m.insert("p999_us".into(), us(t.hist.quantile(0.999)).into());
        m.insert(cpu_key.into(), per_io(t.cpu_ns).into());
        m.insert(
            "process_cpu_ns_per_io".into(),
            per_io(self.process_cpu_ns).into(),
        );
        m
    }

    /// Prints the table (a row per job, first column `label`, then the total) and the process
    /// CPU line; `who` says whose CPU that is.
    pub(crate) fn print_table(&self, label: &str, who: &str) {
        println!(
            "{label:<8} {:>4} {:>12} {:>10} {:>9} {:>9} {:>9} {:>10}",
            "cpu", "IOPS", "MiB/s", "mean_us", "p99_us", "p99.9_us", "cpu_ns/io"
        );
        for j in &self.jobs {
            let cpu = j.cpu.map_or("-".to_string(), |c| c.to_string());
            println!("{}", fmt_row(&j.reactor.to_string(), &cpu, j));
        }
        let t = self.total();
        println!("{}", fmt_row("total", "", &t));
        println!(
            "errors: {}   process CPU: {:.2} s over {:.2} s wall = {:.0} ns per I/O ({who})",
            t.errors,
            self.process_cpu_ns as f64 / 1e9,
            self.wall.as_secs_f64(),
            self.process_cpu_ns as f64 / t.ios.max(1) as f64
        );
    }
}

/// Prints the result as a table, or JSON.
///
/// `state` is the bdev's `describe()` after the run (a transform's own figures: a compress
/// bdev's logical and physical use, a crc bdev's integrity errors), printed with the results.
pub fn report(bdev: &str, spec: &JobSpec, r: &RunResult, state: &serde_json::Value, json: bool) {
    if json {
        let mut v = r.json_summary("reactor_cpu_ns_per_io");
        v.insert("bdev".into(), bdev.into());
        v.insert("bdev_state".into(), state.clone());
        v.insert("job".into(), serde_json::json!(spec));
        v.insert("reactors".into(), r.json_rows("reactor").into());
        println!("{}", serde_json::Value::Object(v));
        return;
    }
    println!(
        "perf bdev={bdev} pattern={:?} bs={} qd={} mix={} time={}s reactors={}",
        spec.pattern,
        spec.io_size,
        spec.qd,
        spec.pattern.read_pct(spec.mix),
        spec.time.as_secs_f64(),
        r.jobs.len()
    );
    r.print_table("reactor", "reactors + kernel workers");
    if state.as_object().is_some_and(|o| !o.is_empty()) {
        println!("bdev state after the run: {state}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5);
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.07, "{p50}");
        let p99 = h.quantile(0.99);
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.07, "{p99}");
        assert!((h.mean() - 5000.5).abs() < 0.01);
        for i in 0..BUCKETS - 1 {
            assert!(Histogram::lower_bound(i) < Histogram::lower_bound(i + 1));
            assert_eq!(Histogram::index(Histogram::lower_bound(i)), i);
        }
    }
}
