//! `ferroblk serve`: starts the reactors, creates the configured bdevs, serves the control
//! socket, and on SIGINT/SIGTERM (or `daemon_shutdown`) drains I/O, flushes every bdev and exits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferroblk_bdev::reactor::{ReactorHandle, Reactors};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{BdevRegistry, Caps, IoStatus};
use ferroblk_target::subsystem::{ListenerSpec, SubsystemSpec, Target, parse_uuid};
use ferroblk_target::transport::tcp::listener::Listener;
use ferroblk_vhost::{VhostExport, VhostSpec};

use crate::config::Config;
use crate::rpc::RpcServer;

/// What the control plane (RPC handlers) shares.
pub struct DaemonState {
    /// Every bdev by name.
    pub registry: Arc<BdevRegistry>,
    /// Handles to the reactors.
    pub reactors: Vec<ReactorHandle>,
    /// When the daemon started.
    pub started: Instant,
    /// The configuration file.
    pub config_path: PathBuf,
    /// vhost-user-blk exports by socket path.
    pub vhost: Mutex<BTreeMap<PathBuf, VhostExport>>,
    /// The NVMe-oF target: subsystems, namespaces, hosts.
    pub target: Arc<Target>,
    /// NVMe/TCP listeners.
    pub listeners: Mutex<Vec<Listener>>,
    shutdown: Mutex<Option<mpsc::Sender<&'static str>>>,
}

impl DaemonState {
    /// Starts a vhost-user-blk export of an existing bdev.
    pub fn add_vhost(&self, spec: VhostSpec) -> Result<(), crate::rpc::RpcError> {
        use crate::rpc::RpcError;
        spec.validate().map_err(|(f, m)| RpcError::field(f, m))?;
        let mut exports = self.vhost.lock().expect("vhost lock");
        if exports.contains_key(&spec.socket) {
            return Err(RpcError::exists(format!(
                "an export on {} exists already",
                spec.socket.display()
            )));
        }
        let user = format!("vhost {}", spec.socket.display());
        let bdev = self
            .registry
            .claim(&spec.bdev, &user)
            .map_err(|e| match e {
                ferroblk_bdev::BdevError::NotFound(n) => {
                    RpcError::field("bdev", format!("no bdev named '{n}'"))
                }
                e => e.into(),
            })?;
        match VhostExport::start(spec.clone(), bdev, self.reactors.clone()) {
            Ok(x) => {
                exports.insert(spec.socket.clone(), x);
                Ok(())
            }
            Err(e) => {
                self.registry.release(&spec.bdev, &user);
                Err(RpcError::system(format!("{e}: {}", error_chain(&e))))
            }
        }
    }

    /// Stops an export (draining its queues) and releases its bdev.
    pub fn remove_vhost(&self, socket: &Path) -> Result<(), crate::rpc::RpcError> {
        let x = self
            .vhost
            .lock()
            .expect("vhost lock")
            .remove(socket)
            .ok_or_else(|| {
                crate::rpc::RpcError::not_found(format!("no export on {}", socket.display()))
            })?;
        let bdev = x.spec().bdev.clone();
        drop(x);
        self.registry
            .release(&bdev, &format!("vhost {}", socket.display()));
        Ok(())
    }

    /// Adds an NVMe-oF subsystem with its namespaces.
    pub fn add_subsystem(&self, spec: &SubsystemSpec) -> Result<(), crate::rpc::RpcError> {
        use crate::rpc::RpcError;
        spec.validate().map_err(|(f, m)| RpcError::field(f, m))?;
        for (j, n) in spec.namespace.iter().enumerate() {
            if self.registry.get(&n.bdev).is_none() {
                return Err(RpcError::field(
                    format!("namespace[{j}].bdev"),
                    format!("no bdev named '{}'", n.bdev),
                ));
            }
        }
        let s = self.target.add_subsystem(spec).map_err(RpcError::exists)?;
        for n in &spec.namespace {
            if let Err(e) = self.add_namespace(&s.nqn, n.nsid, &n.bdev, n.uuid.as_deref()) {
                self.remove_subsystem(&spec.nqn).ok();
                return Err(e);
            }
        }
        tracing::info!(nqn = %spec.nqn, namespaces = spec.namespace.len(), "NVMe-oF subsystem added");
        Ok(())
    }

