"""The search's progress: one log line per finished trial (its values, the best so far or the Pareto front, the time
left).
"""

from __future__ import annotations

import logging
import time

import optuna
from optuna.trial import TrialState

from lora_search.config import objectives
from lora_search.config.schema import RunConfig
from lora_search.scale import slots
from lora_search.scale.slots import NOT_NEEDED, finished

log = logging.getLogger("lora_search.search.study")


def progress_callback(cfg: RunConfig, started: float, done_before: int):
    """Log one line per finished trial: its params, objective value(s), state, the best so far (the Pareto front
    with several objectives) and time left."""
    names = [m for m, _ in objectives.objectives(cfg.sweep)]

    def callback(study: optuna.Study, frozen) -> None:
        if frozen.user_attrs.get("status") == NOT_NEEDED:
            log.info("trial #%d not needed: the study has its %d trials", frozen.number, cfg.sweep.n_trials)
            return
        n_done = len(finished(study))
        state = frozen.state.name.lower()
        if frozen.state == TrialState.COMPLETE:
            value = ", ".join(f"{m} {objectives.fmt(m, v)}" for m, v in zip(names, frozen.values))
            if frozen.user_attrs.get("over_budget"):
                value += f" (infeasible: {frozen.user_attrs['over_budget']})"
        else:
            value = frozen.user_attrs.get("reason", state)
            state = slots.INFEASIBLE if slots.is_infeasible(frozen) else state
        params = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in frozen.params.items())
        ran = n_done - done_before
        per_trial = (time.perf_counter() - started) / max(ran, 1)
        left = max(cfg.sweep.n_trials - n_done, 0) * per_trial
        if cfg.sweep.timeout_s:
            left = min(left, max(cfg.sweep.timeout_s - (time.perf_counter() - started), 0))
        best = ""
        if len(names) > 1:
            front = study.best_trials
            best = f" | Pareto front: {len(front)} trial(s) ({', '.join(f'#{t.number}' for t in front[:8])})" \
                if front else ""
        else:
            try:
                best = f" | best {study.best_value:.4f} (#{study.best_trial.number})"
            except ValueError:
                pass
        log.info("trial %d/%d %s [%s]: %s (%.0f s)%s | ~%s left", n_done, cfg.sweep.n_trials, state.upper(), params,
                 value, (frozen.duration.total_seconds() if frozen.duration else 0), best, _duration(left))
    return callback


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
