//! The reports of a results directory: `results.json` (every cell, every run, fio's JSON kept
//! whole), `results.csv` (one row per cell), `results.md` (tables per pattern and job count)
//! and `plots/` (IOPS and p99 latency against queue depth per block size, bandwidth against
//! block size per queue depth; one line per target; SVG and PNG).

use std::fmt::Write as _;
use std::path::Path;

use super::plot::{self, Figure, Panel, Series};
use super::results::{Cell, CellKey, Dir, Results, Stat, write_atomic};
use super::spec::bs_label;

/// `12.3k ±1.6%`, or the cell's status.
pub fn cell_text(c: Option<&Cell>, metric: &str) -> String {
    match c.and_then(|c| c.stat(metric).map(|s| (c, s))) {
        Some((c, s)) => {
            let mark = if c.status == "ok" {
                ""
            } else {
                " (incomplete)"
            };
            format!("{} ±{:.1}%{mark}", plot::si(s.median), s.spread() * 100.0)
        }
        None => match c.map(|c| c.status.as_str()) {
            Some("failed") => "failed".into(),
            Some("n/a") => "n/a".into(),
            _ => "–".into(),
        },
    }
}

/// Writes every report of `dir` from its journal and fio files.
pub fn write(dir: &Dir) -> anyhow::Result<()> {
    let r = Results::gather(dir, true)?;
    write_atomic(
        &dir.path.join("results.json"),
        serde_json::to_string_pretty(&r)?.as_bytes(),
    )?;
    write_csv(&r, &dir.path.join("results.csv"))?;
    write_atomic(&dir.path.join("results.md"), markdown(&r).as_bytes())?;
    plots(&r, &dir.path.join("plots"))?;
    Ok(())
}

const STATS: [&str; 4] = ["iops", "bw_mib_s", "lat_mean_us", "p99_us"];

