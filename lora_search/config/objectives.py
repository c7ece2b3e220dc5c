"""Several objectives: the study's list of (metric, direction), its Pareto front, and the promotion rule
(`sweep.promotion.select`) that picks one configuration from the front, with why every other one lost.

A rule is {metric, direction?, within?, then?}: keep the trials whose `metric` is within `within` (a fraction of the
best value) of the best, then apply `then` (a rule of its own) to those; without `within` only the best stays; ties
go to the lower trial number. {metric: eval_loss, within: 0.02, then: {metric: trainable_params}} is "the smallest
adapter within 2% of the best loss".
"""

from __future__ import annotations

import math

from lora_search.config.schema import COST_METRICS, METRIC_DIRECTIONS, QUALITY_METRICS

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


def _direction_problem(where: str, metric, direction) -> str | None:
    own = METRIC_DIRECTIONS.get(metric)
    if direction not in ("minimize", "maximize", "auto", None):
        return f"{where}.direction must be minimize, maximize or auto (the metric's own), got {direction!r}"
    if own and direction not in (own, "auto", None):
        return (f"{where}.direction={direction} contradicts {metric}, which is {own[:-1]}ed; leave the direction out "
                f"or set it to {own}")
    return None


def check(sweep) -> list[str]:
    """Problems with sweep.objectives and the promotion rule, each naming the key."""
    problems = []
    names = []
    for i, entry in enumerate(sweep.objectives or ()):
        where = f"sweep.objectives[{i}]"
        entry = {"metric": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or set(entry) - {"metric", "direction"}:
            problems.append(f"{where} must be a metric name or {{metric: <name>, direction: minimize|maximize}}, "
                            f"got {entry!r}")
            continue
        metric = entry.get("metric")
        if metric not in METRIC_DIRECTIONS:
            problems.append(f"{where}.metric must be one of {', '.join(METRIC_DIRECTIONS)}; got {metric!r}")
            continue
        if metric in names:
            problems.append(f"{where}: {metric} is named twice in sweep.objectives")
        names.append(metric)
        problems += [p for p in [_direction_problem(where, metric, entry.get("direction"))] if p]
    if sweep.objectives and names and not any(m in QUALITY_METRICS for m in names):
        problems.append(f"sweep.objectives has costs only ({', '.join(names)}): name a quality metric too "
                        f"({', '.join(QUALITY_METRICS)}), or the cheapest untrained-looking adapter wins")
    if "select" in sweep.promotion:
        allowed = names if sweep.objectives else [sweep.metric]
        problems += check_rule(sweep.promotion["select"], allowed, "sweep.promotion.select")
    return problems


def check_rule(rule, allowed: list[str], where: str) -> list[str]:
    """Problems with a promotion rule: every metric it names must be an objective of the study."""
    if not isinstance(rule, dict) or "metric" not in rule or set(rule) - set(RULE_FIELDS):
        return [f"{where} must be {{metric: <objective>, within: <fraction>, then: {{metric: <objective>}}}}, "
                f"fields {', '.join(RULE_FIELDS)}; got {rule!r}"]
    problems = []
    metric = rule["metric"]
    if metric not in allowed:
        problems.append(f"{where}.metric={metric} is not an objective of this study (objectives: "
                        f"{', '.join(allowed)}): a rule can only choose by what the study measured and optimized")
    problem = _direction_problem(where, metric, rule.get("direction"))
    if problem:
        problems.append(problem)
    within = rule.get("within")
    if within is not None and (isinstance(within, bool) or not isinstance(within, (int, float)) or not 0 <= within < 1):
        problems.append(f"{where}.within must be a fraction of the best value in [0, 1) (0.02: within 2%), "
                        f"got {within!r}")
    if rule.get("then") is not None:
        problems += check_rule(rule["then"], allowed, f"{where}.then")
    elif within is not None:
        problems.append(f"{where}.within keeps the trials near the best {metric} for a next rule to choose among: "
                        f"add {where}.then, e.g. then: {{metric: trainable_params}}, or leave within out")
    return problems


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


def is_cost(metric: str) -> bool:
    """Whether a metric measures cost (size, memory, time) rather than quality."""
    return metric in COST_METRICS
