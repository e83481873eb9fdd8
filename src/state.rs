//! Live state that survives a restart.
//!
//! What the RPC changes (bdevs created, deleted or resized, vhost exports, subsystems,
//! namespaces, hosts, listeners) is the daemon's state. The run-time knobs of the test bdevs
//! (`bdev_error_inject`, `bdev_delay_set`) are not: a restart comes back to the declared rules
//! and delays (a guest test holds writes with an hour's delay, then restarts the daemon). Every successful change is
//! written to a state file (by default beside the configuration: `ferroblk.toml` keeps
//! `ferroblk.state.json`; `state = "path"` in the configuration chooses another), atomically
//! (temporary file, `fsync`, `rename`, `fsync` of the directory). At start, when the state file
//! exists, its objects are served in place of the configuration's `[[bdev]]`, `[[vhost]]`,
//! `[[subsystem]]` and `[[listener]]` (the configuration keeps `[reactors]`, `[rpc]` and
//! `strict`); delete it to start from the configuration again.
//!
//! Keys are never written in clear. A `crypt_*` bdev with `key_file` keeps the path; one whose
//! `key_hex` came inline from the configuration is saved as `"key_hex_from_config": true` and
//! takes the key from the configuration at start; `bdev_create` refuses any other `key_hex`
//! ([`check_create`]), which could be kept only in clear.
//!
//! A file bdev that grew online is saved with its new size, so the next start opens it at that
//! size instead of refusing a file larger than the configuration says.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ferroblk_bdev::BdevDecl;
use ferroblk_target::subsystem::{AnaState, ListenerSpec, NamespaceSpec, SubsystemSpec};
use ferroblk_vhost::VhostSpec;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Config;
use crate::decl::Decl;

/// Format version of the state file.
const VERSION: u64 = 1;

/// Suffix of the marker replacing a secret that came inline from the configuration:
/// `key_hex` is saved as `"key_hex_from_config": true`.
const FROM_CONFIG: &str = "_from_config";

/// A state file that cannot be read or used.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {path}: {message}")]
pub struct StateError {
    /// The state file.
    pub file: String,
    /// Path of the offending field (`bdev[1]`), or `(file)` for the file as a whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// The objects the daemon serves: the configuration's, or the state file's.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objects {
    /// Block devices.
    #[serde(default)]
    pub bdev: Vec<Decl>,
    /// vhost-user-blk exports.
    #[serde(default)]
    pub vhost: Vec<VhostSpec>,
    /// NVMe-oF subsystems with their namespaces and hosts.
    #[serde(default)]
    pub subsystem: Vec<SubsystemSpec>,
    /// NVMe/TCP and NVMe/RDMA listeners.
    #[serde(default)]
    pub listener: Vec<ListenerSpec>,
}

impl Objects {
    /// The configuration's objects.
    pub fn of_config(cfg: &Config) -> Objects {
        Objects {
            bdev: cfg.bdev.clone(),
            vhost: cfg.vhost.clone(),
            subsystem: cfg.subsystem.clone(),
            listener: cfg.listener.clone(),
        }
    }

