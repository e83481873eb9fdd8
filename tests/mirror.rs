//! The `mirror` bdev in the daemon: `configs/mirror.toml` loaded as shipped (its port and
//! socket moved for the test), a new child added over the RPC and rebuilt while a second
//! process (`ferroblk perf nvmf`) writes through NVMe/TCP, the children's files compared equal
//! after a clean stop, the state file serving the new membership after a restart, and bad
//! mirror declarations refused naming the field.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{BIN, free_port, rpc, start_daemon};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vol0(dir: &Path) -> Value {
    let v: Value = serde_json::from_str(&rpc(dir, "bdev_list", r#"{"name":"vol0"}"#)).unwrap();
    match v {
        Value::Array(mut a) => a.remove(0),
        v => v,
    }
}

/// Waits until every child of `vol0` is healthy and `n` rebuilds have completed.
fn wait_healthy(dir: &Path, children: usize, rebuilds: u64) -> Value {
    let t = Instant::now();
    loop {
        let v = vol0(dir);
        let d = &v["details"];
        let kids = d["children"].as_array().unwrap();
        if kids.len() == children
            && kids.iter().all(|c| c["state"] == "healthy")
            && d["rebuild"].is_null()
            && d["rebuilds_completed"].as_u64().unwrap() >= rebuilds
        {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "mirror did not become healthy: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn writes(v: &Value) -> u64 {
    v["stats"]["ops"]["write"].as_u64().unwrap()
}

/// The first `len` bytes of `path`.
fn head(path: &Path, len: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut v = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut v).unwrap();
    assert_eq!(v.len() as u64, len);
    v
}

#[test]
fn a_child_added_over_the_rpc_is_rebuilt_while_a_host_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let cfg = std::fs::read_to_string(repo().join("configs/mirror.toml"))
        .unwrap()
        .replace("socket = \"run/mirror.sock\"", "socket = \"rpc.sock\"")
        .replace("port = 4421", &format!("port = {port}"));
    std::fs::write(d.join("ferroblk.toml"), cfg).unwrap();
    let mut daemon = start_daemon(d);

    // First start: disk-b is copied from disk-a.
    let v = wait_healthy(d, 2, 1);
    let size = v["size"].as_u64().unwrap();
    assert!(size > 250 << 20 && size < 256 << 20, "{v}");

    rpc(
        d,
        "bdev_create",
        r#"{"kind":"file","name":"disk-c","path":"data/mirror-c.img","size":"256MiB","create":true}"#,
    );
    // A host writes through NVMe/TCP for the whole test.
    let addr = format!("127.0.0.1:{port}");
    let perf = Command::new(BIN)
        .args([
            "perf",
            "nvmf",
            "--addr",
            &addr,
            "--nqn",
            "nqn.2026-11.io.ferroblk:mirror",
            "--rw",
            "randwrite",
            "--qd",
            "8",
            "--time",
            "6",
            "--json",
        ])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let before = writes(&vol0(d));
    while writes(&vol0(d)) < before + 200 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the host never wrote"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_add = writes(&vol0(d));
    let r: Value = serde_json::from_str(&rpc(
        d,
        "mirror_add_child",
        r#"{"name":"vol0","child":"disk-c"}"#,
    ))
    .unwrap();
    assert_eq!(r["children"][2]["name"], "disk-c", "{r}");
    let v = wait_healthy(d, 3, 2);
    assert!(
        writes(&v) > at_add,
        "the host's writes went on during the rebuild: {v}"
    );
    assert_eq!(v["details"]["dirty_regions"], 0, "{v}");
    assert_eq!(
        v["users"].as_array().unwrap().len(),
        2,
        "vhost and nvmf: {v}"
    );
    let listed: Value = serde_json::from_str(&rpc(d, "bdev_list", r#"{"name":"disk-c"}"#)).unwrap();
    assert!(listed.to_string().contains("bdev vol0"), "{listed}");

    let out = perf.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(p["ios"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(p["errors"], 0, "the host saw no error: {p}");

    // Bad requests name the field.
    let bad = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(d.join("rpc.sock"))
        .args(["mirror_add_child", r#"{"name":"vol0","child":"nope"}"#])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("child"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // A clean stop flushes; the three children hold the same data.
    assert!(daemon.stop(), "daemon stopped cleanly");
    let a = head(&d.join("data/mirror-a.img"), size);
    for other in ["data/mirror-b.img", "data/mirror-c.img"] {
        assert!(
            a == head(&d.join(other), size),
            "{other} differs from disk-a"
        );
    }
    assert!(a.iter().any(|&b| b != 0), "the host's writes are there");

    // Restarted: the state file keeps disk-c as a child; nothing to copy.
    let mut daemon = start_daemon(d);
    let v = wait_healthy(d, 3, 0);
    assert_eq!(v["details"]["regions_copied"], 0, "{v}");
    assert_eq!(
        v["spec"]["children"],
        serde_json::json!(["disk-a", "disk-b", "disk-c"]),
        "{v}"
    );
    rpc(
        d,
        "mirror_remove_child",
        r#"{"name":"vol0","child":"disk-a"}"#,
    );
    let v = vol0(d);
    assert_eq!(
        v["spec"]["children"],
        serde_json::json!(["disk-b", "disk-c"]),
        "{v}"
    );
    rpc(d, "bdev_delete", r#"{"name":"disk-a"}"#);
    assert!(daemon.stop());
}

#[test]
fn bad_mirror_declarations_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &str, args: &[&str]| -> String {
        let cfg = format!(
            "[[bdev]]\nname = \"a\"\nkind = \"malloc\"\nsize = \"4MiB\"\n\
             [[bdev]]\nname = \"b\"\nkind = \"malloc\"\nsize = \"8MiB\"\n\
             [[bdev]]\nname = \"m\"\nkind = \"mirror\"\n{extra}"
        );
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = Command::new(BIN)
            .args(args)
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra}: accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let check_config = ["check-config"];
    let e = check("children = []\n", &check_config);
    assert!(
        e.contains("bdev[2].children") && e.contains("at least one"),
        "{e}"
    );
    let e = check("children = [\"a\", \"a\"]\n", &check_config);
    assert!(
        e.contains("bdev[2].children[1]") && e.contains("once"),
        "{e}"
    );
    let e = check("children = [\"a\", \"ghost\"]\n", &check_config);
    assert!(
        e.contains("bdev[2].children[1]") && e.contains("ghost"),
        "{e}"
    );
    // Sizes are known once the children open: `serve --strict` refuses to start.
    let e = check(
        "children = [\"a\", \"b\"]\n",
        &["serve", "--strict", "--config"],
    );
    assert!(e.contains("children[1]") && e.contains("one size"), "{e}");
}
