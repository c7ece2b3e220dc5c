"""Everything checkable about a run before Hydra starts it: compose the command line, check the config, the
sweep, the storage, the data and the targets, so bad input gets one line, exit code 2, and nothing under
`results/` is written (Hydra writes its `.hydra/` files and log before the task runs).

What a check loads (the task data, the model's module tree on the meta device) is kept for the run that follows
in this process, so passing the checks costs the run nothing twice. The command line itself (its overrides, the
config folders it adds, the RunConfig it composes) is read by lora_search.checks.overrides, light enough to run
before this module loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url

from lora_search.checks.installed import check_embedded_model
from lora_search.checks.overrides import compose, compose_error, is_run, overrides_of  # noqa: F401 (callers' names)
from lora_search.checks.run_config import validate
from lora_search.checks.task_data import check_kind, task_data
from lora_search.commands import pipeline, train_stage
from lora_search.config import space as space_lib
from lora_search.config.schema import RunConfig
from lora_search.core import masking
from lora_search.core.errors import ConfigError
from lora_search.scale import storage
from lora_search.search import study

log = logging.getLogger(__name__)
# Stages that read a study the search wrote: on a study that is not there they refuse instead of creating it.
FROM_STUDY = ("promote", "merge", "benchmark", "report")


def check(cfg: RunConfig) -> None:
    """Run every check for cfg's stage; raise ConfigError/DataError with every problem found."""
    check_embedded_model(cfg)
    validate(cfg)
    if cfg.stage == "train":
        train_stage.preflight(cfg)
        return
    pipeline.preflight_sweep(cfg)
    _check_storage(cfg)
    if cfg.stage in FROM_STUDY:
        check_study_exists(cfg)
    if cfg.stage in ("all", "search"):
        check_kind(space_lib.trial_base(cfg), task_data(cfg.data))


def _check_storage(cfg: RunConfig) -> None:
    checker = getattr(study, "check_storage", None)
    if checker is not None:
        checker(cfg)


def check_study_exists(cfg: RunConfig) -> None:
    """ConfigError naming the study and the storage when the study is not in it (an absent SQLite file is not
    created)."""
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
