"""The Optuna study: storage, sampler and pruner from the sweep file, and the search stage that
runs pruned trials on one loaded base, recording each in the study and in results/<study>/trials/.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
import sqlalchemy

from lora_search.checks import sweep
from lora_search.checks.run_config import validate
from lora_search.checks.sweep import check_sweep, objective_list
from lora_search.config import samplers
from lora_search.config import space as space_lib
from lora_search.config.schema import RunConfig
from lora_search.core import paired, records
from lora_search.core.errors import ConfigError
from lora_search.scale import dead_workers, slots, storage, workers
from lora_search.scale.slots import StopAt, finished
from lora_search.scale.workers import worker_id
from lora_search.search import failures, interrupts, memory_budget
from lora_search.search.progress import progress_callback
from lora_search.train import tracking
from lora_search.train.pruning import LOGP_MARGIN, PruningCallback, TrialStopped
from lora_search.train.run import prepare_data, train_adapter, trained_on

log = logging.getLogger(__name__)
SAMPLERS, PRUNERS = samplers.SAMPLERS, samplers.PRUNERS
FINISHED = slots.FINISHED  # complete and pruned (slots.finished leaves the infeasible ones out)
METRICS = sweep.METRICS  # what sweep.metric accepts alone
# Keys that change how the data is tokenized (train.data_key), or which base and data a trial gets (pipeline.Workers):
# a space over them has no one copy to prepare up front
DATA_KEYS = {"trainer.max_length", "trainer.packing", "trainer.padding_free", "trainer.gradient_checkpointing"}
RELOAD = ("data.", "model.", "quant.")


def study_dir(cfg: RunConfig) -> Path:
    """results/<study name>/."""
    return Path(cfg.results_dir) / cfg.sweep.name


storage_url = storage.storage_url  # sweep.storage, else $LORA_SEARCH_STORAGE, else results/<study>/study.db
check_storage = storage.check_storage  # opens the storage's connection only: for checks before anything runs


make_sampler, make_pruner = samplers.make_sampler, samplers.make_pruner  # samplers.py


def open_study(cfg: RunConfig) -> optuna.Study:
    """Create or resume the study (one direction per objective), with heartbeats so a dead worker's trial is
    failed and retried; the objectives' names are stored for the dashboard."""
    study_dir(cfg).mkdir(parents=True, exist_ok=True)
    url = storage_url(cfg)
    rdb = storage.open_rdb(cfg, heartbeat_interval=cfg.sweep.heartbeat_s, grace_period=2 * cfg.sweep.heartbeat_s,
                           heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    names, directions = zip(*objective_list(cfg))
    try:
        study = optuna.create_study(study_name=cfg.sweep.name, storage=rdb, load_if_exists=True,
                                    directions=list(directions), sampler=make_sampler(cfg), pruner=make_pruner(cfg))
    except sqlalchemy.exc.SQLAlchemyError as e:  # the server went away between opening and creating
        raise storage.explain(url, e) from None
    stored = [d.name.lower() for d in study.directions]
    if stored != list(directions) or (study.metric_names and list(study.metric_names) != list(names)):
        was = ", ".join(f"{d} {m}" for m, d in zip(study.metric_names or ["?"] * len(stored), stored))
        now = ", ".join(f"{d} {m}" for m, d in zip(names, directions))
        raise ConfigError(f"study {cfg.sweep.name!r} in {records.redact(url)} was created to {was}, but this sweep "
                          f"would {now}; use another sweep.name for other objectives")
    if not study.metric_names:
        study.set_metric_names(list(names))
    return study


def _enqueue(study: optuna.Study, cfg: RunConfig) -> None:
    for params in cfg.sweep.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)


def _record(out: Path, number: int, params: dict, cfg: RunConfig, metrics: dict, status: str, reason, cb) -> None:
    records.write_json(out / "params.json", params)
    records.write_config(out / "config.yaml", cfg)
    values = [{"step": s, "value": v} for s, v in (cb.intermediate if cb else [])]
    extra = {"evals_skipped": cb.skipped} if cb and cb.eval_at is not None else {}
    records.write_json(out / "metrics.json", {**metrics, "intermediate": values, **extra})
    records.write_status(out, status, reason, trial=number)


