"""One LoRA training run on an already loaded base: attach a fresh adapter (or `trainer.init_adapter`), train it with
TRL's SFTTrainer (trainer=sft, sft.py), DPOTrainer (trainer=dpo, dpo.py) or GRPOTrainer / RLOOTrainer (trainer=grpo,
rloo: grpo.py), evaluate, save, and remove it again.

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

from lora_search.config.schema import GENERATION_METRICS, RunConfig
from lora_search.core import hardware, stats
from lora_search.data.load import TaskData
from lora_search.models import adapters
from lora_search.models.adapters import init_adapter_dir
from lora_search.models.loaders import Base
from lora_search.train import dpo, evaluate, grpo
from lora_search.train.evaluate import StepTimer, final_eval, timed_evaluate
from lora_search.train.sft import data_key, make_trainer, padding_free, sft_config  # noqa: F401 (padding_free: tests)

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """What a process loads once and every run reuses."""

    base: Base
    data: TaskData
    tokenized: dict = field(default_factory=dict)  # data_key(...) -> (train, eval), tokenized by TRL
    baseline: dict | None = None  # base model's eval loss and answer scores (dpo: preference accuracy), computed once


def trained_on(worker: Worker) -> dict:
    """What a run on this worker trains on: the base as loaded (name, quantization read off the model, dtype) and
    the data's row counts."""
    qc = getattr(worker.base.model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    quant = "int8" if qc.get("load_in_8bit") else qc.get("bnb_4bit_quant_type", "4bit") if qc.get("load_in_4bit") \
        else "none"
    return {"base_model": worker.base.name, "base_quant": quant, "base_dtype": str(worker.base.dtype).split(".")[-1],
            "train_rows": len(worker.data.train), "eval_data_rows": len(worker.data.eval)}


def adapter_mb(peft_model) -> float:
    """The trained adapter's size in MB: its trainable tensors as save_pretrained writes them (TRL's frozen
    reference copy, if any, left out)."""
    return sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad) / 2**20


def _release(worker: Worker, trainer, peft_model) -> None:
    """Free the trainer's accelerator state and take the adapter off the worker's base (the caller then drops
    its references and collects)."""
    if trainer is not None:
        trainer.accelerator.free_memory()
    worker.base.model = adapters.detach(peft_model)
    worker.base.model.eval()


def diverged(log_history: list[dict], eval_loss: float | None) -> str | None:
    """Why a run diverged (its first NaN or infinite training loss, else a non-finite final eval loss), or None."""
    for entry in log_history:
        if "loss" in entry and not math.isfinite(entry["loss"]):
            return f"diverged: training loss {entry['loss']} at step {entry.get('step')}"
    if eval_loss is not None and not math.isfinite(eval_loss):
        return f"diverged: eval loss {eval_loss} after training"
    return None


def _tokenized_key(cfg: RunConfig, model) -> tuple:
    rl = cfg.trainer.method in grpo.METHODS
    return dpo.data_key(cfg) if cfg.trainer.method == "dpo" else grpo.data_key(cfg) if rl else \
        data_key(cfg, padding_free(cfg, model))


def _attach(worker: Worker, cfg: RunConfig):
    """The run's adapter on the worker's base: fresh from cfg.lora, or trainer.init_adapter's (trainable, with
    cfg.lora.dropout)."""
    start = init_adapter_dir(cfg.trainer.init_adapter, cfg.results_dir)[0] if cfg.trainer.init_adapter else None
    return adapters.attach(worker.base.model, cfg.lora, cfg.model, start)


def _trainer(worker: Worker, peft_model, cfg: RunConfig, out_dir: Path, report_to, callbacks):
    """The method's TRL trainer (its evaluations neutral to the random state) and the full tokenized eval set."""
    if cfg.trainer.method == "dpo":
        args = dpo.dpo_config(cfg, out_dir, list(report_to))
        trainer, full_eval = dpo.make_trainer(worker, peft_model, args, cfg, callbacks,
                                              fresh=not cfg.trainer.init_adapter)
    elif cfg.trainer.method in grpo.METHODS:
        trainer, full_eval = grpo.make_trainer(worker, peft_model, cfg, out_dir, list(report_to), callbacks,
                                               fresh=not cfg.trainer.init_adapter)
    else:
        args = sft_config(cfg, out_dir, list(report_to), padding_free(cfg, worker.base.model))
        trainer, full_eval = make_trainer(worker, peft_model, args, cfg, callbacks)
    trainer.evaluate = _random_state_kept(trainer.evaluate)
    return trainer, full_eval


def _random_state_kept(evaluate):
    """evaluate, leaving torch's random state as it found it: each eval's data loader draws a seed from it, which
    would shift every later dropout mask. So a run evaluated at its pruner's rungs trains exactly the run that is not
    evaluated (a trial that reaches the promotion budget is the promotion's run)."""
    def wrapped(*args, **kwargs):
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(*args, **kwargs)

    return wrapped


