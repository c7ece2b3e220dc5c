"""The same sweep with and without pruning: the compute each spends and the best metric each reaches.

Two arms, each `lora_search.commands.pipeline.run` with stage=search in this process, on the rank_lr space:
  pruned    trials of --steps optimizer steps, a cheap eval of the fixed eval subset every --eval-every
            steps reported to the pruner (--pruner; default successive halving, min_resource 2,
            reduction_factor 3); the objective is the eval after the last step
  unpruned  the same trials with no pruner and no intermediate evals (a user without pruning would not
            pay for them): one eval of the same subset once the steps are done is the objective

Each arm runs once per TPE sampler seed (--seeds), in alternating order. Per arm and seed: wall time,
compute (the sum of the trials' durations in the Optuna study), optimizer steps taken (a complete
trial's `steps`, a pruned trial's step at pruning), trial states, the best value and params.
Targets: the pruned sweeps spend at most 40% of the unpruned compute (summed over the seeds), and
their best is within the run-to-run spread: the mean pruned best is no worse than the mean unpruned best
by more than the unpruned repeats' bests lie apart (see figures()).

  .venv/bin/python benchmarks/pruning.py          # embedded SmolLM2, 16 trials of 36 steps, seeds 0, 1 and 2
                                                  # -> results/bench/pruning.json (about 80 minutes on 2 CPU cores)
  .venv/bin/python benchmarks/pruning.py --quick  # tiny model, 4 trials of 4 steps, seed 0 (seconds; the tests use it)

Options: --model, --trials, --steps, --eval-every, --pruner, --seeds, --threads, --cache-dir, --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import ROOT  # noqa: E402
from lora_search.commands import pipeline
from lora_search.config.compose import load_config  # noqa: E402
from lora_search.core import records  # noqa: E402
from lora_search.search import study as study_lib  # noqa: E402

log = logging.getLogger("pruning")
NAME = "pruning"
ARMS = ("pruned", "unpruned")  # reversed on every second seed
# Successive halving with cuts at steps 2, 6 and 18. Measured on this budget (16 sequential trials of 36 steps;
# Optuna's asynchronous halving promotes a trial only while it ranks in the top max(1, n // reduction_factor) at a
# rung, so with few trials only a best-so-far passes):
#   reduction_factor 5 (steps 2, 10), seeds 0-2, the record of 2026-11-24: 0.27x the unpruned compute, but seeds 1
#   and 2 completed only their first trial; mean best 0.073 worse than unpruned, beyond the 0.047 spread. Step 2 is
#   inside the learning-rate warm-up (4 steps, the first update at lr 0): a fast starter (all_linear r=32, high lr)
#   set a step-2 bar that the configurations best at step 36 (attn r=8) did not reach, then fell at step 10.
#   reduction_factor 3 (steps 2, 6, 18), seeds 0-2, the record of 2026-11-24 (15:44): 0.38x the unpruned compute
#   (0.32x the steps); mean best 0.005 worse, inside the 0.047 spread. It keeps 2-6 complete trials per seed, so the
#   configurations that end best survive the early rungs.
PRUNER = "{type: successive_halving, min_resource: 2, reduction_factor: 3}"
# Trials long enough that a trial pruned at the first rung (2 steps) saves most of its cost: at 12 steps, its
# set-up and one eval still cost about 30% of a whole trial (the 12-step record: 0.60x the unpruned compute).
STEPS = 36
QUICK = ["data.train_per_task=8", "data.eval_per_task=4", "trainer.batch_size=4", "trainer.eval_batch_size=8",
         "trainer.logging_steps=2", "trainer.precision=fp32"]
TARGET_RATIO = 0.40
DESCRIPTIONS = {
    "pruned": "pipeline.run(stage=search): an eval of the fixed subset every eval_every steps, reported to the "
              "pruner; the objective is the eval after the last step",
    "unpruned": "pipeline.run(stage=search), sweep.pruner=none and trainer.eval_every=0: no intermediate evals; "
                "the objective is one eval of the same subset after the last step",
}


@dataclass
class Setup:
    """What both arms share."""

    overrides: dict  # arm -> the overrides its config is composed from (seed and results_dir added per run)
    seeds: list
    work: Path  # each run's results_dir lies under it


# ---- the overrides ----

def parse_pruner(text: str):
    """A pruner as --pruner gives it (YAML or JSON: a name, or {type: name, **kwargs})."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("type"), str)):
        return value
    raise ValueError(f"--pruner must be a name or a mapping with a type, e.g. {PRUNER}; got {text!r}")