def _set_attrs(trial: optuna.Trial, metrics: dict, status: str, reason: str | None) -> None:
    keep = ("eval_loss", "perplexity", "exact_match", "rouge_l", "bleu", "train_tokens_per_s", "peak_memory_mb",
            "trainable_params", "adapter_mb", "step_s", "estimated_memory_mb", "memory_budget_mb", "over_budget",
            "wall_s", "steps", "exact_match_s", "base_model", "base_quant", "base_dtype", "train_rows",
            "eval_data_rows", "eval_rows", "method", "reward_accuracy", "reward_margin", "preference_accuracy",
            "logp_margin", "eval_loss_se", "eval_loss_rows", "exact_match_n",  # these three: stats.score_interval
            # online RL (trainer=grpo / rloo): the held-out greedy reward and KL, and the training curves' summaries
            "reward", "reward_std", "kl", "base_reward", "train_reward_first", "train_reward_last", "train_kl_max",
            "train_clip_fraction_mean", "train_entropy_last", "train_completion_length_mean",
            # per-row scores with the fingerprint of their rows: the report's paired comparison (core/paired.ROWS)
            *[k for rows in dict.fromkeys(paired.ROWS.values()) for k in (rows, paired.fingerprint_key(rows))])
    for key in keep:
        if key in metrics:
            trial.set_user_attr(key, metrics[key])
    trial.set_user_attr("status", status)
    # always: a retried trial starts with its original's user attrs; masked: an error's text may hold a secret
    trial.set_user_attr("reason", records.redact(reason) if reason else reason)


def pruning_metric(cfg: RunConfig, metric: str) -> str:
    """The periodic eval's value the pruner compares: the eval loss; for a DPO study aiming at preference accuracy,
    the eval pairs' mean log-probability margin (a DPO loss is rescaled by beta and the loss type, and TRL's reward
    accuracy, against the reference, saturates at 1 within a few steps), at reward accuracy or margin, those."""
    if cfg.trainer.method == "dpo" and metric in ("reward_accuracy", "preference_accuracy", "reward_margin"):
        return {"reward_margin": "eval_rewards/margins", "reward_accuracy": "eval_rewards/accuracies"}.get(
            metric, LOGP_MARGIN)
    return "eval_loss"


def objective_fn(cfg: RunConfig, get_worker):
    """The Optuna objective: sample, apply, check the memory budget, get the base and data the trial's config names,
    train with pruning, record, return the objective value(s). get_worker(config) -> a Worker (pipeline.Workers.get)."""
    base_cfg = space_lib.trial_base(cfg)
    names = [m for m, _ in objective_list(cfg)]
    several = len(names) > 1
    maximize = cfg.sweep.direction == "maximize"
    lengths = {}
    if not any(k in DATA_KEYS or k.startswith(RELOAD) for k in cfg.sweep.space):  # else tokenized in first use
        prepare_data(get_worker(base_cfg), base_cfg)
        lengths = memory_budget.worker_lengths(get_worker(base_cfg), base_cfg)
    estimator = memory_budget.Estimator(cfg.cache_dir, lengths)

    def objective(trial: optuna.Trial):
        try:  # several workers: train only when the study has room for this trial (progress.py, slots)
            slots.admit(trial.study, trial, cfg.sweep.n_trials, study_dir(cfg))
        except slots.NotNeeded as e:
            trial.set_user_attr("worker", worker_id())
            _set_attrs(trial, {}, slots.NOT_NEEDED, str(e))
            raise RuntimeError(str(e)) from None
        t0 = time.perf_counter()
        params = space_lib.suggest(trial, cfg.sweep.space)
        out = study_dir(cfg) / "trials" / f"{trial.number:04d}"
        trial_cfg = space_lib.apply(base_cfg, params)
        trial.set_user_attr("params", params)
        trial.set_user_attr("worker", worker_id())
        if cfg.sweep.nightly.night:
            trial.set_user_attr("night", cfg.sweep.nightly.night)
        # several objectives: Optuna's pruners are single-objective, so evals are recorded, never reported
        callback = PruningCallback(trial, pruning_metric(trial_cfg, cfg.sweep.metric), maximize=maximize,
                                   pruner=cfg.sweep.pruner, report=not several)
        watch = failures.StepWatch()  # where a failure happened
        run = tracking.start(trial_cfg, study_dir(cfg), f"trial-{trial.number:04d}", "trial",
                             {"params": params, "trial": trial.number, "worker": worker_id()})
        status, reason, metrics, used, memo = "failed", "interrupted before the trial finished", {}, {}, {}
        try:
            validate(trial_cfg)
            memo = memory_budget.before_training(trial, trial_cfg, estimator)  # Infeasible: recorded, not trained
            worker = get_worker(trial_cfg)
            used = trained_on(worker)  # recorded whatever the trial's outcome
            # a trial that trains the promotion's run (all but when it is scored) keeps its adapter: promotion reuses it
            keep = space_lib.same_training(trial_cfg, space_lib.full_config(cfg, params))
            metrics = train_adapter(worker, trial_cfg, out, callbacks=[callback, tracking.StepLogger(run), watch],
                                    with_baseline=False, save=keep)
            values = [metrics.get(m) for m in names]
            bad = [f"{m} is {v!r}" for m, v in zip(names, values) if not space_lib.finite(v)]
            status, reason = ("failed", "; ".join(bad)) if bad else ("complete", None)
            # trained, but over the budget when measured: kept complete, infeasible by its constraint (never best)
            metrics["over_budget"] = memory_budget.after_training(trial, trial_cfg, memo, metrics.get("peak_memory_mb"))
        except memory_budget.Infeasible as skip:
            memo, metrics = skip.figures, {**metrics, "wall_s": time.perf_counter() - t0}
            status, reason = slots.INFEASIBLE, skip.reason
            raise
        except TrialStopped as stop:
            metrics = {"wall_s": time.perf_counter() - t0, "pruned_at_step": stop.step}
            status, reason = "pruned", stop.reason
            raise
        except Exception as e:  # any error fails this trial only (optimize's catch); its frames' memory is freed
            metrics = {"wall_s": time.perf_counter() - t0, **failures.failure(trial, e, watch)}
            reason = f"{type(e).__name__}: {e}"
            # with a memory budget: recorded infeasible, and the estimates corrected (without one: a failure)
            if memo.get("memory_budget_mb") is not None and memory_budget.is_out_of_memory(e):
                status, reason = slots.INFEASIBLE, (skip := memory_budget.out_of_memory(trial, memo, e)).reason
                raise skip from None
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (interrupts.Interrupted): optuna marks the trial FAIL and re-raises
            metrics, reason = {"wall_s": time.perf_counter() - t0}, interrupts.INTERRUPTED
            raise
        finally:
            _record(out, trial.number, params, trial_cfg, {**used, **memo, **metrics}, status, reason, callback)
            _set_attrs(trial, {**used, **memo, **metrics}, status, reason)
            tracking.finish(run, {**memo, **metrics, "status": status, "reason": reason or ""}, tags=[status, reason],
                            exit_code=0 if status != "failed" else 1)
        if reason:
            raise RuntimeError(reason)
        return [float(v) for v in values] if several else float(values[0])

    return objective


