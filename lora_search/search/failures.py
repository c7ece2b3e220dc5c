"""What a sweep does when things go wrong: any error fails its trial (type, message and step recorded) and the
sweep goes on; `sweep.max_failures` failed trials in a row stop it with a grouped summary (exit 4); SIGINT and
SIGTERM fail the running trial as `interrupted`, stop the workers this process started and exit 130 / 143; a
trial left RUNNING by a dead worker on this machine is failed (and retried once) when the next run starts.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections import Counter

import optuna
from optuna.trial import TrialState
from transformers import TrainerCallback

from lora_search.core import hardware

log = logging.getLogger(__name__)
EXIT_FAILURES = 4  # the sweep stopped itself: sweep.max_failures trials failed in a row (2 is bad input)
class TooManyFailures(Exception):
    """The sweep stopped itself: its trials kept failing. Carries the grouped summary."""

    def __init__(self, summary: str):
        self.summary = summary
        super().__init__(summary)


class StepWatch(TrainerCallback):
    """Where training is: before the first step, in step N (1-based), or after the last."""

    def __init__(self):
        self.where = "before training"

    def on_step_begin(self, args, state, control, **kwargs):
        self.where = f"at step {state.global_step + 1}"

    def on_train_end(self, args, state, control, **kwargs):
        self.where = "after training"


def failure(trial: optuna.Trial, error: BaseException, watch: StepWatch | None) -> dict:
    """Record a failed trial's error type and where it happened (user attrs), and drop the locals of the frames
    the error passed through (the trainer, activations, optimizer state) so their memory is freed now, not
    when the last reference to the traceback goes; returns those two as metrics."""
    info = {"error_type": type(error).__name__, "failed_at": watch.where if watch else None}
    for key, value in info.items():
        trial.set_user_attr(key, value)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    return info


class FailureLimit:
    """Optuna callback: frees memory after a failed trial; stops the study after `limit` failed trials in a row
    in this process (a complete or pruned trial starts the count again). None: never stops."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.failed: list = []  # the current run of failed trials (frozen)

    def __call__(self, study: optuna.Study, frozen) -> None:
        if frozen.user_attrs.get("status") == "not needed":  # found no slot before the study filled: no failure
            return
        if frozen.state != TrialState.FAIL:
            self.failed.clear()
            return
        hardware.release_memory()  # the trial's exception is gone by now: what it held can go back
        self.failed.append(frozen)
        if self.limit is not None and len(self.failed) >= self.limit:
            study.stop()

    def check(self) -> None:
        """Raise TooManyFailures, with the summary of the failed trials, if the limit stopped the study."""
        if self.limit is not None and len(self.failed) >= self.limit:
            raise TooManyFailures(summarize(self.failed, self.limit))


def _short(key: str) -> str:
    return key.split(".")[-1]


def _value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summarize(trials: list, limit: int | None = None) -> str:
    """The failed trials grouped by error type and message, each group with where it failed and the params its trials
    share: `5 trials failed in a row ...\n  5x OutOfMemoryError at step 1 with r=64, batch_size=16: ...`."""
    groups: dict = {}
    for t in trials:
        reason = str(t.user_attrs.get("reason") or t.state.name.lower())
        first = reason.splitlines()[0] if reason.strip() else reason
        kind = t.user_attrs.get("error_type")
        message = first[len(kind) + 2:] if kind and first.startswith(f"{kind}: ") else first
        groups.setdefault((kind, re.sub(r"\d+(\.\d+)?", "#", message)[:120]), []).append((t, message))
    lines = []
    for (kind, _), members in sorted(groups.items(), key=lambda item: -len(item[1])):
        where = Counter(t.user_attrs.get("failed_at") for t, _ in members)
        place = " or ".join(w for w, _ in where.most_common(3) if w)
        params = [t.params for t, _ in members]
        shared = {k: v for k, v in params[0].items() if all(p.get(k, object()) == v for p in params[1:])}
        label = " ".join(p for p in (kind, place) if p) or "no error type"
        with_ = f" with {', '.join(f'{_short(k)}={_value(v)}' for k, v in shared.items())}" if shared else ""
        message = members[0][1]
        message = message if len(message) <= 200 else message[:197] + "..."
        numbers = ", ".join(f"#{t.number}" for t, _ in members[:8]) + (", ..." if len(members) > 8 else "")
        lines.append(f"  {len(members)}x {label}{with_}: {message} (trials {numbers})")
    head = f"{len(trials)} trials failed in a row" + (f" (sweep.max_failures={limit})" if limit else "")
    return "\n".join([f"{head}; the sweep stopped:", *lines,
                      "fix the cause (or narrow sweep.space, or raise sweep.max_failures); finished trials are kept "
                      "and the same command resumes the study"])


