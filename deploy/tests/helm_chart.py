#!/usr/bin/env python3
"""Lints and renders the Helm chart (deploy/helm/secrets-broker) offline, with
Helm v4 as a library (PyPI helm-python-sdk; no helm binary).

    helm_chart.py render OUT   lint (strict, Kubernetes 1.30) and render every
                               values set below (and the packaged chart)
                               into OUT/helm-<set>.yaml (which
                               check-deploy.sh validates, hardening-checks and
                               scans like the Kustomize renders), and the sets
                               that have a Kustomize twin, with the Namespace,
                               into OUT/twins/<set>.yaml for compare_renders.py
    helm_chart.py reject       every file in fixtures/helm-bad-values/ fails
                               the install with the message its first line
                               names: `# expect: <text>` from values.schema.json
                               (a typo names the bad key), `# expect-template:
                               <text>` from a template's check (what no schema
                               can express)

Values files are merged as `helm install -f a.yaml -f b.yaml` merges them
(maps key by key, anything else replaced) and parsed by Helm's own YAML
reader. Every rendered object must carry the app.kubernetes.io labels name,
instance, version, component, part-of and managed-by; the Argo CD
Application's render (gitops/argocd/secrets-broker-helm.yaml) may hold only
kinds its AppProject allows.
"""

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
CHART = DEPLOY / "helm" / "secrets-broker"
ARGO_APP = DEPLOY / "gitops" / "argocd" / "secrets-broker-helm.yaml"
BAD_VALUES = DEPLOY / "tests" / "fixtures" / "helm-bad-values"
RELEASE = "secrets-broker"
NAMESPACE = "secrets-broker"
KUBE_VERSION = "v1.30.0"
LABELS = [f"app.kubernetes.io/{k}" for k in ("name", "instance", "version", "component", "part-of", "managed-by")]

# name -> (values files, the Kustomize render it must equal: the file name
# check-deploy.sh gives `kubectl kustomize <dir>`, or None). Values files are
# relative to the chart's directory unless they start with deploy/.
SETS = {
    "default": ([], "overlays-dev"),
    "dev": (["examples/dev.yaml"], "overlays-dev"),
    "ha": (["examples/ha.yaml"], "overlays-ha"),
    "injector": (["examples/injector.yaml"], None),
    "monitoring": (["examples/monitoring.yaml"], None),
    "dev-all": (["examples/dev.yaml", "examples/monitoring.yaml", "examples/injector.yaml"], "tests-kustomize-dev-all"),
    "ha-all": (["examples/ha.yaml", "examples/injector.yaml"], "tests-kustomize-ha-all"),
    "variants": (["deploy/tests/fixtures/helm-values/variants.yaml"], None),
    "no-audit": (["deploy/tests/fixtures/helm-values/no-audit.yaml"], None),
}


def helm():
    import helm_python

    return helm_python


@contextlib.contextmanager
def quiet_symlinks():
    """Helm's chart loader logs one INFO line per symlink (files/ links to
    deploy/alerts, deploy/dashboards and deploy/components/canary) straight to
    stderr; drop those, pass anything else through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if "found symbolic link in path" not in line:
                    print(line, file=sys.stderr)


def merge(base, over):
    """`helm -f base -f over`: maps merge key by key; anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_values(h, files, extra=None):
    values = {}
    for f in files:
        path = DEPLOY.parent / f if f.startswith("deploy/") else CHART / f
        values = merge(values, h.values_from_yaml(path.read_text()) or {})
    return merge(values, extra or {})


def argo_set():
    """The values the Argo CD Application's Helm source renders with."""
    app = yaml.safe_load(ARGO_APP.read_text())
    src = app["spec"]["source"]
    if (DEPLOY.parent / src["path"]).resolve() != CHART:
        raise SystemExit(f"{ARGO_APP}: spec.source.path {src['path']!r} is not the chart")
    helm_src = src.get("helm") or {}
    if helm_src.get("releaseName", RELEASE) != RELEASE or app["spec"]["destination"]["namespace"] != NAMESPACE:
        raise SystemExit(f"{ARGO_APP}: release {RELEASE} in namespace {NAMESPACE} expected")
    return helm_src.get("valueFiles") or [], helm_src.get("valuesObject") or {}


def project_allows(docs):
    """Kinds the Argo CD AppProject does not allow (the Application would not sync)."""
    project = yaml.safe_load((ARGO_APP.parent / "project.yaml").read_text())["spec"]
    allowed = {(w["group"], w["kind"]) for w in (project.get("clusterResourceWhitelist") or [])
               + (project.get("namespaceResourceWhitelist") or [])}
    return sorted({f"{d['kind']} ({d['apiVersion']})" for d in docs
                   if (d["apiVersion"].rpartition("/")[0], d["kind"]) not in allowed})


