"""Paired evidence (core/paired, report/confidence): trials compared row by row on the same eval rows, the statistics
against hand computations, rows of other eval sets refused, and a tiny-model study whose report names which trials
the best is reliably better than."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import FloatDistribution

from lora_search.commands import pipeline
from lora_search.core import paired, stats
from lora_search.core.paired import NotPaired, Rows
from lora_search.report import confidence, study_report
from lora_search.search import study as study_lib

FP = "0123456789abcdef"  # one fingerprint: the same eval rows


def _rows(values, fingerprint=FP) -> Rows:
    return Rows([float(v) for v in values], fingerprint)


def _difficulty(n: int = 32) -> list[float]:
    """Per-row losses from 0.001 to 3.6, as in the issue: most of the spread is which row."""
    return [0.001 * (3600 ** (i / (n - 1))) for i in range(n)]


def test_mean_gain_and_the_bootstrap_interval_by_hand():
    a, b = _rows([1.0, 2.0, 3.0, 4.0]), _rows([1.5, 2.5, 3.1, 4.9])  # lower is better: a gains 0.5, 0.5, 0.1, 0.9
    got = paired.compare(a, b, lower_is_better=True)
    assert got["n"] == 4 and got["mean_gain"] == pytest.approx(0.5)
    assert paired.compare(b, a, lower_is_better=True)["mean_gain"] == pytest.approx(-0.5)
    # 0/1 items, higher is better: a right on 3 items b misses, b right on 1 a misses, 4 ties -> (3 - 1) / 8
    assert paired.compare(_rows([1, 1, 1, 0, 1, 0, 1, 0]), _rows([0, 0, 0, 1, 1, 0, 1, 0]), False)["mean_gain"] == 0.25
    # a constant difference: every resample's mean is that difference
    assert paired.bootstrap_interval([0.2] * 10) == pytest.approx((0.2, 0.2))
    # two rows, differences 0 and 1: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4, so the middle 95%
    # spans 0 to 1 and the middle 40% (quantiles 0.3 and 0.7, both inside the central half) is 1/2 alone
    assert paired.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    assert paired.bootstrap_interval([0.0, 1.0], level=0.4) == (0.5, 0.5)
    assert paired.bootstrap_interval([0.0, 1.0], level=0.4, seed=1) == (0.5, 0.5)


def test_the_wilcoxon_statistic_and_p_value_by_hand():
    # scipy's documented example (Conover's cucumber heights): 15 differences, two negative
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    # by hand: |d| ranked 1..15 (no ties), the negatives -48 and -67 hold ranks 10 and 14: T = min(T+, T-) = 24;
    # exact two-sided p = 2 * #(subsets of {1..15} summing to at most 24) / 2^15
    counts = [1] + [0] * 120
    for k in range(1, 16):
        for s in range(120, k - 1, -1):
            counts[s] += counts[s - k]
    p_exact = 2 * sum(counts[:25]) / 2**15
    assert sum(counts[:25]) == 676 and p_exact == pytest.approx(0.041259765625)
    base = [10.0 + i for i in range(15)]
    got = paired.compare(_rows(base), _rows([x + di for x, di in zip(base, d)]), lower_is_better=True)
    assert got["statistic"] == 24.0 and got["p"] == pytest.approx(p_exact, rel=1e-9)
    assert got["mean_gain"] == pytest.approx(sum(d) / 15)

    # exact match: a answers 10 items b misses, the other 22 alike. Pratt: the 22 zeros take ranks 1..22 and are
    # dropped, the 10 wins share rank 27.5, T- = 0; mean = (32*33 - 22*23) / 4 = 137.5, variance = (32*33*65 -
    # 22*23*45) / 24 - (10^3 - 10) / 48 = 1890.625, z = -137.5 / sqrt(1890.625) = -sqrt(10)
    a, b = _rows([1] * 10 + [0] * 22), _rows([0] * 32)
    got = paired.compare(a, b, lower_is_better=False)
    z = -137.5 / math.sqrt(1890.625)
    assert z == pytest.approx(-math.sqrt(10))
    assert got["statistic"] == 0.0 and got["p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert got["mean_gain"] == pytest.approx(10 / 32)
    # no row differs: nothing to rank, p = 1
    assert paired.compare(a, a, lower_is_better=False)["p"] == 1.0


def test_a_small_consistent_gain_is_separated_where_an_unpaired_interval_is_not():
    best = _difficulty()
    gains = [0.05 + 0.06 * math.sin(i) for i in range(32)]  # mostly positive, a few rows where the other does better
    assert any(g < 0 for g in gains)
    other = [x + g for x, g in zip(best, gains)]
    mean = sum(best) / 32
    unpaired = stats.score_interval("eval_loss", mean, {"eval_loss_se": stats.standard_error(best),
                                                        "eval_loss_rows": 32})
    assert unpaired["low"] < sum(other) / 32 < unpaired["high"]  # the other trial lies inside the best's interval
    got = paired.compare(_rows(best), _rows(other), lower_is_better=True)
    assert 0 < got["low"] < got["mean_gain"] < got["high"] and got["p"] < 1e-4


def test_reliably_better_sorts_the_trials_and_refuses_rows_of_other_eval_sets():
    best = _difficulty()
    worse = [x + 0.05 + 0.02 * math.sin(i) for i, x in enumerate(best)]
    same = [x + (0.05 if i % 2 else -0.05) for i, x in enumerate(best)]  # as often better as worse: mean gain 0
    ahead = [x - 0.05 for x in best]
    found = paired.reliably_better(_rows(best), {
        1: _rows(worse), 2: _rows(same), 3: _rows(ahead), 4: None, 5: _rows(worse, "fedcba9876543210"),
        6: _rows(worse[:31]), 7: _rows(worse, None)}, lower_is_better=True)
    assert (found["better"], found["tied"], found["worse"]) == ([1], [2], [3])
    assert found["no_rows"] == [4] and found["other_rows"] == [5, 6, 7] and found["n"] == 32
    assert set(found["comparisons"]) == {1, 2, 3}
    assert found["comparisons"][2]["low"] < 0 < found["comparisons"][2]["high"]
    # Holm over the three comparisons: the smallest p times 3, never below a smaller one's adjusted value
    ps = sorted(c["p"] for c in found["comparisons"].values())
    holm = sorted(c["p_holm"] for c in found["comparisons"].values())
    assert holm[0] == pytest.approx(3 * ps[0]) and holm[1] == pytest.approx(max(3 * ps[0], 2 * ps[1]))
    assert paired.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    # refused outright when compared directly
    for other in (_rows(worse[:31]), _rows(worse, "fedcba9876543210"), _rows(worse, None)):
        with pytest.raises(NotPaired, match="not the same eval rows"):
            paired.compare(_rows(best), other, lower_is_better=True)
    # the best without rows: nothing is compared
    assert paired.reliably_better(None, {1: _rows(worse)}, True)["no_rows"] == [1]


def _study(rows_by_trial: dict, key="eval_row_losses", direction="minimize", values=None, method="sft"):
    study = optuna.create_study(direction=direction)
    for number, rows in rows_by_trial.items():
        attrs = {"method": method}
        if rows is not None:
            attrs.update({key: rows, paired.fingerprint_key(key): FP})
        value = values[number] if values else sum(rows) / len(rows)
        study.add_trial(optuna.trial.create_trial(value=value, params={"trainer.learning_rate": 1e-3 * (number + 1)},
                                                  distributions={"trainer.learning_rate": FloatDistribution(1e-4, 1e-1)},
                                                  user_attrs=attrs))
    return study


def test_the_report_names_the_trials_the_best_is_reliably_better_than(make_cfg, tmp_path):
    best = _difficulty()
    study = _study({0: [x + 0.3 for x in best], 1: best, 2: [x + (0.01 if i % 2 else -0.01) for i, x in
                                                           enumerate(best)], 3: None},
                   values={0: 1.2, 1: 0.9, 2: 0.91, 3: 1.0})
    found = confidence.paired_evidence(study, "eval_loss")
    assert found["trial"] == 1 and found["better"] == [0] and found["tied"] == [2] and found["no_rows"] == [3]
    text = confidence.paired_sentence(found, "eval_loss")
    assert text.startswith("Trial #1 (eval_loss 0.9) is reliably better than #0 and cannot be told apart from #2 "
                           "(paired on the same 32 eval rows' losses: Wilcoxon signed-rank test (Pratt's zero "
                           "handling), Holm-adjusted over the 2 comparisons, p < 0.05, and a paired bootstrap 95% "
                           "interval of the per-row difference that excludes 0).")
    assert "#3 recorded no per-row scores (not compared)." in text and "too small" not in text
    cfg = make_cfg("sweep=lr_only")
    out = tmp_path / "lr_only"
    md = study_report.write_report(study, cfg, out).read_text()
    assert f"**Paired comparison.** {text} Every trial trains with the same seed (trainer.seed=0" in md
    assert "(common random numbers)" in md and "Eval noise" not in md
    summary = confidence.summary(study, "eval_loss")["paired"]
    assert summary["better"] == "#0" and summary["tied"] == "#2" and summary["no_rows_count"] == 1

    # every other trial within the noise: said plainly, with what to do about it
    tied = _study({0: best, 1: [x + (0.01 if i % 2 else -0.01) for i, x in enumerate(best)]}, values={0: 0.9, 1: 0.91})
    text = confidence.paired_sentence(confidence.paired_evidence(tied, "eval_loss"), "eval_loss")
    assert "cannot be told apart from #1" in text and "reliably better" not in text
    assert "the eval set is too small for these differences" in text and "data.eval_per_task" in text
    # exact match: 0/1 items, higher is better
    em = _study({0: [1] * 12 + [0] * 20, 1: [0] * 32, 2: [1] * 11 + [0] * 21}, key="exact_match_rows",
                direction="maximize")
    text = confidence.paired_sentence(confidence.paired_evidence(em, "exact_match"), "exact_match")
    assert text.startswith("Trial #0 (exact_match 0.375) is reliably better than #1 and cannot be told apart from #2 "
                           "(paired on the same 32 answered eval items")
    # a seed in the space: the trials do not share their random numbers, and the report says so
    assert confidence.seed_sentence({"trainer.seed": {}}, 0).startswith("The trials do not share their random numbers")
    # DPO's eval loss has no per-pair scores: not compared, and said so
    dpo = _study({0: best, 1: best}, key="other", values={0: 0.5, 1: 0.6}, method="dpo")
    text = confidence.paired_sentence(confidence.paired_evidence(dpo, "eval_loss"), "eval_loss")
    assert text.startswith("DPO trials record no per-pair loss") and "preference_accuracy" in text


def test_a_tiny_study_records_rows_for_every_trial_and_its_report_names_the_trials_it_beats(make_cfg):
    cfg = make_cfg("sweep=lr_only", "stage=search", "sweep.n_trials=2", "sweep.pruner=none", "data.train_per_task=12",
                   "data.eval_per_task=4", "++sweep.space={trainer.learning_rate: {type: float, low: 1e-6, high: 5e-3, "
                   "log: true}}", "sweep.enqueue=[{trainer.learning_rate: 3e-3}, {trainer.learning_rate: 1e-6}]",
                   "++sweep.trial={trainer.max_steps: 2, trainer.eval_every: 0, trainer.batch_size: 4, "
                   "trainer.exact_match_items: 2, trainer.max_new_tokens: 2}")
    assert pipeline.run(cfg) == 0
    study = study_lib.open_study(cfg)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.params["trainer.learning_rate"] for t in trials] == [3e-3, 1e-6]
    for t in trials:  # every complete trial, not only the best so far: the same rows, in the same order
        attrs = t.user_attrs
        assert len(attrs["eval_row_losses"]) == attrs["eval_loss_rows"] == 16 and all(x > 0 for x in
                                                                                      attrs["eval_row_losses"])
        assert attrs["eval_row_losses_fingerprint"] == trials[0].user_attrs["eval_row_losses_fingerprint"]
        assert set(attrs["exact_match_rows"]) <= {0, 1} and len(attrs["exact_match_rows"]) == 2
        assert attrs["exact_match_rows_fingerprint"] == trials[0].user_attrs["exact_match_rows_fingerprint"]
    assert trials[0].user_attrs["eval_row_losses"] != trials[1].user_attrs["eval_row_losses"]
    md = study_report.write_report(study, cfg, study_lib.study_dir(cfg)).read_text()
    assert f"**Paired comparison.** Trial #0 (eval_loss {trials[0].value:.4g}) is reliably better than #1 (paired on " \
           "the same 16 eval rows' losses: Wilcoxon signed-rank test (Pratt's zero handling), p < 0.05" in md
    assert "Every trial trains with the same seed (trainer.seed=0" in md
