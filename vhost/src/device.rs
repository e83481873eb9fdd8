//! A vhost-user-blk export: one Unix socket, one front-end at a time, any number of queues
//! spread over the reactors.
//!
//! The control thread of the export owns the connection and speaks the vhost-user protocol;
//! each started virtqueue becomes a [`VqPoller`] on reactor `queue % reactors`. Stopping a queue
//! (GET_VRING_BASE, disable, disconnect, shutdown) drains its in-flight requests before the
//! queue state is handed back. A resize of the bdev reaches the front-end as a
//! `CONFIG_CHANGE_MSG` on the back-end channel, and the guest sees its disk grow.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferroblk_bdev::eventfd;
use ferroblk_bdev::reactor::{PollerId, ReactorHandle};
use ferroblk_bdev::uring::wait_readable;
use ferroblk_bdev::{Bdev, Caps, MAX_EXPORT_IO_BYTES, MAX_EXPORT_SEGMENTS};
use serde::{Deserialize, Serialize};

use crate::blk;
use crate::inflight::{self, InflightRegion};
use crate::memory::{GuestMemory, RegionDesc};
use crate::protocol::{self, Message, ProtocolError, backend_req, pf, req};
use crate::queue::{BlkParams, QueueCtl, VqPoller};
use crate::spec::{ID_BYTES, vf};
use crate::virtq::{RingAddrs, SplitQueue};

/// Protocol features this back-end offers.
pub const PROTOCOL_FEATURES: u64 = pf::MQ
    | pf::REPLY_ACK
    | pf::BACKEND_REQ
    | pf::CONFIG
    | pf::INFLIGHT_SHMFD
    | pf::RESET_DEVICE
    | pf::CONFIGURE_MEM_SLOTS;

/// Declaration of a vhost-user-blk export (`[[vhost]]` in the config, `vhost_add` params).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostSpec {
    /// Unix socket the front-end (QEMU, cloud-hypervisor) connects to; mode 0600.
    pub socket: PathBuf,
    /// The bdev exported.
    pub bdev: String,
    /// Number of virtqueues (default 1), served round-robin by the reactors.
    #[serde(default = "one")]
    pub num_queues: u16,
    /// Export read-only (VIRTIO_BLK_F_RO).
    #[serde(default)]
    pub read_only: bool,
    /// Serial number for GET_ID (at most 20 bytes; default: the bdev name).
    #[serde(default)]
    pub serial: Option<String>,
}

fn one() -> u16 {
    1
}

impl VhostSpec {
    /// Checks values that need nothing else; errors name the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.num_queues == 0 || self.num_queues > 64 {
            return Err((
                "num_queues".into(),
                format!("{} is not in 1..=64", self.num_queues),
            ));
        }
        if let Some(s) = &self.serial
            && (s.len() > ID_BYTES || !s.is_ascii())
        {
            return Err(("serial".into(), "at most 20 ASCII characters".into()));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(("socket".into(), "is empty".into()));
        }
        Ok(())
    }
}

/// An export's failure to start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A setting is invalid.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

struct Shared {
    stop: AtomicBool,
    conn: Mutex<Option<UnixStream>>,
    backend: Mutex<Option<UnixStream>>,
    /// The front-end negotiated CONFIG and REPLY_ACK (for the back-end channel).
    config_ok: AtomicBool,
    backend_ack: AtomicBool,
    writeback: Arc<AtomicBool>,
}

/// A running export.
pub struct VhostExport {
    spec: VhostSpec,
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    bdev: Arc<dyn Bdev>,
    subscription: u64,
    /// The listening socket, to wake the blocked accept at stop.
    wake: OwnedFd,
}

impl VhostExport {
    /// Starts serving `bdev` on `spec.socket` with the given reactors.
    pub fn start(
        spec: VhostSpec,
        bdev: Arc<dyn Bdev>,
        reactors: Vec<ReactorHandle>,
    ) -> Result<VhostExport, ExportError> {
        spec.validate()
            .map_err(|(field, reason)| ExportError::Invalid { field, reason })?;
        if reactors.is_empty() {
            return Err(ExportError::Invalid {
                field: "reactors".into(),
                reason: "no reactor to serve the queues".into(),
            });
        }
        let listener = ferroblk_bdev::unix::bind_private(&spec.socket).map_err(|source| {
            ExportError::Bind {
                path: spec.socket.clone(),
                source,
            }
        })?;
        let wake = listener
            .try_clone()
            .map(OwnedFd::from)
            .map_err(|source| ExportError::Bind {
                path: spec.socket.clone(),
                source,
            })?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
            backend: Mutex::new(None),
            config_ok: AtomicBool::new(false),
            backend_ack: AtomicBool::new(false),
            writeback: Arc::new(AtomicBool::new(
                bdev.info().caps().contains(Caps::VOLATILE_CACHE),
            )),
        });
        let subscription = {
            let shared = shared.clone();
            let name = spec.socket.display().to_string();
            bdev.info()
                .subscribe(move |_| notify_config_change(&shared, &name))
        };
        let thread = {
            let shared = shared.clone();
            let spec = spec.clone();
            let bdev = bdev.clone();
            std::thread::Builder::new()
                .name("vhost-ctl".into())
                .spawn(move || accept_loop(listener, spec, bdev, reactors, shared))
                .map_err(|source| ExportError::Bind {
                    path: PathBuf::from("(thread)"),
                    source,
                })?
        };
        tracing::info!(socket = %spec.socket.display(), bdev = %spec.bdev,
            queues = spec.num_queues, "vhost-user-blk export listening");
        Ok(VhostExport {
            path: spec.socket.clone(),
            spec,
            shared,
            thread: Some(thread),
            bdev,
            subscription,
            wake,
        })
    }

    /// The declaration.
    pub fn spec(&self) -> &VhostSpec {
        &self.spec
    }

    /// Whether a front-end is connected.
    pub fn connected(&self) -> bool {
        self.shared.conn.lock().expect("conn lock").is_some()
    }
}

impl Drop for VhostExport {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(c) = self.shared.conn.lock().expect("conn lock").as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Wake the blocked accept (this works even if the socket's path was removed).
        // SAFETY: shutdown on the listening socket this export owns.
        unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.bdev.info().unsubscribe(self.subscription);
        let _ = std::fs::remove_file(&self.path);
        tracing::info!(socket = %self.path.display(), "vhost-user-blk export stopped");
    }
}

