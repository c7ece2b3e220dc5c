"""How far to trust a study's answer: parameter importances with bootstrap intervals (and a sentence that states no
ranking the intervals do not support), the eval set's own noise around the best trial's score (from its per-row
losses, or a Wilson interval for exact match), and the agreement between short trials and full runs (Spearman).

Every figure is computed with Optuna's importance evaluators and SciPy; nothing here trains.
"""

from __future__ import annotations

import logging
import math
import statistics
import warnings

import numpy as np
import optuna
import torch

log = logging.getLogger(__name__)

LEVEL = 0.90  # importance intervals: the middle 90% of the bootstrap estimates
RESAMPLES = 100  # bootstrap resamples of the complete trials
RESAMPLE_TREES = 16  # fANOVA's forest per resample (the point estimate keeps Optuna's 64): 0.05 s instead of 0.5 s
Z95 = 1.959964  # eval noise: a normal 95% interval for a mean of per-row losses
MIN_TRIALS_PER_PARAM = 2  # fewer complete trials than 2 per searched parameter: too few to rank them
AGREEMENT_WARN = 0.6  # Spearman between short-trial and full-run scores below this: short trials mislead


# ---- per-row eval losses (SFT) ----

@torch.inference_mode()
def row_losses(trainer, model, dataset, chunk: int = 4) -> list[float]:
    """Each eval row's mean loss over its labelled (completion) tokens, in row order: one extra forward pass over
    the rows the final eval scored (TRL's fused LM head gives the eval loss but no logits, and TRL deprecates
    compute_metrics on logits for that reason). Rows with no labelled token are left out."""
    was_training = model.training
    model.eval()
    out = []
    try:
        device = next(model.parameters()).device
        loader = trainer.get_eval_dataloader(dataset)
        for batch in loader:
            labels = batch["labels"]
            for start in range(0, len(labels), chunk):  # a few rows at a time: the logits span the vocabulary
                part = {k: v[start:start + chunk].to(device) for k, v in batch.items()
                        if k in ("input_ids", "attention_mask", "position_ids") and hasattr(v, "to")}
                logits = model(**part).logits[:, :-1, :].float()
                target = labels[start:start + chunk, 1:].to(device)
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
                mask = target != -100
                for row, keep in zip(nll, mask):
                    if keep.any():
                        out.append(float(row[keep].mean()))
    finally:
        model.train(was_training)
    return out


def standard_error(values: list[float]) -> float | None:
    """The standard error of the mean of values (None for fewer than two)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


# ---- the eval set's noise ----

def score_interval(metric: str, value: float | None, attrs: dict) -> dict | None:
    """A 95% interval for a run's score from its eval rows: eval loss (and perplexity) from the per-row losses'
    standard error, exact match from a Wilson interval over the answered items; None when nothing says."""
    if value is None or not math.isfinite(value):
        return None
    if metric in ("eval_loss", "perplexity"):
        se, n = attrs.get("eval_loss_se"), attrs.get("eval_loss_rows")
        if not se or not n:
            return None
        loss = value if metric == "eval_loss" else math.log(value)
        low, high = loss - Z95 * se, loss + Z95 * se
        if metric == "perplexity":
            low, high = math.exp(low), math.exp(high)
        return {"low": low, "high": high, "n": n, "how": f"from its {n} eval rows' losses"}
    if metric == "exact_match":
        n = attrs.get("exact_match_n")
        if not n:
            return None
        from scipy.stats import binomtest

        ci = binomtest(round(value * n), n).proportion_ci(confidence_level=0.95, method="wilson")
        return {"low": float(ci.low), "high": float(ci.high), "n": n, "how": f"Wilson, {n} answered eval items"}
    return None


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
    interval = score_interval(metric, best.value, best.user_attrs)
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
    from lora_search.report import plots

    if len(shares) < 2:
        return {}
    trials = plots._complete(study, metric)
    memo = (metric, resamples, seed, tuple((t.number, plots._value(t, plots._index(study, metric))) for t in trials))
    if memo in _MEMO:  # the report and the W&B summary ask for the same study's intervals
        return _MEMO[memo]
    _MEMO[memo] = found = _bootstrap(study, trials, metric, resamples, seed)
    return found


_MEMO: dict = {}


def _bootstrap(study, trials, metric, resamples: int, seed: int) -> dict:
    from lora_search.report import plots

    i = plots._index(study, metric)
    direction = study.directions[i or 0]
    method = plots.importance_method()
    rng = np.random.default_rng(seed)
    # a single-objective copy of each trial: the bootstrap's study is single-objective whatever the study was
    flat = [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=plots._value(t, i))
            for t in trials]
    keys = sorted({k for t in trials for k in t.params})
    draws = {k: [] for k in keys}
    for r in range(resamples):
        pick = [flat[j] for j in rng.integers(0, len(flat), len(flat))]
        evaluator = (optuna.importance.FanovaImportanceEvaluator(n_trees=RESAMPLE_TREES, seed=r) if method == "fanova"
                     else plots._evaluator(method, len(flat)))
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


# ---- short trials vs full runs ----

def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than three pairs or a constant side)."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rho = spearmanr(xs, ys).statistic
    return float(rho) if math.isfinite(rho) else None