    /// Removes a subsystem, disconnecting its hosts and releasing its bdevs.
    pub fn remove_subsystem(&self, nqn: &str) -> Result<(), crate::rpc::RpcError> {
        let s = self
            .target
            .remove_subsystem(nqn)
            .ok_or_else(|| crate::rpc::RpcError::not_found(format!("no subsystem {nqn}")))?;
        for ns in s.namespaces() {
            s.remove_namespace(ns.nsid);
            self.registry
                .release(ns.bdev.info().name(), &format!("nvmf {nqn} ns {}", ns.nsid));
        }
        Ok(())
    }

    /// Adds namespace `nsid` backed by `bdev` to subsystem `nqn`.
    pub fn add_namespace(
        &self,
        nqn: &str,
        nsid: u32,
        bdev: &str,
        uuid: Option<&str>,
    ) -> Result<(), crate::rpc::RpcError> {
        use crate::rpc::RpcError;
        let s = self
            .target
            .subsystem(nqn)
            .filter(|s| !s.discovery)
            .ok_or_else(|| RpcError::not_found(format!("no subsystem {nqn}")))?;
        let uuid = match uuid {
            Some(u) => Some(parse_uuid(u).ok_or_else(|| RpcError::field("uuid", "not a UUID"))?),
            None => None,
        };
        let user = format!("nvmf {nqn} ns {nsid}");
        let b = self.registry.claim(bdev, &user).map_err(|e| match e {
            ferroblk_bdev::BdevError::NotFound(n) => {
                RpcError::field("bdev", format!("no bdev named '{n}'"))
            }
            e => e.into(),
        })?;
        if let Err(e) = s.add_namespace(nsid, b, uuid) {
            self.registry.release(bdev, &user);
            return Err(RpcError::field("nsid", e));
        }
        Ok(())
    }

    /// Starts an NVMe/TCP listener.
    pub fn add_listener(&self, spec: ListenerSpec) -> Result<(), crate::rpc::RpcError> {
        let mut ls = self.listeners.lock().expect("listeners lock");
        if ls.iter().any(|l| *l.spec() == spec) {
            return Err(crate::rpc::RpcError::exists(format!(
                "listener {}:{} exists",
                spec.addr, spec.port
            )));
        }
        let l = Listener::start(spec.clone(), self.target.clone(), self.reactors.clone()).map_err(
            |e| crate::rpc::RpcError::system(format!("listen on {}:{}: {e}", spec.addr, spec.port)),
        )?;
        self.target.add_listener(spec);
        ls.push(l);
        Ok(())
    }

    /// Asks the daemon to shut down cleanly.
    pub fn request_shutdown(&self) {
        if let Some(tx) = &*self.shutdown.lock().expect("shutdown lock") {
            let _ = tx.send("rpc daemon_shutdown");
        }
    }
}

/// How long shutdown waits for in-flight I/O.
const DRAIN: Duration = Duration::from_secs(10);

/// Runs the daemon until a signal or `daemon_shutdown`.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let reactor_cfg = cfg
        .reactors
        .to_reactor_config()
        .map_err(|(p, m)| anyhow::anyhow!("{}: {p}: {m}", config_path.display()))?;
    let (tx, rx) = mpsc::channel::<&'static str>();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let _ = tx.send(if sig == signal_hook::consts::SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    });
                }
            })?;
    }
    let reactors = Reactors::start(&reactor_cfg).context("starting reactors")?;
    tracing::info!(reactors = reactors.len(), cpus = ?reactor_cfg.cpus, "reactors started");
    let registry = Arc::new(BdevRegistry::new());
    registry.create_all(&cfg.bdev).map_err(|e| {
        let field = e.error.field().map(|f| format!(".{f}")).unwrap_or_default();
        let mut msg = e.error.to_string();
        let mut src = std::error::Error::source(&e.error);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        anyhow::anyhow!("{}: bdev[{}]{field}: {msg}", config_path.display(), e.index)
    })?;
    let state = Arc::new(DaemonState {
        registry: registry.clone(),
        reactors: reactors.handles().to_vec(),
        started: Instant::now(),
        config_path: config_path.to_path_buf(),
        vhost: Mutex::new(BTreeMap::new()),
        target: Arc::new(Target::new()),
        listeners: Mutex::new(Vec::new()),
        shutdown: Mutex::new(Some(tx)),
    });
    for (i, s) in cfg.subsystem.iter().enumerate() {
        state.add_subsystem(s).map_err(|e| {
            anyhow::anyhow!("{}: subsystem[{i}]: {}", config_path.display(), e.message)
        })?;
    }
    for (i, l) in cfg.listener.iter().enumerate() {
        state.add_listener(l.clone()).map_err(|e| {
            anyhow::anyhow!("{}: listener[{i}]: {}", config_path.display(), e.message)
        })?;
    }
    for (i, v) in cfg.vhost.iter().enumerate() {
        state
            .add_vhost(v.clone())
            .map_err(|e| anyhow::anyhow!("{}: vhost[{i}]: {}", config_path.display(), e.message))?;
    }
    let rpc = RpcServer::start(&cfg.rpc.socket, state.clone())
        .with_context(|| format!("binding the RPC socket {}", cfg.rpc.socket.display()))?;
    print_banner(&cfg, &registry, rpc.path());
    let why = rx.recv().unwrap_or("control channel closed");
    tracing::info!(reason = why, "shutting down");
    drop(rpc);
    // Exports first: each drains its queues on the still-running reactors. NVMe/TCP
    // connections drain when the reactors stop them.
    std::mem::take(&mut *state.vhost.lock().expect("vhost lock"));
    std::mem::take(&mut *state.listeners.lock().expect("listeners lock"));
    reactors.shutdown(DRAIN);
    flush_all(&registry);
    state.shutdown.lock().expect("shutdown lock").take();
    tracing::info!("stopped");
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}

