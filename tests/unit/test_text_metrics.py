"""Free-text answers: ROUGE-L and BLEU of greedy answers (one generation pass with exact match), selectable as the
sweep metric, refused where there is no reference answer, reported by trials, full runs and the benchmark."""

from __future__ import annotations

import pytest

from lora_search.commands import train_stage
from lora_search.config import space as space_lib
from lora_search.core.errors import ConfigError
from lora_search.data.load import load_task_data
from lora_search.promote import benchmark
from lora_search.search import study as study_lib
from lora_search.train import evaluate
from lora_search.train.run import train_adapter

# --- the metric functions, against values worked out by hand ---------------------------------------------------------


def test_identical_answers_score_full_marks_and_disjoint_ones_nothing():
    same = ["the cat sat on the mat", "reverse these words"]
    assert evaluate.rouge_l(same, same) == pytest.approx(1.0)
    assert evaluate.bleu(same, same) == pytest.approx(100.0)
    assert evaluate.rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    assert evaluate.bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0


def test_rouge_l_is_the_lcs_f_measure_averaged_over_rows():
    # LCS of "the cat sat on the mat" (6 tokens) and "the cat on the mat" (5): 5 tokens, so P = 5/6, R = 5/5,
    # F = 2PR / (P + R) = 10/11
    assert evaluate.rouge_l(["the cat sat on the mat"], ["the cat on the mat"]) == pytest.approx(10 / 11)
    # the mean of the rows' F-measures (1 and 0), not a pooled score
    assert evaluate.rouge_l(["red green", "blue"], ["red green", "yellow"]) == pytest.approx(0.5)
    # stemmed (Porter): inflections count as the same word; case and punctuation do not matter
    assert evaluate.rouge_l(["Cats running!"], ["cat run"]) == pytest.approx(1.0)


def test_bleu_is_corpus_bleu_on_the_0_to_100_scale():
    # n-gram precisions of "a b c d e" against "a b c d f": 4/5, 3/4, 2/3, 1/2; equal lengths (no brevity penalty):
    # 100 * (4/5 * 3/4 * 2/3 * 1/2) ** (1/4)
    assert evaluate.bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-6)
    # one-word answers that match are perfect (effective order), and a trailing period is formatting noise
    assert evaluate.bleu(["NASA", "Paris."], ["NASA", "Paris"]) == pytest.approx(100.0)


def test_a_closer_answer_scores_higher_on_both():
    ref = ["the quick brown fox jumps over the lazy dog"]
    close, far = ["the quick brown fox jumps over a lazy dog"], ["a slow red fox sleeps under the dog"]
    assert 0 < evaluate.rouge_l(far, ref) < evaluate.rouge_l(close, ref) < 1
    assert 0 <= evaluate.bleu(far, ref) < evaluate.bleu(close, ref) < 100


def test_no_references_score_zero():
    assert evaluate.rouge_l([], []) == 0.0 and evaluate.bleu([], []) == 0.0


def test_score_generates_once_and_reports_every_metric(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size=16):
        calls.append(list(prompts))
        return ["NASA", "the cat sat on the mat"], {"seconds": 0.5, "new_tokens": 7}

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    scores = evaluate.score(None, None, ["p1", "p2"], ["NASA", "the cat on the mat"], 8, 2)
    assert calls == [["p1", "p2"]]  # one generation pass for all three metrics
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["rouge_l"] == pytest.approx((1 + 10 / 11) / 2)
    assert 0 < scores["bleu"] < 100 and scores["generate_s"] == 0.5
    assert scores["samples"][1] == {"answer": "the cat sat on the mat", "reference": "the cat on the mat"}


# --- the sweep metric ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["rouge_l", "bleu"])
def test_a_text_metric_is_a_maximized_sweep_metric_that_makes_trials_generate(make_cfg, metric):
    cfg = make_cfg(f"sweep.metric={metric}")
    study_lib.check_sweep(cfg)
    assert cfg.sweep.direction == "maximize"
    assert study_lib.objective_list(cfg) == [(metric, "maximize")]
    assert space_lib.trial_base(cfg).trainer.exact_match_items == cfg.sweep.exact_match_items > 0
    several = make_cfg(f"sweep.objectives=[{metric},trainable_params]")
    study_lib.check_sweep(several)
    assert study_lib.objective_list(several) == [(metric, "maximize"), ("trainable_params", "minimize")]
    assert space_lib.trial_base(several).trainer.exact_match_items == several.sweep.exact_match_items


