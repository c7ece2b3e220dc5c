"""How far to trust a study's answer: which trials the best is reliably better than, compared row by row on the same
eval rows (core/paired: Wilcoxon signed-rank and a paired bootstrap), whether the trials share their random numbers,
and the study's headline numbers with the importances' intervals. Nothing here trains.
"""

from __future__ import annotations

import logging
import math

import optuna
from optuna.trial import TrialState

from lora_search.core import paired
from lora_search.report import importance

log = logging.getLogger(__name__)

# ---- per-row eval losses (SFT) ----

# ---- paired evidence: trials compared row by row on the same eval rows ----

NO_ROWS_METRICS = ("rouge_l", "bleu", "reward_accuracy", "reward_margin", "logp_margin")  # quality, no per-row scores


def _trials(numbers: list[int]) -> str:
    return ", ".join(f"#{n}" for n in sorted(numbers))


def paired_evidence(study: optuna.Study, metric: str) -> dict | None:
    """Which complete trials the best is reliably better than, row by row on the same eval rows (core/paired), which
    it cannot be told apart from and which lack rows; rows_key None where the metric has no per-row scores (a DPO
    study's eval loss: no per-pair loss is recorded). None for several objectives or no complete trial."""
    if len(study.directions) > 1:
        return None
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value) and not t.user_attrs.get("over_budget")]
    if not complete:
        return None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = (max if maximize else min)(complete, key=lambda t: t.value)
    key = paired.ROWS.get(metric)
    dpo = best.user_attrs.get("method") == "dpo"
    head = {"trial": best.number, "value": best.value, "others": len(complete) - 1, "dpo": dpo}
    if key is None or (dpo and key == "eval_row_losses"):
        return {**head, "rows_key": None}
    others = {t.number: paired.from_attrs(t.user_attrs, key) for t in complete if t.number != best.number}
    found = paired.reliably_better(paired.from_attrs(best.user_attrs, key), others, paired.LOWER_IS_BETTER[key])
    return {**head, "rows_key": key, **found}


def paired_sentence(found: dict | None, metric: str) -> str | None:
    """What the paired comparison supports: which trials the best is reliably better than and which it cannot be
    told apart from, naming the test; a warning when it is told apart from none."""
    if not found or not found["others"]:
        return None
    what, best = metric.replace("_", " "), f"#{found['trial']}"
    if found["rows_key"] is None:
        if found["dpo"] and metric in ("eval_loss", "perplexity"):
            return (f"DPO trials record no per-pair loss, so their {what} is not compared pair by pair: no trial is "
                    "said to be reliably better than another (preference accuracy is compared pair by pair: "
                    "sweep.metric=preference_accuracy).")
        if metric in NO_ROWS_METRICS:
            return (f"{what} has no per-row scores here, so trials are not compared row by row: no trial is said to "
                    "be reliably better than another.")
        return None
    if found["n"] is None:
        return (f"Trial {best} has no per-row scores recorded (a study from before they were kept, or padding-free "
                f"batches), so no trial is said to be reliably better than another.")
    compared = len(found["comparisons"])
    rows = {"eval_row_losses": "eval rows' losses", "exact_match_rows": "answered eval items",
            "preference_rows": "eval pairs"}[found["rows_key"]]
    claims = [f"is reliably better than {_trials(found['better'])}"] if found["better"] else []
    claims += [f"cannot be told apart from {_trials(found['tied'])}"] if found["tied"] else []
    holm = f", Holm-adjusted over the {compared} comparisons" if compared > 1 else ""
    how = (f"paired on the same {found['n']} {rows}: Wilcoxon signed-rank test (Pratt's zero handling){holm}, "
           f"p < {1 - found['level']:.2g}, and a paired bootstrap {found['level']:.0%} interval of the per-row "
           "difference that excludes 0")
    text = f"Trial {best} ({metric} {found['value']:.4g})"
    if claims or compared:
        text += f" {' and '.join(claims) or 'is reliably better than no other trial'} ({how})."
    else:
        text += " is compared with no other trial row by row."
    if found["worse"]:
        text += (f" {_trials(found['worse'])} score reliably better than {best} row by row (every row weighs the same "
                 f"there; the {what} weighs rows by their tokens).")
    if found["no_rows"]:
        text += f" {_trials(found['no_rows'])} recorded no per-row scores (not compared)."
    if found["other_rows"]:
        text += (f" {_trials(found['other_rows'])} were scored on other eval rows (another eval set, subset or "
                 "tokenization: not compared).")
    if compared and len(found["tied"]) == compared:
        text += (" **The best is told apart from no other trial: the eval set is too small for these differences.** "
                 "Add eval rows (data.eval_per_task, or more rows in your eval file; trainer.eval_subset for trials).")
    return text


def seed_sentence(space: dict, seed: int) -> str:
    """Whether the trials share the training seed and data order (common random numbers), from the sweep's space."""
    if "trainer.seed" in space:
        return ("The trials do not share their random numbers: trainer.seed is searched (sweep.space), so a difference "
                "between trials also holds the draw of the adapter's initial weights and of the training-row order.")
    return (f"Every trial trains with the same seed (trainer.seed={seed}, set before the adapter is attached and as "
            "the trainer's data seed): the adapter's initial weights come from the same random stream and the "
            "training rows in the same shuffled order (common random numbers), so a difference between trials is not "
            "the luck of two different draws; it is measured at this one seed.")


# ---- importances with intervals ----

# ---- short trials vs full runs ----

def summary(study: optuna.Study, metric: str) -> dict:
    """Headline numbers of a study: counts by state, best value and params, importances with their intervals, the
    paired comparison of the best trial with the others."""
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
        "paired": _summary_fields(paired_evidence(study, metric)),
    }


def _summary_fields(found: dict | None) -> dict | None:
    """The paired comparison's verdict as W&B summary fields (trial lists as text, counts as numbers)."""
    if not found or found.get("rows_key") is None or found.get("n") is None:
        return None
    return {"best_trial": found["trial"], "rows": found["n"], "test": f"wilcoxon-{paired.ZERO_METHOD}+bootstrap",
            **{f"{k}_count": len(found[k]) for k in ("better", "tied", "worse", "no_rows", "other_rows")},
            **{k: _trials(found[k]) for k in ("better", "tied") if found[k]}}
