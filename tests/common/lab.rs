//! Rust front end of the guest lab (`tests/lab/lab.sh`): boots a throwaway
//! Linux guest under QEMU/TCG and runs a shell script in it with the real
//! kernel drivers (virtio-blk over vhost-user-blk, nvme-tcp, dm-crypt) and the
//! host's userland (fio, nvme-cli, dmsetup, ...). See `tests/lab/README.md`.
//!
//! ```ignore
//! mod common;
//! use common::lab::{self, Lab};
//!
//! let lab = Lab::prepare()?;
//! let extra = lab::vhost_user_blk_args("c0", &sock, 2);
//! let out = lab.run("fio --name=t --filename=/dev/vda ...", &extra, lab::DEFAULT_TIMEOUT)?;
//! out.ensure_success()?;
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The host's loopback (127.0.0.1) as seen from inside the guest: a target
/// listening on the host's 127.0.0.1:PORT is reached at `10.0.2.2:PORT`.
pub const HOST_ADDR: &str = "10.0.2.2";

/// Default bound on one guest run (boot + script + power-off).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Status reported when the guest was killed for exceeding the timeout.
pub const EXIT_TIMEOUT: i32 = 124;

/// Status reported when the lab itself failed (bad script path, guest did not
/// come up, no exit marker, ...).
pub const EXIT_LAB_FAILURE: i32 = 125;

/// Extra time the Rust side waits beyond the lab's own timeout before it
/// kills `lab.sh` itself.
const GRACE: Duration = Duration::from_secs(60);

/// A prepared lab: packages installed, kernel cached, initramfs built.
#[derive(Debug, Clone)]
pub struct Lab {
    script: PathBuf,
}

/// Result of one guest run.
#[derive(Debug, Clone)]
pub struct LabOutput {
    /// Exit status of the guest script, or [`EXIT_TIMEOUT`] /
    /// [`EXIT_LAB_FAILURE`].
    pub status: i32,
    /// Everything the run printed: serial console (script stdout/stderr,
    /// kernel warnings) and `lab.sh`/QEMU diagnostics, interleaved.
    pub output: String,
}

impl LabOutput {
    /// True when the guest script exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// True when the run was killed for exceeding its timeout.
    pub fn timed_out(&self) -> bool {
        self.status == EXIT_TIMEOUT
    }

    /// Ok if the script succeeded, else an error carrying the status and the
    /// full output.
    pub fn ensure_success(&self) -> Result<&Self> {
        if !self.success() {
            bail!(
                "lab run failed with status {}:\n{}",
                self.status,
                self.output
            );
        }
        Ok(self)
    }
}

/// Path of `tests/lab/lab.sh`.
pub fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh")
}

/// QEMU arguments attaching a vhost-user-blk disk served on the unix socket
/// `socket`; `id` must be unique per disk. The guest sees it as `/dev/vdX`
/// (in attach order). The backend must be listening before [`Lab::run`].
pub fn vhost_user_blk_args(id: &str, socket: &Path, num_queues: u32) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={},reconnect=1", socket.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={id},num-queues={num_queues}"),
    ]
}

impl Lab {
    /// Runs `lab.sh prepare` (once per process; installs missing Debian
    /// packages, downloads the kernel, builds the initramfs).
    pub fn prepare() -> Result<Lab> {
        static PREPARED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        let script = lab_script();
        PREPARED
            .get_or_init(|| {
                let out = Command::new("bash")
                    .arg(&script)
                    .arg("prepare")
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "lab.sh prepare failed ({}):\n{}{}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            })
            .clone()
            .map_err(anyhow::Error::msg)?;
        Ok(Lab { script })
    }

    /// Boots a guest, runs `script` (shell source; `#!` line honoured, else
    /// `/bin/sh`) as root in the guest, and powers the guest off.
    ///
    /// `extra_qemu_args` are appended to the QEMU command line (see
    /// [`vhost_user_blk_args`]). The guest is killed after `timeout`. Runs are
    /// serialised within a process: one guest at a time. Output is echoed to
    /// stderr as it arrives (visible with `--nocapture`).
    ///
    /// Returns `Err` only if the lab could not be driven at all; a failing
    /// script is reported through [`LabOutput::status`].
    pub fn run(
        &self,
        script: &str,
        extra_qemu_args: &[String],
        timeout: Duration,
    ) -> Result<LabOutput> {
        static ONE_GUEST: Mutex<()> = Mutex::new(());
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let _guard = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());

        let file = std::env::temp_dir().join(format!(
            "ferroblk-lab-{}-{}.sh",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
        let result = self.run_file(&file, extra_qemu_args, timeout);
        let _ = std::fs::remove_file(&file);
        result
    }

    fn run_file(
        &self,
        file: &Path,
        extra_qemu_args: &[String],
        timeout: Duration,
    ) -> Result<LabOutput> {
        // `exec ... 2>&1` merges lab.sh's stderr into the one stdout pipe so
        // the output keeps its order.
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(r#"exec bash "$0" "$@" 2>&1"#)
            .arg(&self.script)
            .arg("run")
            .arg(file)
            .arg("--")
            .args(extra_qemu_args)
            .env("FERROBLK_LAB_TIMEOUT", timeout.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning lab.sh run")?;

        let stdout = child.stdout.take().context("lab.sh stdout")?;
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[lab] {line}");
                all.push_str(&line);
                all.push('\n');
            }
            all
        });

        // lab.sh enforces `timeout` itself; this is only a backstop.
        let deadline = Instant::now() + timeout + GRACE;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                // SIGTERM first so lab.sh's trap takes QEMU down with it.
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                std::thread::sleep(Duration::from_secs(10));
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let output = reader
            .join()
            .map_err(|_| anyhow::anyhow!("lab output reader panicked"))?;
        let status = status.code().unwrap_or(EXIT_TIMEOUT);
        Ok(LabOutput { status, output })
    }
}
