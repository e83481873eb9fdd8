//! The admin side: connecting to a controller and its blocking admin commands (NVMe-oF 1.1 §3
//! Fabrics commands and §4 "Controller architecture"; NVMe Base 2.0 §3.5.1 "Controller
//! initialization").
//!
//! [`Controller::connect`] opens the admin queue's connection (NVMe/TCP: exchanges ICReq/ICResp;
//! NVMe/RDMA: an RDMA CM connect with the NVMe/RDMA private data), sends
//! Connect (QID 0, CNTLID FFFFh, KATO), reads CAP and VS with Property Get, enables the
//! controller (CC.EN = 1, then waits for CSTS.RDY), identifies it and starts the keep-alive
//! timer: a thread that sends Keep Alive every KATO / 2. The admin queue sits behind a mutex
//! shared with that thread; admin commands run one at a time and block. I/O queues
//! ([`Controller::connect_io_queue`]) are separate connections owned by the caller.
//! [`Controller::shutdown`] (or drop) stops the timer and shuts the controller down with
//! CC.SHN = 01b, waiting for CSTS.SHST = 10b.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferroblk_bdev::eventfd;

use super::error::Error;
use super::io::IoQueue;
use super::queue::{self, Completion, Queue, QueueParams, Xfer};
use crate::spec::command::{AdminOpcode, AsyncEvent, GetLogPage, Identify, Sqe, cns};
use crate::spec::fabrics::{
    CAP_CSS_NO_IO, CAP_CSS_NVM, CATTR_DISABLE_SQ_FLOW_CONTROL, Cap, Cc, ConnectCommand,
    ConnectData, ConnectResponse, Csts, DISCOVERY_NQN, PropertyGet, PropertySet, PropertySize,
    Version, property, shst,
};
use crate::spec::features::{FeatureId, NumberOfQueues, SetFeatures};
use crate::spec::identify::{
    IDENTIFY_LEN, IdentifyController, IdentifyNamespace, cntrltype, parse_ns_list, sgls,
};
use crate::spec::log::{DiscoveryLogEntry, DiscoveryLogHeader, LogPageId};
use crate::spec::wire::align_up;
use crate::subsystem::Trtype;

/// In-capsule data the admin queue accepts (NVMe/TCP: 8 KiB, as the Linux host assumes).
pub const ADMIN_IN_CAPSULE: usize = 8192;
/// Largest data buffer of one admin command (log pages, Identify).
pub const ADMIN_MAX_DATA: usize = 1 << 20;
/// Admin queue depth (the SQ has 32 entries, like the Linux host's).
pub const ADMIN_DEPTH: u16 = 31;

/// How to reach and identify to a controller.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The transport: NVMe/TCP (the default) or NVMe/RDMA (cargo feature `rdma`).
    pub trtype: Trtype,
    /// The controller's address (NVMe/RDMA: its RDMA device's IP address and the port of
    /// its RDMA CM listener).
    pub addr: SocketAddr,
    /// The NVM subsystem to connect to ([`DISCOVERY_NQN`] for a discovery controller).
    pub subnqn: String,
    /// This host's NQN.
    pub hostnqn: String,
    /// This host's identifier (a UUID).
    pub hostid: [u8; 16],
    /// Ask for header digests (CRC32C over every PDU header; NVMe/TCP only).
    pub hdr_digest: bool,
    /// Ask for data digests (CRC32C over every PDU's data; NVMe/TCP only).
    pub data_digest: bool,
    /// Keep Alive Timeout sent in the admin Connect; zero disables keep-alive. The initiator
    /// sends Keep Alive every `kato / 2`.
    pub kato: Duration,
    /// Bound on the transport's connect (TCP connect plus ICReq/ICResp; RDMA CM address and
    /// route resolution plus connect).
    pub connect_timeout: Duration,
    /// Bound on each blocking command.
    pub command_timeout: Duration,
}

