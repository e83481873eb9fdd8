//! fio as the load generator: the command line of one run, and the figures read back from its
//! JSON output (`--output-format=json`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::{Checked, Engine, Point, Target, fio_value};

/// File name of ferroblk's external fio engine (`ioengine=external:PATH`).
pub const ENGINE_LIB: &str = "libferroblk_fio.so";

/// Escapes `:` in a fio `filename` (fio splits file names on it).
fn escape_colons(s: &str) -> String {
    s.replace(':', "\\:")
}

/// What a target resolves to once its placeholders are filled and its files written.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `--filename`.
    pub filename: String,
    /// For ferroblk's engine: the library and `ferroblk_*` options.
    pub external: Option<(String, Vec<(String, String)>)>,
}

impl Resolved {
    /// A guest target on the guest's block device `device`.
    pub fn in_guest(device: &str) -> Resolved {
        Resolved {
            filename: escape_colons(device),
            external: None,
        }
    }

    /// How fio reaches `t`: `run` replaces `{run}`, `lib` is the engine library, `config` the
    /// bdev engine's configuration file once written.
    pub fn new(t: &Target, run: &str, lib: Option<&str>, config: Option<&str>) -> Resolved {
        let sub = |s: &str| s.replace("{run}", run);
        match t.engine {
            Engine::IoUring | Engine::Libaio => Resolved {
                filename: escape_colons(&sub(t.filename.as_deref().unwrap_or_default())),
                external: None,
            },
            // The guest's device is known once the guest has attached the volume
            // ([`Resolved::in_guest`]).
            Engine::Guest => Resolved {
                filename: String::new(),
                external: None,
            },
            Engine::Bdev => Resolved {
                filename: escape_colons(t.bdev.as_deref().unwrap_or_default()),
                external: Some((
                    lib.unwrap_or_default().to_string(),
                    vec![
                        ("ferroblk_mode".into(), "bdev".into()),
                        (
                            "ferroblk_config".into(),
                            config.unwrap_or_default().to_string(),
                        ),
                    ],
                )),
            },
            Engine::Vhost => Resolved {
                filename: escape_colons(&sub(t.socket.as_deref().unwrap_or_default())),
                external: Some((
                    lib.unwrap_or_default().to_string(),
                    vec![("ferroblk_mode".into(), "vhost".into())],
                )),
            },
            Engine::Nvmf => Resolved {
                filename: format!(
                    "trtype=tcp traddr={} trsvcid={} subnqn={} ns={}",
                    t.traddr.as_deref().unwrap_or_default(),
                    t.trsvcid.unwrap_or_default(),
                    escape_colons(t.subnqn.as_deref().unwrap_or_default()),
                    t.ns.unwrap_or(1)
                ),
                external: Some((
                    lib.unwrap_or_default().to_string(),
                    vec![("ferroblk_mode".into(), "nvmf".into())],
                )),
            },
        }
    }
}

/// fio's arguments for one run of `point` on target `ti` of `c`.
pub fn args(c: &Checked, ti: usize, r: &Resolved, point: &Point, run: &str) -> Vec<String> {
    let m = &c.spec.matrix;
    let t = &c.spec.targets[ti];
    let ms = |s: f64| format!("{}ms", (s * 1000.0).round() as u64);
    let mut a = vec![
        "--output-format=json".to_string(),
        format!("--name={}", t.name),
    ];
    // Engine options are only known to fio once the engine is loaded: they follow `ioengine`.
    match &r.external {
        Some((lib, opts)) => {
            a.push(format!("--ioengine=external:{lib}"));
            for (k, v) in opts {
                a.push(format!("--{k}={v}"));
            }
            // The engine's reactors and connections live in the fio process: jobs are threads.
            a.push("--thread=1".into());
        }
        None if t.engine == Engine::Guest => a.push(format!(
            "--ioengine={}",
            t.guest_engine.unwrap_or(Engine::Libaio).name()
        )),
        None => a.push(format!("--ioengine={}", t.engine.name())),
    }
    a.push(format!("--filename={}", r.filename));
    a.push(format!("--rw={}", point.rw.mode));
    if let Some(p) = point.rw.mix_read {
        a.push(format!("--rwmixread={p}"));
    }
    a.push(format!("--bs={}", point.bs));
    a.push(format!("--iodepth={}", point.iodepth));
    a.push(format!("--numjobs={}", point.numjobs));
    a.push("--group_reporting=1".into());
    a.push("--time_based=1".into());
    a.push(format!("--runtime={}", ms(m.runtime)));
    if m.ramp > 0.0 {
        a.push(format!("--ramp_time={}", ms(m.ramp)));
    }
    if let Some(size) = c.sizes[ti] {
        a.push(format!("--size={size}"));
    }
    if matches!(t.engine, Engine::IoUring | Engine::Libaio | Engine::Guest) {
        a.push(format!("--direct={}", u8::from(t.direct.unwrap_or(true))));
    }
    for (k, v) in m.fio.iter().chain(t.fio.iter()) {
        let v = fio_value(v).unwrap_or_default().replace("{run}", run);
        a.push(format!("--{k}={v}"));
    }
    a
}

