//! A real Linux guest (QEMU, software emulation) attaches a ferroblk volume over
//! vhost-user-blk and uses it with the kernel's virtio-blk driver: fio write+verify on two
//! queues, discard and write-zeroes, GET_ID, data landing in the backing file, a live resize
//! over the RPC, and `kill -9` of the daemon with guest writes held in it, and a restart that
//! resubmits them from the inflight region (none lost, none completed twice).
//!
//! One guest boot runs every check; the guest tells the host when to resize and when to kill
//! through a TCP connection to the host's loopback (10.0.2.2 from the guest).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::daemon::{GuestRequests, start_daemon};
use common::guest::{GuestTest, config_head};
use common::lab::vhost_user_blk_args;

fn config(dir: &Path) -> String {
    format!(
        r#"{head}
[[bdev]]
name = "disk"
kind = "file"
path = "{dir}/disk.img"
# Writes take 5 ms; before the kill the host raises this to an hour over the RPC, so the
# guest's writes are held in flight when the daemon dies (the restarted one has 5 ms again).
[[bdev]]
name = "slow"
kind = "delay"
base = "disk"
write_us = 5000
[[vhost]]
socket = "{dir}/vhost.sock"
bdev = "slow"
num_queues = 2
serial = "ferroblk-guest-test"
"#,
        head = config_head(dir),
        dir = dir.display()
    )
}

const GUEST: &str = r#"
__SAY__
dev=/dev/vda
# Two virtqueues, 4 KiB logical blocks, the serial from GET_ID.
test "$(ls /sys/block/vda/mq | wc -l)" -eq 2
test "$(cat /sys/block/vda/queue/logical_block_size)" -eq 4096
test "$(cat /sys/block/vda/serial)" = ferroblk-guest-test
test "$(cat /sys/block/vda/size)" -eq $((256 << 20 >> 9))

# fio random writes then verified reads, two jobs (one per queue's CPU).
fio_verify $dev verify --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --size=8M \
    --offset_increment=8M --group_reporting
# Larger, multi-segment requests.
fio_verify $dev big --rw=write --bs=256k --iodepth=4 --size=8M --offset=16M

# Discard and write-zeroes read back as zeroes.
dd if=/dev/urandom of=$dev bs=1M count=2 seek=40 oflag=direct status=none
blkdiscard -o $((40 << 20)) -l $((1 << 20)) $dev
zeroed $dev 40 1
blkdiscard -z -o $((41 << 20)) -l $((1 << 20)) $dev
zeroed $dev 41 1

# Known data for the host to find in the backing file.
head -c 4M /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of=$dev bs=1M seek=48 oflag=direct conv=fsync status=none
echo "GUEST-SHA=$(sha256sum /tmp/pattern | cut -d' ' -f1)"

# Live resize over the RPC: the guest sees the new size without a reboot.
say resize
wait_size vda $((512 << 20))
dd if=/tmp/pattern of=$dev bs=1M seek=500 oflag=direct conv=fsync status=none
dd if=$dev bs=1M skip=500 count=4 iflag=direct status=none | cmp -n $((4 << 20)) - /tmp/pattern

# kill -9 of the daemon while it holds fio's writes (the host holds them before it answers);
# it is restarted and the guest's in-flight requests are resubmitted: fio must finish, and
# verify every write it was told had completed.
say kill
fio_verify $dev crash --rw=randwrite --bs=4k --iodepth=16 --size=16M --offset=64M
# I/O keeps working after the restart.
dd if=/tmp/pattern of=$dev bs=1M seek=128 oflag=direct conv=fsync status=none
dd if=$dev bs=1M skip=128 count=4 iflag=direct status=none | cmp -n $((4 << 20)) - /tmp/pattern
# No request completed twice or failed (the driver reports a used id it does not know).
no_io_errors
say done
echo GUEST-ALL-OK
"#;

/// The sum of `count` over the daemon log's "resubmitting inflight requests" lines.
fn resubmitted_requests(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("resubmitting inflight requests"))
        .map(|l| {
            // Fields may be coloured: drop escape sequences, then read `count=N`.
            let mut plain = String::new();
            let mut esc = false;
            for c in l.chars() {
                match (esc, c) {
                    (false, '\x1b') => esc = true,
                    (true, 'm') => esc = false,
                    (true, _) => {}
                    (false, c) => plain.push(c),
                }
            }
            let n = plain
                .split("count=")
                .nth(1)
                .unwrap_or_else(|| panic!("{plain}"));
            let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn linux_guest_uses_a_vhost_user_blk_disk() {
    let t = GuestTest::new(config);
    let dir = &t.dir;
    t.sparse_file("disk.img", 256 << 20);
    let daemon = Arc::new(Mutex::new(start_daemon(dir)));

    // The guest's requests: "resize", "kill", "done".
    // The kill waits until at least 8 of fio's 16 writes are held in the daemon.
    let host = GuestRequests::serve(
        dir,
        daemon.clone(),
        "slow",
        8,
        Some("resubmitting inflight requests"),
    );

    let script = host.script(GUEST);
    let args = vhost_user_blk_args("disk0", &dir.join("vhost.sock"), 2);
    let out = t.run(&script, &args);
    let log = t.daemon_log();
    let held = host.held_at_kill();
    assert_eq!(host.join(), ["resize", "kill", "done"], "{log}");
    // QEMU reconnected to the restarted daemon, which resubmitted at least every write the
    // killed one held (more only if the guest sent some between the last count and the kill).
    assert!(held >= 8, "{held} writes held at the kill");
    assert!(log.matches("front-end connected").count() >= 2, "{log}");
    let resubmitted = resubmitted_requests(&log);
    eprintln!("writes held at the kill: {held}, requests resubmitted: {resubmitted}");
    assert!(
        resubmitted >= held,
        "{resubmitted} requests resubmitted, {held} were held:\n{log}"
    );

    // The data the guest wrote is in the backing file.
    let sha = out
        .output
        .lines()
        .find_map(|l| l.split("GUEST-SHA=").nth(1))
        .expect("guest printed its checksum")
        .trim()
        .to_string();
    let host_sha = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "dd if={}/disk.img bs=1M skip=48 count=4 status=none | sha256sum | cut -d' ' -f1",
            dir.display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&host_sha.stdout).trim(), sha);
    assert_eq!(
        std::fs::metadata(dir.join("disk.img")).unwrap().len(),
        512 << 20
    );

    assert!(
        daemon.lock().unwrap().stop(),
        "daemon exits cleanly after the guest is gone"
    );
}
