//! A matrix spec (`benches/matrix/*.toml`): the axes of the matrix (`[matrix]`) and the targets
//! that reach a volume (`[[target]]`), each with what to start for it (`[[target.start]]`).
//! Every table rejects unknown keys; every check that can be made without running anything
//! (engines, block sizes against the volume's, queue depths, what each engine needs) is made
//! here, so a bad spec fails before a daemon starts, with the key's path and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, parse_toml};
use ferroblk_bdev::types::parse_size;

/// The whole spec file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The axes and run settings.
    pub matrix: Matrix,
    /// The ways to reach a volume, run in turn for every cell.
    #[serde(rename = "target")]
    pub targets: Vec<Target>,
    /// What to start for several targets (a daemon exporting one volume twice); each target's
    /// own `start` is for what only it needs. Everything starts before the first run and stops
    /// after the last.
    #[serde(default)]
    pub start: Vec<Service>,
}

/// `[matrix]`: what every target runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    /// The matrix's name (reports' titles).
    pub name: String,
    /// One line on what it measures.
    #[serde(default)]
    pub description: String,
    /// Access patterns: fio `rw` values; `randrw:70` / `rw:70` set `rwmixread`.
    pub rw: Vec<String>,
    /// Block sizes (`4K`, `128K`, `1M`, or bytes).
    pub bs: Vec<String>,
    /// Queue depths (fio `iodepth`).
    pub iodepth: Vec<u32>,
    /// Jobs per cell (fio `numjobs`, reported as one group).
    #[serde(default = "one_job")]
    pub numjobs: Vec<u32>,
    /// Measured seconds per run.
    pub runtime: f64,
    /// Unmeasured seconds before each run (fio `ramp_time`).
    #[serde(default)]
    pub ramp: f64,
    /// Runs per cell; reports keep the median, minimum and maximum.
    #[serde(default = "three")]
    pub repeats: u32,
    /// fio options added to every run (`key = value`).
    #[serde(default)]
    pub fio: BTreeMap<String, toml::Value>,
    /// ferroblk's fio engine (`libferroblk_fio.so`) when it is not beside the `ferroblk`
    /// binary; `--engine-lib` overrides it.
    pub engine_lib: Option<PathBuf>,
}

fn one_job() -> Vec<u32> {
    vec![1]
}

fn three() -> u32 {
    3
}

/// How fio reaches a target's volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// ferroblk's fio engine driving a bdev chain in-process (`ferroblk_mode=bdev`).
    Bdev,
    /// ferroblk's fio engine as an NVMe/TCP host (`ferroblk_mode=nvmf`).
    Nvmf,
    /// ferroblk's fio engine as a vhost-user-blk front-end through libblkio (`ferroblk_mode=vhost`).
    Vhost,
    /// fio's `io_uring` engine on a file or block device.
    IoUring,
    /// fio's `libaio` engine on a file or block device.
    Libaio,
    /// fio inside the QEMU guest lab (`tests/lab/lab.sh`), on the guest kernel's block device
    /// for the volume: a vhost-user-blk disk (`socket`: virtio-blk, `/dev/vdX`) or an NVMe/TCP
    /// namespace the guest connects to (`traddr`/`trsvcid`/`subnqn`/`ns`: `/dev/nvmeXnY`).
    Guest,
}

impl Engine {
    /// The name in specs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Bdev => "bdev",
            Engine::Nvmf => "nvmf",
            Engine::Vhost => "vhost",
            Engine::IoUring => "io_uring",
            Engine::Libaio => "libaio",
            Engine::Guest => "guest",
        }
    }

    /// Whether it is ferroblk's external engine (`libferroblk_fio.so`).
    pub fn is_external(self) -> bool {
        matches!(self, Engine::Bdev | Engine::Nvmf | Engine::Vhost)
    }
}

