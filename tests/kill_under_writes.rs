//! The contract of every stacked bdev kind: a write the daemon acknowledged survives a SIGKILL
//! of the daemon (the kernel keeps what reached a file's page cache), with no flush from the
//! client. A daemon crash is invisible to a live client, which keeps its own cache and will
//! never rewrite those blocks, so it is not a power loss: "durable only at flush" is not enough.
//!
//! `ferroblk serve` runs as a child exporting one volume (`kind` over a file) over NVMe/TCP.
//! This test is the client: 4 KiB writes of unique content at random blocks, 16 in flight, never
//! a flush. After a random number of acknowledged writes it kills the daemon with SIGKILL while
//! writes are still in flight, starts it again on the same image, reconnects and reads back
//! every block that had an acknowledged write: it must hold the last acknowledged write or one
//! of the writes that were in flight when the daemon died (old or new, as on any crash). The
//! image carries over from one kill to the next.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port, start_daemon};
use ferroblk_target::initiator::{
    Completion, ConnectOptions, Controller, IoCommand, IoQueue, IoQueueOptions,
};

const NQN: &str = "nqn.2026-11.io.ferroblk:kill";
const BS: usize = 4096;
/// Blocks the client writes to (16 MiB): small enough that blocks are rewritten across kills.
const BLOCKS: u64 = 4096;
const QD: usize = 16;
const KILLS: u32 = 4;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The content of write `seed` at block `lba`: a random head (its length depends on the seed,
/// so that `compress` sees incompressible, 2:1 and highly compressible chunks) and a filler.
fn content(seed: u64, lba: u64, out: &mut [u8]) {
    let random = match splitmix(seed) % 4 {
        0 => BS,
        1 | 2 => 1900,
        _ => 200,
    };
    let mut x = splitmix(seed ^ lba.wrapping_mul(0x2545_F491_4F6C_DD1D));
    for w in out[..random].chunks_mut(8) {
        x = splitmix(x);
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    out[random..].fill(seed as u8 | 1);
    // The seed itself, so that a mismatch says which write is there.
    out[..8].copy_from_slice(&seed.to_le_bytes());
}

/// The daemon's configuration: `vol` (declared by `stacked`) over file `disk`, exported as
/// namespace 1.
fn config(dir: &Path, port: u16, stacked: &str) -> String {
    format!(
        r#"
[reactors]
count = 1
[rpc]
socket = "{dir}/rpc.sock"
[[bdev]]
name = "disk"
kind = "file"
path = "{dir}/disk.img"
size = "64MiB"
create = true
{stacked}
[[subsystem]]
nqn = "{NQN}"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "vol"
[[listener]]
addr = "127.0.0.1"
port = {port}
"#,
        dir = dir.display()
    )
}

/// What each block may hold: the last acknowledged write and the writes after it whose fate is
/// unknown (in flight when the daemon died).
#[derive(Default)]
struct Block {
    acked: Option<u64>,
    unknown: Vec<u64>,
}

fn connect(addr: SocketAddr) -> (Controller, IoQueue) {
    let t = Instant::now();
    loop {
        match Controller::connect(&ConnectOptions::new(addr, NQN)) {
            Ok(ctrl) => {
                ctrl.set_number_of_queues(1).expect("Set Features queues");
                let q = ctrl
                    .connect_io_queue(
                        1,
                        &IoQueueOptions {
                            depth: QD as u16 + 1,
                            max_data: BS,
                            disable_sq_flow_control: false,
                        },
                    )
                    .expect("connect the I/O queue");
                return (ctrl, q);
            }
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect to the restarted daemon: {e}"),
        }
    }
}

/// Writes until `target` writes are acknowledged, then kills the daemon with writes in flight
/// and records what every write's fate is.
fn write_then_kill(
    daemon: &mut Daemon,
    q: &mut IoQueue,
    blocks: &mut HashMap<u64, Block>,
    rng: &mut u64,
    target: u64,
    next_seed: &mut u64,
) {
    let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new(); // tag -> (lba, seed)
    let mut busy = std::collections::HashSet::new();
    let mut done: Vec<Completion> = Vec::with_capacity(QD);
    let mut acked = 0u64;
    let mut tag = 0u64;
    let mut killed = false;
    loop {
        while !killed && in_flight.len() < QD {
            *rng = splitmix(*rng);
            let lba = *rng % BLOCKS;
            if !busy.insert(lba) {
                continue;
            }
            *next_seed += 1;
            let seed = *next_seed;
            let mut buf = vec![0u8; BS];
            content(seed, lba, &mut buf);
            let cmd = IoCommand::Write {
                nsid: 1,
                slba: lba,
                nlb: 1,
                fua: false,
            };
            q.submit(cmd, buf, tag)
                .unwrap_or_else(|r| panic!("submit: {}", r.reason));
            in_flight.insert(tag, (lba, seed));
            tag += 1;
        }
        let r = q.poll(&mut done);
        for c in done.drain(..) {
            let (lba, seed) = in_flight.remove(&c.tag).expect("a tag in flight");
            busy.remove(&lba);
            let b = blocks.entry(lba).or_default();
            match c.result() {
                Ok(_) => {
                    b.acked = Some(seed);
                    b.unknown.clear();
                    acked += 1;
                }
                // Lost with the connection: it may or may not have reached the volume.
                Err(_) if killed => b.unknown.push(seed),
                Err(e) => panic!("write at {lba} failed before the kill: {e}"),
            }
        }
        if killed && (r.is_err() || in_flight.is_empty()) {
            assert!(
                in_flight.is_empty(),
                "a lost connection returns every command"
            );
            return;
        }
        if !killed && acked >= target {
            daemon.kill().unwrap();
            daemon.wait().unwrap();
            killed = true;
        }
        if r.is_ok() && done.is_empty() {
            let _ = q.wait(Some(Duration::from_millis(5)));
        }
    }
}

/// Reads every block with an acknowledged write and checks it against what it may hold.
fn verify(q: &mut IoQueue, blocks: &mut HashMap<u64, Block>, kill: u32, kind: &str) {
    let mut want = vec![0u8; BS];
    let mut lost = Vec::new();
    let mut buf = vec![0u8; BS];
    let mut torn = Vec::new();
    for (&lba, b) in blocks.iter_mut() {
        if let Err(e) = q.read(1, lba, 1, &mut buf) {
            // A write in flight at the kill may have left a block and its metadata (crc's
            // CRC32C, crypt_gcm's tag) of different versions: the read fails its integrity
            // check. That is the fate of an unacknowledged write, not a lost acknowledged one;
            // but a block whose last write was acknowledged must read.
            assert!(
                !b.unknown.is_empty(),
                "{kind}, kill {kill}: read {lba} (last write acknowledged, seed {:?}): {e}",
                b.acked
            );
            torn.push(lba);
            continue;
        }
        let allowed = b.acked.iter().chain(b.unknown.iter()).copied();
        let hit = allowed.into_iter().find(|&seed| {
            content(seed, lba, &mut want);
            want == buf
        });
        match (hit, b.acked) {
            (Some(seed), _) => {
                b.acked = Some(seed);
                b.unknown.clear();
            }
            // Only writes of unknown fate, none of them there: the block keeps older data.
            (None, None) => b.unknown.clear(),
            (None, Some(seed)) => {
                lost.push((lba, seed, u64::from_le_bytes(buf[..8].try_into().unwrap())))
            }
        }
    }
    if !torn.is_empty() {
        eprintln!(
            "{kind}, kill {kill}: {} blocks with a write in flight at the kill fail reads",
            torn.len()
        );
    }
    // They hold nothing known until written again.
    for lba in torn {
        blocks.remove(&lba);
    }
    assert!(
        lost.is_empty(),
        "{kind}, kill {kill}: {} of {} blocks lost an acknowledged write \
         (block, acknowledged seed, seed found; 0 is zeroes): {:?}",
        lost.len(),
        blocks.values().filter(|b| b.acked.is_some()).count(),
        &lost[..lost.len().min(8)]
    );
}

/// Runs the kill-under-writes check on `vol` declared by `stacked`.
fn kill_under_writes(kind: &str, stacked: &str) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(
        dir.path().join("ferroblk.toml"),
        config(dir.path(), port, stacked),
    )
    .unwrap();
    let mut daemon = start_daemon(dir.path());
    let mut blocks: HashMap<u64, Block> = HashMap::new();
    let mut rng = splitmix(kind.len() as u64 ^ 0x6B11);
    let mut next_seed = u64::from(kind.as_bytes()[kind.len() - 1]) << 40;
    // `FERROBLK_KILLS` runs more kills, to look for rare races.
    let kills: u32 = std::env::var("FERROBLK_KILLS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(KILLS);
    for kill in 0..kills {
        let (ctrl, mut q) = connect(addr);
        rng = splitmix(rng);
        let target = 500 + rng % 1500;
        write_then_kill(
            &mut daemon,
            &mut q,
            &mut blocks,
            &mut rng,
            target,
            &mut next_seed,
        );
        drop(q);
        drop(ctrl);
        daemon = start_daemon(dir.path());
        let (ctrl, mut q) = connect(addr);
        verify(&mut q, &mut blocks, kill, kind);
        drop(q);
        drop(ctrl);
    }
    assert!(daemon.stop(), "the daemon stops cleanly");
}

#[test]
fn compress_keeps_acknowledged_writes_across_sigkill() {
    kill_under_writes(
        "compress",
        r#"[[bdev]]
name = "vol"
kind = "compress"
base = "disk"
size = "64MiB"
"#,
    );
}

#[test]
fn crc_keeps_acknowledged_writes_across_sigkill() {
    kill_under_writes(
        "crc",
        r#"[[bdev]]
name = "vol"
kind = "crc"
base = "disk"
"#,
    );
}

#[test]
fn crypt_gcm_keeps_acknowledged_writes_across_sigkill() {
    kill_under_writes(
        "crypt_gcm",
        &format!(
            r#"[[bdev]]
name = "vol"
kind = "crypt_gcm"
base = "disk"
key_hex = "{}"
"#,
            "00112233445566778899aabbccddeeff".repeat(2)
        ),
    );
}

#[test]
fn crypt_xts_keeps_acknowledged_writes_across_sigkill() {
    kill_under_writes(
        "crypt_xts",
        &format!(
            r#"[[bdev]]
name = "vol"
kind = "crypt_xts"
base = "disk"
key_hex = "{}"
"#,
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0".repeat(2)
                + &"00112233445566778899aabbccddeeff".repeat(2)
        ),
    );
}
