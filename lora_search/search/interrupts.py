"""Ctrl-C and SIGTERM: the running trial is recorded as `interrupted`, the workers this process started are stopped,
and the command exits 130 / 143 saying how to resume; a third signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lora_search.core import records
from lora_search.scale import workers
from lora_search.scale.dead_workers import fail_running, requeue
from lora_search.scale.workers import worker_id
from lora_search.search.failures import EXIT_FAILURES, TooManyFailures

log = logging.getLogger("lora_search.search.failures")

INTERRUPTED = "interrupted"  # the reason of a trial stopped by SIGINT or SIGTERM


SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread so the running trial is recorded on the way out."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


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


def after_interrupt(study: optuna.Study, out: Path) -> None:
    """After an interrupt: fail this process's trials still RUNNING (the signal landed outside the objective), and
    queue the interrupted trial's configuration to run first next time (once)."""
    me = worker_id()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.user_attrs.get("worker") != me:
            continue
        if t.state == TrialState.RUNNING:
            fail_running(study, out, t, INTERRUPTED)
        elif t.user_attrs.get("reason") == INTERRUPTED:
            requeue(study, t)


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
