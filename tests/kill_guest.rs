//! A daemon crash is invisible to a live guest, on every stacked kind: a Linux guest writes
//! (4 KiB random writes, QD 16, no flush) over vhost-user-blk to a `compress`, a `crc`, a
//! `crypt_gcm` and a `crypt_xts` volume (each over its own file) at once; the daemon is killed
//! with SIGKILL in the middle of the write phase and started again; QEMU reconnects, the guest
//! never notices, and fio then verifies every block it was told was written.
//!
//! The contract: an acknowledged write survives a SIGKILL of the daemon (the kernel still holds
//! what reached the files), with no flush. Before compress logged its map updates, this run read
//! zeroes where acknowledged writes were on the compress volume.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::daemon::{GuestRequests, start_daemon};
use common::guest::{GuestTest, config_head};
use common::lab::vhost_user_blk_args;

/// The volumes, in the order the guest sees them (`vda`, `vdb`, ...).
const VOLUMES: [&str; 4] = ["z", "c", "g", "x"];

fn config(dir: &Path) -> String {
    let xts = "0f1e2d3c4b5a69788796a5b4c3d2e1f0".repeat(2)
        + &"00112233445566778899aabbccddeeff".repeat(2);
    let gcm = "00112233445566778899aabbccddeeff".repeat(2);
    let mut c = format!(
        r#"{head}
[[bdev]]
name = "z"
kind = "compress"
base = "fz"
size = "64MiB"
chunk_size = "16KiB"
algorithm = "lz4"
[[bdev]]
name = "c"
kind = "crc"
base = "fc"
[[bdev]]
name = "g"
kind = "crypt_gcm"
base = "fg"
key_hex = "{gcm}"
[[bdev]]
name = "x"
kind = "crypt_xts"
base = "fx"
key_hex = "{xts}"
"#,
        head = config_head(dir)
    );
    for v in VOLUMES {
        c += &format!(
            r#"
[[bdev]]
name = "f{v}"
kind = "file"
path = "{dir}/{v}.img"
size = "80MiB"
create = true
[[vhost]]
socket = "{dir}/{v}.sock"
bdev = "{v}"
num_queues = 1
"#,
            dir = dir.display()
        );
    }
    c
}

const GUEST: &str = r#"
__SAY__
for d in vda vdb vdc vdd; do [ -b /dev/$d ]; done
# The host kills the daemon once the compress volume has taken 300 of these writes: in the
# middle of the write phase on all four volumes. Then every acknowledged block is verified.
say kill
fio --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=24M \
    --verify=crc32c --verify_fatal=1 --group_reporting \
    --name=compress --filename=/dev/vda --name=crc --filename=/dev/vdb \
    --name=gcm --filename=/dev/vdc --name=xts --filename=/dev/vdd
no_io_errors
say done
echo GUEST-ALL-OK
"#;

#[test]
fn acknowledged_guest_writes_survive_a_daemon_kill_on_every_stacked_kind() {
    let t = GuestTest::new(config);
    let dir = &t.dir;
    let daemon = Arc::new(Mutex::new(start_daemon(dir)));
    let host = GuestRequests::serve(dir, daemon.clone(), "z", 300, None);

    let mut extra = Vec::new();
    for v in VOLUMES {
        extra.extend(vhost_user_blk_args(v, &dir.join(format!("{v}.sock")), 1));
    }
    let script = host.script(GUEST);
    // Acknowledged writes to compress/crc/crypt_gcm/crypt_xts over vhost-user-blk must
    // survive a SIGKILL of the daemon: fio verifies every one.
    t.run(&script, &extra);
    let log = t.daemon_log();
    assert_eq!(host.join(), ["kill", "done"]);
    let starts = log
        .lines()
        .filter(|l| l.starts_with("ferroblk ") && l.contains(" serving"))
        .count();
    assert_eq!(
        starts, 2,
        "the daemon was killed and started again once:\n{log}"
    );
    assert!(daemon.lock().unwrap().stop(), "daemon exits cleanly");
}
