//! The `nvmf` bdev against a second, real ferroblk process as its remote: the conformance
//! suite; the ferroblk process of one path SIGKILLed and restarted under verified write load,
//! and paths cut (or gone silent) under such load (failover and round robin): no error
//! reaches the caller, no acknowledged write is lost, a lost path reconnects; a remote killed
//! for good
//! (held I/O fails after `ctrl_loss_tmo`, never hangs); a remote resize reaching the bdev's
//! listeners, by the Namespace Attribute Changed event (no Identify polling); ANA states of
//! the remote's listeners steering I/O, flipped over the RPC under verified load (the ANA
//! Change event re-steers; nothing lost), an inaccessible-only remote holding I/O until a path
//! is accessible again or `ctrl_loss_tmo` fails it; a remote that refuses us (an error naming
//! the field); and an `nvmf` bdev in a daemon, exported again over NVMe/TCP. A path is cut by a TCP
//! relay in this test process between the bdev and the remote's listener: closing the relay's
//! connections and its listening socket is, for the bdev, exactly a network path that fails
//! (the remote target behind it stays the real daemon).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port, rpc, start_daemon};
use ferroblk_bdev::conformance::{self, pattern};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{AlignedBuf, Bdev, BdevEvent, IoRequest, IoStatus, SgList};
use ferroblk_target::initiator::{ConnectOptions, Controller, IoQueue, IoQueueOptions};
use ferroblk_target::remote::{NvmfBdev, NvmfDecl, PathDecl, Policy};

const NQN: &str = "nqn.2026-12.io.ferroblk:remote";

/// Starts a ferroblk exporting a malloc bdev `ram` of `size` as namespace 1 of [`NQN`] on a
/// free port (hosts: any, or only `host`); returns it and its port.
fn remote(dir: &Path, size: &str, host: Option<&str>) -> (Daemon, u16) {
    remote_bs(dir, size, 4096, host)
}

/// [`remote`] with a block size.
fn remote_bs(dir: &Path, size: &str, block_size: u32, host: Option<&str>) -> (Daemon, u16) {
    let port = free_port();
    let hosts = match host {
        Some(h) => format!("hosts = [\"{h}\"]\n"),
        None => "allow_any_host = true\n".into(),
    };
    let cfg = format!(
        "[reactors]\ncount = 1\n\
         [rpc]\nsocket = \"rpc.sock\"\n\
         [[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"{size}\"\nblock_size = {block_size}\n\
         [[subsystem]]\nnqn = \"{NQN}\"\n{hosts}\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"ram\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {port}\n"
    );
    std::fs::write(dir.join("ferroblk.toml"), cfg).unwrap();
    (start_daemon(dir), port)
}

fn decl(name: &str, ports: &[u16]) -> NvmfDecl {
    NvmfDecl {
        name: name.into(),
        subnqn: NQN.into(),
        nsid: None,
        paths: ports
            .iter()
            .map(|&port| PathDecl {
                addr: "127.0.0.1".into(),
                port,
                trtype: Default::default(),
            })
            .collect(),
        policy: Policy::Failover,
        hostnqn: None,
        ctrl_loss_tmo: 30.0,
        reconnect_delay: 0.1,
        io_queues: 8,
        queue_depth: 64,
        hdr_digest: false,
        data_digest: false,
    }
}

#[test]
fn nvmf_bdev_passes_the_conformance_suite_against_a_second_ferroblk() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = remote(dir.path(), "64MiB", None);
    let d = decl("remote0", &[port]);
    let open = || -> Arc<dyn Bdev> { Arc::new(NvmfBdev::connect(&d).unwrap()) };
    conformance::run(&open, true);
    // The same with digests on, through two paths taken in turn.
    let mut d2 = decl("remote1", &[port, port]);
    d2.policy = Policy::RoundRobin;
    d2.hdr_digest = true;
    d2.data_digest = true;
    let open2 = || -> Arc<dyn Bdev> { Arc::new(NvmfBdev::connect(&d2).unwrap()) };
    conformance::run(&open2, false);
}

