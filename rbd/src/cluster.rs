//! Connections to a Ceph cluster, shared by every image that declares the same cluster settings.
//!
//! A [`Cluster`] holds `connections` librados handles (`rados_t`), each with its own monitor
//! session, OSD sessions and messenger threads; images are spread over them round-robin (one
//! handle's threads limit how far the images on it scale). The process keeps one [`Cluster`] per
//! distinct [`ClusterConfig`] alive while an image uses it, and shuts its handles down when the
//! last image closes. Connecting runs on the control plane, bounded by `connect_timeout`.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ferroblk_bdev::BdevError;

use crate::ffi;

/// How a client authenticates.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    /// cephx with the key of `keyring` (or the configuration file's keyring).
    #[default]
    Cephx,
    /// No authentication (`auth_client_required = none`): only for clusters that run without it.
    None,
}

/// Everything that identifies a set of connections: images whose declarations agree on all of it
/// share them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterConfig {
    /// A ceph.conf to read first.
    pub conf: Option<PathBuf>,
    /// Monitor addresses (overrides the configuration file's).
    pub mon_host: Option<String>,
    /// The client id (`admin` for `client.admin`).
    pub client: String,
    /// The keyring file.
    pub keyring: Option<PathBuf>,
    /// How the client authenticates.
    pub auth: Auth,
    /// librados handles to open.
    pub connections: usize,
    /// Bound on connecting and on each monitor operation.
    pub connect_timeout: Duration,
    /// Bound on each OSD operation: a request to a cluster that went away fails after it.
    pub op_timeout: Duration,
}

impl ClusterConfig {
    /// The field an error of connecting is reported against: the monitors' address, else the
    /// configuration file.
    fn address_field(&self) -> &'static str {
        if self.mon_host.is_some() {
            "mon_host"
        } else {
            "conf"
        }
    }
}

/// One librados handle.
pub(crate) struct Rados(ffi::rados_t);

// SAFETY: a connected `rados_t` is thread-safe (librados locks internally); the handle is only
// shut down in `Drop`, when no image uses it any more.
unsafe impl Send for Rados {}
// SAFETY: as above.
unsafe impl Sync for Rados {}

