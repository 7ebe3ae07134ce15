#!/usr/bin/env python3
"""Asserts the hardening rules of deploy/ on rendered Kubernetes manifests.

    check_hardening.py FILE...      check every workload in the files (YAML,
                                    several documents each); exit 1 and one
                                    line per problem when any rule is broken
    check_hardening.py --self-test  prove the rules catch what they should:
                                    fixtures/bad-workloads.yaml must fail
                                    with every problem listed in
                                    fixtures/bad-workloads.expected, and
                                    fixtures/good-workload.yaml must pass

Rules, for every container and init container of every workload (Pod,
Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Argo Rollout):
  - runAsNonRoot true, runAsUser and runAsGroup fixed non-zero integers
    (container level, or inherited from the pod's securityContext)
  - readOnlyRootFilesystem true and allowPrivilegeEscalation false (container)
  - capabilities.drop contains ALL and nothing is added; not privileged
  - seccompProfile RuntimeDefault (container, or the pod's)
  - resources: requests and limits for both cpu and memory
  - the image is a full reference with a tag or digest (never :latest)
  - probes on long-running containers: liveness and readiness for the
    containers of Deployments, StatefulSets, DaemonSets, ReplicaSets,
    Rollouts and restartable Pods; liveness, readiness and startup for native
    sidecars (init containers with restartPolicy: Always) anywhere
and for every pod: automountServiceAccountToken false, no host namespaces,
no hostPath volumes, and a sizeLimit on every memory-backed emptyDir.
A Rollout with a workloadRef must point at a Deployment among the inputs.
"""

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Rollout"}
WORKLOADS = LONG_RUNNING | {"Pod", "Job", "CronJob"}


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


def pod_spec(doc):
    """The pod spec of a workload, or None (e.g. a Rollout with workloadRef)."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    return (spec.get("template") or {}).get("spec")


def name_of(doc):
    md = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{md.get('namespace', '-')}/{md.get('name', '?')}"


def effective(container, pod, key):
    csc = container.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    if key in csc and csc[key] is not None:
        return csc[key]
    return psc.get(key)


def check_container(c, pod, *, init, long_running_pod):
    problems = []
    csc = c.get("securityContext") or {}
    image = c.get("image") or ""
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
        problems.append(f"image {image!r} has no tag or digest (or is :latest)")
    if "/" not in image:
        problems.append(f"image {image!r} names no registry or repository (an unrendered placeholder?)")
    if effective(c, pod, "runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    for key in ("runAsUser", "runAsGroup"):
        v = effective(c, pod, key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"{key} is not a fixed non-zero integer (got {v!r})")
    if csc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if csc.get("privileged") is True:
        problems.append("privileged is true")
    caps = csc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        problems.append("capabilities.drop does not contain ALL")
    if caps.get("add"):
        problems.append(f"capabilities.add is not empty ({caps.get('add')})")
    seccomp = effective(c, pod, "seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problems.append(f"seccompProfile is not RuntimeDefault (got {seccomp.get('type')!r})")
    res = c.get("resources") or {}
    for section in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if not (res.get(section) or {}).get(r):
                problems.append(f"resources.{section}.{r} is not set")
    native_sidecar = init and c.get("restartPolicy") == "Always"
    if native_sidecar:
        needed = ("livenessProbe", "readinessProbe", "startupProbe")
    elif long_running_pod and not init:
        needed = ("livenessProbe", "readinessProbe")
    else:
        needed = ()
    for p in needed:
        if not c.get(p):
            what = "native sidecar" if native_sidecar else "long-running container"
            problems.append(f"{p} is missing ({what})")
    return problems


def check_pod(doc, pod):
    problems = []
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("pod: automountServiceAccountToken is not false")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key) is True:
            problems.append(f"pod: {key} is true")
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            problems.append(f"pod: volume {v.get('name')} is a hostPath")
        ed = v.get("emptyDir")
        if isinstance(ed, dict) and ed.get("medium") == "Memory" and not ed.get("sizeLimit"):
            problems.append(f"pod: memory-backed emptyDir {v.get('name')} has no sizeLimit")
    kind = doc.get("kind")
    long_running = kind in LONG_RUNNING or (
        kind == "Pod" and pod.get("restartPolicy", "Always") == "Always")
    for init, key in ((True, "initContainers"), (False, "containers")):
        for c in pod.get(key) or []:
            for p in check_container(c, pod, init=init, long_running_pod=long_running):
                problems.append(f"{'initContainer' if init else 'container'} {c.get('name')}: {p}")
    if not pod.get("containers"):
        problems.append("pod: no containers")
    return problems


def check_docs(docs):
    """Returns (problems, workloads, containers) for a list of (file, doc)."""
    problems = []
    workloads = containers = 0
    deployments = {(d.get("metadata", {}).get("namespace"), d.get("metadata", {}).get("name"))
                   for _, d in docs if d.get("kind") == "Deployment"}
    for path, doc in docs:
        if doc.get("kind") not in WORKLOADS:
            continue
        pod = pod_spec(doc)
        if pod is None:
            ref = (doc.get("spec") or {}).get("workloadRef")
            if doc.get("kind") == "Rollout" and ref:
                ns = doc.get("metadata", {}).get("namespace")
                if ref.get("kind") != "Deployment" or (ns, ref.get("name")) not in deployments:
                    problems.append(f"{path}: {name_of(doc)}: workloadRef {ref} is not a Deployment in the inputs")
                continue
            problems.append(f"{path}: {name_of(doc)}: no pod template")
            continue
        workloads += 1
        containers += len(pod.get("containers") or []) + len(pod.get("initContainers") or [])
        for p in check_pod(doc, pod):
            problems.append(f"{path}: {name_of(doc)}: {p}")
    return problems, workloads, containers


def run(paths):
    docs = []
    for p in paths:
        docs.extend((p, d) for d in load_docs(p))
    return check_docs(docs)


def self_test():
    bad = HERE / "fixtures" / "bad-workloads.yaml"
    expected = [ln.strip() for ln in (HERE / "fixtures" / "bad-workloads.expected").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    good = HERE / "fixtures" / "good-workload.yaml"
    failed = []
    problems, workloads, _ = run([str(bad)])
    if not problems:
        failed.append("the bad fixture passed")
    text = "\n".join(problems)
    for e in expected:
        if e not in text:
            failed.append(f"not caught: {e}")
    # Every problem found must be one the fixture was written to contain.
    for p in problems:
        if not any(e in p for e in expected):
            failed.append(f"unexpected problem (update the .expected file?): {p}")
    gp, gw, _ = run([str(good)])
    if gp or gw != 1:
        failed.append(f"the good fixture did not pass cleanly: {gp or f'{gw} workloads'}")
    if failed:
        for f in failed:
            print(f"SELF-TEST FAIL: {f}")
        return 1
    print(f"self-test ok: the bad fixture fails with {len(problems)} problems "
          f"({len(expected)} expected kinds, {workloads} workloads); the good fixture passes")
    return 0


def main(argv):
    if argv[:1] == ["--self-test"]:
        return self_test()
    if not argv:
        print(__doc__)
        return 2
    problems, workloads, containers = run(argv)
    for p in problems:
        print(f"FAIL {p}")
    if workloads == 0:
        print("FAIL no workload found in the inputs")
        return 1
    if problems:
        print(f"hardening: {len(problems)} problem(s) in {workloads} workloads")
        return 1
    print(f"hardening ok: {workloads} workloads, {containers} containers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
