//! Subsystems, namespaces, the host allow-list, controllers and the discovery service
//! (NVMe-oF 1.1 §3, §5).
//!
//! A [`Target`] holds the subsystems and the listeners. A [`Controller`] is created by an admin
//! queue's Connect (dynamic controller model) and lives as long as that queue; its I/O queues
//! join it by CNTLID. Controller state that changes at run time (CC/CSTS, features, AER slots,
//! pending events) is behind atomics or small locks touched only by admin commands and control
//! operations, never by I/O.
//!
//! Asymmetric Namespace Access (NVMe Base 2.0 §8.1): every listener is a [`Port`] holding one
//! ANA state per ANA group; a namespace belongs to one group (`anagrpid`, default 1), and a
//! controller reports, and its I/O queues enforce, the states of the port its admin queue
//! came in on. I/O reads one atomic per command for it.

pub mod admin;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use ferroblk_bdev::reactor::ReactorHandle;
use ferroblk_bdev::{Bdev, BdevEvent};
use serde::{Deserialize, Serialize};

use crate::spec::Status;
use crate::spec::command::{AsyncEvent, async_event_notice, async_event_type};
use crate::spec::fabrics::DISCOVERY_NQN;
use crate::spec::features::AsyncEventConfig;
use crate::spec::log::{AnaGroupDescriptor, LogPageId, ana_state};

/// Declaration of a subsystem (`[[subsystem]]`, `nvmf_subsystem_add`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemSpec {
    /// NVMe Qualified Name (`nqn.YYYY-MM.reverse.domain:name`).
    pub nqn: String,
    /// Serial number (20 ASCII characters at most; default derived from the NQN).
    #[serde(default)]
    pub serial: Option<String>,
    /// Model number (40 ASCII characters at most).
    #[serde(default = "default_model")]
    pub model: String,
    /// Any host may connect (demo use only); otherwise only `hosts`.
    #[serde(default)]
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Namespaces.
    #[serde(default)]
    pub namespace: Vec<NamespaceSpec>,
}

fn default_model() -> String {
    "ferroblk".into()
}

/// Declaration of a namespace (`[[subsystem.namespace]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Namespace ID (1..=1024).
    pub nsid: u32,
    /// The bdev behind it.
    pub bdev: String,
    /// UUID (`xxxxxxxx-xxxx-...`); default derived from the subsystem NQN and NSID, so it is
    /// stable across restarts. The NGUID is derived the same way.
    #[serde(default)]
    pub uuid: Option<String>,
    /// ANA group (ANAGRPID, 1..=[`ANA_GROUPS`]; default 1): the namespaces of a group share
    /// an ANA state on each listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anagrpid: Option<u32>,
}

/// Most ANA groups of a subsystem (ANAGRPMAX and NANAGRPID in Identify Controller).
pub const ANA_GROUPS: u32 = 32;
/// Seconds a host waits for a group in ANA Change to settle (ANATT).
pub const ANA_TRANSITION_TIME_S: u8 = 10;

/// An ANA state a listener reports for a group (NVMe Base 2.0 §8.1.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnaState {
    /// Optimized: the preferred path.
    #[default]
    Optimized,
    /// Non-optimized: usable, not preferred.
    NonOptimized,
    /// Inaccessible: I/O fails with Asymmetric Access Inaccessible; may come back.
    Inaccessible,
    /// Persistent loss: I/O fails with Asymmetric Access Persistent Loss.
    PersistentLoss,
    /// Change: in transition; I/O fails with Asymmetric Access Transition.
    Change,
}

impl AnaState {
    /// The state's code in the ANA log page ([`ana_state`]).
    pub const fn code(self) -> u8 {
        match self {
            AnaState::Optimized => ana_state::OPTIMIZED,
            AnaState::NonOptimized => ana_state::NON_OPTIMIZED,
            AnaState::Inaccessible => ana_state::INACCESSIBLE,
            AnaState::PersistentLoss => ana_state::PERSISTENT_LOSS,
            AnaState::Change => ana_state::CHANGE,
        }
    }

    /// The state of a log page code (unknown codes read as [`AnaState::Change`]).
    pub const fn from_code(c: u8) -> AnaState {
        match c {
            ana_state::OPTIMIZED => AnaState::Optimized,
            ana_state::NON_OPTIMIZED => AnaState::NonOptimized,
            ana_state::INACCESSIBLE => AnaState::Inaccessible,
            ana_state::PERSISTENT_LOSS => AnaState::PersistentLoss,
            _ => AnaState::Change,
        }
    }

    /// The status an I/O command completes with in this state (NVMe Base 2.0 §8.1.3.3–5),
    /// `None` where I/O runs.
    pub const fn io_status(self) -> Option<Status> {
        use crate::spec::status::path;
        match self {
            AnaState::Optimized | AnaState::NonOptimized => None,
            AnaState::Inaccessible => Some(Status::path(path::ANA_INACCESSIBLE)),
            AnaState::PersistentLoss => Some(Status::path(path::ANA_PERSISTENT_LOSS)),
            AnaState::Change => Some(Status::path(path::ANA_TRANSITION)),
        }
    }