impl ConnectOptions {
    /// Options for `subnqn` at `addr` over NVMe/TCP: a fresh random host identifier, the host
    /// NQN derived from it (`nqn.2014-08.org.nvmexpress:uuid:<hostid>`), no digests, KATO
    /// 10 s. Set [`ConnectOptions::trtype`] for NVMe/RDMA.
    pub fn new(addr: SocketAddr, subnqn: impl Into<String>) -> ConnectOptions {
        let hostid = random_uuid();
        ConnectOptions {
            trtype: Trtype::Tcp,
            addr,
            subnqn: subnqn.into(),
            hostnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_string(&hostid)),
            hostid,
            hdr_digest: false,
            data_digest: false,
            kato: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
        }
    }

    /// Options for the discovery controller at `addr`.
    pub fn discovery(addr: SocketAddr) -> ConnectOptions {
        ConnectOptions::new(addr, DISCOVERY_NQN)
    }
}

/// How an I/O queue is created.
#[derive(Clone, Copy, Debug)]
pub struct IoQueueOptions {
    /// Commands in flight at most; the submission queue gets `depth + 1` entries (SQSIZE =
    /// `depth`, 0's based), so it never fills.
    pub depth: u16,
    /// Largest buffer one command may carry.
    pub max_data: usize,
    /// Ask the controller to disable SQ flow control (Connect CATTR bit 2); Linux nvmet then
    /// completes successful reads with the C2HData SUCCESS flag instead of a CapsuleResp.
    pub disable_sq_flow_control: bool,
}

impl Default for IoQueueOptions {
    fn default() -> IoQueueOptions {
        IoQueueOptions {
            depth: 128,
            max_data: 1 << 20,
            disable_sq_flow_control: false,
        }
    }
}

/// A namespace as Identify Namespace describes it.
#[derive(Clone, Debug)]
pub struct Namespace {
    /// Namespace identifier.
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// The whole Identify Namespace structure.
    pub identify: IdentifyNamespace,
}

/// The discovery log page (NVMe-oF 1.1 §5.3).
#[derive(Clone, Debug)]
pub struct DiscoveryLog {
    /// Generation counter of the page that was read.
    pub genctr: u64,
    /// Its entries.
    pub entries: Vec<DiscoveryLogEntry>,
}

/// What the admin thread reports to the callback of [`Controller::enable_async_events`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminEvent {
    /// An Asynchronous Event Request completed with this event.
    Async(AsyncEvent),
    /// The controller refused the Asynchronous Event Request (no support, or over its
    /// limit): no more events will come.
    Stopped,
    /// The admin queue failed (keep-alive, connection): the controller is gone.
    Lost,
}

type EventCallback = Box<dyn Fn(AdminEvent) + Send>;

/// The thread that sends Keep Alive and holds the Asynchronous Event Request.
struct AdminThread {
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// A connected, enabled controller. See the module documentation.
pub struct Controller {
    admin: Arc<Mutex<Queue>>,
    opts: ConnectOptions,
    cntlid: u16,
    cap: Cap,
    vs: Version,
    identify: IdentifyController,
    admin_thread: Option<AdminThread>,
    shut_down: bool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("addr", &self.opts.addr)
            .field("subnqn", &self.opts.subnqn)
            .field("cntlid", &self.cntlid)
            .field("vs", &self.vs)
            .finish()
    }
}

