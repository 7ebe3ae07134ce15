#!/usr/bin/env python3
"""The Kustomize overlays and the Helm chart must not drift: compares the two
renders object by object.

    compare_renders.py OUT

For every OUT/twins/<set>.yaml (the chart rendered by helm_chart.py with a
values set, first line `# twin: <render>`), OUT/<render>.yaml (what
check-deploy.sh rendered with `kubectl kustomize`) must hold the same objects
(kind, namespace, name) with the same content. Only these differences are
allowed, each because it is what the tool does, not what the deployment is:

  - bookkeeping labels: app.kubernetes.io/instance, version, part-of,
    managed-by and helm.sh/chart (anywhere, selectors included); a chart
    object may carry app.kubernetes.io/name or component where its Kustomize
    twin carries none;
  - annotations checksum/* (the chart rolls pods on a config change) and
    helm.sh/* (e.g. resource-policy: keep on the SQLite claim);
  - ConfigMap names: kustomize's generators append a content hash
    (secrets-broker-config-6m577t2h96), the chart does not;
  - image tags and digests (containers, inject.toml's sidecar.image): the
    overlays are environments that promotion pins by digest, the chart's
    default is its appVersion;
  - order of lists whose items all have a name (containers, volumes, env…);
  - broker.toml / inject.toml and the dashboards' JSON are compared parsed,
    not as text.
Exit 1 with one line per difference (where, the Kustomize value, the chart's).
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

BOOKKEEPING = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
OPTIONAL_IN_KUSTOMIZE = ("app.kubernetes.io/name", "app.kubernetes.io/component")
IMAGE_RE = re.compile(r"^(?P<repo>[^@]+?)(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?(@sha256:[0-9a-f]{64})?$")


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


def key(doc):
    md = doc.get("metadata") or {}
    group = doc.get("apiVersion", "").rpartition("/")[0] or "core"
    return f"{doc.get('kind')}.{group}/{md.get('namespace', '-')}/{md.get('name')}"


def strip_image(ref):
    m = IMAGE_RE.match(ref)
    return m.group("repo") if m else ref


def normalize(value, renames, parent_key=None):
    """Drops bookkeeping labels, parses config files, strips image versions,
    applies ConfigMap renames and sorts named lists, recursively."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in BOOKKEEPING:
                continue
            out[k] = normalize(v, renames, k)
        return out
    if isinstance(value, list):
        items = [normalize(v, renames, parent_key) for v in value]
        names = [i.get("name") for i in items if isinstance(i, dict)]
        if items and len(names) == len(items) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            items.sort(key=lambda i: i["name"])
        return items
    if isinstance(value, str):
        if parent_key == "image":
            return strip_image(value)
        return renames.get(value, value)
    return value


def parse_data(doc):
    if doc.get("kind") != "ConfigMap":
        return
    for k, v in (doc.get("data") or {}).items():
        if k.endswith(".toml"):
            data = tomllib.loads(v)
            sidecar = data.get("sidecar")
            if isinstance(sidecar, dict) and isinstance(sidecar.get("image"), str):
                sidecar["image"] = strip_image(sidecar["image"])
            doc["data"][k] = data
        elif k.endswith(".json"):
            doc["data"][k] = json.loads(v)


def clean_metadata(md):
    ann = {k: v for k, v in (md.get("annotations") or {}).items()
           if not (k.startswith("checksum/") or k.startswith("helm.sh/"))}
    if ann:
        md["annotations"] = ann
    else:
        md.pop("annotations", None)
    if not md.get("labels"):
        md.pop("labels", None)


def label_maps(doc):
    """The metadata of the object and of its pod template."""
    yield doc.setdefault("metadata", {})
    tpl = (doc.get("spec") or {}).get("template")
    if isinstance(tpl, dict) and isinstance(tpl.get("metadata"), dict):
        yield tpl["metadata"]


def align_labels(kdoc, hdoc):
    for kmd, hmd in zip(label_maps(kdoc), label_maps(hdoc)):
        klabels = kmd.get("labels") or {}
        hlabels = hmd.get("labels") or {}
        for k in OPTIONAL_IN_KUSTOMIZE:
            if k not in klabels:
                hlabels.pop(k, None)
        for md in (kmd, hmd):
            clean_metadata(md)


def diff(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{p}: only in the chart: {short(b[k])}")
            elif k not in b:
                out.append(f"{p}: only in Kustomize: {short(a[k])}")
            else:
                diff(a[k], b[k], p, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: Kustomize has {len(a)} items, the chart {len(b)}: {short(a)} vs {short(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            name = x.get("name") if isinstance(x, dict) and isinstance(y, dict) and x.get("name") == y.get("name") else None
            diff(x, y, f"{path}[{name if name else i}]", out)
    elif a != b:
        out.append(f"{path}: Kustomize {short(a)}, chart {short(b)}")


def short(v):
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 160 else s[:157] + "..."


def compare(kfile, hfile):
    kdocs, hdocs = load(kfile), load(hfile)
    chart_cms = {d["metadata"]["name"] for d in hdocs if d.get("kind") == "ConfigMap"}
    renames = {}
    for d in kdocs:
        name = d["metadata"]["name"]
        m = re.fullmatch(r"(.+)-[a-z0-9]{10}", name)
        if d.get("kind") == "ConfigMap" and m and name not in chart_cms and m.group(1) in chart_cms:
            renames[name] = m.group(1)
    for d in kdocs + hdocs:
        parse_data(d)
    kmap = {key(d): d for d in (normalize(d, renames) for d in kdocs)}
    hmap = {key(d): d for d in (normalize(d, {}) for d in hdocs)}
    problems = []
    for k in sorted(set(kmap) - set(hmap)):
        problems.append(f"{k}: only in Kustomize")
    for k in sorted(set(hmap) - set(kmap)):
        problems.append(f"{k}: only in the chart")
    same = 0
    for k in sorted(set(kmap) & set(hmap)):
        kd, hd = kmap[k], hmap[k]
        align_labels(kd, hd)
        found = []
        diff(kd, hd, "", found)
        problems += [f"{k}: {f}" for f in found]
        same += not found
    return problems, same, len(set(kmap) | set(hmap)), renames


def main(argv):
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    twins = sorted((out / "twins").glob("*.yaml"))
    if not twins:
        print(f"FAIL no chart renders in {out / 'twins'} (helm_chart.py render)")
        return 1
    failed = 0
    for hfile in twins:
        first = hfile.read_text().split("\n", 1)[0]
        twin = first.removeprefix("# twin: ").strip()
        kfile = out / f"{twin}.yaml"
        if not first.startswith("# twin: ") or not kfile.exists():
            print(f"FAIL {hfile.name}: no Kustomize render {kfile.name} to compare with")
            failed += 1
            continue
        problems, same, total, renames = compare(kfile, hfile)
        label = f"chart ({hfile.stem}) vs kubectl kustomize ({twin})"
        if problems:
            failed += 1
            print(f"FAIL {label}: {len(problems)} difference(s):")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"  {label:<70} {same}/{total} objects equal")
    print(f"drift: {len(twins)} chart renders compared with their Kustomize twins, {failed} differ"
          + ("" if failed else " (allowed: bookkeeping labels, checksum/helm.sh annotations, ConfigMap hash suffixes, image tags/digests)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
