"""The real embedded SmolLM2-135M-Instruct: GGUF -> safetensors cache, chat template, one default run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_search.config.compose import load_config
from lora_search.models import loaders

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """A fresh cache: the GGUF is converted once, then loaded from safetensors."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config([f"cache_dir={cache}"])
    folder = Path(loaders.local_copy(cfg.model, cfg.cache_dir))
    return cfg, folder


def test_gguf_is_found_through_metadata_and_cached_as_safetensors(smollm):
    cfg, folder = smollm
    gguf = loaders.embedded_gguf(cfg.model)
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50e6
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a dequantized copy, trainable
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152


def test_cached_copy_loads_without_touching_the_gguf(smollm, monkeypatch):
    cfg, folder = smollm
    monkeypatch.setattr(loaders, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    base = loaders.load_base(cfg.model, cfg.quant, cfg.cache_dir)
    assert base.source_path == str(folder)
    assert sum(p.numel() for p in base.model.parameters()) == 134_515_008
    assert "<|im_start|>" in base.tokenizer.chat_template
    assert base.tokenizer.pad_token != base.tokenizer.eos_token  # padding never looks like an answer's end
    from lora_search.train.evaluate import generate

    answers, _ = generate(base.model, base.tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                          max_new_tokens=12)
    assert "Paris" in answers[0]


def test_default_train_run_improves_the_model(tmp_path):
    """The README's main command: eval loss falls and exact match rises clearly, within budget, with no GPU, no hub
    access and no W&B key (a fresh cache: the GGUF is converted offline too)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               LORA_SEARCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "lora_search", "stage=train", "run_name=default",
                           f"results_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "cache" / "models").glob("smollm2_135m-*/model.safetensors"))  # converted here, offline
    assert list((tmp_path / "runs" / "default").glob("wandb/offline-run-*"))  # W&B offline without a key
    metrics = json.loads((tmp_path / "runs" / "default" / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["base_exact_match"] <= 0.10  # README: under 10% (2%, 1 of 48, when written)
    assert metrics["base_samples"][0]["answer"].startswith("The order of these words is:")  # the README's example
    assert metrics["steps"] == 48  # README: a default run is 48 steps
    assert metrics["exact_match"] >= metrics["base_exact_match"] + 0.30  # README: by more than 30 points (56%)
    assert metrics["trainable_params"] == 921_600  # r=8 on q,k,v,o of SmolLM2-135M


def test_a_short_dpo_run_lifts_the_embedded_preference_task(tmp_path):
    """The embedded preference task (README "Preference tuning"): the SmolLM2 base prefers the rejected answer on
    most held-out pairs; the default DPO run (trainer=dpo, its 40 steps) lifts its preference accuracy clearly."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "lora_search", "stage=train", "trainer=dpo", "data=embedded_preference",
                           "run_name=dpo", "tracking=none", f"results_dir={tmp_path}"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "dpo" / "metrics.json").read_text())
    assert metrics["method"] == "dpo" and metrics["preference_pairs"] == 100
    assert metrics["base_preference_accuracy"] <= 0.60  # the base prefers the rejected answer often
    assert metrics["preference_accuracy"] >= metrics["base_preference_accuracy"] + 0.20
    assert metrics["reward_accuracy"] > 0.5 and metrics["eval_loss"] < 0.69
