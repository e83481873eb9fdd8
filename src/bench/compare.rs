//! `bench compare A B`: per cell both have, the ratio B/A of each figure with the spread of
//! both, and whether the difference is within noise (the two ranges of runs overlap). Written as
//! `compare.md`, `compare.csv` and ratio plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::plot::{self, Figure, Panel, Series};
use super::report::rw_stem;
use super::results::{CellKey, Results, Stat, write_atomic};
use super::spec::bs_label;

/// The figures compared: (metric, name in reports).
const COMPARED: [(&str, &str); 3] = [
    ("iops", "IOPS"),
    ("bw_mib_s", "MiB/s"),
    ("p99_us", "p99 µs"),
];

/// One metric of one cell in both directories.
#[derive(Debug, Clone, Copy)]
pub struct Ratio {
    /// A's statistics.
    pub a: Stat,
    /// B's statistics.
    pub b: Stat,
}

impl Ratio {
    /// B's median over A's.
    pub fn median(&self) -> f64 {
        self.b.median / self.a.median
    }

    /// The smallest and largest ratio the runs allow.
    pub fn range(&self) -> (f64, f64) {
        (self.b.min / self.a.max, self.b.max / self.a.min)
    }

    /// Whether the two ranges of runs overlap: the difference is within the noise.
    pub fn within_noise(&self) -> bool {
        self.a.min <= self.b.max && self.b.min <= self.a.max
    }
}

/// A cell both directories ran, with its ratios (`None` where either has no figure).
pub struct Row {
    /// The cell.
    pub key: CellKey,
    /// Per [`COMPARED`] metric.
    pub ratios: Vec<Option<Ratio>>,
}

/// Which targets to set side by side: by default each target of A with B's of the same name;
/// `Some((x, y))` sets B's target `y` against A's target `x` (two targets of one matrix: give
/// the same directory twice).
pub type Pair<'a> = Option<(&'a str, &'a str)>;

/// The rows of `a` against `b`, in `a`'s order.
pub fn rows(a: &Results, b: &Results, pair: Pair) -> Vec<Row> {
    a.cells
        .iter()
        .filter(|ca| pair.is_none_or(|(x, _)| ca.key.target == x))
        .filter_map(|ca| {
            let mut kb = ca.key.clone();
            if let Some((_, y)) = pair {
                kb.target = y.to_string();
            }
            let cb = b.cell(&kb)?;
            if ca.status == "n/a" || cb.status == "n/a" {
                return None;
            }
            let ratios = COMPARED
                .iter()
                .map(|(m, _)| {
                    let (sa, sb) = (ca.stat(m)?, cb.stat(m)?);
                    (sa.median > 0.0 && sa.min > 0.0).then_some(Ratio { a: sa, b: sb })
                })
                .collect();
            Some(Row {
                key: ca.key.clone(),
                ratios,
            })
        })
        .collect()
}

