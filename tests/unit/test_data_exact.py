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

from lora_search.config.schema import DataConfig
from lora_search.core.errors import DataError
from lora_search.data.load import load_task_data

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' locks and caches of the hub-folder tests out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))

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


# --- bad data files: one line naming the file (and line, column or key) and what is accepted -----------------


def local(path, **kw):
    return DataConfig(source="local", path=str(path), **kw)


def error_of(cfg) -> str:
    with pytest.raises(DataError) as info:
        load_task_data(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "prompt,completion\n"),
                                           ("blank.jsonl", "\n\n  \n")])
def test_an_empty_file_is_named_with_zero_rows(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert error_of(local(tmp_path / name)) == f"data.path {str(tmp_path / name)!r} is empty (0 rows)"


def test_an_empty_parquet_file_is_named_with_zero_rows(tmp_path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}),
                   tmp_path / "e.parquet")
    assert error_of(local(tmp_path / "e.parquet")).endswith("is empty (0 rows)")


def test_invalid_json_names_the_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e" "x"}\n')
    message = error_of(local(path))
    assert str(path) in message and "invalid JSON on line 3, column 16" in message
    listed = tmp_path / "bad.json"
    listed.write_text('\n[\n {"prompt": "a", "completion": "b"},\n {"prompt": 007}\n]')
    assert "invalid JSON at line 4, column 14" in error_of(local(listed))


