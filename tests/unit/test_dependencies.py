"""pyproject.toml says what the code uses: every third-party module lora_search imports belongs to a declared
distribution, every declared dependency is imported somewhere or marked `# runtime:` (a plugin another library
loads), each has a lower bound, and a library we take a private name from has an upper bound."""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "lora_search"
PYPROJECT = ROOT / "pyproject.toml"
# Calls that import a module named by a string: importlib.import_module("x"), importlib.util.find_spec("x").
BY_NAME = ("import_module", "find_spec")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(spec: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0))


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _declared() -> dict[str, str]:
    """Distribution name -> its requirement string, core dependencies only."""
    return {_name(spec): spec for spec in _project()["dependencies"]}


def _extras() -> set[str]:
    return {_name(spec) for group, specs in _project()["optional-dependencies"].items() if group != "dev"
            for spec in specs}


def _imports() -> dict[str, list[tuple[str, int, str]]]:
    """Top-level third-party module -> (file, line, the imported dotted name) of every import of it."""
    found: dict = {}
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in BY_NAME
                  and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top and top not in sys.stdlib_module_names and top not in ("lora_search", "__future__"):
                    found.setdefault(top, []).append((str(path.relative_to(ROOT)), node.lineno, name))
    return found


@functools.lru_cache(maxsize=None)
def _packages() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # scans every installed distribution: once


def _distributions(module: str) -> set[str]:
    return {_norm(d) for d in _packages().get(module, [])}


def test_every_imported_module_is_declared():
    declared, extras = set(_declared()), _extras()
    missing = []
    for module, where in sorted(_imports().items()):
        dists = _distributions(module)
        if not dists:
            missing.append(f"{module} (not installed here, so its distribution is unknown; first at {where[0][0]})")
        elif not dists & (declared | extras):
            missing.append(f"{module} from {', '.join(sorted(dists))} (imported at {where[0][0]}:{where[0][1]})")
    assert missing == [], "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_every_declared_dependency_is_used():
    imported = {d for module in _imports() for d in _distributions(module)}
    text = PYPROJECT.read_text().splitlines()
    unused = []
    for name, spec in _declared().items():
        line = next(line for line in text if line.strip().startswith(f'"{spec}"'))
        if name not in imported and "# runtime:" not in line:
            unused.append(name)
    assert unused == [], (f"declared but never imported, and not marked `# runtime:` (a plugin another library "
                          f"loads): {unused}")


def test_every_dependency_has_a_lower_bound():
    unbounded = [spec for spec in _project()["dependencies"] if ">=" not in spec and "==" not in spec]
    assert unbounded == []


def test_a_library_we_take_a_private_name_from_has_an_upper_bound():
    private = {}
    for module, where in _imports().items():
        for file, line, name in where:
            if any(part.startswith("_") for part in name.split(".")[1:]):
                for dist in _distributions(module):
                    private.setdefault(dist, []).append(f"{name} ({file}:{line})")
    declared = _declared()
    loose = {d: uses for d, uses in private.items() if d in declared and "<" not in declared[d].split(";")[0]}
    assert loose == {}, f"private names used without an upper bound on the library: {loose}"
    assert {"optuna", "trl"} <= set(private)  # the checker sees the private imports we know of


def test_the_checker_maps_modules_to_their_distributions():
    assert _distributions("yaml") == {"pyyaml"} and _distributions("sklearn") == {"scikit-learn"}
    assert "numpy" in _imports() and "sklearn" in _imports()  # find_spec("sklearn") counts as a use
