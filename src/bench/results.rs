//! A results directory: `run.json` (which spec, by hash), `journal.jsonl` (one line per finished
//! run, appended as it ends: what resume reads), `fio/` (every fio JSON as fio wrote it), and the
//! reports made from them (`results.json`, `results.csv`, `results.md`, `plots/`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::fio::Metrics;
use super::spec::{Checked, Point, bs_label};

/// `run.json`: the spec a directory's runs belong to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// The matrix's name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// The spec file as given.
    pub spec_file: String,
    /// The command that ran it (the first time, for a resumed run).
    #[serde(default)]
    pub command: String,
    /// CRC-64/NVME of the spec (as parsed) and of every file it names, in hex.
    pub spec_hash: String,
    /// Targets: (name, engine).
    pub targets: Vec<(String, String)>,
    /// Per target, the job counts it runs (empty: every one of `numjobs`).
    #[serde(default)]
    pub target_jobs: Vec<Vec<u32>>,
    /// `rw` axis labels.
    pub rw: Vec<String>,
    /// `bs` axis, bytes.
    pub bs: Vec<u64>,
    /// `iodepth` axis.
    pub iodepth: Vec<u32>,
    /// `numjobs` axis.
    pub numjobs: Vec<u32>,
    /// Runs per cell.
    pub repeats: u32,
    /// Measured seconds per run.
    pub runtime: f64,
    /// Unmeasured seconds per run.
    pub ramp: f64,
    /// `fio --version`.
    pub fio_version: String,
    /// The spec, as parsed.
    pub spec: serde_json::Value,
}

impl Header {
    /// The header of `c` with hash `hash`.
    pub fn new(c: &Checked, hash: String, fio_version: String, command: String) -> Header {
        let m = &c.spec.matrix;
        Header {
            name: m.name.clone(),
            description: m.description.clone(),
            spec_file: c.file.display().to_string(),
            command,
            spec_hash: hash,
            targets: c
                .spec
                .targets
                .iter()
                .map(|t| (t.name.clone(), t.engine.name().to_string()))
                .collect(),
            target_jobs: c
                .spec
                .targets
                .iter()
                .map(|t| t.numjobs.clone().unwrap_or_default())
                .collect(),
            rw: c.rw.iter().map(|r| r.label()).collect(),
            bs: c.bs.clone(),
            iodepth: m.iodepth.clone(),
            numjobs: m.numjobs.clone(),
            repeats: m.repeats,
            runtime: m.runtime,
            ramp: m.ramp,
            fio_version,
            spec: serde_json::to_value(&c.spec).unwrap_or_default(),
        }
    }

    /// Whether the cell `key` is run (its target takes its job count).
    pub fn applies(&self, key: &CellKey) -> bool {
        let i = self.targets.iter().position(|(n, _)| *n == key.target);
        i.and_then(|i| self.target_jobs.get(i))
            .is_none_or(|j| j.is_empty() || j.contains(&key.numjobs))
    }

    /// Every cell key, in run order (point, then target).
    pub fn cells(&self) -> Vec<CellKey> {
        let mut v = Vec::new();
        for rw in &self.rw {
            for &numjobs in &self.numjobs {
                for &bs in &self.bs {
                    for &iodepth in &self.iodepth {
                        for (t, _) in &self.targets {
                            v.push(CellKey {
                                target: t.clone(),
                                rw: rw.clone(),
                                bs,
                                iodepth,
                                numjobs,
                            });
                        }
                    }
                }
            }
        }
        v
    }
}

/// One cell: a target at a point of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CellKey {
    /// Target name.
    pub target: String,
    /// Access pattern label (`randrw:70`).
    pub rw: String,
    /// Bytes per I/O.
    pub bs: u64,
    /// Queue depth.
    pub iodepth: u32,
    /// Jobs.
    pub numjobs: u32,
}

