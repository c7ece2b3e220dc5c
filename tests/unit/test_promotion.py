"""Promotion of the best full run, not the best short trial (sweep.promotion.top_k), with several training seeds
(sweep.promotion.seeds), and the agreement between trial scores and full-run scores (Spearman, with a warning)."""

from __future__ import annotations

import json

import optuna
import pytest

from lora_search.commands import pipeline
from lora_search.core import records
from lora_search.core.errors import ConfigError
from lora_search.promote import promotion
from lora_search.report import study_report
from lora_search.search import study as study_lib

SMALL = ["data.train_per_task=24", "data.eval_per_task=6", "sweep.pruner=none", "tracking=none",
         "++sweep.trial={trainer.max_steps: 6, trainer.eval_every: 3, trainer.batch_size: 4, "
         "trainer.exact_match_items: 0}"]
FULL = "trainer.max_steps: 8, trainer.eval_every: 0, trainer.batch_size: 4, trainer.exact_match_items: 0"


@pytest.mark.slow  # a tiny search, then 4 full runs
def test_top_k_trains_the_best_trials_with_several_seeds_and_promotes_the_best_mean(make_cfg):
    cfg = make_cfg(*SMALL, "sweep.n_trials=3", "stage=search",
                   f"++sweep.promotion={{{FULL}, top_k: 2, seeds: 2}}")
    assert pipeline.run(cfg) == 0
    assert pipeline.run(make_cfg(*SMALL, "sweep.n_trials=3", "stage=promote",
                                 f"++sweep.promotion={{{FULL}, top_k: 2, seeds: 2}}")) == 0
    out = study_lib.study_dir(cfg)
    study = study_lib.open_study(cfg)
    ranked = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.value)
    full = records.read_json(out / "full" / "metrics.json")
    promo = full["promotion"]
    assert [c["trial"] for c in promo["candidates"]] == [t.number for t in ranked[:2]]
    assert promo["seeds"] == [0, 1] and promo["best_trial"] == ranked[0].number
    runs = {}
    for c in promo["candidates"]:
        values = []
        for seed in (0, 1):
            m = records.read_json(out / "full" / "runs" / f"trial-{c['trial']:04d}-seed{seed}" / "metrics.json")
            assert m["seed"] == seed and m["steps"] == 8 and m["trial"] == c["trial"]
            values.append(m["full_value"])
            runs[c["trial"], seed] = m
        assert values[0] != values[1]  # the seed changed the run
        assert c["full_values"] == values and c["full_mean"] == pytest.approx(sum(values) / 2)
    winner = min(promo["candidates"], key=lambda c: c["full_mean"])
    assert promo["chosen"] == winner["trial"] == full["trial"]
    assert records.read_json(out / "best.json")["trial"] == winner["trial"]
    assert full["full_mean"] == pytest.approx(winner["full_mean"]) and full["full_sd"] > 0
    # full/adapter is the winner's first-seed run, byte for byte
    source = out / "full" / "runs" / f"trial-{winner['trial']:04d}-seed0" / "adapter" / "adapter_model.safetensors"
    assert (out / "full" / "adapter" / "adapter_model.safetensors").read_bytes() == source.read_bytes()
    assert full["config_id"] == promotion.config_id(promotion.load_best(out))
    # what the adapter learned, recorded with the promoted run
    analysis = json.loads((out / "full" / "weights.json").read_text())
    assert analysis["entries"] and (out / "plots" / "weights_effective_rank.png").is_file()
    # every complete trial recorded its eval rows' losses, so the report compares the best with each, row by row
    assert all(t.user_attrs["eval_loss_rows"] == 24 for t in ranked) and ranked[0].user_attrs["eval_loss_se"] > 0
    md = study_report.write_report(study, cfg, out).read_text()
    assert f"**Paired comparison.** Trial #{ranked[0].number} (eval_loss {ranked[0].value:.4g})" in md
    assert "(paired on the same 24 eval rows' losses: Wilcoxon" in md and "## What the adapter learned" in md
    assert "The 2 best trials were re-trained at the full budget" in md and "(mean)" in md


def _fake_runs(monkeypatch, full_values: dict):
    """promotion._run replaced: trial number -> its full-run value, an empty adapter folder."""
    def fake(cfg, trial, seed, folder, get_worker, force, study_folder):
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(f"trial {trial.number}".encode())
        return {"full_value": full_values[trial.number] + 0.01 * seed, "steps": 40, "trial": trial.number,
                "trial_value": trial.value, "seed": seed}
    monkeypatch.setattr(promotion, "_run", fake)


def _study(tmp_path, values):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    study = optuna.create_study(direction="minimize")
    for i, v in enumerate(values):
        params = {"lora.r": [4, 8, 16, 32][i % 4], "trainer.learning_rate": 1e-3 * (i + 1)}
        study.add_trial(optuna.trial.create_trial(value=v, params=params, user_attrs={"params": params},
                                                  distributions={"lora.r": CategoricalDistribution([4, 8, 16, 32]),
                                                                 "trainer.learning_rate": FloatDistribution(1e-4, 1e-2)}))
    return study


