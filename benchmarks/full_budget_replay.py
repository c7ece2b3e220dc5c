"""Search designs replayed on the full-budget grid (benchmarks/full_budget_grid.py): a pure function of the recorded
learning curves, no training.

Each design runs a real Optuna study (its own sampler and pruner classes) over the grid's axes; a trial reports the
values its configuration's recorded run had at the steps the product evaluates (lora_search.train.pruning
.decision_steps: the rungs, then the last step), one training seed drawn per trial, and the pruner decides. Compute
is what the trial trained and evaluated, in training steps (machine-independent; the record gives a step's seconds):

  training      the steps it trained, one each;
  evals         one subset eval per step the design evaluates at, up to where it stopped, and the full eval at the
                promotion budget where the run gets there, each at its measured cost in steps (Costs); generation is
                left out: the metric is eval_loss, and every design promotes once.

Designs: today's (10-step trials with their own schedule, median pruner, the top-k re-trained at the promotion
budget: each re-run is a 40-step run of the grid, seed drawn), and designs whose trials run the promotion budget's
schedule from step 0, pruned at rungs (successive halving, Hyperband) or not at all, where the best trial that
reached the last step is promoted as it is (its run is the full run). The answer at a compute budget is the
promoted configuration of the last trial whose search (+ re-runs) fit in it, scored by its true value: the mean of
its full-budget runs over the seeds.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from types import SimpleNamespace

FULL_STEPS, SHORT_STEPS, EVAL_EVERY = 40, 10, 5
NOISE_STEPS = (5, 10, 20, 40)


@dataclass(frozen=True)
class Design:
    """A search design: sampler, pruner, a trial's steps (10: today's own schedule; 40: the promotion budget's), the
    top-k re-trained at the promotion budget (0: the best trial that ran the full budget is promoted as it is)."""

    name: str
    sampler: str  # tpe | random
    pruner: dict  # an Optuna pruner as a sweep file names it: {type: median|successive_halving|hyperband|none, ...}
    steps: int = FULL_STEPS
    top_k: int = 0
    prune_last: bool = False  # the pruner is asked at the last step too (today's PruningCallback asks at every eval)
    sampler_kwargs: dict = field(default_factory=dict)


def designs(tpe: dict, median: dict, top_k: int) -> list[Design]:
    """The designs compared: today's as sweeps/rank_lr.yaml ships it (its TPE and median pruner), the full-budget
    designs with rungs (successive halving and Hyperband, reduction factor 2 and 3, min resource 5 and 10), TPE and
    random search with no pruner at the full budget, and random search with successive halving (the sampler's
    share)."""
    sh = {"type": "successive_halving", "min_early_stopping_rate": 0}
    hb = {"type": "hyperband", "max_resource": FULL_STEPS}
    return [
        Design("today: tpe + median pruner, 10-step trials, top-3 re-trained", "tpe", median, SHORT_STEPS, top_k,
               True, tpe),
        Design("tpe + successive halving (min 5, eta 2: rungs 5, 10, 20)", "tpe",
               {**sh, "min_resource": 5, "reduction_factor": 2}, sampler_kwargs=tpe),
        Design("tpe + successive halving (min 5, eta 3: rungs 5, 15)", "tpe",
               {**sh, "min_resource": 5, "reduction_factor": 3}, sampler_kwargs=tpe),
        Design("tpe + successive halving (min 10, eta 2: rungs 10, 20)", "tpe",
               {**sh, "min_resource": 10, "reduction_factor": 2}, sampler_kwargs=tpe),
        Design("tpe + hyperband (min 5, eta 2)", "tpe", {**hb, "min_resource": 5, "reduction_factor": 2},
               sampler_kwargs=tpe),
        Design("tpe + hyperband (min 5, eta 3)", "tpe", {**hb, "min_resource": 5, "reduction_factor": 3},
               sampler_kwargs=tpe),
        Design("tpe, no pruner, full budget (the guide's recipe)", "tpe", {"type": "none"}, sampler_kwargs=tpe),
        Design("random, no pruner, full budget", "random", {"type": "none"}),
        Design("random + successive halving (min 5, eta 2)", "random",
               {**sh, "min_resource": 5, "reduction_factor": 2}),
    ]


def report_steps(design: Design) -> list[int]:
    """The steps a trial evaluates the subset at and reports: the product's decision steps for rung pruners (the
    last step included), every eval for the median pruner, none for a full-budget trial with no pruner (it is
    scored once, on every eval row, at the end)."""
    from lora_search.train.pruning import decision_steps

    steps = decision_steps(design.pruner, design.steps)
    if steps is not None:
        return steps
    if design.pruner.get("type") == "none" and design.steps == FULL_STEPS:
        return []
    return list(range(EVAL_EVERY, design.steps + 1, EVAL_EVERY))


# ---- the grid as a table ----

def truth(full: dict) -> dict:
    """Per configuration with every seed's full-budget run: its true score (the mean full eval over the seeds)."""
    n = max((len(c["runs"]) for c in full.values()), default=0)
    return {k: statistics.fmean(r["value"] for r in c["runs"].values()) for k, c in full.items() if len(c["runs"]) == n}