impl CellKey {
    /// The key of target `target` at `p`.
    pub fn new(target: &str, p: &Point) -> CellKey {
        CellKey {
            target: target.into(),
            rw: p.rw.label(),
            bs: p.bs,
            iodepth: p.iodepth,
            numjobs: p.numjobs,
        }
    }

    /// `randrw70-4K-qd8-j1`: a file name stem.
    pub fn stem(&self) -> String {
        format!(
            "{}-{}-qd{}-j{}",
            self.rw.replace(':', ""),
            bs_label(self.bs),
            self.iodepth,
            self.numjobs
        )
    }

    /// `file randrw:70 4K qd8 j1`.
    pub fn label(&self) -> String {
        format!(
            "{} {} {} qd{} j{}",
            self.target,
            self.rw,
            bs_label(self.bs),
            self.iodepth,
            self.numjobs
        )
    }
}

/// One journal line: a finished run of a cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// The cell.
    #[serde(flatten)]
    pub cell: CellKey,
    /// Which repeat (0-based).
    pub repeat: u32,
    /// Its figures, or `None` if it failed.
    pub metrics: Option<Metrics>,
    /// Why it failed (fio's message, or the target's death).
    pub error: Option<String>,
    /// The fio JSON it wrote, relative to the directory.
    pub fio_file: Option<String>,
}

/// A results directory.
pub struct Dir {
    /// Its path.
    pub path: PathBuf,
}

impl Dir {
    /// `run.json`.
    fn header_path(&self) -> PathBuf {
        self.path.join("run.json")
    }

    /// `journal.jsonl`.
    fn journal_path(&self) -> PathBuf {
        self.path.join("journal.jsonl")
    }

    /// Opens `path` for `header`'s spec: a new directory is set up; one that holds runs of the
    /// same spec is resumed; one of another spec (or not a results directory) is refused.
    pub fn open_for(path: &Path, header: &Header) -> anyhow::Result<(Dir, Vec<RunRecord>)> {
        let dir = Dir {
            path: path.to_path_buf(),
        };
        if dir.header_path().exists() {
            let old = dir.header()?;
            if old.spec_hash != header.spec_hash {
                anyhow::bail!(
                    "{} holds results of another spec ('{}', {}, hash {}; this one is '{}', hash \
                     {}): they are never mixed; give another --out or remove it",
                    path.display(),
                    old.name,
                    old.spec_file,
                    old.spec_hash,
                    header.name,
                    header.spec_hash
                );
            }
            let records = dir.records()?;
            return Ok((dir, records));
        }
        if path.exists()
            && std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .next()
                .is_some()
        {
            anyhow::bail!(
                "{} is not empty and holds no run.json: not a results directory of ours",
                path.display()
            );
        }
        std::fs::create_dir_all(path.join("fio"))
            .with_context(|| format!("creating {}", path.display()))?;
        write_atomic(
            &dir.header_path(),
            serde_json::to_string_pretty(header)?.as_bytes(),
        )?;
        Ok((dir, Vec::new()))
    }

    /// Opens an existing results directory (for reports and compare).
    pub fn open(path: &Path) -> anyhow::Result<Dir> {
        let dir = Dir {
            path: path.to_path_buf(),
        };
        if !dir.header_path().exists() {
            anyhow::bail!("{}: no run.json: not a results directory", path.display());
        }
        Ok(dir)
    }

    /// The header.
    pub fn header(&self) -> anyhow::Result<Header> {
        let p = self.header_path();
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a run header", p.display()))
    }

