"""Preference pairs (trainer=dpo): prompt/chosen/rejected rows in the layouts users have, converted to TRL's
conversational preference form (a prompt message list, a chosen and a rejected completion message list).

Layouts:
- `prompt`/`chosen`/`rejected`, each a string or a list of messages (TRL's explicit-prompt form);
- `chosen`/`rejected` only, whole dialogues (or texts) sharing a prefix: the prompt is the shared prefix (TRL's
  implicit-prompt form; `trl.data_utils.extract_prompt` splits them, as DPOTrainer does);
- both at once, as in UltraFeedback: a `prompt` string and dialogues that repeat it: the shared prefix is the prompt;
- any column names through `data.layout=columns data.columns.chosen=<col> data.columns.rejected=<col>`
  (`data.columns.prompt`, `data.columns.system` optional).
"""

from __future__ import annotations

from lora_search.config.schema import DataConfig

ROLES = ("prompt", "chosen", "rejected", "system")  # data.columns roles a pair reads


def is_pairs(layout: str, cfg: DataConfig) -> bool:
    """Whether a layout (with cfg's column mapping) holds preference pairs."""
    return layout == "preference" or (layout == "columns" and {"chosen", "rejected"} <= set(cfg.columns))


def columns(layout: str, cfg: DataConfig) -> dict[str, str]:
    """role -> column name for a pair layout (prompt and system only when mapped)."""
    if layout == "columns":
        return {role: cfg.columns[role] for role in ROLES if role in cfg.columns}
    return {"chosen": "chosen", "rejected": "rejected"}


def _is_dialogue(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _messages(value, role: str, text) -> list[dict]:
    if _is_dialogue(value):
        return [{"role": m.get("role"), "content": text(m.get("content"))} for m in value]
    return [{"role": role, "content": text(value)}]


def shared_prefix(chosen, rejected) -> int:
    """How many leading messages (or characters) chosen and rejected share: the implicit prompt's length. TRL's
    `extract_prompt` rule (a text prompt does not keep the space before the answers), without its edge cases (two
    equal or nested values, a first element that already differs after a trailing space)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return n


def to_pair(row: dict, layout: str, cfg: DataConfig, text) -> tuple[list[dict], list[dict], list[dict]]:
    """One row as (prompt messages, chosen messages, rejected messages); text(value) turns a cell into text (or
    raises layouts.NotText)."""
    cols = columns(layout, cfg)
    prompt_col = cols.get("prompt", "prompt" if layout == "preference" else None)
    raw_prompt = row.get(prompt_col) if prompt_col else None
    chosen_v, rejected_v = row[cols["chosen"]], row[cols["rejected"]]
    if _is_dialogue(chosen_v) or _is_dialogue(rejected_v):
        chosen, rejected = _messages(chosen_v, "assistant", text), _messages(rejected_v, "assistant", text)
        n = shared_prefix(chosen, rejected)  # the shared leading messages
        shared, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif raw_prompt is None or raw_prompt == "":
        c, r = text(chosen_v), text(rejected_v)
        n = shared_prefix(c, r)  # the shared leading text
        shared = [{"role": "user", "content": c[:n]}] if c[:n].strip() else []
        chosen, rejected = [{"role": "assistant", "content": c[n:]}], [{"role": "assistant", "content": r[n:]}]
    else:
        shared = []
        chosen = [{"role": "assistant", "content": text(chosen_v)}]
        rejected = [{"role": "assistant", "content": text(rejected_v)}]
    prompt = _messages(raw_prompt, "user", text) if raw_prompt not in (None, "", []) else []
    if shared:
        # UltraFeedback repeats the prompt as the dialogues' first user turn: the shared prefix already holds it
        contents = [m["content"] for m in shared]
        prompt = shared if not prompt or all(m["content"] in contents for m in prompt) else prompt + shared
    system = cols.get("system")
    if system and row.get(system) and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": text(row[system])}] + prompt
    if cfg.system_prompt and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": cfg.system_prompt}] + prompt
    return prompt, chosen, rejected


def drop_reason(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> str | None:
    """Why a converted pair cannot be trained on (None: it can)."""
    if chosen == rejected:
        return "with identical chosen and rejected answers (nothing to prefer)"
    if not any(str(m["content"]).strip() for m in prompt if m["role"] != "system"):
        return "with an empty prompt"
    if not any(str(m["content"]).strip() for m in chosen):
        return "with an empty chosen answer"
    if not any(str(m["content"]).strip() for m in rejected):
        return "with an empty rejected answer"
    return None


def as_raw_text(rows: list[dict]) -> list[dict]:
    """data.format=raw: the prompt's contents joined by newlines (plus one), the answers as their text."""
    def joined(msgs):
        return "\n".join(m["content"] for m in msgs)

    return [{"prompt": joined(r["prompt"]) + "\n", "chosen": joined(r["chosen"]), "rejected": joined(r["rejected"])}
            for r in rows]
