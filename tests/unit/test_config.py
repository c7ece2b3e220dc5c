"""Composition, schemas and validation: every bad input names the key, the value and what is accepted."""

from __future__ import annotations

import dataclasses

import pytest

from lora_search.checks.run_config import validate
from lora_search.config import compose, schema
from lora_search.config.compose import load_config
from lora_search.core.errors import ConfigError


def problems_of(*overrides):
    cfg = load_config(list(overrides))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return info.value.problems


def test_default_composes_to_typed_config():
    cfg = load_config([])
    assert isinstance(cfg, schema.RunConfig)
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "embedded"
    assert cfg.lora.name == "balanced" and cfg.quant.mode == "none" and cfg.data.source == "embedded"
    assert cfg.stage == "all" and cfg.sweep.name == "rank_lr"
    validate(cfg)  # the default is valid


@pytest.mark.parametrize(
    "preset, r, alpha, dropout, targets, extra",
    [
        ("minimal", 4, 8, 0.0, "qv", {}),
        ("balanced", 8, 16, 0.05, "attn", {}),
        ("performance", 16, 32, 0.1, "all_linear", {"bias": "lora_only"}),
        ("domain_shift", 32, 64, 0.05, "all_linear", {"modules_to_save": ["embed_tokens", "lm_head"]}),
    ],
)
def test_lora_presets_match_the_guide(preset, r, alpha, dropout, targets, extra):
    lora = load_config([f"lora={preset}"]).lora
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (r, alpha, dropout, targets)
    for key, value in extra.items():
        assert getattr(lora, key) == value


def test_every_config_group_has_a_registered_schema():
    from hydra.core.config_store import ConfigStore

    compose.register()
    repo = ConfigStore.instance().repo
    assert "run_schema.yaml" in repo
    for group in schema.GROUPS:
        assert f"{group}_schema.yaml" in repo[group], group


def test_hub_models_have_every_target_preset():
    for name in compose.group_choices("model"):
        cfg = load_config([f"model={name}"] + (["model.path=/tmp"] if name == "local" else []))
        assert set(cfg.model.target_presets) >= {"qv", "attn", "mlp", "all_linear"}, name
    hub = [n for n in compose.group_choices("model") if load_config([f"model={n}"] if n != "local" else []).model.source == "hub"]
    assert len(hub) >= 4


def test_command_line_override_reaches_the_config():
    cfg = load_config(["model=tiny_llama", "lora=performance", "quant=nf4", "trainer.learning_rate=3e-4"])
    assert cfg.trainer.learning_rate == 3e-4 and cfg.quant.mode == "nf4" and cfg.lora.r == 16


def test_unknown_group_choice_names_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config(["model=tiny_lama"])
    message = info.value.problems[0]
    assert "model=tiny_lama" in message and "tiny_llama" in message and "smollm2_135m" in message


def test_unknown_key_names_the_closest_keys():
    with pytest.raises(ConfigError) as info:
        load_config(["lora.rank=8"])
    message = info.value.problems[0]
    assert "lora.rank" in message and "lora.r" in message


def test_free_form_dict_keys_are_accepted():
    cfg = load_config(["+lora.rank_pattern.q_proj=4"])
    assert cfg.lora.rank_pattern == {"q_proj": 4}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.r=0", "lora.r must be a positive integer, got 0"),
        ("lora.dropout=1.0", "lora.dropout must be in [0, 1), got 1.0"),
        ("lora.dropout=-0.1", "lora.dropout must be in [0, 1), got -0.1"),
        ("trainer.learning_rate=0", "trainer.learning_rate must be a positive number, got 0"),
        ("trainer.learning_rate=-1e-4", "trainer.learning_rate must be a positive number, got -0.0001"),
        ("lora.bias=some", "lora.bias must be one of none, all, lora_only; got 'some'"),
        ("trainer.lr_scheduler=cosinus", "trainer.lr_scheduler must be one of linear, cosine"),
        ("lora.targets=everything", "lora.targets: unknown preset 'everything' for model smollm2_135m; presets: qv, attn"),
        ("trainer.precision=fp8", "trainer.precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
        ("trainer.padding_free=yes", "trainer.padding_free must be auto, true or false, got 'yes'"),
    ],
)
def test_bad_values_are_named(override, expected):
    assert any(expected in p for p in problems_of(override)), problems_of(override)


def test_all_problems_are_reported_at_once():
    problems = problems_of("lora.r=0", "lora.dropout=2", "trainer.learning_rate=0")
    assert len(problems) == 3


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    problems = problems_of("data=local", f"data.path={missing}")
    assert problems == [f"data.path: no such file '{missing}'"]


def test_unsupported_data_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    assert "accepted: .json, .jsonl, .csv, .parquet" in problems_of("data=local", f"data.path={path}")[0]


