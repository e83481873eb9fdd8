# Shared by the scripts in benches/ (sourced, from the repository's root): the release binary,
# a free loopback port, waiting for a daemon's socket, a one-reactor null-namespace target
# (its config, or the daemon started on it), a process's CPU time.

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
# one-queue vhost-user-blk export of it on socket $6.
null_target_config() {
  local file=$1 rpc=$2 port=$3 nqn=$4 size=$5 vhost=${6:-}
  cat > "$file" <<TOML
[reactors]
cpus = [0]
[rpc]
socket = "$rpc"
[[bdev]]
name = "null0"
kind = "null"
size = "$size"
[[subsystem]]
nqn = "$nqn"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "null0"
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
# vhost-user-blk export at $work/vhost.sock) in a new directory $work (/var/tmp/ferroblk-$1.*),
# config $work/t.toml, log $work/t.log; sets work, port and pid; waits for its sockets; stops
# it and removes $work when the script exits.
start_null_target() {
  work=$(mktemp -d "/var/tmp/ferroblk-$1.XXXX")
  port=$(free_port)
  local vhost=
  [ "${4:-}" = yes ] && vhost=$work/vhost.sock
  null_target_config "$work/t.toml" "$work/rpc.sock" "$port" "$2" "$3" $vhost
  "$bin" serve --config "$work/t.toml" >"$work/t.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
  wait_sock "$work/rpc.sock" || { cat "$work/t.log" >&2; return 1; }
  [ -z "$vhost" ] || wait_sock "$vhost" || { cat "$work/t.log" >&2; return 1; }
}

# CPU time (user + system) of process $1 so far, in clock ticks (getconf CLK_TCK per second).
cpu_ticks() {
  awk '{print $14+$15}' "/proc/$1/stat"
}