#[test]
fn a_remote_that_refuses_us_is_an_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = "nqn.2026-12.io.ferroblk:host-allowed";
    let (_d, port) = remote(dir.path(), "16MiB", Some(allowed));
    let err = |d: &NvmfDecl| {
        NvmfBdev::connect(d)
            .err()
            .expect("connect must fail")
            .field()
            .map(str::to_string)
    };
    // Not on the allow-list.
    let mut d = decl("r", &[port]);
    d.hostnqn = Some("nqn.2026-12.io.ferroblk:host-other".into());
    assert_eq!(err(&d).as_deref(), Some("hostnqn"));
    // Allowed, but no such subsystem.
    let mut d = decl("r", &[port]);
    d.hostnqn = Some(allowed.into());
    d.subnqn = "nqn.2026-12.io.ferroblk:nothing-here".into();
    assert_eq!(err(&d).as_deref(), Some("subnqn"));
    // No such namespace.
    let mut d = decl("r", &[port]);
    d.hostnqn = Some(allowed.into());
    d.nsid = Some(7);
    assert_eq!(err(&d).as_deref(), Some("nsid"));
    // Nothing listens.
    let d = decl("r", &[free_port()]);
    assert_eq!(err(&d).as_deref(), Some("paths"));
    // Checked before any connection.
    let mut d = decl("r", &[port]);
    d.paths[0].addr = "localhost".into();
    assert_eq!(err(&d).as_deref(), Some("paths[0].addr"));
    let mut d = decl("r", &[port]);
    d.paths.clear();
    assert_eq!(err(&d).as_deref(), Some("paths"));
    let mut d = decl("r", &[port]);
    d.ctrl_loss_tmo = -1.0;
    assert_eq!(err(&d).as_deref(), Some("ctrl_loss_tmo"));
    // And the allowed host connects.
    let mut d = decl("r", &[port]);
    d.hostnqn = Some(allowed.into());
    NvmfBdev::connect(&d).unwrap();
}

