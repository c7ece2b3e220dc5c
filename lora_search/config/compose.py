"""Where the configs live, the `sweep` group, and checks of command-line overrides.

Hydra composes the shipped `conf/` (plus the `sweep` group: the shipped sweeps, $LORA_SEARCH_SWEEPS and the
working folder's `./sweeps/`) and any folder the command line adds (`--config-dir`, `hydra.searchpath`); this
module finds those folders, registers the schemas, and checks each override against the schema before Hydra runs,
so a typo gets one line that names it and the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from lora_search.config import objectives, schema
from lora_search.core.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # lora_search/: conf/ and sweeps/ ship inside the package
PACKAGE_ROOT = PACKAGE_DIR.parent
USER_SWEEPS = "sweeps"  # the working folder's own sweeps: ./sweeps/*.yaml


def conf_dir() -> Path:
    """The Hydra config folder: $LORA_SEARCH_CONF, else conf/ beside the package."""
    return Path(os.environ.get("LORA_SEARCH_CONF", PACKAGE_DIR / "conf")).resolve()


def sweeps_dir() -> Path:
    """The folder of the shipped sweeps (lora_search/sweeps/)."""
    return (PACKAGE_DIR / "sweeps").resolve()


def sweep_dirs() -> list[Path]:
    """The folders of the `sweep` group, nearest last: the shipped sweeps, $LORA_SEARCH_SWEEPS, ./sweeps."""
    found = [sweeps_dir(), *([Path(os.environ["LORA_SEARCH_SWEEPS"])] if os.environ.get("LORA_SEARCH_SWEEPS") else []),
             Path.cwd() / USER_SWEEPS]
    return list(dict.fromkeys(p.resolve() for p in found if p.is_dir()))


def sweep_files() -> dict[str, Path]:
    """Sweep name -> its file; a nearer folder's file replaces a farther one's of the same name."""
    return {p.stem: p for folder in sweep_dirs() for p in sorted(folder.glob("*.yaml"))}


def group_choices(group: str, config_dirs=()) -> list[str]:
    """The names a config group accepts: from the shipped folder and the folders the command line adds."""
    if group == "sweep":
        return sorted(sweep_files())
    return sorted({p.stem for folder in (conf_dir(), *config_dirs) for p in (Path(folder) / group).glob("*.yaml")})


def register() -> None:
    """Register the schemas and every sweep file (sweep_files) as the Hydra `sweep` group."""
    schema.register()
    cs = ConfigStore.instance()
    for name, path in sweep_files().items():
        node = OmegaConf.load(path)
        if "name" not in node:
            node.name = name
        cs.store(group="sweep", name=name, node=node, provider="lora_search.sweeps")


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
    path = sweep_files().get(sweep)
    groups = OmegaConf.load(path).get("groups") if path else None
    return {g: str(c) for g, c in (groups or {}).items() if g not in chosen}


def check_overrides(args: list[str], config_dirs=()) -> None:
    """Check command-line overrides against the groups (the shipped ones and those in config_dirs, the folders the
    command line adds) and the schema; raise ConfigError."""
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
            choices = group_choices(key, config_dirs)
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
            elif choice not in group_choices(group, config_dirs):
                problems.append(f"sweep.groups: {group}={choice} is not a known {group} config; available: "
                                f"{', '.join(group_choices(group, config_dirs))}")
    if problems:
        raise ConfigError(problems)


def mapping_overrides(args: list[str]) -> list[tuple[str, object]]:
    """(dotted key, value) to set again after Hydra composed: each override that gives a whole mapping to a
    free-form key (sweep.sampler, sweep.pruner, sweep.space, sweep.trial, sweep.promotion, lora.rank_pattern ...),
    then, in command-line order, the later overrides of keys inside it (`sweep.sampler.seed=3`)."""
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
        run.sweep.objectives = objectives.normalize(run.sweep.objectives)
        lead = objectives.primary(run.sweep.objectives)
        if lead:
            run.sweep.metric, run.sweep.direction = lead["metric"], lead.get("direction", "auto")
    if run.sweep.direction == "auto" and run.sweep.metric in schema.METRIC_DIRECTIONS:
        run.sweep.direction = schema.METRIC_DIRECTIONS[run.sweep.metric]
    return run


def searchpath_override(config_dirs) -> str:
    """`hydra.searchpath=[...]` adding config_dirs (absolute) to Hydra's config search path."""
    quoted = ("'file://" + str(Path(d).resolve()).replace("'", "\\'") + "'" for d in config_dirs)
    return f"hydra.searchpath=[{','.join(quoted)}]"


def load_config(overrides: list[str] = (), config_dirs=()) -> schema.RunConfig:
    """Compose conf/ (and the config groups in config_dirs, user folders of Hydra's search path) with overrides
    through Hydra's compose API (for the pre-Hydra checks, tests and notebooks)."""
    check_overrides(list(overrides), config_dirs)
    register()
    GlobalHydra.instance().clear()
    extra = [searchpath_override(config_dirs)] if config_dirs else []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=hydra_overrides(list(overrides)) + extra)
    return to_run_config(cfg, list(overrides))