def test_a_runner_up_whose_full_run_wins_is_promoted_and_misleading_short_trials_are_warned_about(make_cfg,
                                                                                                  monkeypatch):
    cfg = make_cfg("sweep.n_trials=4")
    study = _study(None, [1.0, 1.1, 1.2, 1.3])
    # full runs in the reverse order of the trials: the short trials mislead
    _fake_runs(monkeypatch, {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.6})
    out = study_lib.study_dir(cfg)
    metrics = promotion.promote_stage(cfg, study, lambda c: None)
    promo = metrics["promotion"]
    assert [c["trial"] for c in promo["candidates"]] == [0, 1, 2]  # top_k defaults to 3; #3 is not a candidate
    assert promo["chosen"] == 2 and promo["best_trial"] == 0 and metrics["trial"] == 2
    assert promo["spearman"] == pytest.approx(-1.0) and "short trials mislead here" in promo["warning"]
    assert (out / "full" / "adapter" / "adapter_model.safetensors").read_bytes() == b"trial 2"
    assert "promoted: trial #2, the best full run of the 3 best trials" in (out / "best.yaml").read_text()
    md = study_report.write_report(study, cfg, out).read_text()
    assert "## Promoted trial: #2" in md and "the best short trial was #0, but its full run lost" in md
    assert "Spearman's rank correlation between trial and full-run scores over these 3 configurations: -1.00" in md
    assert "**Warning: short trials mislead here" in md

    # the same promotion again: everything is on disk, nothing is trained or rewritten
    stamp = (out / "full" / "metrics.json").stat().st_mtime_ns
    monkeypatch.setattr(promotion, "_run", lambda *a, **k: pytest.fail("a finished promotion trained again"))
    assert promotion.promote_stage(cfg, study, lambda c: None)["trial"] == 2
    assert (out / "full" / "metrics.json").stat().st_mtime_ns == stamp

    # agreeing full runs: no warning
    _fake_runs(monkeypatch, {0: 0.6, 1: 0.7, 2: 0.8, 3: 0.9})
    metrics = promotion.promote_stage(cfg, study, lambda c: None, force=True)
    assert metrics["promotion"]["spearman"] == pytest.approx(1.0) and metrics["promotion"]["warning"] is None
    assert metrics["trial"] == 0


def test_a_diverged_full_run_never_wins_and_a_promotion_whose_runs_all_diverged_fails_with_its_reason(make_cfg,
                                                                                                     monkeypatch):
    import json
    import math

    from lora_search.core.errors import RunDiverged

    cfg = make_cfg("sweep.n_trials=3")
    study = _study(None, [1.0, 1.1, 1.2])
    out = study_lib.study_dir(cfg)
    _fake_runs(monkeypatch, {0: math.nan, 1: 0.8, 2: 0.9})  # the best short trial's full run diverged
    assert promotion.promote_stage(cfg, study, lambda c: None)["trial"] == 1
    assert json.loads((out / "full" / "status.json").read_text())["status"] == "complete"

    def diverged(cfg, trial, seed, folder, get_worker, force, study_folder):
        return {"full_value": math.nan, "diverged": f"diverged: training loss nan at step {trial.number + 1}"}
    monkeypatch.setattr(promotion, "_run", diverged)
    with pytest.raises(RunDiverged, match=r"every full run of the promotion diverged \(diverged: training loss nan "
                                          r"at step 1\)"):
        promotion.promote_stage(cfg, study, lambda c: None, force=True)
    status = json.loads((out / "full" / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"] == "diverged: training loss nan at step 1"


def test_duplicate_configurations_are_trained_once_and_top_k_one_trains_only_the_best(make_cfg, monkeypatch):
    study = _study(None, [1.0, 1.05, 1.2])
    trials = study.get_trials()
    trials[1].params.update(trials[0].params)  # #1 repeats #0's configuration
    trials[1].user_attrs["params"] = dict(trials[0].params)
    got = promotion.candidates(make_cfg(), study, trials[0], pool=trials)
    assert [t.number for t in got] == [0, 2]
    assert [t.number for t in promotion.candidates(make_cfg("++sweep.promotion.top_k=1"), study, trials[0])] == [0]


@pytest.mark.parametrize("entry", ["top_k: 0", "seeds: -1", "top_k: 2.5", "seeds: true"])
def test_bad_top_k_or_seeds_are_refused_naming_the_key(make_cfg, entry):
    from lora_search.checks.sweep import check_sweep

    cfg = make_cfg(f"++sweep.promotion={{{entry}}}")
    with pytest.raises(ConfigError, match=rf"sweep\.promotion\.{entry.split(':')[0]} must be a positive integer"):
        check_sweep(cfg)
