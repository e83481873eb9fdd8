//! The Prometheus endpoint (`[metrics] listen`): scraped while `ferroblk perf` drives I/O over
//! vhost-user-blk and NVMe/TCP, its exposition checked line by line, its counters checked to
//! move; bad, oversized and stalled requests answered or cut off while the daemon keeps serving.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::daemon::{BIN, free_port, rpc, start_daemon};

const NQN: &str = "nqn.2026-12.io.ferroblk:metrics";

/// Writes the configuration and starts the daemon; returns it with its metrics and NVMe/TCP
/// addresses.
fn start(dir: &Path) -> (common::daemon::Daemon, SocketAddr, SocketAddr) {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let nvmf: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = format!(
        "[reactors]\ncount = 2\n\
         [rpc]\nsocket = \"rpc.sock\"\n\
         [metrics]\nlisten = \"{metrics}\"\n\
         [[bdev]]\nname = \"vvol\"\nkind = \"malloc\"\nsize = \"16MiB\"\n\
         [[bdev]]\nname = \"nvol\"\nkind = \"malloc\"\nsize = \"16MiB\"\n\
         [[vhost]]\nsocket = \"vvol.sock\"\nbdev = \"vvol\"\nnum_queues = 2\n\
         [[subsystem]]\nnqn = \"{NQN}\"\nallow_any_host = true\n\
         [[subsystem.namespace]]\nnsid = 1\nbdev = \"nvol\"\n\
         [[listener]]\naddr = \"127.0.0.1\"\nport = {}\n",
        nvmf.port()
    );
    std::fs::write(dir.join("ferroblk.toml"), cfg).unwrap();
    (start_daemon(dir), metrics, nvmf)
}

/// Sends `request` as is and returns the status code and body of the answer.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|h| h.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "Content-Length matches the body");
    (status, body.to_string())
}

/// One scrape, parsed: `name{labels}` to value. Panics on a line that is neither a comment nor
/// `name{labels} value` (the text exposition format), or on a sample seen twice.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let mut samples = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with("# ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not `name{{labels}} value`: {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels in {line:?}"
            );
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name in {line:?}"
                );
                assert!(!v.contains('\n'), "{line:?}");
            }
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "{series} twice"
        );
    }
    samples
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} missing from {:#?}", m.keys()))
}

