"""benchmarks/search_quality.py: the ground-truth grid, the samplers replayed on it as a table (cost model, pruning,
incumbents scored by their true value), the goals, and a --quick end-to-end run on the tiny model."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from benchmarks import search_quality as sq

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
    assert fig["curve"][0]["compute_fraction"] == 0 or fig["curve"][0]["gap_median"] >= fig["curve"][-1]["gap_median"]
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
    assert rho is None or -1 <= rho <= 1
    assert rec["goals"]["spearman_top5"]["met"] == (rho is not None and rho >= sq.GOAL_SPEARMAN)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and rec["provenance"]["machine"]
