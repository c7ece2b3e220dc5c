"""More workers for one study: `sweep.workers=N` starts N-1 more processes on this machine, one
per GPU when there are GPUs (CUDA_VISIBLE_DEVICES), splitting the cores otherwise. Every worker
runs `stage=search` against the same storage; Optuna hands each its own trials. Workers on other
machines (or SLURM jobs via Hydra's submitit launcher) join the same way, given a shared
`sweep.storage` (PostgreSQL, or SQLite on a shared disk for a few workers).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def worker_id() -> str:
    """host:pid, recorded on every trial so a multi-worker study shows who ran what."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_env(index: int, workers: int) -> dict:
    """The environment of worker `index`: its GPU, or its share of the CPU cores."""
    env = dict(os.environ)
    gpus = _visible_gpus()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def spawn(overrides: list[str], workers: int, log_dir: Path) -> list[subprocess.Popen]:
    """Start workers 1..N-1 running the search stage with the same overrides; this process is worker 0."""
    log_dir.mkdir(parents=True, exist_ok=True)
    keep = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") in ("stage", "sweep.workers", "worker")]
    procs = []
    for index in range(1, workers):  # worker=<index>: its own sampler seed (samplers.sampler_kwargs)
        cmd = [sys.executable, "-m", "lora_search", *keep, "stage=search", "sweep.workers=1", f"worker={index}"]
        out = open(log_dir / f"worker{index}.log", "w")
        procs.append(subprocess.Popen(cmd, env=worker_env(index, workers), stdout=out, stderr=subprocess.STDOUT))
        log.info("started worker %d (pid %d), log %s", index, procs[-1].pid, out.name)
    if workers > 1 and not _visible_gpus():  # this process keeps the first GPU, or its share of cores
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return procs


def wait(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for the extra workers; warn about any that failed (their trials are already recorded)."""
    codes = []
    for index, proc in enumerate(procs, start=1):
        code = proc.wait()
        codes.append(code)
        if code != 0:
            log.warning("worker %d exited with code %d: see its log", index, code)
    return codes


def stop(procs: list[subprocess.Popen], signum: int = signal.SIGTERM, grace_s: float = 15.0) -> list[int]:
    """Stop the extra workers: send each `signum` (they record their running trial as interrupted), wait up to
    grace_s in all, then kill the ones still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + grace_s
    codes = []
    for index, proc in enumerate(procs, start=1):
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            log.warning("worker %d (pid %d) still running %.0f s after %s: killed", index, proc.pid, grace_s,
                        signal.Signals(signum).name)
            proc.kill()
            codes.append(proc.wait())
    return codes