/// A TCP relay from a loopback port to `target`; [`Relay::cut`] closes its listening socket
/// and every connection through it.
struct Relay {
    port: u16,
    /// Bytes relayed from the bdev to the remote.
    sent: Arc<AtomicU64>,
    /// Set: nothing more is relayed, connections stay open (a remote that stopped answering).
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(port: u16, target: SocketAddr) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let frozen = Arc::new(AtomicBool::new(false));
        let (stop2, conns2, sent2) = (stop.clone(), conns.clone(), sent.clone());
        let frozen2 = frozen.clone();
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                let Ok((a, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                a.set_nonblocking(false).unwrap();
                let Ok(b) = TcpStream::connect(target) else {
                    continue;
                };
                a.set_nodelay(true).unwrap();
                b.set_nodelay(true).unwrap();
                let mut c = conns2.lock().unwrap();
                c.push(a.try_clone().unwrap());
                c.push(b.try_clone().unwrap());
                let to_remote = (a.try_clone().unwrap(), b.try_clone().unwrap());
                let frozen = frozen2.clone();
                for (mut from, mut to, count) in [
                    (to_remote.0, to_remote.1, Some(sent2.clone())),
                    (b, a, None),
                ] {
                    let frozen = frozen.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            while frozen.load(Ordering::Acquire) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            if let Some(c) = &count {
                                c.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay {
            port,
            sent,
            frozen,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    fn cut(mut self) -> u16 {
        self.stop.store(true, Ordering::Release);
        self.accept.take().unwrap().join().unwrap();
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.port
    }
}

/// Verified random writes at a queue depth on one channel driven by this thread: each block
/// written carries its LBA and a generation; the generation of every acknowledged write is
/// kept; errors are counted.
struct Load {
    ch: SyncChannel,
    bs: usize,
    blocks: u64,
    next_gen: u64,
    acked: HashMap<u64, u64>,
    in_flight: HashMap<u64, (u64, u32, u64)>,
    busy: Vec<bool>,
    errors: Vec<String>,
    rng: u64,
    tag: u64,
    done: Vec<ferroblk_bdev::IoCompletion>,
}

impl Load {
    fn new(bdev: &Arc<dyn Bdev>, blocks: u64) -> Load {
        let ch = SyncChannel::new(bdev.open_channel().unwrap());
        Load {
            bs: bdev.info().block_size().bytes() as usize,
            ch,
            blocks,
            next_gen: 1,
            acked: HashMap::new(),
            in_flight: HashMap::new(),
            busy: vec![false; blocks as usize],
            errors: Vec::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
            tag: 0,
            done: Vec::new(),
        }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Keeps `qd` writes in flight until `acks` more are acknowledged.
    fn run(&mut self, qd: usize, acks: u64) {
        let target = self.acked_count() + acks;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.acked_count() < target {
            assert!(Instant::now() < deadline, "load stalled: {:?}", self.errors);
            while self.ch.channel().in_flight() < qd {
                let n = 1 + (self.rand() % 8) as u32;
                let lba = self.rand() % (self.blocks - u64::from(n));
                if (lba..lba + u64::from(n)).any(|b| self.busy[b as usize]) {
                    break;
                }
                let generation = self.next_gen;
                self.next_gen += 1;
                let mut buf = AlignedBuf::new(n as usize * self.bs);
                for k in 0..u64::from(n) {
                    let blk =
                        &mut buf.as_mut_slice()[k as usize * self.bs..(k as usize + 1) * self.bs];
                    pattern(blk, lba + k, self.bs, generation);
                }
                // Three segments, to cross segment boundaries inside commands.
                let third = (n as usize * self.bs / 3) & !511;
                let lens = [third, third, n as usize * self.bs - 2 * third];
                let lens: &[usize] = if third == 0 { &lens[2..] } else { &lens };
                self.tag += 1;
                let io = IoRequest::write(lba, n, SgList::from_buf_split(buf, lens), self.tag);
                self.ch.channel().submit(io).expect("in flight below depth");
                for b in lba..lba + u64::from(n) {
                    self.busy[b as usize] = true;
                }
                self.in_flight.insert(self.tag, (lba, n, generation));
            }
            self.poll();
        }
    }

    fn poll(&mut self) {
        self.ch.poll_once(&mut self.done);
        for c in self.done.drain(..) {
            let (lba, n, generation) = self.in_flight.remove(&c.tag).unwrap();
            for b in lba..lba + u64::from(n) {
                self.busy[b as usize] = false;
                if c.status == IoStatus::Success {
                    self.acked.insert(b, generation);
                }
            }
            if c.status != IoStatus::Success {
                self.errors.push(format!("write {lba}+{n}: {}", c.status));
            }
        }
    }

    fn acked_count(&self) -> u64 {
        self.next_gen - 1 - self.in_flight.len() as u64
    }

    fn drain(&mut self) {
        while !self.in_flight.is_empty() {
            self.poll();
        }
    }

    /// After paths failed under the load: waits for what is in flight, then checks that no
    /// error reached the caller, that the bdev retried commands on another path, and that
    /// every acknowledged write reads back; returns the bdev's `describe`.
    fn nothing_lost(&mut self, bdev: &Arc<dyn Bdev>) -> serde_json::Value {
        self.drain();
        assert!(
            self.errors.is_empty(),
            "errors seen by the caller: {:?}",
            &self.errors
        );
        let info = bdev.describe();
        assert!(info["retried"].as_u64().unwrap() > 0, "{info}");
        self.verify();
        info
    }

    /// Reads every written block back: each must hold its last acknowledged generation.
    fn verify(&mut self) {
        let mut want = vec![0u8; self.bs];
        let mut lost = Vec::new();
        for (&lba, &generation) in &self.acked {
            let (st, got) = self.ch.read(lba, 1);
            assert_eq!(st, IoStatus::Success, "read back {lba}");
            pattern(&mut want, lba, self.bs, generation);
            if got != want {
                lost.push(lba);
            }
        }
        assert!(
            lost.is_empty(),
            "acknowledged writes lost at {} blocks: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
}

/// Runs RPC `method` (which may fail) against the daemon in `dir`.
fn rpc_output(dir: &Path, method: &str, params: &str) -> std::process::Output {
    std::process::Command::new(common::daemon::BIN)
        .args(["rpc", "--socket"])
        .arg(dir.join("rpc.sock"))
        .args([method, params])
        .output()
        .unwrap()
}

/// Writes 4 KiB blocks `lba..lba + 4` filled with `byte` from another thread, one at a time,
/// and sends their statuses when all are done.
fn writes_in_a_thread(bdev: &Arc<dyn Bdev>, lba: u64, byte: u8) -> mpsc::Receiver<Vec<IoStatus>> {
    let (tx, rx) = mpsc::channel();
    let b = bdev.clone();
    std::thread::spawn(move || {
        let mut ch = SyncChannel::new(b.open_channel().unwrap());
        let st: Vec<IoStatus> = (lba..lba + 4).map(|i| ch.write(i, &[byte; 4096])).collect();
        let _ = tx.send(st);
    });
    rx
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_up(b: &Arc<dyn Bdev>, i: usize) -> bool {
    b.describe()["paths"][i]["state"] == "up"
}

fn cut_paths_under_load(policy: Policy) {
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = remote(dir.path(), "64MiB", None);
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let a = Relay::start(pa, target);
    let b = Relay::start(pb, target);
    let mut d = decl("mp", &[pa, pb]);
    d.policy = policy;
    d.ctrl_loss_tmo = 60.0;
    let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&d).unwrap());
    let mut load = Load::new(&bdev, 4096);
    load.run(32, 2000);
    // The policy at work: 2,000 writes of 4-32 KiB are ~36 MiB; the control plane sends a
    // few KiB per path.
    let (to_a, to_b) = (
        a.sent.load(Ordering::Relaxed),
        b.sent.load(Ordering::Relaxed),
    );
    match policy {
        Policy::Failover => assert!(to_a > 8 << 20 && to_b < 1 << 20, "{to_a} {to_b}"),
        Policy::RoundRobin => assert!(to_a > 8 << 20 && to_b > 8 << 20, "{to_a} {to_b}"),
    }
    // Path A fails with writes in flight on it.
    let pa = a.cut();
    load.run(32, 2000);
    wait_until("path A seen down", || !path_up(&bdev, 0));
    // A comes back and is reconnected; then B fails.
    let a = Relay::start(pa, target);
    wait_until("path A reconnected", || path_up(&bdev, 0));
    load.run(32, 1000);
    let pb = b.cut();
    load.run(32, 2000);
    // B returns; A fails.
    let b = Relay::start(pb, target);
    wait_until("path B reconnected", || path_up(&bdev, 1));
    let _ = a.cut();
    load.run(32, 2000);
    let info = load.nothing_lost(&bdev);
    assert!(info["reconnects"].as_u64().unwrap() >= 2, "{info}");
    drop(load);
    drop(b);
}

#[test]
fn cut_paths_under_load_fail_over_without_errors_or_lost_writes() {
    cut_paths_under_load(Policy::Failover);
}

#[test]
fn cut_paths_under_round_robin_load_lose_nothing() {
    cut_paths_under_load(Policy::RoundRobin);
}

#[test]
fn a_remote_that_never_returns_fails_io_after_ctrl_loss_tmo() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, port) = remote(dir.path(), "16MiB", None);
    let mut dd = decl("gone", &[port]);
    dd.ctrl_loss_tmo = 1.0;
    dd.reconnect_delay = 0.2;
    let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&dd).unwrap());
    let mut load = Load::new(&bdev, 1024);
    load.run(8, 200);
    load.drain();
    assert!(load.errors.is_empty(), "{:?}", load.errors);
    d.kill().unwrap();
    d.wait().unwrap();
    // Writes submitted now are held, then fail with an error: none hangs, none succeeds.
    let rx = writes_in_a_thread(&bdev, 0, 7);
    let statuses = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("I/O hung on a remote that is gone");
    assert!(
        statuses.iter().all(|s| *s == IoStatus::Aborted),
        "{statuses:?}"
    );
    assert!(bdev.describe()["failed_no_path"].as_u64().unwrap() >= 4);
    assert!(!path_up(&bdev, 0));
}

#[test]
fn a_remote_resize_reaches_the_bdevs_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = remote(dir.path(), "16MiB", None);
    let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&decl("grow", &[port])).unwrap());
    assert_eq!(bdev.info().block_count(), 4096);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    bdev.info().subscribe(move |e| {
        let _ = tx.lock().unwrap().send(*e);
    });
    rpc(
        dir.path(),
        "bdev_resize",
        r#"{"name": "ram", "size": "32MiB"}"#,
    );
    let e = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no resize event");
    assert_eq!(
        e,
        BdevEvent::Resized {
            old_blocks: 4096,
            new_blocks: 8192
        }
    );
    // The new blocks are usable at once.
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    assert_eq!(ch.write(8191, &[5u8; 4096]), IoStatus::Success);
    assert_eq!(ch.read(8191, 1).1, vec![5u8; 4096]);
    // bdev_resize on the nvmf bdev accepts the remote's size and refuses another one.
    bdev.resize(8192).unwrap();
    assert_eq!(bdev.resize(9000).unwrap_err().field(), Some("size"));
    // The size came by the asynchronous event: the path holds an Asynchronous Event Request,
    // received the event, and never polled Identify Namespace.
    let p = &bdev.describe()["paths"][0];
    assert_eq!(p["async_events"], true, "{p}");
    assert!(p["events_received"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(p["identify_polls"], 0, "{p}");
}

/// Starts a ferroblk exporting a malloc bdev `ram` of `size` as namespace 1 of [`NQN`] on two
/// listeners, the first optimized and the second non-optimized; returns it and the ports.
fn remote_two_ports(dir: &Path, size: &str) -> (Daemon, u16, u16) {
    let (pa, pb) = (free_port(), free_port());
    let cfg = format!(
        "[reactors]\ncount = 1\n\
         [rpc]\nsocket = \"rpc.sock\"\n\
         [[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"{size}\"\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nallow_any_host = true\n\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"ram\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {pa}\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {pb}\nana_state = \"non_optimized\"\n"
    );
    std::fs::write(dir.join("ferroblk.toml"), cfg).unwrap();
    (start_daemon(dir), pa, pb)
}

/// Sets the ANA state of every group on the remote's listener `port`.
fn set_ana(dir: &Path, port: u16, state: &str) {
    rpc(
        dir,
        "nvmf_listener_set_ana_state",
        &format!(r#"{{"addr": "127.0.0.1", "port": {port}, "ana_state": "{state}"}}"#),
    );
}

fn ana_of(b: &Arc<dyn Bdev>, i: usize) -> u64 {
    b.describe()["paths"][i]["ana_state"].as_u64().unwrap()
}

#[test]
fn remote_ana_states_steer_io_and_flips_under_load_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, port_a, port_b) = remote_two_ports(dir.path(), "64MiB");
    let at = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (ra, rb) = (free_port(), free_port());
    let a = Relay::start(ra, at(port_a));
    let b = Relay::start(rb, at(port_b));
    // The non-optimized path first: ANA, not the declaration order, picks the path.
    let mut d = decl("ana", &[rb, ra]);
    d.ctrl_loss_tmo = 60.0;
    let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&d).unwrap());
    assert_eq!(
        (ana_of(&bdev, 0), ana_of(&bdev, 1)),
        (2, 1),
        "{}",
        bdev.describe()
    );
    let sent = || {
        (
            a.sent.load(Ordering::Relaxed),
            b.sent.load(Ordering::Relaxed),
        )
    };
    let mut load = Load::new(&bdev, 4096);
    // 2,000 writes of 4-32 KiB are ~36 MiB; the control plane sends a few KiB per path.
    let phase = |load: &mut Load| {
        let (a0, b0) = sent();
        load.run(32, 2000);
        let (a1, b1) = sent();
        (a1 - a0, b1 - b0)
    };
    let (to_a, to_b) = phase(&mut load);
    assert!(
        to_a > 8 << 20 && to_b < 1 << 20,
        "optimized A: {to_a} {to_b}"
    );
    // Flip with writes in flight: B optimized, A non-optimized. The ANA Change events reach
    // the bdev and I/O moves to B.
    set_ana(dir.path(), port_b, "optimized");
    set_ana(dir.path(), port_a, "non_optimized");
    load.run(32, 500);
    wait_until("the flip seen", || {
        (ana_of(&bdev, 0), ana_of(&bdev, 1)) == (1, 2)
    });
    let (to_a, to_b) = phase(&mut load);
    assert!(
        to_b > 8 << 20 && to_a < 1 << 20,
        "optimized B: {to_a} {to_b}"
    );
    // B inaccessible with writes in flight: its commands fail with the ANA status and are
    // retried on A (non-optimized, the only usable path).
    set_ana(dir.path(), port_b, "inaccessible");
    load.run(32, 500);
    wait_until("B inaccessible seen", || ana_of(&bdev, 0) == 3);
    let (to_a, to_b) = phase(&mut load);
    assert!(
        to_a > 8 << 20 && to_b < 1 << 20,
        "only A usable: {to_a} {to_b}"
    );
    // Both inaccessible: writes are held (not failed, ctrl_loss_tmo is long) until B is
    // optimized again. The load's writes complete first (held, they would wait for that).
    load.drain();
    set_ana(dir.path(), port_a, "inaccessible");
    wait_until("both inaccessible seen", || {
        (ana_of(&bdev, 0), ana_of(&bdev, 1)) == (3, 3)
    });
    let rx = writes_in_a_thread(&bdev, 4096, 0xa5);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.try_recv().is_err(),
        "a write completed with no accessible path"
    );
    set_ana(dir.path(), port_b, "optimized");
    let st = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("held writes never completed");
    assert!(st.iter().all(|s| *s == IoStatus::Success), "{st:?}");
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    assert_eq!(ch.read(4096, 1).1, vec![0xa5u8; 4096]);
    load.run(32, 500);
    // No error reached the caller and every acknowledged write reads back. (Commands may or
    // may not have met an ANA status: the events usually steer before any does.)
    load.drain();
    assert!(load.errors.is_empty(), "errors: {:?}", &load.errors);
    load.verify();
    let info = bdev.describe();
    assert_eq!(info["failed_no_path"], 0, "{info}");
    for p in info["paths"].as_array().unwrap() {
        assert_eq!(p["async_events"], true, "{info}");
        assert_eq!(p["identify_polls"], 0, "{info}");
    }
    drop(load);
    drop((a, b));
}

