//! A real Linux guest (QEMU, software emulation) uses an `rbd` volume of a real single-node Ceph
//! cluster over vhost-user-blk: fio write+verify, data the guest wrote found by `rbd export`,
//! and a live resize over the RPC that grows the image in the cluster and reaches the guest's
//! virtio-blk disk without a reboot.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::daemon::{GuestRequests, start_daemon};
use common::guest::{GuestTest, config_head};
use common::lab::vhost_user_blk_args;
use ferroblk_rbd::testing::{POOL, TestCluster};

fn config(dir: &Path, c: &TestCluster) -> String {
    format!(
        r#"{head}
[[bdev]]
name = "disk"
kind = "rbd"
{cluster}image = "guest"
create = true
size = "256MiB"
[[vhost]]
socket = "{dir}/vhost.sock"
bdev = "disk"
num_queues = 2
serial = "ferroblk-rbd-guest"
"#,
        head = config_head(dir),
        dir = dir.display(),
        cluster = c.decl_fields(),
    )
}

const GUEST: &str = r#"
__SAY__
dev=/dev/vda
test "$(cat /sys/block/vda/serial)" = ferroblk-rbd-guest
test "$(cat /sys/block/vda/size)" -eq $((256 << 20 >> 9))
fio_verify $dev verify --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --size=8M \
    --offset_increment=8M --group_reporting
# Known data for the host to find in the image (the same bytes as `pattern()` on the host).
(yes ferroblk-rbd-guest || true) | head -c 4M > /tmp/pattern
dd if=/tmp/pattern of=$dev bs=1M seek=48 oflag=direct conv=fsync status=none

# Live resize over the RPC: the image grows in the cluster, the guest sees it without a reboot.
say resize
wait_size vda $((512 << 20))
dd if=/tmp/pattern of=$dev bs=1M seek=500 oflag=direct conv=fsync status=none
dd if=$dev bs=1M skip=500 count=4 iflag=direct status=none | cmp -n $((4 << 20)) - /tmp/pattern
no_io_errors
say done
echo GUEST-ALL-OK
"#;

/// What the guest's `yes ferroblk-rbd-guest | head -c 4M` writes.
fn pattern() -> Vec<u8> {
    b"ferroblk-rbd-guest\n"
        .iter()
        .copied()
        .cycle()
        .take(4 << 20)
        .collect()
}

#[test]
fn linux_guest_uses_an_rbd_volume_and_sees_it_grow() {
    let c = TestCluster::start();
    let t = GuestTest::new(|dir| config(dir, &c));
    let dir = &t.dir;
    let daemon = Arc::new(Mutex::new(start_daemon(dir)));
    // The guest asks for "resize" (bdev `disk` to 512 MiB) and says "done"; no kill here.
    let host = GuestRequests::serve(dir, daemon.clone(), "disk", 0, None);
    let script = host.script(GUEST);
    let args = vhost_user_blk_args("disk0", &dir.join("vhost.sock"), 2);
    let run = t.run_unchecked(&script, &args);
    // Stopped before any check (the guest is gone): a failing check must not leave it running.
    let stopped = daemon.lock().unwrap().stop();
    t.assert_passed(&run);
    assert_eq!(host.join(), ["resize", "done"], "{}", t.daemon_log());

    // What the guest wrote is in the image, as the rbd CLI reads it, and the image grew.
    let export = dir.join("guest.raw");
    c.rbd_ok(&["export", &format!("{POOL}/guest"), export.to_str().unwrap()]);
    let image = std::fs::read(&export).unwrap();
    assert_eq!(image.len(), 512 << 20);
    assert!(
        image[48 << 20..52 << 20] == pattern()[..],
        "the guest's data is not in the image"
    );
    assert!(stopped, "daemon exits cleanly");
}
