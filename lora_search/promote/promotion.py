"""Promotion: the best trial's resolved config goes to results/<study>/best.yaml and is trained
with the promotion budget into results/<study>/full/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import statistics
from pathlib import Path

from omegaconf import OmegaConf
from optuna.study._constrained_optimization import _get_feasible_trials
from optuna.trial import TrialState

from lora_search.config import compose, objectives
from lora_search.config import space as space_lib
from lora_search.config.promotion_settings import SEEDS, TOP_K
from lora_search.config.schema import RunConfig
from lora_search.core import records, stats
from lora_search.core.errors import ConfigError, RunDiverged
from lora_search.promote import weights
from lora_search.search.study import best_trial, objective_list, study_dir
from lora_search.train import tracking
from lora_search.train.run import train_adapter

log = logging.getLogger(__name__)


def best_config(cfg: RunConfig, best) -> RunConfig:
    """The sweep config with the trial budget, the best trial's params, then the promotion budget."""
    return space_lib.full_config(cfg, best.user_attrs.get("params") or best.params)


def _reused(cfg: RunConfig, trial, full_cfg: RunConfig, folder: Path, study_folder: Path) -> dict | None:
    """The trial's own run as this full run, when the trial trained exactly it (same config but for when it was
    scored, same seed) and kept its adapter: copied into folder, nothing trained again. None otherwise."""
    trial_dir = study_folder / "trials" / f"{trial.number:04d}"
    done = records.read_json(trial_dir / "metrics.json")
    params = trial.user_attrs.get("params") or trial.params
    if trial.state != TrialState.COMPLETE or not done or not (trial_dir / "adapter").is_dir() or \
            not space_lib.same_training(space_lib.apply(space_lib.trial_base(cfg), params), full_cfg):
        return None
    if (folder / "adapter").exists():
        shutil.rmtree(folder / "adapter")
    shutil.copytree(trial_dir / "adapter", folder / "adapter")
    log.info("full run of trial #%d, seed %d: the trial trained the promotion budget; its adapter and metrics are "
             "reused (nothing trained again)", trial.number, full_cfg.trainer.seed)
    return {k: v for k, v in done.items() if k != "intermediate"} | {"reused_trial": trial.number}


def choose(cfg: RunConfig, study) -> tuple[object, dict]:
    """The trial to promote and how it was chosen: the best trial, or, with several objectives or a
    sweep.promotion.select rule, the rule applied to the Pareto front (feasible trials only), with each other
    candidate's reason for losing. (None, {}) when no trial is complete."""
    pairs = objective_list(cfg)
    names = [m for m, _ in pairs]
    rule = cfg.sweep.promotion.get("select")
    if len(names) == 1 and not rule:
        best = best_trial(study)
        return best, ({"rule": None, "rule_text": objectives.describe(None, pairs[0]), "chosen": best.number,
                       "candidates": []} if best else {})
    if len(names) > 1:
        pool = study.best_trials  # the Pareto front, feasible trials only
    else:
        pool = _get_feasible_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not pool:
        return None, {}
    chosen, lost = objectives.select(pool, names, rule, pairs[0])
    candidates = [{"trial": t.number, "values": objectives.values(t, names), "params": t.params,
                   "outcome": "chosen" if t is chosen else lost.get(t.number, "")} for t in pool]
    return chosen, {"rule": rule, "rule_text": objectives.describe(rule, pairs[0]), "chosen": chosen.number,
                    "front" if len(names) > 1 else "candidates": candidates}


def primary_value(cfg: RunConfig, trial) -> float | None:
    """A trial's value of sweep.metric (with several objectives, that objective's)."""
    names = [m for m, _ in objective_list(cfg)]
    return objectives.values(trial, names).get(cfg.sweep.metric, trial.user_attrs.get(cfg.sweep.metric))


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




def settings(cfg: RunConfig) -> tuple[int, int]:
    """(top_k, seeds) from sweep.promotion (checked by sweepcheck: positive integers)."""
    p = cfg.sweep.promotion
    return int(p.get("top_k", TOP_K)), int(p.get("seeds", SEEDS))


def _params_key(trial) -> str:
    return json.dumps(trial.user_attrs.get("params") or trial.params, sort_keys=True, default=str)


def candidates(cfg: RunConfig, study, best, pool=None) -> list:
    """The trials to re-train at the promotion budget: `best` first, then the next best complete (feasible) trials
    with other params, top_k in all. One objective and no promotion rule only: a rule or a Pareto front already
    picks its one trial by what it states."""
    k, _ = settings(cfg)
    if k <= 1 or len(objective_list(cfg)) > 1 or cfg.sweep.promotion.get("select"):
        return [best]
    if pool is None:
        pool = _get_feasible_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    maximize = cfg.sweep.direction == "maximize"
    ranked = sorted((t for t in pool if t.value is not None and math.isfinite(t.value)),
                    key=lambda t: (-t.value if maximize else t.value, t.number))
    chosen, seen = [best], {_params_key(best)}
    for t in ranked:
        if len(chosen) >= k:
            break
        if _params_key(t) not in seen:
            chosen.append(t)
            seen.add(_params_key(t))
    return chosen


