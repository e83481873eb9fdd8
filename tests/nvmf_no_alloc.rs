//! The `nvmf` bdev's hot path allocates nothing: after warm-up, reads, writes and flushes on a
//! channel to a second ferroblk process (one-block requests and 256 KiB ones) make no heap
//! allocation on the submitting thread. Counted by a global allocator wrapper, per thread.

mod common;

use std::sync::Arc;

use common::daemon::{free_port, start_daemon};
use ferroblk_bdev::Bdev;
use ferroblk_bdev::testing::{
    CountingAlloc, allocations, steady_state_allocations, steady_state_allocations_sized,
};
use ferroblk_target::remote::{NvmfBdev, NvmfDecl, PathDecl, Policy};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Waits until every path has a spare I/O queue connected.
fn spares_ready(bdev: &Arc<dyn Bdev>) {
    let t = std::time::Instant::now();
    loop {
        let d = bdev.describe();
        let paths = d["paths"].as_array().unwrap();
        if paths.iter().all(|p| p["spare_queues"].as_u64() >= Some(1)) {
            return;
        }
        assert!(t.elapsed().as_secs() < 30, "no spare queues: {d}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn nvmf_hot_path_makes_no_heap_allocation() {
    let a = allocations();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(
        allocations() > a && v.len() == 10,
        "the counter sees this thread"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let nqn = "nqn.2026-12.io.ferroblk:no-alloc";
    std::fs::write(
        dir.path().join("ferroblk.toml"),
        format!(
            "[reactors]\ncount = 1\n[rpc]\nsocket = \"rpc.sock\"\n\
             [[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"16MiB\"\n\
             [[subsystem]]\nnqn = \"{nqn}\"\nallow_any_host = true\n\
             [[subsystem.namespace]]\nnsid = 1\nbdev = \"ram\"\n\
             [[listener]]\naddr = \"127.0.0.1\"\nport = {port}\n"
        ),
    )
    .unwrap();
    let _d = start_daemon(dir.path());
    for policy in [Policy::Failover, Policy::RoundRobin] {
        let decl = NvmfDecl {
            name: "r".into(),
            subnqn: nqn.into(),
            nsid: None,
            paths: vec![
                PathDecl {
                    addr: "127.0.0.1".into(),
                    port,
                    trtype: Default::default(),
                };
                2
            ],
            policy,
            hostnqn: None,
            ctrl_loss_tmo: 30.0,
            reconnect_delay: 1.0,
            io_queues: 4,
            queue_depth: 32,
            hdr_digest: false,
            data_digest: true,
        };
        let bdev: Arc<dyn Bdev> = Arc::new(NvmfBdev::connect(&decl).unwrap());
        // A channel takes its queues from the paths' spares when it opens (registering their
        // sockets with the ring allocates, once); one opened before the control thread has
        // connected them would take them later, inside the measured rounds.
        spares_ready(&bdev);
        assert_eq!(
            steady_state_allocations(&bdev, 16, 50),
            0,
            "{policy:?}: one-block requests"
        );
        spares_ready(&bdev);
        assert_eq!(
            steady_state_allocations_sized(&bdev, 8, 20, 64),
            0,
            "{policy:?}: 256 KiB requests"
        );
    }
}
