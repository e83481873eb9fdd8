//! Hosts that connect and do nothing against a live target: they cannot lock a well-formed host
//! out (eviction of unidentified connections when the cap is full), and they are closed once
//! the ICReq or Connect deadline passes. Also hosts without a host NQN.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferroblk_target::initiator::{ConnectOptions, Controller, Error, IoQueueOptions};
use ferroblk_target::subsystem::{ListenerSpec, SubsystemSpec};
use ferroblk_target::transport::tcp::listener::MAX_CONNECTIONS;
use ferroblk_target::transport::tcp::pdu::{IcReq, PduEncoder, Role};

const NQN: &str = "nqn.2026-12.io.ferroblk:admission";
const IDLE: usize = 2000;
/// Handshake deadline of the flood test: longer than opening the flood takes on a loaded
/// machine, so the cap fills with idle connections before any of them times out.
const FLOOD_HANDSHAKE_MS: u64 = 10_000;
/// Handshake deadline of the other tests.
const HANDSHAKE_MS: u64 = 1000;

/// Raises the soft descriptor limit to the hard one: the test holds thousands of sockets on
/// both ends (the target runs in this process).
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid struct passed.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
    l.rlim_cur = l.rlim_max;
    // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard one is
    // always permitted.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) }, 0);
    assert!(
        l.rlim_cur as usize >= 2 * IDLE + MAX_CONNECTIONS,
        "RLIMIT_NOFILE hard limit {} is too low for this test",
        l.rlim_max
    );
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection to `dst` from source address `src` (any of 127/8 on loopback), so that
/// the flood comes from other peer addresses than the good host.
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        unreachable!("the rig listens on IPv4")
    };
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let from = sockaddr_in(src, 0);
    // SAFETY: `from` is a valid sockaddr_in of `len` bytes for the duration of the call.
    if unsafe { libc::bind(fd, (&raw const from).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let to = sockaddr_in(*dst.ip(), dst.port());
    // SAFETY: as for bind.
    if unsafe { libc::connect(fd, (&raw const to).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(sock))
}

/// Whether the target closed `s` before `until`.
fn closed_by(s: &mut TcpStream, until: Instant) -> bool {
    let mut b = [0u8; 256];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

fn rig(handshake_ms: u64) -> common::Rig {
    let spec = ListenerSpec {
        ic_timeout_ms: handshake_ms,
        connect_timeout_ms: handshake_ms,
        ..ListenerSpec::new("127.0.0.1", 0)
    };
    common::rig_on(NQN, common::malloc_1m(), spec)
}

fn io_options() -> IoQueueOptions {
    IoQueueOptions {
        depth: 16,
        max_data: 64 * 1024,
        disable_sq_flow_control: false,
    }
}

#[test]
fn idle_connections_do_not_lock_out_a_well_formed_host_and_are_closed() {
    raise_nofile();
    let r = rig(FLOOD_HANDSHAKE_MS);
    let addr = r.addr;
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = {
        let opened = opened.clone();
        std::thread::spawn(move || {
            (0..IDLE)
                .map(|i| {
                    let src = Ipv4Addr::new(127, 0, 0, 2 + (i % 16) as u8);
                    let s = connect_from(src, addr).expect("idle connection");
                    opened.fetch_add(1, Ordering::Release);
                    s
                })
                .collect::<Vec<_>>()
        })
    };
    // The good host arrives once the idle ones fill the listener, and works while more come.
    while opened.load(Ordering::Acquire) < MAX_CONNECTIONS + 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let ctrl = Controller::connect(&ConnectOptions::new(addr, NQN)).expect("admin queue");
    ctrl.set_number_of_queues(1).expect("number of queues");
    let mut q = ctrl.connect_io_queue(1, &io_options()).expect("I/O queue");
    let mut data = vec![0x5a; 4096];
    q.write(1, 3, 1, &mut data).expect("write");
    let mut back = vec![0u8; 4096];
    q.read(1, 3, 1, &mut back).expect("read");
    assert_eq!(back, vec![0x5a; 4096]);
    let mut idle = flood.join().unwrap();
    assert!(
        opened.load(Ordering::Acquire) == IDLE,
        "the good host connected while the flood went on"
    );

    // Every idle connection ends: evicted for a newcomer, or past the ICReq deadline.
    let until =
        Instant::now() + Duration::from_millis(FLOOD_HANDSHAKE_MS) + Duration::from_secs(30);
    let open = idle
        .iter_mut()
        .map(|s| closed_by(s, until))
        .filter(|c| !c)
        .count();
    assert_eq!(open, 0, "idle connections still open after the deadline");
    // The good host's queues were never evicted nor timed out.
    let mut back = vec![0u8; 4096];
    q.read(1, 3, 1, &mut back).expect("read after the flood");
    assert_eq!(back, vec![0x5a; 4096]);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = r.listener.admission_stats();
        let done = st.refused + st.evicted + st.timed_out == IDLE as u64;
        if done && r.listener.connections() == 2 {
            assert!(
                st.evicted > 0,
                "the cap filled, so some were evicted: {st:?}"
            );
            assert!(st.timed_out > 0, "the last ones timed out: {st:?}");
            break;
        }
        assert!(
            Instant::now() < until,
            "{st:?}, {} connections open (2 expected)",
            r.listener.connections()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(q);
    ctrl.shutdown().expect("shutdown");
}

#[test]
fn a_host_that_sends_icreq_but_no_connect_is_closed_after_the_deadline() {
    let r = rig(HANDSHAKE_MS);
    let mut s = TcpStream::connect(r.addr).unwrap();
    let mut out = [0u8; 256];
    let n = PduEncoder::new(Role::Host).ic_req(
        &IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        },
        &mut out,
    );
    std::io::Write::write_all(&mut s, &out[..n]).unwrap();
    let mut icresp = [0u8; 128];
    s.read_exact(&mut icresp).unwrap();
    assert_eq!(icresp[0], 1, "ICResp");
    let until = Instant::now() + Duration::from_millis(HANDSHAKE_MS) + Duration::from_secs(30);
    assert!(closed_by(&mut s, until), "no Connect, yet still open");
    // Counted, and its slot free once the reactor dropped it.
    let until = Instant::now() + Duration::from_secs(10);
    while r.listener.admission_stats().timed_out != 1 || r.listener.connections() != 0 {
        assert!(
            Instant::now() < until,
            "{:?}, {} open",
            r.listener.admission_stats(),
            r.listener.connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_empty_host_nqn_connects_only_where_any_host_is_allowed() {
    let r = rig(HANDSHAKE_MS);
    // Any host allowed: SPDK's initiator without a host NQN attaches and does I/O.
    let mut o = ConnectOptions::new(r.addr, NQN);
    o.hostnqn = String::new();
    let ctrl = Controller::connect(&o).expect("empty host NQN, any host allowed");
    ctrl.set_number_of_queues(1).expect("number of queues");
    let mut q = ctrl.connect_io_queue(1, &io_options()).expect("I/O queue");
    let mut data = vec![7u8; 4096];
    q.write(1, 0, 1, &mut data).expect("write");
    drop(q);
    ctrl.shutdown().expect("shutdown");

    // A subsystem with an allow-list refuses it: Connect Invalid Parameters at HOSTNQN.
    let listed = "nqn.2026-12.io.ferroblk:listed";
    let host = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
    let s = r
        .target
        .add_subsystem(&SubsystemSpec {
            nqn: listed.into(),
            serial: None,
            model: "t".into(),
            allow_any_host: false,
            hosts: vec![host.into()],
            namespace: vec![],
        })
        .unwrap();
    s.add_namespace(1, common::malloc_1m(), None).unwrap();
    let mut o = ConnectOptions::new(r.addr, listed);
    o.hostnqn = String::new();
    match Controller::connect(&o) {
        Err(Error::ConnectInvalidParameters { in_data, ipo }) => {
            assert!(in_data);
            assert_eq!(ipo, 512, "HOSTNQN");
        }
        Err(e) => panic!("refused with {e}"),
        Ok(_) => panic!("an empty host NQN passed an allow-list"),
    }
    // The listed host itself still connects.
    let mut o = ConnectOptions::new(r.addr, listed);
    o.hostnqn = host.into();
    Controller::connect(&o)
        .expect("listed host")
        .shutdown()
        .unwrap();
}
