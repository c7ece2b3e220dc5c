"""Parameter importances: each searched parameter's share (Optuna's fANOVA, seeded, or PED-ANOVA where
scikit-learn is missing), bootstrap intervals around the shares, and a sentence that states no ranking the
intervals do not support. Nothing here trains or draws.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)
LEVEL = 0.90  # importance intervals: the middle 90% of the bootstrap estimates
RESAMPLES = 100  # bootstrap resamples of the complete trials
RESAMPLE_TREES = 16  # fANOVA's forest per resample (the point estimate keeps Optuna's 64): 0.05 s instead of 0.5 s
MIN_TRIALS_PER_PARAM = 2  # fewer complete trials than 2 per searched parameter: too few to rank them

NAMES = {"trainer.learning_rate": "learning rate", "lora.r": "rank", "lora.alpha_ratio": "alpha ratio",
         "lora.targets": "target modules", "lora.dropout": "dropout"}


SEED = 0  # fANOVA's random forest


MIN_PED_ANOVA_TOP = 5  # PED-ANOVA's docs: at least 5 trials in the top quantile for a stable estimate


def readable(param: str) -> str:
    """A parameter's name for prose: `trainer.learning_rate` -> `learning rate`."""
    return NAMES.get(param, param.split(".")[-1].replace("_", " "))


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def importance_method() -> str:
    """`fanova` when scikit-learn is installed (fANOVA needs it), else `ped_anova`."""
    return "fanova" if importlib.util.find_spec("sklearn") is not None else "ped_anova"


def _ped_anova_quantile(n_complete: int) -> float:
    return min(0.5, max(0.1, MIN_PED_ANOVA_TOP / max(n_complete, 1)))


def make_evaluator(method: str, n_complete: int):
    """Optuna's importance evaluator for method (fANOVA seeded; PED-ANOVA's top quantile sized to the trials)."""
    if method == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=SEED)
    return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=_ped_anova_quantile(n_complete))


def objective_index(study: optuna.Study, metric: str | None) -> int | None:
    """The position of metric among a multi-objective study's values (None: a single-objective study)."""
    if len(study.directions) == 1:
        return None
    names = list(study.metric_names or [])
    return names.index(metric) if metric in names else 0


def target(study: optuna.Study, metric: str | None):
    """Optuna's `target` for plots and importances: that objective's value (None for a single objective)."""
    i = objective_index(study, metric)
    return None if i is None else (lambda t: t.values[i])


def trial_value(t, i: int | None):
    """A trial's value, or its i-th value in a multi-objective study."""
    return t.value if i is None else t.values[i]


def complete_trials(study: optuna.Study, metric: str | None = None) -> list[optuna.trial.FrozenTrial]:
    """The complete trials whose value for metric is finite."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    i = objective_index(study, metric)
    return [t for t in trials if t.values is not None and math.isfinite(trial_value(t, i))]


def varying(trials) -> list[str]:
    """The parameters that take more than one value among trials."""
    keys = sorted({k for t in trials for k in t.params})
    return [k for k in keys if len({repr(t.params.get(k)) for t in trials}) > 1]


def importances(study: optuna.Study, metric: str | None = None) -> dict[str, float]:
    """Each parameter's share of importance for metric (summing to 1, largest first; with several objectives,
    metric's, default the first); {} when it cannot be estimated."""
    trials = complete_trials(study, metric)
    i = objective_index(study, metric)
    if len(trials) < 2 or not varying(trials) or len({trial_value(t, i) for t in trials}) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(
                study, evaluator=make_evaluator(importance_method(), len(trials)), normalize=False,
                target=target(study, metric))
    except Exception as e:  # a report never fails on its importances
        log.info("parameter importances skipped: %s: %s", type(e).__name__, e)
        return {}
    kept = set(varying(trials))  # a parameter held at one value (a one-choice space entry) explains nothing
    raw = {k: v for k, v in raw.items() if k in kept}
    total = sum(float(v) for v in raw.values())
    if not total > 0:
        return {}
    shares = {k: float(v) / total for k, v in raw.items()}
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def method_description(method: str | None = None, n_complete: int | None = None) -> str:
    """How the importances were estimated, in a few words."""
    method = method or importance_method()
    over = f" over {n_complete} complete trials" if n_complete else ""
    if method == "fanova":
        return f"fANOVA{over}: each parameter's share of the variance explained by single parameters"
    top = f"best {_ped_anova_quantile(n_complete):.0%}" if n_complete else "best trials"
    return f"PED-ANOVA{over}: each parameter's share of the importance for landing in the {top} of trials"




def _importances(trials, evaluator, direction) -> dict[str, float]:
    study = optuna.create_study(direction=direction)  # in memory; PED-ANOVA's top quantile follows the direction
    study.add_trials(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=False)
    total = sum(float(v) for v in raw.values())
    return {k: float(v) / total for k, v in raw.items()} if total > 0 else {}


