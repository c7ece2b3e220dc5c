"""The search: sampling and applying dotted keys, sweep checks, pruning, resume."""

from __future__ import annotations

import json
import math

import optuna
import pytest

from lora_search.commands import pipeline, train_stage
from lora_search.config import space as space_lib
from lora_search.core.errors import ConfigError
from lora_search.search import study as study_lib
from lora_search.train.pruning import PruningCallback, TrialStopped, decision_steps

# ++sweep.trial={...} replaces the sweep file's whole trial block (a mapping on the command line is taken as given)
SMALL = ["data.train_per_task=24", "data.eval_per_task=6", "++sweep.trial={trainer.max_steps: 8, trainer.eval_every: 2, "
         "trainer.batch_size: 4, trainer.exact_match_items: 4, trainer.max_new_tokens: 8}"]


def test_apply_sets_dotted_keys_on_a_copy(make_cfg):
    cfg = make_cfg()
    new = space_lib.apply(cfg, {"lora.r": 32, "trainer.learning_rate": 1e-4, "lora.targets": "all_linear"})
    assert (new.lora.r, new.trainer.learning_rate, new.lora.targets) == (32, 1e-4, "all_linear")
    assert cfg.lora.r == 8  # the composed config is untouched


def test_apply_names_a_bad_key_and_a_bad_type(make_cfg):
    with pytest.raises(ConfigError) as info:
        space_lib.apply(make_cfg(), {"lora.rank": 4, "trainer.max_steps": "many"})
    text = " ".join(info.value.problems)
    assert "unknown config key 'lora.rank'; did you mean lora.r?" in text and "trainer.max_steps='many'" in text


def test_suggest_samples_every_distribution_type():
    space = {"lora.r": {"type": "categorical", "choices": [4, 8]}, "lora.dropout": {"type": "float", "low": 0, "high": 0.1},
             "trainer.max_steps": {"type": "int", "low": 2, "high": 9, "step": 1},
             "trainer.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        values = space_lib.suggest(study.ask(), space)
        assert values["lora.r"] in (4, 8) and 0 <= values["lora.dropout"] <= 0.1
        assert isinstance(values["trainer.max_steps"], int) and 1e-5 <= values["trainer.learning_rate"] <= 1e-2


@pytest.mark.parametrize(
    "override, expected",
    [
        ("++sweep.space={lora.rnak: {type: categorical, choices: [4, 8]}}", "unknown config key 'lora.rnak'; did you mean lora.r?"),
        ("++sweep.space={trainer.batch_size: {type: int, low: 0, high: 8}}",
         "sweep.space allows trainer.batch_size=0, which is invalid: trainer.batch_size must be a positive integer, got 0"),
        ("++sweep.space={trainer.learning_rate: {type: float, low: 0, high: 1, log: true}}", "a log scale needs low > 0"),
        ("++sweep.space={lora.targets: {type: categorical, choices: [qv, everything]}}", "lora.targets: unknown preset 'everything'"),
        ("++sweep.space={lora.use_dora: {type: normal, mean: 8}}", "must be a distribution with type float, int or categorical; got 'normal'"),
        ("sweep.sampler={type: bayes}", "sweep.sampler.type must be one of tpe, random, grid, cmaes, gp, nsgaii; got 'bayes'"),
        ("++sweep.pruner={type: median, patience: 3}", "sweep.pruner (median):"),
        ("sweep.sampler=grid", "grid needs categorical entries"),
        ("sweep.metric=accuracy", "sweep.metric must be one of eval_loss, perplexity, exact_match"),
        ("++sweep.trial={trainer.max_stepz: 4}", "sweep.trial: unknown config key 'trainer.max_stepz'"),
    ],
)
def test_bad_sweep_fails_before_any_training(make_cfg, monkeypatch, override, expected):
    monkeypatch.setattr(train_stage, "start_worker", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = make_cfg(override, "stage=search")
    with pytest.raises(ConfigError) as info:
        pipeline.run(cfg)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_every_pruner_and_sampler_builds(make_cfg):
    pruners = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    for name, kind in pruners.items():
        assert type(study_lib.make_pruner(make_cfg(f"sweep.pruner={name}"))) is kind
    median = study_lib.make_pruner(make_cfg("sweep.pruner={type: median, n_startup_trials: 3, n_warmup_steps: 7}"))
    assert (median._n_startup_trials, median._n_warmup_steps) == (3, 7)  # the sweep file's arguments reach Optuna
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler}
    for name, kind in samplers.items():
        assert type(study_lib.make_sampler(make_cfg(f"sweep.sampler={name}"))) is kind
    tpe = study_lib.make_sampler(make_cfg("sweep.sampler={type: tpe, seed: 5, n_startup_trials: 3}", "worker=2"))
    assert tpe._constant_liar and tpe._n_startup_trials == 3
    first = study_lib.make_sampler(make_cfg("sweep.sampler={type: random, seed: 5}", "worker=2"))
    again = optuna.samplers.RandomSampler(seed=7)  # seed + worker index
    space = optuna.distributions.FloatDistribution(0, 1)
    draw = [s.sample_independent(optuna.create_study(), optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING),
                                 "x", space) for s in (first, again)]
    assert draw[0] == draw[1]


