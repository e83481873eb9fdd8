//! A closed connection releases its socket. The connection's armed multishot io_uring poll holds
//! a reference to the socket's file; unless the poll is cancelled when the connection goes, every
//! closed connection stays allocated in the kernel until the reactor exits (found with 300
//! short-lived connections: 300 more TCP sockets allocated, freed only at daemon exit).
//! Alone in its test binary so that no other test's sockets come and go meanwhile.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

/// The "TCP: ... alloc N" count of this network namespace (`/proc/net/sockstat`).
fn tcp_sockets_allocated() -> i64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let line = s.lines().find(|l| l.starts_with("TCP:")).unwrap();
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "alloc" {
            return it.next().unwrap().parse().unwrap();
        }
    }
    panic!("no TCP alloc count in /proc/net/sockstat: {line}");
}

#[test]
fn closed_connections_release_their_sockets() {
    let rig = common::rig("nqn.2026-11.io.ferroblk:release", common::malloc_1m());
    let addr = rig.addr;
    const N: i64 = 300;
    let churn = |n: i64| {
        for _ in 0..n {
            // Not an ICReq: the target answers with a C2HTermReq and closes.
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(&[0xff; 128]).unwrap();
            let mut sink = Vec::new();
            c.read_to_end(&mut sink).unwrap();
        }
    };
    churn(10); // warm up: accept thread, reactor ring
    let before = tcp_sockets_allocated();
    churn(N);
    // The target's side of each connection is freed once the cancelled poll completes.
    let mut after = tcp_sockets_allocated();
    for _ in 0..100 {
        if after - before < N / 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        after = tcp_sockets_allocated();
    }
    assert!(
        after - before < N / 3,
        "{} TCP sockets still allocated after {N} closed connections",
        after - before
    );
}
