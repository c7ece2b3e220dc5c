"""trainer=sft: TRL's SFTTrainer on the worker's shared base (loss on completion tokens only), its config, and
padding-free batching."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_search.config.schema import RunConfig
from lora_search.core import hardware


def padding_free(cfg: RunConfig, model) -> bool:
    """Whether this run batches its rows padding-free (`trainer.padding_free`; auto: on with a flash-attention
    kernel, off otherwise; true forces it wherever the attention keeps rows apart)."""
    # Why auto waits for flash: padding-free rows are kept apart by their position_ids. For sdpa/eager/flex
    # transformers builds a block-diagonal mask over the whole flattened batch (correct, but attention then costs
    # (sum of lengths)^2, which ate the padding saved: x0.98-1.06 on SmolLM2/CPU, within run-to-run noise, in
    # benchmarks/throughput.py); the flash kernels get the sequence boundaries (varlen: no mask, no padding).
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


def common_arguments(cfg: RunConfig, out_dir: Path, report_to: list[str]) -> dict:
    """The TrainingArguments every TRL trainer of a run shares (SFTConfig and DPOConfig add their own), set
    explicitly: TRL's configs default to checkpointing and bf16 on."""
    t = cfg.trainer
    mode = hardware.precision(t.precision)
    return dict(
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
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def sft_config(cfg: RunConfig, out_dir: Path, report_to: list[str], padding_free: bool = False):
    """TRL's SFTConfig for a run config (padding_free: rows concatenated per batch, truncated by us)."""
    from trl import SFTConfig

    t = cfg.trainer
    return SFTConfig(
        **common_arguments(cfg, out_dir, report_to),
        # TRL refuses max_length with padding-free batches unless packing: the rows are truncated by make_trainer
        max_length=None if padding_free and not t.packing else t.max_length,
        packing=t.packing,
        padding_free=padding_free,
        completion_only_loss=True,
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


def make_trainer(worker, peft_model, args, cfg: RunConfig, callbacks):
    """An SFTTrainer on the worker's data (tokenized once per data key, then reused), its eval set cut to the fixed
    subset; returns (trainer, the full tokenized eval set)."""
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