def test_shipped_sweeps_are_valid(make_cfg):
    from lora_search.config.compose import group_choices

    assert {"rank_lr", "targets", "lr_only"} <= set(group_choices("sweep"))
    for name in group_choices("sweep"):
        cfg = make_cfg(f"sweep={name}")
        assert cfg.sweep.name == name
        pipeline.preflight_sweep(cfg)


def test_pruning_callback_stops_on_nan_and_reports_in_the_study_direction():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    cb = PruningCallback(trial, maximize=True)

    class State:
        global_step = 3

    cb.on_evaluate(None, State(), None, metrics={"eval_loss": 2.0})
    assert study.trials[0].intermediate_values == {3: -2.0}
    with pytest.raises(TrialStopped, match="diverged: training loss nan at step 3"):
        cb.on_log(None, State(), None, logs={"loss": math.nan})


@pytest.mark.parametrize("pruner, max_steps, expected", [
    ({"type": "successive_halving", "min_resource": 2, "reduction_factor": 3}, 12, [2, 6, 12]),
    ({"type": "successive_halving", "min_resource": 1, "reduction_factor": 2, "min_early_stopping_rate": 1}, 10,
     [2, 4, 8, 10]),
    ({"type": "hyperband", "min_resource": 1, "reduction_factor": 3}, 27, [1, 3, 9, 27]),
    ("hyperband", 5, [1, 3, 5]),
    ("successive_halving", 12, None),  # min_resource auto: estimated by Optuna, every report kept
    ({"type": "median", "n_warmup_steps": 2}, 12, None),
    ("none", 12, None),
])
def test_decision_steps_are_the_pruners_rungs(pruner, max_steps, expected):
    assert decision_steps(pruner, max_steps) == expected


def test_successive_halving_trials_evaluate_at_its_rungs_only(make_cfg):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=3",
                   "sweep.pruner={type: successive_halving, min_resource: 2, reduction_factor: 2}",
                   "++sweep.trial={trainer.max_steps: 8, trainer.eval_every: 1, trainer.batch_size: 4, "
                   "trainer.exact_match_items: 0, trainer.final_eval: subset}")
    pipeline.run(cfg)
    study = study_lib.open_study(cfg)
    for t in study.trials:
        reported = sorted(t.intermediate_values)
        metrics = json.loads((_trials_dir(cfg) / f"{t.number:04d}" / "metrics.json").read_text())
        assert reported and set(reported) <= {2, 4, 8}, reported  # eval_every=1 would have reported 1..8
        assert metrics["evals_skipped"] == max(reported) - len(reported)
    first = study.trials[0]  # alone at every rung: promoted to the end, its objective the step-8 eval
    assert sorted(first.intermediate_values) == [2, 4, 8] and first.value == first.intermediate_values[8]
    # A later trial goes on past a rung only by beating the trials before it there (reduction factor 2, three
    # trials: Optuna keeps the best 1 of 2 or 3); otherwise it is pruned at that rung.
    for t in study.trials[1:]:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        steps = sorted(t.intermediate_values)
        for step in steps:
            earlier = min(e.intermediate_values[step] for e in study.trials[:t.number] if step in e.intermediate_values)
            went_on = step != steps[-1] or t.state == optuna.trial.TrialState.COMPLETE
            assert went_on == (t.intermediate_values[step] <= earlier), (t.number, step, t.intermediate_values)


