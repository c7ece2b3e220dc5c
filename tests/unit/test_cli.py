"""The command line: a tiny end-to-end run, and bad input that fails fast with one clear line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_FAST

REPO = Path(__file__).resolve().parents[2]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lora_search", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.slow  # a subprocess of the whole CLI (make test runs it; test-fast stays under 5 minutes)
def test_stage_train_on_tiny_model_writes_the_run_folder(tmp_path, tiny_cache):
    proc = cli("stage=train", "model=tiny_llama", "run_name=t1", f"results_dir={tmp_path}", f"cache_dir={tiny_cache}",
               *TINY_FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "t1"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("eval_loss", "base_eval_loss", "train_tokens_per_s", "peak_memory_mb", "trainable_params", "wall_s"):
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["base_exact_match"] <= 1.0
    assert metrics["diverged"] is None
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["name"] == "tiny_llama" and config["trainer"]["max_steps"] == 12
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert "eval loss" in proc.stdout + proc.stderr  # progress and the summary line are shown


def _bad_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "reply": "a"}\n' * 3)
    return path


# A few inputs as real processes (the exit code and stderr a shell sees); the whole catalogue, 58 inputs, runs
# in-process in test_bad_input.py.
@pytest.mark.parametrize(
    "args, expected",
    [
        (["trainr.learning_rate=1e-4"], "unknown config key 'trainr.learning_rate'; did you mean trainer.learning_rate?"),
        (["model=tiny_llama", "lora.targets=[q_proj,wq]"], "lora.targets: entry 'wq' matches no module"),
        (["model=tiny_llama", "data=local", "data.path=BADFILE", "data.layout=prompt_completion"],
         "is missing column(s) prompt, completion; it has: question, reply"),
    ],
)
@pytest.mark.slow  # one subprocess per case (the in-process catalogue, test_bad_input.py, stays fast)
def test_bad_input_fails_fast_with_one_line(args, expected, tmp_path, tiny_cache):
    args = [a.replace("BADFILE", str(_bad_file(tmp_path))) for a in args]
    proc = cli("stage=train", f"results_dir={tmp_path}", f"cache_dir={tiny_cache}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written under results/


def test_nf4_without_bitsandbytes_exits_with_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    from lora_search.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["stage=train", "quant=nf4", f"results_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "h")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: quant=nf4 (mode nf4) needs bitsandbytes, which is not installed" in err


@pytest.mark.slow  # a subprocess of the whole CLI (make test runs it; test-fast stays under 5 minutes)
def test_several_problems_are_listed_together(tmp_path):
    proc = cli("stage=train", "lora.r=0", "lora.dropout=3", f"results_dir={tmp_path}")
    assert proc.returncode == 2
    assert "2 problems" in proc.stderr and "lora.r" in proc.stderr and "lora.dropout" in proc.stderr


def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path):
    proc = cli("--cfg", "job", "model=tiny_llama", "lora.r=12", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = yaml.safe_load(proc.stdout)
    assert config["model"]["name"] == "tiny_llama" and config["lora"]["r"] == 12
    assert not any(tmp_path.iterdir())


def test_a_train_runs_status_records_provenance_and_a_failed_run_its_reason(make_cfg, monkeypatch):
    import re
    from importlib import metadata

    from lora_search.commands import train_stage

    fast = [*TINY_FAST, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.exact_match_items=2"]
    run_dir = train_stage.train_stage(make_cfg("stage=train", "run_name=ok", *fast))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "complete" and status["reason"] is None
    provenance = status["provenance"]
    for package in ("torch", "transformers", "peft", "trl", "optuna"):
        assert provenance["packages"][package] == metadata.version(package), package
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", provenance["git"]) and provenance["git"].startswith(head)
    assert provenance["machine"]["cores"] == os.cpu_count() and provenance["machine"]["python"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_stage, "train_adapter", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train_stage.train_stage(make_cfg("stage=train", "run_name=broken", *fast))
    failed = json.loads((run_dir.parent / "broken" / "status.json").read_text())
    assert failed["status"] == "failed" and failed["reason"] == "RuntimeError: disk full"
    assert failed["provenance"]["packages"]["torch"] == metadata.version("torch")
    assert not (run_dir.parent / "broken" / "metrics.json").exists()


def test_a_train_run_that_diverges_is_recorded_failed_with_its_metrics_and_exits_1(make_cfg, monkeypatch, capsys):
    """Trained to the end with a NaN loss: status failed with the divergence as its reason, the NaN metrics kept
    (visible, not filtered), and the command exits 1 with one line, no traceback."""
    from lora_search import __main__ as main
    from lora_search.commands import train_stage
    from lora_search.core.errors import RunDiverged

    fast = [*TINY_FAST, "trainer.max_steps=3", "trainer.eval_every=0", "trainer.exact_match_items=0",
            "trainer.learning_rate=1e30", "trainer.max_grad_norm=1e30", "trainer.logging_steps=1"]
    cfg = make_cfg("stage=train", "run_name=nan", *fast)
    with pytest.raises(RunDiverged, match="diverged: training loss") as caught:
        train_stage.train_stage(cfg)
    run_dir = caught.value.run_dir
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"].startswith("diverged: training loss")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["diverged"] == status["reason"] and metrics["eval_loss"] in ("nan", "inf")

    monkeypatch.setattr(train_stage, "train_stage", lambda c: (_ for _ in ()).throw(RunDiverged("diverged: x", run_dir)))
    monkeypatch.setattr(main, "_sweep_note", lambda name: None)
    import hydra.core.hydra_config as hc

    class Runtime:
        choices: dict = {}
        config_sources: list = []

    class Fake:
        overrides = type("O", (), {"task": []})()
        runtime = Runtime()

    monkeypatch.setattr(hc.HydraConfig, "get", staticmethod(lambda: Fake()))
    monkeypatch.setattr("lora_search.config.compose.to_run_config", lambda c, o: cfg)
    capsys.readouterr()  # the training run's progress bars
    with pytest.raises(SystemExit) as exit_:
        main.run(None)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and err[0].startswith("error: the run diverged: x (recorded in ")


def test_run_name_is_model_lora_quant_and_time_unless_given(make_cfg):
    import datetime
    import re

    from lora_search.commands import train_stage

    plain = train_stage.run_name(make_cfg("lora=minimal"))
    match = re.fullmatch(r"tiny_llama-minimal-(\d{8}-\d{6})", plain)
    assert match, plain
    datetime.datetime.strptime(match[1], "%Y%m%d-%H%M%S")  # a real date and time
    assert re.fullmatch(r"tiny_llama-balanced-nf4-\d{8}-\d{6}", train_stage.run_name(make_cfg("quant=nf4")))
    assert train_stage.run_name(make_cfg("quant=nf4", "run_name=mine")) == "mine"


def test_the_closing_line_of_a_run_says_what_its_method_measures_and_never_fails_on_a_missing_figure():
    from lora_search.commands.train_stage import summary_line

    rl = {"reward": 0.625, "base_reward": 0.125, "exact_match": 0.5, "base_exact_match": 0.0, "kl": 0.0123,
          "wall_s": 61.0}
    assert summary_line("grpo", rl) == ("held-out reward 0.625 (base 0.125), exact match 50% (base 0%), KL to the "
                                        "reference 0.0123; 61.0 s in all")
    assert summary_line("rloo", {}) == ("held-out reward - (base -), exact match - (base -), KL to the reference -; "
                                        "- s in all")  # an RL run has no eval loss: no KeyError
    sft = {"eval_loss": 1.5, "base_eval_loss": 2.25, "exact_match": 0.75, "base_exact_match": 0.02,
           "train_tokens_per_s": 812.4, "wall_s": 90.0}
    assert summary_line("sft", sft) == ("eval loss 1.5000 (base 2.2500); exact match 75% (base 2%); 812 train "
                                        "tokens/s; 90.0 s in all")
    assert summary_line("sft", {**sft, "eval_loss": float("nan")}).startswith("eval loss - (base 2.2500)")
    dpo = {"eval_loss": 0.5, "reward_accuracy": 0.9, "preference_accuracy": 0.8, "base_preference_accuracy": 0.3,
           "preference_pairs": 40, "wall_s": 30.0}
    assert summary_line("dpo", dpo) == ("eval DPO loss 0.5000, reward accuracy 90%; preference accuracy 80% (base "
                                        "30%) on 40 eval pairs; 30.0 s in all")
