"""trainer=dpo: TRL's DPOTrainer on the worker's shared base, and preference scores of any model.

The reference is the base with the adapter disabled: TRL 1.16 copies a PeftModel's adapter to a frozen "ref" adapter
(right when training continues an existing adapter, `trainer.init_adapter`: the SFT model is the reference, the
LoRA guide's SFT-then-DPO recipe), so for a fresh adapter that copy is deleted again and TRL falls back to
`disable_adapter()`. No second copy of the base weights is ever made.

Preference accuracy is the share of pairs whose chosen answer has the higher summed log-probability (answer tokens
only, tokenized as DPOTrainer tokenizes them); TRL's reward accuracy compares the same log-probabilities relative to
the reference, so it is 0 before training by construction and cannot score a base model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from lora_search.config.schema import RunConfig
from lora_search.data.quality_report import pair_tokens
from lora_search.train.sft import common_arguments

log = logging.getLogger(__name__)
REF = "ref"  # the adapter name TRL 1.16 gives its reference copy


def dpo_config(cfg: RunConfig, out_dir: Path, report_to: list[str]):
    """TRL's DPOConfig for a run config (DPOConfig's own defaults differ: checkpointing and bf16 on, lr 1e-6)."""
    from trl import DPOConfig

    t = cfg.trainer
    return DPOConfig(**common_arguments(cfg, out_dir, report_to), beta=t.beta, loss_type=[t.loss_type],
                     label_smoothing=t.label_smoothing, max_length=t.max_length)


def data_key(cfg: RunConfig) -> tuple:
    """What DPO's tokenized data depends on."""
    return "dpo", cfg.trainer.max_length, repr(cfg.data)


def make_trainer(worker, peft_model, args, cfg: RunConfig, callbacks, fresh: bool):
    """A DPOTrainer on the worker's data (tokenized once per data key, then reused), its eval set cut to the fixed
    subset; returns (trainer, the full tokenized eval set). fresh: the adapter is new, so the reference is the base
    with the adapter disabled (TRL's copy of it is removed)."""
    from trl import DPOTrainer

    key = data_key(cfg)
    cached = worker.tokenized.get(key)
    # cached: one row each, only for the trainer's checks (its own set is put back below)
    one = worker.data.train.select(range(1))
    train, evals = (one, one) if cached else (worker.data.train, worker.data.eval)
    trainer = DPOTrainer(model=peft_model, ref_model=None, args=args, train_dataset=train, eval_dataset=evals,
                         processing_class=worker.base.tokenizer, callbacks=list(callbacks))
    if cached:  # already tokenized: TRL would tokenize every row again
        trainer.train_dataset = cached[0]
    else:
        worker.tokenized[key] = (trainer.train_dataset, trainer.eval_dataset)
    settle_reference(peft_model, fresh)
    full_eval = worker.tokenized[key][1]
    trainer.eval_dataset = full_eval.select(range(min(cfg.trainer.eval_subset, len(full_eval))))
    return trainer, full_eval


def settle_reference(peft_model, fresh: bool) -> None:
    """After TRL's trainer copied the adapter to a frozen "ref" adapter: for a fresh adapter the copy is removed (the
    reference is then the base with the adapter disabled); a starting adapter's copy stays, never trained."""
    if REF in peft_model.peft_config:
        if fresh:
            peft_model.delete_adapter(REF)
        else:
            for name, param in peft_model.named_parameters():
                if f".{REF}." in name:
                    param.requires_grad_(False)


def reward_metrics(result: dict) -> dict:
    """A DPO eval's loss, reward accuracy and reward margin under this project's names."""
    return {"eval_loss": result.get("eval_loss"), "reward_accuracy": result.get("eval_rewards/accuracies"),
            "reward_margin": result.get("eval_rewards/margins"), "eval_logps_chosen": result.get("eval_logps/chosen"),
            "eval_logps_rejected": result.get("eval_logps/rejected")}


def tokenize_pairs(rows, tokenizer) -> list[dict]:
    """Pairs as DPOTrainer tokenizes them (prompt_ids, chosen_ids, rejected_ids): datareport.pair_tokens, which
    uses TRL's own tokenization helpers."""
    out = []
    for row in rows:
        chosen, rejected, start = pair_tokens(row, tokenizer)
        out.append({"prompt_ids": chosen[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:]})
    return out


@torch.inference_mode()
def pair_logps(model, tokenizer, pairs, max_length: int | None, batch_size: int = 8) -> tuple[list, list]:
    """Summed log-probabilities of each tokenized pair's chosen and rejected answer tokens under model."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    rows = [{k: pairs[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(pairs))]
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start:start + batch_size])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:]
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            sums = (token_logps * batch["completion_mask"][:, 1:].to(device)).sum(dim=1).cpu()
            half = len(sums) // 2
            chosen += sums[:half].tolist()
            rejected += sums[half:].tolist()
    finally:
        model.train(was_training)
    return chosen, rejected


def preference_scores(chosen: list[float], rejected: list[float]) -> dict:
    """Preference accuracy (chosen above rejected) and the mean log-probability margin of scored pairs."""
    n = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"preference_accuracy": sum(m > 0 for m in margins) / n if n else math.nan,
            "logp_margin": sum(margins) / n if n else math.nan, "preference_pairs": n}


def reward_against(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> dict:
    """TRL's reward accuracy and margin of a tuned model against a reference, from both models' pair log-probs."""
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
    n = len(margins)
    return {"reward_accuracy": sum(m > 0 for m in margins) / n if n else math.nan,
            "reward_margin": sum(margins) / n if n else math.nan,
            "dpo_loss": sum(-torch.nn.functional.logsigmoid(torch.tensor(m)).item() for m in margins) / n if n else math.nan}
