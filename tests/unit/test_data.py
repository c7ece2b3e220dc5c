"""Data loading: every file format and layout becomes prompt/completion rows; errors name what is wrong."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import datasets
import pytest

from lora_search.checks.run_config import check_data
from lora_search.config.schema import DataConfig
from lora_search.core.errors import DataError
from lora_search.data import embedded_tasks
from lora_search.data.load import fingerprint, load_task_data

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of the loaded files out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write(path, rows):
    """Write rows as the file type its suffix names; return the path."""
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        raise ValueError(suffix)
    return path


def local(path, layout="auto", **kw):
    return DataConfig(source="local", path=str(path), layout=layout, **kw)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def all_rows(data):
    """Train + eval rows, sorted so a split does not change the comparison."""
    rows = data.train.to_list() + data.eval.to_list()
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def expect(pairs):
    rows = [{"prompt": p, "completion": c} for p, c in pairs]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


N = 6  # rows per test file: enough for a split with eval_fraction 0.1 -> 1 eval row


# --- file formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_file_format_loads_as_conversational_rows(tmp_path, suffix):
    rows = [{"prompt": f"question {k}", "completion": f"answer {k}"} for k in range(N)]
    data = load_task_data(local(write(tmp_path / f"d{suffix}", rows)))
    assert data.layout == "prompt_completion"
    assert len(data.train) + len(data.eval) == N
    assert all_rows(data) == expect((([user(f"question {k}")], [assistant(f"answer {k}")]) for k in range(N)))
    assert data.eval_answers == [r["completion"][-1]["content"] for r in data.eval.to_list()]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_nested_message_lists_load_from_every_nested_format(tmp_path, suffix):
    rows = [{"messages": [user(f"q{k}"), assistant(f"a{k}")]} for k in range(N)]
    data = load_task_data(local(write(tmp_path / f"d{suffix}", rows)))
    assert data.layout == "messages"
    assert all_rows(data) == expect((([user(f"q{k}")], [assistant(f"a{k}")]) for k in range(N)))


def test_csv_empty_cells_are_empty_text(tmp_path):
    """pandas reads empty cells as missing: alpaca's empty `input` must not become 'None' or 'nan'."""
    rows = [{"instruction": f"do {k}", "input": "", "output": f"done {k}"} for k in range(N)]
    data = load_task_data(local(write(tmp_path / "d.csv", rows)))
    assert data.layout == "alpaca"
    assert all_rows(data) == expect((([user(f"do {k}")], [assistant(f"done {k}")]) for k in range(N)))


def test_unreadable_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"prompt": "a", "completion": ')
    with pytest.raises(DataError) as info:
        load_task_data(local(path))
    assert str(path) in str(info.value) and "invalid JSON on line 1, column 31" in str(info.value)


# --- layouts ---------------------------------------------------------------------------------

