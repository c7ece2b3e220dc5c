"""What every run leaves behind: resolved config, metrics, status with reason, provenance.

Files are written atomically (temp file + rename), so a run that dies leaves either the old
record or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from lora_search.core import hardware, masking

redact = masking.mask  # URL passwords (postgresql://user:***@host/db) and known secret values replaced by ***


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_text(path: Path, text: str) -> None:
    """Write a file atomically, secrets masked (masking.mask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(masking.mask(text))
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (NaN and inf become strings, so the file stays valid JSON)."""
    write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict | None:
    """A JSON record, or None when absent."""
    return json.loads(path.read_text()) if path.exists() else None


def config_dict(cfg) -> dict:
    """A RunConfig as plain data with secret-looking values masked."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else OmegaConf.to_container(cfg, resolve=True)
    return masked(data)


def masked(node):
    """Plain data with secret-named keys' values and secrets inside strings replaced by ***."""
    if isinstance(node, dict):
        return {k: (masking.MASK if masking.is_secret_key(k) and v else masked(v)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [masked(v) for v in node]
    return masking.mask(node) if isinstance(node, str) else node


def write_config(path: Path, cfg, header: str = "") -> None:
    """The resolved config as YAML (after `header`'s lines as comments)."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    write_text(path, comments + OmegaConf.to_yaml(OmegaConf.create(config_dict(cfg))))


def write_status(run_dir: Path, status: str, reason: str | None = None, **extra) -> None:
    """status.json: complete | failed | running, the reason, and provenance."""
    write_json(run_dir / "status.json", {"status": status, "reason": reason, **extra,
                                         "provenance": hardware.provenance()})
