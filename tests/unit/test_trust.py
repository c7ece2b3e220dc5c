"""How far to trust a study: per-row eval losses, the paired comparison of trials on them, importances with bootstrap
intervals and a sentence that claims no unsupported ranking, Spearman between short trials and full runs."""

from __future__ import annotations

import math
import random

import optuna
import pytest

from lora_search.commands import train_stage
from lora_search.core import stats
from lora_search.report import confidence, importance
from lora_search.train import evaluate
from lora_search.train.run import train_adapter


@pytest.fixture
def worker_and_cfg(make_cfg, tiny_overrides):
    cfg = make_cfg(*tiny_overrides)
    return train_stage.start_worker(cfg), cfg


@pytest.mark.slow  # a tiny training run
def test_per_row_losses_average_to_the_eval_loss(worker_and_cfg, tmp_path):
    worker, cfg = worker_and_cfg
    # one eval batch holding every row: the trainer's eval loss is then the token-weighted mean of the row losses
    cfg.trainer.eval_batch_size, cfg.trainer.final_eval, cfg.trainer.exact_match_items = 64, "full", 0
    metrics = train_adapter(worker, cfg, tmp_path / "run", with_baseline=False, save=False)
    rows = metrics["eval_row_losses"]
    assert len(rows) == metrics["eval_loss_rows"] == len(worker.data.eval)
    assert len(set(rows)) > 1 and all(x > 0 for x in rows)
    assert metrics["eval_loss_se"] == pytest.approx(stats.standard_error(rows), rel=1e-3)
    evalset = next(iter(worker.tokenized.values()))[1]
    tokens = [sum(x != -100 for x in row["labels"][1:]) for row in evalset]  # labelled next tokens per row
    weighted = sum(r * n for r, n in zip(rows, tokens)) / sum(tokens)
    assert weighted == pytest.approx(metrics["eval_loss"], rel=2e-3)
    assert min(rows) < metrics["eval_loss"] < max(rows)
    # the rows' fingerprint: which tokenized eval rows, in order (trials are paired only on the same ones)
    assert metrics["eval_row_losses_fingerprint"] == evaluate.tokens_fingerprint(evalset)


def _study(values_params: list[tuple[float, dict]], attrs=lambda i: {}, direction="minimize"):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = {"trainer.learning_rate": FloatDistribution(1e-4, 1e-2, log=True), "lora.r": CategoricalDistribution(
        [4, 8, 16, 32]), "lora.dropout": FloatDistribution(0.0, 0.1), "lora.targets": CategoricalDistribution(
        ["qv", "attn", "all_linear"]), "lora.alpha_ratio": CategoricalDistribution([1, 2, 4])}
    study = optuna.create_study(direction=direction)
    for i, (value, params) in enumerate(values_params):
        study.add_trial(optuna.trial.create_trial(value=value, params=params, user_attrs=attrs(i),
                                                  distributions={k: dists[k] for k in params}))
    return study


def _params(rng: random.Random) -> dict:
    return {"trainer.learning_rate": 10 ** rng.uniform(-4, -2), "lora.r": rng.choice([4, 8, 16, 32]),
            "lora.dropout": rng.uniform(0, 0.1), "lora.targets": rng.choice(["qv", "attn", "all_linear"]),
            "lora.alpha_ratio": rng.choice([1, 2, 4])}


def test_bootstrap_intervals_single_out_the_parameter_that_matters_and_refuse_to_rank_noise():
    rng = random.Random(0)
    ps = [_params(rng) for _ in range(40)]
    driven = _study([(abs(math.log10(p["trainer.learning_rate"]) + 3) + rng.gauss(0, 0.02), p) for p in ps])
    shares = importance.importances(driven)
    intervals = importance.importance_intervals(driven, shares)
    assert set(intervals) == set(shares)
    lr = intervals["trainer.learning_rate"]
    assert all(lr[0] > hi for k, (lo, hi) in intervals.items() if k != "trainer.learning_rate")
    assert importance.supported_order(shares, intervals)[0] == "trainer.learning_rate"
    text = importance.importance_sentence(shares, "eval_loss", n_complete=40, intervals=intervals)
    assert text.startswith("Learning rate matters most")

    noise = _study([(rng.gauss(1.0, 0.05), p) for p in ps])  # the value depends on no parameter
    shares = importance.importances(noise)
    intervals = importance.importance_intervals(noise, shares)
    assert importance.supported_order(shares, intervals) == []
    assert "matters most" not in importance.importance_sentence(shares, "eval_loss", n_complete=40, intervals=intervals)