# Each case: layout name, a row for item k, the expected (prompt, completion) for item k, extra config.
LAYOUT_CASES = {
    "messages_multi_turn": (
        "messages",
        lambda k: {
            "messages": [
                system("be brief"),
                user(f"hi {k}"),
                assistant(f"hello {k}"),
                user(f"sum {k}+1?"),
                assistant(f"{k + 1}"),
            ]
        },
        lambda k: (
            [system("be brief"), user(f"hi {k}"), assistant(f"hello {k}"), user(f"sum {k}+1?")],
            [assistant(f"{k + 1}")],
        ),
        {},
    ),
    "messages_trailing_user_turn": (
        "messages",
        lambda k: {"messages": [user(f"q{k}"), assistant(f"a{k}"), user("thanks")]},
        lambda k: ([user(f"q{k}")], [assistant(f"a{k}")]),
        {},
    ),
    "sharegpt_conversations": (
        "messages",
        lambda k: {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": f"q{k}"},
                {"from": "gpt", "value": f"a{k}"},
                {"from": "human", "value": f"more {k}"},
                {"from": "gpt", "value": f"b{k}"},
            ]
        },
        lambda k: (
            [system("sys"), user(f"q{k}"), assistant(f"a{k}"), user(f"more {k}")],
            [assistant(f"b{k}")],
        ),
        {},
    ),
    "conversations_with_role_content": (
        "messages",
        lambda k: {"conversations": [user(f"q{k}"), assistant(f"a{k}")]},
        lambda k: ([user(f"q{k}")], [assistant(f"a{k}")]),
        {},
    ),
    "prompt_completion_strings": (
        "prompt_completion",
        lambda k: {"prompt": f"p{k}", "completion": f"c{k}", "extra": k},
        lambda k: ([user(f"p{k}")], [assistant(f"c{k}")]),
        {},
    ),
    "prompt_completion_message_lists": (
        "prompt_completion",
        lambda k: {"prompt": [system("s"), user(f"p{k}")], "completion": [assistant(f"c{k}")]},
        lambda k: ([system("s"), user(f"p{k}")], [assistant(f"c{k}")]),
        {},
    ),
    "alpaca_with_and_without_input": (
        "alpaca",
        lambda k: {"instruction": f"Translate {k}", "input": f"text {k}" if k % 2 else "", "output": f"out {k}"},
        lambda k: ([user(f"Translate {k}\n\ntext {k}" if k % 2 else f"Translate {k}")], [assistant(f"out {k}")]),
        {},
    ),
    "dolly_with_and_without_context": (
        "dolly",
        lambda k: {
            "instruction": f"Summarize {k}",
            "context": f"passage {k}" if k % 2 else "",
            "response": f"summary {k}",
            "category": "summarization",
        },
        lambda k: (
            [user(f"Summarize {k}\n\nContext: passage {k}" if k % 2 else f"Summarize {k}")],
            [assistant(f"summary {k}")],
        ),
        {},
    ),
}


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layouts_convert_to_prompt_completion(tmp_path, case, explicit):
    layout, make_row, make_expected, extra = LAYOUT_CASES[case]
    path = write(tmp_path / "d.jsonl", [make_row(k) for k in range(N)])
    data = load_task_data(local(path, layout=layout if explicit else "auto", **extra))
    assert data.layout == layout
    assert all_rows(data) == expect(make_expected(k) for k in range(N))


@pytest.mark.parametrize("with_system", [False, True])
def test_columns_layout_maps_named_columns(tmp_path, with_system):
    rows = [{"question": f"q{k}", "answer": f"a{k}", "persona": f"persona {k}", "id": k} for k in range(N)]
    columns = {"prompt": "question", "completion": "answer"} | ({"system": "persona"} if with_system else {})
    data = load_task_data(local(write(tmp_path / "d.csv", rows), layout="columns", columns=columns))
    assert data.layout == "columns"
    head = (lambda k: [system(f"persona {k}")]) if with_system else (lambda k: [])
    assert all_rows(data) == expect(((head(k) + [user(f"q{k}")], [assistant(f"a{k}")]) for k in range(N)))


def test_auto_detection_prefers_the_right_layout_when_columns_overlap(tmp_path):
    # dolly has `instruction` like alpaca but `response`, not `output`
    rows = [{"instruction": f"i{k}", "context": "", "response": f"r{k}", "output_format": "text"} for k in range(N)]
    assert load_task_data(local(write(tmp_path / "d.jsonl", rows))).layout == "dolly"


def test_rows_without_an_assistant_turn_or_with_empty_completions_are_dropped(tmp_path):
    rows = [{"messages": [user(f"q{k}"), assistant(f"a{k}")]} for k in range(4)]
    rows += [
        {"messages": [user("no answer")]},
        {"messages": [assistant("answer first"), user("then a question")]},
        {"messages": [user("blank"), assistant("   ")]},
    ]
    data = load_task_data(local(write(tmp_path / "d.jsonl", rows)))
    assert all_rows(data) == expect((([user(f"q{k}")], [assistant(f"a{k}")]) for k in range(4)))


# --- system prompt and raw format ------------------------------------------------------------

