"""The sweep file's settings, each checked on its own: the objectives and the promotion rule, max_failures, the
memory budget, the promotion's top_k and seeds, the nightly job, and the sampler against the objectives. Each
function returns its problems; checks/sweep.py collects them.
"""

from __future__ import annotations

import re

from lora_search.config.objectives import RULE_FIELDS
from lora_search.config.samplers import SINGLE_OBJECTIVE, spec
from lora_search.config.schema import METRIC_DIRECTIONS, QUALITY_METRICS, NightlyConfig


def _direction_problem(where: str, metric, direction) -> str | None:
    own = METRIC_DIRECTIONS.get(metric)
    if direction not in ("minimize", "maximize", "auto", None):
        return f"{where}.direction must be minimize, maximize or auto (the metric's own), got {direction!r}"
    if own and direction not in (own, "auto", None):
        return (f"{where}.direction={direction} contradicts {metric}, which is {own[:-1]}ed; leave the direction out "
                f"or set it to {own}")
    return None


def objective_problems(sweep) -> list[str]:
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
        problems += rule_problems(sweep.promotion["select"], allowed, "sweep.promotion.select")
    return problems


def rule_problems(rule, allowed: list[str], where: str) -> list[str]:
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
        problems += rule_problems(rule["then"], allowed, f"{where}.then")
    elif within is not None:
        problems.append(f"{where}.within keeps the trials near the best {metric} for a next rule to choose among: "
                        f"add {where}.then, e.g. then: {{metric: trainable_params}}, or leave within out")
    return problems


def max_failures_problems(sweep) -> list[str]:
    """Problems with sweep.max_failures."""
    value = sweep.max_failures
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return []
    return [f"sweep.max_failures must be a positive integer (failed trials in a row that stop the sweep) or null "
            f"(never stop), got {value!r}"]


def memory_budget_problems(sweep) -> list[str]:
    """Problems with sweep.memory_budget_mb (a number of MB, auto, or null)."""
    b = sweep.memory_budget_mb
    if b is None or b == "auto" or (isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0):
        return []
    return [f"sweep.memory_budget_mb must be a positive number of MB, auto (the free memory at the start) or null "
            f"(no budget); got {b!r}"]




def promotion_problems(promotion: dict) -> list[str]:
    """Problems with sweep.promotion's top_k and seeds."""
    problems = []
    for name, meaning in (("top_k", "how many of the best trials are re-trained at the promotion budget"),
                          ("seeds", "how many training seeds each of them runs with")):
        value = promotion.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"sweep.promotion.{name} must be a positive integer ({meaning}), got {value!r}")
    return problems


def nightly_problems(n: NightlyConfig) -> list[str]:
    """Problems with sweep.nightly."""
    problems = []
    if not isinstance(n.trials_per_night, int) or n.trials_per_night < 1:
        problems.append(f"sweep.nightly.trials_per_night must be a positive integer, got {n.trials_per_night!r}")
    if not isinstance(n.seed_top_k, int) or n.seed_top_k < 0:
        problems.append(f"sweep.nightly.seed_top_k must be an integer >= 0, got {n.seed_top_k!r}")
    if not isinstance(n.margin, (int, float)) or n.margin < 0:
        problems.append(f"sweep.nightly.margin must be a fraction >= 0 (0.01 = 1%), got {n.margin!r}")
    if n.night is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(n.night)):
        problems.append(f"sweep.nightly.night names a folder: letters, digits, '.', '_' and '-' only; got {n.night!r}")
    return problems


def sampler_problems(cfg, n_objectives: int) -> list[str]:
    """Sampler problems that depend on the objectives."""
    kind = spec(cfg.sweep.sampler).get("type")
    if n_objectives > 1 and kind in SINGLE_OBJECTIVE:
        return [f"sweep.sampler={kind} optimizes one objective; sweep.objectives has {n_objectives}: use tpe, gp, "
                "nsgaii, random or grid"]
    return []
