#!/usr/bin/env bash
# vhost-user-blk back-ends compared with one client: `ferroblk perf vhost` (libblkio, polling)
# on CPU 1 drives, in turn, ferroblk's null bdev export (one reactor pinned to CPU 0) and
# qemu-storage-daemon's null-co export (pinned to CPU 0 with taskset), 4 KiB random reads at
# QD 1 and QD 32, alternating back-ends run by run; prints each run and the medians.
#   usage: benches/vhost-vs-qsd.sh [runs=5] [seconds=5]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}; secs=${2:-5}
command -v qemu-storage-daemon >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-system-common; }
. benches/common.sh
bin=$(bench_bin)
bench_workdir vq
cat > "$work/f.toml" <<TOML
[reactors]
cpus = [0]
[rpc]
socket = "$work/rpc.sock"
[[bdev]]
name = "null0"
kind = "null"
size = "1GiB"
block_size = 4096
[[vhost]]
socket = "$work/ferroblk.sock"
bdev = "null0"
num_queues = 1
TOML
start_ferroblk() { "$bin" serve --config "$work/f.toml" >"$work/f.log" 2>&1 & pids+=($!); wait_sock "$work/ferroblk.sock"; }
start_qsd() {
  taskset -c 0 qemu-storage-daemon \
    --blockdev driver=null-co,node-name=null0,size=1073741824,read-zeroes=off \
    --export type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path="$work/qsd.sock",num-queues=1,logical-block-size=4096 \
    >"$work/q.log" 2>&1 & pids+=($!); wait_sock "$work/qsd.sock"; }
start_ferroblk; start_qsd
run() { "$bin" perf vhost --socket "$1" --cpus 1 --qd "$2" --bs 4096 --rw randread --time "$secs" --json 2>/dev/null; }
declare -A res
for qd in 1 32; do
  for i in $(seq "$runs"); do
    for be in ferroblk qsd; do
      j=$(run "$work/$be.sock" "$qd")
      iops=$(echo "$j" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))')
      mean=$(echo "$j" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["mean_us"],2))')
      echo "qd=$qd run $i $be: $iops IOPS, mean $mean us"
      res[$qd,$be,iops]+="$iops "; res[$qd,$be,mean]+="$mean "
    done
  done
done
for qd in 1 32; do
  python3 - "$qd" "${res[$qd,ferroblk,iops]}" "${res[$qd,qsd,iops]}" "${res[$qd,ferroblk,mean]}" "${res[$qd,qsd,mean]}" <<'PY'
import statistics as s, sys
qd = sys.argv[1]
fi, qi, fm, qm = ([float(x) for x in a.split()] for a in sys.argv[2:6])
r = [a / b for a, b in zip(fi, qi)]
lm = [a / b for a, b in zip(fm, qm)]
print(f"median QD{qd}: ferroblk {s.median(fi):.0f} IOPS / {s.median(fm):.2f} us, qemu-storage-daemon {s.median(qi):.0f} IOPS / {s.median(qm):.2f} us; "
      f"IOPS ratio {s.median(r):.2f} (min {min(r):.2f}), mean-latency ratio {s.median(lm):.2f} (max {max(lm):.2f})")
PY
done
