"""The command line before Hydra sees it: its overrides without Hydra's flags, whether it runs the task, the config
folders it adds (`--config-dir`, `hydra.searchpath`), the RunConfig it composes (one line per problem), and the
jobs a submitit launcher makes of `sweep.workers=N`.

Light on purpose: nothing here loads torch, so a bad command line is refused in about a second.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lora_search.config.compose import load_config
from lora_search.config.schema import RunConfig
from lora_search.core import masking
from lora_search.core.errors import ConfigError
from lora_search.scale import storage

# Flags after which Hydra does something other than run the task (print the config, help, a multirun).
NOT_A_RUN = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m", "--shell-completion",
             "-sc", "--resolve", "--package", "-p")
# Hydra's flags that take the next argument as their value (`--cfg job`, `-p trainer`).
WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
              "--experimental-rerun", "--info", "-i")
CLUSTER_LAUNCHERS = ("slurm", "slurm_cpu", "submitit_slurm")  # each job may land on another machine
JOB_LAUNCHERS = (*CLUSTER_LAUNCHERS, "local", "submitit_local")


def compose_error(e: Exception) -> ConfigError:
    """A Hydra/OmegaConf composition error as one line naming the key and the value."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(cause, MissingMandatoryValue) and key:
        return ConfigError(f"{key} is required and has no value; set {key}=<value> on the command line")
    converted = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", first)
    if key and re.match(r"Value '.*' is not a valid bool", first):
        return ConfigError(f"{key} must be true or false, got {first.split(chr(39))[1]!r}")
    if key and converted:
        kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}.get(converted[2], converted[2])
        return ConfigError(f"{key} must be {kind}, got {converted[1]!r}")
    if key:
        return ConfigError(f"{key}: {first}")
    return ConfigError(f"cannot compose the configuration: {first}")


def overrides_of(argv: list[str]) -> list[str]:
    """The overrides on a command line: Hydra's flags and their values left out (`--cfg job` is not an override)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in WITH_VALUE and arg not in ("--info", "-i")
        else:
            out.append(arg)
    return out


def is_run(argv: list[str]) -> bool:
    """Whether Hydra will run the task once with these arguments (no --cfg, --help, multirun)."""
    return not any(a.split("=", 1)[0] in NOT_A_RUN for a in argv if a.startswith("-"))


def config_dirs(argv: list[str]) -> list[Path]:
    """The folders of the user's own config groups the command line adds to Hydra's search path (`--config-dir DIR`,
    `-cd DIR`, the file:// entries of `hydra.searchpath=[file://DIR]`), absolute; ConfigError for one that is not a
    folder (Hydra would stop with a traceback, or skip it)."""
    found = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            found.append((flag, value if eq else (argv[i + 1] if i + 1 < len(argv) else "")))
        elif flag.lstrip("+") == "hydra.searchpath":
            try:
                entries = OverridesParser.create().parse_override(arg).value()
            except Exception:  # a parse error is check_overrides' to report
                continue
            found += [("hydra.searchpath", e[len("file://"):]) for e in (entries if isinstance(entries, list) else [])
                      if isinstance(e, str) and e.startswith("file://")]
    for flag, value in found:
        if value and not Path(value).is_dir():
            raise ConfigError(f"{flag} {value!r} is not a folder: give a folder of config groups, e.g. one holding "
                              f"model/<name>.yaml for model=<name>")
    return list(dict.fromkeys(Path(v).resolve() for _, v in found if v))


def compose(argv: list[str]) -> RunConfig:
    """The RunConfig the command line composes (Hydra's own keys left out, the folders it adds searched); ConfigError
    on any failure."""
    dirs = config_dirs(argv)
    overrides = [a for a in overrides_of(argv) if not a.lstrip("+~").startswith("hydra")]
    try:
        return load_config(overrides, dirs)
    except ConfigError:
        raise
    except Exception as e:  # hydra's composition errors, omegaconf's validation errors
        raise compose_error(e) from None


def launcher_jobs(args: list[str]) -> list[str]:
    """A multirun through a submitit launcher (`-m hydra/launcher=slurm sweep.workers=8`): the launcher starts the
    workers, one job each, so sweep.workers=N becomes N jobs (`worker=range(N)`, the array's size) of one worker
    process each (`sweep.workers=1`); an explicit `worker=...` sweep is left as it is. Then a cluster launcher with an
    SQLite storage is refused (ConfigError): its jobs run on several machines."""
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
