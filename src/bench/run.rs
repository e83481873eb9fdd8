//! Running a matrix: start what the targets need, run every cell with fio (targets alternating
//! cell by cell, each cell repeated), journal each run as it ends, show progress, stop what was
//! started (also on Ctrl-C), then write the reports.

use std::io::{IsTerminal, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::fio::{self, Metrics, Resolved};
use super::guest::Guest;
use super::results::{CellKey, Dir, Header, RunRecord};
use super::spec::{Checked, Engine, Service};

/// How `bench matrix` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The results directory.
    pub out: PathBuf,
    /// ferroblk's fio engine (default: `libferroblk_fio.so` beside this program).
    pub engine_lib: Option<PathBuf>,
    /// The fio program.
    pub fio: String,
    /// Run again the cells a previous run recorded as failed.
    pub retry_failed: bool,
    /// Settings in place of the spec's.
    pub overrides: super::spec::Overrides,
    /// The command line, for the reports.
    pub command: String,
}

/// How a matrix run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every cell ran (some may have failed: see the reports).
    Done {
        /// Cells that failed.
        failed: usize,
    },
    /// Stopped by a signal; the same command resumes.
    Interrupted,
}

/// What the spec's files hold and where the engine is, checked before anything starts.
struct Environment {
    fio_version: String,
    engine_lib: Option<String>,
    /// Text of each target's bdev-engine configuration (`{run}` not yet replaced).
    bdev_configs: Vec<Option<String>>,
    /// Text of each ferroblk service's configuration, per group of [`start_groups`] and entry.
    daemon_configs: Vec<Vec<Option<String>>>,
}

/// What a spec starts, in groups: the spec's own `[[start]]` (shared by every target), then
/// each target's; with the key prefix that names them.
fn start_groups(c: &Checked) -> Vec<(String, &[Service])> {
    let mut v = vec![("start".to_string(), &c.spec.start[..])];
    for (i, t) in c.spec.targets.iter().enumerate() {
        v.push((format!("target[{i}].start"), &t.start[..]));
    }
    v
}

/// A ferroblk configuration given as a file (`file`, read; `field` names it in errors) or
/// inline (`inline`), if either.
fn config_text(
    file: &Option<String>,
    inline: &Option<String>,
    field: &str,
) -> anyhow::Result<Option<String>> {
    match (file, inline) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{field}: cannot read {path}: {e}")),
        (None, inline) => Ok(inline.clone()),
    }
}

