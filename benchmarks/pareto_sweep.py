"""Quality and cost together end to end: `python -m lora_search sweep=rank_lr_pareto` (eval loss and trainable
parameters, a memory budget of `auto`, the promotion rule "the smallest adapter within 2% of the best loss", then
promotion, merge, benchmark, report) on the embedded default, as a user runs it, in a fresh results folder.

  .venv/bin/python benchmarks/pareto_sweep.py            # writes results/bench/pareto_sweep.json

Records the wall time (target, issue 15: at most 15 minutes on the 2-core CPU), the Pareto front with the rule's
verdict on each trial, the chosen trial against the best-loss one (loss given up, parameters saved), base vs tuned
exact match, and every trial's estimated against measured peak memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

TARGET_S = 15 * 60


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep in a fresh results folder, write results/bench/pareto_sweep.json, return the record."""
    from lora_search.core import records

    extra = list(sys.argv[1:] if argv is None else argv)
    with common.cli_sweep("rank_lr_pareto", extra) as (wall, out, study):
        best, bench = records.read_json(out / "best.json"), records.read_json(out / "benchmark.json")
        states = [t.user_attrs.get("status") or t.state.name.lower() for t in study.trials]
        front = best["selection"]["front"]
        lowest = min(front, key=lambda c: c["values"]["eval_loss"])
        chosen = next(c for c in front if c["trial"] == best["trial"])
        memory = [{"trial": t.number, "estimated_mb": t.user_attrs.get("estimated_memory_mb"),
                   "measured_mb": t.user_attrs.get("peak_memory_mb")} for t in study.trials
                  if t.user_attrs.get("peak_memory_mb") and t.user_attrs.get("estimated_memory_mb")]
        errors = [abs(m["estimated_mb"] - m["measured_mb"]) / m["measured_mb"] for m in memory]
        rec = common.record("pareto_sweep", {
            "command": " ".join(["python -m lora_search sweep=rank_lr_pareto", *extra]),
            "wall_s": round(wall, 1),
            "target_s": TARGET_S,
            "within_time": wall <= TARGET_S,
            "objectives": list(study.metric_names or []),
            "rule": best["selection"]["rule_text"],
            "trials": {s: states.count(s) for s in sorted(set(states))},
            "front": front,
            "chosen": chosen,
            "lowest_loss": lowest,
            "loss_given_up_pct": round(100 * (chosen["values"]["eval_loss"] / lowest["values"]["eval_loss"] - 1), 2),
            "params_saved_x": round(lowest["values"]["trainable_params"] / chosen["values"]["trainable_params"], 2),
            "memory_budget_mb": study.trials[0].user_attrs.get("memory_budget_mb"),
            "memory_estimates": memory,
            "memory_estimate_max_error": round(max(errors), 3) if errors else None,
            "base_exact_match": bench["base"].get("exact_match"),
            "tuned_exact_match": bench["tuned"].get("exact_match"),
            "tuned_size_mb": bench["tuned"].get("size_mb"),
        })
    path = common.write_record(rec)
    print(f"{path}: {wall / 60:.1f} min; front {[c['trial'] for c in front]}, chosen #{chosen['trial']} "
          f"(lowest loss: #{lowest['trial']}); "
          f"exact match {rec['base_exact_match']} -> {rec['tuned_exact_match']}")
    return rec


if __name__ == "__main__":
    main()
