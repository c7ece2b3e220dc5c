"""A command owns the W&B service it logs through, so it returns only once everything it logged is written: one
started from a process that has a service (pytest after any tracked test, a notebook, a W&B agent) does not join it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import wandb

from lora_search.train import tracking

CHILD = """
import sys
from lora_search.config.compose import load_config
from lora_search.train import tracking
cfg = load_config(["model=tiny_llama", "tracking=wandb", "tracking.mode=offline"])
tracking.finish(tracking.start(cfg, sys.argv[1], "child", "test"), {"x": 1.0})
"""


def _core_log(folder: Path) -> Path:
    [link] = folder.glob("wandb/offline-run-*/logs/debug-core.log")  # a link to the service's own log
    return link.resolve()


def _snapshot(folder: Path) -> list:
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))


def test_a_command_under_a_process_with_a_wandb_service_starts_and_waits_for_its_own(make_cfg, tmp_path):
    parent = make_cfg("tracking.mode=offline", tracking="wandb")
    tracking.finish(tracking.start(parent, tmp_path / "parent", "parent", "test"))
    inherited = os.environ.get(wandb.env.SERVICE)
    assert inherited and inherited.split("-")[1] == str(os.getpid())  # what every child of this process inherits

    out = tmp_path / "child"
    subprocess.run([sys.executable, "-c", CHILD, str(out)], env=dict(os.environ), check=True, timeout=300,
                   cwd=Path(__file__).resolve().parents[2])
    child_log = _core_log(out)
    assert child_log != _core_log(tmp_path / "parent")  # its own service, not this process's
    assert child_log.read_text().rstrip().endswith('"msg":"server: all connections closed"}')  # done before it returned
    before = _snapshot(out)
    time.sleep(3)
    assert _snapshot(out) == before  # nothing is still writing into its results
    assert os.environ.get(wandb.env.SERVICE) == inherited  # this process keeps its own service
