#!/usr/bin/env bash
# What a newcomer waits for: a fresh clone of this checkout's HEAD, an empty
# target directory, and the README's first command, timed until the first
# secret is on disk; then SIGINT, as Ctrl-C. Prints the wall time, the build
# units cargo ran, the CPU they took and the size of target/. The crates must
# be downloaded already (`cargo fetch`), so the figure is the build alone.
#
#   bash scripts/first-build.sh
#
# Uses both cores for several minutes: run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q . "$work/clone"
cd "$work/clone"
cargo fetch --locked -q
run_cmd=$(awk '/^## The two commands/ { s = 1; next } /^## / { s = 0 } s && /^```sh$/ { b = 1; next } b && /^```$/ { exit } s && b && NF' README.md)
export CARGO_TARGET_DIR="$work/target"
start=$(date +%s.%N)
# --timings: cargo's own report of every unit, in target/cargo-timings.
bash -c "${run_cmd/cargo run/cargo run --timings}" >"$work/out" 2>"$work/err" &
pid=$!
while [ ! -e dev/secrets/greeting ]; do
  kill -0 "$pid" 2>/dev/null || { cat "$work/err" >&2; echo "first-build: '$run_cmd' exited" >&2; exit 1; }
  sleep 0.2
done
end=$(date +%s.%N)
kill -INT "$pid"
wait "$pid" || true
pid=
report=$(ls "$CARGO_TARGET_DIR"/cargo-timings/cargo-timing-*.html | head -n1)
python3 - "$report" "$(echo "$end - $start" | bc)" "$(du -sh "$CARGO_TARGET_DIR" | cut -f1)" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);", text, re.S).group(1))
busy = sum(u["duration"] for u in units)
print(f"fresh clone -> first secret on disk: {float(sys.argv[2]):.0f} s wall; "
      f"{len(units)} build units, {busy:.0f} s of unit time; target/ {sys.argv[3]}")
for u in sorted(units, key=lambda u: -u["duration"])[:8]:
    print(f"  {u['duration']:6.1f} s  {u['name']} {u['version']} {u.get('target', '').strip()}")
EOF