/// `[[target]]`: one way to reach a volume.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Name in reports and result files (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// `bdev`, `nvmf`, `vhost`, `io_uring`, `libaio` or `guest`.
    pub engine: Engine,
    /// The volume's logical block size: every `bs` must be a multiple of it.
    #[serde(default = "default_block_size")]
    pub block_size: u64,
    /// io_uring/libaio: the file or block device.
    pub filename: Option<String>,
    /// The region fio works on (`64MiB`); io_uring/libaio on a file that does not exist: its
    /// size (fio lays it out).
    pub size: Option<String>,
    /// io_uring/libaio/guest: O_DIRECT (default true).
    pub direct: Option<bool>,
    /// bdev: the ferroblk configuration the engine opens (a file; `{run}` replaced).
    pub ferroblk_config: Option<String>,
    /// bdev: the same, inline.
    pub ferroblk_toml: Option<String>,
    /// bdev: the bdev to drive.
    pub bdev: Option<String>,
    /// vhost, guest: the vhost-user-blk socket (guest: attached as a virtio-blk disk).
    pub socket: Option<String>,
    /// nvmf, guest: the controller's address (loopback only; the guest reaches the host's
    /// 127.0.0.1 as 10.0.2.2).
    pub traddr: Option<String>,
    /// nvmf, guest: its port.
    pub trsvcid: Option<u16>,
    /// nvmf, guest: the subsystem NQN.
    pub subnqn: Option<String>,
    /// nvmf, guest: the namespace (default 1).
    pub ns: Option<u32>,
    /// guest: fio's engine in the guest, `libaio` (default) or `io_uring`.
    pub guest_engine: Option<Engine>,
    /// guest, vhost-user-blk disk: its virtqueues (default 1).
    pub num_queues: Option<u32>,
    /// The job counts of `matrix.numjobs` this target runs (default: all). A vhost-user-blk
    /// back-end serves one front-end at a time, so a vhost target takes one job.
    pub numjobs: Option<Vec<u32>>,
    /// fio options added to this target's runs (`key = value`).
    #[serde(default)]
    pub fio: BTreeMap<String, toml::Value>,
    /// What to start before the first run and stop after the last.
    #[serde(default)]
    pub start: Vec<Service>,
}

fn default_block_size() -> u64 {
    512
}

/// `[[target.start]]`: a process the target needs: a ferroblk daemon, or a peer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// A ferroblk daemon on this configuration file (`{run}` replaced), ready at `READY=1`.
    pub ferroblk_config: Option<String>,
    /// A ferroblk daemon on this configuration, inline.
    pub ferroblk_toml: Option<String>,
    /// A peer: program and arguments (`{run}` replaced).
    pub command: Option<Vec<String>>,
    /// A peer is ready when this path exists (a socket it creates).
    pub ready_path: Option<String>,
    /// A peer is ready when this loopback address accepts TCP connections.
    pub ready_tcp: Option<String>,
}

/// One access pattern of the `rw` axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rw {
    /// fio's `rw`.
    pub mode: String,
    /// fio's `rwmixread`, for mixes.
    pub mix_read: Option<u32>,
}

impl Rw {
    const MODES: [&'static str; 6] = ["read", "write", "randread", "randwrite", "rw", "randrw"];

    fn parse(text: &str) -> Result<Rw, String> {
        let (mode, mix) = match text.split_once(':') {
            Some((m, p)) => (m, Some(p)),
            None => (text, None),
        };
        if !Rw::MODES.contains(&mode) {
            return Err(format!(
                "unknown access pattern '{mode}', expected one of {}",
                Rw::MODES.join(", ")
            ));
        }
        let mix_read = match mix {
            None => None,
            Some(_) if !matches!(mode, "rw" | "randrw") => {
                return Err(format!(
                    "'{text}': only rw and randrw take a read percentage"
                ));
            }
            Some(p) => match p.parse::<u32>() {
                Ok(p) if p <= 100 => Some(p),
                _ => return Err(format!("'{text}': the read percentage is 0 to 100")),
            },
        };
        Ok(Rw {
            mode: mode.into(),
            mix_read,
        })
    }

    /// As written in specs and reports (`randrw:70`).
    pub fn label(&self) -> String {
        match self.mix_read {
            Some(p) => format!("{}:{p}", self.mode),
            None => self.mode.clone(),
        }
    }
}

/// A block size as reports write it (`4K`, `1M`, `1536`).
pub fn bs_label(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

/// One point of the matrix, for every target: pattern, block size, queue depth, jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Access pattern.
    pub rw: Rw,
    /// Bytes per I/O.
    pub bs: u64,
    /// fio `iodepth`.
    pub iodepth: u32,
    /// fio `numjobs`.
    pub numjobs: u32,
}

/// A spec that parsed and passed every check, with its axes decoded.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The spec as written.
    pub spec: Spec,
    /// The file it came from.
    pub file: PathBuf,
    /// Decoded `rw` axis.
    pub rw: Vec<Rw>,
    /// Decoded `bs` axis (bytes).
    pub bs: Vec<u64>,
    /// `size` of each target, in bytes, when given.
    pub sizes: Vec<Option<u64>>,
}

