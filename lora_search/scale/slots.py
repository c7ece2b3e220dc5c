"""Slots: Optuna's MaxTrialsCallback lets every worker that sees fewer than n finished trials start one more, so k workers
overshoot by up to k - 1. Here a trial trains only when the finished trials plus the running trials ahead of it
leave room: ahead are the trials already admitted (system attribute `lora_search:admitted`) and the lower-numbered
running ones. Trial numbers are handed out atomically by every Optuna storage, so two trials that pass the check at
the same moment settle by number: after marking itself admitted each re-checks against the lower-numbered running
trials only, and the higher one gives the slot up and waits. A trial with no lower-numbered trial queued needs no mark
(none can start after it and precede it), so the common case costs one read of the study and no write. A worker waits
for a slot before asking for a trial (StopAt, wait_for_slot), so a trial that finds none (a race) is rare; it waits,
and if the study fills meanwhile it fails as "not needed" without training. While waiting, the trials of workers that died are failed (and queued once).
"""

from __future__ import annotations

import logging
import time

import optuna
from optuna.trial import TrialState

from lora_search.scale.dead_workers import fail_dead_workers

log = logging.getLogger("lora_search.search.study")
INFEASIBLE = "infeasible"  # the status (user attr and status.json) of a trial skipped or out of memory


def is_infeasible(frozen) -> bool:
    """Whether a finished trial was recorded infeasible (it does not count toward n_trials)."""
    return frozen.user_attrs.get("status") == INFEASIBLE


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished(study: optuna.Study) -> list:
    """Trials that count toward n_trials: complete and pruned ones, not those recorded infeasible (never trained)."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED) if not is_infeasible(t)]


ADMITTED = "lora_search:admitted"


NOT_NEEDED = "not needed"  # the status of a trial that found no slot before the study had n_trials


POLL_S = 1.0


class NotNeeded(Exception):
    """The study reached n_trials while this trial waited for a slot: it ends FAIL without training."""


def _counts(study: optuna.Study, number: int | None, admitted: bool = True) -> tuple[int, int, bool]:
    """From one read of the study: (finished trials, running trials ahead of `number`, whether a lower-numbered trial
    is still queued)."""
    done = ahead = 0
    queued = False
    for t in study.get_trials(deepcopy=False):
        if t.state in FINISHED and not is_infeasible(t):
            done += 1
        elif t.state == TrialState.RUNNING and t.number != number and (
                (admitted and t.system_attrs.get(ADMITTED)) or number is None or t.number < number):
            ahead += 1
        elif t.state == TrialState.WAITING and number is not None and t.number < number:
            queued = True
    return done, ahead, queued


def _reap(study: optuna.Study, out) -> None:
    """Fail the trials of dead workers: this machine's by pid, others' by heartbeat (each queued again once)."""
    optuna.storages.fail_stale_trials(study)
    if out is not None:
        fail_dead_workers(study, out)


def wait_for_slot(study: optuna.Study, n: int, out=None, number: int | None = None, deadline: float | None = None,
                  poll_s: float = POLL_S) -> bool:
    """Wait until a trial (`number`, or the next one) has room: finished + running ahead < n. False when the study
    reached n finished trials (or the deadline, time.monotonic(), passed) first."""
    waited = False
    while True:
        done, ahead, _ = _counts(study, number)
        if done >= n:
            return False
        if done + ahead < n:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if not waited:
            log.info("%d of %d trials finished and %d running in other workers: waiting for a free slot", done, n,
                     ahead)
            waited = True
        _reap(study, out)
        time.sleep(poll_s)


def admit(study: optuna.Study, trial: optuna.Trial, n: int, out=None, poll_s: float = POLL_S) -> None:
    """Hold `trial` until it has a slot, then mark it admitted; NotNeeded when the study fills first."""
    storage = study._storage
    done, ahead, queued = _counts(study, trial.number)
    if not queued and done + ahead < n:
        # No lower-numbered trial is queued, so none can start after this one (a trial queued later gets a higher
        # number and counts this one as ahead of it): the slot is this trial's without marking (one read, no write).
        return
    while True:
        if not wait_for_slot(study, n, out, trial.number, poll_s=poll_s):
            raise NotNeeded(f"{NOT_NEEDED}: the study reached n_trials={n} finished trials while this trial waited for "
                            "a free slot (it did not train)")
        storage.set_trial_system_attr(trial._trial_id, ADMITTED, True)
        # Re-check after marking: a trial that passed its check at the same moment is settled by number (the lower
        # keeps the slot); one admitted before this trial's check was already counted there.
        done, ahead, _ = _counts(study, trial.number, admitted=False)
        if done + ahead < n:
            return
        storage.set_trial_system_attr(trial._trial_id, ADMITTED, False)
        time.sleep(poll_s)


def drop_retries(study: optuna.Study) -> list[int]:
    """Once the study has its n_trials: the queued retries of trials whose worker died (still WAITING: the other
    workers filled the study first) end FAIL as not needed, so no trial is left waiting. Each is taken with Optuna's
    WAITING -> RUNNING switch, which one process wins, so a worker popping it at that moment keeps it. Configurations
    the sweep file enqueued stay queued for a later, larger n_trials."""
    storage, dropped = study._storage, []
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if t.user_attrs.get("retry_of") is None and t.system_attrs.get("failed_trial") is None:
            continue
        if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
            continue
        storage.set_trial_user_attr(t._trial_id, "status", NOT_NEEDED)
        storage.set_trial_user_attr(t._trial_id, "reason", f"{NOT_NEEDED}: a retry the study no longer needed (it had "
                                    f"its n_trials before the retry started; it did not train)")
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        dropped.append(t.number)
    return dropped


class StopAt:
    """Optuna callback: after each trial, wait for a free slot (other workers' running trials may still fill the
    study); stop once the study has n finished trials (infeasible ones do not count) or the deadline passed."""

    def __init__(self, n: int, out=None, deadline: float | None = None):
        self.n, self.out, self.deadline = n, out, deadline

    def __call__(self, study: optuna.Study, frozen) -> None:
        if not wait_for_slot(study, self.n, self.out, deadline=self.deadline):
            study.stop()