def _problems(make_cfg, *overrides) -> list[str]:
    with pytest.raises(ConfigError) as info:
        study_lib.check_sweep(make_cfg(*overrides))
    return info.value.problems


def test_a_misspelt_metric_is_refused_naming_the_key_and_the_text_metrics(make_cfg):
    problems = _problems(make_cfg, "sweep.metric=rougeL")
    assert len(problems) == 1
    assert problems[0].startswith("sweep.metric must be one of ") and "got 'rougeL'" in problems[0]
    accepted = problems[0].split("one of ")[1].split(";")[0].split(", ")
    assert {"rouge_l", "bleu", "exact_match", "eval_loss"} <= set(accepted)
    assert "did you mean rouge_l?" in problems[0]


@pytest.mark.parametrize("overrides", [
    ["trainer=dpo", "data=embedded_preference", "sweep.metric=rouge_l"],
    ["trainer=dpo", "data=embedded_preference", "sweep.objectives=[preference_accuracy,bleu]"],
    ["data=embedded_preference", "sweep.metric=bleu"],  # pairs, whatever the trainer
])
def test_a_text_metric_on_preference_pairs_is_refused_before_training(make_cfg, overrides):
    problems = [p for p in _problems(make_cfg, *overrides) if "reference answers" in p]
    assert len(problems) == 1, problems
    metric = "rouge_l" if "rouge_l" in " ".join(overrides) else "bleu"
    assert problems[0].startswith(f"sweep.metric={metric} ") and "preference pairs" in problems[0]
    assert "preference_accuracy" in problems[0]  # what is accepted instead


def test_free_text_data_takes_the_text_metrics_but_not_exact_match(make_cfg):
    for metric in ("rouge_l", "bleu"):
        study_lib.check_sweep(make_cfg(f"sweep.metric={metric}", "data.exact_match=false"))
    problems = _problems(make_cfg, "sweep.metric=exact_match", "data.exact_match=false")
    assert len(problems) == 1 and "sweep.metric=exact_match needs data with exact answers" in problems[0]
    assert "rouge_l" in problems[0] and "bleu" in problems[0]  # the way out


def test_a_text_metric_needs_answers_in_every_trial(make_cfg):
    problems = _problems(make_cfg, "sweep.metric=rouge_l", "sweep.exact_match_items=0")
    assert problems == [p for p in problems if p.startswith("sweep.metric=rouge_l needs eval items answered")]
    assert len(problems) == 1


# --- where the answers are scored: a training run and the benchmark (tiny model) -------------------------------------


@pytest.mark.slow  # a tiny training run, then the benchmark's answers
def test_a_run_and_the_benchmark_score_free_text_and_exact_match_only_exact_answers(make_cfg, tiny_overrides,
                                                                                   tmp_path):
    cfg = make_cfg(*tiny_overrides, "data.train_per_task=12", "data.eval_per_task=4", "trainer.max_steps=2",
                   "trainer.eval_every=0", "trainer.exact_match_items=4", "trainer.max_new_tokens=4",
                   "data.exact_match=false")
    worker = train_stage.start_worker(cfg)
    metrics = train_adapter(worker, cfg, tmp_path / "run", save=False)
    for prefix in ("", "base_"):  # the tuned adapter and the base, from the same answers
        assert 0 <= metrics[f"{prefix}rouge_l"] <= 1 and 0 <= metrics[f"{prefix}bleu"] <= 100
        assert metrics[f"{prefix}exact_match"] is None  # free text: no exact match
    assert metrics["samples"] and metrics["exact_match_s"] > 0
    for exact in (False, True):
        cfg.data.exact_match = exact
        bench = benchmark.exact_match(worker.base.model, worker.base.tokenizer, cfg, worker.data)
        assert bench["exact_match_items"] == 4 and len(bench["samples"]) == 4
        assert 0 <= bench["rouge_l"] <= 1 and 0 <= bench["bleu"] <= 100
        assert ("exact_match" in bench) == exact


def test_preference_pairs_are_not_answered_by_the_benchmark(make_cfg):
    cfg = make_cfg("trainer=dpo", "data=embedded_preference", "trainer.exact_match_items=4")
    data = load_task_data(cfg.data)
    assert data.kind == "preference" and benchmark.generates(cfg, data) == 0
    assert benchmark.exact_match(None, None, cfg, data) == {}
