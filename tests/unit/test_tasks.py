"""The embedded task generator: deterministic, disjoint, exact answers, interleaved eval rows."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lora_search.data import embedded_tasks
from lora_search.data.embedded_tasks import FIELDS, TASKS, WORDS, generate, train_eval

ALL = list(TASKS)


def expected_answer(task: str, prompt: str) -> str:
    """Re-derive a row's answer from its prompt text alone."""
    if task == "reverse_words":
        words = prompt.removeprefix("Reverse the order of these words: ").split()
        assert 3 <= len(words) <= 5
        return " ".join(reversed(words))
    if task == "acronym":
        words = prompt.removeprefix("Write the initials of: ").split()
        assert 3 <= len(words) <= 4
        return "".join(w[0].upper() for w in words)
    if task == "join_words":
        words = prompt.removeprefix("Join these words with dashes: ").split()
        assert 3 <= len(words) <= 5
        return "-".join(words)
    if task == "extract_field":
        match = re.fullmatch(r"Record: (.+)\. What is the (\w+)\?", prompt)
        assert match, prompt
        record = dict(pair.split("=", 1) for pair in match.group(1).split("; "))
        assert sorted(record) == sorted(FIELDS)
        return record[match.group(2)]
    raise AssertionError(f"unknown task {task}")


PREFIXES = {
    "reverse_words": "Reverse the order of these words: ",
    "acronym": "Write the initials of: ",
    "join_words": "Join these words with dashes: ",
    "extract_field": "Record: ",
}


@pytest.mark.parametrize("task", ALL)
def test_each_answer_is_correct_for_its_prompt(task):
    rows = generate([task], 60, seed=3)
    assert len(rows) == 60
    for row in rows:
        assert row["task"] == task
        assert row["prompt"].startswith(PREFIXES[task])
        assert row["answer"] == expected_answer(task, row["prompt"]), row
    if task != "extract_field":
        # words come from the vocabulary, without repeats inside one prompt
        for row in rows:
            words = row["prompt"].removeprefix(PREFIXES[task]).split()
            assert set(words) <= set(WORDS) and len(set(words)) == len(words)


def test_extract_field_asks_every_field_over_many_rows():
    asked = Counter(re.search(r"What is the (\w+)\?", r["prompt"]).group(1) for r in generate(["extract_field"], 80, 0))
    assert set(asked) == set(FIELDS)


def test_generate_is_deterministic_and_seed_dependent():
    a = generate(ALL, 10, seed=7)
    assert a == generate(ALL, 10, seed=7)
    b = generate(ALL, 10, seed=8)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]
    # per task, the items differ across seeds, not just their order
    for task in ALL:
        pa = {r["prompt"] for r in a if r["task"] == task}
        pb = {r["prompt"] for r in b if r["task"] == task}
        assert pa != pb, task


def test_generate_counts_uniqueness_and_exclude():
    counts = {"reverse_words": 5, "acronym": 0, "join_words": 12, "extract_field": 3}
    rows = generate(ALL, counts, seed=1)
    assert Counter(r["task"] for r in rows) == Counter({t: n for t, n in counts.items() if n})
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)

    banned = {r["prompt"] for r in generate(["join_words"], 30, seed=1)}
    again = generate(["join_words"], 30, seed=1, exclude=banned)
    assert len(again) == 30
    assert not banned & {r["prompt"] for r in again}


def test_generate_gives_up_when_items_cannot_be_distinct(monkeypatch):
    monkeypatch.setitem(embedded_tasks.TASKS, "constant", lambda rng: ("always the same", "x"))
    assert len(generate(["constant"], 1, seed=0)) == 1
    with pytest.raises(RuntimeError, match="task constant cannot produce 2 distinct items"):
        generate(["constant"], 2, seed=0)


def test_train_eval_is_deterministic_and_seed_dependent():
    first = train_eval(ALL, 20, 5, seed=0)
    assert first == train_eval(ALL, 20, 5, seed=0)
    other = train_eval(ALL, 20, 5, seed=1)
    assert [r["prompt"] for r in first[0]] != [r["prompt"] for r in other[0]]
    assert [r["prompt"] for r in first[1]] != [r["prompt"] for r in other[1]]


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_train_and_eval_prompts_are_disjoint_and_unique(seed):
    train, evals = train_eval(ALL, 50, 10, seed)
    train_prompts = [r["prompt"] for r in train]
    eval_prompts = [r["prompt"] for r in evals]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)
    for row in train + evals:
        assert row["answer"] == expected_answer(row["task"], row["prompt"])


@pytest.mark.parametrize("task_list", [ALL, ["join_words", "reverse_words"], ["acronym"]])
def test_train_eval_counts_are_exact_per_task(task_list):
    train, evals = train_eval(task_list, 13, 4, seed=5)
    assert Counter(r["task"] for r in train) == {t: 13 for t in task_list}
    assert Counter(r["task"] for r in evals) == {t: 4 for t in task_list}


@pytest.mark.parametrize("task_list", [ALL, ["extract_field", "acronym", "join_words"]])
def test_eval_rows_are_interleaved_by_task(task_list):
    _, evals = train_eval(task_list, 5, 6, seed=2)
    n = len(task_list)
    assert [r["task"] for r in evals] == task_list * 6
    assert {r["task"] for r in evals[:n]} == set(task_list)


def test_train_rows_are_shuffled_across_tasks():
    train, _ = train_eval(ALL, 20, 2, seed=0)
    order = [r["task"] for r in train]
    grouped = [t for t in ALL for _ in range(20)]
    assert order != grouped
    # the first rows already mix several tasks
    assert len(set(order[:12])) >= 3
