"""Shared fixtures: composed configs, a tiny-model worker, and the gpu marker's skip."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache folder for the tiny model, shared by the session."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def make_cfg(tmp_path, tiny_cache):
    """Compose a config for the tiny model with extra overrides, results under tmp_path."""
    from lora_search.compose import load_config

    def make(*overrides, model="tiny_llama"):
        base = [f"model={model}", f"results_dir={tmp_path / 'results'}"]
        if model == "tiny_llama":
            base.append(f"cache_dir={tiny_cache}")
        return load_config(base + list(overrides))

    return make


TINY_FAST = [
    "data.train_per_task=24",
    "data.eval_per_task=6",
    "trainer.max_steps=12",
    "trainer.batch_size=4",
    "trainer.eval_every=6",
    "trainer.exact_match_items=8",
    "trainer.max_new_tokens=8",
    "trainer.learning_rate=3e-3",
]


@pytest.fixture
def tiny_overrides():
    """Overrides that make a tiny-model run take a second or two."""
    return list(TINY_FAST)
