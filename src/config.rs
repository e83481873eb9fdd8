//! The daemon's configuration file (TOML). Every table rejects unknown fields; every error names
//! the field's path (`bdev[1].size`, `reactors.cpus[0]`) and, where the file has it, its line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferroblk_bdev::decl::creation_order;
use ferroblk_bdev::reactor::ReactorConfig;

use crate::decl::Decl;
use ferroblk_target::subsystem::{ListenerSpec, SubsystemSpec};
use ferroblk_vhost::VhostSpec;
use serde::Deserialize;

/// A configuration that failed to load: where, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {path}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The configuration file.
    pub file: String,
    /// Line (1-based) of the offending field, or of the nearest table that holds it.
    pub line: Option<usize>,
    /// Path of the offending field (`bdev[0].size`), or `(file)` for the file as a whole.
    pub path: String,
    /// What is wrong (without the path).
    pub message: String,
}

/// The 1-based line of byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line of the field at `path` (`bdev[1].size`, `reactors.cpus[0]`) in TOML `text`, or of the
/// deepest table or array on the way to it that exists (a missing field: its table's header).
fn line_of(text: &str, path: &str) -> Option<usize> {
    use toml_edit::{ArrayOfTables, ImDocument, Item, TableLike, Value};
    enum Node<'a> {
        Table(&'a dyn TableLike),
        Tables(&'a ArrayOfTables),
        Array(&'a toml_edit::Array),
        Leaf,
    }
    fn of_value(v: &Value) -> Node<'_> {
        match v {
            Value::InlineTable(t) => Node::Table(t),
            Value::Array(a) => Node::Array(a),
            _ => Node::Leaf,
        }
    }
    fn of_item(i: &Item) -> Node<'_> {
        match i {
            Item::Table(t) => Node::Table(t),
            Item::ArrayOfTables(a) => Node::Tables(a),
            Item::Value(v) => of_value(v),
            Item::None => Node::Leaf,
        }
    }
    let doc = ImDocument::parse(text).ok()?;
    let mut node = Node::Table(doc.as_table());
    let mut span = None;
    // `bdev[1].size` -> "bdev", [1], "size".
    let tokens = path.split('.').flat_map(|seg| {
        let mut parts = seg.split('[');
        let key = parts.next().map(|k| (Some(k), None));
        key.into_iter()
            .chain(parts.map(|p| (None, p.trim_end_matches(']').parse::<usize>().ok())))
    });
    for token in tokens {
        node = match (token, node) {
            ((Some(k), _), Node::Table(t)) => {
                let Some((key, item)) = t.get_key_value(k) else {
                    break;
                };
                span = key.span().or(span);
                of_item(item)
            }
            ((None, Some(i)), Node::Tables(a)) => {
                let Some(t) = a.get(i) else { break };
                span = t.span().or(span);
                Node::Table(t)
            }
            ((None, Some(i)), Node::Array(a)) => {
                let Some(v) = a.get(i) else { break };
                span = v.span().or(span);
                of_value(v)
            }
            _ => break,
        };
    }
    span.map(|s| line_at(text, s.start))
}

impl ConfigError {
    /// An error about the field at `path` of TOML `text` (read from `file`), with its line.
    pub fn at(text: &str, file: &str, path: String, message: String) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            line: line_of(text, &path),
            path,
            message,
        }
    }
}