def seed_noise(table: dict, steps=NOISE_STEPS) -> dict:
    """Between two training seeds of one configuration, the median absolute difference (and relative to the
    configuration's mean): of the subset eval at each step, and of the full eval ("full")."""
    out = {}
    for step in [*steps, "full"]:
        diffs, rel = [], []
        for c in table.values():
            runs = list(c["runs"].values())
            if len(runs) < 2:
                continue
            vals = [r["value"] if step == "full" else r["curve"].get(step) for r in runs[:2]]
            if None in vals:
                continue
            diffs.append(abs(vals[0] - vals[1]))
            rel.append(diffs[-1] / abs(statistics.fmean(vals)))
        if diffs:
            out[str(step)] = {"median_abs_diff": statistics.median(diffs), "median_rel_diff": statistics.median(rel),
                              "configurations": len(diffs)}
    return out


@dataclass
class Costs:
    """Compute in training steps: a step costs 1 for every configuration (the rank moves a step's time little next
    to this machine's own noise), a subset eval and the full eval cost what they were measured to cost in steps of
    the same run (eval seconds over the run's seconds a step; the median over the grid's runs, so a run slowed by
    whatever else shared the machine moves neither); today's 10-step trials likewise."""

    step: dict
    subset_eval: dict
    full_eval: dict
    short_step: dict
    short_eval: dict

    def trial(self, design: Design, name: str, stopped_at: int | None, evals: int) -> float:
        """A trial's compute: training to where it stopped (None: it ran its steps), its subset evals and, for a
        full-budget trial that ran to the end, the full eval."""
        if design.steps == SHORT_STEPS:
            return (stopped_at or SHORT_STEPS) * self.short_step[name] + evals * self.short_eval[name]
        ran = stopped_at or FULL_STEPS
        return ran * self.step[name] + evals * self.subset_eval[name] + (0.0 if stopped_at else self.full_eval[name])

    def full_run(self, name: str) -> float:
        """A promotion re-run: the promotion budget's training and the full eval (no periodic evals)."""
        return FULL_STEPS * self.step[name] + self.full_eval[name]


