//! Real fio with the ferroblk engine: `--verify=crc32c` write-then-read jobs through each mode
//! (bdev on malloc, on a file and on a `crc -> compress -> crypt_xts -> file` chain; nvmf and
//! vhost against a ferroblk daemon started here; vhost against qemu-storage-daemon), and the
//! clear failures of bad options.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../tests/common/chain.rs"]
mod chain;
#[path = "../../tests/common/daemon.rs"]
#[allow(dead_code)]
mod daemon;
#[path = "../../tests/common/qsd.rs"]
#[allow(dead_code)]
mod qsd;

use chain::chain_toml;
use daemon::{free_port, start_daemon};

/// The engine cargo built for this profile (`out/<profile>/libferroblk_fio.so`).
fn engine() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let so = profile.join("libferroblk_fio.so");
    assert!(so.is_file(), "{} was not built", so.display());
    so
}

/// The daemon binary, built here when only this package was asked for.
fn ensure_daemon() {
    if !Path::new(daemon::BIN).is_file() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "ferroblk", "--bin", "ferroblk"])
            .status()
            .unwrap();
        assert!(st.success(), "cargo build -p ferroblk");
    }
}

/// Runs fio with the engine and `args`.
fn fio(args: &[&str]) -> Output {
    Command::new("fio")
        .arg(format!("--ioengine=external:{}", engine().display()))
        .args(args)
        .output()
        .expect("run fio (tests/run.sh installs it)")
}

/// A job that writes `size` bytes with mixed block sizes, syncing now and then, and then reads
/// everything back checking each block's CRC32C; fio's own totals must show no error.
fn verify(engine_args: &[&str], size: &str) {
    let mut args: Vec<&str> = vec![
        "--name=verify",
        "--thread",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--fsync=32",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // No verify state file left in the working directory.
        "--verify_state_save=0",
        "--output-format=json",
    ];
    let size = format!("--size={size}");
    args.push(&size);
    args.extend_from_slice(engine_args);
    let out = fio(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fio {args:?} failed: {}\n{stderr}\n{stdout}",
        out.status
    );
    let json_start = stdout.find('{').expect("fio JSON output");
    let v: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let read = job["read"]["io_bytes"].as_u64().unwrap();
    assert!(written > 0, "nothing written: {job}");
    // The verify phase reads back every block written.
    assert_eq!(
        read, written,
        "verify read {read} of {written} bytes: {job}"
    );
    assert!(
        job["sync"]["total_ios"].as_u64().unwrap_or(0) > 0,
        "no fsync went through: {job}"
    );
}

/// Runs a job that must fail; returns fio's stderr and stdout.
fn fails(args: &[&str]) -> String {
    let mut all = vec!["--name=bad", "--thread", "--rw=read", "--size=1M"];
    all.extend_from_slice(args);
    let out = fio(&all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!out.status.success(), "fio {all:?} succeeded:\n{text}");
    text
}

fn write_config(dir: &Path, toml: &str) -> String {
    let p = dir.join("bdevs.toml");
    std::fs::write(&p, toml).unwrap();
    p.display().to_string()
}

#[test]
fn bdev_mode_verifies_on_malloc() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"64MiB\"\n",
    );
    verify(
        &[
            "--ferroblk_mode=bdev",
            &format!("--ferroblk_config={cfg}"),
            "--filename=ram",
        ],
        "16M",
    );
    // Two jobs (threads), each with its own channel of the one chain and its own 8 MiB of it.
    verify(
        &[
            "--ferroblk_mode=bdev",
            &format!("--ferroblk_config={cfg}"),
            "--filename=ram",
            "--numjobs=2",
            "--offset_increment=8M",
            "--group_reporting",
        ],
        "8M",
    );
}

