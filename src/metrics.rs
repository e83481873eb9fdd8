//! The Prometheus endpoint (`[metrics] listen = "127.0.0.1:9464"`, off by default).
//!
//! A dedicated control-plane thread answers `GET /metrics` over plain HTTP/1.1 with the
//! OpenMetrics text exposition, encoded by `prometheus-client`. Every value is read at scrape
//! time from counters the data path keeps anyway (per-channel bdev stats, per-reactor turn and
//! time counters, export and listener state): a scrape takes the same short control-plane locks
//! as `bdev_list`, and the reactors do nothing for it.
//!
//! The server takes one connection at a time, gives it [`CONN_DEADLINE`] to send a request of
//! at most [`MAX_REQUEST`] bytes and to take the answer, and closes it: a slow or hostile
//! client delays the next scrape, never the daemon.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferroblk_bdev::{IoStatus, IoType};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet, text::encode,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use crate::daemon::DaemonState;

/// Most bytes of request line and headers read from a client.
pub const MAX_REQUEST: usize = 8192;

/// How long one connection may take, request and answer together.
pub const CONN_DEADLINE: Duration = Duration::from_secs(5);

/// The media type of the OpenMetrics text format `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The running endpoint; dropping it stops the thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The listening socket, to wake the blocked accept at shutdown.
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` for `state` on a thread of its own.
    pub fn start(addr: SocketAddr, state: Arc<DaemonState>) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let wake = OwnedFd::from(listener.try_clone()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(listener, &state, &stop2))?;
        tracing::info!(%addr, "Prometheus metrics endpoint listening (GET /metrics)");
        Ok(MetricsServer {
            addr,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when the configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        crate::rpc::wake_accept(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, state: &Arc<DaemonState>, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        match conn {
            Ok(stream) => {
                if let Err(e) = serve_conn(stream, state) {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (or `HEAD`: the same headers, no body).
    Metrics {
        /// Whether to send the body.
        body: bool,
    },
    /// A well-formed request for another path.
    NotFound,
    /// A method other than GET or HEAD.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line.
    BadRequest,
}

/// Parses the request head (request line and headers, RFC 9112 section 3).
fn parse_request(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') || method.is_empty() {
        return Route::BadRequest;
    }
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Route::BadRequest;
    }
    let body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return Route::MethodNotAllowed,
    };
    let path = target.split('?').next().unwrap_or(target);
    if path == "/metrics" {
        Route::Metrics { body }
    } else {
        Route::NotFound
    }
}

/// Reads the request head, bounded in size and time. `Ok(None)`: the client closed without
/// sending anything.
fn read_head(
    stream: &mut TcpStream,
    deadline: Instant,
) -> io::Result<Option<Result<Vec<u8>, u16>>> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Some(Err(408)));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Some(Err(408)));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(if len == 0 { None } else { Some(Err(400)) });
        }
        let from = len.saturating_sub(3);
        len += n;
        if let Some(end) = buf[from..len].windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(from + end);
            return Ok(Some(Ok(buf)));
        }
        if len == buf.len() {
            return Ok(Some(Err(431)));
        }
    }
}

fn serve_conn(mut stream: TcpStream, state: &Arc<DaemonState>) -> io::Result<()> {
    let deadline = Instant::now() + CONN_DEADLINE;
    stream.set_write_timeout(Some(CONN_DEADLINE))?;
    let head = match read_head(&mut stream, deadline)? {
        None => return Ok(()),
        Some(h) => h,
    };
    let (status, body, send_body) = match head.map(|h| parse_request(&h)) {
        Ok(Route::Metrics { body }) => match render(state) {
            Ok(text) => (200, text, body),
            Err(_) => (500, "encoding the metrics failed\n".to_string(), true),
        },
        Ok(Route::NotFound) => (404, "only /metrics is served here\n".to_string(), true),
        Ok(Route::MethodNotAllowed) => (405, "use GET /metrics\n".to_string(), true),
        Ok(Route::BadRequest) => (400, "not an HTTP/1.x request\n".to_string(), true),
        Err(code) => (code, String::new(), true),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let content_type = if status == 200 {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {allow}Connection: close\r\n\r\n",
        body.len()
    );
    if send_body {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// The exposition text for `state`, as `GET /metrics` answers it.
pub fn render(state: &Arc<DaemonState>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector(state.clone())));
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

/// Reads the daemon's counters at each scrape.
struct DaemonCollector(Arc<DaemonState>);

impl fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DaemonCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: its descriptor, then one sample per label set.
fn family<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: Vec<(Labels, M)>,
) -> fmt::Result {
    let mut fam = enc.encode_descriptor(name, help, unit, M::TYPE)?;
    for (labels, m) in &rows {
        m.encode(fam.encode_family(labels)?)?;
    }
    Ok(())
}

/// A histogram read from a bdev's sampled latency buckets at scrape time.
#[derive(Debug)]
struct LatencyHistogram {
    sum_s: f64,
    count: u64,
    /// (upper bound in seconds, count in this bucket), as the encoder takes them.
    buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    fn from_stats(s: &ferroblk_bdev::BdevStats) -> LatencyHistogram {
        let last = s.latency.len() - 1;
        let buckets = s
            .latency
            .iter()
            .enumerate()
            .map(|(b, &n)| {
                let le = if b == last {
                    f64::INFINITY
                } else {
                    (1u64 << b) as f64 / 1e6
                };
                (le, n)
            })
            .collect();
        LatencyHistogram {
            sum_s: s.latency_sum_ns as f64 / 1e9,
            count: s.latency.iter().sum(),
            buckets,
        }
    }
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum_s, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: u64) -> ConstGauge<u64> {
    ConstGauge::new(v)
}

fn ns_to_s(ns: u64) -> ConstCounter<f64> {
    ConstCounter::new(ns as f64 / 1e9)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let state = &self.0;
        let e = &mut enc;
        family(
            e,
            "ferroblk_uptime",
            "Time since the daemon started",
            Some(&Unit::Seconds),
            vec![(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                ConstGauge::new(state.started.elapsed().as_secs_f64()),
            )],
        )?;
        encode_bdevs(e, state)?;
        encode_exports(e, state)?;
        encode_reactors(e, state)
    }
}

fn encode_bdevs(e: &mut DescriptorEncoder, state: &DaemonState) -> fmt::Result {
    let bdevs: Vec<_> = state
        .registry
        .list()
        .into_iter()
        .map(|(b, _, _)| {
            let info = b.info().clone();
            let stats = info.stats();
            (info, stats)
        })
        .collect();
    let name = |i: &ferroblk_bdev::BdevInfo| vec![("bdev", i.name().to_string())];
    let per_type = |f: &dyn Fn(&ferroblk_bdev::BdevStats, usize) -> u64| {
        let mut rows = Vec::new();
        for (info, s) in &bdevs {
            for t in IoType::ALL {
                let mut l = name(info);
                l.push(("type", t.name().to_string()));
                rows.push((l, counter(f(s, t as usize))));
            }
        }
        rows
    };
    family(
        e,
        "ferroblk_bdev_size",
        "Size of the bdev, by kind",
        Some(&Unit::Bytes),
        bdevs
            .iter()
            .map(|(i, _)| {
                let mut l = name(i);
                l.push(("kind", i.kind().to_string()));
                (l, gauge(i.geometry().size_bytes()))
            })
            .collect(),
    )?;
    family(
        e,
        "ferroblk_bdev_ops",
        "Requests submitted to the bdev, by I/O type (all fronts and stacked bdevs together)",
        None,
        per_type(&|s, t| s.ops[t]),
    )?;
    family(
        e,
        "ferroblk_bdev_io",
        "Bytes addressed by requests to the bdev, by I/O type",
        Some(&Unit::Bytes),
        per_type(&|s, t| s.bytes[t]),
    )?;
    let mut errors = Vec::new();
    for (info, s) in &bdevs {
        for st in IoStatus::ALL.into_iter().filter(|s| !s.is_ok()) {
            let mut l = name(info);
            l.push(("status", st.name().to_string()));
            errors.push((l, counter(s.errors_by_status[st as usize])));
        }
    }
    family(
        e,
        "ferroblk_bdev_errors",
        "Requests completed with an error, by status (rejected ones included)",
        None,
        errors,
    )?;
    family(
        e,
        "ferroblk_bdev_integrity_errors",
        "Requests that failed an integrity check (CRC, authentication tag)",
        None,
        bdevs
            .iter()
            .map(|(i, s)| {
                let v = s.errors_by_status[IoStatus::IntegrityError as usize];
                (name(i), counter(v))
            })
            .collect(),
    )?;
    family(
        e,
        "ferroblk_bdev_rejected",
        "Requests the channel layer rejected before the bdev saw them (range, shape, capability)",
        None,
        bdevs
            .iter()
            .map(|(i, s)| (name(i), counter(s.rejected)))
            .collect(),
    )?;
    family(
        e,
        "ferroblk_bdev_latency",
        "Latency of sampled requests on the bdev's channels, submit to completion (one request \
         in LATENCY_SAMPLE_EVERY is timed)",
        Some(&Unit::Seconds),
        bdevs
            .iter()
            .map(|(i, s)| (name(i), LatencyHistogram::from_stats(s)))
            .collect(),
    )?;
    family(
        e,
        "ferroblk_bdev_channels",
        "Channels (reactor handles) open on the bdev",
        None,
        bdevs
            .iter()
            .map(|(i, _)| (name(i), gauge(i.open_channels() as u64)))
            .collect(),
    )?;
    let failed = state.failed.lock().expect("failed lock").clone();
    family(
        e,
        "ferroblk_bdev_failed",
        "Declared bdevs left out at start (1), by kind; the reason is in bdev_list",
        None,
        failed
            .iter()
            .map(|(n, f)| {
                (
                    vec![("bdev", n.clone()), ("kind", f.kind.clone())],
                    gauge(1),
                )
            })
            .collect(),
    )
}

fn encode_exports(e: &mut DescriptorEncoder, state: &DaemonState) -> fmt::Result {
    let vhost: Vec<(Labels, bool, u16)> = state
        .vhost
        .lock()
        .expect("vhost lock")
        .values()
        .map(|x| {
            let s = x.spec();
            let l = vec![
                ("socket", s.socket.display().to_string()),
                ("bdev", s.bdev.clone()),
            ];
            (l, x.connected(), s.num_queues)
        })
        .collect();
    family(
        e,
        "ferroblk_vhost_connected",
        "Whether a front-end (VM) is connected to the vhost-user-blk export; its I/O is the \
         bdev's (ferroblk_bdev_* with the same bdev label)",
        None,
        vhost
            .iter()
            .map(|(l, c, _)| (l.clone(), gauge(u64::from(*c))))
            .collect(),
    )?;
    family(
        e,
        "ferroblk_vhost_queues",
        "Virtqueues of the vhost-user-blk export",
        None,
        vhost
            .iter()
            .map(|(l, _, q)| (l.clone(), gauge(u64::from(*q))))
            .collect(),
    )?;
    let listeners: Vec<(Labels, usize, _)> = state
        .listeners
        .lock()
        .expect("listeners lock")
        .iter()
        .map(|l| {
            (
                vec![("listener", l.local_addr().to_string())],
                l.connections(),
                l.admission_stats(),
            )
        })
        .collect();
    family(
        e,
        "ferroblk_nvmf_connections",
        "NVMe/TCP connections (one per admin or I/O queue) open on the listener",
        None,
        listeners
            .iter()
            .map(|(l, n, _)| (l.clone(), gauge(*n as u64)))
            .collect(),
    )?;
    for (metric, help, f) in [
        (
            "ferroblk_nvmf_refused",
            "NVMe/TCP connections refused at accept (connection caps)",
            (|a| a.refused)
                as fn(&ferroblk_target::transport::tcp::admission::AdmissionStats) -> u64,
        ),
        (
            "ferroblk_nvmf_evicted",
            "Unidentified NVMe/TCP connections closed to make room for a newcomer",
            |a| a.evicted,
        ),
        (
            "ferroblk_nvmf_handshake_timeouts",
            "NVMe/TCP connections closed because ICReq or Connect did not arrive in time",
            |a| a.timed_out,
        ),
    ] {
        family(
            e,
            metric,
            help,
            None,
            listeners
                .iter()
                .map(|(l, _, a)| (l.clone(), counter(f(a))))
                .collect(),
        )?;
    }
    let subsystems: Vec<_> = state
        .target
        .subsystems()
        .into_iter()
        .filter(|s| !s.discovery)
        .collect();
    family(
        e,
        "ferroblk_nvmf_controllers",
        "NVMe-oF controllers (connected hosts) of the subsystem",
        None,
        subsystems
            .iter()
            .map(|s| {
                (
                    vec![("nqn", s.nqn.clone())],
                    gauge(s.controllers().len() as u64),
                )
            })
            .collect(),
    )?;
    family(
        e,
        "ferroblk_nvmf_io_queues_granted",
        "I/O queues granted to the subsystem's controllers (Number of Queues feature)",
        None,
        subsystems
            .iter()
            .map(|s| {
                let n: u64 = s
                    .controllers()
                    .iter()
                    .map(|c| u64::from(c.io_queues.load(Ordering::Relaxed)))
                    .sum();
                (vec![("nqn", s.nqn.clone())], gauge(n))
            })
            .collect(),
    )?;
    let mut namespaces = Vec::new();
    for s in &subsystems {
        for n in s.namespaces() {
            let l = vec![
                ("nqn", s.nqn.clone()),
                ("nsid", n.nsid.to_string()),
                ("bdev", n.bdev.info().name().to_string()),
            ];
            namespaces.push((l, gauge(1)));
        }
    }
    family(
        e,
        "ferroblk_nvmf_namespace",
        "Namespaces served (1) and their bdev; their I/O is the bdev's (ferroblk_bdev_*)",
        None,
        namespaces,
    )
}

fn encode_reactors(e: &mut DescriptorEncoder, state: &DaemonState) -> fmt::Result {
    let reactor = |h: &ferroblk_bdev::reactor::ReactorHandle| vec![("reactor", h.id().to_string())];
    let mut time = Vec::new();
    for h in &state.reactors {
        let s = h.stats();
        for (st, v) in [
            ("busy", &s.busy_ns),
            ("idle_poll", &s.idle_poll_ns),
            ("sleep", &s.sleep_ns),
        ] {
            let mut l = reactor(h);
            l.push(("state", st.to_string()));
            time.push((l, ns_to_s(v.load(Ordering::Relaxed))));
        }
    }
    family(
        e,
        "ferroblk_reactor_time",
        "Reactor thread time: busy (turns that did work), idle_poll (spinning without work \
         before sleeping), sleep",
        Some(&Unit::Seconds),
        time,
    )?;
    family(
        e,
        "ferroblk_reactor_busy_turns",
        "Reactor loop turns that did work",
        None,
        state
            .reactors
            .iter()
            .map(|h| {
                (
                    reactor(h),
                    counter(h.stats().busy_turns.load(Ordering::Relaxed)),
                )
            })
            .collect(),
    )?;
    family(
        e,
        "ferroblk_reactor_sleeps",
        "Times the reactor went to sleep",
        None,
        state
            .reactors
            .iter()
            .map(|h| {
                (
                    reactor(h),
                    counter(h.stats().sleeps.load(Ordering::Relaxed)),
                )
            })
            .collect(),
    )?;
    family(
        e,
        "ferroblk_reactor_pollers",
        "Pollers (queues, connections) registered on the reactor",
        None,
        state
            .reactors
            .iter()
            .map(|h| (reactor(h), gauge(h.stats().pollers.load(Ordering::Relaxed))))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_classified() {
        let p = |s: &str| parse_request(s.as_bytes());
        assert_eq!(
            p("GET /metrics HTTP/1.1\r\nHost: x"),
            Route::Metrics { body: true }
        );
        assert_eq!(
            p("GET /metrics?x=1 HTTP/1.0"),
            Route::Metrics { body: true }
        );
        assert_eq!(p("HEAD /metrics HTTP/1.1"), Route::Metrics { body: false });
        assert_eq!(p("GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(p("POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
        for bad in [
            "",
            "GET",
            "GET /metrics",
            "GET /metrics HTTP/2",
            "GET metrics HTTP/1.1",
            "GET  /metrics HTTP/1.1",
            "get /metrics HTTP/1.1",
            "GET /metrics HTTP/1.1 extra",
            "\u{1}\u{2}garbage",
        ] {
            assert_eq!(p(bad), Route::BadRequest, "{bad:?}");
        }
        assert_eq!(parse_request(&[0xff, 0xfe, b' ']), Route::BadRequest);
    }
}
