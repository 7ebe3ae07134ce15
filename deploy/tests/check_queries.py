#!/usr/bin/env python3
"""Checks every PromQL query outside the PrometheusRule (which promtool
checks on its own): the Grafana dashboards and the canary AnalysisTemplate.

    check_queries.py PROMTOOL

- each query names only metrics the binaries export (METRICS in
  deploy/dashboards/build.py) or recording rules that deploy/alerts defines;
- each query parses: Grafana variables and Argo Rollouts arguments are
  replaced by sample values, the queries are written as recording rules to a
  temporary file, and `promtool check rules` parses them.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
sys.dont_write_bytecode = True  # no __pycache__ in the work tree
sys.path.insert(0, str(DEPLOY / "dashboards"))
from build import METRICS  # noqa: E402

METRIC_RE = re.compile(r"\b(secrets_(?:broker|sidecar)_[a-z0-9_]+)")
RECORDED_RE = re.compile(r"\b(secrets_broker:[a-z0-9_:]+)")
SUFFIXES = ("_bucket", "_count", "_sum")


def grafana_exprs():
    for name in ("broker.json", "sidecar.json"):
        board = json.loads((DEPLOY / "dashboards" / name).read_text())
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                yield f"{name} panel {panel['id']} ({panel['title']}) {t['refId']}", t["expr"]


def analysis_exprs():
    path = DEPLOY / "components" / "canary" / "analysistemplate.yaml"
    for doc in yaml.safe_load_all(path.read_text()):
        for m in doc["spec"]["metrics"]:
            yield f"AnalysisTemplate metric {m['name']}", m["provider"]["prometheus"]["query"]


def substitute(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$__interval", "1m")
    expr = re.sub(r"\$\{?[A-Za-z_]+\}?", "x", expr)
    expr = re.sub(r"\{\{\s*args\.[a-z0-9-]+\s*\}\}", "x", expr)
    return expr


def main():
    promtool = sys.argv[1]
    recorded = set()
    rule_doc = yaml.safe_load((DEPLOY / "alerts" / "prometheusrule.yaml").read_text())
    for g in rule_doc["spec"]["groups"]:
        for r in g["rules"]:
            if "record" in r:
                recorded.add(r["record"])
            if "expr" in r:
                for m in METRIC_RE.findall(r["expr"]):
                    base = next((m[: -len(s)] for s in SUFFIXES if m.endswith(s)), m)
                    if m not in METRICS and base not in METRICS:
                        print(f"FAIL prometheusrule.yaml {r.get('alert') or r.get('record')}: unknown metric {m}")
                        return 1

    failures = 0
    rules = []
    sources = {}
    queries = list(grafana_exprs()) + list(analysis_exprs())
    for i, (where, expr) in enumerate(queries):
        for m in METRIC_RE.findall(expr):
            base = next((m[: -len(s)] for s in SUFFIXES if m.endswith(s)), m)
            if m not in METRICS and base not in METRICS:
                print(f"FAIL {where}: unknown metric {m}")
                failures += 1
        for r in RECORDED_RE.findall(expr):
            if r not in recorded:
                print(f"FAIL {where}: recording rule {r} is not defined in deploy/alerts")
                failures += 1
        record = f"check:query:{i}"
        sources[record] = where
        rules.append({"record": record, "expr": substitute(expr)})

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queries.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
        res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            out = res.stdout + res.stderr
            for record, where in sources.items():
                out = out.replace(record + ":", f"{record} ({where}):")
            print(out)
            failures += 1
    print(f"queries: {len(queries)} dashboard and analysis queries checked, {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
