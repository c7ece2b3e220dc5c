"""Data exactly as written: values that look like dates, times, numbers, booleans or null reach the rows TRL trains
on and the scorer's answers as the file's text, in every layout and format; the data report; bad data files."""

from __future__ import annotations

import csv
import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lora_search.data import load_task_data
from lora_search.errors import DataError
from lora_search.schema import DataConfig

datasets.disable_progress_bars()

# Text a type-inferring loader would change, grouped so that a whole column holds one kind (what makes pyarrow
# infer a type): dates, times, numbers with leading zeros, exponents or trailing zeros, booleans, null-like words.
TRICKY = {
    "dates": ["1999-01-31", "2000-02-29", "2024-12-01", "1970-01-01"],
    "datetimes": ["2024-03-05T10:20:30Z", "2024-03-05 10:20:30", "1999-01-31T00:00:00", "2001-09-09T01:46:40+02:00"],
    "times": ["10:30", "23:59:59", "00:00", "12:00:00.5"],
    "leading_zeros": ["007", "0012", "00", "01"],
    "exponents": ["1e3", "2E5", "1e-3", "5e0"],
    "trailing_zeros": ["1.50", "2.0", "3.10", "0.00"],
    "booleans": ["true", "false", "True", "FALSE"],
    "null_like": ["null", "NA", "None", "nan"],
}

def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# layout -> (row for prompt text p and completion text c, extra DataConfig fields)
LAYOUTS = {
    "messages": (lambda p, c: {"messages": [user(p), assistant(c)]}, {}),
    "sharegpt": (lambda p, c: {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]}, {}),
    "prompt_completion": (lambda p, c: {"prompt": p, "completion": c}, {}),
    "prompt_completion_lists": (lambda p, c: {"prompt": [user(p)], "completion": [assistant(c)]}, {}),
    "alpaca": (lambda p, c: {"instruction": p, "input": "", "output": c}, {}),
    "dolly": (lambda p, c: {"instruction": p, "context": "", "response": c, "category": "qa"}, {}),
    "columns": (lambda p, c: {"question": p, "answer": c},
                {"layout": "columns", "columns": {"prompt": "question", "completion": "answer"}}),
}


