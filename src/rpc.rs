//! The JSON-RPC 2.0 control plane: one request or response per line over a Unix socket of mode
//! 0600. Methods are grouped by object (`bdev_create`, `bdev_list`, `reactor_list`, ...); every
//! error carries a code and, for invalid parameters, the offending field in `data.field`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ferroblk_bdev::{BdevError, ByteSize};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::daemon::{DaemonState, FailedExport};

/// Longest request line accepted; a longer one closes the connection.
const MAX_LINE: u64 = 1 << 20;

/// JSON-RPC 2.0 error codes (the standard ones, then ferroblk's).
pub mod code {
    /// The line is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC 2.0 request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Parameters missing, unknown or invalid (`data.field` names the field).
    pub const INVALID_PARAMS: i64 = -32602;
    /// No object with that name.
    pub const NOT_FOUND: i64 = -32001;
    /// An object with that name exists.
    pub const EXISTS: i64 = -32002;
    /// The object is in use.
    pub const IN_USE: i64 = -32003;
    /// The operation is not supported by this object.
    pub const UNSUPPORTED: i64 = -32004;
    /// The operating system refused (files, devices).
    pub const SYSTEM: i64 = -32005;
}

/// A method's failure.
#[derive(Debug)]
pub struct RpcError {
    /// JSON-RPC error code.
    pub code: i64,
    /// Human-readable message.
    pub message: String,
    /// The offending parameter, if one.
    pub field: Option<String>,
}

impl RpcError {
    /// Invalid parameter `field`.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> RpcError {
        RpcError::params(field, message)
    }

    /// Something with that name exists.
    pub fn exists(message: impl Into<String>) -> RpcError {
        RpcError {
            code: code::EXISTS,
            message: message.into(),
            field: None,
        }
    }

    /// Nothing with that name.
    pub fn not_found(message: impl Into<String>) -> RpcError {
        RpcError {
            code: code::NOT_FOUND,
            message: message.into(),
            field: None,
        }
    }

    /// The operating system refused.
    pub fn system(message: impl Into<String>) -> RpcError {
        RpcError {
            code: code::SYSTEM,
            message: message.into(),
            field: None,
        }
    }

    fn params(field: impl Into<String>, message: impl Into<String>) -> RpcError {
        RpcError {
            code: code::INVALID_PARAMS,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let Some(f) = &self.field {
            e["data"] = json!({ "field": f });
        }
        e
    }
}