/// Deserializes TOML `text` (read from `file`) into `T`, every error naming the field's path
/// and line: the daemon's configuration and `bench matrix` specs parse through it.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner();
        let (path, message) = crate::decl::field_path("", &e.path().to_string(), inner.message());
        if path.is_empty() {
            // The file as a whole (TOML syntax): the parser's own position.
            return ConfigError {
                file: file.to_string(),
                line: inner.span().map(|s| line_at(text, s.start)),
                path: "(file)".into(),
                message,
            };
        }
        let line = line_of(text, &path).or(inner.span().map(|s| line_at(text, s.start)));
        ConfigError {
            file: file.to_string(),
            line,
            path,
            message,
        }
    })
}

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Refuse to start when a bdev fails to open (`serve --strict`); by default such a bdev is
    /// left out, with what depends on it, and everything else is served.
    #[serde(default)]
    pub strict: bool,
    /// The state file that keeps what the RPC changed (default: beside this file, `NAME.toml`
    /// → `NAME.state.json`); see `src/state.rs`.
    #[serde(default)]
    pub state: Option<PathBuf>,
    /// Reactor threads.
    #[serde(default)]
    pub reactors: ReactorsConfig,
    /// The JSON-RPC control socket.
    #[serde(default)]
    pub rpc: RpcConfig,
    /// Block devices, in any order (bases are created first).
    #[serde(default)]
    pub bdev: Vec<Decl>,
    /// vhost-user-blk exports.
    #[serde(default)]
    pub vhost: Vec<VhostSpec>,
    /// NVMe-oF subsystems.
    #[serde(default)]
    pub subsystem: Vec<SubsystemSpec>,
    /// NVMe/TCP and NVMe/RDMA listeners (every subsystem and the discovery service on each).
    #[serde(default)]
    pub listener: Vec<ListenerSpec>,
    /// The Prometheus endpoint (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[reactors]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorsConfig {
    /// CPUs to pin one reactor each to. Default: one reactor per CPU the process may use.
    #[serde(default)]
    pub cpus: Option<Vec<usize>>,
    /// Number of unpinned reactors (instead of `cpus`).
    #[serde(default)]
    pub count: Option<usize>,
    /// Microseconds a reactor keeps polling after its last work before it sleeps.
    #[serde(default = "default_idle_poll_us")]
    pub idle_poll_us: u64,
}

fn default_idle_poll_us() -> u64 {
    50
}

impl Default for ReactorsConfig {
    fn default() -> Self {
        ReactorsConfig {
            cpus: None,
            count: None,
            idle_poll_us: default_idle_poll_us(),
        }
    }
}

/// `[rpc]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    /// Unix socket path (mode 0600); relative paths resolve against the working directory.
    #[serde(default = "default_rpc_socket")]
    pub socket: PathBuf,
}

/// Where the control socket lives unless configured.
pub fn default_rpc_socket() -> PathBuf {
    PathBuf::from("run/ferroblk.sock")
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            socket: default_rpc_socket(),
        }
    }
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

