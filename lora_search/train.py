"""One LoRA training run on an already loaded base: attach a fresh adapter, train it with TRL's
SFTTrainer (loss on completion tokens only), evaluate, save, and remove it again.

The base model and the tokenized data belong to the Worker and are reused by every run, so a
sweep pays for loading and tokenizing once.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_search import adapters, evaluate, hardware
from lora_search.evaluate import StepTimer, final_eval, timed_evaluate
from lora_search.data import TaskData
from lora_search.models import Base
from lora_search.schema import RunConfig

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """What a process loads once and every run reuses."""

    base: Base
    data: TaskData
    tokenized: dict = field(default_factory=dict)  # data_key(...) -> (train, eval), tokenized by TRL
    baseline: dict | None = None  # base model's eval loss and exact match, computed once


def trained_on(worker: Worker) -> dict:
    """What a run on this worker trains on: the base as loaded (name, quantization read off the model, dtype) and
    the data's row counts."""
    qc = getattr(worker.base.model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    quant = "int8" if qc.get("load_in_8bit") else qc.get("bnb_4bit_quant_type", "4bit") if qc.get("load_in_4bit") \
        else "none"
    return {"base_model": worker.base.name, "base_quant": quant, "base_dtype": str(worker.base.dtype).split(".")[-1],
            "train_rows": len(worker.data.train), "eval_data_rows": len(worker.data.eval)}


# Attention implementations that keep padding-free rows apart by their position_ids: transformers builds a
# block-diagonal mask over the whole flattened batch for sdpa/eager/flex (correct, but attention then costs
# (sum of lengths)^2, which ate the padding saved: x0.98-1.06 on SmolLM2/CPU, within run-to-run noise, in
# benchmarks/throughput.py), and passes
# sequence boundaries to the flash kernels (varlen: no mask, no padding; the win).
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def padding_free(cfg: RunConfig, model) -> bool:
    """Whether this run batches its rows padding-free (`trainer.padding_free`; auto: on with a flash-attention
    kernel, off otherwise; true forces it wherever the attention keeps rows apart)."""
    setting = cfg.trainer.padding_free
    if setting in (True, False):
        return setting
    if cfg.trainer.packing:  # TRL's BFD packing is padding-free already
        return False
    config = getattr(model, "config", None)
    attn = str(getattr(config, "_attn_implementation", None) or "")
    if "flash" not in attn:
        return False
    # Linear-attention and convolution layers (Gated DeltaNet, Mamba, ...) ignore position_ids boundaries.
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ())
    return kinds <= {"full_attention", "sliding_attention", "chunked_attention"}


def sft_config(cfg: RunConfig, out_dir: Path, report_to: list[str], padding_free: bool = False):
    """TRL's SFTConfig for a run config (padding_free: rows concatenated per batch, truncated by us)."""
    from trl import SFTConfig

    t = cfg.trainer
    mode = hardware.precision(t.precision)
    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        # TRL refuses max_length with padding-free batches unless packing: the rows are truncated by _trainer
        max_length=None if padding_free and not t.packing else t.max_length,
        packing=t.packing,
        padding_free=padding_free,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=mode == "bf16",
        fp16=mode == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a diverging run must show its NaN loss
        eval_strategy="steps" if t.eval_every else "no",
        eval_steps=t.eval_every or None,
        save_strategy="no",
        report_to=report_to,
        run_name=out_dir.name,
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def truncated(dataset, max_length: int):
    """Tokenized rows cut to max_length tokens (every per-token column), keeping the start as TRL does."""
    if dataset is None or "input_ids" not in dataset.column_names:
        return dataset
    if max(len(ids) for ids in dataset["input_ids"]) <= max_length:
        return dataset

    def cut(row):
        n = len(row["input_ids"])
        return {k: v[:max_length] for k, v in row.items() if isinstance(v, list) and len(v) == n}

    return dataset.map(cut, desc=f"Truncating to {max_length} tokens")