/// One run's figures (sums over read and write, latencies in µs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub bw_mib_s: f64,
    /// Mean completion latency (submission to completion), weighted by I/Os.
    pub lat_mean_us: f64,
    /// 99th percentile completion latency (the larger of read's and write's in a mix).
    pub p99_us: f64,
    /// Read I/Os per second.
    pub read_iops: f64,
    /// Write I/Os per second.
    pub write_iops: f64,
    /// fio's user CPU, percent of one CPU per job.
    pub cpu_usr: f64,
    /// fio's system CPU, percent.
    pub cpu_sys: f64,
}

impl Metrics {
    /// A metric by name (`iops`, `bw_mib_s`, `lat_mean_us`, `p99_us`, `read_iops`,
    /// `write_iops`, `cpu_usr`, `cpu_sys`).
    pub fn get(&self, name: &str) -> f64 {
        match name {
            "iops" => self.iops,
            "bw_mib_s" => self.bw_mib_s,
            "lat_mean_us" => self.lat_mean_us,
            "p99_us" => self.p99_us,
            "read_iops" => self.read_iops,
            "write_iops" => self.write_iops,
            "cpu_usr" => self.cpu_usr,
            "cpu_sys" => self.cpu_sys,
            _ => f64::NAN,
        }
    }
}

/// The JSON document in fio's stdout (fio may print notices before it).
pub fn parse_output(stdout: &str) -> Result<Value, String> {
    let start = stdout
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| stdout.starts_with('{').then_some(0))
        .ok_or_else(|| "fio printed no JSON".to_string())?;
    serde_json::from_str(&stdout[start..]).map_err(|e| format!("fio's JSON does not parse: {e}"))
}