def test_a_row_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n["a", "b"]\n')
    assert "line 2: expected a JSON object" in error_of(local(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_file_that_is_not_utf8_names_the_byte_and_line_and_says_save_as_utf8(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = ('{"prompt": "a", "completion": "b"}\n{"prompt": "café", "completion": "x"}\n' if suffix == ".jsonl"
            else "prompt,completion\na,b\ncafé,x\n")
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    message = error_of(local(path))
    assert str(path) in message and f"is not UTF-8 text: byte {offset} (line {text[:text.index('é')].count(chr(10)) + 1})" \
        in message and "save it as UTF-8" in message


def test_csv_row_with_too_many_cells_names_its_line(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    assert "line 3: 3 cells but the header has 2 columns" in error_of(local(path))


def test_csv_messages_cell_that_is_not_json_names_line_and_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('messages\n"[{""role"": ""user"", ""content"": ""q""}]"\nnot json\n')
    assert "line 3: column messages must hold a JSON list of messages" in error_of(local(path))


def test_messages_without_an_assistant_turn_are_named_with_the_first_line(tmp_path):
    path = write(tmp_path / "chat.jsonl", [{"messages": [user(f"q{k}")]} for k in range(12)])
    assert error_of(local(path)) == (f"data.path {str(path)!r}: no usable rows: 12 rows without an assistant turn "
                                     "(first at line 1)")


def test_no_usable_rows_groups_every_reason(tmp_path):
    rows = [{"messages": [user("q")]}, {"messages": [user("q"), assistant(" ")]},
            {"messages": [user(""), assistant("a")]}, {"messages": [assistant("a")]}]
    message = error_of(local(write(tmp_path / "chat.json", rows)))
    assert message.endswith("no usable rows: 1 row without an assistant turn (first at row 1); 1 row with an empty "
                            "completion (first at row 2); 2 rows with an empty prompt (first at row 3)")


def test_a_column_mapping_to_a_missing_column_names_key_column_and_the_columns_there(tmp_path):
    path = write(tmp_path / "qa.csv", [{"question": "q", "answer": "a"}] * 3)
    message = error_of(local(path, layout="columns", columns={"prompt": "question", "completion": "answr"}))
    assert "missing column(s) answr (data.columns.completion='answr')" in message and "it has: question, answer" in message


def test_an_unreachable_hub_dataset_is_one_line_naming_data_path(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = error_of(DataConfig(source="hub", path="nobody/nothing-here"))
    assert message.startswith("data.path 'nobody/nothing-here' (data.source=hub): cannot reach or find this dataset")


def test_a_hub_split_that_does_not_exist_lists_the_splits(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write(folder / "train.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    assert "no split 'validation'; it has: train" in error_of(DataConfig(source="hub", path=str(folder),
                                                                         eval_split="validation"))


# --- the separate eval file and the data report ------------------------------------------------------------


def test_eval_path_in_another_format_and_layout_replaces_the_held_out_fraction(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"prompt": f"q{k}", "completion": f"0{k}"} for k in range(5)])
    evals = write(tmp_path / "eval.csv", [{"instruction": f"i{k}", "input": "", "output": f"1999-01-3{k}"}
                                          for k in range(3)])
    data = load_task_data(local(train, eval_path=str(evals)))
    assert [r["completion"][-1]["content"] for r in data.train] == [f"0{k}" for k in range(5)]
    assert data.eval_answers == ["1999-01-30", "1999-01-31", "1999-01-32"]
    assert [r["prompt"][-1]["content"] for r in data.eval] == ["i0", "i1", "i2"]
    report = data.report
    assert report["eval"]["source"] == f"data.eval_path {str(evals)!r}" and report["eval"]["layout"] == "alpaca"
    assert (report["train_rows"], report["eval_rows"], report["leakage"]) == (5, 3, 0)


def test_hub_eval_split_is_read_strictly_too(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write(folder / "train.jsonl", [{"prompt": f"q{k}", "completion": "2020-01-01"} for k in range(3)])
    write(folder / "test.jsonl", [{"prompt": "t", "completion": "2021-02-03"}])
    data = load_task_data(DataConfig(source="hub", path=str(folder), eval_split="test"))
    assert data.eval_answers == ["2021-02-03"] and len(data.train) == 3


def test_report_counts_dropped_rows_duplicates_and_leakage_and_warns(tmp_path, caplog):
    from lora_search.data import quality_report

    rows = [{"prompt": "same", "completion": "a"}, {"prompt": "same", "completion": "a"},
            {"prompt": "other", "completion": "b"}, {"prompt": "", "completion": "c"}, {"prompt": "x", "completion": ""}]
    evals = [{"prompt": "same", "completion": "z"}, {"prompt": "new", "completion": "y"}]
    data = load_task_data(local(write(tmp_path / "t.jsonl", rows), eval_path=str(write(tmp_path / "e.json", evals))))
    report = data.report
    assert report["train"]["rows_read"] == 5 and report["train"]["usable"] == 3
    assert report["train"]["dropped"] == {"with an empty prompt": {"rows": 1, "first": "line 4"},
                                          "with an empty completion": {"rows": 1, "first": "line 5"}}
    assert report["train"]["duplicates"] == 1
    assert (report["leakage"], report["leakage_first_eval_row"]) == (1, 1)
    with caplog.at_level(logging.WARNING, logger="lora_search.data.quality_report"):
        quality_report.warn(report)
    assert "1 eval rows have a prompt that is also in the train rows (first: eval row 1)" in caplog.text
    assert quality_report.summary(report) == {"data_rows_read": 5, "data_rows_dropped": 2, "data_duplicates": 1,
                                          "data_leakage": 1}


def test_token_counts_and_truncation_follow_max_length(tmp_path, caplog):
    from lora_search.data import quality_report
    from lora_search.models import loaders

    rows = [{"prompt": "q", "completion": "a" * n} for n in (1, 5, 40, 80)]
    data = load_task_data(local(write(tmp_path / "t.jsonl", rows), eval_path=str(write(tmp_path / "e.jsonl", rows))))
    tokenizer = loaders.byte_tokenizer()
    lengths = sorted(len(quality_report.row_tokens(r, tokenizer)[0]) for r in data.train)
    report = quality_report.add_tokens(data.report, data, tokenizer, max_length=48)
    over = sum(n > 48 for n in lengths)
    assert over == 2 and report["tokens"]["train"]["truncated"] == over and report["truncated"] == 2 * over
    assert report["tokens"]["train"]["max"] == lengths[-1] and report["tokens"]["train"]["p50"] == lengths[1]
    with caplog.at_level(logging.WARNING, logger="lora_search.data.quality_report"):
        quality_report.warn(report)
    assert "2 train and 2 eval rows are longer than trainer.max_length=48" in caplog.text
    assert quality_report.add_tokens(data.report, data, tokenizer, max_length=512)["truncated"] == 0


def test_a_train_run_records_the_data_report_and_warns_on_truncation(make_cfg, tmp_path, caplog):
    """stage=train: data_report.json in the run folder, data_* counts in metrics.json, a WARNING for truncation."""
    from lora_search.commands import train_stage
    from lora_search.core import records

    rows = [{"prompt": f"q{k}", "completion": ("long " * 20 if k == 0 else f"0{k}")} for k in range(8)]
    path = write(tmp_path / "t.jsonl", rows + [rows[1]])
    cfg = make_cfg("data=local", f"data.path={path}", "data.eval_fraction=0.25", "trainer.max_length=48",
                   "trainer.max_steps=1", "trainer.batch_size=2", "trainer.eval_every=0", "trainer.exact_match_items=0",
                   "run_name=report")
    with caplog.at_level(logging.WARNING, logger="lora_search.data.quality_report"):
        run_dir = train_stage.train_stage(cfg)
    report = records.read_json(run_dir / "data_report.json")
    metrics = records.read_json(run_dir / "metrics.json")
    assert report["fingerprint"] == metrics["data_fingerprint"]
    assert report["train"]["rows_read"] == metrics["data_rows_read"] == 9
    assert report["train_rows"] + report["eval_rows"] == 9 and report["tokens"]["max_length"] == 48
    assert metrics["data_truncated"] == report["truncated"] == 1
    assert metrics["data_duplicates"] + metrics["data_leakage"] == 1  # the repeated row: in train twice, or in both
    assert "rows are longer than trainer.max_length=48" in caplog.text


def test_a_sweep_worker_writes_the_data_report_under_the_study(make_cfg, tmp_path):
    from lora_search.commands import train_stage
    from lora_search.core import records
    from lora_search.data.load import load_task_data

    cfg = make_cfg("data.train_per_task=4", "data.eval_per_task=2", "sweep.name=reported")
    data = load_task_data(cfg.data)
    train_stage.start_worker(cfg, data)
    report = records.read_json(tmp_path / "results" / "reported" / "data_report.json")
    assert report["fingerprint"] == data.fingerprint and report["train_rows"] == 16 and report["eval_rows"] == 8
    assert report["tokens"]["train"]["max"] > 0 and report["truncated"] == 0
    other = load_task_data(make_cfg("data.train_per_task=3", "data.eval_per_task=2", "sweep.name=reported").data)
    train_stage.start_worker(cfg, other)  # a second data setting in the same sweep keeps the first report
    assert records.read_json(tmp_path / "results" / "reported" / "data_report.json")["fingerprint"] == data.fingerprint
    assert records.read_json(tmp_path / "results" / "reported" / f"data_report-{other.fingerprint[:12]}.json")


def test_other_hub_builders_go_through_datasets_and_refuse_non_text_columns(tmp_path, monkeypatch):
    """A folder of .arrow files has no strict reader: datasets loads it; string columns pass, a timestamp is refused."""
    import datetime

    def arrow_folder(name, completion):
        folder = tmp_path / name
        folder.mkdir()
        table = pa.table({"prompt": ["a", "b", "c"], "completion": completion})
        with pa.OSFile(str(folder / "train.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)
        return str(folder)

    data = load_task_data(DataConfig(source="hub", path=arrow_folder("text", ["007", "1e3", "2020-01-01"])))
    assert sorted(c for _, c in all_pairs(data)) == ["007", "1e3", "2020-01-01"]
    stamps = pa.array([datetime.datetime(1999, 1, 31)] * 3, pa.timestamp("s"))
    message = error_of(DataConfig(source="hub", path=arrow_folder("stamps", stamps)))
    assert "column completion is timestamp[s], not text; store it as a string column" in message


def test_openai_style_text_parts_are_joined_as_chat_templates_join_them(tmp_path):
    parts = lambda *texts: [{"type": "text", "text": t} for t in texts]  # noqa: E731
    rows = [{"messages": [{"role": "user", "content": parts("Date of ", f"item {i}?")},
                          {"role": "assistant", "content": parts("1999-01-", "31")}]} for i in range(4)]
    path = tmp_path / "parts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_task_data(DataConfig(source="local", path=str(path), eval_fraction=0.25))
    prompts = sorted(r["prompt"][-1]["content"] for r in data.train.to_list() + data.eval.to_list())
    assert prompts == [f"Date of item {i}?" for i in range(4)] and data.eval_answers == ["1999-01-31"]


@pytest.mark.parametrize("value, kind", [({"text": "x"}, "a JSON object"), ([1, 2], "a list"),
                                         ([{"type": "image_url", "image_url": {"url": "x"}}], "a list")])
def test_a_value_that_is_not_text_is_refused_naming_the_line_never_its_repr(tmp_path, value, kind):
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": value if i == 2 else "a"}) + "\n"
                            for i in range(4)))
    with pytest.raises(DataError) as info:
        load_task_data(DataConfig(source="local", path=str(path)))
    assert f"data.path '{path}' line 3 holds {kind} where text is expected" in str(info.value)
