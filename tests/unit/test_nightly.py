"""Nightly tuning: two (and three) simulated nights on the tiny model; champion, history, exit codes."""

from __future__ import annotations

import json
import math

import pytest

from lora_search.commands import nightly, pipeline
from lora_search.core.errors import ConfigError
from lora_search.search import failures
from lora_search.search import study as study_lib

NIGHT = ["sweep=nightly", "data.train_per_task=24", "data.eval_per_task=6", "sweep.timeout_s=600",
         "++sweep.trial={trainer.max_steps: 6, trainer.eval_every: 3, trainer.batch_size: 4, "
         "trainer.exact_match_items: 2, trainer.max_new_tokens: 4}",
         "++sweep.promotion={trainer.max_steps: 8, trainer.eval_every: 0, trainer.exact_match_items: 2}",
         "sweep.pruner=none", "sweep.nightly.trials_per_night=2", "sweep.nightly.seed_top_k=1",
         "benchmark.latency_prompts=1", "benchmark.max_new_tokens=2", "benchmark.int8_dynamic=false"]


def _read(path):
    return json.loads(path.read_text())


@pytest.mark.slow  # three nights: searches, full runs, a merge and a benchmark per champion
def test_two_nights_then_a_data_change(make_cfg):
    first = make_cfg(*NIGHT, "sweep.nightly.night=2026-11-01")
    assert pipeline.run(first) == 3  # the first night always crowns a champion
    out = study_lib.study_dir(first)
    champion = _read(out / "champion.json")
    assert champion["champion"]["night"] == "2026-11-01"
    night1 = _read(out / "nights" / "2026-11-01" / "night.json")
    assert night1["decision"] == "new_champion" and night1["trials"] == 2 and night1["changed"] == []
    assert (out / "nights" / "2026-11-01" / "full" / "merged" / "config.json").exists()
    assert (out / "nights" / "2026-11-01" / "benchmark.json").exists()

    # Night 2, same data and model, an unreachable margin: tonight's best cannot take over.
    second = make_cfg(*NIGHT, "sweep.nightly.night=2026-11-02", "sweep.nightly.margin=10")
    assert pipeline.run(second) == 0
    night2 = _read(out / "nights" / "2026-11-02" / "night.json")
    study = study_lib.open_study(second)
    assert night2["decision"] == "no_change" and "did not beat the champion" in night2["reason"]
    assert night2["seeded_from"] == [night1["best_trial"]]  # the best earlier configuration ran first tonight
    tonight = nightly.tonight(study, "2026-11-02")
    assert len(tonight) == 2 and len(study_lib.finished(study)) == 4
    assert tonight[0].user_attrs["seeded_from"] == night1["best_trial"]
    assert tonight[0].params == study.trials[night1["best_trial"]].params
    assert math.isfinite(night2["champion_value_now"]) and night2["champion_value_now"] > 0  # measured again tonight
    assert not (out / "nights" / "2026-11-02" / "full" / "merged").exists()  # only champions are merged
    champion = _read(out / "champion.json")
    assert champion["champion"]["night"] == "2026-11-01"
    assert [h["decision"] for h in champion["history"]] == ["new_champion", "no_change"]
    report = (out / "nights" / "2026-11-02" / "report.md").read_text()
    assert "Decision: no change" in report and "Data and base model are the same" in report
    assert "2026-11-01" in report and "2026-11-02" in report  # the champion's history

    # The same night again: recorded, nothing to do, same exit code.
    assert pipeline.run(second) == 0
    assert len(study_lib.finished(study_lib.open_study(second))) == 4

    # Night 3: the data changed. It is detected, stated, and both are measured on the new data.
    third = make_cfg(*NIGHT, "sweep.nightly.night=2026-11-03", "data.train_per_task=20", "sweep.nightly.margin=0")
    code = pipeline.run(third)
    night3 = _read(out / "nights" / "2026-11-03" / "night.json")
    assert night3["changed"] == ["data"] and code == nightly.EXIT[night3["decision"]]
    assert night3["fingerprints"]["data"] != night1["fingerprints"]["data"]
    assert night3["fingerprints"]["model"] == night1["fingerprints"]["model"]
    assert "The data changed since the champion was trained" in (out / "nights" / "2026-11-03" / "report.md").read_text()


