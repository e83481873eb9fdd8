//! The largest I/O each export advertises, through transform chains, from the Linux kernel's
//! own drivers: a QEMU guest attaches an encrypted volume (`crypt_xts` over `malloc`) and a
//! stacked one (`crc -> compress -> crypt_xts -> file`) over vhost-user-blk (virtio-blk) and
//! over NVMe/TCP (nvme-tcp), and runs fio with `bs=1M` and `bsrange=4k-1M` with `--verify` on
//! each, plus 1 MiB `dd` writes read back through the other export.
//!
//! The transforms take at most 128 KiB per request; the bdev channel layer splits what the
//! hosts send (up to NVMe MDTS = 1 MiB, virtio-blk seg_max × size_max). Before it did, every
//! write larger than 128 KiB to an encrypted volume failed.

mod common;

use std::path::Path;

use common::daemon::{free_port, rpc, start_daemon};
use common::guest::{GuestTest, config_head};
use common::lab::vhost_user_blk_args;

const NQN: &str = "nqn.2026-12.io.ferroblk:large-io";

fn config(dir: &Path, port: u16) -> String {
    let key = "0f1e2d3c4b5a69788796a5b4c3d2e1f0".repeat(2)
        + &"00112233445566778899aabbccddeeff".repeat(2);
    format!(
        r#"{head}
[[bdev]]
name = "ram"
kind = "malloc"
size = "64MiB"
[[bdev]]
name = "xts"
kind = "crypt_xts"
base = "ram"
key_hex = "{key}"

[[bdev]]
name = "disk"
kind = "file"
path = "{dir}/disk.img"
size = "96MiB"
create = true
[[bdev]]
name = "secret"
kind = "crypt_xts"
base = "disk"
key_hex = "{key}"
[[bdev]]
name = "packed"
kind = "compress"
base = "secret"
size = "64MiB"
chunk_size = "16KiB"
algorithm = "lz4"
format = "if_unformatted"
[[bdev]]
name = "chain"
kind = "crc"
base = "packed"

[[vhost]]
socket = "{dir}/xts.sock"
bdev = "xts"
num_queues = 2
[[vhost]]
socket = "{dir}/chain.sock"
bdev = "chain"
num_queues = 2

[[subsystem]]
nqn = "{NQN}"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "xts"
[[subsystem.namespace]]
nsid = 2
bdev = "chain"
[[listener]]
addr = "127.0.0.1"
port = {port}
"#,
        head = config_head(dir),
        dir = dir.display()
    )
}

const GUEST: &str = r#"
P=__PORT__; NQN=__NQN__
nvme connect -t tcp -a 10.0.2.2 -s $P -n $NQN -i 2
wait_dev /dev/nvme0n1
wait_dev /dev/nvme0n2

# What each export advertises, as the kernel took it.
for d in vda vdb nvme0n1 nvme0n2; do
  q=/sys/block/$d/queue
  echo "$d: max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) max_segments=$(cat $q/max_segments) max_segment_size=$(cat $q/max_segment_size) optimal_io_size=$(cat $q/optimal_io_size)"
  # Let the block layer send requests as large as the export takes.
  cat $q/max_hw_sectors_kb > $q/max_sectors_kb
done
# NVMe/TCP: MDTS = 1 MiB. virtio-blk: 126 segments (seg_max) of up to 8 KiB (size_max).
test "$(cat /sys/block/nvme0n1/queue/max_hw_sectors_kb)" -eq 1024
test "$(cat /sys/block/vda/queue/max_segments)" -eq 126
test "$(cat /sys/block/vda/queue/max_segment_size)" -eq 8192
# The transforms' own transfer (128 KiB) is the optimal I/O size on both exports.
test "$(cat /sys/block/vda/queue/optimal_io_size)" -eq 131072
test "$(cat /sys/block/nvme0n1/queue/optimal_io_size)" -eq 131072

for dev in /dev/vda /dev/vdb /dev/nvme0n1 /dev/nvme0n2; do
  fio_verify $dev seq1m --rw=write --bs=1M --iodepth=4 --size=12M
  fio_verify $dev range --rw=randwrite --bsrange=4k-1M --iodepth=8 --size=24M --offset=16M \
      --randseed=7
done

# 1 MiB writes through one export read back through the other (same volume).
head -c $((4 << 20)) /dev/urandom > /tmp/r
dd if=/tmp/r of=/dev/vda bs=1M seek=48 oflag=direct status=none
dd if=/dev/nvme0n1 bs=1M skip=48 count=4 iflag=direct status=none | cmp - /tmp/r
dd if=/tmp/r of=/dev/nvme0n2 bs=1M seek=48 oflag=direct status=none
dd if=/dev/vdb bs=1M skip=48 count=4 iflag=direct status=none | cmp - /tmp/r
nvme disconnect -n $NQN
echo GUEST-ALL-OK
"#;

#[test]
fn linux_hosts_send_the_largest_advertised_io_through_transform_chains() {
    let port = free_port();
    let t = GuestTest::new(|dir| config(dir, port));
    let dir = &t.dir;
    let mut daemon = start_daemon(dir);

    let mut extra = vhost_user_blk_args("xts", &dir.join("xts.sock"), 2);
    extra.extend(vhost_user_blk_args("chain", &dir.join("chain.sock"), 2));
    let script = GUEST
        .replace("__PORT__", &port.to_string())
        .replace("__NQN__", NQN);
    // Large I/O through crypt_xts and crc->compress->crypt_xts->file over vhost-user-blk and
    // NVMe/TCP.
    t.run(&script, &extra);

    // The hosts did send requests past the transforms' 128 KiB: the exported bdevs saw
    // writes averaging above it, and no request failed.
    let list: serde_json::Value = serde_json::from_str(&rpc(dir, "bdev_list", "{}")).unwrap();
    for name in ["xts", "chain"] {
        let b = list
            .as_array()
            .and_then(|a| a.iter().find(|b| b["name"] == name))
            .unwrap_or_else(|| panic!("{name} in bdev_list: {list}"));
        let stats = &b["stats"];
        let (ops, bytes) = (
            stats["ops"]["write"].as_u64().unwrap(),
            stats["bytes"]["write"].as_u64().unwrap(),
        );
        assert!(ops > 0 && bytes / ops > 128 << 10, "{name}: {stats}");
        assert_eq!(stats["errors"], 0, "{name}: {stats}");
    }
    assert!(daemon.stop(), "daemon exits cleanly");
}
