"""CUDA paths: device placement, bf16 by default, nf4 QLoRA on the GPU. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from lora_search.commands import train_stage
from lora_search.core import hardware
from lora_search.models import loaders
from lora_search.train.run import train_adapter

pytestmark = pytest.mark.gpu


def test_auto_precision_and_dtype_follow_the_gpu():
    assert hardware.device().type == "cuda"
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert hardware.precision("auto") == expected
    assert hardware.model_dtype("auto") in (torch.bfloat16, torch.float16)


def test_local_rank_picks_the_worker_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    assert hardware.device().index == torch.cuda.device_count() - 1


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_training_on_gpu_keeps_the_base_and_learns(make_cfg, tiny_overrides, tmp_path, quant):
    cfg = make_cfg(*tiny_overrides, f"quant={quant}", "model.dtype=auto")
    worker = train_stage.start_worker(cfg)
    assert next(worker.base.model.parameters()).device.type == "cuda"
    before = loaders.checksum(worker.base.model)
    metrics = train_adapter(worker, cfg, tmp_path / "run")
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert loaders.checksum(worker.base.model) == before
    assert metrics["peak_memory_mb"] > 0


def test_throughput_benchmark_on_the_gpu_reports_mfu_for_bf16_and_nf4(tmp_path, tiny_cache):
    """benchmarks/throughput.py's GPU arms on the tiny model: every arm trains the same tokens, MFU is known."""
    import json

    from benchmarks import throughput

    out = tmp_path / "throughput.json"
    throughput.main(["--quick", "--out", str(out), "--cache-dir", tiny_cache])
    rec = json.loads(out.read_text())
    arms = rec["arms"]
    assert rec["gpu"] and set(arms) == set(throughput.GPU_ARMS)
    assert all("error" not in a for a in arms.values()), {k: a.get("error") for k, a in arms.items()}
    assert len({a["tokens"] for a in arms.values()}) == 1
    assert arms["lora_search_nf4"]["quant"] == "nf4" and arms["trl_nf4"]["quant"] == "nf4"
    if throughput.peak_flops(torch.cuda.get_device_name()):
        assert all(0 < a["mfu"] < 1 for a in arms.values())
    assert {"lora_search_vs_trl", "lora_search_nf4_vs_trl_nf4"} <= set(rec["ratios"])


@pytest.mark.parametrize("quant, batch", [("none", 4), ("none", 16), ("nf4", 8)])
def test_the_memory_estimate_is_within_10_percent_of_cuda_max_allocated(make_cfg, tiny_overrides, tmp_path, quant,
                                                                        batch):
    """memory.estimate against what a run records on CUDA (torch.cuda.max_memory_allocated), for a wider tiny model
    (activations and weights well above the allocator's granularity)."""
    from lora_search.models import memory

    cfg = make_cfg(*tiny_overrides, f"quant={quant}", "model.dtype=auto", f"trainer.batch_size={batch}",
                   "model.tiny.hidden_size=1024", "model.tiny.intermediate_size=4096", "model.tiny.num_hidden_layers=4",
                   "trainer.max_length=256", "trainer.exact_match_items=0", "trainer.eval_every=0")
    worker = train_stage.start_worker(cfg)
    metrics = train_adapter(worker, cfg, tmp_path / "run", with_baseline=False, save=False)
    est = memory.estimate(cfg, loaders.architecture(cfg.model, cfg.cache_dir), device="cuda")
    assert abs(est.total_mb - metrics["peak_memory_mb"]) <= 0.10 * metrics["peak_memory_mb"], est.describe()
