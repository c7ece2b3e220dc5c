"""The report's figures and numbers, from Optuna's importance and visualization modules alone.

Importances are fANOVA's (seeded, so a report reads the same twice) when scikit-learn, which
fANOVA's random forest needs, is installed; otherwise PED-ANOVA, Optuna's default evaluator, which
needs nothing more but measures something else, and the sentence says which. Plots are Optuna's
matplotlib figures saved as PNG; a plot Optuna cannot draw for this study is skipped, never fatal.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

NAMES = {"trainer.learning_rate": "learning rate", "lora.r": "rank", "lora.alpha_ratio": "alpha ratio",
         "lora.targets": "target modules", "lora.dropout": "dropout"}
RANK_LR = ("lora.r", "trainer.learning_rate")
SEED = 0  # fANOVA's random forest
MIN_PED_ANOVA_TOP = 5  # PED-ANOVA's docs: at least 5 trials in the top quantile for a stable estimate
# file stem -> (alt text, caption; {metric} is the objective)
PLOTS = {
    "pareto": ("Pareto front", "every complete trial by its objectives; the front's trials (none better on every "
               "objective) are highlighted, the promoted one is chosen from them by the promotion rule."),
    "history": ("Optimization history", "{metric} of every complete trial, and the best so far."),
    "importances": ("Parameter importances", "how much each parameter matters for {metric} ({method})."),
    "intermediate": ("Intermediate values", "{metric} at each evaluation step of every trial; a line marked "
                     "with a cross is where a trial was pruned."),
    "parallel": ("Parallel coordinates", "each complete trial's parameters, coloured by its {metric}."),
    "rank_lr": ("LoRA rank x learning rate", "each complete trial at its LoRA rank and learning rate, coloured "
                "by where its {metric} ranks among the trials (the colour bar gives the values)."),
}


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


def _evaluator(method: str, n_complete: int):
    if method == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=SEED)
    return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=_ped_anova_quantile(n_complete))


def _index(study: optuna.Study, metric: str | None) -> int | None:
    """The position of metric among a multi-objective study's values (None: a single-objective study)."""
    if len(study.directions) == 1:
        return None
    names = list(study.metric_names or [])
    return names.index(metric) if metric in names else 0


def _target(study: optuna.Study, metric: str | None):
    """Optuna's `target` for plots and importances: that objective's value (None for a single objective)."""
    i = _index(study, metric)
    return None if i is None else (lambda t: t.values[i])


def _value(t, i: int | None):
    return t.value if i is None else t.values[i]


