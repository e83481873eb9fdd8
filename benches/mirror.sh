#!/usr/bin/env bash
# `mirror` over two children against one such child alone: `perf bdev` on each, same run,
# alternating (single, mirror, single, ...), printing each pair's IOPS and CPU ratios and the
# medians.
#   usage: benches/mirror.sh [rw=randwrite] [bs=4K] [qd=32] [runs=5] [seconds=3]
# CHILDREN picks the children:
# - `malloc` (default): 1 GiB malloc bdevs in the process; two reactors on CPUS (default
#   "0, 1"), each with its own channel on every child. Every run first writes the whole bdev
#   (--prefill: a never-written malloc reads the zero page) and runs 1 s unmeasured (--ramp).
# - `nvmf`: remote volumes, each an `nvmf` bdev to its own ferroblk process (one reactor)
#   serving a `null` namespace behind a `delay` of DELAY_US microseconds (default 0: the
#   remote's own cost only), both remotes on CPU 0; the `nvmf` bdevs have one queue of CHILD_QD entries (default 16)
#   per reactor: a remote volume with its own latency and queue limit, as a cloud volume has.
#   The single child is a third `nvmf` bdev to the first remote; it takes at most CHILD_QD
#   requests at once, so it runs at QD min(qd, CHILD_QD), the mirror (as deep as its children
#   together) at qd. One reactor on CPUS (default "1").
# The mirror is declared `assume_clean` (its children are new), so no initial copy runs.
set -euo pipefail
cd "$(dirname "$0")/.."
rw=${1:-randwrite}; bs=${2:-4K}; qd=${3:-32}; runs=${4:-5}; secs=${5:-3}
children=${CHILDREN:-malloc}
. benches/common.sh
bin=$(bench_bin)
bench_workdir mirror
case "$children" in
  malloc)
    cpus=${CPUS:-0, 1}
    child() { printf '[[bdev]]\nname = "%s"\nkind = "malloc"\nsize = "1GiB"\n\n' "$1"; }
    prefill=--prefill
    ;;
  nvmf)
    cpus=${CPUS:-1}
    delay=${DELAY_US:-0}; child_qd=${CHILD_QD:-16}
    ports=()
    for r in a b; do
      port=$(free_port); ports+=("$port")
      null_target_config "$work/remote-$r.toml" "$work/remote-$r.sock" "$port" \
        "nqn.2026-12.io.ferroblk:bench-$r" 1GiB "" "$delay"
      "$bin" serve --config "$work/remote-$r.toml" >"$work/remote-$r.log" 2>&1 &
      pids+=($!)
      wait_sock "$work/remote-$r.sock"
    done
    child() { # name -> an nvmf bdev to remote a (single, a) or b
      local r=a port=${ports[0]}
      [ "$1" = b ] && { r=b; port=${ports[1]}; }
      printf '[[bdev]]\nname = "%s"\nkind = "nvmf"\nsubnqn = "nqn.2026-12.io.ferroblk:bench-%s"\npaths = [{ addr = "127.0.0.1", port = %s }]\nio_queues = 1\nqueue_depth = %s\n\n' "$1" "$r" "$port" "$child_qd"
    }
    prefill=
    single_qd=$(( qd < child_qd ? qd : child_qd ))
    ;;
  *) echo "CHILDREN is malloc or nvmf" >&2; exit 2 ;;
esac
{
  printf '[reactors]\ncpus = [%s]\n\n[rpc]\nsocket = "%s/rpc.sock"\n\n' "$cpus" "$work"
  child single; child a; child b
  printf '[[bdev]]\nname = "mir"\nkind = "mirror"\nchildren = ["a", "b"]\nassume_clean = true\n'
} > "$work/b.toml"
args="--bs $bs --rw $rw --time $secs --ramp 1 $prefill"
alternate "$runs" "perf_bdev $work/b.toml single --qd ${single_qd:-$qd} $args" "perf_bdev $work/b.toml mir --qd $qd $args" \
  "$children" "mirror of 2 $children" \
  "$children children${delay:+ (delay $delay us, queue depth $child_qd)}, $rw, bs $bs, qd $qd per reactor, reactors on CPUs $cpus"