#[test]
fn bdev_mode_verifies_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let cfg = write_config(
        dir.path(),
        &format!(
            "[[bdev]]\nname = \"disk\"\nkind = \"file\"\npath = \"{}\"\nsize = \"64MiB\"\n\
             create = true\n",
            img.display()
        ),
    );
    verify(
        &[
            "--ferroblk_mode=bdev",
            &format!("--ferroblk_config={cfg}"),
            "--filename=disk",
        ],
        "16M",
    );
    // The data reached the file (not only a cache of the chain): it is not all zeroes.
    let data = std::fs::read(&img).unwrap();
    assert!(data.iter().any(|&b| b != 0));
}

#[test]
fn bdev_mode_verifies_on_a_transform_chain() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &chain_toml(&dir.path().join("chain.img")));
    verify(
        &[
            "--ferroblk_mode=bdev",
            &format!("--ferroblk_config={cfg}"),
            "--filename=checked",
        ],
        "8M",
    );
}

/// A random trim job over 4 MiB: every trim completes without error.
fn trims(engine_args: &[&str]) {
    let mut args = vec![
        "--name=trim",
        "--thread",
        "--rw=randtrim",
        "--bs=64k",
        "--iodepth=8",
        "--size=4M",
    ];
    args.extend_from_slice(engine_args);
    let out = fio(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("trim: IOPS="), "{stdout}");
    assert!(stdout.contains("err= 0"), "{stdout}");
}

#[test]
fn bdev_mode_trims() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"16MiB\"\n",
    );
    trims(&[
        "--ferroblk_mode=bdev",
        &format!("--ferroblk_config={cfg}"),
        "--filename=ram",
    ]);
}

/// A daemon exporting a malloc volume over NVMe/TCP on `port` and over vhost-user (twice).
fn start_exporting(dir: &Path, port: u16) -> daemon::Daemon {
    ensure_daemon();
    std::fs::write(
        dir.join("ferroblk.toml"),
        format!(
            "[reactors]\ncount = 1\n[rpc]\nsocket = \"rpc.sock\"\n\
             [[bdev]]\nname = \"vol0\"\nkind = \"malloc\"\nsize = \"64MiB\"\n\
             [[vhost]]\nsocket = \"vhost.sock\"\nbdev = \"vol0\"\n\
             [[vhost]]\nsocket = \"vhost2.sock\"\nbdev = \"vol0\"\n\
             [[subsystem]]\nnqn = \"nqn.2024-01.io.ferroblk:vol0\"\nallow_any_host = true\n\
             [[subsystem.namespace]]\nnsid = 1\nbdev = \"vol0\"\n\
             [[listener]]\naddr = \"127.0.0.1\"\nport = {port}\n"
        ),
    )
    .unwrap();
    start_daemon(dir)
}

#[test]
fn nvmf_mode_verifies_against_ferroblk() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut d = start_exporting(dir.path(), port);
    let target = format!(
        "--filename=trtype=tcp traddr=127.0.0.1 trsvcid={port} \
         subnqn=nqn.2024-01.io.ferroblk\\:vol0 ns=1"
    );
    verify(&["--ferroblk_mode=nvmf", &target], "16M");
    verify(
        &[
            "--ferroblk_mode=nvmf",
            &target,
            "--numjobs=2",
            "--offset_increment=8M",
            "--group_reporting",
        ],
        "8M",
    );
    trims(&["--ferroblk_mode=nvmf", &target]);
    let e = fails(&[
        "--ferroblk_mode=nvmf",
        &format!("--filename=trtype=tcp traddr=127.0.0.1 trsvcid={port} subnqn=nqn.x\\:none"),
    ]);
    assert!(e.contains("nqn.x:none"), "{e}");
    assert!(d.stop(), "the daemon did not stop cleanly");
}

#[test]
fn vhost_mode_verifies_against_ferroblk() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_exporting(dir.path(), free_port());
    let sock = format!("--filename={}", dir.path().join("vhost.sock").display());
    verify(&["--ferroblk_mode=vhost", &sock], "16M");
    trims(&["--ferroblk_mode=vhost", &sock]);
    // One job's buffers are one region shared with one back-end: two sockets are refused.
    let two = format!(
        "--filename={}:{}",
        dir.path().join("vhost.sock").display(),
        dir.path().join("vhost2.sock").display()
    );
    let e = fails(&["--ferroblk_mode=vhost", &two]);
    assert!(e.contains("takes one socket per job (2 given)"), "{e}");
    assert!(d.stop(), "the daemon did not stop cleanly");
}

