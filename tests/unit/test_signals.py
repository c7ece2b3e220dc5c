"""Signals sent to a real `python -m lora_search` process: SIGTERM and SIGINT fail the running trial as `interrupted`
and exit 143 / 130 within 30 s; after SIGKILL, the next run fails the dead worker's trial at once; either way the same
command run again finishes the study with exactly n_trials finished and none left RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lora_search.scale import workers
from lora_search.search import interrupts

REPO = Path(__file__).resolve().parents[2]
N_TRIALS = 2


def _command(tmp_path: Path, cache: str) -> list[str]:
    return [sys.executable, "-m", "lora_search", "stage=search", "model=tiny_llama", "tracking=none",
            f"results_dir={tmp_path / 'results'}", f"cache_dir={cache}", "data.train_per_task=24",
            "data.eval_per_task=6", "sweep.pruner=none", f"sweep.n_trials={N_TRIALS}",
            "++sweep.trial={trainer.max_steps: 100, trainer.eval_every: 50, trainer.batch_size: 4, "
            "trainer.exact_match_items: 0}"]


def _start(tmp_path: Path, cache: str, log_name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(_command(tmp_path, cache), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)


def _in_first_trial(proc: subprocess.Popen, tmp_path: Path, timeout_s: float = 120) -> None:
    """Wait until the first trial is training: its folder exists (made as it starts; a 100-step trial takes seconds
    even warm), a moment for the first steps, and no status.json yet (written as it ends)."""
    folder = tmp_path / "results" / "rank_lr" / "trials" / "0000"
    deadline = time.monotonic() + timeout_s
    while not folder.exists():
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first trial never started"
        time.sleep(0.1)
    time.sleep(0.5)
    assert proc.poll() is None and not (folder / "status.json").exists()


def _trials(tmp_path: Path) -> list:
    storage = f"sqlite:///{tmp_path / 'results' / 'rank_lr' / 'study.db'}"
    return optuna.load_study(study_name="rank_lr", storage=storage).trials


def _status(tmp_path: Path, number: int) -> dict:
    return json.loads((tmp_path / "results" / "rank_lr" / "trials" / f"{number:04d}" / "status.json").read_text())


def _finish_again(tmp_path: Path, cache: str) -> list:
    """Run the same command again: it must end the study with exactly n_trials finished and none RUNNING."""
    proc = _start(tmp_path, cache, "run2.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    trials = _trials(tmp_path)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == N_TRIALS
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    return trials


# Each runs the command twice (interrupted, then resumed).
@pytest.mark.slow  # each runs the command twice in subprocesses
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_fails_the_trial_as_interrupted_and_the_same_command_resumes(tmp_path, tiny_cache, signum, code):
    proc = _start(tmp_path, tiny_cache, "run1.log")
    try:
        _in_first_trial(proc, tmp_path)
        sent = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == code
        assert time.monotonic() - sent < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "run1.log").read_text()
    assert f"error: interrupted ({signal.Signals(signum).name})" in log
    first = _trials(tmp_path)[0]
    assert first.state == TrialState.FAIL and first.user_attrs["reason"] == "interrupted"
    assert _status(tmp_path, 0)["status"] == "failed" and _status(tmp_path, 0)["reason"] == "interrupted"
    assert not [t for t in _trials(tmp_path) if t.state == TrialState.RUNNING]
    if signum == signal.SIGINT:
        return  # resuming is the same code path as after SIGTERM
    trials = _finish_again(tmp_path, tiny_cache)
    assert trials[1].params == first.params and trials[1].user_attrs["retry_of"] == 0  # the interrupted one first


@pytest.mark.slow
def test_after_sigkill_the_next_run_fails_the_dead_workers_trial_and_finishes(tmp_path, tiny_cache):
    proc = _start(tmp_path, tiny_cache, "run1.log")
    try:
        _in_first_trial(proc, tmp_path)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _trials(tmp_path)[0].state == TrialState.RUNNING  # nothing could record it
    trials = _finish_again(tmp_path, tiny_cache)
    reason = f"worker died (pid {proc.pid})"
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"] == reason
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0  # retried once, first
    assert _status(tmp_path, 0) == {**_status(tmp_path, 0), "status": "failed", "reason": reason}


def test_signals_raise_interrupted_in_the_main_thread_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(interrupts.Interrupted) as info:
        with interrupts.signals_handled():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted long before this ends
    assert info.value.signum == signal.SIGTERM and interrupts.exit_code(info.value) == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_forwards_the_signal_then_kills_a_worker_that_ignores_it(tmp_path):
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout.readline().strip() == b"ready"
    started = time.monotonic()
    assert workers.stop([polite, stubborn], signal.SIGTERM, grace_s=1.0) == [-signal.SIGTERM, -signal.SIGKILL]
    assert time.monotonic() - started < 10


def test_an_interrupted_search_forwards_the_signal_to_the_workers_it_started(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    # SIGINT at its default in the worker, whatever this test process inherited (a shell runs background jobs with
    # SIGINT ignored, and an ignored signal stays ignored across exec). The signal is sent only once the worker says it
    # is up: a SIGINT while Python is still importing `site` is a fatal init error (exit 1), not a signal death (CI saw it)
    worker = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert worker.stdout.readline().strip() == b"ready"
        with pytest.raises(interrupts.Interrupted):
            with interrupts.stopping(study, tmp_path, [worker]):
                raise interrupts.Interrupted(signal.SIGINT)
        assert worker.wait(timeout=10) == -signal.SIGINT
    finally:
        if worker.poll() is None:
            worker.kill()


@pytest.mark.slow  # a subprocess interrupted mid-run
def test_sigterm_during_a_train_run_records_it_as_interrupted_and_exits_143(tmp_path, tiny_cache):
    run = tmp_path / "results" / "runs" / "t"
    cmd = [sys.executable, "-m", "lora_search", "stage=train", "model=tiny_llama", "tracking=none", "run_name=t",
           f"results_dir={tmp_path / 'results'}", f"cache_dir={tiny_cache}", "data.train_per_task=24",
           "data.eval_per_task=6", "trainer.max_steps=400", "trainer.batch_size=4", "trainer.eval_every=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "training 400 steps" not in (tmp_path / "train.log").read_text():
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    text = (tmp_path / "train.log").read_text()
    assert code == 143 and time.monotonic() - sent < 30, text[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert (status["status"], status["reason"]) == ("failed", "interrupted")
    assert "Traceback" not in text and "error: interrupted (SIGTERM)" in text
