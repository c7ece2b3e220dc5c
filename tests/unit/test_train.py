"""Training on the tiny model: the loss falls, the adapter learns, the shared base stays bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lora_search.commands import train_stage
from lora_search.core import records
from lora_search.models import adapters, loaders
from lora_search.train.run import train_adapter


@pytest.fixture
def worker_and_cfg(make_cfg, tiny_overrides):
    cfg = make_cfg(*tiny_overrides)
    return train_stage.start_worker(cfg), cfg


def test_training_lowers_loss_and_trains_only_the_adapter(worker_and_cfg, tmp_path):
    worker, cfg = worker_and_cfg
    before = loaders.checksum(worker.base.model)
    metrics = train_adapter(worker, cfg, tmp_path / "run")

    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["steps"] == cfg.trainer.max_steps
    assert metrics["train_tokens"] > 0 and metrics["train_tokens_per_s"] > 0
    assert metrics["peak_memory_mb"] > 0 and metrics["wall_s"] > 0
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["base_exact_match"] <= 1.0

    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)  # B starts at zero: it moved
    assert sum(t.numel() for t in adapter.values()) == metrics["trainable_params"]
    assert loaders.checksum(worker.base.model) == before
    assert not any("lora" in name for name, _ in worker.base.model.named_modules())


def test_several_runs_share_one_base_and_leave_it_unchanged(worker_and_cfg, tmp_path, monkeypatch):
    worker, cfg = worker_and_cfg
    loads = []
    monkeypatch.setattr(loaders, "load_base", lambda *a, **k: loads.append(1))
    before = loaders.checksum(worker.base.model)
    results = []
    for i, (r, targets) in enumerate([(4, "qv"), (8, "all_linear"), (2, "mlp")]):
        cfg.lora.r, cfg.lora.targets = r, targets
        results.append(train_adapter(worker, cfg, tmp_path / f"run{i}", save=False))
        assert loaders.checksum(worker.base.model) == before
    assert loads == []  # reused, never reloaded
    assert "forward" not in worker.base.model.__dict__  # no trainer wrapper left on the shared base
    assert worker.base.model.config.use_cache
    assert len({m["trainable_params"] for m in results}) == 3
    assert len(worker.tokenized) == 1  # tokenized once, reused by every run
    cfg.lora.r, cfg.lora.targets = 4, "qv"
    again = train_adapter(worker, cfg, tmp_path / "again", save=False)  # the prepared copy, TRL's preparation skipped
    for key in ("eval_loss", "train_loss_first", "train_tokens", "eval_rows"):
        assert again[key] == pytest.approx(results[0][key], rel=1e-6)
    assert results[0]["base_eval_loss"] == results[2]["base_eval_loss"]  # the baseline is computed once


@pytest.mark.parametrize("how", ["a NaN loss at every step", "learning rate 1e30"])
def test_nan_loss_is_visible_not_filtered(worker_and_cfg, tmp_path, monkeypatch, how):
    """A diverged run goes through the whole train path (final eval, per-row losses, their standard error, answers,
    metrics.json) without an error, shows its NaN loss, and says it diverged."""
    from trl import SFTTrainer

    worker, cfg = worker_and_cfg
    before = loaders.checksum(worker.base.model)
    cfg.trainer.max_steps, cfg.trainer.logging_steps = 6, 1
    if how == "learning rate 1e30":
        cfg.trainer.learning_rate, cfg.trainer.max_grad_norm = 1e30, 1e30
    else:
        real = SFTTrainer.compute_loss

        def nan_loss(self, model, *args, **kwargs):
            out = real(self, model, *args, **kwargs)
            if not model.training:
                return out
            return (out[0] * math.nan, *out[1:]) if isinstance(out, tuple) else out * math.nan

        monkeypatch.setattr(SFTTrainer, "compute_loss", nan_loss)
    metrics = train_adapter(worker, cfg, tmp_path / "run")

    assert metrics["diverged"].startswith("diverged: training loss ")
    assert metrics["steps"] == 6 and not math.isfinite(metrics["train_loss_last"])  # visible, not filtered out
    if how == "a NaN loss at every step":
        assert metrics["diverged"] == "diverged: training loss nan at step 1"
        assert math.isnan(metrics["train_loss_first"])
    assert not math.isfinite(metrics["eval_loss"])
    rows = metrics["eval_row_losses"]  # the per-row path ran on the NaN rows ...
    assert len(rows) == metrics["eval_loss_rows"] > 1 and not all(math.isfinite(x) for x in rows)
    assert metrics["eval_loss_se"] is None  # ... and its standard error is no number, not an AttributeError
    records.write_json(tmp_path / "metrics.json", metrics)  # what the callers write: valid JSON, NaN as text
    assert records.read_json(tmp_path / "metrics.json")["eval_loss"] in ("nan", "inf")
    assert loaders.checksum(worker.base.model) == before


def test_a_run_that_learns_is_not_diverged(worker_and_cfg, tmp_path):
    worker, cfg = worker_and_cfg
    cfg.trainer.max_steps = 2
    assert train_adapter(worker, cfg, tmp_path / "run", save=False)["diverged"] is None


def test_nf4_qlora_trains_on_cpu(make_cfg, tiny_overrides, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(*tiny_overrides, "quant=nf4", "lora=performance")
    worker = train_stage.start_worker(cfg)
    assert worker.base.quantized
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in worker.base.model.modules())
    before = loaders.checksum(worker.base.model)
    metrics = train_adapter(worker, cfg, tmp_path / "run")
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert loaders.checksum(worker.base.model) == before


def test_int8_base_trains_on_cpu(make_cfg, tiny_overrides, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(*tiny_overrides, "quant=int8")
    worker = train_stage.start_worker(cfg)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in worker.base.model.modules())
    metrics = train_adapter(worker, cfg, tmp_path / "run", save=False)
    assert metrics["eval_loss"] < metrics["base_eval_loss"]


def test_llama2_7b_trainable_parameters_match_the_lora_guide():
    from transformers import LlamaConfig

    from lora_search.config.schema import LoraSpec, ModelConfig

    model_cfg = ModelConfig(name="llama2_7b", target_presets={"attn": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    meta = loaders.meta_model(LlamaConfig())  # LlamaConfig's defaults are the Llama-2-7B shape
    assert all(p.device.type == "meta" for p in meta.parameters())
    trainable, total = adapters.count_parameters(LoraSpec(r=8, alpha=16, targets="attn"), model_cfg, meta)
    assert (trainable, total) == (8_388_608, 6_746_804_224)


def test_target_that_matches_nothing_is_refused_before_weights_load(make_cfg, monkeypatch):
    from lora_search.core.errors import ConfigError

    monkeypatch.setattr(loaders, "load_base", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = make_cfg("lora.targets=[q_proj,qkv_proj]")
    with pytest.raises(ConfigError) as info:
        train_stage.train_stage(cfg)
    message = info.value.problems[0]
    assert "'qkv_proj' matches no module in LlamaForCausalLM" in message  # q_proj matched; one miss is enough
    assert "q_proj" in message.split("target:")[-1]


def test_preset_from_another_model_is_refused(make_cfg, monkeypatch):
    from lora_search.core.errors import ConfigError

    monkeypatch.setattr(loaders, "load_base", lambda *a, **k: pytest.fail("weights loaded"))
    cfg = make_cfg("+model.target_presets.fused=[qkv_proj,gate_up_proj]", "lora.targets=fused")
    with pytest.raises(ConfigError) as info:
        train_stage.train_stage(cfg)
    assert len(info.value.problems) == 2
    assert "preset 'fused' (tiny_llama) entry 'qkv_proj' matches no module" in info.value.problems[0]


def test_missing_columns_fail_before_weights_load(make_cfg, monkeypatch, tmp_path):
    from lora_search.core.errors import DataError

    monkeypatch.setattr(loaders, "load_base", lambda *a, **k: pytest.fail("weights loaded"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "hi", "answer": "yo"}\n' * 4)
    cfg = make_cfg("data=local", f"data.path={path}", "data.layout=alpaca")
    with pytest.raises(DataError) as info:
        train_stage.train_stage(cfg)
    assert "missing column(s) output" in str(info.value) and "instruction, answer" in str(info.value)


def test_a_subset_final_eval_reuses_the_last_periodic_eval(worker_and_cfg, tmp_path):
    from transformers import TrainerCallback

    worker, cfg = worker_and_cfg
    seen = []

    class Evals(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append((state.global_step, metrics["eval_loss"]))

    cfg.trainer.final_eval, cfg.trainer.exact_match_items = "subset", 0
    metrics = train_adapter(worker, cfg, tmp_path / "sub", callbacks=[Evals()], with_baseline=False, save=False)
    assert [s for s, _ in seen] == [6, 12]  # the periodic evals only: no extra pass at the end
    assert metrics["eval_loss"] == seen[-1][1] and metrics["eval_rows"] == min(cfg.trainer.eval_subset, 6 * 4)
    assert metrics["periodic_eval_s"] > 0 and metrics["final_eval_s"] < metrics["periodic_eval_s"]

    cfg.trainer.final_eval = "full"
    seen.clear()
    metrics = train_adapter(worker, cfg, tmp_path / "full", callbacks=[Evals()], with_baseline=False, save=False)
    assert [s for s, _ in seen] == [6, 12, 12] and metrics["eval_rows"] == len(worker.data.eval)


def test_padding_free_batches_train_like_padded_ones(worker_and_cfg, tmp_path):
    """Rows concatenated without pad tokens see only their own tokens: same tokens, same losses as padded."""
    worker, cfg = worker_and_cfg
    cfg.trainer.precision, cfg.trainer.exact_match_items = "fp32", 0
    cfg.lora.dropout = 0.0  # dropout masks would depend on the batch's shape
    cfg.trainer.logging_steps = 1  # the first logged loss is step 1's, before any update
    runs_ = {}
    for setting in (False, True):
        cfg.trainer.padding_free = setting
        runs_[setting] = train_adapter(worker, cfg, tmp_path / str(setting), save=False)
    padded, free = runs_[False], runs_[True]
    assert (padded["padding_free"], free["padding_free"]) == (False, True)
    assert free["train_tokens"] == padded["train_tokens"]  # real tokens only, counted alike
    # Attention crossing rows would move this by ~0.3% on the tiny model; float reordering moves it ~1e-7.
    assert free["train_loss_first"] == pytest.approx(padded["train_loss_first"], rel=1e-5)
    assert free["eval_loss"] == pytest.approx(padded["eval_loss"], rel=2e-2)  # 12 Adam steps apart
    assert free["eval_loss"] < free["base_eval_loss"]
    assert len(worker.tokenized) == 2  # one tokenized copy per batching mode


def test_compact_lm_head_scores_only_labelled_positions_with_the_same_losses(worker_and_cfg, tmp_path, monkeypatch):
    """On CPU the LM head runs over the completion positions only, as TRL does on CUDA: fewer rows through the
    head, the same losses and updates; a plain TRL trainer afterwards gets TRL's own choice back."""
    from types import SimpleNamespace

    from trl.trainer import utils as trl_utils

    worker, cfg = worker_and_cfg
    cfg.trainer.precision, cfg.trainer.exact_match_items = "fp32", 0
    cfg.lora.dropout, cfg.trainer.logging_steps = 0.0, 1
    original, kernel = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    rows: list[int] = []

    def apply(hidden, *args):
        rows.append(hidden.shape[0])
        return kernel.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", SimpleNamespace(apply=apply))
    runs_, scored = {}, {}
    for setting in (False, True):
        cfg.trainer.compact_lm_head = setting
        rows.clear()
        runs_[setting] = train_adapter(worker, cfg, tmp_path / str(setting), with_baseline=False, save=False)
        scored[setting] = sum(rows)
        assert trl_utils._use_triton is original  # restored after the run
    full, compact = runs_[False], runs_[True]
    assert (full["compact_lm_head"], compact["compact_lm_head"]) == (False, True)
    assert 0 < scored[True] < 0.5 * scored[False]  # prompts and padding skipped (tiny data: ~15% of rows scored)
    assert compact["train_loss_first"] == pytest.approx(full["train_loss_first"], rel=1e-5)
    assert compact["train_loss_last"] == pytest.approx(full["train_loss_last"], rel=1e-4)  # after 11 updates
    assert compact["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-4)
    assert compact["train_loss_last"] < compact["train_loss_first"]


def test_a_stopped_trial_leaves_nothing_behind_on_a_frozen_worker(worker_and_cfg, tmp_path):
    """The worker's long-lived objects are frozen out of the GC's walks; a trial stopped mid-training (the
    pruned path: an exception through Trainer's frames) still leaves its adapter and optimizer collectable."""
    import gc
    import weakref

    from transformers import TrainerCallback

    from lora_search.train.pruning import TrialStopped

    worker, cfg = worker_and_cfg
    assert gc.get_freeze_count() > 0  # start_worker froze what it loaded
    seen = {}

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["model"], seen["optimizer"] = weakref.ref(model), weakref.ref(optimizer)
            if state.global_step == 2:
                raise TrialStopped("pruned at step 2", 2)

    with pytest.raises(TrialStopped):
        train_adapter(worker, cfg, tmp_path / "stopped", callbacks=[StopAtTwo()], with_baseline=False, save=False)
    gc.collect()
    assert seen["model"]() is None and seen["optimizer"]() is None
    assert not any(type(m).__name__ == "LoraLayer" or "lora" in type(m).__module__
                   for m in worker.base.model.modules())


def test_padding_free_auto_follows_the_model(make_cfg, tiny_overrides):
    from types import SimpleNamespace

    from lora_search.train.run import padding_free

    cfg = make_cfg(*tiny_overrides)
    assert cfg.trainer.padding_free == "auto"

    def model(attn, layer_types=None):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn, layer_types=layer_types))

    assert padding_free(cfg, model("flash_attention_2")) and padding_free(cfg, model("kernels-community/flash-attn3"))
    assert padding_free(cfg, model("flash_attention_2", ["sliding_attention", "full_attention"]))
    assert not padding_free(cfg, model("flash_attention_2", ["linear_attention", "full_attention"]))  # Gated DeltaNet
    assert not padding_free(cfg, model("sdpa"))  # a block mask over the whole batch: no faster than padding
    cfg.trainer.packing = True
    assert not padding_free(cfg, model("flash_attention_2"))  # TRL's BFD packing is padding-free itself
    cfg.trainer.padding_free = True
    assert padding_free(cfg, model("sdpa"))  # an explicit setting wins