def _complete(study: optuna.Study, metric: str | None = None) -> list[optuna.trial.FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    i = _index(study, metric)
    return [t for t in trials if t.values is not None and math.isfinite(_value(t, i))]


def _varying(trials) -> list[str]:
    keys = sorted({k for t in trials for k in t.params})
    return [k for k in keys if len({repr(t.params.get(k)) for t in trials}) > 1]


def importances(study: optuna.Study, metric: str | None = None) -> dict[str, float]:
    """Each parameter's share of importance for metric (summing to 1, largest first; with several objectives,
    metric's, default the first); {} when it cannot be estimated."""
    trials = _complete(study, metric)
    i = _index(study, metric)
    if len(trials) < 2 or not _varying(trials) or len({_value(t, i) for t in trials}) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(
                study, evaluator=_evaluator(importance_method(), len(trials)), normalize=False,
                target=_target(study, metric))
    except Exception as e:  # a report never fails on its importances
        log.info("parameter importances skipped: %s: %s", type(e).__name__, e)
        return {}
    varying = set(_varying(trials))  # a parameter held at one value (a one-choice space entry) explains nothing
    raw = {k: v for k, v in raw.items() if k in varying}
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


def importance_sentence(importances: dict[str, float], metric: str, method: str | None = None,
                        n_complete: int | None = None, intervals: dict | None = None) -> str:
    """The importances in a sentence that states no ranking its bootstrap intervals (confidence.importance_intervals)
    do not support: "Learning rate matters most: 62% of the variance of eval loss (90% interval 45-78%) ..." only
    when its interval lies above every other's and there are enough trials; otherwise the shares with their
    intervals and a plain "too few to rank"."""
    from lora_search.report import confidence

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
    level = f"{confidence.LEVEL:.0%} bootstrap intervals"
    n = len(importances)
    if n_complete is not None and confidence.too_few(n_complete, n):
        return (f"{n_complete} complete trials are too few to rank {n} parameters (it takes at least "
                f"{confidence.MIN_TRIALS_PER_PARAM * n}): the shares {measure} are {listed(order)}, {level} in brackets; "
                f"run more trials (sweep.n_trials) before reading an order into them ({how}).")
    ranked = confidence.supported_order(importances, intervals)
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


def summary(study: optuna.Study, metric: str) -> dict:
    """Headline numbers of a study: counts by state, best value and params, importances with their intervals, the
    eval noise around the best value."""
    from lora_search.report import confidence

    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = _complete(study, metric)
    several = len(study.directions) > 1
    best = None
    if complete and not several:
        try:
            best = study.best_trial
        except ValueError:  # no feasible trial (all over the memory budget)
            best = None
    shares = importances(study, metric)
    intervals = confidence.importance_intervals(study, shares, metric)
    front = {"objectives": list(study.metric_names or []), "pareto_front": [t.number for t in study.best_trials]} \
        if several else {}
    return {
        **front,
        "metric": metric, "direction": ",".join(d.name.lower() for d in study.directions), "trials": len(states),
        "complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL), "running": states.count(TrialState.RUNNING),
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else {}, "importances": shares,
        "importance_method": importance_method() if shares else None,
        "importance_intervals": {k: list(v) for k, v in intervals.items()},
        "importance_sentence": importance_sentence(shares, metric, n_complete=len(complete), intervals=intervals),
        "eval_noise": confidence.noise(study, metric),
    }


def _figure(result):
    return result.figure if hasattr(result, "figure") else result.flat[0].figure


def _mark_pruned(ax, study: optuna.Study, max_legend: int = 20) -> None:
    """Cross each pruned trial's last intermediate value on Optuna's axes; keep the legend readable."""
    ends = [(max(t.intermediate_values), t.intermediate_values[max(t.intermediate_values)])
            for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
    if ends:
        ax.scatter(*zip(*ends), marker="x", s=60, color="black", zorder=5, label="pruned")
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) > max_legend + 1:  # one entry per trial stops being readable: keep "pruned" only
        handles, labels = ([h for h, lab in zip(handles, labels) if lab == "pruned"], ["pruned"] * bool(ends))
    if ax.get_legend():
        ax.get_legend().remove()
    if labels:
        ax.legend(handles, labels, bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0.0, fontsize="small")


def _log2_axis(ax, values) -> None:
    """LoRA ranks are powers of two: space them evenly."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ticks = sorted({v for v in values if isinstance(v, (int, float)) and v > 0})
    if len(ticks) == len(set(values)) and len(ticks) > 1:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())


def _drawers(study: optuna.Study, metric: str, shares: dict, method: str, n_complete: int) -> dict:
    """Plot name -> a function drawing it with Optuna, or None when this study cannot have it."""
    vm = optuna.visualization.matplotlib
    trials = study.get_trials(deepcopy=False)
    with_steps = [t for t in trials if len(t.intermediate_values) > 0]
    names = {k for t in trials for k in t.params}
    enough = n_complete >= 2

    def intermediate():
        ax = vm.plot_intermediate_values(study)
        ax.set_ylabel(metric)
        _mark_pruned(ax, study)
        return ax

    target = _target(study, metric)

    def rank_lr():
        ax = vm.plot_rank(study, params=list(RANK_LR), target=target, target_name=metric)
        ax.set_title(f"LoRA rank x learning rate (colour: {metric}, by rank)")
        _log2_axis(ax, [t.params[RANK_LR[0]] for t in _complete(study) if RANK_LR[0] in t.params])
        return ax

    several = len(study.directions) > 1

    def pareto():
        names = list(study.metric_names or [])
        if len(names) <= 3:
            return vm.plot_pareto_front(study, target_names=names)
        return vm.plot_pareto_front(study, target_names=names[:2], targets=lambda t: tuple(t.values[:2]))

    return {
        "pareto": pareto if several and n_complete >= 1 else None,
        "history": (lambda: vm.plot_optimization_history(study, target=target, target_name=metric)) if enough else None,
        "importances": (lambda: vm.plot_param_importances(
            study, evaluator=_evaluator(method, n_complete), target=target, target_name=metric)) if shares else None,
        "intermediate": intermediate if len(with_steps) >= 2 else None,
        "parallel": (lambda: vm.plot_parallel_coordinate(study, target=target, target_name=metric)) if enough else None,
        "rank_lr": rank_lr if enough and set(RANK_LR) <= names else None,
    }


def write_plots(study: optuna.Study, cfg, out: Path) -> dict[str, Path]:
    """Save Optuna's plots of the study as out/plots/<name>.png; return those drawn, by name."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # files only, never a window (a notebook keeps its backend)
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = cfg.sweep.metric
    folder = Path(out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    n_complete = len(_complete(study, metric))
    shares = importances(study, metric)
    drawn = {}
    for name, draw in _drawers(study, metric, shares, importance_method(), n_complete).items():
        path = folder / f"{name}.png"
        if draw is None:
            log.info("plot %s skipped: too few trials (or parameters) for it", name)
            path.unlink(missing_ok=True)  # a stale figure from an earlier run would mislead
            continue
        before = set(plt.get_fignums())
        with plt.rc_context(), warnings.catch_warnings():  # undo Optuna's plt.style.use afterwards
            warnings.simplefilter("ignore")  # ExperimentalWarning (plot_rank), small-sample notes from evaluators
            try:
                fig = _figure(draw())
                fig.set_size_inches(8, 5)
                fig.savefig(path, dpi=100, bbox_inches="tight")
                drawn[name] = path
            except Exception as e:  # Optuna could not draw this one: the report goes on without it
                log.info("plot %s skipped: %s: %s", name, type(e).__name__, e)
                path.unlink(missing_ok=True)
            finally:
                for num in set(plt.get_fignums()) - before:
                    plt.close(num)
    return drawn


def captions(metric: str, n_complete: int | None = None) -> dict[str, tuple[str, str]]:
    """Plot name -> (alt text, one-line caption) for the report."""
    method = method_description(n_complete=n_complete)
    return {k: (alt, f"{alt}: {text.format(metric=metric, method=method)}") for k, (alt, text) in PLOTS.items()}