#[test]
fn an_inaccessible_only_remote_fails_held_io_after_ctrl_loss_tmo() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, port_a, port_b) = remote_two_ports(dir.path(), "16MiB");
    // Bad input names the field; no listener there is "not found".
    for (params, want) in [
        (
            format!(
                r#"{{"addr": "127.0.0.1", "port": {port_a}, "anagrpid": 99, "ana_state": "optimized"}}"#
            ),
            "anagrpid",
        ),
        (
            format!(r#"{{"addr": "127.0.0.1", "port": {port_a}, "ana_state": "sideways"}}"#),
            "ana_state",
        ),
        (
            r#"{"addr": "127.0.0.1", "port": 1, "ana_state": "optimized"}"#.to_string(),
            "no listener",
        ),
    ] {
        let out = rpc_output(dir.path(), "nvmf_listener_set_ana_state", &params);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() && text.contains(want),
            "{params}: {text}"
        );
    }
    set_ana(dir.path(), port_a, "inaccessible");
    set_ana(dir.path(), port_b, "persistent_loss");
    let mut d = decl("lost", &[port_a, port_b]);
    d.ctrl_loss_tmo = 1.0;
    let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&d).unwrap());
    assert_eq!((ana_of(&bdev, 0), ana_of(&bdev, 1)), (3, 4));
    let rx = writes_in_a_thread(&bdev, 0, 7);
    let st = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("I/O hung on a remote with no accessible path");
    assert!(st.iter().all(|s| *s == IoStatus::Aborted), "{st:?}");
    let info = bdev.describe();
    assert!(info["failed_no_path"].as_u64().unwrap() >= 4, "{info}");
    // The paths stay connected: only their ANA state kept I/O off them.
    assert!(path_up(&bdev, 0) && path_up(&bdev, 1), "{info}");
}

