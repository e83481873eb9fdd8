#!/usr/bin/env bash
# CPU used by an idle daemon: starts `ferroblk serve` with a config (default: the quickstart),
# waits for it to settle, then reads utime+stime from /proc/PID/stat over a window.
#   usage: benches/idle-cpu.sh [config=configs/quickstart.toml] [seconds=30]
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=$(realpath "${1:-configs/quickstart.toml}"); secs=${2:-30}
. benches/common.sh
bin=$(bench_bin)
work=$(mktemp -d /var/tmp/ferroblk-idle.XXXX)
cd "$work"
"$bin" serve --config "$cfg" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
sleep 3
hz=$(getconf CLK_TCK)
t0=$(cpu_ticks $pid)
sleep "$secs"
t1=$(cpu_ticks $pid)
python3 -c "
ticks=$t1-$t0
print(f'idle daemon: {ticks} ticks of CPU in $secs s = {100*ticks/$hz/$secs:.3f}% of one core (threads: $(ls /proc/$pid/task | wc -l))')"