fn notify_config_change(shared: &Shared, name: &str) {
    if !shared.config_ok.load(Ordering::Acquire) {
        return;
    }
    if let Some(s) = shared.backend.lock().expect("backend lock").as_ref() {
        // Sent without NEED_REPLY: the front-end re-reads the config space on its own time.
        if let Err(e) = protocol::send(s, backend_req::CONFIG_CHANGE_MSG, 0, &[], &[]) {
            tracing::warn!(socket = name, error = %e, "cannot notify the front-end of a config change");
        } else {
            tracing::info!(socket = name, "config change sent to the front-end");
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    spec: VhostSpec,
    bdev: Arc<dyn Bdev>,
    reactors: Vec<ReactorHandle>,
    shared: Arc<Shared>,
) {
    // Rings whose poller did not drain when the previous front-end left: they stay held (see
    // `Conn::stop_ring`) across connections, so the next front-end cannot start a second
    // poller on a ring an old one still completes into.
    let mut held: Vec<Option<Running>> = Vec::new();
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "vhost-user accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        match stream.try_clone() {
            Ok(c) => *shared.conn.lock().expect("conn lock") = Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot use the vhost-user connection");
                continue;
            }
        }
        tracing::info!(socket = %spec.socket.display(), "front-end connected");
        let mut conn = Conn::new(&spec, &bdev, &reactors, &shared, stream);
        conn.adopt(std::mem::take(&mut held));
        let why = conn.run();
        conn.stop_all();
        held = conn.into_held();
        *shared.conn.lock().expect("conn lock") = None;
        *shared.backend.lock().expect("backend lock") = None;
        shared.config_ok.store(false, Ordering::Release);
        match why {
            ProtocolError::Closed => {
                tracing::info!(socket = %spec.socket.display(), "front-end disconnected")
            }
            e => tracing::warn!(socket = %spec.socket.display(), error = %e,
                "front-end connection closed on error"),
        }
    }
}

struct Running {
    reactor: usize,
    poller: PollerId,
    ctl: Arc<QueueCtl>,
    /// Set when a stop was asked for: the poller sends its `last_avail` here once its last
    /// request completes.
    draining: Option<mpsc::Receiver<u16>>,
    /// The stop did not drain within the drain timeout: the poller is still registered, and
    /// the ring is held (not started again) until it finishes.
    held: bool,
}

/// How long stopping a ring waits for its in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a held ring's poller is looked at while no message arrives.
const HELD_RETRY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Vring {
    num: u16,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    err: Option<OwnedFd>,
    enabled: bool,
    running: Option<Running>,
}

struct Conn<'a> {
    spec: &'a VhostSpec,
    bdev: &'a Arc<dyn Bdev>,
    reactors: &'a [ReactorHandle],
    shared: &'a Shared,
    sock: UnixStream,
    features: u64,
    protocol: u64,
    mem: Arc<GuestMemory>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightRegion>>,
    drain_timeout: Duration,
}

impl<'a> Conn<'a> {
    fn new(
        spec: &'a VhostSpec,
        bdev: &'a Arc<dyn Bdev>,
        reactors: &'a [ReactorHandle],
        shared: &'a Shared,
        sock: UnixStream,
    ) -> Conn<'a> {
        Conn {
            spec,
            bdev,
            reactors,
            shared,
            sock,
            features: 0,
            protocol: 0,
            mem: Arc::new(GuestMemory::empty()),
            vrings: (0..spec.num_queues).map(|_| Vring::default()).collect(),
            inflight: None,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }

    /// Takes over the rings a previous connection left held by undrained pollers.
    fn adopt(&mut self, held: Vec<Option<Running>>) {
        for (v, run) in self.vrings.iter_mut().zip(held) {
            v.running = run;
        }
    }

    /// The rings still held by undrained pollers (after [`Conn::stop_all`]), for the next
    /// connection.
    fn into_held(self) -> Vec<Option<Running>> {
        self.vrings.into_iter().map(|v| v.running).collect()
    }

    fn offered_features(&self) -> u64 {
        let caps = self.bdev.info().caps();
        let mut f = vf::VERSION_1
            | vf::BLK_SIZE_MAX
            | vf::BLK_SEG_MAX
            | vf::BLK_BLK_SIZE
            | vf::BLK_TOPOLOGY
            | vf::BLK_MQ
            | vf::RING_EVENT_IDX
            | vf::RING_INDIRECT_DESC
            | protocol::F_PROTOCOL_FEATURES;
        if caps.contains(Caps::FLUSH) {
            f |= vf::BLK_FLUSH;
            if caps.contains(Caps::VOLATILE_CACHE) {
                f |= vf::BLK_CONFIG_WCE;
            }
        }
        if caps.contains(Caps::UNMAP) {
            f |= vf::BLK_DISCARD;
        }
        if caps.contains(Caps::WRITE_ZEROES) {
            f |= vf::BLK_WRITE_ZEROES;
        }
        if self.read_only() {
            f |= vf::BLK_RO;
        }
        f
    }

    fn read_only(&self) -> bool {
        self.spec.read_only || self.bdev.info().is_read_only()
    }

    /// `seg_max`: the most segments a request may carry. The bdev channel layer splits what
    /// the chain cannot take whole, so this is the export's own limit, not the chain's.
    fn seg_max(&self) -> u32 {
        MAX_EXPORT_SEGMENTS
    }

    /// The virtio-blk configuration space (virtio 1.2 §5.2.4).
    fn config_space(&self) -> [u8; 64] {
        let g = self.bdev.info().geometry();
        let bs = g.block_size.bytes();
        let mut c = [0u8; 64];
        let put32 = |c: &mut [u8; 64], off: usize, v: u32| {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        c[0..8].copy_from_slice(&(g.size_bytes() / 512).to_le_bytes());
        // A request carries at most seg_max × size_max bytes: no more than the largest I/O
        // every chain is tested with (MAX_EXPORT_IO_BYTES).
        let seg_max = self.seg_max();
        let size_max = (MAX_EXPORT_IO_BYTES / u64::from(seg_max)) as u32 & !4095;
        put32(&mut c, 8, size_max.max(4096));
        put32(&mut c, 12, seg_max);
        put32(&mut c, 20, bs);
        c[24] = 0; // physical_block_exp
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size, in logical blocks
        // opt_io_size: the chain's own largest transfer (larger requests are split).
        let opt_blocks = u64::from(g.max_transfer_blocks).min(MAX_EXPORT_IO_BYTES / u64::from(bs));
        put32(&mut c, 28, opt_blocks as u32);
        c[32] = u8::from(self.shared.writeback.load(Ordering::Relaxed));
        c[34..36].copy_from_slice(&self.spec.num_queues.to_le_bytes());
        let max_sectors = blk::MAX_DISCARD_SECTORS;
        put32(&mut c, 36, max_sectors); // max_discard_sectors
        put32(&mut c, 40, 1); // max_discard_seg
        put32(&mut c, 44, bs / 512); // discard_sector_alignment
        put32(&mut c, 48, max_sectors); // max_write_zeroes_sectors
        put32(&mut c, 52, 1); // max_write_zeroes_seg
        c[56] = u8::from(g.caps.contains(Caps::UNMAP_READS_ZEROES));
        c
    }

    fn params(&self) -> BlkParams {
        let mut serial = [0u8; ID_BYTES];
        let s = self.spec.serial.as_deref().unwrap_or(&self.spec.bdev);
        let n = s.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&s.as_bytes()[..n]);
        BlkParams {
            block_shift: self.bdev.info().block_size().shift(),
            serial,
            max_segments: self.seg_max() as usize,
            unmap_zeroes: self.bdev.info().caps().contains(Caps::UNMAP_READS_ZEROES),
            writeback: self.shared.writeback.clone(),
            volatile_cache: self.bdev.info().caps().contains(Caps::VOLATILE_CACHE),
            read_only: self.read_only(),
        }
    }