/// Connects an initiator to `port`'s [`NQN`]-like subsystem `nqn`: controller, one queue.
fn initiator(port: u16, nqn: &str) -> (Controller, IoQueue, u32) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c = Controller::connect(&ConnectOptions::new(addr, nqn)).unwrap();
    let nsid = c.active_namespaces().unwrap()[0];
    c.set_number_of_queues(1).unwrap();
    let o = IoQueueOptions {
        depth: c.cap().mqes.min(32),
        ..IoQueueOptions::default()
    };
    let q = c.connect_io_queue(1, &o).unwrap();
    (c, q, nsid)
}

#[test]
fn an_nvmf_bdev_in_the_daemon_is_exported_again_over_nvme_tcp() {
    let dir_a = tempfile::tempdir().unwrap();
    let (_a, port_a) = remote(dir_a.path(), "32MiB", None);
    let dir_b = tempfile::tempdir().unwrap();
    let port_b = free_port();
    let nqn_b = "nqn.2026-12.io.ferroblk:reexport";
    let cfg = format!(
        "[reactors]\ncount = 2\n\
         [rpc]\nsocket = \"rpc.sock\"\n\
         [[bdev]]\nname = \"far\"\nkind = \"nvmf\"\nsubnqn = \"{NQN}\"\n\
         paths = [{{ addr = \"127.0.0.1\", port = {port_a} }}]\nctrl_loss_tmo = 5\n\
         [[subsystem]]\nnqn = \"{nqn_b}\"\nallow_any_host = true\n\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"far\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {port_b}\n"
    );
    std::fs::write(dir_b.path().join("ferroblk.toml"), cfg).unwrap();
    let _b = start_daemon(dir_b.path());

    // Written through B (1 MiB: split by B's export, sent to A through the nvmf bdev) ...
    let (_cb, mut qb, nsb) = initiator(port_b, nqn_b);
    let mut data = vec![0u8; 1 << 20];
    pattern(&mut data, 1000, 4096, 9);
    qb.write(nsb, 1000, 256, &mut data.clone()).unwrap();
    qb.flush(nsb).unwrap();
    // ... read back through B, and straight from A.
    let mut back = vec![0u8; 1 << 20];
    qb.read(nsb, 1000, 256, &mut back).unwrap();
    assert!(back == data, "read through B differs");
    let (_ca, mut qa, nsa) = initiator(port_a, NQN);
    let mut direct = vec![0u8; 1 << 20];
    qa.read(nsa, 1000, 256, &mut direct).unwrap();
    assert!(direct == data, "the remote holds other data");

    // bdev_list shows the path; a create the remote refuses names the field, and B keeps
    // serving.
    let list = rpc(dir_b.path(), "bdev_list", "{}");
    assert!(
        list.contains("\"state\": \"up\"") || list.contains("\"state\":\"up\""),
        "{list}"
    );
    let bad = format!(
        r#"{{"kind": "nvmf", "name": "bad", "subnqn": "nqn.2026-12.io.ferroblk:none",
            "paths": [{{"addr": "127.0.0.1", "port": {port_a}}}]}}"#
    );
    let out = rpc_output(dir_b.path(), "bdev_create", &bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "bdev_create of a refused remote succeeded"
    );
    assert!(err.contains("subnqn"), "{err}");
    let mut again = vec![0u8; 1 << 20];
    qb.read(nsb, 1000, 256, &mut again).unwrap();
    assert!(again == data);
}

