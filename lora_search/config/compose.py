"""Where the configs live, the `sweep` group, and checks of command-line overrides.

Hydra composes `conf/` (plus the `sweep` group read from `sweeps/`); this module finds those
folders, registers the schemas, and checks each override against the schema before Hydra runs,
so a typo gets one line that names it and the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from lora_search.config import schema
from lora_search.core.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # lora_search/: conf/ and sweeps/ ship inside the package
PACKAGE_ROOT = PACKAGE_DIR.parent


def conf_dir() -> Path:
    """The Hydra config folder: $LORA_SEARCH_CONF, else conf/ beside the package."""
    return Path(os.environ.get("LORA_SEARCH_CONF", PACKAGE_DIR / "conf")).resolve()


def sweeps_dir() -> Path:
    """The folder of named sweeps (the `sweep` group): $LORA_SEARCH_SWEEPS, else sweeps/."""
    return Path(os.environ.get("LORA_SEARCH_SWEEPS", PACKAGE_DIR / "sweeps")).resolve()


def group_choices(group: str) -> list[str]:
    """The names a config group accepts, from its folder."""
    folder = sweeps_dir() if group == "sweep" else conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def register() -> None:
    """Register the schemas and every sweeps/*.yaml as the Hydra `sweep` group."""
    from hydra.core.config_store import ConfigStore

    schema.register()
    cs = ConfigStore.instance()
    for path in sorted(sweeps_dir().glob("*.yaml")):
        node = OmegaConf.load(path)
        if "name" not in node:
            node.name = path.stem
        cs.store(group="sweep", name=path.stem, node=node, provider="lora_search.sweeps")


def _field_type(dc: type, name: str):
    hints = typing.get_type_hints(dc)
    return hints[name]


def _is_free_form(tp) -> bool:
    """A field whose children are user-defined keys (dicts, Any)."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union:
        return any(_is_free_form(a) for a in typing.get_args(tp) if a is not type(None))
    return origin in (dict, typing.Dict)


def schema_keys(dc: type = schema.RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares (free-form dict children excluded)."""
    keys = []
    for f in dataclasses.fields(dc):
        key = f"{prefix}{f.name}"
        keys.append(key)
        tp = _field_type(dc, f.name)
        if dataclasses.is_dataclass(tp):
            keys.extend(schema_keys(tp, key + "."))
    return keys


def check_key(key: str) -> str | None:
    """Return a problem message if `key` (dotted) is not in the schema, else None."""
    dc: typing.Any = schema.RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(dc)]
        if part not in names:
            here = ".".join(parts[:i])
            valid = [f"{here}.{n}" if here else n for n in names]
            close = difflib.get_close_matches(key, schema_keys(), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            where = f"under {here}: " if here else "top-level keys: "
            return f"unknown config key '{key}'; {hint}({where}{', '.join(valid)})"
        tp = _field_type(dc, part)
        if _is_free_form(tp):
            return None
        if not dataclasses.is_dataclass(tp):
            if i < len(parts) - 1:
                return f"unknown config key '{key}': {'.'.join(parts[: i + 1])} is a value, not a group"
            return None
        dc = tp
    return None


def sweep_groups(args: list[str]) -> dict[str, str]:
    """The groups the chosen sweep file picks (its `groups:` mapping) that the command line does not choose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    chosen, sweep = set(), None
    for arg in args:
        try:
            ov = None if arg.startswith("-") else OverridesParser.create().parse_override(arg)
        except Exception:  # a flag's value; parse errors are check_overrides' to report
            continue
        if ov is not None and "." not in ov.key_or_group:
            chosen.add(ov.key_or_group)
            if ov.key_or_group == "sweep" and isinstance(ov.value(), str):
                sweep = ov.value()
    if sweep is None:
        defaults = OmegaConf.load(conf_dir() / "config.yaml").get("defaults", [])
        sweep = next((d["sweep"] for d in defaults if isinstance(d, dict) and "sweep" in d), None)
    path = sweeps_dir() / f"{sweep}.yaml"
    groups = OmegaConf.load(path).get("groups") if sweep and path.is_file() else None
    return {g: str(c) for g, c in (groups or {}).items() if g not in chosen}


def check_overrides(args: list[str]) -> None:
    """Check command-line overrides against the groups and the schema; raise ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception as e:  # hydra's parser error carries the offending text
        raise ConfigError([f"cannot parse the command line: {str(e).splitlines()[0]}"]) from None
    problems = []
    for ov in overrides:
        key = ov.key_or_group
        if key.startswith("hydra") or ov.is_add() or ov.is_delete() or ov.is_force_add():
            continue
        if key in schema.GROUPS and ov.package is None and "." not in key:
            choices = group_choices(key)
            if ov.is_sweep_override():
                continue
            value = ov.value()
            if isinstance(value, str) and value not in choices:
                close = difflib.get_close_matches(value, choices, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{key}={value} is not a known {key} config{hint}; available: {', '.join(choices)}")
            continue
        problem = check_key(key)
        if problem:
            problems.append(problem)
    if not problems:
        for group, choice in sweep_groups(args).items():
            if group not in schema.GROUPS or group == "sweep":
                problems.append(f"sweep.groups: {group!r} is not a config group a sweep can pick; accepted: "
                                f"{', '.join(g for g in schema.GROUPS if g != 'sweep')}")
            elif choice not in group_choices(group):
                problems.append(f"sweep.groups: {group}={choice} is not a known {group} config; available: "
                                f"{', '.join(group_choices(group))}")
    if problems:
        raise ConfigError(problems)


def mapping_overrides(args: list[str]) -> list[tuple[str, object]]:
    """(dotted key, value) to set again after Hydra composed: each override that gives a whole mapping to a
    free-form key (sweep.sampler, sweep.pruner, sweep.space, sweep.trial, sweep.promotion, lora.rank_pattern ...),
    then, in command-line order, the later overrides of keys inside it (`sweep.sampler.seed=3`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    found, replaced = [], []
    for ov in OverridesParser.create().parse_overrides(plain):
        key = ov.key_or_group
        if ov.is_delete() or ov.is_sweep_override() or "." not in key or ov.package is not None:
            continue
        value = ov.value()
        if isinstance(value, dict) and _in_free_form(key):
            found.append((key, value))
            replaced.append(key)
        elif any(key.startswith(r + ".") for r in replaced):
            found.append((key, value))
    return found


def hydra_overrides(args: list[str]) -> list[str]:
    """The command line as Hydra should see it: a mapping for a free-form key (`sweep.pruner={type: hyperband,
    min_resource: 1}`) is passed as `++key=...`, which Hydra accepts with keys the file's mapping lacks (a plain
    override there is refused); to_run_config then sets the key to exactly the mapping. A key inside a free-form
    field (`data.columns.prompt=question`, `lora.rank_pattern.q_proj=4`) is passed as `++` too: the file's mapping
    may not have it yet."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), []
    for arg in args:
        try:
            ov = None if arg.startswith(("-", "+", "~")) else parser.parse_override(arg)
        except Exception:  # not an override (a flag's value such as `--cfg job`): Hydra reads it as it is
            ov = None
        plain = ov is not None and ov.package is None and not ov.is_sweep_override() and "." in ov.key_or_group
        key = ov.key_or_group if ov is not None else ""
        mapping = plain and isinstance(ov.value(), dict) and _in_free_form(key)
        out.append(f"++{arg}" if mapping or (plain and _in_free_form(key) and not _is_field(key)) else arg)
    return out + [f"{g}={c}" for g, c in sweep_groups(args).items()]


def _walk(key: str) -> tuple[bool, bool]:
    """(whether the dotted key names a schema field itself, whether it is a free-form field or lies inside one)."""
    dc: typing.Any = schema.RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(dc) or part not in {f.name for f in dataclasses.fields(dc)}:
            return False, False
        dc = _field_type(dc, part)
        if _is_free_form(dc):
            return part == key.split(".")[-1], True
    return True, False


def _is_field(key: str) -> bool:
    """Whether a dotted key names a schema field itself (not a user key inside a free-form field)."""
    return _walk(key)[0]


def _in_free_form(key: str) -> bool:
    """Whether a dotted key is a free-form field of the schema (a dict or Any) or lies inside one."""
    return _walk(key)[1]


def to_run_config(cfg, overrides: list[str] = ()) -> schema.RunConfig:
    """Turn a composed DictConfig into the typed RunConfig dataclass.

    A mapping given on the command line (`sweep.sampler={type: random}`) replaces the key's value whole: Hydra
    merges it into the sweep file's mapping, so it is set again here as given. sweep.direction=auto becomes the
    metric's direction; with sweep.objectives, sweep.metric becomes its first quality metric.
    """
    with open_dict(cfg):  # a key inside a replaced mapping may be new to it
        for key, value in mapping_overrides(list(overrides)):
            OmegaConf.update(cfg, key, value, merge=False)
    run = OmegaConf.to_object(cfg)
    if run.sweep.objectives:  # several objectives: sweep.metric follows the first quality one (objectives.primary)
        from lora_search.config import objectives

        run.sweep.objectives = objectives.normalize(run.sweep.objectives)
        lead = objectives.primary(run.sweep.objectives)
        if lead:
            run.sweep.metric, run.sweep.direction = lead["metric"], lead.get("direction", "auto")
    if run.sweep.direction == "auto" and run.sweep.metric in schema.METRIC_DIRECTIONS:
        run.sweep.direction = schema.METRIC_DIRECTIONS[run.sweep.metric]
    return run


def load_config(overrides: list[str] = ()) -> schema.RunConfig:
    """Compose conf/ with overrides through Hydra's compose API (for tests and notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_overrides(list(overrides))
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=hydra_overrides(list(overrides)))
    return to_run_config(cfg, list(overrides))


CLUSTER_LAUNCHERS = ("slurm", "slurm_cpu", "submitit_slurm")  # each job may land on another machine
JOB_LAUNCHERS = (*CLUSTER_LAUNCHERS, "local", "submitit_local")


def launcher_jobs(args: list[str]) -> list[str]:
    """A multirun through a submitit launcher (`-m hydra/launcher=slurm sweep.workers=8`): the launcher starts the
    workers, one job each, so sweep.workers=N becomes N jobs (`worker=range(N)`, the array's size) of one worker
    process each (`sweep.workers=1`); an explicit `worker=...` sweep is left as it is. Then a cluster launcher with an
    SQLite storage is refused (ConfigError): its jobs run on several machines."""
    from lora_search.core import masking
    from lora_search.scale import storage

    if not any(a in ("-m", "--multirun") for a in args):
        return list(args)
    launcher = next((a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")), None)
    if launcher not in JOB_LAUNCHERS:
        return list(args)
    out, workers = list(args), None
    for i, arg in enumerate(args):
        if arg.startswith("sweep.workers=") and arg.split("=", 1)[1].isdigit():
            workers = int(arg.split("=", 1)[1])
            if not any(a.startswith("worker=") for a in args) and workers > 1:
                out[i] = "sweep.workers=1"
                out.append(f"worker=range({workers})")
    jobs = workers if workers and workers > 1 else _range_size(next((a for a in out if a.startswith("worker=")), ""))
    given = next((a.split("=", 1)[1] for a in args if a.startswith("sweep.storage=")), None)
    url = given or os.environ.get(masking.STORAGE_ENV) or "sqlite:///results/<study>/study.db"
    if launcher in CLUSTER_LAUNCHERS and jobs > 1 and storage.kind(url) == "sqlite":
        raise ConfigError(f"hydra/launcher={launcher} runs the {jobs} workers as jobs on several machines, but the "
                          f"study's storage is SQLite ({masking.mask_url(url)}), which several machines cannot "
                          f"share; set sweep.storage to {storage.ALTERNATIVES}")
    return out


def _range_size(arg: str) -> int:
    """How many jobs `worker=range(N)` / `worker=0,1,2` makes (1 when unknown)."""
    value = arg.split("=", 1)[1] if "=" in arg else ""
    m = re.fullmatch(r"range\((\d+)(?:,\s*(\d+))?\)", value)
    if m:
        return int(m.group(2)) - int(m.group(1)) if m.group(2) else int(m.group(1))
    return len(value.split(",")) if value else 1
