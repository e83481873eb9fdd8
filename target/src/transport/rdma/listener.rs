//! RDMA CM listeners: one thread per address waits on its event channel for connect requests,
//! checks their NVMe/RDMA private data ([`CmRequest`]; a bad one is rejected with the reason
//! the host's driver reports), and hands each to a reactor (round-robin), where
//! [`RdmaConn::accept`] sets the queue pair up and accepts.

use std::ffi::CString;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ferroblk_bdev::reactor::ReactorHandle;
use ferroblk_bdev::uring::wait_readable;

use super::conn::{RdmaConn, Request};
use super::ffi;
use super::wire::{CmRequest, RejectStatus};
use crate::subsystem::{ListenerSpec, Port, Target};
use crate::transport::tcp::admission::{Admission, HandshakeLimits};

/// How often the listener thread wakes without an event (stop flag).
const TICK: Duration = Duration::from_millis(500);
/// Connect requests the CM queues before the thread takes them.
const BACKLOG: i32 = 128;

struct Cm {
    ch: *mut ffi::EventChannel,
    /// The listening id; null while its RDMA device is gone.
    id: *mut ffi::CmId,
    fd: RawFd,
    /// Where to listen again after a device removal.
    addr: CString,
    port: CString,
}

impl Cm {
    /// Listens again after the device went away (its address may be back).
    fn relisten(&mut self) {
        let mut id = std::ptr::null_mut();
        let mut bound = 0u16;
        // SAFETY: NUL-terminated strings and out-pointers to locals; the channel is live.
        let rc = unsafe {
            ffi::fb_listen(
                self.ch,
                self.addr.as_ptr(),
                self.port.as_ptr(),
                BACKLOG,
                &mut id,
                &mut bound,
            )
        };
        if rc == 0 {
            self.id = id;
            tracing::info!(addr = ?self.addr, port = bound, "NVMe/RDMA listener listening again");
        }
    }
}

// SAFETY: the channel and listening id are used by the listener thread only, once moved there.
unsafe impl Send for Cm {}

impl Drop for Cm {
    fn drop(&mut self) {
        // SAFETY: both are live (or the id null) and owned here; the id goes before its
        // channel.
        unsafe {
            if !self.id.is_null() {
                ffi::fb_destroy_id(self.id);
            }
            ffi::fb_channel_destroy(self.ch);
        }
    }
}

/// A listening RDMA CM id.
pub struct Listener {
    spec: ListenerSpec,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    accepted: Arc<AtomicUsize>,
}

