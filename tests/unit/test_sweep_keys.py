"""Every swept key takes effect in its trial (its own base, its own data) or is refused before training;
inits that rewrite the shared base are refused in sweeps."""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from lora_search.checks.run_config import validate
from lora_search.commands import pipeline, train_stage
from lora_search.core.errors import ConfigError
from lora_search.search import study as study_lib

FAST = ["data.train_per_task=12", "data.eval_per_task=4", "sweep.pruner=none", "sweep.sampler=random",
        "++sweep.trial={trainer.max_steps: 2, trainer.eval_every: 0, trainer.batch_size: 4, trainer.eval_subset: 4, "
        "trainer.final_eval: subset}"]


def _problems(make_cfg, *overrides) -> list[str]:
    with pytest.raises(ConfigError) as info:
        study_lib.check_sweep(make_cfg(*overrides))
    return info.value.problems


@pytest.mark.parametrize("key, choices, why", [
    ("tracking.mode", "[offline, disabled]", "it sets how trials are logged"),
    ("sweep.n_trials", "[2, 4]", "the study's own settings are fixed for the whole study"),
    ("results_dir", "[a, b]", "it is set for the whole run"),
    ("cache_dir", "[a, b]", "it is set for the whole run"),
    ("stage", "[search, train]", "it is set for the whole run"),
    ("benchmark.repeats", "[1, 2]", "the benchmark stage reads it after the search"),
    ("dashboard.port", "[8080, 8081]", "only the dashboard command reads it"),
])
def test_keys_no_trial_can_act_on_are_refused_in_the_space(make_cfg, key, choices, why):
    problems = _problems(make_cfg, f"++sweep.space={{{key}: {{type: categorical, choices: {choices}}}}}")
    assert len(problems) == 1 and problems[0].startswith(f"sweep.space: {key} cannot be swept: {why}")
    assert problems[0].endswith("; set it on the command line for the whole run")


@pytest.mark.parametrize("override, where", [
    ("lora.init_lora_weights=pissa", "the composed config"),
    ("++sweep.space={lora.init_lora_weights: {type: categorical, choices: [true, olora]}}", "sweep.space (choice 'olora')"),
    ("++sweep.trial={lora.init_lora_weights: pissa_niter_4}", "sweep.trial"),
    ("++sweep.promotion={lora.init_lora_weights: loftq}", "sweep.promotion"),
    ("sweep.enqueue=[{lora.init_lora_weights: corda}]", "sweep.enqueue[0]"),
    ("lora.init_lora_weights=eva", "the composed config"),
])
def test_base_rewriting_inits_are_refused_in_a_sweep(make_cfg, monkeypatch, override, where):
    monkeypatch.setattr(train_stage, "start_worker", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = make_cfg(override, "stage=search")
    with pytest.raises(ConfigError) as info:
        pipeline.run(cfg)
    found = [p for p in info.value.problems if "rewrites the base model's weights" in p]
    assert len(found) == 1 and f"from {where}" in found[0] and "sweeps accept true, false, gaussian, orthogonal" in found[0]
    assert not study_lib.study_dir(cfg).joinpath("study.db").exists()


def test_inits_that_keep_the_base_are_accepted_and_train_stage_keeps_pissa(make_cfg):
    study_lib.check_sweep(make_cfg("++sweep.space={lora.init_lora_weights: {type: categorical, "
                                   "choices: [true, false, gaussian, orthogonal]}}"))
    validate(make_cfg("lora.init_lora_weights=pissa", "stage=train"))  # one run, no shared base: accepted


def _quantized_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())


def test_a_sweep_over_quant_and_data_gives_each_trial_its_base_and_rows(make_cfg, monkeypatch):
    cfg = make_cfg(*FAST, "stage=search", "sweep.n_trials=4",
                   "++sweep.space={quant.mode: {type: categorical, choices: [none, int8, nf4]}, "
                   "data.max_train_rows: {type: categorical, choices: [10, 30]}}",
                   "sweep.enqueue=[{quant.mode: none, data.max_train_rows: 10}, {quant.mode: int8, data.max_train_rows: 30},"
                   " {quant.mode: nf4, data.max_train_rows: 10}, {quant.mode: nf4, data.max_train_rows: 30}]")
    seen, bases = [], []
    original = study_lib.train_adapter

    def train(worker, trial_cfg, *args, **kwargs):
        gc.collect()
        alive = [ref for ref in bases if ref() is not None]
        seen.append({"quant": trial_cfg.quant.mode, "rows": len(worker.data.train),
                     "quantized_layers": _quantized_layers(worker.base.model), "bases_alive": len(alive)})
        if not any(ref() is worker.base.model for ref in bases):
            bases.append(weakref.ref(worker.base.model))
        return original(worker, trial_cfg, *args, **kwargs)

    monkeypatch.setattr(study_lib, "train_adapter", train)
    pipeline.run(cfg)
    study = study_lib.open_study(cfg)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    for t, s in zip(study.trials, seen):
        metrics = json.loads((study_lib.study_dir(cfg) / "trials" / f"{t.number:04d}" / "metrics.json").read_text())
        assert metrics["base_quant"] == t.params["quant.mode"] == t.user_attrs["base_quant"] == s["quant"]
        assert metrics["train_rows"] == t.params["data.max_train_rows"] == t.user_attrs["train_rows"] == s["rows"]
        assert metrics["base_model"] == "tiny_llama" and metrics["base_dtype"] == "float32"
        assert metrics["eval_data_rows"] == t.user_attrs["eval_data_rows"] == 16
    # The base really differs: no quantized layer in the none trial, 14 (7 linear x 2 layers) in int8 and nf4
    assert [s["quantized_layers"] for s in seen] == [0, 14, 14, 14]
    assert len(bases) == 3  # the two nf4 trials share one base (another data cap, the same weights)
    assert [s["bases_alive"] for s in seen] == [0, 0, 0, 1]  # a new base is loaded after the last one is released


def test_workers_load_data_per_data_config_and_share_the_base(make_cfg):
    workers = pipeline.Workers(make_cfg(*FAST))
    capped = make_cfg(*FAST, "data.max_train_rows=5")
    assert len(workers.data_for(capped).train) == 5 and len(workers.task_data().train) == 48
    assert workers.get(capped).data is workers.data_for(capped)
    assert workers.get(capped).base is workers.get().base  # same weights: one base, two data sets