impl Checked {
    /// Every point, in run order: pattern, then jobs, then block size, then queue depth.
    pub fn points(&self) -> Vec<Point> {
        let m = &self.spec.matrix;
        let mut v = Vec::new();
        for rw in &self.rw {
            for &numjobs in &m.numjobs {
                for &bs in &self.bs {
                    for &iodepth in &m.iodepth {
                        v.push(Point {
                            rw: rw.clone(),
                            bs,
                            iodepth,
                            numjobs,
                        });
                    }
                }
            }
        }
        v
    }

    /// Whether target `ti` runs at `p` (its `numjobs`, if it lists them).
    pub fn applies(&self, ti: usize, p: &Point) -> bool {
        self.spec.targets[ti]
            .numjobs
            .as_ref()
            .is_none_or(|j| j.contains(&p.numjobs))
    }

    /// Whether any target uses ferroblk's external fio engine.
    pub fn needs_engine_lib(&self) -> bool {
        self.spec.targets.iter().any(|t| t.engine.is_external())
    }

    /// Whether any target runs fio in the guest lab.
    pub fn needs_guest(&self) -> bool {
        self.spec.targets.iter().any(|t| t.engine == Engine::Guest)
    }
}

/// Settings given on the command line in place of the spec's (a shortened run); they are part
/// of what the spec's hash covers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// `matrix.runtime`.
    pub runtime: Option<f64>,
    /// `matrix.ramp`.
    pub ramp: Option<f64>,
    /// `matrix.repeats`.
    pub repeats: Option<u32>,
}

impl Overrides {
    /// Checks the values as the spec's own would be; the error names the option.
    pub fn check(&self) -> Result<(), String> {
        if let Some(r) = self.runtime
            && !(0.5..=86_400.0).contains(&r)
        {
            return Err(format!("--runtime {r}: must be 0.5 to 86400 seconds"));
        }
        if let Some(r) = self.ramp
            && !(0.0..=86_400.0).contains(&r)
        {
            return Err(format!("--ramp {r}: must be 0 to 86400 seconds"));
        }
        if let Some(n) = self.repeats
            && !(1..=1000).contains(&n)
        {
            return Err(format!("--repeats {n}: must be 1 to 1000"));
        }
        Ok(())
    }
}

/// Reads and checks a spec file, with `ov` in place of its settings.
pub fn load_with(file: &Path, ov: &Overrides) -> Result<Checked, ConfigError> {
    let mut c = load(file)?;
    let m = &mut c.spec.matrix;
    m.runtime = ov.runtime.unwrap_or(m.runtime);
    m.ramp = ov.ramp.unwrap_or(m.ramp);
    m.repeats = ov.repeats.unwrap_or(m.repeats);
    Ok(c)
}

/// Reads and checks a spec file.
pub fn load(file: &Path) -> Result<Checked, ConfigError> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: name.clone(),
        line: None,
        path: "(file)".into(),
        message: e.to_string(),
    })?;
    let mut c = parse(&text, &name)?;
    c.file = file.to_path_buf();
    Ok(c)
}

