"""Pruning from inside the trainer: each cheap eval is reported to the Optuna trial, and a trial
the pruner gives up on, or whose loss is no longer finite, stops at once.
"""

from __future__ import annotations

import math

import optuna
from transformers import TrainerCallback


class TrialStopped(optuna.TrialPruned):
    """A pruned trial, with the step and the reason (pruner's decision or divergence)."""

    def __init__(self, reason: str, step: int):
        self.reason, self.step = reason, step
        super().__init__(reason)


def decision_steps(pruner, max_steps: int) -> list[int] | None:
    """The steps at which the sweep's pruner can decide, when it decides only at some: successive halving and
    Hyperband promote at their rungs, min_resource * reduction_factor ** k (Hyperband's brackets together
    cover every k), so an eval between two rungs is never read. The last step is kept (the objective).
    None for pruners that read every report (median, percentile, none) or a min_resource left to `auto`."""
    spec = {"type": pruner} if isinstance(pruner, str) else dict(pruner or {})
    kind = spec.get("type")
    if kind not in ("successive_halving", "hyperband") or max_steps is None or max_steps <= 0:
        return None
    sh = kind == "successive_halving"
    low = spec.get("min_resource", "auto" if sh else 1)
    eta = spec.get("reduction_factor", 4 if sh else 3)
    rate = spec.get("min_early_stopping_rate", 0) if sh else 0
    if not (isinstance(low, int) and low > 0 and isinstance(eta, int) and eta > 1):
        return None
    steps, k = [], rate
    while low * eta ** k < max_steps:
        steps.append(low * eta ** k)
        k += 1
    return steps + [max_steps]


# A DPO eval's mean log-probability margin of its pairs (chosen - rejected, the tuned model alone): derived from TRL's
# eval_logps/chosen and eval_logps/rejected (the difference of the means is the mean of the differences)
LOGP_MARGIN = "eval_logp_margin"
# eval_reward: an RL run's held-out reward of greedy answers (train/grpo.py)
HIGHER_IS_BETTER = ("eval_rewards/accuracies", "eval_rewards/margins", LOGP_MARGIN, "eval_reward")


class PruningCallback(TrainerCallback):
    """Report `eval_loss` on the fixed eval subset at every eval; raise TrialStopped when pruned or diverged.

    The value reported is the loss for a minimized objective and its negative for a maximized one
    (exact match, say), so the pruner compares trials in the study's direction; a metric where higher is better
    (a DPO eval's reward accuracy or margin) is reported as it is for a maximized objective.
    """

    def __init__(self, trial: optuna.trial.BaseTrial, metric: str = "eval_loss", maximize: bool = False,
                 pruner=None, report: bool = True):
        self.trial = trial
        self.report = report  # False in a multi-objective study: Optuna's pruners cannot read it (evals recorded only)
        self.metric = metric
        higher_is_better = metric in HIGHER_IS_BETTER
        self.sign = 1.0 if maximize == higher_is_better else -1.0
        self.intermediate: list[tuple[int, float]] = []
        self.active = True  # off once training ends: the final full-set eval is not a pruning point
        self.pruner = pruner  # the sweep's pruner spec: with rungs, periodic evals run at those steps only
        self.eval_at: set[int] | None = None
        self.skipped = 0  # periodic evals left out (between rungs)

    def read(self, metric: str) -> None:
        """Read another eval metric (an RL run's eval_reward: its loss says nothing of quality), keeping the study's
        direction."""
        maximize = (self.sign == 1.0) == (self.metric in HIGHER_IS_BETTER)
        self.metric = metric
        self.sign = 1.0 if maximize == (metric in HIGHER_IS_BETTER) else -1.0

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.trainer_utils import IntervalStrategy

        steps = None if args.eval_strategy == IntervalStrategy.NO else decision_steps(self.pruner, state.max_steps)
        self.eval_at = set(steps) if steps and self.report else None

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_at is None or not self.active:
            return
        wanted = state.global_step in self.eval_at
        if control.should_evaluate and not wanted:
            self.skipped += 1
        control.should_evaluate = wanted

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if self.active and loss is not None and not math.isfinite(loss):
            raise TrialStopped(f"diverged: training loss {loss} at step {state.global_step}", state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = dict(metrics or {})
        if "eval_logps/chosen" in metrics and "eval_logps/rejected" in metrics:
            metrics[LOGP_MARGIN] = metrics["eval_logps/chosen"] - metrics["eval_logps/rejected"]
        value = metrics.get(self.metric)
        if value is None or not self.active:
            return
        step = state.global_step
        if not math.isfinite(value):
            raise TrialStopped(f"diverged: {self.metric} {value} at step {step}", step)
        self.intermediate.append((step, value))
        if not self.report:
            return
        self.trial.report(self.sign * value, step)
        if self.trial.should_prune():
            raise TrialStopped(f"pruned by the pruner at step {step} ({self.metric} {value:.4f})", step)
