#!/usr/bin/env bash
# The README's two commands, as written: runs the first one literally (from
# the checkout's root, with its default ./dev) until the banner and the first
# secret appear, runs every hint the banner prints exactly as printed, checks
# that dev is quiet and plain, stops it with SIGINT as Ctrl-C would, then runs
# `secrets-broker serve --config dev/broker.toml` as the README says. The
# second command is checked to be what .ci/run calls (so it runs whenever CI
# does).
#
#   bash scripts/check-readme.sh
#
# Called by scripts/test.sh after the build, so the first command's build is
# the one already done.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { printf 'check-readme: %s\n' "$*" >&2; exit 1; }

# --- the two commands: the shell blocks under "## The two commands" ----------
mapfile -t commands < <(awk '
  /^## / { section = ($0 == "## The two commands") }
  section && /^```sh$/ { block = 1; next }
  block && /^```$/ { block = 0; next }
  section && block && NF { print }' README.md)
[ "${#commands[@]}" = 2 ] || fail "expected two one-line commands under '## The two commands' in README.md, found ${#commands[@]}"
run_cmd=${commands[0]}
test_cmd=${commands[1]}
grep -qxF "exec $test_cmd" .ci/run || fail ".ci/run does not call the README's test command '$test_cmd'"
echo "README run command:  $run_cmd"
echo "README test command: $test_cmd (what .ci/run runs)"

# --- run it as a newcomer would ----------------------------------------------
[ -e dev ] && fail "./dev exists already: this check runs the README's command in a clean checkout"
work=$(mktemp -d)
out=$work/stdout err=$work/stderr
pid=
cleanup() {
  [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  [ -n "${serve_pid:-}" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
  rm -rf dev "$work"
}
trap cleanup EXIT
bash -c "$run_cmd" >"$out" 2>"$err" &
pid=$!
for _ in $(seq 1 600); do
  grep -q '^  read it ' "$out" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$out" "$err" >&2; fail "'$run_cmd' exited before its banner"; }
  sleep 0.5
done
grep -q '^  read it ' "$out" || { cat "$out" "$err" >&2; fail "no banner within 300 s"; }
cat "$out"
# The README's picture of the banner has the same lines.
labels() { sed -n 's/^  \([^ ]\+\( [^ ]\+\)\?\)  .*/\1/p'; }
shown=$(awk '/^### What `dev` shows/ { s = 1; next } s && /^```/ { if (b) exit; b = 1; next } s && b' README.md | labels)
[ -n "$shown" ] || fail "README.md has no banner under '### What \`dev\` shows'"
[ "$shown" = "$(labels <"$out")" ] || fail "README's banner lines ($(echo $shown)) are not dev's ($(labels <"$out" | tr '\n' ' '))"

# Every hint, exactly as printed.
read_it=$(sed -n 's/^  read it *\(cat [^ ]*\) .*/\1/p' "$out")
[ -n "$read_it" ] || fail "the banner's 'read it' line has no cat command"
value=$(bash -c "$read_it") || fail "'$read_it' failed"
case "$value" in "hello from secrets-broker dev, version "*) ;; *) fail "'$read_it' printed something else than the demo secret" ;; esac
ls_cmd=$(sed -n 's/^  read it .*(\(ls -la [^ ]*\) shows.*/\1/p' "$out")
bash -c "$ls_cmd" | grep -q -- '..data ->' || fail "'$ls_cmd' does not show the ..data layout"
try=$(sed -n 's/^  admin API .*try: //p' "$out")
[ -n "$try" ] || fail "the banner's admin API line has no command to try"
bash -c "$try" >"$work/try" 2>&1 || { cat "$work/try" >&2; fail "the banner's hint failed: $try"; }
grep -q 'demo/greeting' "$work/try" || { cat "$work/try" >&2; fail "the banner's hint lists no lease of demo/greeting"; }
echo "ran: $try"
verify=$(sed -n 's/^  audit log .*try: //p' "$out")
[ -n "$verify" ] || fail "the banner's audit log line has no command to try"
bash -c "$verify" >"$work/verify" 2>&1 || { cat "$work/verify" >&2; fail "the banner's hint failed: $verify"; }
grep -q 'intact' "$work/verify" || { cat "$work/verify" >&2; fail "the banner's audit hint did not say the log is intact"; }
echo "ran: $verify"
broker=$(sed -n 's/^  admin API .*try: \(.*\)brokerctl .*/\1secrets-broker/p' "$out")
case "$try" in
  "cargo run"*) broker="cargo run -q --bin secrets-broker --" ;;
  brokerctl*) broker=secrets-broker ;;
esac

# check-token on dev's token prints its result alone, with nothing on stderr.
$broker check-token --config dev/broker.toml --token-file dev/token >"$work/ct" 2>"$work/ct.err" \
  || { cat "$work/ct" "$work/ct.err" >&2; fail "check-token refused dev's own token"; }
grep -q '"role":"demo"' "$work/ct" || { cat "$work/ct" >&2; fail "check-token did not name the demo role"; }
[ -s "$work/ct.err" ] && { cat "$work/ct.err" >&2; fail "check-token printed log lines beside its result"; }
# Colour on a terminal only, and never with NO_COLOR: the same check-token
# at INFO under a pseudo-terminal (script(1), util-linux).
ct="RUST_LOG=info $broker check-token --config dev/broker.toml --token-file dev/token"
on_tty=$(script -qec "$ct" /dev/null)
no_color=$(script -qec "NO_COLOR=1 $ct" /dev/null)
[[ $on_tty == *$'\e['* ]] || fail "no colour in log lines on a terminal"
[[ $no_color == *$'\e['* ]] && fail "colour on a terminal although NO_COLOR is set"

# Let one rotation happen, then judge the log: one INFO line per rotation, no
# WARN or ERROR, no colour codes (stderr is a file here).
sleep 16
if grep -q $'\e\[' "$err"; then fail "dev's log has ANSI colour codes although stderr is not a terminal"; fi
# (cargo's own status lines, `   Compiling …`, `     Running …`, are not dev's.)
if grep -vE '^\S+ +INFO dev: rotated demo secret |^ +[A-Z][a-z]+ ' "$err" | grep -q .; then
  cat "$err" >&2; fail "dev logged more than one INFO line per rotation"
fi
grep -q 'rotated demo secret' "$err" || fail "no rotation was logged within 16 s"

# Ctrl-C: a clean stop that removes the secrets.
target=$(sed -n 's/^  sidecar .*(a link to \([^,]*\), on tmpfs)$/\1/p' "$out")
kill -INT "$pid"
status=0
wait "$pid" || status=$?
pid=
[ "$status" = 0 ] || { cat "$err" >&2; fail "dev exited $status on SIGINT"; }
grep -q '^stopped; secrets removed' "$out" || fail "dev did not say it removed the secrets"
[ -e dev/secrets ] && fail "dev/secrets is still there after the stop"
[ -n "$target" ] && [ -e "$target" ] && fail "the tmpfs directory $target is still there after the stop"

# "secrets-broker serve --config dev/broker.toml runs the same broker."
$broker serve --config dev/broker.toml >"$work/serve.out" 2>&1 &
serve_pid=$!
for _ in $(seq 1 60); do
  bash -c "$try" >"$work/try2" 2>&1 && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.out" >&2; fail "serve --config dev/broker.toml exited"; }
  sleep 0.5
done
bash -c "$try" >/dev/null 2>&1 || { cat "$work/serve.out" >&2; fail "serve --config dev/broker.toml: its admin API does not answer"; }
echo "README commands and every dev hint work as printed"
