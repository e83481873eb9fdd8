//! The README runs as written: its shell blocks marked `<!-- runnable -->` are run in order,
//! command by command, against a quickstart daemon in a temporary directory (as rustdoc runs
//! doc examples), so the README cannot drift from the code. The daemon, restarted afterwards,
//! must come back with what the README's RPC examples changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{BIN, free_port};
use serde_json::Value;

/// The binary path the README's commands use: what its first set-up command builds.
const README_BIN: &str = "out/release/ferroblk";

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// Every fenced `sh` block: (runnable, its commands with `\` continuations joined).
fn sh_blocks(text: &str) -> Vec<(bool, Vec<String>)> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().peekable();
    let mut marked = false;
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "<!-- runnable -->" {
            marked = true;
            continue;
        }
        if t == "```sh" {
            let mut cmds = Vec::new();
            let mut cur = String::new();
            for l in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                match l.strip_suffix('\\') {
                    Some(head) => cur.push_str(head),
                    None => {
                        cur.push_str(l);
                        if !cur.trim().is_empty() {
                            cmds.push(cur.trim().to_string());
                        }
                        cur.clear();
                    }
                }
            }
            blocks.push((marked, cmds));
        }
        marked = false;
    }
    blocks
}

/// A daemon child, killed and reaped if the test fails while it runs.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the quickstart configuration in `dir` (listeners moved to free ports so that tests
/// and other daemons on this machine do not collide), with `out/release/ferroblk` there.
fn start_quickstart(dir: &Path) -> Daemon {
    let child = Command::new(dir.join(README_BIN))
        .args(["serve", "--config", "ferroblk.toml"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("daemon.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(dir.join("run/ferroblk.sock")).is_err() {
        if let Ok(Some(st)) = d.0.try_wait() {
            panic!("daemon exited at start ({st}):\n{}", log(dir));
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no start:\n{}",
            log(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

fn rpc(dir: &Path, method: &str) -> Value {
    let out = Command::new(BIN)
        .args(["rpc", method])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{method}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn bdev<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|b| b["name"] == name)
}

#[test]
fn readme_shell_blocks_are_consistent() {
    let blocks = sh_blocks(&readme());
    // The set-up: exactly two commands, the first running the embedded default in the
    // release profile, whose binary the other commands use.
    assert_eq!(
        blocks[0].1,
        ["cargo run --release -- serve", "bash tests/run.sh"],
        "the README opens with its two set-up commands"
    );
    for (_, cmds) in &blocks {
        for c in cmds {
            assert!(
                !c.starts_with("ferroblk "),
                "`{c}`: no `ferroblk` on PATH; use {README_BIN}"
            );
            if c.contains("ferroblk ") && !c.starts_with("cargo ") {
                assert!(c.starts_with(README_BIN), "`{c}`: use {README_BIN}");
            }
        }
    }
    // `serve` and `check-config` without a file run the embedded quickstart.
    let dir = tempfile::tempdir().unwrap();
    let out_in_tmp = Command::new(BIN)
        .arg("check-config")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out_in_tmp.status.success(),
        "{}",
        String::from_utf8_lossy(&out_in_tmp.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out_in_tmp.stdout).contains("embedded configs/quickstart.toml"),
        "{out_in_tmp:?}"
    );
}

#[test]
fn readme_runs_as_written_and_a_restart_keeps_its_changes() {
    let blocks: Vec<Vec<String>> = sh_blocks(&readme())
        .into_iter()
        .filter(|(runnable, _)| *runnable)
        .map(|(_, c)| c)
        .collect();
    let all: Vec<&String> = blocks.iter().flatten().collect();
    for needed in [
        "bdev_create kind=malloc name=ram1",
        "bdev_resize name=vol0",
        "vhost_add socket=run/ram1.sock",
        "daemon_shutdown",
    ] {
        assert!(
            all.iter().any(|c| c.contains(needed)),
            "the runnable blocks show {needed}"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("out/release")).unwrap();
    std::os::unix::fs::symlink(BIN, dir.join(README_BIN)).unwrap();
    let quickstart = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml"),
    )
    .unwrap();
    let config = quickstart
        .replace("port = 4420", &format!("port = {}", free_port()))
        .replace("port = 8009", &format!("port = {}", free_port()));
    assert_ne!(config, quickstart, "the quickstart has listeners to move");
    std::fs::write(dir.join("ferroblk.toml"), config).unwrap();

    let mut daemon = start_quickstart(dir);
    for cmd in all {
        let out = Command::new("bash")
            .args(["-c", cmd])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README command failed: {cmd}\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log(dir)
        );
    }
    // The README's last runnable block stopped the daemon.
    let t = Instant::now();
    let status = loop {
        if let Some(st) = daemon.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon_shutdown did not stop it"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", log(dir));

    // Started again, it comes back as the README's RPC examples left it.
    let _daemon = start_quickstart(dir);
    let list = rpc(dir, "bdev_list");
    let vol0 = bdev(&list, "vol0").expect("vol0");
    assert_eq!(vol0["state"], "online", "{vol0}");
    assert_eq!(vol0["size"], 2u64 << 30, "vol0 keeps its online resize");
    assert_eq!(
        std::fs::metadata(dir.join("data/quickstart.img"))
            .unwrap()
            .len(),
        2 << 30
    );
    let ram1 = bdev(&list, "ram1").expect("the created bdev comes back");
    assert_eq!(ram1["size"], 1u64 << 30);
    assert!(
        bdev(&list, "err1").is_none(),
        "the deleted bdev stays deleted"
    );
    let vhost = rpc(dir, "vhost_list");
    let sockets: Vec<PathBuf> = vhost
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "online")
        .map(|v| PathBuf::from(v["socket"].as_str().unwrap()))
        .collect();
    assert_eq!(
        sockets,
        [
            PathBuf::from("run/quickstart.sock"),
            PathBuf::from("run/ram1.sock")
        ],
        "the added export comes back, the removed one does not"
    );
    let subsystems = rpc(dir, "nvmf_subsystem_list");
    assert_eq!(subsystems[0]["namespaces"][0]["size"], 2u64 << 30);
}
