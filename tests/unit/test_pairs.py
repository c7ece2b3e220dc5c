"""Preference data (trainer=dpo) in the layouts users have: prompt/chosen/rejected as strings or message lists,
dialogues sharing a prefix (the prompt is the shared prefix), UltraFeedback's prompt plus whole dialogues, a column
mapping; json, jsonl, csv, parquet and a hub-style dataset folder; the embedded preference task; the data report and
preview show the prompt and both answers as DPOTrainer sees them."""

from __future__ import annotations

import json

import pytest

from lora_search.config.schema import DataConfig
from lora_search.core.errors import DataError
from lora_search.data import embedded_tasks
from lora_search.data import load as data_lib

U, A = "user", "assistant"


def msg(role, text):
    return {"role": role, "content": text}


EXPECTED = [
    ([msg(U, "Capital of France?")], [msg(A, "Paris")], [msg(A, "Lyon")]),
    ([msg(U, "2+2?")], [msg(A, "4")], [msg(A, "five")]),
    ([msg(U, "Spell cat")], [msg(A, "c-a-t")], [msg(A, "k-a-t")]),
    ([msg(U, "Colour of snow?")], [msg(A, "white")], [msg(A, "1999-01-31")]),  # a date stays text
]
QUESTIONS = [p[0]["content"] for p, _, _ in EXPECTED]
GOOD = [c[0]["content"] for _, c, _ in EXPECTED]
BAD = [r[0]["content"] for _, _, r in EXPECTED]

LAYOUTS = {
    "strings": [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in zip(QUESTIONS, GOOD, BAD)],
    "message_lists": [{"prompt": [msg(U, q)], "chosen": [msg(A, c)], "rejected": [msg(A, r)]}
                      for q, c, r in zip(QUESTIONS, GOOD, BAD)],
    "implicit_prompt": [{"chosen": [msg(U, q), msg(A, c)], "rejected": [msg(U, q), msg(A, r)]}
                        for q, c, r in zip(QUESTIONS, GOOD, BAD)],
    "ultrafeedback": [{"prompt": q, "chosen": [msg(U, q), msg(A, c)], "rejected": [msg(U, q), msg(A, r)],
                       "score_chosen": "8.0"} for q, c, r in zip(QUESTIONS, GOOD, BAD)],
}


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(path, **extra):
    eval_path = extra.pop("eval_path", None)
    cfg = DataConfig(name="local", source="local", path=str(path), eval_path=str(eval_path or path), **extra)
    return data_lib.load_task_data(cfg)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_preference_layout_becomes_the_same_pairs(layout, fmt, tmp_path):
    data = load(write(tmp_path / f"pairs.{fmt}", LAYOUTS[layout], fmt))
    assert (data.kind, data.layout) == ("preference", "preference")
    assert set(data.train.column_names) == {"prompt", "chosen", "rejected"}
    got = [(r["prompt"], r["chosen"], r["rejected"]) for r in data.train]
    assert got == EXPECTED
    assert data.eval_answers == GOOD


def test_a_column_mapping_reads_pairs_from_any_names_with_a_system_column(tmp_path):
    rows = [{"question": q, "good": c, "bad": r, "sys": "Be brief."} for q, c, r in zip(QUESTIONS, GOOD, BAD)]
    data = load(write(tmp_path / "pairs.jsonl", rows, "jsonl"), layout="columns",
                columns={"prompt": "question", "chosen": "good", "rejected": "bad", "system": "sys"})
    assert data.kind == "preference"
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in data.train] == [
        ([msg("system", "Be brief."), *p], c, r) for p, c, r in EXPECTED]


def test_text_dialogues_without_a_prompt_split_at_the_shared_prefix(tmp_path):
    """Anthropic HH style: two texts that share the conversation so far; the prompt is the shared text (without
    the space before the answers, as TRL's extract_prompt cuts it)."""
    rows = [{"chosen": f"Human: {q} Assistant: {c}", "rejected": f"Human: {q} Assistant: {r}"}
            for q, c, r in zip(QUESTIONS, GOOD, BAD)]
    data = load(write(tmp_path / "hh.jsonl", rows, "jsonl"), format="raw")
    first = data.train[0]
    assert first["prompt"] == "Human: Capital of France? Assistant:\n"
    assert (first["chosen"], first["rejected"]) == (" Paris", " Lyon")


