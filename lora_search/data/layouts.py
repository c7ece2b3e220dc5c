"""Row layouts: which columns make each layout (messages, prompt/completion, alpaca, dolly, sharegpt, columns),
detecting it, and turning one row of any layout into TRL's prompt/completion form (text kept as the file holds it).
"""

from __future__ import annotations

from lora_search.config.schema import DataConfig
from lora_search.core.errors import DataError

LAYOUT_COLUMNS = {
    "preference": ("chosen", "rejected"),  # first: a preference file may also have a prompt or messages column
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
}


def detect_layout(columns: list[str], where: str) -> str:
    """The layout whose columns a table has; DataError naming the columns otherwise."""
    half = [c for c in ("chosen", "rejected") if c in columns]
    if len(half) == 1:
        missing = "rejected" if half == ["chosen"] else "chosen"
        raise DataError(f"{where} has a {half[0]} column but no {missing} column: preference pairs need both chosen "
                        f"and rejected (prompt optional); it has: {', '.join(columns)} (other names: data.layout=columns "
                        "data.columns.chosen=<col> data.columns.rejected=<col>)")
    if "conversations" in columns and not half:
        return "messages"
    for layout, needed in LAYOUT_COLUMNS.items():
        if set(needed) <= set(columns):
            return layout
    raise DataError(
        f"{where}: cannot tell the layout from its columns ({', '.join(columns)}); expected messages, "
        "prompt+completion, instruction+output (alpaca), instruction+response (dolly) or chosen+rejected "
        "(preference pairs, prompt optional), or set data.layout=columns with data.columns.prompt=<col> "
        "data.columns.completion=<col> (pairs: data.columns.chosen=<col> data.columns.rejected=<col>)"
    )


class NotText(ValueError):
    """A value that is neither text nor a list of text parts (a JSON object, an image part, a list of numbers)."""


def cell_text(value) -> str:
    """A cell as text, exactly as the file holds it; NotText for a value that is not text."""
    """A message content as text: a string as it is; OpenAI-style content parts ([{type: text, text: ...}]) joined,
    as chat templates join them; anything else (an object, an image part) is not text and is refused, never
    turned into its Python repr."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(cell_text(p.get("text")) for p in value)
    kind = "a JSON object" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise NotText(f"holds {kind} where text is expected ({shown}); only text and text parts "
                  "([{\"type\": \"text\", \"text\": ...}]) can be trained on")


def _message_list(value, role: str) -> list[dict]:
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m.get("role"), "content": cell_text(m.get("content"))} for m in value]
    return [{"role": role, "content": cell_text(value)}]  # a string, or text parts; anything else is NotText


def _from_sharegpt(turns: list[dict]) -> list[dict]:
    """ShareGPT turns (from/value), or `conversations` that hold role/content messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

    def first(turn, *keys):  # Arrow gives every struct all keys, absent ones as None
        return next((turn[k] for k in keys if turn.get(k) is not None), None)

    return [
        {"role": roles.get(r := first(t, "from", "role"), r), "content": cell_text(first(t, "value", "content"))}
        for t in turns or []
    ]


def to_prompt_completion(row: dict, layout: str, cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """One row of any layout as (prompt messages, completion messages)."""
    if layout == "messages":
        msgs = _from_sharegpt(row["conversations"]) if "conversations" in row else _message_list(row["messages"], "user")
        cut = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        # no assistant turn: no completion; an assistant turn first: no prompt (drop_reason names either)
        prompt, completion = (msgs, []) if cut is None else (msgs[:cut], [msgs[cut]])
    elif layout == "prompt_completion":
        prompt, completion = _message_list(row["prompt"], "user"), _message_list(row["completion"], "assistant")
    elif layout == "alpaca":
        extra = cell_text(row.get("input")).strip()
        user = cell_text(row["instruction"]) + (f"\n\n{extra}" if extra else "")
        prompt, completion = [{"role": "user", "content": user}], [{"role": "assistant", "content": cell_text(row["output"])}]
    elif layout == "dolly":
        extra = cell_text(row.get("context")).strip()
        user = cell_text(row["instruction"]) + (f"\n\nContext: {extra}" if extra else "")
        prompt = [{"role": "user", "content": user}]
        completion = [{"role": "assistant", "content": cell_text(row["response"])}]
    else:  # columns
        prompt = [{"role": "user", "content": cell_text(row[cfg.columns["prompt"]])}]
        completion = [{"role": "assistant", "content": cell_text(row[cfg.columns["completion"]])}]
        if cfg.columns.get("system") and row.get(cfg.columns["system"]):
            prompt.insert(0, {"role": "system", "content": cell_text(row[cfg.columns["system"]])})
    if cfg.system_prompt and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": cfg.system_prompt}] + prompt
    return prompt, completion


def required_columns(layout: str, cfg: DataConfig) -> tuple[str, ...]:
    """The columns a layout needs (with data.columns naming them for the `columns` layout)."""
    if layout == "columns":
        return tuple(cfg.columns[k] for k in ("prompt", "completion", "system", "chosen", "rejected")
                     if k in cfg.columns)
    return LAYOUT_COLUMNS[layout]


def drop_reason(prompt: list[dict], completion: list[dict]) -> str | None:
    """Why a converted row cannot be trained on (None: it can)."""
    if not completion:
        return "without an assistant turn"
    if not any(cell_text(m["content"]).strip() for m in prompt if m["role"] != "system"):
        return "with an empty prompt"
    if not cell_text(completion[-1]["content"]).strip():
        return "with an empty completion"
    return None
