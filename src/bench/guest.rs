//! Guest targets (`engine = "guest"`): fio inside the QEMU guest lab, on the guest kernel's
//! block device for the volume (virtio-blk over a vhost-user-blk socket, or an NVMe/TCP
//! namespace the guest connects to). A guest boot takes minutes under software emulation, so
//! one guest serves every guest target of a spec for the whole run: it is booted once, after
//! what the targets need has started, with every vhost-user-blk disk attached; its agent
//! (`guest_agent.py`, the lab's script) connects to the runner over the guest's user network
//! (the host's 127.0.0.1 is 10.0.2.2 in the guest) and runs each cell's fio as the runner sends
//! it, so guest cells alternate with the other targets' as every cell does.
//!
//! The lab script (`tests/lab/lab.sh`) is built into the program and written to the run's
//! scratch directory, so an installed `ferroblk` drives the lab without the source tree.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use super::spec::{Checked, Engine};

/// The guest lab: boots the stock Debian kernel under QEMU/TCG with the host's tree read-only.
const LAB_SH: &str = include_str!("../../tests/lab/lab.sh");

/// The guest's side of the protocol (run as the lab's script).
const AGENT: &str = include_str!("guest_agent.py");

/// How long a guest may take from `lab.sh run` to its agent's first word (a cold lab also
/// installs packages, fetches the kernel and builds its initramfs).
const BOOT_LIMIT: Duration = Duration::from_secs(1200);

/// What the agent may take to attach the volumes once connected (nvme connect, udev-less
/// device nodes).
const ATTACH_LIMIT: Duration = Duration::from_secs(180);

/// A booted guest and the connection to its agent.
pub struct Guest {
    lab: Child,
    /// The agent's connection, once it has called.
    conn: Option<TcpStream>,
    /// Bytes received after the last complete line.
    pending: Vec<u8>,
    log: PathBuf,
    /// Per target index: its block device in the guest (guest targets only).
    pub devices: Vec<Option<String>>,
    /// The guest's kernel release.
    pub kernel: String,
    /// Why the agent can no longer be reached (its connection failed, it stopped answering,
    /// the guest is gone), once so.
    pub lost: Option<String>,
}

/// QEMU's arguments attaching vhost-user-blk disk `id` on `socket` with `queues` virtqueues.
fn vhost_user_blk(id: &str, socket: &str, queues: u32) -> [String; 4] {
    [
        "-chardev".into(),
        format!("socket,id={id},path={socket},reconnect=1"),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={id},num-queues={queues}"),
    ]
}

/// The agent's view of the guest targets, and QEMU's arguments for the disks; `run` replaces
/// `{run}`.
fn plan(c: &Checked, run: &str) -> (Vec<Value>, Vec<String>) {
    let mut targets = Vec::new();
    let mut qemu = Vec::new();
    let mut disk = 0;
    for (i, t) in c.spec.targets.iter().enumerate() {
        if t.engine != Engine::Guest {
            continue;
        }
        if let Some(sock) = &t.socket {
            let sock = sock.replace("{run}", run);
            qemu.extend(vhost_user_blk(
                &format!("bench{disk}"),
                &sock,
                t.num_queues.unwrap_or(1),
            ));
            targets.push(json!({"index": i, "name": t.name, "kind": "vhost", "disk": disk}));
            disk += 1;
        } else {
            targets.push(json!({
                "index": i,
                "name": t.name,
                "kind": "nvme_tcp",
                "port": t.trsvcid,
                "nqn": t.subnqn,
                "ns": t.ns.unwrap_or(1),
            }));
        }
    }
    (targets, qemu)
}

