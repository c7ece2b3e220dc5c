"""The data report: rows read, rows dropped and why, duplicates, train/eval leakage, and (given the tokenizer)
token counts and rows whose completion is truncated at trainer.max_length, counted the way TRL tokenizes."""

from __future__ import annotations

import json
import logging
import math

log = logging.getLogger(__name__)


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def duplicates(rows: list[dict]) -> int:
    """Rows that repeat an earlier row's prompt and completion (or prompt, chosen and rejected)."""
    seen = set()
    count = 0
    for r in rows:
        key = _key([r.get(k) for k in ("prompt", "completion", "chosen", "rejected")])
        count += key in seen
        seen.add(key)
    return count


def build(train_stats: dict, eval_stats: dict, train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """The report of converted rows (message lists): what each file gave, duplicates, leakage."""
    train_prompts = {_key(r["prompt"]) for r in train_rows}
    leaked = [i for i, r in enumerate(eval_rows) if _key(r["prompt"]) in train_prompts]
    return {
        "train": {**train_stats, "duplicates": duplicates(train_rows)},
        "eval": {**eval_stats, "duplicates": duplicates(eval_rows)},
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "leakage": len(leaked),  # eval rows whose prompt is also a train row's prompt
        "leakage_first_eval_row": leaked[0] + 1 if leaked else None,
    }


def row_tokens(row: dict, tokenizer) -> tuple[list[int], int]:
    """A prompt/completion row's token ids and where its completion starts, as TRL 1.16's SFTTrainer builds them:
    chat rows through the chat template (the prompt with the generation prompt; the completion begins where the
    prompt's ids and the whole conversation's ids diverge), raw rows as prompt + completion + EOS."""
    from trl.data_utils import _tokenize, common_prefix_length

    if isinstance(row["prompt"], list):
        prompt_ids = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
        ids = _tokenize(tokenizer, row["prompt"] + row["completion"])["input_ids"]
    else:
        completion = row["completion"]
        if not completion.endswith(tokenizer.eos_token):  # TRL's add_eos
            completion += tokenizer.eos_token
        prompt_ids = _tokenize(tokenizer, row["prompt"])["input_ids"]
        ids = _tokenize(tokenizer, row["prompt"] + completion)["input_ids"]
    return list(ids), common_prefix_length(prompt_ids, ids)


def pair_tokens(row: dict, tokenizer) -> tuple[list[int], list[int], int]:
    """A preference pair's prompt+chosen and prompt+rejected token ids and where the answers start, as TRL 1.16's
    DPOTrainer builds them (the chat template, or raw text with EOS after each answer)."""
    from trl.data_utils import _tokenize, common_prefix_length

    if isinstance(row["prompt"], list):
        prompt_ids = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
        chosen = _tokenize(tokenizer, row["prompt"] + row["chosen"])["input_ids"]
        rejected = _tokenize(tokenizer, row["prompt"] + row["rejected"])["input_ids"]
    else:
        eos = tokenizer.eos_token

        def answer(text):  # TRL's add_eos
            return text if text.endswith(eos) else text + eos

        prompt_ids = _tokenize(tokenizer, row["prompt"])["input_ids"]
        chosen = _tokenize(tokenizer, row["prompt"] + answer(row["chosen"]))["input_ids"]
        rejected = _tokenize(tokenizer, row["prompt"] + answer(row["rejected"]))["input_ids"]
    start = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
    return list(chosen), list(rejected), start


def percentile(values: list[int], q: float) -> int | None:
    """The nearest-rank q-th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def add_tokens(report: dict, data, tokenizer, max_length: int) -> dict:
    """Count every train and eval row's tokens; add lengths (p50, p95, max) and truncation at max_length."""
    out = {"max_length": max_length}
    for part in ("train", "eval"):
        lengths, truncated, prompt_fills = [], 0, 0
        for row in getattr(data, part):
            if "chosen" in row:  # a pair: its longer answer decides
                chosen, rejected, start = pair_tokens(row, tokenizer)
                ids = max(chosen, rejected, key=len)
            else:
                ids, start = row_tokens(row, tokenizer)
            lengths.append(len(ids))
            truncated += len(ids) > max_length
            prompt_fills += start >= max_length  # nothing of the completion is left: TRL drops the row
        out[part] = {"p50": percentile(lengths, 50), "p95": percentile(lengths, 95), "max": max(lengths, default=0),
                     "truncated": truncated, "prompt_fills_max_length": prompt_fills}
    report["tokens"] = out
    report["truncated"] = out["train"]["truncated"] + out["eval"]["truncated"]
    return report


def warn(report: dict) -> None:
    """A WARNING log line for truncated rows and for train/eval leakage."""
    tokens = report.get("tokens")
    if tokens and report.get("truncated"):
        log.warning("%d train and %d eval rows are longer than trainer.max_length=%d: their completions are "
                    "truncated (%d rows lose the whole completion); raise trainer.max_length or shorten them",
                    tokens["train"]["truncated"], tokens["eval"]["truncated"], tokens["max_length"],
                    tokens["train"]["prompt_fills_max_length"] + tokens["eval"]["prompt_fills_max_length"])
    if report.get("leakage"):
        log.warning("%d eval rows have a prompt that is also in the train rows (first: eval row %d): the eval "
                    "measures memorization there", report["leakage"], report["leakage_first_eval_row"])


def summary(report: dict) -> dict:
    """The report's counts as flat metrics (data_*)."""
    out = {"data_rows_read": report["train"]["rows_read"],
           "data_rows_dropped": sum(d["rows"] for d in report["train"]["dropped"].values()),
           "data_duplicates": report["train"]["duplicates"], "data_leakage": report["leakage"]}
    if "tokens" in report:
        out["data_truncated"] = report["truncated"]
    return out


def render(report: dict) -> str:
    """The report as lines of text."""
    lines = []
    for part in ("train", "eval"):
        s = report[part]
        dropped = "; ".join(f"{d['rows']} {r} (first at {d['first']})" for r, d in s["dropped"].items())
        lines.append(f"{part}: {s['source']} ({s['layout']} layout): {s['rows_read']} rows read, "
                     f"{s['usable']} usable" + (f", dropped: {dropped}" if dropped else ", none dropped")
                     + f", {s['duplicates']} duplicate rows")
    lines.append(f"rows used: {report['train_rows']} train, {report['eval_rows']} eval; "
                 f"leakage: {report['leakage']} eval rows share a prompt with a train row"
                 + (f" (first: eval row {report['leakage_first_eval_row']})" if report["leakage"] else ""))
    tokens = report.get("tokens")
    if tokens:
        for part in ("train", "eval"):
            t = tokens[part]
            lines.append(f"tokens per {part} row: p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; "
                         f"{t['truncated']} rows longer than max_length {tokens['max_length']} (completion truncated)"
                         + (f", {t['prompt_fills_max_length']} with no completion left" if t["prompt_fills_max_length"]
                            else ""))
    return "\n".join(lines)
