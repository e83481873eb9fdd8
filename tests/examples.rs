//! The README's one-command examples run as written: `examples/vm.sh` (a lab guest uses the
//! quickstart volume over vhost-user-blk) and `examples/host.sh` (a lab guest attaches it over
//! NVMe/TCP), each against a quickstart daemon in a temporary directory with its listeners on
//! free ports. What the guest wrote must be in the daemon's backing file afterwards.
//!
//! Each example boots a guest under QEMU software emulation (tests/lab/), about a minute of CPU;
//! the two tests take turns.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, free_port, start_daemon};
use common::lab::Lab;

/// One guest at a time: the machine's cores are shared.
static ONE_GUEST: Mutex<()> = Mutex::new(());

const NQN: &str = "nqn.2026-11.io.ferroblk:quickstart";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The quickstart as the README's first command runs it, in `dir`: its I/O and discovery
/// listeners moved to free ports (returned in that order), its control socket to `rpc.sock`.
fn start_quickstart(dir: &Path) -> (Daemon, u16, u16) {
    let quickstart = std::fs::read_to_string(repo().join("configs/quickstart.toml")).unwrap();
    let (io, discovery) = (free_port(), free_port());
    let config = quickstart
        .replace("port = 4420", &format!("port = {io}"))
        .replace("port = 8009", &format!("port = {discovery}"))
        .replace(r#"socket = "run/ferroblk.sock""#, r#"socket = "rpc.sock""#);
    for moved in ["port = 4420", "port = 8009", "run/ferroblk.sock"] {
        assert!(
            quickstart.contains(moved) && !config.contains(moved),
            "the quickstart has {moved} to move"
        );
    }
    std::fs::write(dir.join("ferroblk.toml"), config).unwrap();
    let daemon = start_daemon(dir);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(dir.join("run/quickstart.sock")).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no run/quickstart.sock:\n{}",
            log(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, io, discovery)
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

/// Runs `bash examples/NAME args` from the repository root, as the README does.
fn example(name: &str, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(repo().join("examples").join(name))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The output's lines, console carriage returns removed.
fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// The value after `key` on the line starting with `prefix` (`... key=VALUE ...`).
fn field(lines: &[String], prefix: &str, key: &str) -> String {
    let line = lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
}

fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn readme_points_to_the_examples() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for (section, command) in [
        ("## Attaching a VM (vhost-user-blk)", "bash examples/vm.sh"),
        ("## Attaching a host (NVMe/TCP)", "bash examples/host.sh"),
    ] {
        let body = readme
            .split_once(section)
            .unwrap_or_else(|| panic!("README has {section}"))
            .1;
        let body = body.split("\n## ").next().unwrap();
        assert!(
            body.lines().any(|l| l.starts_with(command)),
            "{section} shows `{command}`"
        );
        // Every command line shown runs as written: no `...` to fill in.
        let mut fenced = false;
        for l in body.lines() {
            if l.starts_with("```") {
                fenced = !fenced;
            } else {
                assert!(
                    !(fenced && l.contains("...")),
                    "{section}: placeholder {l:?}"
                );
            }
        }
    }
}

#[test]
fn examples_refuse_to_run_without_a_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("quickstart.sock");
    let out = example("vm.sh", &["--socket", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no vhost-user-blk socket at"),
        "{}",
        text(&out)
    );
    let closed = free_port().to_string();
    let out = example("host.sh", &["--port", &closed, "--discovery-port", &closed]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("nothing listens on 127.0.0.1:{closed}")),
        "{}",
        text(&out)
    );
    let out = example("vm.sh", &["--queues", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn vm_example_formats_writes_and_reads_back_the_quickstart_volume() {
    Lab::prepare().unwrap_or_else(|e| panic!("the guest lab could not be prepared: {e:#}"));
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut daemon, _, _) = start_quickstart(dir);
    let socket: PathBuf = dir.join("run/quickstart.sock");

    let out = example("vm.sh", &["--socket", socket.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}\ndaemon log:\n{}",
        text(&out),
        log(dir)
    );
    let lines = lines(&out);
    let has = |l: &str| lines.iter().any(|x| x == l);
    // lsblk: the quickstart's 1 GiB volume with 4 KiB blocks and discard.
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["vda", "1G", "4096", "4096", "4K", "0", "disk"]),
        "{}",
        text(&out)
    );
    assert!(
        has("guest: /dev/vda serial=ferroblk-quickstart queues=2"),
        "{}",
        text(&out)
    );
    let written = field(&lines, "guest: wrote", "sha256=");
    assert_eq!(field(&lines, "guest: read ", "sha256="), written);
    assert!(
        has("guest: OK: the file read back from /dev/vda matches what was written"),
        "{}",
        text(&out)
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some(
            "vm.sh: OK: a VM formatted, wrote and read back its ferroblk disk over vhost-user-blk"
        )
    );
    assert!(daemon.stop(), "{}", log(dir));

    // The guest's file system is in the quickstart's backing file: the ext4 superblock at
    // 1024 has its magic 0xEF53 at +0x38 and the volume label `mkfs.ext4 -L` gave at +0x78.
    let sb = read_at(&dir.join("data/quickstart.img"), 1024, 1024);
    assert_eq!(sb[0x38..0x3a], [0x53, 0xef], "ext4 magic");
    assert_eq!(&sb[0x78..0x78 + 9], b"ferroblk\0", "ext4 label");
}

#[test]
fn host_example_attaches_the_quickstart_over_nvme_tcp() {
    Lab::prepare().unwrap_or_else(|e| panic!("the guest lab could not be prepared: {e:#}"));
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut daemon, io, discovery) = start_quickstart(dir);

    let out = example(
        "host.sh",
        &[
            "--port",
            &io.to_string(),
            "--discovery-port",
            &discovery.to_string(),
            "--nqn",
            NQN,
        ],
    );
    assert!(
        out.status.success(),
        "{}\ndaemon log:\n{}",
        text(&out),
        log(dir)
    );
    let lines = lines(&out);
    let has = |l: &str| lines.iter().any(|x| x == l);
    // The discovery log page lists the subsystem at the I/O port.
    assert!(has(&format!("subnqn:  {NQN}")), "{}", text(&out));
    assert!(has(&format!("trsvcid: {io}")), "{}", text(&out));
    let dev = lines
        .iter()
        .find_map(|l| l.strip_prefix("guest: the namespace is /dev/"))
        .unwrap_or_else(|| panic!("no namespace line:\n{}", text(&out)))
        .to_string();
    // `nvme list`: the namespace with the quickstart subsystem's model.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("/dev/{dev} ")) && l.contains("ferroblk quickstart")),
        "{}",
        text(&out)
    );
    let written = field(&lines, "guest: wrote", "sha256=");
    assert_eq!(field(&lines, "guest: read ", "sha256="), written);
    assert!(
        has(&format!("NQN:{NQN} disconnected 1 controller(s)")),
        "{}",
        text(&out)
    );
    assert!(
        has("guest: OK: the NVMe/TCP namespace read back what was written, and is detached"),
        "{}",
        text(&out)
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some(
            "host.sh: OK: a host attached, wrote, read back and detached its ferroblk disk over \
             NVMe/TCP"
        )
    );
    assert!(daemon.stop(), "{}", log(dir));

    // What the host wrote is in the quickstart's backing file, at the offset it wrote to.
    let wrote = lines
        .iter()
        .find(|l| l.starts_with("guest: wrote"))
        .unwrap();
    let offset: u64 = wrote.rsplit(' ').next().unwrap().parse().unwrap();
    let data = read_at(&dir.join("data/quickstart.img"), offset, 16 << 20);
    assert_eq!(sha256_hex(&data), written);
}