    fn run(&mut self) -> ProtocolError {
        loop {
            // A held ring starts once its old poller has drained, without waiting for the
            // front-end's next message: look every second while one is held.
            while self.any_held() && !wait_readable(self.sock.as_fd(), HELD_RETRY) {
                for i in 0..self.vrings.len() {
                    if self.vrings[i].running.as_ref().is_some_and(|r| r.held)
                        && self.reap_drained(i)
                    {
                        self.try_start(i);
                    }
                }
            }
            let m = match protocol::recv(&self.sock) {
                Ok(m) => m,
                Err(e) => return e,
            };
            if let Err(e) = self.handle(m) {
                return e;
            }
        }
    }

    fn ack(&self, m: &Message, ok: bool) -> Result<(), ProtocolError> {
        if m.need_reply() && self.protocol & pf::REPLY_ACK != 0 {
            protocol::reply(&self.sock, m, &u64::from(!ok).to_le_bytes())?;
        }
        Ok(())
    }

    fn vring_index(&self, m: &Message, i: u32) -> Result<usize, ProtocolError> {
        if (i as usize) < self.vrings.len() {
            Ok(i as usize)
        } else {
            Err(m.bad(format!(
                "queue {i} out of range ({} queues)",
                self.vrings.len()
            )))
        }
    }

