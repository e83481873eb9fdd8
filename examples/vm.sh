#!/usr/bin/env bash
# A VM uses a ferroblk disk over vhost-user-blk: boots the guest lab's throwaway Linux guest
# (tests/lab/, QEMU software emulation, Debian's kernel) with the daemon's vhost-user-blk socket
# as its disk. The guest's virtio-blk driver sees /dev/vda; the guest prints `lsblk`, makes an
# ext4 file system on it, writes a file, syncs, unmounts, drops its caches, mounts again, reads
# the file back, checks it, and powers off.
#
#   cargo run --release -- serve          # in another terminal: the quickstart daemon
#   bash examples/vm.sh [--socket PATH]
#
# This FORMATS the disk behind the socket (the quickstart's scratch volume vol0).
# Exit status: 0 when the guest read back what it wrote; the guest's status otherwise
# (124: the guest timed out, 125: the lab failed), 2 for bad usage or no daemon.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
socket=run/quickstart.sock
queues=2

usage() {
    cat <<EOF
usage: bash examples/vm.sh [--socket PATH] [--queues N]

Boots a throwaway guest (tests/lab/) whose disk is the vhost-user-blk export at PATH
(default: run/quickstart.sock, the quickstart's; relative to the current directory), with N
queues (default 2, the quickstart's num_queues). The guest formats the disk (ext4), writes a
file, reads it back after a remount, and powers off. The daemon must be running.
EOF
}

while (($#)); do
    case $1 in
        --socket) socket=${2:?--socket needs a path}; shift 2 ;;
        --socket=*) socket=${1#*=}; shift ;;
        --queues) queues=${2:?--queues needs a number}; shift 2 ;;
        --queues=*) queues=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "vm.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
say() { echo "vm.sh: $*"; }
[[ $queues =~ ^[1-9][0-9]*$ ]] || { say "--queues: not a positive number: $queues" >&2; exit 2; }

socket=$(realpath -m -- "$socket")
if [[ ! -S $socket ]]; then
    say "no vhost-user-blk socket at $socket" >&2
    say "start the daemon first (cargo run --release -- serve), or give --socket PATH" >&2
    exit 2
fi
command -v mkfs.ext4 >/dev/null || { say "mkfs.ext4 missing: apt-get install e2fsprogs" >&2; exit 2; }

guest=$(mktemp "${TMPDIR:-/tmp}/ferroblk-vm.XXXXXX")
trap 'rm -f "$guest"' EXIT
cat > "$guest" <<'EOF'
#!/bin/bash
# Runs as root in the guest (see tests/lab/README.md); its output is the guest's console.
set -euo pipefail
step() { echo; echo "guest: == $*"; }
trap 'echo "guest: FAILED at line $LINENO: $BASH_COMMAND"' ERR

step "the disk: virtio-blk over vhost-user-blk"
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
lsblk -o NAME,SIZE,LOG-SEC,PHY-SEC,DISC-GRAN,RO,TYPE /dev/vda
echo "guest: /dev/vda serial=$(cat /sys/block/vda/serial 2>/dev/null || echo -)" \
     "queues=$(ls /sys/block/vda/mq | wc -l)"

step "mkfs.ext4 /dev/vda and mount it on /tmp/disk"
mkfs.ext4 -q -F -L ferroblk /dev/vda
mkdir -p /tmp/disk
mount /dev/vda /tmp/disk
df -h /tmp/disk

step "write 16 MiB of random data to /tmp/disk/data, sync"
dd if=/dev/urandom of=/tmp/src bs=1M count=16 status=none
cp /tmp/src /tmp/disk/data
sync
written=$(sha256sum < /tmp/src | cut -d' ' -f1)
echo "guest: wrote sha256=$written"

step "unmount, drop caches, mount again, read the file back"
umount /tmp/disk
echo 3 > /proc/sys/vm/drop_caches
mount /dev/vda /tmp/disk
ls -l /tmp/disk
read=$(sha256sum < /tmp/disk/data | cut -d' ' -f1)
echo "guest: read  sha256=$read"
umount /tmp/disk
[ "$read" = "$written" ] || { echo "guest: MISMATCH: the data read back differs"; exit 1; }
echo "guest: OK: the file read back from /dev/vda matches what was written"
EOF

say "using the vhost-user-blk socket $socket ($queues queues)"
say "preparing the guest lab (tests/lab/lab.sh prepare: Debian packages, kernel, initramfs)"
bash "$ROOT/tests/lab/lab.sh" prepare
say "booting the guest (QEMU software emulation: about a minute); its console follows"
# QEMU's option syntax: a comma in a value is written twice.
rc=0
bash "$ROOT/tests/lab/lab.sh" run "$guest" -- \
    -chardev "socket,id=vhost0,path=${socket//,/,,},reconnect=1" \
    -device "vhost-user-blk-pci,chardev=vhost0,num-queues=$queues" || rc=$?
if ((rc != 0)); then
    say "FAILED: the guest exited with status $rc" >&2
    exit "$rc"
fi
say "OK: a VM formatted, wrote and read back its ferroblk disk over vhost-user-blk"