impl From<BdevError> for RpcError {
    fn from(e: BdevError) -> RpcError {
        let code = match &e {
            BdevError::Invalid { .. } => code::INVALID_PARAMS,
            BdevError::NotFound(_) => code::NOT_FOUND,
            BdevError::Exists(_) => code::EXISTS,
            BdevError::InUse { .. } => code::IN_USE,
            BdevError::Unsupported { .. } => code::UNSUPPORTED,
            BdevError::Io { .. } | BdevError::Uring(_) => code::SYSTEM,
        };
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message = format!("{message}: {s}");
            src = s.source();
        }
        RpcError {
            code,
            message,
            field: e.field().map(str::to_string),
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(params: Value) -> Result<T, RpcError> {
    let params = if params.is_null() { json!({}) } else { params };
    serde_path_to_error::deserialize(params).map_err(|e| {
        // The field's path (`name`, `rule.ops[0]`, `block_size` of a declaration); `params`
        // only when the parameters as a whole are wrong (not an object).
        let (path, message) =
            crate::decl::field_path("", &e.path().to_string(), &e.inner().to_string());
        RpcError::params(
            if path.is_empty() {
                "params".into()
            } else {
                path
            },
            message,
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParam {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeParams {
    name: String,
    size: ByteSize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlParams {
    name: String,
    /// No rule clears the injection.
    #[serde(default)]
    rule: Option<ferroblk_bdev::inject::ErrorRule>,
}

/// A method's handler: the daemon's state and the request's `params`.
type Handler = fn(&DaemonState, Value) -> Result<Value, RpcError>;

/// One method of the control plane. [`METHODS`] is the single table the server dispatches on
/// and that `rpc_methods` and `ferroblk rpc --help` list, so they cannot drift apart.
pub struct Method {
    /// The method's name.
    pub name: &'static str,
    /// Its parameters as `key=value` words name them (`?` marks an optional one).
    pub params: &'static str,
    /// What it does.
    pub about: &'static str,
    handler: Handler,
}

/// Every method, in the order `rpc_methods` and `--help` list them.
pub static METHODS: &[Method] = &[
    Method {
        name: "bdev_list",
        params: "name?",
        about: "The bdevs (or the one named), online and failed, with geometry, spec, users and statistics; `spec.size` is the current size.",
        handler: bdev_list,
    },
    Method {
        name: "bdev_create",
        params: "kind name ... (the fields of a [[bdev]] table)",
        about: "Creates a bdev from a declaration like a [[bdev]] table of the configuration.",
        handler: bdev_create,
    },
    Method {
        name: "bdev_delete",
        params: "name",
        about: "Deletes a bdev no export or bdev uses (or forgets one that failed at start).",
        handler: bdev_delete,
    },
    Method {
        name: "bdev_resize",
        params: "name size",
        about: "Grows a bdev (file, malloc, null) to `size` bytes (K/M/G/T/KiB... suffixes accepted).",
        handler: bdev_resize,
    },
    Method {
        name: "bdev_error_inject",
        params: "name rule?={ops status? count? every?}",
        about: "Sets (or, without `rule`, clears) the failure rule of an `error` bdev.",
        handler: bdev_error_inject,
    },
    Method {
        name: "bdev_delay_set",
        params: "name read_us? write_us? other_us?",
        about: "Changes the completion delays of a `delay` bdev.",
        handler: bdev_delay_set,
    },
    Method {
        name: "mirror_add_child",
        params: "name child",
        about: "Adds bdev `child` to mirror `name` (rebuilt whole, online), or takes back a degraded child of that name (its dirty regions resynced); progress in `bdev_list`.",
        handler: mirror_add_child,
    },
    Method {
        name: "mirror_remove_child",
        params: "name child",
        about: "Removes child `child` from mirror `name` (not its last healthy child).",
        handler: mirror_remove_child,
    },
    Method {
        name: "vhost_add",
        params: "socket bdev num_queues? read_only? serial?",
        about: "Exports a bdev as a vhost-user-blk device on a Unix socket.",
        handler: vhost_add,
    },
    Method {
        name: "vhost_remove",
        params: "socket",
        about: "Removes a vhost-user-blk export.",
        handler: vhost_remove,
    },
    Method {
        name: "vhost_list",
        params: "",
        about: "The vhost-user-blk exports, online and failed.",
        handler: vhost_list,
    },
    Method {
        name: "nvmf_subsystem_list",
        params: "",
        about: "The NVMe-oF subsystems with their namespaces, hosts and controllers.",
        handler: nvmf_subsystem_list,
    },
    Method {
        name: "nvmf_subsystem_add",
        params: "nqn serial? model? allow_any_host? hosts? namespace?=[{nsid bdev uuid?}]",
        about: "Adds an NVMe-oF subsystem like a [[subsystem]] table.",
        handler: nvmf_subsystem_add,
    },
    Method {
        name: "nvmf_subsystem_remove",
        params: "nqn",
        about: "Removes an NVMe-oF subsystem.",
        handler: nvmf_subsystem_remove,
    },
    Method {
        name: "nvmf_ns_add",
        params: "nqn nsid bdev uuid?",
        about: "Adds a namespace backed by a bdev to a subsystem.",
        handler: nvmf_ns_add,
    },
    Method {
        name: "nvmf_ns_remove",
        params: "nqn nsid",
        about: "Removes a namespace from a subsystem.",
        handler: nvmf_ns_remove,
    },
    Method {
        name: "nvmf_host_add",
        params: "nqn host",
        about: "Allows a host NQN to connect to a subsystem.",
        handler: nvmf_host_add,
    },
    Method {
        name: "nvmf_host_remove",
        params: "nqn host",
        about: "Disallows a host NQN.",
        handler: nvmf_host_remove,
    },
    Method {
        name: "nvmf_listener_add",
        params: "addr port ic_timeout_ms? connect_timeout_ms? max_unidentified_per_peer?",
        about: "Starts an NVMe/TCP or NVMe/RDMA listener like a [[listener]] table.",
        handler: nvmf_listener_add,
    },
    Method {
        name: "nvmf_listener_set_ana_state",
        params: "addr port trtype? ana_state anagrpid?",
        about: "Sets the ANA state (optimized, non_optimized, inaccessible, persistent_loss, change) of one ANA group, or of all, on a listener; connected hosts get an ANA Change event.",
        handler: nvmf_listener_set_ana_state,
    },
    Method {
        name: "reactor_list",
        params: "",
        about: "The reactor threads with their CPUs and poller statistics.",
        handler: reactor_list,
    },
    Method {
        name: "rpc_methods",
        params: "",
        about: "Every method with its parameters (this list).",
        handler: rpc_methods,
    },
    Method {
        name: "daemon_status",
        params: "",
        about: "Version, pid, uptime, configuration, reactor and bdev counts, degraded state.",
        handler: daemon_status,
    },
    Method {
        name: "daemon_shutdown",
        params: "",
        about: "Drains I/O, flushes every bdev and stops the daemon.",
        handler: daemon_shutdown,
    },
];

/// Runs one method.
pub fn dispatch(state: &DaemonState, method: &str, params: Value) -> Result<Value, RpcError> {
    match METHODS.iter().find(|m| m.name == method) {
        Some(m) => (m.handler)(state, params),
        None => Err(RpcError {
            code: code::METHOD_NOT_FOUND,
            message: format!("no method '{method}' (rpc_methods lists them)"),
            field: None,
        }),
    }
}

/// `rpc_methods`: the table itself.
fn rpc_methods(_state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {}
    let _: P = parse(params)?;
    Ok(Value::Array(
        METHODS
            .iter()
            .map(|m| json!({ "name": m.name, "params": m.params, "description": m.about }))
            .collect(),
    ))
}

/// The methods as `ferroblk rpc --help` prints them.
pub fn methods_help() -> String {
    let width = METHODS.iter().map(|m| m.name.len()).max().unwrap_or(0);
    let mut s = String::from("Methods (also `rpc_methods`):\n");
    for m in METHODS {
        let params = if m.params.is_empty() {
            "(no parameters)"
        } else {
            m.params
        };
        s.push_str(&format!("  {:width$}  {params}\n", m.name));
        s.push_str(&format!("  {:width$}      {}\n", "", m.about));
    }
    s
}

fn bdev_list(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    let p: ListParams = parse(params)?;
    let failed = state.failed.lock().expect("failed lock").clone();
    if let Some(n) = &p.name
        && reg.get(n).is_none()
        && !failed.contains_key(n)
    {
        return Err(BdevError::NotFound(n.clone()).into());
    }
    let mut list: Vec<Value> = reg
        .list()
        .into_iter()
        .filter(|(b, _, _)| p.name.as_deref().is_none_or(|n| b.info().name() == n))
        .map(|(b, spec, users)| {
            let i = b.info();
            let g = i.geometry();
            json!({
                "name": i.name(),
                "kind": i.kind(),
                "state": "online",
                "block_size": g.block_size.bytes(),
                "block_count": g.block_count,
                "size": g.size_bytes(),
                "caps": g.caps.names(),
                "read_only": i.is_read_only(),
                "open_channels": i.open_channels(),
                "users": users,
                "spec": current_spec(spec.to_json(), g.size_bytes()),
                "details": b.describe(),
                "stats": i.stats().to_json(),
            })
        })
        .collect();
    // Declared bdevs that did not open at start (degraded start), with the reason.
    list.extend(
        failed
            .iter()
            .filter(|(n, _)| p.name.as_deref().is_none_or(|w| w == n.as_str()))
            .map(|(n, f)| {
                json!({
                    "name": n,
                    "kind": f.kind,
                    "state": "failed",
                    "reason": f.reason,
                    "spec": f.spec,
                })
            }),
    );
    Ok(Value::Array(list))
}

fn bdev_create(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    let decl: crate::decl::Decl = parse(params)?;
    let b = reg.create(decl.0)?;
    // Declared again and opened: no longer a failed one.
    state
        .failed
        .lock()
        .expect("failed lock")
        .remove(b.info().name());
    Ok(json!({ "name": b.info().name(), "size": b.info().geometry().size_bytes() }))
}

fn bdev_delete(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    let p: NameParam = parse(params)?;
    if reg.get(&p.name).is_none() {
        // Forgetting a bdev that failed at start; refused while another failed
        // declaration stacks on it, like a healthy base.
        let mut failed = state.failed.lock().expect("failed lock");
        if failed.contains_key(&p.name) {
            let users: Vec<String> = failed
                .iter()
                .filter(|(_, f)| {
                    f.spec["base"] == p.name.as_str()
                        || f.spec["children"]
                            .as_array()
                            .is_some_and(|c| c.iter().any(|c| c == p.name.as_str()))
                })
                .map(|(n, _)| format!("bdev {n}"))
                .collect();
            if !users.is_empty() {
                return Err(BdevError::InUse {
                    name: p.name,
                    users: users.join(", "),
                }
                .into());
            }
            failed.remove(&p.name);
            return Ok(json!(true));
        }
    }
    reg.delete(&p.name)?;
    Ok(json!(true))
}

fn bdev_resize(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    let p: ResizeParams = parse(params)?;
    reg.resize(&p.name, p.size.0)?;
    let b = reg
        .get(&p.name)
        .ok_or_else(|| BdevError::NotFound(p.name.clone()))?;
    Ok(json!({ "name": p.name, "size": b.info().geometry().size_bytes() }))
}

fn bdev_error_inject(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    let p: ControlParams = parse(params)?;
    if let Some(rule) = &p.rule {
        // Checked here too, so a wrong operation or status is named as the caller wrote it.
        rule.validate("rule")?;
    }
    let b = reg
        .get(&p.name)
        .ok_or_else(|| BdevError::NotFound(p.name.clone()))?;
    let rule = serde_json::to_value(&p.rule).unwrap_or(Value::Null);
    Ok(b.control("error_inject", rule)?)
}

fn bdev_delay_set(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        name: String,
        #[serde(default)]
        read_us: Option<u64>,
        #[serde(default)]
        write_us: Option<u64>,
        #[serde(default)]
        other_us: Option<u64>,
    }
    let p: P = parse(params)?;
    let b = reg
        .get(&p.name)
        .ok_or_else(|| BdevError::NotFound(p.name.clone()))?;
    let mut d = serde_json::Map::new();
    for (k, v) in [
        ("read_us", p.read_us),
        ("write_us", p.write_us),
        ("other_us", p.other_us),
    ] {
        if let Some(v) = v {
            d.insert(k.into(), json!(v));
        }
    }
    Ok(b.control("delay_set", Value::Object(d))?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChildParams {
    name: String,
    child: String,
}

fn mirror_add_child(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let p: ChildParams = parse(params)?;
    Ok(state.registry.add_base(&p.name, &p.child)?)
}

fn mirror_remove_child(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let p: ChildParams = parse(params)?;
    Ok(state.registry.remove_base(&p.name, &p.child)?)
}

fn vhost_add(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let spec: ferroblk_vhost::VhostSpec = parse(params)?;
    let socket = spec.socket.clone();
    state.add_vhost(spec)?;
    Ok(json!({ "socket": socket }))
}

fn vhost_remove(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        socket: PathBuf,
    }
    let p: P = parse(params)?;
    state.remove_vhost(&p.socket)?;
    Ok(json!(true))
}

fn vhost_list(state: &DaemonState, _params: Value) -> Result<Value, RpcError> {
    Ok(Value::Array(
        state
            .vhost
            .lock()
            .expect("vhost lock")
            .values()
            .map(|x| {
                let mut v = serde_json::to_value(x.spec()).unwrap_or(Value::Null);
                v["state"] = json!("online");
                v["connected"] = json!(x.connected());
                v
            })
            .chain(
                state
                    .failed_exports
                    .lock()
                    .expect("failed lock")
                    .iter()
                    .filter_map(|f| match f {
                        FailedExport::Vhost { spec, reason } => {
                            let mut v = serde_json::to_value(spec).unwrap_or(Value::Null);
                            v["state"] = json!("failed");
                            v["reason"] = json!(reason);
                            v["connected"] = json!(false);
                            Some(v)
                        }
                        FailedExport::Namespace { .. } => None,
                    }),
            )
            .collect(),
    ))
}

fn nvmf_subsystem_list(state: &DaemonState, _params: Value) -> Result<Value, RpcError> {
    Ok(Value::Array(
        state
            .target
            .subsystems()
            .iter()
            .map(|s| {
                let (any, hosts) = s.hosts();
                json!({
                    "nqn": s.nqn,
                    "serial": s.serial,
                    "model": s.model,
                    "allow_any_host": any,
                    "hosts": hosts,
                    "namespaces": s.namespaces().iter().map(|n| json!({
                        "nsid": n.nsid,
                        "bdev": n.bdev.info().name(),
                        "size": n.bdev.info().geometry().size_bytes(),
                    })).collect::<Vec<_>>(),
                    "controllers": s.controllers().iter().map(|c| json!({
                        "cntlid": c.cntlid, "host": c.hostnqn,
                    })).collect::<Vec<_>>(),
                    "failed_namespaces": failed_namespaces(state, &s.nqn),
                })
            })
            .collect(),
    ))
}

fn nvmf_subsystem_add(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let spec: ferroblk_target::subsystem::SubsystemSpec = parse(params)?;
    state.add_subsystem(&spec)?;
    Ok(json!({ "nqn": spec.nqn }))
}

fn nvmf_subsystem_remove(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        nqn: String,
    }
    let p: P = parse(params)?;
    state.remove_subsystem(&p.nqn)?;
    Ok(json!(true))
}

fn nvmf_ns_add(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        nqn: String,
        nsid: u32,
        bdev: String,
        #[serde(default)]
        uuid: Option<String>,
        #[serde(default)]
        anagrpid: Option<u32>,
    }
    let p: P = parse(params)?;
    state.add_namespace(&p.nqn, p.nsid, &p.bdev, p.uuid.as_deref(), p.anagrpid)?;
    Ok(json!(true))
}

fn nvmf_ns_remove(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        nqn: String,
        nsid: u32,
    }
    let p: P = parse(params)?;
    let s = state
        .target
        .subsystem(&p.nqn)
        .ok_or_else(|| RpcError::not_found(format!("no subsystem {}", p.nqn)))?;
    let b = s
        .remove_namespace(p.nsid)
        .ok_or_else(|| RpcError::not_found(format!("no namespace {}", p.nsid)))?;
    reg.release(b.info().name(), &format!("nvmf {} ns {}", p.nqn, p.nsid));
    Ok(json!(true))
}

/// `nvmf_host_add` (`add`) and `nvmf_host_remove`.
fn nvmf_host(state: &DaemonState, params: Value, add: bool) -> Result<Value, RpcError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        nqn: String,
        host: String,
    }
    let p: P = parse(params)?;
    let s = state
        .target
        .subsystem(&p.nqn)
        .filter(|s| !s.discovery)
        .ok_or_else(|| RpcError::not_found(format!("no subsystem {}", p.nqn)))?;
    if add {
        if !p.host.starts_with("nqn.") {
            return Err(RpcError::field("host", "not an NQN"));
        }
        s.add_host(&p.host);
    } else if !s.remove_host(&p.host) {
        return Err(RpcError::not_found(format!(
            "host {} is not allowed",
            p.host
        )));
    }
    state.target.discovery_changed();
    Ok(json!(true))
}

fn nvmf_host_add(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    nvmf_host(state, params, true)
}

fn nvmf_host_remove(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    nvmf_host(state, params, false)
}

fn nvmf_listener_add(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    let spec: ferroblk_target::subsystem::ListenerSpec = parse(params)?;
    state.add_listener(spec)?;
    Ok(json!(true))
}

fn nvmf_listener_set_ana_state(state: &DaemonState, params: Value) -> Result<Value, RpcError> {
    use ferroblk_target::subsystem::{AnaState, ListenerSpec, Trtype};
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        addr: String,
        port: u16,
        #[serde(default)]
        trtype: Trtype,
        ana_state: AnaState,
        #[serde(default)]
        anagrpid: Option<u32>,
    }
    let p: P = parse(params)?;
    let endpoint = ListenerSpec {
        trtype: p.trtype,
        ..ListenerSpec::new(p.addr.clone(), p.port)
    };
    let port = state
        .target
        .port(&endpoint)
        .ok_or_else(|| RpcError::not_found(format!("no listener {}:{}", p.addr, p.port)))?;
    let spec = state
        .target
        .set_ana_state(&port, p.anagrpid, p.ana_state)
        .map_err(|(f, m)| RpcError::field(f, m))?;
    Ok(json!({ "portid": port.portid, "listener": spec }))
}

fn reactor_list(state: &DaemonState, _params: Value) -> Result<Value, RpcError> {
    Ok(Value::Array(
        state
            .reactors
            .iter()
            .map(|h| {
                let s = h.stats();
                json!({
                    "id": h.id(),
                    "cpu": h.cpu(),
                    "pollers": s.pollers.load(Ordering::Relaxed),
                    "busy_turns": s.busy_turns.load(Ordering::Relaxed),
                    "sleeps": s.sleeps.load(Ordering::Relaxed),
                })
            })
            .collect(),
    ))
}

fn daemon_status(state: &DaemonState, _params: Value) -> Result<Value, RpcError> {
    let reg = &state.registry;
    let failed = state.failed.lock().expect("failed lock").len();
    Ok(json!({
    "version": env!("CARGO_PKG_VERSION"),
    "pid": std::process::id(),
    "uptime_s": state.started.elapsed().as_secs_f64(),
    "config": state.config_path,
    "reactors": state.reactors.len(),
    "bdevs": reg.list().len(),
    "failed_bdevs": failed,
    "degraded": failed > 0,
    }))
}

fn daemon_shutdown(state: &DaemonState, _params: Value) -> Result<Value, RpcError> {
    state.request_shutdown();
    Ok(json!(true))
}

/// A bdev's declaration as `bdev_list` shows it: a declared `size` is the bdev's size now, which
/// differs from the declaration's after a `bdev_resize`.
fn current_spec(mut spec: Value, size: u64) -> Value {
    if let Some(s) = spec.get_mut("size") {
        *s = json!(size);
    }
    spec
}

/// The namespaces of subsystem `nqn` left out at start because their bdev failed.
fn failed_namespaces(state: &DaemonState, nqn: &str) -> Vec<Value> {
    state
        .failed_exports
        .lock()
        .expect("failed lock")
        .iter()
        .filter_map(|f| match f {
            FailedExport::Namespace {
                nqn: n,
                spec,
                reason,
            } if n == nqn => Some(json!({
                "nsid": spec.nsid,
                "bdev": spec.bdev,
                "state": "failed",
                "reason": reason,
            })),
            _ => None,
        })
        .collect()
}

/// Answers one request line.
pub fn handle_line(state: &DaemonState, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return json!({ "jsonrpc": "2.0", "id": null,
                "error": { "code": code::PARSE_ERROR, "message": format!("not JSON: {e}") } });
        }
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = req.get("method").and_then(Value::as_str);
    if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") || method.is_none() {
        return json!({ "jsonrpc": "2.0", "id": id, "error": {
            "code": code::INVALID_REQUEST,
            "message": "expected {\"jsonrpc\": \"2.0\", \"method\": ..., \"params\": ..., \"id\": ...}" } });
    }
    let method = method.unwrap_or_default();
    let params = req.get("params").cloned().unwrap_or(Value::Null);
    match state.change(method, params, |p| dispatch(state, method, p)) {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => {
            tracing::info!(method, code = e.code, error = %e.message, "rpc failed");
            json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() })
        }
    }
}

