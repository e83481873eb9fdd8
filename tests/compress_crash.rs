//! Crash consistency of the `compress` bdev: a child process (this test binary, re-executed with
//! `FERROBLK_CRASH_CHILD` set) writes, unmaps and flushes random ranges of a compress bdev on a
//! file, with several requests and a flush in flight at once, logging each request before it
//! is submitted, each completion, and each completed flush (fsync'd). The parent kills it with
//! SIGKILL at a random moment, reopens the volume in-process, checks the allocator against the
//! map (`check_consistency`) and checks every block against what the log allows:
//! - a write whose completion was logged (acknowledged; flushed or not: a killed process is not
//!   a power loss, the kernel keeps what reached the file) must be there, unless a later write
//!   of the same block may have landed;
//! - a write in flight at the kill may or may not be there (whole blocks: old or new).
//!
//! Requests in flight at once never overlap, so the log's order is the order of the writes of
//! every block. The volume carries over from one kill to the next.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroblk_bdev::compress::{Algorithm, CompressBdev, CompressOptions};
use ferroblk_bdev::file::{DirectMode, FileBdev, FileOptions};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::uring::ThreadRing;
use ferroblk_bdev::{AlignedBuf, Bdev, BlockSize, IoRequest, IoStatus, IoType, SgList};

const CHILD_ENV: &str = "FERROBLK_CRASH_CHILD";
const BS: usize = 4096;
/// Logical size: 512 blocks, 128 chunks of 16 KiB.
const LOGICAL: u64 = 2 << 20;
const LOGICAL_BLOCKS: u64 = LOGICAL / BS as u64;
/// Base: as many blocks as the logical size (the data compresses to well under that).
const BASE_BLOCKS: u64 = 512;
const KILLS: u32 = 300;

