#!/usr/bin/env bash
# NVMe/TCP target figures on loopback: ferroblk serving a null namespace from one reactor pinned
# to CPU 0, driven by `ferroblk perf nvmf` on CPU 1. Each job runs `runs` times; the target's CPU
# time per I/O comes from /proc/PID/stat (utime+stime) around each run. Prints every run and the
# medians. The initiator sleeps in poll(2) (--wait) unless POLL=1: a busy initiator on the other
# core of a 2-core machine competes with the target.
#   usage: benches/nvmf.sh [runs=3] [seconds=5]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}; secs=${2:-5}
. benches/common.sh
bin=$(bench_bin)
start_null_target nvmf nqn.2026-11.io.ferroblk:bench 64GiB
hz=$(getconf CLK_TCK)
mode=--wait; [ "${POLL:-0}" = 1 ] && mode=
job() { # name qd bs rw
  local vals=() ; local cpus=() ; local lat=()
  for i in $(seq "$runs"); do
    t0=$(cpu_ticks $pid)
    j=$("$bin" perf nvmf --addr 127.0.0.1:$port --nqn nqn.2026-11.io.ferroblk:bench --cpus 1 \
          --qd "$2" --bs "$3" --rw "$4" --time "$secs" $mode --json 2>/dev/null)
    t1=$(cpu_ticks $pid)
    read -r iops mib mean ios < <(echo "$j" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["iops"]), round(j["mib_s"]), round(j["mean_us"],2), j["ios"])')
    cpu=$(python3 -c "print(round(($t1-$t0)/$hz*1e9/max($ios,1)))")
    echo "$1 run $i: $iops IOPS, $mib MiB/s, mean $mean us, target CPU $cpu ns/IO"
    vals+=("$iops"); cpus+=("$cpu"); lat+=("$mean")
  done
  python3 - "$1" "${vals[*]}" "${cpus[*]}" "${lat[*]}" <<'PY'
import statistics as s, sys
n = sys.argv[1]; v, c, l = ([float(x) for x in a.split()] for a in sys.argv[2:5])
print(f"median {n}: {s.median(v):.0f} IOPS, mean {s.median(l):.2f} us, target CPU {s.median(c):.0f} ns/IO")
PY
}
job "4k-randread-qd1" 1 4096 randread
job "4k-randread-qd32" 32 4096 randread
job "4k-randread-qd127" 127 4096 randread
job "4k-randwrite-qd32" 32 4096 randwrite
job "128k-read-qd16" 16 128K read