    fn handle(&mut self, mut m: Message) -> Result<(), ProtocolError> {
        tracing::debug!(request = m.request, "vhost-user message");
        match m.request {
            req::GET_FEATURES => {
                protocol::reply(&self.sock, &m, &self.offered_features().to_le_bytes())?;
            }
            req::SET_FEATURES => {
                let f = m.u64_at(0)?;
                if f & !self.offered_features() != 0 {
                    return Err(m.bad(format!("features {f:#x} were not offered")));
                }
                self.features = f;
                // The cache mode this driver starts with (§5.2.5.1): write-back only if it can
                // flush. A driver without VIRTIO_BLK_F_FLUSH assumes write-through (Linux's
                // virtblk_get_cache_mode), so each of its writes is made durable before it
                // completes. Set at each negotiation: a new connection (or a reset) does not
                // inherit the previous driver's choice.
                let wb = self.bdev.info().caps().contains(Caps::VOLATILE_CACHE)
                    && f & vf::BLK_FLUSH != 0;
                self.shared.writeback.store(wb, Ordering::Release);
                self.ack(&m, true)?;
            }
            req::GET_PROTOCOL_FEATURES => {
                protocol::reply(&self.sock, &m, &PROTOCOL_FEATURES.to_le_bytes())?;
            }
            req::SET_PROTOCOL_FEATURES => {
                let f = m.u64_at(0)?;
                if f & !PROTOCOL_FEATURES != 0 {
                    return Err(m.bad(format!("protocol features {f:#x} were not offered")));
                }
                self.protocol = f;
                self.shared
                    .config_ok
                    .store(f & pf::CONFIG != 0, Ordering::Release);
                self.shared
                    .backend_ack
                    .store(f & pf::REPLY_ACK != 0, Ordering::Release);
                self.ack(&m, true)?;
            }
            req::SET_OWNER => self.ack(&m, true)?,
            req::RESET_OWNER | req::RESET_DEVICE => {
                self.stop_all();
                for v in &mut self.vrings {
                    // A ring still held by an undrained poller stays held.
                    *v = Vring {
                        running: v.running.take(),
                        ..Vring::default()
                    };
                }
                self.features = 0;
                self.ack(&m, true)?;
            }
            req::GET_QUEUE_NUM => {
                protocol::reply(
                    &self.sock,
                    &m,
                    &u64::from(self.spec.num_queues).to_le_bytes(),
                )?;
            }
            req::SET_MEM_TABLE => {
                let n = m.u32_at(0)? as usize;
                if n == 0 || n > protocol::MAX_MEM_REGIONS {
                    return Err(m.bad(format!("{n} memory regions")));
                }
                m.expect_len(8 + 32 * n)?;
                let descs: Vec<RegionDesc> = (0..n)
                    .map(|i| {
                        let o = 8 + 32 * i;
                        Ok(RegionDesc {
                            guest_phys_addr: m.u64_at(o)?,
                            memory_size: m.u64_at(o + 8)?,
                            user_addr: m.u64_at(o + 16)?,
                            mmap_offset: m.u64_at(o + 24)?,
                        })
                    })
                    .collect::<Result<_, ProtocolError>>()?;
                let fds = std::mem::take(&mut m.fds);
                let mem = GuestMemory::new(&descs, &fds).map_err(|e| m.bad(e))?;
                self.swap_memory(mem);
                self.ack(&m, true)?;
            }
            req::GET_MAX_MEM_SLOTS => {
                protocol::reply(
                    &self.sock,
                    &m,
                    &(crate::memory::MAX_REGIONS as u64).to_le_bytes(),
                )?;
            }
            req::ADD_MEM_REG | req::REM_MEM_REG => {
                m.expect_len(40)?;
                let d = RegionDesc {
                    guest_phys_addr: m.u64_at(8)?,
                    memory_size: m.u64_at(16)?,
                    user_addr: m.u64_at(24)?,
                    mmap_offset: m.u64_at(32)?,
                };
                let mem = if m.request == req::ADD_MEM_REG {
                    let fd = m.take_fd()?;
                    self.mem.with_region(&d, &fd)
                } else {
                    self.mem.without_region(d.guest_phys_addr, d.memory_size)
                };
                match mem {
                    Ok(mem) => {
                        self.swap_memory(mem);
                        self.ack(&m, true)?;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "memory region change refused");
                        self.ack(&m, false)?;
                    }
                }
            }
            req::SET_VRING_NUM => {
                let i = self.vring_index(&m, m.u32_at(0)?)?;
                let num = m.u32_at(4)?;
                if num == 0 || num > 32768 || !num.is_power_of_two() {
                    return Err(m.bad(format!("queue size {num}")));
                }
                self.vrings[i].num = num as u16;
                self.ack(&m, true)?;
            }
            req::SET_VRING_ADDR => {
                m.expect_len(40)?;
                let i = self.vring_index(&m, m.u32_at(0)?)?;
                self.vrings[i].addrs = Some(RingAddrs {
                    desc: m.u64_at(8)?,
                    used: m.u64_at(16)?,
                    avail: m.u64_at(24)?,
                });
                self.ack(&m, true)?;
            }
            req::SET_VRING_BASE => {
                let i = self.vring_index(&m, m.u32_at(0)?)?;
                let base = m.u32_at(4)?;
                if base > 0xffff {
                    return Err(m.bad(format!("vring base {base}")));
                }
                self.vrings[i].base = base as u16;
                self.ack(&m, true)?;
            }
            req::GET_VRING_BASE => {
                let idx = m.u32_at(0)?;
                let i = self.vring_index(&m, idx)?;
                self.stop_ring(i);
                // GET_VRING_BASE stops the ring: it restarts only after a new kick fd.
                self.vrings[i].kick = None;
                let mut p = [0u8; 8];
                p[0..4].copy_from_slice(&idx.to_le_bytes());
                p[4..8].copy_from_slice(&u32::from(self.vrings[i].base).to_le_bytes());
                protocol::reply(&self.sock, &m, &p)?;
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                let v = m.u64_at(0)?;
                let i = self.vring_index(&m, (v & 0xff) as u32)?;
                let fd = if v & 0x100 != 0 {
                    None
                } else {
                    Some(m.take_fd()?)
                };
                match m.request {
                    req::SET_VRING_KICK => {
                        self.stop_ring(i);
                        self.vrings[i].kick = fd;
                        self.try_start(i);
                    }
                    req::SET_VRING_CALL => {
                        // QEMU sends this at every guest MSI-X mask and unmask: the running
                        // poller switches to the new fd in place, the ring is not stopped.
                        let copy = match &fd {
                            Some(f) => f.try_clone().ok().map(Some),
                            None => Some(None),
                        };
                        match (&self.vrings[i].running, copy) {
                            (Some(r), Some(copy)) if r.draining.is_none() => {
                                r.ctl.replace_call(copy);
                                if let Some(c) = &fd {
                                    eventfd::signal(c.as_fd());
                                }
                                self.vrings[i].call = fd;
                            }
                            _ => {
                                // Not running (or the fd could not be duplicated): set it for
                                // the next start, restarting a running ring with it.
                                let was = self.vrings[i].running.is_some();
                                self.stop_ring(i);
                                self.vrings[i].call = fd;
                                if was {
                                    self.try_start(i);
                                }
                            }
                        }
                    }
                    _ => self.vrings[i].err = fd,
                }
                self.ack(&m, true)?;
            }
            req::SET_VRING_ENABLE => {
                let i = self.vring_index(&m, m.u32_at(0)?)?;
                let enable = m.u32_at(4)? != 0;
                self.vrings[i].enabled = enable;
                if enable {
                    self.try_start(i);
                } else {
                    self.stop_ring(i);
                }
                self.ack(&m, true)?;
            }
            req::SET_BACKEND_REQ_FD => {
                let fd = m.take_fd()?;
                *self.shared.backend.lock().expect("backend lock") = Some(UnixStream::from(fd));
                self.ack(&m, true)?;
            }
            req::GET_CONFIG => {
                let off = m.u32_at(0)? as usize;
                let size = m.u32_at(4)? as usize;
                if m.payload.len() != 12 + size || off + size > 256 {
                    return Err(m.bad(format!("config read of {size} bytes at {off}")));
                }
                let space = self.config_space();
                let mut out = m.payload.clone();
                for (k, b) in out[12..].iter_mut().enumerate() {
                    *b = space.get(off + k).copied().unwrap_or(0);
                }
                protocol::reply(&self.sock, &m, &out)?;
            }
            req::SET_CONFIG => {
                let off = m.u32_at(0)? as usize;
                let size = m.u32_at(4)? as usize;
                if m.payload.len() != 12 + size || off + size > 256 {
                    return Err(m.bad(format!("config write of {size} bytes at {off}")));
                }
                // Only `writeback` (offset 32) is writable, with CONFIG_WCE.
                let ok = if off <= 32 && off + size > 32 && self.features & vf::BLK_CONFIG_WCE != 0
                {
                    // Write-back only with a way to flush (§5.2.5.1).
                    let wb = m.payload[12 + 32 - off] != 0 && self.features & vf::BLK_FLUSH != 0;
                    self.shared.writeback.store(wb, Ordering::Release);
                    tracing::info!(writeback = wb, "guest set the cache mode");
                    true
                } else {
                    false
                };
                self.ack(&m, ok)?;
            }
            req::GET_INFLIGHT_FD => {
                m.expect_len(24)?;
                let nq = u16::from_le_bytes(m.payload[16..18].try_into().expect("2 bytes"));
                let qs = u16::from_le_bytes(m.payload[18..20].try_into().expect("2 bytes"));
                if nq == 0 || nq > self.spec.num_queues || qs == 0 || qs > 32768 {
                    return Err(m.bad(format!("inflight region for {nq} queues of {qs}")));
                }
                let (fd, size) = inflight::create(nq, qs).map_err(ProtocolError::Io)?;
                let region = InflightRegion::map(&fd, 0, size, nq, qs).map_err(|e| m.bad(e))?;
                self.inflight = Some(region);
                let mut p = [0u8; 24];
                p[0..8].copy_from_slice(&size.to_le_bytes());
                p[16..18].copy_from_slice(&nq.to_le_bytes());
                p[18..20].copy_from_slice(&qs.to_le_bytes());
                protocol::send(
                    &self.sock,
                    m.request,
                    protocol::FLAG_REPLY,
                    &p,
                    &[fd.as_raw_fd()],
                )?;
            }
            req::SET_INFLIGHT_FD => {
                m.expect_len(24)?;
                let size = m.u64_at(0)?;
                let off = m.u64_at(8)?;
                let nq = u16::from_le_bytes(m.payload[16..18].try_into().expect("2 bytes"));
                let qs = u16::from_le_bytes(m.payload[18..20].try_into().expect("2 bytes"));
                let fd = m.take_fd()?;
                let region = InflightRegion::map(&fd, off, size, nq, qs).map_err(|e| m.bad(e))?;
                self.inflight = Some(region);
                self.ack(&m, true)?;
            }
            other => {
                tracing::warn!(request = other, "unsupported vhost-user request");
                if m.need_reply() {
                    protocol::reply(&self.sock, &m, &1u64.to_le_bytes())?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the memory table; queues running on the old one are drained and restarted.
    fn swap_memory(&mut self, mem: GuestMemory) {
        let running: Vec<usize> = (0..self.vrings.len())
            .filter(|&i| self.vrings[i].running.is_some())
            .collect();
        for &i in &running {
            self.stop_ring(i);
        }
        self.mem = Arc::new(mem);
        for &i in &running {
            self.try_start(i);
        }
    }

    /// Starts ring `i` if everything it needs is there.
    fn try_start(&mut self, i: usize) {
        if !self.reap_drained(i) {
            tracing::error!(
                queue = i,
                "virtqueue still held by a poller whose requests have not completed; not started"
            );
            return;
        }
        let protocol_features = self.features & protocol::F_PROTOCOL_FEATURES != 0;
        let v = &self.vrings[i];
        if v.running.is_some()
            || v.kick.is_none()
            || v.num == 0
            || v.addrs.is_none()
            || self.mem.is_empty()
            || (protocol_features && !v.enabled)
        {
            return;
        }
        let event_idx = self.features & vf::RING_EVENT_IDX != 0;
        let indirect = self.features & vf::RING_INDIRECT_DESC != 0;
        let mut q = match SplitQueue::new(
            &self.mem,
            v.num,
            v.addrs.expect("checked"),
            event_idx,
            indirect,
        ) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(queue = i, error = %e, "cannot start virtqueue");
                return;
            }
        };
        q.set_last_avail(v.base);
        q.used_idx = q.guest_used_idx();
        let dup = |f: &Option<OwnedFd>| f.as_ref().and_then(|f| f.try_clone().ok());
        let (Some(kick), call) = (dup(&v.kick), dup(&v.call)) else {
            return;
        };
        let inflight = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(i as u16, v.num));
        let ctl = Arc::new(QueueCtl::default());
        *ctl.err_fd.lock().expect("ctl lock") = dup(&v.err);
        let reactor = i % self.reactors.len();
        let bdev = self.bdev.clone();
        let mem = self.mem.clone();
        let params = self.params();
        let ctl2 = ctl.clone();
        let index = i as u16;
        let r = self.reactors[reactor].call(move |core| {
            let ch = bdev.open_channel().map_err(|e| e.to_string())?;
            let p = VqPoller::new(index, q, mem, ch, kick, call, inflight, ctl2, params)?;
            Ok::<_, String>(core.add_poller(Box::new(p)))
        });
        match r {
            Some(Ok(poller)) => {
                tracing::info!(queue = i, reactor, "virtqueue started");
                self.vrings[i].running = Some(Running {
                    reactor,
                    poller,
                    ctl,
                    draining: None,
                    held: false,
                });
            }
            Some(Err(e)) => tracing::error!(queue = i, error = %e, "cannot start virtqueue"),
            None => tracing::error!(queue = i, "reactor gone; cannot start virtqueue"),
        }
    }

