//! ferroblk's NVMe/RDMA initiator (`ferroblk_target::initiator` over soft-RoCE), all inside one
//! QEMU guest of the lab (`rdma_rxe` on the guest's eth0; ferroblk is this build's binary, read
//! from the host's root over 9p):
//!
//! - against ferroblk's own NVMe/RDMA target: `ferroblk perf nvmf --trtype rdma --verify`
//!   (random reads and writes, then every queue writes a pattern, reads it back and
//!   compares) with 4 KiB (in-capsule writes), 64 KiB and 1 MiB I/O, polling and sleeping on
//!   the completion channel; a connect to a port with no listener and a host not on the
//!   allow-list are refused with an error;
//! - against the guest kernel's nvmet-rdma (configfs, a loop device over a tmpfs file): the
//!   same verify runs;
//! - the `nvmf` bdev over RDMA: a second ferroblk daemon with one `nvmf` bdev whose path is
//!   `trtype = "rdma"` to nvmet-rdma and one to the first daemon, both exported over NVMe/TCP
//!   on the guest's loopback; the kernel's nvme-tcp host runs fio write+verify (4 KiB to
//!   1 MiB) through them, and a pattern written through the bdev is read back from nvmet's
//!   loop device directly and compared.

mod common;

use std::time::Duration;

use common::guest::{GuestTest, guest_bin};

const GUEST: &str = r#"
BIN=__BIN__
rxe_up
A=10.0.2.15
NQN=nqn.2026-11.io.ferroblk:rdma-init
PRIV=nqn.2026-11.io.ferroblk:rdma-init-private
KNQN=nqn.2026-11.io.ferroblk:nvmet-rdma
BNQN=nqn.2026-11.io.ferroblk:via-rdma
OK_HOST=nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555
W=/tmp/fb; mkdir -p $W
cleanup() {
  echo "--- target daemon log ---"; cat $W/a.log || true
  echo "--- nvmf bdev daemon log ---"; cat $W/b.log || true
}
trap cleanup EXIT

# --- Daemon A: ferroblk's NVMe/RDMA target. ---
cat > $W/a.toml <<CFG
[reactors]
count = 1
[rpc]
socket = "$W/a.sock"
[[bdev]]
name = "ram"
kind = "malloc"
size = "64MiB"
[[bdev]]
name = "ram2"
kind = "malloc"
size = "16MiB"
[[subsystem]]
nqn = "$NQN"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "ram"
[[subsystem]]
nqn = "$PRIV"
hosts = ["$OK_HOST"]
[[subsystem.namespace]]
nsid = 1
bdev = "ram2"
[[listener]]
trtype = "rdma"
addr = "$A"
port = 4420
CFG
$BIN serve --config $W/a.toml > $W/a.log 2>&1 &
FA=$!
wait_log $W/a.log "NVMe/RDMA listener started"

perf() { $BIN perf nvmf --trtype rdma "$@"; }
# A run with --verify whose output (kept in $W/out) must show every queue's check passed.
verified() {
  perf "$@" --verify > $W/out 2>&1 || { cat $W/out; return 1; }
  cat $W/out
  grep -q "errors: 0" $W/out
  test "$(grep -c 'all match' $W/out)" -eq "$(grep -c '^verify: queue' $W/out)"
  grep -q "all match" $W/out
}
# 4 KiB: writes go in the capsule; 64 KiB and 1 MiB: keyed SGLs over the registered slot
# buffers. Then --wait: the queue threads sleep on the completion channel.
verified --addr $A:4420 --nqn $NQN --rw randrw --bs 4k --qd 16 --queues 2 --time 2
test "$(grep -c 'all match' $W/out)" -eq 2
verified --addr $A:4420 --nqn $NQN --rw randwrite --bs 64k --qd 8 --time 2
verified --addr $A:4420 --nqn $NQN --rw randrw --bs 1m --qd 4 --time 2 --wait

# Refusals: no listener on the port (the RDMA CM connect is rejected), a host not on the
# allow-list (the Fabrics Connect fails), then the allowed host gets in.
if perf --addr $A:4499 --nqn $NQN --time 1 > $W/r1 2>&1; then echo "connected without a listener"; exit 1; fi
cat $W/r1
grep -q "NVMe/RDMA connection failed" $W/r1
if perf --addr $A:4420 --nqn $PRIV --hostnqn nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000dead --time 1 > $W/r2 2>&1; then
  echo "a host not on the allow-list connected"; exit 1
fi
cat $W/r2
verified --addr $A:4420 --nqn $PRIV --hostnqn $OK_HOST --bs 4k --qd 4 --time 1

