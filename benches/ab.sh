#!/usr/bin/env bash
# A/B of two ferroblk builds in one session: the same jobs against a daemon of build A and of
# build B in turn, alternating run by run so a noisy machine hurts both alike. The client is
# always build B's (`perf nvmf`, `perf vhost`), so only the target differs; `perf bdev` jobs run
# each build's own in-process engine. Target/reactor CPU per I/O from /proc/PID/stat or the
# engine's own count.
#   usage: benches/ab.sh OLD_BIN NEW_BIN [runs=3] [seconds=4]
# Jobs: NVMe/TCP 4 KiB randread QD 32, 4 KiB randwrite QD 32, 128 KiB read QD 16 (null
# namespace, one reactor on CPU 0, initiator on CPU 1 sleeping in poll(2)); vhost-user-blk 4 KiB
# randread QD 32 (null bdev); perf bdev crypt_xts and crypt_gcm over malloc, 128 KiB read and
# write QD 32 (one reactor on CPU 0).
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(realpath "$1"); B=$(realpath "$2"); runs=${3:-3}; secs=${4:-4}
work=$(mktemp -d /var/tmp/ferroblk-ab.XXXX)
pid=
cleanup() { [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; rm -rf "$work"; }
trap cleanup EXIT
. benches/common.sh
port=$(free_port)
hz=$(getconf CLK_TCK)
printf '%s' "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f" > "$work/xts.key"
printf '%s' "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f" > "$work/gcm.key"
chmod 600 "$work"/*.key
null_target_config "$work/t.toml" "$work/rpc.sock" "$port" nqn.2026-12.io.ferroblk:ab 64GiB "$work/vhost.sock"
cat > "$work/c.toml" <<TOML
[reactors]
cpus = [0]
[rpc]
socket = "$work/rpc2.sock"
[[bdev]]
name = "m1"
kind = "malloc"
size = "1GiB"
[[bdev]]
name = "crypt_xts"
kind = "crypt_xts"
base = "m1"
key_file = "$work/xts.key"
[[bdev]]
name = "m2"
kind = "malloc"
size = "1GiB"
[[bdev]]
name = "crypt_gcm"
kind = "crypt_gcm"
base = "m2"
key_file = "$work/gcm.key"
TOML
start() { # bin
  "$1" serve --config "$work/t.toml" >"$work/d.log" 2>&1 & pid=$!
  wait_sock "$work/vhost.sock" && wait_sock "$work/rpc.sock" && return 0
  cat "$work/d.log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; rm -f "$work"/*.sock; }
field() { python3 -c "import json,sys; j=json.load(sys.stdin); print(round(j['iops']), round(j['mean_us'],2))"; }
declare -A res
job() { # name bin kind qd bs rw
  local name=$1 bin=$2 kind=$3 qd=$4 bs=$5 rw=$6 out iops mean cpu
  if [ "$kind" = bdev ]; then
    out=$("$bin" perf bdev --config "$work/c.toml" --bdev "$name" --cpus 0 --qd "$qd" --bs "$bs" --rw "$rw" --time "$secs" --ramp 1 --prefill --json 2>/dev/null)
    read -r iops cpu < <(echo "$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["iops"]), round(j["reactor_cpu_ns_per_io"]))')
    echo "$iops $cpu"
    return
  fi
  start "$bin"
  local t0 t1 ios
  t0=$(cpu_ticks $pid)
  if [ "$kind" = nvmf ]; then
    out=$("$B" perf nvmf --addr 127.0.0.1:$port --nqn nqn.2026-12.io.ferroblk:ab --cpus 1 --qd "$qd" --bs "$bs" --rw "$rw" --time "$secs" --wait --json 2>/dev/null)
  else
    out=$("$B" perf vhost --socket "$work/vhost.sock" --cpus 1 --qd "$qd" --bs "$bs" --rw "$rw" --time "$secs" --json 2>/dev/null)
  fi
  t1=$(cpu_ticks $pid)
  stop
  read -r iops ios < <(echo "$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["iops"]), j["ios"])')
  cpu=$(python3 -c "print(round(($t1-$t0)/$hz*1e9/max($ios,1)))")
  echo "$iops $cpu"
}
jobs=(
  "nvmf-4k-randread-qd32|nvmf|32|4096|randread"
  "nvmf-4k-randwrite-qd32|nvmf|32|4096|randwrite"
  "nvmf-128k-read-qd16|nvmf|16|131072|read"
  "vhost-4k-randread-qd32|vhost|32|4096|randread"
  "crypt_xts-128k-read|bdev|32|131072|read"
  "crypt_xts-128k-write|bdev|32|131072|write"
  "crypt_gcm-128k-read|bdev|32|131072|read"
  "crypt_gcm-128k-write|bdev|32|131072|write"
)
for spec in "${jobs[@]}"; do
  IFS='|' read -r name kind qd bs rw <<<"$spec"
  bdev=${name%%-*}
  for i in $(seq "$runs"); do
    for side in A B; do
      bin=$A; [ $side = B ] && bin=$B
      target=$bdev; [ "$kind" != bdev ] && target=$name
      read -r iops cpu < <(job "$target" "$bin" "$kind" "$qd" "$bs" "$rw")
      echo "$name run $i $side: $iops IOPS, $cpu ns CPU/IO"
      res[$name,$side,iops]+="$iops "; res[$name,$side,cpu]+="$cpu "
    done
  done
  python3 - "$name" "${res[$name,A,iops]}" "${res[$name,B,iops]}" "${res[$name,A,cpu]}" "${res[$name,B,cpu]}" <<'PY'
import statistics as s, sys
n = sys.argv[1]
ai, bi, ac, bc = ([float(x) for x in a.split()] for a in sys.argv[2:6])
r = [b / a for a, b in zip(ai, bi)]
c = [b / a for a, b in zip(ac, bc)]
print(f"| {n} | {s.median(ai)/1e3:.0f} K / {s.median(ac):.0f} ns | {s.median(bi)/1e3:.0f} K / {s.median(bc):.0f} ns | "
      f"{s.median(r):.3f} ({min(r):.3f}–{max(r):.3f}) | {s.median(c):.3f} ({min(c):.3f}–{max(c):.3f}) |")
PY
done