@pytest.mark.slow  # one night: 2 trials, 2 candidates x 2 seeds at the full budget, a merge and a benchmark
def test_with_several_seeds_the_champion_decision_uses_the_mean(make_cfg):
    night = [n for n in NIGHT if not n.startswith("++sweep.promotion=")]
    cfg = make_cfg(*night, "sweep.nightly.night=2026-11-05", "++sweep.promotion={trainer.max_steps: 8, "
                   "trainer.eval_every: 0, trainer.exact_match_items: 2, top_k: 2, seeds: 2}")
    assert pipeline.run(cfg) == 3
    night_dir = study_lib.study_dir(cfg) / "nights" / "2026-11-05"
    full = _read(night_dir / "full" / "metrics.json")
    entry = _read(night_dir / "night.json")
    assert len(full["full_values"]) == 2 and full["full_values"][0] != full["full_values"][1]
    assert entry["candidate_value"] == pytest.approx(full["full_mean"])
    assert entry["candidate_seeds"] == full["full_values"]
    champion = _read(study_lib.study_dir(cfg) / "champion.json")["champion"]
    assert champion["value"] == pytest.approx(full["full_mean"]) and champion["trial"] == full["trial"]


def test_a_failed_night_is_recorded_and_raised(make_cfg, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of disk")

    monkeypatch.setattr(nightly, "search_stage", broken)
    cfg = make_cfg(*NIGHT, "sweep.nightly.night=2026-11-05")
    with pytest.raises(RuntimeError, match="out of disk"):
        pipeline.run(cfg)
    out = study_lib.study_dir(cfg)
    night = _read(out / "nights" / "2026-11-05" / "night.json")
    assert night["decision"] == "failed" and night["reason"] == "RuntimeError: out of disk"
    assert _read(out / "champion.json")["history"][-1]["decision"] == "failed"
    assert nightly.EXIT["failed"] == 1


@pytest.mark.parametrize("override, expected", [
    ("sweep.nightly.trials_per_night=0", "sweep.nightly.trials_per_night must be a positive integer, got 0"),
    ("sweep.nightly.margin=-0.1", "sweep.nightly.margin must be a fraction >= 0"),
    ("sweep.nightly.night=../etc", "sweep.nightly.night names a folder"),
])
def test_bad_nightly_settings_fail_before_any_work(make_cfg, override, expected):
    with pytest.raises(ConfigError) as info:
        pipeline.run(make_cfg(*NIGHT, override))
    assert any(expected in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("candidate, champion, maximize, margin, wins", [
    (0.95, 1.0, False, 0.01, True), (0.995, 1.0, False, 0.01, False), (1.02, 1.0, True, 0.01, True),
    (1.005, 1.0, True, 0.01, False), (0.99, 1.0, False, 0.0, True),
])
def test_the_margin_is_a_fraction_of_the_champion(candidate, champion, maximize, margin, wins):
    assert nightly.better(candidate, champion, margin, maximize) is wins


@pytest.mark.parametrize("code", [3, 0])
def test_the_command_line_exits_with_the_nights_code(monkeypatch, tmp_path, code):
    from lora_search import __main__ as cli

    seen = []
    monkeypatch.setattr(pipeline, "run", lambda cfg, overrides=(): seen.append(cfg.sweep.nightly.enabled) or code)
    args = ["sweep=nightly", "model=tiny_llama", f"results_dir={tmp_path}", "tracking=none"]
    if code:
        with pytest.raises(SystemExit) as info:
            cli.main(args)
        assert info.value.code == code
    else:
        cli.main(args)  # no change: a plain return, exit status 0
    assert seen == [True]


def _night_cli(tmp_path, tiny_cache, monkeypatch, night):
    """Run the command line in this process on a tiny nightly study; return its SystemExit code."""
    import sys

    from lora_search.__main__ import main

    monkeypatch.setattr(sys, "argv", ["lora_search"])  # main() hands Hydra its arguments through sys.argv
    with pytest.raises(SystemExit) as info:
        main([*NIGHT, "model=tiny_llama", f"results_dir={tmp_path / 'results'}", f"cache_dir={tiny_cache}",
              "tracking=none", f"sweep.nightly.night={night}", f"hydra.run.dir={tmp_path / 'hydra'}"])
    return info.value.code


def test_a_night_that_raises_exits_1_with_the_reason_in_night_json(tmp_path, tiny_cache, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of disk")

    monkeypatch.setattr(nightly, "search_stage", broken)
    assert _night_cli(tmp_path, tiny_cache, monkeypatch, "2026-11-07") == 1
    out = tmp_path / "results" / "nightly"
    night = _read(out / "nights" / "2026-11-07" / "night.json")
    assert night["decision"] == "failed" and night["reason"] == "RuntimeError: out of disk"
    last = _read(out / "champion.json")["history"][-1]
    assert (last["night"], last["decision"]) == ("2026-11-07", "failed")


def test_a_user_error_once_the_night_started_is_a_recorded_failure_exit_1_not_2(tmp_path, tiny_cache, monkeypatch,
                                                                               capsys):
    from lora_search.core.errors import DataError

    def changed_under_us(*args, **kwargs):  # the checks passed; the data went bad while the night ran
        raise DataError("data.path: /data/train.jsonl is empty (0 rows)")

    monkeypatch.setattr(nightly, "search_stage", changed_under_us)
    assert _night_cli(tmp_path, tiny_cache, monkeypatch, "2026-11-08") == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "night 2026-11-08 failed: data.path: /data/train.jsonl is empty" in errors[0]
    assert "night.json" in errors[0] and "Traceback" not in err
    night = _read(tmp_path / "results" / "nightly" / "nights" / "2026-11-08" / "night.json")
    assert night["decision"] == "failed" and night["reason"] == "DataError: data.path: /data/train.jsonl is empty (0 rows)"


def test_a_changed_base_model_retires_the_champion(make_cfg):
    cfg = make_cfg(*NIGHT)
    champion = {"night": "2026-11-01", "value": 0.5}
    worse = 0.9  # tonight's candidate is worse than the champion was
    decision, reason = nightly.decide(cfg, champion, worse, None, changed=["model"])
    assert decision == "new_champion" and "base model changed" in reason
    assert nightly.decide(cfg, champion, worse, 0.5, changed=["data"])[0] == "no_change"  # data alone: measured


def test_the_night_label_defaults_to_todays_date(make_cfg, monkeypatch):
    import datetime
    import types

    class Today(datetime.date):
        @classmethod
        def today(cls):
            return cls(2027, 1, 2)

    monkeypatch.setattr(nightly, "datetime", types.SimpleNamespace(date=Today, datetime=datetime.datetime))
    assert nightly.night_label(make_cfg(*NIGHT)) == "2027-01-02"
    assert nightly.night_label(make_cfg(*NIGHT, "sweep.nightly.night=rerun-1")) == "rerun-1"


def test_the_shipped_schedules_run_the_nightly_sweep_as_the_readme_says():
    import configparser
    import re
    from pathlib import Path

    import yaml

    from lora_search.config.compose import load_config

    folder = Path(__file__).resolve().parents[2] / "examples" / "nightly"
    command = re.compile(r"python -m lora_search sweep=nightly(\s|$)")
    assert load_config(["sweep=nightly"]).sweep.nightly.enabled  # what they run is the nightly study

    # crontab: one schedule line, under flock so nights never overlap
    lines = [line for line in (folder / "crontab").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and all(re.fullmatch(r"[0-9*/,-]+", field) for field in lines[0].split()[:5]), lines
    flock = re.search(r"flock -n (\S+) (\S*python) -m lora_search sweep=nightly", lines[0])
    assert flock and flock[1].endswith(".lock"), lines[0]

    # systemd: a oneshot service for which exit 3 (a new champion) is a success, and a daily timer for it
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read_string((folder / "lora-search-nightly.service").read_text())
    assert unit["Service"]["Type"] == "oneshot" and unit["Service"]["SuccessExitStatus"].split() == ["3"]
    assert command.search(unit["Service"]["ExecStart"])
    timer = configparser.ConfigParser(interpolation=None, strict=False)
    timer.optionxform = str
    timer.read_string((folder / "lora-search-nightly.timer").read_text())
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    assert "Unit" not in timer["Timer"]  # so it starts the service of the same name, lora-search-nightly.service

    # GitHub Actions: scheduled, on a self-hosted GPU runner, exit 3 turned into success, other codes kept
    flow = yaml.safe_load((folder / "github-actions-nightly.yml").read_text())
    trigger = flow.get("on", flow.get(True))  # YAML 1.1 reads the key `on` as true
    assert trigger["schedule"][0]["cron"]
    (job,) = flow["jobs"].values()
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    script = next(step["run"] for step in job["steps"] if command.search(step.get("run", "")))
    assert "if [ $rc -eq 3 ]" in script and "exit 0" in script and script.rstrip().endswith("exit $rc")


@pytest.mark.parametrize("error, code", [(failures.TooManyFailures("5 trials failed in a row"), 4), (KeyboardInterrupt(), 130)])
def test_a_night_whose_trials_keep_failing_or_that_is_interrupted_is_recorded_as_failed(make_cfg, monkeypatch, error,
                                                                                      code):
    def stop(*args, **kwargs):
        raise error

    monkeypatch.setattr(nightly, "search_stage", stop)
    cfg = make_cfg(*NIGHT, "sweep.nightly.night=2026-11-09")
    assert pipeline.run(cfg) == code  # as for any sweep: 4 trials kept failing, 130 Ctrl-C (143 SIGTERM)
    night = _read(study_lib.study_dir(cfg) / "nights" / "2026-11-09" / "night.json")
    assert night["decision"] == "failed" and night["reason"].startswith(type(error).__name__)
