#!/usr/bin/env python3
"""Pins an image in a kustomization.yaml's `images:` list, keeping comments.

    set-image.py KUSTOMIZATION NAME NEW_NAME TAG DIGEST

Rewrites the entry `- name: NAME` to newName NEW_NAME, newTag TAG and
digest DIGEST (kustomize then renders NEW_NAME:TAG@DIGEST... as NEW_NAME@DIGEST
with the tag kept for people). Used by the release workflow's promotion.
"""

import re
import sys


def main():
    path, name, new_name, tag, digest = sys.argv[1:6]
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        sys.exit(f"not a sha256 digest: {digest!r}")
    lines = open(path, encoding="utf-8").read().split("\n")
    try:
        start = lines.index("images:")
    except ValueError:
        sys.exit(f"{path}: no top-level images: list")
    out = lines[: start + 1]
    i = start + 1
    found = False
    while i < len(lines) and (lines[i].startswith(" ") or lines[i] == ""):
        line = lines[i]
        m = re.match(r"^(\s*)- name: (\S+)\s*$", line)
        if m and m.group(2) == name:
            indent = m.group(1) + "  "
            out.append(line)
            i += 1
            # drop the entry's old newName/newTag/digest lines
            while i < len(lines) and re.match(rf"^{indent}(newName|newTag|digest):", lines[i]):
                i += 1
            out += [f"{indent}newName: {new_name}", f"{indent}newTag: {tag}", f"{indent}digest: {digest}"]
            found = True
            continue
        out.append(line)
        i += 1
    out += lines[i:]
    if not found:
        sys.exit(f"{path}: no image named {name} under images:")
    open(path, "w", encoding="utf-8").write("\n".join(out))
    print(f"{path}: {name} -> {new_name}:{tag}@{digest}")


if __name__ == "__main__":
    main()
