//! `ferroblk`: the daemon (`serve`), its control client (`rpc`), the benchmarks (`perf`, and fio
//! matrices with `bench`) and a configuration checker (`check-config`).

mod bench;
mod daemon;
mod metrics;
mod notify;
mod perf;
mod perf_nvmf;
mod perf_vhost;
mod rpc;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ferroblk::{config, decl};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ferroblk_bdev::BdevRegistry;
use ferroblk_bdev::reactor::{ReactorConfig, Reactors};

/// ferroblk: a storage offload target (vhost-user-blk, NVMe-oF) over a per-core bdev chain.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr: `text` (colours only on a terminal) or `json` (one object per
    /// line). Also `FERROBLK_LOG_FORMAT`; the level is `RUST_LOG` (default `info`).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Installs the log subscriber: `format` from `--log-format`, else `FERROBLK_LOG_FORMAT`, else
/// text.
fn init_logging(format: Option<LogFormat>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let format = match (format, std::env::var("FERROBLK_LOG_FORMAT")) {
        (Some(f), _) => f,
        (None, Ok(v)) => LogFormat::from_str(&v, true)
            .map_err(|_| anyhow::anyhow!("FERROBLK_LOG_FORMAT={v} is neither `text` nor `json`"))?,
        (None, Err(_)) => LogFormat::Text,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().with_ansi(false).init(),
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon with a configuration file (default: the quickstart built into the binary).
    /// What the RPC changes is kept in a state file and served again after a restart.
    Serve {
        /// The TOML configuration (see configs/); without it, configs/quickstart.toml as built in.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Exit when a bdev fails to open (default: leave it out, with the bdevs stacked on it
        /// and its exports, report it in `bdev_list` and serve everything else). Also
        /// `strict = true` in the configuration.
        #[arg(long)]
        strict: bool,
    },
    /// Call a JSON-RPC method of a running daemon and print its result.
    Rpc {
        /// The daemon's control socket.
        #[arg(long, short, default_value = "run/ferroblk.sock")]
        socket: PathBuf,
        /// Method name (every method is listed below, and by the `rpc_methods` method).
        method: String,
        /// Parameters: one JSON object, or key=value pairs.
        params: Vec<String>,
    },
    /// Benchmarks.
    Perf {
        #[command(subcommand)]
        what: PerfCmd,
    },
    /// fio performance matrices: run one from a spec, compare two results directories.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
    /// Run every check `serve` runs (the configuration, its state file, each bdev's file and
    /// key, each rbd volume's cluster) without opening sockets or changing anything; report
    /// every problem found.
    CheckConfig {
        /// The TOML configuration (default: the quickstart built into the binary).
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PerfCmd {
    /// Drive a bdev chain of a configuration directly from the reactors (like SPDK bdevperf).
    Bdev {
        /// The TOML configuration declaring the bdevs.
        #[arg(long, short)]
        config: PathBuf,
        /// The bdev to drive (default: the top of the configuration's only chain).
        #[arg(long)]
        bdev: Option<String>,
        /// Requests in flight per reactor.
        #[arg(long, default_value_t = 128)]
        qd: usize,
        /// Bytes per request (a multiple of the block size; K/M suffixes accepted).
        #[arg(long, default_value = "4096")]
        bs: String,
        /// Access pattern.
        #[arg(long, value_enum, default_value_t = perf::Pattern::Randread)]
        rw: perf::Pattern,
        /// Read percentage for randrw / rw.
        #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(0..=100))]
        mix: u32,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        time: f64,
        /// Seconds to run before measuring (fio's `ramp_time`): first-touch page faults of a
        /// fresh malloc bdev, cold caches and lock tables settle outside the measured window.
        #[arg(long, default_value_t = 0.0)]
        ramp: f64,
        /// Write the whole bdev once before the run, so reads see written data (a malloc bdev
        /// never written reads the kernel's shared zero page, which flatters it).
        #[arg(long)]
        prefill: bool,
        /// Make written data this percent compressible (fio's `buffer_compress_percentage`):
        /// each 4 KiB is pseudo-random for the rest and zeroes for this part.
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
        compress_pct: Option<u32>,
        /// Reactor CPUs (comma-separated), overriding the configuration's [reactors].
        #[arg(long, value_delimiter = ',')]
        cpus: Option<Vec<usize>>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drive any vhost-user-blk backend through its Unix socket with a polling libblkio client.
    Vhost(perf_vhost::VhostArgs),
    /// Drive any NVMe/TCP controller (ours, Linux nvmet, SPDK) with ferroblk's initiator: one
    /// connection and one thread per I/O queue.
    Nvmf(perf_nvmf::NvmfArgs),
}

fn main() -> ExitCode {
    // `rpc --help` lists the methods from the table the server dispatches on.
    let matches = Cli::command()
        .mut_subcommand("rpc", |c| c.after_help(rpc::methods_help()))
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Err(e) = init_logging(cli.log_format) {
        eprintln!("ferroblk: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferroblk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve { config, strict } => {
            daemon::serve(config.as_deref(), strict)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rpc {
            socket,
            method,
            params,
        } => {
            let params = rpc::params_from_args(&params)?;
            match rpc::call(&socket, &method, params)? {
                Ok(v) => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    match writeln!(out, "{}", serde_json::to_string_pretty(&v)?)
                        .and_then(|()| out.flush())
                    {
                        // A reader that stopped early (`| head`): done, like other CLI tools.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                        r => r?,
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {}", serde_json::to_string_pretty(&e)?);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Bench { what } => bench::main(what),
        Cmd::CheckConfig { config } => match daemon::check(config.as_deref())? {
            Ok(summary) => {
                println!("{summary}");
                Ok(ExitCode::SUCCESS)
            }
            Err(problems) => {
                for p in problems {
                    eprintln!("ferroblk: {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Cmd::Perf {
            what: PerfCmd::Vhost(a),
        } => {
            perf_vhost::run(&a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Perf {
            what: PerfCmd::Nvmf(a),
        } => {
            perf_nvmf::run(&a)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Perf {
            what:
                PerfCmd::Bdev {
                    config,
                    bdev,
                    qd,
                    bs,
                    rw,
                    mix,
                    time,
                    ramp,
                    prefill,
                    compress_pct,
                    cpus,
                    json,
                },
        } => {
            let cfg = config::Config::load(&config)?;
            let mut rc: ReactorConfig = cfg
                .reactors
                .to_reactor_config()
                .map_err(|(p, m)| anyhow::anyhow!("{}: {p}: {m}", config.display()))?;
            if let Some(cpus) = cpus {
                rc.cpus = cpus.into_iter().map(Some).collect();
            }
            let io_size = ferroblk_bdev::types::parse_size(&bs)
                .ok_or_else(|| anyhow::anyhow!("--bs {bs} is not a size"))?
                as usize;
            if qd == 0 {
                anyhow::bail!("--qd must be at least 1");
            }
            if !(time > 0.0 && time < 86_400.0) {
                anyhow::bail!("--time must be between 0 and 86400 seconds");
            }
            if !(0.0..86_400.0).contains(&ramp) {
                anyhow::bail!("--ramp must be between 0 and 86400 seconds");
            }
            let name = match bdev {
                Some(b) => b,
                None => {
                    let tops: Vec<&str> = cfg
                        .bdev
                        .iter()
                        .map(|s| s.name())
                        .filter(|n| !cfg.bdev.iter().any(|s| s.stacks_on(n)))
                        .collect();
                    match tops[..] {
                        [one] => one.to_string(),
                        [] => anyhow::bail!("{} declares no bdev", config.display()),
                        _ => anyhow::bail!(
                            "several chains ({}): choose one with --bdev",
                            tops.join(", ")
                        ),
                    }
                }
            };
            let registry = BdevRegistry::new();
            registry
                .create_all(&cfg.bdev)
                .map_err(|e| anyhow::anyhow!("bdev[{}]: {}", e.index, e.error))?;
            if prefill {
                let b = registry.get(&name).ok_or_else(|| {
                    anyhow::anyhow!("no bdev named '{name}' in the configuration")
                })?;
                perf::prefill(&b, compress_pct)?;
            }
            let reactors = Reactors::start(&rc)?;
            let spec = perf::JobSpec {
                qd,
                io_size,
                pattern: rw,
                mix,
                time: Duration::from_secs_f64(time),
                ramp: Duration::from_secs_f64(ramp),
                compress_pct,
            };
            let result = perf::run(&registry, &reactors, &name, &spec);
            reactors.shutdown(Duration::from_secs(10));
            let result = result?;
            let state = registry
                .get(&name)
                .map_or(serde_json::Value::Null, |b| b.describe());
            perf::report(&name, &spec, &result, &state, json);
            Ok(ExitCode::SUCCESS)
        }
    }
}