def test_padding_free_rows_are_truncated_to_max_length(make_cfg, tiny_overrides, tmp_path):
    cfg = make_cfg(*tiny_overrides, "trainer.max_length=16", "trainer.padding_free=true", "trainer.exact_match_items=0",
                   "trainer.max_steps=2", "trainer.eval_every=0")
    worker = train_stage.start_worker(cfg)
    metrics = train_adapter(worker, cfg, tmp_path / "run", with_baseline=False, save=False)
    (train_rows, eval_rows), = worker.tokenized.values()
    for rows in (train_rows, eval_rows):
        assert max(len(ids) for ids in rows["input_ids"]) == 16
        assert all(len(m) == len(ids) for m, ids in zip(rows["labels"], rows["input_ids"]))
    assert metrics["train_tokens"] <= 2 * cfg.trainer.batch_size * 16


def test_the_same_params_train_the_same_adapter_whatever_ran_before(worker_and_cfg, tmp_path):
    worker, cfg = worker_and_cfg
    cfg.trainer.exact_match_items = 0
    first = train_adapter(worker, cfg, tmp_path / "a", with_baseline=False)
    cfg.lora.r = 2
    train_adapter(worker, cfg, tmp_path / "other", with_baseline=False, save=False)  # moves the RNG on
    cfg.lora.r = 8
    again = train_adapter(worker, cfg, tmp_path / "b", with_baseline=False)
    assert again["eval_loss"] == first["eval_loss"] and again["train_loss_first"] == first["train_loss_first"]
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
