//! `ferroblk serve`: starts the reactors, creates the configured bdevs, serves the control
//! socket, and on SIGINT/SIGTERM (or `daemon_shutdown`) drains I/O, flushes every bdev and exits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferroblk_bdev::reactor::{ReactorHandle, Reactors};
use ferroblk_bdev::sync::SyncChannel;
use ferroblk_bdev::{BdevRegistry, Caps, IoStatus};

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
    shutdown: Mutex<Option<mpsc::Sender<&'static str>>>,
}

impl DaemonState {
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
        shutdown: Mutex::new(Some(tx)),
    });
    let rpc = RpcServer::start(&cfg.rpc.socket, state.clone())
        .with_context(|| format!("binding the RPC socket {}", cfg.rpc.socket.display()))?;
    print_banner(&cfg, &registry, rpc.path());
    let why = rx.recv().unwrap_or("control channel closed");
    tracing::info!(reason = why, "shutting down");
    drop(rpc);
    reactors.shutdown(DRAIN);
    flush_all(&registry);
    state.shutdown.lock().expect("shutdown lock").take();
    tracing::info!("stopped");
    Ok(())
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
    let _ = cfg;
    println!(
        "  exports: none yet. vhost-user-blk ([[vhost]]) and NVMe/TCP ([[subsystem]]) exports"
    );
    println!("           are not built in this version; volumes are reachable over the RPC only.");
    println!(
        "  control: ferroblk rpc --socket {} bdev_list",
        socket.display()
    );
    println!("  stop:    Ctrl-C (drains I/O and flushes every bdev)");
}