    fn is_optimized(&self) -> bool {
        *self == AnaState::Optimized
    }
}

/// The ANA state of one group on a listener (`[[listener.ana_group]]`), overriding the
/// listener's `ana_state` for that group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnaGroupState {
    /// ANA group (1..=[`ANA_GROUPS`]).
    pub anagrpid: u32,
    /// Its state on this listener.
    pub ana_state: AnaState,
}

fn check_anagrpid(field: String, g: u32) -> Result<(), (String, String)> {
    if !(1..=ANA_GROUPS).contains(&g) {
        return Err((field, format!("{g} is not in 1..={ANA_GROUPS}")));
    }
    Ok(())
}

/// The transport of a listener (`trtype`; NVMe-oF 1.1 Figure 38).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trtype {
    /// NVMe/TCP.
    #[default]
    Tcp,
    /// NVMe/RDMA (RoCE, InfiniBand, iWARP) through the RDMA connection manager.
    Rdma,
}

impl Trtype {
    /// Whether this is NVMe/TCP (the default, left out when a declaration is saved).
    pub fn is_tcp(&self) -> bool {
        *self == Trtype::Tcp
    }
}

/// Declaration of a listener (`[[listener]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    /// Transport: `tcp` (default) or `rdma` (`addr` is then an address of an RDMA device).
    #[serde(default, skip_serializing_if = "Trtype::is_tcp")]
    pub trtype: Trtype,
    /// IP address to listen on.
    pub addr: String,
    /// TCP port (4420 for I/O, 8009 for discovery by convention; every listener serves both).
    pub port: u16,
    /// Milliseconds a new connection has to send its ICReq (NVMe/TCP 1.0 §3.6.2.2) before it
    /// is closed.
    #[serde(default = "default_handshake_timeout_ms")]
    pub ic_timeout_ms: u64,
    /// Milliseconds after the ICReq for a successful Fabrics Connect (NVMe-oF 1.1 §3.3) before
    /// the connection is closed.
    #[serde(default = "default_handshake_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Most connections from one peer address that have not completed ICReq and Connect;
    /// more are closed at accept. Linux opens every I/O queue's connection before it sends
    /// their Connects, so this must exceed one host's queue count (default 256).
    #[serde(default = "default_max_unidentified_per_peer")]
    pub max_unidentified_per_peer: u32,
    /// ANA state of every ANA group on this listener (default `optimized`), as hosts see it in
    /// the ANA log page; I/O to a group that is `inaccessible`, `persistent_loss` or `change`
    /// here fails with the matching path-related status.
    #[serde(default, skip_serializing_if = "AnaState::is_optimized")]
    pub ana_state: AnaState,
    /// Per-group exceptions to `ana_state`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ana_group: Vec<AnaGroupState>,
}

fn default_handshake_timeout_ms() -> u64 {
    5000
}

fn default_max_unidentified_per_peer() -> u32 {
    256
}

impl ListenerSpec {
    /// A listener on `addr`:`port` with the default handshake limits.
    pub fn new(addr: impl Into<String>, port: u16) -> ListenerSpec {
        ListenerSpec {
            trtype: Trtype::Tcp,
            addr: addr.into(),
            port,
            ic_timeout_ms: default_handshake_timeout_ms(),
            connect_timeout_ms: default_handshake_timeout_ms(),
            max_unidentified_per_peer: default_max_unidentified_per_peer(),
            ana_state: AnaState::Optimized,
            ana_group: Vec::new(),
        }
    }