impl Listener {
    /// Binds `spec` (an address of an RDMA device: RoCE, iWARP or IPoIB) and starts
    /// listening.
    pub fn start(
        spec: ListenerSpec,
        target: Arc<Target>,
        reactors: Vec<ReactorHandle>,
    ) -> std::io::Result<Listener> {
        spec.validate_io()?;
        let addr = CString::new(spec.addr.clone()).map_err(std::io::Error::other)?;
        let port = CString::new(spec.port.to_string()).map_err(std::io::Error::other)?;
        let mut ch = std::ptr::null_mut();
        let mut fd = 0;
        // SAFETY: out-pointers to locals.
        let rc = unsafe { ffi::fb_channel_create(&mut ch, &mut fd) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let mut id = std::ptr::null_mut();
        let mut bound = 0u16;
        // SAFETY: NUL-terminated strings and out-pointers to locals; the channel is live.
        let rc = unsafe {
            ffi::fb_listen(
                ch,
                addr.as_ptr(),
                port.as_ptr(),
                BACKLOG,
                &mut id,
                &mut bound,
            )
        };
        if rc != 0 {
            // SAFETY: the channel has no id.
            unsafe { ffi::fb_channel_destroy(ch) };
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let port = CString::new(bound.to_string()).expect("digits have no NUL");
        let cm = Cm {
            ch,
            id,
            fd,
            addr,
            port,
        };
        let ip: std::net::IpAddr = spec.addr.parse().map_err(std::io::Error::other)?;
        let admission = Arc::new(Admission::new(
            (ip, bound).into(),
            HandshakeLimits {
                ic_timeout: Duration::from_millis(spec.ic_timeout_ms),
                connect_timeout: Duration::from_millis(spec.connect_timeout_ms),
                max_unidentified_per_peer: spec.max_unidentified_per_peer as usize,
                max_connections: usize::MAX,
            },
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let nvmf_port = target.add_listener(ListenerSpec {
            port: bound,
            ..spec.clone()
        });
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::Builder::new()
                .name(format!("nvmf-rdma-{}", bound))
                .spawn(move || {
                    cm_loop(cm, target, nvmf_port, reactors, admission, stop, accepted)
                })?
        };
        tracing::info!(addr = %spec.addr, port = bound, "NVMe/RDMA listener started");
        Ok(Listener {
            spec,
            port: bound,
            stop,
            thread: Some(thread),
            accepted,
        })
    }

    /// The declaration.
    pub fn spec(&self) -> &ListenerSpec {
        &self.spec
    }

    /// The bound port (the real one when the spec asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Queue pairs accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(addr = %self.spec.addr, port = self.port, "NVMe/RDMA listener stopped");
    }
}

/// Rejects connect request `id` with `st` and destroys it.
fn reject(id: *mut ffi::CmId, st: RejectStatus) {
    let pd = st.private_data();
    // SAFETY: `id` is a live id of a connect request no one else holds.
    unsafe {
        ffi::fb_reject(id, pd.as_ptr().cast(), pd.len() as u8);
        ffi::fb_destroy_id(id);
    }
}

fn cm_loop(
    mut cm: Cm,
    target: Arc<Target>,
    port: Arc<Port>,
    reactors: Vec<ReactorHandle>,
    admission: Arc<Admission>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
) {
    let mut next = 0usize;
    while !stop.load(Ordering::Acquire) {
        // SAFETY: a zeroed plain C struct the shim fills.
        let mut ev: ffi::CmEvent = unsafe { std::mem::zeroed() };
        // SAFETY: the channel is live; `ev` is a valid out-pointer.
        if unsafe { ffi::fb_get_event(cm.ch, &mut ev) } != 0 {
            // SAFETY: the channel's descriptor stays open while `cm` (which owns it) lives.
            wait_readable(unsafe { BorrowedFd::borrow_raw(cm.fd) }, TICK);
            if cm.id.is_null() {
                cm.relisten();
            }
            continue;
        }
        if ev.event == ffi::event::DEVICE_REMOVAL && ev.id == cm.id {
            // The device must be let go of (its removal waits for every user): listen again
            // once the address is back.
            tracing::warn!(addr = ?cm.addr, "RDMA device of the NVMe/RDMA listener removed");
            // SAFETY: the listening id is live and its event acknowledged.
            unsafe { ffi::fb_destroy_id(cm.id) };
            cm.id = std::ptr::null_mut();
            continue;
        }
        if ev.event != ffi::event::CONNECT_REQUEST {
            // Events of ids not yet moved to their reactor's channel (a host that gave up).
            tracing::debug!(event = %ffi::event_name(ev.event), "RDMA CM event on the listener");
            continue;
        }
        // SAFETY: the request's id is live.
        let peer = unsafe { ffi::peer(ev.id) };
        let pd = &ev.private_data[..usize::from(ev.private_data_len)];
        let req = match CmRequest::parse(pd) {
            Ok(r) => r,
            Err(st) => {
                // The fields (RECFMT, QID, HRQSIZE, HSQSIZE), not the reserved bytes after them.
                let fields = &pd[..pd.len().min(CmRequest::FIELDS)];
                let why = "bad NVMe/RDMA private data";
                admission.log_connect_refused(&peer, st.field(), &fields, why);
                reject(ev.id, st);
                continue;
            }
        };
        let r = Request {
            id: ev.id,
            req,
            initiator_depth: ev.initiator_depth,
        };
        let reactor = reactors[next % reactors.len()].clone();
        next += 1;
        let (target, port, admission, accepted, r2) = (
            target.clone(),
            port.clone(),
            admission.clone(),
            accepted.clone(),
            reactor.clone(),
        );
        reactor.send(move |core| {
            let r = r;
            match RdmaConn::accept(target, port, r2, admission, &r) {
                Ok(c) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    core.add_poller(Box::new(c));
                }
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "cannot serve an NVMe/RDMA queue");
                    reject(r.id, RejectStatus::NoResources);
                }
            }
        });
    }
}
