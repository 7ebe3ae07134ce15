#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs and starts what the tests
# need, builds the binaries, runs formatting and lint checks, unit tests and
# the end-to-end tests (real binaries, real HTTPS issuer, real tmpfs).
#
#   bash scripts/test.sh
#
# Idempotent: installs only what is missing, starts only what is not running,
# stops what it started. Set CARGO_TARGET_DIR to reuse a build cache.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# --- tools ------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust (stable, 1.88 or newer) with rustup first" >&2
  exit 1
fi
need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v mount >/dev/null 2>&1 || need_apt+=(mount)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy >/dev/null 2>&1 || true

# --- checks -----------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked

log "cargo test (unit, integration and end-to-end)"
cargo test --workspace --locked -- --test-threads=2
