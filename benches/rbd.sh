#!/usr/bin/env bash
# The `rbd` bdev against librbd's own benchmark, same image, same cluster, same run: `ferroblk
# perf bdev` on an `rbd` volume (one reactor, QD 32) vs `rbd bench` (--io-threads 32, the
# number of asynchronous requests it keeps in flight), 4 KiB random write, then random read,
# alternating ferroblk and rbd bench `runs` times each. Both go through librbd with its cache
# off. The cluster is the tests' single-node cluster (ferroblk_rbd::testing: one monitor, one
# memstore OSD on 127.0.0.1), started by the `ceph-cluster` example. The image is written whole
# first, so reads find data. CPU per I/O: ferroblk's whole process (reactor and librbd threads),
# and rbd bench's (getrusage of the child), over the same I/Os.
# With idle_poll_us, the reactor's [reactors] idle_poll_us (default: the daemon's).
#   usage: benches/rbd.sh [runs=3] [seconds=5] [idle_poll_us]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}; secs=${2:-5}; idle=${3:-}
. benches/common.sh
bin=$(bench_bin --features rbd)
cargo build --release -q -p ferroblk-rbd --features testing --example ceph-cluster
work=$(mktemp -d /var/tmp/ferroblk-rbd.XXXX)
mkfifo "$work/ctl"
# The cluster runs until its stdin (the fifo) closes.
out/release/examples/ceph-cluster <"$work/ctl" >"$work/cluster.out" 2>&1 &
cluster=$!
exec 3>"$work/ctl"
trap 'exec 3>&-; wait $cluster 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do grep -q '^mon_host' "$work/cluster.out" && break; sleep 0.1; done
conf=$(awk '/^conf/ {print $2}' "$work/cluster.out")
mon=$(awk '/^mon_host/ {print $2}' "$work/cluster.out")
[ -n "$mon" ] || { cat "$work/cluster.out"; exit 1; }
rbd -c "$conf" create --size 1G rbd/bench
rbd -c "$conf" bench --rbd-cache=false --io-type write --io-pattern seq --io-size 4M \
  --io-threads 8 --io-total 1G rbd/bench >/dev/null
cat > "$work/rbd.toml" <<TOML
[[bdev]]
name = "rbd0"
kind = "rbd"
mon_host = "$mon"
auth = "none"
pool = "rbd"
image = "bench"
TOML
[ -z "$idle" ] || printf '[reactors]\nidle_poll_us = %s\n' "$idle" >> "$work/rbd.toml"
ops=$((4096 * 16)) # rbd bench's I/Os per run (256 MiB of 4 KiB requests)
job() { # rw (randwrite|randread) rbd-io-type
  local f=() r=() fc=() rc=()
  for i in $(seq "$runs"); do
    j=$("$bin" perf bdev --config "$work/rbd.toml" --cpus 0 --qd 32 --bs 4096 --rw "$1" --time "$secs" \
          --json 2>/dev/null)
    read -r iops cpu rcpu < <(echo "$j" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["iops"]), round(j["process_cpu_ns_per_io"]), round(j["reactor_cpu_ns_per_io"]))')
    echo "$1 ferroblk run $i: $iops IOPS, process CPU $cpu ns/IO (reactor $rcpu)"
    f+=("$iops"); fc+=("$cpu")
    read -r iops cpu < <(python3 - "$conf" "$2" "$ops" <<'PY'
import resource, subprocess, sys, re
conf, io_type, ops = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = subprocess.run(["rbd", "-c", conf, "bench", "--rbd-cache=false", "--io-type", io_type,
    "--io-pattern", "rand", "--io-size", "4096", "--io-threads", "32",
    "--io-total", str(ops * 4096), "rbd/bench"], capture_output=True, text=True, check=True).stdout
r = resource.getrusage(resource.RUSAGE_CHILDREN)
iops = float(re.search(r"ops/sec: ([0-9.]+)", out).group(1))
print(round(iops), round((r.ru_utime + r.ru_stime) * 1e9 / ops))
PY
)
    echo "$1 rbd bench run $i: $iops IOPS, process CPU $cpu ns/IO"
    r+=("$iops"); rc+=("$cpu")
  done
  python3 - "$1" "${f[*]}" "${r[*]}" "${fc[*]}" "${rc[*]}" <<'PY'
import statistics as s, sys
name, f, r, fc, rc = sys.argv[1], *[list(map(float, a.split())) for a in sys.argv[2:]]
mf, mr = s.median(f), s.median(r)
print(f"{name}: median ferroblk {mf:.0f} IOPS ({s.median(fc):.0f} ns CPU/IO), rbd bench {mr:.0f} IOPS "
      f"({s.median(rc):.0f} ns CPU/IO), ratio {mf / mr:.2f}x")
PY
}
job randwrite write
job randread read
