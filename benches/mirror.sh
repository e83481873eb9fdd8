#!/usr/bin/env bash
# `mirror` over two malloc children against one malloc child alone: `perf bdev` on each, same
# run, alternating, two pinned reactors (each with its own channel on every child), printing
# each pair's IOPS ratio and the medians.
#   usage: benches/mirror.sh [rw=randwrite] [bs=4K] [qd=32] [runs=5] [seconds=3]
# Every run first writes the whole bdev (--prefill: a never-written malloc reads the zero page)
# and runs 1 s unmeasured (--ramp). The mirror is declared `assume_clean` (its children are new
# and zeroed), so no initial copy runs during the measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
rw=${1:-randwrite}; bs=${2:-4K}; qd=${3:-32}; runs=${4:-5}; secs=${5:-3}
cpus=${CPUS:-0, 1}
bin=out/release/ferroblk
[ -x "$bin" ] || cargo build --release
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat > "$work/b.toml" <<TOML
[reactors]
cpus = [$cpus]

[rpc]
socket = "$work/rpc.sock"

[[bdev]]
name = "single"
kind = "malloc"
size = "1GiB"

[[bdev]]
name = "a"
kind = "malloc"
size = "1GiB"

[[bdev]]
name = "b"
kind = "malloc"
size = "1GiB"

[[bdev]]
name = "mir"
kind = "mirror"
children = ["a", "b"]
assume_clean = true
TOML
run() {
  "$bin" perf bdev --config "$work/b.toml" --bdev "$1" --qd "$qd" --bs "$bs" --rw "$rw" --time "$secs" --ramp 1 --prefill --json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["errors"] == 0; print(round(j["iops"]), round(j["reactor_cpu_ns_per_io"]))'
}
ratios=(); singles=(); mirrors=()
for i in $(seq "$runs"); do
  read -r si sn < <(run single)
  read -r mi mn < <(run mir)
  r=$(python3 -c "print(f'{$mi/$si:.3f}')")
  echo "run $i: malloc $si IOPS ($sn ns CPU/IO)   mirror of 2 malloc $mi IOPS ($mn ns CPU/IO)   IOPS ratio $r"
  ratios+=("$r"); singles+=("$si"); mirrors+=("$mi")
done
python3 - "${singles[*]}" "${mirrors[*]}" "${ratios[*]}" <<PY
import statistics as s, sys
a, b, r = ([float(x) for x in v.split()] for v in sys.argv[1:4])
print(f"median ($rw, bs $bs, qd $qd per reactor, reactors on CPUs $cpus): malloc {s.median(a):.0f} IOPS, mirror {s.median(b):.0f} IOPS, ratio {s.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f})")
PY
