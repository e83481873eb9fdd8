//! `ferroblk bench matrix` and `bench compare` with real fio (installed by tests/run.sh): the
//! shipped quick spec end to end (every report file, every cell holding numbers), a run
//! interrupted by SIGINT and resumed (no run twice, the peer it started stopped both times), a
//! results directory refused to another spec, a failing cell recorded with fio's message while
//! the run goes on, compare's ratios and noise flags, and the guest spec shrunk: fio inside the
//! QEMU guest lab (one boot) on the guest kernel's virtio-blk and nvme-tcp devices.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::free_port;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferroblk");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bench(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("bench")
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("run ferroblk bench")
}

/// `bench matrix SPEC --out OUT`.
fn matrix(spec: &Path, out: &Path) -> Output {
    bench(&[
        "matrix",
        spec.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

/// `bench compare A B --out OUT`.
fn compare(a: &Path, b: &Path, out: &Path) -> Output {
    let (a, b, out) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    bench(&["compare", a, b, "--out", out])
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn results(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

/// Every cell of `r` is `ok` and each of its statistics is a finite number, with `runs` runs
/// each keeping fio's JSON.
fn assert_every_cell_holds_numbers(r: &Value, cells: usize, runs: usize) {
    let cs = r["cells"].as_array().unwrap();
    assert_eq!(cs.len(), cells);
    for c in cs {
        assert_eq!(c["status"], "ok", "{c:#}");
        for m in ["iops", "bw_mib_s", "lat_mean_us", "p99_us"] {
            for s in ["median", "min", "max"] {
                let v = c["stats"][m][s].as_f64();
                assert!(v.is_some_and(f64::is_finite), "{m}.{s} of {}", c["target"]);
            }
        }
        let rs = c["runs"].as_array().unwrap();
        assert_eq!(rs.len(), runs);
        for run in rs {
            assert!(run["fio"]["jobs"][0]["read"].is_object(), "fio JSON kept");
        }
    }
}

#[test]
fn quick_spec_produces_every_report() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("quick");
    let o = bench(&[
        "matrix",
        "benches/matrix/quick.toml",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r = results(&out);
    let h = &r["header"];
    let cells = h["rw"].as_array().unwrap().len()
        * h["bs"].as_array().unwrap().len()
        * h["iodepth"].as_array().unwrap().len()
        * h["numjobs"].as_array().unwrap().len()
        * h["targets"].as_array().unwrap().len();
    assert!(cells > 0);
    assert_every_cell_holds_numbers(&r, cells, h["repeats"].as_u64().unwrap() as usize);
    // CSV: a header and a row per cell, each with a numeric median IOPS.
    let mut rd = csv::Reader::from_path(out.join("results.csv")).unwrap();
    let head = rd.headers().unwrap().clone();
    let col = head.iter().position(|h| h == "iops_median").unwrap();
    let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), cells);
    for row in &rows {
        assert!(row[col].parse::<f64>().is_ok_and(f64::is_finite), "{row:?}");
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("# Matrix `quick`") && md.contains("| bs | QD |"),
        "{md}"
    );
    assert!(
        md.contains("`ferroblk bench matrix benches/matrix/quick.toml --out "),
        "{md}"
    );
    assert!(!md.contains("failed") && !md.contains(" – "), "{md}");
    for rw in h["rw"].as_array().unwrap() {
        let rw = rw.as_str().unwrap().replace(':', "");
        for kind in ["iops", "p99", "bw"] {
            for ext in ["svg", "png"] {
                let p = out.join(format!("plots/{kind}-{rw}-j1.{ext}"));
                let meta = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(meta.len() > 0, "{}", p.display());
            }
        }
    }
}

/// A small spec: one file target (plus `extra`), two queue depths, two runs each; its peer
/// (`sh`, then `sleep`) writes its PID to `pidfile` and is ready when `ready` exists.
fn small_spec(dir: &Path, extra: &str) -> PathBuf {
    let spec = dir.join("small.toml");
    let pidfile = dir.join("peer.pid");
    let ready = dir.join("peer.ready");
    std::fs::write(
        &spec,
        format!(
            r#"
[matrix]
name = "small"
rw = ["randread"]
bs = ["4K"]
iodepth = [1, 4]
runtime = 0.5
repeats = 2

[[start]]
command = ["sh", "-c", "echo $$ > {pid}; touch {ready}; exec sleep 600"]
ready_path = "{ready}"

[[target]]
name = "file"
engine = "io_uring"
filename = "{{run}}/small.img"
size = "8MiB"
{extra}
"#,
            pid = pidfile.display(),
            ready = ready.display(),
        ),
    )
    .unwrap();
    spec
}

/// Whether the peer of [`small_spec`] that wrote `pidfile` is gone.
fn peer_gone(pidfile: &Path) -> bool {
    let pid = std::fs::read_to_string(pidfile).unwrap();
    !Path::new(&format!("/proc/{}", pid.trim())).exists()
}

fn journal(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn interrupted_run_resumes_without_running_a_cell_twice() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(d.path(), "");
    let out = d.path().join("res");
    let mut child = Command::new(BIN)
        .args(["bench", "matrix"])
        .arg(&spec)
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first run is journaled.
    let t0 = Instant::now();
    while journal(&out).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no run journaled");
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before the interrupt"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own, not yet reaped, child; no memory is involved.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(peer_gone(&d.path().join("peer.pid")), "peer left running");
    let first = journal(&out);
    assert!(
        !first.is_empty() && first.len() < 4,
        "{} runs before the interrupt",
        first.len()
    );
    std::fs::remove_file(d.path().join("peer.ready")).unwrap();

    let o = matrix(&spec, &out);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("resuming"),
        "{}",
        text(&o)
    );
    assert!(peer_gone(&d.path().join("peer.pid")), "peer left running");
    let all = journal(&out);
    assert_eq!(all.len(), 4, "{all:#?}");
    assert_eq!(
        all[..first.len()],
        first[..],
        "journaled runs kept as they were"
    );
    let mut seen: Vec<(u64, u64)> = all
        .iter()
        .map(|r| {
            (
                r["iodepth"].as_u64().unwrap(),
                r["repeat"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "a run ran twice: {all:#?}");
    assert_every_cell_holds_numbers(&results(&out), 2, 2);

    // The same spec shortened on the command line is another spec: refused.
    let (spec_s, out_s) = (spec.to_str().unwrap(), out.to_str().unwrap());
    let o = bench(&["matrix", spec_s, "--out", out_s, "--runtime", "1"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("another spec"),
        "{}",
        text(&o)
    );
    // Another spec is refused in this directory, which is left as it was.
    std::fs::write(
        &spec,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("[1, 4]", "[1, 2]"),
    )
    .unwrap();
    let o = matrix(&spec, &out);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("another spec"),
        "{}",
        text(&o)
    );
    assert_eq!(journal(&out).len(), 4);
}

#[test]
fn failing_cell_is_recorded_and_the_run_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(
        d.path(),
        r#"
[[target]]
name = "missing"
engine = "libaio"
filename = "/proc/version"
size = "8MiB"
"#,
    );
    let out = d.path().join("res");
    let o = matrix(&spec, &out);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(peer_gone(&d.path().join("peer.pid")), "peer left running");
    let r = results(&out);
    for c in r["cells"].as_array().unwrap() {
        if c["target"] == "missing" {
            assert_eq!(c["status"], "failed");
            let e = c["error"].as_str().unwrap();
            assert!(e.contains("fio failed") && e.contains("err="), "{e}");
            // The cell's other repeat was not run.
            assert_eq!(c["runs"].as_array().unwrap().len(), 1);
        } else {
            assert_eq!(c["status"], "ok", "{c:#}");
        }
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("## Failed cells") && md.contains("missing randread 4K qd1 j1"),
        "{md}"
    );
}

#[test]
fn bad_spec_fails_before_anything_starts() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(d.path(), "");
    let text0 = std::fs::read_to_string(&spec).unwrap();
    for (from, to, key) in [
        ("[1, 4]", "[1, 0]", "matrix.iodepth[1]"),
        ("bs = [\"4K\"]", "bs = [\"6K\"]\n", ""),
        (
            "engine = \"io_uring\"",
            "engine = \"spdk\"",
            "target[0].engine",
        ),
        ("repeats = 2", "repeats = 2\nrepeat = 1", "matrix.repeat"),
    ] {
        let t = text0.replace(from, to);
        let t = if key.is_empty() {
            t.replace("size = \"8MiB\"", "size = \"8MiB\"\nblock_size = 4096")
        } else {
            t
        };
        std::fs::write(&spec, t).unwrap();
        let out = d.path().join("never");
        let o = matrix(&spec, &out);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        let key = if key.is_empty() { "matrix.bs[0]" } else { key };
        assert!(err.contains(key), "{key}: {err}");
        assert!(!out.exists(), "nothing may run");
        assert!(!d.path().join("peer.pid").exists(), "nothing may start");
    }
    // ferroblk's engine where the spec says it is, and it is not there.
    let t = text0
        .replace(
            "repeats = 2",
            "repeats = 2\nengine_lib = \"/nonexistent/libferroblk_fio.so\"",
        )
        .replace(
            "engine = \"io_uring\"\nfilename = \"{run}/small.img\"",
            "engine = \"vhost\"\nsocket = \"{run}/v.sock\"",
        );
    std::fs::write(&spec, t).unwrap();
    let out = d.path().join("never");
    let o = matrix(&spec, &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("target[0].engine") && err.contains("/nonexistent/libferroblk_fio.so"),
        "{err}"
    );
    assert!(!out.exists() && !d.path().join("peer.pid").exists());
}

#[test]
fn compare_reports_ratios_and_noise() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(
        d.path(),
        r#"
[[target]]
name = "aio"
engine = "libaio"
filename = "{run}/aio.img"
size = "8MiB"
"#,
    );
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    for out in [&a, &b] {
        std::fs::remove_file(d.path().join("peer.ready")).ok();
        let o = matrix(&spec, out);
        assert!(o.status.success(), "{}", text(&o));
    }
    let cmp = d.path().join("cmp");
    let o = compare(&a, &b, &cmp);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("B/A"));
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(cmp.join("compare.csv"))
        .unwrap()
        .records()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 4);
    for p in [
        "compare.md",
        "ratio-iops.svg",
        "ratio-iops.png",
        "ratio-p99.png",
    ] {
        assert!(cmp.join(p).exists(), "{p}");
    }
    // A directory against itself: every ratio is 1 and within noise.
    let o = compare(&a, &a, &cmp);
    assert!(o.status.success(), "{}", text(&o));
    let mut rd = csv::Reader::from_path(cmp.join("compare.csv")).unwrap();
    let head = rd.headers().unwrap().clone();
    let ratio = head.iter().position(|h| h == "iops_ratio").unwrap();
    let noise = head.iter().position(|h| h == "iops_within_noise").unwrap();
    for row in rd.records().map(Result::unwrap) {
        assert_eq!(row[ratio].parse::<f64>().unwrap(), 1.0);
        assert_eq!(&row[noise], "true");
    }
    // Two targets of one matrix.
    let (a_s, cmp_s) = (a.to_str().unwrap(), cmp.to_str().unwrap());
    let o = bench(&["compare", a_s, a_s, "--out", cmp_s, "--targets", "file,aio"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Target `aio` (B) against target `file` (A)")
    );
    let mut rd = csv::Reader::from_path(cmp.join("compare.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(&row[0], "file");
        assert!(
            row[ratio]
                .parse::<f64>()
                .is_ok_and(|r| r.is_finite() && r > 0.0)
        );
    }
    // Directories with nothing in common are refused.
    let o = bench(&["compare", a_s, d.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let o = bench(&["compare", a_s, a_s, "--targets", "file,nothing"]);
    assert!(!o.status.success());
}

#[test]
fn ferroblk_daemon_is_started_until_ready_and_stopped_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let spec = small_spec(d.path(), "").with_file_name("daemon.toml");
    std::fs::write(
        &spec,
        r#"
[matrix]
name = "daemon"
rw = ["randread"]
bs = ["4K"]
iodepth = [1]
runtime = 0.5
repeats = 1

[[target]]
name = "file"
engine = "io_uring"
filename = "{run}/f.img"
size = "8MiB"
[[target.start]]
ferroblk_toml = """
[reactors]
count = 1
[rpc]
socket = "{run}/rpc.sock"
[[bdev]]
name = "null0"
kind = "null"
size = "64MiB"
block_size = 4096
[[vhost]]
socket = "{run}/null0.sock"
bdev = "null0"
"""
"#,
    )
    .unwrap();
    let out = d.path().join("res");
    let o = matrix(&spec, &out);
    assert!(o.status.success(), "{}", text(&o));
    let log = std::fs::read_to_string(out.join("logs/file-start0.log")).unwrap();
    // Ready before the first run (its export listened), stopped by SIGTERM after the last:
    // drained, flushed, and told its (kept) notify socket that it was stopping.
    assert!(log.contains("vhost-user-blk export listening"), "{log}");
    assert!(log.contains("shutting down reason=\"SIGTERM\""), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("cannot notify"), "{log}");
}

#[test]
fn a_peer_that_dies_is_restarted_for_the_next_run() {
    let d = tempfile::tempdir().unwrap();
    let starts = d.path().join("starts");
    let spec = small_spec(d.path(), "").with_file_name("dies.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
[matrix]
name = "dies"
rw = ["randread"]
bs = ["4K"]
iodepth = [1, 2, 4]
runtime = 1.5
repeats = 1

[[target]]
name = "file"
engine = "io_uring"
filename = "{{run}}/f.img"
size = "8MiB"
[[target.start]]
command = ["sh", "-c", "echo started >> {starts}; touch {{run}}/peer.ready; exec sleep 1"]
ready_path = "{{run}}/peer.ready"
"#,
            starts = starts.display()
        ),
    )
    .unwrap();
    let out = d.path().join("res");
    let o = matrix(&spec, &out);
    assert!(o.status.success(), "{}", text(&o));
    // Started once, then again before each later run (it lives a second, a run longer).
    let n = std::fs::read_to_string(&starts).unwrap().lines().count();
    assert_eq!(n, 3, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("died"),
        "{}",
        text(&o)
    );
}

/// The shipped guest spec, shrunk (one pattern and block size, two queue depths, one 1 s run
/// per cell, a free port) and with a host target beside the guest ones: fio runs in one guest
/// boot on the guest kernel's virtio-blk disks (ferroblk's and qemu-storage-daemon's
/// vhost-user-blk exports) and nvme-tcp namespace (ferroblk's target), alternating with the
/// host's fio, and every cell holds numbers from fio's JSON on the guest's device.
#[test]
fn guest_matrix_runs_fio_in_one_guest_boot() {
    let d = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo().join("benches/matrix/guest.toml")).unwrap();
    let port = free_port().to_string();
    let mut spec_text = String::new();
    for line in shipped.lines() {
        let line = match line.split(" = ").next() {
            Some("rw") => "rw = [\"randread\"]",
            Some("bs") => "bs = [\"4K\"]",
            Some("iodepth") => "iodepth = [1, 8]",
            Some("runtime") => "runtime = 1",
            Some("ramp") => "ramp = 0",
            Some("repeats") => "repeats = 1",
            _ => line,
        };
        spec_text.push_str(&line.replace("4432", &port));
        spec_text.push('\n');
    }
    spec_text.push_str(
        r#"
[[target]]
name = "host-file"
engine = "io_uring"
filename = "{run}/host.img"
size = "8MiB"
block_size = 4096
"#,
    );
    let spec = d.path().join("guest-tiny.toml");
    std::fs::write(&spec, &spec_text).unwrap();
    let out = d.path().join("out");
    let o = matrix(&spec, &out);
    assert!(o.status.success(), "{}", text(&o));
    let r = results(&out);
    assert_every_cell_holds_numbers(&r, 2 * 4, 1);
    // fio's own report: each guest target on the device the guest gave it.
    let devices = [
        ("ferroblk-vhost", "/dev/vda"),
        ("qsd-vhost", "/dev/vdb"),
        ("ferroblk-nvme-tcp", "/dev/nvme0n1"),
    ];
    for c in r["cells"].as_array().unwrap() {
        let fio = &c["runs"][0]["fio"];
        let file = fio["global options"]["filename"]
            .as_str()
            .or(fio["jobs"][0]["job options"]["filename"].as_str())
            .unwrap_or_default();
        let want = devices
            .iter()
            .find(|(t, _)| c["target"] == *t)
            .map_or("host.img", |(_, dev)| dev);
        assert!(file.ends_with(want), "{} ran on {file}", c["target"]);
    }
    // One boot for the whole run, and the guest powered off cleanly at the end.
    let console = std::fs::read_to_string(out.join("logs/guest.log")).unwrap();
    assert_eq!(console.matches("LAB-READY").count(), 1, "{console}");
    assert!(console.contains("LAB-EXIT=0"), "{console}");
    // Targets alternate cell by cell: the host's run comes between the guest's.
    let order: Vec<String> = journal(&out)
        .iter()
        .map(|r| r["target"].as_str().unwrap().to_string())
        .collect();
    let host = order.iter().position(|t| t == "host-file").unwrap();
    assert!(host < order.len() - 1, "{order:?}");
}
