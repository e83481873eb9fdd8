# Shared by the scripts in benches/ (sourced, from the repository's root): the release binary,
# a work directory cleaned up on exit, a free loopback port, waiting for a daemon's socket, a
# one-reactor null-namespace target (its config, or the daemon started on it), a process's CPU
# time, alternating A/B runs and `perf bdev` figures.

# The release binary: built if missing, or always built with the cargo arguments given (a
# feature the script needs, e.g. `--features rbd`).
bench_bin() {
  local b
  b=$(realpath out/release/ferroblk 2>/dev/null || true)
  if [ ! -x "$b" ] || [ $# -gt 0 ]; then
    cargo build --release -q "$@" >&2
    b=$(realpath out/release/ferroblk)
  fi
  echo "$b"
}

# A work directory /var/tmp/ferroblk-$1.XXXX in `$work`; on exit, the processes whose pids the
# script added to `pids` are stopped and the directory removed.
bench_workdir() {
  work=$(mktemp -d "/var/tmp/ferroblk-$1.XXXX")
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
}

# A TCP port free on 127.0.0.1 now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to 10 s for the unix socket $1; fails naming it.
wait_sock() {
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "no socket $1" >&2
  return 1
}

# Writes to $1 a target config: one reactor on CPU 0, RPC socket $2, a null bdev `null0` of
# size $5 exported as namespace 1 of subsystem $4 (any host) on 127.0.0.1:$3; with $6, also a
# one-queue vhost-user-blk export of it on socket $6; with $7, the namespace is a `delay` bdev
# `slow0` over `null0` adding $7 microseconds to reads and writes.
null_target_config() {
  local file=$1 rpc=$2 port=$3 nqn=$4 size=$5 vhost=${6:-} delay=${7:-} ns=null0
  cat > "$file" <<TOML
[reactors]
cpus = [0]
[rpc]
socket = "$rpc"
[[bdev]]
name = "null0"
kind = "null"
size = "$size"
TOML
  if [ -n "$delay" ]; then
    ns=slow0
    printf '[[bdev]]\nname = "slow0"\nkind = "delay"\nbase = "null0"\nread_us = %s\nwrite_us = %s\n' "$delay" "$delay" >> "$file"
  fi
  cat >> "$file" <<TOML
[[subsystem]]
nqn = "$nqn"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "$ns"
[[listener]]
addr = "127.0.0.1"
port = $port
TOML
  if [ -n "$vhost" ]; then
    cat >> "$file" <<TOML
[[vhost]]
socket = "$vhost"
bdev = "null0"
num_queues = 1
TOML
  fi
}

# Starts `$bin serve` on a null_target_config (subsystem $2, size $3; with $4 = yes, also the
# vhost-user-blk export at $work/vhost.sock) in a bench_workdir $1, config $work/t.toml, log
# $work/t.log; sets port and pid; waits for its sockets.
start_null_target() {
  bench_workdir "$1"
  port=$(free_port)
  local vhost=
  [ "${4:-}" = yes ] && vhost=$work/vhost.sock
  null_target_config "$work/t.toml" "$work/rpc.sock" "$port" "$2" "$3" "$vhost"
  "$bin" serve --config "$work/t.toml" >"$work/t.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_sock "$work/rpc.sock" || { cat "$work/t.log" >&2; return 1; }
  [ -z "$vhost" ] || wait_sock "$vhost" || { cat "$work/t.log" >&2; return 1; }
}

# CPU time (user + system) of process $1 so far, in clock ticks (getconf CLK_TCK per second).
cpu_ticks() {
  awk '{print $14+$15}' "/proc/$1/stat"
}

# Runs two measurements alternately (A, B, A, B, ...) `runs` times and prints each pair and the
# medians: the shell commands $2 (A) and $3 (B) each print "IOPS CPU_NS_PER_IO" on one line;
# $1 is the run count, $4 and $5 name A and B, $6 describes the job for the summary line.
# Prints B/A for IOPS and for CPU per I/O (per pair, then median, min and max).
alternate() {
  local runs=$1 cmd_a=$2 cmd_b=$3 name_a=$4 name_b=$5 job=$6 i ai an bi bn
  local a_iops=() a_cpu=() b_iops=() b_cpu=()
  for i in $(seq "$runs"); do
    read -r ai an < <(eval "$cmd_a")
    read -r bi bn < <(eval "$cmd_b")
    echo "run $i: $name_a $ai IOPS ($an ns CPU/IO)   $name_b $bi IOPS ($bn ns CPU/IO)   IOPS ratio $(python3 -c "print(f'{$bi/$ai:.3f}')")   CPU ratio $(python3 -c "print(f'{$bn/$an:.3f}')")"
    a_iops+=("$ai"); a_cpu+=("$an"); b_iops+=("$bi"); b_cpu+=("$bn")
  done
  python3 - "$name_a" "$name_b" "$job" "${a_iops[*]}" "${a_cpu[*]}" "${b_iops[*]}" "${b_cpu[*]}" <<'PY'
import statistics as s, sys
na, nb, job = sys.argv[1:4]
ai, ac, bi, bc = ([float(x) for x in v.split()] for v in sys.argv[4:8])
ri = [b / a for a, b in zip(ai, bi)]
rc = [b / a for a, b in zip(ac, bc)]
print(f"median ({job}): {na} {s.median(ai):.0f} IOPS / {s.median(ac):.0f} ns CPU/IO, "
      f"{nb} {s.median(bi):.0f} IOPS / {s.median(bc):.0f} ns CPU/IO; "
      f"IOPS ratio {s.median(ri):.3f} (min {min(ri):.3f}, max {max(ri):.3f}), "
      f"CPU ratio {s.median(rc):.3f} (min {min(rc):.3f}, max {max(rc):.3f})")
PY
}

# `$bin perf bdev` on bdev $2 of config $1, with the remaining arguments; prints
# "IOPS CPU_NS_PER_IO" (fails if any I/O failed).
perf_bdev() {
  local cfg=$1 bdev=$2; shift 2
  "$bin" perf bdev --config "$cfg" --bdev "$bdev" "$@" --json 2>/dev/null \
    | python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["errors"] == 0, j; print(round(j["iops"]), round(j["reactor_cpu_ns_per_io"]))'
}