    /// Every finished run, in the order they ended. A last line cut short by a crash is ignored
    /// (that run runs again).
    pub fn records(&self) -> anyhow::Result<Vec<RunRecord>> {
        let p = self.journal_path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut v = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<RunRecord>(line) {
                Ok(r) => v.push(r),
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => anyhow::bail!("{}:{}: {e}", p.display(), i + 1),
            }
        }
        Ok(v)
    }

    /// Keeps fio's JSON of a run; returns its path relative to the directory.
    pub fn save_fio(&self, cell: &CellKey, repeat: u32, json: &str) -> anyhow::Result<String> {
        let rel = format!("fio/{}/{}-r{repeat}.json", cell.target, cell.stem());
        let p = self.path.join(&rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, json).with_context(|| format!("writing {}", p.display()))?;
        Ok(rel)
    }

    /// Appends a finished run to the journal (flushed to disk before returning).
    pub fn append(&self, r: &RunRecord) -> anyhow::Result<()> {
        let p = self.journal_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        f.write_all(line.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Median, minimum and maximum of a cell's runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stat {
    /// Of `v` (not empty).
    pub fn of(v: &[f64]) -> Stat {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Stat {
            median,
            min: s[0],
            max: s[n - 1],
        }
    }

    /// Half the range, as a fraction of the median.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median
        }
    }
}

/// A cell's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    /// Which cell.
    #[serde(flatten)]
    pub key: CellKey,
    /// Engine of its target.
    pub engine: String,
    /// `ok` (every repeat ran), `failed` (one failed: `error` says why), `incomplete` (the run
    /// was interrupted before its repeats ended), `n/a` (the target does not run this job count).
    pub status: String,
    /// The first failure's message.
    pub error: Option<String>,
    /// Statistics per metric name, over the runs that succeeded.
    pub stats: std::collections::BTreeMap<String, Stat>,
    /// Every run: figures and fio's whole JSON.
    pub runs: Vec<serde_json::Value>,
}

impl Cell {
    /// A metric's statistics, if the cell has any.
    pub fn stat(&self, metric: &str) -> Option<Stat> {
        self.stats.get(metric).copied()
    }
}

/// `results.json`: the header, and every cell with its runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// The run's header.
    pub header: Header,
    /// Every cell of the matrix, in run order.
    pub cells: Vec<Cell>,
}

impl Results {
    /// Gathers the journal and fio files of `dir` into cells; `with_fio` embeds fio's JSON.
    pub fn gather(dir: &Dir, with_fio: bool) -> anyhow::Result<Results> {
        let header = dir.header()?;
        let records = dir.records()?;
        let mut cells = Vec::new();
        for key in header.cells() {
            let engine = header
                .targets
                .iter()
                .find(|(n, _)| *n == key.target)
                .map(|(_, e)| e.clone())
                .unwrap_or_default();
            let mine: Vec<&RunRecord> = records.iter().filter(|r| r.cell == key).collect();
            let error = mine.iter().find_map(|r| r.error.clone());
            let ok: Vec<Metrics> = mine.iter().filter_map(|r| r.metrics).collect();
            let status = if !header.applies(&key) {
                "n/a"
            } else if error.is_some() {
                "failed"
            } else if ok.len() as u32 >= header.repeats {
                "ok"
            } else {
                "incomplete"
            };
            let mut stats = std::collections::BTreeMap::new();
            if !ok.is_empty() {
                for name in [
                    "iops",
                    "bw_mib_s",
                    "lat_mean_us",
                    "p99_us",
                    "read_iops",
                    "write_iops",
                    "cpu_usr",
                    "cpu_sys",
                ] {
                    let v: Vec<f64> = ok.iter().map(|m| m.get(name)).collect();
                    stats.insert(name.to_string(), Stat::of(&v));
                }
            }
            let mut runs = Vec::new();
            for r in &mine {
                let fio = match (&r.fio_file, with_fio) {
                    (Some(rel), true) => std::fs::read_to_string(dir.path.join(rel))
                        .ok()
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                        .unwrap_or(serde_json::Value::Null),
                    _ => serde_json::Value::Null,
                };
                runs.push(serde_json::json!({
                    "repeat": r.repeat,
                    "metrics": r.metrics,
                    "error": r.error,
                    "fio_file": r.fio_file,
                    "fio": fio,
                }));
            }
            cells.push(Cell {
                key,
                engine,
                status: status.into(),
                error,
                stats,
                runs,
            });
        }
        Ok(Results { header, cells })
    }

