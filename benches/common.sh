# Shared by the scripts in benches/ (sourced, from the repository's root): the release binary,
# a free loopback port, waiting for a daemon's socket, a one-reactor null-namespace target
# config, a process's CPU time, and medians of alternating A/B runs.

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

# CPU time (user + system) of process $1 so far, in clock ticks (getconf CLK_TCK per second).
cpu_ticks() {
  awk '{print $14+$15}' "/proc/$1/stat"
}
