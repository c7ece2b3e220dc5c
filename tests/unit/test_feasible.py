"""Memory-aware search: a configuration predicted over sweep.memory_budget_mb is recorded infeasible through Optuna's
constraint and never trained, and does not count toward n_trials or as a failure; a trial that runs out of memory
anyway is recorded the same way and scales the estimates up for the rest of the study."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState

from lora_search.commands import pipeline
from lora_search.config import space as space_lib
from lora_search.models import loaders, memory
from lora_search.search import memory_budget
from lora_search.search import study as study_lib

FAST = ["stage=search", "data.train_per_task=12", "data.eval_per_task=4", "sweep.pruner=none",
        "sweep.sampler={type: random, seed: 0}",
        "++sweep.trial={trainer.max_steps: 2, trainer.eval_every: 0, trainer.batch_size: 4, trainer.eval_subset: 4, "
        "trainer.final_eval: subset}"]
SPACE = "++sweep.space={lora.r: {type: categorical, choices: [2, 256]}}"
BATCH = "++sweep.space={trainer.batch_size: {type: categorical, choices: [4, 8192]}}"


def _estimates(cfg, key: str = "lora.r", values=(2, 256)) -> dict:
    """What the sweep will estimate for each value of key: with the data's row lengths, as a trial gets them."""
    from lora_search.commands import train_stage
    from lora_search.train import run

    base = space_lib.trial_base(cfg)
    worker = train_stage.start_worker(base)
    run.prepare_data(worker, base)
    lengths = memory_budget.worker_lengths(worker, base)
    assert 0 < lengths["seq_len"] < base.trainer.max_length  # the embedded rows are short: the estimate knows it
    arch = loaders.architecture(cfg.model, cfg.cache_dir)
    return {v: memory.estimate(space_lib.apply(base, {key: v}), arch, **lengths).total_mb for v in values}


def _metrics(cfg, number: int) -> dict:
    return json.loads((study_lib.study_dir(cfg) / "trials" / f"{number:04d}" / "metrics.json").read_text())


def test_a_configuration_over_the_budget_is_recorded_infeasible_untrained_and_uncounted(make_cfg):
    import psutil

    big, small = 8192, 4
    est = _estimates(make_cfg(*FAST, BATCH), "trainer.batch_size", (big, small))
    # between the two, and above what this (long-lived test) process measures when batch 4 trains
    budget = max((est[small] + est[big]) / 2, 1.5 * psutil.Process().memory_info().rss / 2**20)
    assert est[big] > budget > est[small]
    cfg = make_cfg(*FAST, BATCH, "sweep.n_trials=2", f"sweep.memory_budget_mb={budget}",
                   f"sweep.enqueue=[{{trainer.batch_size: {big}}},{{trainer.batch_size: {small}}}]")
    assert pipeline.run(cfg) == 0
    study = study_lib.open_study(cfg)
    skipped = [t for t in study.trials if t.params["trainer.batch_size"] == big]
    trained = [t for t in study.trials if t.params["trainer.batch_size"] == small]
    assert skipped and skipped[0].number == 0 and len(trained) == 2  # the sweep went on to 2 counted trials
    for t in skipped:
        assert t.state == TrialState.PRUNED and t.user_attrs["status"] == "infeasible"
        assert t.constraints[memory_budget.CONSTRAINT] == pytest.approx(est[big] - budget, rel=1e-3)
        assert f"over sweep.memory_budget_mb {budget:.0f} MB: not trained" in t.user_attrs["reason"]
        metrics = _metrics(cfg, t.number)
        assert "steps" not in metrics and metrics["estimated_memory_mb"] == pytest.approx(est[big], abs=0.1)
        status = json.loads((study_lib.study_dir(cfg) / "trials" / f"{t.number:04d}" / "status.json").read_text())
        assert status["status"] == "infeasible"
    for t in trained:
        assert t.state == TrialState.COMPLETE and _metrics(cfg, t.number)["steps"] == 2
        assert t.user_attrs["estimated_memory_mb"] == pytest.approx(est[small], abs=0.1)
        assert t.constraints[memory_budget.CONSTRAINT] == t.user_attrs["peak_memory_mb"] - budget < 0  # measured, fits
    assert len(study_lib.finished(study)) == 2 and not study.get_trials(states=(TrialState.FAIL,))


def test_out_of_memory_is_infeasible_not_a_failure_and_corrects_the_estimates(make_cfg, monkeypatch):
    probe = make_cfg(*FAST, SPACE)
    est = _estimates(probe)
    budget = est[2] * 1.5  # r=2 is predicted to fit: it trains, and runs out of memory anyway
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(study_lib, "train_adapter", out_of_memory)
    cfg = make_cfg(*FAST, SPACE, "sweep.n_trials=2", f"sweep.memory_budget_mb={budget}",
                   "sweep.enqueue=[{lora.r: 2}]")
    assert pipeline.run(cfg) == 4  # every configuration is now out of reach: the sweep stops itself, saying why
    study = study_lib.open_study(cfg)
    first = study.trials[0]
    second = next(t for t in study.trials[1:] if t.params["lora.r"] == 2)  # the same configuration again
    assert first.state == TrialState.PRUNED and first.user_attrs["status"] == "infeasible"
    assert first.user_attrs["reason"].startswith("out of memory (OutOfMemoryError: CUDA out of memory.")
    assert first.constraints[memory_budget.CONSTRAINT] > 0
    scale = study.user_attrs[memory_budget.SCALE_ATTR]
    assert scale == pytest.approx(budget * memory_budget.MARGIN / est[2], rel=1e-3)
    # the same configuration is now predicted over the budget: recorded, not trained again
    assert second.user_attrs["status"] == "infeasible" and "not trained" in second.user_attrs["reason"]
    assert second.user_attrs["estimated_memory_mb"] == pytest.approx(est[2] * scale, rel=1e-3)
    assert len(calls) == 1
    assert not study.get_trials(states=(TrialState.FAIL,)) and len(study_lib.finished(study)) == 0
    assert len(study.trials) == 20  # memory_budget.InfeasibleLimit: 20 in a row (max(20, 2 x n_trials))


def test_a_trained_trial_measured_over_the_budget_is_kept_but_never_best(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    over, fits = study.ask(), study.ask()
    figures = {"memory_budget_mb": 100.0, "estimated_memory_mb": 90.0, "memory_estimate_scale": 1.0}
    assert "measured peak memory 150 MB is over" in memory_budget.after_training(over, None, figures, 150.0)
    assert memory_budget.after_training(fits, None, figures, 80.0) is None
    study.tell(over, 0.1)  # the better value, but infeasible
    study.tell(fits, 0.5)
    assert study.best_trial.number == fits.number
    assert study.trials[over.number].constraints[memory_budget.CONSTRAINT] == 50.0
    assert study.user_attrs[memory_budget.SCALE_ATTR] == pytest.approx(150.0 / 90.0)


def test_an_auto_budget_is_the_free_memory_at_the_start(make_cfg, monkeypatch):
    monkeypatch.setattr(memory_budget, "_resolved", {})
    monkeypatch.setattr(memory, "auto_budget_mb", lambda device=None: 12345.0)
    cfg = make_cfg("sweep.memory_budget_mb=auto")
    assert memory_budget.budget_mb(cfg) == 12345.0
    monkeypatch.setattr(memory, "auto_budget_mb", lambda device=None: 1.0)
    assert memory_budget.budget_mb(cfg) == 12345.0  # resolved once per process, before the base loads