    /// [`validate`](Self::validate) as the I/O error starting a listener returns.
    pub fn validate_io(&self) -> std::io::Result<()> {
        self.validate().map_err(|(field, why)| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{field}: {why}"))
        })
    }

    /// Checks the values that need no socket; errors name the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.addr.parse::<std::net::IpAddr>().is_err() {
            return Err((
                "addr".into(),
                format!("'{}' is not an IP address", self.addr),
            ));
        }
        for (field, ms) in [
            ("ic_timeout_ms", self.ic_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if !(1..=3_600_000).contains(&ms) {
                return Err((field.into(), format!("{ms} is not in 1..=3600000")));
            }
        }
        if self.max_unidentified_per_peer == 0 {
            return Err((
                "max_unidentified_per_peer".into(),
                "must be at least 1".into(),
            ));
        }
        for (i, g) in self.ana_group.iter().enumerate() {
            check_anagrpid(format!("ana_group[{i}].anagrpid"), g.anagrpid)?;
            if self.ana_group[..i].iter().any(|o| o.anagrpid == g.anagrpid) {
                return Err((
                    format!("ana_group[{i}].anagrpid"),
                    format!("{} is listed twice", g.anagrpid),
                ));
            }
        }
        Ok(())
    }

    /// The state this declaration gives group `anagrpid`.
    pub fn ana_state_of(&self, anagrpid: u32) -> AnaState {
        self.ana_group
            .iter()
            .find(|g| g.anagrpid == anagrpid)
            .map_or(self.ana_state, |g| g.ana_state)
    }

    /// Records a state change made at run time (`anagrpid` `None`: every group), so that the
    /// saved declaration restarts the listener with the states it has now.
    pub fn set_ana_state(&mut self, anagrpid: Option<u32>, state: AnaState) {
        match anagrpid {
            None => {
                self.ana_state = state;
                self.ana_group.clear();
            }
            Some(g) => {
                self.ana_group.retain(|x| x.anagrpid != g);
                if state != self.ana_state {
                    self.ana_group.push(AnaGroupState {
                        anagrpid: g,
                        ana_state: state,
                    });
                }
            }
        }
    }

    /// Whether `other` is the same address and port (the listener's identity).
    pub fn same_endpoint(&self, other: &ListenerSpec) -> bool {
        self.trtype == other.trtype && self.addr == other.addr && self.port == other.port
    }
}

/// Most namespaces per subsystem.
pub const MAX_NSID: u32 = 1024;

fn valid_nqn(nqn: &str) -> bool {
    (nqn.starts_with("nqn.") || nqn.starts_with("nqn-"))
        && nqn.len() <= 223
        && nqn.is_ascii()
        && !nqn.contains(char::is_whitespace)
}

impl SubsystemSpec {
    /// Checks values that need no bdev; errors name the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !valid_nqn(&self.nqn) || self.nqn == DISCOVERY_NQN {
            return Err(("nqn".into(), format!("'{}' is not a usable NQN", self.nqn)));
        }
        if let Some(s) = &self.serial
            && (s.len() > 20 || !s.is_ascii())
        {
            return Err(("serial".into(), "at most 20 ASCII characters".into()));
        }
        if self.model.len() > 40 || !self.model.is_ascii() {
            return Err(("model".into(), "at most 40 ASCII characters".into()));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if !valid_nqn(h) {
                return Err((format!("hosts[{i}]"), format!("'{h}' is not an NQN")));
            }
        }
        for (i, n) in self.namespace.iter().enumerate() {
            if n.nsid == 0 || n.nsid > MAX_NSID {
                return Err((
                    format!("namespace[{i}].nsid"),
                    format!("{} is not in 1..={MAX_NSID}", n.nsid),
                ));
            }
            if self.namespace[..i].iter().any(|o| o.nsid == n.nsid) {
                return Err((
                    format!("namespace[{i}].nsid"),
                    format!("{} is used twice", n.nsid),
                ));
            }
            if let Some(u) = &n.uuid
                && parse_uuid(u).is_none()
            {
                return Err((
                    format!("namespace[{i}].uuid"),
                    format!("'{u}' is not a UUID"),
                ));
            }
            if let Some(g) = n.anagrpid {
                check_anagrpid(format!("namespace[{i}].anagrpid"), g)?;
            }
        }
        Ok(())
    }
}

/// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn fnv1a(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A stable 16-byte identifier derived from `parts`.
pub fn derive_id(parts: &str, salt: u64) -> [u8; 16] {
    let a = fnv1a(parts.as_bytes(), salt);
    let b = fnv1a(parts.as_bytes(), salt ^ 0x9E37_79B9_7F4A_7C15);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    // RFC 4122 version 4 / variant bits so it reads as a UUID.
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

/// A namespace: an NSID mapped to a bdev.
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// The bdev.
    pub bdev: Arc<dyn Bdev>,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// UUID.
    pub uuid: [u8; 16],
    /// ANA group (1..=[`ANA_GROUPS`]).
    pub anagrpid: u32,
    subscription: u64,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.bdev.info().unsubscribe(self.subscription);
    }
}

/// An NVM subsystem, or the discovery subsystem.
pub struct Subsystem {
    /// NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Whether this is the discovery subsystem.
    pub discovery: bool,
    allow_any_host: AtomicBool,
    hosts: RwLock<Vec<String>>,
    namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
    ns_generation: AtomicU64,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU16,
}

impl Subsystem {
    fn new(nqn: &str, serial: &str, model: &str, discovery: bool) -> Subsystem {
        Subsystem {
            nqn: nqn.into(),
            serial: serial.into(),
            model: model.into(),
            discovery,
            allow_any_host: AtomicBool::new(discovery),
            hosts: RwLock::new(Vec::new()),
            namespaces: RwLock::new(BTreeMap::new()),
            ns_generation: AtomicU64::new(1),
            controllers: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
        }
    }