impl Guest {
    /// Boots the guest for `c`'s guest targets (their back-ends already up), its console and
    /// the lab's messages in `log`; `lab_limit` bounds the whole guest's life. Waits for the
    /// agent to attach every volume; an error says what failed, with the log's last lines.
    pub fn boot(
        c: &Checked,
        run: &str,
        scratch: &Path,
        log: PathBuf,
        lab_limit: Duration,
        stop: &AtomicBool,
    ) -> anyhow::Result<Guest> {
        let lab_sh = scratch.join("lab.sh");
        std::fs::write(&lab_sh, LAB_SH)?;
        let listener = TcpListener::bind("127.0.0.1:0").context("listening for the guest")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (targets, qemu) = plan(c, run);
        let agent = scratch.join("guest-agent.py");
        std::fs::write(
            &agent,
            format!(
                "#!/usr/bin/python3\nPORT = {port}\nTARGETS = {}\n{AGENT}",
                Value::Array(targets)
            ),
        )?;
        let logf =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let lab = Command::new("bash")
            .arg(&lab_sh)
            .arg("run")
            .arg(&agent)
            .arg("--")
            .args(&qemu)
            .env(
                "FERROBLK_LAB_TIMEOUT",
                lab_limit.as_secs().max(60).to_string(),
            )
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting the guest lab (bash lab.sh run)")?;
        // From here on, dropping `g` (an error) stops the guest.
        let mut g = Guest {
            lab,
            conn: None,
            pending: Vec::new(),
            log,
            devices: vec![None; c.spec.targets.len()],
            kernel: String::new(),
            lost: None,
        };
        let t0 = Instant::now();
        let conn = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accepting the guest's connection"),
            }
            if let Some(why) = g.gone() {
                anyhow::bail!("guest: {why}");
            }
            if stop.load(Ordering::Relaxed) {
                anyhow::bail!("guest: interrupted while booting");
            }
            if t0.elapsed() > BOOT_LIMIT {
                anyhow::bail!(
                    "guest: no word from its agent {} s after boot began: {}",
                    BOOT_LIMIT.as_secs(),
                    super::run::tail(&g.log, 8)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_millis(200)))?;
        g.conn = Some(conn);
        let hello = g
            .receive(ATTACH_LIMIT, stop)
            .map_err(|e| anyhow::anyhow!("guest: {e}"))?;
        if hello["ready"] != true {
            anyhow::bail!(
                "guest: {}",
                hello["error"].as_str().unwrap_or("the agent is not ready")
            );
        }
        for (i, d) in g.devices.iter_mut().enumerate() {
            *d = hello["devices"][i.to_string()].as_str().map(String::from);
        }
        g.kernel = hello["kernel"].as_str().unwrap_or_default().to_string();
        Ok(g)
    }

    /// Why the guest is gone (its lab exited), if it is.
    fn gone(&mut self) -> Option<String> {
        match self.lab.try_wait() {
            Ok(Some(st)) => Some(format!(
                "the guest lab exited ({st}): {}",
                super::run::tail(&self.log, 8)
            )),
            Ok(None) => None,
            Err(e) => Some(format!("the guest lab: {e}")),
        }
    }

    /// The agent's next line as JSON, within `limit`; a failure means the agent is lost.
    fn receive(&mut self, limit: Duration, stop: &AtomicBool) -> Result<Value, String> {
        let r = self.receive_line(limit, stop);
        if let Err(e) = &r {
            self.lost = Some(e.clone());
        }
        r
    }

    fn receive_line(&mut self, limit: Duration, stop: &AtomicBool) -> Result<Value, String> {
        let t0 = Instant::now();
        let mut chunk = [0u8; 64 << 10];
        loop {
            if let Some(n) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=n).collect();
                return serde_json::from_slice(&line)
                    .map_err(|e| format!("the guest's agent sent what is not JSON: {e}"));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Err("the guest's agent has not called".into());
            };
            match conn.read(&mut chunk) {
                Ok(0) => {
                    let why = self
                        .gone()
                        .unwrap_or_else(|| "the guest's agent closed its connection".into());
                    return Err(why);
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("the guest's connection: {e}")),
            }
            if stop.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            if t0.elapsed() > limit {
                return Err(format!(
                    "no answer from the guest within {} s",
                    limit.as_secs()
                ));
            }
            if let Some(why) = self.gone() {
                return Err(why);
            }
        }
    }

    fn send(&mut self, v: &Value) -> Result<(), String> {
        let mut line = v.to_string();
        line.push('\n');
        let r = match self.conn.as_mut() {
            Some(c) => c
                .write_all(line.as_bytes())
                .map_err(|e| format!("the guest's connection: {e}")),
            None => Err("the guest's agent has not called".into()),
        };
        if let Err(e) = &r {
            self.lost = Some(e.clone());
        }
        r
    }

    /// Runs fio with `args` in the guest, bounded by `limit`: (stdout, stderr, success) as
    /// [`super::run`] has them from a host fio, or why it did not run.
    pub fn run_fio(
        &mut self,
        args: &[String],
        limit: Duration,
        stop: &AtomicBool,
    ) -> Result<(String, String, bool), String> {
        self.send(&json!({"args": args, "timeout": limit.as_secs()}))?;
        // The agent's own bound on fio first; this one if the guest hangs.
        let v = self.receive(limit + Duration::from_secs(30), stop)?;
        if let Some(e) = v["error"].as_str() {
            return Err(e.to_string());
        }
        let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Ok((text("stdout"), text("stderr"), v["status"] == 0))
    }

    /// Asks the agent to detach and end, then waits for the guest to power off (SIGTERM to the
    /// lab, which stops QEMU, after 60 s).
    pub fn stop(&mut self) {
        if self.lab.try_wait().ok().flatten().is_some() {
            return;
        }
        if self.lost.is_none() && self.send(&json!({"exit": true})).is_ok() {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                if self.lab.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        super::run::terminate(&mut self.lab, Duration::from_secs(20));
    }
}

impl Drop for Guest {
    /// A runner that ends early stops the guest all the same.
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_attach_in_target_order_and_nvme_targets_are_connected_by_the_agent() {
        let targets = r#"
[[target]]
name = "a"
engine = "guest"
socket = "{run}/a.sock"
num_queues = 2
[[target]]
name = "host-file"
engine = "io_uring"
filename = "/dev/null"
[[target]]
name = "n"
engine = "guest"
traddr = "127.0.0.1"
trsvcid = 4430
subnqn = "nqn.x:y"
ns = 2
[[target]]
name = "b"
engine = "guest"
socket = "/s/b.sock"
"#;
        let text = format!("{}{targets}", super::super::spec::ONE_CELL);
        let c = super::super::spec::parse(&text, "g.toml").unwrap();
        assert!(c.needs_guest());
        let (targets, qemu) = plan(&c, "/r");
        assert_eq!(
            qemu,
            [
                "-chardev",
                "socket,id=bench0,path=/r/a.sock,reconnect=1",
                "-device",
                "vhost-user-blk-pci,chardev=bench0,num-queues=2",
                "-chardev",
                "socket,id=bench1,path=/s/b.sock,reconnect=1",
                "-device",
                "vhost-user-blk-pci,chardev=bench1,num-queues=1",
            ]
        );
        assert_eq!(targets.len(), 3);
        assert_eq!(targets[0]["disk"], 0);
        assert_eq!(targets[1]["index"], 2);
        assert_eq!(targets[1]["kind"], "nvme_tcp");
        assert_eq!(
            (targets[1]["port"].as_u64(), targets[1]["ns"].as_u64()),
            (Some(4430), Some(2))
        );
        assert_eq!(
            (targets[2]["index"].as_u64(), targets[2]["disk"].as_u64()),
            (Some(3), Some(1))
        );
    }
}
