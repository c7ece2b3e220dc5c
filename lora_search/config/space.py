"""The search space: sampling it (the one place `trial.suggest_*` is called), and
applying sampled values to a copy of the composed config by dotted key.
"""

from __future__ import annotations

import math

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_search.config import compose
from lora_search.config.promotion_settings import SETTINGS
from lora_search.config.schema import GENERATION_METRICS, RunConfig
from lora_search.core import records
from lora_search.core.errors import ConfigError


# Keys a trial cannot act on (prefix -> why): the space refuses them before anything trains.
# LoRA inits that rewrite the base weights every trial shares (or need a data pass trials do not run): refused in
# sweeps, accepted by stage=train.
def trial_base(cfg: RunConfig) -> RunConfig:
    """The config every trial starts from: the composed config, then sweep.trial. Trials generate answers only when a
    generation metric (exact_match, rouge_l, bleu) is an objective (sweep.exact_match_items of them) unless
    sweep.trial says otherwise."""
    wanted = [cfg.sweep.metric] + [o.get("metric") if isinstance(o, dict) else o for o in cfg.sweep.objectives]
    items = cfg.sweep.exact_match_items if any(m in GENERATION_METRICS for m in wanted) else 0
    return apply(cfg, {"trainer.exact_match_items": items, **dict(cfg.sweep.trial)})


def suggest(trial, space: dict) -> dict:
    """Sample every space entry from an Optuna trial: {dotted key: value}."""
    values = {}
    for key, dist in space.items():
        kind = dist["type"]
        if kind == "categorical":
            values[key] = trial.suggest_categorical(key, list(dist["choices"]))
        elif kind == "int":
            values[key] = trial.suggest_int(key, dist["low"], dist["high"], step=dist.get("step") or 1,
                                            log=bool(dist.get("log")))
        else:
            values[key] = trial.suggest_float(key, float(dist["low"]), float(dist["high"]), step=dist.get("step"),
                                              log=bool(dist.get("log")))
    return values


def apply(cfg: RunConfig, values: dict) -> RunConfig:
    """A copy of cfg with dotted keys set (typed: a value of the wrong type is a ConfigError)."""
    node = OmegaConf.structured(cfg)
    problems = []
    for key, value in values.items():
        problem = compose.check_key(key)
        if problem:
            problems.append(problem)
            continue
        try:
            OmegaConf.update(node, key, value, merge=False)
        except OmegaConfBaseException as e:
            problems.append(f"{key}={value!r}: {str(e).splitlines()[0]}")
    if problems:
        raise ConfigError(problems)
    return OmegaConf.to_object(node)


# trainer keys that say when and how a run is scored, not what it trains: two configs equal but for these train the
# same run (an eval reads the model in eval mode and leaves the weights, the optimizer and the data order alone)
SCORING_KEYS = ("eval_every", "eval_subset", "final_eval", "exact_match_items")


def full_config(cfg: RunConfig, params: dict) -> RunConfig:
    """A trial's configuration at the promotion budget: the sweep config, sweep.trial, the trial's params, then
    sweep.promotion (measured on every eval row unless sweep.promotion says otherwise)."""
    overrides = {k: v for k, v in cfg.sweep.promotion.items() if k not in SETTINGS}  # settings, not config keys
    return apply(apply(apply(cfg, dict(cfg.sweep.trial)), params), {"trainer.final_eval": "full", **overrides})


def same_training(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configs train the same run, step for step: equal but for SCORING_KEYS."""
    dicts = [records.config_dict(c) for c in (a, b)]
    for d in dicts:
        for key in SCORING_KEYS:
            d["trainer"].pop(key, None)
    return dicts[0] == dicts[1]


def finite(value) -> bool:
    """Whether a metric value is a finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value)


