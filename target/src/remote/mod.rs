//! The `nvmf` bdev: a namespace of a remote NVMe/TCP or NVMe/RDMA controller (another
//! ferroblk, Linux nvmet, SPDK ...) reached through this crate's [initiator](crate::initiator),
//! over one or several paths, each with its own transport (`trtype`, default `tcp`; `rdma`
//! needs the `rdma` cargo feature).
//!
//! ```toml
//! [[bdev]]
//! kind = "nvmf"
//! name = "remote0"
//! subnqn = "nqn.2026-11.io.ferroblk:vol0"
//! paths = [{ addr = "127.0.0.1", port = 4420 }, { addr = "10.0.2.15", port = 4420, trtype = "rdma" }]
//! policy = "failover"        # or "round_robin"
//! ctrl_loss_tmo = 30         # seconds I/O waits for a path before failing
//! reconnect_delay = 1        # first back-off between reconnect attempts, doubled up to 8x
//! ```
//!
//! ## Architecture
//! What flows in: bdev requests on each reactor's channel. What flows out: NVMe commands on
//! TCP connections or RDMA queue pairs, one I/O queue per path per channel.
//!
//! - This module: the declaration ([`NvmfDecl`], [`NvmfKind`]) and [`NvmfBdev`]. Creating the
//!   bdev connects every path's controller and identifies the namespace, blocking, on the
//!   control plane (config load, `bdev_create`); a remote that refuses us is an error naming
//!   the field (`subnqn`, `hostnqn`, `nsid`, `paths`).
//! - [`path`]: what the paths share between the control thread and the channels (state,
//!   ANA, spare I/O queues, queue identifiers) and the control thread itself: one per bdev,
//!   it keeps each path's controller connected (reconnecting with back-off), connects the
//!   I/O queues channels ask for, and re-identifies the namespace so a remote resize reaches
//!   the bdev's listeners. Nothing that blocks runs on a reactor.
//! - [`channel`]: the data path. Each channel owns its I/O queues; requests go to the path
//!   the policy picks with their scatter-gather lists (no copy, no allocation); a request
//!   whose path fails is retried on another, or held until a path returns or
//!   `ctrl_loss_tmo` passes, then failed with [`IoStatus::Aborted`](ferroblk_bdev::IoStatus).

pub mod channel;
pub mod path;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferroblk_bdev::bdev::BdevInfo;
use ferroblk_bdev::{
    Bdev, BdevError, BdevKind, BlockSize, Caps, Channel, Kinds, MAX_EXPORT_IO_BYTES,
};
use serde::{Deserialize, Serialize};

use crate::initiator::{ConnectOptions, Controller, Error as InitError, IoQueueOptions};
use crate::spec::fabrics::ConnectData;
use crate::spec::identify::{oncs, vwc};
use crate::spec::status::{StatusCodeType, command_specific};
use crate::subsystem::Trtype;
use path::{PathShared, Shared};

/// The kind name.
pub const KIND: &str = "nvmf";

/// One path to the remote controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathDecl {
    /// The controller's IP address (a literal, no name lookup; NVMe/RDMA: an address of its
    /// RDMA device).
    pub addr: String,
    /// Its port (NVMe/TCP listener or RDMA CM listener).
    pub port: u16,
    /// Transport: `tcp` (default) or `rdma`.
    #[serde(default, skip_serializing_if = "Trtype::is_tcp")]
    pub trtype: Trtype,
}

/// How requests are spread over the paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// All I/O on the first usable path (ANA optimized first, then in declaration order).
    #[default]
    Failover,
    /// Each request on the next usable path in turn (among the best ANA state present).
    RoundRobin,
}

fn default_ctrl_loss_tmo() -> f64 {
    30.0
}

fn default_reconnect_delay() -> f64 {
    1.0
}

fn default_io_queues() -> u16 {
    64
}

fn default_queue_depth() -> u16 {
    128
}

