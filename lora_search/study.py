"""The Optuna study: storage, sampler and pruner from the sweep file, and the search stage that
runs pruned trials on one loaded base, recording each in the study and in results/<study>/trials/.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

from lora_search import guard, launch, records, storage, tracking, trial as space_lib
from lora_search.launch import worker_id
from lora_search.errors import ConfigError
from lora_search.pruning import LOGP_MARGIN, PruningCallback, TrialStopped
from lora_search.schema import METRIC_DIRECTIONS, PREFERENCE_METRICS, RunConfig
from lora_search.train import prepare_data, train_adapter, trained_on
from lora_search.validate import validate

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
METRICS = tuple(METRIC_DIRECTIONS)  # eval_loss, perplexity, exact_match, train_tokens_per_s
# Keys that change how the data is tokenized (train.data_key), or which base and data a trial gets (pipeline.Workers):
# a space over them has no one copy to prepare up front
DATA_KEYS = {"trainer.max_length", "trainer.packing", "trainer.padding_free", "trainer.gradient_checkpointing"}
RELOAD = ("data.", "model.", "quant.")


def study_dir(cfg: RunConfig) -> Path:
    """results/<study name>/."""
    return Path(cfg.results_dir) / cfg.sweep.name


storage_url = storage.storage_url  # sweep.storage, else $LORA_SEARCH_STORAGE, else results/<study>/study.db
check_storage = storage.check_storage  # opens the storage's connection only: for checks before anything runs


def _build(kind_map: dict, spec, what: str, accepted: tuple):
    spec = {"type": spec} if isinstance(spec, str) else dict(spec)
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    kind = spec.get("type")
    if kind not in kind_map:
        raise ConfigError(f"sweep.{what}.type must be one of {', '.join(accepted)}; got {kind!r}")
    try:
        return kind_map[kind](**kwargs)
    except TypeError as e:
        raise ConfigError(f"sweep.{what} ({kind}): {e}") from None


def make_sampler(cfg: RunConfig):
    """The Optuna sampler the sweep file names."""
    space = cfg.sweep.space

    def grid(**kw):
        bad = [k for k, d in space.items() if d["type"] != "categorical"]
        if bad:
            raise ConfigError(f"sweep.sampler grid needs categorical entries; not categorical: {', '.join(bad)}")
        return optuna.samplers.GridSampler({k: list(d["choices"]) for k, d in space.items()}, **kw)

    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler, "grid": grid,
             "cmaes": optuna.samplers.CmaEsSampler}
    return _build(kinds, cfg.sweep.sampler, "sampler", SAMPLERS)


def make_pruner(cfg: RunConfig):
    """The Optuna pruner the sweep file names."""
    kinds = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
             "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    return _build(kinds, cfg.sweep.pruner, "pruner", PRUNERS)


def check_sweep(cfg: RunConfig) -> None:
    """Every problem with the sweep file, raised once, before anything trains."""
    s = cfg.sweep
    problems = space_lib.check_space(s.space) + space_lib.check_inits(cfg) + guard.check(s)
    own = METRIC_DIRECTIONS.get(s.metric)
    if s.direction not in ("minimize", "maximize", "auto"):
        problems.append(f"sweep.direction must be auto (the metric's), minimize or maximize; got {s.direction!r}")
    elif own and s.direction not in (own, "auto"):
        problems.append(f"sweep.direction={s.direction} contradicts sweep.metric={s.metric}, which is {own[:-1]}ed; "
                        f"leave sweep.direction out (auto) or set it to {own}")
    if s.metric not in METRICS:
        problems.append(f"sweep.metric must be one of {', '.join(METRICS)}; got {s.metric!r}")
    problems += _method_problems(cfg)
    if s.metric == "exact_match" and not cfg.data.exact_match:
        problems.append(f"sweep.metric=exact_match needs data with exact answers (data.exact_match), data={cfg.data.name}")
    items = s.trial.get("trainer.exact_match_items", s.exact_match_items)
    if s.metric == "exact_match" and not (isinstance(items, int) and items > 0):
        where = "sweep.trial's trainer.exact_match_items" if "trainer.exact_match_items" in s.trial else \
            "sweep.exact_match_items"
        problems.append(f"sweep.metric=exact_match needs eval items answered in every trial; {where} is {items!r} "
                        "(a positive integer: sweep.exact_match_items, default 16)")
    if not isinstance(s.n_trials, int) or s.n_trials < 1:
        problems.append(f"sweep.n_trials must be a positive integer, got {s.n_trials!r}")
    if s.nightly.enabled:
        from lora_search import nightly

        problems.extend(nightly.check(s.nightly))
    if s.timeout_s is not None and s.timeout_s <= 0:
        problems.append(f"sweep.timeout_s must be positive or null, got {s.timeout_s!r}")
    if not isinstance(s.heartbeat_s, int) or isinstance(s.heartbeat_s, bool) or s.heartbeat_s < 1:
        problems.append(f"sweep.heartbeat_s must be a positive integer (seconds between a worker's heartbeats), "
                        f"got {s.heartbeat_s!r}")
    for part in ("trial", "promotion"):
        problems.extend(f"sweep.{part}: {p}" for k in getattr(s, part) if (p := space_lib.compose.check_key(k)))
    for entry in s.enqueue:
        problems.extend(f"sweep.enqueue: {p}" for k in entry if (p := space_lib.compose.check_key(k)))
    if problems:
        raise ConfigError(problems)
    for maker in (make_sampler, make_pruner):
        maker(cfg)
    trial_cfg = space_lib.trial_base(cfg)
    for corner in space_lib.corners(s.space) + [dict(e) for e in s.enqueue]:
        try:
            validate(space_lib.apply(trial_cfg, corner))
        except ConfigError as e:
            problems.extend(f"sweep.space allows {k}={v!r}, which is invalid: {p}" for k, v in corner.items()
                            for p in e.problems)
    if problems:
        raise ConfigError(sorted(set(problems)))


def _method_problems(cfg: RunConfig) -> list[str]:
    """The objective and the space against the trainer: preference metrics need dpo, perplexity needs sft, and a
    starting adapter fixes the LoRA structure."""
    from lora_search.adapters import FIXED_BY_START

    s = cfg.sweep
    try:
        t = space_lib.trial_base(cfg).trainer
    except ConfigError:  # a bad key in sweep.trial: check_sweep reports it
        return []
    problems = []
    if s.metric in PREFERENCE_METRICS and t.method != "dpo":
        problems.append(f"sweep.metric={s.metric} is measured on preference pairs by trainer=dpo; this sweep trains "
                        f"with trainer={t.method} (use eval_loss, perplexity or exact_match)")
    scaling = [k for k in s.space if k in ("trainer.beta", "trainer.loss_type", "trainer.label_smoothing")]
    if s.metric == "eval_loss" and t.method == "dpo" and scaling:
        problems.append(f"sweep.metric=eval_loss compares DPO losses, which {', '.join(scaling)} rescale(s): trials "
                        "are not comparable on it; use sweep.metric=preference_accuracy or reward_accuracy")
    if s.metric == "perplexity" and t.method == "dpo":
        problems.append("sweep.metric=perplexity is not measured by trainer=dpo; use eval_loss (the DPO loss), "
                        f"{', '.join(PREFERENCE_METRICS)}")
    if t.init_adapter:
        fixed = [k for k in s.space if k in FIXED_BY_START]
        if fixed:
            problems.append(f"sweep.space: {', '.join(fixed)} cannot be swept with trainer.init_adapter="
                            f"{t.init_adapter}: the starting adapter fixes its rank, scaling and targets; sweep "
                            "lora.dropout, trainer.* keys (beta, learning_rate, ...) or leave init_adapter out")
    return problems


def open_study(cfg: RunConfig) -> optuna.Study:
    """Create or resume the study, with heartbeats so a dead worker's trial is failed and retried."""
    study_dir(cfg).mkdir(parents=True, exist_ok=True)
    url = storage_url(cfg)
    rdb = storage.open_rdb(cfg, heartbeat_interval=cfg.sweep.heartbeat_s, grace_period=2 * cfg.sweep.heartbeat_s,
                           heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    try:
        study = optuna.create_study(study_name=cfg.sweep.name, storage=rdb, load_if_exists=True,
                                    direction=cfg.sweep.direction, sampler=make_sampler(cfg), pruner=make_pruner(cfg))
    except sqlalchemy.exc.SQLAlchemyError as e:  # the server went away between opening and creating
        raise storage.explain(url, e) from None
    if study.direction.name.lower() != cfg.sweep.direction:
        raise ConfigError(f"study {cfg.sweep.name!r} in {records.redact(url)} was created to "
                          f"{study.direction.name.lower()}, but sweep.direction={cfg.sweep.direction}")
    return study


def finished(study: optuna.Study) -> list:
    """Trials that count toward n_trials."""
    return study.get_trials(deepcopy=False, states=FINISHED)


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
    keep = ("eval_loss", "perplexity", "exact_match", "train_tokens_per_s", "peak_memory_mb", "trainable_params",
            "wall_s", "steps", "exact_match_s", "base_model", "base_quant", "base_dtype", "train_rows", "eval_data_rows",
            "eval_rows", "method", "reward_accuracy", "reward_margin", "preference_accuracy", "logp_margin")
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
    """The Optuna objective: sample, apply, get the base and data the trial's config names, train with pruning,
    record, return the metric. get_worker(config) -> a Worker (pipeline.Workers.get)."""
    base_cfg = space_lib.trial_base(cfg)
    maximize = cfg.sweep.direction == "maximize"
    if not any(k in DATA_KEYS or k.startswith(RELOAD) for k in cfg.sweep.space):  # else tokenized in first use
        prepare_data(get_worker(base_cfg), base_cfg)

    def objective(trial: optuna.Trial) -> float:
        t0 = time.perf_counter()
        params = space_lib.suggest(trial, cfg.sweep.space)
        out = study_dir(cfg) / "trials" / f"{trial.number:04d}"
        trial_cfg = space_lib.apply(base_cfg, params)
        trial.set_user_attr("params", params)
        trial.set_user_attr("worker", worker_id())
        if cfg.sweep.nightly.night:
            trial.set_user_attr("night", cfg.sweep.nightly.night)
        callback = PruningCallback(trial, pruning_metric(trial_cfg, cfg.sweep.metric), maximize=maximize,
                                   pruner=cfg.sweep.pruner)
        watch = guard.StepWatch()  # where a failure happened
        run = tracking.start(trial_cfg, study_dir(cfg), f"trial-{trial.number:04d}", "trial",
                             {"params": params, "trial": trial.number, "worker": worker_id()})
        status, reason, metrics, used = "failed", "interrupted before the trial finished", {}, {}
        try:
            validate(trial_cfg)
            worker = get_worker(trial_cfg)
            used = trained_on(worker)  # recorded whatever the trial's outcome
            metrics = train_adapter(worker, trial_cfg, out, callbacks=[callback, tracking.StepLogger(run), watch],
                                    with_baseline=False, save=False)
            value = metrics.get(cfg.sweep.metric)
            status = "complete" if space_lib.finite(value) else "failed"
            reason = None if status == "complete" else f"{cfg.sweep.metric} is {value!r}"
        except TrialStopped as stop:
            metrics = {"wall_s": time.perf_counter() - t0, "pruned_at_step": stop.step}
            status, reason = "pruned", stop.reason
            raise
        except Exception as e:  # any error fails this trial only (optimize's catch); its frames' memory is freed
            metrics = {"wall_s": time.perf_counter() - t0, **guard.failure(trial, e, watch)}
            reason = f"{type(e).__name__}: {e}"
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (guard.Interrupted): optuna marks the trial FAIL and re-raises
            metrics, reason = {"wall_s": time.perf_counter() - t0}, guard.INTERRUPTED
            raise
        finally:
            _record(out, trial.number, params, trial_cfg, {**used, **metrics}, status, reason, callback)
            _set_attrs(trial, {**used, **metrics}, status, reason)
            tracking.finish(run, {**metrics, "status": status, "reason": reason or ""}, tags=[status, reason],
                            exit_code=0 if status != "failed" else 1)
        if reason:
            raise RuntimeError(reason)
        return float(value)

    return objective


def progress_callback(cfg: RunConfig, started: float, done_before: int):
    """Log one line per finished trial: its params, metric, state, the best so far and time left."""
    def callback(study: optuna.Study, frozen) -> None:
        n_done = len(finished(study))
        state = frozen.state.name.lower()
        if frozen.state == TrialState.COMPLETE:
            value = f"{cfg.sweep.metric} {frozen.value:.4f}"
        else:
            value = frozen.user_attrs.get("reason", state)
        params = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in frozen.params.items())
        ran = n_done - done_before
        per_trial = (time.perf_counter() - started) / max(ran, 1)
        left = max(cfg.sweep.n_trials - n_done, 0) * per_trial
        if cfg.sweep.timeout_s:
            left = min(left, max(cfg.sweep.timeout_s - (time.perf_counter() - started), 0))
        best = ""
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