    /// Stops ring `i`, draining its in-flight requests; its base becomes the next index.
    ///
    /// Requests stuck below (a dead device) may keep the poller from draining within the drain
    /// timeout. The poller is then left registered, with the guest memory mapping the kernel may
    /// still write into, and the ring stays held (`Running::held`): it is not started again
    /// until that poller has finished, so two pollers never serve one ring. A later stop only
    /// checks, without waiting again, whether it has finished meanwhile.
    fn stop_ring(&mut self, i: usize) {
        self.request_stop(i);
        self.finish_stop(i, Instant::now() + self.drain_timeout);
    }

    /// Asks ring `i`'s poller to stop taking requests (once).
    fn request_stop(&mut self, i: usize) {
        let Some(run) = self.vrings[i].running.as_mut() else {
            return;
        };
        if run.draining.is_none() {
            run.draining = Some(run.ctl.request_stop());
            // Wake the reactor so the poller sees the request even if it sleeps.
            self.reactors[run.reactor].send(|_| {});
        }
    }

    /// Waits until `deadline` (not at all for a ring already held) for ring `i`'s stopping
    /// poller to drain, then removes it; a poller that did not drain holds the ring. Either
    /// way the ring's base becomes the index the poller stopped taking heads at.
    fn finish_stop(&mut self, i: usize, deadline: Instant) {
        let Some(run) = self.vrings[i].running.as_mut() else {
            return;
        };
        let Some(rx) = run.draining.as_ref() else {
            return;
        };
        let wait = if run.held {
            Duration::ZERO
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match rx.recv_timeout(wait) {
            Ok(last_avail) => self.vrings[i].base = last_avail,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !run.held {
                    tracing::error!(
                        queue = i,
                        timeout_s = self.drain_timeout.as_secs_f64(),
                        "virtqueue did not drain in time; its poller is left in place and the \
                         ring is held until it drains"
                    );
                    run.held = true;
                }
                // Not the base it was started with: the front-end must not be told to start
                // again from there (chains the poller already took would run twice).
                if let Some(at) = run.ctl.stopped_at() {
                    self.vrings[i].base = at;
                }
                return;
            }
            // The poller dropped its reply channel without a result: it is gone already.
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        self.remove_poller(i);
    }

    /// For a ring held by an undrained poller: whether that poller has finished now (it is
    /// then removed; the base stays what the front-end set since). True for a ring not held.
    fn reap_drained(&mut self, i: usize) -> bool {
        let Some(run) = self.vrings[i].running.as_ref() else {
            return true;
        };
        let Some(rx) = run.draining.as_ref() else {
            // A running ring: not held, and nothing to start either.
            return true;
        };
        match rx.try_recv() {
            Err(mpsc::TryRecvError::Empty) => false,
            Ok(_) | Err(mpsc::TryRecvError::Disconnected) => {
                tracing::info!(queue = i, "virtqueue's undrained poller has finished");
                self.remove_poller(i);
                true
            }
        }
    }

    /// Removes ring `i`'s (finished) poller from its reactor.
    fn remove_poller(&mut self, i: usize) {
        if let Some(run) = self.vrings[i].running.take() {
            let id = run.poller;
            self.reactors[run.reactor].call(move |core| drop(core.remove_poller(id)));
            tracing::info!(queue = i, "virtqueue stopped");
        }
    }

    /// Stops every ring: all are asked first, then all drain against one deadline (not one
    /// timeout after another).
    fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.request_stop(i);
        }
        let deadline = Instant::now() + self.drain_timeout;
        for i in 0..self.vrings.len() {
            self.finish_stop(i, deadline);
        }
    }

    /// Whether a ring is held by a poller that has not drained.
    fn any_held(&self) -> bool {
        self.vrings
            .iter()
            .any(|v| v.running.as_ref().is_some_and(|r| r.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memfd;
    use crate::spec::{DESC_F_NEXT, DESC_F_WRITE};
    use crate::virtq::testing::{BASE, Driver, MEM};
    use ferroblk_bdev::BlockSize;
    use ferroblk_bdev::inject::{DelayBdev, Delays};
    use ferroblk_bdev::malloc::MallocBdev;
    use ferroblk_bdev::reactor::{ReactorConfig, Reactors};
    use std::os::fd::RawFd;
    use std::time::Instant;

    fn reactors() -> Reactors {
        Reactors::start(&ReactorConfig {
            cpus: vec![None],
            idle_poll: Duration::from_micros(50),
        })
        .unwrap()
    }

    fn eventfd() -> OwnedFd {
        eventfd::new().unwrap()
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn socket_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferroblk-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A minimal vhost-user front-end speaking raw messages.
    struct Front(UnixStream);

    impl Front {
        fn connect(path: &std::path::Path) -> Front {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Front(s)
        }

        fn send(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
            protocol::send(&self.0, request, 0, payload, fds)
        }

        fn get_features(&self) -> u64 {
            self.send(req::GET_FEATURES, &[], &[]).unwrap();
            let m = protocol::recv(&self.0).unwrap();
            assert_eq!(m.request, req::GET_FEATURES);
            m.u64_at(0).unwrap()
        }

        /// Everything a ring needs, then the kick that starts it (VERSION_1 only: no
        /// SET_VRING_ENABLE needed). Errors are returned, not unwrapped: the device may have
        /// dropped the connection on the way.
        fn start_ring(
            &self,
            region: RegionDesc,
            fd: &OwnedFd,
            size: u16,
            addrs: RingAddrs,
            kick: &OwnedFd,
            call: &OwnedFd,
        ) -> std::io::Result<()> {
            self.send(req::SET_FEATURES, &vf::VERSION_1.to_le_bytes(), &[])?;
            let mut t = vec![0u8; 8];
            t[0..4].copy_from_slice(&1u32.to_le_bytes());
            for v in [
                region.guest_phys_addr,
                region.memory_size,
                region.user_addr,
                region.mmap_offset,
            ] {
                t.extend_from_slice(&v.to_le_bytes());
            }
            self.send(req::SET_MEM_TABLE, &t, &[fd.as_raw_fd()])?;
            let mut num = [0u8; 8];
            num[4..8].copy_from_slice(&u32::from(size).to_le_bytes());
            self.send(req::SET_VRING_NUM, &num, &[])?;
            let mut a = [0u8; 40];
            a[8..16].copy_from_slice(&addrs.desc.to_le_bytes());
            a[16..24].copy_from_slice(&addrs.used.to_le_bytes());
            a[24..32].copy_from_slice(&addrs.avail.to_le_bytes());
            self.send(req::SET_VRING_ADDR, &a, &[])?;
            self.send(req::SET_VRING_BASE, &[0u8; 8], &[])?;
            self.send(req::SET_VRING_CALL, &[0u8; 8], &[call.as_raw_fd()])?;
            self.send(req::SET_VRING_KICK, &[0u8; 8], &[kick.as_raw_fd()])?;
            // SAFETY: an 8-byte write from a live buffer to an eventfd this test owns.
            unsafe { libc::write(kick.as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
            Ok(())
        }
    }

    /// A virtio-blk read of one 4 KiB sector at 0 as chain 0 (virtio 1.2 §5.2.6); returns the
    /// status byte's address.
    fn publish_read(d: &mut Driver) -> u64 {
        let (hdr, data, status) = (d.alloc(16), d.alloc(4096), d.alloc(1));
        d.write(hdr, &[0u8; 16]);
        d.write(status, &[0xff]);
        d.set_desc(d.addrs.desc, 0, hdr, 16, DESC_F_NEXT, 1);
        d.set_desc(d.addrs.desc, 1, data, 4096, DESC_F_WRITE | DESC_F_NEXT, 2);
        d.set_desc(d.addrs.desc, 2, status, 1, DESC_F_WRITE, 0);
        d.publish(0);
        status
    }

    #[test]
    fn a_front_end_offering_memory_its_file_does_not_have_is_dropped_and_others_are_served() {
        let r = reactors();
        let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::new("m", BlockSize::B4096, 256, 0).unwrap());
        let path = socket_path("liar");
        let spec = test_spec(path.clone(), "m", 1);
        let export = VhostExport::start(spec, bdev, r.handles().to_vec()).unwrap();

        // 64 MiB of guest memory claimed over a 1 MiB memfd, with the rings at 32 MiB: mapping
        // it succeeds, and the first touch of a ring would kill the whole process with SIGBUS.
        let liar = Front::connect(&path);
        assert_ne!(liar.get_features(), 0);
        let short = memfd("short", 1 << 20).unwrap();
        let region = RegionDesc {
            guest_phys_addr: 0,
            memory_size: 64 << 20,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
        };
        let rings = 0x7f00_0000_0000 + (32 << 20);
        let addrs = RingAddrs {
            desc: rings,
            avail: rings + 4096,
            used: rings + 8192,
        };
        let (kick, call) = (eventfd(), eventfd());
        let _ = liar.start_ring(region, &short, 8, addrs, &kick, &call);
        // The device refuses the table and closes the connection (no reply is owed to a
        // message sent without NEED_REPLY: the end of the stream is the answer).
        match protocol::recv(&liar.0) {
            Err(ProtocolError::Closed) => {}
            Err(ProtocolError::Io(e)) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "the device did not drop the lying front-end: {e}"
            ),
            other => panic!("expected the connection to be dropped, got {other:?}"),
        }
        drop(liar);

        // The process is alive and the export serves the next front-end: a real read.
        let mut d = Driver::new(8);
        let status = publish_read(&mut d);
        let honest = Front::connect(&path);
        assert_ne!(honest.get_features(), 0);
        let region = RegionDesc {
            guest_phys_addr: BASE,
            memory_size: MEM,
            user_addr: BASE,
            mmap_offset: 0,
        };
        let (kick, call) = (eventfd(), eventfd());
        honest
            .start_ring(region, &d.fd, 8, d.addrs, &kick, &call)
            .unwrap();
        wait_until("the read completes", || d.used(0).0 == 1);
        assert_eq!(d.read(status, 1), [0], "VIRTIO_BLK_S_OK");
        drop(honest);
        drop(export);
        r.shutdown(Duration::from_secs(5));
    }

    /// The `writeback` byte (offset 32) of the config space, as GET_CONFIG answers it.
    fn wce(front: &Front) -> u8 {
        let mut p = vec![0u8; 12 + 1];
        p[0..4].copy_from_slice(&32u32.to_le_bytes());
        p[4..8].copy_from_slice(&1u32.to_le_bytes());
        front.send(req::GET_CONFIG, &p, &[]).unwrap();
        let m = protocol::recv(&front.0).unwrap();
        assert_eq!(m.request, req::GET_CONFIG);
        m.payload[12]
    }

    #[test]
    fn a_driver_that_cannot_flush_gets_write_through_and_the_next_one_starts_afresh() {
        let r = reactors();
        let img = std::env::temp_dir().join(format!("ferroblk-wce-{}.img", std::process::id()));
        let o = ferroblk_bdev::file::FileOptions {
            path: img.clone(),
            block_size: BlockSize::B4096,
            size: Some(1 << 20),
            create: true,
            direct: ferroblk_bdev::file::DirectMode::Never,
            read_only: false,
        };
        let bdev: Arc<dyn Bdev> = Arc::new(ferroblk_bdev::file::FileBdev::open("f", &o).unwrap());
        assert!(bdev.info().caps().contains(Caps::VOLATILE_CACHE));
        let path = socket_path("wce");
        let export =
            VhostExport::start(test_spec(path.clone(), "f", 1), bdev, r.handles().to_vec())
                .unwrap();
        // A driver with VIRTIO_BLK_F_FLUSH starts in write-back and may turn it off.
        let f = Front::connect(&path);
        assert_ne!(f.get_features() & vf::BLK_FLUSH, 0);
        let flush = vf::VERSION_1 | vf::BLK_FLUSH | vf::BLK_CONFIG_WCE;
        f.send(req::SET_FEATURES, &flush.to_le_bytes(), &[])
            .unwrap();
        assert_eq!(wce(&f), 1);
        let mut p = vec![0u8; 12 + 1];
        p[0..4].copy_from_slice(&32u32.to_le_bytes());
        p[4..8].copy_from_slice(&1u32.to_le_bytes());
        f.send(req::SET_CONFIG, &p, &[]).unwrap();
        assert_eq!(wce(&f), 0, "the guest chose write-through");
        drop(f);
        // The next driver does not inherit that choice: write-back again.
        let f = Front::connect(&path);
        f.send(req::SET_FEATURES, &flush.to_le_bytes(), &[])
            .unwrap();
        assert_eq!(wce(&f), 1);
        drop(f);
        // A driver without FLUSH cannot make writes durable itself (it assumes write-through,
        // as Linux's virtblk_get_cache_mode does): every write is flushed before it completes.
        let f = Front::connect(&path);
        f.send(req::SET_FEATURES, &vf::VERSION_1.to_le_bytes(), &[])
            .unwrap();
        assert_eq!(wce(&f), 0);
        drop(f);
        drop(export);
        r.shutdown(Duration::from_secs(5));
        let _ = std::fs::remove_file(img);
    }

    /// A read-write export of `bdev` with `num_queues` queues on `socket`.
    fn test_spec(socket: PathBuf, bdev: &str, num_queues: u16) -> VhostSpec {
        VhostSpec {
            socket,
            bdev: bdev.into(),
            num_queues,
            read_only: false,
            serial: None,
        }
    }

    #[test]
    fn config_space_fields_are_at_their_virtio_offsets() {
        let r = reactors();
        let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::new("m", BlockSize::B4096, 256, 0).unwrap());
        let spec = test_spec("unused".into(), "m", 3);
        let (shared, handles) = (test_shared(), r.handles().to_vec());
        let (sock, _peer) = UnixStream::pair().unwrap();
        let c = Conn::new(&spec, &bdev, &handles, &shared, sock).config_space();
        let u16_at = |o: usize| u16::from_le_bytes(c[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        // The offsets of `struct virtio_blk_config` (virtio 1.2 §5.2.4), written out.
        let capacity = u64::from_le_bytes(c[0..8].try_into().unwrap());
        assert_eq!(capacity, 256 * 4096 / 512, "capacity");
        assert_eq!(u32_at(20), 4096, "blk_size");
        assert_eq!(u16_at(26), 1, "min_io_size");
        assert_eq!(u16_at(34), 3, "num_queues");
        assert_eq!(u32_at(36), (1 << 30) / 512, "max_discard_sectors");
        assert_eq!(u32_at(40), 1, "max_discard_seg");
        assert_eq!(u32_at(44), 8, "discard_sector_alignment");
        assert_eq!(u32_at(48), (1 << 30) / 512, "max_write_zeroes_sectors");
        assert_eq!(u32_at(52), 1, "max_write_zeroes_seg");
    }

    fn test_shared() -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
            backend: Mutex::new(None),
            config_ok: AtomicBool::new(false),
            backend_ack: AtomicBool::new(false),
            writeback: Arc::new(AtomicBool::new(false)),
        }
    }

    fn set_ring(conn: &mut Conn<'_>, d: &Driver, base: u16) {
        conn.mem = d.mem.clone();
        let v = &mut conn.vrings[0];
        v.num = d.size;
        v.addrs = Some(d.addrs);
        v.base = base;
        v.kick = Some(eventfd());
        v.call = Some(eventfd());
    }

    /// A one-queue export of a `delay` bdev whose reads take `read_ms` (far longer than the
    /// 50 ms drain timeout its connections get: a device that hangs).
    struct SlowReads {
        r: Reactors,
        bdev: Arc<dyn Bdev>,
        spec: VhostSpec,
        shared: Shared,
        handles: Vec<ReactorHandle>,
    }

    impl SlowReads {
        fn new(read_ms: u64) -> SlowReads {
            let r = reactors();
            let base: Arc<dyn Bdev> =
                Arc::new(MallocBdev::new("m", BlockSize::B4096, 256, 0).unwrap());
            let bdev: Arc<dyn Bdev> = Arc::new(DelayBdev::new(
                "d",
                base,
                Delays {
                    read: Duration::from_millis(read_ms),
                    ..Delays::default()
                },
            ));
            let handles = r.handles().to_vec();
            SlowReads {
                r,
                bdev,
                spec: test_spec("unused".into(), "d", 1),
                shared: test_shared(),
                handles,
            }
        }

        /// A connection (the front-end's end of its socket is `peer`) with ring 0 of `d`
        /// started from `base`, whose first read has reached the bdev.
        fn started(&self, d: &Driver, base: u16, sock: UnixStream) -> Conn<'_> {
            let mut conn = Conn::new(&self.spec, &self.bdev, &self.handles, &self.shared, sock);
            conn.drain_timeout = Duration::from_millis(50);
            set_ring(&mut conn, d, base);
            let reads = self.bdev.info().stats().ops[0];
            conn.try_start(0);
            wait_until("the read reaches the bdev", || {
                self.bdev.info().stats().ops[0] > reads
            });
            conn
        }
    }

    #[test]
    fn a_ring_that_did_not_drain_is_never_served_by_a_second_poller() {
        let t = SlowReads::new(1500);
        let (r, bdev, spec, shared, handles) = (&t.r, &t.bdev, &t.spec, &t.shared, &t.handles);
        let pollers = || r.handles()[0].stats().pollers.load(Ordering::Relaxed);
        let mut d = Driver::new(8);
        let status = publish_read(&mut d);

        let (sock, _peer) = UnixStream::pair().unwrap();
        let mut conn = t.started(&d, 0, sock);
        assert_eq!(pollers(), 1);
        let first = conn.vrings[0].running.as_ref().unwrap().poller;

        // GET_VRING_BASE, then SET_VRING_KICK: stop (times out), restart.
        conn.stop_ring(0);
        conn.vrings[0].kick = Some(eventfd());
        conn.try_start(0);
        assert_eq!(pollers(), 1, "a second poller serves the ring");
        assert_eq!(
            conn.vrings[0].running.as_ref().map(|r| r.poller),
            Some(first)
        );

        // The front-end goes away and comes back: the ring is still held.
        conn.stop_all();
        let held = conn.into_held();
        let (sock, _peer) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(spec, bdev, handles, shared, sock);
        conn.drain_timeout = Duration::from_millis(50);
        conn.adopt(held);
        set_ring(&mut conn, &d, 1);
        conn.try_start(0);
        assert_eq!(
            pollers(),
            1,
            "a second poller serves the ring after a reconnect"
        );

        // Once the read completes the old poller finishes, and the ring starts afresh.
        wait_until("the held poller finishes", || {
            conn.try_start(0);
            conn.vrings[0]
                .running
                .as_ref()
                .is_some_and(|r| r.poller != first)
        });
        assert_eq!(pollers(), 1);
        assert_eq!(d.used(0).0, 1, "the held read completed once");
        assert_eq!(d.read(status, 1), [0]);
        conn.stop_all();
        assert_eq!(pollers(), 0);
        drop(conn);
        t.r.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_new_call_fd_is_taken_by_the_running_ring_without_a_stop() {
        // A read held well past the drain timeout: a stop would time out.
        let t = SlowReads::new(1000);
        let mut d = Driver::new(8);
        let status = publish_read(&mut d);
        let (sock, _peer) = UnixStream::pair().unwrap();
        let mut conn = t.started(&d, 0, sock);
        let old_call = conn.vrings[0].call.as_ref().unwrap().try_clone().unwrap();
        let first = conn.vrings[0].running.as_ref().unwrap().poller;

        // SET_VRING_CALL while the read is held (the guest masked its interrupt).
        let new_call = eventfd();
        conn.handle(Message {
            request: req::SET_VRING_CALL,
            flags: 1,
            payload: vec![0u8; 8],
            fds: vec![new_call.try_clone().unwrap()],
        })
        .unwrap();
        let run = conn.vrings[0].running.as_ref().unwrap();
        assert!(run.draining.is_none(), "the ring was stopped");
        assert_eq!(run.poller, first);
        // The switch is announced once on the new fd.
        assert_eq!(eventfd::drain(new_call.as_fd()), 1);

        // The held read completes and is signalled on the new fd only.
        wait_until("the read completes", || d.used(0).0 == 1);
        assert_eq!(d.read(status, 1), [0]);
        wait_until("the completion is signalled", || {
            eventfd::drain(new_call.as_fd()) >= 1
        });
        assert_eq!(
            eventfd::drain(old_call.as_fd()),
            0,
            "the old call fd was signalled"
        );
        conn.stop_all();
        drop(conn);
        t.r.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_held_ring_reports_where_it_stopped_and_starts_by_itself_once_drained() {
        let t = SlowReads::new(1000);
        let mut d = Driver::new(8);
        publish_read(&mut d);
        let (sock, peer) = UnixStream::pair().unwrap();
        let mut conn = t.started(&d, 0, sock);
        // GET_VRING_BASE while the read is held: the base is past the chain the poller took,
        // not the one the ring started with (a restart from there would run it twice).
        conn.stop_ring(0);
        assert!(conn.vrings[0].running.as_ref().is_some_and(|r| r.held));
        assert_eq!(conn.vrings[0].base, 1);
        // The front-end gives the ring a new kick and sends nothing more: once the held read
        // completes, the ring starts by itself and serves the next request.
        let kick = eventfd();
        conn.vrings[0].kick = Some(kick.try_clone().unwrap());
        std::thread::scope(|s| {
            let t = s.spawn(move || conn.run());
            wait_until("the held read completes", || d.used(0).0 == 1);
            let status = publish_read(&mut d);
            // SAFETY: an 8-byte write from a live buffer to an eventfd this test owns.
            unsafe { libc::write(kick.as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
            wait_until("the ring restarted and served the next read", || {
                d.used(0).0 == 2
            });
            assert_eq!(d.read(status, 1), [0]);
            drop(peer);
            let _ = t.join().unwrap();
        });
        t.r.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_finished_poller_still_registered_lets_its_reactor_sleep_through_kicks() {
        let r = reactors();
        let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::new("m", BlockSize::B4096, 256, 0).unwrap());
        let spec = test_spec("unused".into(), "m", 1);
        let shared = test_shared();
        let handles = r.handles().to_vec();
        let d = Driver::new(8);
        let (sock, _peer) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(&spec, &bdev, &handles, &shared, sock);
        set_ring(&mut conn, &d, 0);
        let kick = conn.vrings[0].kick.as_ref().unwrap().try_clone().unwrap();
        conn.try_start(0);
        // The poller stops and finishes (nothing in flight), and stays registered, as a held
        // ring's poller does until the control thread reaps it.
        conn.drain_timeout = Duration::from_millis(50);
        conn.request_stop(0);
        let run = conn.vrings[0].running.as_ref().unwrap();
        run.draining
            .as_ref()
            .unwrap()
            .recv_timeout(Duration::from_secs(20))
            .unwrap();
        let sleeps = || r.handles()[0].stats().sleeps.load(Ordering::Relaxed);
        wait_until("the reactor sleeps", || sleeps() > 0);
        // A late kick: taken and dropped, and the reactor goes back to sleep (an untaken
        // event would keep it spinning).
        // SAFETY: an 8-byte write from a live buffer to an eventfd this test owns.
        unsafe { libc::write(kick.as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
        let before = sleeps();
        wait_until("the reactor sleeps after the kick", || sleeps() > before);
        conn.stop_all();
        drop(conn);
        r.shutdown(Duration::from_secs(5));
    }
}
