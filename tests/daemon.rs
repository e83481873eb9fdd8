//! The daemon as a user runs it: `ferroblk serve` as a child process, its control socket, its
//! signals, and `ferroblk rpc` / `perf` / `check-config`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_ferroblk");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts `ferroblk serve` in a fresh working directory with `config` written there.
    fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ferroblk.toml"), config).unwrap();
        Daemon::start_in(dir, "ferroblk.toml", "run/ferroblk.sock")
    }

    fn start_in(dir: tempfile::TempDir, config: &str, socket: &str) -> Daemon {
        let child = Command::new(BIN)
            .args(["serve", "--config", config])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let socket = dir.path().join(socket);
        let mut d = Daemon {
            child,
            socket,
            dir: Some(dir),
        };
        let t = Instant::now();
        while UnixStream::connect(&d.socket).is_err() {
            if let Some(st) = d.child.try_wait().unwrap() {
                let out = d.child.wait_with_output_now();
                panic!("daemon exited with {st}: {out}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, Value> {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["id"], 7);
        match v.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(v["result"].clone()),
        }
    }

    fn raw(&self, line: &str) -> Value {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut out = String::new();
        BufReader::new(&s).read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap()
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill with a valid pid and signal number has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit; returns (success, stdout + stderr).
    fn wait(mut self) -> (bool, String, tempfile::TempDir) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let out = self.child.wait_with_output_now();
                return (st.success(), out, self.dir.take().unwrap());
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!("daemon did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

trait OutputNow {
    fn wait_with_output_now(&mut self) -> String;
}

impl OutputNow for Child {
    fn wait_with_output_now(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(o) = self.stdout.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        if let Some(e) = self.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BASIC: &str = r#"
[reactors]
count = 2
[[bdev]]
name = "disk"
kind = "file"
path = "data/disk.img"
size = "16MiB"
create = true
[[bdev]]
name = "err"
kind = "error"
base = "disk"
"#;

fn code(e: &Value) -> i64 {
    e["code"].as_i64().unwrap()
}

#[test]
fn rpc_round_trips_and_errors() {
    let d = Daemon::start(BASIC);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket must be private");

    let st = d.call("daemon_status", Value::Null).unwrap();
    assert_eq!(st["reactors"], 2);
    assert_eq!(st["bdevs"], 2);

    let list = d.call("bdev_list", Value::Null).unwrap();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].clone())
        .collect();
    assert_eq!(names, [json!("disk"), json!("err")]);
    assert_eq!(list[0]["size"], 16 << 20);
    assert_eq!(list[0]["users"], json!(["bdev err"]));
    assert!(
        list[0]["caps"]
            .as_array()
            .unwrap()
            .contains(&json!("persistent"))
    );

    // Create, duplicate, bad field, bad value.
    let r = d
        .call(
            "bdev_create",
            json!({"kind": "malloc", "name": "ram", "size": "8MiB"}),
        )
        .unwrap();
    assert_eq!(r["size"], 8 << 20);
    let e = d
        .call(
            "bdev_create",
            json!({"kind": "malloc", "name": "ram", "size": "8MiB"}),
        )
        .unwrap_err();
    assert_eq!(code(&e), -32002, "{e}");
    let e = d
        .call(
            "bdev_create",
            json!({"kind": "malloc", "name": "x", "size": 4096, "colour": 1}),
        )
        .unwrap_err();
    assert_eq!(code(&e), -32602, "{e}");
    assert!(e["message"].as_str().unwrap().contains("colour"), "{e}");
    let e = d
        .call(
            "bdev_create",
            json!({"kind": "malloc", "name": "x", "size": 1000}),
        )
        .unwrap_err();
    assert_eq!(e["data"]["field"], "size", "{e}");
    let e = d
        .call(
            "bdev_create",
            json!({"kind": "delay", "name": "x", "base": "nope"}),
        )
        .unwrap_err();
    assert_eq!(e["data"]["field"], "base", "{e}");

    // Resize: grows the file; a shrink is refused.
    let r = d
        .call("bdev_resize", json!({"name": "disk", "size": "32MiB"}))
        .unwrap();
    assert_eq!(r["size"], 32 << 20);
    let img = d.path().join("data/disk.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
    let l = d.call("bdev_list", json!({"name": "err"})).unwrap();
    assert_eq!(l[0]["size"], 32 << 20, "stacked bdev follows its base");
    let l = d.call("bdev_list", json!({"name": "disk"})).unwrap();
    assert_eq!(
        l[0]["spec"]["size"],
        32 << 20,
        "spec.size is the current size: {l}"
    );
    assert!(
        d.call("bdev_resize", json!({"name": "disk", "size": "8MiB"}))
            .is_err()
    );

    // Error injection on the error bdev; refused on others.
    let r = d
        .call(
            "bdev_error_inject",
            json!({"name": "err", "rule": {"ops": ["read"], "count": 1}}),
        )
        .unwrap();
    assert_eq!(r["rule"]["ops"], json!(["read"]));
    let e = d
        .call(
            "bdev_error_inject",
            json!({"name": "disk", "rule": {"ops": ["read"]}}),
        )
        .unwrap_err();
    assert_eq!(code(&e), -32004, "{e}");
    let e = d
        .call(
            "bdev_error_inject",
            json!({"name": "err", "rule": {"ops": ["smash"]}}),
        )
        .unwrap_err();
    assert_eq!(e["data"]["field"], "rule.ops[0]", "{e}");

    // The delays of a delay bdev change at run time; other kinds refuse.
    d.call(
        "bdev_create",
        json!({"kind": "delay", "name": "slowram", "base": "ram", "read_us": 7}),
    )
    .unwrap();
    let r = d
        .call(
            "bdev_delay_set",
            json!({"name": "slowram", "write_us": 1500}),
        )
        .unwrap();
    assert_eq!(r, json!({"read_us": 7, "write_us": 1500, "other_us": 0}));
    let l = d.call("bdev_list", json!({"name": "slowram"})).unwrap();
    assert_eq!(l[0]["details"]["write_us"], 1500, "{l}");
    let e = d
        .call("bdev_delay_set", json!({"name": "ram", "write_us": 1}))
        .unwrap_err();
    assert_eq!(code(&e), -32004, "{e}");
    let e = d
        .call("bdev_delay_set", json!({"name": "slowram", "write_ms": 1}))
        .unwrap_err();
    assert_eq!(code(&e), -32602, "{e}");
    d.call("bdev_delete", json!({"name": "slowram"})).unwrap();

    // Delete: a base in use is refused, then works bottom-up.
    let e = d.call("bdev_delete", json!({"name": "disk"})).unwrap_err();
    assert_eq!(code(&e), -32003, "{e}");
    d.call("bdev_delete", json!({"name": "err"})).unwrap();
    d.call("bdev_delete", json!({"name": "disk"})).unwrap();
    let e = d.call("bdev_delete", json!({"name": "disk"})).unwrap_err();
    assert_eq!(code(&e), -32001, "{e}");

    // Protocol errors.
    assert_eq!(code(&d.raw("this is not json")["error"]), -32700);
    assert_eq!(code(&d.raw(r#"{"method": "bdev_list"}"#)["error"]), -32600);
    assert_eq!(
        code(&d.call("no_such_method", Value::Null).unwrap_err()),
        -32601
    );

    let reactors = d.call("reactor_list", Value::Null).unwrap();
    assert_eq!(reactors.as_array().unwrap().len(), 2);

    // The command-line client speaks the same protocol.
    let out = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(&d.socket)
        .args(["bdev_list", "name=ram"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["kind"], "malloc");
    let out = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(&d.socket)
        .args(["bdev_delete", "name=ghost"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ghost"));

    d.signal(libc::SIGTERM);
    let socket = d.socket.clone();
    let (ok, out, _dir) = d.wait();
    assert!(ok, "clean exit on SIGTERM: {out}");
    assert!(out.contains("shutting down"), "{out}");
    assert!(!socket.exists(), "socket removed at exit");
}

#[test]
fn rpc_errors_name_the_field_and_every_method_is_listed() {
    let d = Daemon::start(BASIC);
    // Missing and wrong fields: `data.field` is the field's path, never `params`.
    let field = |method: &str, params: Value| -> String {
        let e = d.call(method, params).unwrap_err();
        assert_eq!(code(&e), -32602, "{method}: {e}");
        e["data"]["field"].as_str().unwrap().to_string()
    };
    assert_eq!(field("bdev_delete", json!({})), "name");
    assert_eq!(field("bdev_delete", Value::Null), "name");
    assert_eq!(field("bdev_resize", json!({"name": "disk"})), "size");
    assert_eq!(field("bdev_delete", json!({"name": 7})), "name");
    assert_eq!(
        field(
            "bdev_create",
            json!({"kind": "malloc", "name": "x", "size": 8192, "block_size": "4k"})
        ),
        "block_size"
    );
    assert_eq!(
        field("bdev_create", json!({"kind": "malloc", "size": 8192})),
        "name"
    );
    assert_eq!(field("bdev_create", json!({"name": "x"})), "kind");
    assert_eq!(
        field(
            "bdev_error_inject",
            json!({"name": "err", "rule": {"ops": [1]}})
        ),
        "rule.ops[0]"
    );
    assert_eq!(
        field("bdev_error_inject", json!({"name": "err", "rule": {}})),
        "rule.ops"
    );
    assert_eq!(
        field(
            "bdev_error_inject",
            json!({"name": "err", "rule": {"ops": ["read", "smash"]}})
        ),
        "rule.ops[1]"
    );
    assert_eq!(
        field("nvmf_ns_add", json!({"nqn": "nqn.x:y", "nsid": 1})),
        "bdev"
    );
    assert_eq!(field("bdev_list", json!({"nmae": "disk"})), "nmae");

    // `rpc_methods` lists every method the server dispatches on, with its parameters.
    let methods = d.call("rpc_methods", Value::Null).unwrap();
    let methods = methods.as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for want in [
        "bdev_list",
        "bdev_create",
        "bdev_resize",
        "bdev_delay_set",
        "vhost_add",
        "vhost_list",
        "nvmf_subsystem_add",
        "nvmf_ns_add",
        "nvmf_host_remove",
        "nvmf_listener_add",
        "reactor_list",
        "rpc_methods",
        "daemon_status",
        "daemon_shutdown",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let resize = methods.iter().find(|m| m["name"] == "bdev_resize").unwrap();
    assert_eq!(resize["params"], "name size");
    // Each listed method is one the server knows (daemon_shutdown would stop it).
    for name in names.iter().filter(|n| **n != "daemon_shutdown") {
        if let Err(e) = d.call(name, json!({"zz_not_a_param": 1})) {
            assert_ne!(code(&e), -32601, "{name} is listed but not dispatched: {e}");
        }
    }
    // `ferroblk rpc --help` prints the same list.
    let out = Command::new(BIN).args(["rpc", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for m in methods {
        let line = format!("{}  ", m["name"].as_str().unwrap());
        assert!(help.contains(&line), "--help lacks {line}: {help}");
        assert!(help.contains(m["params"].as_str().unwrap()), "{help}");
    }

    // `ferroblk rpc bdev_list | head -3`: a reader that went away is no error, and no panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["rpc", "--socket"])
        .arg(&d.socket)
        .arg("bdev_list")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{:?}: {err}", out.status);
}

#[test]
fn quickstart_creates_its_volume_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("configs/quickstart.toml"),
        dir.path().join("quickstart.toml"),
    )
    .unwrap();
    let d = Daemon::start_in(dir, "quickstart.toml", "run/ferroblk.sock");
    let img = d.path().join("data/quickstart.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 30);
    let list = d.call("bdev_list", Value::Null).unwrap();
    assert_eq!(list[0]["name"], "vol0");
    // A second daemon on the same socket is refused, and the first keeps running.
    let second = Command::new(BIN)
        .args(["serve", "--config", "quickstart.toml"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use by another"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(d.call("daemon_status", Value::Null).is_ok());

    d.signal(libc::SIGINT);
    let (ok, out, dir) = d.wait();
    assert!(ok, "{out}");
    assert!(
        out.contains("flushed"),
        "shutdown flushes the volume: {out}"
    );
    assert!(
        out.contains("ferroblk rpc"),
        "banner tells how to control it: {out}"
    );

    // Restart on the existing file: same size, no re-creation.
    let d = Daemon::start_in(dir, "quickstart.toml", "run/ferroblk.sock");
    assert_eq!(
        d.call("bdev_list", Value::Null).unwrap()[0]["size"],
        1u64 << 30
    );
    d.call("daemon_shutdown", Value::Null).unwrap();
    let (ok, out, _) = d.wait();
    assert!(ok, "{out}");
}

#[test]
fn sigterm_stops_the_daemon_even_after_its_sockets_were_removed() {
    let cfg = format!(
        "{BASIC}[[vhost]]\nsocket = \"run/disk.sock\"\nbdev = \"err\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = 0\n"
    );
    let d = Daemon::start(&cfg);
    // Someone cleans the run directory under a live daemon: the control and vhost sockets'
    // paths are gone, but shutting down must not depend on them.
    std::fs::remove_dir_all(d.path().join("run")).unwrap();
    d.signal(libc::SIGTERM);
    let (ok, out, _) = d.wait();
    assert!(ok, "{out}");
    assert!(out.contains("stopped"), "{out}");
}

/// Runs `ferroblk` with `args` in `dir` and returns (success, stdout + stderr).
fn run_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A bdev that fails to open (a missing file, a compress volume whose chunk map is corrupt in
/// both copies) is left out with what stacks on it and its exports, all reported, and the rest
/// is served; `--strict` and `strict = true` keep the fail-fast start.
#[test]
fn degraded_start_leaves_out_failed_bdevs_and_serves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // A compress volume formatted by a first run...
    let compress = "[[bdev]]\nname = \"zbase\"\nkind = \"file\"\npath = \"data/z.img\"\n\
                    size = \"8MiB\"\ncreate = true\n\
                    [[bdev]]\nname = \"zvol\"\nkind = \"compress\"\nbase = \"zbase\"\n\
                    size = \"16MiB\"\n";
    std::fs::write(dir.path().join("ferroblk.toml"), compress).unwrap();
    let d = Daemon::start_in(dir, "ferroblk.toml", "run/ferroblk.sock");
    d.call("daemon_shutdown", Value::Null).unwrap();
    let (ok, out, dir) = d.wait();
    assert!(ok, "{out}");
    // ...then both copies of its first chunk-map page (blocks 1 and 2) are overwritten.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("data/z.img"))
            .unwrap();
        f.write_all_at(&[0xa5; 2 * 4096], 4096).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nqn = "nqn.2026-11.io.ferroblk:degraded";
    let cfg = format!(
        "[reactors]\ncount = 2\n\
         [[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"16MiB\"\n\
         [[bdev]]\nname = \"gone\"\nkind = \"file\"\npath = \"data/gone.img\"\n\
         [[bdev]]\nname = \"slowgone\"\nkind = \"delay\"\nbase = \"gone\"\n\
         {compress}\
         [[bdev]]\nname = \"zcrc\"\nkind = \"crc\"\nbase = \"zvol\"\n\
         [[vhost]]\nsocket = \"run/ram.sock\"\nbdev = \"ram\"\n\
         [[vhost]]\nsocket = \"run/gone.sock\"\nbdev = \"slowgone\"\n\
         [[subsystem]]\nnqn = \"{nqn}\"\nallow_any_host = true\n\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"ram\"\n\
         [[subsystem.namespace]]\nnsid = 2\nbdev = \"zcrc\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {port}\n"
    );
    std::fs::write(dir.path().join("ferroblk.toml"), &cfg).unwrap();

    // Fail-fast when asked, from the command line or the configuration, with the reason.
    let (ok, out) = run_in(
        dir.path(),
        &["serve", "--strict", "--config", "ferroblk.toml"],
    );
    assert!(!ok, "--strict must refuse to start: {out}");
    assert!(out.contains("bdev[1].path"), "{out}");
    assert!(out.contains("data/gone.img"), "{out}");
    assert!(!dir.path().join("run/ferroblk.sock").exists());
    std::fs::write(
        dir.path().join("strict.toml"),
        format!("strict = true\n{cfg}"),
    )
    .unwrap();
    let (ok, out) = run_in(dir.path(), &["serve", "--config", "strict.toml"]);
    assert!(!ok && out.contains("bdev[1].path"), "{out}");

    // By default the daemon starts without them.
    let d = Daemon::start_in(dir, "ferroblk.toml", "run/ferroblk.sock");
    let list = d.call("bdev_list", Value::Null).unwrap();
    let state = |name: &str| {
        let b = list
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in bdev_list: {list}"))
            .clone();
        (b["state"].as_str().unwrap().to_string(), b)
    };
    assert_eq!(state("ram").0, "online");
    assert_eq!(state("zbase").0, "online", "the base itself opens");
    let (st, gone) = state("gone");
    assert_eq!(st, "failed");
    let reason = gone["reason"].as_str().unwrap();
    assert!(reason.contains("gone.img"), "{gone}");
    assert_eq!(gone["kind"], "file");
    let (st, zvol) = state("zvol");
    assert_eq!(st, "failed");
    assert!(
        zvol["reason"]
            .as_str()
            .unwrap()
            .contains("map page 0 is corrupted in both copies"),
        "{zvol}"
    );
    for (name, base) in [("slowgone", "gone"), ("zcrc", "zvol")] {
        let (st, b) = state(name);
        assert_eq!(st, "failed", "{b}");
        assert!(b["reason"].as_str().unwrap().contains(base), "{b}");
    }
    assert_eq!(list.as_array().unwrap().len(), 6, "{list}");
    let one = d.call("bdev_list", json!({"name": "zvol"})).unwrap();
    assert_eq!(one[0]["state"], "failed", "{one}");
    let st = d.call("daemon_status", Value::Null).unwrap();
    assert_eq!(st["failed_bdevs"], 4, "{st}");
    assert_eq!(st["degraded"], true, "{st}");

    // Exports of failed bdevs are reported, not served.
    let vhost = d.call("vhost_list", Value::Null).unwrap();
    let by_socket = |s: &str| {
        vhost
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["socket"] == s)
            .unwrap_or_else(|| panic!("{s} is not in vhost_list: {vhost}"))
            .clone()
    };
    assert_eq!(by_socket("run/ram.sock")["state"], "online");
    let g = by_socket("run/gone.sock");
    assert_eq!(g["state"], "failed", "{g}");
    assert!(g["reason"].as_str().unwrap().contains("slowgone"), "{g}");
    assert!(!d.path().join("run/gone.sock").exists());
    let e = d
        .call(
            "vhost_add",
            json!({"socket": "run/again.sock", "bdev": "slowgone"}),
        )
        .unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("failed"), "{e}");
    let subs = d.call("nvmf_subsystem_list", Value::Null).unwrap();
    let sub = subs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == nqn)
        .unwrap()
        .clone();
    assert_eq!(sub["namespaces"].as_array().unwrap().len(), 1, "{sub}");
    assert_eq!(sub["namespaces"][0]["bdev"], "ram", "{sub}");
    assert_eq!(sub["failed_namespaces"][0]["nsid"], 2, "{sub}");
    assert_eq!(sub["failed_namespaces"][0]["state"], "failed", "{sub}");

    // The healthy volume serves I/O over both fronts.
    let sock = d.path().join("run/ram.sock");
    let (ok, out) = run_in(
        d.path(),
        &[
            "perf",
            "vhost",
            "--socket",
            sock.to_str().unwrap(),
            "--rw",
            "randrw",
            "--qd",
            "4",
            "--time",
            "0.3",
            "--json",
        ],
    );
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert!(v["ios"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let addr = format!("127.0.0.1:{port}");
    let (ok, out) = run_in(
        d.path(),
        &[
            "perf", "nvmf", "--addr", &addr, "--nqn", nqn, "--rw", "randrw", "--qd", "4", "--time",
            "0.3", "--json",
        ],
    );
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert!(v["ios"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");

    // A failed declaration can be forgotten, its stacked ones first.
    let e = d.call("bdev_delete", json!({"name": "gone"})).unwrap_err();
    assert_eq!(code(&e), -32003, "{e}");
    d.call("bdev_delete", json!({"name": "slowgone"})).unwrap();
    d.call("bdev_delete", json!({"name": "gone"})).unwrap();
    let e = d.call("bdev_list", json!({"name": "gone"})).unwrap_err();
    assert_eq!(code(&e), -32001, "{e}");

    d.signal(libc::SIGTERM);
    let (ok, out, _) = d.wait();
    assert!(ok, "{out}");
    assert!(out.contains("DEGRADED"), "the banner says so: {out}");
    for line in [
        "bdev failed to open",
        "map page 0 is corrupted in both copies",
        "bdev left out: its base failed",
        "vhost-user-blk export left out",
        "NVMe-oF namespace left out",
    ] {
        assert!(out.contains(line), "the log reports '{line}': {out}");
    }
}

#[test]
fn bad_configs_fail_at_load_with_the_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 4096\nbogus = 1\n",
            "bdev[0]",
        ),
        (
            "[[bdev]]\nkind = \"error\"\nname = \"e\"\nbase = \"m\"\n",
            "bdev[0].base",
        ),
        ("[reactors]\ncpus = [4096]\n", "reactors.cpus[0]"),
        // A wrong type names the field inside the declaration, with its exact line.
        (
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 8192\nblock_size = \"4k\"\n",
            ":5: bdev[0].block_size: invalid type: string \"4k\", expected u32",
        ),
        // An unknown field is the path, not only in the message.
        (
            "[[bdev]]\nkind = \"null\"\nname = \"n\"\nsize = 4096\nbogus = 1\n",
            ":5: bdev[0].bogus: unknown field `bogus`",
        ),
        // A check after parsing: the path once, the line of the field.
        (
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"1000\"\n",
            ":4: bdev[0].size: ",
        ),
    ];
    for (i, (text, path)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&f)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "case {i} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(path), "case {i}: expected {path} in: {err}");
        assert!(
            !err.contains("size: size:"),
            "case {i}: path repeated: {err}"
        );
        assert!(!dir.path().join("run/ferroblk.sock").exists());
    }
    // A check only opening can make (`serve --strict`): the path once, not `size: size:`.
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/small.img"), vec![0u8; 4096]).unwrap();
    let f = dir.path().join("strict.toml");
    std::fs::write(
        &f,
        "[[bdev]]\nkind = \"file\"\nname = \"f\"\npath = \"data/small.img\"\nsize = 8192\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--strict", "--config"])
        .arg(&f)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bdev[0].size: data/small.img is 4096 bytes"),
        "{err}"
    );
    // check-config reports the same without starting anything.
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(dir.path().join("c1.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bdev[0].base"));
}

#[test]
fn perf_bdev_drives_a_chain_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Path::new(&repo()).join("configs/chain-malloc-error-delay.toml");
    let out = Command::new(BIN)
        .args(["perf", "bdev", "--config"])
        .arg(&cfg)
        .args([
            "--qd", "8", "--bs", "4K", "--rw", "randrw", "--time", "0.5", "--json",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bdev"], "slow0");
    assert!(v["ios"].as_u64().unwrap() > 0);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["reactors"].as_array().unwrap().len(), 2);
    // The delay bdev adds 100-200 µs, so no request can have been faster than 100 µs.
    assert!(v["mean_us"].as_f64().unwrap() >= 100.0, "{v}");

    let out = Command::new(BIN)
        .args(["perf", "bdev", "--config"])
        .arg(&cfg)
        .args(["--bs", "1000", "--time", "0.1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("block size"));
}

/// Runs `ferroblk serve` in `dir` with stderr to a file and extra environment, stops it with
/// SIGTERM once its control socket exists, and returns the log file's text.
fn serve_logging_to_a_file(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let log = dir.join("ferroblk.log");
    let child = Command::new(BIN)
        .args(["serve", "--config", "ferroblk.toml"])
        .args(args)
        .env_remove("FERROBLK_LOG_FORMAT")
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed on drop if an assertion fails first.
    let mut d = Daemon {
        child,
        socket: dir.join("run/ferroblk.sock"),
        dir: None,
    };
    let child = &mut d.child;
    let t = Instant::now();
    while UnixStream::connect(dir.join("run/ferroblk.sock")).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "daemon exited early");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill with a valid pid and signal number has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn logs_are_plain_in_a_file_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ferroblk.toml"), BASIC).unwrap();
    // Plain text: stderr is a file, not a terminal, so no colour codes.
    let text = serve_logging_to_a_file(dir.path(), &[], &[]);
    assert!(text.contains("shutting down"), "{text}");
    assert!(
        !text.contains("\x1b["),
        "ANSI codes in a log file: {text:?}"
    );
    // JSON lines, by flag and by environment.
    for (args, env) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[("FERROBLK_LOG_FORMAT", "json")][..]),
    ] {
        let text = serve_logging_to_a_file(dir.path(), args, env);
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert!(lines.len() >= 2, "{text}");
        assert!(lines.iter().all(|l| l["level"].is_string()), "{text}");
        assert!(
            lines
                .iter()
                .any(|l| l["fields"]["message"] == "shutting down"
                    && l["fields"]["reason"] == "SIGTERM"),
            "{text}"
        );
    }
    // A wrong value is refused, naming it.
    let out = Command::new(BIN)
        .args(["check-config", "ferroblk.toml"])
        .env("FERROBLK_LOG_FORMAT", "xml")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FERROBLK_LOG_FORMAT=xml"));
}

#[test]
fn readiness_is_sent_to_systemd_once_every_export_listens() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "{BASIC}\n[[vhost]]\nsocket = \"run/vhost0.sock\"\nbdev = \"err\"\n\
         [[subsystem]]\nnqn = \"nqn.2026-11.io.ferroblk:t\"\nallow_any_host = true\n\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"disk\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {port}\n"
    );
    std::fs::write(dir.path().join("ferroblk.toml"), config).unwrap();
    let notify = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config", "ferroblk.toml"])
        .env("NOTIFY_SOCKET", &notify)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed on drop if an assertion fails first.
    let mut d = Daemon {
        child,
        socket: dir.path().join("run/ferroblk.sock"),
        dir: None,
    };
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Everything listens by then.
    assert!(UnixStream::connect(dir.path().join("run/vhost0.sock")).is_ok());
    assert!(UnixStream::connect(dir.path().join("run/ferroblk.sock")).is_ok());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    // SAFETY: kill with a valid pid and signal number has no memory effects.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let n = rx.recv(&mut buf).expect("STOPPING=1 at shutdown");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(d.child.wait().unwrap().success());
}

#[test]
fn the_systemd_unit_is_type_notify_and_its_commands_parse() {
    let unit = std::fs::read_to_string(repo().join("dist/ferroblk.service")).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(value("Type"), ["notify"]);
    // Each command the unit runs is a ferroblk command line this binary accepts: run it on a
    // valid configuration in place of the installed path.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ferroblk.toml");
    std::fs::write(&cfg, BASIC).unwrap();
    let pre = value("ExecStartPre");
    let start = value("ExecStart");
    assert_eq!((pre.len(), start.len()), (1, 1), "{unit}");
    for cmd in [&pre[0], &start[0]] {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        assert!(words[0].ends_with("/ferroblk"), "{cmd}");
        assert!(words.last().unwrap().ends_with(".toml"), "{cmd}");
        let args = &words[1..words.len() - 1];
        if args[0] == "serve" {
            // serve runs until stopped: with a config that fails at load, only the arguments
            // are checked (clap exits with 2 on a usage error, serve with 1).
            let out = Command::new(BIN)
                .args(args)
                .arg(dir.path().join("missing.toml"))
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1), "{cmd}: {out:?}");
            assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
        } else {
            let out = Command::new(BIN).args(args).arg(&cfg).output().unwrap();
            assert!(out.status.success(), "{cmd}: {out:?}");
        }
    }
}
