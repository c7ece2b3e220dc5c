"""Everything checkable about a run before Hydra starts it: compose the command line, check the config, the
sweep, the storage, the data and the targets, so bad input gets one line, exit code 2, and nothing under
`results/` is written (Hydra writes its `.hydra/` files and log before the task runs).

What a check loads (the task data, the model's module tree on the meta device) is kept for the run that follows
in this process, so passing the checks costs the run nothing twice.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lora_search.config.schema import RunConfig
from lora_search.core.errors import ConfigError

log = logging.getLogger(__name__)
# Flags after which Hydra does something other than run the task (print the config, help, a multirun).
NOT_A_RUN = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m", "--shell-completion",
             "-sc", "--resolve", "--package", "-p")
# Hydra's flags that take the next argument as their value (`--cfg job`, `-p trainer`).
WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
              "--experimental-rerun", "--info", "-i")
# Stages that read a study the search wrote: on a study that is not there they refuse instead of creating it.
FROM_STUDY = ("promote", "merge", "benchmark", "report")
_checked: dict = {}  # repr(DataConfig) -> the task data the checks loaded


def compose_error(e: Exception) -> ConfigError:
    """A Hydra/OmegaConf composition error as one line naming the key and the value."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

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


def compose(argv: list[str]) -> RunConfig:
    """The RunConfig the command line composes (Hydra's own keys left out); ConfigError on any failure."""
    from lora_search.config.compose import load_config

    overrides = [a for a in overrides_of(argv) if not a.lstrip("+~").startswith("hydra")]
    try:
        return load_config(overrides)
    except ConfigError:
        raise
    except Exception as e:  # hydra's composition errors, omegaconf's validation errors
        raise compose_error(e) from None


def is_run(argv: list[str]) -> bool:
    """Whether Hydra will run the task once with these arguments (no --cfg, --help, multirun)."""
    return not any(a.split("=", 1)[0] in NOT_A_RUN for a in argv if a.startswith("-"))


def check(cfg: RunConfig) -> None:
    """Run every check for cfg's stage; raise ConfigError/DataError with every problem found."""
    from lora_search.checks.run_config import validate
    from lora_search.commands import pipeline, train_stage

    validate(cfg)
    if cfg.stage == "train":
        train_stage.preflight(cfg)
        return
    pipeline.preflight_sweep(cfg)
    _check_storage(cfg)
    if cfg.stage in FROM_STUDY:
        check_study_exists(cfg)
    if cfg.stage in ("all", "search"):
        from lora_search.config import space as space_lib

        check_kind(space_lib.trial_base(cfg), task_data(cfg.data))


def _check_storage(cfg: RunConfig) -> None:
    from lora_search.search import study

    checker = getattr(study, "check_storage", None)
    if checker is not None:
        checker(cfg)


def check_study_exists(cfg: RunConfig) -> None:
    """ConfigError naming the study and the storage when the study is not in it (an absent SQLite file is not
    created)."""
    import optuna
    from sqlalchemy.engine import make_url

    from lora_search.core import masking
    from lora_search.scale import storage

    url = storage.storage_url(cfg)
    database = make_url(url).database if url.startswith("sqlite") else None
    if storage.kind(url) == "journal":
        database = str(storage.journal_path(url))  # opening a journal that is not there would create it
    if database and database != ":memory:" and not Path(database).is_file():
        names, found = [], "no such file"
    else:
        names = [n for n in optuna.study.get_all_study_names(storage=storage.open_rdb(cfg))
                 if ":promotion@" not in n]  # claims.py's claim studies are not studies to name
        found = f"studies there: {', '.join(sorted(names))}" if names else "it holds no study"
    if cfg.sweep.name not in names:
        raise ConfigError(f"no study {cfg.sweep.name!r} in storage {masking.mask_url(url)!r} ({found}); stage="
                          f"{cfg.stage} reads a finished search: run stage=search (or stage=all) first, or name the "
                          f"study with sweep=<sweep> or sweep.name=<name> and its storage with sweep.storage=<URL>")


def check_kind(cfg: RunConfig, data) -> None:
    """ConfigError when the trainer and the data do not go together: dpo needs preference pairs, sft needs
    prompt/completion rows."""
    name = f"data={cfg.data.name}" + (f" (data.path {cfg.data.path!r})" if cfg.data.path else "")
    if cfg.trainer.method == "dpo" and data.kind != "preference":
        raise ConfigError(f"trainer=dpo trains on preference pairs, but {name} holds prompt/completion rows "
                          f"({data.layout} layout); give it pairs: data=embedded_preference, or a file with chosen "
                          "and rejected columns (prompt optional): data=local data.path=<file>")
    if cfg.trainer.method == "sft" and data.kind == "preference":
        raise ConfigError(f"trainer=sft trains on prompt/completion rows, but {name} holds preference pairs "
                          f"({data.layout} layout: chosen/rejected); train on them with trainer=dpo")


def task_data(data_cfg):
    """The task data of a data config, loaded once per process while its files are unchanged (the checks load it,
    the run reuses it)."""
    from lora_search.data.load import load_task_data

    files = [Path(p) for p in (data_cfg.path, getattr(data_cfg, "eval_path", None)) if p and data_cfg.source == "local"]
    key = (repr(data_cfg), *[(f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files])
    if key not in _checked:
        _checked[key] = load_task_data(data_cfg)
    return _checked[key]
