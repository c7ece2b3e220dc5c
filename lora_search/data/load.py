"""Load task data from the embedded generator, a local file or the hub, in any common layout.

Files are read by `readers` (rows converted by `layouts`) (every value exactly the text in the file, never re-typed).
Every layout becomes TRL's prompt/completion form: with `data.format=chat` both are message
lists (the tokenizer's chat template formats them, and the loss covers the completion only),
with `data.format=raw` both are plain strings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from lora_search.config.schema import DataConfig
from lora_search.core.errors import DataError
from lora_search.data import embedded_tasks as task_gen
from lora_search.data import preference_pairs, quality_report, readers
from lora_search.data.layouts import (
    NotText,
    cell_text,
    detect_layout,
    drop_reason,
    required_columns,
    to_prompt_completion,
)


@dataclass
class TaskData:
    train: object  # datasets.Dataset with prompt, completion (kind sft) or prompt, chosen, rejected (kind preference)
    eval: object  # the same columns
    eval_answers: list[str]  # the reference completion (or chosen answer) text of each eval row
    layout: str
    fingerprint: str  # sha256 of every row: tells when the data changed
    report: dict = field(default_factory=dict)  # quality_report.build: rows read, dropped and why, duplicates, leakage
    kind: str = "sft"  # sft: prompt/completion rows | preference: prompt/chosen/rejected pairs (trainer=dpo)

    def eval_prompts(self, n: int | None = None) -> list:
        """The first n eval prompts (message lists or strings), for generation."""
        prompts = self.eval["prompt"]
        return prompts if n is None else prompts[:n]


def _read(cfg: DataConfig):
    """The raw tables: (train Table, eval Table or None)."""
    where = f"data.path {cfg.path!r}"
    if cfg.source == "local":
        train = readers.read_file(cfg.path, where)
        evals = None
    else:
        splits = [cfg.split] + ([cfg.eval_split] if cfg.eval_split and not cfg.eval_path else [])
        tables = readers.read_hub(cfg.path, cfg.subset, cfg.revision, splits)
        train, evals = tables[cfg.split], tables.get(cfg.eval_split) if cfg.eval_split else None
    if cfg.eval_path:
        evals = readers.read_file(cfg.eval_path, f"data.eval_path {cfg.eval_path!r}")
    return train, evals


def _check_columns(table, layout: str, cfg: DataConfig) -> None:
    cols = table.columns
    missing = [c for c in required_columns(layout, cfg) if c not in cols]
    if missing and not (layout == "messages" and "conversations" in cols):
        keys = ""
        if layout == "columns":
            keys = " (" + ", ".join(f"data.columns.{k}={v!r}" for k, v in cfg.columns.items() if v in missing) + ")"
        raise DataError(f"{table.where} (layout {layout}) is missing column(s) {', '.join(missing)}{keys}; "
                        f"it has: {', '.join(cols)}")
    optional = ("prompt",) if layout == "preference" else ("conversations", "input", "context")
    used = [c for c in (*required_columns(layout, cfg), *optional) if c in cols]
    for col in used:
        if col in table.untextable:
            raise DataError(f"{table.where}: column {col} is {table.untextable[col]}, not text; "
                            "store it as a string column")


def _convert(table, layout: str, cfg: DataConfig) -> tuple[list[dict], dict]:
    """Usable rows and the table's stats: rows read, rows dropped by reason (with the first place)."""
    if not table.rows:
        raise DataError(f"{table.where} is empty (0 rows)")
    _check_columns(table, layout, cfg)
    rows, dropped = [], {}
    preference = preference_pairs.is_pairs(layout, cfg)
    for row, place in zip(table.rows, table.places):
        try:
            if preference:
                prompt, chosen, rejected = preference_pairs.to_pair(row, layout, cfg, cell_text)
                reason, converted = preference_pairs.drop_reason(prompt, chosen, rejected), \
                    {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            else:
                prompt, completion = to_prompt_completion(row, layout, cfg)
                reason, converted = drop_reason(prompt, completion), {"prompt": prompt, "completion": completion}
        except NotText as e:
            raise DataError(f"{table.where} {place} {e}") from None
        if reason:
            entry = dropped.setdefault(reason, {"rows": 0, "first": place})
            entry["rows"] += 1
        else:
            rows.append(converted)
    stats = {"source": table.where, "layout": layout, "rows_read": len(table.rows), "dropped": dropped,
             "usable": len(rows)}
    if not rows:
        reasons = "; ".join(f"{d['rows']} row{'s' * (d['rows'] != 1)} {r} (first at {d['first']})"
                            for r, d in dropped.items())
        raise DataError(f"{table.where}: no usable rows: {reasons}")
    return rows, stats


def _embedded_rows(cfg: DataConfig):
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if cfg.layout == "preference":
        train, evals = task_gen.pairs_train_eval(list(cfg.tasks), cfg.train_per_task, cfg.eval_per_task, cfg.seed)

        def as_pair(r):
            return {"prompt": system + [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}]}

        return [as_pair(r) for r in train], [as_pair(r) for r in evals]
    train, evals = task_gen.train_eval(list(cfg.tasks), cfg.train_per_task, cfg.eval_per_task, cfg.seed)

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


