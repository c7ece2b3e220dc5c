"""Load task data from the embedded generator, a local file or the hub, in any common layout.

Every layout becomes TRL's prompt/completion form: with `data.format=chat` both are message
lists (the tokenizer's chat template formats them, and the loss covers the completion only),
with `data.format=raw` both are plain strings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lora_search import tasks as task_gen
from lora_search.errors import DataError
from lora_search.schema import DataConfig
from lora_search.validate import DATA_SUFFIXES

LAYOUT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
}


@dataclass
class TaskData:
    train: object  # datasets.Dataset with prompt, completion
    eval: object  # datasets.Dataset with prompt, completion
    eval_answers: list[str]  # the reference completion text of each eval row
    layout: str
    fingerprint: str  # sha256 of every row: tells when the data changed

    def eval_prompts(self, n: int | None = None) -> list:
        """The first n eval prompts (message lists or strings), for generation."""
        prompts = self.eval["prompt"]
        return prompts if n is None else prompts[:n]


def detect_layout(columns: list[str], where: str) -> str:
    """The layout whose columns a table has; DataError naming the columns otherwise."""
    if "conversations" in columns:
        return "messages"
    for layout, needed in LAYOUT_COLUMNS.items():
        if set(needed) <= set(columns):
            return layout
    raise DataError(
        f"{where}: cannot tell the layout from its columns ({', '.join(columns)}); expected messages, "
        "prompt+completion, instruction+output (alpaca) or instruction+response (dolly), "
        "or set data.layout=columns with data.columns.prompt=<col> data.columns.completion=<col>"
    )


def _text(value) -> str:
    return "" if value is None else str(value)


def _message_list(value, role: str) -> list[dict]:
    if isinstance(value, list):
        return [{"role": m["role"], "content": _text(m["content"])} for m in value]
    return [{"role": role, "content": _text(value)}]


def _from_sharegpt(turns: list[dict]) -> list[dict]:
    """ShareGPT turns (from/value), or `conversations` that hold role/content messages."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

    def first(turn, *keys):  # Arrow gives every struct all keys, absent ones as None
        return next((turn[k] for k in keys if turn.get(k) is not None), None)

    return [
        {"role": roles.get(r := first(t, "from", "role"), r), "content": _text(first(t, "value", "content"))}
        for t in turns
    ]


def to_prompt_completion(row: dict, layout: str, cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """One row of any layout as (prompt messages, completion messages)."""
    if layout == "messages":
        msgs = _from_sharegpt(row["conversations"]) if "conversations" in row else _message_list(row["messages"], "user")
        cut = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if cut is None or cut == 0:
            return [], []
        prompt, completion = msgs[:cut], [msgs[cut]]
    elif layout == "prompt_completion":
        prompt, completion = _message_list(row["prompt"], "user"), _message_list(row["completion"], "assistant")
    elif layout == "alpaca":
        extra = _text(row.get("input")).strip()
        user = _text(row["instruction"]) + (f"\n\n{extra}" if extra else "")
        prompt, completion = [{"role": "user", "content": user}], [{"role": "assistant", "content": _text(row["output"])}]
    elif layout == "dolly":
        extra = _text(row.get("context")).strip()
        user = _text(row["instruction"]) + (f"\n\nContext: {extra}" if extra else "")
        prompt = [{"role": "user", "content": user}]
        completion = [{"role": "assistant", "content": _text(row["response"])}]
    else:  # columns
        prompt = [{"role": "user", "content": _text(row[cfg.columns["prompt"]])}]
        completion = [{"role": "assistant", "content": _text(row[cfg.columns["completion"]])}]
        if cfg.columns.get("system") and row.get(cfg.columns["system"]):
            prompt.insert(0, {"role": "system", "content": _text(row[cfg.columns["system"]])})
    if cfg.system_prompt and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": cfg.system_prompt}] + prompt
    return prompt, completion


def _required_columns(layout: str, cfg: DataConfig) -> tuple[str, ...]:
    if layout == "columns":
        return tuple(cfg.columns[k] for k in ("prompt", "completion", "system") if k in cfg.columns)
    return LAYOUT_COLUMNS[layout]


def _load_raw(cfg: DataConfig):
    """The raw table(s): (train table, eval table or None, where-label)."""
    import datasets

    if cfg.source == "local":
        path = Path(cfg.path)
        builder = DATA_SUFFIXES[path.suffix.lower()]
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:
            raise DataError(f"data.path {cfg.path!r}: cannot read it as {builder}: {str(e).splitlines()[0]}") from None
        return table, None, f"data.path {cfg.path!r}"
    table = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split, revision=cfg.revision)
    eval_table = None
    if cfg.eval_split:
        eval_table = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.eval_split, revision=cfg.revision)
    return table, eval_table, f"data.path {cfg.path!r}"


