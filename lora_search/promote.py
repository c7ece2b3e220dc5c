"""Promotion: the best trial's resolved config goes to results/<study>/best.yaml and is trained
with the promotion budget into results/<study>/full/.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from omegaconf import OmegaConf

from lora_search import compose, records, tracking, trial as space_lib
from lora_search.errors import ConfigError
from lora_search.schema import RunConfig
from lora_search.train import train_adapter

log = logging.getLogger(__name__)


def best_config(cfg: RunConfig, best) -> RunConfig:
    """The sweep config with the trial budget, the best trial's params, then the promotion budget."""
    params = best.user_attrs.get("params") or best.params
    trial_cfg = space_lib.apply(space_lib.apply(cfg, dict(cfg.sweep.trial)), params)
    # The full run is measured on every eval row unless the promotion block says otherwise.
    return space_lib.apply(trial_cfg, {"trainer.final_eval": "full", **dict(cfg.sweep.promotion)})


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
    from lora_search.study import best_trial, study_dir

    best = best or best_trial(study)
    if best is None:
        raise ConfigError(f"study {cfg.sweep.name} has no complete trial to promote (all pruned or failed); "
                          "widen sweep.space or raise sweep.n_trials")
    out = Path(out or study_dir(cfg))
    full_cfg = best_config(cfg, best)
    cid = config_id(full_cfg)
    previous = records.read_json(out / "full" / "metrics.json")
    if previous and previous.get("config_id") == cid and not force:
        log.info("promotion of trial #%d already done (%s): skipped", best.number, out / "full")
        return previous
    records.write_config(out / "best.yaml", full_cfg)
    records.write_json(out / "best.json", {"trial": best.number, "value": best.value, "params": best.params,
                                           "metric": cfg.sweep.metric, "config_id": cid})
    log.info("promoting trial #%d (%s %.4f) to a full run of %d steps", best.number, cfg.sweep.metric, best.value,
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
    metrics.update({"config_id": cid, "trial": best.number, "trial_value": best.value,
                    "trial_metric": cfg.sweep.metric, "full_value": metrics.get(cfg.sweep.metric)})
    records.write_config(out / "full" / "config.yaml", full_cfg)
    records.write_json(out / "full" / "metrics.json", metrics)
    records.write_status(out / "full", "complete", trial=best.number)
    tracking.log_dir_artifact(run, out / "full" / "adapter", f"{cfg.sweep.name}-adapter", "model", metrics)
    tracking.finish(run, {**metrics, "status": "complete"}, tags=["complete"])
    log.info("full run: %s %.4f (trial: %.4f)", cfg.sweep.metric, metrics["full_value"], best.value)
    return metrics