    /// Records a successful RPC `method` called with `params`; `size_of` gives a bdev's size
    /// after a resize. Methods that change nothing that is saved are ignored.
    pub fn record(&mut self, method: &str, params: &Value, size_of: impl Fn(&str) -> Option<u64>) {
        let s = |k: &str| params.get(k).and_then(Value::as_str).unwrap_or_default();
        match method {
            "bdev_create" => {
                // Declared again (one that failed at start): the new declaration replaces it.
                self.bdev.retain(|d| d.name() != s("name"));
                self.bdev.extend(parsed::<Decl>(params));
            }
            "bdev_delete" => self.bdev.retain(|d| d.name() != s("name")),
            "bdev_resize" => {
                if let (Some(d), Some(size)) = (
                    self.bdev.iter_mut().find(|d| d.name() == s("name")),
                    size_of(s("name")),
                ) {
                    d.0.set_size(size);
                }
            }
            "vhost_add" => {
                self.vhost.retain(|v| v.socket != Path::new(s("socket")));
                self.vhost.extend(parsed::<VhostSpec>(params));
            }
            "vhost_remove" => self.vhost.retain(|v| v.socket != Path::new(s("socket"))),
            "nvmf_subsystem_add" => {
                self.subsystem.retain(|x| x.nqn != s("nqn"));
                self.subsystem.extend(parsed::<SubsystemSpec>(params));
            }
            "nvmf_subsystem_remove" => self.subsystem.retain(|x| x.nqn != s("nqn")),
            "nvmf_ns_add" | "nvmf_ns_remove" | "nvmf_host_add" | "nvmf_host_remove" => {
                let Some(sub) = self.subsystem.iter_mut().find(|x| x.nqn == s("nqn")) else {
                    return;
                };
                let nsid = params.get("nsid").and_then(Value::as_u64);
                match method {
                    "nvmf_ns_add" => {
                        sub.namespace.retain(|n| Some(u64::from(n.nsid)) != nsid);
                        sub.namespace.extend(parsed::<NamespaceSpec>(&json!({
                            "nsid": params["nsid"], "bdev": params["bdev"],
                            "uuid": params.get("uuid").cloned().unwrap_or(Value::Null),
                            "anagrpid": params.get("anagrpid").cloned().unwrap_or(Value::Null),
                        })));
                    }
                    "nvmf_ns_remove" => sub.namespace.retain(|n| Some(u64::from(n.nsid)) != nsid),
                    "nvmf_host_add" => {
                        if !sub.hosts.iter().any(|h| h == s("host")) {
                            sub.hosts.push(s("host").to_string());
                        }
                    }
                    _ => sub.hosts.retain(|h| h != s("host")),
                }
            }
            "nvmf_listener_set_ana_state" => {
                let (Some(endpoint), Some(ana)) = (
                    parsed::<ListenerSpec>(&json!({
                        "addr": params["addr"], "port": params["port"],
                        "trtype": params.get("trtype").cloned().unwrap_or(json!("tcp")),
                    })),
                    parsed::<AnaState>(&params["ana_state"]),
                ) else {
                    return;
                };
                let group = params
                    .get("anagrpid")
                    .and_then(Value::as_u64)
                    .map(|g| g as u32);
                if let Some(l) = self
                    .listener
                    .iter_mut()
                    .find(|l| l.same_endpoint(&endpoint))
                {
                    l.set_ana_state(group, ana);
                }
            }
            "nvmf_listener_add" => {
                if let Some(l) = parsed::<ListenerSpec>(params) {
                    self.listener.retain(|o| !o.same_endpoint(&l));
                    self.listener.push(l);
                }
            }
            _ => {}
        }
    }

    /// Declares bdev `name` again with the bases it has now (after a mirror's child was added
    /// or removed).
    pub fn set_bases(&mut self, name: &str, bases: &[String]) {
        if let Some(d) = self.bdev.iter_mut().find(|d| d.name() == name) {
            d.0.set_bases(bases);
        }
    }

    /// The state file's contents: no key in clear (see the module documentation).
    pub fn to_state_json(&self, config: &[Decl]) -> Value {
        let bdev: Vec<Value> = self
            .bdev
            .iter()
            .map(|d| {
                let mut v = d.to_json();
                if let Some(field) = d.inline_secret()
                    && let Some(m) = v.as_object_mut()
                {
                    m.remove(field);
                    if config_secret(config, d).is_some() {
                        m.insert(format!("{field}{FROM_CONFIG}"), json!(true));
                    } else {
                        // `bdev_create` refuses such a key (see `check_create`): never reached.
                        tracing::error!(
                            bdev = d.name(),
                            field,
                            "inline secret not from the configuration: not saved"
                        );
                    }
                }
                v
            })
            .collect();
        json!({
            "version": VERSION,
            "bdev": bdev,
            "vhost": self.vhost,
            "subsystem": self.subsystem,
            "listener": self.listener,
        })
    }

