"""benchmarks/search_quality.py: the ground-truth grid, the samplers replayed on it as a table (cost model, pruning,
incumbents scored by their true value), the goals, and a --quick end-to-end run on the tiny model."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest

from benchmarks import search_quality as sq
from lora_search.core import stats

AXES = {"lora.r": [4, 8, 16], "lora.targets": ["qv", "all_linear"], "trainer.learning_rate": [3e-4, 1e-3, 3e-3],
        "lora.alpha_ratio": [1, 4]}


def synthetic_grid(noise: float = 0.01) -> dict:
    """Two training seeds over AXES: the loss falls with the learning rate and a little with the rank; a trial's
    evals at steps 5 and 10; all_linear costs twice as long."""
    rng = random.Random(0)
    grid = {}
    for seed in ("0", "1"):
        rows = {}
        for values in itertools.product(*AXES.values()):
            params = dict(zip(AXES, values))
            final = 2.0 - 0.3 * [3e-4, 1e-3, 3e-3].index(params["trainer.learning_rate"]) \
                - 0.02 * [4, 8, 16].index(params["lora.r"]) + rng.gauss(0, noise)
            rows[sq.key(params, AXES)] = {"params": params, "value": final, "intermediate": [[5, final + 0.2],
                                                                                           [10, final]],
                                          "seconds": 20.0 if params["lora.targets"] == "all_linear" else 10.0}
        grid[seed] = rows
    return grid


def test_truth_and_reference_from_two_seeds():
    grid = synthetic_grid()
    table = sq.truth(grid)
    ref = sq.reference(table)
    assert ref["configurations"] == 36 and ref["compute_s"] == pytest.approx(18 * 10 + 18 * 20)
    k = next(iter(table))
    assert table[k]["mean"] == pytest.approx((grid["0"][k]["value"] + grid["1"][k]["value"]) / 2)
    assert ref["best_value"] == min(v["mean"] for v in table.values())
    assert "learning_rate=0.003" in ref["best"] and "r=16" in ref["best"]


@pytest.mark.parametrize("arm", list(sq.ARMS))
def test_a_replay_charges_measured_seconds_and_scores_the_incumbent_by_its_true_value(arm):
    grid = synthetic_grid()
    table, default = sq.truth(grid), {"sampler": {"type": "tpe", "n_startup_trials": 4, "multivariate": True},
                                      "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 4},
                                      "n_trials": 8, "trial": {}}
    ref = sq.reference(table)
    rows = sq.replay(AXES, grid, table, arm, seed=0, budget_s=0.5 * ref["compute_s"], default=default)
    assert rows[-1]["compute_s"] >= 0.5 * ref["compute_s"] > rows[-2]["compute_s"]
    spent = 0.0
    for r in rows:
        cost = table[r["config"]]["seconds"] * (0.5 if r["state"] == "pruned" else 1.0)
        spent += cost
        assert r["compute_s"] == pytest.approx(spent)
        if r["incumbent"]:
            assert r["incumbent_true"] == table[r["incumbent"]]["mean"]
    complete = [r for r in rows if r["state"] == "complete"]
    assert rows[-1]["incumbent"] == min(complete, key=lambda r: r["observed"])["config"]
    for name, value in sq.ARMS[arm][2].items():  # an axis the arm holds fixed is never varied
        assert all(f"{name.split('.')[-1]}={value}" in r["config"] for r in rows)
    # the promotion: the best re-run among the 3 best configurations seen, each re-run with its other seed
    last = rows[-1]
    assert last["promoted"] in {r["config"] for r in complete}
    if sq.ARMS[arm][1]:
        assert any(r["state"] == "pruned" for r in rows)  # the median pruner cuts trials at step 5
    else:
        assert all(r["state"] == "complete" for r in rows)


def test_arm_figures_follow_from_the_runs():
    grid = synthetic_grid()
    table = sq.truth(grid)
    ref = sq.reference(table)
    default = {"sampler": {"type": "tpe"}, "pruner": {"type": "none"}, "n_trials": 4, "trial": {}}
    runs = [sq.replay(AXES, grid, table, "random", s, 0.5 * ref["compute_s"], default) for s in range(4)]
    fig = sq.summarize_arm(runs, ref, n_default=4)
    gaps = fig["gaps_at_25pct"]
    assert fig["within_goal_at_25pct"] == sum(g is not None and g <= sq.GOAL_GAP for g in gaps) / 4
    for rows, reached in zip(runs, fig["compute_to_within_1pct"]):
        first = next((r for r in rows if sq.gap(r["incumbent_true"], ref["best_value"]) is not None
                      and sq.gap(r["incumbent_true"], ref["best_value"]) <= sq.GOAL_GAP), None)
        assert reached == (None if first is None else pytest.approx(first["compute_s"] / ref["compute_s"], abs=1e-3))
    # the curve: at each share of the grid's compute, the median over seeds of the gap of the incumbent at that point
    assert fig["curve"] and fig["curve"][-1]["compute_fraction"] == 0.5
    for point in fig["curve"]:
        spent = point["compute_fraction"] * ref["compute_s"]
        at = [[r for r in rows if r["compute_s"] <= spent][-1]["incumbent_true"] for rows in runs]
        assert point["gap_median"] == pytest.approx(statistics.median(sq.gap(v, ref["best_value"]) for v in at))
    assert all(p["gap_q1"] <= p["gap_median"] <= p["gap_q3"] for p in fig["curve"])


@pytest.mark.slow  # trains a 2x2x2x1 grid twice on the tiny model, then 3 full runs (about a minute)
def test_quick_run_writes_the_record_the_goals_and_the_plot(tmp_path):
    out = tmp_path / "search_quality.json"
    assert sq.main(["--quick", "--sampler-seeds", "3", "--top", "3", "--work", str(tmp_path / "work"),
                    "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["reference"]["configurations"] == 8 and set(rec["arms"]) == set(sq.ARMS)
    assert all(a["seeds"] == 3 for a in rec["arms"].values())
    assert len(rec["agreement"]["runs"]) == 3 and rec["agreement"]["steps"] == 40
    rho = rec["agreement"]["spearman"]
    runs = rec["agreement"]["runs"]  # the top configurations' trial scores and full-run eval losses, as recorded
    assert rho == stats.spearman([r["trial_value"] for r in runs], [r["full_value"] for r in runs])
    assert rec["goals"]["spearman_top5"]["met"] == (rho is not None and rho >= sq.GOAL_SPEARMAN)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and rec["provenance"]["machine"]


# ---- the full-budget grid (issue 23): the replay on a synthetic grid whose answer is known, and the grid's resume ----

import math
import os
import subprocess
import sys

from benchmarks import full_budget_grid as fg
from benchmarks import full_budget_replay as fr

SYN_AXES = {"lora.r": [4, 8], "trainer.learning_rate": [1e-4, 1e-3]}
X, W, Y, Z = "r=4,learning_rate=0.0001", "r=4,learning_rate=0.001", "r=8,learning_rate=0.0001", "r=8,learning_rate=0.001"
PARAMS = {X: {"lora.r": 4, "trainer.learning_rate": 1e-4}, W: {"lora.r": 4, "trainer.learning_rate": 1e-3},
          Y: {"lora.r": 8, "trainer.learning_rate": 1e-4}, Z: {"lora.r": 8, "trainer.learning_rate": 1e-3}}
# the subset eval at the rungs (steps 5, 10, 20, 40) and the full eval at 40 (seed 0; seed 1's full eval is 0.02
# higher everywhere, its curve the same): W is the best at 40 but the worst at step 5 (early rungs mislead); Y is
# second, within the seed noise of W, and leads every rung it reaches; Z leads step 5 and then stalls
CURVES = {X: ({5: 1.00, 10: 0.90, 20: 0.80, 40: 0.75}, 0.70), W: ({5: 1.20, 10: 1.00, 20: 0.70, 40: 0.45}, 0.40),
          Y: ({5: 0.98, 10: 0.85, 20: 0.60, 40: 0.45}, 0.415), Z: ({5: 0.95, 10: 0.95, 20: 0.90, 40: 0.90}, 0.90)}
# today's 10-step trials (their own schedule): Z looks best and W worst
SHORT = {X: {5: 1.0, 10: 0.8}, W: {5: 1.2, 10: 1.1}, Y: {5: 0.9, 10: 0.85}, Z: {5: 0.95, 10: 0.7}}
NOISE = 0.02
ORDER = tuple(PARAMS[k] for k in (X, W, Y, Z))


def _curve(points: dict) -> dict:
    """Every 5 steps, linear between the given ones."""
    known = sorted(points)
    out = {}
    for step in range(5, 45, 5):
        lo = max(s for s in known if s <= step)
        hi = min(s for s in known if s >= step)
        out[step] = points[lo] if lo == hi else points[lo] + (points[hi] - points[lo]) * (step - lo) / (hi - lo)
    return out


def synthetic_full_grid() -> dict:
    """Two seeds per configuration; 1 s a training step, 2 s a subset eval, 5 s the full eval (so 2 and 5 steps)."""
    def run(curve, value, steps=40):
        return {"curve": curve, "value": value, "train_s": {s: float(s) for s in curve},
                "eval_s": {s: 2.0 for s in curve}, "final_eval_s": 5.0 if steps == 40 else 0.0}
    full = {k: {"params": PARAMS[k], "runs": {"0": run(_curve(c), v), "1": run(_curve(c), v + NOISE)}}
            for k, (c, v) in CURVES.items()}
    short = {k: {"params": PARAMS[k], "runs": {s: run(dict(c), c[10], 10) for s in ("0", "1")}}
             for k, c in SHORT.items()}
    return {"full": full, "short": short}


def _setup():
    grid = synthetic_full_grid()
    true = fr.truth(grid["full"])
    return grid, true, fr.costs(grid["full"], grid["short"])


SH = fr.Design("sh", "random", {"type": "successive_halving", "min_resource": 5, "reduction_factor": 2,
                                "min_early_stopping_rate": 0})
NONE = fr.Design("none", "random", {"type": "none"})
TODAY = fr.Design("today", "random", {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 4}, steps=10,
                  top_k=2, prune_last=True)


def test_truth_noise_and_costs_of_the_synthetic_grid():
    grid, true, cost = _setup()
    assert true[W] == pytest.approx(0.41) and min(true, key=true.get) == W
    noise = fr.seed_noise(grid["full"])
    assert noise["full"]["median_abs_diff"] == pytest.approx(NOISE)
    assert all(noise[str(s)]["median_abs_diff"] == 0 for s in (5, 10, 20, 40))
    assert cost.step[X] == 1.0 and cost.subset_eval[X] == 2.0 and cost.full_eval[X] == 5.0
    assert cost.full_run(X) == 45.0 and fr.grid_compute(true, cost) == 180.0
    assert fr.report_steps(SH) == [5, 10, 20, 40] and fr.report_steps(NONE) == [] and fr.report_steps(TODAY) == [5, 10]
    assert fr.report_steps(fr.Design("sh3", "tpe", {"type": "successive_halving", "min_resource": 5,
                                                   "reduction_factor": 3})) == [5, 15, 40]
    assert fr.report_steps(fr.Design("hb", "tpe", {"type": "hyperband", "min_resource": 10, "max_resource": 40,
                                                  "reduction_factor": 2})) == [10, 20, 40]


def test_successive_halving_keeps_the_configuration_its_rungs_allow_and_loses_the_misleading_one():
    grid, true, cost = _setup()
    rows = fr.replay(SH, grid, SYN_AXES, 0, 0.0, cost, true, min_trials=4, order=ORDER)
    # X passes every rung alone; W is the worse of 2 at step 5 (pruned); Y is the best of 3 at step 5 and of 2 at
    # 10 and 20 (kept, run to 40); Z is the 2nd of 4 at step 5 (kept: the top 4 // 2) and the worst of 3 at 10
    assert [(r["config"], r["state"], r["stopped_at"]) for r in rows] == [
        (X, "complete", 40), (W, "pruned", 5), (Y, "complete", 40), (Z, "pruned", 10)]
    # a full trial: 40 steps + 4 subset evals (5, 10, 20, 40) + the full eval; pruned at 5: 5 + 2; at 10: 10 + 2 * 2
    assert [r["cost"] for r in rows] == [53.0, 7.0, 53.0, 14.0]
    assert [r["compute"] for r in rows] == [53.0, 60.0, 113.0, 127.0]
    assert [r["total_steps"] for r in rows] == [40, 45, 85, 95]
    assert [r["promoted"] for r in rows] == [X, X, Y, Y] and all(r["promotion"] == 0 for r in rows)
    assert rows[-1]["promoted_true"] == pytest.approx(0.425)


def test_full_budget_without_pruner_and_todays_top_k_promotion():
    grid, true, cost = _setup()
    rows = fr.replay(NONE, grid, SYN_AXES, 0, 0.0, cost, true, min_trials=4, order=ORDER)
    assert [r["cost"] for r in rows] == [45.0] * 4 and [r["promoted"] for r in rows] == [X, W, W, W]
    today = fr.replay(TODAY, grid, SYN_AXES, 0, 0.0, cost, true, min_trials=4, order=ORDER)
    # no trial is pruned (2 startup trials; Y and Z lie below the median at 5 and 10); a trial: 10 steps + 2 evals
    assert [r["state"] for r in today] == ["complete"] * 4 and [r["compute"] for r in today] == [14, 28, 42, 56]
    # the top 2 by trial value re-trained at 40 steps (45 s each), the best re-run promoted: Z's short-trial lead
    # pushes Y out of the top 2 at the end and X (0.70) is promoted over W and Y
    assert [r["promoted"] for r in today] == [X, W, Y, X]
    assert [r["total"] for r in today] == [59.0, 118.0, 132.0, 146.0]


def test_figures_at_equal_compute_are_the_hand_computed_ones():
    grid, true, cost = _setup()
    runs = {d.name: [fr.replay(d, grid, SYN_AXES, s, 0.0, cost, true, min_trials=4, order=ORDER) for s in range(3)]
            for d in (SH, NONE, TODAY)}
    at = {name: fr.figures(r, true, NOISE, 120.0, 180.0) for name, r in runs.items()}
    # at 120 s: SH's answer is Y after 3 trials (113 s), 0.015 from W, within the noise; no pruner: W after 2 (90 s);
    # today: W after 2 trials and their re-runs (118 s)
    assert at["sh"]["p_within_seed_noise"] == 1.0 and at["sh"]["gap_abs_median"] == pytest.approx(0.015)
    assert at["sh"]["gap_median"] == pytest.approx(0.015 / 0.41) and at["sh"]["compute_median"] == 113.0
    assert at["sh"]["trials_median"] == 3 and at["sh"]["compute_fraction_median"] == pytest.approx(113 / 180)
    assert at["none"]["p_within_seed_noise"] == 1.0 and at["none"]["gap_median"] == 0 and \
        at["none"]["compute_median"] == 90.0
    assert at["today"]["promoted"] == [W] * 3 and at["today"]["compute_median"] == 118.0
    # at 60 s every design still holds X (0.71: 0.30 from the best), today's nothing until 59 s
    early = {name: fr.figures(r, true, NOISE, 60.0, 180.0) for name, r in runs.items()}
    assert all(f["p_within_seed_noise"] == 0 and f["gap_abs_median"] == pytest.approx(0.30) for f in early.values())
    assert fr.figures(runs["today"], true, NOISE, 50.0, 180.0)["no_answer"] == 3
    assert fr.figures(runs["today"], true, NOISE, 50.0, 180.0)["gap_median"] is None  # no answer: infinite
    curve = fr.curve(runs["sh"], true, 180.0, 1.0, points=4)  # at 45, 90, 135, 180 s
    assert [p["gap_median"] for p in curve] == [None, pytest.approx(0.30 / 0.41), pytest.approx(0.015 / 0.41),
                                                pytest.approx(0.015 / 0.41)]


def test_compare_reads_every_design_at_todays_compute():
    grid = _setup()[0]
    designs = fr.designs({"n_startup_trials": 2, "multivariate": True}, TODAY.pruner, 2)
    result = fr.compare(grid, SYN_AXES, designs, n_trials=4, sampler_seeds=3)
    assert set(result["designs"]) == {d.name for d in designs} and result["best"] == W
    assert result["within_noise_of_best"] == [W, Y] and result["grid_compute"] == 180.0
    assert result["budgets"]["double"] == 2 * result["budgets"]["equal"]
    shipped = result["designs"][designs[0].name]["as_shipped"]
    assert shipped["trials_median"] == 4 and result["budgets"]["equal"] == shipped["compute_median"]
    for d in result["designs"].values():
        assert 0 <= d["at"]["equal"]["p_within_seed_noise"] <= 1 and d["at"]["equal"]["seeds"] == 3
        assert d["curve"] and all(p["compute_fraction"] > 0 for p in d["curve"])
    assert result["winner_at_equal_compute"] in result["designs"]


def _fake_trainer(calls: list, fail: dict | None = None):
    def train(params):
        calls.append(dict(params))
        if fail is not None and fail.get("left"):
            fail["left"] -= 1
            raise fail["error"]
        base = 1.0 + 0.001 * params["lora.r"] + params["trainer.seed"] * 0.01
        curve = [[s, base + 1.0 / s] for s in range(5, 45, 5)]
        return {"value": base, "curve": curve, "train_s": [[s, float(s)] for s in range(5, 45, 5)],
                "eval_s": [[s, 0.5] for s in range(5, 45, 5)], "final_eval_s": 1.0, "steps": 40}
    return train


def test_the_grid_study_resumes_where_it_stopped(tmp_path):
    storage = f"sqlite:///{tmp_path / 'grid.db'}"
    spec = fg.GridSpec("full_budget", SYN_AXES)  # 4 configurations x 2 seeds
    calls = []
    first = fg.run_grid(storage, spec, _fake_trainer(calls), max_runs=3)
    assert (first["done"], first["remain"], first["runs"]) == (3, 5, 3) and "max-runs" in first["stopped"]
    # a run interrupted (SIGTERM, Ctrl-C) is failed and the grid stops cleanly
    stop = fg.run_grid(storage, spec, _fake_trainer(calls, {"left": 1, "error": KeyboardInterrupt()}))
    assert (stop["done"], stop["stopped"]) == (3, "interrupted")
    # a process that died mid-run left its trial RUNNING: the next start fails it and trains that point again
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import optuna

    study = optuna.load_study(study_name="full_budget", storage=storage,
                              sampler=optuna.samplers.GridSampler(spec.space(), seed=0))
    trial = study.ask({k: optuna.distributions.CategoricalDistribution(v) for k, v in spec.space().items()})
    trial.set_user_attr("pid", dead.pid)
    trial.set_user_attr("host", fg.socket.gethostname())
    # a trial being trained by a live process refuses a second trainer
    live = study.ask({k: optuna.distributions.CategoricalDistribution(v) for k, v in spec.space().items()})
    live.set_user_attr("pid", os.getppid())
    live.set_user_attr("host", fg.socket.gethostname())
    with pytest.raises(RuntimeError, match="one process trains a grid at a time"):
        fg.run_grid(storage, spec, _fake_trainer(calls))
    live.set_user_attr("host", "another-machine")  # a trial left by another machine is stale here
    # one run fails (an exception): its trial fails and the point is trained again once the others are done
    rest = fg.run_grid(storage, spec, _fake_trainer(calls, {"left": 1, "error": ValueError("boom")}))
    assert (rest["done"], rest["remain"], rest["stopped"]) == (8, 0, None)
    trials = optuna.load_study(study_name="full_budget", storage=storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8 and len({fg.point_key(t.params) for t in complete}) == 8  # each point once
    assert sum(t.state == optuna.trial.TrialState.FAIL for t in trials) == 4  # interrupted, 2 stale, boom
    assert {t.user_attrs.get("fail_reason", "")[:5] for t in trials if t.state.name == "FAIL"} == \
        {"inter", "stale", "Value"}
    # nothing left: no run, and the grid reads back as configurations x seeds with curves and timings
    again = fg.run_grid(storage, spec, _fake_trainer(calls))
    assert again["runs"] == 0 and len(calls) == 3 + 1 + 1 + 5
    table = fg.load(storage, spec)
    assert set(table) == {X, W, Y, Z} and set(table[X]["runs"]) == {"0", "1"}
    run = table[Y]["runs"]["1"]
    assert run["value"] == pytest.approx(1.018) and run["curve"][5] == pytest.approx(1.218)
    assert run["train_s"][40] == 40.0 and run["eval_s"][20] == 0.5 and run["final_eval_s"] == 1.0
    assert fr.truth(table)[X] == pytest.approx(1.009)


def test_the_grid_stops_before_a_run_that_would_pass_the_time_budget(tmp_path):
    storage = f"sqlite:///{tmp_path / 'grid.db'}"
    spec = fg.GridSpec("full_budget", SYN_AXES)
    calls = []
    fg.run_grid(storage, spec, _fake_trainer(calls), max_runs=1)
    out = fg.run_grid(storage, spec, _fake_trainer(calls), deadline=fg.time.monotonic() - 1)
    assert out["runs"] == 0 and "time budget" in out["stopped"] and len(calls) == 1
    assert math.isclose(fg.progress(storage, spec)["remain"], 7)


def test_the_full_budget_record_is_written_only_from_a_complete_grid(tmp_path, capsys):
    db, out = tmp_path / "grid.db", tmp_path / "search_quality_full_budget.json"
    storage = f"sqlite:///{db}"
    args = ["--quick", "--full-budget-record", "--db", str(db), "--out", str(out), "--sampler-seeds", "3"]
    main_specs = sq.full_budget_specs(False, quick=True)

    def fake(spec):
        def train(params):
            lr, r, seed = params["trainer.learning_rate"], params["lora.r"], params["trainer.seed"]
            final = 1.0 + 0.05 * abs(math.log10(lr) + 3) - 0.002 * r + 0.01 * seed
            steps = range(5, (40 if spec.budget == fg.FULL else 10) + 5, 5)
            return {"value": final, "curve": [[s, final + 1.0 / s] for s in steps], "steps": max(steps),
                    "train_s": [[s, 2.0 * s] for s in steps], "eval_s": [[s, 1.0] for s in steps],
                    "final_eval_s": 3.0 if spec.budget == fg.FULL else 0.0}
        return train
    fg.run_grid(storage, main_specs[0], fake(main_specs[0]), max_runs=5)
    assert sq.main(args) == 1 and not out.exists()  # incomplete: no record
    assert "not complete" in capsys.readouterr().err
    for spec in main_specs:
        fg.run_grid(storage, spec, fake(spec))
    assert sq.main(args) == 0
    rec = json.loads(out.read_text())
    assert rec["configurations"] == 4 and rec["best"] == "r=16,alpha_ratio=1,learning_rate=0.003"
    assert rec["confirmation"]["status"] == "not complete" and "chosen on this grid" in rec["settings"]["chosen_here"]
    assert rec["winner_at_equal_compute"] in rec["designs"] and rec["verdict"].startswith("at equal compute")
    assert rec["seed_noise"]["full"]["median_abs_diff"] == pytest.approx(0.01)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
