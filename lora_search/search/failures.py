"""What a sweep does when things go wrong: any error fails its trial (type, message and step recorded) and the
sweep goes on; `sweep.max_failures` failed trials in a row stop it with a grouped summary (exit 4); SIGINT and
SIGTERM fail the running trial as `interrupted`, stop the workers this process started and exit 130 / 143; a
trial left RUNNING by a dead worker on this machine is failed (and retried once) when the next run starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import traceback
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState
from transformers import TrainerCallback

from lora_search.core import hardware, records
from lora_search.scale import workers
from lora_search.scale.workers import worker_id

log = logging.getLogger(__name__)
EXIT_FAILURES = 4  # the sweep stopped itself: sweep.max_failures trials failed in a row (2 is bad input)
INTERRUPTED = "interrupted"  # the reason of a trial stopped by SIGINT or SIGTERM
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread so the running trial is recorded on the way out."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class TooManyFailures(Exception):
    """The sweep stopped itself: its trials kept failing. Carries the grouped summary."""

    def __init__(self, summary: str):
        self.summary = summary
        super().__init__(summary)


def check(sweep) -> list[str]:
    """Problems with sweep.max_failures."""
    value = sweep.max_failures
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return []
    return [f"sweep.max_failures must be a positive integer (failed trials in a row that stop the sweep) or null "
            f"(never stop), got {value!r}"]


@contextlib.contextmanager
def signals_handled():
    """SIGINT and SIGTERM raise Interrupted in the main thread; a second one is ignored while the trial is recorded,
    a third exits at once (128 + signal). Handlers are restored afterwards; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            log.warning("%s received: stopping (the running trial is recorded as failed; run the same command again "
                        "to resume)", name)
            raise Interrupted(signum)
        if len(received) == 2:
            log.warning("%s received again: already stopping; a third signal exits at once", name)
            return
        os._exit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_code(error: BaseException, resumable: bool = True) -> int:
    """Print why the run stopped (one block on stderr, no traceback) and return its exit code: 128 + signal for an
    interrupt (130 Ctrl-C, 143 SIGTERM), EXIT_FAILURES for a sweep whose trials kept failing."""
    if isinstance(error, TooManyFailures):
        print(f"error: {records.redact(error.summary)}", file=sys.stderr)  # error texts may hold a secret
        return EXIT_FAILURES
    signum = getattr(error, "signum", signal.SIGINT)
    then = ("finished trials are kept: run the same command again to resume" if resumable
            else "the run folder records it as failed (interrupted)")
    print(f"error: interrupted ({signal.Signals(signum).name}); {then}", file=sys.stderr)
    return 128 + signum


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


@contextlib.contextmanager
def stopping(study: optuna.Study, out: Path, procs: list):
    """Around a search: on an interrupt, fail this process's trials left RUNNING, queue the interrupted one again and
    forward the signal to the workers this process started; on any other error, stop those workers (SIGTERM)."""
    try:
        yield
    except KeyboardInterrupt as e:
        after_interrupt(study, out)
        workers.stop(procs, getattr(e, "signum", signal.SIGINT))
        raise
    except BaseException:
        workers.stop(procs)
        raise


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


def _host_pid(trial) -> tuple[str, int] | None:
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    return (host, int(pid)) if host and pid.isdigit() else None


def _alive(pid: int, since) -> bool:
    """Whether the process that started at or before `since` (a trial's start) still runs as `pid`."""
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.Error:  # access denied: it exists
        return True
    return since is None or created <= since.timestamp() + 1.0  # a newer process reused the pid


def _requeue(study: optuna.Study, frozen) -> None:
    """Queue a failed trial's configuration to run next (once: a retry, or a trial already retried, is not)."""
    if frozen.user_attrs.get("retry_of") is not None or frozen.system_attrs.get("failed_trial") is not None:
        return
    if any(t.user_attrs.get("retry_of") == frozen.number for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(dict(frozen.params), user_attrs={"retry_of": frozen.number})


def _fail(study: optuna.Study, out: Path, frozen, reason: str) -> bool:
    """Fail a RUNNING trial from outside its objective (user attrs, status.json, state) and queue its configuration
    once, as the heartbeat does; False when another process finished it first."""
    storage = study._storage
    try:
        for key, value in (("status", "failed"), ("reason", reason)):
            storage.set_trial_user_attr(frozen._trial_id, key, value)
        if not storage.set_trial_state_values(frozen._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    records.write_status(out / "trials" / f"{frozen.number:04d}", "failed", reason, trial=frozen.number)
    _requeue(study, frozen)
    return True


def fail_dead_workers(study: optuna.Study, out: Path) -> list[int]:
    """Fail (and queue again, once) the RUNNING trials whose worker ran on this machine and is gone: a worker killed
    with SIGKILL or by the OOM killer. Trials of other machines are left to the heartbeat."""
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = _host_pid(t)
        if who is None or who[0] != host or who[1] == os.getpid() or _alive(who[1], t.datetime_start):
            continue
        if _fail(study, out, t, f"worker died (pid {who[1]})"):
            failed.append(t.number)
    if failed:
        log.warning("failed %d trial(s) whose worker on this machine died: %s (each queued to run again once)",
                    len(failed), ", ".join(f"#{n}" for n in failed))
    return failed


def after_interrupt(study: optuna.Study, out: Path) -> None:
    """After an interrupt: fail this process's trials still RUNNING (the signal landed outside the objective), and
    queue the interrupted trial's configuration to run first next time (once)."""
    me = worker_id()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.user_attrs.get("worker") != me:
            continue
        if t.state == TrialState.RUNNING:
            _fail(study, out, t, INTERRUPTED)
        elif t.user_attrs.get("reason") == INTERRUPTED:
            _requeue(study, t)
