#!/usr/bin/env bash
# The per-I/O cost of the ferroblk fio engine (fio/) in each mode, against fio's own `null`
# engine and against `ferroblk perf` on the same cells: 4 KiB random reads of a `null` bdev,
# one fio job (a thread) pinned to one CPU, cells alternating run by run.
#   - fio null engine (CPU 0): fio's own cost per I/O, the floor of any engine;
#   - bdev: fio drives the null bdev in-process (CPU 0), vs `ferroblk perf bdev` (reactor on CPU 0);
#   - vhost / nvmf: a ferroblk daemon serves the null bdev (one reactor on CPU 0); the client on
#     CPU 1 is fio with the engine, vs `ferroblk perf vhost` / `perf nvmf`.
# ns/IO is the CPU time of the I/O thread (fio's job thread, perf's reactor or queue thread) per
# I/O: fio's usr_cpu + sys_cpu over its runtime, perf's `reactor_cpu_ns_per_io`.
#   usage: benches/fio-engine.sh [runs=5] [seconds=5] [qd=32]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}; secs=${2:-5}; qd=${3:-32}; bs=4096
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
. benches/common.sh
bash fio/fetch-headers.sh >/dev/null
cargo build --release -p ferroblk -p ferroblk-fio
bin=$(bench_bin)
so=$(realpath out/release/libferroblk_fio.so)
nqn=nqn.2026-11.io.ferroblk:bench
# One reactor on CPU 0 serving the null bdev `null0` over NVMe/TCP and vhost-user; the
# in-process cells (bdev mode, `perf bdev`) build the same bdev from the same file.
start_null_target fio-bench "$nqn" 64GiB yes

fio_job() { # CPU, then engine options: prints "IOPS NS_PER_IO"
  local cpu=$1; shift
  fio --name=cell --thread --rw=randread --bs="$bs" --iodepth="$qd" --size=64G --time_based \
      --runtime="$secs" --cpus_allowed="$cpu" --norandommap --randrepeat=0 \
      --output-format=json "$@" 2>"$work/fio.err" \
    | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
ios = j["read"]["total_ios"]
cpu_ns = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] * 1e6
print(round(j["read"]["iops"]), round(cpu_ns / ios))' \
    || { cat "$work/fio.err" >&2; return 1; }
}
perf_job() { # perf subcommand and its options: prints "IOPS NS_PER_IO"
  "$bin" perf "$@" --qd "$qd" --bs "$bs" --rw randread --time "$secs" --json 2>"$work/perf.err" \
    | python3 -c '
import json, sys
j = json.load(sys.stdin)
# CPU time of the I/O threads per I/O: reactor (bdev), queue threads (nvmf), client (vhost).
ns = j.get("reactor_cpu_ns_per_io", j.get("client_cpu_ns_per_io"))
print(round(j["iops"]), round(ns))' \
    || { cat "$work/perf.err" >&2; return 1; }
}
nvmf="trtype=tcp traddr=127.0.0.1 trsvcid=$port subnqn=${nqn//:/\\:} ns=1"
cells=(fio-null fio-bdev perf-bdev fio-vhost perf-vhost fio-nvmf perf-nvmf)
run_cell() {
  case $1 in
    fio-null)   fio_job 0 --ioengine=null ;;
    fio-bdev)   fio_job 0 --ioengine="external:$so" --ferroblk_mode=bdev --ferroblk_config="$work/t.toml" --filename=null0 ;;
    perf-bdev)  perf_job bdev --config "$work/t.toml" --bdev null0 ;;
    fio-vhost)  fio_job 1 --ioengine="external:$so" --ferroblk_mode=vhost --filename="$work/vhost.sock" ;;
    perf-vhost) perf_job vhost --socket "$work/vhost.sock" --cpus 1 ;;
    fio-nvmf)   fio_job 1 --ioengine="external:$so" --ferroblk_mode=nvmf --filename="$nvmf" ;;
    perf-nvmf)  perf_job nvmf --addr "127.0.0.1:$port" --nqn "$nqn" --nsid 1 --cpus 1 ;;
  esac
}
declare -A iops ns
for i in $(seq "$runs"); do
  for c in "${cells[@]}"; do
    read -r a n < <(run_cell "$c")
    echo "run $i $c: $a IOPS, $n ns/IO"
    iops[$c]+="$a "; ns[$c]+="$n "
  done
done
echo "qd=$qd bs=$bs, medians of $runs runs of ${secs}s:"
for c in "${cells[@]}"; do echo "$c ${iops[$c]}| ${ns[$c]}"; done | python3 -c '
import statistics as s, sys
rows = {}
for line in sys.stdin:
    name, rest = line.split(" ", 1)
    a, n = rest.split("|")
    rows[name] = ([float(x) for x in a.split()], [float(x) for x in n.split()])
base = s.median(rows["fio-null"][1])
print("%-11s %9s %6s %14s %11s" % ("cell", "IOPS", "ns/IO", "min-max ns/IO", "vs fio null"))
for name, (a, n) in rows.items():
    print(f"{name:<11} {s.median(a):>9.0f} {s.median(n):>6.0f} {min(n):>6.0f}-{max(n):<7.0f} {s.median(n) / base:>10.2f}x")
pairs = [("fio-bdev", "perf-bdev"), ("fio-vhost", "perf-vhost"), ("fio-nvmf", "perf-nvmf")]
for f, p in pairs:
    print(f"{f} / {p}: ns/IO x{s.median(rows[f][1]) / s.median(rows[p][1]):.2f}, IOPS x{s.median(rows[f][0]) / s.median(rows[p][0]):.2f}")'
