"""Trials that continue: a trial evaluated at its pruner's rungs trains the same run as one uninterrupted run of the
same steps, so a trial that reaches the promotion budget is the promotion's full run (reused, not trained again)."""

from __future__ import annotations

import optuna
import pytest
from safetensors.torch import load_file

from lora_search.commands import pipeline, train_stage
from lora_search.config import space
from lora_search.core import records
from lora_search.promote import promotion
from lora_search.search import study as study_lib
from lora_search.train.pruning import PruningCallback
from lora_search.train.run import train_adapter

RUN = ["data.train_per_task=24", "data.eval_per_task=6", "trainer.max_steps=8", "trainer.batch_size=4",
       "trainer.exact_match_items=0", "trainer.learning_rate=3e-3", "trainer.precision=fp32", "lora.dropout=0.1"]


def test_a_run_evaluated_at_its_rungs_ends_with_the_weights_of_an_uninterrupted_run(make_cfg, tmp_path):
    """fp32, dropout on: the rung evals (the pruner reads them; it never prunes here) leave the weights, the optimizer,
    the data order and the random state alone."""
    plain = make_cfg(*RUN, "trainer.eval_every=0", "trainer.final_eval=subset")
    rungs = make_cfg(*RUN, "trainer.eval_every=2", "trainer.eval_subset=8", "trainer.final_eval=subset")
    assert space.same_training(plain, rungs) and not space.same_training(plain, make_cfg(*RUN, "trainer.seed=1"))
    worker = train_stage.start_worker(plain)
    train_adapter(worker, plain, tmp_path / "plain", with_baseline=False)
    study = optuna.create_study(pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=2))
    trial = study.ask()
    callback = PruningCallback(trial, pruner={"type": "successive_halving", "min_resource": 2, "reduction_factor": 2})
    metrics = train_adapter(worker, rungs, tmp_path / "rungs", callbacks=[callback], with_baseline=False)
    assert [s for s, _ in callback.intermediate] == [2, 4, 8]  # the rungs (2, 4) and the last step were evaluated
    assert metrics["steps"] == 8
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "rungs" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved <= 1e-6, f"evaluating at the rungs changed the trained weights by {moved}"
    # and the training itself moved the adapter (B starts at zero), so the comparison is not of two untouched copies
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 0


@pytest.mark.slow  # a tiny search and a promotion
def test_a_trial_that_reaches_the_promotion_budget_is_the_promoted_run_not_trained_again(make_cfg, monkeypatch):
    trial_block = ("{trainer.max_steps: 8, trainer.eval_every: 2, trainer.eval_subset: 8, trainer.batch_size: 4, "
                   "trainer.final_eval: full, trainer.exact_match_items: 0, trainer.precision: fp32}")
    promo_block = ("{trainer.max_steps: 8, trainer.eval_every: 0, trainer.batch_size: 4, trainer.exact_match_items: 0, "
                   "trainer.precision: fp32, top_k: 2}")
    args = ["data.train_per_task=24", "data.eval_per_task=6", "tracking=none", "sweep.n_trials=3",
            "sweep.pruner={type: successive_halving, min_resource: 2, reduction_factor: 2}",
            f"++sweep.trial={trial_block}", f"++sweep.promotion={promo_block}"]
    cfg = make_cfg(*args, "stage=search")
    assert pipeline.run(cfg) == 0
    study = study_lib.open_study(cfg)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, "no trial reached the top rung"
    out = study_lib.study_dir(cfg)
    for t in complete:  # a trial that ran the promotion's training kept its adapter
        assert (out / "trials" / f"{t.number:04d}" / "adapter" / "adapter_model.safetensors").is_file()
    trained = []
    monkeypatch.setattr(promotion, "train_adapter", lambda *a, **k: trained.append(a) or {})
    assert pipeline.run(make_cfg(*args, "stage=promote")) == 0
    assert trained == [], "promotion trained again a run a trial had already trained"
    full = records.read_json(out / "full" / "metrics.json")
    winner = full["trial"]
    assert full["reused_trial"] == winner and full["steps"] == 8
    assert full["full_value"] == pytest.approx(study.trials[winner].value)
    trial_adapter = out / "trials" / f"{winner:04d}" / "adapter" / "adapter_model.safetensors"
    assert (out / "full" / "adapter" / "adapter_model.safetensors").read_bytes() == trial_adapter.read_bytes()
