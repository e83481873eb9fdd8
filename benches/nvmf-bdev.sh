#!/usr/bin/env bash
# The `nvmf` bdev against the initiator it is built on, same remote, same run: a ferroblk
# serving a null namespace from one reactor pinned to CPU 0 is driven alternately by
#   A: `ferroblk perf nvmf` (the initiator's I/O queue driven by one thread on CPU 1), spinning
#      on the socket, then sleeping in poll(2) between completions (--wait), and
#   B: `ferroblk perf bdev` on an `nvmf` bdev to that remote (one reactor on CPU 1),
# at the same queue depth, block size and pattern. Each job runs `runs` times per side (A, A',
# B, A, A', B ...); prints every run, the medians and B over the better A (target: >= 0.9).
#   usage: benches/nvmf-bdev.sh [runs=3] [seconds=5]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}; secs=${2:-5}
. benches/common.sh
bin=$(bench_bin)
nqn=nqn.2026-11.io.ferroblk:bench-remote
start_null_target nvmf-bdev "$nqn" 64GiB
cat > "$work/c.toml" <<TOML
[reactors]
cpus = [1]
[[bdev]]
name = "remote"
kind = "nvmf"
subnqn = "$nqn"
paths = [{ addr = "127.0.0.1", port = $port }]
TOML
iops() { python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))'; }
job() { # name qd bs rw
  local a=() w=() b=()
  for i in $(seq "$runs"); do
    ia=$("$bin" perf nvmf --addr 127.0.0.1:$port --nqn "$nqn" --cpus 1 \
          --qd "$2" --bs "$3" --rw "$4" --time "$secs" --json 2>/dev/null | iops)
    iw=$("$bin" perf nvmf --addr 127.0.0.1:$port --nqn "$nqn" --cpus 1 \
          --qd "$2" --bs "$3" --rw "$4" --time "$secs" --wait --json 2>/dev/null | iops)
    ib=$("$bin" perf bdev --config "$work/c.toml" --bdev remote --cpus 1 \
          --qd "$2" --bs "$3" --rw "$4" --time "$secs" --json 2>/dev/null | iops)
    echo "$1 run $i: perf nvmf $ia IOPS (spinning), $iw IOPS (--wait); perf bdev on nvmf $ib IOPS"
    a+=("$ia"); w+=("$iw"); b+=("$ib")
  done
  python3 - "$1" "${a[*]}" "${w[*]}" "${b[*]}" <<'PY'
import statistics as s, sys
n = sys.argv[1]; a, w, b = (s.median(float(x) for x in v.split()) for v in sys.argv[2:5])
best = max(a, w)
print(f"median {n}: perf nvmf {a:.0f} (spinning) / {w:.0f} (--wait) IOPS, nvmf bdev {b:.0f} IOPS, "
      f"bdev / best initiator {b / best:.2f}")
PY
}
job "4k-randread-qd1" 1 4096 randread
job "4k-randread-qd32" 32 4096 randread
job "4k-randwrite-qd32" 32 4096 randwrite
job "128k-read-qd16" 16 128K read
