"""Exactly once: the stages after the search (promote, merge, benchmark, report) run in one process per study, however
many `stage=all` processes share it (Hydra's launchers, Kubernetes pods, several machines).

Optuna's storages have no lock, but every one of them (a database, a journal file, the gRPC proxy) creates a study name
atomically: the second `create_new_study` of a name raises DuplicatedStudyError. So the first process to find the
search finished creates the claim study `<study>:promotion@<finished trials>`; the others find it taken and exit 0
saying who promotes (a claim held on another machine is waited for, see `take`). The claim study holds who (host:pid), when, a heartbeat and its state (running, done, failed) as
user attributes, so it shows on the dashboard. A claim whose process died (its pid gone on this machine, or no
heartbeat for 3 x sweep.heartbeat_s) or failed is taken over through the next claim name (`#2`, `#3`, ...), created
atomically in the same way; so is a claim whose creator died between creating it and writing its state (no state after
3 x sweep.heartbeat_s: it is marked failed, `abandoned`). An explicit `stage=promote` (or force=true) is the user's own call and takes no claim.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from lora_search.config.schema import RunConfig
from lora_search.core import processes
from lora_search.scale import slots
from lora_search.scale.workers import worker_id

log = logging.getLogger(__name__)
RUNNING, DONE, FAILED = "running", "done", "failed"


@dataclass
class Claim:
    name: str  # the claim study's name
    mine: bool
    attrs: dict  # who, host, pid, at, heartbeat, state, results_dir


def claim_name(study_name: str, finished: int, generation: int = 1) -> str:
    """`<study>:promotion@<finished trials>`, `#<generation>` after a take-over."""
    return f"{study_name}:promotion@{finished}" + (f"#{generation}" if generation > 1 else "")


def _alive(attrs: dict, stale_s: float) -> bool:
    """Whether a running claim's process still lives: by pid on this machine (guard's check, which also catches a
    reused pid), else by its heartbeat."""
    if attrs.get("host") == socket.gethostname() and attrs.get("pid"):
        return processes.alive(int(attrs["pid"]), datetime.datetime.fromisoformat(attrs["at"]) if attrs.get("at") else None)
    return time.time() - float(attrs.get("heartbeat") or 0) <= stale_s


def _read(storage, name: str) -> dict | None:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return dict(storage.get_study_user_attrs(study_id))


def _set(storage, name: str, **attrs) -> None:
    study_id = storage.get_study_id_from_name(name)
    for key, value in attrs.items():
        storage.set_study_user_attr(study_id, key, value)


def take(study: optuna.Study, cfg: RunConfig, results_dir: str, poll_s: float = 5.0,
         unwritten_s: float | None = None) -> Claim:
    """Claim the promotion of `study` (its current finished trials), or return the live or finished claim of another
    process (mine=False). A claim held on another machine is waited for until it is done, failed or stale (its
    process cannot be checked from here: a replacement pod or job must not skip a promotion whose claimer was
    killed); one held by a live process on this machine is returned at once. A claim still without a state after
    unwritten_s (default 3 x sweep.heartbeat_s) is abandoned: its creator died before writing it."""
    storage = study._storage
    count = len(slots.finished(study))
    stale_s = 3 * cfg.sweep.heartbeat_s
    unwritten_s = stale_s if unwritten_s is None else unwritten_s
    generation = 1
    while True:
        name = claim_name(study.study_name, count, generation)
        me = {"who": worker_id(), "host": socket.gethostname(), "pid": os.getpid(),
              "at": datetime.datetime.now().isoformat(timespec="seconds"), "heartbeat": time.time(),
              "state": RUNNING, "results_dir": results_dir, "study": study.study_name, "finished_trials": count}
        try:
            storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
        except optuna.exceptions.DuplicatedStudyError:
            attrs = _written(storage, name, unwritten_s)
            if attrs["state"] == RUNNING and _alive(attrs, stale_s) and attrs.get("host") != socket.gethostname():
                attrs = _wait_while_running(storage, name, attrs, stale_s, poll_s)
            if attrs["state"] == DONE or (attrs["state"] == RUNNING and _alive(attrs, stale_s)):
                return Claim(name, False, attrs)
            log.warning("the promotion claim %s by %s is %s: taking it over", name, attrs.get("who"),
                        attrs.get("reason", attrs["state"]) if attrs["state"] == FAILED
                        else "stale (its process is gone)")
            generation += 1
            continue
        _set(storage, name, **me)
        later = claim_name(study.study_name, count, generation + 1)
        if (_read(storage, name) or {}).get("reason") or _read(storage, later) is not None:
            # written too late: another process found this claim abandoned (no state) and takes it over
            log.warning("the promotion claim %s was found abandoned before its state was written: not promoting", name)
            _set(storage, name, state=FAILED)
            return Claim(later, False, _read(storage, later) or {})
        return Claim(name, True, me)


def _written(storage, name: str, unwritten_s: float) -> dict:
    """The claim's attributes once its creator has written its state; a claim still without one after unwritten_s
    is marked failed (its creator died between creating and writing it)."""
    deadline = time.monotonic() + unwritten_s
    attrs = _read(storage, name) or {}
    while not attrs.get("state"):  # created by another process, its attributes not written yet
        if time.monotonic() >= deadline:
            reason = f"abandoned (no state written within {unwritten_s:g} s of its creation)"
            with contextlib.suppress(Exception):  # a mark for the dashboard; the take-over does not depend on it
                _set(storage, name, state=FAILED, reason=reason)
            return {**attrs, "state": FAILED, "reason": reason}
        time.sleep(min(0.2, unwritten_s))
        attrs = _read(storage, name) or {}
    return attrs


def _wait_while_running(storage, name: str, attrs: dict, stale_s: float, poll_s: float) -> dict:
    log.info("the promotion is claimed by %s on another machine: waiting until it is done (or its heartbeat stops)",
             attrs.get("who"))
    while attrs.get("state") == RUNNING and _alive(attrs, stale_s):
        time.sleep(poll_s)
        attrs = _read(storage, name) or attrs
    return attrs


@contextlib.contextmanager
def holding(study: optuna.Study, claim: Claim, interval_s: float):
    """While the stages run: beat every interval_s; afterwards the claim is done, or failed on an error."""
    storage, stop = study._storage, threading.Event()

    def beat():
        while not stop.wait(interval_s):
            with contextlib.suppress(Exception):  # a missed beat is retried; the stages go on
                _set(storage, claim.name, heartbeat=time.time())

    thread = threading.Thread(target=beat, daemon=True, name="claim-heartbeat")
    thread.start()
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            _set(storage, claim.name, state=FAILED)
        raise
    finally:
        stop.set()
        thread.join(timeout=5)
    _set(storage, claim.name, state=DONE, done_at=datetime.datetime.now().isoformat(timespec="seconds"))


def describe(claim: Claim) -> str:
    """`host:pid (since 12:03:01, running; results in /path on host)`."""
    a = claim.attrs
    return (f"{a.get('who')} ({a.get('state')} since {a.get('at')}; its results are in {a.get('results_dir')} on "
            f"{a.get('host')})")


def wait_for_search(study: optuna.Study, out, poll_s: float = slots.POLL_S) -> None:
    """Before claiming: wait for trials still running in other workers (a timeout can end workers at different
    times), failing those of dead workers."""
    me = worker_id()
    said = False
    while True:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get("worker") != me]
        if not running:
            return
        if not said:
            log.info("waiting for %d trial(s) still running in other workers before promoting", len(running))
            said = True
        slots._reap(study, out)
        time.sleep(poll_s)
