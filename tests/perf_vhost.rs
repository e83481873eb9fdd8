//! `ferroblk perf vhost` against qemu-storage-daemon's vhost-user-blk export: a null-co export
//! for reads (polling and `--wait`, several queues), a file export to prove that written data
//! reaches the backend. Skipped, with a message, where qemu-storage-daemon (Debian's
//! `qemu-system-common`) is missing and cannot be installed.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;

use common::qsd::{QSD, Qsd, qsd_available};

const BIN: &str = env!("CARGO_BIN_EXE_ferroblk");

fn perf(sock: &Path, extra: &[&str]) -> Result<Value, String> {
    let out = Command::new(BIN)
        .args(["perf", "vhost", "--socket"])
        .arg(sock)
        .args(["--time", "0.5", "--json"])
        .args(extra)
        .output()
        .expect("run ferroblk");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn check_ran(v: &Value, what: &str) -> u64 {
    let ios = v["ios"].as_u64().unwrap_or(0);
    assert!(ios > 0, "{what}: no I/O: {v}");
    assert_eq!(v["errors"], 0, "{what}: errors: {v}");
    for k in ["iops", "mib_s", "mean_us", "p99_us", "p999_us"] {
        let x = v[k].as_f64().unwrap_or(-1.0);
        assert!(x > 0.0, "{what}: {k} = {x}: {v}");
    }
    ios
}

#[test]
fn perf_vhost_reads_a_null_export() {
    if !qsd_available() {
        eprintln!("skipped: {QSD} is not installed and could not be installed");
        return;
    }
    let qsd = Qsd::start("driver=null-co,size=67108864,read-zeroes=on", false, 2);

    let v = perf(&qsd.sock, &["--qd", "8"]).unwrap();
    check_ran(&v, "randread qd 8 (polling)");
    assert_eq!(v["mode"], "poll");
    assert_eq!(v["device"]["capacity"], 67_108_864);

    // Two queues (one thread each), sleeping on the completion eventfd.
    let v = perf(
        &qsd.sock,
        &["--rw", "read", "--queues", "2", "--qd", "4", "--wait"],
    )
    .unwrap();
    check_ran(&v, "read, 2 queues, --wait");
    assert_eq!(v["mode"], "wait");
    let queues = v["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2, "{v}");
    assert!(queues.iter().all(|q| q["ios"].as_u64() > Some(0)), "{v}");

    // The export is read-only: a write job must fail up front and say why.
    let e = perf(&qsd.sock, &["--rw", "randwrite"]).unwrap_err();
    assert!(e.contains("writable"), "{e}");
    // More queues than the backend offers.
    let e = perf(&qsd.sock, &["--queues", "3"]).unwrap_err();
    assert!(e.contains("queue"), "{e}");
}

#[test]
fn perf_vhost_writes_reach_a_file_export() {
    if !qsd_available() {
        eprintln!("skipped: {QSD} is not installed and could not be installed");
        return;
    }
    const SIZE: usize = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; SIZE]).unwrap();
    let qsd = Qsd::start(&format!("driver=file,filename={}", img.display()), true, 1);
    check_ran(
        &perf(&qsd.sock, &["--rw", "randwrite", "--qd", "4"]).unwrap(),
        "randwrite",
    );
    check_ran(
        &perf(
            &qsd.sock,
            &["--rw", "randrw", "--mix", "50", "--qd", "4", "--wait"],
        )
        .unwrap(),
        "randrw 50%",
    );
    check_ran(
        &perf(&qsd.sock, &["--rw", "randread", "--qd", "4"]).unwrap(),
        "randread",
    );
    drop(qsd);

    // Every 4 KiB block is either untouched or holds the client's write pattern (0, 1, ..., 255
    // repeated), and some hold the pattern: the data went through the shared memory region.
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len(), SIZE);
    let pattern: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    let mut written = 0;
    for (i, b) in data.chunks(4096).enumerate() {
        if b == &pattern[..] {
            written += 1;
        } else {
            assert!(
                b.iter().all(|&x| x == 0),
                "block {i} holds neither zeroes nor the pattern"
            );
        }
    }
    assert!(written > 0, "no block of the file was written");
}
