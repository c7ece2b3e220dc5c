"""Peak memory on the CPU comes from psutil, so it is measured where there is no /proc (macOS, Windows)."""

from __future__ import annotations

import builtins
import time
from types import SimpleNamespace

import torch

from lora_search.core import hardware


def test_peak_memory_without_proc_is_psutils_largest_rss(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):  # a machine without /proc
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    rss = iter([100, 300, 200] + [150] * 10_000)
    monkeypatch.setattr(hardware.psutil, "Process",
                        lambda: SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=next(rss) * 2**20)))
    with hardware.PeakMemory(interval_s=0.001) as peak:
        time.sleep(0.1)
    assert peak.peak_mb == 300


def test_peak_memory_sees_an_allocation_inside_the_block(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = hardware._rss_mb()
    with hardware.PeakMemory(interval_s=0.01) as peak:
        block = torch.ones(64, 2**20)  # 256 MB, written so its pages are resident
        time.sleep(0.05)
        del block
    assert peak.peak_mb >= before + 200


def test_machine_memory_comes_from_psutil():
    assert hardware.machine()["memory_gb"] > 0