def _trials_dir(cfg):
    return study_lib.study_dir(cfg) / "trials"


def test_search_prunes_an_absurd_learning_rate_and_records_every_trial(make_cfg):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=3", "++sweep.pruner={type: median, n_startup_trials: 1, n_warmup_steps: 0}",
                   "sweep.enqueue=[{trainer.learning_rate: 0.003}, {trainer.learning_rate: 1e30}]")
    pipeline.run(cfg)
    study = study_lib.open_study(cfg)
    states = [t.state for t in study.trials]
    assert len(study.trials) == 3 and states[1] == optuna.trial.TrialState.PRUNED
    assert states[0] == optuna.trial.TrialState.COMPLETE
    absurd = study.trials[1]
    assert absurd.user_attrs["status"] == "pruned" and absurd.params["trainer.learning_rate"] == 1e30
    status = json.loads((_trials_dir(cfg) / "0001" / "status.json").read_text())
    assert status["status"] == "pruned" and status["reason"].startswith("diverged: "), status  # NaN or inf at once
    assert absurd.user_attrs["reason"] == status["reason"]
    metrics = json.loads((_trials_dir(cfg) / "0001" / "metrics.json").read_text())
    assert metrics["pruned_at_step"] < 8  # stopped before its budget
    done = json.loads((_trials_dir(cfg) / "0000" / "metrics.json").read_text())
    assert done["intermediate"] and done["steps"] == 8
    for key in ("eval_loss", "train_tokens_per_s", "peak_memory_mb", "trainable_params", "wall_s"):
        assert isinstance(done[key], (int, float)) and math.isfinite(done[key]) and done[key] > 0, key
        assert study.trials[0].user_attrs[key] == pytest.approx(done[key]), key  # the study holds what was written
    assert 0.0 <= done["exact_match"] <= 1.0 and study.trials[0].user_attrs["exact_match"] == done["exact_match"]
    params = json.loads((_trials_dir(cfg) / "0000" / "params.json").read_text())
    assert set(params) == set(cfg.sweep.space)
    assert (_trials_dir(cfg) / "0000" / "config.yaml").exists()


def test_resume_keeps_finished_trials_and_does_not_train_again(make_cfg, monkeypatch):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=2")
    pipeline.run(cfg)
    assert len(study_lib.finished(study_lib.open_study(cfg))) == 2
    monkeypatch.setattr(train_stage, "start_worker", lambda *a, **k: pytest.fail("a finished sweep loaded a model"))
    pipeline.run(cfg)  # same command again: nothing to do
    assert len(study_lib.open_study(cfg).trials) == 2
    monkeypatch.undo()
    more = make_cfg(*SMALL, "stage=search", "sweep.n_trials=3")
    pipeline.run(more)
    trials = study_lib.open_study(more).trials
    assert len(trials) == 3 and [t.number for t in trials] == [0, 1, 2]



def test_the_worker_tokenizes_before_the_first_trial_and_no_trial_tokenizes(make_cfg, monkeypatch):
    from trl import SFTTrainer

    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=2", "sweep.pruner=none")
    prepared, during = [], []
    original_prepare, original_train = SFTTrainer._prepare_dataset, study_lib.train_adapter

    def prepare(self, dataset, *args, **kwargs):
        prepared.append(len(dataset))
        return original_prepare(self, dataset, *args, **kwargs)

    def train(*args, **kwargs):
        before = len(prepared)
        try:
            return original_train(*args, **kwargs)
        finally:
            during.append(len(prepared) - before)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", prepare)
    monkeypatch.setattr(study_lib, "train_adapter", train)
    pipeline.run(cfg)
    assert during == [0, 0]  # neither trial, the first included, ran TRL's dataset preparation
    assert len(prepared) == 2  # the train and eval sets, once, before the first trial
    assert len(study_lib.finished(study_lib.open_study(cfg))) == 2

