#!/usr/bin/env bash
# Every benchmark, from a fresh clone: installs what the scenarios need (as
# the test command does, plus a font for the plots), builds the release
# binaries, runs the `cargo bench` micro-benchmarks, then every scenario
# against the real binaries on loopback (`secrets-bench`). Results go to
# bench-results/: summary.json (machine, commit, figures) and PNG plots.
#
#   bash scripts/bench.sh            # the figures in BENCHMARKS.md (~15 min)
#   bash scripts/bench.sh --quick    # a smoke run of every scenario
#
# Run it on an otherwise idle machine: the figures are CPU-bound.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

source scripts/servers.sh
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ -z "${SECRETS_BENCH_FONT:-}" ]; then
  log "installing fonts-dejavu-core (text in the plots)"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core
fi

log "building the release binaries"
cargo build --release --workspace --bins --locked

if [ "${1:-}" != "--quick" ]; then
  log "cargo bench: token verification micro-benchmarks"
  cargo bench --locked -p secrets-broker --bench verify
fi

log "every scenario (secrets-bench)"
"${CARGO_TARGET_DIR:-target}/release/secrets-bench" "$@"
