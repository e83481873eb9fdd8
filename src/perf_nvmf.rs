//! `ferroblk perf nvmf`: a load generator for any NVMe/TCP or NVMe/RDMA (`--trtype rdma`)
//! controller (ours, Linux nvmet, SPDK ...) built on the initiator of
//! `ferroblk_target::initiator`.
//!
//! The admin queue connects, enables and identifies the controller and asks for `--queues` I/O
//! queues (Set Features Number of Queues); then one thread per I/O queue (pinned with
//! `--cpus`) keeps `--qd` commands in flight on its own connection. Each command slot owns one
//! buffer allocated before the run; the buffer moves into the queue at submit and comes back
//! with the completion, so nothing is allocated per I/O. By default a thread spins on
//! `IoQueue::poll` (a non-blocking socket, like SPDK's perf); `--wait` sleeps in `poll(2)`
//! when nothing arrived. Patterns, latency histogram, table and JSON keys follow `perf bdev`
//! (`perf.rs`); `reactor_cpu_ns_per_io` is the queue threads' CPU time per I/O here.

use std::net::SocketAddr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferroblk_target::initiator::{
    Completion, ConnectOptions, Controller, IoCommand, IoQueue, IoQueueOptions, MAX_DEPTH, Trtype,
};

use crate::perf::{
    ClientJob, ClientJobArgs, Histogram, JobResult, JobSpec, Picker, RunResult, pin_and_wait,
    process_cpu_ns, run_queue_threads, thread_cpu_ns, ticks,
};

/// Options of `ferroblk perf nvmf`.
#[derive(clap::Args, Debug)]
pub struct NvmfArgs {
    /// The controller's address (IP:port; NVMe/RDMA: an address of its RDMA device).
    #[arg(long)]
    pub addr: SocketAddr,
    /// Transport: tcp or rdma (rdma needs a build with the `rdma` feature).
    #[arg(long, default_value = "tcp", value_parser = parse_trtype)]
    pub trtype: Trtype,
    /// After the run, write a pattern naming each I/O into a range of the namespace per
    /// queue (up to 256 I/Os each), read it back and compare; a mismatch fails the command.
    #[arg(long)]
    pub verify: bool,
    /// The subsystem NQN.
    #[arg(long)]
    pub nqn: String,
    /// Namespace to drive (default: the first active one).
    #[arg(long)]
    pub nsid: Option<u32>,
    /// This host's NQN (default: derived from a random host identifier).
    #[arg(long)]
    pub hostnqn: Option<String>,
    /// The job.
    #[command(flatten)]
    pub job: ClientJobArgs,
    /// Ask for header digests (CRC32C over each PDU header).
    #[arg(long)]
    pub hdr_digest: bool,
    /// Ask for data digests (CRC32C over each PDU's data).
    #[arg(long)]
    pub data_digest: bool,
    /// Instead of a job: connect the queues, keep them idle (keep-alive only) for this many
    /// seconds, disconnect (to measure what connected but idle queues cost the target).
    #[arg(long)]
    pub hold: Option<f64>,
}

fn parse_trtype(s: &str) -> Result<Trtype, String> {
    match s {
        "tcp" => Ok(Trtype::Tcp),
        "rdma" => Ok(Trtype::Rdma),
        _ => Err(format!("'{s}' is not a transport (tcp or rdma)")),
    }
}

/// What the controller told us.
#[derive(Clone, Debug)]
struct TargetInfo {
    nsid: u32,
    block_size: usize,
    blocks: u64,
    model: String,
    digests: (bool, bool),
    in_capsule: usize,
    maxh2cdata: u32,
}

/// One queue thread's parameters.
struct QueueJob<'a> {
    index: usize,
    cpu: Option<usize>,
    queue: &'a mut IoQueue,
    spec: &'a JobSpec,
    nsid: u32,
    blocks_per_io: u32,
    ios_in_dev: u64,
    wait: bool,
    /// I/Os to write and read back after the run, from this first I/O index.
    verify: Option<(u64, u64)>,
    start: &'a Barrier,
}