/// Compares `a` with `b`, writes the reports into `out`, returns the Markdown.
pub fn compare(a: &Path, b: &Path, pair: Pair, out: &Path) -> anyhow::Result<String> {
    let ra = Results::load(a)?;
    let rb = Results::load(b)?;
    let rows = rows(&ra, &rb, pair);
    if rows.is_empty() {
        anyhow::bail!(
            "{} and {} have no cell in common (targets {:?} and {:?})",
            a.display(),
            b.display(),
            ra.header.targets.iter().map(|t| &t.0).collect::<Vec<_>>(),
            rb.header.targets.iter().map(|t| &t.0).collect::<Vec<_>>()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let md = markdown(&ra, &rb, a, b, pair, &rows);
    write_atomic(&out.join("compare.md"), md.as_bytes())?;
    write_csv(&rows, &out.join("compare.csv"))?;
    for (i, (m, name)) in COMPARED.iter().enumerate() {
        let f = figure(&ra, &rows, i, name, pair);
        plot::render(
            &f,
            &out.join(format!("ratio-{}", m.trim_end_matches("_us"))),
        )?;
    }
    Ok(md)
}

fn markdown(ra: &Results, rb: &Results, a: &Path, b: &Path, pair: Pair, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = match pair {
        Some((x, y)) => writeln!(s, "# Target `{y}` (B) against target `{x}` (A)\n"),
        None => writeln!(
            s,
            "# `{}` (B) against `{}` (A)\n",
            rb.header.name, ra.header.name
        ),
    };
    let _ = writeln!(
        s,
        "A: `{}` (spec hash `{}`, {}); B: `{}` (spec hash `{}`, {}). Ratios are B/A of the \
         medians; spread is half the range of a cell's runs; *noise* marks a cell whose two \
         ranges of runs overlap (the difference is within noise).\n",
        a.display(),
        ra.header.spec_hash,
        ra.header.fio_version,
        b.display(),
        rb.header.spec_hash,
        rb.header.fio_version
    );
    let mut head = "| cell |".to_string();
    let mut rule = "|---|".to_string();
    for (_, name) in COMPARED {
        let _ = write!(head, " A {name} | B {name} | B/A |");
        rule.push_str("---:|---:|---:|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    let mut noisy = 0;
    for r in rows {
        let label = match pair {
            // One target on each side: the cell is its point.
            Some(_) => r
                .key
                .label()
                .split_once(' ')
                .map(|x| x.1.to_string())
                .unwrap_or_default(),
            None => r.key.label(),
        };
        let _ = write!(s, "| {label} |");
        for ratio in &r.ratios {
            match ratio {
                Some(q) => {
                    let flag = if q.within_noise() { " *noise*" } else { "" };
                    let _ = write!(
                        s,
                        " {} ±{:.1}% | {} ±{:.1}% | {}{flag} |",
                        plot::si(q.a.median),
                        q.a.spread() * 100.0,
                        plot::si(q.b.median),
                        q.b.spread() * 100.0,
                        ratio_text(q.median())
                    );
                }
                None => s.push_str(" – | – | – |"),
            }
        }
        if r.ratios
            .first()
            .copied()
            .flatten()
            .is_some_and(|q| q.within_noise())
        {
            noisy += 1;
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\n{} cells compared; IOPS within noise in {noisy}. Plots: `ratio-iops`, \
         `ratio-bw_mib_s`, `ratio-p99` (B/A against queue depth; bars: the smallest to the \
         largest ratio the runs allow).",
        rows.len()
    );
    s
}

/// A ratio: three decimals, four below 0.1.
fn ratio_text(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.3}")
    } else {
        format!("{r:.4}")
    }
}

fn write_csv(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut w = csv::Writer::from_path(&tmp)?;
    let mut head: Vec<String> = ["target", "rw", "bs", "iodepth", "numjobs"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (m, _) in COMPARED {
        for f in [
            "a_median",
            "a_spread",
            "b_median",
            "b_spread",
            "ratio",
            "ratio_min",
            "ratio_max",
            "within_noise",
        ] {
            head.push(format!("{m}_{f}"));
        }
    }
    w.write_record(&head)?;
    for r in rows {
        let mut row = vec![
            r.key.target.clone(),
            r.key.rw.clone(),
            r.key.bs.to_string(),
            r.key.iodepth.to_string(),
            r.key.numjobs.to_string(),
        ];
        for q in &r.ratios {
            match q {
                Some(q) => {
                    let (lo, hi) = q.range();
                    row.extend([
                        format!("{:.3}", q.a.median),
                        format!("{:.4}", q.a.spread()),
                        format!("{:.3}", q.b.median),
                        format!("{:.4}", q.b.spread()),
                        format!("{:.4}", q.median()),
                        format!("{lo:.4}"),
                        format!("{hi:.4}"),
                        q.within_noise().to_string(),
                    ]);
                }
                None => row.extend(std::iter::repeat_n(String::new(), 8)),
            }
        }
        w.write_record(&row)?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Ratio of metric `mi` against queue depth: a panel per (rw, jobs, bs), a line per target.
fn figure(ra: &Results, rows: &[Row], mi: usize, name: &str, pair: Pair) -> Figure {
    let h = &ra.header;
    let mut panels = Vec::new();
    for rw in &h.rw {
        for &j in &h.numjobs {
            for &bs in &h.bs {
                let series: Vec<Series> = h
                    .targets
                    .iter()
                    .filter(|(t, _)| pair.is_none_or(|(x, _)| t == x))
                    .map(|(t, _)| Series {
                        name: match pair {
                            Some((x, y)) => format!("{y} / {x}"),
                            None => t.clone(),
                        },
                        points: h
                            .iodepth
                            .iter()
                            .enumerate()
                            .filter_map(|(x, &qd)| {
                                let r = rows.iter().find(|r| {
                                    r.key.target == *t
                                        && r.key.rw == *rw
                                        && r.key.bs == bs
                                        && r.key.iodepth == qd
                                        && r.key.numjobs == j
                                })?;
                                let q = r.ratios[mi]?;
                                let (lo, hi) = q.range();
                                Some((x, q.median(), lo, hi))
                            })
                            .collect(),
                    })
                    .filter(|s| !s.points.is_empty())
                    .collect();
                if !series.is_empty() {
                    panels.push(Panel {
                        title: format!("{} {} j{j}", rw_stem(rw), bs_label(bs)),
                        series,
                    });
                }
            }
        }
    }
    Figure {
        title: format!("{name} ratio B/A"),
        x_desc: "queue depth".into(),
        x_labels: h.iodepth.iter().map(u32::to_string).collect(),
        y_desc: format!("{name} B/A"),
        panels,
        hline: Some(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_overlap_of_the_ranges() {
        let s = |median, min, max| Stat { median, min, max };
        let q = Ratio {
            a: s(100.0, 95.0, 105.0),
            b: s(110.0, 104.0, 112.0),
        };
        assert!(q.within_noise());
        assert!((q.median() - 1.1).abs() < 1e-12);
        let q = Ratio {
            a: s(100.0, 95.0, 105.0),
            b: s(120.0, 110.0, 130.0),
        };
        assert!(!q.within_noise());
        let (lo, hi) = q.range();
        assert!((lo - 110.0 / 105.0).abs() < 1e-12 && (hi - 130.0 / 95.0).abs() < 1e-12);
    }
}