SYSTEM_CASES = {
    "messages_without_system": (
        {"messages": [user("q"), assistant("a")]},
        "auto",
        {},
        [system("SYS"), user("q")],
    ),
    "messages_with_system": (
        {"messages": [system("own"), user("q"), assistant("a")]},
        "auto",
        {},
        [system("own"), user("q")],
    ),
    "prompt_list_with_system": (
        {"prompt": [system("own"), user("q")], "completion": [assistant("a")]},
        "auto",
        {},
        [system("own"), user("q")],
    ),
    "alpaca": ({"instruction": "q", "input": "", "output": "a"}, "auto", {}, [system("SYS"), user("q")]),
    "columns_with_system_value": (
        {"question": "q", "answer": "a", "sys": "own"},
        "columns",
        {"prompt": "question", "completion": "answer", "system": "sys"},
        [system("own"), user("q")],
    ),
    "columns_with_empty_system_value": (
        {"question": "q", "answer": "a", "sys": ""},
        "columns",
        {"prompt": "question", "completion": "answer", "system": "sys"},
        [system("SYS"), user("q")],
    ),
}


@pytest.mark.parametrize("case", list(SYSTEM_CASES))
def test_system_prompt_is_prepended_only_when_the_row_has_none(tmp_path, case):
    row, layout, columns, expected_prompt = SYSTEM_CASES[case]
    path = write(tmp_path / "d.jsonl", [row, row])
    data = load_task_data(local(path, layout=layout, columns=columns, system_prompt="SYS"))
    for r in data.train.to_list() + data.eval.to_list():
        assert r["prompt"] == expected_prompt
        assert r["completion"] == [assistant("a")]


def test_no_system_prompt_adds_no_system_message(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": f"q{k}", "completion": f"a{k}"} for k in range(N)])
    for r in all_rows(load_task_data(local(path))):
        assert [m["role"] for m in r["prompt"]] == ["user"]


def test_raw_format_gives_plain_strings(tmp_path):
    rows = [{"prompt": f"question {k}", "completion": f"answer {k}"} for k in range(N)]
    path = write(tmp_path / "d.jsonl", rows)
    data = load_task_data(local(path, format="raw", system_prompt="SYS"))
    got = sorted(data.train.to_list() + data.eval.to_list(), key=lambda r: r["prompt"])
    assert got == [{"prompt": f"SYS\nquestion {k}\n", "completion": f"answer {k}"} for k in range(N)]
    assert data.eval_answers == data.eval["completion"]
    assert data.eval_prompts() == data.eval["prompt"]
    # the fingerprint is of the converted rows, whatever the output format
    assert data.fingerprint == load_task_data(local(path, system_prompt="SYS")).fingerprint


# --- errors ----------------------------------------------------------------------------------


def test_missing_layout_columns_name_file_layout_missing_and_present(tmp_path):
    path = write(tmp_path / "bad.jsonl", [{"instruction": "i", "foo": "x"}] * 3)
    with pytest.raises(DataError) as info:
        load_task_data(local(path, layout="alpaca"))
    message = str(info.value)
    assert str(path) in message
    assert "(layout alpaca)" in message
    assert "missing column(s) output" in message
    assert "it has: instruction, foo" in message


def test_columns_layout_naming_absent_columns(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}] * 3)
    with pytest.raises(DataError) as info:
        load_task_data(local(path, layout="columns", columns={"prompt": "question", "completion": "a"}))
    message = str(info.value)
    assert "(layout columns)" in message and "missing column(s) question (data.columns.prompt='question');" in message
    assert "it has: q, a" in message


def test_explicit_messages_layout_without_a_messages_column(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    with pytest.raises(DataError, match=r"\(layout messages\) is missing column\(s\) messages; it has: prompt, completion"):
        load_task_data(local(path, layout="messages"))


def test_auto_detection_failure_lists_layouts_and_suggests_columns(tmp_path):
    path = write(tmp_path / "qa.csv", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError) as info:
        load_task_data(local(path))
    message = str(info.value)
    assert str(path) in message
    assert "cannot tell the layout from its columns (question, answer)" in message
    for expected in ("messages", "prompt+completion", "instruction+output (alpaca)", "instruction+response (dolly)"):
        assert expected in message
    assert "data.layout=columns" in message and "data.columns.prompt=" in message


def test_every_completion_empty_is_a_data_error(tmp_path):
    path = write(tmp_path / "empty.jsonl", [{"prompt": f"q{k}", "completion": " " * k} for k in range(4)])
    with pytest.raises(DataError) as info:
        load_task_data(local(path))
    assert str(path) in str(info.value) and "no usable rows" in str(info.value)


def test_a_single_usable_row_cannot_be_split(tmp_path):
    path = write(tmp_path / "one.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": ""}])
    with pytest.raises(DataError, match="needs at least 2 usable rows.*has 1"):
        load_task_data(local(path))


