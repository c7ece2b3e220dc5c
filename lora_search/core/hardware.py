"""The machine: device and precision choices, peak memory, and the provenance of a run."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

import psutil
import torch

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "optuna", "hydra-core",
            "bitsandbytes", "wandb", "gguf", "lora_search")


def device() -> torch.device:
    """This worker's device: the GPU named by LOCAL_RANK (one worker per GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported() -> bool:
    """Whether bf16 compute is supported (and fast) on this worker's device."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def model_dtype(name: str) -> torch.dtype:
    """The weight dtype for `model.dtype` (auto: bf16 on a GPU that has it, fp16 on older GPUs, else fp32)."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if bf16_supported() else torch.float16
    return torch.float32


def precision(name: str) -> str:
    """The mixed-precision mode for `trainer.precision` (auto: bf16 where the device has it, fp16 on
    older GPUs, else fp32). On CPU, bf16 is autocast over fp32 weights."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if bf16_supported() else "fp16"
    return "bf16" if bf16_supported() else "fp32"


def release_memory() -> None:
    """Hand freed memory back: CUDA's cached blocks, and on glibc the heap pages free() keeps (after a
    trial, activations and optimizer state freed on the CPU otherwise stay in the worker's RSS)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass


def tensor_memory_mb(model: torch.nn.Module | None = None) -> float:
    """Memory held in tensors: allocated CUDA memory on a GPU, else the bytes of every live CPU tensor's storage
    (`model`'s parameters and buffers counted from it: freeze_long_lived hides them from gc.get_objects())."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    storages = {}
    frozen = [*model.parameters(), *model.buffers()] if model is not None else []
    for obj in [*frozen, *gc.get_objects()]:
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - tensor subclasses that refuse; they hold no storage of their own
            continue
    return sum(storages.values()) / 2**20


def freeze_long_lived() -> None:
    """Take every object alive now (a worker's base model, tokenizer, data, imported modules) out of the
    cyclic garbage collector's walks. Trials trigger about three full collections each (Trainer and
    accelerate free memory, release_memory); with SmolLM2 loaded each walked ~575k objects, 0.31 s.
    Only objects that exist before any trial are frozen, so a trial's adapter, optimizer and trainer are
    collected as before. Refcounting still frees frozen objects; only cycles among them would be kept."""
    gc.collect()
    gc.freeze()


def _rss_mb() -> float:
    """This process's resident memory, through psutil (Linux, macOS, Windows: no /proc needed)."""
    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """Peak memory over a block: CUDA max allocated on a GPU, sampled RSS (psutil) on the CPU."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())
        return False


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What this machine is: CPU, cores, memory, GPU."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def git_revision() -> str | None:
    """The git commit of the lora_search checkout (with +dirty), if it is one; None for an installed copy (a wheel in
    a virtual environment inside the user's own repository must not record the user's commit as ours)."""
    root = Path(__file__).resolve().parents[2]  # lora_search/core/hardware.py -> the checkout holding lora_search/
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """Package versions, git revision, machine and time: what a record needs to be reproduced."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"packages": versions, "git": git_revision(), "machine": machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
