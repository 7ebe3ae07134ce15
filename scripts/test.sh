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
# ss (the connection-age test), script (check-readme's pseudo-terminal),
# unshare (exec as PID 1).
command -v ss >/dev/null 2>&1 || need_apt+=(iproute2)
command -v script >/dev/null 2>&1 || need_apt+=(bsdutils)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy >/dev/null 2>&1 || true

# --- PostgreSQL, OpenBao, moto ----------------------------------------------
source scripts/servers.sh

# --- checks -----------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check
# fuzz/ is a crate of its own, outside the workspace: cargo fmt does not see it.
rustfmt --edition 2024 --check fuzz/fuzz_targets/*.rs fuzz/src/*.rs

log "imports run one way (no circle of files in broker/src or sidecar/src)"
python3 scripts/check-cycles.py broker/src sidecar/src

log "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo clippy with the optional OTLP export"
cargo clippy -p secrets-broker --features otlp --locked -- -D warnings

log "building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked

# The sidecar as the image builds it, linked with crt-static, so that exec
# mode runs in app images without glibc (tests/tests/exec_static.rs). With
# --target, RUSTFLAGS reach only this target's crates, not build scripts or
# proc macros.
log "building the static sidecar (crt-static) for the exec-mode test"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -p secrets-sidecar --bin secrets-sidecar --locked \
  --target "$(uname -m)-unknown-linux-gnu"

log "the README's two commands, as written, and every hint dev prints"
bash scripts/check-readme.sh

log "deploy/: render, schemas, hardening, policy, image lint, alerts, dashboards"
bash scripts/check-deploy.sh

log "cargo test (unit, integration and end-to-end)"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
set +e
cargo test --workspace --locked -- --test-threads=2 2>&1 | tee "$results"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite: the sum of every test binary's result.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1); if ($(i) ~ /^ignored/) g += $(i-1) } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, g }' "$results"
exit "$status"