const QD: usize = 8;
const FLUSH_TAG: u64 = 1 << 62;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The content of block `lba` as written by a write with `seed` (0: zeroes). The seed's class
/// sets the compressibility: incompressible, about 2:1, about 20:1, or zeroes.
fn content(seed: u64, lba: u64, out: &mut [u8]) {
    out.fill(0);
    if seed == 0 {
        return;
    }
    let random = match splitmix(seed) % 10 {
        0 | 1 => BS,
        2..=6 => 1900,
        7 | 8 => 200,
        _ => return,
    };
    let mut x = splitmix(seed ^ lba.wrapping_mul(0x2545_F491_4F6C_DD1D));
    for w in out[..random].chunks_mut(8) {
        x = splitmix(x);
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    out[random..].fill(seed as u8 | 1);
}

fn options(algorithm: Algorithm) -> CompressOptions {
    let mut o = CompressOptions::new(LOGICAL);
    o.algorithm = algorithm;
    o
}

fn open(image: &Path, algorithm: Algorithm) -> CompressBdev {
    let o = FileOptions {
        path: image.to_path_buf(),
        block_size: BlockSize::B4096,
        size: Some(BASE_BLOCKS * BS as u64),
        create: true,
        direct: DirectMode::Auto,
        read_only: false,
    };
    // A killed process's io_uring is torn down asynchronously by the kernel, and holds the
    // image's file (and its lock) until then: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(10);
    let f = loop {
        match FileBdev::open("f", &o) {
            Ok(f) => break f,
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("open the image: {e}"),
        }
    };
    CompressBdev::open("z", Arc::new(f), &options(algorithm)).expect("open the compress volume")
}

/// One logged request.
struct Logged {
    lba: u64,
    n: u64,
    /// 0 for unmap, write-zeroes and zero writes.
    seed: u64,
}

/// The child: writes until killed.
fn child(dir: &Path) {
    let iteration: u64 = std::env::var("FERROBLK_CRASH_ITER")
        .unwrap()
        .parse()
        .unwrap();
    let algorithm = if iteration % 3 == 2 {
        Algorithm::Zstd
    } else {
        Algorithm::Lz4
    };
    let z = open(&dir.join("z.img"), algorithm);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("log.{iteration}")))
        .unwrap();
    // Two channels, as two reactors would have, sharing the map and its log: requests
    // alternate between them.
    let mut chs = [z.open_channel().unwrap(), z.open_channel().unwrap()];
    let ring = ThreadRing::current().unwrap();
    let mut rng = splitmix(iteration ^ 0xC0FF_EE00);
    let mut next = move || {
        rng = splitmix(rng);
        rng
    };
    let mut in_flight: Vec<(u64, u64, u64)> = Vec::new(); // (id, lba, n)
    let mut flush: Option<u64> = None;
    let (mut next_id, mut completed) = (0u64, 0u64);
    let mut done = Vec::new();
    let mut buf = vec![0u8; BS];
    loop {
        while in_flight.len() < QD {
            let lba = next() % LOGICAL_BLOCKS;
            let n = (1 + next() % 12).min(LOGICAL_BLOCKS - lba);
            if in_flight
                .iter()
                .any(|&(_, l, k)| lba < l + k && l < lba + n)
            {
                break;
            }
            let id = next_id;
            let (io, kind, seed) = match next() % 10 {
                0 => (IoRequest::no_data(IoType::Unmap, lba, n as u32, id), 'u', 0),
                1 => (
                    IoRequest::no_data(IoType::WriteZeroes, lba, n as u32, id),
                    'z',
                    0,
                ),
                _ => {
                    let seed = (iteration << 32 | id) | 1 << 63;
                    let mut data = AlignedBuf::new(n as usize * BS);
                    for (i, b) in data.as_mut_slice().chunks_mut(BS).enumerate() {
                        content(seed, lba + i as u64, &mut buf);
                        b.copy_from_slice(&buf);
                    }
                    let seed = if splitmix(seed) % 10 == 9 { 0 } else { seed };
                    (
                        IoRequest::write(lba, n as u32, SgList::from_buf(data), id),
                        'w',
                        seed,
                    )
                }
            };
            // Logged before it is submitted: the parent must know of every write that may land.
            log.write_all(format!("W {id} {lba} {n} {kind} {seed}\n").as_bytes())
                .unwrap();
            if let Err(io) = chs[(id % 2) as usize].submit(io) {
                drop(io);
                log.write_all(format!("X {id}\n").as_bytes()).unwrap();
                next_id += 1;
                break;
            }
            next_id += 1;
            in_flight.push((id, lba, n));
        }
        if flush.is_none() && next() % 8 == 0 {
            // Covers every write whose completion was logged so far.
            if chs[0]
                .submit(IoRequest::no_data(IoType::Flush, 0, 0, FLUSH_TAG))
                .is_ok()
            {
                flush = Some(completed);
            }
        }
        let polled = chs[0].poll(&mut done) + chs[1].poll(&mut done);
        if polled == 0 {
            ring.wait(Some(Duration::from_millis(1)));
        }
        for c in done.drain(..) {
            if c.tag == FLUSH_TAG {
                assert_eq!(c.status, IoStatus::Success, "flush");
                log.write_all(format!("F {}\n", flush.take().unwrap()).as_bytes())
                    .unwrap();
                log.sync_all().unwrap();
                continue;
            }
            assert_eq!(c.status, IoStatus::Success, "request {}", c.tag);
            in_flight.retain(|&(id, _, _)| id != c.tag);
            log.write_all(format!("C {}\n", c.tag).as_bytes()).unwrap();
            completed += 1;
        }
    }
}

/// What the log of one child run allows, applied to `model` (per block, the seeds it may hold).
fn apply_log(
    text: &str,
    model: &mut [Vec<u64>],
    history: &mut [Vec<(u64, u32, u64, bool)>],
    iteration: u32,
) -> (usize, usize) {
    let mut requests: Vec<Option<Logged>> = Vec::new();
    let mut completions: Vec<usize> = Vec::new();
    let mut durable_count = 0usize;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        match (f[0], num(1)) {
            ("W", Some(id)) if f.len() == 6 => {
                assert_eq!(id as usize, requests.len(), "ids in order");
                requests.push(Some(Logged {
                    lba: num(2).unwrap(),
                    n: num(3).unwrap(),
                    seed: num(5).unwrap(),
                }));
            }
            ("X", Some(id)) => requests[id as usize] = None,
            ("C", Some(id)) => completions.push(id as usize),
            ("F", Some(count)) => durable_count = count as usize,
            // Nothing else is written; a line cut by the kill would land here.
            _ => {}
        }
    }
    let durable = durable_count.min(completions.len());
    let acked: HashSet<usize> = completions.iter().copied().collect();
    for (id, r) in requests.iter().enumerate() {
        let Some(r) = r else { continue };
        for lba in r.lba..r.lba + r.n {
            history[lba as usize].push((r.seed, iteration, id as u64, acked.contains(&id)));
            let set = &mut model[lba as usize];
            if acked.contains(&id) {
                set.clear();
                set.push(r.seed);
            } else if !set.contains(&r.seed) {
                set.push(r.seed);
            }
        }
    }
    (requests.len(), durable)
}

