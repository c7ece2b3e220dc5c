"""Several objectives: an Optuna multi-objective study over quality and cost, its Pareto front in the report and the
dashboard's API, the promotion rule that picks one trial from it (and why the others lost); the samplers of Optuna 5
(GP, NSGA-II), and workers started together that do not sample the same configuration."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from lora_search.checks import sweep_settings
from lora_search.commands import pipeline
from lora_search.config import objectives, samplers
from lora_search.config import space as space_lib
from lora_search.promote import promotion
from lora_search.search import study as study_lib

FAST = ["data.train_per_task=12", "data.eval_per_task=4", "sweep.exact_match_items=4",
        "++sweep.trial={trainer.max_steps: 3, trainer.eval_every: 2, trainer.batch_size: 4, trainer.eval_subset: 4, "
        "trainer.final_eval: subset, trainer.max_new_tokens: 4}"]
PROMOTE = ("++sweep.promotion={trainer.max_steps: 3, trainer.eval_every: 0, trainer.exact_match_items: 0, "
           "select: {metric: eval_loss, within: 0.02, then: {metric: trainable_params}}}")
NAMES = ["eval_loss", "trainable_params"]


def _trial(number: int, loss: float, params: int):
    t = create_trial(values=[loss, params], params={"x": float(number)},
                     distributions={"x": FloatDistribution(0, 100)})
    t.number = number
    return t


# ---- the promotion rule ----

def test_the_rule_takes_the_smallest_adapter_within_2_percent_of_the_best_loss_and_says_why_each_other_lost():
    front = [_trial(0, 0.500, 4_000_000), _trial(1, 0.505, 1_000_000), _trial(2, 0.509, 250_000),
             _trial(3, 0.530, 100_000)]
    rule = {"metric": "eval_loss", "within": 0.02, "then": {"metric": "trainable_params", "direction": "minimize"}}
    chosen, lost = objectives.select(front, NAMES, rule, ("eval_loss", "minimize"))
    assert chosen.number == 2  # 0.509 is 1.8% above 0.500; 0.530 is 6% above
    assert "6.0% above the best 0.5 (#0); the rule allows 2%" in lost[3]
    assert lost[0] == "trainable_params 4,000,000 is higher than #2's 250,000"
    assert lost[1] == "trainable_params 1,000,000 is higher than #2's 250,000"
    assert set(lost) == {0, 1, 3}
    assert objectives.describe(rule, ("eval_loss", "minimize")) == \
        "the lowest trainable_params among trials within 2% of the lowest eval_loss"


def test_without_a_rule_the_best_first_objective_wins_ties_go_to_the_lower_number_and_maximize_is_honoured():
    front = [_trial(5, 0.4, 10), _trial(2, 0.4, 20), _trial(7, 0.6, 1)]
    chosen, lost = objectives.select(front, NAMES, None, ("eval_loss", "minimize"))
    assert chosen.number == 2 and "ties #2 on eval_loss" in lost[5]
    acc = [create_trial(values=[v, p]) for v, p in ((0.90, 100), (0.89, 10), (0.70, 1))]
    for i, t in enumerate(acc):
        t.number = i
    rule = {"metric": "exact_match", "within": 0.05, "then": {"metric": "trainable_params"}}
    chosen, lost = objectives.select(acc, ["exact_match", "trainable_params"], rule, ("exact_match", "maximize"))
    assert chosen.number == 1 and "below the best 0.9 (#0)" in lost[2]


@pytest.mark.parametrize("rule, expected", [
    ({"metric": "exact_match"}, "sweep.promotion.select.metric=exact_match is not an objective of this study"),
    ({"metric": "eval_loss", "then": {"metric": "adapter_mb"}}, "sweep.promotion.select.then.metric=adapter_mb is not"),
    ({"metric": "eval_loss", "direction": "maximize"}, "direction=maximize contradicts eval_loss"),
    ({"metric": "eval_loss", "within": -0.1, "then": {"metric": "trainable_params"}}, "within must be a fraction"),
    ({"metric": "eval_loss", "how": "best"}, "fields metric, direction, within, then"),
    ({"metric": "eval_loss", "within": 0.02}, "within keeps the trials near the best eval_loss for a next rule"),
])
def test_a_rule_naming_what_the_study_did_not_optimize_is_refused(rule, expected):
    problems = sweep_settings.rule_problems(rule, NAMES, "sweep.promotion.select")
    assert len(problems) == 1 and expected in problems[0], problems


# ---- the study: several objectives end to end on the tiny model ----

@pytest.mark.slow  # a search, a promotion and a report on the tiny model (make test and CI run it)
def test_a_two_objective_sweep_keeps_a_front_promotes_by_the_rule_and_reports_it(make_cfg):
    cfg = make_cfg(*FAST, PROMOTE, "sweep=rank_lr_pareto", "sweep.n_trials=5", "sweep.memory_budget_mb=null",
                   "sweep.sampler={type: tpe, seed: 3, n_startup_trials: 2}",
                   "++sweep.space={lora.r: {type: categorical, choices: [2, 4, 8, 16]}, "
                   "trainer.learning_rate: {type: float, low: 1e-3, high: 5e-3, log: true}}")
    assert cfg.sweep.metric == "eval_loss" and [o["metric"] for o in cfg.sweep.objectives] == NAMES
    for stage in ("search", "promote", "report"):
        cfg.stage = stage
        assert pipeline.run(cfg) == 0
    study = study_lib.open_study(cfg)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"] and study.metric_names == NAMES
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 5  # no pruner acts on a multi-objective study
    for t in complete:
        metrics = json.loads((study_lib.study_dir(cfg) / "trials" / f"{t.number:04d}" / "metrics.json").read_text())
        assert t.values == [metrics["eval_loss"], metrics["trainable_params"]]
        assert len(metrics["intermediate"]) >= 1  # the periodic evals are still recorded
        assert metrics["adapter_mb"] == pytest.approx(metrics["trainable_params"] * 4 / 2**20, rel=1e-3)
        assert metrics["step_s"] > 0
    front = {t.number for t in study.best_trials}
    # the rule, recomputed by hand: within 2% of the front's best loss, then the fewest parameters
    best_loss = min(t.values[0] for t in study.best_trials)
    band = [t for t in study.best_trials if t.values[0] <= best_loss * 1.02]
    expected = min(band, key=lambda t: (t.values[1], t.number)).number
    best = json.loads((study_lib.study_dir(cfg) / "best.json").read_text())
    assert best["trial"] == best["selection"]["chosen"] == expected
    assert {c["trial"] for c in best["selection"]["front"]} == front
    assert all(c["outcome"] for c in best["selection"]["front"])  # every loser has its reason
    header = (study_lib.study_dir(cfg) / "best.yaml").read_text().splitlines()[0]
    assert header == (f"# promoted: trial #{expected}, chosen by sweep.promotion.select: the lowest trainable_params "
                      "among trials within 2% of the lowest eval_loss")
    report = (study_lib.study_dir(cfg) / "report.md").read_text()
    assert "## Pareto front" in report and f"Promoted: #{expected}" in report
    assert (study_lib.study_dir(cfg) / "plots" / "pareto.png").stat().st_size > 1000
    full = json.loads((study_lib.study_dir(cfg) / "full" / "metrics.json").read_text())
    assert full["trial"] == expected and full["trial_value"] == pytest.approx(study.trials[expected].values[0])


def test_the_dashboard_api_serves_the_pareto_front(make_cfg):
    import io
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard  # the WSGI app `lora_search dashboard` serves

    cfg = make_cfg("sweep=rank_lr_pareto", "sweep.memory_budget_mb=null")
    study = study_lib.open_study(cfg)
    for loss, params in ((0.5, 400), (0.6, 100), (0.7, 300)):
        trial = study.ask()
        space_lib.suggest(trial, cfg.sweep.space)
        study.tell(trial, [loss, params])
    app = optuna_dashboard.wsgi(study._storage)
    environ = {"PATH_INFO": f"/api/studies/{study._study_id}", "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
    assert status == ["200 OK"]
    detail = json.loads(body)
    assert [t["number"] for t in detail["best_trials"]] == [0, 1]  # #2 is beaten on both
    assert detail["objective_names"] == NAMES and detail["directions"] == ["minimize", "minimize"]


def test_a_study_created_for_other_objectives_is_not_resumed_with_these(make_cfg):
    from lora_search.core.errors import ConfigError

    study_lib.open_study(make_cfg("sweep.name=s", "sweep.objectives=[eval_loss,trainable_params]"))
    with pytest.raises(ConfigError, match="was created to minimize eval_loss, minimize trainable_params, but this "
                                          "sweep would minimize eval_loss, minimize adapter_mb"):
        study_lib.open_study(make_cfg("sweep.name=s", "sweep.objectives=[eval_loss,adapter_mb]"))


# ---- samplers ----

def _first_proposals(make_cfg, tmp_path, workers: list[int], sampler: str, completed: int = 0) -> list[dict]:
    """Each worker's sampler asks one trial of a shared SQLite study while the others' trials are still running."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    cfgs = [make_cfg(f"worker={w}", f"sweep.sampler={sampler}") for w in workers]
    space = cfgs[0].sweep.space
    seed_study = optuna.create_study(study_name="s", storage=url, load_if_exists=True)
    for i in range(completed):
        t = seed_study.ask()
        params = space_lib.suggest(t, space)
        seed_study.tell(t, 1.0 + (i % 5) / 10 + params["lora.dropout"])
    proposals = []
    for c in cfgs:  # none is told: each asks while the earlier ones are RUNNING, as workers started together do
        study = optuna.load_study(study_name="s", storage=url, sampler=samplers.make_sampler(c))
        proposals.append(space_lib.suggest(study.ask(), space))
    return proposals


def test_four_workers_started_together_sample_four_different_first_configurations(make_cfg, tmp_path):
    proposals = _first_proposals(make_cfg, tmp_path, [0, 1, 2, 3], "{type: tpe, seed: 0, n_startup_trials: 4}")
    assert len({json.dumps(p, sort_keys=True) for p in proposals}) == 4
    # the seed offset is what does it: four processes with one seed would start on one configuration
    same = _first_proposals(make_cfg, tmp_path / "same", [0, 0, 0, 0], "{type: tpe, seed: 0, n_startup_trials: 4}")
    assert len({json.dumps(p, sort_keys=True) for p in same}) == 1


def test_after_startup_tpe_constant_liar_keeps_simultaneous_workers_apart(make_cfg, tmp_path):
    spec = "{type: tpe, seed: 0, n_startup_trials: 4, multivariate: true}"
    apart = _first_proposals(make_cfg, tmp_path, [0, 0, 0, 0], spec, completed=6)
    assert len({json.dumps(p, sort_keys=True) for p in apart}) == 4
    assert samplers.sampler_kwargs(make_cfg(f"sweep.sampler={spec}"))["constant_liar"] is True


def test_spawned_workers_get_their_own_index(monkeypatch, tmp_path):
    from lora_search.scale import workers

    started = []

    class Fake:
        pid = 1

        def __init__(self, cmd, **kw):
            started.append(cmd)

    monkeypatch.setattr(workers.subprocess, "Popen", Fake)
    workers.spawn(["sweep=rank_lr", "worker=0"], 4, tmp_path)
    assert [[a for a in cmd if a.startswith("worker=")] for cmd in started] == [["worker=1"], ["worker=2"], ["worker=3"]]