#[test]
fn write_zeroes_beyond_one_commands_reach_is_sent_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte blocks: 131,072 of them, so one request spans two Write Zeroes commands.
    let (_d, port) = remote_bs(dir.path(), "64MiB", 512, None);
    let bdev = NvmfBdev::connect(&decl("wz", &[port])).unwrap();
    let mut ch = SyncChannel::new(bdev.open_channel().unwrap());
    let mut data = vec![0u8; 4096];
    for lba in [0u64, 65_535, 65_536, 99_992, 120_000] {
        pattern(&mut data, lba, 512, 4);
        assert_eq!(ch.write(lba, &data), IoStatus::Success);
    }
    assert_eq!(ch.write_zeroes(0, 100_000), IoStatus::Success);
    for lba in [0u64, 65_535, 65_536, 99_992] {
        let (st, got) = ch.read(lba, 8);
        assert_eq!(st, IoStatus::Success);
        assert!(got.iter().all(|&b| b == 0), "blocks at {lba} not zeroed");
    }
    let (_, got) = ch.read(120_000, 8);
    pattern(&mut data, 120_000, 512, 4);
    assert!(got == data, "a block outside the range changed");
    assert_eq!(ch.unmap(0, 131_072), IoStatus::Success);
}

/// Writes B's configuration: an `nvmf` bdev to A's namespace, exported again as namespace 1
/// of [`NQN`] on `port` (so that B is a second path to the same volume).
fn relay_daemon(dir: &Path, port_a: u16, port: u16) -> Daemon {
    let cfg = format!(
        "[reactors]\ncount = 1\n\
         [rpc]\nsocket = \"rpc.sock\"\n\
         [[bdev]]\nname = \"far\"\nkind = \"nvmf\"\nsubnqn = \"{NQN}\"\n\
         paths = [{{ addr = \"127.0.0.1\", port = {port_a} }}]\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nallow_any_host = true\n\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"far\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {port}\n"
    );
    std::fs::write(dir.join("ferroblk.toml"), cfg).unwrap();
    start_daemon(dir)
}