/// `kind = "nvmf"`: a namespace of a remote NVMe/TCP subsystem.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmfDecl {
    /// Unique name.
    pub name: String,
    /// The remote subsystem's NQN.
    pub subnqn: String,
    /// The namespace (default: the first active one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsid: Option<u32>,
    /// The paths to the subsystem's controllers (at least one).
    pub paths: Vec<PathDecl>,
    /// `failover` (default) or `round_robin`.
    #[serde(default)]
    pub policy: Policy,
    /// This host's NQN (default: a fresh `nqn.2014-08.org.nvmexpress:uuid:` one per bdev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostnqn: Option<String>,
    /// Seconds I/O is held while no path is usable before it fails (default 30).
    #[serde(default = "default_ctrl_loss_tmo")]
    pub ctrl_loss_tmo: f64,
    /// Seconds before the first reconnect attempt of a lost path; doubled after each failed
    /// attempt up to 8 times this (default 1).
    #[serde(default = "default_reconnect_delay")]
    pub reconnect_delay: f64,
    /// I/O queues asked of each controller (Set Features Number of Queues): the most
    /// channels (reactors) the bdev serves (default 64).
    #[serde(default = "default_io_queues")]
    pub io_queues: u16,
    /// Commands in flight per I/O queue, and per channel (default 128).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u16,
    /// CRC32C header digests (default false).
    #[serde(default)]
    pub hdr_digest: bool,
    /// CRC32C data digests (default false).
    #[serde(default)]
    pub data_digest: bool,
}

fn seconds(field: &str, v: f64) -> Result<Duration, BdevError> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| BdevError::invalid(field, format!("{v} is not a number of seconds >= 0")))
}

impl NvmfDecl {
    /// Checks what needs no network; errors name the field.
    pub fn validate(&self) -> Result<(), BdevError> {
        if self.subnqn.is_empty() || self.subnqn.len() > 223 {
            return Err(BdevError::invalid("subnqn", "an NQN of 1 to 223 bytes"));
        }
        if let Some(h) = &self.hostnqn
            && (h.is_empty() || h.len() > 223)
        {
            return Err(BdevError::invalid("hostnqn", "an NQN of 1 to 223 bytes"));
        }
        if self.nsid == Some(0) || self.nsid == Some(u32::MAX) {
            return Err(BdevError::invalid(
                "nsid",
                "a namespace ID from 1 to FFFFFFFEh",
            ));
        }
        if self.paths.is_empty() {
            return Err(BdevError::invalid("paths", "at least one {addr, port}"));
        }
        if self.paths.len() > 16 {
            return Err(BdevError::invalid("paths", "at most 16 paths"));
        }
        self.addrs()?;
        for (i, p) in self.paths.iter().enumerate() {
            if p.trtype == Trtype::Rdma {
                if !cfg!(feature = "rdma") {
                    return Err(BdevError::invalid(
                        format!("paths[{i}].trtype"),
                        "NVMe/RDMA needs a ferroblk built with the `rdma` feature",
                    ));
                }
                if self.hdr_digest || self.data_digest {
                    return Err(BdevError::invalid(
                        if self.hdr_digest {
                            "hdr_digest"
                        } else {
                            "data_digest"
                        },
                        format!("NVMe/TCP only, and paths[{i}] is NVMe/RDMA"),
                    ));
                }
            }
        }
        seconds("ctrl_loss_tmo", self.ctrl_loss_tmo)?;
        seconds("reconnect_delay", self.reconnect_delay)?;
        if self.io_queues == 0 {
            return Err(BdevError::invalid("io_queues", "at least 1"));
        }
        if !(1..=1024).contains(&self.queue_depth) {
            return Err(BdevError::invalid("queue_depth", "1 to 1024"));
        }
        Ok(())
    }

    /// The paths' socket addresses.
    pub fn addrs(&self) -> Result<Vec<SocketAddr>, BdevError> {
        self.paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ip: IpAddr = p.addr.parse().map_err(|_| {
                    BdevError::invalid(
                        format!("paths[{i}].addr"),
                        format!("'{}' is not an IP address", p.addr),
                    )
                })?;
                if p.port == 0 {
                    return Err(BdevError::invalid(format!("paths[{i}].port"), "port 0"));
                }
                Ok(SocketAddr::new(ip, p.port))
            })
            .collect()
    }
}

/// `kind = "nvmf"`.
pub struct NvmfKind;

