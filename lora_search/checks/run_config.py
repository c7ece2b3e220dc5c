"""Range and cross-field checks of a RunConfig: every problem is collected, then raised once.

Nothing here loads model weights or data; `check_targets` needs only the model's architecture
(built on the meta device).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from lora_search.checks.rewards import check_rl
from lora_search.config.schema import STAGES, RunConfig
from lora_search.core.errors import ConfigError
from lora_search.data.embedded_tasks import PREFERENCE_TASKS, TASKS
from lora_search.data.readers import DATA_SUFFIXES
from lora_search.models.adapters import init_adapter_dir

DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANT_MODES = ("none", "int8", "nf4", "fp4")
BIASES = ("none", "all", "lora_only")
INIT_LORA = (True, False, "gaussian", "pissa", "olora", "orthogonal", "loftq", "eva", "corda")
MODEL_SOURCES = ("embedded", "tiny", "hub", "local")
DATA_SOURCES = ("embedded", "local", "hub")
LAYOUTS = ("auto", "messages", "prompt_completion", "alpaca", "dolly", "preference", "columns")
METHODS = ("sft", "dpo", "grpo", "rloo")
# TRL 1.16 DPOTrainer's loss types (DPOConfig.loss_type); several combined are not offered here
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
def _choice(problems, key, value, accepted):
    if value not in accepted:
        problems.append(f"{key} must be one of {', '.join(map(str, accepted))}; got {value!r}")


def _positive_int(problems, key, value, allow=()):
    if value in allow:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.append(f"{key} must be a positive integer, got {value!r}")


def _positive_float(problems, key, value):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        problems.append(f"{key} must be a positive number, got {value!r}")


def check_lora(problems: list[str], cfg: RunConfig) -> None:
    """LoRA ranges: rank, alpha, dropout, bias, targets, patterns."""
    lora, presets = cfg.lora, cfg.model.target_presets
    _positive_int(problems, "lora.r", lora.r)
    if lora.alpha_ratio is not None:
        _positive_float(problems, "lora.alpha_ratio", lora.alpha_ratio)
    else:
        _positive_float(problems, "lora.alpha", lora.alpha)
    if not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {lora.dropout!r}")
    _choice(problems, "lora.bias", lora.bias, BIASES)
    if lora.init_lora_weights not in INIT_LORA and not str(lora.init_lora_weights).startswith("pissa_niter_"):
        _choice(problems, "lora.init_lora_weights", lora.init_lora_weights, INIT_LORA)
    targets = lora.targets
    if isinstance(targets, str):
        if targets not in presets:
            problems.append(
                f"lora.targets: unknown preset {targets!r} for model {cfg.model.name}; "
                f"presets: {', '.join(presets) or '(none defined)'}, or a list of module names"
            )
    elif isinstance(targets, (list, tuple)):
        if not targets or not all(isinstance(t, str) and t for t in targets):
            problems.append(f"lora.targets must be a preset name or a non-empty list of module names, got {targets!r}")
    else:
        problems.append(f"lora.targets must be a preset name or a list of module names, got {targets!r}")
    for key, value in lora.rank_pattern.items():
        _positive_int(problems, f"lora.rank_pattern.{key}", value)
    for key, value in lora.alpha_pattern.items():
        _positive_float(problems, f"lora.alpha_pattern.{key}", value)
    if lora.layers_to_transform is not None and any(
        not isinstance(i, int) or i < 0 for i in lora.layers_to_transform
    ):
        problems.append(f"lora.layers_to_transform must list layer indices >= 0, got {lora.layers_to_transform!r}")


def check_trainer(problems: list[str], cfg: RunConfig) -> None:
    """Trainer ranges: learning rate, batch sizes, steps, scheduler, optimizer, precision."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    t = cfg.trainer
    _choice(problems, "trainer.method", t.method, METHODS)
    if t.method == "dpo":
        check_dpo(problems, cfg)
    if t.method in ("grpo", "rloo"):
        check_rl(problems, cfg)
    if t.init_adapter is not None:
        _, problem = init_adapter_dir(t.init_adapter, cfg.results_dir)
        if problem:
            problems.append(problem)
    _positive_float(problems, "trainer.learning_rate", t.learning_rate)
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps", "max_new_tokens"):
        _positive_int(problems, f"trainer.{key}", getattr(t, key))
    _positive_int(problems, "trainer.max_steps", t.max_steps, allow=(-1,))
    if t.max_steps == -1:
        _positive_float(problems, "trainer.num_epochs", t.num_epochs)
    if not isinstance(t.max_length, int) or t.max_length < 16:
        problems.append(f"trainer.max_length must be an integer >= 16, got {t.max_length!r}")
    if t.warmup_steps < 0:
        problems.append(f"trainer.warmup_steps must be >= 0 (steps) or in [0, 1) (ratio), got {t.warmup_steps!r}")
    if t.weight_decay < 0:
        problems.append(f"trainer.weight_decay must be >= 0, got {t.weight_decay!r}")
    for key in ("eval_every", "exact_match_items", "num_threads"):
        if getattr(t, key) < 0:
            problems.append(f"trainer.{key} must be >= 0, got {getattr(t, key)!r}")
    _positive_int(problems, "trainer.eval_subset", t.eval_subset)
    _choice(problems, "trainer.final_eval", t.final_eval, ("full", "subset"))
    if t.padding_free not in ("auto", True, False):
        problems.append(f"trainer.padding_free must be auto, true or false, got {t.padding_free!r}")
    _choice(problems, "trainer.precision", t.precision, PRECISIONS)
    _choice(problems, "trainer.lr_scheduler", t.lr_scheduler, [s.value for s in SchedulerType])
    _choice(problems, "trainer.optim", t.optim, [o.value for o in OptimizerNames])