def importance_intervals(study: optuna.Study, shares: dict[str, float], metric: str | None = None,
                         resamples: int = RESAMPLES, seed: int = 0) -> dict[str, tuple[float, float]]:
    """A LEVEL interval for each share: the importances re-estimated on bootstrap resamples of the complete trials
    (Optuna's same evaluator; fANOVA with a smaller forest per resample). {} when it cannot be estimated."""
    if len(shares) < 2:
        return {}
    trials = complete_trials(study, metric)
    memo = (metric, resamples, seed, tuple((t.number, trial_value(t, objective_index(study, metric))) for t in trials))
    if memo in _MEMO:  # the report and the W&B summary ask for the same study's intervals
        return _MEMO[memo]
    _MEMO[memo] = found = _bootstrap(study, trials, metric, resamples, seed)
    return found


_MEMO: dict = {}


def _bootstrap(study, trials, metric, resamples: int, seed: int) -> dict:
    i = objective_index(study, metric)
    direction = study.directions[i or 0]
    method = importance_method()
    rng = np.random.default_rng(seed)
    # a single-objective copy of each trial: the bootstrap's study is single-objective whatever the study was
    flat = [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=trial_value(t, i))
            for t in trials]
    keys = sorted({k for t in trials for k in t.params})
    draws = {k: [] for k in keys}
    for r in range(resamples):
        pick = [flat[j] for j in rng.integers(0, len(flat), len(flat))]
        evaluator = (optuna.importance.FanovaImportanceEvaluator(n_trees=RESAMPLE_TREES, seed=r) if method == "fanova"
                     else make_evaluator(method, len(flat)))
        try:
            got = _importances(pick, evaluator, direction)
        except Exception:  # a resample with one distinct value: it says nothing, it is skipped
            continue
        if not got:
            continue
        for k in draws:
            draws[k].append(got.get(k, 0.0))
    if min((len(v) for v in draws.values()), default=0) < resamples // 2:
        return {}
    tail = (1 - LEVEL) / 2
    return {k: (float(np.quantile(v, tail)), float(np.quantile(v, 1 - tail))) for k, v in draws.items()}


def supported_order(shares: dict[str, float], intervals: dict) -> list[str]:
    """The parameters whose rank the intervals support, from the top: each one's interval lies wholly above every
    later parameter's. [] when not even the first place is supported."""
    order = sorted(shares, key=lambda k: -shares[k])
    out = []
    for n, k in enumerate(order[:-1]):
        if k not in intervals or any(intervals[k][0] <= intervals[o][1] for o in order[n + 1:] if o in intervals):
            break
        out.append(k)
    return out


def too_few(n_complete: int, n_params: int) -> bool:
    """Fewer complete trials than MIN_TRIALS_PER_PARAM per searched parameter."""
    return n_complete < MIN_TRIALS_PER_PARAM * n_params


def importance_sentence(importances: dict[str, float], metric: str, method: str | None = None,
                        n_complete: int | None = None, intervals: dict | None = None) -> str:
    """The importances in a sentence that states no ranking its bootstrap intervals (importance_intervals)
    do not support: "Learning rate matters most: 62% of the variance of eval loss (90% interval 45-78%) ..." only
    when its interval lies above every other's and there are enough trials; otherwise the shares with their
    intervals and a plain "too few to rank"."""

    what = metric.replace("_", " ")
    if not importances:
        return (f"There are too few complete trials to estimate parameter importances for {what} "
                "(it takes at least two complete trials that differ in their parameters and results).")
    method = method or importance_method()
    if len(importances) == 1:
        only = _capital(readable(next(iter(importances))))
        return f"{only} is the only parameter searched; the plots show how {what} depends on it."
    intervals = intervals or {}
    order = sorted(importances, key=lambda k: -importances[k])

    def bracket(k: str) -> str:
        lo_hi = intervals.get(k)
        return f" ({100 * lo_hi[0]:.0f}-{lo_hi[1]:.0%})" if lo_hi else ""

    def share(k: str) -> str:
        return f"{readable(k)} {importances[k]:.0%}{bracket(k)}"

    def listed(keys) -> str:
        parts = [share(k) for k in keys]
        return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]

    measure = f"of the variance of {what}" if method == "fanova" else f"of the importance for {what}"
    how = method_description(method, n_complete)
    if not intervals:
        return (f"Estimated shares {measure}: {listed(order)} ({how}); no interval could be estimated from these "
                "trials, so no ranking is claimed.")
    level = f"{LEVEL:.0%} bootstrap intervals"
    n = len(importances)
    if n_complete is not None and too_few(n_complete, n):
        return (f"{n_complete} complete trials are too few to rank {n} parameters (it takes at least "
                f"{MIN_TRIALS_PER_PARAM * n}): the shares {measure} are {listed(order)}, {level} in brackets; "
                f"run more trials (sweep.n_trials) before reading an order into them ({how}).")
    ranked = supported_order(importances, intervals)
    if not ranked:
        return (f"These trials do not rank the parameters: the shares {measure}, {listed(order)}, have overlapping "
                f"{level}, so no parameter is shown to matter more than another ({how}).")
    lead, rest = ranked[0], order[len(ranked):]
    text = f"{_capital(readable(lead))} matters most: {importances[lead]:.0%} {measure}{bracket(lead)}"
    if len(ranked) > 1:
        text += f", then {listed(ranked[1:])}"
    if len(rest) > 1:
        text += f"; the order of the rest ({listed(rest)}) is not established"
    elif rest:
        text += f", then {share(rest[0])}"
    return f"{text} ({level}; {how})."
