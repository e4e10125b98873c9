"""The package's shape, kept by a test (issue 12): no import cycle (function-local imports counted), imports
only point down the layers of docs/architecture.md, no format named outside `ckptctl/formats/`, no module
over 450 lines. A new module must be given a layer here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ckptctl"

# Lowest first. A module may import its own layer and the ones below, never one above. Prefixes; the longest
# that matches a module gives its layer (`ckptctl.reshard.plan` is the planner, below the rest of reshard).
LAYERS = [
    # pure: no storage library, no format, no process; `output` is the sink every layer may print through
    ("core", ("ckptctl.errors", "ckptctl.box", "ckptctl.layout", "ckptctl.pipeline", "ckptctl.core",
              "ckptctl.output")),
    # what a model is: families and rules, the pure planner, format-free optimizer state
    ("models", ("ckptctl.models", "ckptctl.reshard.plan", "ckptctl.reshard.synth", "ckptctl.plan_config",
                "ckptctl.optstate")),
    # bytes and processes: the Zarr pivot, safe pickling, commits, streaming, communication, paths and locks
    ("storage", ("ckptctl.storage", "ckptctl.store", "ckptctl.reshard.comm", "ckptctl.reshard.stream",
                 "ckptctl.reshard.resume", "ckptctl.paths", "ckptctl.guard")),
    # only here may a format be named
    ("formats", ("ckptctl.formats",)),
    # the worker phases (source, target), the launcher, replicas; verify's reference gather
    ("phases", ("ckptctl.reshard", "ckptctl.verify_gather")),
    ("commands", ("ckptctl.convert", "ckptctl.verify", "ckptctl.verify_optim", "ckptctl.verify_parallel", "ckptctl.verify_store",
                  "ckptctl.verify_report", "ckptctl.verify_locate_optim", "ckptctl.optim_ranks", "ckptctl.example", "ckptctl.matrix", "ckptctl.hf",
                  "ckptctl.inspect_cmd", "ckptctl.dryrun", "ckptctl.next_flags", "ckptctl.notes",
                  "ckptctl.convert_summary", "ckptctl.digest", "ckptctl.digest_record", "ckptctl.digest_cmd", "ckptctl.plan_cmd", "ckptctl.plan_project", "ckptctl.safety", "ckptctl.cli",
                  "ckptctl.cli_style", "ckptctl.__main__")),
]
ROOT = "ckptctl"   # the package itself (its __init__ holds no code): below everything, by exact name only


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its body."""
    graph = {}
    for m, p in mods.items():
        base = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
                names = [f"{mod}.{a.name}" for a in node.names] + [mod]
            else:
                continue
            for n in names:
                parts = n.split(".")
                for i in range(len(parts), 0, -1):       # the longest prefix that is a module
                    t = ".".join(parts[:i])
                    if t in mods:
                        if t != m and not m.startswith(t + "."):
                            found.add(t)
                        break
        graph[m] = found
    return graph


def layer_of(m: str) -> int:
    if m == ROOT:
        return 0
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if m == pre or m.startswith(pre + "."):
                if best is None or len(pre) > best[1]:
                    best = (i, len(pre))
    if best is None:
        raise AssertionError(f"{m} has no layer: add it to LAYERS in tests/test_architecture.py")
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


@pytest.fixture(scope="module")
def graph():
    return imports(modules())


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_imports_point_down(graph):
    up = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
          for m, ts in sorted(graph.items()) for t in sorted(ts) if layer_of(t) > layer_of(m)]
    assert up == []


def test_no_format_named_outside_formats():
    import re
    pat = re.compile(r"""==\s*['"](torch_dist|legacy|hf)['"]|['"](torch_dist|legacy|hf)['"]\s*==""")
    hits = [f"{p.relative_to(PKG.parent)}:{i}" for p in PKG.rglob("*.py") if "formats" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)]
    assert hits == []


def test_modules_read_in_one_sitting():
    big = [f"{p.relative_to(PKG.parent)}: {n}" for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 450]
    assert big == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """Negative control: the checks above fail on a package that breaks them (a real tree, parsed the same way:
    a function-local import closing a cycle, a format importing a command, a format name compared)."""
    import re
    pkg = tmp_path / "ckptctl"
    for rel, text in {
        "__init__.py": "",
        "box.py": "def f():\n    from ckptctl.layout import Layout\n",          # function-local: still an edge
        "layout.py": "from ckptctl import box\n",
        "formats/__init__.py": "",
        "formats/x.py": "def g():\n    from ckptctl.convert import convert\n",
        "convert.py": "def h(fmt):\n    return fmt == 'torch_dist'\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    global PKG
    real, PKG = PKG, pkg
    try:
        g = imports(modules())
    finally:
        PKG = real
    assert cycles(g) == [["ckptctl.box", "ckptctl.layout"]]
    assert "ckptctl.convert" in g["ckptctl.formats.x"] and layer_of("ckptctl.formats.x") < layer_of("ckptctl.convert")
    pat = re.compile(r"""==\s*['"](torch_dist|legacy|hf)['"]|['"](torch_dist|legacy|hf)['"]\s*==""")
    assert pat.search((pkg / "convert.py").read_text())
    try:
        layer_of("ckptctl.brand_new_module")
    except AssertionError:
        pass
    else:
        raise AssertionError("a module outside LAYERS must be refused")
