"""Memory-aware search (`sweep.memory_budget_mb`): before a trial trains, its peak memory is estimated from its
configuration (memory.py); one predicted over the budget is not trained but recorded infeasible through Optuna's
constraint (`trial.set_constraint`), as a pruned trial that does not count toward n_trials and is not a failure.
A trial that runs out of memory anyway, or whose measured peak is over the budget, is recorded the same way and
raises the study's estimate scale (a study user attribute, shared by every worker) for the rest of the study.

Which samplers learn from it: TPE (the default) puts infeasible trials with the worst; the GP and NSGA-II samplers
model only complete trials, so for them a skipped configuration costs an estimate, not a training run.
"""

from __future__ import annotations

import logging

import optuna

from lora_search.models import loaders, memory
from lora_search.scale import slots
from lora_search.search.failures import TooManyFailures
from lora_search.train.run import _tokenized_key

log = logging.getLogger(__name__)
CONSTRAINT = "memory_mb"  # the constraint's name: estimated (or measured) peak minus the budget, MB
SCALE_ATTR = "memory_estimate_scale"  # the study's correction of memory.estimate, from trials that ran out
MARGIN = 1.05  # an out-of-memory trial's configuration is then predicted 5% over the budget it broke
_resolved: dict = {}  # "auto" -> this process's budget, resolved once (before the base loads)


class Infeasible(optuna.TrialPruned):
    """A trial not trained (predicted over the memory budget) or stopped by running out of memory."""

    def __init__(self, reason: str, figures: dict | None = None):
        self.reason, self.figures = reason, figures or {}  # figures: the estimate, recorded with the trial
        super().__init__(reason)


def budget_mb(cfg) -> float | None:
    """The budget in MB, `auto` resolved to the device's free memory the first time it is asked (call it before
    the base loads: preflight does)."""
    b = cfg.sweep.memory_budget_mb
    if b != "auto":
        return float(b) if b is not None else None
    if "auto" not in _resolved:
        _resolved["auto"] = memory.auto_budget_mb()
        log.info("memory budget auto: %.0f MB free at the start", _resolved["auto"])
    return _resolved["auto"]


def base_problem(cfg, arch) -> str | None:
    """Why the budget is below this config's base model's own weights (no configuration could fit), or None."""
    budget = budget_mb(cfg)
    if budget is None:
        return None

    base = memory.base_mb(cfg, arch)
    if budget <= base:
        return (f"sweep.memory_budget_mb={cfg.sweep.memory_budget_mb} ({budget:.0f} MB) is below the base model's "
                f"own weights: {cfg.model.name} with quant={cfg.quant.mode} takes {base:.0f} MB before any adapter, "
                "activation or optimizer state; raise the budget or quantize (quant=nf4)")
    return None


def row_lengths(rows, method: str) -> dict:
    """The longest tokenized row and the mean completion tokens per row (dpo: per sequence, chosen or rejected), of
    TRL's tokenized training rows: what the estimate's activations and logits scale with (batches are padded to their
    longest row, so the longest row bounds every batch)."""
    rows = rows.select(range(min(len(rows), 2000)))
    if method == "dpo":
        seqs = [(len(r["prompt_ids"]) + len(r[k]), len(r[k])) for r in rows for k in ("chosen_ids", "rejected_ids")]
    else:
        seqs = [(len(r["input_ids"]), sum(label != -100 for label in r["labels"])) for r in rows]
    return {"seq_len": max(s for s, _ in seqs), "completion_len": sum(c for _, c in seqs) / len(seqs)} if seqs else {}


def worker_lengths(worker, cfg) -> dict:
    """row_lengths of the rows the worker tokenized for cfg, {} when it has not (the estimate then takes
    trainer.max_length for every row: an upper bound)."""
    tokenized = worker.tokenized.get(_tokenized_key(cfg, worker.base.model))
    try:
        return row_lengths(tokenized[0], cfg.trainer.method) if tokenized else {}
    except (KeyError, TypeError) as e:  # a TRL that names its columns otherwise: the upper bound, said once
        log.info("memory estimates use trainer.max_length for every row (%s: %s)", type(e).__name__, e)
        return {}


class Estimator:
    """Per-trial estimates for one study: the model's config read once per model, the study's scale read fresh,
    the data's row lengths (worker_lengths) when known."""

    def __init__(self, cache_dir, lengths: dict | None = None):
        self.cache_dir, self.lengths = cache_dir, lengths or {}
        self._arch: dict = {}

    def __call__(self, study: optuna.Study, cfg) -> tuple:
        """(scaled total MB, the raw memory.Estimate, the scale)."""
        key = repr(cfg.model)
        if key not in self._arch:
            self._arch[key] = loaders.architecture(cfg.model, self.cache_dir)
        est = memory.estimate(cfg, self._arch[key], **self.lengths)
        scale = float(study.user_attrs.get(SCALE_ATTR, 1.0))
        return est.total_mb * scale, est, scale