fn on_path(prog: &str) -> bool {
    if prog.contains('/') {
        return Path::new(prog).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// The checks that need the machine: fio, the engine library, the files a spec names, peers'
/// programs. Errors name the spec's key.
fn environment(c: &Checked, o: &Options) -> anyhow::Result<Environment> {
    let file = c.file.display();
    let fio_version = fio::version(&o.fio).map_err(|e| anyhow::anyhow!("{e}"))?;
    let engine_lib = if c.needs_engine_lib() {
        let lib = match o.engine_lib.as_ref().or(c.spec.matrix.engine_lib.as_ref()) {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("locating this program")?
                .with_file_name(fio::ENGINE_LIB),
        };
        if !lib.is_file() {
            let (i, t) = c
                .spec
                .targets
                .iter()
                .enumerate()
                .find(|(_, t)| t.engine.is_external())
                .expect("needs_engine_lib");
            anyhow::bail!(
                "{file}: target[{i}].engine: '{}' is ferroblk's fio engine, and {} does not \
                 exist (build it, or give its path with --engine-lib or matrix.engine_lib)",
                t.engine.name(),
                lib.display()
            );
        }
        Some(std::fs::canonicalize(&lib)?.display().to_string())
    } else {
        None
    };
    let (bdev_configs, daemon_configs) = configs(c)?;
    Ok(Environment {
        fio_version,
        engine_lib,
        bdev_configs,
        daemon_configs,
    })
}

/// The ferroblk configurations a spec names (files read, inline text as is), per target for
/// the bdev engine and per start group for daemons, all parsed as `serve` would; and every
/// peer's program found.
type Configs = (Vec<Option<String>>, Vec<Vec<Option<String>>>);

fn configs(c: &Checked) -> anyhow::Result<Configs> {
    let file = c.file.display();
    let mut bdev_configs = Vec::new();
    for (i, t) in c.spec.targets.iter().enumerate() {
        let field = format!("{file}: target[{i}].ferroblk_config");
        bdev_configs.push(config_text(&t.ferroblk_config, &t.ferroblk_toml, &field)?);
    }
    let mut daemon_configs = Vec::new();
    for (prefix, starts) in start_groups(c) {
        let mut per = Vec::new();
        for (k, s) in starts.iter().enumerate() {
            let field = format!("{file}: {prefix}[{k}].ferroblk_config");
            per.push(config_text(&s.ferroblk_config, &s.ferroblk_toml, &field)?);
            if let Some(cmd) = &s.command
                && !on_path(&cmd[0])
            {
                anyhow::bail!(
                    "{file}: {prefix}[{k}].command: '{}' is not installed",
                    cmd[0]
                );
            }
        }
        daemon_configs.push(per);
    }
    check_configs(c, &bdev_configs, &daemon_configs)?;
    Ok((bdev_configs, daemon_configs))
}

/// Parses every ferroblk configuration a spec gives (with `{run}` standing for a scratch
/// directory) as `serve` would, so that a bad one fails before anything starts.
fn check_configs(
    c: &Checked,
    bdev_configs: &[Option<String>],
    daemon_configs: &[Vec<Option<String>>],
) -> anyhow::Result<()> {
    let file = c.file.display();
    let run = "/var/tmp/ferroblk-bench.check";
    let key = |inline: bool| {
        if inline {
            "ferroblk_toml"
        } else {
            "ferroblk_config"
        }
    };
    for (i, (t, text)) in c.spec.targets.iter().zip(bdev_configs).enumerate() {
        if let Some(text) = text {
            let field = format!("target[{i}].{}", key(t.ferroblk_toml.is_some()));
            crate::config::Config::parse(&text.replace("{run}", run), &field)
                .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        }
    }
    for ((prefix, starts), texts) in start_groups(c).into_iter().zip(daemon_configs) {
        for (k, (s, text)) in starts.iter().zip(texts).enumerate() {
            if let Some(text) = text {
                let field = format!("{prefix}[{k}].{}", key(s.ferroblk_toml.is_some()));
                crate::config::Config::parse(&text.replace("{run}", run), &field)
                    .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// The spec's hash: CRC-64/NVME over the spec as parsed and the text of every file it names.
fn spec_hash(c: &Checked, env: &Environment) -> String {
    let mut bytes = serde_json::to_vec(&c.spec).unwrap_or_default();
    for t in env.bdev_configs.iter().flatten() {
        bytes.extend_from_slice(t.as_bytes());
    }
    for t in env.daemon_configs.iter().flatten().flatten() {
        bytes.extend_from_slice(t.as_bytes());
    }
    format!(
        "{:016x}",
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &bytes)
    )
}

/// A started process a target needs.
struct Running {
    what: String,
    child: Child,
    log: PathBuf,
    /// A daemon's readiness socket, kept open so that its `STOPPING=1` finds it.
    _notify: Option<UnixDatagram>,
    /// How to start it again after it died.
    start: Start,
}

#[derive(Clone)]
enum Start {
    Ferroblk {
        config: PathBuf,
        notify: PathBuf,
    },
    Peer {
        argv: Vec<String>,
        ready_path: Option<String>,
        ready_tcp: Option<String>,
    },
}

/// The last lines of a log, for a failure's message.
pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

impl Running {
    fn spawn(
        what: String,
        start: Start,
        log: PathBuf,
        stop: &AtomicBool,
    ) -> anyhow::Result<Running> {
        let logf =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match &start {
            Start::Ferroblk { config, notify } => {
                let mut c = Command::new(std::env::current_exe()?);
                c.arg("serve").arg("--config").arg(config);
                c.env("NOTIFY_SOCKET", notify);
                c
            }
            Start::Peer { argv, .. } => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        // Its own process group: a Ctrl-C on the terminal reaches the runner only, which stops
        // everything in order.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let notify = match &start {
            Start::Ferroblk { notify, .. } => {
                let _ = std::fs::remove_file(notify);
                let s = UnixDatagram::bind(notify)
                    .with_context(|| format!("binding {}", notify.display()))?;
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Some(s)
            }
            Start::Peer { .. } => None,
        };
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let mut r = Running {
            what,
            child,
            log,
            _notify: None,
            start,
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = r.child.try_wait()? {
                anyhow::bail!("{} exited at start ({st}): {}", r.what, tail(&r.log, 5));
            }
            let ready = match (&r.start, &notify) {
                (Start::Ferroblk { .. }, Some(s)) => {
                    let mut buf = [0u8; 512];
                    matches!(s.recv(&mut buf), Ok(n) if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1"))
                }
                (
                    Start::Peer {
                        ready_path,
                        ready_tcp,
                        ..
                    },
                    _,
                ) => {
                    ready_path.as_ref().is_none_or(|p| Path::new(p).exists())
                        && ready_tcp.as_ref().is_none_or(|a| {
                            a.parse()
                                .ok()
                                .and_then(|sa| {
                                    std::net::TcpStream::connect_timeout(
                                        &sa,
                                        Duration::from_millis(200),
                                    )
                                    .ok()
                                })
                                .is_some()
                        })
                }
                _ => false,
            };
            if ready {
                r._notify = notify;
                return Ok(r);
            }
            if stop.load(Ordering::Relaxed) || t0.elapsed() > Duration::from_secs(60) {
                let why = if stop.load(Ordering::Relaxed) {
                    "interrupted"
                } else {
                    "not ready after 60 s"
                };
                r.stop();
                anyhow::bail!("{}: {why}: {}", r.what, tail(&r.log, 5));
            }
            if matches!(r.start, Start::Peer { .. }) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Why it is gone, if it is.
    fn died(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!("{} died ({st}): {}", self.what, tail(&self.log, 5))),
            Ok(None) => None,
            Err(e) => Some(format!("{}: {e}", self.what)),
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        terminate(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for Running {
    /// A runner that ends early (an error, a panic) stops what it started all the same.
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM to `child`, SIGKILL if it has not exited within `grace`; reaped either way.
pub(super) fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: `kill(2)` on the PID of a child we spawned and have not yet reaped (it cannot
    // have been reused); no memory is involved.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A target's processes.
struct TargetProcs {
    procs: Vec<Running>,
    /// Why the target cannot run (a start that failed).
    broken: Option<String>,
}

impl TargetProcs {
    fn stop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            p.stop();
        }
    }

    /// Restarts what died; returns what died, if anything.
    fn check(&mut self, stop: &AtomicBool) -> Option<String> {
        let mut died = None;
        for p in &mut self.procs {
            if let Some(why) = p.died() {
                // The dead peer's socket would pass for the new one's readiness.
                if let Start::Peer {
                    ready_path: Some(path),
                    ..
                } = &p.start
                    && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
                {
                    let _ = std::fs::remove_file(path);
                }
                match Running::spawn(p.what.clone(), p.start.clone(), p.log.clone(), stop) {
                    Ok(n) => *p = n,
                    Err(e) => self.broken = Some(format!("{why}; restart failed: {e:#}")),
                }
                died = Some(why);
            }
        }
        died
    }
}

/// Progress: a bar on a terminal, a line per run otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    skipped: u64,
    started: Instant,
}

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Progress {
    fn new(total: u64, skipped: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} run {pos}/{len} {elapsed_precise} ETA {eta_precise} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_position(skipped);
            b
        });
        Progress {
            bar,
            total,
            done: skipped,
            skipped,
            started: Instant::now(),
        }
    }

    fn step(&mut self, msg: String) {
        self.done += 1;
        let elapsed = self.started.elapsed();
        let ran = self.done - self.skipped;
        let eta = elapsed.mul_f64((self.total - self.done) as f64 / ran.max(1) as f64);
        match &self.bar {
            Some(b) => {
                b.set_position(self.done);
                b.set_message(msg);
            }
            None => eprintln!(
                "[{}/{}] {} elapsed, ETA {}: {msg}",
                self.done,
                self.total,
                hms(elapsed),
                hms(eta)
            ),
        }
    }

    /// A run not made (its cell failed earlier).
    fn skip(&mut self) {
        self.done += 1;
        self.skipped += 1;
        if let Some(b) = &self.bar {
            b.set_position(self.done);
        }
    }

    fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A scratch directory for sockets and files (`{run}`): short paths (socket names are limited to
/// 107 bytes) on a disk (O_DIRECT), removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let base = Path::new("/var/tmp");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let p = base.join(format!("ferroblk-bench.{}.{nanos:x}", std::process::id()));
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn short(m: &Metrics) -> String {
    let iops = if m.iops >= 1e6 {
        format!("{:.2}M", m.iops / 1e6)
    } else if m.iops >= 1e3 {
        format!("{:.1}k", m.iops / 1e3)
    } else {
        format!("{:.0}", m.iops)
    };
    format!(
        "{iops} IOPS, {:.1} MiB/s, p99 {:.0} µs",
        m.bw_mib_s, m.p99_us
    )
}

/// Runs one fio, killing it past `limit` or on `stop`; (stdout, stderr, success) or the reason.
fn run_fio(
    fio: &str,
    args: &[String],
    limit: Duration,
    stop: &AtomicBool,
) -> Result<(String, String, bool), String> {
    let mut child = Command::new(fio)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {fio}: {e}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let mut killed = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for fio: {e}")),
        }
        if killed.is_none() {
            if stop.load(Ordering::Relaxed) {
                killed = Some("interrupted");
            } else if t0.elapsed() > limit {
                killed = Some("timed out");
            }
            if killed.is_some() {
                terminate(&mut child, Duration::from_secs(5));
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if let Some(why) = killed {
        return Err(format!(
            "fio {why} after {:.0} s",
            t0.elapsed().as_secs_f64()
        ));
    }
    Ok((stdout, stderr, status.success()))
}

/// fio's own words on a failure: its stderr's last lines, without blank ones.
fn fio_message(stderr: &str, fallback: &str) -> String {
    let mut lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // Each job of a group says the same.
    lines.dedup();
    if lines.is_empty() {
        fallback.to_string()
    } else {
        lines[lines.len().saturating_sub(4)..].join(" | ")
    }
}

/// `bench matrix`: runs `spec` into `o.out`.
pub fn run(spec: &Path, o: &Options) -> anyhow::Result<Outcome> {
    o.overrides.check().map_err(|e| anyhow::anyhow!(e))?;
    let c = super::spec::load_with(spec, &o.overrides)?;
    let env = environment(&c, o)?;
    let header = Header::new(
        &c,
        spec_hash(&c, &env),
        env.fio_version.clone(),
        o.command.clone(),
    );
    let (dir, records) = Dir::open_for(&o.out, &header)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    // What is done: a run recorded ok; a cell recorded failed (all its runs), unless retried.
    let failed: Vec<CellKey> = records
        .iter()
        .filter(|r| r.error.is_some())
        .map(|r| r.cell.clone())
        .collect();
    if o.retry_failed && !failed.is_empty() {
        // Keep only the successful runs in the journal, then run the rest again.
        let keep: Vec<&RunRecord> = records
            .iter()
            .filter(|r| !failed.contains(&r.cell))
            .collect();
        let mut text = String::new();
        for r in keep {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        super::results::write_atomic(&dir.path.join("journal.jsonl"), text.as_bytes())?;
    }
    let records = dir.records()?;
    let is_done = |key: &CellKey, repeat: u32| {
        records
            .iter()
            .any(|r| r.cell == *key && (r.error.is_some() || r.repeat == repeat))
    };
    let points = c.points();
    let m = &c.spec.matrix;
    let n_t = c.spec.targets.len();
    let cells = points
        .iter()
        .map(|p| (0..n_t).filter(|&ti| c.applies(ti, p)).count())
        .sum::<usize>();
    let total = cells as u64 * u64::from(m.repeats);
    let mut skipped = 0u64;
    for p in &points {
        for (ti, t) in c.spec.targets.iter().enumerate() {
            if !c.applies(ti, p) {
                continue;
            }
            for rep in 0..m.repeats {
                if is_done(&CellKey::new(&t.name, p), rep) {
                    skipped += 1;
                }
            }
        }
    }
    let mut progress = Progress::new(total, skipped);
    if skipped > 0 {
        progress.note(&format!(
            "resuming {}: {skipped} of {total} runs already done",
            dir.path.display()
        ));
    }
    let scratch = Scratch::new()?;
    let run_s = scratch.0.display().to_string();
    let logs = dir.path.join("logs");
    std::fs::create_dir_all(&logs)?;

    let mut resolved = Vec::new();
    for (i, t) in c.spec.targets.iter().enumerate() {
        let bdev_cfg = match &env.bdev_configs[i] {
            Some(text) => {
                let p = scratch.0.join(format!("{}-engine.toml", t.name));
                std::fs::write(&p, text.replace("{run}", &run_s))?;
                Some(p.display().to_string())
            }
            None => None,
        };
        resolved.push(Resolved::new(
            t,
            &run_s,
            env.engine_lib.as_deref(),
            bdev_cfg.as_deref(),
        ));
    }
    // Start everything (shared, then each target's) when any run is left.
    let mut procs: Vec<TargetProcs> = Vec::new();
    let left = skipped < total;
    for (g, (prefix, starts)) in start_groups(&c).into_iter().enumerate() {
        let mut tp = TargetProcs {
            procs: Vec::new(),
            broken: None,
        };
        for (k, s) in starts.iter().enumerate() {
            if !left || stop.load(Ordering::Relaxed) {
                break;
            }
            let what = format!("{prefix}[{k}]");
            let name = match g {
                0 => format!("start{k}"),
                _ => format!("{}-start{k}", c.spec.targets[g - 1].name),
            };
            let started = start_of(s, &env.daemon_configs[g][k], &scratch.0, &name, &run_s)
                .and_then(|start| {
                    let log = logs.join(format!("{name}.log"));
                    Running::spawn(what.clone(), start, log, &stop)
                });
            match started {
                Ok(r) => tp.procs.push(r),
                Err(e) => {
                    progress.note(&format!("{e:#}"));
                    tp.broken = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        procs.push(tp);
    }

    let limit = Duration::from_secs_f64(m.runtime + m.ramp + 60.0);
    // One guest for every guest target, booted once their back-ends are up.
    let mut guest: Option<Guest> = None;
    let mut guest_broken: Option<String> = None;
    // Only when a guest target has a run left (a resumed run may have none).
    let guest_left = c.needs_guest()
        && points.iter().any(|p| {
            c.spec.targets.iter().enumerate().any(|(ti, t)| {
                t.engine == Engine::Guest
                    && c.applies(ti, p)
                    && (0..m.repeats).any(|rep| !is_done(&CellKey::new(&t.name, p), rep))
            })
        });
    if guest_left && !stop.load(Ordering::Relaxed) {
        let log = logs.join("guest.log");
        progress.note(&format!(
            "booting the guest lab for the guest targets (console: {})",
            log.display()
        ));
        // The guest lives through every run left, each bounded by `limit` (guest runs by a
        // little more: the agent's reply).
        let lab_limit = (limit + Duration::from_secs(30)) * (total - skipped) as u32
            + Duration::from_secs(1800);
        match Guest::boot(&c, &run_s, &scratch.0, log, lab_limit, &stop) {
            Ok(g) => {
                for (ti, t) in c.spec.targets.iter().enumerate() {
                    if let Some(dev) = &g.devices[ti] {
                        progress.note(&format!("guest ({}): {} is {dev}", g.kernel, t.name));
                        resolved[ti] = Resolved::in_guest(dev);
                    }
                }
                guest = Some(g);
            }
            Err(e) => {
                progress.note(&format!("{e:#}"));
                guest_broken = Some(format!("{e:#}"));
            }
        }
    }
    // Cells that failed in this run: their other repeats are not run.
    let mut failed_now: Vec<CellKey> = Vec::new();
    let mut interrupted = false;
    'points: for p in &points {
        for rep in 0..m.repeats {
            for (ti, t) in c.spec.targets.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    interrupted = true;
                    break 'points;
                }
                let key = CellKey::new(&t.name, p);
                if !c.applies(ti, p) || is_done(&key, rep) {
                    continue;
                }
                if failed_now.contains(&key) {
                    progress.skip();
                    continue;
                }
                let record = |metrics, error, fio_file| RunRecord {
                    cell: key.clone(),
                    repeat: rep,
                    metrics,
                    error,
                    fio_file,
                };
                // The shared group, then the target's own.
                let groups = [0, ti + 1];
                let in_guest = t.engine == Engine::Guest;
                let broken = groups
                    .iter()
                    .find_map(|&g| procs[g].broken.clone())
                    .or_else(|| guest_broken.clone().filter(|_| in_guest));
                if let Some(why) = broken {
                    let r = record(None, Some(format!("target not running: {why}")), None);
                    failed_now.push(key.clone());
                    dir.append(&r)?;
                    progress.step(format!(
                        "{} #{}: FAILED (target not running)",
                        key.label(),
                        rep + 1
                    ));
                    continue;
                }
                for g in groups {
                    if let Some(why) = procs[g].check(&stop) {
                        progress.note(&format!("{why}; restarted"));
                    }
                }
                let args = fio::args(&c, ti, &resolved[ti], p, &run_s);
                let outcome = match guest.as_mut() {
                    Some(g) if in_guest => {
                        let out = g.run_fio(&args, limit, &stop);
                        // A guest that cannot be reached any more is not tried again.
                        if let Some(why) = g.lost.clone() {
                            guest_broken = Some(format!("guest lost: {why}"));
                            guest = None;
                        }
                        out
                    }
                    _ => run_fio(&o.fio, &args, limit, &stop),
                };
                if stop.load(Ordering::Relaxed) {
                    interrupted = true;
                    break 'points;
                }
                let (r, line) = match outcome {
                    Err(why) => (
                        record(None, Some(why.clone()), None),
                        format!("FAILED: {why}"),
                    ),
                    Ok((stdout, stderr, success)) => {
                        let json = fio::parse_output(&stdout);
                        let fio_file = match &json {
                            Ok(v) => {
                                Some(dir.save_fio(&key, rep, &serde_json::to_string_pretty(v)?)?)
                            }
                            Err(_) => None,
                        };
                        let metrics = json.and_then(|v| fio::metrics(&v));
                        match (success, metrics) {
                            (true, Ok(mt)) => (record(Some(mt), None, fio_file), short(&mt)),
                            (ok, res) => {
                                let mut why = fio_message(
                                    &stderr,
                                    &res.err().unwrap_or_else(|| "fio failed".into()),
                                );
                                if !ok {
                                    why = format!("fio failed: {why}");
                                }
                                for g in groups {
                                    if let Some(died) = procs[g].check(&stop) {
                                        why = format!("{why}; target died: {died}");
                                    }
                                }
                                (
                                    record(None, Some(why.clone()), fio_file),
                                    format!("FAILED: {why}"),
                                )
                            }
                        }
                    }
                };
                if r.error.is_some() {
                    failed_now.push(key.clone());
                }
                dir.append(&r)?;
                progress.step(format!("{} #{}: {line}", key.label(), rep + 1));
            }
        }
    }
    progress.finish();
    // The guest first (it holds the back-ends' disks), then targets' own processes, then the
    // shared ones.
    drop(guest);
    for tp in procs.iter_mut().rev() {
        tp.stop();
    }
    drop(scratch);
    super::report::write(&dir)?;
    if interrupted {
        eprintln!(
            "interrupted: the reports in {} hold what ran; the same command resumes",
            dir.path.display()
        );
        return Ok(Outcome::Interrupted);
    }
    let results = super::results::Results::gather(&dir, false)?;
    let failed = results
        .cells
        .iter()
        .filter(|c| c.status == "failed")
        .count();
    Ok(Outcome::Done { failed })
}

/// How to start service `s` (files named after `name`): its configuration (read earlier) written with
/// `{run}` replaced.
fn start_of(
    s: &Service,
    config_text: &Option<String>,
    scratch: &Path,
    name: &str,
    run: &str,
) -> anyhow::Result<Start> {
    let sub = |x: &str| x.replace("{run}", run);
    match (config_text, &s.command) {
        (Some(text), _) => {
            let config = scratch.join(format!("{name}-daemon.toml"));
            std::fs::write(&config, sub(text))?;
            Ok(Start::Ferroblk {
                config,
                notify: scratch.join(format!("{name}-notify.sock")),
            })
        }
        (None, Some(argv)) => Ok(Start::Peer {
            argv: argv.iter().map(|a| sub(a)).collect(),
            ready_path: s.ready_path.as_deref().map(sub),
            ready_tcp: s.ready_tcp.clone(),
        }),
        (None, None) => anyhow::bail!("nothing to start"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_specs_configurations_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/matrix");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = super::super::spec::load(&path).unwrap();
                configs(&c).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
        }
    }

    #[test]
    fn a_bad_daemon_configuration_is_refused_before_anything_starts() {
        let rest = r#"
[[start]]
ferroblk_toml = """
[[bdev]]
name = "x"
kind = "nul"
"""
[[target]]
name = "f"
engine = "io_uring"
filename = "/dev/null"
"#;
        let text = format!("{}{rest}", super::super::spec::ONE_CELL);
        let c = super::super::spec::parse(&text, "s.toml").unwrap();
        let e = format!("{:#}", configs(&c).unwrap_err());
        assert!(
            e.contains("start[0].ferroblk_toml") && e.contains("bdev[0].kind"),
            "{e}"
        );
    }
}