/// Parses and checks spec `text`; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Checked, ConfigError> {
    let spec: Spec = parse_toml(text, file)?;
    check(spec, file).map_err(|(path, message)| ConfigError::at(text, file, path, message))
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// The checks beyond the shape of the file; an error is (field path, message).
fn check(spec: Spec, file: &str) -> Result<Checked, (String, String)> {
    let m = &spec.matrix;
    let e = |p: &str, msg: String| Err((p.to_string(), msg));
    if !name_ok(&m.name) {
        return e(
            "matrix.name",
            "letters, digits, '-', '_' and '.' only".into(),
        );
    }
    for (key, empty) in [
        ("rw", m.rw.is_empty()),
        ("bs", m.bs.is_empty()),
        ("iodepth", m.iodepth.is_empty()),
        ("numjobs", m.numjobs.is_empty()),
    ] {
        if empty {
            return e(&format!("matrix.{key}"), "empty axis".into());
        }
    }
    let mut rw = Vec::new();
    for (i, r) in m.rw.iter().enumerate() {
        let parsed = Rw::parse(r).map_err(|msg| (format!("matrix.rw[{i}]"), msg))?;
        if rw.contains(&parsed) {
            return e(&format!("matrix.rw[{i}]"), format!("'{r}' is listed twice"));
        }
        rw.push(parsed);
    }
    let mut bs = Vec::new();
    for (i, b) in m.bs.iter().enumerate() {
        let bytes = match parse_size(b) {
            Some(n) if n > 0 && n <= 64 << 20 => n,
            _ => {
                return e(
                    &format!("matrix.bs[{i}]"),
                    format!("'{b}' is not a block size from 1 byte to 64M (4K, 128K, 1M)"),
                );
            }
        };
        if bs.contains(&bytes) {
            return e(&format!("matrix.bs[{i}]"), format!("'{b}' is listed twice"));
        }
        bs.push(bytes);
    }
    for (i, &q) in m.iodepth.iter().enumerate() {
        if q == 0 || q > 65536 {
            return e(
                &format!("matrix.iodepth[{i}]"),
                format!("queue depth {q}: must be 1 to 65536"),
            );
        }
        if m.iodepth[..i].contains(&q) {
            return e(
                &format!("matrix.iodepth[{i}]"),
                format!("{q} is listed twice"),
            );
        }
    }
    for (i, &j) in m.numjobs.iter().enumerate() {
        if j == 0 || j > 1024 {
            return e(
                &format!("matrix.numjobs[{i}]"),
                format!("{j} jobs: must be 1 to 1024"),
            );
        }
        if m.numjobs[..i].contains(&j) {
            return e(
                &format!("matrix.numjobs[{i}]"),
                format!("{j} is listed twice"),
            );
        }
    }
    if !(m.runtime >= 0.5 && m.runtime <= 86_400.0) {
        return e(
            "matrix.runtime",
            format!("{} s: must be 0.5 to 86400 seconds", m.runtime),
        );
    }
    if !(m.ramp >= 0.0 && m.ramp <= 86_400.0) {
        return e(
            "matrix.ramp",
            format!("{} s: must be 0 to 86400 seconds", m.ramp),
        );
    }
    if m.repeats == 0 || m.repeats > 1000 {
        return e(
            "matrix.repeats",
            format!("{}: must be 1 to 1000", m.repeats),
        );
    }
    check_fio_options("matrix.fio", &m.fio)?;
    if spec.targets.is_empty() {
        return e("target", "no [[target]]: nothing to measure".into());
    }
    let mut sizes = Vec::new();
    for (i, t) in spec.targets.iter().enumerate() {
        let p = |f: &str| format!("target[{i}].{f}");
        if !name_ok(&t.name) {
            return Err((p("name"), "letters, digits, '-', '_' and '.' only".into()));
        }
        if spec.targets[..i].iter().any(|o| o.name == t.name) {
            return Err((p("name"), format!("'{}' is used by another target", t.name)));
        }
        if t.block_size == 0 || !t.block_size.is_power_of_two() || t.block_size > 1 << 20 {
            return Err((
                p("block_size"),
                format!("{}: a power of two (512, 4096)", t.block_size),
            ));
        }
        for (j, &b) in bs.iter().enumerate() {
            if !b.is_multiple_of(t.block_size) {
                return Err((
                    format!("matrix.bs[{j}]"),
                    format!(
                        "{} is not a multiple of the block size of target '{}' ({})",
                        m.bs[j], t.name, t.block_size
                    ),
                ));
            }
        }
        let size = match &t.size {
            None => None,
            Some(s) => match parse_size(s) {
                Some(n) if n > 0 && n.is_multiple_of(t.block_size) => Some(n),
                _ => {
                    return Err((
                        p("size"),
                        format!("'{s}' is not a size that is a multiple of the block size"),
                    ));
                }
            },
        };
        if let Some(size) = size
            && let Some(&big) = bs.iter().max()
            && big > size
        {
            return Err((
                p("size"),
                format!(
                    "{} is smaller than the largest bs ({})",
                    bs_label(size),
                    bs_label(big)
                ),
            ));
        }
        sizes.push(size);
        // What each engine takes, and what it must have.
        let given: [(&str, bool); 12] = [
            ("filename", t.filename.is_some()),
            ("direct", t.direct.is_some()),
            ("ferroblk_config", t.ferroblk_config.is_some()),
            ("ferroblk_toml", t.ferroblk_toml.is_some()),
            ("bdev", t.bdev.is_some()),
            ("socket", t.socket.is_some()),
            ("traddr", t.traddr.is_some()),
            ("trsvcid", t.trsvcid.is_some()),
            ("subnqn", t.subnqn.is_some()),
            ("ns", t.ns.is_some()),
            ("guest_engine", t.guest_engine.is_some()),
            ("num_queues", t.num_queues.is_some()),
        ];
        let (takes, needs): (&[&str], &[&str]) = match t.engine {
            Engine::IoUring | Engine::Libaio => (&["filename", "direct"], &["filename"]),
            Engine::Bdev => (&["ferroblk_config", "ferroblk_toml", "bdev"], &["bdev"]),
            Engine::Vhost => (&["socket"], &["socket"]),
            Engine::Nvmf => (
                &["traddr", "trsvcid", "subnqn", "ns"],
                &["traddr", "trsvcid", "subnqn"],
            ),
            // The volume's way into the guest is checked below: a socket or an NVMe/TCP target.
            Engine::Guest => (
                &[
                    "socket",
                    "traddr",
                    "trsvcid",
                    "subnqn",
                    "ns",
                    "direct",
                    "guest_engine",
                    "num_queues",
                ],
                &[],
            ),
        };
        for (key, set) in given {
            if set && !takes.contains(&key) {
                return Err((p(key), format!("not used by engine '{}'", t.engine.name())));
            }
        }
        for key in needs {
            if !given.iter().any(|(k, set)| k == key && *set) {
                return Err((
                    p(key),
                    format!("missing: engine '{}' needs it", t.engine.name()),
                ));
            }
        }
        if t.engine == Engine::Bdev {
            match (&t.ferroblk_config, &t.ferroblk_toml) {
                (Some(_), Some(_)) => {
                    return Err((
                        p("ferroblk_toml"),
                        "give ferroblk_config or ferroblk_toml, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err((
                        p("ferroblk_config"),
                        "missing: engine 'bdev' needs ferroblk_config or ferroblk_toml".into(),
                    ));
                }
                _ => {}
            }
        }
        if t.engine == Engine::Guest {
            check_guest(t).map_err(|(f, msg)| (p(f), msg))?;
        }
        if let Some(a) = &t.traddr {
            match a.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_loopback() => {}
                _ => {
                    return Err((
                        p("traddr"),
                        format!("'{a}': only a loopback address (127.0.0.0/8, ::1)"),
                    ));
                }
            }
        }
        if t.ns == Some(0) {
            return Err((p("ns"), "namespace IDs start at 1".into()));
        }
        if t.trsvcid == Some(0) {
            return Err((p("trsvcid"), "port 0".into()));
        }
        check_fio_options(&p("fio"), &t.fio)?;
        if let Some(jobs) = &t.numjobs {
            if jobs.is_empty() {
                return Err((p("numjobs"), "empty: the target would never run".into()));
            }
            for (k, j) in jobs.iter().enumerate() {
                if !m.numjobs.contains(j) {
                    return Err((
                        format!("target[{i}].numjobs[{k}]"),
                        format!("{j} is not in matrix.numjobs"),
                    ));
                }
            }
        }
        check_starts(&format!("target[{i}].start"), &t.start)?;
    }
    check_starts("start", &spec.start)?;
    Ok(Checked {
        spec,
        file: PathBuf::from(file),
        rw,
        bs,
        sizes,
    })
}