def _run(cfg: RunConfig, trial, seed: int, folder: Path, get_worker, force: bool, study_folder: Path) -> dict:
    """One full run of a trial's config with one training seed into folder (skipped when done for this config)."""
    full_cfg = space_lib.apply(best_config(cfg, trial), {"trainer.seed": seed})
    cid = config_id(full_cfg)
    previous = records.read_json(folder / "metrics.json")
    if previous and previous.get("config_id") == cid and (folder / "adapter").is_dir() and not force:
        log.info("full run of trial #%d, seed %d already done: skipped", trial.number, seed)
        return previous
    value = primary_value(cfg, trial)
    reused = _reused(cfg, trial, full_cfg, folder, study_folder)
    if reused is not None:
        reused.update({"config_id": cid, "trial": trial.number, "seed": seed, "trial_value": value,
                       "trial_metric": cfg.sweep.metric, "full_value": reused.get(cfg.sweep.metric)})
        records.write_config(folder / "config.yaml", full_cfg)
        records.write_json(folder / "metrics.json", reused)
        records.write_status(folder, "complete", trial=trial.number)
        return reused
    log.info("full run of trial #%d (%s %.4f in its trial), seed %d: %d steps", trial.number, cfg.sweep.metric,
             value, seed, full_cfg.trainer.max_steps)
    records.write_status(folder, "running", trial=trial.number)
    name = f"full-trial-{trial.number:04d}" + ("" if seed == cfg.trainer.seed else f"-seed{seed}")
    run = tracking.start(full_cfg, study_folder, name, "full",
                         {"params": trial.user_attrs.get("params") or trial.params, "trial": trial.number,
                          "seed": seed})
    try:
        metrics = train_adapter(get_worker(full_cfg), full_cfg, folder, callbacks=[tracking.StepLogger(run)],
                                with_baseline=False)
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        records.write_status(folder, "failed", reason, trial=trial.number)
        tracking.finish(run, {"status": "failed"}, tags=["failed", reason], exit_code=1)
        raise
    metrics.update({"config_id": cid, "trial": trial.number, "seed": seed, "trial_value": value,
                    "trial_metric": cfg.sweep.metric, "full_value": metrics.get(cfg.sweep.metric)})
    records.write_config(folder / "config.yaml", full_cfg)
    records.write_json(folder / "metrics.json", metrics)
    status = "failed" if metrics.get("diverged") else "complete"  # a diverged full run: its NaN score never wins
    records.write_status(folder, status, metrics.get("diverged"), trial=trial.number)
    tracking.finish(run, {**metrics, "status": status}, tags=[status] + (["diverged"] if metrics.get("diverged") else []),
                    exit_code=1 if metrics.get("diverged") else 0)
    return metrics


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {"full_values": values, "full_mean": statistics.fmean(finite) if finite else None,
            "full_sd": statistics.stdev(finite) if len(finite) > 1 else None}


def agreement(cfg: RunConfig, rows: list[dict]) -> dict:
    """Spearman between the candidates' trial scores and their full-run scores (means over seeds), and the warning
    when short trials mislead (below AGREEMENT_WARN)."""

    pairs = [(c["trial_value"], c["full_mean"]) for c in rows if c["full_mean"] is not None]
    rho = stats.spearman([a for a, _ in pairs], [b for _, b in pairs])
    warning = None
    if rho is not None and rho < AGREEMENT_WARN:
        warning = (f"short trials mislead here: the {len(pairs)} best trials' scores and their full runs' rank "
                   f"correlation is {rho:.2f} (below {AGREEMENT_WARN}); raise the trial budget (sweep.trial's "
                   "trainer.max_steps) so trials rank configurations as full runs do")
    return {"spearman": rho, "pairs": len(pairs), "warning": warning}