def data_key(cfg: RunConfig, padding_free: bool) -> tuple:
    """What the tokenized data depends on: runs that agree on it share one tokenized copy."""
    return cfg.trainer.max_length, cfg.trainer.packing, padding_free, repr(cfg.data)


def _trainer(worker: Worker, peft_model, args, cfg: RunConfig, callbacks):
    from trl import SFTTrainer

    key = data_key(cfg, args.padding_free)
    cached = worker.tokenized.get(key)
    if cached:  # already tokenized, labelled, truncated (and packed): TRL would map over every row again
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    trainer = SFTTrainer(
        model=peft_model,
        args=args,
        train_dataset=cached[0] if cached else worker.data.train,
        eval_dataset=cached[1] if cached else worker.data.eval,
        processing_class=worker.base.tokenizer,
        callbacks=list(callbacks),
    )
    if not cached:
        if args.padding_free and args.max_length is None:
            trainer.train_dataset = truncated(trainer.train_dataset, cfg.trainer.max_length)
            trainer.eval_dataset = truncated(trainer.eval_dataset, cfg.trainer.max_length)
        worker.tokenized[key] = (trainer.train_dataset, trainer.eval_dataset)
    full_eval = worker.tokenized[key][1]
    trainer.eval_dataset = full_eval.select(range(min(cfg.trainer.eval_subset, len(full_eval))))
    return trainer, full_eval


def _release(worker: Worker, trainer, peft_model) -> None:
    """Free the trainer's accelerator state and take the adapter off the worker's base (the caller then drops
    its references and collects)."""
    if trainer is not None:
        trainer.accelerator.free_memory()
    worker.base.model = adapters.detach(peft_model)
    worker.base.model.eval()


def prepare_data(worker: Worker, cfg: RunConfig) -> float:
    """Tokenize the worker's data the way cfg's runs will, through TRL's SFTTrainer, before the first run.

    A sweep calls it once per worker with the trial config before sampling: the first trial then starts
    training as soon as later ones do, and bad data fails here, not in a trial. Returns the seconds spent
    (0 when that key is tokenized already)."""
    if data_key(cfg, padding_free(cfg, worker.base.model)) in worker.tokenized:
        return 0.0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-search-tokenize-") as tmp, \
            adapters.trainer_patches_undone(worker.base.model):
        peft_model = adapters.attach(worker.base.model, cfg.lora, cfg.model)  # SFTTrainer wants a trainable model
        trainer = None
        try:
            args = sft_config(cfg, Path(tmp), [], padding_free(cfg, worker.base.model))
            trainer, full_eval = _trainer(worker, peft_model, args, cfg, [])
            train_rows, eval_rows = len(trainer.train_dataset), len(full_eval)
        finally:
            _release(worker, trainer, peft_model)
            del trainer, peft_model
            hardware.release_memory()
    seconds = time.perf_counter() - t0
    log.info("tokenized %d train and %d eval rows once for this worker (%.1f s)", train_rows, eval_rows, seconds)
    return seconds


def _exact_match(model, worker: Worker, cfg: RunConfig) -> dict:
    n = cfg.trainer.exact_match_items
    if not (cfg.data.exact_match and n):
        return {}
    return evaluate.score(model, worker.base.tokenizer, worker.data.eval_prompts(n), worker.data.eval_answers[:n],
                          cfg.trainer.max_new_tokens, cfg.trainer.eval_batch_size)


def baseline(worker: Worker, cfg: RunConfig, trainer, full_eval, peft_model) -> dict:
    """The base model's eval loss and exact match (adapter disabled), computed once per worker."""
    if worker.baseline is None:
        log.info("evaluating the base model (once per worker)")
        with peft_model.disable_adapter():
            loss = trainer.evaluate(eval_dataset=full_eval)["eval_loss"]
            em = _exact_match(peft_model, worker, cfg)
        worker.baseline = {"base_eval_loss": loss, "base_perplexity": math.exp(min(loss, 50)),
                           "base_exact_match": em.get("exact_match"), "base_samples": em.get("samples")}
        log.info("base model: eval loss %.4f%s", loss,
                 f", exact match {em['exact_match']:.0%}" if em else "")
    return worker.baseline