# --- split, caps, answers, fingerprint -------------------------------------------------------


def qa_rows(n, changed=None):
    return [{"prompt": f"question {k}", "completion": f"answer {k}" + ("!" if k == changed else "")} for k in range(n)]


@pytest.mark.parametrize("n, fraction, n_eval", [(20, 0.25, 5), (10, 0.1, 1), (7, 0.5, 4), (40, 0.2, 8)])
def test_split_sizes_follow_eval_fraction(tmp_path, n, fraction, n_eval):
    data = load_task_data(local(write(tmp_path / "d.jsonl", qa_rows(n)), eval_fraction=fraction))
    assert (len(data.train), len(data.eval)) == (n - n_eval, n_eval)


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    path = write(tmp_path / "d.jsonl", qa_rows(30))

    def split(seed):
        data = load_task_data(local(path, eval_fraction=0.2, seed=seed))
        return [r["prompt"][0]["content"] for r in data.train], [r["prompt"][0]["content"] for r in data.eval]

    train, evals = split(0)
    assert split(0) == (train, evals)
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(f"question {k}" for k in range(30))
    other_train, other_eval = split(1)
    assert set(other_eval) != set(evals)
    assert not set(other_train) & set(other_eval)


def test_row_caps_limit_train_and_eval(tmp_path):
    path = write(tmp_path / "d.jsonl", qa_rows(40))
    full = load_task_data(local(path, eval_fraction=0.25))
    capped = load_task_data(local(path, eval_fraction=0.25, max_train_rows=7, max_eval_rows=3))
    assert (len(full.train), len(full.eval)) == (30, 10)
    assert (len(capped.train), len(capped.eval)) == (7, 3)
    assert capped.train.to_list() == full.train.to_list()[:7]
    assert capped.eval.to_list() == full.eval.to_list()[:3]
    assert capped.eval_answers == full.eval_answers[:3]
    # caps larger than the data change nothing
    loose = load_task_data(local(path, eval_fraction=0.25, max_train_rows=1000, max_eval_rows=1000))
    assert loose.fingerprint == full.fingerprint and len(loose.train) == 30


def test_eval_answers_are_the_eval_completions_text(tmp_path):
    data = load_task_data(local(write(tmp_path / "d.jsonl", qa_rows(20)), eval_fraction=0.3))
    assert len(data.eval_answers) == len(data.eval) == 6
    assert data.eval_answers == [r["completion"][-1]["content"] for r in data.eval]
    for prompt, answer in zip(data.eval_prompts(), data.eval_answers):
        assert answer == prompt[-1]["content"].replace("question", "answer")
    assert data.eval_prompts(2) == data.eval_prompts()[:2]


def test_fingerprint_changes_with_one_row_and_is_stable_otherwise(tmp_path):
    base = load_task_data(local(write(tmp_path / "a.jsonl", qa_rows(12))))
    assert len(base.fingerprint) == 64
    same_rows_elsewhere = load_task_data(local(write(tmp_path / "b.json", qa_rows(12))))
    assert same_rows_elsewhere.fingerprint == base.fingerprint
    assert load_task_data(local(tmp_path / "a.jsonl")).fingerprint == base.fingerprint
    changed = load_task_data(local(write(tmp_path / "c.jsonl", qa_rows(12, changed=5))))
    assert changed.fingerprint != base.fingerprint


def test_fingerprint_function_is_order_and_content_sensitive():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert fingerprint(rows) == fingerprint([dict(r) for r in rows])
    assert fingerprint(rows) != fingerprint(rows[::-1])
    assert fingerprint(rows) != fingerprint([rows[0], {"prompt": "c", "completion": "e"}])


# --- embedded source -------------------------------------------------------------------------


def embedded(**kw):
    return DataConfig(source="embedded", tasks=list(embedded_tasks.TASKS), train_per_task=6, eval_per_task=3, **kw)