impl BdevKind for NvmfKind {
    const NAME: &'static str = KIND;
    type Config = NvmfDecl;
    fn name(c: &NvmfDecl) -> &str {
        &c.name
    }
    fn validate(c: &NvmfDecl) -> Result<(), BdevError> {
        c.validate()
    }
    fn build(c: &NvmfDecl, _bases: Vec<Arc<dyn Bdev>>) -> Result<Arc<dyn Bdev>, BdevError> {
        Ok(Arc::new(NvmfBdev::connect(c)?))
    }
}

/// Adds `nvmf` to a program's list of kinds.
pub fn add_kinds(kinds: &mut Kinds) -> &mut Kinds {
    kinds.add::<NvmfKind>()
}

/// A Connect or Identify failure as an error naming the declaration's field.
fn connect_error(field: &str, addr: SocketAddr, e: &InitError) -> BdevError {
    let field = match e {
        InitError::ConnectInvalidParameters { in_data: true, ipo }
            if *ipo == ConnectData::OFFSET_SUBNQN =>
        {
            "subnqn"
        }
        InitError::ConnectInvalidParameters { in_data: true, ipo }
            if *ipo == ConnectData::OFFSET_HOSTNQN =>
        {
            "hostnqn"
        }
        InitError::Command { status, .. }
            if status.sct == StatusCodeType::CommandSpecific
                && status.sc == command_specific::CONNECT_INVALID_HOST =>
        {
            "hostnqn"
        }
        _ => field,
    };
    BdevError::invalid(field, format!("the controller at {addr} refused: {e}"))
}

/// Whether a connect failure is the remote refusing us (a configuration error) rather than the
/// remote being unreachable.
fn is_refusal(e: &InitError) -> bool {
    matches!(
        e,
        InitError::ConnectInvalidParameters { .. }
            | InitError::Command { .. }
            | InitError::AuthenticationRequired(_)
    )
}

/// The remote-volume bdev. See the module documentation.
pub struct NvmfBdev {
    shared: Arc<Shared>,
    control: Option<JoinHandle<()>>,
}

