"""Several workers on one study (SQLite here, PostgreSQL when CI starts one), and a dead worker's trial retried."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from lora_search.search import study as study_lib
from tests.conftest import TINY_FAST

pytestmark = pytest.mark.slow  # worker subprocesses: minutes on 2 cores
REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("LORA_SEARCH_TEST_PG")
SMALL = ["data.train_per_task=24", "data.eval_per_task=6",
         "++sweep.trial={trainer.max_steps: 6, trainer.eval_every: 3, trainer.batch_size: 4, "
         "trainer.exact_match_items: 0}"]


@pytest.mark.parametrize("backend", ["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.skipif(
    not PG_URL, reason="set LORA_SEARCH_TEST_PG to a PostgreSQL URL (.ci/run starts one)"))])
def test_two_workers_share_one_study(backend, tmp_path, tiny_cache, make_cfg):
    """README (Storages by scale): SQLite, a journal file and PostgreSQL each carry two workers, and the study ends
    with exactly n_trials finished trials (not one per worker more)."""
    name = f"shared_{uuid.uuid4().hex[:8]}"
    storage = {"postgresql": [f"sweep.storage={PG_URL}"], "sqlite": [],
               "journal": [f"sweep.storage=journal://{tmp_path / 'study.journal'}"]}[backend]
    args = ["model=tiny_llama", f"cache_dir={tiny_cache}", f"results_dir={tmp_path}", "stage=search",
            f"sweep.name={name}", "sweep.n_trials=8", "sweep.workers=2", *storage, *SMALL[:2],
            # trials long enough that worker 1 (a fresh interpreter) has started before worker 0 is done
            SMALL[2].replace("max_steps: 6", "max_steps: 32")]
    proc = subprocess.run([sys.executable, "-m", "lora_search", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cfg = make_cfg(*[a for a in args if not a.startswith(("model=", "cache_dir=", "results_dir="))])
    cfg.results_dir = str(tmp_path)
    study = study_lib.open_study(cfg)
    finished = study_lib.finished(study)
    assert len(finished) == 8  # slots: not one per worker more
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers ran trials
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    assert (tmp_path / name / "workers" / "worker1.log").exists()


def test_a_dead_workers_trial_is_failed_and_retried(make_cfg):
    cfg = make_cfg(*TINY_FAST[:2], *SMALL[2:], "stage=search", "sweep.n_trials=1", "sweep.heartbeat_s=1")
    study = study_lib.open_study(cfg)
    dead = study.ask()  # a worker took a trial...
    study._storage.record_heartbeat(dead._trial_id)  # ...sent one heartbeat, and died
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    from lora_search.commands import pipeline

    pipeline.run(cfg)
    trials = study_lib.open_study(cfg).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials[1:] if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE


def test_workers_opening_one_new_sqlite_study_at_once_all_succeed(tmp_path):
    """Hydra's launchers start workers together: each opens the new study file, and Optuna's table creation must not
    race (without the lock beside the file, all but one failed with `table ... already exists`)."""
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'new.db'}"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_open_study_in_a_worker, args=(url, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert outcomes == ["ok"] * 6
    assert optuna.load_study(study_name="race", storage=url).trials == []


def _open_study_in_a_worker(url: str, barrier, results) -> None:
    from lora_search.config.compose import load_config
    from lora_search.scale import storage

    cfg = load_config(["model=tiny_llama", "tracking=none", f"sweep.storage={url}"])
    barrier.wait(timeout=60)  # all at once, as launched workers are
    try:
        optuna.create_study(study_name="race", storage=storage.open_rdb(cfg), load_if_exists=True)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the outcome is what the test compares
        results.put(f"{type(e).__name__}: {e}"[:200])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_workers_through_the_grpc_proxy(tmp_path, tiny_cache, make_cfg):
    """README (Storages by scale): `python -m lora_search storage-proxy` in front of one database (PostgreSQL when CI
    starts one, else SQLite) and 4 workers with sweep.storage=grpc://host:port; exactly n_trials finish."""
    pytest.importorskip("grpc")
    from lora_search.scale import storage as storage_lib

    port, behind = _free_port(), PG_URL or f"sqlite:///{tmp_path / 'behind.db'}"
    proxy = subprocess.Popen([sys.executable, "-m", "lora_search", "storage-proxy", "--storage", behind, "--port",
                              str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name, url = f"grpc_{uuid.uuid4().hex[:8]}", f"grpc://127.0.0.1:{port}"
    try:
        args = ["model=tiny_llama", f"cache_dir={tiny_cache}", f"results_dir={tmp_path}", "stage=search",
                f"sweep.name={name}", "sweep.n_trials=8", "sweep.workers=4", f"sweep.storage={url}", *SMALL[:2],
                SMALL[2].replace("max_steps: 6", "max_steps: 24")]
        proc = subprocess.run([sys.executable, "-m", "lora_search", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        study = optuna.load_study(study_name=name, storage=storage_lib.open_url(url))
        finished = study_lib.finished(study)
        assert len(finished) == 8 and not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        for index in (1, 2, 3):  # the three workers worker 0 started, each on the proxy
            assert f"storage {url}" in (tmp_path / name / "workers" / f"worker{index}.log").read_text()
        assert len({t.user_attrs["worker"] for t in finished}) >= 2
        # what the workers wrote is in the database behind the proxy
        assert len(study_lib.finished(optuna.load_study(study_name=name, storage=storage_lib.open_url(behind)))) == 8
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def test_two_stage_all_processes_started_together_promote_once(tmp_path, tiny_cache):
    """Two `stage=all` processes on one study: both search, exactly one claims the promotion and runs promote,
    merge, benchmark and report; the other exits 0 saying who promotes."""
    name = f"twice_{uuid.uuid4().hex[:8]}"
    args = ["model=tiny_llama", f"cache_dir={tiny_cache}", f"results_dir={tmp_path}", f"sweep.name={name}",
            "sweep.n_trials=4", "tracking=none", "benchmark.latency_prompts=1", "benchmark.int8_dynamic=false", *SMALL,
            "++sweep.promotion={trainer.max_steps: 6, trainer.eval_every: 0}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "lora_search", *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    promoted = [o for o in outs if "this process promotes" in o]
    skipped = [o for o in outs if "the promotion is claimed by" in o]
    assert len(promoted) == 1 and len(skipped) == 1
    assert "merge ..." in promoted[0] and "merge ..." not in skipped[0] and "report:" in promoted[0]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}")
    assert len(study_lib.finished(study)) == 4
    assert (tmp_path / name / "report.md").exists() and (tmp_path / name / "full" / "merged").is_dir()