@pytest.mark.slow  # search, promotion, merge and benchmark in one go
def test_full_pipeline_promotes_merges_benchmarks_and_reports(make_cfg, caplog, wandb_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers import pipeline as hf_pipeline

    cfg = make_cfg(*SMALL, "sweep.n_trials=2", "++sweep.promotion={trainer.max_steps: 12, trainer.eval_every: 0}",
                   "benchmark.latency_prompts=2", "benchmark.repeats=1", "benchmark.max_new_tokens=4", tracking="wandb")
    pipeline.run(cfg)
    out = study_lib.study_dir(cfg)
    best = json.loads((out / "best.json").read_text())
    assert (out / "best.yaml").exists() and best["trial"] in (0, 1)
    full = json.loads((out / "full" / "metrics.json").read_text())
    assert full["steps"] == 12 and full["trial_value"] == best["value"] and full["full_value"] == full["eval_loss"]
    merged = out / "full" / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert hf_pipeline("text-generation", model=str(merged))("Hello", max_new_tokens=2)[0]["generated_text"]
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "full" / "adapter" / "adapter_config.json")
                                                           .read_text())["base_model_name_or_path"])
    assert isinstance(PeftModel.from_pretrained(base, out / "full" / "adapter"), PeftModel)
    bench = json.loads((out / "benchmark.json").read_text())
    assert {"base", "tuned"} <= set(bench) and bench["tuned"]["eval_loss"] < bench["base"]["eval_loss"]
    report = (out / "report.md").read_text()
    assert "## Promotion" in report and "## Benchmark" in report
    first = (best.get("promotion") or {}).get("best_trial", best["trial"])  # the best short trial
    assert f"## {'Best' if first == best['trial'] else 'Promoted'} trial: #{best['trial']}" in report

    # W&B (offline): a run per trial, the full run with its adapter, the benchmark, the sweep summary.
    runs = wandb_runs(out)
    assert {"trial-0000", "trial-0001", "full-trial-0000", "full-trial-0001", f"promoted-trial-{best['trial']:04d}",
            "benchmark-rank_lr", "summary-rank_lr"} <= set(runs)  # top_k 3: both trials re-trained in full
    assert {r["group"] for r in runs.values()} == {"rank_lr"}
    full_run = runs[f"full-trial-{best['trial']:04d}"]
    assert full_run["job_type"] == "full" and full_run["summary"]["eval_loss"] == pytest.approx(full["eval_loss"])
    promoted = runs[f"promoted-trial-{best['trial']:04d}"]  # the promoted run: the adapter and the weight analysis
    assert {"name": "rank_lr-adapter", "type": "model"} in promoted["artifacts"]
    assert promoted["summary"]["weights/effective_rank_max"] >= 1
    assert runs["benchmark-rank_lr"]["summary"]["tuned/eval_loss"] == pytest.approx(bench["tuned"]["eval_loss"])
    summary = runs["summary-rank_lr"]
    assert summary["job_type"] == "summary" and summary["config"]["best_params"] == best["params"]
    assert summary["summary"]["best_value"] == pytest.approx(best["value"])

    # A second run resumes: nothing trains, merges or benchmarks again.
    stamps = {p: p.stat().st_mtime for p in (out / "full" / "metrics.json", out / "merge.json", out / "benchmark.json")}
    import pytest as _pytest

    from lora_search.commands import train_stage as runs_mod

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs_mod, "start_worker", lambda *a, **k: _pytest.fail("loaded a model on resume"))
        pipeline.run(cfg)
    assert all(p.stat().st_mtime == t for p, t in stamps.items())
