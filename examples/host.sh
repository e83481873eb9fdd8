#!/usr/bin/env bash
# A host uses a ferroblk disk over NVMe/TCP: boots the guest lab's throwaway Linux guest
# (tests/lab/, QEMU software emulation, Debian's kernel) as the host, whose kernel nvme-tcp
# driver attaches the daemon's NVMe/TCP export: `nvme discover` on the discovery port, `nvme
# connect`, `nvme list`, 16 MiB written to the namespace and read back (O_DIRECT), `nvme
# disconnect`, power off. The guest reaches the host's loopback (where the quickstart listens)
# at 10.0.2.2.
#
#   cargo run --release -- serve          # in another terminal: the quickstart daemon
#   bash examples/host.sh [--port N] [--discovery-port N] [--nqn NQN]
#
# This OVERWRITES the namespace's last 16 MiB (the quickstart's scratch volume vol0).
# Exit status: 0 when the host read back what it wrote; the guest's status otherwise
# (124: the guest timed out, 125: the lab failed), 2 for bad usage or no daemon.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# QEMU user networking: the host's 127.0.0.1 as the guest sees it (tests/lab/README.md).
HOST_ADDR=10.0.2.2
port=4420
discovery_port=8009
nqn=nqn.2026-11.io.ferroblk:quickstart

usage() {
    cat <<EOF
usage: bash examples/host.sh [--port N] [--discovery-port N] [--nqn NQN]

Boots a throwaway guest (tests/lab/) that attaches subsystem NQN (default $nqn) over NVMe/TCP
from the target on this machine's 127.0.0.1: discovery on --discovery-port (default 8009), I/O
on --port (default 4420), the quickstart's. It writes 16 MiB at the end of namespace 1, reads
them back, disconnects and powers off. The daemon must be running.
EOF
}

while (($#)); do
    case $1 in
        --port) port=${2:?--port needs a number}; shift 2 ;;
        --port=*) port=${1#*=}; shift ;;
        --discovery-port) discovery_port=${2:?--discovery-port needs a number}; shift 2 ;;
        --discovery-port=*) discovery_port=${1#*=}; shift ;;
        --nqn) nqn=${2:?--nqn needs an NQN}; shift 2 ;;
        --nqn=*) nqn=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "host.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
say() { echo "host.sh: $*"; }
for p in "$port" "$discovery_port"; do
    [[ $p =~ ^[0-9]+$ ]] && ((p > 0 && p < 65536)) || { say "not a TCP port: $p" >&2; exit 2; }
done
# NVMe Base 2.0, 4.5: an NQN is at most 223 bytes of UTF-8, no whitespace here.
[[ $nqn =~ ^[^[:space:]]{1,223}$ ]] || { say "not an NQN: '$nqn'" >&2; exit 2; }
for p in "$discovery_port" "$port"; do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        say "nothing listens on 127.0.0.1:$p" >&2
        say "start the daemon first (cargo run --release -- serve), or give --port/--discovery-port" >&2
        exit 2
    fi
done

guest=$(mktemp "${TMPDIR:-/tmp}/ferroblk-host.XXXXXX")
trap 'rm -f "$guest"' EXIT
{
    echo '#!/bin/bash'
    printf 'ADDR=%q PORT=%q DISC=%q NQN=%q\n' "$HOST_ADDR" "$port" "$discovery_port" "$nqn"
    cat <<'EOF'
# Runs as root in the guest (see tests/lab/README.md); its output is the guest's console.
set -euo pipefail
step() { echo; echo "guest: == $*"; }
trap 'echo "guest: FAILED at line $LINENO: $BASH_COMMAND"' ERR
# The namespaces' block devices (one line, space-separated); no /dev/fd here for <(...).
nvme_disks() { echo $(ls /sys/block | grep '^nvme' || true); }

step "nvme discover -t tcp -a $ADDR -s $DISC"
nvme discover -t tcp -a "$ADDR" -s "$DISC" | tee /tmp/discovery
grep -q "subnqn: *$NQN\$" /tmp/discovery ||
    { echo "guest: the discovery log does not list $NQN"; exit 1; }

step "nvme connect -t tcp -a $ADDR -s $PORT -n $NQN"
before=$(nvme_disks)
nvme connect -t tcp -a "$ADDR" -s "$PORT" -n "$NQN"
dev=
for i in $(seq 100); do
    for d in $(nvme_disks); do
        case " $before " in *" $d "*) ;; *) dev=$d ;; esac
    done
    [ -n "$dev" ] && [ -b "/dev/$dev" ] && break
    sleep 0.1
done
[ -n "$dev" ] || { echo "guest: no namespace appeared after the connect"; exit 1; }
echo "guest: the namespace is /dev/$dev"

step "nvme list"
nvme list
lsblk -o NAME,SIZE,LOG-SEC,PHY-SEC,DISC-GRAN,RO,TYPE "/dev/$dev"

step "write 16 MiB of random data at the end of /dev/$dev and read it back (O_DIRECT)"
size=$(blockdev --getsize64 "/dev/$dev")
seek=$((size / 1048576 - 16))
dd if=/dev/urandom of=/tmp/src bs=1M count=16 status=none
dd if=/tmp/src of="/dev/$dev" bs=1M seek=$seek oflag=direct conv=fsync status=none
written=$(sha256sum < /tmp/src | cut -d' ' -f1)
echo "guest: wrote sha256=$written at offset $((seek << 20))"
read=$(dd if="/dev/$dev" bs=1M skip=$seek count=16 iflag=direct status=none | sha256sum | cut -d' ' -f1)
echo "guest: read  sha256=$read"
[ "$read" = "$written" ] || { echo "guest: MISMATCH: the data read back differs"; exit 1; }

step "nvme disconnect -n $NQN"
nvme disconnect -n "$NQN"
for i in $(seq 100); do [ -e "/sys/block/$dev" ] || break; sleep 0.1; done
[ ! -e "/sys/block/$dev" ] || { echo "guest: /dev/$dev is still there"; exit 1; }
echo "guest: OK: the NVMe/TCP namespace read back what was written, and is detached"
EOF
} > "$guest"

say "attaching $nqn: discovery 127.0.0.1:$discovery_port, I/O 127.0.0.1:$port" \
    "(the guest's $HOST_ADDR)"
say "preparing the guest lab (tests/lab/lab.sh prepare: Debian packages, kernel, initramfs)"
bash "$ROOT/tests/lab/lab.sh" prepare
say "booting the guest (QEMU software emulation: about a minute); its console follows"
rc=0
bash "$ROOT/tests/lab/lab.sh" run "$guest" || rc=$?
if ((rc != 0)); then
    say "FAILED: the guest exited with status $rc" >&2
    exit "$rc"
fi
say "OK: a host attached, wrote, read back and detached its ferroblk disk over NVMe/TCP"
