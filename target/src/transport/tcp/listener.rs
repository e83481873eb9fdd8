//! TCP listeners: one accept thread per address, handing each connection to a reactor
//! (round-robin) as a [`TcpConn`] poller.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use ferroblk_bdev::reactor::ReactorHandle;

use super::conn::TcpConn;
use crate::subsystem::{ListenerSpec, Target};

/// Most connections one listener keeps open; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 1024;

/// A listening socket.
pub struct Listener {
    spec: ListenerSpec,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
    conns: Arc<AtomicUsize>,
    wake: std::os::fd::OwnedFd,
}

impl Listener {
    /// Binds `spec` and starts accepting.
    pub fn start(
        spec: ListenerSpec,
        target: Arc<Target>,
        reactors: Vec<ReactorHandle>,
    ) -> std::io::Result<Listener> {
        let ip: std::net::IpAddr = spec.addr.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("'{}' is not an IP address", spec.addr),
            )
        })?;
        let l = TcpListener::bind((ip, spec.port))?;
        let addr = l.local_addr()?;
        let wake = std::os::fd::OwnedFd::from(l.try_clone()?);
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let conns = conns.clone();
            std::thread::Builder::new()
                .name(format!("nvmf-accept-{}", spec.port))
                .spawn(move || accept_loop(l, target, reactors, stop, conns))?
        };
        tracing::info!(addr = %addr, "NVMe/TCP listener started");
        Ok(Listener {
            spec,
            stop,
            addr,
            thread: Some(thread),
            conns,
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

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Acquire)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocked accept.
        // SAFETY: shutdown on the listening socket this listener owns.
        unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(addr = %self.addr, "NVMe/TCP listener stopped");
    }
}

fn accept_loop(
    l: TcpListener,
    target: Arc<Target>,
    reactors: Vec<ReactorHandle>,
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicUsize>,
) {
    let mut next = 0usize;
    for s in l.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(s) = s else { continue };
        if conns.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            tracing::warn!("NVMe/TCP connection limit reached; closing a new connection");
            drop(s);
            continue;
        }
        conns.fetch_add(1, Ordering::AcqRel);
        let r = reactors[next % reactors.len()].clone();
        next += 1;
        let target = target.clone();
        let conns2 = conns.clone();
        let r2 = r.clone();
        let sent = r.send(
            move |core| match TcpConn::new(target, r2, s, conns2.clone()) {
                Ok(c) => {
                    core.add_poller(Box::new(c));
                }
                Err(e) => {
                    conns2.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(error = %e, "cannot serve an NVMe/TCP connection");
                }
            },
        );
        if !sent {
            conns.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