def test_seven_trials_over_five_parameters_are_called_too_few_to_rank():
    rng = random.Random(1)
    study = _study([(1.9 + rng.uniform(0, 0.1), _params(rng)) for _ in range(7)])
    shares = importance.importances(study)
    assert len(shares) == 5
    text = importance.importance_sentence(shares, "eval_loss", n_complete=7,
                                     intervals=importance.importance_intervals(study, shares))
    assert text.startswith("7 complete trials are too few to rank 5 parameters (it takes at least 10)")
    assert "matters most" not in text and "explains" not in text


def test_the_paired_comparison_warns_when_the_best_is_told_apart_from_no_trial():
    rng = random.Random(2)
    # the 102-row alpaca case: 11 eval rows, trial scores 1.92 to 2.00, the rows' losses spread by about 0.6; each
    # trial's rows are the best's plus per-row noise as large as the gaps between trials: nothing is told apart
    rows = [max(0.01, 1.92 + rng.gauss(0, 0.6)) for _ in range(11)]
    values = [1.92, 1.95, 1.97, 2.00]
    per_trial = [rows] + [[x + v - 1.92 + rng.gauss(0, 0.15) for x in rows] for v in values[1:]]
    study = _study([(v, _params(rng)) for v in values],
                   attrs=lambda i: {"eval_row_losses": per_trial[i], "eval_row_losses_fingerprint": "f"})
    found = confidence.paired_evidence(study, "eval_loss")
    assert found["trial"] == 0 and found["n"] == 11 and found["tied"] == [1, 2, 3] and found["better"] == []
    text = confidence.paired_sentence(found, "eval_loss")
    assert "cannot be told apart from #1, #2, #3" in text and "too small for these differences" in text
    assert "same 11 eval rows' losses" in text

    # the same gaps, every row shifted alike (row difficulty dominates, the configuration's effect is consistent):
    # the paired comparison tells the trials apart where an interval around the best's mean could not
    shifted = [rows] + [[x + v - 1.92 for x in rows] for v in values[1:]]
    tight = _study([(v, _params(rng)) for v in values],
                   attrs=lambda i: {"eval_row_losses": shifted[i], "eval_row_losses_fingerprint": "f"})
    found = confidence.paired_evidence(tight, "eval_loss")
    assert found["better"] == [1, 2, 3] and "is reliably better than #1, #2, #3" in \
        confidence.paired_sentence(found, "eval_loss")
    se = stats.standard_error(rows)
    assert 1.92 + 1.959964 * se > 2.00  # the old unpaired interval held every trial
    # perplexity: the loss interval, exponentiated
    ppl = stats.score_interval("perplexity", math.exp(1.92), {"eval_loss_se": 0.1, "eval_loss_rows": 11})
    assert ppl["low"] == pytest.approx(math.exp(1.92 - 0.1959964)) and ppl["high"] == pytest.approx(
        math.exp(1.92 + 0.1959964))
    # no per-row scores recorded: no trial said to be better than another
    text = confidence.paired_sentence(confidence.paired_evidence(_study([(1.0, _params(rng)), (1.1, _params(rng))]),
                                                                 "eval_loss"), "eval_loss")
    assert "no per-row scores recorded" in text and "reliably better than #" not in text


def test_exact_match_gets_a_wilson_interval():
    # p = 0.5 over 16 items: centre 0.5, half-width 1.96 * sqrt(0.015625 + 1.96^2 / (4 * 256)) / (1 + 1.96^2 / 16)
    z = 1.959964
    half = z * math.sqrt(0.25 / 16 + z * z / (4 * 256)) / (1 + z * z / 16)
    got = stats.score_interval("exact_match", 0.5, {"exact_match_n": 16})
    assert got["low"] == pytest.approx(0.5 - half, abs=1e-6) and got["high"] == pytest.approx(0.5 + half, abs=1e-6)
    assert stats.score_interval("exact_match", 0.5, {}) is None


def test_spearman_between_trial_and_full_scores():
    assert stats.spearman([1.0, 2.0, 3.0], [0.5, 0.7, 0.9]) == pytest.approx(1.0)
    assert stats.spearman([1.0, 2.0, 3.0], [0.9, 0.7, 0.5]) == pytest.approx(-1.0)
    assert stats.spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert stats.spearman([1.0, 2.0], [1.0, 2.0]) is None and stats.spearman([1.0, 1.0, 1.0], [1, 2, 3]) is None
