//! `configs/remote-mirror.toml` as shipped (ports and sockets moved): a `mirror` over two
//! `nvmf` volumes, each served by its own real ferroblk process (a `file` bdev exported over
//! NVMe/TCP), exported over vhost-user-blk.
//!
//! - Without a guest: the daemon starts on the config, copies the second remote from the first,
//!   both children are healthy and reached over their own remote, and a host's writes through
//!   the NVMe/TCP export reach both remotes alike.
//! - With a Linux guest (the QEMU lab, one boot): the guest's virtio-blk runs fio random writes
//!   with `--verify=crc32c` while the ferroblk serving one child is SIGKILLed; the guest sees no
//!   I/O error and the mirror shows the child degraded. The remote is started again and the
//!   child taken back (`mirror_add_child`) while the guest writes: only the dirty regions are
//!   copied, online. fio's verify pass then reads everything back (reads are balanced, so half
//!   of them come from the rebuilt child), and after a clean stop the two remote volumes'
//!   files compare equal.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{BIN, Daemon, free_port, read_request, rpc, start_daemon};
use common::lab::{Lab, vhost_user_blk_args};
use serde_json::Value;

/// Size of each remote volume.
const REMOTE_SIZE: u64 = 96 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The two remotes and the daemon serving the shipped config over them.
struct Setup {
    _tmp: tempfile::TempDir,
    /// The daemon's directory.
    dir: PathBuf,
    /// The remotes' directories (`copy-a`, `copy-b`).
    remote_dirs: [PathBuf; 2],
    remotes: [Arc<Mutex<Daemon>>; 2],
    /// The daemon's NVMe/TCP port (vol0's export).
    io_port: u16,
    /// The remotes' NVMe/TCP ports.
    remote_ports: [u16; 2],
    daemon: Daemon,
}

/// Starts a ferroblk in `dir` exporting a file volume as namespace 1 of
/// `nqn.2026-12.io.ferroblk:NAME` on `port` (the file is kept across restarts).
fn start_remote(dir: &Path, name: &str, port: u16) -> Daemon {
    let cfg = format!(
        "[reactors]\ncount = 1\n\
         [rpc]\nsocket = \"rpc.sock\"\n\
         [[bdev]]\nname = \"disk\"\nkind = \"file\"\npath = \"{name}.img\"\n\
         size = \"{REMOTE_SIZE}\"\ncreate = true\n\
         [[subsystem]]\nnqn = \"nqn.2026-12.io.ferroblk:{name}\"\nallow_any_host = true\n\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"disk\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {port}\n"
    );
    std::fs::write(dir.join("ferroblk.toml"), cfg).unwrap();
    start_daemon(dir)
}