@pytest.mark.slow  # two sweeps on the tiny model (make test and CI run them)
@pytest.mark.parametrize("sampler", ["{type: gp, seed: 0, n_startup_trials: 2}", "{type: nsgaii, seed: 0}"])
def test_the_gp_and_nsgaii_samplers_run_a_sweep(make_cfg, sampler):
    cfg = make_cfg(*FAST, "stage=search", "sweep.n_trials=3", f"sweep.sampler={sampler}", "sweep.pruner=none",
                   "++sweep.space={trainer.learning_rate: {type: float, low: 1e-3, high: 5e-3, log: true}, "
                   "lora.r: {type: categorical, choices: [2, 4]}}")
    assert pipeline.run(cfg) == 0
    study = study_lib.open_study(cfg)
    assert type(study.sampler).__name__ == {"gp": "GPSampler", "nsgaii": "NSGAIISampler"}[cfg.sweep.sampler["type"]]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len({t.params["trainer.learning_rate"] for t in study.trials}) == 3


def test_promote_reads_the_primary_objective_of_a_multi_objective_trial(make_cfg):
    cfg = make_cfg("sweep=rank_lr_pareto")
    t = create_trial(values=[0.3, 1000.0])
    assert promotion.primary_value(cfg, t) == 0.3


@pytest.mark.parametrize("overrides, expected", [
    (["sweep=nightly", "sweep.objectives=[eval_loss,trainable_params]"], "sweep.nightly crowns a champion by one metric"),
    (["sweep.objectives=[eval_loss,eval_loss]"], "sweep.objectives[1]: eval_loss is named twice"),
    (["sweep.objectives=[{metric: eval_loss, weight: 2}]"], "sweep.objectives[0] must be a metric name or"),
    (["sweep.memory_budget_mb=-5"], "sweep.memory_budget_mb must be a positive number of MB, auto"),
])
def test_objective_and_budget_settings_that_cannot_work_are_refused(make_cfg, overrides, expected):
    from lora_search.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        study_lib.check_sweep(make_cfg(*overrides))
    assert len(info.value.problems) == 1 and expected in info.value.problems[0], info.value.problems


def test_with_several_objectives_sweep_metric_follows_the_first_quality_one(make_cfg):
    cfg = make_cfg("sweep.objectives=[trainable_params,{metric: exact_match},peak_memory_mb]")
    assert (cfg.sweep.metric, cfg.sweep.direction) == ("exact_match", "maximize")
    assert study_lib.objective_list(cfg) == [("trainable_params", "minimize"), ("exact_match", "maximize"),
                                            ("peak_memory_mb", "minimize")]
    assert space_lib.trial_base(cfg).trainer.exact_match_items == cfg.sweep.exact_match_items  # answers generated
