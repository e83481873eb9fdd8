//! What every guest test does around its own checks: the lab prepared, a temporary directory
//! holding the daemon's `ferroblk.toml`, a guest script run with the shared shell functions in
//! front of it, and a failure that shows the guest's output and the daemon's log together.
//!
//! ```ignore
//! let t = GuestTest::new(|dir| format!("{}[[bdev]]\n...", config_head(dir)));
//! let mut daemon = start_daemon(&t.dir);
//! let out = t.run("fio_verify /dev/vda w --rw=randwrite --bs=4k --size=8M\necho GUEST-ALL-OK", &args);
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::lab::{Lab, LabOutput};

/// What a guest script prints last when every check passed.
pub const ALL_OK: &str = "GUEST-ALL-OK";

/// How long one guest run may take (boot under software emulation on a loaded machine,
/// then the script).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(900);

/// The lines every guest script starts with ([`GuestTest::run`] puts them in front): bash that
/// stops at the first failing command and echoes each one, and shell functions for what the
/// guest tests all do.
pub const PRELUDE: &str = r#"#!/bin/bash
set -euxo pipefail
# wait_dev DEV: until the block device node DEV exists (10 s).
wait_dev() { for i in $(seq 100); do [ -b "$1" ] && return 0; sleep 0.1; done; return 1; }
# wait_size NAME BYTES: until /sys/block/NAME is BYTES long (120 s: a resize reaching the guest).
wait_size() {
  for i in $(seq 120); do [ "$(cat /sys/block/$1/size)" -eq $(($2 >> 9)) ] && return 0; sleep 1; done
  echo "/sys/block/$1 did not reach $2 bytes"; return 1
}
# fio_verify DEV NAME [fio options]: asynchronous direct I/O whose writes are read back and
# checked (crc32c), failing at the first mismatch.
fio_verify() {
  local dev=$1 name=$2; shift 2
  fio --name=$name --filename=$dev --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 "$@"
}
# zeroed DEV MIB COUNT: COUNT MiB from MiB offset MIB of DEV read back as zeroes.
zeroed() { dd if=$1 bs=1M skip=$2 count=$3 iflag=direct status=none | cmp -n $(($3 << 20)) - /dev/zero; }
# wait_log FILE TEXT: until FILE (a daemon's log) contains TEXT (30 s).
wait_log() { for i in $(seq 150); do grep -q "$2" "$1" && return 0; sleep 0.2; done; return 1; }
# rxe_up: soft-RoCE on eth0 (device rxe0), or, on a kernel without rdma_rxe, the
# NO_RXE marker and the end of the script (the test is then skipped, saying so).
rxe_up() {
  if [ ! -d /sys/module/rdma_rxe ]; then echo RDMA-RXE-UNAVAILABLE; exit 0; fi
  rdma link add rxe0 type rxe netdev eth0
  rdma link show
}
# no_io_errors: the guest kernel logged no virtqueue or I/O error.
no_io_errors() {
  if dmesg | grep -E "is not a head|I/O error|virtio.*broken"; then
    echo "guest kernel reported a virtqueue or I/O error"; return 1
  fi
}
"#;

/// Printed by [`PRELUDE`]'s `rxe_up` when the guest kernel has no soft-RoCE driver.
pub const NO_RXE: &str = "RDMA-RXE-UNAVAILABLE";

/// This build's `ferroblk` binary as the guest sees it: the host's tree is mounted whole at
/// `/run/lab/host` (a build under /tmp would be hidden by the guest's own /tmp).
pub fn guest_bin() -> String {
    format!("/run/lab/host{}", env!("CARGO_BIN_EXE_ferroblk"))
}

/// The head of a test daemon's configuration in `dir`: two reactors and the control socket
/// `rpc.sock` that [`super::daemon::start_daemon`] waits for.
pub fn config_head(dir: &Path) -> String {
    format!(
        "[reactors]\ncount = 2\n[rpc]\nsocket = \"{}/rpc.sock\"\n",
        dir.display()
    )
}

/// One guest test's host side (see the module doc).
pub struct GuestTest {
    lab: Lab,
    _tmp: tempfile::TempDir,
    /// The test's directory: `ferroblk.toml`, `rpc.sock`, `daemon.log`, images.
    pub dir: PathBuf,
    timeout: Duration,
}

impl GuestTest {
    /// Prepares the lab (panics with its error when it cannot be) and a temporary directory
    /// with `ferroblk.toml` = `config(dir)`.
    pub fn new(config: impl FnOnce(&Path) -> String) -> GuestTest {
        let lab =
            Lab::prepare().unwrap_or_else(|e| panic!("the guest lab could not be prepared: {e:#}"));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("ferroblk.toml"), config(&dir)).unwrap();
        GuestTest {
            lab,
            _tmp: tmp,
            dir,
            timeout: RUN_TIMEOUT,
        }
    }

    /// A test whose daemons run inside the guest (none on the host): no configuration.
    pub fn in_guest() -> GuestTest {
        GuestTest::new(|_| String::new())
    }

    /// Bounds each guest run by `t` instead of [`RUN_TIMEOUT`].
    pub fn timeout(mut self, t: Duration) -> GuestTest {
        self.timeout = t;
        self
    }

    /// [`GuestTest::run`] for a script that starts with `rxe_up`: `None`, after saying so,
    /// when the guest kernel has no soft-RoCE (nothing over RDMA could be tested).
    pub fn run_soft_roce(&self, script: &str) -> Option<LabOutput> {
        let out = self.run_unchecked(script, &[]);
        if out.success() && out.output.contains(NO_RXE) {
            eprintln!(
                "SKIPPED: the guest kernel has no rdma_rxe (soft-RoCE) module; NVMe/RDMA was not \
                 tested"
            );
            return None;
        }
        self.assert_passed(&out);
        Some(out)
    }

    /// A sparse file `name` of `len` bytes in the test's directory.
    pub fn sparse_file(&self, name: &str, len: u64) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path
    }

    /// Everything the daemon(s) started in the directory have logged.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Boots a guest with `extra_qemu_args`, runs [`PRELUDE`] then `script` in it, and panics
    /// with the guest's output and the daemon's log unless the script exited 0 after printing
    /// [`ALL_OK`].
    pub fn run(&self, script: &str, extra_qemu_args: &[String]) -> LabOutput {
        let out = self.run_unchecked(script, extra_qemu_args);
        self.assert_passed(&out);
        out
    }

    /// [`GuestTest::run`] without the check, for a test that must clean up before it judges.
    pub fn run_unchecked(&self, script: &str, extra_qemu_args: &[String]) -> LabOutput {
        let script = format!("{PRELUDE}{}", script.trim_start());
        self.lab
            .run(&script, extra_qemu_args, self.timeout)
            .unwrap_or_else(|e| panic!("the guest lab failed: {e:#}"))
    }

    /// Panics with the guest's output and the daemon's log unless `out` passed.
    pub fn assert_passed(&self, out: &LabOutput) {
        assert!(
            out.success() && out.output.contains(ALL_OK),
            "guest checks failed (status {}):\n{}\n--- daemon log ---\n{}",
            out.status,
            out.output,
            self.daemon_log()
        );
    }
}