# --- The kernel's nvmet-rdma target. ---
test -d /sys/module/nvmet_rdma   # loaded at boot (FERROBLK_LAB_EXTRA_MODULES)
C=/sys/kernel/config/nvmet
truncate -s 64M /tmp/k.img
LOOP=$(losetup -f --show /tmp/k.img)
mkdir $C/subsystems/$KNQN
echo 1 > $C/subsystems/$KNQN/attr_allow_any_host
mkdir $C/subsystems/$KNQN/namespaces/1
printf %s $LOOP > $C/subsystems/$KNQN/namespaces/1/device_path
echo 1 > $C/subsystems/$KNQN/namespaces/1/enable
mkdir $C/ports/1
echo rdma > $C/ports/1/addr_trtype
echo ipv4 > $C/ports/1/addr_adrfam
echo $A > $C/ports/1/addr_traddr
echo 4421 > $C/ports/1/addr_trsvcid
ln -s $C/subsystems/$KNQN $C/ports/1/subsystems/$KNQN
verified --addr $A:4421 --nqn $KNQN --rw randrw --bs 4k --qd 16 --queues 2 --time 2
test "$(grep -c 'all match' $W/out)" -eq 2
verified --addr $A:4421 --nqn $KNQN --rw randwrite --bs 128k --qd 8 --time 2
verified --addr $A:4421 --nqn $KNQN --rw randrw --bs 1m --qd 4 --time 2 --wait

# --- Daemon B: nvmf bdevs over RDMA (to nvmet-rdma, to daemon A), exported over NVMe/TCP. ---
cat > $W/b.toml <<CFG
[reactors]
count = 1
[rpc]
socket = "$W/b.sock"
[[bdev]]
name = "kernel"
kind = "nvmf"
subnqn = "$KNQN"
paths = [{ addr = "$A", port = 4421, trtype = "rdma" }]
io_queues = 2
queue_depth = 32
[[bdev]]
name = "ours"
kind = "nvmf"
subnqn = "$NQN"
paths = [{ addr = "$A", port = 4420, trtype = "rdma" }]
io_queues = 2
queue_depth = 32
[[subsystem]]
nqn = "$BNQN"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "kernel"
[[subsystem.namespace]]
nsid = 2
bdev = "ours"
[[listener]]
addr = "127.0.0.1"
port = 4430
CFG
$BIN serve --config $W/b.toml > $W/b.log 2>&1 &
FB=$!
wait_log $W/b.log "NVMe/TCP listener"
$BIN rpc --socket $W/b.sock bdev_list | tee $W/bl
grep -q '"trtype": *"rdma"' $W/bl
nvme connect -t tcp -a 127.0.0.1 -s 4430 -n $BNQN -i 1
wait_dev /dev/nvme0n1
wait_dev /dev/nvme0n2
for d in /dev/nvme0n1 /dev/nvme0n2; do
  fio --name=v --filename=$d --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
      --iodepth=16 --size=8M --verify=crc32c --verify_fatal=1
  fio --name=big --filename=$d --ioengine=libaio --direct=1 --rw=randwrite \
      --bsrange=64k-1m --iodepth=4 --size=16M --offset=16M --verify=crc32c --verify_fatal=1
done
# A pattern written through the bdev is on nvmet's loop device.
dd if=/dev/urandom of=/tmp/pattern bs=1M count=2 status=none
dd if=/tmp/pattern of=/dev/nvme0n1 bs=1M seek=40 oflag=direct status=none
nvme disconnect -n $BNQN
kill -TERM $FB; wait $FB
dd if=$LOOP bs=1M skip=40 count=2 iflag=direct status=none | cmp - /tmp/pattern

rm $C/ports/1/subsystems/$KNQN
rmdir $C/ports/1
echo 0 > $C/subsystems/$KNQN/namespaces/1/enable
rmdir $C/subsystems/$KNQN/namespaces/1
rmdir $C/subsystems/$KNQN
losetup -d $LOOP
kill -0 $FA
kill -TERM $FA; wait $FA
echo GUEST-ALL-OK
"#;

#[test]
fn ferroblk_initiator_over_nvme_rdma_on_soft_roce() {
    // The guest's initramfs gets the kernel's NVMe target over RDMA too (lab.sh, run by
    // `Lab`, reads it from its environment).
    // SAFETY: this test binary runs this one test; no other thread reads or writes the
    // environment while it is set.
    unsafe { std::env::set_var("FERROBLK_LAB_EXTRA_MODULES", "nvmet nvmet_rdma") };
    let t = GuestTest::in_guest().timeout(Duration::from_secs(1200));
    let Some(out) = t.run_soft_roce(&GUEST.replace("__BIN__", &guest_bin())) else {
        return;
    };
    assert!(
        out.output.contains("not on the allow-list"),
        "the refused host is logged by the target:\n{}",
        out.output
    );
}
