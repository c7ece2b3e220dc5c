"""Failures are bounded and explained: any error fails its trial only (type, message and step recorded), an
out-of-memory trial gives its memory back before the next, sweep.max_failures stops a sweep that keeps failing with
a grouped summary, and a trial left RUNNING by a dead worker on this machine is failed when the next run starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState
from transformers import TrainerCallback

from lora_search.commands import pipeline
from lora_search.core import hardware
from lora_search.core.errors import ConfigError
from lora_search.models import loaders
from lora_search.scale import dead_workers
from lora_search.search import failures
from lora_search.search import study as study_lib

SMALL = ["data.train_per_task=24", "data.eval_per_task=6", "++sweep.trial={trainer.max_steps: 4, trainer.eval_every: 2, "
         "trainer.batch_size: 4, trainer.exact_match_items: 0}", "sweep.pruner=none"]


class Raise(TrainerCallback):
    """Raise `error` at the end of optimizer step `step`: mid-training, with activations and optimizer state alive."""

    def __init__(self, error: BaseException, step: int = 1):
        self.error, self.step = error, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise self.error


def _inject(monkeypatch, errors: list, before=None):
    """Make the next trials raise errors[i] at step 1 (None: train normally); `before(worker)` runs before each."""
    original, calls = study_lib.train_adapter, []

    def train(worker, cfg, out, callbacks=(), **kwargs):
        index = len(calls)
        calls.append(index)
        if before:
            before(worker)
        error = errors[index] if index < len(errors) else None
        extra = [Raise(error)] if error is not None else []
        return original(worker, cfg, out, callbacks=[*callbacks, *extra], **kwargs)

    monkeypatch.setattr(study_lib, "train_adapter", train)
    return calls


def _status(cfg, number: int) -> dict:
    return json.loads((study_lib.study_dir(cfg) / "trials" / f"{number:04d}" / "status.json").read_text())


def test_any_exception_fails_only_its_trial_and_the_sweep_goes_on(make_cfg, monkeypatch):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=2")
    _inject(monkeypatch, [KeyError("missing"), OSError("disk gone"), TypeError("bad type")])
    assert pipeline.run(cfg) == 0
    trials = study_lib.open_study(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 2
    expected = ["KeyError: 'missing'", "OSError: disk gone", "TypeError: bad type"]
    for trial, reason in zip(trials, expected):
        assert trial.user_attrs["reason"] == reason and trial.user_attrs["failed_at"] == "at step 1"
        assert trial.user_attrs["error_type"] == reason.split(":")[0]
        assert _status(cfg, trial.number) == {**_status(cfg, trial.number), "status": "failed", "reason": reason}
    assert trials[3].user_attrs["reason"] is None and _status(cfg, 3)["status"] == "complete"


def test_an_out_of_memory_trial_frees_its_memory_and_leaves_the_base_untouched(make_cfg, monkeypatch):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=1")
    seen = []  # (tensor memory, base checksum) as each trial starts, the base and data already loaded

    def before(worker):
        seen.append((hardware.tensor_memory_mb(worker.base.model), loaders.checksum(worker.base.model)))

    _inject(monkeypatch, [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")], before)
    assert pipeline.run(cfg) == 0
    trials = study_lib.open_study(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["reason"].startswith("OutOfMemoryError: CUDA out of memory")
    (before_mb, before_sum), (after_mb, after_sum) = seen
    assert after_sum == before_sum  # the adapter came off the base
    assert after_mb == pytest.approx(before_mb, abs=0.01)  # the failed trial's adapter, optimizer and activations went


def test_max_failures_stops_the_sweep_with_a_grouped_summary(make_cfg, monkeypatch, capsys):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=3", "sweep.max_failures=3",
                   "++sweep.space={lora.r: {type: categorical, choices: [16]}, "
                   "trainer.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}")
    calls = _inject(monkeypatch, [torch.OutOfMemoryError("CUDA out of memory")] * 10)
    assert pipeline.run(cfg) == failures.EXIT_FAILURES == 4
    assert len(calls) == 3  # stopped at the limit
    trials = study_lib.open_study(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    err = capsys.readouterr().err
    block = err[err.index("error: "):]
    assert block.startswith("error: 3 trials failed in a row (sweep.max_failures=3); the sweep stopped:\n"
                            "  3x OutOfMemoryError at step 1 with r=16: CUDA out of memory (trials #0, #1, #2)\n")
    assert "learning_rate" not in block and "Traceback" not in block  # only what the failing trials share


def test_a_success_resets_the_count_of_failures_in_a_row(make_cfg, monkeypatch):
    cfg = make_cfg(*SMALL, "stage=search", "sweep.n_trials=2", "sweep.max_failures=2")
    _inject(monkeypatch, [KeyError("a"), None, KeyError("b")])
    assert pipeline.run(cfg) == 0
    states = [t.state for t in study_lib.open_study(cfg).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


def _failed(number: int, params: dict, reason: str, kind: str | None, where: str | None):
    dists = {"lora.r": optuna.distributions.CategoricalDistribution([8, 64]),
             "trainer.batch_size": optuna.distributions.CategoricalDistribution([4, 16]),
             "trainer.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    attrs = {"reason": reason, "error_type": kind, "failed_at": where}
    trial = optuna.trial.create_trial(state=TrialState.FAIL, params=params,
                                      distributions={k: dists[k] for k in params}, user_attrs=attrs)
    trial.number = number
    return trial


def test_the_summary_groups_by_error_and_names_the_shared_params():
    oom = [_failed(i, {"lora.r": 64, "trainer.batch_size": 16, "trainer.learning_rate": 1e-3 * (i + 1)},
                   f"OutOfMemoryError: CUDA out of memory. Tried to allocate {i + 1}.00 GiB", "OutOfMemoryError",
                   "at step 1") for i in range(4)]
    other = [_failed(4, {"lora.r": 8, "trainer.batch_size": 4, "trainer.learning_rate": 1e-4}, "KeyError: 'labels'",
                     "KeyError", "before training"),
             _failed(5, {"lora.r": 8, "trainer.batch_size": 4, "trainer.learning_rate": 1e-4}, "eval_loss is nan",
                     None, None)]
    text = failures.summarize(oom + other, 6)
    lines = text.splitlines()
    assert lines[0] == "6 trials failed in a row (sweep.max_failures=6); the sweep stopped:"
    assert lines[1] == ("  4x OutOfMemoryError at step 1 with r=64, batch_size=16: CUDA out of memory. Tried to "
                        "allocate 1.00 GiB (trials #0, #1, #2, #3)")
    assert "  1x KeyError before training with r=8, batch_size=4, learning_rate=0.0001: 'labels' (trials #4)" in lines
    assert "  1x no error type with r=8, batch_size=4, learning_rate=0.0001: eval_loss is nan (trials #5)" in lines
    assert "raise sweep.max_failures" in lines[-1]


@pytest.mark.parametrize("value", ["0", "-2"])  # a non-integer is refused by composition, like any typed key
def test_a_bad_max_failures_is_refused_naming_the_key(make_cfg, value):
    with pytest.raises(ConfigError) as info:
        study_lib.check_sweep(make_cfg(f"sweep.max_failures={value}"))
    assert any(p.startswith("sweep.max_failures must be a positive integer") for p in info.value.problems)
    study_lib.check_sweep(make_cfg("sweep.max_failures=null"))  # null: never stop


def test_a_dead_local_workers_trial_is_failed_and_queued_again(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for worker in (f"{host}:{dead.pid}", f"other-host:{dead.pid}", f"{host}:{live.pid}"):
            trial = study.ask()
            trial.suggest_float("trainer.learning_rate", 1e-4, 1e-2, log=True)
            trial.set_user_attr("worker", worker)
        assert dead_workers.fail_dead_workers(study, tmp_path) == [0]
        trials = study.trials
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING,
                                             TrialState.WAITING]
        reason = f"worker died (pid {dead.pid})"
        assert trials[0].user_attrs["reason"] == reason and trials[0].user_attrs["status"] == "failed"
        assert json.loads((tmp_path / "trials" / "0000" / "status.json").read_text())["reason"] == reason
        assert trials[3].user_attrs == {"retry_of": 0}  # the same configuration runs next, once
        assert dead_workers.fail_dead_workers(study, tmp_path) == [] and len(study.trials) == 4
    finally:
        live.kill()
        live.wait()
    assert os.getpid() != dead.pid