impl Rados {
    pub(crate) fn raw(&self) -> ffi::rados_t {
        self.0
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rados_create2`; every I/O context on it was destroyed
        // first (images hold an `Arc<Cluster>`, so the cluster outlives them).
        unsafe { ffi::rados_shutdown(self.0) };
    }
}

/// The connections to one cluster.
pub struct Cluster {
    config: ClusterConfig,
    handles: Vec<Rados>,
    next: AtomicUsize,
}

/// Runs `f`, a call that may wait on the cluster (closing an image, unregistering a watch), on
/// its own thread and waits for it at most `bound`: a cluster that went away must not hang the
/// control plane (deleting a volume, the daemon's exit). A call still running after `bound` is
/// left to finish on its own; it keeps everything it owns (the cluster's connections among
/// them) allocated until then.
pub(crate) fn bounded(what: &'static str, bound: Duration, f: impl FnOnce() + Send + 'static) {
    let (done, wait) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("rbd-close".into())
        .spawn(move || {
            f();
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            if wait.recv_timeout(bound).is_err() {
                tracing::warn!(
                    what,
                    seconds = bound.as_secs(),
                    "the cluster did not answer; left to finish in the background"
                );
            }
        }
        Err(e) => tracing::warn!(what, error = %e, "cannot start a thread; left open"),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // `rados_shutdown` talks to the monitors: bounded like closing an image.
        let handles = std::mem::take(&mut self.handles);
        bounded(
            "shut down rados connections",
            self.config.connect_timeout,
            move || drop(handles),
        );
    }
}

/// Clusters connected now, by configuration (control plane only).
fn registry() -> &'static Mutex<HashMap<ClusterConfig, Weak<Cluster>>> {
    static CLUSTERS: std::sync::OnceLock<Mutex<HashMap<ClusterConfig, Weak<Cluster>>>> =
        std::sync::OnceLock::new();
    CLUSTERS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn cstring(field: &str, s: &str) -> Result<CString, BdevError> {
    CString::new(s).map_err(|_| BdevError::invalid(field, "contains a NUL byte"))
}

fn path_cstring(field: &str, p: &std::path::Path) -> Result<CString, BdevError> {
    cstring(
        field,
        p.to_str()
            .ok_or_else(|| BdevError::invalid(field, "is not valid UTF-8"))?,
    )
}

impl Cluster {
    /// The connections for `config`: those open already, or new ones (blocking up to its
    /// `connect_timeout` per handle). Errors name the field at fault.
    pub fn get(config: &ClusterConfig) -> Result<Arc<Cluster>, BdevError> {
        let mut reg = registry().lock().expect("cluster registry lock");
        reg.retain(|_, w| w.strong_count() > 0);
        if let Some(c) = reg.get(config).and_then(Weak::upgrade) {
            return Ok(c);
        }
        let mut handles = Vec::with_capacity(config.connections);
        for _ in 0..config.connections {
            handles.push(connect(config)?);
        }
        let c = Arc::new(Cluster {
            config: config.clone(),
            handles,
            next: AtomicUsize::new(0),
        });
        reg.insert(config.clone(), Arc::downgrade(&c));
        Ok(c)
    }

    /// The handle the next image uses (round-robin).
    pub(crate) fn pick(&self) -> &Rados {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// The settings it was connected with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Handles open.
    pub fn connections(&self) -> usize {
        self.handles.len()
    }
}

/// Sets one librados option, naming `field` on failure.
fn set(h: &Rados, field: &str, option: &str, value: &str) -> Result<(), BdevError> {
    let o = cstring(field, option)?;
    let v = cstring(field, value)?;
    // SAFETY: `h` is a handle not yet connected; both strings are NUL-terminated and live
    // through the call (librados copies them).
    let r = unsafe { ffi::rados_conf_set(h.raw(), o.as_ptr(), v.as_ptr()) };
    if r < 0 {
        return Err(BdevError::invalid(
            field,
            format!(
                "librados refuses {option} = '{value}': {}",
                ffi::errno(r.into())
            ),
        ));
    }
    Ok(())
}

/// Opens and connects one handle.
fn connect(config: &ClusterConfig) -> Result<Rados, BdevError> {
    let name = cstring("client", &format!("client.{}", config.client))?;
    let cluster_name = c"ceph";
    let mut raw: ffi::rados_t = std::ptr::null_mut();
    // SAFETY: `raw` is a valid out-pointer; the names are NUL-terminated.
    let r = unsafe { ffi::rados_create2(&mut raw, cluster_name.as_ptr(), name.as_ptr(), 0) };
    if r < 0 {
        return Err(BdevError::invalid(
            "client",
            format!("cannot create a librados handle: {}", ffi::errno(r.into())),
        ));
    }
    let h = Rados(raw);
    if let Some(conf) = &config.conf {
        let p = path_cstring("conf", conf)?;
        // SAFETY: `h` is not connected; the path is NUL-terminated.
        let r = unsafe { ffi::rados_conf_read_file(h.raw(), p.as_ptr()) };
        if r < 0 {
            return Err(BdevError::invalid(
                "conf",
                format!("cannot read {}: {}", conf.display(), ffi::errno(r.into())),
            ));
        }
    }
    if let Some(mon) = &config.mon_host {
        set(&h, "mon_host", "mon_host", mon)?;
    }
    if let Some(k) = &config.keyring {
        let s = k
            .to_str()
            .ok_or_else(|| BdevError::invalid("keyring", "is not valid UTF-8"))?;
        set(&h, "keyring", "keyring", s)?;
    }
    let auth = match config.auth {
        Auth::Cephx => "cephx",
        Auth::None => "none",
    };
    set(&h, "auth", "auth_client_required", auth)?;
    let connect_s = config.connect_timeout.as_secs().max(1).to_string();
    set(&h, "connect_timeout", "client_mount_timeout", &connect_s)?;
    set(&h, "connect_timeout", "rados_mon_op_timeout", &connect_s)?;
    let op_s = config.op_timeout.as_secs().max(1).to_string();
    set(&h, "op_timeout", "rados_osd_op_timeout", &op_s)?;
    // Flush must mean durable in the cluster: no client-side write-back cache.
    set(&h, "conf", "rbd_cache", "false")?;
    // The daemon's log is its own: librados writes neither to stderr nor to an admin socket.
    set(&h, "conf", "log_to_stderr", "false")?;
    set(&h, "conf", "err_to_stderr", "false")?;
    set(&h, "conf", "admin_socket", "")?;
    // SAFETY: `h` is a configured, unconnected handle.
    let r = unsafe { ffi::rados_connect(h.raw()) };
    if r < 0 {
        let e = ffi::errno(r.into());
        let refused = r == -libc::EACCES || r == -libc::EPERM;
        let field = if config.keyring.is_some() && (refused || r == -libc::ENOENT) {
            "keyring"
        } else if refused {
            "auth"
        } else {
            config.address_field()
        };
        let timeout = if r == -libc::ETIMEDOUT {
            format!(" within {} s", config.connect_timeout.as_secs().max(1))
        } else {
            String::new()
        };
        let why = match (field, &config.keyring) {
            ("keyring", Some(k)) => format!(
                "the cluster refused client.{} with the key in {}: {e}",
                config.client,
                k.display()
            ),
            _ => format!(
                "cannot connect to the cluster as client.{}{timeout}: {e}",
                config.client
            ),
        };
        return Err(BdevError::invalid(field, why));
    }
    Ok(h)
}