def train_adapter(worker: Worker, cfg: RunConfig, out_dir: Path, callbacks=(), report_to=(),
                  with_baseline: bool = True, save: bool = True) -> dict:
    """Attach a fresh adapter to the worker's base, train, evaluate, save it; the base is left as it was."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    undone = adapters.trainer_patches_undone(worker.base.model)
    with undone, adapters.compact_lm_head(cfg.trainer.compact_lm_head) as compact:
        metrics = _train(worker, cfg, out_dir, callbacks, report_to, with_baseline, save, t_start)
    return {**metrics, "compact_lm_head": compact}


def _train(worker: Worker, cfg: RunConfig, out_dir: Path, callbacks, report_to, with_baseline, save, t_start) -> dict:
    from transformers import set_seed

    set_seed(cfg.trainer.seed)  # the adapter's initial weights: the same params give the same run, whatever ran before
    peft_model = adapters.attach(worker.base.model, cfg.lora, cfg.model)
    trainer = None
    try:
        trainable, total = peft_model.get_nb_trainable_parameters()
        timer = StepTimer()
        args = sft_config(cfg, out_dir, list(report_to), padding_free(cfg, worker.base.model))
        trainer, full_eval = _trainer(worker, peft_model, args, cfg, [timer, *callbacks])
        metrics = dict(baseline(worker, cfg, trainer, full_eval, peft_model)) if with_baseline else {}
        set_seed(cfg.trainer.seed)  # as SFTTrainer left it: the baseline's evals must not shift the data order
        evals = timed_evaluate(trainer)  # after the baseline: its eval is not this run's
        setup_s = time.perf_counter() - t_start
        log.info("training %s steps: r=%s alpha=%s dropout=%s targets=%s lr=%.2e", cfg.trainer.max_steps,
                 cfg.lora.r, cfg.lora.alpha_ratio * cfg.lora.r if cfg.lora.alpha_ratio else cfg.lora.alpha,
                 cfg.lora.dropout, cfg.lora.targets, cfg.trainer.learning_rate)
        with hardware.PeakMemory() as peak:
            t0 = time.perf_counter()
            output = trainer.train()
            loop_s, periodic_eval_s = time.perf_counter() - t0, evals["seconds"]
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            t0 = time.perf_counter()
            final = final_eval(trainer, cfg, full_eval, evals)
            final_eval_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            em = _exact_match(peft_model, worker, cfg)
            em_s = time.perf_counter() - t0
        tokens = int(trainer.state.num_input_tokens_seen)
        metrics.update({
            "eval_loss": final["eval_loss"],
            "perplexity": math.exp(min(final["eval_loss"], 50)),
            "exact_match": em.get("exact_match"),
            "samples": em.get("samples"),
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "train_loss_mean": output.training_loss,
            "steps": trainer.state.global_step,
            "train_tokens": tokens,
            "train_step_s": timer.seconds,
            "train_tokens_per_s": tokens / timer.seconds if timer.seconds else None,
            "peak_memory_mb": round(peak.peak_mb, 1),
            "trainable_params": trainable,
            "total_params": total,
            "setup_s": setup_s,
            "train_loop_s": loop_s,  # trainer.train(): optimizer steps + periodic evals + the rest
            "periodic_eval_s": periodic_eval_s,  # the evals pruning reads
            "final_eval_s": final_eval_s,
            "exact_match_s": em_s,
            "padding_free": args.padding_free,
            "eval_rows": len(full_eval) if cfg.trainer.final_eval == "full" else len(trainer.eval_dataset),
            **trained_on(worker),
        })
        if save:
            peft_model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        metrics["wall_s"] = time.perf_counter() - t_start
        return metrics
    finally:
        _release(worker, trainer, peft_model)
        del trainer, peft_model
        hardware.release_memory()
