"""How far to trust a study's answer: the eval set's own noise around the best trial's score (from its per-row
losses, or a Wilson interval for exact match), and the study's headline numbers with the importances' intervals.
Nothing here trains.
"""

from __future__ import annotations

import logging
import math

import optuna
from optuna.trial import TrialState

from lora_search.core import stats
from lora_search.report import importance

log = logging.getLogger(__name__)

# ---- per-row eval losses (SFT) ----

# ---- the eval set's noise ----

def noise(study: optuna.Study, metric: str) -> dict | None:
    """The best trial's eval-noise interval and which complete trials lie inside it (single objective only)."""
    if len(study.directions) > 1:
        return None
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value) and not t.user_attrs.get("over_budget")]
    if not complete:
        return None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = (max if maximize else min)(complete, key=lambda t: t.value)
    interval = stats.score_interval(metric, best.value, best.user_attrs)
    if interval is None:
        return None
    others = [t for t in complete if t.number != best.number]
    inside = [t.number for t in others if interval["low"] <= t.value <= interval["high"]]
    return {"trial": best.number, "value": best.value, **interval, "others": len(others), "inside": inside,
            "spread": [min(t.value for t in complete), max(t.value for t in complete)]}


def noise_sentence(found: dict | None, metric: str) -> str | None:
    """One or two sentences on the eval noise: the interval, and a warning when the trials lie inside it."""
    if not found:
        return None
    what = metric.replace("_", " ")
    head = (f"The best trial's {what} is {found['value']:.4g}, 95% interval {found['low']:.4g} to {found['high']:.4g} "
            f"({found['how']}).")
    if not found["others"]:
        return head
    if len(found["inside"]) == found["others"]:
        return (f"{head} **Every other complete trial ({found['spread'][0]:.4g} to {found['spread'][1]:.4g}) lies "
                f"inside it: the eval set is too small to tell these configurations apart.** Add eval rows "
                f"(data.eval_per_task, or more rows in your eval file; trainer.eval_subset for trials).")
    return (f"{head} {len(found['inside'])} of the {found['others']} other complete trials lie inside it"
            f"{' (no better than the best within the noise)' if found['inside'] else ''}.")


# ---- importances with intervals ----

# ---- short trials vs full runs ----

def summary(study: optuna.Study, metric: str) -> dict:
    """Headline numbers of a study: counts by state, best value and params, importances with their intervals, the
    eval noise around the best value."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = importance.complete_trials(study, metric)
    several = len(study.directions) > 1
    best = None
    if complete and not several:
        try:
            best = study.best_trial
        except ValueError:  # no feasible trial (all over the memory budget)
            best = None
    shares = importance.importances(study, metric)
    intervals = importance.importance_intervals(study, shares, metric)
    front = {"objectives": list(study.metric_names or []), "pareto_front": [t.number for t in study.best_trials]} \
        if several else {}
    return {
        **front,
        "metric": metric, "direction": ",".join(d.name.lower() for d in study.directions), "trials": len(states),
        "complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL), "running": states.count(TrialState.RUNNING),
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else {}, "importances": shares,
        "importance_method": importance.importance_method() if shares else None,
        "importance_intervals": {k: list(v) for k, v in intervals.items()},
        "importance_sentence": importance.importance_sentence(shares, metric, n_complete=len(complete), intervals=intervals),
        "eval_noise": noise(study, metric),
    }