/// Flushes every bdev that keeps data, stacked ones before their bases.
fn flush_all(registry: &BdevRegistry) {
    for b in registry.top_down() {
        let caps = b.info().caps();
        if !caps.contains(Caps::FLUSH) || b.info().is_read_only() {
            continue;
        }
        match b.open_channel() {
            Ok(ch) => {
                let st = SyncChannel::new(ch).flush();
                if st == IoStatus::Success {
                    tracing::info!(bdev = b.info().name(), "flushed");
                } else {
                    tracing::error!(bdev = b.info().name(), status = %st, "flush at shutdown failed");
                }
            }
            Err(e) => tracing::error!(bdev = b.info().name(), error = %e, "cannot flush"),
        }
    }
}

fn print_banner(cfg: &Config, registry: &BdevRegistry, socket: &Path) {
    println!("ferroblk {} serving", env!("CARGO_PKG_VERSION"));
    for (b, _, _) in registry.list() {
        let g = b.info().geometry();
        println!(
            "  bdev {:<16} {:<7} {:>8} MiB  ({} blocks of {} B)",
            b.info().name(),
            b.info().kind(),
            g.size_bytes() >> 20,
            g.block_count,
            g.block_size
        );
    }
    if cfg.vhost.is_empty() {
        println!("  vhost-user-blk: no export configured ([[vhost]] or `ferroblk rpc vhost_add`)");
    }
    for v in &cfg.vhost {
        let sock = std::fs::canonicalize(&v.socket).unwrap_or_else(|_| v.socket.clone());
        println!(
            "  vhost-user-blk {} -> bdev {} ({} queues). Attach a VM with:",
            v.socket.display(),
            v.bdev,
            v.num_queues
        );
        println!("    qemu-system-x86_64 ... \\");
        println!(
            "      -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\"
        );
        println!(
            "      -chardev socket,id=vhost0,path={},reconnect=1 \\",
            sock.display()
        );
        println!(
            "      -device vhost-user-blk-pci,chardev=vhost0,num-queues={}",
            v.num_queues
        );
    }
    if cfg.listener.is_empty() || cfg.subsystem.is_empty() {
        println!("  NVMe/TCP: no subsystem or listener configured ([[subsystem]], [[listener]])");
    }
    for l in &cfg.listener {
        println!(
            "  NVMe/TCP listener {}:{} (discovery and I/O). From a Linux host:",
            l.addr, l.port
        );
        println!("    nvme discover -t tcp -a {} -s {}", l.addr, l.port);
        for s in &cfg.subsystem {
            println!(
                "    nvme connect -t tcp -a {} -s {} -n {}",
                l.addr, l.port, s.nqn
            );
        }
    }
    println!(
        "  control: ferroblk rpc --socket {} bdev_list",
        socket.display()
    );
    println!("  stop:    Ctrl-C (drains I/O and flushes every bdev)");
}
