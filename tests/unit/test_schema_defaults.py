"""The schema's defaults agree with what ships, and every config key is read by the code (no dead keys)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import yaml

from lora_search.config import schema

PACKAGE = Path(schema.__file__).resolve().parents[1]
LABELS = {"name"}  # every group file's own name, recorded with the resolved config: a label, not a setting


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{prefix}{f.name}.")


def _names_the_code_reads() -> set[str]:
    """Attribute names and string constants of every module but the schema (`cfg.trainer.seed`, `"trainer.seed"`)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "schema.py" and path.parent.name == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
                names.update(node.value.replace("=", ".").split("."))  # a key, not a message or a docstring
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
    return names


def test_n_trials_default_is_the_shipped_sweeps():
    shipped = yaml.safe_load((PACKAGE / "sweeps" / "rank_lr.yaml").read_text())
    assert schema.SweepConfig().n_trials == shipped["n_trials"] == 12


def test_every_config_key_is_read_by_the_code():
    read = _names_the_code_reads()
    unread = [key for key, name in _fields(schema.RunConfig) if name not in LABELS and name not in read]
    assert unread == []


def test_every_key_in_the_config_groups_is_a_schema_field():
    groups = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in schema.GROUPS.items()}
    stray = []
    for path in (PACKAGE / "conf").glob("*/*.yaml"):
        if path.parent.name in groups:
            stray += [f"{path.parent.name}/{path.name}: {key}" for key in yaml.safe_load(path.read_text()) or {}
                      if key not in groups[path.parent.name]]
    assert stray == []
