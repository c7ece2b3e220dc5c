"""The report's figures, drawn with Optuna's visualization modules alone (the numbers are importance.py's).

Importances are fANOVA's (seeded, so a report reads the same twice) when scikit-learn, which
fANOVA's random forest needs, is installed; otherwise PED-ANOVA, Optuna's default evaluator, which
needs nothing more but measures something else, and the sentence says which. Plots are Optuna's
matplotlib figures saved as PNG; a plot Optuna cannot draw for this study is skipped, never fatal.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lora_search.report import importance

log = logging.getLogger(__name__)

RANK_LR = ("lora.r", "trainer.learning_rate")
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

    target = importance.target(study, metric)

    def rank_lr():
        ax = vm.plot_rank(study, params=list(RANK_LR), target=target, target_name=metric)
        ax.set_title(f"LoRA rank x learning rate (colour: {metric}, by rank)")
        _log2_axis(ax, [t.params[RANK_LR[0]] for t in importance.complete_trials(study) if RANK_LR[0] in t.params])
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
            study, evaluator=importance.make_evaluator(method, n_complete), target=target, target_name=metric)) if shares else None,
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
    n_complete = len(importance.complete_trials(study, metric))
    shares = importance.importances(study, metric)
    drawn = {}
    for name, draw in _drawers(study, metric, shares, importance.importance_method(), n_complete).items():
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
    method = importance.method_description(n_complete=n_complete)
    return {k: (alt, f"{alt}: {text.format(metric=metric, method=method)}") for k, (alt, text) in PLOTS.items()}
