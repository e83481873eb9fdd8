//! `ferroblk perf vhost`: a benchmark client that drives any vhost-user-blk backend (ours,
//! qemu-storage-daemon, SPDK, ...) through its Unix socket, with libblkio's Rust core as the
//! virtio-blk driver.
//!
//! One thread per virtqueue, each keeping `qd` requests in flight on its own `Blkioq`. The data
//! buffers are carved out of one memory region allocated with `Blkio::alloc_mem_region` (a memfd,
//! so it can be shared) and handed to the backend with `Blkio::map_mem_region` (vhost-user
//! `ADD_MEM_REG`); a buffer belongs to one request slot for the whole run, so nothing is
//! allocated per I/O. By default the client polls the used ring (`do_io` with
//! `min_completions = 0` in a busy loop, like SPDK's bdevperf), so it does not measure its own
//! wake-ups; `--wait` sleeps on the queue's completion eventfd instead (`min_completions = 1`).
//! Patterns, latency histogram and report follow `perf bdev` (see `perf.rs`).
//!
//! The client is the `blkio` cargo feature (on by default); a build without it keeps the
//! command, which then says it was built without it.

#[cfg(feature = "blkio")]
use std::mem::MaybeUninit;
use std::path::PathBuf;
#[cfg(feature = "blkio")]
use std::sync::Barrier;
#[cfg(feature = "blkio")]
use std::time::Instant;

#[cfg(feature = "blkio")]
use anyhow::{Context, bail};
#[cfg(feature = "blkio")]
use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use crate::perf::ClientJobArgs;
#[cfg(feature = "blkio")]
use crate::perf::{
    ClientJob, Histogram, JobResult, JobSpec, Picker, RunResult, pin_and_wait, process_cpu_ns,
    run_queue_threads, thread_cpu_ns, ticks,
};

/// libblkio's driver for a vhost-user-blk backend reached through a Unix socket.
#[cfg(feature = "blkio")]
const DRIVER: &str = "virtio-blk-vhost-user";

/// Descriptors one virtio-blk request takes in the split ring (header, data, status): libblkio's
/// virtio driver does not use indirect descriptors.
#[cfg(feature = "blkio")]
const DESCS_PER_REQ: usize = 3;

/// The virtqueue size libblkio uses unless told otherwise.
#[cfg(feature = "blkio")]
const DEFAULT_QUEUE_SIZE: usize = 256;

/// Options of `ferroblk perf vhost`.
#[derive(clap::Args, Debug)]
pub struct VhostArgs {
    /// The backend's vhost-user-blk Unix socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The job.
    #[command(flatten)]
    pub job: ClientJobArgs,
}

/// What the device told us after `connect`.
#[cfg(feature = "blkio")]
#[derive(Clone, Debug)]
struct DeviceInfo {
    capacity: u64,
    block_size: usize,
    queue_size: usize,
    max_queues: usize,
}

/// One queue thread's parameters.
#[cfg(feature = "blkio")]
struct QueueJob<'a> {
    index: usize,
    cpu: Option<usize>,
    queue: Blkioq,
    /// Start of this queue's `qd * io_size` bytes inside the mapped memory region.
    bufs: *mut u8,
    spec: &'a JobSpec,
    ios_in_dev: u64,
    wait: bool,
    start: &'a Barrier,
}

#[cfg(feature = "blkio")]
// SAFETY: `bufs` points into the memory region that `run` keeps allocated and mapped until every
// queue thread has been joined, and no two jobs' buffer ranges overlap.
unsafe impl Send for QueueJob<'_> {}

