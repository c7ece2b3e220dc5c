"""Chaos: three workers on one study while a killer SIGKILLs a random worker in the middle of a trial every few seconds
(four times) and a supervisor restarts it. Afterwards no trial is left running or waiting, every failure has a reason, exactly n_trials finished, and the
promoted configuration is the best finished trial in the storage."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lora_search.scale import slots

pytestmark = pytest.mark.slow  # 3 worker processes, restarted again and again (about 2 minutes on 2 cores)
REPO = Path(__file__).resolve().parents[2]
N_TRIALS, WORKERS, KILLS = 18, 3, 4
HANG_S = 900  # a guard against a hang, not a speed target: a loaded machine is slow, never wrong


def test_workers_killed_at_random_leave_a_consistent_study_and_the_best_is_promoted(tmp_path, tiny_cache):
    name = f"chaos_{uuid.uuid4().hex[:8]}"
    common = ["model=tiny_llama", f"cache_dir={tiny_cache}", f"results_dir={tmp_path}", f"sweep.name={name}",
              f"sweep.n_trials={N_TRIALS}", "sweep.heartbeat_s=2", "tracking=none", "data.train_per_task=24",
              "data.eval_per_task=6", "sweep.pruner=none",
              "++sweep.trial={trainer.max_steps: 16, trainer.eval_every: 8, trainer.batch_size: 4, "
              "trainer.exact_match_items: 0}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(index: int, attempt: int) -> subprocess.Popen:
        out = open(logs / f"worker{index}.{attempt}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "lora_search", *common, "stage=search", f"worker={index}"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    rng = random.Random(0)
    attempts = {i: 0 for i in range(WORKERS)}
    procs = {i: start(i, 0) for i in range(WORKERS)}
    done, kills, codes = set(), 0, []
    t0 = time.monotonic()
    next_kill = t0 + 5
    storage = f"sqlite:///{tmp_path / name / 'study.db'}"
    while len(done) < WORKERS:
        assert time.monotonic() - t0 < HANG_S, f"not finished after {HANG_S} s ({kills} kills)"
        for i, proc in procs.items():
            if i in done or proc.poll() is None:
                continue
            codes.append(proc.returncode)
            if proc.returncode == 0:
                done.add(i)
            else:  # the supervisor restarts a killed worker (same worker index, as SLURM or Kubernetes would)
                attempts[i] += 1
                procs[i] = start(i, attempts[i])
        if kills < KILLS and time.monotonic() >= next_kill:
            # a worker in the middle of a trial (its pid is on a RUNNING trial), however slow the machine is
            training = _pids_running_a_trial(storage, name) & {p.pid for i, p in procs.items()
                                                               if i not in done and p.poll() is None}
            if training:
                os.kill(rng.choice(sorted(training)), signal.SIGKILL)
                kills += 1
                next_kill = time.monotonic() + rng.uniform(3, 7)
        time.sleep(0.5)
    assert kills == KILLS, f"only {kills} kills: the workers finished before the killer was done"
    assert set(codes) <= {0, -signal.SIGKILL}, codes  # workers either finished or were killed

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials()
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}, \
        [(t.number, t.state.name) for t in trials]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("reason") for t in failed), [(t.number, t.user_attrs) for t in failed]
    assert len(slots.finished(study)) == N_TRIALS
    assert any(t.user_attrs["reason"].startswith(("worker died", "worker stopped sending heartbeats"))
               for t in failed), "no trial was killed mid-run"

    # the later stages, once: the promoted configuration is the best finished trial in the storage
    promote = subprocess.run([sys.executable, "-m", "lora_search", *common, "stage=promote",
                              "++sweep.promotion={trainer.max_steps: 4, trainer.eval_every: 0, top_k: 1}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert promote.returncode == 0, promote.stdout[-2000:] + promote.stderr[-2000:]
    best = yaml.safe_load((tmp_path / name / "best.yaml").read_text())
    chosen = study.best_trial
    assert all(_get(best, key) == value for key, value in chosen.params.items()), (chosen.params, best)


def _pids_running_a_trial(storage: str, name: str) -> set[int]:
    """The pids recorded (host:pid, the `worker` attribute) on the study's RUNNING trials; none before it exists."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # no study yet, or the database is being created
        return set()
    return {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in running if "worker" in t.user_attrs}


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree
