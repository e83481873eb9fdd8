//! The Linux kernel's NVMe/RDMA host (nvme-cli, nvme-rdma, fio) against ferroblk's NVMe/RDMA
//! target over soft-RoCE, all inside one QEMU guest: `rdma_rxe` on the guest's eth0, ferroblk
//! (this build's binary, read from the host's root over 9p) listening on RDMA at the guest's
//! address, then discovery (RDMA entries), connect with several I/O queues, fio write+verify
//! (4 KiB to 1 MiB), discard, a live resize seen through an asynchronous event, a listener added
//! over the RPC, a non-NVMe RDMA client rejected, the host allow-list, disconnect, and the RDMA
//! device removed under I/O.

mod common;

use common::guest::{GuestTest, guest_bin};

const NQN: &str = "nqn.2026-11.io.ferroblk:rdma";
const PRIVATE: &str = "nqn.2026-11.io.ferroblk:rdma-private";
const ALLOWED_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const GUEST: &str = r#"
BIN=__BIN__; NQN=__NQN__; PRIV=__PRIV__; OK_HOST=__OKHOST__
rxe_up
A=10.0.2.15
W=/tmp/fb; mkdir -p $W
cat > $W/ferroblk.toml <<CFG
[reactors]
count = 2
[rpc]
socket = "$W/rpc.sock"
[[bdev]]
name = "disk"
kind = "file"
path = "$W/disk.img"
size = "128MiB"
create = true
direct = "never"
[[bdev]]
name = "ram"
kind = "malloc"
size = "16MiB"
[[subsystem]]
nqn = "$NQN"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "disk"
[[subsystem]]
nqn = "$PRIV"
hosts = ["$OK_HOST"]
[[subsystem.namespace]]
nsid = 1
bdev = "ram"
[[listener]]
trtype = "rdma"
addr = "$A"
port = 4420
CFG
$BIN serve --config $W/ferroblk.toml > $W/log 2>&1 &
FB=$!
trap 'echo "--- daemon log ---"; cat $W/log' EXIT
wait_log $W/log "NVMe/RDMA listener started"

# Discovery over RDMA lists the open subsystem with the RDMA transport fields.
nvme discover -t rdma -a $A -s 4420 | tee /tmp/disc
grep -q "trtype: *rdma" /tmp/disc
grep -q "rdma_cms: *rdma-cm" /tmp/disc
grep -q "$NQN" /tmp/disc
! grep -q "$PRIV" /tmp/disc

# Connect with two I/O queues.
nvme connect -t rdma -a $A -s 4420 -n $NQN -i 2
wait_dev /dev/nvme0n1
nvme list
nvme id-ctrl /dev/nvme0 | tee /tmp/idctrl
grep -q "subnqn *: $NQN" /tmp/idctrl
test "$(cat /sys/class/nvme/nvme0/transport)" = rdma
fio --name=verify --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --numjobs=2 --size=8M --offset_increment=8M --verify=crc32c --verify_fatal=1 \
    --group_reporting
# Large I/O: several RDMA READs / WRITEs per command.
fio --name=big --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randwrite \
    --bsrange=64k-1m --iodepth=8 --size=32M --offset=32M --verify=crc32c --verify_fatal=1
dd if=/dev/urandom of=/dev/nvme0n1 bs=1M count=2 seek=80 oflag=direct status=none
blkdiscard -o $((80 << 20)) -l $((1 << 20)) /dev/nvme0n1
dd if=/dev/nvme0n1 bs=1M skip=80 count=1 iflag=direct status=none | cmp -n $((1 << 20)) - /dev/zero

# Live resize: an asynchronous event (an AER completion over RDMA) makes the host re-read it.
$BIN rpc --socket $W/rpc.sock bdev_resize name='"disk"' size='"192MiB"'
for i in $(seq 120); do
  [ "$(cat /sys/block/nvme0n1/size)" -eq $((192 << 20 >> 9)) ] && break
  sleep 0.5
done
test "$(cat /sys/block/nvme0n1/size)" -eq $((192 << 20 >> 9))
nvme disconnect -n $NQN

# A second RDMA listener added over the RPC serves discovery and I/O.
$BIN rpc --socket $W/rpc.sock nvmf_listener_add trtype='"rdma"' addr="\"$A\"" port=4421
nvme discover -t rdma -a $A -s 4421 | grep -q "trsvcid: *4421"
nvme connect -t rdma -a $A -s 4421 -n $NQN -i 1
wait_dev /dev/nvme0n1
dd if=/dev/nvme0n1 bs=1M count=1 iflag=direct status=none of=/dev/null
nvme disconnect -n $NQN

# A client that is not an NVMe host (rping: no NVMe/RDMA private data) is rejected at the
# RDMA CM; the daemon serves on (the connects below).
if timeout 30 rping -c -a $A -p 4420 -C 1; then echo "rping was accepted"; exit 1; fi
grep -q "bad NVMe/RDMA private data" $W/log

# The allow-list: a host not on it is refused; the listed one gets in.
if nvme connect -t rdma -a $A -s 4420 -n $PRIV --hostnqn=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000dead; then
  echo "a host not on the allow-list connected"; exit 1
fi
nvme connect -t rdma -a $A -s 4420 -n $PRIV --hostnqn=$OK_HOST -i 1
wait_dev /dev/nvme0n1
dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 status=none
dd if=/tmp/pattern of=/dev/nvme0n1 bs=64k oflag=direct status=none
dd if=/dev/nvme0n1 bs=64k count=16 iflag=direct status=none | cmp - /tmp/pattern
nvme disconnect -n $PRIV

# The RDMA device goes away under I/O: the host's queues and the listener let go of it,
# the daemon keeps running and stops cleanly (rxe finishes the removal once the process has
# closed the device: it cannot take a device from a running process).
nvme connect -t rdma -a $A -s 4420 -n $NQN -i 2
wait_dev /dev/nvme0n1
(fio --name=gone --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randrw --bs=4k \
    --iodepth=8 --time_based --runtime=30 >/dev/null 2>&1 || true) &
sleep 2
closed0=$(grep -c 'NVMe queue closing' $W/log)
rdma link delete rxe0 &
wait_log $W/log "RDMA device of the NVMe/RDMA listener removed"
# Its admin queue and both I/O queues are closed.
for i in $(seq 100); do [ "$(grep -c 'NVMe queue closing' $W/log)" -ge $((closed0 + 3)) ] && break; sleep 0.3; done
test "$(grep -c 'NVMe queue closing' $W/log)" -ge $((closed0 + 3))
nvme disconnect-all || true

# The daemon is still running after all of it, and stops cleanly.
kill -0 $FB
kill -TERM $FB
wait $FB
echo GUEST-ALL-OK
"#;

#[test]
fn linux_host_uses_ferroblk_over_nvme_rdma_on_soft_roce() {
    let t = GuestTest::in_guest();
    let script = GUEST
        .replace("__BIN__", &guest_bin())
        .replace("__NQN__", NQN)
        .replace("__PRIV__", PRIVATE)
        .replace("__OKHOST__", ALLOWED_HOST);
    let Some(out) = t.run_soft_roce(&script) else {
        return;
    };
    assert!(
        out.output.contains("Connect refused") && out.output.contains("not on the allow-list"),
        "the refused host is logged:\n{}",
        out.output
    );
}