def promote_stage(cfg: RunConfig, study, get_worker, force: bool = False, out: Path | None = None,
                  best=None, pool=None) -> dict:
    """Re-train the best trial and the next best (sweep.promotion.top_k in all, each with sweep.promotion.seeds
    training seeds) at the promotion budget, promote the best full run (mean over seeds), not the best short trial,
    and record how well trial scores predicted full-run scores. Writes best.yaml, best.json, full/ (the promoted
    run: adapter, metrics, weights.json) and full/runs/<trial>-seed<seed>/ (every full run) under out (default
    results/<study>/); runs already done are skipped. get_worker(config) -> the Worker for a full run's config."""
    selection = {}
    if best is None:
        best, selection = choose(cfg, study)
    if best is None:
        raise ConfigError(f"study {cfg.sweep.name} has no complete trial to promote (all pruned, failed or over "
                          "the memory budget); widen sweep.space, raise sweep.n_trials or sweep.memory_budget_mb")
    out = Path(out or study_dir(cfg))
    _, n_seeds = settings(cfg)
    seeds = [cfg.trainer.seed + i for i in range(n_seeds)]
    pool = candidates(cfg, study, best, pool)
    plan = [[t.number, seed, config_id(space_lib.apply(best_config(cfg, t), {"trainer.seed": seed}))]
            for t in pool for seed in seeds]
    pid = hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:12]
    previous = records.read_json(out / "full" / "metrics.json")
    if previous and previous.get("promotion_id") == pid and (out / "full" / "adapter").is_dir() and not force:
        log.info("promotion of trial #%d already done (%s): skipped", previous.get("trial", best.number), out / "full")
        return previous
    runs = {}
    for trial in pool:
        for seed in seeds:
            folder = out / "full" / "runs" / f"trial-{trial.number:04d}-seed{seed}"
            runs[trial.number, seed] = _run(cfg, trial, seed, folder, get_worker, force, study_dir(cfg))
    rows = [{"trial": t.number, "trial_value": primary_value(cfg, t), "params": t.user_attrs.get("params") or t.params,
             **_spread([runs[t.number, s].get("full_value") for s in seeds])} for t in pool]
    maximize = cfg.sweep.direction == "maximize"
    scored = [r for r in rows if r["full_mean"] is not None]
    if not scored:  # every full run diverged: there is nothing to promote, merge or benchmark
        why = next((r["diverged"] for r in runs.values() if r.get("diverged")), "no full run has a finite score")
        records.write_status(out / "full", "failed", why)
        raise RunDiverged(f"every full run of the promotion diverged ({why})", out / "full")
    winner_row = (max if maximize else min)(scored, key=lambda r: r["full_mean"]) if scored else rows[0]
    winner = next(t for t in pool if t.number == winner_row["trial"])
    agree = agreement(cfg, rows)
    if agree["warning"]:
        log.warning(agree["warning"])
    promotion = {"top_k": len(pool), "seeds": seeds, "best_trial": best.number, "chosen": winner.number,
                 "candidates": rows, **agree}
    if winner is not best:
        selection = {**selection, "chosen": winner.number}
    full_cfg = best_config(cfg, winner)
    cid = config_id(full_cfg)
    primary = runs[winner.number, seeds[0]]
    value = primary_value(cfg, winner)
    if len(pool) > 1:
        why = (f"the best full run of the {len(pool)} best trials (#{', #'.join(str(t.number) for t in pool)}, "
               f"{'mean over ' + str(len(seeds)) + ' seeds, ' if len(seeds) > 1 else ''}sweep.promotion.top_k)")
    elif selection:
        why = f"chosen by {'sweep.promotion.select' if selection.get('rule') else 'the default rule'}: " \
              f"{selection.get('rule_text')}"
    else:
        why = "given"
    records.write_config(out / "best.yaml", full_cfg, header=f"promoted: trial #{winner.number}, {why}\n"
                         "the other candidates and why they lost: best.json (selection, promotion) and report.md")
    records.write_json(out / "best.json", {"trial": winner.number, "value": value, "params": winner.params,
                                           "metric": cfg.sweep.metric, "values": _values(cfg, winner),
                                           "config_id": cid, "selection": selection, "promotion": promotion})
    # the promoted run: its primary seed's adapter and metrics in full/, what merge and benchmark read
    source = out / "full" / "runs" / f"trial-{winner.number:04d}-seed{seeds[0]}"
    target = out / "full" / "adapter"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source / "adapter", target)
    metrics = {**primary, "config_id": cid, "promotion_id": pid, "promotion": promotion,
               **({"full_mean": winner_row["full_mean"], "full_sd": winner_row["full_sd"],
                   "full_values": winner_row["full_values"]} if len(seeds) > 1 else {})}
    records.write_config(out / "full" / "config.yaml", full_cfg)
    analysis = weights.write(target, out / "full" / "weights.json", out / "plots")
    records.write_json(out / "full" / "metrics.json", metrics)
    records.write_status(out / "full", "complete", trial=winner.number)
    run = tracking.start(full_cfg, study_dir(cfg), f"promoted-trial-{winner.number:04d}", "full",
                         {"params": winner.user_attrs.get("params") or winner.params, "trial": winner.number})
    tracking.log_dir_artifact(run, target, f"{cfg.sweep.name}-adapter", "model", primary)
    tracking.finish(run, {**{k: v for k, v in metrics.items() if k != "promotion"}, "status": "complete",
                          "promotion/spearman": agree["spearman"], "promotion/best_trial": best.number,
                          **(weights.wandb_summary(analysis) if analysis else {})}, tags=["promoted"])
    log.info("promoted trial #%d: full run %s %.4f (trial: %.4f)%s", winner.number, cfg.sweep.metric,
             primary.get("full_value") if primary.get("full_value") is not None else float("nan"), value,
             f"; best short trial was #{best.number}" if winner is not best else "")
    return metrics


def _values(cfg: RunConfig, trial) -> dict:
    return objectives.values(trial, [m for m, _ in objective_list(cfg)])


AGREEMENT_WARN = 0.6  # Spearman between short-trial and full-run scores below this: short trials mislead
