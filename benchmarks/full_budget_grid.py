"""The full-budget grid: every configuration x training seed trained once, as a trial of an Optuna grid study kept in
SQLite (results/bench/full_budget_grid.db, committed: it is the benchmark's state and resumes on any machine).

Two studies per data set, in the same file:

  full_budget    the promotion budget of sweeps/rank_lr.yaml (40 steps, its learning-rate schedule), the fixed 32-row
                 eval subset every 5 steps (the learning curve a pruner reads: an eval leaves the weights, optimizer
                 and data order alone, so a trial stopped at step k is this run up to k) and every eval row at 40.
                 The trial's value is the full eval; its curve, its cumulative training seconds at each eval and
                 each eval's seconds are trial attributes (compute accounting).
  trial_budget   today's trials (sweep.trial: 10 steps with their own 10-step schedule, the subset at 5 and 10): what
                 the shipped design (median pruner, top-3 re-trained) reads.

A run that is stopped (SIGTERM, Ctrl-C) is told FAIL; a trial left RUNNING by a process that is gone (or by another
machine) is failed at the next start and its grid point trained again. The training itself is a function
(`train_fn(params) -> Run dict`), so the tests drive the study with a fake one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("full_budget_grid")

AXES = {"lora.r": [4, 8, 16, 32], "lora.alpha_ratio": [1, 2],
        # the default space's learning-rate range (2e-4 to 3e-3, log) in three log-spaced values, ends included
        "trainer.learning_rate": [2.0e-4, 7.75e-4, 3.0e-3]}
CONFIRM_AXES = {"lora.r": [8, 32], "lora.alpha_ratio": [1, 2], "trainer.learning_rate": [2.0e-4, 7.75e-4, 3.0e-3]}
FIXED = {"lora.dropout": 0.05, "lora.targets": "all_linear"}  # the space's middle dropout; every linear layer
SEEDS = [0, 1]  # trainer.seed: the adapter's initialization and the data order
SEED_KEY = "trainer.seed"
FULL, SHORT = "full_budget", "trial_budget"
FULL_STEPS, EVAL_EVERY = 40, 5


@dataclass(frozen=True)
class GridSpec:
    """One grid study: its name in the storage, its axes (the training seed is one more) and the data seed."""

    study: str
    axes: dict
    data_seed: int = 0
    budget: str = FULL  # FULL or SHORT

    def space(self) -> dict:
        return {**self.axes, SEED_KEY: SEEDS}

    def points(self) -> list[dict]:
        import itertools

        space = self.space()
        return [dict(zip(space, values)) for values in itertools.product(*space.values())]


def specs(confirm: bool = False) -> list[GridSpec]:
    """The studies in training order: the main grid's full budget, then its trial budget; --confirm: the smaller
    grid on data generated with another seed (data.seed=1), full budget then trial budget."""
    if confirm:
        return [GridSpec("confirm_" + FULL, CONFIRM_AXES, 1, FULL), GridSpec("confirm_" + SHORT, CONFIRM_AXES, 1, SHORT)]
    return [GridSpec(FULL, AXES, 0, FULL), GridSpec(SHORT, AXES, 0, SHORT)]


def point_key(params: dict) -> tuple:
    return tuple(sorted((k, params[k]) for k in params))


_storages: dict = {}  # url -> RDBStorage: one engine per file and process (each new one re-checks the schema)


def _study(storage: str, spec: GridSpec):
    import optuna

    if storage not in _storages:
        _storages[storage] = optuna.storages.RDBStorage(storage)
    return optuna.create_study(study_name=spec.study, storage=_storages[storage], load_if_exists=True,
                               direction="minimize", sampler=optuna.samplers.GridSampler(spec.space(), seed=0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale(study) -> list[int]:
    """Fail every RUNNING trial whose process is gone (or ran on another machine); raise when one is alive here
    (another process is training this grid). Returns the failed trial numbers."""
    import optuna

    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid, where = t.user_attrs.get("pid"), t.user_attrs.get("host")
        if where == host and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise RuntimeError(f"trial {t.number} of {study.study_name} is being trained by process {pid}: one "
                               "process trains a grid at a time")
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "stale: its process was gone at a restart")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        failed.append(t.number)
    return failed


def progress(storage: str, spec: GridSpec) -> dict:
    """How many grid points are done (a COMPLETE trial) and how many remain."""
    import optuna

    study = _study(storage, spec)
    done = {point_key(t.params) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    points = spec.points()
    return {"study": spec.study, "points": len(points), "done": sum(point_key(p) in done for p in points),
            "remain": sum(point_key(p) not in done for p in points)}


class _Stop(Exception):
    """SIGTERM during a run: the trial is failed and the grid stops cleanly."""

    def __init__(self, sender: str = ""):
        super().__init__(sender)
        self.sender = sender


def run_grid(storage: str, spec: GridSpec, train_fn: Callable[[dict], dict], max_runs: int | None = None,
             deadline: float | None = None, max_failures: int = 3) -> dict:
    """Train the grid's missing points one trial each until it is complete, max_runs runs were made or the next
    run would end after `deadline` (time.monotonic(); a run is expected to take the median of the study's runs).
    Returns progress() with this call's runs and seconds."""
    import optuna

    study = _study(storage, spec)
    stale = fail_stale(study)
    if stale:
        log.info("%s: failed %d stale trial(s) %s; their points are trained again", spec.study, len(stale), stale)
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in spec.space().items()}
    runs, failures, stopped = 0, 0, None
    previous = signal.signal(signal.SIGTERM, _raise_stop) if _main_thread() else None
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            done = {point_key(t.params) for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
            missing = [p for p in spec.points() if point_key(p) not in done]
            if not missing:
                break
            if max_runs is not None and runs >= max_runs:
                stopped = f"--max-runs {max_runs} reached"
                break
            seconds = [t.user_attrs["wall_s"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                       and "wall_s" in t.user_attrs]
            expected = statistics.median(seconds) if seconds else 0.0
            if deadline is not None and time.monotonic() + expected > deadline:
                stopped = f"the time budget leaves less than a run ({expected:.0f} s)"
                break
            tried = {point_key(t.params) for t in trials if t.params and t.state != optuna.trial.TrialState.WAITING}
            waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
            if not waiting and all(point_key(p) in tried for p in missing):
                study.enqueue_trial(missing[0])  # every missing point failed once: the grid sampler will not retry
            trial = study.ask(dists)
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("host", socket.gethostname())
            t0 = time.perf_counter()
            try:
                run = train_fn(dict(trial.params))
            except (KeyboardInterrupt, _Stop) as e:
                trial.set_user_attr("fail_reason", f"interrupted ({type(e).__name__}{' ' + str(e) if str(e) else ''})")
                log.info("%s: interrupted (%s %s) at %s", spec.study, type(e).__name__, e, time.strftime("%H:%M:%S"))
                _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                stopped = "interrupted"
                break
            except Exception as e:  # a failed run fails its trial; several in a row stop the grid
                log.exception("%s: run %s failed", spec.study, trial.params)
                trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:500])
                _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                failures += 1
                if failures >= max_failures:
                    stopped = f"{failures} failures in a row"
                    break
                continue
            failures = 0
            for step, value in run["curve"]:
                trial.report(value, step)
            for k in ("curve", "train_s", "eval_s", "final_eval_s", "steps", "threads"):
                trial.set_user_attr(k, run.get(k))
            trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 2))
            _tell(study, trial, run["value"])
            runs += 1
            left = progress(storage, spec)
            log.info("%s: %s -> %.4f (%.0f s); %d of %d done, %d remain", spec.study, _short(trial.params),
                     run["value"], time.perf_counter() - t0, left["done"], left["points"], left["remain"])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return {**progress(storage, spec), "runs": runs, "stopped": stopped}


