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


class PruningCallback(TrainerCallback):
    """Report `eval_loss` on the fixed eval subset at every eval; raise TrialStopped when pruned or diverged.

    The value reported is the loss for a minimized objective and its negative for a maximized one
    (exact match, say), so the pruner compares trials in the study's direction.
    """

    def __init__(self, trial: optuna.trial.BaseTrial, metric: str = "eval_loss", maximize: bool = False):
        self.trial = trial
        self.metric = metric
        self.sign = -1.0 if maximize else 1.0
        self.intermediate: list[tuple[int, float]] = []
        self.active = True  # off once training ends: the final full-set eval is not a pruning point

    def on_train_end(self, args, state, control, **kwargs):
        self.active = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if self.active and loss is not None and not math.isfinite(loss):
            raise TrialStopped(f"diverged: training loss {loss} at step {state.global_step}", state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or not self.active:
            return
        step = state.global_step
        if not math.isfinite(value):
            raise TrialStopped(f"diverged: {self.metric} {value} at step {step}", step)
        self.intermediate.append((step, value))
        self.trial.report(self.sign * value, step)
        if self.trial.should_prune():
            raise TrialStopped(f"pruned by the pruner at step {step} ({self.metric} {value:.4f})", step)
