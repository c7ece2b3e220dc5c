"""The benchmark scripts: peer_sweep end to end in --quick mode (tiny model, 2 trials of 4 steps), and the
README's performance section rendered from the records. Speed is measured, never asserted."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import _common as common
from benchmarks import peer_sweep, readme_section

APPROACHES = ("handwritten", "lora_search", "hf_search")
SPACE = {"lora.r", "lora.alpha_ratio", "lora.dropout", "lora.targets", "trainer.learning_rate"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_cache):
    """One --quick run of peer_sweep (its record as returned, and the file it wrote)."""
    out = tmp_path_factory.mktemp("bench") / "peer_sweep.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "configure_logging", lambda: None)  # leave the test process's logging alone
        result = peer_sweep.main(["--quick", "--out", str(out), "--cache-dir", tiny_cache])
    return result, out


@pytest.mark.slow  # runs a benchmark on the tiny model (tens of seconds)
def test_quick_run_writes_every_approach_with_its_figures(quick):
    result, out = quick
    written = json.loads(out.read_text())
    assert written["name"] == "peer_sweep" and written["approaches"].keys() == set(APPROACHES)
    assert sorted(written["order"]) == sorted(APPROACHES) and written["order"][1] == "lora_search"
    s = written["settings"]
    assert (s["model"], s["trials"], s["max_steps"], s["eval_every"], s["quick"]) == ("tiny_llama", 2, 4, 2, True)
    assert s["sampler"]["type"] == "tpe" and s["sampler"]["seed"] == 0 and set(s["space"]) == SPACE
    for name in APPROACHES:
        a = written["approaches"][name]
        assert "error" not in a, (name, a.get("error"), a.get("traceback"))
        assert a["n_trials"] == 2 and a["complete"] + a["pruned"] == 2 and len(a["trials"]) == 2, name
        assert a["wall_s"] > 0 and a["wall_s"] >= a["trial_totals_s"]["wall_s"] > 0, name
        assert set(a["best_params"]) == SPACE and math.isfinite(a["best_value"]), name
        assert math.isfinite(a["best_full_eval_loss"]) and a["best_full_eval_loss"] > 0, name
        assert a["precision"] and a["model_loads"] >= 1 and a["objective_on"], name
        for trial in a["trials"]:
            assert trial["wall_s"] > 0 and set(trial["params"]) == SPACE, (name, trial)
            if trial["state"] == "complete":
                assert trial["steps"] == 4 and trial["train_step_s"] > 0 and trial["eval_s"] > 0, (name, trial)
                assert trial["setup_s"] is not None, (name, trial)
    assert written["approaches"]["lora_search"]["model_loads"] == 1
    hand = written["approaches"]["handwritten"]
    assert hand["model_loads"] == 2 and hand["pruned"] == 0
    assert written["approaches"]["hf_search"]["notes"]
    assert set(written["quality"]["best_full_eval_loss"]) == set(APPROACHES)
    t = written["targets"]
    assert {"lora_search_wall_vs_handwritten", "wall_met", "lora_search_best_loss_vs_handwritten_pct", "loss_met",
            "hf_search_wall_vs_handwritten"} <= set(t)
    machine = written["provenance"]["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    assert all(written["provenance"]["packages"][p] for p in ("torch", "transformers", "peft", "trl", "optuna"))
    assert result["approaches"].keys() == written["approaches"].keys()


@pytest.mark.slow  # runs a benchmark on the tiny model (tens of seconds)
def test_every_approach_samples_the_same_startup_configurations(quick):
    """Same space, names, order and seeded sampler: the random start-up trials are identical across approaches."""
    approaches = quick[0]["approaches"]
    first = [t["params"] for t in approaches["handwritten"]["trials"]]
    for name in APPROACHES[1:]:
        assert [t["params"] for t in approaches[name]["trials"]] == first, name


@pytest.mark.slow  # runs a benchmark on the tiny model (tens of seconds)
def test_readme_section_renders_the_records(quick, tmp_path):
    (tmp_path / "peer_sweep.json").write_text(quick[1].read_text())
    (tmp_path / "future.json").write_text(json.dumps({"name": "future", "per_trial_s": 1.5}))  # a kind not known
    (tmp_path / "broken.json").write_text("{not json")
    text = readme_section.main(["--dir", str(tmp_path)])
    assert text.startswith("## Performance")
    assert f"### LoRA search against its peers (`{tmp_path / 'peer_sweep.json'}`)" in text
    for label in readme_section.LABELS.values():
        assert f"| {label} |" in text
    assert "| per_trial_s | 1.5 |" in text and "Machine: " in text and "Targets:" in text
    assert "Skipped: broken.json: unreadable" in text


def test_readme_section_without_records(tmp_path):
    text = readme_section.render(*common.read_records(tmp_path / "missing"))
    assert "No benchmark records yet" in text


def test_readme_update_replaces_only_the_generated_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{readme_section.BEGIN}\nold figures\n{readme_section.END}\n\n## After\n")
    readme_section.update(readme, "## Performance\n\nnew figures\n")
    text = readme.read_text()
    assert "old figures" not in text and "new figures" in text
    assert text.startswith("# Title") and text.endswith("## After\n")
    (tmp_path / "plain.md").write_text("# No markers\n")
    with pytest.raises(SystemExit, match="no performance markers"):
        readme_section.update(tmp_path / "plain.md", "x")


@pytest.mark.slow  # runs a benchmark on the tiny model (tens of seconds)
def test_overhead_probe_times_every_trial_and_finds_no_leaked_adapter_or_optimizer(tmp_path):
    from benchmarks import overhead

    out = tmp_path / "overhead.json"
    result = overhead.main(["--quick", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["name"] == "overhead" and written["trials"] == 3 and len(written["per_trial"]) == 3
    for row in written["per_trial"]:
        assert row["state"] == "complete" and row["steps"] == 4
        assert 0 < row["to_first_step_s"] < row["wall_s"] and 0 < row["outside_share"] < 1
    # Between trials the worker holds no PeftModel, LoRA layer or optimizer: each trial's adapter is gone.
    assert written["live_objects_between_trials"] and all(
        (e["peft_models"], e["lora_layers"], e["optimizers"]) == (0, 0, 0) for e in written["live_objects_between_trials"])
    assert len(written["memory_mb_after_trial"]) == 3 and result["memory_growth"] is not None
    assert written["provenance"]["machine"]["cores"] >= 1
