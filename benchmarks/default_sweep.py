"""The newcomer's command, timed stage by stage: `python -m lora_search sweep=<name>` as `make sweep` runs it, for the
shipped default and each candidate design side by side in one run (same machine, same session, fresh results
folders), so a change of default is measured against the previous one and never against an old record.

  .venv/bin/python benchmarks/default_sweep.py                         # rank_lr, then rank_lr_continued
  .venv/bin/python benchmarks/default_sweep.py --sweeps rank_lr,dpo_beta
  .venv/bin/python benchmarks/default_sweep.py --quick                 # the tiny model, seconds (the tests)

For each sweep: the wall time and every stage's seconds and share of it (search, promote, merge, benchmark,
report; the pipeline's results/<study>/timings.json), the training steps it ran (trials and full runs: a reused
trial costs none), the trials by state, the promoted configuration, held-out exact match of base and tuned model
(benchmark.json), and the report's paired-evidence sentence (which trials the best is reliably better than).
Targets (issue 23): `make sweep` at most 8 minutes of job time on a 2-core CPU with tuned exact match at least 68%.
Writes results/bench/default_sweep.json (--quick: results/default_sweep_quick.json).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

STAGES = ("search", "promote", "merge", "benchmark", "report")
DEFAULT_SWEEPS = ("rank_lr", "rank_lr_continued")
TARGET_S, TARGET_EXACT_MATCH = 8 * 60, 0.68
QUICK = ["model=tiny_llama", "tracking=none", "data.train_per_task=16", "data.eval_per_task=4", "sweep.n_trials=3",
         "benchmark.latency_prompts=1", "benchmark.repeats=1", "benchmark.max_new_tokens=2",
         "benchmark.int8_dynamic=false"]
QUICK_STEPS = 6  # the promotion budget of a quick run; a design whose trials run the promotion budget keeps that


def quick_overrides(sweep: str) -> list[str]:
    """The tiny settings for one sweep, keeping its design: trials at the promotion budget stay so (continued
    trials, reused by the promotion); short trials are half of it."""
    import yaml

    from lora_search.config import compose

    spec = yaml.safe_load(compose.sweep_files()[sweep].read_text())
    trial, promotion = spec.get("trial") or {}, spec.get("promotion") or {}
    continued = trial.get("trainer.max_steps") == promotion.get("trainer.max_steps")
    steps = QUICK_STEPS if continued else QUICK_STEPS // 2
    top_k = f", top_k: {promotion['top_k']}" if "top_k" in promotion else ""
    return [*QUICK, f"++sweep.trial={{trainer.max_steps: {steps}, trainer.eval_every: {steps // 2}, "
                    f"trainer.eval_subset: 8, trainer.exact_match_items: 2, trainer.final_eval: "
                    f"{trial.get('trainer.final_eval', 'subset')}}}",
            f"++sweep.promotion={{trainer.max_steps: {QUICK_STEPS}, trainer.eval_every: 0, "
            f"trainer.exact_match_items: 2, trainer.final_eval: full{top_k}}}"]
PAIRED = re.compile(r"\*\*Paired comparison\.\*\*[^\n]*")


def stage_times(timings: dict, wall_s: float) -> dict:
    """Each stage's seconds in this run (the latest entry of timings.json) and its share of the wall time; the rest
    (start-up, composing, loading the base) is `other`."""
    out = {s: timings[s][-1]["seconds"] for s in STAGES if timings.get(s)}
    out["other"] = max(0.0, wall_s - sum(out.values()))
    return {s: {"seconds": round(v, 1), "share": round(v / wall_s, 3) if wall_s else None} for s, v in out.items()}


def steps_trained(study, out: Path) -> dict:
    """Training steps the sweep ran: every trial's (complete, pruned or failed, as far as it got) and every full
    run's that trained (a full run that reused its trial's adapter costs none)."""
    from lora_search.core import records

    trials = sum(int(t.user_attrs.get("steps") or 0) for t in study.trials)
    full = 0
    for metrics in sorted((out / "full" / "runs").glob("*/metrics.json")):
        m = records.read_json(metrics) or {}
        full += 0 if m.get("reused_trial") is not None else int(m.get("steps") or 0)
    return {"trials": trials, "full_runs": full, "total": trials + full}


def one(sweep: str, extra: list[str]) -> dict:
    """Run one sweep as a user does and return its figures."""
    from lora_search.core import records

    with common.cli_sweep(sweep, extra) as (wall, out, study):
        bench = records.read_json(out / "benchmark.json") or {}
        best = records.read_json(out / "best.json") or {}
        report = (out / "report.md").read_text()
        states = [t.state.name.lower() for t in study.trials]
        base, tuned = bench.get("base", {}), bench.get("tuned", {})
        paired = PAIRED.search(report)
        return {
            "command": " ".join(["python -m lora_search", f"sweep={sweep}", *extra]),
            "wall_s": round(wall, 1),
            "stages": stage_times(records.read_json(out / "timings.json") or {}, wall),
            "steps": steps_trained(study, out),
            "trials": {s: states.count(s) for s in sorted(set(states))},
            "promoted": {"trial": best.get("trial"), "params": best.get("params"), "value": best.get("value"),
                         "metric": best.get("metric")},
            "base_exact_match": base.get("exact_match"),
            "tuned_exact_match": tuned.get("exact_match"),
            "tuned_eval_loss": tuned.get("eval_loss"),
            "paired_evidence": paired.group(0) if paired else None,
            "within_time": wall <= TARGET_S,
            "exact_match_met": (tuned.get("exact_match") or 0) >= TARGET_EXACT_MATCH,
        }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweeps", default=",".join(DEFAULT_SWEEPS), help="comma-separated sweep names, the shipped "
                   "default first")
    p.add_argument("--quick", action="store_true", help="the tiny model and a few steps (the tests)")
    p.add_argument("--out", default=None, help="the record (default results/bench/default_sweep.json)")
    a, extra = p.parse_known_args(argv)
    sweeps = [s for s in a.sweeps.split(",") if s]
    runs = {s: one(s, [*(quick_overrides(s) if a.quick else []), *extra]) for s in sweeps}
    rec = common.record("default_sweep", {
        "sweeps": runs, "order": sweeps, "quick": a.quick, "target_s": TARGET_S,
        "target_exact_match": TARGET_EXACT_MATCH,
        "note": "each sweep run once, in this order, on the same machine in one session"})
    out = Path(a.out) if a.out else (common.ROOT / "results" / "default_sweep_quick.json" if a.quick else None)
    path = common.write_record(rec, out)
    for s, r in runs.items():
        shares = ", ".join(f"{k} {v['seconds'] / 60:.1f}" for k, v in r["stages"].items())
        print(f"{s}: {r['wall_s'] / 60:.1f} min ({shares}); {r['steps']['total']} training steps; exact match "
              f"{common.fmt(r['base_exact_match'], '.0%')} -> {common.fmt(r['tuned_exact_match'], '.0%')}")
    print(path)
    return rec


if __name__ == "__main__":
    main()
