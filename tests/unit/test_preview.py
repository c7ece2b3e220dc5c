"""`preview`: rows as the model will see them (TRL's tokenization), the completion marked, the data report; the
tokenizer only, never model weights; nothing written under results/."""

from __future__ import annotations

import json

import pytest

from lora_search.commands import preview
from lora_search.core.errors import ConfigError, DataError
from lora_search.data import quality_report
from lora_search.models import loaders


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model weight fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("preview loaded model weights")

    monkeypatch.setattr(loaders, "load_base", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def run_preview(tmp_path, *overrides):
    return preview.main(["model=tiny_llama", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
                         *overrides])


def test_preview_shows_rows_as_trained_with_the_completion_marked(tmp_path, no_weights):
    rows = [{"prompt": f"When {k}?", "completion": f"1999-01-0{k}"} for k in range(1, 9)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    text = run_preview(tmp_path, "data=local", f"data.path={path}", "preview.rows=3", "data.eval_fraction=0.25")
    assert text.count("── train row ") == 3
    for shown in range(3):
        assert f"── train row {shown + 1} of 6:" in text
    # the chat template's text, the completion between the markers exactly as in the file, lines marked ▶
    assert "  <|im_start|>assistant⏎\n▶ ⟦1999-01-0" in text and "<|im_end|>⏎\n▶ ⟧" in text
    assert "data report" in text and "6 train, 2 eval" in text and "8 rows read" in text
    assert "tokens per train row: p50 " in text and "0 rows longer than max_length 256" in text
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_preview_marks_the_cut_at_max_length_and_counts_it(tmp_path, no_weights):
    rows = [{"prompt": "q", "completion": "x" * 60}, {"prompt": "p", "completion": "short"}] * 2
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    text = run_preview(tmp_path, "data=local", f"data.path={path}", "trainer.max_length=40",
                       f"data.eval_path={path}")
    assert "(cut at max_length)" in text and "⟧✂" in text
    assert "2 rows longer than max_length 40 (completion truncated)" in text
    assert "leakage: 4 eval rows share a prompt with a train row" in text


def test_preview_raw_format_shows_plain_text_and_the_eos(tmp_path, no_weights):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 007", "completion": "1e3"}] * 4)
    text = run_preview(tmp_path, "data=local", f"data.path={path}", "data.format=raw", "preview.rows=1")
    assert "  Q: 007⏎\n▶ ⟦1e3<|im_end|>⟧" in text and "<|im_start|>" not in text.split("data report")[0]


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_preview_token_ids_and_trained_part_match_what_sfttrainer_builds(make_cfg, tmp_path, fmt):
    """The ids preview shows and the tokens it marks as trained are SFTTrainer's input_ids and labels."""
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from lora_search.data.load import load_task_data
    from lora_search.train.run import sft_config

    cfg = make_cfg("data.train_per_task=3", "data.eval_per_task=1", f"data.format={fmt}", "trainer.max_length=512")
    data = load_task_data(cfg.data)
    tokenizer = loaders.load_tokenizer(cfg.model, cfg.cache_dir)
    model = AutoModelForCausalLM.from_config(loaders._tiny_config(cfg.model, len(tokenizer)))
    trainer = SFTTrainer(model=model, args=sft_config(cfg, tmp_path, []), train_dataset=data.train,
                         eval_dataset=data.eval, processing_class=tokenizer)
    for rows, tokenized in ((data.train, trainer.train_dataset), (data.eval, trainer.eval_dataset)):
        assert len(tokenized) == len(rows)
        for row, done in zip(rows, tokenized):
            ids, start = quality_report.row_tokens(row, tokenizer)
            assert ids == done["input_ids"]
            assert [i for i, label in enumerate(done["labels"]) if label != -100] == list(range(start, len(ids)))
            assert 0 < start < len(ids)


def test_preview_rejects_a_bad_rows_value_and_bad_data_with_one_line(tmp_path, no_weights):
    with pytest.raises(ConfigError, match=r"preview.rows must be an integer >= 0, got -1"):
        run_preview(tmp_path, "preview.rows=-1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"is empty \(0 rows\)"):
        run_preview(tmp_path, "data=local", f"data.path={empty}")
    assert not (tmp_path / "results").exists()
