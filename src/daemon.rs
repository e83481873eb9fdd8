//! `ferroblk serve`: starts the reactors, creates the configured bdevs, serves the control
//! socket, and on SIGINT/SIGTERM (or `daemon_shutdown`) drains I/O, flushes every bdev and exits.
//!
//! Start is degraded by default: a bdev that fails to open (corrupt metadata, a missing file) is
//! left out with every bdev stacked on it and every export of it, each recorded with its reason
//! (`bdev_list`, `vhost_list`, `nvmf_subsystem_list`, the log), and everything else is served.
//! `serve --strict` (or `strict = true`) exits at the first such failure instead. A configuration
//! that does not parse or validate always fails at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferroblk_bdev::decl::creation_order;
use ferroblk_bdev::reactor::{ReactorHandle, Reactors};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{BdevError, BdevRegistry, Caps, IoStatus};
use ferroblk_target::subsystem::Trtype;
use ferroblk_target::subsystem::{ListenerSpec, NamespaceSpec, SubsystemSpec, Target, parse_uuid};
#[cfg(feature = "rdma")]
use ferroblk_target::transport::rdma::listener::Listener as RdmaListener;
use ferroblk_target::transport::tcp::listener::Listener;
use ferroblk_vhost::{VhostExport, VhostSpec};

use crate::config::Config;
use crate::decl::Decl;
use crate::metrics::MetricsServer;
use crate::rpc::RpcServer;
use crate::state::Objects;

/// The configuration `serve` and `check-config` use without `--config`: the quickstart, built
/// into the binary.
pub const QUICKSTART: &str = include_str!("../configs/quickstart.toml");

/// A configuration with the objects the daemon will serve.
pub struct Loaded {
    /// The configuration.
    pub cfg: Config,
    /// The configuration file, or a description of the embedded one.
    pub label: PathBuf,
    /// The state file (written on every change over the RPC).
    pub state_path: PathBuf,
    /// Whether the objects come from the state file rather than the configuration.
    pub from_state: bool,
    /// The configuration's own `[[bdev]]` declarations (inline keys come from these).
    pub config_bdevs: Vec<Decl>,
}

impl Loaded {
    /// Where the served objects are declared: the state file or the configuration.
    pub fn source(&self) -> String {
        if self.from_state {
            self.state_path.display().to_string()
        } else {
            self.label.display().to_string()
        }
    }
}

/// Loads the configuration (`None`: the embedded quickstart) and, when its state file exists,
/// puts the state file's objects in place of the configuration's. Every check that needs no
/// file or device runs here.
pub fn load(config: Option<&Path>) -> anyhow::Result<Loaded> {
    let (mut cfg, label) = match config {
        Some(p) => (Config::load(p)?, p.to_path_buf()),
        None => {
            let label = "(embedded configs/quickstart.toml)";
            (Config::parse(QUICKSTART, label)?, PathBuf::from(label))
        }
    };
    let state_path = crate::state::state_path(&cfg, config);
    let config_bdevs = cfg.bdev.clone();
    let saved = crate::state::load(&state_path, &config_bdevs)?;
    let from_state = saved.is_some();
    if let Some(o) = saved {
        check_objects(&o)
            .map_err(|(p, m)| anyhow::anyhow!("{}: {p}: {m}", state_path.display()))?;
        cfg.bdev = o.bdev;
        cfg.vhost = o.vhost;
        cfg.subsystem = o.subsystem;
        cfg.listener = o.listener;
    }
    Ok(Loaded {
        cfg,
        label,
        state_path,
        from_state,
        config_bdevs,
    })
}

