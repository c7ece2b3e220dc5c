"""Several objectives: the study's list of (metric, direction), its Pareto front, and the promotion rule
(`sweep.promotion.select`) that picks one configuration from the front, with why every other one lost.

A rule is {metric, direction?, within?, then?}: keep the trials whose `metric` is within `within` (a fraction of the
best value) of the best, then apply `then` (a rule of its own) to those; without `within` only the best stays; ties
go to the lower trial number. {metric: eval_loss, within: 0.02, then: {metric: trainable_params}} is "the smallest
adapter within 2% of the best loss".
"""

from __future__ import annotations

import math

from lora_search.config.schema import METRIC_DIRECTIONS, QUALITY_METRICS

RULE_FIELDS = ("metric", "direction", "within", "then")


def normalize(entries) -> list[dict]:
    """sweep.objectives as [{metric, direction}]: a bare metric name stands for {metric: name}; direction auto (or
    absent) becomes the metric's own. Unknown metrics are kept as given (check() reports them)."""
    out = []
    for entry in entries or ():
        entry = {"metric": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else entry
        if isinstance(entry, dict) and entry.get("direction", "auto") == "auto" and entry.get("metric") in METRIC_DIRECTIONS:
            entry["direction"] = METRIC_DIRECTIONS[entry["metric"]]
        out.append(entry)
    return out


def primary(objectives: list[dict]) -> dict | None:
    """The objective sweep.metric follows: the first quality metric, else the first objective."""
    valid = [o for o in objectives if isinstance(o, dict) and o.get("metric") in METRIC_DIRECTIONS]
    return next((o for o in valid if o["metric"] in QUALITY_METRICS), valid[0] if valid else None)


def objectives(sweep) -> list[tuple[str, str]]:
    """The study's objectives, in order: sweep.objectives, or the single (sweep.metric, sweep.direction)."""
    if sweep.objectives:  # (a malformed entry is check()'s to report: kept here as best it reads)
        return [(o.get("metric"), o.get("direction") or METRIC_DIRECTIONS.get(o.get("metric"), "minimize"))
                if isinstance(o, dict) else (str(o), "minimize") for o in normalize(sweep.objectives)]
    return [(sweep.metric, sweep.direction)]


def values(trial, names: list[str]) -> dict:
    """A finished trial's objective values by metric name."""
    vals = trial.values or []
    return dict(zip(names, vals))


def describe(rule: dict | None, first: tuple[str, str]) -> str:
    """A rule in words: "the lowest trainable_params among trials within 2% of the best eval_loss"."""
    if not rule:
        return f"the best {first[0]} ({first[1]}d)"
    metric, direction = rule["metric"], rule.get("direction") or METRIC_DIRECTIONS[rule["metric"]]
    best = "lowest" if direction == "minimize" else "highest"
    if rule.get("within") is None or rule.get("then") is None:
        return f"the {best} {metric}"
    return f"{describe(rule['then'], first)} among trials within {rule['within']:.0%} of the {best} {metric}"


def fmt(metric: str, value: float) -> str:
    """A metric's value for a sentence: parameter counts with thousands separators, others to 4 digits."""
    return f"{value:,.0f}" if metric == "trainable_params" else f"{value:.4g}"


def select(candidates: list, names: list[str], rule: dict | None, first: tuple[str, str]) -> tuple[object, dict]:
    """Apply the rule to the front's trials: (the chosen trial, {trial number: why it lost})."""
    rule = rule or {"metric": first[0], "direction": first[1]}
    lost: dict[int, str] = {}
    pool = sorted(candidates, key=lambda t: t.number)
    while True:
        metric = rule["metric"]
        direction = rule.get("direction") or METRIC_DIRECTIONS[metric]
        sign = 1.0 if direction == "minimize" else -1.0
        scored = [(sign * values(t, names)[metric], t) for t in pool]
        best_score, best = min(scored, key=lambda st: (st[0], st[1].number))
        best_value = sign * best_score
        within = rule.get("within")
        if within is not None and rule.get("then") is not None:
            slack = within * abs(best_value)
            keep = [t for s, t in scored if s <= best_score + slack + 1e-12]
            for s, t in scored:
                if t not in keep:
                    gap = abs(sign * s - best_value) / abs(best_value) if best_value else math.inf
                    lost[t.number] = (f"{metric} {fmt(metric, sign * s)} is {gap:.1%} "
                                      f"{'above' if direction == 'minimize' else 'below'} the best "
                                      f"{fmt(metric, best_value)} (#{best.number}); the rule allows {within:.0%}")
            pool, rule = keep, rule["then"]
            continue
        for s, t in scored:
            if t is not best:
                word = "higher" if direction == "minimize" else "lower"
                lost[t.number] = (f"{metric} {fmt(metric, sign * s)} is {word} than #{best.number}'s "
                                  f"{fmt(metric, best_value)}" if s != best_score else
                                  f"ties #{best.number} on {metric}; the lower trial number wins")
        return best, lost