    /// Reads `results.json` of a finished directory.
    pub fn load(path: &Path) -> anyhow::Result<Results> {
        let p = path.join("results.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (a results directory of `bench matrix`)",
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a results file", p.display()))
    }

    /// The cell `key`, if the matrix has it.
    pub fn cell(&self, key: &CellKey) -> Option<&Cell> {
        self.cells.iter().find(|c| c.key == *key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_keeps_median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert!((Stat::of(&[90.0, 100.0, 110.0]).spread() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn gather_marks_each_cell_ok_failed_incomplete_or_not_run() {
        let c = crate::bench::spec::parse(
            r#"
[matrix]
name = "g"
rw = ["randread"]
bs = ["4K"]
iodepth = [1, 2]
numjobs = [1, 2]
runtime = 1
repeats = 2
[[target]]
name = "a"
engine = "io_uring"
filename = "/x"
[[target]]
name = "b"
engine = "io_uring"
filename = "/y"
numjobs = [1]
"#,
            "g.toml",
        )
        .unwrap();
        let d = tempfile::tempdir().unwrap();
        let h = Header::new(&c, "h".into(), "fio-x".into(), "cmd".into());
        let (dir, old) = Dir::open_for(&d.path().join("r"), &h).unwrap();
        assert!(old.is_empty());
        let m = Metrics {
            iops: 10.0,
            bw_mib_s: 1.0,
            lat_mean_us: 1.0,
            p99_us: 2.0,
            read_iops: 10.0,
            write_iops: 0.0,
            cpu_usr: 0.0,
            cpu_sys: 0.0,
        };
        let key = |t: &str, qd, j| CellKey {
            target: t.into(),
            rw: "randread".into(),
            bs: 4096,
            iodepth: qd,
            numjobs: j,
        };
        let rec = |cell, repeat, ok: bool| RunRecord {
            cell,
            repeat,
            metrics: ok.then_some(m),
            error: (!ok).then(|| "fio failed: x".to_string()),
            fio_file: None,
        };
        dir.append(&rec(key("a", 1, 1), 0, true)).unwrap();
        dir.append(&rec(key("a", 1, 1), 1, true)).unwrap();
        dir.append(&rec(key("b", 1, 1), 0, false)).unwrap();
        dir.append(&rec(key("a", 2, 1), 0, true)).unwrap();
        let r = Results::gather(&dir, true).unwrap();
        assert_eq!(r.cells.len(), 2 * 2 * 2);
        let status = |k: CellKey| r.cell(&k).unwrap().status.clone();
        assert_eq!(status(key("a", 1, 1)), "ok");
        assert_eq!(status(key("b", 1, 1)), "failed");
        assert_eq!(status(key("a", 2, 1)), "incomplete");
        assert_eq!(status(key("b", 2, 2)), "n/a");
        assert_eq!(status(key("a", 2, 2)), "incomplete");
        assert_eq!(
            r.cell(&key("a", 1, 1))
                .unwrap()
                .stat("iops")
                .unwrap()
                .median,
            10.0
        );
        // The same spec resumes; another is refused.
        assert_eq!(Dir::open_for(&d.path().join("r"), &h).unwrap().1.len(), 4);
        let other = Header::new(&c, "other".into(), "fio-x".into(), "cmd".into());
        assert!(Dir::open_for(&d.path().join("r"), &other).is_err());
    }

    #[test]
    fn a_torn_last_journal_line_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let dir = Dir {
            path: d.path().to_path_buf(),
        };
        let r = RunRecord {
            cell: CellKey {
                target: "t".into(),
                rw: "randread".into(),
                bs: 4096,
                iodepth: 1,
                numjobs: 1,
            },
            repeat: 0,
            metrics: None,
            error: Some("x".into()),
            fio_file: None,
        };
        dir.append(&r).unwrap();
        let mut text = std::fs::read_to_string(dir.journal_path()).unwrap();
        text.push_str("{\"target\":\"t\",\"rw");
        std::fs::write(dir.journal_path(), &text).unwrap();
        assert_eq!(dir.records().unwrap().len(), 1);
    }
}
