"""The house plan of DESIGN.md holds: subpackages in data-flow order, no import circles, no import from a lower
stage up to a higher one, lora_search imports at module top, no module over 300 lines, no module named like the
standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "lora_search"
# Lowest first: a module may import its own subpackage and the ones before it, never one after it (DESIGN.md).
ORDER = ("core", "config", "data", "models", "train", "scale", "checks", "search", "promote", "report", "commands")
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _targets(mods: dict[str, Path], name: str, node) -> list[str]:
    """The lora_search modules one import statement reaches (a package's names resolve to its modules)."""
    if isinstance(node, ast.Import):
        found = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = name.split(".") if mods[name].name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
        found = [base] + [f"{base}.{a.name}" for a in node.names]
    return [m for m in found if m in mods and m != name]


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module -> the modules it imports; and the lora_search imports made inside functions (module, target, line)."""
    mods, edges, deferred = _modules(), {}, []
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
        edges[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [t for t in _targets(mods, name, node) if not name.startswith(t + ".")]
                edges[name].update(targets)
                if targets and id(node) not in top:
                    deferred.append((name, targets[0], node.lineno))
    return edges, deferred


def stage(module: str) -> int:
    """The position of a module's subpackage in ORDER (lora_search itself and __main__ sit above all)."""
    parts = module.split(".")
    return ORDER.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else len(ORDER)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_every_module_sits_in_a_named_stage():
    loose = [m for m in _modules() if m.count(".") == 1 and m.split(".")[1] not in ORDER + ("__main__",)]
    assert loose == [], f"modules outside the stage subpackages {ORDER}: {loose}"


def test_no_import_circles():
    assert circles(graph()[0]) == []


def test_no_import_runs_up_the_data_flow():
    edges, _ = graph()
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts
                    if m.count(".") >= 2 and stage(t) > stage(m))
    assert upward == [], "imports from a lower stage up to a higher one:\n" + "\n".join(upward)


def test_lora_search_imports_sit_at_module_top():
    """Except in lora_search/__main__.py, on purpose: the command line loads only the command it runs (`dashboard`
    and `compare` never import torch, and a bad override costs no model library import)."""
    _, deferred = graph()
    deferred = [d for d in deferred if d[0] != "lora_search.__main__"]
    assert deferred == [], "lora_search imports inside functions: " + ", ".join(
        f"{m}:{line} -> {t}" for m, t, line in deferred)


# Heavy libraries a module may import inside the function that needs them (DESIGN.md, rules of the house): bad input,
# `dashboard` and `compare` answer without loading them. grpc is an optional extra.
DEFERRABLE = {"torch", "transformers", "trl", "peft", "datasets", "wandb", "matplotlib", "bitsandbytes", "grpc",
              "tokenizers", "accelerate"}


def test_only_heavy_libraries_are_imported_inside_functions():
    light = []
    for name, f in _modules().items():
        if name == "lora_search.__main__":
            continue
        tree = ast.parse(f.read_text())
        top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if (mod or "").split(".")[0] not in DEFERRABLE | {"lora_search"}:
                    light.append(f"{name}:{node.lineno} {mod}")
    assert light == [], "imports inside functions of libraries that are not heavy: " + ", ".join(light)


def test_no_module_over_the_line_limit():
    over = {m: n for m, f in _modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert over == {}, f"modules over {MAX_LINES} lines: {over}"


def test_no_module_shadows_the_standard_library():
    shadows = [m for m in _modules() if m.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    assert shadows == []


def test_the_checker_sees_a_planted_circle_and_an_upward_import():
    edges = {"lora_search.core.a": {"lora_search.search.b"}, "lora_search.search.b": {"lora_search.core.a"}}
    assert circles(edges) == [["lora_search.core.a", "lora_search.search.b"]]
    assert stage("lora_search.search.b") > stage("lora_search.core.a")


@pytest.mark.parametrize("package", ORDER)
def test_each_stage_says_what_it_holds(package):
    init = PKG / package / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring naming its job"
