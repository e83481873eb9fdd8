//! The Linux kernel's NVMe/TCP host (nvme-cli, nvme-tcp, fio) against ferroblk's target, in a
//! QEMU guest that reaches the host's loopback at 10.0.2.2: discovery, connect with several I/O
//! queues with and without digests, identify, fio write+verify, discard, the host allow-list, a
//! live resize seen through an asynchronous event, a `kill -9` + restart of the daemon
//! under fio that the host rides through by reconnecting, and the kernel's native multipath
//! over two listeners reading their ANA states (one optimized, one non-optimized).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::daemon::{GuestRequests, free_port, start_daemon};
use common::guest::{GuestTest, config_head};

const NQN: &str = "nqn.2026-11.io.ferroblk:guest";
const PRIVATE: &str = "nqn.2026-11.io.ferroblk:private";
const ALLOWED_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

fn config(dir: &Path, port: u16, disc: u16) -> String {
    format!(
        r#"{head}
[[bdev]]
name = "disk"
kind = "file"
path = "{dir}/disk.img"
[[bdev]]
name = "ram"
kind = "malloc"
size = "64MiB"
[[subsystem]]
nqn = "{NQN}"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "disk"
[[subsystem]]
nqn = "{PRIVATE}"
hosts = ["{ALLOWED_HOST}"]
[[subsystem.namespace]]
nsid = 1
bdev = "ram"
[[listener]]
addr = "127.0.0.1"
port = {port}
[[listener]]
addr = "127.0.0.1"
port = {disc}
ana_state = "non_optimized"
"#,
        head = config_head(dir),
        dir = dir.display()
    )
}

const GUEST: &str = r#"
P=__PORT__; D=__DISC__; NQN=__NQN__; PRIV=__PRIV__; OK_HOST=__OKHOST__
__SAY__

# Discovery on the discovery port lists the open subsystem, not the private one.
nvme discover -t tcp -a 10.0.2.2 -s $D | tee /tmp/disc
grep -q "$NQN" /tmp/disc
! grep -q "$PRIV" /tmp/disc
# The allowed host sees the private subsystem too.
nvme discover -t tcp -a 10.0.2.2 -s $D --hostnqn=$OK_HOST | grep -q "$PRIV"

# Connect with two I/O queues, no digests.
nvme connect -t tcp -a 10.0.2.2 -s $P -n $NQN -i 2 --reconnect-delay=1 --ctrl-loss-tmo=120
wait_dev /dev/nvme0n1
nvme list
nvme id-ctrl /dev/nvme0 | tee /tmp/idctrl
grep -q "subnqn *: $NQN" /tmp/idctrl
nvme id-ns /dev/nvme0n1 | grep -q "nsze *: 0x10000"
test "$(ls /sys/class/nvme/nvme0 | grep -c '^nvme0c\|^nvme0n' || true)" -ge 1
fio_verify /dev/nvme0n1 verify --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --size=8M \
    --offset_increment=8M --group_reporting
fio_verify /dev/nvme0n1 big --rw=write --bs=256k --iodepth=4 --size=8M --offset=16M
dd if=/dev/urandom of=/dev/nvme0n1 bs=1M count=2 seek=40 oflag=direct status=none
blkdiscard -o $((40 << 20)) -l $((1 << 20)) /dev/nvme0n1
zeroed /dev/nvme0n1 40 1

# Live resize: an asynchronous event makes the host re-read the namespace.
say resize
wait_size nvme0n1 $((512 << 20))

# kill -9 of the daemon under fio; it restarts and the host reconnects.
say kill
fio_verify /dev/nvme0n1 crash --rw=randwrite --bs=4k --iodepth=16 --size=32M --offset=64M
nvme disconnect -n $NQN

# Header and data digests.
nvme connect -t tcp -a 10.0.2.2 -s $P -n $NQN -i 2 --hdr-digest --data-digest
wait_dev /dev/nvme0n1
fio_verify /dev/nvme0n1 digest --rw=randwrite --bs=64k --iodepth=8 --size=16M
nvme disconnect -n $NQN

# The allow-list: a host not on it is refused; the listed one gets in.
if nvme connect -t tcp -a 10.0.2.2 -s $P -n $PRIV --hostnqn=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000dead; then
  echo "a host not on the allow-list connected"; exit 1
fi
nvme connect -t tcp -a 10.0.2.2 -s $P -n $PRIV --hostnqn=$OK_HOST
nvme disconnect -n $PRIV

# ANA: the subsystem through both listeners (every listener also serves I/O), the second
# declared non-optimized. The kernel's native multipath reads the ANA log page of each path.
nvme connect -t tcp -a 10.0.2.2 -s $P -n $NQN -i 1
nvme connect -t tcp -a 10.0.2.2 -s $D -n $NQN -i 1
ana_of() {
  for c in /sys/class/nvme/nvme*; do
    if grep -qx "$NQN" $c/subsysnqn && grep -q "trsvcid=$1\b" $c/address; then
      nvme ana-log /dev/$(basename $c) >&2
      cat $c/nvme*c*n1/ana_state
      return
    fi
  done
}
for i in $(seq 100); do
  [ "$(ana_of $P)" = optimized ] && [ "$(ana_of $D)" = non-optimized ] && break
  sleep 0.1
done
test "$(ana_of $P)" = optimized
test "$(ana_of $D)" = non-optimized
HEAD=$(for s in /sys/class/nvme-subsystem/nvme-subsys*; do
  grep -qx "$NQN" $s/subsysnqn && basename $(ls -d $s/nvme*n1)
done)
fio_verify /dev/$HEAD ana --rw=randwrite --bs=4k --iodepth=8 --size=8M
nvme disconnect -n $NQN
say done
echo GUEST-ALL-OK
"#;

#[test]
fn linux_host_uses_ferroblk_over_nvme_tcp() {
    let (port, disc) = (free_port(), free_port());
    let t = GuestTest::new(|dir| config(dir, port, disc));
    let dir = &t.dir;
    t.sparse_file("disk.img", 256 << 20);
    let daemon = Arc::new(Mutex::new(start_daemon(dir)));

    // The guest's requests: "resize", "kill", "done".
    let host = GuestRequests::serve(dir, daemon.clone(), "disk", 300, None);

    let script = host
        .script(GUEST)
        .replace("__PORT__", &port.to_string())
        .replace("__DISC__", &disc.to_string())
        .replace("__NQN__", NQN)
        .replace("__PRIV__", PRIVATE)
        .replace("__OKHOST__", ALLOWED_HOST);
    t.run(&script, &[]);
    let log = t.daemon_log();
    assert_eq!(host.join(), ["resize", "kill", "done"]);
    assert!(
        log.contains("Connect refused") && log.contains("not on the allow-list"),
        "{log}"
    );

    assert!(daemon.lock().unwrap().stop(), "daemon exits cleanly");
}