/// Runs the benchmark described by `a` and prints its report.
#[cfg(feature = "blkio")]
pub fn run(a: &VhostArgs) -> anyhow::Result<()> {
    let ClientJob {
        spec,
        cpus,
        queues: nq,
    } = a.job.job(usize::MAX)?;
    let io_size = spec.io_size;
    let socket = a
        .socket
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("--socket must be valid UTF-8"))?;

    let be = |what: &'static str| move |e: blkio::Error| anyhow::anyhow!("blkio {what}: {e}");
    let mut b = Blkio::new(DRIVER).map_err(be("new"))?;
    b.set_str("path", socket).map_err(be("set path"))?;
    if spec.pattern.read_pct(spec.mix) == 100 {
        // A read-only job also works against a read-only export (qsd's default `writable=off`).
        b.set_bool("read-only", true).map_err(be("set read-only"))?;
    }
    b.connect()
        .map_err(be("connect"))
        .with_context(|| format!("vhost-user socket {}", a.socket.display()))?;
    let dev = DeviceInfo {
        capacity: b.get_u64("capacity").map_err(be("capacity"))?,
        block_size: b
            .get_i32("request-alignment")
            .map_err(be("request-alignment"))? as usize,
        queue_size: DEFAULT_QUEUE_SIZE.max((a.job.qd * DESCS_PER_REQ).next_power_of_two()),
        max_queues: b.get_i32("max-queues").map_err(be("max-queues"))? as usize,
    };
    if io_size == 0 || !io_size.is_multiple_of(dev.block_size) {
        bail!(
            "--bs {io_size} is not a multiple of the device's block size {}",
            dev.block_size
        );
    }
    let max_transfer = b.get_i32("max-transfer").map_err(be("max-transfer"))?;
    let max_seg = b
        .get_i32("max-segment-len")
        .map_err(be("max-segment-len"))?;
    for (name, limit) in [("max-transfer", max_transfer), ("max-segment-len", max_seg)] {
        if limit > 0 && io_size > limit as usize {
            bail!("--bs {io_size} exceeds the device's {name} {limit}");
        }
    }
    let ios_in_dev = dev.capacity / io_size as u64;
    if ios_in_dev == 0 {
        bail!("--bs {io_size} is larger than the device");
    }
    if nq > dev.max_queues {
        bail!(
            "--queues {nq} exceeds the {} queue(s) the backend offers",
            dev.max_queues
        );
    }
    b.set_i32("num-queues", nq as i32)
        .map_err(be("set num-queues"))?;
    b.set_i32("queue-size", dev.queue_size as i32)
        .map_err(be("set queue-size"))?;
    let queues = match b.start() {
        Ok(o) => o.queues,
        Err(e) if e.errno() == blkio::Errno::ROFS => bail!(
            "the export is read-only: a job with writes needs a writable one \
             (qemu-storage-daemon: writable=on)"
        ),
        Err(e) => return Err(be("start")(e)),
    };

    // One shared region for every queue's buffers: one ADD_MEM_REG message, one fd for the
    // backend to map. Its size is rounded up to the region alignment and to whole pages.
    let align = (b
        .get_u64("mem-region-alignment")
        .map_err(be("mem-region-alignment"))? as usize)
        .max(4096);
    let per_queue = a.job.qd * io_size;
    let len = (nq * per_queue).div_ceil(align) * align;
    let region = b.alloc_mem_region(len).map_err(be("alloc_mem_region"))?;
    // SAFETY: alloc_mem_region returned a fresh read-write mapping of `len` bytes at `addr` that
    // nothing else references yet; it stays mapped until `b` is dropped at the end of `run`.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    // Non-zero write data, the same pattern as `perf bdev` (each buffer holds 0, 1, ..., 255, ...).
    for chunk in mem.chunks_mut(io_size) {
        chunk.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
    }
    b.map_mem_region(&region).map_err(be("map_mem_region"))?;

    let start = Barrier::new(nq);
    let cpu0 = process_cpu_ns();
    let t0 = Instant::now();
    let jobs: Vec<QueueJob<'_>> = queues
        .into_iter()
        .enumerate()
        .map(|(index, queue)| QueueJob {
            index,
            cpu: (!cpus.is_empty()).then(|| cpus[index % cpus.len()]),
            queue,
            bufs: region.addr.wrapping_add(index * per_queue) as *mut u8,
            spec: &spec,
            ios_in_dev,
            wait: a.job.wait,
            start: &start,
        })
        .collect();
    let results = run_queue_threads("perf-vhost", jobs, run_queue);
    let r = RunResult {
        jobs: results.into_iter().collect::<anyhow::Result<_>>()?,
        process_cpu_ns: process_cpu_ns() - cpu0,
        wall: t0.elapsed(),
    };
    // Every queue was dropped with its thread; `b` (the connection, the rings and the region)
    // goes last.
    b.unmap_mem_region(&region);
    report(a, &dev, &spec, &r);
    Ok(())
}

