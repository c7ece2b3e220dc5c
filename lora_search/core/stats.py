"""Statistics of eval scores, shared by training and reports: standard errors, score intervals, rank correlation."""

from __future__ import annotations

import math
import statistics

from scipy.stats import binomtest, spearmanr

Z95 = 1.959964  # eval noise: a normal 95% interval for a mean of per-row losses


def standard_error(values: list[float]) -> float | None:
    """The standard error of the mean of values (None for fewer than two, or any NaN or infinite value: a diverged
    run's rows; statistics.stdev raises AttributeError on a NaN in Python 3.11)."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def score_interval(metric: str, value: float | None, attrs: dict) -> dict | None:
    """A 95% interval for a run's score from its eval rows: eval loss (and perplexity) from the per-row losses'
    standard error, exact match from a Wilson interval over the answered items; None when nothing says."""
    if value is None or not math.isfinite(value):
        return None
    if metric in ("eval_loss", "perplexity"):
        se, n = attrs.get("eval_loss_se"), attrs.get("eval_loss_rows")
        if not se or not n or not math.isfinite(se):
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
        ci = binomtest(round(value * n), n).proportion_ci(confidence_level=0.95, method="wilson")
        return {"low": float(ci.low), "high": float(ci.high), "n": n, "how": f"Wilson, {n} answered eval items"}
    return None


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than three pairs or a constant side)."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rho = spearmanr(xs, ys).statistic
    return float(rho) if math.isfinite(rho) else None
