"""LoRA adapters: target presets to module names, PEFT's LoraConfig, checks against the model's
module tree (every target must match), parameter counts on the meta device, attach and remove.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from lora_search.config.schema import LoraSpec, ModelConfig
from lora_search.core.errors import ConfigError

LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)



LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")


def lora_key(key: str) -> tuple[str, str] | None:
    """A saved adapter tensor's (module path without PEFT's prefix, "A" or "B"); None for other tensors."""
    found = LORA_KEY.match(key)
    return (found["module"], found["ab"]) if found else None

def target_modules(lora: LoraSpec, model: ModelConfig) -> list[str]:
    """The module names a LoRA spec targets: a preset resolved through the model, or its list."""
    if isinstance(lora.targets, str):
        return list(model.target_presets[lora.targets])
    return list(lora.targets)


def lora_config(lora: LoraSpec, model: ModelConfig):
    """PEFT's LoraConfig for a spec."""
    from peft import LoraConfig

    alpha = lora.alpha_ratio * lora.r if lora.alpha_ratio is not None else lora.alpha
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(lora, model),
        bias=lora.bias,
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        layers_to_transform=list(lora.layers_to_transform) if lora.layers_to_transform else None,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=lora.init_lora_weights,
    )


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list entry: the full name, or its last dotted components.
    return name == target or name.endswith("." + target)


def _layer_index(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def check_targets(lora: LoraSpec, model_cfg: ModelConfig, model: torch.nn.Module) -> None:
    """Every target and modules_to_save entry must match a module; raise ConfigError naming those that do not."""
    named = dict(model.named_modules())
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n, mod in named.items() if isinstance(mod, LORA_LAYER_TYPES)})
    problems = []
    preset = f"preset {lora.targets!r} ({model_cfg.name}) " if isinstance(lora.targets, str) else ""
    for target in target_modules(lora, model_cfg):
        hits = [n for n, mod in named.items() if _matches(n, target)]
        if not hits:
            problems.append(
                f"lora.targets: {preset}entry {target!r} matches no module in {type(model).__name__}; "
                f"layers LoRA can target: {', '.join(leaf_names)}"
            )
        elif not any(isinstance(named[n], LORA_LAYER_TYPES) for n in hits):
            kinds = sorted({type(named[n]).__name__ for n in hits})
            problems.append(
                f"lora.targets: {preset}entry {target!r} matches only {', '.join(kinds)} modules, which LoRA cannot "
                f"adapt; layers LoRA can target: {', '.join(leaf_names)}"
            )
    for module in lora.modules_to_save or []:
        if not any(_matches(n, module) for n in named):
            top = sorted({n.rsplit(".", 1)[-1] for n in named if n.count(".") <= 1 and n})
            problems.append(f"lora.modules_to_save: {module!r} matches no module; candidates include {', '.join(top)}")
    layers = {i for n in named if (i := _layer_index(n)) is not None}
    for index in lora.layers_to_transform or []:
        if layers and index not in layers:
            problems.append(f"lora.layers_to_transform: layer {index} does not exist (layers 0..{max(layers)})")
    if problems:
        raise ConfigError(problems)