fn lock(q: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a blocking command and turns a failed status into [`Error::Command`].
fn run(
    q: &mut Queue,
    sqe: Sqe,
    xfer: Xfer,
    buf: Vec<u8>,
    timeout: Duration,
    what: &'static str,
) -> Result<Completion, Error> {
    let c = q.execute(sqe, xfer, buf, timeout, what)?;
    c.result()?;
    Ok(c)
}

/// Sends Fabrics Connect on `q` (NVMe-oF 1.1 §3.3) and returns the controller ID.
pub(crate) fn fabrics_connect(
    q: &mut Queue,
    opts: &ConnectOptions,
    cntlid: u16,
    sqsize: u16,
    cattr: u8,
    kato: Duration,
) -> Result<u16, Error> {
    let qid = q.params().qid;
    let cmd = ConnectCommand {
        recfmt: 0,
        qid,
        sqsize,
        cattr,
        kato: u32::try_from(kato.as_millis()).unwrap_or(u32::MAX),
        sgl1: Default::default(),
    };
    let data = ConnectData {
        hostid: opts.hostid,
        cntlid,
        subnqn: opts.subnqn.clone(),
        hostnqn: opts.hostnqn.clone(),
    }
    .to_bytes()
    .to_vec();
    let c = q.execute(
        cmd.to_sqe(0),
        Xfer::ToController,
        data,
        opts.command_timeout,
        "Connect",
    )?;
    match ConnectResponse::from_cqe(&c.cqe) {
        Some(ConnectResponse::Success { authreq: 0, cntlid }) => Ok(cntlid),
        Some(ConnectResponse::Success { authreq, .. }) => {
            Err(Error::AuthenticationRequired(authreq))
        }
        Some(ConnectResponse::InvalidParameters { in_data, ipo }) => {
            Err(Error::ConnectInvalidParameters { in_data, ipo })
        }
        None => Err(Error::Command {
            opcode: AdminOpcode::Fabrics as u8,
            status: c.cqe.status,
        }),
    }
}

impl Controller {
    /// Connects the admin queue, enables the controller and identifies it (see the module
    /// documentation).
    pub fn connect(opts: &ConnectOptions) -> Result<Controller, Error> {
        let params = QueueParams {
            qid: 0,
            depth: ADMIN_DEPTH,
            hdgst: opts.hdr_digest,
            ddgst: opts.data_digest,
            max_data: ADMIN_MAX_DATA,
            // NVMe/RDMA: admin commands carry no in-capsule data (the Linux host sends none,
            // and nvmet-rdma posts no room for it on admin queues).
            max_in_capsule: match opts.trtype {
                Trtype::Tcp => ADMIN_IN_CAPSULE,
                Trtype::Rdma => 0,
            },
        };
        let mut q = Queue::connect(opts.trtype, opts.addr, params, opts.connect_timeout)?;
        // Admin Connect asks for a new controller (dynamic model: CNTLID FFFFh).
        let cntlid = fabrics_connect(&mut q, opts, 0xffff, ADMIN_DEPTH, 0, opts.kato)?;
        let mut c = Controller {
            admin: Arc::new(Mutex::new(q)),
            opts: opts.clone(),
            cntlid,
            cap: Cap::default(),
            vs: Version::default(),
            identify: IdentifyController::default(),
            admin_thread: None,
            // Not enabled yet: nothing to shut down if enabling fails.
            shut_down: true,
        };
        c.cap = Cap::from_u64(c.property_get(property::CAP, PropertySize::Eight)?);
        c.vs = Version(c.property_get(property::VS, PropertySize::Four)? as u32);
        c.enable()?;
        c.shut_down = false;
        c.start_admin_thread(None)?;
        c.identify = c.identify_controller()?;
        Ok(c)
    }

    /// The controller ID the admin Connect returned.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// The Controller Capabilities property.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// The Version property.
    pub fn version(&self) -> Version {
        self.vs
    }

    /// The Identify Controller data read at connect.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// The options the controller was connected with.
    pub fn options(&self) -> &ConnectOptions {
        &self.opts
    }

    /// Whether this is a discovery controller.
    pub fn is_discovery(&self) -> bool {
        self.identify.cntrltype == cntrltype::DISCOVERY || self.opts.subnqn == DISCOVERY_NQN
    }

    /// The largest transfer of one command (MDTS), if the controller limits it.
    pub fn max_data_transfer(&self) -> Option<usize> {
        (self.identify.mdts != 0).then(|| {
            1usize << (12 + u32::from(self.cap.mpsmin) + u32::from(self.identify.mdts)).min(40)
        })
    }

    /// Whether the admin queue's connection is still up (a keep-alive or command failure
    /// tears it down).
    pub fn is_connected(&self) -> bool {
        !lock(&self.admin).is_dead()
    }

    /// Whether the header and data digests are enabled on the admin queue.
    pub fn digests(&self) -> (bool, bool) {
        let n = lock(&self.admin).negotiated();
        (n.hdgst, n.ddgst)
    }

    fn timeout(&self) -> Duration {
        self.opts.command_timeout
    }

    /// Runs an admin command without data; a non-success status is [`Error::Command`].
    fn run_no_data(&self, sqe: Sqe, what: &'static str) -> Result<Completion, Error> {
        run(
            &mut lock(&self.admin),
            sqe,
            Xfer::None,
            Vec::new(),
            self.timeout(),
            what,
        )
    }

    /// Runs any admin command and returns its completion (data in `buf` for commands that
    /// return data). A non-success status is [`Error::Command`].
    pub fn admin_command(&self, sqe: Sqe, xfer: Xfer, buf: Vec<u8>) -> Result<Completion, Error> {
        run(
            &mut lock(&self.admin),
            sqe,
            xfer,
            buf,
            self.timeout(),
            "admin command",
        )
    }

    /// Property Get (NVMe-oF 1.1 §3.5): the value of the property at `ofst`.
    pub fn property_get(&self, ofst: u32, size: PropertySize) -> Result<u64, Error> {
        let sqe = PropertyGet {
            attrib: size.to_attrib(),
            ofst,
        }
        .to_sqe(0);
        let c = self.run_no_data(sqe, "Property Get")?;
        Ok(match size {
            PropertySize::Four => u64::from(c.cqe.dw0),
            PropertySize::Eight => c.cqe.value64(),
        })
    }

    /// Property Set (NVMe-oF 1.1 §3.6).
    pub fn property_set(&self, ofst: u32, size: PropertySize, value: u64) -> Result<(), Error> {
        let sqe = PropertySet {
            attrib: size.to_attrib(),
            ofst,
            value,
        }
        .to_sqe(0);
        self.run_no_data(sqe, "Property Set")?;
        Ok(())
    }

    /// Reads CSTS.
    pub fn csts(&self) -> Result<Csts, Error> {
        Ok(Csts::from_u32(
            self.property_get(property::CSTS, PropertySize::Four)? as u32,
        ))
    }

    /// Worst-case time for CSTS.RDY to follow CC.EN (CAP.TO, 500 ms units; at least 2 s).
    fn ready_timeout(&self) -> Duration {
        Duration::from_millis(500 * u64::from(self.cap.to)).max(Duration::from_secs(2))
    }

    /// NVMe Base 2.0 §3.5.1: CC with EN, the command set, 4 KiB pages and 64/16-byte queue
    /// entries; then wait for CSTS.RDY.
    fn enable(&self) -> Result<(), Error> {
        let css = if self.cap.css & CAP_CSS_NVM != 0 {
            0b000
        } else if self.cap.css & CAP_CSS_NO_IO != 0 {
            0b111
        } else {
            0b000
        };
        let cc = Cc {
            en: true,
            css,
            mps: self.cap.mpsmin,
            ams: 0,
            shn: 0,
            iosqes: 6,
            iocqes: 4,
        };
        self.property_set(property::CC, PropertySize::Four, u64::from(cc.to_u32()))?;
        let deadline = Instant::now() + self.ready_timeout();
        loop {
            let csts = self.csts()?;
            if csts.cfs {
                return Err(Error::NotReady("CSTS.CFS set after CC.EN"));
            }
            if csts.rdy {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady(
                    "CSTS.RDY did not follow CC.EN within CAP.TO",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Identify (NVMe Base 2.0 §5.17) with CNS `cns` for `nsid`: the 4096 bytes.
    pub fn identify_raw(&self, cns: u8, nsid: u32) -> Result<Vec<u8>, Error> {
        let sqe = Identify {
            cns,
            cntid: 0,
            nsid,
            cnssid: 0,
            csi: 0,
        }
        .to_sqe(0);
        let c = run(
            &mut lock(&self.admin),
            sqe,
            Xfer::FromController,
            vec![0u8; IDENTIFY_LEN],
            self.timeout(),
            "Identify",
        )?;
        Ok(c.buf)
    }

    /// Identify Controller (CNS 01h).
    pub fn identify_controller(&self) -> Result<IdentifyController, Error> {
        IdentifyController::parse(&self.identify_raw(cns::CONTROLLER, 0)?)
            .ok_or(Error::Malformed("Identify Controller"))
    }

    /// Identify Namespace (CNS 00h) of `nsid`.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace, Error> {
        IdentifyNamespace::parse(&self.identify_raw(cns::NAMESPACE, nsid)?)
            .ok_or(Error::Malformed("Identify Namespace"))
    }

    /// Identify Namespace of `nsid`, with its block size and size.
    pub fn namespace(&self, nsid: u32) -> Result<Namespace, Error> {
        let id = self.identify_namespace(nsid)?;
        let lbaf = id
            .current_lbaf()
            .ok_or(Error::Malformed("Identify Namespace (FLBAS)"))?;
        if !(9..=16).contains(&lbaf.lbads) {
            return Err(Error::Malformed("Identify Namespace (LBADS)"));
        }
        Ok(Namespace {
            nsid,
            block_size: 1 << lbaf.lbads,
            blocks: id.nsze,
            identify: id,
        })
    }

    /// The active namespace IDs (Identify CNS 02h, following the list past 1024 entries).
    pub fn active_namespaces(&self) -> Result<Vec<u32>, Error> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = parse_ns_list(&self.identify_raw(cns::ACTIVE_NAMESPACE_LIST, after)?);
            let full = page.len() == IDENTIFY_LEN / 4;
            match page.last() {
                Some(&last) if last > after => after = last,
                _ => break,
            }
            all.extend(page);
            if !full {
                break;
            }
        }
        Ok(all)
    }

    /// Set Features Number of Queues (FID 07h) asking for `n` I/O submission and completion
    /// queues; returns how many the controller allocated (submission, completion).
    pub fn set_number_of_queues(&self, n: u16) -> Result<(u32, u32), Error> {
        if n == 0 {
            return Err(Error::Invalid("at least one I/O queue"));
        }
        let want = NumberOfQueues {
            nsq: n - 1,
            ncq: n - 1,
        };
        let sqe = SetFeatures {
            fid: FeatureId::NumberOfQueues as u8,
            sv: false,
            nsid: 0,
            cdw11: want.to_dword(),
            cdw12: 0,
        }
        .to_sqe(0);
        let c = self.run_no_data(sqe, "Set Features")?;
        let got = NumberOfQueues::from_dword(c.cqe.dw0);
        Ok((u32::from(got.nsq) + 1, u32::from(got.ncq) + 1))
    }

    /// Keep Alive (admin 18h). The keep-alive thread sends it on its own; this is for callers
    /// that want to check the controller is there.
    pub fn keep_alive(&self) -> Result<(), Error> {
        keep_alive(&mut lock(&self.admin), self.timeout())
    }

    /// Get Log Page (NVMe Base 2.0 §5.16): `len` bytes (a multiple of 4) of page `lid` from
    /// byte `offset`.
    pub fn get_log_page(
        &self,
        lid: u8,
        nsid: u32,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, Error> {
        if len == 0 || !len.is_multiple_of(4) || len > ADMIN_MAX_DATA {
            return Err(Error::Invalid("log page length: a non-zero multiple of 4"));
        }
        let sqe = GetLogPage {
            lid,
            lsp: 0,
            rae: false,
            numd: (len / 4) as u32,
            lsi: 0,
            offset,
            nsid,
        }
        .to_sqe(0);
        let c = run(
            &mut lock(&self.admin),
            sqe,
            Xfer::FromController,
            vec![0u8; len],
            self.timeout(),
            "Get Log Page",
        )?;
        Ok(c.buf)
    }

    /// The discovery log (NVMe-oF 1.1 §5.3), read whole and checked against a change of its
    /// generation counter while reading.
    pub fn discovery_log(&self) -> Result<DiscoveryLog, Error> {
        let lid = LogPageId::Discovery as u8;
        for _ in 0..8 {
            let head = self.get_log_page(lid, 0, 0, DiscoveryLogHeader::LEN)?;
            let h = DiscoveryLogHeader::parse(&head).ok_or(Error::Malformed("discovery log"))?;
            let max = (ADMIN_MAX_DATA - DiscoveryLogHeader::LEN) / DiscoveryLogEntry::LEN;
            let n = usize::try_from(h.numrec).unwrap_or(usize::MAX).min(max);
            let len = align_up(DiscoveryLogHeader::LEN + n * DiscoveryLogEntry::LEN, 4);
            let page = self.get_log_page(lid, 0, 0, len)?;
            let again =
                DiscoveryLogHeader::parse(&page).ok_or(Error::Malformed("discovery log"))?;
            if again.genctr != h.genctr || again.numrec != h.numrec {
                continue;
            }
            let entries = page[DiscoveryLogHeader::LEN..]
                .chunks_exact(DiscoveryLogEntry::LEN)
                .filter_map(DiscoveryLogEntry::parse)
                .collect();
            return Ok(DiscoveryLog {
                genctr: h.genctr,
                entries,
            });
        }
        Err(Error::Malformed("discovery log (kept changing while read)"))
    }

    /// Connects I/O queue `qid` (1-based) to this controller: a new connection of the same
    /// transport (NVMe/TCP: ICReq/ICResp with the same digests; NVMe/RDMA: a queue pair),
    /// Connect with this controller's CNTLID.
    pub fn connect_io_queue(&self, qid: u16, o: &IoQueueOptions) -> Result<IoQueue, Error> {
        if self.is_discovery() {
            return Err(Error::Invalid("a discovery controller has no I/O queues"));
        }
        if qid == 0 {
            return Err(Error::Invalid("I/O queue identifiers start at 1"));
        }
        if o.depth == 0 || o.depth > self.cap.mqes {
            return Err(Error::Invalid("I/O queue depth must be 1..=CAP.MQES"));
        }
        let id = &self.identify;
        let max_in_capsule = if id.sgls & sgls::OFFSET != 0 && id.ioccsz > 4 {
            id.ioccsz as usize * 16 - 64
        } else {
            0
        };
        let params = QueueParams {
            qid,
            depth: o.depth,
            hdgst: self.opts.hdr_digest,
            ddgst: self.opts.data_digest,
            max_data: o.max_data.max(4096),
            max_in_capsule,
        };
        let mut q = Queue::connect(
            self.opts.trtype,
            self.opts.addr,
            params,
            self.opts.connect_timeout,
        )?;
        let cattr = if o.disable_sq_flow_control {
            CATTR_DISABLE_SQ_FLOW_CONTROL
        } else {
            0
        };
        fabrics_connect(
            &mut q,
            &self.opts,
            self.cntlid,
            o.depth,
            cattr,
            Duration::ZERO,
        )?;
        Ok(IoQueue::new(
            q,
            self.opts.trtype,
            id.ofcs & 1 != 0,
            self.opts.command_timeout,
        ))
    }

    /// Starts the admin thread: Keep Alive every KATO / 2 (if KATO is set) and, with
    /// `on_event`, an Asynchronous Event Request kept outstanding.
    fn start_admin_thread(&mut self, on_event: Option<EventCallback>) -> Result<(), Error> {
        let ka = (!self.opts.kato.is_zero()).then(|| {
            (
                (self.opts.kato / 2).max(Duration::from_millis(100)),
                self.opts.command_timeout.min(self.opts.kato),
            )
        });
        if ka.is_none() && on_event.is_none() {
            return Ok(());
        }
        let wake = Arc::new(eventfd::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let sock = {
            let mut q = lock(&self.admin);
            q.set_notify(wake.clone());
            q.fd()
        };
        let admin = Arc::clone(&self.admin);
        let (w, st) = (wake.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("nvmf-admin-{}", self.cntlid))
            .spawn(move || admin_loop(&admin, sock, &w, &st, ka, on_event))?;
        self.admin_thread = Some(AdminThread { wake, stop, thread });
        Ok(())
    }

    fn stop_admin_thread(&mut self) {
        if let Some(t) = self.admin_thread.take() {
            t.stop.store(true, Ordering::Release);
            eventfd::signal(t.wake.as_fd());
            let _ = t.thread.join();
        }
    }

    /// Asks for asynchronous events (NVMe Base 2.0 §5.2): enables, with Set Features
    /// Asynchronous Event Configuration, the notices among `wanted`
    /// ([`AsyncEventConfig`](crate::spec::features::AsyncEventConfig) bits) that the
    /// controller supports (Identify Controller OAES), and keeps an Asynchronous Event Request
    /// outstanding from the admin thread. That thread calls `on_event` with each event, with
    /// [`AdminEvent::Stopped`] if the controller refuses the request, and with
    /// [`AdminEvent::Lost`] once if the admin queue fails. `on_event` runs on the admin thread
    /// without the admin queue held: it may run admin commands, but should hand work off
    /// rather than block. Returns the notices enabled; 0 (and no request outstanding) if the
    /// controller supports none of them.
    pub fn enable_async_events(
        &mut self,
        wanted: u32,
        on_event: impl Fn(AdminEvent) + Send + 'static,
    ) -> Result<u32, Error> {
        let mask = wanted & self.identify.oaes;
        if mask == 0 {
            return Ok(0);
        }
        let sqe = SetFeatures {
            fid: FeatureId::AsyncEventConfig as u8,
            sv: false,
            nsid: 0,
            cdw11: mask,
            cdw12: 0,
        }
        .to_sqe(0);
        self.run_no_data(sqe, "Set Features")?;
        self.stop_admin_thread();
        self.start_admin_thread(Some(Box::new(on_event)))?;
        Ok(mask)
    }

    /// Shuts the controller down (CC.SHN = 01b normal shutdown, then CSTS.SHST = 10b) and
    /// closes the admin queue. Close the I/O queues first: the controller deletes them.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), Error> {
        self.stop_admin_thread();
        if std::mem::replace(&mut self.shut_down, true) {
            lock(&self.admin).close();
            return Ok(());
        }
        let r = self.notify_shutdown();
        lock(&self.admin).close();
        r
    }

    fn notify_shutdown(&self) -> Result<(), Error> {
        if lock(&self.admin).is_dead() {
            return Err(Error::Disconnected);
        }
        let mut cc = Cc::from_u32(self.property_get(property::CC, PropertySize::Four)? as u32);
        cc.shn = 0b01;
        self.property_set(property::CC, PropertySize::Four, u64::from(cc.to_u32()))?;
        // RTD3E bounds the shutdown when reported; else a few seconds.
        let rtd3e = Duration::from_micros(u64::from(self.identify.rtd3e));
        let deadline =
            Instant::now() + rtd3e.clamp(Duration::from_secs(2), Duration::from_secs(10));
        loop {
            if self.csts()?.shst == shst::COMPLETE {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout("CSTS.SHST shutdown complete"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.shutdown_inner();
    }
}

/// The tag of the admin queue's Asynchronous Event Request.
const AER_TAG: u64 = u64::MAX;

/// The admin thread's loop: sleeps on the admin socket and its wake eventfd until the next
/// Keep Alive is due; takes the completion of its Asynchronous Event Request, re-arms it and
/// reports the event; ends when stopped or when the queue fails.
fn admin_loop(
    admin: &Mutex<Queue>,
    sock: RawFd,
    wake: &OwnedFd,
    stop: &AtomicBool,
    ka: Option<(Duration, Duration)>,
    on_event: Option<EventCallback>,
) {
    let mut next_ka = ka.map(|(period, _)| Instant::now() + period);
    let mut aer = on_event.is_some();
    let mut armed = false;
    let mut done = Vec::new();
    let mut events = Vec::new();
    loop {
        let was_on = aer;
        let mut lost = false;
        let again;
        {
            let mut q = lock(admin);
            // Until a request is outstanding and every completion read is handled: the
            // controller holds the next event until a request is there, and a completion read
            // here (even by the step that sends the request) wakes nobody later.
            loop {
                let mut refused = false;
                if aer && !armed && !lost && !q.is_dead() {
                    let sqe = Sqe::new(AdminOpcode::AsyncEventRequest as u8, 0);
                    armed = q.submit(sqe, Xfer::None, Vec::new(), AER_TAG).is_ok();
                    // No free slot: tried again at the next wake-up.
                    refused = !armed;
                }
                lost |= q.step().is_err();
                q.take_completions(&mut done);
                for c in done.drain(..) {
                    if c.tag != AER_TAG {
                        continue;
                    }
                    armed = false;
                    if c.cqe.status.is_success() {
                        events.push(AsyncEvent::from_dw0(c.cqe.dw0));
                    } else if !c.lost {
                        // A controller without Asynchronous Event Requests (or over its
                        // limit): its owner falls back to polling.
                        tracing::warn!(status = ?c.cqe.status, "NVMe-oF Asynchronous Event Request refused");
                        aer = false;
                    }
                }
                if armed || refused || !aer || lost || q.is_dead() {
                    break;
                }
            }
            if let (Some(t), Some((period, timeout))) = (next_ka, ka)
                && !lost
                && Instant::now() >= t
            {
                if let Err(e) = keep_alive(&mut q, timeout) {
                    tracing::warn!(error = %e, "NVMe-oF keep alive failed");
                    lost |= e.is_fatal();
                }
                next_ka = Some(Instant::now() + period);
            }
            lost |= q.is_dead();
            // NVMe/RDMA: ask the completion channel for a wake-up before sleeping on it (a
            // completion that came meanwhile means another turn instead).
            again = !lost && q.arm();
        }
        if let Some(cb) = &on_event {
            for e in events.drain(..) {
                cb(AdminEvent::Async(e));
            }
            if was_on && !aer {
                cb(AdminEvent::Stopped);
            }
            if lost {
                cb(AdminEvent::Lost);
            }
        }
        if lost || stop.load(Ordering::Acquire) {
            return;
        }
        if again {
            continue;
        }
        // The socket stays open while this thread runs (the controller joins it before
        // closing the queue). A failed poll only makes another turn.
        let timeout = next_ka.map(|t| t.saturating_duration_since(Instant::now()));
        let fds = [(sock, libc::POLLIN), (wake.as_raw_fd(), libc::POLLIN)];
        let _ = queue::poll_fds(&fds, timeout);
        eventfd::drain(wake.as_fd());
    }
}

fn keep_alive(q: &mut Queue, timeout: Duration) -> Result<(), Error> {
    let sqe = Sqe::new(AdminOpcode::KeepAlive as u8, 0);
    run(q, sqe, Xfer::None, Vec::new(), timeout, "Keep Alive")?;
    Ok(())
}

/// 16 random bytes as a version 4 UUID, from the standard library's randomly keyed hasher
/// (seeded by the OS once per process, different for every `RandomState`).
fn random_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut b = [0u8; 16];
    for (i, half) in b.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// The canonical text form of a UUID.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
