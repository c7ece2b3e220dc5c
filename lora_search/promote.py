"""Promotion: the best trial's resolved config goes to results/<study>/best.yaml and is trained
with the promotion budget into results/<study>/full/.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from omegaconf import OmegaConf

from optuna.trial import TrialState

from lora_search import compose, pareto, records, tracking, trial as space_lib
from lora_search.errors import ConfigError
from lora_search.schema import RunConfig
from lora_search.train import train_adapter

log = logging.getLogger(__name__)


def best_config(cfg: RunConfig, best) -> RunConfig:
    """The sweep config with the trial budget, the best trial's params, then the promotion budget."""
    params = best.user_attrs.get("params") or best.params
    trial_cfg = space_lib.apply(space_lib.apply(cfg, dict(cfg.sweep.trial)), params)
    # The full run is measured on every eval row unless the promotion block says otherwise.
    overrides = {k: v for k, v in cfg.sweep.promotion.items() if k != "select"}  # select: the rule, not a key
    return space_lib.apply(trial_cfg, {"trainer.final_eval": "full", **overrides})


def choose(cfg: RunConfig, study) -> tuple[object, dict]:
    """The trial to promote and how it was chosen: the best trial, or, with several objectives or a
    sweep.promotion.select rule, the rule applied to the Pareto front (feasible trials only), with each other
    candidate's reason for losing. (None, {}) when no trial is complete."""
    from lora_search.study import best_trial, objective_list

    objectives = objective_list(cfg)
    names = [m for m, _ in objectives]
    rule = cfg.sweep.promotion.get("select")
    if len(names) == 1 and not rule:
        best = best_trial(study)
        return best, ({"rule": None, "rule_text": pareto.describe(None, objectives[0]), "chosen": best.number,
                       "candidates": []} if best else {})
    if len(names) > 1:
        pool = study.best_trials  # the Pareto front, feasible trials only
    else:
        from optuna.study._constrained_optimization import _get_feasible_trials

        pool = _get_feasible_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not pool:
        return None, {}
    chosen, lost = pareto.select(pool, names, rule, objectives[0])
    candidates = [{"trial": t.number, "values": pareto.values(t, names), "params": t.params,
                   "outcome": "chosen" if t is chosen else lost.get(t.number, "")} for t in pool]
    return chosen, {"rule": rule, "rule_text": pareto.describe(rule, objectives[0]), "chosen": chosen.number,
                    "front" if len(names) > 1 else "candidates": candidates}


def primary_value(cfg: RunConfig, trial) -> float | None:
    """A trial's value of sweep.metric (with several objectives, that objective's)."""
    from lora_search.study import objective_list

    names = [m for m, _ in objective_list(cfg)]
    return pareto.values(trial, names).get(cfg.sweep.metric, trial.user_attrs.get(cfg.sweep.metric))


def config_id(cfg: RunConfig) -> str:
    """A short hash of a resolved config: later stages record which promoted run they came from."""
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(records.config_dict(cfg))).encode()).hexdigest()[:12]


def load_best(study_dir: Path) -> RunConfig:
    """The promoted config from best.yaml (for re-running a later stage from what is on disk)."""
    path = study_dir / "best.yaml"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run the search (stage=search or stage=all) first")
    node = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    return compose.to_run_config(node)


def promote_stage(cfg: RunConfig, study, get_worker, force: bool = False, out: Path | None = None,
                  best=None) -> dict:
    """Write best.yaml and train the best (or the given) trial's config with the promotion budget into
    out (default results/<study>/); skipped when already done."""
    from lora_search.study import study_dir

    selection = {}
    if best is None:
        best, selection = choose(cfg, study)
    if best is None:
        raise ConfigError(f"study {cfg.sweep.name} has no complete trial to promote (all pruned, failed or over "
                          "the memory budget); widen sweep.space, raise sweep.n_trials or sweep.memory_budget_mb")
    out = Path(out or study_dir(cfg))
    full_cfg = best_config(cfg, best)
    cid = config_id(full_cfg)
    previous = records.read_json(out / "full" / "metrics.json")
    if previous and previous.get("config_id") == cid and not force:
        log.info("promotion of trial #%d already done (%s): skipped", best.number, out / "full")
        return previous
    value = primary_value(cfg, best)
    why = f"chosen by {'sweep.promotion.select' if selection.get('rule') else 'the default rule'}: " \
          f"{selection.get('rule_text')}" if selection else "given"
    records.write_config(out / "best.yaml", full_cfg, header=f"promoted: trial #{best.number}, {why}\n"
                         "the other candidates and why they lost: best.json (selection) and report.md")
    records.write_json(out / "best.json", {"trial": best.number, "value": value, "params": best.params,
                                           "metric": cfg.sweep.metric, "values": _values(cfg, best),
                                           "config_id": cid, "selection": selection})
    log.info("promoting trial #%d (%s %.4f; %s) to a full run of %d steps", best.number, cfg.sweep.metric, value, why,
             full_cfg.trainer.max_steps)
    records.write_status(out / "full", "running", trial=best.number)
    run = tracking.start(full_cfg, study_dir(cfg), f"full-trial-{best.number:04d}", "full",
                         {"params": best.user_attrs.get("params") or best.params, "trial": best.number})
    try:
        metrics = train_adapter(get_worker(), full_cfg, out / "full", callbacks=[tracking.StepLogger(run)],
                                with_baseline=False)
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        records.write_status(out / "full", "failed", reason, trial=best.number)
        tracking.finish(run, {"status": "failed"}, tags=["failed", reason], exit_code=1)
        raise
    metrics.update({"config_id": cid, "trial": best.number, "trial_value": value,
                    "trial_metric": cfg.sweep.metric, "full_value": metrics.get(cfg.sweep.metric)})
    records.write_config(out / "full" / "config.yaml", full_cfg)
    records.write_json(out / "full" / "metrics.json", metrics)
    records.write_status(out / "full", "complete", trial=best.number)
    tracking.log_dir_artifact(run, out / "full" / "adapter", f"{cfg.sweep.name}-adapter", "model", metrics)
    tracking.finish(run, {**metrics, "status": "complete"}, tags=["complete"])
    log.info("full run: %s %.4f (trial: %.4f)", cfg.sweep.metric, metrics["full_value"], value)
    return metrics


def _values(cfg: RunConfig, trial) -> dict:
    from lora_search.study import objective_list

    return pareto.values(trial, [m for m, _ in objective_list(cfg)])