/// The guest engine's own rules; an error is (field, message).
fn check_guest(t: &Target) -> Result<(), (&'static str, String)> {
    let nvme = [t.traddr.is_some(), t.trsvcid.is_some(), t.subnqn.is_some()];
    match (t.socket.is_some(), nvme.iter().any(|&b| b)) {
        (true, true) => {
            let f = ["traddr", "trsvcid", "subnqn"][nvme.iter().position(|&b| b).unwrap_or(0)];
            return Err((
                f,
                "a guest target reaches its volume by a vhost-user-blk socket or by NVMe/TCP, \
                 not both"
                    .into(),
            ));
        }
        (false, false) => {
            return Err((
                "socket",
                "missing: engine 'guest' needs socket (vhost-user-blk) or traddr, trsvcid and \
                 subnqn (NVMe/TCP)"
                    .into(),
            ));
        }
        (false, true) => {
            for (f, set) in ["traddr", "trsvcid", "subnqn"].into_iter().zip(nvme) {
                if !set {
                    return Err((f, "missing: an NVMe/TCP guest target needs it".into()));
                }
            }
            if t.traddr.as_deref() != Some("127.0.0.1") {
                return Err((
                    "traddr",
                    "a guest reaches only the host's 127.0.0.1 (as 10.0.2.2): give 127.0.0.1"
                        .into(),
                ));
            }
            if t.num_queues.is_some() {
                return Err(("num_queues", "only for a vhost-user-blk disk".into()));
            }
        }
        (true, false) => {
            if t.ns.is_some() {
                return Err(("ns", "only for an NVMe/TCP guest target".into()));
            }
        }
    }
    if let Some(e) = t.guest_engine
        && !matches!(e, Engine::Libaio | Engine::IoUring)
    {
        return Err((
            "guest_engine",
            format!("'{}': fio in the guest runs libaio or io_uring", e.name()),
        ));
    }
    if let Some(q) = t.num_queues
        && !(1..=64).contains(&q)
    {
        return Err(("num_queues", format!("{q}: 1 to 64 virtqueues")));
    }
    Ok(())
}