fn write_csv(r: &Results, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut w = csv::Writer::from_path(&tmp)?;
    let mut head: Vec<String> = [
        "matrix", "target", "engine", "rw", "bs", "iodepth", "numjobs", "status", "runs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for m in STATS.iter().chain(["read_iops", "write_iops"].iter()) {
        for s in ["median", "min", "max"] {
            head.push(format!("{m}_{s}"));
        }
    }
    head.push("error".into());
    w.write_record(&head)?;
    for c in &r.cells {
        let mut row = vec![
            r.header.name.clone(),
            c.key.target.clone(),
            c.engine.clone(),
            c.key.rw.clone(),
            c.key.bs.to_string(),
            c.key.iodepth.to_string(),
            c.key.numjobs.to_string(),
            c.status.clone(),
            c.runs.len().to_string(),
        ];
        for m in STATS.iter().chain(["read_iops", "write_iops"].iter()) {
            match c.stat(m) {
                Some(s) => {
                    for v in [s.median, s.min, s.max] {
                        row.push(format!("{v:.3}"));
                    }
                }
                None => row.extend(["".into(), "".into(), "".into()]),
            }
        }
        row.push(c.error.clone().unwrap_or_default());
        w.write_record(&row)?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The (rw, numjobs) groups, in run order.
fn groups(r: &Results) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    for rw in &r.header.rw {
        for &j in &r.header.numjobs {
            v.push((rw.clone(), j));
        }
    }
    v
}

fn key(target: &str, rw: &str, bs: u64, qd: u32, j: u32) -> CellKey {
    CellKey {
        target: target.into(),
        rw: rw.into(),
        bs,
        iodepth: qd,
        numjobs: j,
    }
}

fn markdown(r: &Results) -> String {
    let h = &r.header;
    let mut s = String::new();
    let _ = writeln!(s, "# Matrix `{}`\n", h.name);
    if !h.description.is_empty() {
        let _ = writeln!(s, "{}\n", h.description);
    }
    let _ = writeln!(
        s,
        "`{}`: {}, {} run(s) of {} s (ramp {} s) per cell, targets alternating cell by cell; \
         each figure is the median of the runs ± half their range (as a percentage of the \
         median). Spec hash `{}`.\n",
        h.command, h.fio_version, h.repeats, h.runtime, h.ramp, h.spec_hash
    );
    let targets: Vec<String> = h
        .targets
        .iter()
        .map(|(n, e)| format!("`{n}` ({e})"))
        .collect();
    let _ = writeln!(s, "Targets: {}.\n", targets.join(", "));
    for (rw, j) in groups(r) {
        let _ = writeln!(s, "## {rw}, {j} job{}\n", if j == 1 { "" } else { "s" });
        let mut head = "| bs | QD |".to_string();
        let mut rule = "|---|---|".to_string();
        for (t, _) in &h.targets {
            let _ = write!(head, " {t} IOPS | {t} MiB/s | {t} p99 µs |");
            rule.push_str("---:|---:|---:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for &bs in &h.bs {
            for &qd in &h.iodepth {
                let _ = write!(s, "| {} | {qd} |", bs_label(bs));
                for (t, _) in &h.targets {
                    let c = r.cell(&key(t, &rw, bs, qd, j));
                    let _ = write!(
                        s,
                        " {} | {} | {} |",
                        cell_text(c, "iops"),
                        cell_text(c, "bw_mib_s"),
                        cell_text(c, "p99_us")
                    );
                }
                s.push('\n');
            }
        }
        s.push('\n');
    }
    let failed: Vec<&Cell> = r.cells.iter().filter(|c| c.status == "failed").collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "## Failed cells\n");
        for c in failed {
            let _ = writeln!(
                s,
                "- {}: {}",
                c.key.label(),
                c.error.as_deref().unwrap_or("").replace('|', "\\|")
            );
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Plots: `plots/` (IOPS and p99 latency against queue depth per block size, bandwidth \
         against block size per queue depth; one line per target, bars from the smallest to the \
         largest run)."
    );
    s
}

/// File-name form of an `rw` label.
pub fn rw_stem(rw: &str) -> String {
    rw.replace(':', "")
}

fn series(
    r: &Results,
    target: &str,
    points: impl Iterator<Item = (usize, CellKey)>,
    metric: &str,
) -> Series {
    Series {
        name: target.to_string(),
        points: points
            .filter_map(|(x, k)| {
                let s: Stat = r.cell(&k)?.stat(metric)?;
                Some((x, s.median, s.min, s.max))
            })
            .collect(),
    }
}

fn plots(r: &Results, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let h = &r.header;
    for (rw, j) in groups(r) {
        let stem = format!("{}-j{j}", rw_stem(&rw));
        let jobs = format!("{j} job{}", if j == 1 { "" } else { "s" });
        for (metric, what, unit) in [
            ("iops", "IOPS", "IOPS"),
            ("p99_us", "p99 latency", "p99 µs"),
        ] {
            let panels =
                h.bs.iter()
                    .map(|&bs| Panel {
                        title: format!("bs {}", bs_label(bs)),
                        series: h
                            .targets
                            .iter()
                            .map(|(t, _)| {
                                let pts = h
                                    .iodepth
                                    .iter()
                                    .enumerate()
                                    .map(|(x, &qd)| (x, key(t, &rw, bs, qd, j)));
                                series(r, t, pts, metric)
                            })
                            .collect(),
                    })
                    .collect();
            let f = Figure {
                title: format!("{}: {what} vs queue depth, {rw}, {jobs}", h.name),
                x_desc: "queue depth".into(),
                x_labels: h.iodepth.iter().map(u32::to_string).collect(),
                y_desc: unit.into(),
                panels,
                hline: None,
            };
            let name = if metric == "iops" { "iops" } else { "p99" };
            plot::render(&f, &dir.join(format!("{name}-{stem}")))?;
        }
        let panels = h
            .iodepth
            .iter()
            .map(|&qd| Panel {
                title: format!("QD {qd}"),
                series: h
                    .targets
                    .iter()
                    .map(|(t, _)| {
                        let pts =
                            h.bs.iter()
                                .enumerate()
                                .map(|(x, &bs)| (x, key(t, &rw, bs, qd, j)));
                        series(r, t, pts, "bw_mib_s")
                    })
                    .collect(),
            })
            .collect();
        let f = Figure {
            title: format!("{}: bandwidth vs block size, {rw}, {jobs}", h.name),
            x_desc: "block size".into(),
            x_labels: h.bs.iter().map(|&b| bs_label(b)).collect(),
            y_desc: "MiB/s".into(),
            panels,
            hline: None,
        };
        plot::render(&f, &dir.join(format!("bw-{stem}")))?;
    }
    Ok(())
}