def check_dpo(problems: list[str], cfg: RunConfig) -> None:
    """trainer=dpo: beta, loss type, label smoothing, and the settings TRL's DPOTrainer does not have."""
    t = cfg.trainer
    if not isinstance(t.beta, (int, float)) or isinstance(t.beta, bool) or not math.isfinite(t.beta) or t.beta <= 0:
        problems.append(f"trainer.beta must be a positive number (how far the tuned model may move from the "
                        f"reference; TRL's default 0.1), got {t.beta!r}")
    _choice(problems, "trainer.loss_type", t.loss_type, DPO_LOSSES)
    if not isinstance(t.label_smoothing, (int, float)) or not 0 <= t.label_smoothing < 0.5:
        problems.append(f"trainer.label_smoothing must be in [0, 0.5), got {t.label_smoothing!r}")
    elif t.loss_type == "exo_pair" and t.label_smoothing == 0:
        problems.append("trainer.loss_type=exo_pair needs trainer.label_smoothing > 0 (the EXO paper uses 1e-3)")
    if t.packing:
        problems.append("trainer.packing=true is not available with trainer=dpo (TRL's DPOTrainer pairs each chosen "
                        "answer with its rejected one); set trainer.packing=false")
    if t.padding_free is True:
        problems.append("trainer.padding_free=true is not available with trainer=dpo (TRL 1.16 falls back to padding); "
                        "leave it auto or false")


def check_model_quant(problems: list[str], cfg: RunConfig) -> None:
    """Model source and dtype; quantization mode and whether bitsandbytes is there."""
    m, q = cfg.model, cfg.quant
    _choice(problems, "model.source", m.source, MODEL_SOURCES)
    _choice(problems, "model.dtype", m.dtype, DTYPES)
    if m.source in ("hub", "local") and not m.path:
        problems.append(f"model.path is required for model.source={m.source} (a hub id or a folder)")
    if m.source == "local" and m.path and not Path(m.path).is_dir():
        problems.append(f"model.path: no such folder {m.path!r}")
    if m.source == "embedded" and not (m.gguf_package and m.gguf_file):
        problems.append("model.gguf_package and model.gguf_file are required for model.source=embedded")
    _choice(problems, "quant.mode", q.mode, QUANT_MODES)
    _choice(problems, "quant.compute_dtype", q.compute_dtype, DTYPES)
    if q.mode != "none" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"quant={q.name} (mode {q.mode}) needs bitsandbytes, which is not installed; "
            "`pip install bitsandbytes`, or use quant=none"
        )


