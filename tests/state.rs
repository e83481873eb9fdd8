//! Live state across restarts (`src/state.rs`) and `check-config` running what `serve` checks,
//! with `ferroblk serve` as a child process.

mod common;

use std::path::Path;
use std::process::Command;

use common::daemon::{BIN, rpc, start_daemon};
use serde_json::Value;

const XTS_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
                       fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

fn check_config(dir: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["check-config", "ferroblk.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn bdevs(dir: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_str(&rpc(dir, "bdev_list", "{}")).unwrap();
    v.as_array().unwrap().clone()
}

fn state_of(list: &[Value], name: &str) -> String {
    list.iter()
        .find(|b| b["name"] == name)
        .map_or("absent".into(), |b| {
            b["state"].as_str().unwrap().to_string()
        })
}

#[test]
fn check_config_runs_the_checks_serve_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("small.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(
        dir.join("ferroblk.toml"),
        format!(
            "[rpc]\nsocket = \"rpc.sock\"\n\
             [[bdev]]\nname = \"a\"\nkind = \"file\"\npath = \"small.img\"\nsize = \"2MiB\"\n\
             [[bdev]]\nname = \"b\"\nkind = \"file\"\npath = \"missing.img\"\nsize = \"1MiB\"\n\
             [[bdev]]\nname = \"c\"\nkind = \"file\"\npath = \"new/c.img\"\nsize = \"1MiB\"\ncreate = true\n\
             [[bdev]]\nname = \"x\"\nkind = \"crypt_xts\"\nbase = \"c\"\nkey_file = \"no.key\"\n\
             [[bdev]]\nname = \"m\"\nkind = \"malloc\"\nsize = \"1MiB\"\n\
             [[bdev]]\nname = \"g\"\nkind = \"crypt_gcm\"\nbase = \"m\"\nkey_hex = \"0011\"\n\
             [[bdev]]\nname = \"n\"\nkind = \"malloc\"\nsize = \"1MiB\"\n\
             [[bdev]]\nname = \"y\"\nkind = \"crypt_xts\"\nbase = \"n\"\nkey_hex = \"{}\"\n",
            &XTS_KEY[..64]
        ),
    )
    .unwrap();
    let (ok, out) = check_config(dir);
    assert!(!ok, "{out}");
    // Every problem, each naming its field, as serve would meet them.
    assert!(
        out.contains("bdev[0].size: small.img is 1048576 bytes but size = 2097152"),
        "{out}"
    );
    assert!(
        out.contains("bdev[1].path: missing.img does not exist"),
        "{out}"
    );
    assert!(out.contains("bdev[3].key_file"), "{out}");
    assert!(out.contains("bdev[5].key_hex"), "{out}");
    assert!(
        out.contains("bdev[7].key_hex: the key is 32 bytes; this kind takes 64"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 5, "{out}");
    // Nothing was created or changed.
    assert!(!dir.join("new").exists());
    assert_eq!(
        std::fs::metadata(dir.join("small.img")).unwrap().len(),
        1 << 20
    );
}

#[test]
fn a_restart_comes_back_to_the_live_state_without_keys_in_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key_file = dir.join("k.key");
    std::fs::write(&key_file, XTS_KEY).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        dir.join("ferroblk.toml"),
        format!(
            "[reactors]\ncount = 1\n[rpc]\nsocket = \"rpc.sock\"\n\
             [[bdev]]\nname = \"disk\"\nkind = \"file\"\npath = \"disk.img\"\nsize = \"4MiB\"\ncreate = true\n\
             [[bdev]]\nname = \"m\"\nkind = \"malloc\"\nsize = \"4MiB\"\n\
             [[bdev]]\nname = \"inline\"\nkind = \"crypt_xts\"\nbase = \"m\"\nkey_hex = \"{XTS_KEY}\"\n"
        ),
    )
    .unwrap();
    let mut d = start_daemon(dir);
    assert!(
        !dir.join("ferroblk.state.json").exists(),
        "no state file before a change"
    );
    rpc(dir, "bdev_resize", r#"{"name": "disk", "size": "8MiB"}"#);
    rpc(
        dir,
        "bdev_create",
        r#"{"kind": "malloc", "name": "m2", "size": "4MiB"}"#,
    );
    rpc(
        dir,
        "bdev_create",
        r#"{"kind": "malloc", "name": "m3", "size": "4MiB"}"#,
    );
    // A key given inline over the RPC could be saved only in clear: refused, naming the field.
    let out = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(dir.join("rpc.sock"))
        .arg("bdev_create")
        .arg(format!(
            r#"{{"kind": "crypt_xts", "name": "viarpc", "base": "m2", "key_hex": "{XTS_KEY}"}}"#
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"key_hex\""),
        "{err}"
    );
    rpc(
        dir,
        "bdev_create",
        &format!(
            r#"{{"kind": "crypt_xts", "name": "viafile", "base": "m3", "key_file": "{}"}}"#,
            key_file.display()
        ),
    );
    rpc(
        dir,
        "vhost_add",
        r#"{"socket": "disk.sock", "bdev": "disk", "num_queues": 1}"#,
    );
    let saved = std::fs::read_to_string(dir.join("ferroblk.state.json")).unwrap();
    assert!(!saved.contains(&XTS_KEY[..32]), "a key in clear: {saved}");
    assert!(
        !saved.contains(&XTS_KEY[128 - 32..]),
        "a key in clear: {saved}"
    );
    assert!(
        !std::fs::read_to_string(dir.join("daemon.log"))
            .unwrap()
            .contains(&XTS_KEY[..32])
    );
    assert!(
        d.stop(),
        "{}",
        std::fs::read_to_string(dir.join("daemon.log")).unwrap()
    );

    // The grown file no longer blocks the start, for check-config or serve.
    let (ok, out) = check_config(dir);
    assert!(ok, "{out}");
    assert!(out.contains("ferroblk.state.json"), "{out}");
    let mut d = start_daemon(dir);
    let list = bdevs(dir);
    let disk = list.iter().find(|b| b["name"] == "disk").unwrap();
    assert_eq!(disk["size"], 8u64 << 20, "{disk}");
    assert_eq!(state_of(&list, "m2"), "online");
    // The configuration's inline key and the key file come back.
    assert_eq!(state_of(&list, "inline"), "online");
    assert_eq!(state_of(&list, "viafile"), "online");
    assert_eq!(state_of(&list, "viarpc"), "absent");
    let vhost: Value = serde_json::from_str(&rpc(dir, "vhost_list", "{}")).unwrap();
    assert_eq!(vhost[0]["socket"], "disk.sock", "{vhost}");
    assert_eq!(vhost[0]["state"], "online", "{vhost}");
    // Deleting (here a bdev declared in the configuration) is a change like any other.
    rpc(dir, "bdev_delete", r#"{"name": "inline"}"#);
    assert!(d.stop());
    let _d = start_daemon(dir);
    assert_eq!(state_of(&bdevs(dir), "inline"), "absent");
}