/// Checks `[[start]]` entries at `prefix` (`start`, `target[0].start`).
fn check_starts(prefix: &str, starts: &[Service]) -> Result<(), (String, String)> {
    for (k, s) in starts.iter().enumerate() {
        let sp = |f: &str| format!("{prefix}[{k}].{f}");
        let kinds = [
            s.ferroblk_config.is_some(),
            s.ferroblk_toml.is_some(),
            s.command.is_some(),
        ];
        match kinds.iter().filter(|&&b| b).count() {
            1 => {}
            0 => {
                return Err((
                    format!("{prefix}[{k}]"),
                    "give one of ferroblk_config, ferroblk_toml, command".into(),
                ));
            }
            _ => {
                return Err((
                    format!("{prefix}[{k}]"),
                    "give only one of ferroblk_config, ferroblk_toml, command".into(),
                ));
            }
        }
        if let Some(cmd) = &s.command {
            if cmd.is_empty() || cmd[0].is_empty() {
                return Err((sp("command"), "empty command".into()));
            }
            if s.ready_path.is_none() && s.ready_tcp.is_none() {
                return Err((
                    sp("command"),
                    "a peer needs ready_path or ready_tcp to know it is up".into(),
                ));
            }
        } else if s.ready_path.is_some() || s.ready_tcp.is_some() {
            let f = if s.ready_path.is_some() {
                "ready_path"
            } else {
                "ready_tcp"
            };
            return Err((
                sp(f),
                "a ferroblk daemon is ready when it says so (READY=1): only for a command".into(),
            ));
        }
        if let Some(a) = &s.ready_tcp {
            match a.parse::<std::net::SocketAddr>() {
                Ok(sa) if sa.ip().is_loopback() => {}
                _ => {
                    return Err((
                        sp("ready_tcp"),
                        format!("'{a}': a loopback ADDRESS:PORT (127.0.0.1:4420)"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The options the runner sets itself: a spec's `fio` tables may not override them.
const RUNNER_OPTIONS: [&str; 16] = [
    "name",
    "ioengine",
    "filename",
    "rw",
    "rwmixread",
    "bs",
    "iodepth",
    "numjobs",
    "runtime",
    "ramp_time",
    "time_based",
    "output-format",
    "output",
    "group_reporting",
    "size",
    "direct",
];

fn check_fio_options(
    path: &str,
    opts: &BTreeMap<String, toml::Value>,
) -> Result<(), (String, String)> {
    for (k, v) in opts {
        if RUNNER_OPTIONS.contains(&k.as_str()) || k.starts_with("ferroblk_") {
            return Err((
                format!("{path}.{k}"),
                "set by the runner from the matrix and the target".into(),
            ));
        }
        if fio_value(v).is_none() {
            return Err((
                format!("{path}.{k}"),
                "a string, integer, float or boolean".into(),
            ));
        }
    }
    Ok(())
}

/// A fio option's value on the command line.
pub fn fio_value(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(u8::from(*b).to_string()),
        _ => None,
    }
}

/// A `[matrix]` table of one cell (randread, 4K, QD 1, 1 s), for tests' specs.
#[cfg(test)]
pub const ONE_CELL: &str = r#"
[matrix]
name = "t"
rw = ["randread"]
bs = ["4K"]
iodepth = [1]
runtime = 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[matrix]
name = "t"
rw = ["randread", "randrw:70"]
bs = ["4K", "128K"]
iodepth = [1, 32]
numjobs = [1, 2]
runtime = 2
ramp = 1
repeats = 2

[[target]]
name = "file"
engine = "io_uring"
filename = "{run}/f.img"
size = "64MiB"

[[target]]
name = "ferroblk"
engine = "vhost"
block_size = 4096
socket = "{run}/vhost.sock"
[[target.start]]
ferroblk_toml = "x"
"#;

    fn err(text: &str) -> ConfigError {
        parse(text, "s.toml").expect_err("must be refused")
    }

    #[test]
    fn good_spec_decodes_every_axis() {
        let c = parse(GOOD, "s.toml").unwrap();
        assert_eq!(c.bs, vec![4096, 128 << 10]);
        assert_eq!(c.rw[1].mix_read, Some(70));
        assert_eq!(c.rw[1].label(), "randrw:70");
        assert_eq!(c.points().len(), 2 * 2 * 2 * 2);
        assert_eq!((c.points()[1].bs, c.points()[1].iodepth), (4096, 32));
        assert_eq!(c.sizes[0], Some(64 << 20));
        assert!(c.needs_engine_lib());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = err(&GOOD.replace("ramp = 1", "ramp = 1\nrepeat = 3"));
        assert_eq!(e.path, "matrix.repeat");
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.line, Some(10));
        let e = err(&GOOD.replace("ferroblk_toml = \"x\"", "ferroblk_tom = \"x\""));
        assert_eq!(e.path, "target[1].start[0].ferroblk_tom");
    }

    #[test]
    fn unknown_engine_is_refused() {
        let e = err(&GOOD.replace("\"io_uring\"", "\"spdk\""));
        assert_eq!(e.path, "target[0].engine");
        assert!(e.message.contains("unknown variant `spdk`"), "{e}");
    }

    #[test]
    fn block_size_not_a_multiple_of_the_volume_is_refused() {
        let e = err(&GOOD.replace("[\"4K\", \"128K\"]", "[\"4K\", \"2K\"]"));
        assert_eq!(e.path, "matrix.bs[1]");
        assert!(e.message.contains("target 'ferroblk' (4096)"), "{e}");
        assert_eq!(e.line, Some(5));
    }

    #[test]
    fn queue_depth_zero_is_refused() {
        let e = err(&GOOD.replace("[1, 32]", "[1, 0]"));
        assert_eq!(e.path, "matrix.iodepth[1]");
        let e = err(&GOOD.replace("numjobs = [1, 2]", "numjobs = [0]"));
        assert_eq!(e.path, "matrix.numjobs[0]");
    }

    #[test]
    fn bad_axes_and_settings_are_refused() {
        assert_eq!(
            err(&GOOD.replace("\"randrw:70\"", "\"randrw:170\"")).path,
            "matrix.rw[1]"
        );
        assert_eq!(
            err(&GOOD.replace("\"randrw:70\"", "\"randread:70\"")).path,
            "matrix.rw[1]"
        );
        assert_eq!(
            err(&GOOD.replace("\"randrw:70\"", "\"trim\"")).path,
            "matrix.rw[1]"
        );
        assert_eq!(
            err(&GOOD.replace("\"128K\"", "\"4k\"")).path,
            "matrix.bs[1]"
        );
        assert_eq!(
            err(&GOOD.replace("\"128K\"", "\"1.5K\"")).path,
            "matrix.bs[1]"
        );
        assert_eq!(
            err(&GOOD.replace("runtime = 2", "runtime = 0")).path,
            "matrix.runtime"
        );
        assert_eq!(
            err(&GOOD.replace("repeats = 2", "repeats = 0")).path,
            "matrix.repeats"
        );
        assert_eq!(
            err(&GOOD.replace("rw = [\"randread\", \"randrw:70\"]", "rw = []")).path,
            "matrix.rw"
        );
        let e = err(&GOOD.replace("ramp = 1", "ramp = 1\nfio = { bs = \"8k\" }"));
        assert_eq!(e.path, "matrix.fio.bs");
    }

    #[test]
    fn engine_fields_are_checked() {
        let e = err(&GOOD.replace("socket = \"{run}/vhost.sock\"", ""));
        assert_eq!(e.path, "target[1].socket");
        assert!(e.message.contains("missing"), "{e}");
        let e = err(&GOOD.replace("size = \"64MiB\"", "size = \"64MiB\"\nsocket = \"x\""));
        assert_eq!(e.path, "target[0].socket");
        assert!(e.message.contains("not used by engine 'io_uring'"), "{e}");
        let e = err(&GOOD.replace("\"io_uring\"", "\"nvmf\""));
        assert_eq!(e.path, "target[0].filename");
        let nvmf = GOOD.replace(
            "engine = \"vhost\"\nblock_size = 4096\nsocket = \"{run}/vhost.sock\"",
            "engine = \"nvmf\"\nblock_size = 4096\ntraddr = \"10.0.0.1\"\ntrsvcid = 4420\nsubnqn = \"nqn.x\"",
        );
        assert_eq!(err(&nvmf).path, "target[1].traddr");
        assert!(parse(&nvmf.replace("10.0.0.1", "127.0.0.1"), "s").is_ok());
    }

    #[test]
    fn guest_targets_take_a_socket_or_an_nvme_tcp_target() {
        let guest = GOOD.replace(
            "engine = \"vhost\"\nblock_size = 4096\nsocket = \"{run}/vhost.sock\"",
            "engine = \"guest\"\nblock_size = 4096\nsocket = \"{run}/vhost.sock\"",
        );
        let c = parse(&guest, "s").unwrap();
        assert!(c.needs_guest());
        let nvme = "traddr = \"127.0.0.1\"\ntrsvcid = 4420\nsubnqn = \"nqn.x\"";
        let both = guest.replace(
            "socket = \"{run}/vhost.sock\"",
            &format!("socket = \"s\"\n{nvme}"),
        );
        let e = err(&both);
        assert_eq!(e.path, "target[1].traddr");
        assert!(e.message.contains("not both"), "{e}");
        let e = err(&guest.replace("socket = \"{run}/vhost.sock\"", ""));
        assert_eq!(e.path, "target[1].socket");
        let only_nvme = guest.replace("socket = \"{run}/vhost.sock\"", nvme);
        assert!(parse(&only_nvme, "s").is_ok());
        let e = err(&only_nvme.replace("trsvcid = 4420\n", ""));
        assert_eq!(e.path, "target[1].trsvcid");
        let e = err(&only_nvme.replace("127.0.0.1", "127.0.0.2"));
        assert_eq!(e.path, "target[1].traddr");
        assert!(e.message.contains("10.0.2.2"), "{e}");
        let e = err(&only_nvme.replace("nqn.x\"", "nqn.x\"\nnum_queues = 2"));
        assert_eq!(e.path, "target[1].num_queues");
        let e = err(&guest.replace("socket = \"{run}", "ns = 1\nsocket = \"{run}"));
        assert_eq!(e.path, "target[1].ns");
        let e = err(&guest.replace(
            "socket = \"{run}",
            "guest_engine = \"vhost\"\nsocket = \"{run}",
        ));
        assert_eq!(e.path, "target[1].guest_engine");
        let e = err(&guest.replace("socket = \"{run}", "num_queues = 0\nsocket = \"{run}"));
        assert_eq!(e.path, "target[1].num_queues");
        let e = err(&guest.replace("socket = \"{run}", "bdev = \"x\"\nsocket = \"{run}"));
        assert_eq!(e.path, "target[1].bdev");
        assert!(e.message.contains("not used by engine 'guest'"), "{e}");
        // An impossible cell is refused for a guest target as for any other.
        let e = err(&guest.replace("[\"4K\", \"128K\"]", "[\"4K\", \"2K\"]"));
        assert_eq!(e.path, "matrix.bs[1]");
    }

    #[test]
    fn target_job_counts_are_within_the_axis() {
        let one = GOOD.replace(
            "socket = \"{run}/vhost.sock\"",
            "socket = \"{run}/vhost.sock\"\nnumjobs = [1]",
        );
        let c = parse(&one, "s").unwrap();
        let runs = c.points().iter().filter(|p| c.applies(1, p)).count();
        assert_eq!(runs, c.points().len() / 2);
        assert!(c.points().iter().all(|p| c.applies(0, p)));
        assert_eq!(
            err(&one.replace("numjobs = [1]\n", "numjobs = [4]\n")).path,
            "target[1].numjobs[0]"
        );
        assert_eq!(
            err(&one.replace("numjobs = [1]\n", "numjobs = []\n")).path,
            "target[1].numjobs"
        );
    }

    #[test]
    fn targets_and_starts_are_checked() {
        assert_eq!(
            err(&GOOD.replace("name = \"file\"", "name = \"ferroblk\"")).path,
            "target[1].name"
        );
        assert_eq!(
            err(&GOOD.replace("name = \"file\"", "name = \"a/b\"")).path,
            "target[0].name"
        );
        assert_eq!(
            err(&GOOD.replace("size = \"64MiB\"", "size = \"64K\"")).path,
            "target[0].size"
        );
        let e = err(&GOOD.replace(
            "ferroblk_toml = \"x\"",
            "command = [\"qemu-storage-daemon\"]",
        ));
        assert_eq!(e.path, "target[1].start[0].command");
        let e = err(&GOOD.replace(
            "ferroblk_toml = \"x\"",
            "command = [\"q\"]\nready_tcp = \"192.168.1.1:1\"",
        ));
        assert_eq!(e.path, "target[1].start[0].ready_tcp");
        let e = err(&GOOD.replace(
            "ferroblk_toml = \"x\"",
            "ferroblk_toml = \"x\"\nready_path = \"y\"",
        ));
        assert_eq!(e.path, "target[1].start[0].ready_path");
        let e = err(&GOOD.replace("ferroblk_toml = \"x\"", ""));
        assert_eq!(e.path, "target[1].start[0]");
    }

    #[test]
    fn shipped_specs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/matrix");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 5, "{n} specs in {}", dir.display());
    }

    #[test]
    fn labels() {
        assert_eq!(bs_label(4096), "4K");
        assert_eq!(bs_label(1 << 20), "1M");
        assert_eq!(bs_label(1536), "1536");
        assert_eq!(bs_label(512), "512");
    }
}
