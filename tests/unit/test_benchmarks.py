"""The benchmark scripts: peer_sweep end to end in --quick mode (tiny model, 2 trials of 4 steps), and the
performance section of docs/performance.md rendered from the records. Speed is measured, never asserted."""

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
                assert trial["setup_s"] >= 0, (name, trial)
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
    assert text.startswith("## Measurements")
    assert f"### LoRA search against its peers (`{tmp_path / 'peer_sweep.json'}`)" in text
    for label in readme_section.LABELS.values():
        assert f"| {label} |" in text
    assert "| per_trial_s | 1.5 |" in text and "Machine: " in text and "Targets:" in text
    assert "Skipped: broken.json: unreadable" in text


def test_readme_section_without_records(tmp_path):
    text = readme_section.render(*common.read_records(tmp_path / "missing"))
    assert "No benchmark records yet" in text


def test_update_replaces_only_the_generated_section(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(f"# Title\n\n{readme_section.BEGIN}\nold figures\n{readme_section.END}\n\n## After\n")
    readme_section.update(page, "## Measurements\n\nnew figures\n")
    text = page.read_text()
    assert "old figures" not in text and "new figures" in text
    assert text.startswith("# Title") and text.endswith("## After\n")
    assert readme_section.section(page) == "## Measurements\n\nnew figures"
    (tmp_path / "plain.md").write_text("# No markers\n")
    with pytest.raises(SystemExit, match="no performance markers"):
        readme_section.update(tmp_path / "plain.md", "x")
    with pytest.raises(SystemExit, match="differs from the records"):  # --check: the page against other records
        readme_section.main(["--dir", str(tmp_path / "missing"), "--check", str(page)])


def test_docs_performance_is_what_the_records_say():
    """docs/performance.md's generated section is exactly what benchmarks/readme_section.py renders from the records
    in results/bench/ (`make bench` regenerates it; nobody edits the figures by hand), and the README holds none."""
    root = common.ROOT
    page = root / "docs" / "performance.md"
    assert readme_section.section(page) == readme_section.render(*common.read_records(common.BENCH_DIR)).rstrip()
    readme_section.main(["--check", str(page)])  # the same through the command line
    assert readme_section.BEGIN not in (root / "README.md").read_text()


@pytest.mark.slow  # runs a benchmark on the tiny model (tens of seconds)
def test_overhead_probe_times_every_trial_and_finds_no_leaked_adapter_or_optimizer(tmp_path):
    from benchmarks import overhead

    out = tmp_path / "overhead.json"
    result = overhead.main(["--quick", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["name"] == "overhead" and written["trials"] == 3 and len(written["per_trial"]) == 3
    assert written["tokenized_before_first_trial"] is True  # the sweep's worker tokenized before trial 0
    for row in written["per_trial"]:
        assert row["state"] == "complete" and row["steps"] == 4
        assert 0 < row["to_first_step_s"] < row["wall_s"] and 0 < row["outside_share"] < 1
    # Between trials the worker holds no PeftModel, LoRA layer or optimizer: each trial's adapter is gone.
    assert written["live_objects_between_trials"] and all(
        (e["peft_models"], e["lora_layers"], e["optimizers"]) == (0, 0, 0) for e in written["live_objects_between_trials"])
    held, r = written["memory_mb_after_trial"], 0.05  # after trial 1, 2, 3, rounded to 0.1 MB
    assert len(held) == 3 and written["memory_growth"] == result["memory_growth"]
    assert (held[-1] - r - held[0] - r) / (held[0] + r) <= result["memory_growth"] <= (held[-1] + r - held[0] + r) / (held[0] - r)
    # the base model's weights are held (counted although the worker froze them out of gc's lists)
    assert min(written["memory_mb_after_trial"]) > 0.1
    assert written["provenance"]["machine"]["cores"] >= 1


# ---- pruning: the same sweep with and without pruning ----

@pytest.fixture(scope="module")
def pruning_quick(tmp_path_factory, tiny_cache):
    """One --quick run of pruning (tiny model, 4 trials of 4 steps, eval every 2, seed 0): the record written."""
    from benchmarks import pruning

    out = tmp_path_factory.mktemp("bench") / "pruning.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "configure_logging", lambda: None)
        result = pruning.main(["--quick", "--out", str(out), "--cache-dir", tiny_cache])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    return written


@pytest.mark.slow  # runs a benchmark on the tiny model (tens of seconds)
def test_pruning_quick_run_records_both_arms_trial_by_trial(pruning_quick):
    rec = pruning_quick
    assert rec["name"] == "pruning" and rec["order"] == ["pruned", "unpruned"]
    s = rec["settings"]
    assert (s["model"], s["trials"], s["max_steps"], s["eval_every"], s["seeds"], s["quick"]) == \
        ("tiny_llama", 4, 4, 2, [0], True)
    assert s["pruner"] == {"type": "successive_halving", "min_resource": 2, "reduction_factor": 3}
    assert s["sampler"]["type"] == "tpe" and set(s["space"]) == SPACE and s["direction"] == "minimize"
    assert "sweep.pruner=none" in s["overrides"]["unpruned"] and "tracking=none" in s["overrides"]["pruned"]
    for arm in ("pruned", "unpruned"):
        (run,) = rec["arms"][arm]["runs"]
        assert "error" not in run, (arm, run.get("error"))
        assert run["seed"] == 0 and run["n_trials"] == 4 and len(run["trials"]) == 4, arm
        assert run["complete"] + run["pruned"] == 4 and run["failed"] == 0, arm
        assert run["wall_s"] > run["compute_s"] > 0, arm  # the wall time also holds the model load
        assert run["compute_s"] == pytest.approx(sum(t["seconds"] for t in run["trials"]), abs=0.01), arm
        assert run["steps"] == sum(t["steps"] for t in run["trials"]), arm
        complete = [t for t in run["trials"] if t["state"] == "complete"]
        assert run["best_value"] == min(t["value"] for t in complete), arm
        assert set(run["best_params"]) == SPACE, arm
        for t in run["trials"]:
            assert t["seconds"] > 0 and set(t["params"]) == SPACE, (arm, t)
            if t["state"] == "complete":
                assert t["steps"] == 4 and math.isfinite(t["value"]), (arm, t)
    unpruned = rec["arms"]["unpruned"]["runs"][0]
    # No pruner and no intermediate evals: nothing reported, every trial whole, nothing spent on periodic evals.
    assert unpruned["pruned"] == 0 and unpruned["reports"] == 0 and unpruned["steps"] == 16
    assert all(t["reports"] == 0 and t["periodic_eval_s"] == 0 for t in unpruned["trials"])
    pruned = rec["arms"]["pruned"]["runs"][0]
    for t in pruned["trials"]:  # an eval every 2 steps, each reported; a pruned trial stops at the report
        assert t["reports"] == t["steps"] // 2 >= 1, t
        assert [step for step, _ in t["intermediate"]] == [2, 4][:t["reports"]], t
        if t["state"] == "pruned":  # stopped at the first rung (step 2); Optuna keeps its last report as value
            assert t["steps"] == 2 and t["value"] == t["intermediate"][-1][1], t
    assert pruned["pruned"] >= 1 and pruned["steps"] < unpruned["steps"]  # successive halving stopped one early
    # The sampler's start-up trials are the same configurations in both arms (same seed, same space).
    assert [t["params"] for t in pruned["trials"]] == [t["params"] for t in unpruned["trials"]]
    assert rec["figures"]["same_params"]["trials"] == pruned["complete"]


@pytest.mark.slow  # runs a benchmark on the tiny model (tens of seconds)
def test_pruning_figures_follow_from_the_per_seed_rows(pruning_quick):
    rec = pruning_quick
    f, t = rec["figures"], rec["targets"]
    runs = {arm: rec["arms"][arm]["runs"] for arm in ("pruned", "unpruned")}
    compute = {arm: sum(r["compute_s"] for r in rows) for arm, rows in runs.items()}
    steps = {arm: sum(r["steps"] for r in rows) for arm, rows in runs.items()}
    assert f["seeds_compared"] == [0]
    assert f["compute_ratio"] == pytest.approx(compute["pruned"] / compute["unpruned"], abs=1e-3)
    assert f["step_ratio"] == pytest.approx(steps["pruned"] / steps["unpruned"], abs=1e-3)
    assert (f["pruned_steps"], f["unpruned_steps"]) == (steps["pruned"], steps["unpruned"])
    assert rec["arms"]["pruned"]["compute_s"] == pytest.approx(compute["pruned"], abs=0.01)
    bests = {arm: [r["best_value"] for r in rows] for arm, rows in runs.items()}
    assert f["best_values"] == bests and f["unpruned_best_worst"] == max(bests["unpruned"])
    assert f["unpruned_best_spread"] is None  # one seed: no spread measured
    assert f["best_gap_per_seed"] == [pytest.approx(bests["pruned"][0] - bests["unpruned"][0])]
    assert f["best_gap_mean"] == pytest.approx(bests["pruned"][0] - bests["unpruned"][0])
    assert t["compute_ratio"] == 0.4 and t["compute_met"] == (f["compute_ratio"] <= 0.4)
    assert t["best_met"] == (bests["pruned"][0] <= bests["unpruned"][0])
    assert t["met"] == (t["compute_met"] and t["best_met"])
    machine = rec["provenance"]["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and rec["provenance"]["packages"]["optuna"]
    assert rec["wall_s"] >= compute["pruned"] + compute["unpruned"]


def test_pruning_figures_and_targets_from_rows():
    """Ratios over the seeds both arms finished; the mean pruned best within the unpruned repeats' spread meets
    the quality target."""
    from benchmarks import pruning

    def run(seed, compute, steps, best, trials=()):
        return {"seed": seed, "compute_s": compute, "steps": steps, "best_value": best, "trials": list(trials)}

    same = {"lora.r": 8}
    runs = {"pruned": [run(0, 30.0, 40, 1.10, [{"state": "complete", "params": same, "value": 1.5}]),
                       run(1, 20.0, 30, 1.25), {"seed": 2, "error": "RuntimeError: boom"}],
            "unpruned": [run(0, 100.0, 192, 1.20, [{"state": "complete", "params": same, "value": 1.25}]),
                         run(1, 100.0, 192, 1.05), run(2, 100.0, 192, 1.0)]}
    f, t = pruning.figures(runs, "minimize")
    assert f["seeds_compared"] == [0, 1] and f["compute_ratio"] == 0.25
    assert f["step_ratio"] == pytest.approx(70 / 384, abs=1e-4)
    assert f["unpruned_best_spread"] == pytest.approx(0.15) and f["unpruned_best_worst"] == 1.20
    assert f["same_params"] == {"trials": 1, "max_value_diff": 0.25}
    # means 1.175 vs 1.125: 0.05 worse, within the 0.15 spread; seed 1's 1.25 is worse than the worst unpruned
    assert f["best_gap_mean"] == pytest.approx(0.05)
    assert t["compute_met"] and t["best_met"] and t["met"]
    assert f["every_pruned_best_no_worse_than_worst_unpruned"] is False
    runs["pruned"][1]["best_value"] = 1.46  # means 1.28 vs 1.125: 0.155 worse, beyond the 0.15 spread
    f, t = pruning.figures(runs, "minimize")
    assert f["best_gap_mean"] == pytest.approx(0.155) and not t["best_met"] and not t["met"]
    # maximize: higher is better, so a lower pruned mean is the worse one
    runs["pruned"][1]["best_value"] = 1.25
    f, t = pruning.figures(runs, "maximize")
    assert f["unpruned_best_worst"] == 1.05 and f["best_gap_mean"] == pytest.approx(-0.05) and t["best_met"]
    runs["pruned"][0]["best_value"], runs["pruned"][1]["best_value"] = 0.9, 0.95
    assert pruning.figures(runs, "maximize")[0]["best_gap_mean"] == pytest.approx(0.2)
    assert not pruning.figures(runs, "maximize")[1]["best_met"]  # 0.2 worse than the 0.15 spread
    runs["pruned"][0]["best_value"] = None  # a seed whose pruned sweep completed no trial
    f, t = pruning.figures(runs, "maximize")
    assert f["best_gap_mean"] is None and not t["best_met"]


def test_pruning_pruner_option_composes_to_exactly_that_pruner():
    from benchmarks import pruning
    from lora_search.config.compose import load_config

    spec = pruning.parse_pruner(pruning.PRUNER)
    assert spec == {"type": "successive_halving", "min_resource": 2, "reduction_factor": 3}
    cfg = load_config(["sweep=rank_lr", *pruning.pruner_overrides(spec)])
    assert cfg.sweep.pruner == spec  # replaced, not merged with the sweep file's median settings
    json_spec = pruning.parse_pruner('{"type": "hyperband", "min_resource": 1, "reduction_factor": 3}')
    assert load_config(["sweep=rank_lr", *pruning.pruner_overrides(json_spec)]).sweep.pruner == json_spec
    assert load_config(["sweep=rank_lr", *pruning.pruner_overrides("median")]).sweep.pruner == "median"
    with pytest.raises(ValueError, match="--pruner"):
        pruning.parse_pruner("[1, 2]")
    with pytest.raises(SystemExit):
        pruning.main(["--quick", "--pruner", "{min_resource: 2}"])  # no type: refused before anything runs


def test_readme_section_renders_a_pruning_record(tmp_path):
    arm = {"runs": [{"seed": 0, "compute_s": 61.2, "steps": 58, "complete": 3, "pruned": 13, "best_value": 1.2345},
                    {"seed": 1, "error": "RuntimeError: out of memory"}]}
    rec = {"name": "pruning", "model": "smollm2_135m",
           "settings": {"model": "smollm2_135m", "trials": 16, "max_steps": 12, "eval_every": 2, "eval_subset": 32,
                        "seeds": [0, 1], "metric": "eval_loss", "direction": "minimize", "quick": False,
                        "pruner": {"type": "successive_halving", "min_resource": 2, "reduction_factor": 3}},
           "arms": {"pruned": arm, "unpruned": {"runs": [{"seed": 0, "compute_s": 204.0, "steps": 192, "complete": 16,
                                                          "pruned": 0, "best_value": 1.2299}]}},
           "figures": {"compute_ratio": 0.3, "step_ratio": 0.302, "best_values": {"pruned": [1.2345],
                                                                                  "unpruned": [1.2299]},
                       "unpruned_best_spread": None},
           "targets": {"compute_ratio": 0.4, "compute_met": True, "best_met": False}}
    (tmp_path / "pruning.json").write_text(json.dumps(rec))
    text = readme_section.main(["--dir", str(tmp_path)])
    assert "### The same sweep with and without pruning (" in text
    assert "successive_halving (min_resource 2, reduction_factor 3) on an eval of 32 rows every 2 steps" in text
    assert "| arm | seed | compute (s) | optimizer steps | complete / pruned | best eval_loss |" in text
    assert "| pruned | 0 | 61.2 | 58 | 3 / 13 | 1.2345 |" in text
    assert "| pruned | 1 | failed: RuntimeError: out of memory | | | |" in text
    assert "| unpruned | 0 | 204.0 | 192 | 16 / 0 | 1.2299 |" in text
    assert "0.30x the unpruned sweeps' trial time (0.30x their optimizer steps; target <= 0.40x: met)" in text
    assert "pruned 1.2345, unpruned 1.2299 (one seed: no run-to-run spread measured)" in text
    assert "no worse than the highest unpruned one: not met." in text  # a record from before the mean-gap rule
    assert "| figure | value |" not in text  # its own renderer, not the generic table
    rec["figures"].update(best_gap_mean=0.0046, every_pruned_best_no_worse_than_worst_unpruned=False)
    (tmp_path / "pruning.json").write_text(json.dumps(rec))
    text = readme_section.main(["--dir", str(tmp_path)])
    assert ("mean gap +0.0046 (positive: pruned worse); target, the gap within the spread: not met; the stricter "
            "check, every pruned best no worse than the worst unpruned one: not met.") in text
    # the evals the pruned trials actually reported (at the pruner's rungs) are what the text names
    arm["runs"][0]["trials"] = [{"intermediate": [[2, 2.7], [6, 1.9], [12, 1.4]]}, {"intermediate": [[2, 2.8]]}]
    (tmp_path / "pruning.json").write_text(json.dumps(rec))
    assert "on an eval of 32 rows at steps 2, 6, 12;" in readme_section.main(["--dir", str(tmp_path)])


# ---- throughput: a lora_search trial against a plain TRL script ----

@pytest.fixture(scope="module")
def throughput_quick(tmp_path_factory, tiny_cache):
    """One --quick run of throughput (tiny model, 4 steps, every CPU arm once, each in its own process)."""
    from benchmarks import throughput

    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "configure_logging", lambda: None)
        throughput.main(["--quick", "--out", str(out), "--cache-dir", tiny_cache])
    return json.loads(out.read_text())


@pytest.mark.slow  # six arms, each a fresh process (about a minute)
def test_throughput_quick_run_trains_the_same_tokens_in_every_arm(throughput_quick):
    from benchmarks import throughput

    rec = throughput_quick
    arms = rec["arms"]
    assert set(arms) == set(throughput.CPU_ARMS) and sorted(rec["order"]) == sorted(throughput.CPU_ARMS)
    assert all("error" not in a for a in arms.values()), {k: a.get("error") for k, a in arms.items()}
    assert len({a["tokens"] for a in arms.values()}) == 1 and arms["trl"]["tokens"] > 0  # the same work
    assert all(a["steps"] == rec["settings"]["steps"] and a["tokens_per_s"] > 0 for a in arms.values())
    assert all(a["peak_memory_mb"] > 0 and a["trainable_params"] == arms["trl"]["trainable_params"]
               for a in arms.values())
    # each ablation flips exactly what it names
    assert arms["padding_free"]["padding_free"] and not arms["lora_search"]["padding_free"]
    assert arms["lora_search"]["compact_lm_head"] and not arms["full_lm_head"]["compact_lm_head"]
    assert arms["full_lm_head"]["eval_loss"] == pytest.approx(arms["lora_search"]["eval_loss"], rel=1e-2)
    assert arms["threads1"]["torch_threads"] == 1 and arms["fp32"]["precision"] == "float32"
    assert not arms["trl"]["padding_free"] and arms["trl"]["eval_rows"] > arms["lora_search"]["eval_rows"]
    assert arms["trl"]["evals"] == arms["lora_search"]["evals"] == 2
    ratio = rec["ratios"]["lora_search_vs_trl"]
    assert ratio["tokens_per_s"] == pytest.approx(arms["lora_search"]["tokens_per_s"] / arms["trl"]["tokens_per_s"],
                                                  rel=1e-3)
    assert ratio["met"] == (ratio["tokens_per_s"] >= throughput.TARGET_CPU)
    fp32 = rec["gains"]["bf16 autocast"]
    assert fp32["taken"] and fp32["speedup"] == pytest.approx(
        arms["lora_search"]["tokens_per_s"] / arms["fp32"]["tokens_per_s"], rel=1e-3)
    assert not rec["gains"]["padding-free batches"]["taken"]
    assert rec["provenance"]["machine"]["cores"] and rec["provenance"]["packages"]["trl"]
    assert "Training throughput" in readme_section.render([rec])


def test_throughput_figures():
    from benchmarks import throughput

    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert throughput.peak_flops("NVIDIA H200") == 989.4e12 and throughput.peak_flops("Tesla T4") is None
    assert throughput.lora_flops_per_token(1_000, 10) == 4_060
    figs = throughput.step_figures([(2.0, 100), (1.0, 100), (1.0, 300)], skip=1)
    assert figs["tokens"] == 500 and figs["tokens_per_s_all"] == 125.0 and figs["tokens_per_s"] == 200.0
    arms = {"trl": {"tokens_per_s": 100.0, "peak_memory_mb": 1000.0, "eval_s": 9.0, "evals": 2, "eval_rows": 100},
            "lora_search": {"tokens_per_s": 120.0, "peak_memory_mb": 900.0, "eval_s": 3.0, "evals": 2, "eval_rows": 32},
            "fp32": {"tokens_per_s": 80.0}, "padding_free": {"tokens_per_s": 90.0}}
    out = throughput.summarize(arms, gpu=False)
    assert out["ratios"]["lora_search_vs_trl"] == {"tokens_per_s": 1.2, "peak_memory": 0.9, "eval_s_per_trial": [3.0, 9.0],
                                                    "target": 1.0, "met": True}
    assert out["gains"]["bf16 autocast"]["speedup"] == 1.5 and out["gains"]["bf16 autocast"]["taken"]
    assert out["gains"]["padding-free batches"]["speedup"] == 0.75  # forcing it on would cost 25%
    assert out["gains"]["cheaper evals"]["speedup"] == 3.0
    assert not throughput.summarize(arms, gpu=True)["ratios"]["lora_search_vs_trl"]["met"]  # 1.2 < 1.3 on a GPU


def test_throughput_counts_matmul_params_without_embeddings(make_cfg, tiny_overrides):
    from benchmarks import throughput
    from lora_search.commands import train_stage

    model = train_stage.start_worker(make_cfg(*tiny_overrides)).base.model
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert throughput.matmul_params(model) == (total if tied else total - emb)


def test_throughput_refuses_an_unknown_arm():
    from benchmarks import throughput

    with pytest.raises(SystemExit, match="--arms: unknown warp; known: trl, lora_search"):
        throughput.run(arms=["lora_search", "warp"], repeats=1)
