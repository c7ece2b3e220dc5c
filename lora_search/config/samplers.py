"""The study's sampler and pruner, built from the sweep file with Optuna's own classes.

Several workers share one study: each worker's sampler is seeded with `seed + worker index` (so their first,
random trials differ), TPE runs with its constant liar (a running trial counts as a bad one, so workers started
together do not pick the same point), and the GP sampler accounts for running trials itself (q-batch acquisition).
"""

from __future__ import annotations

import optuna

from lora_search.core.errors import ConfigError

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "nsgaii")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
SINGLE_OBJECTIVE = ("cmaes",)  # samplers Optuna runs on one objective only
SEEDED = ("tpe", "random", "cmaes", "gp", "nsgaii")


def spec(value) -> dict:
    """A sampler or pruner setting as {type: name, **kwargs}."""
    return {"type": value} if isinstance(value, str) else dict(value or {})


def _build(kind_map: dict, value, what: str, accepted: tuple):
    s = spec(value)
    kwargs = {k: v for k, v in s.items() if k != "type"}
    kind = s.get("type")
    if kind not in kind_map:
        raise ConfigError(f"sweep.{what}.type must be one of {', '.join(accepted)}; got {kind!r}")
    try:
        return kind_map[kind](**kwargs)
    except TypeError as e:
        raise ConfigError(f"sweep.{what} ({kind}): {e}") from None


def sampler_kwargs(cfg) -> dict:
    """The sampler's arguments for this worker: the sweep file's, the seed offset by the worker index, TPE's
    constant liar on unless the file says otherwise."""
    s = spec(cfg.sweep.sampler)
    kind = s.get("type")
    if kind in SEEDED and isinstance(s.get("seed"), int) and cfg.worker:
        s["seed"] = s["seed"] + cfg.worker
    if kind == "tpe":
        s.setdefault("constant_liar", True)
    return s


def make_sampler(cfg):
    """The Optuna sampler the sweep file names, for this worker."""
    space = cfg.sweep.space

    def grid(**kw):
        bad = [k for k, d in space.items() if d["type"] != "categorical"]
        if bad:
            raise ConfigError(f"sweep.sampler grid needs categorical entries; not categorical: {', '.join(bad)}")
        return optuna.samplers.GridSampler({k: list(d["choices"]) for k, d in space.items()}, **kw)

    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler, "grid": grid,
             "cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler,
             "nsgaii": optuna.samplers.NSGAIISampler}
    return _build(kinds, sampler_kwargs(cfg), "sampler", SAMPLERS)


def make_pruner(cfg):
    """The Optuna pruner the sweep file names."""
    kinds = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
             "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    return _build(kinds, cfg.sweep.pruner, "pruner", PRUNERS)


