#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time, starting from the seeds
# committed in fuzz/seeds/<target> (the corpus grows in fuzz/corpus, ignored
# by git). A crash stops the run and leaves its input in fuzz/artifacts/:
# turn it into a regression test next to the code it broke.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]   # default 60
#   bash scripts/fuzz.sh 30 token_header names  # only these targets
#
# Needs cargo-fuzz (installed when missing) and a nightly toolchain; without
# one (no nightly can be fetched on our CI machines), or with
# FUZZ_TOOLCHAIN=stable, it runs the stable compiler with RUSTC_BOOTSTRAP=1,
# which cargo-fuzz's flags need.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# FUZZ_TOOLCHAIN=stable forces the stable compiler even when a nightly exists.
toolchain=()
if [ "${FUZZ_TOOLCHAIN:-}" != stable ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  printf '\n==> %s (%ss)\n' "$t" "$secs"
  cargo "${toolchain[@]}" fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|Done)' || true
  if [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    echo "crash found for $t: see fuzz/artifacts/$t" >&2
    exit 1
  fi
done
echo "all fuzz targets ran ${secs}s each without a crash"
