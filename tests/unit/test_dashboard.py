"""The dashboard command: optuna-dashboard serves a real study, on loopback unless told, with clear errors."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from lora_search.commands import dashboard
from lora_search.config.compose import load_config
from lora_search.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TRIALS = [({"lora.r": 16, "trainer.learning_rate": 1e-3}, 1.25), ({"lora.r": 4, "trainer.learning_rate": 3e-4}, 1.5),
          ({"lora.r": 32, "trainer.learning_rate": 2e-3}, None), ({"lora.r": 8, "trainer.learning_rate": 5e-4}, 1.1)]


def make_study(results: Path) -> None:
    """A rank_lr study with three complete trials and one pruned, stored where the sweep puts it."""
    (results / "rank_lr").mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="rank_lr", storage=f"sqlite:///{results / 'rank_lr' / 'study.db'}")
    space = {"lora.r": CategoricalDistribution([4, 8, 16, 32]),
             "trainer.learning_rate": FloatDistribution(2e-4, 3e-3, log=True)}
    for params, value in TRIALS:
        study.enqueue_trial(params)
        trial = study.ask(space)
        trial.report(2.0, step=5)
        if value is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    """GET a JSON document."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def running_dashboard(tmp_path: Path, port: int, timeout_s: float = 60):
    """Start `python -m lora_search dashboard` on a study in tmp_path; yield (process, /api/studies answer)."""
    log_path = tmp_path / "dashboard.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lora_search", "dashboard", "sweep=rank_lr",
                                 f"results_dir={tmp_path / 'results'}", f"dashboard.port={port}"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    studies = get_json(f"http://127.0.0.1:{port}/api/studies")
                    break
                except OSError:
                    assert proc.poll() is None, f"the dashboard exited ({proc.returncode}):\n{log_path.read_text()}"
                    assert time.monotonic() < deadline, f"no answer in {timeout_s} s:\n{log_path.read_text()}"
                    time.sleep(0.3)
            yield proc, studies
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_dashboard_serves_the_study_and_its_trials(tmp_path):
    make_study(tmp_path / "results")
    port = free_port()
    with running_dashboard(tmp_path, port) as (proc, studies):
        listed = {s["study_name"]: s for s in studies["study_summaries"]}
        assert list(listed) == ["rank_lr"] and listed["rank_lr"]["directions"] == ["minimize"]
        study_id = listed["rank_lr"]["study_id"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}")
        assert detail["name"] == "rank_lr"
        trials = sorted(detail["trials"], key=lambda t: t["number"])
        assert [t["state"] for t in trials] == ["Complete", "Complete", "Pruned", "Complete"]
        assert [t["values"] for t in trials if t["state"] == "Complete"] == [[1.25], [1.5], [1.1]]
        params = {p["name"]: p["param_external_value"] for p in trials[2]["params"]}
        assert params == {"lora.r": "32", "trainer.learning_rate": "0.002"}
        assert [t["number"] for t in detail["best_trials"]] == [3]
        assert proc.poll() is None
    banner = (tmp_path / "dashboard.log").read_text()
    assert f"http://127.0.0.1:{port}/dashboard/studies/{study_id}" in banner
    assert "no authentication" not in banner  # loopback by default: no warning


def test_missing_study_exits_2_naming_the_path_and_creates_nothing(tmp_path, capsys):
    from lora_search.__main__ import main

    results = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_:
        main(["dashboard", "sweep=rank_lr", f"results_dir={results}", f"dashboard.port={free_port()}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err == (f"error: no study at {results / 'rank_lr' / 'study.db'}: "
                   "run `python -m lora_search sweep=rank_lr` first\n")
    assert not (results / "rank_lr").exists()


@pytest.fixture
def served(monkeypatch):
    """Replace optuna_dashboard.run_server so nothing binds; record what it was given."""
    import optuna_dashboard

    calls = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: calls.append((storage, kw)))
    return calls


@pytest.mark.parametrize("host, warns", [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)])
def test_a_host_other_than_loopback_warns_there_is_no_authentication(tmp_path, served, caplog, capsys, host, warns):
    make_study(tmp_path / "results")
    port = free_port()
    cfg = load_config(["sweep=rank_lr", f"results_dir={tmp_path / 'results'}", f"dashboard.host={host}",
                       f"dashboard.port={port}"])
    with caplog.at_level(logging.WARNING, logger="lora_search"):
        dashboard.serve(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warns:
        assert len(warnings) == 1 and "no authentication" in warnings[0] and f"{host}:{port}" in warnings[0]
    else:
        assert warnings == []
    (storage, kwargs), = served
    assert kwargs == {"host": host, "port": port}
    assert [s.study_name for s in storage.get_all_studies()] == ["rank_lr"]
    assert f"http://{host}:{port}/dashboard/studies/" in capsys.readouterr().out


def test_a_busy_port_is_a_clear_error(tmp_path, served):
    make_study(tmp_path / "results")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = load_config(["sweep=rank_lr", f"results_dir={tmp_path / 'results'}", f"dashboard.port={port}"])
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}.*dashboard\.port="):
            dashboard.serve(cfg)
    assert served == []


@pytest.mark.parametrize("port", [0, 70000])
def test_a_port_out_of_range_is_a_clear_error(tmp_path, served, port):
    make_study(tmp_path / "results")
    cfg = load_config(["sweep=rank_lr", f"results_dir={tmp_path / 'results'}", f"dashboard.port={port}"])
    with pytest.raises(ConfigError, match=f"dashboard.port must be an integer from 1 to 65535, got {port}"):
        dashboard.serve(cfg)
    assert served == []