def _convert(table, layout: str, cfg: DataConfig, where: str) -> list[dict]:
    missing = [c for c in _required_columns(layout, cfg) if c not in table.column_names]
    if missing and not (layout == "messages" and "conversations" in table.column_names):
        raise DataError(
            f"{where} (layout {layout}) is missing column(s) {', '.join(missing)}; "
            f"it has: {', '.join(table.column_names)}"
        )
    rows = []
    for row in table:
        prompt, completion = to_prompt_completion(row, layout, cfg)
        if prompt and completion and completion[-1]["content"].strip():
            rows.append({"prompt": prompt, "completion": completion})
    if not rows:
        raise DataError(f"{where}: no usable rows (every row had an empty prompt or completion)")
    return rows


def _embedded_rows(cfg: DataConfig):
    train, evals = task_gen.train_eval(list(cfg.tasks), cfg.train_per_task, cfg.eval_per_task, cfg.seed)

    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []

    def as_row(r):
        prompt = system + [{"role": "user", "content": r["prompt"]}]
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": r["answer"]}]}

    return [as_row(r) for r in train], [as_row(r) for r in evals]


def _as_raw_text(rows: list[dict]) -> list[dict]:
    def text(msgs):
        return "\n".join(m["content"] for m in msgs)

    return [{"prompt": text(r["prompt"]) + "\n", "completion": text(r["completion"])} for r in rows]


def fingerprint(rows: list[dict]) -> str:
    """A stable sha256 of rows."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, convert and split the data a config names."""
    import datasets

    if cfg.source == "embedded":
        train_rows, eval_rows = _embedded_rows(cfg)
        layout = "prompt_completion"
    else:
        table, eval_table, where = _load_raw(cfg)
        layout = detect_layout(table.column_names, where) if cfg.layout == "auto" else cfg.layout
        rows = _convert(table, layout, cfg, where)
        if eval_table is not None:
            train_rows, eval_rows = rows, _convert(eval_table, layout, cfg, f"{where} split {cfg.eval_split}")
        else:
            if len(rows) < 2:
                raise DataError(f"{where}: needs at least 2 usable rows to hold some out for evaluation, has {len(rows)}")
            split = datasets.Dataset.from_list(rows).train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
            train_rows, eval_rows = split["train"].to_list(), split["test"].to_list()
    if cfg.max_train_rows:
        train_rows = train_rows[: cfg.max_train_rows]
    if cfg.max_eval_rows:
        eval_rows = eval_rows[: cfg.max_eval_rows]
    answers = [r["completion"][-1]["content"] for r in eval_rows]
    digest = fingerprint(train_rows + eval_rows)
    if cfg.format == "raw":
        train_rows, eval_rows = _as_raw_text(train_rows), _as_raw_text(eval_rows)
    return TaskData(
        train=datasets.Dataset.from_list(train_rows),
        eval=datasets.Dataset.from_list(eval_rows),
        eval_answers=answers,
        layout=layout,
        fingerprint=digest,
    )