fn perf(dir: &Path, args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("perf")
        .args(args)
        .args(["--rw", "randrw", "--qd", "4", "--time", "3", "--json"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Scrapes until `seen` holds or `child` exits; then waits for it. True if `seen` held while
/// the child ran.
fn scrape_while(
    addr: SocketAddr,
    child: Child,
    seen: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> bool {
    let mut child = child;
    let mut held = false;
    while child.try_wait().unwrap().is_none() {
        if seen(&scrape(addr)) {
            held = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "perf: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    held
}

#[test]
fn scrape_during_perf_shows_the_io_and_the_exposition_parses() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, metrics, nvmf) = start(dir.path());
    let read_bytes =
        |b: &str| format!("ferroblk_bdev_io_bytes_total{{bdev=\"{b}\",type=\"read\"}}");
    let write_ops = |b: &str| format!("ferroblk_bdev_ops_total{{bdev=\"{b}\",type=\"write\"}}");

    let idle = scrape(metrics);
    assert_eq!(get(&idle, &read_bytes("vvol")), 0.0);
    assert_eq!(get(&idle, &read_bytes("nvol")), 0.0);
    let vhost = "ferroblk_vhost_connected{socket=\"vvol.sock\",bdev=\"vvol\"}";
    assert_eq!(get(&idle, vhost), 0.0);
    assert_eq!(
        get(
            &idle,
            "ferroblk_vhost_queues{socket=\"vvol.sock\",bdev=\"vvol\"}"
        ),
        2.0
    );
    let ctrls = format!("ferroblk_nvmf_controllers{{nqn=\"{NQN}\"}}");
    assert_eq!(get(&idle, &ctrls), 0.0);
    assert_eq!(
        get(
            &idle,
            &format!("ferroblk_nvmf_namespace{{nqn=\"{NQN}\",nsid=\"1\",bdev=\"nvol\"}}")
        ),
        1.0
    );
    assert_eq!(
        get(
            &idle,
            "ferroblk_bdev_errors_total{bdev=\"vvol\",status=\"integrity_error\"}"
        ),
        0.0
    );

    // vhost-user-blk: the scrape during the run sees the front connected and the I/O moving.
    let sock = dir.path().join("vvol.sock");
    let run = perf(dir.path(), &["vhost", "--socket", sock.to_str().unwrap()]);
    let during = scrape_while(metrics, run, |m| {
        get(m, vhost) == 1.0 && get(m, &read_bytes("vvol")) > 0.0
    });
    assert!(
        during,
        "a scrape during perf vhost showed the connection and I/O"
    );

    // NVMe/TCP: a controller with its queue connections, and the I/O on the other bdev.
    let conns = format!("ferroblk_nvmf_connections{{listener=\"{nvmf}\"}}");
    let run = perf(
        dir.path(),
        &["nvmf", "--addr", &nvmf.to_string(), "--nqn", NQN],
    );
    let during = scrape_while(metrics, run, |m| {
        get(m, &ctrls) >= 1.0 && get(m, &conns) >= 2.0 && get(m, &read_bytes("nvol")) > 0.0
    });
    assert!(
        during,
        "a scrape during perf nvmf showed the controller and I/O"
    );

    let after = scrape(metrics);
    for b in ["vvol", "nvol"] {
        assert!(get(&after, &read_bytes(b)) > 0.0, "{b} read bytes");
        assert!(get(&after, &write_ops(b)) > 0.0, "{b} writes");
        assert_eq!(
            get(
                &after,
                &format!("ferroblk_bdev_errors_total{{bdev=\"{b}\",status=\"media_error\"}}")
            ),
            0.0
        );
    }
    // Sampled latency histograms: the runs' requests were timed (one in 64), and the +Inf
    // bucket holds every sample.
    for b in ["vvol", "nvol"] {
        let count = get(
            &after,
            &format!("ferroblk_bdev_latency_seconds_count{{bdev=\"{b}\"}}"),
        );
        assert!(count > 0.0, "{b}: latency samples");
        assert_eq!(
            get(
                &after,
                &format!("ferroblk_bdev_latency_seconds_bucket{{le=\"+Inf\",bdev=\"{b}\"}}")
            ),
            count,
            "{b}: the +Inf bucket counts every sample"
        );
        assert!(
            get(
                &after,
                &format!("ferroblk_bdev_latency_seconds_sum{{bdev=\"{b}\"}}")
            ) > 0.0
        );
    }
    let busy: f64 = (0..2)
        .map(|r| {
            get(
                &after,
                &format!("ferroblk_reactor_time_seconds_total{{reactor=\"{r}\",state=\"busy\"}}"),
            )
        })
        .sum();
    assert!(busy > 0.0, "reactor busy time moved");
    let asleep: f64 = (0..2)
        .map(|r| {
            get(
                &after,
                &format!("ferroblk_reactor_time_seconds_total{{reactor=\"{r}\",state=\"sleep\"}}"),
            )
        })
        .sum();
    assert!(asleep > 0.0, "idle reactors sleep, and it is counted");
    let version = format!(
        "ferroblk_uptime_seconds{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert!(get(&after, &version) > 0.0);
    assert!(daemon.stop(), "clean exit");
}

#[test]
fn bad_requests_get_an_error_and_the_endpoint_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, metrics, _) = start(dir.path());
    for (req, want) in [
        (&b"BLAH\r\n\r\n"[..], 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n", 400), // closed before the end of the headers
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET /other HTTP/1.1\r\n\r\n", 404),
    ] {
        let mut s = TcpStream::connect(metrics).unwrap();
        s.write_all(req).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with(&format!("HTTP/1.1 {want} ")),
            "{req:?}: {out}"
        );
        assert!(!scrape(metrics).is_empty(), "still serving after {req:?}");
    }
    // An endless header block is cut off at the size bound.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let mut s = TcpStream::connect(metrics).unwrap();
    let _ = s.write_all(&big); // the server may close before taking it all
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        out.starts_with(b"HTTP/1.1 431 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A client that connects and says nothing holds the endpoint for its deadline only, and
    // never the daemon: the control socket answers meanwhile.
    let stalled = TcpStream::connect(metrics).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let status = rpc(dir.path(), "daemon_status", "{}");
    assert!(status.contains("version"), "{status}");
    // The scrape waits behind the stalled client until its deadline cuts it off (the
    // scrape's own read would time out, and fail, if it did not).
    assert!(!scrape(metrics).is_empty());
    drop(stalled);
    assert!(daemon.stop(), "clean exit");
}
