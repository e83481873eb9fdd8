#!/usr/bin/env bash
# CPU of a target whose hosts are connected but idle: ferroblk serving a null namespace (one
# reactor on CPU 0), `ferroblk perf nvmf --queues 64 --hold` keeping 64 I/O queues (and the
# admin queue, with keep-alive) connected; utime+stime of the target over the window.
#   usage: benches/nvmf-idle.sh [queues=64] [seconds=30]
set -euo pipefail
cd "$(dirname "$0")/.."
nq=${1:-64}; secs=${2:-30}
bin=$(realpath out/release/ferroblk 2>/dev/null || true)
[ -x "$bin" ] || { cargo build --release; bin=$(realpath out/release/ferroblk); }
work=$(mktemp -d /var/tmp/ferroblk-nvidle.XXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/t.toml" <<TOML
[reactors]
cpus = [0]
[rpc]
socket = "$work/rpc.sock"
[[bdev]]
name = "null0"
kind = "null"
size = "1GiB"
[[subsystem]]
nqn = "nqn.2026-11.io.ferroblk:idle"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "null0"
[[listener]]
addr = "127.0.0.1"
port = $port
TOML
"$bin" serve --config "$work/t.toml" >"$work/t.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 200); do [ -S "$work/rpc.sock" ] && break; sleep 0.05; done
"$bin" perf nvmf --addr 127.0.0.1:$port --nqn nqn.2026-11.io.ferroblk:idle --queues "$nq" \
  --qd 1 --hold $((secs + 6)) >/dev/null 2>&1 &
hold=$!
sleep 3
conns=$("$bin" rpc --socket "$work/rpc.sock" nvmf_subsystem_list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)[0]["controllers"]))')
hz=$(getconf CLK_TCK)
t0=$(awk '{print $14+$15}' /proc/$pid/stat)
sleep "$secs"
t1=$(awk '{print $14+$15}' /proc/$pid/stat)
wait $hold || true
python3 -c "
t=$t1-$t0
print(f'target with $nq idle I/O queues + admin queue ($conns controller): {t} ticks in $secs s = {100*t/$hz/$secs:.3f}% of one core')"
