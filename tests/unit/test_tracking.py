"""W&B tracking: one offline run per trial, read back from its files; a W&B failure never fails a trial."""

from __future__ import annotations

import json
import logging

import optuna
import pytest

from lora_search.commands import pipeline
from lora_search.report import wandb_summary
from lora_search.search import study as study_lib
from lora_search.train import tracking

SMALL = ["data.train_per_task=24", "data.eval_per_task=6", "++sweep.trial={trainer.max_steps: 8, trainer.eval_every: 2, "
         "trainer.batch_size: 4, trainer.exact_match_items: 4, trainer.max_new_tokens: 8, trainer.logging_steps: 1}"]
TWO_TRIALS = [*SMALL, "stage=search", "sweep.n_trials=2",
              "++sweep.pruner={type: median, n_startup_trials: 1, n_warmup_steps: 0}",
              "sweep.enqueue=[{trainer.learning_rate: 0.003}, {trainer.learning_rate: 1e30}]"]


def test_each_trial_is_one_offline_run_with_config_steps_summary_and_tags(make_cfg, wandb_runs, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg(*TWO_TRIALS, tracking="wandb")
    pipeline.run(cfg)
    study = study_lib.open_study(cfg)
    runs = wandb_runs(study_lib.study_dir(cfg))  # offline, under results/<study>/wandb/
    assert set(runs) == {"trial-0000", "trial-0001"}

    done = runs["trial-0000"]
    assert (done["group"], done["job_type"]) == ("rank_lr", "trial")
    params = study.trials[0].user_attrs["params"]
    assert done["config"]["params"] == params and done["config"]["trial"] == 0
    assert done["config"]["lora"]["r"] == params["lora.r"]  # the resolved config, with the sampled values applied
    assert done["config"]["trainer"]["learning_rate"] == 0.003 and done["config"]["trainer"]["max_steps"] == 8
    steps = [row["_step"] for row in done["history"] if "train/loss" in row]
    assert steps == sorted(steps) and len(steps) >= 4  # the loss over optimizer steps
    assert any("eval/loss" in row for row in done["history"])  # the pruning evals
    rates = [row["train/learning_rate"] for row in done["history"] if "train/learning_rate" in row]
    assert len(rates) >= 4 and max(rates) == pytest.approx(0.003)  # the learning rate over optimizer steps,
    assert len(set(rates)) > 1  # following its schedule (warmup, decay)
    assert done["summary"]["eval_loss"] == pytest.approx(study.trials[0].value)
    assert done["summary"]["status"] == "complete" and "complete" in done["tags"]
    assert done["exit_code"] == 0

    pruned = runs["trial-0001"]
    assert study.trials[1].state == optuna.trial.TrialState.PRUNED
    assert "pruned" in pruned["tags"] and pruned["summary"]["status"] == "pruned"
    reason = study.trials[1].user_attrs["reason"]
    assert reason[: tracking.TAG_MAX] in pruned["tags"] and pruned["summary"]["reason"] == reason


def test_a_wandb_failure_warns_once_and_the_sweep_goes_on(make_cfg, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    unpruned = [o for o in TWO_TRIALS if not o.startswith("++sweep.pruner")] + ["sweep.pruner=none"]
    cfg = make_cfg(*unpruned, "sweep.enqueue=[]", tracking="wandb")  # two sampled trials, neither pruned
    with caplog.at_level(logging.WARNING, logger="lora_search.train.tracking"):
        pipeline.run(cfg)
    study = study_lib.open_study(cfg)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    warnings = [r for r in caplog.records if "W&B tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and "api.wandb.ai unreachable" in warnings[0].getMessage()
    assert not (study_lib.study_dir(cfg) / "wandb").exists()


def test_a_failure_inside_a_run_does_not_fail_the_trial(make_cfg, monkeypatch, caplog):
    calls = []

    def log_fails(run, metrics, step=None):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "log_metrics", tracking._safe(log_fails))
    cfg = make_cfg(*TWO_TRIALS, "sweep.enqueue=[]", "sweep.n_trials=1", tracking="wandb")
    pipeline.run(cfg)
    assert calls == [calls[0]]  # the first failure switched tracking off
    assert study_lib.open_study(cfg).trials[0].state == optuna.trial.TrialState.COMPLETE
    assert "disk full" in caplog.text


def test_auto_by_default_and_an_explicit_mode_always_honoured(make_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert make_cfg(tracking="wandb").tracking.mode == "auto"
    assert tracking.mode(make_cfg(tracking="wandb")) == "offline"  # auto without a key
    assert tracking.mode(make_cfg("tracking.mode=online", tracking="wandb")) == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.mode(make_cfg(tracking="wandb")) == "online"  # auto with a key
    assert tracking.mode(make_cfg("tracking.mode=offline", tracking="wandb")) == "offline"  # the key does not win
    assert not tracking.enabled(make_cfg("tracking.mode=disabled", tracking="wandb"))
    assert not tracking.enabled(make_cfg(tracking="none"))
    assert tracking.start(make_cfg(tracking="none"), "unused", "x", "trial") is None


def test_an_explicit_offline_with_a_key_writes_offline_runs(make_cfg, wandb_runs, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key that would make an online run try the network
    cfg = make_cfg("tracking.mode=offline", tracking="wandb")
    run = tracking.start(cfg, tmp_path, "probe", "trial", {"note": "postgresql://u:hunter2x@db/x"})
    tracking.finish(run, {"reason": "failed at postgresql://u:hunter2x@db/x"})
    probe = wandb_runs(tmp_path)["probe"]
    assert probe["config"]["note"] == "postgresql://u:***@db/x" and probe["summary"]["reason"].endswith("u:***@db/x")
    assert not tracking._broken


def test_the_default_config_tracks_to_wandb():
    from lora_search.config.compose import load_config

    cfg = load_config([])
    assert (cfg.tracking.backend, cfg.tracking.mode) == ("wandb", "auto")


def test_summaries_flatten_nested_numbers_and_drop_what_wandb_cannot_chart():
    flat = tracking._scalars({"tuned": {"eval_loss": 0.5, "samples": [1, 2]}, "x": float("nan"), "ok": True,
                              "name": "qv", "n": 3})
    assert flat == {"tuned/eval_loss": 0.5, "name": "qv", "n": 3}


def test_the_sweep_summary_run_has_best_params_importances_and_the_reports_plots(make_cfg, wandb_runs, monkeypatch,
                                                                                 tmp_path):
    """README: a sweep summary (`summary`: best params, importance table, the report's plots) is a run too."""
    import matplotlib.image
    import numpy as np

    from tests.unit.test_report import make_study

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg(tracking="wandb")
    out = tmp_path / "out"
    study = make_study(out, n_trials=8, pruned=(3,))
    (out / "plots").mkdir()
    matplotlib.image.imsave(out / "plots" / "importance.png", np.zeros((4, 4, 3)))  # as report.write_report leaves
    # the promotion's records: its Spearman and what the promoted adapter learned (weights.py) join the summary
    from lora_search.core import records
    from lora_search.promote import weights
    from tests.unit.test_weights import make_adapter

    adapter = make_adapter(out / "full" / "adapter", {(0, "q_proj"): [3.0, 2.0], (1, "v_proj"): [1.0]})
    analysis = weights.write(adapter, out / "full" / "weights.json", out / "plots")
    records.write_json(out / "full" / "metrics.json", {"promotion": {"spearman": 0.5, "top_k": 3, "chosen": 2,
                                                                     "best_trial": 0}})
    wandb_summary.log_study(study, cfg, out)

    run = wandb_runs(out)[f"summary-{cfg.sweep.name}"]
    assert run["job_type"] == "summary" and run["exit_code"] == 0
    assert run["config"]["best_params"] == study.best_params
    assert run["summary"]["best_value"] == pytest.approx(study.best_value)
    assert {f"best_params/{k}" for k in study.best_params} <= set(run["summary"])
    assert any(k.startswith("importances/") for k in run["summary"])  # the shares, flattened
    logged = {k: v for row in run["history"] for k, v in row.items()}  # a logged object's fields, keys joined by /
    assert (logged["importance/_type"], logged["importance/nrows"]) == ("table-file", len(study.best_params))
    assert logged["importance/ncols"] == 4  # param, importance and its interval's low and high
    assert logged["plots/importance/_type"] == "image-file"  # the report's plot
    assert logged["plots/weights_effective_rank/_type"] == "image-file"  # the adapter's heatmaps
    assert run["summary"]["promotion/spearman"] == 0.5 and run["summary"]["promotion/chosen"] == 2
    assert run["summary"]["weights/effective_rank_max"] == analysis["summary"]["effective_rank_max"] == 2


def test_a_dpo_benchmark_run_shows_preference_accuracy_base_and_tuned(make_cfg, wandb_runs, monkeypatch, tmp_path):
    """README (Preference tuning): the W&B benchmark run holds each model's preference accuracy and the tuned model's
    reward accuracy against the base, in its summary and its side-by-side table."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg("sweep=dpo_beta", tracking="wandb")
    bench = {"base": {"preference_accuracy": 0.17, "logp_margin": -5.0, "latency_p50_s": 0.5},
             "tuned": {"preference_accuracy": 0.98, "logp_margin": 12.0, "reward_accuracy": 0.99,
                       "reward_margin": 1.7, "latency_p50_s": 0.5}}
    tracking.log_benchmark(cfg, tmp_path, bench)
    runs = wandb_runs(tmp_path)
    assert len(runs) == 1  # one offline run: the benchmark's
    run = next(iter(runs.values()))
    assert run["summary"]["base/preference_accuracy"] == pytest.approx(0.17)
    assert run["summary"]["tuned/preference_accuracy"] == pytest.approx(0.98)
    assert run["summary"]["tuned/reward_accuracy"] == pytest.approx(0.99)
    table = json.loads(next(tmp_path.glob("wandb/offline-run-*/files/media/table/*.table.json")).read_text())
    rows = {row[0]: row[1:] for row in table["data"]}
    assert table["columns"] == ["metric", "base", "tuned"]
    assert rows["preference_accuracy"] == [0.17, 0.98] and rows["reward_accuracy"] == [None, 0.99]