/// One queue's loop: `qd` slots, each with its own buffer, resubmitted as soon as it completes
/// until the deadline, then drained.
#[cfg(feature = "blkio")]
fn run_queue(mut j: QueueJob<'_>) -> anyhow::Result<JobResult> {
    pin_and_wait(j.cpu, j.start, j.index)?;
    let spec = j.spec;
    let qd = spec.qd;
    let io_size = spec.io_size;
    let mut picker = Picker::new(spec, j.index, j.ios_in_dev);
    let mut started_at = vec![0u64; qd];
    let mut completions: Vec<MaybeUninit<Completion>> = std::iter::repeat_with(MaybeUninit::uninit)
        .take(qd)
        .collect();
    let mut hist = Histogram::default();
    let (mut ios, mut errors, mut in_flight) = (0u64, 0u64, 0usize);
    let mut first_error: Option<i32> = None;

    // Queues one request for `slot`; the notification goes out with the next `do_io`.
    let mut submit = |q: &mut Blkioq, slot: usize, started_at: &mut [u64]| {
        let (idx, read) = picker.next();
        let off = idx * io_size as u64;
        // The slot's buffer: inside this queue's part of the mapped region (see `QueueJob`).
        let buf = j.bufs.wrapping_add(slot * io_size);
        started_at[slot] = ticks();
        if read {
            q.read(off, buf, io_size, slot, ReqFlags::empty());
        } else {
            q.write(off, buf, io_size, slot, ReqFlags::empty());
        }
    };

    let start = Instant::now();
    let start_tick = ticks();
    let start_cpu = thread_cpu_ns();
    let deadline = start + spec.time;
    for slot in 0..qd {
        submit(&mut j.queue, slot, &mut started_at);
    }
    in_flight += qd;
    let mut stopping = false;
    while in_flight > 0 {
        let min = usize::from(j.wait);
        let n = j
            .queue
            .do_io(&mut completions, min, None, None)
            .map_err(|e| anyhow::anyhow!("queue {}: do_io: {e}", j.index))?;
        if n > 0 {
            let now = ticks();
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` entries of `completions`.
                let c = unsafe { c.assume_init_ref() };
                let slot = c.user_data;
                hist.record(now.wrapping_sub(started_at[slot]));
                ios += 1;
                if c.ret != 0 {
                    errors += 1;
                    first_error.get_or_insert(c.ret);
                }
                if stopping {
                    in_flight -= 1;
                } else {
                    submit(&mut j.queue, slot, &mut started_at);
                }
            }
        }
        if !stopping && Instant::now() >= deadline {
            stopping = true;
        }
    }
    let elapsed = start.elapsed();
    let end_tick = ticks();
    let cpu_ns = thread_cpu_ns() - start_cpu;
    if let Some(e) = first_error {
        tracing::warn!(
            queue = j.index,
            errors,
            first = %std::io::Error::from_raw_os_error(-e),
            "requests failed"
        );
    }
    Ok(JobResult {
        reactor: j.index,
        cpu: j.cpu,
        ios,
        errors,
        bytes: ios * io_size as u64,
        elapsed,
        cpu_ns,
        hist,
        ns_per_tick: elapsed.as_nanos() as f64 / (end_tick - start_tick).max(1) as f64,
    })
}

/// Prints the result as a table, or JSON with the keys of `perf bdev` where they apply.
#[cfg(feature = "blkio")]
fn report(a: &VhostArgs, dev: &DeviceInfo, spec: &JobSpec, r: &RunResult) {
    let mode = if a.job.wait { "wait" } else { "poll" };
    if a.job.json {
        let mut v = r.json_summary("client_cpu_ns_per_io");
        v.insert("socket".into(), serde_json::json!(a.socket));
        v.insert("mode".into(), mode.into());
        v.insert("job".into(), serde_json::json!(spec));
        v.insert(
            "device".into(),
            serde_json::json!({
                "capacity": dev.capacity, "block_size": dev.block_size,
                "queue_size": dev.queue_size, "max_queues": dev.max_queues,
            }),
        );
        v.insert("queues".into(), r.json_rows("queue").into());
        println!("{}", serde_json::Value::Object(v));
        return;
    }
    println!(
        "perf vhost socket={} mode={mode} pattern={:?} bs={} qd={} mix={} time={}s queues={}",
        a.socket.display(),
        spec.pattern,
        spec.io_size,
        spec.qd,
        spec.pattern.read_pct(spec.mix),
        spec.time.as_secs_f64(),
        r.jobs.len()
    );
    println!(
        "device: {} bytes, block size {}, virtqueue size {}, backend offers {} queue(s)",
        dev.capacity, dev.block_size, dev.queue_size, dev.max_queues
    );
    let who = if a.job.wait {
        "client"
    } else {
        "client: polling, so one busy core per queue"
    };
    r.print_table("queue", who);
}

/// Without the `blkio` feature there is no client: says so.
#[cfg(not(feature = "blkio"))]
pub fn run(_a: &VhostArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "perf vhost: ferroblk was built without the `blkio` feature (libblkio's vhost-user-blk \
         client); rebuild with `--features blkio`"
    )
}

#[cfg(all(test, not(feature = "blkio")))]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: super::VhostArgs,
    }

    #[test]
    fn perf_vhost_says_it_was_built_without_blkio() {
        let c = Cmd::try_parse_from(["perf-vhost", "--socket", "/nonexistent.sock"]).unwrap();
        let e = super::run(&c.args).unwrap_err().to_string();
        assert!(e.contains("without the `blkio` feature"), "{e}");
    }
}
