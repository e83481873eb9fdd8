#!/usr/bin/env bash
# The bdev layer's own cost: ferroblk's `null` bdev driven by `perf bdev` against fio's `null`
# engine (fio's own per-I/O overhead), same block size and depth, one pinned core each,
# alternating runs and printing each pair's ratio and the medians.
#   usage: benches/null-vs-fio.sh [runs=5] [seconds=5] [qd=128] [bs=4096]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}; secs=${2:-5}; qd=${3:-128}; bs=${4:-4096}
cpu=${CPU:-0}
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
bin=out/release/ferroblk
[ -x "$bin" ] || cargo build --release
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
sed "s/^cpus = .*/cpus = [$cpu]/; s|^socket = .*|socket = \"$work/rpc.sock\"|" configs/bench-null.toml > "$work/b.toml"
ours=(); theirs=(); ratios=(); ns=()
for i in $(seq "$runs"); do
  out=$("$bin" perf bdev --config "$work/b.toml" --qd "$qd" --bs "$bs" --rw randread --time "$secs" --json 2>/dev/null)
  a=$(echo "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))')
  n=$(echo "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["reactor_cpu_ns_per_io"]))')
  b=$(fio --name=peer --ioengine=null --rw=randread --bs="$bs" --iodepth="$qd" --size=64G \
        --time_based --runtime="$secs" --cpus_allowed="$cpu" --norandommap --randrepeat=0 \
        --output-format=json 2>/dev/null \
      | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
  r=$(python3 -c "print(f'{$a/$b:.3f}')")
  echo "run $i: ferroblk null $a IOPS ($n ns CPU/IO)   fio null $b IOPS   ratio $r"
  ours+=("$a"); theirs+=("$b"); ratios+=("$r"); ns+=("$n")
done
python3 - "${ours[*]}" "${theirs[*]}" "${ratios[*]}" "${ns[*]}" <<'PY'
import statistics as s, sys
o, t, r, n = ([float(x) for x in a.split()] for a in sys.argv[1:5])
print(f"median: ferroblk {s.median(o):.0f} IOPS ({s.median(n):.0f} ns CPU/IO), fio null {s.median(t):.0f} IOPS, ratio {s.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f})")
PY
