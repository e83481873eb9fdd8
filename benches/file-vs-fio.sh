#!/usr/bin/env bash
# ferroblk's `file` bdev against fio's io_uring engine on the same page-cached file, same block
# size and queue depth, one core each (both pinned to the same CPU), alternating runs
# A B A B ... and printing each pair's ratio and the medians.
#   usage: benches/file-vs-fio.sh [runs=5] [seconds=5] [qd=32] [bs=4096] [rw=randread]
#   FIO_EXTRA="--fixedbufs --registerfiles" gives fio registered buffers and files.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}; secs=${2:-5}; qd=${3:-32}; bs=${4:-4096}; rw=${5:-randread}
cpu=${CPU:-0}
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
bin=out/release/ferroblk
[ -x "$bin" ] || cargo build --release
work=$(mktemp -d /var/tmp/ferroblk-bench.XXXX)
trap 'rm -rf "$work"' EXIT
img="$work/file.img"
fallocate -l 1G "$img"
dd if=/dev/urandom of="$img" bs=1M count=1024 conv=notrunc status=none
cat "$img" > /dev/null   # into the page cache
cat > "$work/bench.toml" <<TOML
[reactors]
cpus = [$cpu]
[rpc]
socket = "$work/rpc.sock"
[[bdev]]
name = "file0"
kind = "file"
path = "$img"
block_size = 4096
direct = "never"
TOML
fio_rw=$rw
ours=(); theirs=(); ratios=()
for i in $(seq "$runs"); do
  a=$("$bin" perf bdev --config "$work/bench.toml" --qd "$qd" --bs "$bs" --rw "$rw" \
        --time "$secs" --json 2>/dev/null | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))')
  b=$(fio --name=peer --filename="$img" --ioengine=io_uring --rw="$fio_rw" --bs="$bs" \
        --iodepth="$qd" --iodepth_batch_submit="$qd" --iodepth_batch_complete_min=1 --iodepth_batch_complete_max="$qd" --direct=0 --time_based --runtime="$secs" --cpus_allowed="$cpu" \
        --norandommap --randrepeat=0 --size=1G --invalidate=0 ${FIO_EXTRA:-} --output-format=json 2>/dev/null \
      | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))')
  r=$(python3 -c "print(f'{$a/$b:.3f}')")
  echo "run $i: ferroblk $a IOPS   fio $b IOPS   ratio $r"
  ours+=("$a"); theirs+=("$b"); ratios+=("$r")
done
python3 - "${ours[*]}" "${theirs[*]}" "${ratios[*]}" <<'PY'
import statistics as s, sys
o, t, r = ([float(x) for x in a.split()] for a in sys.argv[1:4])
print(f"median: ferroblk {s.median(o):.0f} IOPS, fio {s.median(t):.0f} IOPS, ratio {s.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f})")
PY