def search_stage(cfg: RunConfig, get_worker, overrides: list[str] = ()) -> optuna.Study:
    """Run trials until the study has n_trials finished ones (or the timeout); resumes a stored study.

    With sweep.workers > 1, as many worker processes share the study (one per GPU where there are GPUs).
    """
    check_sweep(cfg)
    study = open_study(cfg)
    dead_workers.fail_dead_workers(study, study_dir(cfg))  # trials left RUNNING by a killed worker on this machine
    storage.check_sharing(study, storage_url(cfg))  # SQLite is not shared by several machines
    done = len(finished(study))
    if done >= cfg.sweep.n_trials:
        log.info("study %s already has %d finished trials (n_trials=%d): nothing to search", cfg.sweep.name, done,
                 cfg.sweep.n_trials)
        slots.drop_retries(study)
        return study
    _enqueue(study, cfg)
    log.info("study %s: %d of %d trials finished; storage %s", cfg.sweep.name, done, cfg.sweep.n_trials,
             records.redact(storage_url(cfg)))
    procs = workers.spawn(list(overrides), cfg.sweep.workers, study_dir(cfg) / "workers") if cfg.sweep.workers > 1 else []
    limit = failures.FailureLimit(cfg.sweep.max_failures)
    # configurations over the memory budget in a row that stop the sweep (each costs an estimate, not a run)
    unreachable = memory_budget.InfeasibleLimit(max(20, 2 * cfg.sweep.n_trials))
    if len(objective_list(cfg)) > 1 and samplers.spec(cfg.sweep.pruner).get("type") != "none":
        log.info("several objectives: Optuna's pruners are single-objective, so sweep.pruner is not used (a diverging "
                 "trial still stops)")
    with interrupts.stopping(study, study_dir(cfg), procs):  # interrupted or failing: records kept, workers stopped
        objective = objective_fn(cfg, get_worker)  # loads the base and tokenizes the data before the first trial
        started = time.perf_counter()
        deadline = time.monotonic() + cfg.sweep.timeout_s if cfg.sweep.timeout_s else None
        stop_at = StopAt(cfg.sweep.n_trials, study_dir(cfg), deadline)
        if slots.wait_for_slot(study, cfg.sweep.n_trials, study_dir(cfg), deadline=deadline):
            study.optimize(
                objective,
                timeout=cfg.sweep.timeout_s,
                callbacks=[stop_at, progress_callback(cfg, started, done), limit, unreachable],
                catch=(Exception,),  # any error fails its trial only; KeyboardInterrupt and SystemExit end the sweep
                gc_after_trial=False,  # train_adapter already collects once per trial
            )
        else:
            log.info("study %s: the other workers' trials filled it: nothing left to search", cfg.sweep.name)
        limit.check()
        unreachable.check(cfg.sweep.memory_budget_mb)
    workers.wait(procs)
    if len(finished(study)) >= cfg.sweep.n_trials:
        slots.drop_retries(study)
    return study


def best_trial(study: optuna.Study):
    """The best complete (and feasible) trial of a single-objective study, or None."""
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None
