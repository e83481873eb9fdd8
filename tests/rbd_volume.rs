//! `configs/rbd.toml` as written, against a real single-node Ceph cluster: the daemon serves the
//! encrypted volume on RBD over NVMe/TCP and vhost-user, `perf nvmf` drives it without an error,
//! and `bdev_resize` on the rbd volume grows the image in the cluster and the volume above it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::daemon::{BIN, free_port, rpc, start_daemon};
use ferroblk_rbd::testing::{POOL, TestCluster};

#[test]
fn the_rbd_example_serves_an_encrypted_rbd_volume_and_grows_it() {
    let c = TestCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/rbd.toml"))
            .unwrap();
    let port = free_port();
    let config = example
        .replace(
            "mon_host = \"v2:127.0.0.1:3300\"",
            &format!("mon_host = \"{}\"", c.mon_host()),
        )
        .replace("port = 4420", &format!("port = {port}"))
        .replace("socket = \"run/ferroblk.sock\"", "socket = \"rpc.sock\"");
    for moved in ["v2:127.0.0.1:3300", "port = 4420", "run/ferroblk.sock"] {
        assert!(
            example.contains(moved) && !config.contains(moved),
            "the example has {moved} to move"
        );
    }
    std::fs::write(d.join("ferroblk.toml"), config).unwrap();
    std::fs::create_dir_all(d.join("keys")).unwrap();
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    std::fs::write(d.join("keys/vol0.key"), key).unwrap();
    std::fs::set_permissions(d.join("keys/vol0.key"), PermissionsExt::from_mode(0o600)).unwrap();

    let mut daemon = start_daemon(d);
    let list = rpc(d, "bdev_list", "{}");
    assert!(
        list.contains("\"rbd0\"") && list.contains("\"vol0\""),
        "{list}"
    );
    let log = || std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default();
    assert!(
        d.join("run/vol0.sock").exists(),
        "no vhost-user socket:\n{}",
        log()
    );

    let out = Command::new(BIN)
        .args(["perf", "nvmf", "--addr"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--nqn",
            "nqn.2026-11.io.ferroblk:rbd",
            "--rw",
            "randrw",
            "--qd",
            "16",
        ])
        .args(["--time", "1", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ios"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");

    let r = rpc(d, "bdev_resize", r#"{"name": "rbd0", "size": "2GiB"}"#);
    assert!(r.contains(&(2u64 << 30).to_string()), "{r}");
    let list: serde_json::Value = serde_json::from_str(&rpc(d, "bdev_list", "{}")).unwrap();
    let size = |name: &str| {
        list.as_array()
            .or_else(|| list["bdevs"].as_array())
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| b.to_string())
            .unwrap()
    };
    assert!(
        size("vol0").contains(&(2u64 << 30).to_string()),
        "{}",
        size("vol0")
    );
    let info = c.rbd_ok(&["info", "--format", "json", &format!("{POOL}/ferroblk-vol0")]);
    assert!(info.contains(&format!("\"size\":{}", 2u64 << 30)), "{info}");
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
