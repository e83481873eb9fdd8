#!/usr/bin/env bash
# NVMe/RDMA against NVMe/TCP, same target, same host, same guest: in one guest-lab VM (QEMU TCG,
# soft-RoCE on its eth0), ferroblk (release binary) serves a null namespace on one reactor over
# both transports (TCP 4420, RDMA 4421 on the guest's address); the guest kernel's nvme-tcp and
# nvme-rdma hosts take turns (A B A B ...: connect, fio, disconnect) with the same fio job. Per
# run: IOPS and the target's CPU per I/O (utime+stime of the daemon over the run / I/Os). Then
# ferroblk's own initiator, `perf nvmf --trtype tcp` and `--trtype rdma` taking turns with the
# same job against the same target (benches/nvmf-initiator-ab.sh: IOPS, initiator and target CPU
# per I/O). Then the target's CPU with one RDMA host connected (2 I/O queues) and idle.
#
# Figures from one emulated guest say little about real speed (TCG emulates both ends and the
# soft-RoCE NIC on two vCPUs); the ratio and CPU per I/O are the point. On real RDMA hardware,
# run the same target config on the RDMA interface's address and the same fio job from a host,
# and benches/nvmf-initiator-ab.sh unchanged from that host.
#
#   usage: benches/nvmf-rdma-guest.sh [runs=3] [seconds=10] [bs=4k] [iodepth=16]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}; secs=${2:-10}; bs=${3:-4k}; qd=${4:-16}
. benches/common.sh
bin=$(bench_bin --features rdma)
repo=$(pwd)
guest=$(mktemp /tmp/ferroblk-rdma-bench.XXXX.sh)
trap 'rm -f "$guest"' EXIT
cat > "$guest" <<EOF
#!/bin/bash
set -euo pipefail
RUNS=$runs; SECS=$secs; BS=$bs; QD=$qd; BIN=$bin; REPO=$repo
EOF
cat >> "$guest" <<'EOF'
rdma link add rxe0 type rxe netdev eth0
A=10.0.2.15; NQN=nqn.2026-11.io.ferroblk:bench; W=/tmp/fb; mkdir -p $W
cat > $W/t.toml <<CFG
[reactors]
cpus = [0]
[rpc]
socket = "$W/rpc.sock"
[[bdev]]
name = "null0"
kind = "null"
size = "1GiB"
[[subsystem]]
nqn = "$NQN"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "null0"
[[listener]]
addr = "$A"
port = 4420
[[listener]]
trtype = "rdma"
addr = "$A"
port = 4421
CFG
$BIN serve --config $W/t.toml > $W/log 2>&1 &
FB=$!
for i in $(seq 100); do grep -q "NVMe/RDMA listener started" $W/log && break; sleep 0.2; done
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' /proc/$FB/stat; }
wait_dev() { for i in $(seq 100); do [ -b /dev/nvme0n1 ] && return 0; sleep 0.1; done; return 1; }
one() {  # $1 transport, $2 port
  nvme connect -t $1 -a $A -s $2 -n $NQN -i 2 >/dev/null
  wait_dev
  t0=$(ticks)
  fio --name=b --filename=/dev/nvme0n1 --ioengine=libaio --direct=1 --rw=randread --bs=$BS \
      --iodepth=$QD --numjobs=2 --time_based --runtime=$SECS --group_reporting \
      --output-format=json > /tmp/fio.json
  t1=$(ticks)
  nvme disconnect -n $NQN >/dev/null
  python3 - "$1" "$t0" "$t1" "$hz" <<'PY'
import json, sys
tr, t0, t1, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
j = json.load(open('/tmp/fio.json'))['jobs'][0]['read']
ios = j['total_ios']
print(f"BENCH {tr} iops={j['iops']:.0f} ios={ios} target_cpu_us_per_io={(t1-t0)/hz*1e6/max(ios,1):.1f}")
PY
}
for r in $(seq $RUNS); do one tcp 4420; one rdma 4421; done
bash $REPO/benches/nvmf-initiator-ab.sh $BIN $A 4420 4421 $NQN $RUNS $SECS $BS $QD 2 $FB
nvme connect -t rdma -a $A -s 4421 -n $NQN -i 2 >/dev/null
wait_dev
sleep 2
t0=$(ticks); sleep 10; t1=$(ticks)
echo "BENCH idle-rdma ticks=$((t1 - t0)) in 10 s (hz $hz), 2 I/O queues + admin connected"
nvme disconnect -n $NQN >/dev/null
kill -TERM $FB; wait $FB
EOF
FERROBLK_LAB_TIMEOUT=${FERROBLK_LAB_TIMEOUT:-1200} bash tests/lab/lab.sh run "$guest" | tee /dev/stderr |
  grep '^BENCH' | python3 -c '
import sys, statistics as st
rows = {}
init = {}
for l in sys.stdin:
    f = l.split()
    if f[0] == "BENCH-INIT":
        kv = dict(x.split("=") for x in f[2:])
        init.setdefault(f[1], []).append(kv)
        continue
    if f[1] == "idle-rdma":
        print(" ".join(f[1:])); continue
    kv = dict(x.split("=") for x in f[2:])
    rows.setdefault(f[1], []).append((float(kv["iops"]), float(kv["target_cpu_us_per_io"])))
for t, v in rows.items():
    print(f"{t}: median IOPS {st.median(x[0] for x in v):.0f} (runs {[round(x[0]) for x in v]}), "
          f"median target CPU per I/O {st.median(x[1] for x in v):.1f} us")
if "tcp" in rows and "rdma" in rows:
    r = [a[0] / b[0] for a, b in zip(rows["rdma"], rows["tcp"])]
    print(f"rdma/tcp IOPS ratio per pair: {[round(x, 2) for x in r]}, median {st.median(r):.2f}")
for t, v in init.items():
    med = lambda k: st.median(float(x[k]) for x in v)
    iops, icpu, tcpu = med("iops"), med("initiator_cpu_us_per_io"), med("target_cpu_us_per_io")
    each = [round(float(x["iops"])) for x in v]
    errs = sum(int(x["errors"]) for x in v)
    print(f"perf nvmf --trtype {t}: median IOPS {iops:.0f} (runs {each}), initiator CPU per I/O "
          f"{icpu:.1f} us, target CPU per I/O {tcpu:.1f} us, errors {errs}")
if "tcp" in init and "rdma" in init:
    pairs = list(zip(init["rdma"], init["tcp"]))
    r = [float(a["iops"]) / float(b["iops"]) for a, b in pairs]
    c = [float(a["initiator_cpu_us_per_io"]) / float(b["initiator_cpu_us_per_io"]) for a, b in pairs]
    print(f"perf nvmf rdma/tcp IOPS ratio per pair: {[round(x, 2) for x in r]}, median "
          f"{st.median(r):.2f}; initiator CPU per I/O ratio median {st.median(c):.2f}")
'