#[test]
fn killing_the_ferroblk_of_one_path_under_load_loses_nothing() {
    // Two ferroblk processes serve the same volume: A holds it, B exports A's namespace again
    // through its own nvmf bdev. The bdev under test prefers B (path 0), whose process is
    // SIGKILLed under verified writes, then started again.
    let dir_a = tempfile::tempdir().unwrap();
    let (_a, port_a) = remote(dir_a.path(), "64MiB", None);
    let dir_b = tempfile::tempdir().unwrap();
    let port_b = free_port();
    let mut b = relay_daemon(dir_b.path(), port_a, port_b);
    let mut d = decl("two", &[port_b, port_a]);
    d.ctrl_loss_tmo = 60.0;
    let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&d).unwrap());
    let mut load = Load::new(&bdev, 4096);
    load.run(32, 2000);
    b.kill().unwrap();
    b.wait().unwrap();
    load.run(32, 2000);
    wait_until("path B seen down", || !path_up(&bdev, 0));
    let _b = relay_daemon(dir_b.path(), port_a, port_b);
    wait_until("path B reconnected", || path_up(&bdev, 0));
    load.run(32, 2000);
    load.nothing_lost(&bdev);
}

#[test]
fn a_path_that_stops_answering_is_left_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = remote(dir.path(), "64MiB", None);
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (a, b) = (
        Relay::start(free_port(), target),
        Relay::start(free_port(), target),
    );
    let mut d = decl("hang", &[a.port, b.port]);
    d.ctrl_loss_tmo = 120.0;
    let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&d).unwrap());
    let mut load = Load::new(&bdev, 4096);
    load.run(32, 1000);
    // Path A goes silent with writes in flight: no error, no close. Its keep-alive times out,
    // the control thread declares it lost, and what waited on it completes through B.
    a.freeze();
    load.run(32, 1000);
    assert!(!path_up(&bdev, 0));
    load.nothing_lost(&bdev);
    drop(b);
}