    /// Whether any host may connect (no allow-list in force).
    pub fn allows_any_host(&self) -> bool {
        self.allow_any_host.load(Ordering::Acquire)
    }

    /// Whether `hostnqn` may connect.
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host.load(Ordering::Acquire)
            || self
                .hosts
                .read()
                .expect("hosts lock")
                .iter()
                .any(|h| h == hostnqn)
    }

    /// Allows `hostnqn`.
    pub fn add_host(&self, hostnqn: &str) {
        let mut h = self.hosts.write().expect("hosts lock");
        if !h.iter().any(|x| x == hostnqn) {
            h.push(hostnqn.into());
        }
    }

    /// Disallows `hostnqn` (its connected controllers are not torn down).
    pub fn remove_host(&self, hostnqn: &str) -> bool {
        let mut h = self.hosts.write().expect("hosts lock");
        let before = h.len();
        h.retain(|x| x != hostnqn);
        h.len() != before
    }

    /// The allowed hosts and whether any host is allowed.
    pub fn hosts(&self) -> (bool, Vec<String>) {
        (
            self.allow_any_host.load(Ordering::Acquire),
            self.hosts.read().expect("hosts lock").clone(),
        )
    }

    /// The namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().expect("ns lock").get(&nsid).cloned()
    }

    /// Every namespace, by NSID.
    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.namespaces
            .read()
            .expect("ns lock")
            .values()
            .cloned()
            .collect()
    }

    /// Bumped whenever a namespace is added or removed (I/O queues refresh their tables).
    pub fn ns_generation(&self) -> u64 {
        self.ns_generation.load(Ordering::Acquire)
    }

    /// Adds namespace `nsid` on `bdev`, in ANA group 1.
    pub fn add_namespace(
        self: &Arc<Self>,
        nsid: u32,
        bdev: Arc<dyn Bdev>,
        uuid: Option<[u8; 16]>,
    ) -> Result<(), String> {
        self.add_namespace_in_group(nsid, bdev, uuid, 1)
    }

    /// Adds namespace `nsid` on `bdev` in ANA group `anagrpid`.
    pub fn add_namespace_in_group(
        self: &Arc<Self>,
        nsid: u32,
        bdev: Arc<dyn Bdev>,
        uuid: Option<[u8; 16]>,
        anagrpid: u32,
    ) -> Result<(), String> {
        if nsid == 0 || nsid > MAX_NSID {
            return Err(format!("nsid {nsid} is not in 1..={MAX_NSID}"));
        }
        if !(1..=ANA_GROUPS).contains(&anagrpid) {
            return Err(format!("anagrpid {anagrpid} is not in 1..={ANA_GROUPS}"));
        }
        let mut map = self.namespaces.write().expect("ns lock");
        if map.contains_key(&nsid) {
            return Err(format!("nsid {nsid} exists already"));
        }
        let weak = Arc::downgrade(self);
        let subscription = bdev.info().subscribe(move |ev| {
            if let (Some(s), BdevEvent::Resized { .. }) = (weak.upgrade(), ev) {
                s.notify_ns_changed(nsid);
            }
        });
        let id = format!("{}|{nsid}", self.nqn);
        map.insert(
            nsid,
            Arc::new(Namespace {
                nsid,
                bdev,
                nguid: derive_id(&id, 1),
                uuid: uuid.unwrap_or_else(|| derive_id(&id, 2)),
                anagrpid,
                subscription,
            }),
        );
        drop(map);
        self.ns_generation.fetch_add(1, Ordering::AcqRel);
        self.notify_ns_changed(nsid);
        Ok(())
    }

    /// Removes namespace `nsid`; returns its bdev.
    pub fn remove_namespace(&self, nsid: u32) -> Option<Arc<dyn Bdev>> {
        let ns = self.namespaces.write().expect("ns lock").remove(&nsid)?;
        self.ns_generation.fetch_add(1, Ordering::AcqRel);
        self.notify_ns_changed(nsid);
        Some(ns.bdev.clone())
    }

    /// Tells every controller that namespace `nsid` changed (Namespace Attribute Changed).
    pub fn notify_ns_changed(&self, nsid: u32) {
        for c in self.controllers.lock().expect("ctrl lock").values() {
            c.ns_changed(nsid);
        }
    }

    /// Controllers connected now.
    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.controllers
            .lock()
            .expect("ctrl lock")
            .values()
            .cloned()
            .collect()
    }

    /// The ANA groups of this subsystem's namespaces as controllers on `port` report them,
    /// ascending, each with its NSIDs (NVMe Base 2.0 §8.1.2: the groups that contain an
    /// attached namespace).
    pub fn ana_groups(&self, port: Option<&Port>) -> Vec<AnaGroupDescriptor> {
        let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for n in self.namespaces() {
            groups.entry(n.anagrpid).or_default().push(n.nsid);
        }
        groups
            .into_iter()
            .map(|(g, nsids)| AnaGroupDescriptor {
                anagrpid: g,
                chgcnt: port.map_or(0, Port::change_count),
                state: port.map_or(AnaState::Optimized, |p| p.ana_state(g)).code(),
                nsids,
            })
            .collect()
    }

    /// Creates a controller for an admin queue that came in on `port` (`None`: a queue made
    /// without a listener, as in tests; every group is optimized for it).
    pub fn create_controller(
        self: &Arc<Self>,
        hostnqn: &str,
        hostid: [u8; 16],
        kato_ms: u32,
        admin_reactor: ReactorHandle,
        port: Option<Arc<Port>>,
    ) -> Result<Arc<Controller>, &'static str> {
        let mut ctrls = self.controllers.lock().expect("ctrl lock");
        if ctrls.len() >= 1024 {
            return Err("too many controllers");
        }
        let mut cntlid = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
        for _ in 0..0xffef {
            if (1..=0xffef).contains(&cntlid) && !ctrls.contains_key(&cntlid) {
                break;
            }
            cntlid = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
        }
        let c = Arc::new(Controller {
            cntlid,
            subsystem: self.clone(),
            hostnqn: hostnqn.into(),
            hostid,
            kato_ms: AtomicU32::new(kato_ms),
            last_keep_alive: Mutex::new(Instant::now()),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            io_queues: AtomicU16::new(DEFAULT_IO_QUEUES),
            aen_config: AtomicU32::new(0),
            vwc_enabled: AtomicBool::new(true),
            dead: AtomicBool::new(false),
            events: Mutex::new(VecDeque::new()),
            changed_ns: Mutex::new(Vec::new()),
            admin_reactor,
            port,
        });
        ctrls.insert(cntlid, c.clone());
        tracing::info!(subsystem = %self.nqn, cntlid, host = hostnqn, "controller created");
        Ok(c)
    }

    /// The controller `cntlid`.
    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers
            .lock()
            .expect("ctrl lock")
            .get(&cntlid)
            .cloned()
    }

    /// Removes a controller (its admin queue ended).
    pub fn remove_controller(&self, cntlid: u16) {
        if let Some(c) = self.controllers.lock().expect("ctrl lock").remove(&cntlid) {
            c.dead.store(true, Ordering::Release);
            tracing::info!(subsystem = %self.nqn, cntlid, "controller removed");
        }
    }
}