/// The listening control socket.
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The listening socket, to wake the blocked accept at shutdown.
    wake: std::os::fd::OwnedFd,
}

impl RpcServer {
    /// Starts serving `path`.
    pub fn start(path: &Path, state: Arc<DaemonState>) -> std::io::Result<RpcServer> {
        let listener = ferroblk_bdev::unix::bind_private(path)?;
        let wake = std::os::fd::OwnedFd::from(listener.try_clone()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rpc".into())
            .spawn(move || accept_loop(listener, state, stop2))?;
        Ok(RpcServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
            wake,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept so the thread sees the flag (shutting the listening socket
        // down works even when its path was removed from the file system).
        wake_accept(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes a thread blocked in `accept` on this listening socket return.
pub fn wake_accept(listener: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown on a socket descriptor we own; no memory is involved.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

fn accept_loop(listener: UnixListener, state: Arc<DaemonState>, stop: Arc<AtomicBool>) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                let state = state.clone();
                let _ = std::thread::Builder::new()
                    .name("rpc-conn".into())
                    .spawn(move || serve_conn(stream, &state));
            }
            Err(e) => {
                tracing::warn!(error = %e, "rpc accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_conn(stream: UnixStream, state: &DaemonState) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => {
                let e = json!({ "jsonrpc": "2.0", "id": null, "error": {
                    "code": code::INVALID_REQUEST, "message": "request longer than 1 MiB" } });
                let _ = writeln!(out, "{e}");
                return;
            }
            Ok(_) => {
                if line.trim().is_empty() {
                    continue;
                }
                let resp = handle_line(state, line.trim());
                if writeln!(out, "{resp}").is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Sends one request and returns its `result`, or the error object as `Err`.
pub fn call(socket: &Path, method: &str, params: Value) -> anyhow::Result<Result<Value, Value>> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| anyhow::anyhow!("cannot reach the daemon at {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let req = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let resp: Value = serde_json::from_str(&line)
        .map_err(|e| anyhow::anyhow!("bad response from the daemon: {e}"))?;
    if let Some(err) = resp.get("error") {
        return Ok(Err(err.clone()));
    }
    Ok(Ok(resp.get("result").cloned().unwrap_or(Value::Null)))
}

/// Builds `params` from command-line words: one JSON document, or `key=value` pairs (values
/// parsed as JSON where they are valid JSON, as strings otherwise).
pub fn params_from_args(args: &[String]) -> anyhow::Result<Value> {
    match args {
        [] => Ok(Value::Null),
        [one] if one.trim_start().starts_with(['{', '[']) => Ok(serde_json::from_str(one)?),
        pairs => {
            let mut m = serde_json::Map::new();
            for p in pairs {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("'{p}' is not key=value or a JSON object"))?;
                let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
                m.insert(k.to_string(), v);
            }
            Ok(Value::Object(m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_unique_and_help_lists_each() {
        let help = methods_help();
        for (i, m) in METHODS.iter().enumerate() {
            assert!(
                !METHODS[..i].iter().any(|o| o.name == m.name),
                "{} is in the table twice: the second is never dispatched",
                m.name
            );
            assert!(help.contains(&format!("  {}  ", m.name)), "{help}");
        }
    }

    #[test]
    fn params_from_words() {
        let p =
            params_from_args(&["name=m".into(), "size=4096".into(), "x=\"1GiB\"".into()]).unwrap();
        assert_eq!(p, json!({"name": "m", "size": 4096, "x": "1GiB"}));
        let p = params_from_args(&["{\"name\": \"a\"}".into()]).unwrap();
        assert_eq!(p, json!({"name": "a"}));
        assert!(params_from_args(&["oops".into()]).is_err());
    }
}