def count_parameters(lora: LoraSpec, model_cfg: ModelConfig, model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters once the adapter is attached, as PEFT counts them."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(lora, model_cfg))
    try:
        return peft_model.get_nb_trainable_parameters()
    finally:
        peft_model.unload()


def attach(model: torch.nn.Module, lora: LoraSpec, model_cfg: ModelConfig, start=None):
    """Wrap the shared base model with a fresh adapter (PeftModel), or with the saved adapter in folder `start`
    (trainable, its own rank and targets, lora.dropout applied); `detach` undoes either."""
    from peft import PeftConfig, PeftModel, get_peft_model

    if start is None:
        return get_peft_model(model, lora_config(lora, model_cfg))
    config = PeftConfig.from_pretrained(str(start))
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = lora.dropout
    return PeftModel.from_pretrained(model, str(start), config=config, is_trainable=True)


# LoRA keys a starting adapter (trainer.init_adapter) fixes: its own rank, scaling and targets
FIXED_BY_START = ("lora.r", "lora.alpha", "lora.alpha_ratio", "lora.targets", "lora.bias", "lora.modules_to_save",
                  "lora.layers_to_transform", "lora.rank_pattern", "lora.alpha_pattern", "lora.use_rslora",
                  "lora.use_dora", "lora.init_lora_weights")


def check_start(folder, model: torch.nn.Module) -> list[str]:
    """Problems loading the adapter in folder onto model (its module tree, meta device is enough): targets that
    match no module, weights whose shapes do not fit (an adapter trained on another model)."""

    where = f"trainer.init_adapter {str(folder)!r}"
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return [f"{where} has no adapter_model.safetensors (only safetensors adapters are loaded)"]
    named = dict(model.named_modules())
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    missing = [t for t in targets if not any(_matches(n, t) for n in named)] if not isinstance(
        config.get("target_modules"), str) else []
    if missing:
        return [f"{where} targets {', '.join(missing)}, which match no module of {type(model).__name__}: it was "
                f"trained on another model ({config.get('base_model_name_or_path')})"]
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            found = lora_key(key)
            module = named.get(found[0]) if found else None
            if module is None or not hasattr(module, "in_features"):
                continue
            shape = f.get_slice(key).get_shape()
            size = module.in_features if found[1] == "A" else module.out_features
            if shape[1 if found[1] == "A" else 0] != size:
                return [f"{where} does not fit this model: {key} has shape {tuple(shape)}, but {found[0]} is "
                        f"{module.in_features} -> {module.out_features}; it was trained on another model "
                        f"({config.get('base_model_name_or_path')})"]
    return []


def detach(peft_model) -> torch.nn.Module:
    """Remove the adapter layers, returning the base model exactly as it was."""
    base = peft_model.unload()
    if getattr(base, "is_activation_checkpointing", False):
        base.activation_checkpointing_disable()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attr, None)
    return base


@contextlib.contextmanager
def trainer_patches_undone(model: torch.nn.Module):
    """Undo, on exit, what a Trainer leaves on a shared model: TRL (fused LM head) and accelerate (autocast)
    replace `model.forward` on the instance and turn `config.use_cache` off. Left alone, every trial would
    wrap the base's forward once more, and later generation would run through the wrappers."""
    own_forward, use_cache = model.__dict__.get("forward"), model.config.use_cache
    try:
        yield model
    finally:
        for attr in ("_original_forward", "_is_accelerate_prepared", "forward"):
            model.__dict__.pop(attr, None)
        if own_forward is not None:
            model.forward = own_forward
        model.config.use_cache = use_cache


@contextlib.contextmanager
def compact_lm_head(enabled: bool = True):
    """TRL's fused LM head, scoring only the positions that have a label on CPU too.

    SFTTrainer projects hidden states through the LM head in tiles (`trl.trainer.utils.add_fused_lm_head`).
    Where Triton runs (CUDA, XPU) it scores only the positions whose next token has a label (the completion).
    Elsewhere it scores every position, prompt and padding included, so that compiled Neuron graphs keep one
    shape. Eager CPU has no such graphs. On the embedded default the completion is about 13% of a row's
    tokens (chat template included), so the head's projections and softmax passes over the 49k-token
    vocabulary did several times the work they need to (results/bench/throughput.json, arm full_lm_head,
    records what this is worth: x1.72 tokens/s, with the same losses).

    TRL makes that choice through `_use_triton` in `trl.trainer.utils`, read on every forward. This swaps it
    for the length of a run, so a plain TRL trainer in the same process is left as TRL makes it. Only which
    rows go through the head changes: the kernels are TRL's, and they still pick their torch (not Triton) code
    path from their own module on CPU."""
    from trl.trainer import utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)  # None if a later TRL moves it: TRL's own choice stays
    if not enabled or use_triton is None:
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = use_triton


def init_adapter_dir(value: str, results_dir: str) -> tuple[Path | None, str | None]:
    """trainer.init_adapter as a folder holding adapter_config.json: the folder itself, or the promoted adapter of
    the study of that name (results/<study>/full/adapter); (None, the problem) when neither exists."""
    folder = Path(value).expanduser()
    study = Path(results_dir) / str(value) / "full" / "adapter"
    for candidate in (folder, study):
        if (candidate / "adapter_config.json").is_file():
            return candidate, None
    if folder.is_dir():
        return None, f"trainer.init_adapter: {value!r} is a folder without adapter_config.json (not a PEFT adapter)"
    return None, (f"trainer.init_adapter: {value!r} is neither an adapter folder (with adapter_config.json) nor a "
                  f"study with a promoted adapter ({study} does not exist); give the folder a `train` or promotion "
                  "wrote, or the name of a study whose search and promotion finished")