def prepare_data(worker: Worker, cfg: RunConfig) -> float:
    """Tokenize the worker's data the way cfg's runs will, through TRL's trainer, before the first run.

    A sweep calls it once per worker with the trial config before sampling: the first trial then starts
    training as soon as later ones do, and bad data fails here, not in a trial. Returns the seconds spent
    (0 when that key is tokenized already)."""
    if _tokenized_key(cfg, worker.base.model) in worker.tokenized:
        return 0.0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-search-tokenize-") as tmp, \
            adapters.trainer_patches_undone(worker.base.model):
        peft_model = _attach(worker, cfg)  # TRL's trainers want a trainable model
        trainer = None
        try:
            trainer, full_eval = _trainer(worker, peft_model, cfg, Path(tmp), [], [])
            train_rows, eval_rows = len(trainer.train_dataset), len(full_eval)
        finally:
            _release(worker, trainer, peft_model)
            del trainer, peft_model
            hardware.release_memory()
    seconds = time.perf_counter() - t0
    log.info("tokenized %d train and %d eval rows once for this worker (%.1f s)", train_rows, eval_rows, seconds)
    return seconds


def _generation(model, worker: Worker, cfg: RunConfig) -> dict:
    """Greedy answers to the first trainer.exact_match_items eval prompts, scored against the reference answers
    (prompt/completion data): ROUGE-L and BLEU, and exact match when the answers are exact (data.exact_match)."""
    n = cfg.trainer.exact_match_items
    if not n or worker.data.kind != "sft":
        return {}
    scores = grpo.heldout_items(model, worker, cfg, n) if cfg.trainer.method in grpo.METHODS else evaluate.score(
        model, worker.base.tokenizer, worker.data.eval_prompts(n), worker.data.eval_answers[:n],
        cfg.trainer.max_new_tokens, cfg.trainer.eval_batch_size)  # grpo/rloo: and the answers' rewards
    return scores if cfg.data.exact_match else {k: v for k, v in scores.items() if not k.startswith("exact_match")}