def _layout(table, cfg: DataConfig) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if not table.rows:
        raise DataError(f"{table.where} is empty (0 rows)")
    return detect_layout(table.columns, table.where)


def _held_out(rows: list[dict], cfg: DataConfig, where: str) -> tuple[list[dict], list[dict]]:
    """datasets' train_test_split over row indices (the rows themselves never pass through Arrow here)."""
    import datasets

    if len(rows) < 2:
        raise DataError(f"{where}: needs at least 2 usable rows to hold some out for evaluation, has {len(rows)}")
    split = datasets.Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(
        test_size=cfg.eval_fraction, seed=cfg.seed)
    return [rows[i] for i in split["train"]["i"]], [rows[i] for i in split["test"]["i"]]


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, convert and split the data a config names; its data report says what was read and dropped."""
    import datasets

    if cfg.source == "embedded":
        train_rows, eval_rows = _embedded_rows(cfg)
        layout = "preference" if cfg.layout == "preference" else "prompt_completion"
        stats = {"source": "embedded tasks", "layout": layout, "rows_read": len(train_rows), "dropped": {},
                 "usable": len(train_rows)}
        eval_stats = {**stats, "source": "embedded tasks (eval)", "rows_read": len(eval_rows),
                      "usable": len(eval_rows)}
    else:
        table, eval_table = _read(cfg)
        layout = _layout(table, cfg)
        rows, stats = _convert(table, layout, cfg)
        if eval_table is not None:
            eval_layout = _layout(eval_table, cfg)
            if preference_pairs.is_pairs(eval_layout, cfg) != preference_pairs.is_pairs(layout, cfg):
                kinds = {True: "preference pairs (chosen/rejected)", False: "prompt/completion rows"}
                raise DataError(f"{eval_table.where} holds {kinds[preference_pairs.is_pairs(eval_layout, cfg)]} ({eval_layout} "
                                f"layout) but {table.where} holds {kinds[preference_pairs.is_pairs(layout, cfg)]} ({layout} "
                                "layout); the eval data must be of the same kind as the training data")
            eval_rows, eval_stats = _convert(eval_table, eval_layout, cfg)
            train_rows = rows
        else:
            train_rows, eval_rows = _held_out(rows, cfg, table.where)
            eval_stats = {"source": f"held out from {table.where} (data.eval_fraction={cfg.eval_fraction})",
                          "layout": layout, "rows_read": len(eval_rows), "dropped": {}, "usable": len(eval_rows)}
    if cfg.max_train_rows:
        train_rows = train_rows[: cfg.max_train_rows]
    if cfg.max_eval_rows:
        eval_rows = eval_rows[: cfg.max_eval_rows]
    kind = "preference" if preference_pairs.is_pairs(layout, cfg) else "sft"
    answers = [r["chosen" if kind == "preference" else "completion"][-1]["content"] for r in eval_rows]
    digest = fingerprint(train_rows + eval_rows)
    report = quality_report.build(stats, eval_stats, train_rows, eval_rows)
    if cfg.format == "raw":
        raw = preference_pairs.as_raw_text if kind == "preference" else _as_raw_text
        train_rows, eval_rows = raw(train_rows), raw(eval_rows)
    return TaskData(
        train=datasets.Dataset.from_list(train_rows),
        eval=datasets.Dataset.from_list(eval_rows),
        eval_answers=answers,
        layout=layout,
        fingerprint=digest,
        report=report,
        kind=kind,
    )
