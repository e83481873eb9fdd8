//! ferroblk's NVMe/TCP initiator (`ferroblk_target::initiator`) against the Linux kernel's
//! target, nvmet-tcp, running in a QEMU guest of the lab (`tests/lab/`).
//!
//! The guest loads nvmet and nvmet_tcp, exports a loop device over a tmpfs file as namespace 1
//! of a subsystem (allow_any_host) on a TCP port at 0.0.0.0:4420, and waits. QEMU's user
//! network forwards a free host loopback port to it (`FERROBLK_LAB_NETDEV_EXTRA=hostfwd=...`).
//! The host then runs, through that port: the discovery log, an admin queue and two I/O
//! queues with and without header/data digests, Identify, Set Features Number of Queues, Keep
//! Alive (timer and explicit), write/read/verify with in-capsule data, R2T/H2CData and many
//! commands in flight, Flush, Write Zeroes, Dataset Management deallocate, a typed error
//! status, SQ flow control disabled (C2HData with SUCCESS), disconnect and shutdown; then a
//! short `ferroblk perf nvmf` run. Finally it connects to a second forwarded port to tell the
//! guest it is done; the guest checks, from its side of the loop device, a marker the host
//! wrote, and tears nvmet down.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::daemon::free_port;
use common::lab::{self, Lab};
use ferroblk_target::initiator::{
    ConnectOptions, Controller, Error, IoCommand, IoQueue, IoQueueOptions,
};
use ferroblk_target::spec::command::DsmRange;
use ferroblk_target::spec::log::trtype;

const BIN: &str = env!("CARGO_BIN_EXE_ferroblk");
const NQN: &str = "nqn.2026-11.io.ferroblk:nvmet-initiator";
/// Namespace size: 64 MiB of 512-byte blocks.
const NS_BYTES: u64 = 64 << 20;
/// Where the host writes the marker the guest checks (a 4 KiB block at this byte offset).
const MARKER_OFFSET: u64 = 60 << 20;
const MARKER: &[u8] = b"ferroblk-initiator-was-here";
const T: Duration = Duration::from_secs(60);

fn guest_script() -> String {
    format!(
        r#"#!/bin/sh
set -eu
NQN={NQN}
C=/sys/kernel/config/nvmet
truncate -s {NS_BYTES} /tmp/ns0.img
LOOP=$(losetup -f --show /tmp/ns0.img)
mkdir $C/subsystems/$NQN
echo 1 > $C/subsystems/$NQN/attr_allow_any_host
mkdir $C/subsystems/$NQN/namespaces/1
printf %s $LOOP > $C/subsystems/$NQN/namespaces/1/device_path
echo 1 > $C/subsystems/$NQN/namespaces/1/enable
mkdir $C/ports/1
echo tcp > $C/ports/1/addr_trtype
echo ipv4 > $C/ports/1/addr_adrfam
echo 0.0.0.0 > $C/ports/1/addr_traddr
echo 4420 > $C/ports/1/addr_trsvcid
ln -s $C/subsystems/$NQN $C/ports/1/subsystems/$NQN
echo "NVMET-READY $LOOP"
# Wait (at most 5 minutes) for the host to connect to port 4421: it is done.
python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 4421))
s.listen(1)
s.settimeout(300)
c, _ = s.accept()
c.settimeout(30)
print("HOST-SAYS", c.recv(64).decode().strip())
c.sendall(b"bye\n")
c.close()
'
dmesg | grep -i nvme | tail -n 20 || true
# The marker the host wrote through nvmet is on the loop device.
dd if=$LOOP bs=4096 skip={marker_block} count=1 iflag=direct status=none | grep -q {marker}
echo "MARKER-OK"
ls $C/subsystems/$NQN/namespaces/1 >/dev/null
rm $C/ports/1/subsystems/$NQN
rmdir $C/ports/1
echo 0 > $C/subsystems/$NQN/namespaces/1/enable
rmdir $C/subsystems/$NQN/namespaces/1
rmdir $C/subsystems/$NQN
losetup -d $LOOP
echo "NVMET-DONE"
"#,
        marker_block = MARKER_OFFSET / 4096,
        marker = std::str::from_utf8(MARKER).expect("ASCII"),
    )
}

/// A guest running in the background, its console streamed line by line.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    output: String,
    script: std::path::PathBuf,
}

