//! Starts the test cluster of `ferroblk_rbd::testing` (one monitor, one memstore OSD, pool `rbd`,
//! no authentication, on 127.0.0.1) for benchmarks and manual runs: prints the path of its
//! ceph.conf and its monitor address, then keeps it running until stdin closes (or a line is
//! read), and stops it.
//!
//! `cargo run -p ferroblk-rbd --features testing --example ceph-cluster`

use std::io::BufRead;

fn main() {
    let c = ferroblk_rbd::testing::TestCluster::start();
    println!("conf {}", c.conf().display());
    println!("mon_host {}", c.mon_host());
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    c.stop();
}
