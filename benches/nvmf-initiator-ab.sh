#!/usr/bin/env bash
# ferroblk's initiator over NVMe/RDMA against NVMe/TCP: the same `ferroblk perf nvmf` job against
# the same target, --trtype tcp and --trtype rdma taking turns (A B A B ...). Per run: IOPS, the
# initiator's CPU per I/O (`process_cpu_ns_per_io` of perf nvmf: every thread of the initiator
# process, so with --wait it is the real cost per I/O; polling burns a core per queue whatever
# the load) and, when the target's PID is given, the target's CPU per I/O (utime+stime over the
# run / I/Os). Then medians and the RDMA/TCP ratio per pair.
#
# Runs wherever both transports reach the target: inside the guest lab (benches/nvmf-rdma-guest.sh
# calls it on soft-RoCE) or unchanged on real RDMA hardware, from a host to a target that listens
# on NVMe/TCP and NVMe/RDMA on its RDMA NIC's address:
#
#   usage: benches/nvmf-initiator-ab.sh BIN ADDR TCP_PORT RDMA_PORT NQN [runs=3] [seconds=10]
#          [bs=4k] [qd=16] [queues=2] [target_pid]
#   e.g.   benches/nvmf-initiator-ab.sh out/release/ferroblk 192.168.1.10 4420 4421 nqn...:bench
set -euo pipefail
bin=$1; addr=$2; tcp_port=$3; rdma_port=$4; nqn=$5
runs=${6:-3}; secs=${7:-10}; bs=${8:-4k}; qd=${9:-16}; queues=${10:-2}; tpid=${11:-}
hz=$(getconf CLK_TCK)
ticks() { if [ -n "$tpid" ]; then awk '{print $14+$15}' "/proc/$tpid/stat"; else echo 0; fi; }
one() {  # $1 transport, $2 port
  local t0 t1 out
  t0=$(ticks)
  out=$("$bin" perf nvmf --trtype "$1" --addr "$addr:$2" --nqn "$nqn" --rw randread --bs "$bs" \
        --qd "$qd" --queues "$queues" --time "$secs" --wait --json)
  t1=$(ticks)
  python3 - "$1" "$t0" "$t1" "$hz" "$out" <<'PY'
import json, sys
tr, t0, t1, hz, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
j = json.loads(out)
ios = max(j["ios"], 1)
print(f"BENCH-INIT {tr} iops={j['iops']:.0f} ios={j['ios']} errors={j['errors']} "
      f"initiator_cpu_us_per_io={j['process_cpu_ns_per_io'] / 1000:.1f} "
      f"target_cpu_us_per_io={(t1 - t0) / hz * 1e6 / ios:.1f} mean_us={j['mean_us']:.0f}")
PY
}
for _ in $(seq "$runs"); do one tcp "$tcp_port"; one rdma "$rdma_port"; done