def write(path, rows):
    """rows as the file type its suffix names (CSV: message-list cells as JSON text)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def all_pairs(data):
    """(prompt text, completion text) of every train and eval row, sorted."""
    rows = data.train.to_list() + data.eval.to_list()
    return sorted((r["prompt"][-1]["content"], r["completion"][-1]["content"]) for r in rows)


FORMATS = ["jsonl", "json", "csv", "parquet", "hub"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_value_reaches_training_and_scoring_as_written(tmp_path, layout, fmt):
    if fmt == "csv" and layout == "prompt_completion_lists":
        pytest.skip("a CSV cell is text: message lists in CSV go in a messages or conversations column")
    make, extra = LAYOUTS[layout]
    for kind, texts in TRICKY.items():
        values = [(p, c) for p, c in zip(texts, texts[1:] + texts[:1])]  # every prompt and completion of one kind
        rows = [make(p, c) for p, c in values]
        if fmt == "hub":  # a dataset folder read through datasets.load_dataset_builder (no network)
            folder = tmp_path / kind
            folder.mkdir()
            write(folder / "train.jsonl", rows)
            cfg = DataConfig(source="hub", path=str(folder), eval_fraction=0.25, **extra)
        else:
            cfg = DataConfig(source="local", path=str(write(tmp_path / f"{kind}.{fmt}", rows)), eval_fraction=0.25,
                             **extra)
        data = load_task_data(cfg)
        assert all_pairs(data) == sorted(values), kind
        assert data.eval_answers == [r["completion"][-1]["content"] for r in data.eval.to_list()]
        assert len(data.eval_answers) == 1 and data.eval_answers[0] in texts, kind
        assert data.report["train"]["rows_read"] == len(values) and data.report["train"]["dropped"] == {}


def test_raw_format_keeps_the_text_too(tmp_path):
    texts = TRICKY["dates"]
    path = write(tmp_path / "d.jsonl", [{"prompt": v, "completion": v} for v in texts])
    data = load_task_data(DataConfig(source="local", path=str(path), format="raw"))
    got = sorted((r["prompt"], r["completion"]) for r in data.train.to_list() + data.eval.to_list())
    assert got == sorted((v + "\n", v) for v in texts)
    assert data.eval_answers == data.eval["completion"]


def test_json_numbers_booleans_and_null_are_their_literal_text(tmp_path):
    """A column that mixes JSON strings and numbers is read as text: each number as its literal JSON text."""
    lines = ['{"prompt": "a", "completion": 1e3}', '{"prompt": "b", "completion": 1.50}',
             '{"prompt": "c", "completion": "007"}', '{"prompt": "d", "completion": true}',
             '{"prompt": "e", "completion": -0.0}', '{"prompt": "f", "completion": 12345678901234567890}',
             '{"prompt": "g", "completion": null}', '{"prompt": "h"}']
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = load_task_data(DataConfig(source="local", path=str(path), layout="prompt_completion", eval_fraction=0.2))
    assert all_pairs(data) == [("a", "1e3"), ("b", "1.50"), ("c", "007"), ("d", "true"), ("e", "-0.0"),
                               ("f", "12345678901234567890")]
    assert data.report["train"]["dropped"] == {"with an empty completion": {"rows": 2, "first": "line 7"}}


def test_nested_message_contents_keep_their_literal_text(tmp_path):
    path = tmp_path / "nested.json"
    path.write_text('[{"messages": [{"role": "user", "content": 2.50}, {"role": "assistant", "content": 1E-7}]},\n'
                    ' {"messages": [{"role": "user", "content": "2024-01-01"}, {"role": "assistant", "content": false}]}]')
    data = load_task_data(DataConfig(source="local", path=str(path), eval_fraction=0.5))
    assert all_pairs(data) == [("2.50", "1E-7"), ("2024-01-01", "false")]


def test_parquet_number_and_boolean_columns_are_their_text(tmp_path):
    table = pa.table({"prompt": pa.array([1, 2, 3], pa.int64()), "completion": pa.array([1.5, 0.25, 1e20]),
                      "flag": pa.array([True, False, True])})
    pq.write_table(table, tmp_path / "n.parquet")
    data = load_task_data(DataConfig(source="local", path=str(tmp_path / "n.parquet"), eval_fraction=0.34))
    assert all_pairs(data) == [("1", "1.5"), ("2", "0.25"), ("3", "1e+20")]
    cfg = DataConfig(source="local", path=str(tmp_path / "n.parquet"), layout="columns", eval_fraction=0.34,
                     columns={"prompt": "prompt", "completion": "flag"})
    assert sorted(c for _, c in all_pairs(load_task_data(cfg))) == ["false", "true", "true"]


@pytest.mark.parametrize("arrow_type, name", [(pa.timestamp("ms"), "timestamp[ms]"), (pa.date32(), "date32[day]"),
                                              (pa.binary(), "binary")])
def test_parquet_columns_that_are_not_text_are_refused_naming_file_column_and_type(tmp_path, arrow_type, name):
    import datetime

    values = {"timestamp[ms]": [datetime.datetime(1999, 1, 31)] * 2, "date32[day]": [datetime.date(1999, 1, 31)] * 2,
              "binary": [b"x", b"y"]}[name]
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": pa.array(values, arrow_type)}), tmp_path / "t.parquet")
    with pytest.raises(DataError) as info:
        load_task_data(DataConfig(source="local", path=str(tmp_path / "t.parquet")))
    message = str(info.value)
    assert "t.parquet" in message and f"column completion is {name}, not text" in message
    assert "store it as a string column" in message


def test_a_json_file_holding_json_lines_and_a_bom_are_read(tmp_path):
    path = tmp_path / "lines.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "p1", "completion": "0.10"}\n{"prompt": "p2", "completion": "2e5"}\n')
    data = load_task_data(DataConfig(source="local", path=str(path), eval_fraction=0.5))
    assert all_pairs(data) == [("p1", "0.10"), ("p2", "2e5")]