/// I/O queues a controller gets unless Set Features Number of Queues asks otherwise.
pub const DEFAULT_IO_QUEUES: u16 = 64;
/// Most I/O queues per controller.
pub const MAX_IO_QUEUES: u16 = 128;

/// A controller (NVMe-oF dynamic controller model).
pub struct Controller {
    /// Controller ID.
    pub cntlid: u16,
    /// Its subsystem.
    pub subsystem: Arc<Subsystem>,
    /// The host's NQN.
    pub hostnqn: String,
    /// The host identifier.
    pub hostid: [u8; 16],
    /// Keep Alive Timeout in ms (0: disabled).
    pub kato_ms: AtomicU32,
    /// When the last Keep Alive (or admin command) arrived.
    pub last_keep_alive: Mutex<Instant>,
    /// Controller Configuration.
    pub cc: AtomicU32,
    /// Controller Status.
    pub csts: AtomicU32,
    /// I/O queues allocated (Set Features Number of Queues).
    pub io_queues: AtomicU16,
    /// Asynchronous Event Configuration.
    pub aen_config: AtomicU32,
    /// Volatile Write Cache enable (Set Features 06h).
    pub vwc_enabled: AtomicBool,
    /// Set when the controller is torn down; its queues close.
    pub dead: AtomicBool,
    events: Mutex<VecDeque<AsyncEvent>>,
    changed_ns: Mutex<Vec<u32>>,
    admin_reactor: ReactorHandle,
    /// The listener the admin queue came in on: whose ANA states the controller reports.
    pub port: Option<Arc<Port>>,
}

impl Controller {
    /// The ANA state of group `anagrpid` through this controller.
    pub fn ana_state(&self, anagrpid: u32) -> AnaState {
        self.port
            .as_ref()
            .map_or(AnaState::Optimized, |p| p.ana_state(anagrpid))
    }

    /// An ANA state on this controller's port changed: an ANA Change event (Asynchronous
    /// Event Information 03h, log page 0Ch) if the host enabled it.
    fn ana_changed(&self) {
        self.notice(
            AsyncEventConfig::ANA_CHANGE_NOTICES,
            async_event_notice::ANA_CHANGE,
            LogPageId::AsymmetricNamespaceAccess,
        );
    }