def test_nf4_without_bitsandbytes_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    problems = problems_of("quant=nf4")
    assert problems == ["quant=nf4 (mode nf4) needs bitsandbytes, which is not installed; "
                        "`pip install bitsandbytes`, or use quant=none"]


def test_schema_keys_cover_nested_groups():
    keys = compose.schema_keys()
    assert {"lora.r", "trainer.learning_rate", "model.source", "stage"} <= set(keys)
    assert all(dataclasses.is_dataclass(t) for t in schema.GROUPS.values())


def test_a_password_in_a_storage_url_is_never_written(make_cfg, tmp_path):
    from lora_search.core import records

    cfg = make_cfg("sweep.storage=postgresql+psycopg://lora:hunter2@db.example:5432/studies")
    records.write_config(tmp_path / "sweep.yaml", cfg)
    text = (tmp_path / "sweep.yaml").read_text()
    assert "hunter2" not in text and "postgresql+psycopg://lora:***@db.example:5432/studies" in text
    assert records.redact("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"


def _sweep_values(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _resolved(run: schema.RunConfig, raw: dict, name: str) -> None:
    """Every value the sweep file (or block) gives is the resolved value; every other key is the schema default."""
    default = schema.SweepConfig()
    resolved = dataclasses.asdict(run.sweep)
    for f in dataclasses.fields(schema.SweepConfig):
        got = resolved[f.name]
        if f.name in raw and f.name == "nightly":
            assert got == {**dataclasses.asdict(default.nightly), **raw["nightly"]}, name
        elif f.name in raw:
            assert got == raw[f.name], (name, f.name, got, raw[f.name])
        elif f.name == "direction":  # auto: the metric's own direction
            assert got == schema.METRIC_DIRECTIONS[run.sweep.metric], name
        elif f.name == "name":
            assert got == name
        else:
            assert got == dataclasses.asdict(default)[f.name], (name, f.name, got)


def test_every_shipped_sweep_resolves_to_exactly_what_its_file_says():
    for name in compose.group_choices("sweep"):
        raw = _sweep_values(compose.sweeps_dir() / f"{name}.yaml")
        _resolved(load_config([f"sweep={name}"]), raw, name)
    nightly = load_config(["sweep=nightly"]).sweep.sampler
    assert nightly == {"type": "tpe", "n_startup_trials": 4, "multivariate": True}  # no seed: a new one each night


def test_a_mapping_on_the_command_line_replaces_the_files_mapping():
    cfg = load_config(["sweep=rank_lr", "sweep.sampler={type: random}", "sweep.pruner={type: hyperband}",
                       "++sweep.trial={trainer.max_steps: 3}", "++sweep.promotion={trainer.max_steps: 9}",
                       "++sweep.space={lora.r: {type: categorical, choices: [2, 4]}}"])
    s = cfg.sweep
    assert (s.sampler, s.pruner) == ({"type": "random"}, {"type": "hyperband"})
    assert (s.trial, s.promotion) == ({"trainer.max_steps": 3}, {"trainer.max_steps": 9})
    assert s.space == {"lora.r": {"type": "categorical", "choices": [2, 4]}}
    assert load_config(["sweep.sampler=random"]).sweep.sampler == "random"
    # Keys the file's mapping lacks need no ++: the mapping is taken as given.
    plain = load_config(["sweep.pruner={type: successive_halving, min_resource: 2}", "sweep.trial={trainer.eval_every: 1}"])
    assert plain.sweep.pruner == {"type": "successive_halving", "min_resource": 2}
    assert plain.sweep.trial == {"trainer.eval_every": 1}
    # A key inside a mapping still updates that key, in command-line order.
    assert load_config(["sweep.sampler.seed=5"]).sweep.sampler == {"type": "tpe", "seed": 5, "n_startup_trials": 4,
                                                                  "multivariate": True}
    assert load_config(["sweep.sampler={type: random}", "sweep.sampler.seed=5"]).sweep.sampler == \
        {"type": "random", "seed": 5}
    assert load_config(["+lora.rank_pattern.q_proj=4"]).lora.rank_pattern == {"q_proj": 4}


def test_the_docs_sweep_example_is_the_shipped_rank_lr():
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "sweeps.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if re.search(r"^name: rank_lr\b", b, re.M)]
    assert len(blocks) == 1, "docs/sweeps.md must show lora_search/sweeps/rank_lr.yaml in one ```yaml block"
    assert "`lora_search/sweeps/rank_lr.yaml`" in text  # the page names the file it shows, at its path
    assert yaml.safe_load(blocks[0]) == _sweep_values(root / "lora_search" / "sweeps" / "rank_lr.yaml")