/// The figures of a fio JSON report of one group, or why it has none.
pub fn metrics(v: &Value) -> Result<Metrics, String> {
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| "fio's JSON has no job".to_string())?;
    let err = job.get("error").and_then(Value::as_i64).unwrap_or(0);
    if err != 0 {
        return Err(format!(
            "fio job error {err} ({})",
            std::io::Error::from_raw_os_error(err as i32)
        ));
    }
    let f = |dir: &str, key: &str| {
        job.get(dir)
            .and_then(|d| d.get(key))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    let ios = |dir: &str| f(dir, "total_ios");
    let (r_ios, w_ios) = (ios("read"), ios("write"));
    if r_ios + w_ios <= 0.0 {
        return Err("no I/O completed".into());
    }
    let p99 = |dir: &str| {
        job.get(dir)
            .and_then(|d| d.get("clat_ns"))
            .and_then(|c| c.get("percentile"))
            .and_then(|p| p.get("99.000000"))
            .and_then(Value::as_f64)
    };
    let mut p99_ns: f64 = 0.0;
    for (dir, n) in [("read", r_ios), ("write", w_ios)] {
        if n > 0.0 {
            let p = p99(dir).ok_or_else(|| format!("no {dir} p99 in fio's JSON"))?;
            p99_ns = p99_ns.max(p);
        }
    }
    let lat = |dir: &str| {
        job.get(dir)
            .and_then(|d| d.get("lat_ns"))
            .and_then(|l| l.get("mean"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    let lat_mean_ns = (lat("read") * r_ios + lat("write") * w_ios) / (r_ios + w_ios);
    let num = |k: &str| job.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    Ok(Metrics {
        iops: f("read", "iops") + f("write", "iops"),
        bw_mib_s: (f("read", "bw_bytes") + f("write", "bw_bytes")) / f64::from(1 << 20),
        lat_mean_us: lat_mean_ns / 1000.0,
        p99_us: p99_ns / 1000.0,
        read_iops: f("read", "iops"),
        write_iops: f("write", "iops"),
        cpu_usr: num("usr_cpu"),
        cpu_sys: num("sys_cpu"),
    })
}

/// `fio-3.33` from `fio --version`.
pub fn version(fio: &str) -> Result<String, String> {
    let out = std::process::Command::new(fio)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {fio}: {e} (Debian: apt-get install fio)"))?;
    if !out.status.success() {
        return Err(format!("{fio} --version failed: {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::spec;

    const SPEC: &str = r#"
[matrix]
name = "t"
rw = ["randrw:70"]
bs = ["16K"]
iodepth = [8]
runtime = 1.5
ramp = 0.5
repeats = 1
fio = { cpus_allowed = "1" }

[[target]]
name = "file"
engine = "libaio"
filename = "{run}/a:b.img"
size = "1MiB"

[[target]]
name = "v"
engine = "vhost"
socket = "{run}/v.sock"

[[target]]
name = "n"
engine = "nvmf"
traddr = "127.0.0.1"
trsvcid = 4420
subnqn = "nqn.2026-11.io.ferroblk:quickstart"

[[target]]
name = "b"
engine = "bdev"
ferroblk_toml = "x"
bdev = "null0"
"#;

    #[test]
    fn command_lines_follow_the_engine_interface() {
        let c = spec::parse(SPEC, "s").unwrap();
        let p = &c.points()[0];
        let file = Resolved::new(&c.spec.targets[0], "/r", None, None);
        let a = args(&c, 0, &file, p, "/r");
        for want in [
            "--output-format=json",
            "--ioengine=libaio",
            "--filename=/r/a\\:b.img",
            "--rw=randrw",
            "--rwmixread=70",
            "--bs=16384",
            "--iodepth=8",
            "--runtime=1500ms",
            "--ramp_time=500ms",
            "--size=1048576",
            "--direct=1",
            "--cpus_allowed=1",
        ] {
            assert!(a.contains(&want.to_string()), "{want} missing from {a:?}");
        }
        let v = Resolved::new(
            &c.spec.targets[1],
            "/r",
            Some("/o/libferroblk_fio.so"),
            None,
        );
        let a = args(&c, 1, &v, p, "/r");
        let i = a
            .iter()
            .position(|s| s == "--ioengine=external:/o/libferroblk_fio.so");
        let j = a.iter().position(|s| s == "--ferroblk_mode=vhost");
        assert!(i.is_some() && j > i, "{a:?}");
        assert!(a.contains(&"--filename=/r/v.sock".to_string()));
        assert!(a.contains(&"--thread=1".to_string()));
        let n = Resolved::new(&c.spec.targets[2], "/r", Some("/l.so"), None);
        assert_eq!(
            n.filename,
            "trtype=tcp traddr=127.0.0.1 trsvcid=4420 subnqn=nqn.2026-11.io.ferroblk\\:quickstart ns=1"
        );
        let b = Resolved::new(&c.spec.targets[3], "/r", Some("/l.so"), Some("/r/b.toml"));
        let a = args(&c, 3, &b, p, "/r");
        assert!(a.contains(&"--ferroblk_mode=bdev".to_string()));
        assert!(a.contains(&"--ferroblk_config=/r/b.toml".to_string()));
        assert!(a.contains(&"--filename=null0".to_string()));
    }

    #[test]
    fn metrics_of_a_mix_sum_both_directions() {
        let v: Value = serde_json::from_str(
            r#"{"jobs":[{"error":0,"usr_cpu":10.0,"sys_cpu":20.0,
                "read":{"total_ios":700,"iops":700.0,"bw_bytes":2867200,
                        "lat_ns":{"mean":1000.0},"clat_ns":{"percentile":{"99.000000":5000}}},
                "write":{"total_ios":300,"iops":300.0,"bw_bytes":1228800,
                        "lat_ns":{"mean":2000.0},"clat_ns":{"percentile":{"99.000000":9000}}}}]}"#,
        )
        .unwrap();
        let m = metrics(&v).unwrap();
        assert_eq!(m.iops, 1000.0);
        assert!((m.bw_mib_s - 4096000.0 / 1048576.0).abs() < 1e-9);
        assert!((m.lat_mean_us - 1.3).abs() < 1e-9);
        assert_eq!(m.p99_us, 9.0);
    }

    #[test]
    fn failed_or_empty_runs_have_no_metrics() {
        let v: Value = serde_json::from_str(r#"{"jobs":[{"error":5}]}"#).unwrap();
        assert!(metrics(&v).unwrap_err().contains("error 5"));
        let v: Value =
            serde_json::from_str(r#"{"jobs":[{"error":0,"read":{"total_ios":0}}]}"#).unwrap();
        assert_eq!(metrics(&v).unwrap_err(), "no I/O completed");
        assert!(parse_output("fio: engine not found\n").is_err());
        let v = parse_output("note: x\n{\"jobs\":[]}\n").unwrap();
        assert!(v["jobs"].is_array());
    }
}
