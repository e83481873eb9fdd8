#!/usr/bin/env bash
# Runs every cargo-fuzz target over its checked-in corpus (fuzz/corpus/<target>/) and then on
# new inputs for a bounded time with a fixed seed, as CI does (tests/run.sh calls this).
# Installs the nightly toolchain and cargo-fuzz when missing. Exits non-zero if any target
# crashes, hangs or leaks past its limits; the crashing input is kept in
# fuzz/artifacts/<target>/ (add it to the corpus once fixed).
#
#   fuzz/run.sh                     all targets, FUZZ_SECONDS (default 12) each
#   FUZZ_SECONDS=120 fuzz/run.sh virtq
#   FUZZ_SEED=7 fuzz/run.sh         another fixed seed
#
# New inputs the fuzzer finds go to a scratch corpus, never into the checked-in one (it stays
# small); copy an interesting one over by hand.
set -uo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-12}
seed=${FUZZ_SEED:-1}
# The fuzz crate builds into its own directory, not the workspace's out/ (a .cargo/config.toml
# above this directory would otherwise send it there).
export CARGO_TARGET_DIR="$PWD/target"

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "== fuzz: building ${#targets[@]} targets"
# Default cargo-fuzz profile: optimized, with debug assertions and overflow checks.
cargo +nightly fuzz build || exit 1

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "artifacts/$t"
  echo "== fuzz: $t (corpus $(find "corpus/$t" -type f | wc -l) inputs, then ${seconds}s, seed $seed)"
  # First corpus directory: where new inputs go; the checked-in one is only read.
  if cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
      -seed="$seed" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$scratch/$t.log" | tail -2
  else
    echo "!! fuzz target $t failed:"
    # Without backtrace frames and cargo-fuzz's dump of the input bytes.
    grep -v -E '^\s+[0-9]+: |^\s+at |^\s+#[0-9]+ |^INFO:|^\s*$|^\s\[' "$scratch/$t.log" | tail -30
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "== fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
echo "== fuzz: all ${#targets[@]} targets passed"