def step_seconds(run: dict) -> float:
    """A run's seconds a training step: the median over its 5-step segments (between two evals)."""
    marks = sorted(run["train_s"].items())
    return statistics.median((t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip([(0, 0.0), *marks], marks))


def eval_steps(table: dict) -> tuple[float, float]:
    """A subset eval and the full eval in training steps: each run's eval seconds over its seconds a step, the
    median over the runs."""
    runs = [r for c in table.values() for r in c["runs"].values()]
    subset = statistics.median(statistics.median(r["eval_s"].values()) / step_seconds(r) for r in runs)
    full = statistics.median(r["final_eval_s"] / step_seconds(r) for r in runs)
    return subset, full


def costs(full: dict, short: dict | None) -> Costs:
    """The cost model from the grid's measured timings."""
    subset, whole = eval_steps(full)
    short_subset = eval_steps(short)[0] if short else 0.0
    return Costs(step=dict.fromkeys(full, 1.0), subset_eval=dict.fromkeys(full, subset),
                 full_eval=dict.fromkeys(full, whole), short_step=dict.fromkeys(short or {}, 1.0),
                 short_eval=dict.fromkeys(short or {}, short_subset))


def grid_compute(table_truth: dict, cost: Costs) -> float:
    """One pass over every configuration at the promotion budget (one seed, the full eval, no periodic evals)."""
    return sum(cost.full_run(k) for k in table_truth)


# ---- one replay ----

def _sampler(design: Design, seed: int):
    import optuna

    if design.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **design.sampler_kwargs)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(design: Design):
    from lora_search.config.samplers import make_pruner

    return make_pruner(SimpleNamespace(sweep=SimpleNamespace(pruner=dict(design.pruner))))


def replay(design: Design, grid: dict, axes: dict, seed: int, budget: float, cost: Costs, true: dict,
           min_trials: int = 0, order: tuple = ()) -> list[dict]:
    """One sampler seed of a design searching the grid until its search compute reaches budget (and at least
    min_trials trials). `order`: configurations (params dicts) enqueued first (the tests). Returns one row per
    trial: its configuration, drawn seed, state, the step it stopped at, its cost, the search's compute so far and,
    were the search stopped there, the promoted configuration, the re-runs' seconds and the total compute."""
    import optuna

    rng, rerun_rng = random.Random(seed * 7919 + 1), random.Random(seed * 104729 + 7)
    study = optuna.create_study(direction="minimize", sampler=_sampler(design, seed), pruner=_pruner(design))
    for params in order:
        study.enqueue_trial(params)
    table = grid["short"] if design.steps == SHORT_STEPS else grid["full"]
    seeds = sorted(next(iter(grid["full"].values()))["runs"])
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in axes.items()}
    steps = report_steps(design)
    spent, steps_spent, rows, observed, rerun_seed = 0.0, 0, [], {}, {}
    while spent < budget or len(rows) < min_trials:
        trial = study.ask(dists)
        name = ",".join(f"{k.split('.')[-1]}={trial.params[k]}" for k in axes)
        drawn = rng.choice(seeds)
        run = table[name]["runs"][drawn]
        stopped, evals = None, 0
        for step in steps:
            trial.report(run["curve"][step], step)
            evals += 1
            if (step < design.steps or design.prune_last) and trial.should_prune():
                stopped = step
                break
        trial_cost = cost.trial(design, name, stopped, evals)
        spent += trial_cost
        steps_spent += design.steps if stopped is None else stopped
        if stopped is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, run["value"])
            observed[name] = min(observed.get(name, math.inf), run["value"])
        promoted, promotion, promotion_steps = None, 0.0, 0
        if observed and design.top_k:
            top = sorted(observed, key=observed.get)[:design.top_k]
            for c in top:
                rerun_seed.setdefault(c, rerun_rng.choice(seeds))
            reruns = {c: grid["full"][c]["runs"][rerun_seed[c]]["value"] for c in top}
            promoted, promotion = min(reruns, key=reruns.get), sum(cost.full_run(c) for c in top)
            promotion_steps = FULL_STEPS * len(top)
        elif observed:
            promoted = min(observed, key=observed.get)
        rows.append({"trial": len(rows), "config": name, "seed": drawn, "state": "complete" if stopped is None else "pruned",
                     "stopped_at": design.steps if stopped is None else stopped, "cost": trial_cost, "compute": spent,
                     "promoted": promoted, "promotion": promotion, "total": spent + promotion,
                     "total_steps": steps_spent + promotion_steps,
                     "promoted_true": true.get(promoted) if promoted else None})
    return rows


# ---- figures ----