/// What the configuration loader checks of its objects, for a state file's: names, bases and
/// cycles, and what each export and subsystem refers to.
fn check_objects(o: &Objects) -> Result<(), (String, String)> {
    creation_order(&o.bdev, &|_| false).map_err(|e| {
        let path = match e.error.field() {
            Some(f) => format!("bdev[{}].{f}", e.index),
            None => format!("bdev[{}]", e.index),
        };
        (path, message(&e.error))
    })?;
    let has = |n: &str| o.bdev.iter().any(|b| b.name() == n);
    for (i, v) in o.vhost.iter().enumerate() {
        v.validate()
            .map_err(|(f, m)| (format!("vhost[{i}].{f}"), m))?;
        if o.vhost[..i].iter().any(|x| x.socket == v.socket) {
            return Err((
                format!("vhost[{i}].socket"),
                format!("{} is used by another export", v.socket.display()),
            ));
        }
        if !has(&v.bdev) {
            return Err((
                format!("vhost[{i}].bdev"),
                format!("no bdev named '{}'", v.bdev),
            ));
        }
    }
    for (i, s) in o.subsystem.iter().enumerate() {
        s.validate()
            .map_err(|(f, m)| (format!("subsystem[{i}].{f}"), m))?;
        if o.subsystem[..i].iter().any(|x| x.nqn == s.nqn) {
            return Err((
                format!("subsystem[{i}].nqn"),
                format!("{} is declared twice", s.nqn),
            ));
        }
        for (j, n) in s.namespace.iter().enumerate() {
            if !has(&n.bdev) {
                return Err((
                    format!("subsystem[{i}].namespace[{j}].bdev"),
                    format!("no bdev named '{}'", n.bdev),
                ));
            }
        }
    }
    for (i, l) in o.listener.iter().enumerate() {
        l.validate()
            .map_err(|(f, m)| (format!("listener[{i}].{f}"), m))?;
        if o.listener[..i].iter().any(|x| x.same_endpoint(l)) {
            return Err((format!("listener[{i}]"), "declared twice".into()));
        }
    }
    Ok(())
}

/// `check-config`: every check `serve` runs short of opening sockets and changing files. The
/// configuration and its state file are loaded and checked as at start; each declared bdev is
/// checked as opening it would (a missing file without `create`, a file whose size differs
/// from `size`, an unreadable key file). Returns the summary, or every problem found.
pub fn check(config: Option<&Path>) -> anyhow::Result<Result<String, Vec<String>>> {
    let l = load(config)?;
    let src = l.source();
    let mut problems = Vec::new();
    for (i, d) in l.cfg.bdev.iter().enumerate() {
        if let Err(e) = d.check() {
            let field = e.field().map(|f| format!(".{f}")).unwrap_or_default();
            let msg = match &e {
                BdevError::Invalid { reason, .. } => reason.clone(),
                other => message(other),
            };
            problems.push(format!("{src}: bdev[{i}]{field}: {msg}"));
        }
    }
    if !problems.is_empty() {
        return Ok(Err(problems));
    }
    let mut summary = format!("{}: ok ({} bdevs", l.label.display(), l.cfg.bdev.len());
    if l.from_state {
        summary.push_str(&format!(
            ", objects from the state file {}",
            l.state_path.display()
        ));
    }
    summary.push(')');
    Ok(Ok(summary))
}

/// The saved objects and where they are written.
struct Persist {
    objects: Objects,
    path: PathBuf,
    config_bdevs: Vec<Decl>,
}

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
    /// NVMe/RDMA listeners.
    #[cfg(feature = "rdma")]
    pub rdma_listeners: Mutex<Vec<RdmaListener>>,
    /// Declared bdevs that failed to open at start (or stack on one that did), by name.
    pub failed: Mutex<BTreeMap<String, FailedBdev>>,
    /// Declared exports left out at start because their bdev failed.
    pub failed_exports: Mutex<Vec<FailedExport>>,
    shutdown: Mutex<Option<mpsc::Sender<&'static str>>>,
    /// The objects as the state file keeps them; held across a saved method so that changes
    /// are recorded in the order they took effect.
    persist: Mutex<Persist>,
}

/// A declared bdev that is not served: it failed to open, or its base did.
#[derive(Clone, Debug)]
pub struct FailedBdev {
    /// The declared kind.
    pub kind: String,
    /// The declaration as `bdev_list` shows it (secrets redacted).
    pub spec: serde_json::Value,
    /// Why it is not served.
    pub reason: String,
}

/// A declared export left out because its bdev is not served.
#[derive(Clone, Debug)]
pub enum FailedExport {
    /// A `[[vhost]]` export.
    Vhost {
        /// Its declaration.
        spec: VhostSpec,
        /// Why it is not served.
        reason: String,
    },
    /// A `[[subsystem.namespace]]` of a subsystem that is served without it.
    Namespace {
        /// The subsystem.
        nqn: String,
        /// The namespace's declaration.
        spec: NamespaceSpec,
        /// Why it is not served.
        reason: String,
    },
}

