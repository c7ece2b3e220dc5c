"""Stages from what is on disk (README "The sweep"): a finished stage is skipped on a second run unless it is named
or force=true; the sweep shows each trial and ends with the trial table and the report's path; sweep.timeout_s ends a
search early."""

from __future__ import annotations

import json

import logging
import re

import optuna
import pytest

from lora_search.commands import pipeline, train_stage
from lora_search.report import study_report
from lora_search.search import study as study_lib

SMALL = ["data.train_per_task=24", "data.eval_per_task=6", "++sweep.trial={trainer.max_steps: 8, trainer.eval_every: 4, "
         "trainer.batch_size: 4, trainer.exact_match_items: 0, trainer.max_new_tokens: 4}"]


def test_a_timeout_ends_the_search_before_n_trials(make_cfg):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=50", "sweep.timeout_s=1", "sweep.pruner=none")
    assert pipeline.run(cfg) == 0
    study = study_lib.open_study(cfg)
    finished = study_lib.finished(study)
    assert 1 <= len(finished) < 50  # the trial running when the budget ran out finishes; no new one starts
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.slow  # a whole tiny pipeline, then three more runs of its later stages
def test_finished_stages_are_skipped_unless_named_or_forced_and_the_sweep_ends_with_its_table(make_cfg, capsys,
                                                                                            caplog, monkeypatch):
    common = [*SMALL, "sweep.n_trials=2", "sweep.pruner=none",
              "++sweep.promotion={trainer.max_steps: 8, trainer.eval_every: 0, trainer.exact_match_items: 2}",
              "benchmark.latency_prompts=1", "benchmark.repeats=1", "benchmark.max_new_tokens=2",
              "benchmark.int8_dynamic=false"]
    cfg = make_cfg(*common)
    with caplog.at_level(logging.INFO, logger="lora_search"):
        assert pipeline.run(cfg) == 0
    out = study_lib.study_dir(cfg)
    progress = [r.getMessage() for r in caplog.records if re.match(r"trial \d+/2 (COMPLETE|PRUNED)", r.getMessage())]
    assert len(progress) == 2, progress  # each trial shown as it finishes
    printed = capsys.readouterr().out
    header = study_report.table(*study_report.trial_rows(study_lib.open_study(cfg), cfg.sweep.metric)).splitlines()[0]
    assert header.startswith("| # | state |") and header in printed  # the trial table
    assert printed.rstrip().splitlines()[-1] == f"report: {out / 'report.md'}"  # and last, the report's path

    timings = json.loads((out / "timings.json").read_text())  # every stage's wall seconds, in the order they ran
    assert list(timings) == ["search", "promote", "merge", "benchmark", "report"]
    assert all(len(runs) == 1 and runs[0]["seconds"] > 0 for runs in timings.values())
    assert [timings[s][0]["ended"] for s in timings] == sorted(timings[s][0]["ended"] for s in timings)
    files = {name: out / name for name in ("benchmark.json", "merge.json")} | {"full": out / "full" / "metrics.json"}

    def stamps():
        return {name: path.stat().st_mtime_ns for name, path in files.items()}

    first = stamps()
    monkeypatch.setattr(train_stage, "start_worker", lambda *a, **k: pytest.fail("stage=all loaded a model again"))
    assert pipeline.run(cfg) == 0  # the same command: every stage finished, nothing redone
    assert stamps() == first
    monkeypatch.undo()

    assert pipeline.run(make_cfg(*common, "stage=benchmark")) == 0  # a named stage runs again, alone
    second = stamps()
    assert second["benchmark.json"] > first["benchmark.json"]
    again = json.loads((out / "timings.json").read_text())  # earlier runs kept; merge and benchmark were skipped
    assert again["benchmark"][0] == timings["benchmark"][0] and len(again["benchmark"]) == 2
    assert again["merge"] == timings["merge"] and len(again["search"]) == len(again["report"]) == 2
    assert (second["merge.json"], second["full"]) == (first["merge.json"], first["full"])

    assert pipeline.run(make_cfg(*common, "force=true")) == 0  # force: promotion, merge and benchmark again
    third = stamps()
    assert all(third[name] > second[name] for name in files), (second, third)
    assert len(study_lib.finished(study_lib.open_study(cfg))) == 2  # the finished search is never redone


@pytest.mark.slow  # worker processes started by Hydra's submitit launcher, each loading the model
def test_submitit_launcher_runs_two_workers_on_one_shared_study_then_the_later_stages_once(tmp_path, tiny_cache):
    """README (SLURM): `-m stage=search hydra/launcher=slurm sweep.workers=N`; the shipped `local` launcher runs the same
    submitit path without a cluster: 2 workers share one study, which ends at exactly n_trials; then two `stage=all`
    jobs of the same launcher find the search finished, and exactly one of them promotes, merges and reports."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install '.[slurm]'")
    shared = tmp_path / "shared"
    shared.mkdir()
    url = f"sqlite:///{shared / 'study.db'}"
    results = tmp_path / "results"
    common = ["hydra/launcher=local", "model=tiny_llama", f"results_dir={results}", f"cache_dir={tiny_cache}",
              "tracking=none", *SMALL, "sweep.n_trials=3", "sweep.pruner=none", f"sweep.storage={url}"]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "lora_search", "-m", "stage=search", "sweep.workers=2", *common],
                          cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="rank_lr", storage=url)
    finished = study_lib.finished(study)
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers (jobs) ran trials
    assert len(finished) == 3  # exactly n_trials: slots, not one more per worker
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    proc = subprocess.run([sys.executable, "-m", "lora_search", "-m", "stage=all", "worker=range(2)", *common,
                           "benchmark.latency_prompts=1", "benchmark.int8_dynamic=false",
                           "++sweep.promotion={trainer.max_steps: 4, trainer.eval_every: 0}"],
                          cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [p.read_text() for p in (results / "rank_lr" / "submitit").rglob("*_log.*")]
    assert sum("this process promotes" in text for text in logs) == 1, logs
    assert sum("the promotion is claimed by" in text for text in logs) == 1
    assert (results / "rank_lr" / "full" / "merged").is_dir() and (results / "rank_lr" / "report.md").exists()
    assert len(study_lib.finished(study)) == 3  # the finished search was not run again