fn vol0(dir: &Path) -> Value {
    let v: Value = serde_json::from_str(&rpc(dir, "bdev_list", r#"{"name":"vol0"}"#)).unwrap();
    v[0].clone()
}

fn child_state(v: &Value, i: usize) -> String {
    v["details"]["children"][i]["state"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

/// Waits (up to 120 s) until both children are healthy, no rebuild runs and `rebuilds`
/// rebuilds have completed; returns `vol0`'s listing.
fn wait_healthy(dir: &Path, rebuilds: u64) -> Value {
    let t = Instant::now();
    loop {
        let v = vol0(dir);
        let d = &v["details"];
        if (0..2).all(|i| child_state(&v, i) == "healthy")
            && d["rebuild"].is_null()
            && d["rebuilds_completed"].as_u64().unwrap_or(0) >= rebuilds
        {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the mirror did not become healthy: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the `nvmf` bdev `name` has its path up.
fn path_up(dir: &Path, name: &str) -> bool {
    let v: Value =
        serde_json::from_str(&rpc(dir, "bdev_list", &format!(r#"{{"name":"{name}"}}"#))).unwrap();
    v[0]["details"]["paths"][0]["state"] == "up"
}

impl Setup {
    fn start() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mirror");
        let remote_dirs = [tmp.path().join("copy-a"), tmp.path().join("copy-b")];
        for d in [&dir, &remote_dirs[0], &remote_dirs[1]] {
            std::fs::create_dir(d).unwrap();
        }
        let (io, pa, pb) = (free_port(), free_port(), free_port());
        let shipped = std::fs::read_to_string(repo().join("configs/remote-mirror.toml")).unwrap();
        let cfg = shipped
            .replace("port = 4430", &format!("port = {io}"))
            .replace("port = 4431 }", &format!("port = {pa} }}"))
            .replace("port = 4432 }", &format!("port = {pb} }}"))
            .replace(
                r#"socket = "run/remote-mirror.sock""#,
                r#"socket = "rpc.sock""#,
            );
        for moved in [
            "port = 4430",
            "port = 4431 }",
            "port = 4432 }",
            "\"run/remote-mirror.sock\"",
        ] {
            assert!(
                shipped.contains(moved) && !cfg.contains(moved),
                "the config has {moved} to move"
            );
        }
        std::fs::write(dir.join("ferroblk.toml"), cfg).unwrap();
        let remotes = [
            Arc::new(Mutex::new(start_remote(&remote_dirs[0], "copy-a", pa))),
            Arc::new(Mutex::new(start_remote(&remote_dirs[1], "copy-b", pb))),
        ];
        let daemon = start_daemon(&dir);
        Setup {
            _tmp: tmp,
            dir,
            remote_dirs,
            remotes,
            io_port: io,
            remote_ports: [pa, pb],
            daemon,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon and both remotes cleanly, then compares the remote volumes' data (the
    /// mirror's `size` bytes at the start of each file).
    fn stop_and_compare(mut self, size: u64) {
        assert!(self.daemon.stop(), "daemon exits cleanly:\n{}", self.log());
        for r in &self.remotes {
            assert!(r.lock().unwrap().stop(), "remote exits cleanly");
        }
        let read = |d: &Path, n: &str| {
            let mut v = Vec::with_capacity(size as usize);
            std::fs::File::open(d.join(format!("{n}.img")))
                .unwrap()
                .take(size)
                .read_to_end(&mut v)
                .unwrap();
            assert_eq!(v.len() as u64, size);
            v
        };
        let a = read(&self.remote_dirs[0], "copy-a");
        let b = read(&self.remote_dirs[1], "copy-b");
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("the two remote volumes differ at byte {at} (of {size})");
        }
        assert!(
            a.iter().any(|&x| x != 0),
            "the volumes hold the written data"
        );
    }
}

#[test]
fn remote_mirror_config_serves_a_mirror_of_two_remote_ferroblks() {
    let s = Setup::start();
    let v = wait_healthy(&s.dir, 1);
    let kids: Vec<&str> = v["details"]["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["far-a", "far-b"], "{v}");
    let size = v["size"].as_u64().unwrap();
    assert!(size > REMOTE_SIZE - (1 << 20) && size < REMOTE_SIZE, "{v}");
    assert!(path_up(&s.dir, "far-a") && path_up(&s.dir, "far-b"));
    assert_eq!(
        v["users"].as_array().map(Vec::len),
        Some(2),
        "vhost and nvmf: {v}"
    );
    assert!(s.dir.join("run/remote-mirror-vol0.sock").exists());
    // A host writes through the NVMe/TCP export; both remotes take every write.
    let perf = Command::new(BIN)
        .args([
            "perf",
            "nvmf",
            "--addr",
            &format!("127.0.0.1:{}", s.io_port),
        ])
        .args([
            "--nqn",
            "nqn.2026-12.io.ferroblk:remote-mirror",
            "--rw",
            "randwrite",
        ])
        .args(["--qd", "8", "--time", "2", "--json"])
        .output()
        .unwrap();
    let j: Value = serde_json::from_slice(&perf.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&perf.stderr)));
    assert_eq!(j["errors"], 0, "{j}");
    assert!(j["ios"].as_u64().unwrap() > 0, "{j}");
    s.stop_and_compare(size);
}

const GUEST: &str = r#"#!/bin/bash
set -euxo pipefail
say() {
  exec 3<>/dev/tcp/10.0.2.2/__PORT__
  echo "$1" >&3
  read -r -t 600 reply <&3
  exec 3>&-
  echo "host answered: $reply"
  [ "${reply%% *}" = ok ]
}
[ -b /dev/vda ]
W="--ioengine=libaio --direct=1 --filename=/dev/vda --bs=4k --iodepth=16 --verify=crc32c --verify_fatal=1"
# Phase 1: the host SIGKILLs the remote of far-b once vol0 has taken some of these writes.
say kill
fio --name=one $W --rw=randwrite --offset=0 --size=32M
# far-b is degraded; its remote is started again.
say back
# Phase 2: far-b is taken back and rebuilt while these writes go on.
fio --name=two $W --rw=randwrite --offset=64M --size=28M &
fio2=$!
say add
wait $fio2
# Everything both phases wrote, read back through the mirror (reads alternate between the
# children: half of them come from the rebuilt one).
fio --name=one $W --rw=randwrite --offset=0 --size=32M --verify_only
fio --name=two $W --rw=randwrite --offset=64M --size=28M --verify_only
if dmesg | grep -E "I/O error|virtio.*broken|blk_update_request"; then
  echo "the guest kernel saw an I/O error"
  exit 1
fi
say done
echo GUEST-ALL-OK
"#;

fn writes(dir: &Path) -> u64 {
    vol0(dir)["stats"]["ops"]["write"].as_u64().unwrap()
}

/// Waits up to 300 s for vol0 to take `n` more writes than it had.
fn wait_writes(dir: &Path, n: u64) -> u64 {
    let start = writes(dir);
    let t = Instant::now();
    while writes(dir) < start + n && t.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    writes(dir) - start
}

/// The host's side of the guest's requests; every answer starts with `ok` or `error`:
/// - `kill`: answers, then SIGKILLs far-b's remote once vol0 took 500 more writes;
/// - `back`: checks far-b degraded (its held I/O failed after `ctrl_loss_tmo`) and far-a
///   healthy, starts far-b's remote again and waits for far-b's path to reconnect;
/// - `add`: once the guest writes again, takes far-b back (`mirror_add_child`) and waits for
///   the rebuild to end, checking that the guest's writes went on meanwhile and that only the
///   regions written while far-b was away were copied;
/// - `done`: answers and stops.
fn serve_guest(
    listener: TcpListener,
    dir: PathBuf,
    remote_b: Arc<Mutex<Daemon>>,
    remote_b_dir: PathBuf,
    remote_b_port: u16,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming() {
            let Some((mut s, what)) = read_request(stream) else {
                continue;
            };
            let answer = match what.as_str() {
                "kill" => {
                    let _ = writeln!(s, "ok killing soon");
                    drop(s);
                    let n = wait_writes(&dir, 500);
                    let mut d = remote_b.lock().unwrap();
                    d.kill().unwrap();
                    d.wait().unwrap();
                    seen.push(format!("kill: far-b's remote killed after {n} writes"));
                    continue;
                }
                "back" => {
                    let t = Instant::now();
                    while child_state(&vol0(&dir), 1) != "degraded"
                        && t.elapsed() < Duration::from_secs(60)
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let v = vol0(&dir);
                    if child_state(&v, 1) != "degraded" || child_state(&v, 0) != "healthy" {
                        format!("error far-b is not degraded: {v}")
                    } else {
                        seen.push(format!(
                            "far-b degraded, {} dirty regions",
                            v["details"]["dirty_regions"]
                        ));
                        *remote_b.lock().unwrap() =
                            start_remote(&remote_b_dir, "copy-b", remote_b_port);
                        let t = Instant::now();
                        while !path_up(&dir, "far-b") && t.elapsed() < Duration::from_secs(60) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if path_up(&dir, "far-b") {
                            "ok far-b's remote is back".to_string()
                        } else {
                            "error far-b did not reconnect".to_string()
                        }
                    }
                }
                "add" => {
                    wait_writes(&dir, 200);
                    let v = vol0(&dir);
                    let copied0 = v["details"]["regions_copied"].as_u64().unwrap();
                    let dirty = v["details"]["dirty_regions"].as_u64().unwrap();
                    let at_add = writes(&dir);
                    rpc(
                        &dir,
                        "mirror_add_child",
                        r#"{"name":"vol0","child":"far-b"}"#,
                    );
                    let v = wait_healthy(&dir, 2);
                    let during = v["stats"]["ops"]["write"].as_u64().unwrap() - at_add;
                    let copied = v["details"]["regions_copied"].as_u64().unwrap() - copied0;
                    let regions = v["details"]["regions"].as_u64().unwrap();
                    seen.push(format!(
                        "add: {dirty} dirty regions at add, {copied} of {regions} copied, \
                         {during} guest writes meanwhile"
                    ));
                    // Phase 1 touched regions 0..32 (all dirty at add), phase 2 regions 64..92.
                    if !(dirty..=32 + 28).contains(&copied) || dirty < 32 {
                        format!("error {copied} of {regions} regions resynced: {v}")
                    } else if during == 0 {
                        format!("error the guest's writes stopped during the rebuild: {v}")
                    } else {
                        "ok rebuilt".to_string()
                    }
                }
                "done" => "ok bye".to_string(),
                _ => "error unknown request".to_string(),
            };
            let _ = writeln!(s, "{answer}");
            seen.push(format!("{what}: {answer}"));
            if what == "done" {
                return seen;
            }
        }
        seen
    })
}

#[test]
fn a_guest_rides_through_losing_one_remote_mirror_child_and_it_is_resynced() {
    let lab =
        Lab::prepare().unwrap_or_else(|e| panic!("the guest lab could not be prepared: {e:#}"));
    let s = Setup::start();
    let v = wait_healthy(&s.dir, 1);
    let size = v["size"].as_u64().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = serve_guest(
        listener,
        s.dir.clone(),
        s.remotes[1].clone(),
        s.remote_dirs[1].clone(),
        s.remote_ports[1],
    );
    let extra = vhost_user_blk_args("m0", &s.dir.join("run/remote-mirror-vol0.sock"), 2);
    let script = GUEST.replace("__PORT__", &port.to_string());
    let out = lab.run(&script, &extra, Duration::from_secs(1200)).unwrap();
    let ok = out.success() && out.output.contains("GUEST-ALL-OK");
    let seen = if ok { host.join().unwrap() } else { Vec::new() };
    assert!(
        ok,
        "the guest must see no error while one remote mirror child is killed and rebuilt \
         (status {}):\n{}\n--- daemon log ---\n{}",
        out.status,
        out.output,
        s.log()
    );
    eprintln!("host side: {seen:#?}");
    assert!(seen.iter().any(|e| e.starts_with("kill: ")), "{seen:?}");
    assert!(seen.iter().any(|e| e == "add: ok rebuilt"), "{seen:?}");
    let v = vol0(&s.dir);
    assert_eq!(v["details"]["dirty_regions"], 0, "{v}");
    assert_eq!(v["stats"]["errors"].as_u64().unwrap_or(0), 0, "{v}");
    s.stop_and_compare(size);
}
