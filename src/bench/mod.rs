//! `ferroblk bench`: fio performance matrices.
//!
//! - `bench matrix SPEC.toml` ([`run`]) reads a spec ([`spec`]: axes and targets, checked
//!   before anything runs), starts what its targets need (ferroblk daemons, peers such as
//!   qemu-storage-daemon), runs every cell with real fio ([`fio`]), targets alternating cell by
//!   cell and each cell repeated, journals each run as it ends so an interrupted run resumes
//!   ([`results`]), and writes the reports ([`report`], [`plot`]). Guest targets run fio inside
//!   the QEMU guest lab, one boot per run ([`guest`]).
//! - `bench compare A B` ([`compare`]) sets two results directories side by side.
//! - `bench report DIR` writes a directory's reports again from its journal.

pub mod compare;
pub mod fio;
pub mod guest;
pub mod plot;
pub mod report;
pub mod results;
pub mod run;
pub mod spec;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// `ferroblk bench ...`.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Run a fio performance matrix (see benches/matrix/): every cell on every target, with
    /// reports, CSV and plots in one directory. Run it again to resume an interrupted run.
    Matrix(MatrixArgs),
    /// Compare two results directories cell by cell (B/A ratios, spread, noise).
    Compare(CompareArgs),
    /// Write a results directory's reports again from its journal and fio files.
    Report {
        /// The results directory.
        dir: PathBuf,
    },
}

/// `bench matrix`.
#[derive(Args)]
pub struct MatrixArgs {
    /// The spec (benches/matrix/*.toml).
    pub spec: PathBuf,
    /// Results directory (default: bench-results/NAME, NAME from the spec). An existing one is
    /// resumed if it holds runs of this same spec, and refused otherwise.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// ferroblk's fio engine (default: the spec's `engine_lib`, else libferroblk_fio.so beside
    /// this program).
    #[arg(long)]
    pub engine_lib: Option<PathBuf>,
    /// The fio program.
    #[arg(long, default_value = "fio")]
    pub fio: String,
    /// Run again the cells a previous run of this directory recorded as failed.
    #[arg(long)]
    pub retry_failed: bool,
    /// Measured seconds per run, in place of the spec's `runtime` (a shortened run).
    #[arg(long)]
    pub runtime: Option<f64>,
    /// Unmeasured seconds per run, in place of the spec's `ramp`.
    #[arg(long)]
    pub ramp: Option<f64>,
    /// Runs per cell, in place of the spec's `repeats`.
    #[arg(long)]
    pub repeats: Option<u32>,
}

/// `bench compare`.
#[derive(Args)]
pub struct CompareArgs {
    /// The baseline results directory (A).
    pub a: PathBuf,
    /// The results directory compared with it (B).
    pub b: PathBuf,
    /// Where to write compare.md, compare.csv and the ratio plots (default: B/compare).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Set target Y of B against target X of A (X,Y), instead of each target against its
    /// namesake; two targets of one matrix: give its directory as A and B.
    #[arg(long, value_name = "X,Y")]
    pub targets: Option<String>,
}

/// Runs a `bench` subcommand.
pub fn main(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Matrix(a) => {
            let out = match a.out {
                Some(o) => o,
                None => {
                    let c = spec::load(&a.spec)?;
                    PathBuf::from("bench-results").join(&c.spec.matrix.name)
                }
            };
            let o = run::Options {
                out: out.clone(),
                engine_lib: a.engine_lib,
                fio: a.fio,
                retry_failed: a.retry_failed,
                overrides: spec::Overrides {
                    runtime: a.runtime,
                    ramp: a.ramp,
                    repeats: a.repeats,
                },
                command: std::iter::once("ferroblk".to_string())
                    .chain(std::env::args().skip(1))
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            match run::run(&a.spec, &o)? {
                run::Outcome::Done { failed: 0 } => {
                    println!("done: {}", out.join("results.md").display());
                    Ok(ExitCode::SUCCESS)
                }
                run::Outcome::Done { failed } => {
                    eprintln!(
                        "{failed} cell(s) failed (messages in {}); --retry-failed runs them again",
                        out.join("results.md").display()
                    );
                    Ok(ExitCode::from(2))
                }
                run::Outcome::Interrupted => Ok(ExitCode::from(130)),
            }
        }
        BenchCmd::Compare(a) => {
            let out = a.out.unwrap_or_else(|| a.b.join("compare"));
            let pair = match &a.targets {
                Some(t) => match t.split_once(',') {
                    Some((x, y)) if !x.is_empty() && !y.is_empty() => Some((x, y)),
                    _ => anyhow::bail!("--targets {t}: expected X,Y (two target names)"),
                },
                None => None,
            };
            let md = compare::compare(&a.a, &a.b, pair, &out)?;
            print!("{md}");
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Report { dir } => {
            report::write(&results::Dir::open(&dir)?)?;
            println!("{}", dir.join("results.md").display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