    /// Parses a state file's contents; inline keys saved as coming from the configuration are
    /// taken from `config`.
    pub fn from_state_json(text: &str, file: &str, config: &[Decl]) -> Result<Objects, StateError> {
        let err = |path: String, message: String| StateError {
            file: file.to_string(),
            path,
            message,
        };
        let mut v: Value =
            serde_json::from_str(text).map_err(|e| err("(file)".into(), e.to_string()))?;
        let Some(m) = v.as_object_mut() else {
            return Err(err("(file)".into(), "not a JSON object".into()));
        };
        match m.remove("version").and_then(|v| v.as_u64()) {
            Some(VERSION) => {}
            other => {
                return Err(err(
                    "version".into(),
                    format!("{other:?} is not a known version (expected {VERSION})"),
                ));
            }
        }
        let mut from_config = Vec::new();
        if let Some(Value::Array(bdevs)) = m.get_mut("bdev") {
            for (i, b) in bdevs.iter_mut().enumerate() {
                let Some(o) = b.as_object_mut() else {
                    continue;
                };
                let markers: Vec<String> = o
                    .keys()
                    .filter(|k| k.ends_with(FROM_CONFIG))
                    .cloned()
                    .collect();
                for marker in markers {
                    if o.remove(&marker) == Some(json!(true))
                        && let Some(field) = marker.strip_suffix(FROM_CONFIG)
                    {
                        from_config.push((i, field.to_string()));
                    }
                }
            }
        }
        let mut objects: Objects = serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            err(path, e.into_inner().to_string())
        })?;
        for (i, field) in from_config {
            let d = &mut objects.bdev[i];
            let given = config.iter().find(|c| {
                c.name() == d.name() && c.kind() == d.kind() && c.inline_secret() == Some(&field)
            });
            let Some(c) = given else {
                let name = d.name();
                return Err(err(
                    format!("bdev[{i}].{field}"),
                    format!(
                        "bdev '{name}' takes its {field} from the configuration, which no longer gives one"
                    ),
                ));
            };
            c.copy_inline_secret(&mut d.0);
        }
        Ok(objects)
    }
}