def check_data(problems: list[str], cfg: RunConfig) -> None:
    """Data source, file existence and format (data.path, data.eval_path), layout, split fraction."""
    d = cfg.data
    _choice(problems, "data.source", d.source, DATA_SOURCES)
    _choice(problems, "data.layout", d.layout, LAYOUTS)
    _choice(problems, "data.format", d.format, ("chat", "raw"))
    if not 0 < d.eval_fraction < 1:
        problems.append(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction!r}")
    if d.source == "embedded":
        tasks, kind = (PREFERENCE_TASKS, "preference task") if d.layout == "preference" else (TASKS, "task")
        if not d.tasks:
            problems.append(f"data.tasks must name at least one {kind}; available: {', '.join(tasks)}")
        for task in d.tasks:
            if task not in tasks:
                problems.append(f"data.tasks: unknown {kind} {task!r}; available: {', '.join(tasks)}")
        _positive_int(problems, "data.train_per_task", d.train_per_task)
        _positive_int(problems, "data.eval_per_task", d.eval_per_task)
    elif not d.path:
        problems.append(f"data.path is required for data.source={d.source}")
    elif d.source == "local":
        path = Path(d.path)
        if not path.is_file():
            problems.append(f"data.path: no such file {d.path!r}")
        elif path.suffix.lower() not in DATA_SUFFIXES:
            problems.append(
                f"data.path: unsupported file type {path.suffix!r}; accepted: {', '.join(DATA_SUFFIXES)}"
            )
    if d.eval_path:
        path = Path(d.eval_path)
        if d.source == "embedded":
            problems.append("data.eval_path needs data.source=local or hub (the embedded tasks have their own eval rows)")
        elif d.eval_split:
            problems.append(f"data.eval_path and data.eval_split are both set ({d.eval_path!r}, {d.eval_split!r}); "
                            "set one: a separate eval file or a split of the dataset")
        if "://" not in d.eval_path and not path.is_file():
            problems.append(f"data.eval_path: no such file {d.eval_path!r}")
        elif path.suffix.lower() not in DATA_SUFFIXES:
            problems.append(
                f"data.eval_path: unsupported file type {path.suffix!r}; accepted: {', '.join(DATA_SUFFIXES)}"
            )
    if d.layout == "columns" and not ({"prompt", "completion"} <= set(d.columns) or {"chosen", "rejected"} <= set(d.columns)):
        problems.append(
            "data.layout=columns needs data.columns.prompt and data.columns.completion (the columns to read them "
            "from), or data.columns.chosen and data.columns.rejected for preference pairs (data.columns.prompt "
            f"optional), got {dict(d.columns)!r}"
        )
    unknown = sorted(set(d.columns) - {"prompt", "completion", "system", "chosen", "rejected"})
    if unknown:
        problems.append(f"data.columns: unknown role(s) {', '.join(unknown)}; accepted: prompt, completion, system, "
                        "chosen, rejected")
    for key in ("max_train_rows", "max_eval_rows"):
        if getattr(d, key) is not None:
            _positive_int(problems, f"data.{key}", getattr(d, key))


def validate(cfg: RunConfig) -> None:
    """Check every field; raise one ConfigError listing every problem found."""
    problems: list[str] = []
    _choice(problems, "stage", cfg.stage, STAGES)
    check_model_quant(problems, cfg)
    check_lora(problems, cfg)
    check_trainer(problems, cfg)
    check_data(problems, cfg)
    _choice(problems, "tracking.backend", cfg.tracking.backend, ("none", "wandb"))
    _choice(problems, "tracking.mode", cfg.tracking.mode, ("auto", "offline", "online", "disabled"))
    if problems:
        raise ConfigError(problems)
