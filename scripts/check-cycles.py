#!/usr/bin/env python3
"""Fails when the source files of a crate import each other in a circle.

Reads every `.rs` file under each crate's `src/` (test modules left out:
everything from a top-level `#[cfg(test)]` on), takes the paths it names
(`crate::a::b`, `super::x`, `self::y`, in `use` lines and in code) and
resolves each to the file that defines that module. A `pub use` line is a
facade, not a dependency, and is left out. Prints every circle (a strongly
connected set of two or more files) with the names each file takes from the
next, and exits 1 if there is one.

    python3 scripts/check-cycles.py broker/src sidecar/src
"""

import os
import re
import sys

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP = re.compile(r"\buse\s+(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\}", re.S)


def module_files(src):
    """Maps a module path (tuple of names) to its file."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            full = os.path.join(root, f)
            rel = os.path.relpath(full, src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            if rel and rel[0] == "bin":
                continue  # binaries are crates of their own
            mods[tuple(rel)] = full
    return mods


def code_of(path):
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    cut = re.search(r"^#\[cfg\(test\)\]", text, re.M)
    if cut:
        text = text[: cut.start()]
    # Comments and strings name paths that are not imports.
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("pub use "))


def resolve(mods, here, base, names):
    """The file a path names: the longest module prefix of it."""
    if base == "crate":
        start = ()
    elif base == "self":
        start = here
    else:  # super
        start = here[:-1]
    parts = start + tuple(names)
    for n in range(len(parts), -1, -1):
        if parts[:n] in mods:
            return mods[parts[:n]], parts[n:n + 1]
    return None, ()


def graph(src):
    mods = module_files(src)
    by_file = {f: m for m, f in mods.items()}
    edges = {}
    for f, here in by_file.items():
        # The module a file is: `foo/mod.rs` is `foo`, `foo/bar.rs` is
        # `foo::bar`; `super` in `foo/bar.rs` is `foo`.
        code = code_of(f)
        found = []
        for base, group_prefix, inner in USE_GROUP.findall(code):
            prefix = [p for p in group_prefix.split("::") if p]
            for item in re.split(r"[,\s]+", re.sub(r"\{[^}]*\}", "", inner)):
                item = item.strip()
                if item and item not in ("self", "*"):
                    found.append((base, prefix + item.split("::")))
        for base, rest in PATH.findall(code):
            found.append((base, [p for p in rest.split("::") if p]))
        for base, names in found:
            target, name = resolve(mods, here, base, names)
            if target and target != f:
                edges.setdefault(f, {}).setdefault(target, set()).update(name)
    return by_file, edges


def circles(nodes, edges):
    """Tarjan's strongly connected components of two or more files."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main(srcs):
    found = 0
    for src in srcs:
        nodes, edges = graph(src)
        for comp in circles(nodes, edges):
            found += 1
            print(f"circle of {len(comp)} files in {src}:")
            for a in comp:
                for b in comp:
                    if b in edges.get(a, {}):
                        names = ", ".join(sorted(edges[a][b])) or "(the module)"
                        print(f"  {a} -> {b}: {names}")
    if found:
        print(f"check-cycles: {found} circle(s); make the imports run one way")
        return 1
    print(f"check-cycles: no circle in {' '.join(srcs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["broker/src", "sidecar/src"]))