def test_embedded_data_matches_the_task_generator():
    data = load_task_data(embedded(seed=4))
    train, evals = embedded_tasks.train_eval(list(embedded_tasks.TASKS), 6, 3, 4)
    assert data.layout == "prompt_completion"
    assert data.train.to_list() == [{"prompt": [user(r["prompt"])], "completion": [assistant(r["answer"])]} for r in train]
    assert data.eval.to_list() == [{"prompt": [user(r["prompt"])], "completion": [assistant(r["answer"])]} for r in evals]
    assert data.eval_answers == [r["answer"] for r in evals]
    assert data.fingerprint == load_task_data(embedded(seed=4)).fingerprint
    assert data.fingerprint != load_task_data(embedded(seed=5)).fingerprint


def test_embedded_data_honours_caps_raw_format_and_system_prompt():
    capped = load_task_data(embedded(max_train_rows=5, max_eval_rows=2))
    assert (len(capped.train), len(capped.eval), len(capped.eval_answers)) == (5, 2, 2)
    raw = load_task_data(embedded(format="raw"))
    assert all(isinstance(r["prompt"], str) and r["prompt"].endswith("\n") for r in raw.train)
    assert raw.eval["completion"] == raw.eval_answers
    with_system = load_task_data(embedded(system_prompt="SYS"))
    for r in with_system.train.to_list() + with_system.eval.to_list():
        assert r["prompt"][0] == system("SYS") and [m["role"] for m in r["prompt"]] == ["system", "user"]


# --- validate.check_data ---------------------------------------------------------------------


def problems_for(**data_fields):
    problems: list[str] = []
    check_data(problems, SimpleNamespace(data=DataConfig(**data_fields)))
    return problems


def test_check_data_accepts_a_good_local_config(tmp_path):
    path = write(tmp_path / "d.jsonl", qa_rows(4))
    assert problems_for(source="local", path=str(path)) == []
    assert problems_for(source="local", path=str(path), layout="columns", columns={"prompt": "q", "completion": "a"}) == []


@pytest.mark.parametrize("columns", [{}, {"prompt": "question"}, {"completion": "answer", "system": "s"}])
def test_check_data_reports_columns_layout_without_mapping(tmp_path, columns):
    path = write(tmp_path / "d.jsonl", qa_rows(4))
    problems = problems_for(source="local", path=str(path), layout="columns", columns=columns)
    assert len(problems) == 1
    assert "data.layout=columns needs data.columns.prompt and data.columns.completion" in problems[0]
    assert repr(columns) in problems[0]


def test_check_data_reports_unknown_task_and_lists_available():
    problems = problems_for(source="embedded", tasks=["acronym", "spelling_bee"])
    assert len(problems) == 1
    assert "unknown task 'spelling_bee'" in problems[0]
    assert "available: reverse_words, extract_field, acronym, join_words" in problems[0]
    assert problems_for(source="embedded", tasks=[]) == [
        "data.tasks must name at least one task; available: reverse_words, extract_field, acronym, join_words"
    ]


def test_check_data_reports_missing_and_unsupported_files(tmp_path):
    assert problems_for(source="local", path=str(tmp_path / "nope.jsonl")) == [
        f"data.path: no such file {str(tmp_path / 'nope.jsonl')!r}"
    ]
    text = tmp_path / "d.txt"
    text.write_text("hello")
    (problem,) = problems_for(source="local", path=str(text))
    assert "unsupported file type '.txt'" in problem and ".jsonl" in problem and ".parquet" in problem


def test_composed_local_config_checks_columns_layout(tmp_path):
    """Through Hydra composition (`data=local`); check_data rather than validate, which imports transformers."""
    from lora_search.config.compose import load_config

    path = write(tmp_path / "d.jsonl", qa_rows(4))
    base = ["data=local", f"data.path={path}", "data.layout=columns"]
    problems: list[str] = []
    check_data(problems, load_config(base))
    assert len(problems) == 1 and "data.layout=columns needs data.columns.prompt" in problems[0]
    cfg = load_config(base + ["+data.columns.prompt=prompt", "+data.columns.completion=completion"])
    problems = []
    check_data(problems, cfg)
    assert problems == []
    data = load_task_data(cfg.data)
    assert data.layout == "columns" and len(data.train) + len(data.eval) == 4