/// Runs the benchmark described by `a` and prints its report.
pub fn run(a: &NvmfArgs) -> anyhow::Result<()> {
    let ClientJob {
        spec,
        cpus,
        queues: nq,
    } = a.job.job(usize::from(MAX_DEPTH) - 1)?;
    let io_size = spec.io_size;

    let mut opts = ConnectOptions::new(a.addr, a.nqn.clone());
    opts.trtype = a.trtype;
    if let Some(h) = &a.hostnqn {
        opts.hostnqn = h.clone();
    }
    opts.hdr_digest = a.hdr_digest;
    opts.data_digest = a.data_digest;
    let ctrl = Controller::connect(&opts)
        .with_context(|| format!("connect to {} at {}", a.nqn, a.addr))?;
    let nsid = match a.nsid {
        Some(n) => n,
        None => *ctrl
            .active_namespaces()
            .context("active namespace list")?
            .first()
            .ok_or_else(|| anyhow::anyhow!("{} has no namespace", a.nqn))?,
    };
    let ns = ctrl
        .namespace(nsid)
        .with_context(|| format!("identify namespace {nsid}"))?;
    let bs = ns.block_size as usize;
    if io_size == 0 || !io_size.is_multiple_of(bs) {
        bail!("--bs {io_size} is not a multiple of the namespace's block size {bs}");
    }
    if io_size / bs > 65536 {
        bail!("--bs {io_size} is more than 65536 blocks");
    }
    if let Some(mdts) = ctrl.max_data_transfer()
        && io_size > mdts
    {
        bail!("--bs {io_size} exceeds the controller's maximum transfer (MDTS) {mdts}");
    }
    let ios_in_dev = ns.blocks * bs as u64 / io_size as u64;
    if ios_in_dev == 0 {
        bail!("--bs {io_size} is larger than the namespace");
    }
    if a.job.qd > usize::from(ctrl.cap().mqes) {
        bail!(
            "--qd {} exceeds the controller's queue size (CAP.MQES {})",
            a.job.qd,
            ctrl.cap().mqes
        );
    }
    let (nsq, ncq) = ctrl
        .set_number_of_queues(nq as u16)
        .context("Set Features Number of Queues")?;
    if (nsq.min(ncq) as usize) < nq {
        bail!("--queues {nq}: the controller allows {}", nsq.min(ncq));
    }
    let qopts = IoQueueOptions {
        depth: a.job.qd as u16,
        max_data: io_size,
        disable_sq_flow_control: false,
    };
    let mut queues: Vec<IoQueue> = (1..=nq as u16)
        .map(|qid| {
            ctrl.connect_io_queue(qid, &qopts)
                .with_context(|| format!("connect I/O queue {qid}"))
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(hold) = a.hold {
        eprintln!("holding {nq} idle I/O queues (plus the admin queue) connected for {hold} s");
        std::thread::sleep(Duration::from_secs_f64(hold.clamp(0.0, 86_400.0)));
        drop(queues);
        println!("held {nq} idle I/O queues for {hold} s");
        return Ok(());
    }
    let info = TargetInfo {
        nsid,
        block_size: bs,
        blocks: ns.blocks,
        model: ctrl.identify().mn.clone(),
        digests: queues[0].digests(),
        in_capsule: queues[0].max_in_capsule(),
        maxh2cdata: queues[0].max_h2c_data(),
    };

    let start = Barrier::new(nq);
    let cpu0 = process_cpu_ns();
    let t0 = Instant::now();
    let jobs: Vec<QueueJob<'_>> = queues
        .iter_mut()
        .enumerate()
        .map(|(index, queue)| QueueJob {
            index,
            cpu: (!cpus.is_empty()).then(|| cpus[index % cpus.len()]),
            queue,
            spec: &spec,
            nsid,
            blocks_per_io: (io_size / bs) as u32,
            ios_in_dev,
            wait: a.job.wait,
            verify: a.verify.then(|| {
                let per = (ios_in_dev / nq as u64).clamp(1, 256);
                ((index as u64 * per) % ios_in_dev, per.min(ios_in_dev))
            }),
            start: &start,
        })
        .collect();
    let results = run_queue_threads("perf-nvmf", jobs, run_queue);
    let r = RunResult {
        jobs: results.into_iter().collect::<anyhow::Result<_>>()?,
        process_cpu_ns: process_cpu_ns() - cpu0,
        wall: t0.elapsed(),
    };
    for q in queues {
        if let Err(e) = q.disconnect() {
            tracing::warn!(error = %e, "I/O queue disconnect");
        }
    }
    if let Err(e) = ctrl.shutdown() {
        tracing::warn!(error = %e, "controller shutdown");
    }
    report(a, &info, &spec, &r);
    Ok(())
}

/// One queue's loop: `qd` slots, each with its own buffer, resubmitted as soon as it completes
/// until the deadline, then drained.
fn run_queue(j: QueueJob<'_>) -> anyhow::Result<JobResult> {
    pin_and_wait(j.cpu, j.start, j.index)?;
    let spec = j.spec;
    let qd = spec.qd;
    let mut picker = Picker::new(spec, j.index, j.ios_in_dev);
    let mut started_at = vec![0u64; qd];
    let mut done: Vec<Completion> = Vec::with_capacity(qd);
    let mut hist = Histogram::default();
    let (mut ios, mut errors, mut in_flight) = (0u64, 0u64, 0usize);
    let mut first_error = None;
    let q = j.queue;

    // Queues one command for `slot` with its buffer; it goes out with the next `poll`.
    let mut submit = |q: &mut IoQueue, slot: usize, buf: Vec<u8>, started_at: &mut [u64]| {
        let (idx, read) = picker.next();
        let slba = idx * u64::from(j.blocks_per_io);
        let cmd = if read {
            IoCommand::Read {
                nsid: j.nsid,
                slba,
                nlb: j.blocks_per_io,
            }
        } else {
            IoCommand::Write {
                nsid: j.nsid,
                slba,
                nlb: j.blocks_per_io,
                fua: false,
            }
        };
        started_at[slot] = ticks();
        q.submit(cmd, buf, slot as u64)
            .map_err(|r| anyhow::anyhow!("queue {}: submit: {}", j.index, r.reason))
    };

    // Non-zero write data, the same pattern as `perf bdev`.
    let bufs: Vec<Vec<u8>> = (0..qd)
        .map(|_| (0..spec.io_size).map(|i| i as u8).collect())
        .collect();
    for b in &bufs {
        // SAFETY: every buffer stays allocated until `deregister_memory` below: it moves into
        // the queue and back (its heap memory does not move), and the stopping loop keeps it
        // in `retired`.
        unsafe { q.register_memory(b.as_ptr(), b.len()) }
            .map_err(|e| anyhow::anyhow!("queue {}: register buffers: {e}", j.index))?;
    }
    let mut retired: Vec<Vec<u8>> = Vec::with_capacity(qd);
    let start = Instant::now();
    let start_tick = ticks();
    let start_cpu = thread_cpu_ns();
    let deadline = start + spec.time;
    for (slot, buf) in bufs.into_iter().enumerate() {
        submit(q, slot, buf, &mut started_at)?;
    }
    in_flight += qd;
    let mut stopping = false;
    while in_flight > 0 {
        let n = q
            .poll(&mut done)
            .map_err(|e| anyhow::anyhow!("queue {}: {e}", j.index))?;
        if n > 0 {
            let now = ticks();
            for c in done.drain(..) {
                let slot = c.tag as usize;
                hist.record(now.wrapping_sub(started_at[slot]));
                ios += 1;
                if !c.status().is_success() {
                    errors += 1;
                    first_error.get_or_insert(c.status());
                }
                if stopping {
                    in_flight -= 1;
                    retired.push(c.buf);
                } else {
                    submit(q, slot, c.buf, &mut started_at)?;
                }
            }
        } else if j.wait {
            q.wait(Some(Duration::from_millis(10)))
                .map_err(|e| anyhow::anyhow!("queue {}: {e}", j.index))?;
        }
        if !stopping && Instant::now() >= deadline {
            stopping = true;
        }
    }
    let elapsed = start.elapsed();
    let end_tick = ticks();
    let cpu_ns = thread_cpu_ns() - start_cpu;
    if let Some(s) = first_error {
        tracing::warn!(queue = j.index, errors, first = %s, "commands failed");
    }
    let verified = match j.verify {
        Some(range) => Some(verify(
            q,
            j.index,
            j.nsid,
            j.blocks_per_io,
            spec.io_size,
            &mut retired,
            range,
        )),
        None => None,
    };
    q.deregister_memory();
    drop(retired);
    if let Some(v) = verified {
        let n = v?;
        eprintln!(
            "verify: queue {}: {n} I/Os of {} bytes written, read back and compared: all match",
            j.index, spec.io_size
        );
    }
    Ok(JobResult {
        reactor: j.index,
        cpu: j.cpu,
        ios,
        errors,
        bytes: ios * spec.io_size as u64,
        elapsed,
        cpu_ns,
        hist,
        ns_per_tick: elapsed.as_nanos() as f64 / (end_tick - start_tick).max(1) as f64,
    })
}

/// The verify pattern of I/O `idx`: 8-byte words naming the I/O and their place in it.
fn verify_fill(buf: &mut [u8], idx: u64) {
    for (k, w) in buf.chunks_exact_mut(8).enumerate() {
        let mut x = idx.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (k as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// Writes the pattern of I/Os `first..first + count` (of `blocks_per_io` blocks of namespace
/// `nsid`) with the job's buffers (`bufs`, all out of the queue), reads them back and
/// compares. Returns the I/Os checked.
fn verify(
    q: &mut IoQueue,
    index: usize,
    nsid: u32,
    blocks_per_io: u32,
    io_size: usize,
    bufs: &mut Vec<Vec<u8>>,
    (first, count): (u64, u64),
) -> anyhow::Result<u64> {
    let mut done: Vec<Completion> = Vec::with_capacity(bufs.len());
    let mut expect = vec![0u8; io_size];
    for read in [false, true] {
        let (mut next, mut in_flight) = (0u64, 0usize);
        while next < count || in_flight > 0 {
            while next < count
                && let Some(mut buf) = bufs.pop()
            {
                let idx = first + next;
                let slba = idx * u64::from(blocks_per_io);
                let cmd = if read {
                    buf.fill(0);
                    IoCommand::Read {
                        nsid,
                        slba,
                        nlb: blocks_per_io,
                    }
                } else {
                    verify_fill(&mut buf, idx);
                    IoCommand::Write {
                        nsid,
                        slba,
                        nlb: blocks_per_io,
                        fua: false,
                    }
                };
                q.submit(cmd, buf, idx)
                    .map_err(|r| anyhow::anyhow!("queue {}: verify submit: {}", index, r.reason))?;
                next += 1;
                in_flight += 1;
            }
            if q.poll(&mut done)? == 0 {
                q.wait(Some(Duration::from_millis(10)))?;
            }
            for c in done.drain(..) {
                in_flight -= 1;
                c.result()
                    .map_err(|e| anyhow::anyhow!("queue {}: verify I/O {}: {e}", index, c.tag))?;
                if read {
                    verify_fill(&mut expect, c.tag);
                    if c.buf != expect {
                        let at = c
                            .buf
                            .iter()
                            .zip(&expect)
                            .position(|(a, b)| a != b)
                            .unwrap_or(0);
                        anyhow::bail!(
                            "queue {}: verify: I/O {} (LBA {}) read back differs from what was written at byte {at}",
                            index,
                            c.tag,
                            c.tag * u64::from(blocks_per_io)
                        );
                    }
                }
                bufs.push(c.buf);
            }
        }
    }
    Ok(count)
}

/// Prints the result as a table, or JSON with the keys of `perf bdev`.
fn report(a: &NvmfArgs, t: &TargetInfo, spec: &JobSpec, r: &RunResult) {
    let mode = if a.job.wait { "wait" } else { "poll" };
    let tr = match a.trtype {
        Trtype::Tcp => "tcp",
        Trtype::Rdma => "rdma",
    };
    let kind = if a.trtype == Trtype::Rdma {
        "nvmf-rdma"
    } else {
        "nvmf"
    };
    let name = format!("{kind}:{}/{}/{}", a.addr, a.nqn, t.nsid);
    if a.job.json {
        let mut v = r.json_summary("reactor_cpu_ns_per_io");
        v.insert("bdev".into(), name.into());
        v.insert("job".into(), serde_json::json!(spec));
        v.insert("reactors".into(), r.json_rows("reactor").into());
        v.insert("mode".into(), mode.into());
        v.insert(
            "target".into(),
            serde_json::json!({
                "trtype": tr, "addr": a.addr.to_string(), "nqn": a.nqn, "nsid": t.nsid, "model": t.model,
                "block_size": t.block_size, "blocks": t.blocks,
                "hdr_digest": t.digests.0, "data_digest": t.digests.1,
                "in_capsule": t.in_capsule, "maxh2cdata": t.maxh2cdata,
            }),
        );
        println!("{}", serde_json::Value::Object(v));
        return;
    }
    println!(
        "perf nvmf {name} mode={mode} pattern={:?} bs={} qd={} mix={} time={}s queues={}",
        spec.pattern,
        spec.io_size,
        spec.qd,
        spec.pattern.read_pct(spec.mix),
        spec.time.as_secs_f64(),
        r.jobs.len()
    );
    println!(
        "target: '{}', {} blocks of {} bytes, digests hdr={} data={}, in-capsule up to {} bytes, MAXH2CDATA {}",
        t.model, t.blocks, t.block_size, t.digests.0, t.digests.1, t.in_capsule, t.maxh2cdata
    );
    let who = if a.job.wait {
        "initiator"
    } else {
        "initiator: polling, so one busy core per queue"
    };
    r.print_table("queue", who);
}
