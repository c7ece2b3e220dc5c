"""Every objective the README offers ends a sweep with finished trials; the direction follows the metric; a
generation objective (exact match, ROUGE-L, BLEU) generates answers in every trial (its cost recorded), the others
generate none."""

from __future__ import annotations

import json

import pytest

from lora_search.commands import pipeline
from lora_search.core.errors import ConfigError
from lora_search.search import study as study_lib

FAST = ["data.train_per_task=12", "data.eval_per_task=4", "sweep.pruner=none", "sweep.sampler=random",
        "sweep.exact_match_items=4", "++sweep.space={trainer.learning_rate: {type: float, low: 1e-3, high: 3e-3}}",
        "++sweep.trial={trainer.max_steps: 2, trainer.eval_every: 0, trainer.batch_size: 4, trainer.eval_subset: 4, "
        "trainer.final_eval: subset, trainer.max_new_tokens: 4}"]


@pytest.mark.parametrize("metric, direction", [("eval_loss", "minimize"), ("perplexity", "minimize"),
                                               ("exact_match", "maximize"),
                                               pytest.param("rouge_l", "maximize", marks=pytest.mark.slow),
                                               pytest.param("bleu", "maximize", marks=pytest.mark.slow)])
def test_a_sweep_over_each_metric_ends_with_complete_trials(make_cfg, metric, direction):
    cfg = make_cfg(*FAST, "stage=search", "sweep.n_trials=2", f"sweep.metric={metric}")
    assert cfg.sweep.direction == direction  # auto: the metric's own direction
    pipeline.run(cfg)
    study = study_lib.open_study(cfg)
    assert study.direction.name.lower() == direction
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        metrics = json.loads((study_lib.study_dir(cfg) / "trials" / f"{t.number:04d}" / "metrics.json").read_text())
        assert t.value == metrics[metric] == t.user_attrs[metric]
        assert t.user_attrs["exact_match_s"] == metrics["exact_match_s"]
        if metric in ("exact_match", "rouge_l", "bleu"):  # one generation pass scores all three
            assert metrics["samples"] and len(metrics["samples"]) <= 4 and metrics["exact_match_s"] > 0
            assert 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["rouge_l"] <= 1 and 0 <= metrics["bleu"] <= 100
        else:  # no generation in trials whose objective is a loss
            assert metrics["exact_match"] is None and metrics["samples"] is None
            assert metrics["rouge_l"] is None and metrics["bleu"] is None


def _problems(make_cfg, *overrides) -> list[str]:
    with pytest.raises(ConfigError) as info:
        study_lib.check_sweep(make_cfg(*overrides))
    return info.value.problems


@pytest.mark.parametrize("overrides, expected", [
    (["sweep.direction=maximize"], "sweep.direction=maximize contradicts sweep.metric=eval_loss, which is minimized; "
                                   "leave sweep.direction out (auto) or set it to minimize"),
    (["sweep.metric=perplexity", "sweep.direction=maximize"], "contradicts sweep.metric=perplexity, which is minimized"),
    (["sweep.metric=exact_match", "sweep.direction=minimize"], "contradicts sweep.metric=exact_match, which is maximized"),
    (["sweep.metric=exact_match", "++sweep.trial={trainer.exact_match_items: 0}"],
     "sweep.metric=exact_match needs eval items answered in every trial; sweep.trial's trainer.exact_match_items is 0"),
    (["sweep.metric=exact_match", "sweep.exact_match_items=0"],
     "sweep.metric=exact_match needs eval items answered in every trial; sweep.exact_match_items is 0"),
    (["sweep.metric=exact_match", "data.exact_match=false"], "sweep.metric=exact_match needs data with exact answers"),
])
def test_objective_settings_that_cannot_work_are_refused_in_one_line(make_cfg, overrides, expected):
    problems = _problems(make_cfg, *overrides)
    assert len(problems) == 1 and expected in problems[0], problems


def test_trials_generate_only_for_an_exact_match_objective_and_the_trial_block_wins(make_cfg):
    from lora_search.config import space as space_lib

    assert space_lib.trial_base(make_cfg()).trainer.exact_match_items == 0
    assert space_lib.trial_base(make_cfg("sweep.metric=exact_match")).trainer.exact_match_items == 16
    explicit = make_cfg("sweep.metric=exact_match", "++sweep.trial={trainer.exact_match_items: 7}")
    assert space_lib.trial_base(explicit).trainer.exact_match_items == 7
    assert make_cfg("sweep.metric=exact_match").trainer.exact_match_items == 48  # the full run keeps its own