    /// Queues the Notice event `info` (cleared by reading `log_page`) if the host enabled it
    /// (`enable`, a bit of Asynchronous Event Configuration), unless it is pending already, and
    /// wakes the admin queue's reactor to deliver it.
    fn notice(&self, enable: u32, info: u8, log_page: LogPageId) {
        if self.aen_config.load(Ordering::Acquire) & enable == 0 {
            return;
        }
        let ev = AsyncEvent {
            event_type: async_event_type::NOTICE,
            info,
            log_page: log_page as u8,
        };
        let mut q = self.events.lock().expect("events lock");
        if !q.contains(&ev) {
            q.push_back(ev);
        }
        drop(q);
        self.admin_reactor.send(|_| {});
    }

    /// Records a namespace change: a Changed Namespace List entry and, if enabled, an
    /// asynchronous event; wakes the admin queue's reactor to deliver it.
    pub fn ns_changed(&self, nsid: u32) {
        {
            let mut l = self.changed_ns.lock().expect("changed lock");
            if !l.contains(&nsid) {
                if l.len() >= 1024 {
                    // Overflow: the log's first entry becomes FFFFFFFFh.
                    l.clear();
                    l.push(u32::MAX);
                } else {
                    l.push(nsid);
                }
            }
        }
        self.notice(
            AsyncEventConfig::NAMESPACE_ATTRIBUTE_NOTICES,
            async_event_notice::NAMESPACE_ATTRIBUTE_CHANGED,
            LogPageId::ChangedNamespaceList,
        );
    }

    /// Takes the next pending asynchronous event.
    pub fn take_event(&self) -> Option<AsyncEvent> {
        self.events.lock().expect("events lock").pop_front()
    }

    /// Whether events are pending.
    pub fn has_events(&self) -> bool {
        !self.events.lock().expect("events lock").is_empty()
    }

    /// Takes (and clears) the Changed Namespace List.
    pub fn take_changed_ns(&self) -> Vec<u32> {
        std::mem::take(&mut *self.changed_ns.lock().expect("changed lock"))
    }

    /// Restarts the keep-alive timer.
    pub fn keep_alive(&self) {
        *self.last_keep_alive.lock().expect("ka lock") = Instant::now();
    }

    /// When the keep-alive timer expires, if it runs.
    pub fn keep_alive_deadline(&self) -> Option<Instant> {
        let kato = self.kato_ms.load(Ordering::Relaxed);
        if kato == 0 {
            return None;
        }
        // Hosts send Keep Alive at KATO/2; allow the full KATO plus a margin for a busy host.
        let last = *self.last_keep_alive.lock().expect("ka lock");
        Some(last + std::time::Duration::from_millis(u64::from(kato) + u64::from(kato) / 2))
    }
}

/// A listener as the subsystems see it: its Port ID (discovery log PORTID) and the ANA state
/// of each ANA group through it.
pub struct Port {
    /// Port ID, unique in the target.
    pub portid: u16,
    spec: Mutex<ListenerSpec>,
    /// ANA state codes by ANAGRPID − 1.
    ana: [AtomicU8; ANA_GROUPS as usize],
    /// Bumped at each ANA state change (the log page's Change Count).
    change_count: AtomicU64,
}

impl Port {
    fn new(portid: u16, spec: ListenerSpec) -> Port {
        let p = Port {
            portid,
            ana: std::array::from_fn(|_| AtomicU8::new(0)),
            change_count: AtomicU64::new(0),
            spec: Mutex::new(spec.clone()),
        };
        for g in 1..=ANA_GROUPS {
            p.ana[g as usize - 1].store(spec.ana_state_of(g).code(), Ordering::Relaxed);
        }
        p
    }

    /// The declaration, with the ANA states set at run time.
    pub fn spec(&self) -> ListenerSpec {
        self.spec.lock().expect("port lock").clone()
    }

    /// The ANA state of group `anagrpid` (groups out of range are inaccessible).
    pub fn ana_state(&self, anagrpid: u32) -> AnaState {
        match anagrpid
            .checked_sub(1)
            .and_then(|i| self.ana.get(i as usize))
        {
            Some(s) => AnaState::from_code(s.load(Ordering::Acquire)),
            None => AnaState::Inaccessible,
        }
    }

    /// The ANA log page's Change Count.
    pub fn change_count(&self) -> u64 {
        self.change_count.load(Ordering::Acquire)
    }
}

/// Everything the NVMe-oF front serves.
pub struct Target {
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    discovery: Arc<Subsystem>,
    listeners: RwLock<Vec<Arc<Port>>>,
    next_portid: AtomicU16,
    genctr: AtomicU64,
}

impl Default for Target {
    fn default() -> Self {
        Target::new()
    }
}

impl Target {
    /// An empty target with its discovery subsystem.
    pub fn new() -> Target {
        Target {
            subsystems: RwLock::new(BTreeMap::new()),
            discovery: Arc::new(Subsystem::new(
                DISCOVERY_NQN,
                "ferroblk-discovery",
                "ferroblk",
                true,
            )),
            listeners: RwLock::new(Vec::new()),
            next_portid: AtomicU16::new(1),
            genctr: AtomicU64::new(1),
        }
    }