def search_stage(cfg: RunConfig, get_worker, overrides: list[str] = ()) -> optuna.Study:
    """Run trials until the study has n_trials finished ones (or the timeout); resumes a stored study.

    With sweep.workers > 1, as many worker processes share the study (one per GPU where there are GPUs).
    """
    check_sweep(cfg)
    study = open_study(cfg)
    guard.fail_dead_workers(study, study_dir(cfg))  # trials left RUNNING by a killed worker on this machine
    done = len(finished(study))
    if done >= cfg.sweep.n_trials:
        log.info("study %s already has %d finished trials (n_trials=%d): nothing to search", cfg.sweep.name, done,
                 cfg.sweep.n_trials)
        return study
    _enqueue(study, cfg)
    log.info("study %s: %d of %d trials finished; storage %s", cfg.sweep.name, done, cfg.sweep.n_trials,
             records.redact(storage_url(cfg)))
    procs = launch.spawn(list(overrides), cfg.sweep.workers, study_dir(cfg) / "workers") if cfg.sweep.workers > 1 else []
    limit = guard.FailureLimit(cfg.sweep.max_failures)
    with guard.stopping(study, study_dir(cfg), procs):  # interrupted or failing: records kept, workers stopped
        objective = objective_fn(cfg, get_worker)  # loads the base and tokenizes the data before the first trial
        started = time.perf_counter()
        study.optimize(
            objective,
            timeout=cfg.sweep.timeout_s,
            callbacks=[optuna.study.MaxTrialsCallback(cfg.sweep.n_trials, states=FINISHED),
                       progress_callback(cfg, started, done), limit],
            catch=(Exception,),  # any error fails its trial only; KeyboardInterrupt and SystemExit end the sweep
            gc_after_trial=False,  # train_adapter already collects once per trial
        )
        limit.check()
    launch.wait(procs)
    return study


def best_trial(study: optuna.Study):
    """The best complete trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None