def _preference(model, worker: Worker, cfg: RunConfig, pairs) -> dict:
    """Preference accuracy and log-prob margin of model on tokenized pairs, and per pair whether it prefers the
    chosen answer (0/1, the paired comparison's rows), timed."""
    t0 = time.perf_counter()
    chosen, rejected = dpo.pair_logps(model, worker.base.tokenizer, pairs, cfg.trainer.max_length,
                                      max(1, cfg.trainer.eval_batch_size // 2))
    rows = [int(c > r) for c, r in zip(chosen, rejected)]
    return {**dpo.preference_scores(chosen, rejected), "preference_rows": rows,
            "preference_rows_fingerprint": evaluate.tokens_fingerprint(pairs), "preference_s": time.perf_counter() - t0}


def baseline(worker: Worker, cfg: RunConfig, trainer, full_eval, peft_model) -> dict:
    """The base model's eval loss and answer scores (adapter disabled; dpo: its preference accuracy and margin on
    every eval pair), computed once per worker."""
    if worker.baseline is None and cfg.trainer.method == "dpo":
        log.info("scoring the base model's preferences (once per worker)")
        with peft_model.disable_adapter():
            scores = _preference(peft_model, worker, cfg, full_eval)
        worker.baseline = {f"base_{k}": scores[k] for k in ("preference_accuracy", "logp_margin")}
        log.info("base model: preference accuracy %.0f%% on %d eval pairs", 100 * scores["preference_accuracy"],
                 scores["preference_pairs"])
    if worker.baseline is None and cfg.trainer.method in grpo.METHODS:
        with peft_model.disable_adapter():
            em = _generation(peft_model, worker, cfg)
        worker.baseline = {f"base_{k}": em.get(k) for k in (*GENERATION_METRICS, "reward", "samples")}
        log.info("base model: held-out reward %.3f, exact match %s", em["reward"], em.get("exact_match"))
    if worker.baseline is None:
        log.info("evaluating the base model (once per worker)")
        with peft_model.disable_adapter():
            loss = trainer.evaluate(eval_dataset=full_eval)["eval_loss"]
            em = _generation(peft_model, worker, cfg)
        worker.baseline = {"base_eval_loss": loss, "base_perplexity": math.exp(min(loss, 50)),
                           **{f"base_{k}": em.get(k) for k in GENERATION_METRICS}, "base_samples": em.get("samples")}
        log.info("base model: eval loss %.4f%s%s", loss, f", exact match {em['exact_match']:.0%}" if "exact_match" in em
                 else "", f", ROUGE-L {em['rouge_l']:.3f}, BLEU {em['bleu']:.1f}" if em else "")
    return worker.baseline


def train_adapter(worker: Worker, cfg: RunConfig, out_dir: Path, callbacks=(), report_to=(),
                  with_baseline: bool = True, save: bool = True, rows_if=lambda eval_loss: True) -> dict:
    """Attach an adapter to the worker's base, train, evaluate, save it; the base is left as it was. rows_if(eval
    loss): whether to also record each eval row's loss (one forward pass over the scored rows; every trial does, for
    the report's paired comparison; benchmarks may skip it)."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    undone = adapters.trainer_patches_undone(worker.base.model)
    with undone, adapters.compact_lm_head(cfg.trainer.compact_lm_head) as compact:
        metrics = _train(worker, cfg, out_dir, callbacks, report_to, with_baseline, save, t_start, rows_if)
    return {**metrics, "compact_lm_head": compact}


def _train(worker: Worker, cfg: RunConfig, out_dir: Path, callbacks, report_to, with_baseline, save, t_start,
           rows_if=None) -> dict:
    from transformers import set_seed

    set_seed(cfg.trainer.seed)  # the adapter's initial weights: the same params give the same run, whatever ran before
    peft_model = _attach(worker, cfg)
    trainer = None
    try:
        timer = StepTimer()
        trainer, full_eval = _trainer(worker, peft_model, cfg, out_dir, report_to, [timer, *callbacks])
        trainable, total = peft_model.get_nb_trainable_parameters()  # after TRL's frozen reference copy, if any
        metrics = dict(baseline(worker, cfg, trainer, full_eval, peft_model)) if with_baseline else {}
        if cfg.trainer.init_adapter and cfg.trainer.method == "dpo":
            metrics.update({f"start_{k}": v for k, v in _preference(peft_model, worker, cfg, full_eval).items()
                            if k in ("preference_accuracy", "logp_margin")})
        set_seed(cfg.trainer.seed)  # as the trainer left it: the baseline's evals must not shift the data order
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
            em = _generation(peft_model, worker, cfg)
            em_s = time.perf_counter() - t0
            if cfg.trainer.method == "dpo":  # the pairs the final eval scored
                scored = full_eval if cfg.trainer.final_eval == "full" else trainer.eval_dataset
                metrics.update({**dpo.reward_metrics(final), **_preference(peft_model, worker, cfg, scored)})
        tokens = int(trainer.state.num_input_tokens_seen)
        if cfg.trainer.method in grpo.METHODS:
            metrics.update(grpo.run_metrics(trainer, em))
        why = diverged(trainer.state.log_history, final.get("eval_loss")) or metrics.get("rl_diverged")  # its statistics below are None or NaN
        if why:
            log.warning("%s: %s", out_dir.name, why)
        rows = None
        if cfg.trainer.method == "sft" and not trainer.args.padding_free and rows_if and rows_if(final["eval_loss"]):
            scored = full_eval if cfg.trainer.final_eval == "full" else trainer.eval_dataset
            rows = evaluate.row_losses(trainer, peft_model, scored)  # paired comparisons (padding-free: one flat row)
        if rows and len(rows) > 1:  # the fingerprint: trials are compared row by row only on the same rows
            metrics.update({"eval_row_losses": [round(x, 5) for x in rows], "eval_loss_rows": len(rows),
                            "eval_loss_se": stats.standard_error(rows),
                            "eval_row_losses_fingerprint": evaluate.tokens_fingerprint(scored)})
        metrics.update({
            "diverged": why,  # None, or why the run diverged (its NaN statistics are then no measurement)
            "eval_loss": final.get("eval_loss"),
            "perplexity": math.exp(min(final["eval_loss"], 50)) if cfg.trainer.method == "sft" else None,
            **{k: em.get(k) for k in GENERATION_METRICS},  # None: no answers generated (or, exact match, not exact)
            "samples": em.get("samples"),
            # per item 0/1, and which items: the report compares trials item by item (core/paired)
            **{k: em[k] for k in ("exact_match_rows", "exact_match_rows_fingerprint") if k in em},
            "exact_match_n": min(cfg.trainer.exact_match_items, len(worker.data.eval_answers))
            if em.get("exact_match") is not None else None,  # the answered items (the Wilson interval's n)
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "train_loss_mean": output.training_loss,
            "steps": trainer.state.global_step,
            "train_tokens": tokens,
            "train_step_s": timer.seconds,
            "train_tokens_per_s": tokens / timer.seconds if timer.seconds else None,
            "peak_memory_mb": round(peak.peak_mb, 1),
            "step_s": timer.seconds / trainer.state.global_step if trainer.state.global_step else None,
            "trainable_params": trainable,
            "adapter_mb": adapter_mb(peft_model),
            "total_params": total,
            "setup_s": setup_s,
            "train_loop_s": loop_s,  # trainer.train(): optimizer steps + periodic evals + the rest
            "periodic_eval_s": periodic_eval_s,  # the evals pruning reads
            "final_eval_s": final_eval_s,
            "exact_match_s": em_s,
            "padding_free": getattr(trainer.args, "padding_free", False),
            "method": cfg.trainer.method,
            "eval_rows": len(full_eval) if cfg.trainer.final_eval == "full" else len(trainer.eval_dataset),
            **trained_on(worker),
        })
        if save:
            # the trained adapter only (DPO on a starting adapter also holds TRL's frozen reference copy)
            peft_model.save_pretrained(out_dir / "adapter", safe_serialization=True, selected_adapters=["default"])
        metrics["wall_s"] = time.perf_counter() - t_start
        return metrics
    finally:
        _release(worker, trainer, peft_model)
        del trainer, peft_model
        hardware.release_memory()
