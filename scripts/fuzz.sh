#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time, starting from the seeds
# committed in fuzz/seeds/<target> (the corpus grows in fuzz/corpus, ignored
# by git). A crash stops the run and leaves its input in fuzz/artifacts/:
# once fixed, copy it into fuzz/seeds/<target>/, where `cargo test`
# (tests/tests/fuzz_seeds.rs) replays it from then on. A target that fails to
# build or run also fails the script.
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
# cargo-fuzz's own output goes to a log, of which only the summary lines are
# shown; its exit status is checked, so a failed build or a failed run stops
# the script with the log's end instead of passing with nothing fuzzed.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail() {
  echo "$1; the end of its output:" >&2
  tail -n 40 "$log" >&2
  exit 1
}
for t in "${targets[@]}"; do
  printf '\n==> %s: building (instrumented, slow the first time)\n' "$t"
  cargo "${toolchain[@]}" fuzz build -O "$t" >"$log" 2>&1 ||
    fail "cargo fuzz could not build target $t"
  mkdir -p "corpus/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  printf '==> %s (%ss)\n' "$t" "$secs"
  status=0
  cargo "${toolchain[@]}" fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 ||
    status=$?
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|Done)' "$log" || true
  # A crash, timeout or out-of-memory input lands in artifacts/<target>.
  if [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    fail "crash found for $t: see fuzz/artifacts/$t; add the input to fuzz/seeds/$t/ once fixed"
  fi
  [ "$status" -eq 0 ] || fail "cargo fuzz run $t exited with status $status"
  if ! grep -q '^stat::number_of_executed_units' "$log"; then
    fail "cargo fuzz run $t printed no final stats: did libFuzzer run?"
  fi
done
echo "all fuzz targets ran ${secs}s each without a crash"