def test_a_hub_dataset_folder_of_pairs_is_read_like_a_file(tmp_path):
    folder = tmp_path / "prefs"
    (folder / "data").mkdir(parents=True)
    write(folder / "data" / "train-00000.parquet", LAYOUTS["message_lists"], "parquet")
    write(folder / "data" / "test-00000.parquet", LAYOUTS["message_lists"][:2], "parquet")
    cfg = DataConfig(name="hub", source="hub", path=str(folder), eval_split="test")
    data = data_lib.load_task_data(cfg)
    assert data.kind == "preference" and len(data.train) == 4 and len(data.eval) == 2
    assert data.eval[1]["rejected"] == [msg(A, "five")]


def test_identical_answers_are_dropped_and_counted_all_identical_is_refused(tmp_path):
    rows = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in zip(QUESTIONS, GOOD, BAD)]
    rows.append({"prompt": "same?", "chosen": "yes", "rejected": "yes"})
    rows.append({"prompt": "", "chosen": "a", "rejected": "b"})
    data = load(write(tmp_path / "pairs.jsonl", rows, "jsonl"))
    dropped = data.report["train"]["dropped"]
    assert dropped["with identical chosen and rejected answers (nothing to prefer)"] == {"rows": 1, "first": "line 5"}
    assert dropped["with an empty prompt"] == {"rows": 1, "first": "line 6"}
    assert len(data.train) == 4
    same = [{"prompt": q, "chosen": c, "rejected": c} for q, c in zip(QUESTIONS, GOOD)]
    with pytest.raises(DataError, match=r"no usable rows: 4 rows with identical chosen and rejected answers"):
        load(write(tmp_path / "same.jsonl", same, "jsonl"))


def test_eval_data_of_another_kind_is_refused(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", LAYOUTS["strings"], "jsonl")
    sft = write(tmp_path / "sft.jsonl", [{"prompt": q, "completion": c} for q, c in zip(QUESTIONS, GOOD)], "jsonl")
    with pytest.raises(DataError, match=r"holds prompt/completion rows .* but .* holds preference pairs"):
        load(pairs, eval_path=sft)


def test_a_csv_answer_that_only_looks_like_json_stays_text(tmp_path):
    rows = [{"prompt": q, "chosen": "[{not json", "rejected": r} for q, r in zip(QUESTIONS, BAD)]
    data = load(write(tmp_path / "pairs.csv", rows, "csv"))
    assert data.train[0]["chosen"] == [msg(A, "[{not json")]


def test_the_embedded_preference_task_is_deterministic_and_disjoint():
    cfg = DataConfig(name="embedded_preference", source="embedded", layout="preference",
                     tasks=list(embedded_tasks.PREFERENCE_TASKS), train_per_task=20, eval_per_task=5)
    one, two = data_lib.load_task_data(cfg), data_lib.load_task_data(cfg)
    assert one.fingerprint == two.fingerprint and one.kind == "preference"
    assert len(one.train) == 80 and len(one.eval) == 20
    train_prompts = {json.dumps(r["prompt"]) for r in one.train}
    assert not any(json.dumps(r["prompt"]) in train_prompts for r in one.eval)
    assert all(r["chosen"] != r["rejected"] for r in one.train)
    assert one.report["leakage"] == 0


def test_the_report_and_preview_show_the_prompt_and_both_answers_as_dpo_tokenizes_them(tmp_path, make_cfg):
    from lora_search.commands import preview
    from lora_search.data import quality_report
    from lora_search.models import loaders
    from lora_search.train import dpo

    path = write(tmp_path / "pairs.jsonl", LAYOUTS["strings"] * 3, "jsonl")
    cfg = make_cfg("trainer=dpo", "data=local", f"data.path={path}", "trainer.max_length=40")
    text = preview.preview(cfg, 2)
    assert "── train pair 1 of" in text
    assert "▶ chosen: ⟦" in text and "▶ rejected: ⟦" in text
    data = data_lib.load_task_data(cfg.data)
    tok = loaders.load_tokenizer(cfg.model, cfg.cache_dir)
    first = data.train[0]
    chosen, rejected, start = quality_report.pair_tokens(first, tok)
    assert tok.decode(chosen[start:]).startswith(first["chosen"][0]["content"])
    assert tok.decode(rejected[start:]).startswith(first["rejected"][0]["content"])
    assert dpo.tokenize_pairs([first], tok)[0]["prompt_ids"] == chosen[:start]
    report = quality_report.add_tokens(data.report, data, tok, 40)
    assert report["tokens"]["train"]["max"] == max(len(max(quality_report.pair_tokens(r, tok)[:2], key=len))
                                                   for r in data.train)
    assert "rows used: " in quality_report.render(report)
