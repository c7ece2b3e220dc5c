"""The task data a run trains on, loaded once per process (the pre-Hydra checks load it, the run reuses it), and
whether the trainer and that data go together."""

from __future__ import annotations

from pathlib import Path

from lora_search.config.schema import RunConfig
from lora_search.core.errors import ConfigError
from lora_search.data.load import load_task_data

_checked: dict = {}  # (repr(DataConfig), the data files' mtime and size) -> the task data the checks loaded


def check_kind(cfg: RunConfig, data) -> None:
    """ConfigError when the trainer and the data do not go together: dpo needs preference pairs, sft needs
    prompt/completion rows."""
    name = f"data={cfg.data.name}" + (f" (data.path {cfg.data.path!r})" if cfg.data.path else "")
    if cfg.trainer.method == "dpo" and data.kind != "preference":
        raise ConfigError(f"trainer=dpo trains on preference pairs, but {name} holds prompt/completion rows "
                          f"({data.layout} layout); give it pairs: data=embedded_preference, or a file with chosen "
                          "and rejected columns (prompt optional): data=local data.path=<file>")
    if cfg.trainer.method in ("grpo", "rloo") and data.kind == "preference":
        raise ConfigError(f"trainer={cfg.trainer.method} samples answers to prompts and scores them with "
                          f"trainer.rewards, but {name} holds preference pairs ({data.layout} layout: chosen/rejected) "
                          "and no reward model scores answers here; give it prompt/completion rows (the completion "
                          "is the reference answer), or train on the pairs with trainer=dpo")
    if cfg.trainer.method == "sft" and data.kind == "preference":
        raise ConfigError(f"trainer=sft trains on prompt/completion rows, but {name} holds preference pairs "
                          f"({data.layout} layout: chosen/rejected); train on them with trainer=dpo")


def task_data(data_cfg):
    """The task data of a data config, loaded once per process while its files are unchanged (the checks load it,
    the run reuses it)."""
    files = [Path(p) for p in (data_cfg.path, getattr(data_cfg, "eval_path", None)) if p and data_cfg.source == "local"]
    key = (repr(data_cfg), *[(f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files])
    if key not in _checked:
        _checked[key] = load_task_data(data_cfg)
    return _checked[key]