#[test]
fn vhost_mode_verifies_against_qemu_storage_daemon() {
    if !qsd::qsd_available() {
        eprintln!(
            "skipped: {} is not installed and could not be installed",
            qsd::QSD
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("qsd.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let q = qsd::Qsd::start(&format!("driver=file,filename={}", img.display()), true, 1);
    let sock = format!("--filename={}", q.sock.display());
    verify(&["--ferroblk_mode=vhost", &sock], "16M");
}

#[test]
fn bad_options_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"16MiB\"\n",
    );
    let config = format!("--ferroblk_config={cfg}");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--ferroblk_mode=iscsi", "--filename=ram"],
            "ferroblk_mode=iscsi is not a mode".into(),
        ),
        (vec!["--filename=ram"], "ferroblk_mode is not set".into()),
        (
            vec!["--ferroblk_mode=bdev", "--filename=ram"],
            "needs --ferroblk_config=FILE".into(),
        ),
        (
            vec![
                "--ferroblk_mode=bdev",
                "--ferroblk_config=/nonexistent.toml",
                "--filename=ram",
            ],
            "/nonexistent.toml".into(),
        ),
        (
            vec!["--ferroblk_mode=bdev", &config, "--filename=floppy"],
            "--filename=floppy: no bdev of that name".into(),
        ),
        (
            vec![
                "--ferroblk_mode=bdev",
                &config,
                "--filename=ram",
                "--bs=1000",
            ],
            "bs=1000 (read) is not a multiple of the volume's block size 4096".into(),
        ),
        (
            vec![
                "--ferroblk_mode=nvmf",
                "--filename=traddr=127.0.0.1 subnqn=x",
            ],
            "trtype=tcp is missing".into(),
        ),
        (
            vec!["--ferroblk_mode=vhost", "--filename=/nonexistent.sock"],
            "vhost-user socket /nonexistent.sock: no such file".into(),
        ),
    ];
    for (args, want) in cases {
        let e = fails(&args);
        assert!(e.contains(&want), "{args:?}: expected `{want}` in:\n{e}");
    }
    // bdev mode shares one chain between jobs: fio's processes (no --thread) are refused.
    let out = fio(&[
        "--name=forked",
        "--rw=read",
        "--size=1M",
        "--ferroblk_mode=bdev",
        &config,
        "--filename=ram",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("needs --thread"), "{e}");
}

/// The load-time version check: the shim built as for another fio (only the version it was
/// built for differs) is refused by this fio with a message saying what to rebuild, before fio
/// reads its option table.
#[test]
fn a_fio_of_another_version_refuses_the_engine_with_a_clear_message() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = std::env::var_os("FIO_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../out/fio-src"));
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("other-fio.so");
    let st = Command::new("cc")
        .args([
            "-shared",
            "-fPIC",
            "-std=gnu99",
            "-D_GNU_SOURCE",
            "-include",
        ])
        .arg(src.join("config-host.h"))
        .arg("-I")
        .arg(&src)
        .arg("-DFERROBLK_FIO_VERSION=\"fio-0.0\"")
        .arg("-o")
        .arg(&so)
        .arg(manifest.join("src/shim.c"))
        .status()
        .unwrap();
    assert!(st.success(), "cc shim.c");
    let out = Command::new("fio")
        .args(["--name=x", "--filename=x", "--size=1M"])
        .arg(format!("--ioengine=external:{}", so.display()))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("built against fio-0.0 (ioengine ops version 31) but loaded by fio-"),
        "{e}"
    );
    assert!(e.contains("fio/fetch-headers.sh"), "{e}");
}
