#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): installs what it needs, then checks
# formatting and lints, then runs every test of the workspace (unit tests, the bdev conformance
# suite on every bdev, config rejection cases, RPC round trips, daemon start/stop, fuzz corpus
# replays), then every fuzz target for a short, fixed-seed run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, installed only when missing.
need=()
command -v losetup >/dev/null || need+=(mount)
command -v cc >/dev/null || need+=(gcc)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
command -v fio >/dev/null || need+=(fio)
# The rbd bdev links librbd; its tests run a single-node Ceph cluster.
for p in ceph-mon ceph-osd ceph-common librbd-dev librados-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
command -v dpkg-source >/dev/null || need+=(dpkg-dev)
# NVMe/RDMA: rdma-core's headers to build, its userspace (soft-RoCE provider) for the guest lab.
for p in libibverbs-dev librdmacm-dev rdma-core ibverbs-providers ibverbs-utils rdmacm-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add clippy rustfmt
fi

# A one-shot build gains nothing from incremental compilation, which doubles the build
# directory's size on disk.
export CARGO_INCREMENTAL=0

# The fio engine (fio/) is built against the installed fio's own configured source tree.
echo "== fio headers"
bash fio/fetch-headers.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked --features ferroblk/rbd,ferroblk/rdma -- -D warnings
# From here on a failure is remembered, not fatal, so that every failing test and target is
# reported in one run.
status=0
# Everything built first as `cargo build` lays it out (the fio engine's shared library beside the
# binary, where `bench matrix` finds it), then tested.
echo "== cargo build"
cargo build --workspace --locked --features ferroblk/rbd,ferroblk/rdma || status=1
echo "== cargo test"
cargo test --workspace --locked --features ferroblk/rbd,ferroblk/rdma --no-fail-fast || status=1

# Every fuzz target over its checked-in corpus, then briefly on new inputs (fuzz/run.sh;
# installs nightly and cargo-fuzz when missing).
echo "== fuzz"
fuzz/run.sh || status=1

exit $status