    /// The subsystem named `nqn` (the discovery NQN gives the discovery subsystem).
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.subsystems
            .read()
            .expect("subsys lock")
            .get(nqn)
            .cloned()
    }

    /// Every NVM subsystem.
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems
            .read()
            .expect("subsys lock")
            .values()
            .cloned()
            .collect()
    }

    /// Adds a subsystem (namespaces are added separately).
    pub fn add_subsystem(&self, spec: &SubsystemSpec) -> Result<Arc<Subsystem>, String> {
        spec.validate().map_err(|(f, m)| format!("{f}: {m}"))?;
        let mut m = self.subsystems.write().expect("subsys lock");
        if m.contains_key(&spec.nqn) {
            return Err(format!("subsystem {} exists already", spec.nqn));
        }
        let serial = spec.serial.clone().unwrap_or_else(|| {
            let id = derive_id(&spec.nqn, 3);
            id[..10].iter().map(|b| format!("{b:02X}")).collect()
        });
        let s = Arc::new(Subsystem::new(&spec.nqn, &serial, &spec.model, false));
        s.allow_any_host
            .store(spec.allow_any_host, Ordering::Release);
        for h in &spec.hosts {
            s.add_host(h);
        }
        m.insert(spec.nqn.clone(), s.clone());
        drop(m);
        self.discovery_changed();
        Ok(s)
    }

    /// Removes a subsystem; its controllers are torn down.
    pub fn remove_subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        let s = self.subsystems.write().expect("subsys lock").remove(nqn)?;
        for c in s.controllers() {
            s.remove_controller(c.cntlid);
        }
        self.discovery_changed();
        Some(s)
    }

    /// Records a listener (discovery log, ANA states) and returns its port; a listener on the
    /// same endpoint gives the port it has already.
    pub fn add_listener(&self, l: ListenerSpec) -> Arc<Port> {
        let mut ls = self.listeners.write().expect("listener lock");
        if let Some(p) = ls.iter().find(|p| p.spec().same_endpoint(&l)) {
            return p.clone();
        }
        let portid = self.next_portid.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(Port::new(portid, l));
        ls.push(p.clone());
        drop(ls);
        self.discovery_changed();
        p
    }

    /// Forgets a listener.
    pub fn remove_listener(&self, l: &ListenerSpec) {
        self.listeners
            .write()
            .expect("listener lock")
            .retain(|x| !x.spec().same_endpoint(l));
        self.discovery_changed();
    }

    /// The listeners.
    pub fn listeners(&self) -> Vec<ListenerSpec> {
        self.ports().iter().map(|p| p.spec()).collect()
    }

    /// The listeners' ports.
    pub fn ports(&self) -> Vec<Arc<Port>> {
        self.listeners.read().expect("listener lock").clone()
    }

    /// The port of the listener on `l`'s endpoint.
    pub fn port(&self, l: &ListenerSpec) -> Option<Arc<Port>> {
        self.ports().into_iter().find(|p| p.spec().same_endpoint(l))
    }

    /// Sets the ANA state of group `anagrpid` (`None`: every group) on `port`, and sends an ANA
    /// Change event to every controller that came in on it and asked for them (NVMe Base 2.0
    /// §8.1.4). Returns the listener declaration as it is now.
    pub fn set_ana_state(
        &self,
        port: &Port,
        anagrpid: Option<u32>,
        state: AnaState,
    ) -> Result<ListenerSpec, (String, String)> {
        if let Some(g) = anagrpid {
            check_anagrpid("anagrpid".into(), g)?;
        }
        let spec = {
            let mut spec = port.spec.lock().expect("port lock");
            spec.set_ana_state(anagrpid, state);
            for g in 1..=ANA_GROUPS {
                if anagrpid.is_none_or(|x| x == g) {
                    port.ana[g as usize - 1].store(state.code(), Ordering::Release);
                }
            }
            port.change_count.fetch_add(1, Ordering::AcqRel);
            spec.clone()
        };
        tracing::info!(addr = %spec.addr, port = spec.port, ?anagrpid, ?state, "ANA state set");
        for s in self.subsystems() {
            for c in s.controllers() {
                if c.port.as_deref().is_some_and(|p| std::ptr::eq(p, port)) {
                    c.ana_changed();
                }
            }
        }
        Ok(spec)
    }

    /// The discovery log generation counter.
    pub fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Acquire)
    }

    /// The discovery log changed: bump the counter and tell discovery controllers that asked.
    pub fn discovery_changed(&self) {
        self.genctr.fetch_add(1, Ordering::AcqRel);
        for c in self.discovery.controllers() {
            c.notice(
                AsyncEventConfig::DISCOVERY_LOG_CHANGE_NOTICES,
                async_event_notice::DISCOVERY_LOG_PAGE_CHANGE,
                LogPageId::Discovery,
            );
        }
    }

    /// The discovery log entries `hostnqn` may see: each subsystem it is allowed into, on each
    /// listener.
    pub fn discovery_entries(&self, hostnqn: &str) -> Vec<crate::spec::log::DiscoveryLogEntry> {
        use crate::spec::log::{
            DiscoveryLogEntry, adrfam, rdma_tsas, subtype, tcp_sectype, treq, trtype,
        };
        let mut out = Vec::new();
        for p in self.ports() {
            let (portid, l) = (p.portid, p.spec());
            let v6 = l.addr.contains(':');
            for s in self.subsystems() {
                if !s.host_allowed(hostnqn) {
                    continue;
                }
                let mut tsas = [0u8; 256];
                let tr = match l.trtype {
                    Trtype::Tcp => {
                        tsas[0] = tcp_sectype::NONE;
                        trtype::TCP
                    }
                    Trtype::Rdma => {
                        tsas[0] = rdma_tsas::QPTYPE_RELIABLE_CONNECTED;
                        tsas[1] = rdma_tsas::PRTYPE_NOT_SPECIFIED;
                        tsas[2] = rdma_tsas::CMS_RDMA_CM;
                        trtype::RDMA
                    }
                };
                out.push(DiscoveryLogEntry {
                    trtype: tr,
                    adrfam: if v6 { adrfam::IPV6 } else { adrfam::IPV4 },
                    subtype: subtype::NVME,
                    treq: treq::SECURE_CHANNEL_NOT_REQUIRED,
                    portid,
                    cntlid: crate::spec::log::CNTLID_DYNAMIC,
                    asqsz: 32,
                    eflags: 0,
                    trsvcid: l.port.to_string(),
                    subnqn: s.nqn.clone(),
                    traddr: l.addr.clone(),
                    tsas,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked() {
        let mut s = SubsystemSpec {
            nqn: "nqn.2026-11.io.ferroblk:t".into(),
            serial: None,
            model: "m".into(),
            allow_any_host: false,
            hosts: vec!["nqn.2014-08.org.nvmexpress:uuid:1".into()],
            namespace: vec![NamespaceSpec {
                nsid: 1,
                bdev: "b".into(),
                uuid: None,
                anagrpid: None,
            }],
        };
        assert!(s.validate().is_ok());
        s.namespace.push(NamespaceSpec {
            nsid: 1,
            bdev: "c".into(),
            uuid: None,
            anagrpid: None,
        });
        assert_eq!(s.validate().unwrap_err().0, "namespace[1].nsid");
        s.namespace.pop();
        s.hosts.push("not an nqn".into());
        assert_eq!(s.validate().unwrap_err().0, "hosts[1]");
        s.hosts.pop();
        s.namespace[0].anagrpid = Some(ANA_GROUPS + 1);
        assert_eq!(s.validate().unwrap_err().0, "namespace[0].anagrpid");
        s.namespace[0].anagrpid = Some(ANA_GROUPS);
        assert!(s.validate().is_ok());
        s.nqn = DISCOVERY_NQN.into();
        assert_eq!(s.validate().unwrap_err().0, "nqn");
    }

    #[test]
    fn ana_states_map_to_their_codes_and_io_statuses() {
        for s in [
            AnaState::Optimized,
            AnaState::NonOptimized,
            AnaState::Inaccessible,
            AnaState::PersistentLoss,
            AnaState::Change,
        ] {
            assert_eq!(AnaState::from_code(s.code()), s);
        }
        assert_eq!(AnaState::NonOptimized.io_status(), None);
        assert_eq!(
            AnaState::Inaccessible.io_status(),
            Some(Status::path(crate::spec::status::path::ANA_INACCESSIBLE))
        );
        let l: ListenerSpec = serde_json::from_str(
            r#"{"addr": "::1", "port": 1, "ana_state": "persistent_loss",
                "ana_group": [{"anagrpid": 2, "ana_state": "change"}]}"#,
        )
        .unwrap();
        assert_eq!(l.ana_state_of(1), AnaState::PersistentLoss);
        assert_eq!(l.ana_state_of(2), AnaState::Change);
        let p = Port::new(1, l);
        assert_eq!(p.ana_state(2), AnaState::Change);
        assert_eq!(p.ana_state(0), AnaState::Inaccessible, "no group 0");
        assert_eq!(p.ana_state(ANA_GROUPS + 1), AnaState::Inaccessible);
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derive_id("a|1", 1), derive_id("a|1", 1));
        assert_ne!(derive_id("a|1", 1), derive_id("a|2", 1));
        assert_eq!(
            parse_uuid("01234567-89ab-cdef-0123-456789abcdef").unwrap()[0..2],
            [0x01, 0x23]
        );
        assert!(parse_uuid("nope").is_none());
    }
}