impl ReactorsConfig {
    /// The reactor layout, checked against the CPUs this process may use.
    pub fn to_reactor_config(&self) -> Result<ReactorConfig, (String, String)> {
        let allowed = allowed_cpus();
        let cpus = match (&self.cpus, self.count) {
            (Some(_), Some(_)) => {
                return Err((
                    "reactors.count".into(),
                    "give either cpus or count, not both".into(),
                ));
            }
            (Some(list), None) => {
                if list.is_empty() {
                    return Err(("reactors.cpus".into(), "is empty".into()));
                }
                for (i, c) in list.iter().enumerate() {
                    if !allowed.contains(c) {
                        return Err((
                            format!("reactors.cpus[{i}]"),
                            format!("CPU {c} is not available to this process (have {allowed:?})"),
                        ));
                    }
                    if list[..i].contains(c) {
                        return Err((
                            format!("reactors.cpus[{i}]"),
                            format!("CPU {c} listed twice"),
                        ));
                    }
                }
                list.iter().map(|&c| Some(c)).collect()
            }
            (None, Some(n)) => {
                if n == 0 || n > 1024 {
                    return Err(("reactors.count".into(), format!("{n} is not in 1..=1024")));
                }
                vec![None; n]
            }
            (None, None) => allowed.iter().map(|&c| Some(c)).collect(),
        };
        if self.idle_poll_us > 1_000_000 {
            return Err((
                "reactors.idle_poll_us".into(),
                "more than one second of idle polling is never useful".into(),
            ));
        }
        Ok(ReactorConfig {
            cpus,
            idle_poll: Duration::from_micros(self.idle_poll_us),
        })
    }
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.display().to_string(),
            line: None,
            path: "(file)".into(),
            message: e.to_string(),
        })?;
        Config::parse(&text, &file.display().to_string())
    }

    /// Parses and checks configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let err = |path: String, message: String| ConfigError::at(text, file, path, message);
        let cfg: Config = parse_toml(text, file)?;
        cfg.reactors
            .to_reactor_config()
            .map_err(|(p, m)| err(p, m))?;
        creation_order(&cfg.bdev, &|_| false).map_err(|e| {
            let field = e.error.field().unwrap_or("").to_string();
            let message = match &e.error {
                ferroblk_bdev::BdevError::Invalid { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            let path = if field.is_empty() {
                format!("bdev[{}]", e.index)
            } else {
                format!("bdev[{}].{field}", e.index)
            };
            err(path, message)
        })?;
        for (i, v) in cfg.vhost.iter().enumerate() {
            v.validate()
                .map_err(|(f, m)| err(format!("vhost[{i}].{f}"), m))?;
            if !cfg.bdev.iter().any(|b| b.name() == v.bdev) {
                return Err(err(
                    format!("vhost[{i}].bdev"),
                    format!("no bdev named '{}'", v.bdev),
                ));
            }
            if cfg.vhost[..i].iter().any(|o| o.socket == v.socket) {
                return Err(err(
                    format!("vhost[{i}].socket"),
                    format!("{} is used by another export", v.socket.display()),
                ));
            }
        }
        for (i, s) in cfg.subsystem.iter().enumerate() {
            s.validate()
                .map_err(|(f, m)| err(format!("subsystem[{i}].{f}"), m))?;
            if cfg.subsystem[..i].iter().any(|o| o.nqn == s.nqn) {
                return Err(err(
                    format!("subsystem[{i}].nqn"),
                    format!("{} is declared twice", s.nqn),
                ));
            }
            for (j, n) in s.namespace.iter().enumerate() {
                if !cfg.bdev.iter().any(|b| b.name() == n.bdev) {
                    return Err(err(
                        format!("subsystem[{i}].namespace[{j}].bdev"),
                        format!("no bdev named '{}'", n.bdev),
                    ));
                }
            }
        }
        for (i, l) in cfg.listener.iter().enumerate() {
            if let Err((field, message)) = l.validate() {
                return Err(err(format!("listener[{i}].{field}"), message));
            }
            if cfg.listener[..i].iter().any(|o| o.same_endpoint(l)) {
                return Err(err(format!("listener[{i}]"), "declared twice".into()));
            }
        }
        Ok(cfg)
    }
}

/// Fuzz target body (`fuzz/fuzz_targets/config_toml.rs` includes this file and `decl.rs`):
/// parses arbitrary bytes as a configuration file. It must load or be refused with an error
/// that names a field path and, for a syntax error, a line of the text; never panic.
#[doc(hidden)]
#[cfg_attr(not(test), allow(dead_code))] // used by the fuzz target and the corpus test
pub fn fuzz_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text, "fuzz.toml") {
        assert!(!e.path.is_empty(), "an error without a path: {e}");
        if let Some(at) = e.message.rfind("(line ")
            && let Some(n) = e.message[at + 6..]
                .strip_suffix(')')
                .and_then(|n| n.parse::<usize>().ok())
        {
            assert!(
                n >= 1 && n <= text.lines().count().max(1),
                "line {n} beyond the text: {e}"
            );
        }
    }
}

/// Valid configurations for [`fuzz_parse`]: every kind of bdev, exports, subsystems,
/// listeners (the example files in `configs/` are seeds too).
#[cfg(test)]
fn fuzz_seeds() -> Vec<Vec<u8>> {
    let mut files = vec!["bench-null", "chain-malloc-error-delay", "quickstart"];
    if cfg!(feature = "rbd") {
        files.push("rbd");
    }
    let mut seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            std::fs::read(format!("{}/configs/{f}.toml", env!("CARGO_MANIFEST_DIR")))
                .expect("example config")
        })
        .collect();
    seeds.push(
        br#"[reactors]
count = 1
idle_poll_us = 10

[rpc]
socket = "run/f.sock"

[[bdev]]
name = "m"
kind = "malloc"
size = "8MiB"
block_size = 512

[[bdev]]
name = "c"
kind = "crc"
base = "m"

[[bdev]]
name = "z"
kind = "compress"
base = "c"
size = "16MiB"
chunk_size = "16KiB"
algorithm = "zstd"
zstd_level = 3

[[bdev]]
name = "x"
kind = "crypt_xts"
base = "z"
key_hex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"

[[bdev]]
name = "g"
kind = "crypt_gcm"
base = "n"
key_file = "k.key"

[[bdev]]
name = "n"
kind = "null"
size = 1048576

[[vhost]]
socket = "run/x.sock"
bdev = "x"
num_queues = 4
read_only = true
serial = "S1"

[[subsystem]]
nqn = "nqn.2026-12.io.ferroblk:f"
serial = "F1"
allow_any_host = false
hosts = ["nqn.2014-08.org.nvmexpress:uuid:f0220000-0000-4000-8000-000000000001"]

[[subsystem.namespace]]
nsid = 1
bdev = "g"

[[listener]]
addr = "::1"
port = 4420
"#
        .to_vec(),
    );
    seeds
}

