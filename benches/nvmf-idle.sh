#!/usr/bin/env bash
# CPU of a target whose hosts are connected but idle: ferroblk serving a null namespace (one
# reactor on CPU 0), `ferroblk perf nvmf --queues 64 --hold` keeping 64 I/O queues (and the
# admin queue, with keep-alive) connected; utime+stime of the target over the window.
#   usage: benches/nvmf-idle.sh [queues=64] [seconds=30]
set -euo pipefail
cd "$(dirname "$0")/.."
nq=${1:-64}; secs=${2:-30}
. benches/common.sh
bin=$(bench_bin)
start_null_target nvidle nqn.2026-11.io.ferroblk:idle 1GiB
"$bin" perf nvmf --addr 127.0.0.1:$port --nqn nqn.2026-11.io.ferroblk:idle --queues "$nq" \
  --qd 1 --hold $((secs + 6)) >/dev/null 2>&1 &
hold=$!
sleep 3
conns=$("$bin" rpc --socket "$work/rpc.sock" nvmf_subsystem_list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)[0]["controllers"]))')
hz=$(getconf CLK_TCK)
t0=$(cpu_ticks $pid)
sleep "$secs"
t1=$(cpu_ticks $pid)
wait $hold || true
python3 -c "
t=$t1-$t0
print(f'target with $nq idle I/O queues + admin queue ($conns controller): {t} ticks in $secs s = {100*t/$hz/$secs:.3f}% of one core')"
