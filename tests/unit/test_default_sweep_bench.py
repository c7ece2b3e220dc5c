"""benchmarks/default_sweep.py: the newcomer's command timed stage by stage, designs side by side. Its figures from
the pipeline's timings and the study (fast), and one --quick run of the shipped default and the continued design on
the tiny model (slow): the continued design trains no configuration twice."""

from __future__ import annotations

import json

import optuna
import pytest

from benchmarks import _common as common
from benchmarks import default_sweep


def test_stage_shares_take_each_stages_latest_run_and_the_rest_is_other():
    timings = {"search": [{"seconds": 50.0, "ended": 1}, {"seconds": 1.0, "ended": 5}],  # a later check: 1 s
               "promote": [{"seconds": 30.0, "ended": 2}], "report": [{"seconds": 9.0, "ended": 3}]}
    got = default_sweep.stage_times(timings, wall_s=50.0)
    assert got["search"] == {"seconds": 1.0, "share": 0.02}
    assert got["promote"] == {"seconds": 30.0, "share": 0.6} and got["report"] == {"seconds": 9.0, "share": 0.18}
    assert got["other"] == {"seconds": 10.0, "share": 0.2} and "merge" not in got


def test_steps_count_every_trial_and_only_full_runs_that_trained(tmp_path):
    study = optuna.create_study()
    for steps, state in ((10, optuna.trial.TrialState.COMPLETE), (5, optuna.trial.TrialState.PRUNED)):
        study.add_trial(optuna.trial.create_trial(state=state, value=1.0 if steps == 10 else None,
                                                  user_attrs={"steps": steps}, intermediate_values={5: 1.0}))
    runs = tmp_path / "full" / "runs"
    for name, metrics in (("trial-0000-seed0", {"steps": 40}), ("trial-0001-seed0", {"steps": 40, "reused_trial": 1})):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps(metrics))
    assert default_sweep.steps_trained(study, tmp_path) == {"trials": 15, "full_runs": 40, "total": 55}


@pytest.mark.slow  # two tiny sweeps end to end, each a fresh process (about a minute)
def test_quick_run_times_both_designs_and_the_continued_one_trains_nothing_twice(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setattr(common, "configure_logging", lambda: None)
    out = tmp_path / "default_sweep.json"
    rec = default_sweep.main(["--quick", "--out", str(out), f"cache_dir={tiny_cache}"])
    assert json.loads(out.read_text())["sweeps"].keys() == rec["sweeps"].keys() == {"rank_lr", "rank_lr_continued"}
    today, continued = rec["sweeps"]["rank_lr"], rec["sweeps"]["rank_lr_continued"]
    for run in (today, continued):
        assert set(run["stages"]) == {"search", "promote", "merge", "benchmark", "report", "other"}
        assert sum(s["seconds"] for s in run["stages"].values()) == pytest.approx(run["wall_s"], abs=0.5)
        # the report's paired sentence is recorded exactly when there are two complete trials to compare
        paired = run["paired_evidence"] or ""
        assert paired.startswith("**Paired comparison.** Trial #") == (run["trials"].get("complete", 0) >= 2)
        assert run["promoted"]["trial"] is not None and run["steps"]["trials"] > 0
    # today's design re-trains its top trials from step 0 at the promotion budget (6 steps each)
    assert today["steps"]["full_runs"] == 6 * min(3, today["trials"].get("complete", 0))
    assert continued["steps"]["full_runs"] == 0  # the trial that reached the top rung is the full run
