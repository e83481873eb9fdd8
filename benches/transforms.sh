#!/usr/bin/env bash
# A transform's cost over its base: `perf bdev` on a malloc bdev alone and on the same kind of
# malloc under the transform (crc, crypt_xts, crypt_gcm, compress), one pinned reactor,
# alternating runs, printing each pair's CPU-per-I/O ratio and the medians.
#   usage: benches/transforms.sh [layer=crc] [rw=write] [bs=128K] [qd=32] [runs=5] [seconds=3]
# The reactor is busy the whole run in both cases, so "reactor CPU ns per I/O" is the cost and
# the ratio minus one is the layer's overhead. Every run first writes the whole bdev (--prefill)
# and runs 1 s unmeasured (--ramp); written data is PCT (default 50) % compressible.
set -euo pipefail
cd "$(dirname "$0")/.."
layer=${1:-crc}; rw=${2:-write}; bs=${3:-128K}; qd=${4:-32}; runs=${5:-5}; secs=${6:-3}
cpu=${CPU:-0}
. benches/common.sh
bin=$(bench_bin)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
printf '%s' "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f" > "$work/xts.key"
printf '%s' "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f" > "$work/gcm.key"
chmod 600 "$work"/*.key
case "$layer" in
  crc) extra='' ;;
  crypt_xts) extra="key_file = \"$work/xts.key\"" ;;
  crypt_gcm) extra="key_file = \"$work/gcm.key\"" ;;
  compress) extra='size = "1GiB"' ;;
  *) echo "unknown layer $layer" >&2; exit 2 ;;
esac
cat > "$work/b.toml" <<TOML
[reactors]
cpus = [$cpu]

[rpc]
socket = "$work/rpc.sock"

[[bdev]]
name = "plain"
kind = "malloc"
size = "1GiB"

[[bdev]]
name = "under"
kind = "malloc"
size = "1GiB"

[[bdev]]
name = "layer"
kind = "$layer"
base = "under"
$extra
TOML
args="--qd $qd --bs $bs --rw $rw --time $secs --ramp 1 --prefill --compress-pct ${PCT:-50}"
alternate "$runs" "perf_bdev $work/b.toml plain $args" "perf_bdev $work/b.toml layer $args" \
  malloc "$layer over malloc" "$layer, $rw, bs $bs, qd $qd; the CPU ratio minus one is the layer's cost"
