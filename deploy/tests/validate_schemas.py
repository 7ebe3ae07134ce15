#!/usr/bin/env python3
"""Validates rendered manifests against the Kubernetes OpenAPI schemas.

    validate_schemas.py --kubernetes-version 1.30.0 [--kubernetes-version 1.37.0] FILE...

Uses kubernetes-validate (schemas bundled, offline) in strict mode: unknown
fields are errors. Custom resources have no schema there; the kinds below
are skipped by name, with the reason printed. Any other kind without a
schema is an error (a typo in apiVersion or kind).
"""

import argparse
import sys

import kubernetes_validate
import yaml

# Custom resources: their CRDs come with the operators, not with Kubernetes.
CRD_KINDS = {
    ("cert-manager.io", "Certificate"): "cert-manager CRD",
    ("cert-manager.io", "Issuer"): "cert-manager CRD",
    ("argoproj.io", "Rollout"): "Argo Rollouts CRD",
    ("argoproj.io", "AnalysisTemplate"): "Argo Rollouts CRD",
    ("argoproj.io", "Application"): "Argo CD CRD",
    ("argoproj.io", "AppProject"): "Argo CD CRD",
    ("monitoring.coreos.com", "PrometheusRule"): "Prometheus Operator CRD",
    ("monitoring.coreos.com", "PodMonitor"): "Prometheus Operator CRD",
    ("monitoring.coreos.com", "ServiceMonitor"): "Prometheus Operator CRD",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubernetes-version", action="append", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    failures = 0
    validated = 0
    skipped = {}
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
        for doc in docs:
            kind = doc.get("kind")
            group = doc.get("apiVersion", "").rpartition("/")[0]
            name = f"{kind}/{(doc.get('metadata') or {}).get('name')}"
            if (group, kind) in CRD_KINDS:
                skipped[f"{kind} ({group})"] = CRD_KINDS[(group, kind)]
                continue
            for version in args.kubernetes_version:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                    validated += 1
                except kubernetes_validate.SchemaNotFoundError:
                    print(f"FAIL {path}: {name}: no schema for {doc.get('apiVersion')} {kind} in Kubernetes {version}")
                    failures += 1
                except kubernetes_validate.ValidationError as e:
                    where = "/".join(str(p) for p in e.path)
                    print(f"FAIL {path}: {name} (Kubernetes {version}) at {where or '/'}: {e.message}")
                    failures += 1
    for kind, why in sorted(skipped.items()):
        print(f"skipped {kind}: {why}; kubernetes-validate has no schema for custom resources")
    print(f"schema validation: {validated} object-version checks passed, {failures} failed "
          f"(Kubernetes {', '.join(args.kubernetes_version)}, strict)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