def render(h, chart, values):
    """All rendered objects as one multi-document YAML string, and NOTES.txt."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs, notes = [], ""
    for path in sorted(out):
        text = out[path]
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs, notes


def check_labels(name, docs):
    problems = []
    for d in docs:
        labels = (d.get("metadata") or {}).get("labels") or {}
        missing = [k for k in LABELS if not labels.get(k)]
        if missing:
            problems.append(f"{name}: {d['kind']}/{d['metadata'].get('name')} lacks labels {', '.join(missing)}")
        elif labels["app.kubernetes.io/managed-by"] != "Helm":
            problems.append(f"{name}: {d['kind']}/{d['metadata'].get('name')}: managed-by is not Helm")
    return problems


def lint(h, values, label):
    report = h.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=KUBE_VERSION)
    problems = []
    for m in report.get("messages") or []:
        if m["severity"] >= 2:  # warning or error; info ("icon is recommended") is not a finding
            problems.append(f"lint {label}: {m['path']}: {m['error'].strip()}")
    return problems


def cmd_render(out_dir):
    h = helm()
    out_dir = Path(out_dir)
    (out_dir / "twins").mkdir(parents=True, exist_ok=True)
    chart = h.Chart.load(str(CHART))
    sets = dict(SETS)
    # The Argo CD Application's Helm source: its valueFiles and valuesObject.
    files, obj = argo_set()
    sets["argocd"] = (files, "overlays-ha", obj)
    problems = []
    for name, spec in sets.items():
        files, twin = spec[0], spec[1]
        extra = spec[2] if len(spec) > 2 else {}
        label = name + (f" (-f {' -f '.join(files)}{' + valuesObject' if extra else ''})" if files else " (default values)")
        values = load_values(h, files, extra)
        problems += lint(h, values, label)
        try:
            docs, notes = render(h, chart, values)
        except h.HelmError as e:
            problems.append(f"render {label}: {e}")
            continue
        problems += check_labels(name, docs)
        if name == "argocd":
            problems += [f"{ARGO_APP.name}: AppProject secrets-broker does not allow {k}" for k in project_allows(docs)]
        if not notes.strip():
            problems.append(f"render {label}: NOTES.txt is empty")
        (out_dir / f"helm-{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        print(f"  {label:<92} {len(docs):3d} objects")
        if twin:
            tv = merge(values, {"namespace": {"create": True}})
            tdocs = docs if tv == values else render(h, chart, tv)[0]
            (out_dir / "twins" / f"{name}.yaml").write_text(
                f"# twin: {twin}\n" + yaml.safe_dump_all(tdocs, sort_keys=False))
    # What a user of the packaged chart gets: `helm package` resolves the
    # symlinks in files/; the archive must render the same objects.
    archive = h.package(str(CHART), destination=str(out_dir / "package"))
    packaged = h.Chart.load(archive)
    differ = [name for name in ("default", "ha")
              if render(h, packaged, load_values(h, sets[name][0]))[0] != render(h, chart, load_values(h, sets[name][0]))[0]]
    if differ:
        problems.append(f"{Path(archive).name}: renders other objects than the chart's directory ({', '.join(differ)})")
    else:
        print(f"  {Path(archive).name} (helm package): renders the same objects as the directory")
    for p in problems:
        print(f"FAIL {p}")
    print(f"helm: {len(sets)} values sets linted (strict, Kubernetes {KUBE_VERSION}) and rendered, "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_reject():
    h = helm()
    chart = h.Chart.load(str(CHART))
    cases = sorted(BAD_VALUES.glob("*.yaml"))
    if not cases:
        print(f"FAIL no bad values files in {BAD_VALUES}")
        return 1
    failed = 0
    for f in cases:
        first = f.read_text().splitlines()[0]
        by_schema = first.startswith("# expect: ")
        if not (by_schema or first.startswith("# expect-template: ")):
            print(f"FAIL {f.name}: the first line must be '# expect: <message>' (values.schema.json) "
                  "or '# expect-template: <message>' (a template's fail)")
            failed += 1
            continue
        expect = first.split(": ", 1)[1].strip()
        values = h.values_from_yaml(f.read_text())
        want = h.HelmValuesError if by_schema else h.HelmRenderError
        by = "values.schema.json" if by_schema else "the chart's templates"
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except want as e:
            msg = " ".join(str(e).split())
            if expect in msg:
                print(f"  {f.name}: refused by {by} as expected: {msg}")
            else:
                print(f"FAIL {f.name}: refused by {by}, but the message does not contain {expect!r}: {msg}")
                failed += 1
            continue
        except h.HelmError as e:
            print(f"FAIL {f.name}: refused, but not by {by}: {type(e).__name__}: {e}")
            failed += 1
            continue
        print(f"FAIL {f.name}: rendered without an error; {by} should refuse it ({expect})")
        failed += 1
    print(f"bad values: {len(cases) - failed} of {len(cases)} files refused with the expected message")
    return 1 if failed else 0


def main(argv):
    if argv[:1] == ["render"] and len(argv) == 2:
        with quiet_symlinks():
            return cmd_render(argv[1])
    if argv == ["reject"]:
        with quiet_symlinks():
            return cmd_reject()
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