impl NvmfBdev {
    /// Connects every path (at least one must answer), identifies the namespace and starts the
    /// control thread. Blocks: call it off the reactors.
    pub fn connect(d: &NvmfDecl) -> Result<NvmfBdev, BdevError> {
        d.validate()?;
        let addrs = d.addrs()?;
        let mut base = ConnectOptions::new(addrs[0], d.subnqn.clone());
        if let Some(h) = &d.hostnqn {
            base.hostnqn = h.clone();
        }
        base.hdr_digest = d.hdr_digest;
        base.data_digest = d.data_digest;
        base.connect_timeout = Duration::from_secs(5);
        base.command_timeout = Duration::from_secs(10);
        base.kato = Duration::from_secs(5);
        let mut ctrls: Vec<Option<Controller>> = Vec::with_capacity(addrs.len());
        let mut unreachable = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            let opts = ConnectOptions {
                trtype: d.paths[i].trtype,
                addr,
                ..base.clone()
            };
            match Controller::connect(&opts) {
                Ok(c) => ctrls.push(Some(c)),
                Err(e) if is_refusal(&e) => {
                    return Err(connect_error(&format!("paths[{i}]"), addr, &e));
                }
                Err(e) => {
                    tracing::warn!(bdev = %d.name, %addr, error = %e, "nvmf path unreachable at create; reconnecting in the background");
                    unreachable.push(format!("{addr}: {e}"));
                    ctrls.push(None);
                }
            }
        }
        let Some((first, ctrl)) = ctrls
            .iter()
            .enumerate()
            .find_map(|(i, c)| c.as_ref().map(|c| (i, c)))
        else {
            return Err(BdevError::invalid(
                "paths",
                format!("no path answered: {}", unreachable.join("; ")),
            ));
        };
        let field = |e: InitError| connect_error("subnqn", addrs[first], &e);
        if ctrl.is_discovery() {
            return Err(BdevError::invalid(
                "subnqn",
                "names a discovery subsystem, which has no namespaces",
            ));
        }
        let active = ctrl.active_namespaces().map_err(field)?;
        let nsid = match d.nsid {
            Some(n) if active.contains(&n) => n,
            Some(n) => {
                return Err(BdevError::invalid(
                    "nsid",
                    format!(
                        "namespace {n} is not active in {} (active: {active:?})",
                        d.subnqn
                    ),
                ));
            }
            None => *active.first().ok_or_else(|| {
                BdevError::invalid("nsid", format!("{} has no active namespace", d.subnqn))
            })?,
        };
        let ns = ctrl.namespace(nsid).map_err(field)?;
        let bs = BlockSize::new(ns.block_size).ok_or_else(|| {
            BdevError::invalid(
                "nsid",
                format!(
                    "block size {} is not supported (512 or 4096)",
                    ns.block_size
                ),
            )
        })?;
        let id = ctrl.identify();
        let mut caps = Caps::READ | Caps::WRITE | Caps::FLUSH | Caps::RETAINS_DATA;
        caps = caps.union(Caps::PERSISTENT);
        if id.oncs & oncs::DATASET_MANAGEMENT != 0 {
            caps = caps.union(Caps::UNMAP);
        }
        if id.oncs & oncs::WRITE_ZEROES != 0 {
            caps = caps.union(Caps::WRITE_ZEROES);
        }
        if id.vwc & vwc::PRESENT != 0 {
            caps = caps.union(Caps::VOLATILE_CACHE);
        }
        let max_data = ctrls
            .iter()
            .flatten()
            .filter_map(|c| c.max_data_transfer())
            .fold(MAX_EXPORT_IO_BYTES as usize, usize::min);
        let depth = d.queue_depth.min(ctrl.cap().mqes.max(1));
        let info = BdevInfo::builder(&d.name, KIND, bs, ns.blocks, caps)
            .max_transfer_blocks((max_data >> bs.shift()) as u32)
            .max_segments(256)
            .build();
        let qopts = IoQueueOptions {
            depth,
            max_data,
            disable_sq_flow_control: false,
        };
        let paths = addrs
            .iter()
            .zip(&d.paths)
            .map(|(&addr, p)| PathShared::new(p.trtype, addr))
            .collect::<Vec<_>>();
        let shared = Arc::new(Shared::new(
            info,
            nsid,
            d.policy,
            seconds("ctrl_loss_tmo", d.ctrl_loss_tmo)?,
            seconds("reconnect_delay", d.reconnect_delay)?,
            d.io_queues,
            qopts,
            base,
            paths,
        ));
        let control = path::start(shared.clone(), ctrls).map_err(|e| BdevError::Io {
            op: "spawn the nvmf control thread",
            path: d.name.clone().into(),
            source: e,
        })?;
        Ok(NvmfBdev {
            shared,
            control: Some(control),
        })
    }
}

impl Drop for NvmfBdev {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(t) = self.control.take() {
            let _ = t.join();
        }
    }
}

impl Bdev for NvmfBdev {
    fn info(&self) -> &Arc<BdevInfo> {
        &self.shared.info
    }

    fn open_channel(&self) -> Result<Channel, BdevError> {
        let ops = channel::NvmfChannel::new(self.shared.clone());
        let depth = usize::from(self.shared.qopts.depth);
        Ok(Channel::new(self.shared.info.clone(), Box::new(ops), depth))
    }