/// Checks every block against the model and narrows the model to what is there.
fn verify(
    z: &CompressBdev,
    model: &mut [Vec<u64>],
    history: &[Vec<(u64, u32, u64, bool)>],
    iteration: u32,
) {
    let c = z
        .check_consistency()
        .unwrap_or_else(|e| panic!("kill {iteration}: inconsistent after reopen: {e}"));
    assert_eq!(c.pending_blocks + c.in_flight_blocks, 0);
    let mut ch = SyncChannel::new(z.open_channel().unwrap());
    let mut want = vec![0u8; BS];
    for first in (0..LOGICAL_BLOCKS).step_by(64) {
        let (st, data) = ch.read(first, 64);
        assert_eq!(st, IoStatus::Success, "kill {iteration}: read at {first}");
        for (i, got) in data.chunks(BS).enumerate() {
            let lba = first + i as u64;
            let set = &mut model[lba as usize];
            let hit = set.iter().copied().find(|&seed| {
                content(seed, lba, &mut want);
                want == got
            });
            match hit {
                Some(seed) => {
                    set.clear();
                    set.push(seed);
                }
                None => {
                    // Which write of this block's history (seed, kill, id, acknowledged), if any, or of
                    // another block's, the data is.
                    let zeroes = got.iter().all(|&b| b == 0);
                    let own = &history[lba as usize];
                    let matches: Vec<_> = own
                        .iter()
                        .filter(|h| {
                            content(h.0, lba, &mut want);
                            want == got
                        })
                        .collect();
                    let mut elsewhere = Vec::new();
                    for (other, writes) in history.iter().enumerate() {
                        for h in writes {
                            content(h.0, other as u64, &mut want);
                            if h.0 != 0 && want == got {
                                elsewhere.push((other, h));
                            }
                        }
                    }
                    panic!(
                        "kill {iteration}: block {lba} holds none of the allowed writes {set:x?}; \
                         zeroes: {zeroes}, matches its writes {matches:x?}, another block's \
                         writes {elsewhere:x?}; its last writes {:x?}",
                        &own[own.len().saturating_sub(8)..]
                    )
                }
            }
        }
    }
}

#[test]
fn crash_child() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&PathBuf::from(dir));
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_and_the_allocator_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("z.img");
    drop(open(&image, Algorithm::Lz4));
    let exe = std::env::current_exe().unwrap();
    let mut model: Vec<Vec<u64>> = vec![vec![0]; LOGICAL_BLOCKS as usize];
    // Every write each block ever had (seed, kill, request id, acknowledged), to say what
    // a block that fails holds. `FERROBLK_CRASH_KILLS` runs more kills, to look for rare races.
    let mut history: Vec<Vec<(u64, u32, u64, bool)>> = vec![Vec::new(); LOGICAL_BLOCKS as usize];
    let kills: u32 = std::env::var("FERROBLK_CRASH_KILLS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(KILLS);
    let mut rng = 0x5EED_u64;
    let (mut requests, mut durable) = (0usize, 0usize);
    let start = Instant::now();
    for iteration in 0..kills {
        let log = dir.path().join(format!("log.{iteration}"));
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("FERROBLK_CRASH_ITER", iteration.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the first logged request, then let it run for a random while.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&log).map_or(0, |m| m.len()) == 0 {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("kill {iteration}: the child exited ({status}) before writing: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "kill {iteration}: the child did not start"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        rng = splitmix(rng);
        std::thread::sleep(Duration::from_micros(rng % 50_000));
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("kill {iteration}: the child exited by itself ({status}): {err}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let (r, d) = apply_log(&text, &mut model, &mut history, iteration);
        requests += r;
        durable += d;
        let z = open(&image, Algorithm::Lz4);
        verify(&z, &mut model, &history, iteration);
        if iteration % 50 == 0 {
            let mut out = std::io::stderr();
            let _ = writeln!(out, "kill {iteration}: {}", z.describe());
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "{kills} kills in {:.1} s: {requests} requests logged, {durable} covered by a flush",
        start.elapsed().as_secs_f64()
    );
    assert!(durable > kills as usize, "the runs flushed something");
}