def before_training(trial: optuna.Trial, cfg, estimator: Estimator) -> dict:
    """Estimate the trial's peak; raise Infeasible (recorded, not trained) when it is over the budget. Returns the
    figures the trial records (estimated_memory_mb, memory_budget_mb)."""
    budget = budget_mb(cfg)
    try:
        total, est, scale = estimator(trial.study, cfg)
    except Exception as e:  # noqa: BLE001 - without a budget the estimate is a record only: never fail a trial on it
        if budget is not None:
            raise
        log.debug("memory estimate skipped: %s: %s", type(e).__name__, e)
        return {"memory_budget_mb": None}
    figures = {"estimated_memory_mb": round(total, 1), "memory_budget_mb": budget,
               "memory_estimate": {k: round(v, 1) for k, v in est.parts.items()}, "memory_estimate_scale": scale}
    if budget is not None and total > budget:
        trial.set_constraint(CONSTRAINT, total - budget)
        raise Infeasible(f"estimated peak memory {total:.0f} MB is over sweep.memory_budget_mb {budget:.0f} MB: not "
                         f"trained ({est.describe()}{f'; x{scale:.2f} from trials that ran out' if scale != 1 else ''})",
                         figures)
    return figures


def after_training(trial: optuna.Trial, cfg, figures: dict, measured_mb: float | None) -> str | None:
    """Record the constraint from the measured peak; a peak over the budget raises the study's scale. Returns a
    reason when the trial is infeasible by its measurement."""
    budget = figures.get("memory_budget_mb")
    if budget is None or measured_mb is None:
        return None
    trial.set_constraint(CONSTRAINT, measured_mb - budget)
    if measured_mb <= budget:
        return None
    _raise_scale(trial.study, figures, measured_mb)
    return f"measured peak memory {measured_mb:.0f} MB is over sweep.memory_budget_mb {budget:.0f} MB"


def out_of_memory(trial: optuna.Trial, figures: dict, error: BaseException) -> Infeasible:
    """An out-of-memory error as an infeasible trial: the constraint set positive and the study's scale raised so
    this configuration would now be predicted over the budget."""
    budget = figures.get("memory_budget_mb")
    estimated = figures.get("estimated_memory_mb")
    if budget is not None and estimated:
        trial.set_constraint(CONSTRAINT, max(estimated * MARGIN - budget, 1.0))
        _raise_scale(trial.study, figures, budget * MARGIN)
    elif estimated:
        trial.set_constraint(CONSTRAINT, 1.0)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return Infeasible(f"out of memory ({type(error).__name__}: {first[:200]}); estimated {estimated} MB", figures)


def _raise_scale(study: optuna.Study, figures: dict, needed_mb: float) -> None:
    """Scale the estimates up so a configuration like this one is predicted at needed_mb (never down)."""
    raw = figures["estimated_memory_mb"] / figures["memory_estimate_scale"]
    new = needed_mb / raw if raw else 1.0
    old = float(study.user_attrs.get(SCALE_ATTR, 1.0))
    if new > old:
        study.set_user_attr(SCALE_ATTR, new)
        log.warning("memory estimates scaled by %.2f for the rest of the study (a trial needed %.0f MB, estimated "
                    "%.0f MB)", new, needed_mb, figures["estimated_memory_mb"])


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error is running out of memory (memory.is_out_of_memory)."""
    return memory.is_out_of_memory(error)


class InfeasibleLimit:
    """Optuna callback: stop the study after `limit` infeasible trials in a row (the space is mostly over budget)."""

    def __init__(self, limit: int):
        self.limit, self.run = limit, 0

    def __call__(self, study: optuna.Study, frozen) -> None:
        self.run = self.run + 1 if slots.is_infeasible(frozen) else 0
        if self.run >= self.limit:
            study.stop()

    def check(self, budget) -> None:
        """Raise TooManyFailures when the limit stopped the study."""
        if self.run >= self.limit:
            raise TooManyFailures(f"{self.run} configurations in a row were over sweep.memory_budget_mb={budget}: "
                                  "the space is mostly out of reach; raise the budget, quantize (quant=nf4), or "
                                  "narrow the space (smaller lora.r, trainer.batch_size, trainer.max_length)")
