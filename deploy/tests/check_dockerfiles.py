#!/usr/bin/env python3
"""Checks what hadolint does not: the final stage of each image.

    check_dockerfiles.py deploy/images/*.Dockerfile

- multi-stage, and the build stage runs an optimised `cargo build --locked`
  (`--release`, or `--profile release-small` for the sidecar);
- the final stage starts FROM a distroless base without a shell
  (gcr.io/distroless/..., never a :debug tag), runs nothing (no RUN),
  switches to a fixed non-root numeric USER uid:gid, has an exec-form
  ENTRYPOINT and the OCI labels.
"""

import re
import sys

OCI = ("title", "description", "licenses", "source", "version", "revision", "created")


def instructions(text):
    """(INSTRUCTION, arguments) with line continuations joined."""
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        yield word.upper(), rest.strip()


def check(path):
    problems = []
    stages = []
    for ins, args in instructions(open(path, encoding="utf-8").read()):
        if ins == "FROM":
            stages.append({"from": args, "ins": []})
        elif stages:
            stages[-1]["ins"].append((ins, args))
    if len(stages) < 2:
        problems.append("not a multi-stage build")
        return problems
    build_runs = " ".join(a for s in stages[:-1] for i, a in s["ins"] if i == "RUN")
    release = r"(--release|--profile release-small)"
    if not re.search(rf"cargo build [^&]*{release}[^&]*--locked|cargo build [^&]*--locked[^&]*{release}", build_runs):
        problems.append("no `cargo build --release --locked` (or --profile release-small) in the build stage")
    final = stages[-1]
    base = final["from"].split()[0]
    if not base.startswith("gcr.io/distroless/") or ":debug" in base:
        problems.append(f"final stage base {base} is not a shell-less distroless image")
    ins = final["ins"]
    if any(i == "RUN" for i, _ in ins):
        problems.append("the final stage has RUN instructions")
    users = [a for i, a in ins if i == "USER"]
    if not users or not re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]):
        problems.append(f"final USER must be a fixed non-root uid:gid, got {users[-1] if users else None}")
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    if not entry or not entry[-1].startswith("["):
        problems.append("ENTRYPOINT must be in exec form")
    labels = " ".join(a for i, a in ins if i == "LABEL")
    for key in OCI:
        if f"org.opencontainers.image.{key}=" not in labels:
            problems.append(f"missing label org.opencontainers.image.{key}")
    return problems


def main(paths):
    failed = 0
    for p in paths:
        for problem in check(p):
            print(f"FAIL {p}: {problem}")
            failed += 1
    print(f"dockerfiles: {len(paths)} checked, {failed} problem(s)")
    return 1 if failed or not paths else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
