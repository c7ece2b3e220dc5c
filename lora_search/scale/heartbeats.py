"""Heartbeats on every storage: Optuna has them for databases only; for a journal and the gRPC proxy `beating(...)`
adds them as a trial system attribute, and every storage's stale trials get a reason before Optuna fails them, so
a worker that dies on another machine has its trial failed (and retried once) there too.
"""

from __future__ import annotations

import contextlib
import time

import optuna
from optuna.storages._heartbeat import (
    BaseHeartbeat,  # private: Optuna's heartbeat protocol (pinned in pyproject)
)
from optuna.trial import TrialState

HEARTBEAT_ATTR = "lora_search:heartbeat"


class _Beats:
    """Optuna's heartbeat protocol (BaseHeartbeat) for a storage that lacks it: the beat is a trial system attribute
    (the worker's clock, seconds since the epoch); a RUNNING trial without a beat for grace_period is stale, and
    Optuna's own fail_stale_trials fails it and calls the callback (RetryHeartbeatStaleTrialCallback)."""

    def _init_beats(self, heartbeat_interval=None, grace_period=None, heartbeat_stale_trial_callback=None):
        self._beat_interval, self._beat_callback = heartbeat_interval, heartbeat_stale_trial_callback
        self._beat_grace = grace_period or (2 * heartbeat_interval if heartbeat_interval else None)

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _stale_ids(self, study_id: int) -> list[int]:
        if not self._beat_interval:
            return []
        now, stale = time.time(), []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.system_attrs.get(HEARTBEAT_ATTR)
            if last is None and t.datetime_start is not None:
                last = t.datetime_start.timestamp()
            if last is not None and now - last > self._beat_grace:
                stale.append(t._trial_id)
        return stale

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return _with_reason(self, self._stale_ids(study_id))

    def get_heartbeat_interval(self):
        return self._beat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._beat_callback


def _beating(base):
    class Beating(_Beats, base, BaseHeartbeat):
        def __init__(self, *args, heartbeat_interval=None, grace_period=None, heartbeat_stale_trial_callback=None,
                     **kwargs):
            base.__init__(self, *args, **kwargs)
            self._init_beats(heartbeat_interval, grace_period, heartbeat_stale_trial_callback)

    Beating.__name__ = Beating.__qualname__ = f"Beating{base.__name__}"
    return Beating


STALE_REASON = "worker stopped sending heartbeats (killed, or its machine went away)"


def _with_reason(storage, trial_ids: list[int]) -> list[int]:
    """Before Optuna fails stale trials: give each its reason and status (a FAIL trial's attributes are frozen)."""
    for trial_id in trial_ids:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(trial_id, "status", "failed")
            storage.set_trial_user_attr(trial_id, "reason", STALE_REASON)
    return trial_ids


def reasoned(base):
    """Optuna's RDBStorage whose stale trials get a reason before they are failed."""
    if base not in _BEATING:
        class Reasoned(base):
            def _get_stale_trial_ids(self, study_id: int) -> list[int]:
                return _with_reason(self, super()._get_stale_trial_ids(study_id))

        Reasoned.__name__ = Reasoned.__qualname__ = base.__name__  # what logs and the dashboard show
        _BEATING[base] = Reasoned
    return _BEATING[base]


_BEATING: dict = {}


def beating(base):
    """`base` (Optuna's JournalStorage or GrpcStorageProxy) with heartbeats, one class per base."""
    if base not in _BEATING:
        _BEATING[base] = _beating(base)
    return _BEATING[base]