def answer_at(rows: list[dict], budget: float) -> dict | None:
    """The search's answer at a compute budget: the last trial whose search and re-runs fit in it (None: nothing
    promoted within it)."""
    fit = [r for r in rows if r["total"] <= budget + 1e-9 and r["promoted"] is not None]
    return fit[-1] if fit else None


def _median(values: list[float]) -> float | None:
    m = statistics.median(values) if values else math.inf
    return None if math.isinf(m) else m


def _quantile(values: list[float], q: float) -> float | None:
    v = sorted(values)[round(q * (len(values) - 1))] if values else math.inf
    return None if math.isinf(v) else v


def figures(runs: list[list[dict]], true: dict, noise: float, budget: float, grid_cost: float) -> dict:
    """A design over its sampler seeds at one compute budget: the share whose promoted configuration's true score
    lies within `noise` of the grid's best, the gap's median (relative to the best; no answer counts as infinite),
    the compute its answers used and its trials."""
    best = min(true.values())
    answers = [answer_at(rows, budget) for rows in runs]
    gaps = [(a["promoted_true"] - best) if a else math.inf for a in answers]
    return {
        "budget": budget, "budget_fraction_of_grid": budget / grid_cost, "seeds": len(runs),
        "p_within_seed_noise": sum(g <= noise + 1e-12 for g in gaps) / len(runs),
        "gap_median": _median([g / abs(best) for g in gaps]),
        "gap_abs_median": _median(gaps),
        "no_answer": sum(a is None for a in answers),
        "compute_median": _median([a["total"] for a in answers if a]),
        "compute_fraction_median": _median([a["total"] / grid_cost for a in answers if a]),
        "trials_median": _median([a["trial"] + 1 for a in answers if a]),
        "steps_trained_median": _median([a["total_steps"] for a in answers if a]),
        "promoted": [a["promoted"] if a else None for a in answers],
    }


def curve(runs: list[list[dict]], true: dict, grid_cost: float, top_fraction: float, points: int = 25) -> list[dict]:
    """Best-so-far against compute: the promoted configuration's true gap (relative to the grid's best; median and
    quartiles over the sampler seeds, no answer counting as infinite) at evenly spaced shares of the grid's
    compute."""
    best, out = min(true.values()), []
    for i in range(1, points + 1):
        fraction = top_fraction * i / points
        gaps = []
        for rows in runs:
            a = answer_at(rows, fraction * grid_cost)
            gaps.append((a["promoted_true"] - best) / abs(best) if a else math.inf)
        out.append({"compute_fraction": round(fraction, 4), "gap_median": _median(gaps),
                    "gap_q1": _quantile(gaps, 0.25), "gap_q3": _quantile(gaps, 0.75)})
    return out


def spearman_by_step(full: dict, true: dict) -> dict:
    """How well each step's subset eval (mean over the seeds) ranks the configurations as their true scores do."""
    from lora_search.core import stats

    out = {}
    for step in NOISE_STEPS:
        names = [k for k in true if all(step in r["curve"] for r in full[k]["runs"].values())]
        early = [statistics.fmean(r["curve"][step] for r in full[k]["runs"].values()) for k in names]
        out[str(step)] = stats.spearman(early, [true[k] for k in names])
    return out


# ---- the record ----

def winner(by_design: dict, budget: str) -> str:
    """The design most often within the seed noise at that budget; ties: the smaller median gap, then less compute."""
    def rank(name):
        f = by_design[name]["at"][budget]
        return (-f["p_within_seed_noise"], math.inf if f["gap_median"] is None else f["gap_median"],
                f["compute_median"] or math.inf)
    return min(by_design, key=rank)