impl DaemonState {
    /// Runs `apply` (an RPC method); when the method changes saved state and succeeds, records
    /// the change and writes the state file atomically before answering.
    pub fn change(
        &self,
        method: &str,
        params: serde_json::Value,
        apply: impl FnOnce(serde_json::Value) -> Result<serde_json::Value, crate::rpc::RpcError>,
    ) -> Result<serde_json::Value, crate::rpc::RpcError> {
        if !crate::state::SAVED_METHODS.contains(&method) {
            return apply(params);
        }
        let mut p = self.persist.lock().expect("persist lock");
        if method == "bdev_create" {
            crate::state::check_create(&params, &p.config_bdevs)
                .map_err(|(f, m)| crate::rpc::RpcError::field(f, m))?;
        }
        let result = apply(params.clone())?;
        let size_of = |n: &str| {
            self.registry
                .get(n)
                .map(|b| b.info().geometry().size_bytes())
        };
        p.objects.record(method, &params, size_of);
        if let Some(name) = params.get("name").and_then(serde_json::Value::as_str)
            && let Some(d) = self.registry.decl(name)
        {
            let bases: Vec<String> = d.bases().iter().map(|b| b.to_string()).collect();
            p.objects.set_bases(name, &bases);
        }
        let text = serde_json::to_string_pretty(&p.objects.to_state_json(&p.config_bdevs))
            .unwrap_or_default();
        if let Err(e) = crate::state::write_atomic(&p.path, text.as_bytes()) {
            tracing::error!(method, path = %p.path.display(), error = %e,
                "the change is live but the state file was not written");
            return Err(crate::rpc::RpcError::system(format!(
                "{method} took effect but the state file {} was not written: {e}",
                p.path.display()
            )));
        }
        Ok(result)
    }

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
            .map_err(|e| self.claim_error(e))?;
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
            if let Err(e) =
                self.add_namespace(&s.nqn, n.nsid, &n.bdev, n.uuid.as_deref(), n.anagrpid)
            {
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
        self.failed_exports
            .lock()
            .expect("failed lock")
            .retain(|f| !matches!(f, FailedExport::Namespace { nqn: n, .. } if n == nqn));
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
        anagrpid: Option<u32>,
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
        let b = self
            .registry
            .claim(bdev, &user)
            .map_err(|e| self.claim_error(e))?;
        if let Err(e) = s.add_namespace_in_group(nsid, b, uuid, anagrpid.unwrap_or(1)) {
            self.registry.release(bdev, &user);
            let field = if e.starts_with("anagrpid") {
                "anagrpid"
            } else {
                "nsid"
            };
            return Err(RpcError::field(field, e));
        }
        Ok(())
    }

    /// Starts an NVMe/TCP or NVMe/RDMA listener.
    pub fn add_listener(&self, spec: ListenerSpec) -> Result<(), crate::rpc::RpcError> {
        if spec.trtype == Trtype::Rdma {
            #[cfg(feature = "rdma")]
            return self.add_rdma_listener(spec);
            #[cfg(not(feature = "rdma"))]
            return Err(crate::rpc::RpcError::field(
                "trtype",
                "this ferroblk was built without NVMe/RDMA (cargo feature `rdma`, which links rdma-core)",
            ));
        }
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
        ls.push(l);
        Ok(())
    }

    #[cfg(feature = "rdma")]
    fn add_rdma_listener(&self, spec: ListenerSpec) -> Result<(), crate::rpc::RpcError> {
        let mut ls = self.rdma_listeners.lock().expect("listeners lock");
        if ls.iter().any(|l| l.spec().same_endpoint(&spec)) {
            return Err(crate::rpc::RpcError::exists(format!(
                "RDMA listener {}:{} exists",
                spec.addr, spec.port
            )));
        }
        let l = RdmaListener::start(spec.clone(), self.target.clone(), self.reactors.clone())
            .map_err(|e| {
                crate::rpc::RpcError::system(format!(
                    "RDMA listen on {}:{}: {e}",
                    spec.addr, spec.port
                ))
            })?;
        ls.push(l);
        Ok(())
    }