/// Refuses a `bdev_create` whose `key_hex` could be saved only in clear: an inline key is kept
/// only when the configuration gives the same bdev the same key. Err: (field, message).
pub fn check_create(params: &Value, config: &[Decl]) -> Result<(), (String, String)> {
    let Some(d) = parsed::<Decl>(params) else {
        return Ok(()); // The method reports what is wrong with its parameters.
    };
    match d.inline_secret() {
        Some(field) if config_secret(config, &d).is_none() => Err((
            field.into(),
            "a key given over the RPC is not written to the state file in clear, so it would \
             be lost at restart: give key_file (a file of mode 0600) instead"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Where the state of a daemon started with `config_path` lives: `state` in the configuration,
/// or beside the configuration file (`ferroblk.toml` → `ferroblk.state.json`).
pub fn state_path(cfg: &Config, config_path: Option<&Path>) -> PathBuf {
    cfg.state.clone().unwrap_or_else(|| {
        config_path.map_or_else(
            || PathBuf::from("ferroblk.state.json"),
            |p| p.with_extension("state.json"),
        )
    })
}

/// The RPC methods whose effect is saved.
pub const SAVED_METHODS: &[&str] = &[
    "bdev_create",
    "bdev_delete",
    "bdev_resize",
    "vhost_add",
    "vhost_remove",
    "nvmf_subsystem_add",
    "nvmf_subsystem_remove",
    "nvmf_ns_add",
    "nvmf_ns_remove",
    "nvmf_host_add",
    "nvmf_host_remove",
    "nvmf_listener_add",
    "mirror_add_child",
    "mirror_remove_child",
];

/// Reads the state file at `path` if there is one.
pub fn load(path: &Path, config: &[Decl]) -> Result<Option<Objects>, StateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Objects::from_state_json(&text, &path.display().to_string(), config).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError {
            file: path.display().to_string(),
            path: "(file)".into(),
            message: e.to_string(),
        }),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (mode 0600), `fsync`,
/// `rename` over `path`, `fsync` of the directory. A crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `v` as a `T`, if it is one (a method's parameters, already accepted by the method).
fn parsed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

/// The configuration's declaration of `d`'s bdev, if it gives `d`'s inline secret.
fn config_secret<'a>(config: &'a [Decl], d: &BdevDecl) -> Option<&'a Decl> {
    config
        .iter()
        .find(|c| c.name() == d.name())
        .filter(|c| c.same_inline_secret(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroblk_bdev::ByteSize;
    use ferroblk_bdev::decl::{DelayKind, FileKind};

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t.toml").unwrap()
    }

    #[test]
    fn keys_are_never_saved_in_clear() {
        let from_cfg = "11".repeat(64);
        let over_rpc = "33".repeat(64);
        let c = cfg(&format!(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"1MiB\"\n\
             [[bdev]]\nkind = \"crypt_xts\"\nname = \"x\"\nbase = \"m\"\nkey_hex = \"{from_cfg}\"\n"
        ));
        let mut o = Objects::of_config(&c);
        o.record(
            "bdev_create",
            &json!({"kind": "malloc", "name": "m2", "size": "1MiB"}),
            |_| None,
        );
        let y = json!({"kind": "crypt_xts", "name": "y", "base": "m2", "key_hex": over_rpc});
        assert_eq!(check_create(&y, &c.bdev).unwrap_err().0, "key_hex");
        // Declaring again the configuration's bdev with the configuration's key is fine.
        let x = json!({"kind": "crypt_xts", "name": "x", "base": "m", "key_hex": from_cfg});
        check_create(&x, &c.bdev).unwrap();
        check_create(
            &json!({"kind": "malloc", "name": "q", "size": 4096}),
            &c.bdev,
        )
        .unwrap();
        o.record("bdev_create", &x, |_| None);
        o.record(
            "bdev_create",
            &json!({"kind": "crypt_gcm", "name": "z", "base": "m2", "key_file": "/k/z.key"}),
            |_| None,
        );
        let text = o.to_state_json(&c.bdev).to_string();
        assert!(!text.contains(&from_cfg[..16]), "{text}");
        assert!(text.contains("/k/z.key"), "{text}");
        let back = Objects::from_state_json(&text, "s.json", &c.bdev).unwrap();
        let names: Vec<&str> = back.bdev.iter().map(|d| d.name()).collect();
        assert_eq!(names, ["m", "m2", "x", "z"]);
        // The configuration's key comes back from the configuration.
        assert_eq!(back.bdev[2].inline_secret(), Some("key_hex"));
        assert!(config_secret(&c.bdev, &back.bdev[2]).is_some());
        back.bdev[2].validate().unwrap();
        // Without the configuration's key the state file is refused, naming the field.
        let e = Objects::from_state_json(&text, "s.json", &[]).unwrap_err();
        assert_eq!(e.path, "bdev[2].key_hex", "{e}");
    }

    #[test]
    fn rpc_changes_are_recorded() {
        let c = cfg(
            "[[bdev]]\nkind = \"file\"\nname = \"f\"\npath = \"f.img\"\nsize = \"1MiB\"\n\
             [[bdev]]\nkind = \"delay\"\nname = \"d\"\nbase = \"f\"\n\
             [[subsystem]]\nnqn = \"nqn.2026-11.io.x:a\"\n",
        );
        let mut o = Objects::of_config(&c);
        o.record("bdev_resize", &json!({"name": "f", "size": "2MiB"}), |n| {
            (n == "f").then_some(2 << 20)
        });
        o.record(
            "bdev_delay_set",
            &json!({"name": "d", "write_us": 7}),
            |_| None,
        );
        o.record(
            "bdev_error_inject",
            &json!({"name": "d", "rule": {}}),
            |_| None,
        );
        o.record(
            "vhost_add",
            &json!({"socket": "run/d.sock", "bdev": "d"}),
            |_| None,
        );
        o.record(
            "nvmf_ns_add",
            &json!({"nqn": "nqn.2026-11.io.x:a", "nsid": 3, "bdev": "f"}),
            |_| None,
        );
        o.record(
            "nvmf_host_add",
            &json!({"nqn": "nqn.2026-11.io.x:a", "host": "nqn.2014-08.h:1"}),
            |_| None,
        );
        o.record("bdev_list", &Value::Null, |_| None);
        let text = o.to_state_json(&c.bdev).to_string();
        let back = Objects::from_state_json(&text, "s.json", &c.bdev).unwrap();
        let f = back.bdev[0].config::<FileKind>().expect(&text);
        assert_eq!(f.size, Some(ByteSize(2 << 20)));
        let d = back.bdev[1].config::<DelayKind>().expect(&text);
        assert_eq!((d.read_us, d.write_us), (0, 0), "test knobs are not saved");
        assert_eq!(back.vhost[0].socket, Path::new("run/d.sock"));
        assert_eq!(back.subsystem[0].namespace[0].nsid, 3);
        assert_eq!(back.subsystem[0].hosts, ["nqn.2014-08.h:1"]);
        let mut o = back;
        o.record("vhost_remove", &json!({"socket": "run/d.sock"}), |_| None);
        o.record(
            "nvmf_host_remove",
            &json!({"nqn": "nqn.2026-11.io.x:a", "host": "nqn.2014-08.h:1"}),
            |_| None,
        );
        o.record(
            "nvmf_ns_remove",
            &json!({"nqn": "nqn.2026-11.io.x:a", "nsid": 3}),
            |_| None,
        );
        o.record("bdev_delete", &json!({"name": "d"}), |_| None);
        o.record(
            "nvmf_subsystem_remove",
            &json!({"nqn": "nqn.2026-11.io.x:a"}),
            |_| None,
        );
        assert!(o.vhost.is_empty() && o.subsystem.is_empty());
        assert_eq!(o.bdev.len(), 1);
    }

    #[test]
    fn ana_state_changes_are_saved_with_their_listener() {
        let c = cfg(
            "[[bdev]]\nkind = \"malloc\"\nname = \"b\"\nsize = \"1MiB\"\n\
             [[subsystem]]\nnqn = \"nqn.2026-11.io.x:a\"\n\
             [[subsystem.namespace]]\nnsid = 1\nbdev = \"b\"\nanagrpid = 2\n\
             [[listener]]\naddr = \"127.0.0.1\"\nport = 4420\n\
             [[listener]]\naddr = \"127.0.0.1\"\nport = 4421\n",
        );
        let mut o = Objects::of_config(&c);
        let set = |o: &mut Objects, p: Value| o.record("nvmf_listener_set_ana_state", &p, |_| None);
        set(
            &mut o,
            json!({"addr": "127.0.0.1", "port": 4421, "ana_state": "non_optimized"}),
        );
        set(
            &mut o,
            json!({"addr": "127.0.0.1", "port": 4420, "anagrpid": 2, "ana_state": "inaccessible"}),
        );
        let text = o.to_state_json(&c.bdev).to_string();
        let back = Objects::from_state_json(&text, "s.json", &c.bdev).unwrap();
        assert_eq!(back.subsystem[0].namespace[0].anagrpid, Some(2));
        assert_eq!(back.listener[0].ana_state_of(1), AnaState::Optimized);
        assert_eq!(back.listener[0].ana_state_of(2), AnaState::Inaccessible);
        assert_eq!(back.listener[1].ana_state_of(2), AnaState::NonOptimized);
        assert_eq!(back.listener[1].ana_state, AnaState::NonOptimized);
    }

    #[test]
    fn bad_state_files_are_refused_naming_the_field() {
        let e = Objects::from_state_json("{\"version\": 9}", "s.json", &[]).unwrap_err();
        assert_eq!(e.path, "version");
        let e = Objects::from_state_json(
            "{\"version\": 1, \"bdev\": [{\"kind\": \"malloc\", \"name\": \"m\", \"size\": \"x\"}]}",
            "s.json",
            &[],
        )
        .unwrap_err();
        assert!(e.path.starts_with("bdev[0]"), "{e}");
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/s.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let left: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }
}