def compare(grid: dict, axes: dict, all_designs: list[Design], n_trials: int, sampler_seeds: int,
            budget_fraction: float | None = None) -> dict:
    """Every design replayed on the grid with `sampler_seeds` seeds; figures at equal compute: today's design's at
    its shipped n_trials (median over the seeds; or budget_fraction of the grid's compute where given, or where
    today's design cannot be replayed), and twice that; best-so-far curves."""
    true = truth(grid["full"])
    noise_all = seed_noise(grid["full"])
    noise = noise_all["full"]["median_abs_diff"]
    cost = costs(grid["full"], grid.get("short"))
    grid_cost = grid_compute(true, cost)
    replayable = [d for d in all_designs if d.steps == FULL_STEPS or grid.get("short")]
    today = next((d for d in replayable if d.top_k), None)
    seeds = list(range(sampler_seeds))
    if budget_fraction is None and today is not None:
        shipped = [replay(today, grid, axes, s, 0.0, cost, true, min_trials=n_trials)[n_trials - 1] for s in seeds]
        budget = statistics.median(r["total"] for r in shipped)
    else:
        budget = (budget_fraction or 0.25) * grid_cost
    budgets = {"equal": budget, "double": 2 * budget}
    top_fraction = max(0.5, 1.1 * budgets["double"] / grid_cost)
    out = {}
    for d in replayable:
        runs = [replay(d, grid, axes, s, top_fraction * grid_cost, cost, true, min_trials=n_trials if d.top_k else 0)
                for s in seeds]
        out[d.name] = {"design": {"sampler": d.sampler, "pruner": d.pruner, "trial_steps": d.steps,
                                  "top_k": d.top_k, "report_steps": report_steps(d), "prune_last": d.prune_last},
                       "at": {k: figures(runs, true, noise, b, grid_cost) for k, b in budgets.items()},
                       "curve": curve(runs, true, grid_cost, top_fraction)}
        if d.top_k:
            out[d.name]["as_shipped"] = figures([r[:n_trials] for r in runs], true, noise, math.inf, grid_cost)
    best = min(true, key=true.get)
    return {"configurations": len(true), "best": best, "best_value": true[best],
            "true": dict(sorted(true.items(), key=lambda kv: kv[1])), "seed_noise": noise_all,
            "seed_noise_short": seed_noise(grid["short"], (5, 10)) if grid.get("short") else None,
            "within_noise_of_best": sorted(k for k, v in true.items() if v - true[best] <= noise),
            "spearman_by_step": spearman_by_step(grid["full"], true), "grid_compute": grid_cost,
            "cost_in_steps": {"subset_eval": next(iter(cost.subset_eval.values())),
                              "full_eval": next(iter(cost.full_eval.values())),
                              "short_subset_eval": next(iter(cost.short_eval.values()), None)},
            "step_seconds_median": statistics.median(step_seconds(r) for c in grid["full"].values()
                                                     for r in c["runs"].values()),
            "budgets": budgets, "budget_fraction": budget / grid_cost, "designs": out,
            "winner_at_equal_compute": winner(out, "equal"), "winner_at_double_compute": winner(out, "double")}


def plot(result: dict, path, title: str) -> None:
    """Best-so-far against compute, one line per design (median and quartiles), the equal-compute budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, d in result["designs"].items():
        pts = [p for p in d["curve"] if p["gap_median"] is not None]
        xs = [100 * p["compute_fraction"] for p in pts]
        ax.plot(xs, [100 * p["gap_median"] for p in pts], label=name,
                lw=2.2 if name in (result["winner_at_equal_compute"],) or d["design"]["top_k"] else 1.1)
        q = [p for p in pts if p["gap_q1"] is not None and p["gap_q3"] is not None]
        ax.fill_between([100 * p["compute_fraction"] for p in q], [100 * p["gap_q1"] for p in q],
                        [100 * p["gap_q3"] for p in q], alpha=0.08)
    ax.axvline(100 * result["budget_fraction"], color="grey", ls=":", lw=1)
    noise = result["seed_noise"]["full"]["median_abs_diff"] / abs(result["best_value"])
    ax.axhline(100 * noise, color="grey", ls="--", lw=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("compute spent, % of one pass over the grid at the promotion budget")
    ax.set_ylabel("true gap of the promoted configuration to the best, %")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
