"""Greedy answers to held-out prompts, formatted exactly as in training, scored against the reference answers (exact
match for exact answers, ROUGE-L and BLEU for free text); the timing of a trainer's optimizer steps and evals, and a
run's final eval."""

from __future__ import annotations

import re
import time

import torch
from rouge_score import rouge_scorer, tokenizers
from sacrebleu.metrics import BLEU
from transformers import TrainerCallback

from lora_search.config.schema import RunConfig
from lora_search.data import load


def prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Prompts as the model sees them: the chat template with the generation prompt, or raw text."""
    if prompts and isinstance(prompts[0], list):
        return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return list(prompts)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16) -> tuple[list[str], dict]:
    """Greedy completions for prompts (left-padded batches), with timing: (answers, stats)."""
    texts = prompt_texts(tokenizer, prompts)
    chat = bool(prompts) and isinstance(prompts[0], list)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers, new_tokens, t0 = [], 0, time.perf_counter()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not chat).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            gen = out[:, batch["input_ids"].shape[1] :]
            for row in gen:
                row = row[row != tokenizer.pad_token_id]
                new_tokens += int(row.numel())
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    seconds = time.perf_counter() - t0
    return answers, {"seconds": seconds, "new_tokens": new_tokens}


def normalize(text: str) -> str:
    """Whitespace collapsed, a trailing period dropped: formatting noise that is not the answer."""
    return re.sub(r"\s+", " ", text).strip().removesuffix(".").strip()


def exact_match_rows(predictions: list[str], references: list[str]) -> list[int]:
    """Per item: 1 where the prediction equals its reference after normalize(), else 0 (in item order)."""
    return [int(normalize(p) == normalize(r)) for p, r in zip(predictions, references)]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after normalize()."""
    if not references:
        return 0.0
    return sum(exact_match_rows(predictions, references)) / len(references)


def rows_fingerprint(rows) -> str:
    """A short fingerprint of the eval rows a run was scored on, in order (tokenized rows, or prompts with their
    answers): runs whose per-row scores share it were scored on the same rows (core/paired)."""
    return load.fingerprint(list(rows))[:16]


def tokens_fingerprint(dataset) -> str:
    """rows_fingerprint of a tokenized eval set (datasets.Dataset): its token-id and mask columns, row by row."""
    return rows_fingerprint(dataset.select_columns([c for c in dataset.column_names if c.endswith(("_ids", "mask"))]))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming), 0..1, over the prediction/reference pairs."""
    if not references:
        return 0.0

    # the tokenizer given explicitly: without one, rouge-score logs through absl, whose first use hangs a handler
    # on the root logger bound to whatever sys.stderr is at that moment (a closed capture file, later, in tests)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, its 0-100 scale) of the predictions against one reference each, after normalize();
    effective order: n-gram orders the answers are too short to have are left out, so matching one-word answers
    score 100, not 0."""
    if not references:
        return 0.0

    scorer = BLEU(effective_order=True)
    result = scorer.corpus_score([normalize(p) for p in predictions], [[normalize(r) for r in references]])
    return min(100.0, float(result.score))  # float rounding can put a perfect score a hair above 100


def score(model, tokenizer, prompts: list, references: list[str], max_new_tokens: int, batch_size: int) -> dict:
    """Greedy answers (one generation pass) scored by exact match, ROUGE-L and BLEU, with a few samples for the
    record."""
    answers, stats = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    samples = [{"answer": a, "reference": r} for a, r in list(zip(answers, references))[:4]]
    rows = exact_match_rows(answers, references)
    items = rows_fingerprint({"prompt": p, "answer": r} for p, r in zip(prompts, references))
    return {"exact_match": sum(rows) / len(references) if references else 0.0, "exact_match_rows": rows,
            "exact_match_rows_fingerprint": items,
            "rouge_l": rouge_l(answers, references), "bleu": bleu(answers, references), "generate_s": stats["seconds"],
            "samples": samples, "answers": answers}


class StepTimer(TrainerCallback):
    """Time spent inside optimizer steps, so tokens/s leaves evals and setup out."""

    def __init__(self):
        self.seconds, self._t0 = 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None


def timed_evaluate(trainer) -> dict:
    """Make trainer.evaluate record its seconds and last result (periodic and final evals alike)."""
    stats = {"seconds": 0.0, "count": 0, "last": None}
    original = trainer.evaluate

    def evaluate(*args, **kwargs):
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        stats["seconds"] += time.perf_counter() - t0
        stats["count"] += 1
        stats["last"] = (trainer.state.global_step, kwargs.get("eval_dataset") is None, result)
        return result

    trainer.evaluate = evaluate
    return stats


def final_eval(trainer, cfg: RunConfig, full_eval, evals: dict) -> dict:
    """The run's final eval: every row, or the subset (reusing a periodic eval on the last step)."""
    if cfg.trainer.final_eval == "full":
        subset, trainer.eval_dataset = trainer.eval_dataset, full_eval  # as the trainer's own set: DPOTrainer
        try:  # re-tokenizes a set passed to evaluate()
            return trainer.evaluate()
        finally:
            trainer.eval_dataset = subset
    last = evals["last"]
    if last and last[0] == trainer.state.global_step and last[1]:
        return last[2]
    return trainer.evaluate()


@torch.inference_mode()
def row_losses(trainer, model, dataset, chunk: int = 4) -> list[float]:
    """Each eval row's mean loss over its labelled (completion) tokens, in row order: one extra forward pass over
    the rows the final eval scored (TRL's fused LM head gives the eval loss but no logits, and TRL deprecates
    compute_metrics on logits for that reason). Rows with no labelled token are left out."""
    was_training = model.training
    model.eval()
    out = []
    try:
        device = next(model.parameters()).device
        loader = trainer.get_eval_dataloader(dataset)
        for batch in loader:
            labels = batch["labels"]
            for start in range(0, len(labels), chunk):  # a few rows at a time: the logits span the vocabulary
                part = {k: v[start:start + chunk].to(device) for k, v in batch.items()
                        if k in ("input_ids", "attention_mask", "position_ids") and hasattr(v, "to")}
                logits = model(**part).logits[:, :-1, :].float()
                target = labels[start:start + chunk, 1:].to(device)
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
                mask = target != -100
                for row, keep in zip(nll, mask):
                    if keep.any():
                        out.append(float(row[keep].mean()))
    finally:
        model.train(was_training)
    return out