/// `[metrics]`: the Prometheus endpoint (`src/metrics.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`"127.0.0.1:9464"`); none: no endpoint.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_corpus_replays() {
        // The seeds are valid configurations: the fuzzer starts past the parser's first refusal.
        for s in fuzz_seeds() {
            let text = std::str::from_utf8(&s).expect("UTF-8");
            if let Err(e) = Config::parse(text, "seed.toml") {
                panic!("seed refused: {e}");
            }
        }
        ferroblk_bdev::fuzzing::replay("config_toml", &fuzz_seeds(), fuzz_parse);
    }

    fn parse_err(text: &str) -> ConfigError {
        Config::parse(text, "t.toml").expect_err("config should be refused")
    }

    #[test]
    fn empty_config_is_valid() {
        let c = Config::parse("", "t.toml").unwrap();
        assert!(c.bdev.is_empty());
        assert_eq!(c.rpc.socket, PathBuf::from("run/ferroblk.sock"));
    }

    #[test]
    fn strict_is_a_top_level_switch() {
        assert!(!Config::parse("", "t.toml").unwrap().strict);
        assert!(Config::parse("strict = true\n", "t.toml").unwrap().strict);
        let e = parse_err("strict = \"yes\"\n");
        assert_eq!(e.path, "strict", "{e}");
    }

    #[test]
    fn unknown_top_level_field_is_refused() {
        let e = parse_err("[reactor]\ncount = 1\n");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn unknown_bdev_field_names_its_path() {
        let e = parse_err(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 4096\n\
             [[bdev]]\nkind = \"null\"\nname = \"n\"\nsize = 4096\nsizee = 1\n",
        );
        assert_eq!(e.path, "bdev[1].sizee", "{e}");
        assert_eq!(e.line, Some(9), "{e}");
        assert!(e.message.starts_with("unknown field `sizee`"), "{e}");
        let e = parse_err("[reactors]\ncount = 1\nbogus = 2\n");
        assert_eq!(e.path, "reactors.bogus", "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn a_wrong_type_names_the_field_and_its_line() {
        let e = parse_err(
            "# a comment\n[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 8192\n\
             block_size = \"4k\"\n",
        );
        assert_eq!(e.path, "bdev[0].block_size", "{e}");
        assert_eq!(e.message, "invalid type: string \"4k\", expected u32");
        assert_eq!(e.line, Some(6), "{e}");
        assert_eq!(
            e.to_string(),
            "t.toml:6: bdev[0].block_size: invalid type: string \"4k\", expected u32"
        );
        // A field of a plain table, on the file's first line: the line is not one short.
        let e = parse_err("strict = \"yes\"\n");
        assert_eq!((e.path.as_str(), e.line), ("strict", Some(1)), "{e}");
        let e = parse_err("\n\n[reactors]\ncpus = [0, \"one\"]\n");
        assert_eq!(e.path, "reactors.cpus[1]", "{e}");
        assert_eq!(e.line, Some(4), "{e}");
    }

    #[test]
    fn a_missing_field_is_named_at_its_table() {
        let e = parse_err("[[bdev]]\nkind = \"null\"\nsize = 4096\n");
        assert_eq!(e.path, "bdev[0].name", "{e}");
        assert_eq!(e.line, Some(1), "{e}");
        let e = parse_err("[[bdev]]\nname = \"m\"\n\n[[bdev]]\nname = \"n\"\n");
        assert_eq!(e.path, "bdev[0].kind", "{e}");
    }

    #[test]
    fn syntax_errors_give_the_exact_line() {
        let e = parse_err("[reactors]\ncount = 1\n= 2\n");
        assert_eq!(e.path, "(file)");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn checks_after_parsing_name_the_line_and_do_not_repeat_the_path() {
        let e = parse_err("[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"1000\"\n");
        assert_eq!(e.path, "bdev[0].size");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(!e.message.starts_with("size"), "{e}");
        let e = parse_err("[reactors]\ncpus = [0,\n  0]\n");
        assert_eq!(
            (e.path.as_str(), e.line),
            ("reactors.cpus[1]", Some(3)),
            "{e}"
        );
    }

    #[test]
    fn every_error_names_a_field_and_a_line() {
        for text in [
            "[[bdev]]\nkind = \"floppy\"\nname = \"m\"\n",
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"ten\"\n",
            "[[bdev]]\nkind = \"error\"\nname = \"e\"\nbase = \"ghost\"\n",
            "[[vhost]]\nsocket = \"a.sock\"\nbdev = \"x\"\n",
            "[[listener]]\naddr = \"127.0.0.1\"\nport = 70000\n",
        ] {
            let e = parse_err(text);
            assert!(e.line.is_some(), "{e}");
            let last = e.path.rsplit('.').next().unwrap();
            assert!(
                !e.message.starts_with(&format!("{last}:")),
                "path repeated: {e}"
            );
        }
    }

    #[test]
    fn unknown_kind_is_refused() {
        let e = parse_err("[[bdev]]\nkind = \"floppy\"\nname = \"m\"\n");
        assert!(e.path.starts_with("bdev[0]"), "{e}");
        assert!(e.message.contains("floppy"), "{e}");
    }

    #[test]
    fn missing_base_names_the_field() {
        let e = parse_err("[[bdev]]\nkind = \"error\"\nname = \"e\"\nbase = \"ghost\"\n");
        assert_eq!(e.path, "bdev[0].base");
        assert!(e.message.contains("ghost"));
    }

    #[test]
    fn cycles_are_refused() {
        let e = parse_err(
            "[[bdev]]\nkind = \"error\"\nname = \"a\"\nbase = \"b\"\n\
             [[bdev]]\nkind = \"delay\"\nname = \"b\"\nbase = \"a\"\n",
        );
        assert!(e.path.ends_with(".base"), "{e}");
        assert!(e.message.contains("cycle"), "{e}");
    }

    #[test]
    fn size_not_a_multiple_of_block_size_is_refused() {
        let e = parse_err("[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"1000\"\n");
        assert_eq!(e.path, "bdev[0].size");
        let e = parse_err("[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = \"ten\"\n");
        assert!(e.path.starts_with("bdev[0]"), "{e}");
    }

    #[test]
    fn bad_block_size_and_duplicate_names_are_refused() {
        let e = parse_err(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 8192\nblock_size = 2048\n",
        );
        assert_eq!(e.path, "bdev[0].block_size");
        let e = parse_err(
            "[[bdev]]\nkind = \"malloc\"\nname = \"m\"\nsize = 8192\n\
             [[bdev]]\nkind = \"null\"\nname = \"m\"\nsize = 8192\n",
        );
        assert_eq!(e.path, "bdev[1].name");
    }

    #[test]
    fn reactor_layout_is_checked() {
        let e = parse_err("[reactors]\ncpus = [0, 0]\n");
        assert_eq!(e.path, "reactors.cpus[1]");
        let e = parse_err("[reactors]\ncpus = [9999]\n");
        assert_eq!(e.path, "reactors.cpus[0]");
        let e = parse_err("[reactors]\ncount = 0\n");
        assert_eq!(e.path, "reactors.count");
        let e = parse_err("[reactors]\ncount = -1\n");
        assert!(e.path.starts_with("reactors.count"), "{e}");
    }

    #[test]
    fn vhost_exports_are_checked() {
        let base = "[[bdev]]\nkind = \"null\"\nname = \"n\"\nsize = 4096\n";
        let e = parse_err(&format!(
            "{base}[[vhost]]\nsocket = \"a.sock\"\nbdev = \"x\"\n"
        ));
        assert_eq!(e.path, "vhost[0].bdev");
        let e = parse_err(&format!(
            "{base}[[vhost]]\nsocket = \"a.sock\"\nbdev = \"n\"\nnum_queues = 0\n"
        ));
        assert_eq!(e.path, "vhost[0].num_queues");
        let e = parse_err(&format!(
            "{base}[[vhost]]\nsocket = \"a.sock\"\nbdev = \"n\"\n\
             [[vhost]]\nsocket = \"a.sock\"\nbdev = \"n\"\n"
        ));
        assert_eq!(e.path, "vhost[1].socket");
        let e = parse_err(&format!(
            "{base}[[vhost]]\nsocket = \"a.sock\"\nbdev = \"n\"\nqueues = 2\n"
        ));
        assert!(e.path.starts_with("vhost[0]"), "{e}");
    }

    #[test]
    fn nvmf_sections_are_checked() {
        let base = "[[bdev]]\nkind = \"null\"\nname = \"n\"\nsize = 4096\n";
        let e = parse_err(&format!(
            "{base}[[subsystem]]\nnqn = \"nqn.2026-11.io.x:a\"\n[[subsystem.namespace]]\nnsid = 1\nbdev = \"zz\"\n"
        ));
        assert_eq!(e.path, "subsystem[0].namespace[0].bdev");
        let e = parse_err(&format!("{base}[[subsystem]]\nnqn = \"bad\"\n"));
        assert_eq!(e.path, "subsystem[0].nqn");
        let e = parse_err(&format!(
            "{base}[[listener]]\naddr = \"nowhere\"\nport = 4420\n"
        ));
        assert_eq!(e.path, "listener[0].addr");
        let e = parse_err(&format!(
            "{base}[[listener]]\naddr = \"127.0.0.1\"\nport = 70000\n"
        ));
        assert!(e.path.starts_with("listener[0]"), "{e}");
        let e = parse_err(&format!(
            "{base}[[listener]]\naddr = \"127.0.0.1\"\nport = 4420\nic_timeout_ms = 0\n"
        ));
        assert_eq!(e.path, "listener[0].ic_timeout_ms");
        let e = parse_err(&format!(
            "{base}[[listener]]\naddr = \"127.0.0.1\"\nport = 4420\n\
             [[listener]]\naddr = \"127.0.0.1\"\nport = 4420\nconnect_timeout_ms = 100\n"
        ));
        assert_eq!(
            e.path, "listener[1]",
            "same endpoint, other limits: still twice"
        );
        let e = parse_err(&format!(
            "{base}[[listener]]\ntrtype = \"fc\"\naddr = \"127.0.0.1\"\nport = 4420\n"
        ));
        assert!(e.path.starts_with("listener[0]"), "{e}");
        assert!(
            e.to_string().contains("rdma"),
            "the accepted values are named: {e}"
        );
    }

    #[test]
    fn rdma_listener_is_its_own_endpoint_beside_tcp() {
        let text = "[[listener]]\naddr = \"10.0.0.1\"\nport = 4420\n\
                    [[listener]]\ntrtype = \"rdma\"\naddr = \"10.0.0.1\"\nport = 4420\n";
        let c = Config::parse(text, "t.toml").unwrap();
        let kinds: Vec<_> = c.listener.iter().map(|l| l.trtype).collect();
        assert_eq!(
            kinds,
            [
                ferroblk_target::subsystem::Trtype::Tcp,
                ferroblk_target::subsystem::Trtype::Rdma
            ]
        );
        let twice =
            format!("{text}[[listener]]\ntrtype = \"rdma\"\naddr = \"10.0.0.1\"\nport = 4420\n");
        assert_eq!(parse_err(&twice).path, "listener[2]");
    }

    #[test]
    fn metrics_endpoint_is_off_by_default_and_checked() {
        assert!(
            Config::parse("", "t.toml")
                .unwrap()
                .metrics
                .listen
                .is_none()
        );
        let c = Config::parse("[metrics]\nlisten = \"127.0.0.1:9464\"\n", "t.toml").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        let e = parse_err("[metrics]\nlisten = \"localhost\"\n");
        assert_eq!(e.path, "metrics.listen", "{e}");
        let e = parse_err("[metrics]\nport = 9464\n");
        assert!(e.path.starts_with("metrics"), "{e}");
    }

    #[test]
    fn shipped_example_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "configs/ holds the examples");
    }
}
