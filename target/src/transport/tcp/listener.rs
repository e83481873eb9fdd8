//! TCP listeners: one accept thread per address, admitting each connection through a
//! [`Gate`] (handshake deadlines, per-peer bound, eviction of unidentified connections when
//! full; see [`super::admission`]) and handing it to a reactor (round-robin) as a [`TcpConn`]
//! poller.

use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ferroblk_bdev::reactor::ReactorHandle;
use ferroblk_bdev::uring::wait_readable;

use super::admission::{Admission, AdmissionStats, Gate, HandshakeLimits};
use super::conn::TcpConn;
use crate::subsystem::{ListenerSpec, Port, Target};

/// Most connections one listener keeps open. When full, a newcomer takes the slot of the
/// oldest connection that has not completed ICReq and Connect, or is closed if there is none.
pub const MAX_CONNECTIONS: usize = 1024;

/// How often the accept thread wakes without a connection (stop flag, admission report).
const ACCEPT_TICK: Duration = Duration::from_secs(1);
/// Pause after a failed accept (descriptor or memory exhaustion).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A listening socket.
pub struct Listener {
    spec: ListenerSpec,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
    admission: Arc<Admission>,
    wake: std::os::fd::OwnedFd,
}

impl Listener {
    /// Binds `spec` and starts accepting.
    pub fn start(
        spec: ListenerSpec,
        target: Arc<Target>,
        reactors: Vec<ReactorHandle>,
    ) -> std::io::Result<Listener> {
        spec.validate_io()?;
        let ip: std::net::IpAddr = spec.addr.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("'{}' is not an IP address", spec.addr),
            )
        })?;
        raise_nofile_limit();
        let l = TcpListener::bind((ip, spec.port))?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let wake = std::os::fd::OwnedFd::from(l.try_clone()?);
        let stop = Arc::new(AtomicBool::new(false));
        let admission = Arc::new(Admission::new(
            addr,
            HandshakeLimits {
                ic_timeout: Duration::from_millis(spec.ic_timeout_ms),
                connect_timeout: Duration::from_millis(spec.connect_timeout_ms),
                max_unidentified_per_peer: spec.max_unidentified_per_peer as usize,
                max_connections: MAX_CONNECTIONS,
            },
        ));
        // The listener's port (its ANA states), registered once the address is bound, with the
        // port number bound (a spec may ask for port 0).
        let port = target.add_listener(ListenerSpec {
            port: addr.port(),
            ..spec.clone()
        });
        let thread = {
            let stop = stop.clone();
            let gate = Gate::new(admission.clone());
            std::thread::Builder::new()
                .name(format!("nvmf-accept-{}", spec.port))
                .spawn(move || accept_loop(l, target, port, reactors, stop, gate))?
        };
        tracing::info!(addr = %addr, "NVMe/TCP listener started");
        Ok(Listener {
            spec,
            stop,
            addr,
            thread: Some(thread),
            admission,
            wake,
        })
    }

    /// The declaration.
    pub fn spec(&self) -> &ListenerSpec {
        &self.spec
    }

    /// The bound address (the real port when the spec asked for port 0).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Connections holding a slot now (an evicted connection gives its slot up at once).
    pub fn connections(&self) -> usize {
        self.admission.open()
    }

    /// Connections refused, evicted and timed out so far.
    pub fn admission_stats(&self) -> AdmissionStats {
        self.admission.stats()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the waiting poll.
        // SAFETY: shutdown on the listening socket this listener owns.
        unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(addr = %self.addr, "NVMe/TCP listener stopped");
    }
}

/// Raises the process's soft descriptor limit to its hard limit, once (as the Go runtime does at
/// start): every connection is a descriptor, and the common soft default (1024) would stop
/// accepts before [`MAX_CONNECTIONS`] is reached, with no way to evict idle connections.
fn raise_nofile_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the valid struct passed.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
            return;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            // SAFETY: setrlimit reads one valid rlimit; a soft limit up to the hard one is
            // always allowed.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                tracing::debug!(
                    from = l.rlim_cur,
                    to = raised.rlim_cur,
                    "raised RLIMIT_NOFILE"
                );
                l = raised;
            }
        }
        if (l.rlim_cur as usize) < 2 * MAX_CONNECTIONS {
            tracing::warn!(
                limit = l.rlim_cur,
                "RLIMIT_NOFILE is below twice the NVMe/TCP connection limit; accepts may fail \
                 before the limit is reached"
            );
        }
    });
}

fn accept_loop(
    l: TcpListener,
    target: Arc<Target>,
    port: Arc<Port>,
    reactors: Vec<ReactorHandle>,
    stop: Arc<AtomicBool>,
    mut gate: Gate,
) {
    let mut next = 0usize;
    let admission = gate.admission().clone();
    while !stop.load(Ordering::Acquire) {
        let (s, peer) = match l.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                admission.report();
                wait_readable(l.as_fd(), ACCEPT_TICK);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or memory (the pending connection stays queued, so the
                // socket stays readable): let the condition pass rather than spin.
                tracing::debug!(error = %e, "NVMe/TCP accept failed");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let Some(ticket) = gate.admit(s, peer.ip()) else {
            continue;
        };
        let r = reactors[next % reactors.len()].clone();
        next += 1;
        let target = target.clone();
        let port = port.clone();
        let r2 = r.clone();
        // A ticket the reactor never takes is dropped with the closure, releasing its slot.
        r.send(move |core| match TcpConn::new(target, port, r2, ticket) {
            Ok(c) => {
                core.add_poller(Box::new(c));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve an NVMe/TCP connection");
            }
        });
    }
}