    /// The RPC error for a failed claim: a missing bdev names the `bdev` field, and says why
    /// when it is one that failed to open at start.
    fn claim_error(&self, e: BdevError) -> crate::rpc::RpcError {
        use crate::rpc::RpcError;
        match e {
            BdevError::NotFound(n) => match self.failed.lock().expect("failed lock").get(&n) {
                Some(f) => RpcError::field("bdev", format!("bdev '{n}' failed: {}", f.reason)),
                None => RpcError::field("bdev", format!("no bdev named '{n}'")),
            },
            e => e.into(),
        }
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

/// Runs the daemon until a signal or `daemon_shutdown`. With `strict` (or `strict = true` in the
/// configuration) a bdev that fails to open stops the start; otherwise it is left out, with what
/// depends on it, and reported.
pub fn serve(config: Option<&Path>, strict: bool) -> anyhow::Result<()> {
    let loaded = load(config)?;
    if loaded.from_state {
        tracing::info!(state = %loaded.state_path.display(),
            "serving the saved state (it replaces the configuration's bdevs, exports, \
             subsystems and listeners; delete it to start from the configuration)");
    }
    let source = PathBuf::from(loaded.source());
    let config_path = source.as_path();
    let cfg = loaded.cfg;
    let strict = strict || cfg.strict;
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
    let failed = if strict {
        registry.create_all(&cfg.bdev).map_err(|e| {
            let field = e.error.field().map(|f| format!(".{f}")).unwrap_or_default();
            let msg = message(&e.error);
            anyhow::anyhow!("{}: bdev[{}]{field}: {msg}", config_path.display(), e.index)
        })?;
        BTreeMap::new()
    } else {
        create_degraded(&registry, &cfg.bdev)
            .map_err(|e| anyhow::anyhow!("{}: bdev[{}]: {}", config_path.display(), e.0, e.1))?
    };
    let state = Arc::new(DaemonState {
        registry: registry.clone(),
        reactors: reactors.handles().to_vec(),
        started: Instant::now(),
        config_path: loaded.label.clone(),
        vhost: Mutex::new(BTreeMap::new()),
        target: Arc::new(Target::new()),
        listeners: Mutex::new(Vec::new()),
        #[cfg(feature = "rdma")]
        rdma_listeners: Mutex::new(Vec::new()),
        failed: Mutex::new(failed),
        failed_exports: Mutex::new(Vec::new()),
        shutdown: Mutex::new(Some(tx)),
        persist: Mutex::new(Persist {
            objects: Objects::of_config(&cfg),
            path: loaded.state_path.clone(),
            config_bdevs: loaded.config_bdevs,
        }),
    });
    for (i, s) in cfg.subsystem.iter().enumerate() {
        let s = &state.without_failed_namespaces(s);
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
        if let Some(reason) = state.failed_reason(&v.bdev) {
            tracing::error!(socket = %v.socket.display(), bdev = %v.bdev, %reason,
                "vhost-user-blk export left out: its bdev failed");
            let mut fx = state.failed_exports.lock().expect("failed lock");
            fx.push(FailedExport::Vhost {
                spec: v.clone(),
                reason,
            });
            continue;
        }
        state
            .add_vhost(v.clone())
            .map_err(|e| anyhow::anyhow!("{}: vhost[{i}]: {}", config_path.display(), e.message))?;
    }
    let metrics = match cfg.metrics.listen {
        Some(addr) => Some(
            MetricsServer::start(addr, state.clone())
                .with_context(|| format!("metrics.listen: binding {addr}"))?,
        ),
        None => None,
    };
    let rpc = RpcServer::start(&cfg.rpc.socket, state.clone())
        .with_context(|| format!("binding the RPC socket {}", cfg.rpc.socket.display()))?;
    print_banner(&cfg, &state, rpc.path());
    if let Some(m) = &metrics {
        println!("  metrics: http://{}/metrics (Prometheus)", m.local_addr());
    }
    // Every export and the control socket listen: tell systemd (`Type=notify`).
    crate::notify::notify("READY=1");
    let why = rx.recv().unwrap_or("control channel closed");
    tracing::info!(reason = why, "shutting down");
    crate::notify::notify("STOPPING=1");
    drop(rpc);
    drop(metrics);
    // Exports first: each drains its queues on the still-running reactors. NVMe/TCP
    // connections drain when the reactors stop them.
    std::mem::take(&mut *state.vhost.lock().expect("vhost lock"));
    std::mem::take(&mut *state.listeners.lock().expect("listeners lock"));
    #[cfg(feature = "rdma")]
    std::mem::take(&mut *state.rdma_listeners.lock().expect("listeners lock"));
    reactors.shutdown(DRAIN);
    flush_all(&registry);
    state.shutdown.lock().expect("shutdown lock").take();
    tracing::info!("stopped");
    Ok(())
}

impl DaemonState {
    /// Why bdev `name` is not served, if it failed at start.
    pub fn failed_reason(&self, name: &str) -> Option<String> {
        let failed = self.failed.lock().expect("failed lock");
        failed
            .get(name)
            .map(|f| format!("bdev '{name}' failed: {}", f.reason))
    }

    /// `spec` without the namespaces whose bdev failed at start, each recorded and logged.
    fn without_failed_namespaces(&self, spec: &SubsystemSpec) -> SubsystemSpec {
        let mut kept = spec.clone();
        kept.namespace.retain(|n| {
            let Some(reason) = self.failed_reason(&n.bdev) else {
                return true;
            };
            tracing::error!(nqn = %spec.nqn, nsid = n.nsid, bdev = %n.bdev, %reason,
                "NVMe-oF namespace left out: its bdev failed");
            self.failed_exports
                .lock()
                .expect("failed lock")
                .push(FailedExport::Namespace {
                    nqn: spec.nqn.clone(),
                    spec: n.clone(),
                    reason,
                });
            false
        });
        kept
    }
}

/// Creates every declared bdev, bases first, leaving out each one that fails to open and every
/// bdev stacked on it; returns those left out with their reasons. Declarations that do not
/// validate as a whole (names, bases, cycles) are an error: (index, message).
fn create_degraded(
    registry: &BdevRegistry,
    decls: &[Decl],
) -> Result<BTreeMap<String, FailedBdev>, (usize, String)> {
    let order = creation_order(decls, &|n| registry.get(n).is_some())
        .map_err(|e| (e.index, reason(&e.error)))?;
    let mut failed: BTreeMap<String, FailedBdev> = BTreeMap::new();
    for i in order {
        let d = &decls[i];
        let reason = match d.bases().into_iter().find(|b| failed.contains_key(*b)) {
            Some(b) => {
                let reason = format!("its base '{b}' failed");
                tracing::error!(
                    bdev = d.name(),
                    kind = d.kind(),
                    base = b,
                    "bdev left out: its base failed"
                );
                Some(reason)
            }
            _ => match registry.create(d.0.clone()) {
                Ok(_) => None,
                Err(e) => {
                    let reason = reason(&e);
                    tracing::error!(bdev = d.name(), kind = d.kind(), %reason,
                        "bdev failed to open; left out (serve --strict refuses to start instead)");
                    Some(reason)
                }
            },
        };
        if let Some(reason) = reason {
            failed.insert(
                d.name().to_string(),
                FailedBdev {
                    kind: d.kind().to_string(),
                    spec: d.to_json(),
                    reason,
                },
            );
        }
    }
    Ok(failed)
}

/// The error with its causes: `message: cause: ...`.
fn message(e: &BdevError) -> String {
    // An invalid field's message without its field: the caller names the field in the path
    // (`bdev[0].size: ...`, not `bdev[0].size: size: ...`).
    let head = match e {
        BdevError::Invalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    let chain = error_chain(e);
    if chain.is_empty() {
        head
    } else {
        format!("{head}: {chain}")
    }
}

/// Why a bdev failed, naming the field when the error names one: `path: cannot open ...`.
fn reason(e: &BdevError) -> String {
    match e.field() {
        Some(f) => format!("{f}: {}", message(e)),
        None => message(e),
    }
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

fn print_banner(cfg: &Config, state: &DaemonState, socket: &Path) {
    let failed = state.failed.lock().expect("failed lock").clone();
    if failed.is_empty() {
        println!("ferroblk {} serving", env!("CARGO_PKG_VERSION"));
    } else {
        println!(
            "ferroblk {} serving DEGRADED: {} bdev(s) failed and are left out",
            env!("CARGO_PKG_VERSION"),
            failed.len()
        );
    }
    for (name, f) in &failed {
        println!("  bdev {name:<16} {:<7} FAILED: {}", f.kind, f.reason);
    }
    for (b, _, _) in state.registry.list() {
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
        if let Some(reason) = state.failed_reason(&v.bdev) {
            println!(
                "  vhost-user-blk {} -> bdev {}: NOT SERVED ({reason})",
                v.socket.display(),
                v.bdev
            );
            continue;
        }
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
        let (name, t) = match l.trtype {
            Trtype::Tcp => ("NVMe/TCP", "tcp"),
            Trtype::Rdma => ("NVMe/RDMA", "rdma"),
        };
        println!(
            "  {name} listener {}:{} (discovery and I/O). From a Linux host:",
            l.addr, l.port
        );
        println!("    nvme discover -t {t} -a {} -s {}", l.addr, l.port);
        for s in &cfg.subsystem {
            println!(
                "    nvme connect -t {t} -a {} -s {} -n {}",
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