def _tell(study, trial, value=None, state=None) -> None:
    """study.tell, where the grid sampler's study.stop() on an exhausted grid (meant for optimize()) is a no-op: the
    trial's state is stored before it raises."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_stop(signum, frame):
    raise _Stop(f"signal {signum}")


def _short(params: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in params.items())


def load(storage: str, spec: GridSpec) -> dict:
    """The grid's complete runs: {configuration name: {"params", "runs": {seed: run}}}, a run being {"curve": {step:
    subset value}, "value": the trial's value, "train_s": {step: cumulative training seconds}, "eval_s": {step:
    seconds of that eval}, "final_eval_s"}. Configuration names leave the seed out."""
    import optuna

    study = _study(storage, spec)
    out: dict = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        params = {k: t.params[k] for k in spec.axes}
        name = ",".join(f"{k.split('.')[-1]}={params[k]}" for k in spec.axes)  # search_quality.key
        entry = out.setdefault(name, {"params": params, "runs": {}})
        entry["runs"][str(t.params[SEED_KEY])] = {
            "curve": {int(s): v for s, v in t.user_attrs.get("curve") or sorted(t.intermediate_values.items())},
            "value": t.value,
            "train_s": {int(s): v for s, v in t.user_attrs.get("train_s") or []},
            "eval_s": {int(s): v for s, v in t.user_attrs.get("eval_s") or []},
            "final_eval_s": t.user_attrs.get("final_eval_s")}
    return out


# ---- the real trainer: the project's own train path on one loaded worker ----

def real_trainer(data_seed: int, work: Path, quick: bool = False, threads: int | None = None) -> Callable:
    """The grid's trainer on data generated with data_seed: train(spec, params) is one run of
    lora_search.train.run.train_adapter on a worker of lora_search.commands.train_stage (the model loaded once),
    recording the learning curve and its timings."""
    import torch
    from transformers import TrainerCallback

    from benchmarks.search_quality import QUICK
    from lora_search.commands import train_stage
    from lora_search.config import space as space_lib
    from lora_search.config.compose import load_config
    from lora_search.train.run import train_adapter

    cfg = load_config(["sweep=rank_lr", "tracking=none", f"results_dir={work}", f"data.seed={data_seed}",
                       *(QUICK if quick else []), *([f"trainer.num_threads={threads}"] if threads else [])])
    worker = train_stage.start_worker(cfg)

    class Curve(TrainerCallback):
        """The subset eval at every eval step, the training seconds before it and the eval's own seconds."""

        def __init__(self):
            self.train_s, self.rows, self.t_step, self.t_end, self.training = 0.0, [], None, None, True

        def on_step_begin(self, args, state, control, **kw):
            self.t_step = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.train_s += now - self.t_step
            self.t_end = now

        def on_train_end(self, args, state, control, **kw):
            self.training = False

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if self.training:  # the periodic subset evals (the final full eval is timed by train_adapter)
                self.rows.append((state.global_step, (metrics or {})["eval_loss"], self.train_s,
                                  time.perf_counter() - self.t_end))

    def train(spec: GridSpec, params: dict) -> dict:
        values = {**FIXED, **params}
        if spec.budget == FULL:
            tcfg = space_lib.apply(space_lib.full_config(cfg, values),
                                   {"trainer.eval_every": EVAL_EVERY, "trainer.exact_match_items": 0,
                                    "trainer.max_steps": FULL_STEPS})
        else:
            tcfg = space_lib.apply(space_lib.trial_base(cfg), values)
        curve = Curve()
        name = _short(params).replace(",", "_").replace("=", "-")
        m = train_adapter(worker, tcfg, work / spec.study / name, callbacks=[curve], with_baseline=False,
                          save=False, rows_if=lambda loss: False)
        return {"value": m["eval_loss"], "steps": m["steps"], "threads": torch.get_num_threads(),
                "curve": [[s, v] for s, v, _, _ in curve.rows],
                "train_s": [[s, round(t, 3)] for s, _, t, _ in curve.rows],
                "eval_s": [[s, round(e, 3)] for s, _, _, e in curve.rows],
                "final_eval_s": round(m["final_eval_s"], 3) if spec.budget == FULL else 0.0}

    return train