def hydra_value(value) -> str:
    """A value in Hydra's override grammar ({a: 1, b: [x, y]}, null, true, 'quoted text')."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", text) and text.lower() not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pruner_overrides(pruner) -> list[str]:
    """Overrides that set sweep.pruner to exactly this (a mapping replaces the sweep file's, not merged)."""
    if isinstance(pruner, str):
        return [f"sweep.pruner={hydra_value(pruner)}"]
    return ["sweep.pruner=null", f"sweep.pruner={hydra_value(dict(pruner))}"]


def trial_block(steps: int, eval_every: int, subset: int) -> str:
    """The short-trial budget both arms train with (eval_every 0: no intermediate evals)."""
    return (f"++sweep.trial={{trainer.max_steps: {steps}, trainer.eval_every: {eval_every}, "
            f"trainer.eval_subset: {subset}, trainer.exact_match_items: 0, trainer.final_eval: subset}}")


def arm_overrides(model: str, trials: int, steps: int, eval_every: int, pruner, quick: bool,
                  cache_dir: str | None) -> dict:
    """Each arm's overrides: the same sweep, model, data and steps; pruner and evals differ."""
    subset = 8 if quick else 32
    common_ = [f"model={model}", "sweep=rank_lr", "stage=search", "tracking=none", f"sweep.n_trials={trials}",
               *([f"cache_dir={cache_dir}"] if cache_dir else []), *(QUICK if quick else [])]
    return {"pruned": common_ + pruner_overrides(pruner) + [trial_block(steps, eval_every, subset)],
            "unpruned": common_ + ["sweep.pruner=none", trial_block(steps, 0, subset)]}


# ---- one sweep ----

def trial_row(frozen, out: Path) -> dict:
    """A trial's state, steps taken, seconds (Optuna's start to finish), value and what it reported to the pruner."""
    m = records.read_json(out / "trials" / f"{frozen.number:04d}" / "metrics.json") or {}
    reported = m.get("intermediate") or []
    steps = m.get("steps")
    if steps is None:  # pruned (or failed): the step it stopped at, else its last report
        steps = m.get("pruned_at_step")
    if steps is None and reported:
        steps = reported[-1]["step"]
    return {"number": frozen.number, "state": frozen.state.name.lower(), "steps": steps,
            "seconds": common.rounded(frozen.duration.total_seconds()) if frozen.duration else None,
            "value": frozen.value, "reports": len(frozen.intermediate_values),
            "intermediate": [[step, value] for step, value in sorted(frozen.intermediate_values.items())],
            "periodic_eval_s": common.rounded(m.get("periodic_eval_s")), "params": frozen.params}


def run_sweep(setup: Setup, arm: str, seed: int) -> dict:
    """One arm's sweep with one sampler seed; its figures and every trial."""
    cfg = load_config(setup.overrides[arm] + [f"sweep.sampler.seed={seed}",
                                              f"results_dir={setup.work / f'{arm}-seed{seed}'}"])
    with common.Stopwatch() as total, common.quiet_optuna():
        code = pipeline.run(cfg)
    if code:
        raise RuntimeError(f"pipeline.run returned {code}")
    study = study_lib.open_study(cfg)
    trials = [trial_row(t, study_lib.study_dir(cfg)) for t in study.get_trials(deepcopy=False)]
    states = [t["state"] for t in trials]
    best = study_lib.best_trial(study)
    compute = sum(t["seconds"] or 0.0 for t in trials)
    row = {"seed": seed, "wall_s": common.rounded(total.seconds), "compute_s": common.rounded(compute),
           "steps": sum(t["steps"] or 0 for t in trials), "n_trials": len(trials),
           "complete": states.count("complete"), "pruned": states.count("pruned"), "failed": states.count("fail"),
           "reports": sum(t["reports"] for t in trials), "best_trial": best.number if best else None,
           "best_value": best.value if best else None, "best_params": best.params if best else None,
           "trials": trials}
    log.info("%s, seed %d: compute %.1f s, %d steps, %d complete / %d pruned, best %s", arm, seed, compute,
             row["steps"], row["complete"], row["pruned"], common.fmt(row["best_value"]))
    return row


def _keeping(arm: str, rows: list):
    """A runner for common.alternate (repeat r: seed r) that keeps every seed's row (or its error) in `rows`."""
    def runner(setup: Setup, r: int) -> dict:
        seed = setup.seeds[r]
        try:
            row = run_sweep(setup, arm, seed)
        except Exception as e:
            rows.append({"seed": seed, "error": f"{type(e).__name__}: {e}"})
            raise  # alternate logs it and goes on with the other arm
        rows.append(row)
        return row
    return runner


# ---- figures ----

def figures(runs: dict, direction: str) -> tuple[dict, dict]:
    """Compute and step ratios over the seeds both arms finished, the unpruned bests' spread, and the targets.

    The quality target, "the best metric within the run-to-run spread": the pruned sweeps' mean best is no
    further from the unpruned sweeps' mean best (in the worse direction) than the unpruned repeats lie apart
    (the range of their bests over the seeds). With one seed there is no spread: the pruned best must then be
    no worse than the unpruned one. The stricter per-seed check (every pruned best no worse than the worst
    unpruned repeat) is recorded beside it: with two seeds, two sweeps that pruning did not change at all fail
    it more often than not (a third draw beats the worse of two only 2 times in 3, per seed)."""
    good = {arm: {r["seed"]: r for r in runs[arm] if "error" not in r} for arm in ARMS}
    seeds = [s for s in good["pruned"] if s in good["unpruned"]]
    pick = {arm: [good[arm][s] for s in seeds] for arm in ARMS}
    total = {arm: {key: sum(r[key] for r in pick[arm]) for key in ("compute_s", "steps")} for arm in ARMS}
    bests = {arm: [r["best_value"] for r in pick[arm]] for arm in ARMS}
    sign = 1 if direction == "minimize" else -1  # worse = positive
    complete = bool(seeds) and all(b is not None for arm in ARMS for b in bests[arm])
    known = [b for b in bests["unpruned"] if b is not None]
    worst = (max(known) if direction == "minimize" else min(known)) if known else None
    spread = max(known) - min(known) if len(known) > 1 else None
    gap = sign * (statistics.mean(bests["pruned"]) - statistics.mean(bests["unpruned"])) if complete else None

    def ratio(key):
        return total["pruned"][key] / total["unpruned"][key] if total["unpruned"][key] else None

    out = {"seeds_compared": seeds, "compute_ratio": common.rounded(ratio("compute_s"), 4),
           "step_ratio": common.rounded(ratio("steps"), 4),
           **{f"{arm}_{key}": common.rounded(total[arm][key]) for arm in ARMS for key in ("compute_s", "steps")},
           "best_values": bests, "unpruned_best_spread": spread, "unpruned_best_worst": worst,
           "best_gap_mean": gap,  # mean pruned best - mean unpruned best, positive = worse
           "best_gap_per_seed": [None if a is None or b is None else a - b
                                 for a, b in zip(bests["pruned"], bests["unpruned"])],
           "every_pruned_best_no_worse_than_worst_unpruned": complete and all(
               sign * (b - worst) <= 0 for b in bests["pruned"]),
           "same_params": same_params(pick)}
    compute_met = out["compute_ratio"] is not None and out["compute_ratio"] <= TARGET_RATIO
    quality_met = complete and gap <= (spread if spread is not None else 0.0)
    targets = {"compute_ratio": TARGET_RATIO, "compute_met": compute_met,
               "best": "the pruned sweeps' mean best no worse than the unpruned sweeps' mean best by more than the "
                       "unpruned repeats' spread (max - min of their bests; one seed: no worse at all)",
               "best_met": quality_met, "met": compute_met and quality_met}
    return out, targets


def same_params(pick: dict) -> dict:
    """Trials complete in both arms of a seed with the same params (the sampler's start-up trials): how many,
    and the largest difference in value between the arms (what the intermediate evals alone change)."""
    diffs = []
    for pruned, unpruned in zip(pick["pruned"], pick["unpruned"]):
        values = {json.dumps(t["params"], sort_keys=True): t["value"] for t in unpruned["trials"]
                  if t["state"] == "complete"}
        diffs += [abs(t["value"] - values[key]) for t in pruned["trials"] if t["state"] == "complete"
                  and (key := json.dumps(t["params"], sort_keys=True)) in values]
    return {"trials": len(diffs), "max_value_diff": max(diffs, default=None)}


def arm_summary(arm: str, rows: list) -> dict:
    """An arm: what it does and its per-seed rows (each with its trials)."""
    good = [r for r in rows if "error" not in r]
    return {"description": DESCRIPTIONS[arm], "compute_s": common.rounded(sum(r["compute_s"] for r in good)),
            "steps": sum(r["steps"] for r in good), "runs": rows}


# ---- the run ----

def run(model: str = "smollm2_135m", trials: int = 16, steps: int = STEPS, eval_every: int = 2, pruner=None,
        seeds: tuple = (0, 1, 2), quick: bool = False, cache_dir: str | None = None, threads: int | None = None,
        out: Path | str | None = None) -> dict:
    """Run both arms once per seed, alternating their order, and write the record (results/bench/pruning.json)."""
    pruner = pruner if pruner is not None else parse_pruner(PRUNER)
    ovr = arm_overrides(model, trials, steps, eval_every, pruner, quick, cache_dir)
    rows: dict = {arm: [] for arm in ARMS}
    with common.threads(threads), common.Stopwatch() as total, tempfile.TemporaryDirectory(prefix="pruning-") as work:
        setup = Setup(ovr, list(seeds), Path(work))
        cfgs = {arm: load_config(ovr[arm] + [f"results_dir={Path(work) / 'unused'}"]) for arm in ARMS}
        for cfg in cfgs.values():  # a bad pruner or space fails here, before either arm trains
            study_lib.check_sweep(cfg)
        _, order = common.alternate({arm: _keeping(arm, rows[arm]) for arm in ARMS}, len(seeds), setup)
        cfg = cfgs["pruned"]
        figs, targets = figures(rows, cfg.sweep.direction)
        t = common.trial_base(cfg).trainer
        result = common.record(NAME, {
            "model": cfg.model.name,
            "settings": {"model": cfg.model.name, "trials": trials, "max_steps": t.max_steps, "eval_every": eval_every,
                         "eval_subset": t.eval_subset, "seeds": list(seeds), "pruner": common.spec(cfg.sweep.pruner),
                         "sampler": common.spec(cfg.sweep.sampler), "space": dict(cfg.sweep.space),
                         "metric": cfg.sweep.metric, "direction": cfg.sweep.direction, "quick": quick,
                         "torch_threads": common.torch_threads(), "overrides": ovr},
            "order": order,
            "arms": {arm: arm_summary(arm, rows[arm]) for arm in ARMS},
            "figures": figs,
            "targets": targets,
        })
    result["wall_s"] = common.rounded(total.seconds)
    path = common.write_record(result, out)
    log.info("wrote %s", path)
    return result


def summary_line(result: dict) -> str:
    """One line for the console."""
    f, t, s = result["figures"], result["targets"], result["settings"]
    bests = {arm: ", ".join(common.fmt(b) for b in f["best_values"][arm]) or "-" for arm in ARMS}
    return (f"pruned sweep: {common.fmt(f['compute_ratio'], '.2f')}x the unpruned compute "
            f"({common.fmt(f['pruned_compute_s'], '.1f')} s vs {common.fmt(f['unpruned_compute_s'], '.1f')} s; "
            f"steps {common.fmt(f['step_ratio'], '.2f')}x; target <= {TARGET_RATIO:.2f}x: "
            f"{'met' if t['compute_met'] else 'not met'}); best {s['metric']} pruned {bests['pruned']} vs unpruned "
            f"{bests['unpruned']} (mean gap {common.fmt(f['best_gap_mean'], '+.4f')}, spread "
            f"{common.fmt(f['unpruned_best_spread'], missing='not measured, one seed')}; within the spread: "
            f"{'met' if t['best_met'] else 'not met'})")


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run, print a summary; return the record."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model config group (default smollm2_135m; tiny_llama with --quick)")
    p.add_argument("--trials", type=int, default=None, help="trials per sweep (default 16; 4 with --quick)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per trial (default {STEPS}; 4 with --quick)")
    p.add_argument("--eval-every", type=int, default=2, help="the pruned arm's eval cadence in steps (default 2)")
    p.add_argument("--pruner", default=PRUNER, help=f"the pruned arm's pruner, YAML or JSON (default {PRUNER})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="TPE sampler seeds, one sweep per arm each (default 0 1 2; 0 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's own; 1 with --quick)")
    p.add_argument("--cache-dir", default=None, help="where converted models live (default ~/.cache/lora_search)")
    p.add_argument("--out", default=None, help="the record (default results/bench/pruning.json; "
                                               "results/bench-quick/pruning.json with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for tests: tiny model and data, fp32, 4 trials of 4 steps, seed 0, 1 thread")
    a = p.parse_args(argv)
    trials, steps = a.trials or (4 if a.quick else 16), a.steps or (4 if a.quick else STEPS)
    if min(trials, steps, a.eval_every) < 1:
        p.error("--trials, --steps and --eval-every must be positive integers")
    try:
        pruner = parse_pruner(a.pruner)
    except ValueError as e:
        p.error(str(e))
    common.configure_logging()
    out = a.out or (ROOT / "results" / "bench-quick" / f"{NAME}.json" if a.quick else common.bench_path(NAME))
    result = run(model=a.model or ("tiny_llama" if a.quick else "smollm2_135m"), trials=trials, steps=steps,
                 eval_every=a.eval_every, pruner=pruner, seeds=a.seeds or ((0,) if a.quick else (0, 1, 2)),
                 quick=a.quick, cache_dir=a.cache_dir, threads=a.threads or (1 if a.quick else None), out=out)
    print(summary_line(result))
    return result


if __name__ == "__main__":
    main()
