"""Trials left RUNNING by a worker that died on this machine (SIGKILL, the OOM killer): failed with a reason and
queued to run again once. Trials of other machines are left to the storage's heartbeat.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lora_search.core import records
from lora_search.core.processes import alive

log = logging.getLogger("lora_search.search.failures")

def _host_pid(trial) -> tuple[str, int] | None:
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    return (host, int(pid)) if host and pid.isdigit() else None


def requeue(study: optuna.Study, frozen) -> None:
    """Queue a failed trial's configuration to run next (once: a retry, or a trial already retried, is not)."""
    if frozen.user_attrs.get("retry_of") is not None or frozen.system_attrs.get("failed_trial") is not None:
        return
    if any(t.user_attrs.get("retry_of") == frozen.number for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(dict(frozen.params), user_attrs={"retry_of": frozen.number})


def fail_running(study: optuna.Study, out: Path, frozen, reason: str) -> bool:
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
    requeue(study, frozen)
    return True


def fail_dead_workers(study: optuna.Study, out: Path) -> list[int]:
    """Fail (and queue again, once) the RUNNING trials whose worker ran on this machine and is gone: a worker killed
    with SIGKILL or by the OOM killer. Trials of other machines are left to the heartbeat."""
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = _host_pid(t)
        if who is None or who[0] != host or who[1] == os.getpid() or alive(who[1], t.datetime_start):
            continue
        if fail_running(study, out, t, f"worker died (pid {who[1]})"):
            failed.append(t.number)
    if failed:
        log.warning("failed %d trial(s) whose worker on this machine died: %s (each queued to run again once)",
                    len(failed), ", ".join(f"#{n}" for n in failed))
    return failed
