//! qemu-storage-daemon (Debian's `qemu-system-common`) as a vhost-user-blk peer: installed on
//! first use where missing, one export per [`Qsd`], killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The peer's binary.
pub const QSD: &str = "qemu-storage-daemon";

fn qsd_runs() -> bool {
    Command::new(QSD)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_get(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether qemu-storage-daemon is there, installing `qemu-system-common` once if it is not.
pub fn qsd_available() -> bool {
    static CHECKED: Mutex<Option<bool>> = Mutex::new(None);
    let mut g = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    *g.get_or_insert_with(|| {
        if qsd_runs() {
            return true;
        }
        eprintln!("{QSD} missing: installing qemu-system-common");
        let install = ["install", "-y", "-qq", "qemu-system-common"];
        (apt_get(&install) || (apt_get(&["update", "-qq"]) && apt_get(&install))) && qsd_runs()
    })
}

/// A qemu-storage-daemon exporting one block node over vhost-user-blk; killed (by PID) on drop.
pub struct Qsd {
    child: Child,
    /// The export's vhost-user socket.
    pub sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qsd {
    /// Starts `--blockdev {blockdev},node-name=n0` exported on a socket in a fresh directory.
    pub fn start(blockdev: &str, writable: bool, queues: u32) -> Qsd {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,addr.path={},writable={},num-queues={queues}",
            sock.display(),
            if writable { "on" } else { "off" },
        );
        let mut child = Command::new(QSD)
            .args(["--blockdev", &format!("{blockdev},node-name=n0")])
            .args(["--export", &export])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let t0 = Instant::now();
        while !sock.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("{QSD} exited at start: {st}");
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{QSD} did not create {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd {
            child,
            sock,
            _dir: dir,
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // Child::kill signals this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
