//! `configs/rbd.toml` as written, against a real single-node Ceph cluster: the daemon serves the
//! encrypted volume on RBD over NVMe/TCP and vhost-user, `perf nvmf` drives it without an error,
//! and `bdev_resize` on the rbd volume grows the image in the cluster and the volume above it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::daemon::{BIN, free_port, rpc, start_daemon};
use ferroblk_rbd::testing::{POOL, TestCluster};

/// Bdev `name` in the daemon's `bdev_list`.
fn bdev(dir: &Path, name: &str) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_str(&rpc(dir, "bdev_list", "{}")).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no bdev {name} in {list}"))
}

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

    // A volume on an image that does not exist, over the RPC: refused, naming the field; the
    // daemon keeps serving.
    let params = format!(
        r#"{{"kind": "rbd", "name": "rbd1", "mon_host": "{}", "auth": "none", "pool": "{POOL}", "image": "nosuch"}}"#,
        c.mon_host()
    );
    let out = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(d.join("rpc.sock"))
        .args(["bdev_create", &params])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("image") && err.contains("no such image"),
        "{err}"
    );
    assert_eq!(bdev(d, "vol0")["state"], "online");

    let r = rpc(d, "bdev_resize", r#"{"name": "rbd0", "size": "2GiB"}"#);
    assert!(r.contains(&(2u64 << 30).to_string()), "{r}");
    let vol0 = bdev(d, "vol0");
    assert_eq!(vol0["size"], 2u64 << 30, "{vol0}");
    let info = c.rbd_ok(&["info", "--format", "json", &format!("{POOL}/ferroblk-vol0")]);
    assert!(info.contains(&format!("\"size\":{}", 2u64 << 30)), "{info}");
    assert!(daemon.stop(), "the daemon did not stop cleanly");

    // Restarted, the daemon opens the grown image again (the state file has its size).
    let mut daemon = start_daemon(d);
    let vol0 = bdev(d, "vol0");
    assert_eq!(
        (&vol0["state"], &vol0["size"]),
        (&"online".into(), &(2u64 << 30).into())
    );
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}

#[test]
fn an_unreachable_cluster_fails_its_volume_and_the_daemon_serves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Monitors nobody answers for.
    let mon = free_port();
    std::fs::write(
        d.join("ferroblk.toml"),
        format!(
            "[rpc]\nsocket = \"rpc.sock\"\n\
             [[bdev]]\nname = \"m\"\nkind = \"malloc\"\nsize = \"1MiB\"\n\
             [[bdev]]\nname = \"r\"\nkind = \"rbd\"\nmon_host = \"v2:127.0.0.1:{mon}\"\n\
             auth = \"none\"\npool = \"rbd\"\nimage = \"i\"\nconnect_timeout_secs = 1\n"
        ),
    )
    .unwrap();
    let mut daemon = start_daemon(d);
    assert_eq!(bdev(d, "m")["state"], "online");
    let r = bdev(d, "r");
    assert_eq!(r["state"], "failed", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("mon_host: cannot connect to the cluster"),
        "{reason}"
    );
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}

#[test]
fn check_config_reaches_the_cluster_and_reports_what_serve_would_refuse() {
    let c = TestCluster::start();
    for image in ["fine", "small"] {
        c.rbd_ok(&["create", "--size", "1M", &format!("{POOL}/{image}")]);
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keyring = d.join("wrong.keyring");
    std::fs::write(
        &keyring,
        "[client.admin]\n\tkey = AQBXtm9lAAAAABAAvOb8zLZ6JGpGjFGrLDUabw==\n",
    )
    .unwrap();
    let mon = c.mon_host();
    let nobody = free_port();
    let rbd = |name: &str, fields: &str| {
        format!(
            "[[bdev]]\nname = \"{name}\"\nkind = \"rbd\"\npool = \"{POOL}\"\n\
             connect_timeout_secs = 2\n{fields}\n"
        )
    };
    let config = [
        "[rpc]\nsocket = \"rpc.sock\"\n".to_string(),
        "[[bdev]]\nname = \"m\"\nkind = \"malloc\"\nsize = \"1MiB\"\n".to_string(),
        // Fine: an existing image, and one that serve would create.
        rbd(
            "ok",
            &format!("mon_host = \"{mon}\"\nauth = \"none\"\nimage = \"fine\""),
        ),
        rbd(
            "new",
            &format!(
                "mon_host = \"{mon}\"\nauth = \"none\"\nimage = \"new\"\ncreate = true\n\
                 size = \"1MiB\""
            ),
        ),
        // Refused, each naming its field.
        rbd(
            "noimage",
            &format!("mon_host = \"{mon}\"\nauth = \"none\"\nimage = \"nosuch\""),
        ),
        rbd(
            "nopool",
            &format!("mon_host = \"{mon}\"\nauth = \"none\"\nimage = \"small\""),
        )
        .replace(&format!("pool = \"{POOL}\""), "pool = \"nopool\""),
        rbd(
            "small",
            &format!("mon_host = \"{mon}\"\nauth = \"none\"\nimage = \"small\"\nsize = \"2MiB\""),
        ),
        rbd(
            "key",
            &format!(
                "mon_host = \"{mon}\"\nkeyring = \"{}\"\nimage = \"small\"",
                keyring.display()
            ),
        ),
        rbd(
            "away",
            &format!("mon_host = \"v2:127.0.0.1:{nobody}\"\nauth = \"none\"\nimage = \"small\""),
        ),
    ]
    .concat();
    std::fs::write(d.join("ferroblk.toml"), &config).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "ferroblk.toml"])
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let problems: Vec<&str> = err.lines().collect();
    let expect = [
        (3, "image", "no such image"),
        (4, "pool", "no such pool"),
        (5, "size", "smaller than the declared"),
        (6, "keyring", "refused client.admin"),
        (
            7,
            "mon_host",
            "cannot connect to the cluster as client.admin within 2 s",
        ),
    ];
    assert_eq!(problems.len(), expect.len(), "{err}");
    // check-config created nothing.
    let ls = c.rbd_ok(&["ls", POOL]);
    assert_eq!(ls.split_whitespace().collect::<Vec<_>>(), ["fine", "small"]);

    // serve refuses the same volumes with the same words, and serves the others.
    let mut daemon = start_daemon(d);
    for (i, name) in ["m", "ok", "new"].into_iter().enumerate() {
        assert_eq!(bdev(d, name)["state"], "online", "bdev[{i}] {name}");
    }
    for ((i, field, words), line) in expect.into_iter().zip(&problems) {
        assert!(
            line.contains(&format!("bdev[{i}].{field}: ")) && line.contains(words),
            "bdev[{i}].{field} ({words}): {line}\n{err}"
        );
        let name = config.split("[[bdev]]").nth(i + 1).unwrap();
        let name = name.split('"').nth(1).unwrap();
        let served = bdev(d, name);
        assert_eq!(served["state"], "failed", "{served}");
        let reason = served["reason"].as_str().unwrap();
        assert!(
            line.ends_with(&format!("bdev[{i}].{reason}")),
            "check-config said\n  {line}\nserve said\n  {reason}"
        );
    }
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