    /// Accepts the remote namespace's size: re-identifies it now and takes its block count,
    /// which must be `new_blocks` (the remote volume is grown on the remote).
    fn resize(&self, new_blocks: u64) -> Result<(), BdevError> {
        let blocks = self
            .shared
            .identify_size()
            .map_err(|e| BdevError::Unsupported {
                what: format!("resize while no path answers ({e})"),
            })?;
        self.shared.info.set_block_count(blocks);
        if blocks != new_blocks {
            return Err(BdevError::invalid(
                "size",
                format!(
                    "the remote namespace has {blocks} blocks; resize it on the remote, then \
                     give its size here"
                ),
            ));
        }
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        self.shared.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> Kinds {
        let mut k = Kinds::core();
        add_kinds(&mut k);
        k
    }

    #[test]
    fn a_declaration_parses_with_defaults_and_refuses_unknown_fields() {
        let v = serde_json::json!({
            "kind": "nvmf", "name": "r", "subnqn": "nqn.2026-12.io.x:v",
            "paths": [{"addr": "127.0.0.1", "port": 4420}, {"addr": "::1", "port": 4421, "trtype": "rdma"}],
            "policy": "round_robin"
        });
        let d = kinds().parse(v).unwrap();
        assert_eq!(d.kind(), KIND);
        if cfg!(feature = "rdma") {
            d.validate().unwrap();
        }
        let mut j = d.to_json();
        j.as_object_mut().unwrap().remove("kind");
        let c: NvmfDecl = serde_json::from_value(j).unwrap();
        assert_eq!(
            (c.paths[0].trtype, c.paths[1].trtype),
            (Trtype::Tcp, Trtype::Rdma)
        );
        assert_eq!(c.policy, Policy::RoundRobin);
        assert_eq!((c.ctrl_loss_tmo, c.reconnect_delay), (30.0, 1.0));
        assert_eq!((c.io_queues, c.queue_depth), (64, 128));
        assert_eq!(c.addrs().unwrap()[1].to_string(), "[::1]:4421");
        let e = kinds()
            .parse(serde_json::json!({
                "kind": "nvmf", "name": "r", "subnqn": "n", "paths": [], "ctrl_loss": 3
            }))
            .unwrap_err();
        assert_eq!(e.field, "ctrl_loss", "{e}");
        let e = kinds()
            .parse(serde_json::json!({
                "kind": "nvmf", "name": "r", "subnqn": "n",
                "paths": [{"addr": "127.0.0.1", "port": 1, "x": 1}]
            }))
            .unwrap_err();
        assert!(e.field.starts_with("paths"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let ok = NvmfDecl {
            name: "r".into(),
            subnqn: "nqn.2026-12.io.x:v".into(),
            nsid: None,
            paths: vec![PathDecl {
                addr: "127.0.0.1".into(),
                port: 4420,
                trtype: Trtype::Tcp,
            }],
            policy: Policy::Failover,
            hostnqn: None,
            ctrl_loss_tmo: 1.5,
            reconnect_delay: 0.1,
            io_queues: 4,
            queue_depth: 32,
            hdr_digest: false,
            data_digest: false,
        };
        ok.validate().unwrap();
        let field = |f: &dyn Fn(&mut NvmfDecl)| {
            let mut d = ok.clone();
            f(&mut d);
            d.validate().unwrap_err().field().unwrap().to_string()
        };
        assert_eq!(field(&|d| d.subnqn.clear()), "subnqn");
        assert_eq!(field(&|d| d.hostnqn = Some("x".repeat(300))), "hostnqn");
        assert_eq!(field(&|d| d.nsid = Some(0)), "nsid");
        assert_eq!(field(&|d| d.paths.clear()), "paths");
        assert_eq!(field(&|d| d.paths[0].addr = "host".into()), "paths[0].addr");
        assert_eq!(field(&|d| d.paths[0].port = 0), "paths[0].port");
        assert_eq!(field(&|d| d.ctrl_loss_tmo = f64::NAN), "ctrl_loss_tmo");
        assert_eq!(field(&|d| d.reconnect_delay = -1.0), "reconnect_delay");
        assert_eq!(field(&|d| d.io_queues = 0), "io_queues");
        assert_eq!(field(&|d| d.queue_depth = 0), "queue_depth");
        let rdma = |d: &mut NvmfDecl| d.paths[0].trtype = Trtype::Rdma;
        if cfg!(feature = "rdma") {
            assert_eq!(
                field(&|d| {
                    rdma(d);
                    d.data_digest = true;
                }),
                "data_digest"
            );
        } else {
            assert_eq!(field(&rdma), "paths[0].trtype");
        }
    }

    #[test]
    fn ana_states_rank_optimized_first_and_exclude_unusable_ones() {
        use path::ana;
        assert!(ana::rank(ana::OPTIMIZED) < ana::rank(ana::NON_OPTIMIZED));
        for s in [ana::INACCESSIBLE, ana::PERSISTENT_LOSS, ana::CHANGE, 0] {
            assert_eq!(ana::rank(s), None);
        }
    }
}
