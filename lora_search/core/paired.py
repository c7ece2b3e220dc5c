"""Paired comparison of runs scored on the same eval rows: the per-row differences' mean, a paired bootstrap interval
of it and the Wilcoxon signed-rank test, for per-row losses (lower is better) and 0/1 exact-match items alike.

Every trial of a study is scored on the same eval rows, and most of the spread of per-row scores is which row, not
which configuration: the per-row differences take the row out. Rows are only compared when they are the same rows in
the same order, which the fingerprint recorded with them says (refused otherwise: NotPaired).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import wilcoxon

# the study metric -> the trial attribute holding its per-row scores (run.py writes them, the report reads them);
# the fingerprint of the rows they were scored on is stored beside them under fingerprint_key(rows key)
ROWS = {"eval_loss": "eval_row_losses", "perplexity": "eval_row_losses", "exact_match": "exact_match_rows",
        "preference_accuracy": "preference_rows"}
LOWER_IS_BETTER = {"eval_row_losses": True, "exact_match_rows": False, "preference_rows": False}
ZERO_METHOD = "pratt"  # zero differences (ties, common in 0/1 rows) are ranked, then their ranks dropped (scipy)
RESAMPLES = 2000  # paired bootstrap resamples of the rows
SEED = 0  # the bootstrap's seed: the same rows give the same interval


class NotPaired(ValueError):
    """Two runs' rows are not the same eval rows (another length, or another fingerprint)."""


@dataclass(frozen=True)
class Rows:
    """One run's per-row scores, in eval-row order, and the fingerprint of the rows they were scored on."""

    values: list[float]
    fingerprint: str | None = None


def fingerprint_key(rows_key: str) -> str:
    """The trial attribute holding the fingerprint of the rows under rows_key."""
    return f"{rows_key}_fingerprint"


def from_attrs(attrs: dict, rows_key: str) -> Rows | None:
    """A trial's rows under rows_key with their fingerprint, or None when it has none (or a non-finite one)."""
    values = attrs.get(rows_key)
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    return Rows([float(v) for v in values], attrs.get(fingerprint_key(rows_key)))


def check_paired(a: Rows, b: Rows) -> None:
    """Raise NotPaired unless a and b are scores of the same rows in the same order."""
    if len(a.values) != len(b.values):
        raise NotPaired(f"{len(a.values)} rows against {len(b.values)}: not the same eval rows")
    if a.fingerprint != b.fingerprint or a.fingerprint is None:
        raise NotPaired(f"rows fingerprinted {a.fingerprint} against {b.fingerprint}: not the same eval rows")


def bootstrap_interval(differences: list[float], level: float = 0.95, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """The percentile interval of the mean difference over paired bootstrap resamples of the rows (seeded)."""
    d = np.asarray(differences, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def signed_rank(differences: list[float]) -> tuple[float, float]:
    """Wilcoxon's signed-rank statistic and two-sided p-value of the differences (Pratt's zeros); all zero: p = 1."""
    if not any(differences):
        return 0.0, 1.0
    result = wilcoxon(differences, zero_method=ZERO_METHOD)
    return float(result.statistic), float(result.pvalue)


def compare(a: Rows, b: Rows, lower_is_better: bool, level: float = 0.95) -> dict:
    """a against b on the same rows: the mean per-row gain of a over b (positive: a is better), its paired bootstrap
    interval, and the Wilcoxon signed-rank statistic and p-value of the per-row differences."""
    check_paired(a, b)
    gains = [(y - x) if lower_is_better else (x - y) for x, y in zip(a.values, b.values)]
    low, high = bootstrap_interval(gains, level)
    statistic, p = signed_rank(gains)
    return {"n": len(gains), "mean_gain": sum(gains) / len(gains), "low": low, "high": high,
            "statistic": statistic, "p": p}


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjustment of several p-values (keys kept): the family's error rate held at the level."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def reliably_better(best_rows: Rows | None, other_rows_by_trial: dict, lower_is_better: bool,
                    level: float = 0.95) -> dict:
    """Which trials the best is reliably better than (Wilcoxon p, Holm-adjusted over the comparisons, below 1 -
    level, and the paired bootstrap interval of its gain above 0), which it cannot be told apart from, which are
    reliably better row by row, and which lack rows (none recorded, or scored on other eval rows)."""
    found = {"level": level, "n": len(best_rows.values) if best_rows else None, "better": [], "tied": [],
             "worse": [], "no_rows": [], "other_rows": [], "comparisons": {}}
    for trial, rows in other_rows_by_trial.items():
        if best_rows is None or rows is None:
            found["no_rows"].append(trial)
            continue
        try:
            found["comparisons"][trial] = compare(best_rows, rows, lower_is_better, level)
        except NotPaired:
            found["other_rows"].append(trial)
    adjusted = holm({t: c["p"] for t, c in found["comparisons"].items()})
    for trial, c in found["comparisons"].items():
        c["p_holm"] = adjusted[trial]
        significant = c["p_holm"] < 1 - level
        bucket = "better" if significant and c["low"] > 0 else "worse" if significant and c["high"] < 0 else "tied"
        found[bucket].append(trial)
    return found