impl Guest {
    /// Boots the lab with `script`, nvmet loaded and `fwd` forwarded (host port, guest port).
    fn start(script: &str, fwd: &[(u16, u16)]) -> Result<Guest> {
        Lab::prepare()?;
        let file = std::env::temp_dir().join(format!(
            "ferroblk-nvmet-initiator-{}.sh",
            std::process::id()
        ));
        std::fs::write(&file, script)?;
        let hostfwd: Vec<String> = fwd
            .iter()
            .map(|(h, g)| format!("hostfwd=tcp:127.0.0.1:{h}-:{g}"))
            .collect();
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(r#"exec bash "$0" "$@" 2>&1"#)
            .arg(lab::lab_script())
            .arg("run")
            .arg(&file)
            .env("FERROBLK_LAB_EXTRA_MODULES", "nvmet nvmet_tcp")
            .env("FERROBLK_LAB_NETDEV_EXTRA", hostfwd.join(","))
            .env("FERROBLK_LAB_TIMEOUT", "400")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning lab.sh run")?;
        let out = child.stdout.take().context("lab stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("[lab] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Guest {
            child,
            lines,
            output: String::new(),
            script: file,
        })
    }

    /// Waits for a console line starting with `prefix`.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.output.push_str(&l);
                    self.output.push('\n');
                    if l.starts_with(prefix) {
                        return Ok(l);
                    }
                }
                Err(_) => bail!("no '{prefix}' from the guest:\n{}", self.output),
            }
        }
    }

    /// Waits for the lab to exit; its status.
    fn finish(mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(l) = self.lines.try_recv() {
                self.output.push_str(&l);
                self.output.push('\n');
            }
            if let Some(st) = self.child.try_wait()? {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.output.push_str(&l);
                    self.output.push('\n');
                }
                let code = st.code().unwrap_or(lab::EXIT_TIMEOUT);
                if code != 0 {
                    bail!("guest failed with status {code}:\n{}", self.output);
                }
                return Ok(code);
            }
            if Instant::now() > deadline {
                bail!("guest did not finish:\n{}", self.output);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SIGTERM: lab.sh's trap takes QEMU down with it.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.script);
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Connecting right after the guest prints NVMET-READY may still race the listener (QEMU
/// accepts the forwarded connection before the guest does): retry briefly.
fn connect_retry(opts: &ConnectOptions) -> Result<Controller> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Controller::connect(opts) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline && e.is_fatal() => {
                eprintln!("connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).context("connect"),
        }
    }
}

fn discovery(addr: SocketAddr) -> Result<()> {
    let ctrl = connect_retry(&ConnectOptions::discovery(addr))?;
    assert!(ctrl.is_discovery());
    let log = ctrl.discovery_log()?;
    eprintln!("discovery log: genctr {} {:?}", log.genctr, log.entries);
    let e = log
        .entries
        .iter()
        .find(|e| e.subnqn == NQN)
        .context("nvmet lists the subsystem")?;
    assert_eq!(e.trtype, trtype::TCP);
    assert_eq!(e.trsvcid, "4420");
    ctrl.shutdown()?;
    Ok(())
}

/// Waits until `n` completions arrived on `q`.
fn reap(q: &mut IoQueue, n: usize) -> Result<Vec<ferroblk_target::initiator::Completion>> {
    let mut done = Vec::with_capacity(n);
    let deadline = Instant::now() + T;
    while done.len() < n {
        if Instant::now() > deadline {
            bail!("{} of {n} completions after {T:?}", done.len());
        }
        q.wait(Some(Duration::from_secs(1)))?;
        q.poll(&mut done)?;
    }
    Ok(done)
}

fn session(addr: SocketAddr, digests: bool, sqflow_off: bool) -> Result<()> {
    eprintln!("session: digests {digests}, SQ flow control disabled {sqflow_off}");
    let mut opts = ConnectOptions::new(addr, NQN);
    opts.hdr_digest = digests;
    opts.data_digest = digests;
    // Short enough that the timer has to keep the controller alive during the idle pause.
    opts.kato = Duration::from_secs(3);
    let ctrl = connect_retry(&opts)?;
    assert_eq!(ctrl.digests(), (digests, digests));
    let id = ctrl.identify();
    assert_eq!(id.subnqn, NQN);
    assert!(id.ioccsz >= 4);
    eprintln!(
        "controller {} VS {:#x} MN '{}' IOCCSZ {} MDTS {} OFCS {:#x} SGLS {:#x}",
        ctrl.cntlid(),
        ctrl.version().0,
        id.mn,
        id.ioccsz,
        id.mdts,
        id.ofcs,
        id.sgls
    );
    assert_eq!(ctrl.active_namespaces()?, vec![1]);
    let ns = ctrl.namespace(1)?;
    assert_eq!(u64::from(ns.block_size) * ns.blocks, NS_BYTES);
    let bs = ns.block_size as usize;
    let (nsq, ncq) = ctrl.set_number_of_queues(2)?;
    assert!(nsq >= 2 && ncq >= 2, "{nsq} {ncq}");

    let io = IoQueueOptions {
        depth: 32,
        max_data: 8 << 20,
        disable_sq_flow_control: sqflow_off,
    };
    let mut q1 = ctrl.connect_io_queue(1, &io)?;
    let mut q2 = ctrl.connect_io_queue(2, &io)?;
    assert_eq!(q1.digests(), (digests, digests));
    eprintln!(
        "I/O queues: in-capsule up to {} bytes, MAXH2CDATA {}",
        q1.max_in_capsule(),
        q1.max_h2c_data()
    );

    // Blocking writes (in-capsule; R2T; the largest nvmet takes: Debian's nvmet-tcp rejects
    // any command over its MAXH2CDATA, 4 MiB, with Data SGL Length Invalid although it
    // reports no MDTS, so an H2CData sequence of several PDUs is only exercised against
    // ferroblk's own target), read back on the other queue.
    let big = (q1.max_h2c_data() as usize).min(4 << 20);
    for (off, len) in [(0u64, 4096usize), (1 << 20, 64 << 10), (8 << 20, big)] {
        let (slba, nlb) = (off / bs as u64, (len / bs) as u32);
        let mut w = pattern(off + u64::from(digests), len);
        q1.write(1, slba, nlb, &mut w)
            .with_context(|| format!("write {len} bytes at {off}"))?;
        let mut r = vec![0u8; len];
        q2.read(1, slba, nlb, &mut r)
            .with_context(|| format!("read {len} bytes at {off}"))?;
        assert!(r == w, "{len} bytes at {off} read back differ");
    }

    // Poll style: 32 writes of 16 KiB in flight on each queue, then 32 reads on the other.
    let depth = q1.depth() as u64;
    let base = 24u64 << 20;
    for (qi, q) in [&mut q1, &mut q2].into_iter().enumerate() {
        for i in 0..depth {
            let k = qi as u64 * depth + i;
            let off = base + k * 16384;
            let cmd = IoCommand::Write {
                nsid: 1,
                slba: off / bs as u64,
                nlb: (16384 / bs) as u32,
                fua: false,
            };
            q.submit(cmd, pattern(k + 7, 16384), k)
                .map_err(|r| anyhow::anyhow!("{r}"))?;
        }
    }
    for q in [&mut q1, &mut q2] {
        for c in reap(q, depth as usize)? {
            c.result()?;
        }
    }
    for (qi, q) in [&mut q2, &mut q1].into_iter().enumerate() {
        for i in 0..depth {
            let k = qi as u64 * depth + i;
            let off = base + k * 16384;
            let cmd = IoCommand::Read {
                nsid: 1,
                slba: off / bs as u64,
                nlb: (16384 / bs) as u32,
            };
            q.submit(cmd, vec![0u8; 16384], k)
                .map_err(|r| anyhow::anyhow!("{r}"))?;
        }
    }
    for q in [&mut q2, &mut q1] {
        for c in reap(q, depth as usize)? {
            c.result()?;
            assert!(c.buf == pattern(c.tag + 7, 16384), "tag {} differs", c.tag);
        }
    }

    q1.flush(1)?;

    // Write Zeroes and deallocate over written data read back as zeroes (loop device on
    // tmpfs: both punch holes).
    let zoff = 40u64 << 20;
    let zlen = 256 << 10;
    let mut w = pattern(99, zlen);
    q1.write(1, zoff / bs as u64, (zlen / bs) as u32, &mut w)?;
    q1.write_zeroes(1, zoff / bs as u64, (zlen / 2 / bs) as u32, false)?;
    q1.deallocate(
        1,
        &[DsmRange {
            cattr: 0,
            nlb: (zlen / 2 / bs) as u32,
            slba: (zoff + zlen as u64 / 2) / bs as u64,
        }],
    )?;
    let mut r = vec![0xffu8; zlen];
    q2.read(1, zoff / bs as u64, (zlen / bs) as u32, &mut r)?;
    assert!(r.iter().all(|&b| b == 0), "zeroed and deallocated blocks");

    // A failed command is a typed error and leaves the queue usable.
    let mut r = vec![0u8; bs];
    // (nvmet 6.1 answers a read past the end with Internal Error, DNR, not LBA Out of Range.)
    let e = q1.read(1, ns.blocks, 1, &mut r).unwrap_err();
    eprintln!("read past the end: {e}");
    assert!(matches!(e, Error::Command { opcode: 0x02, .. }), "{e:?}");
    assert!(e.status().is_some_and(|s| !s.is_success() && s.dnr), "{e}");
    assert_eq!(r.len(), bs, "the buffer comes back");

    // Idle past KATO: the keep-alive timer holds the controller.
    std::thread::sleep(opts.kato + Duration::from_secs(2));
    ctrl.keep_alive()?;
    q1.read(1, 0, 1, &mut r)?;

    // The marker the guest checks on its loop device.
    let mut m = vec![0u8; 4096];
    m[..MARKER.len()].copy_from_slice(MARKER);
    q2.write(1, MARKER_OFFSET / bs as u64, (4096 / bs) as u32, &mut m)?;
    q2.flush(1)?;

    let (s1, s2) = (q1.stats(), q2.stats());
    eprintln!("queue 1: {s1:?}\nqueue 2: {s2:?}");
    assert!(
        s1.in_capsule > 0 && s1.r2ts > 0 && s1.h2c_pdus >= s1.r2ts,
        "{s1:?}"
    );
    if sqflow_off {
        // nvmet completes successful reads with C2HData SUCCESS when SQ flow control is off.
        assert!(s2.c2h_success > 0, "{s2:?}");
    }
    assert_eq!(s1.data_digest_errors + s2.data_digest_errors, 0);

    q1.disconnect()?;
    q2.disconnect()?;
    ctrl.shutdown()?;
    Ok(())
}

fn perf(addr: SocketAddr) -> Result<()> {
    let out = Command::new(BIN)
        .args(["perf", "nvmf", "--addr", &addr.to_string(), "--nqn", NQN])
        .args([
            "--queues", "2", "--qd", "8", "--bs", "4096", "--rw", "randrw",
        ])
        .args([
            "--time",
            "3",
            "--wait",
            "--hdr-digest",
            "--data-digest",
            "--json",
        ])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "perf nvmf: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("perf nvmf failed: {}", out.status);
    }
    let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert!(v["ios"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
    for k in [
        "iops",
        "mib_s",
        "mean_us",
        "p99_us",
        "p999_us",
        "process_cpu_ns_per_io",
    ] {
        assert!(v[k].as_f64().is_some(), "{k} in {v}");
    }
    Ok(())
}

fn tell_guest_done(port: u16) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"done\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    if reply.trim() != "bye" {
        bail!("guest answered '{reply}'");
    }
    Ok(())
}

#[test]
fn initiator_against_linux_nvmet() -> Result<()> {
    let t0 = Instant::now();
    let (nvme_port, ctl_port) = (free_port(), free_port());
    let mut guest = Guest::start(&guest_script(), &[(nvme_port, 4420), (ctl_port, 4421)])?;
    guest.expect("NVMET-READY", Duration::from_secs(180))?;
    eprintln!("nvmet ready after {:?}", t0.elapsed());
    let addr = SocketAddr::from(([127, 0, 0, 1], nvme_port));

    let r = discovery(addr)
        .and_then(|()| session(addr, false, false))
        .and_then(|()| session(addr, true, true))
        .and_then(|()| perf(addr));
    // Release the guest whatever happened, so it powers off.
    let done = tell_guest_done(ctl_port);
    r?;
    done?;
    guest.expect("MARKER-OK", Duration::from_secs(60))?;
    guest.expect("NVMET-DONE", Duration::from_secs(60))?;
    guest.finish(Duration::from_secs(120))?;
    eprintln!("total {:?}", t0.elapsed());
    Ok(())
}
